"""Benchmarks: the speed and memory tables of the README, one subcommand each.

The model files carry only their papers; everything that times or measures them lives here
(nanoGPT keeps bench.py beside model.py for the same reason). Every subcommand prints a header
line (device, torch version, CPU threads) and a markdown table ready to paste.

  extraction  [000, App. A] the cost of one glimpse set (8 gazes x (16 multi-zoom + 25 foveal
              grid) patches of 16 x 16 px from one image) against the image side, for the
              integral path with its table ready, the integral path with the table build, the
              bilinear grid_sample path, and naive crop + antialiased F.interpolate, one box at
              a time. Median ms. README: "Extraction cost does not depend on the image".
  canvit      [003] one recurrent CanViT step (glimpse -> new state, state carried over) at
              batch 1 (latency) and 64 (throughput), eager vs torch.compile, float32 vs bf16
              autocast, in inference mode. CanViT-B with 128 px glimpses and a 32 x 32 canvas on
              CUDA, a small CanViT (D = 192) with a 16 x 16 canvas on CPU. README: "CanViT
              against the official code and the paper".
  distill     [003, Sec. 5] one optimizer step of CanViT-B distilled from a ViT-B/16 teacher
              (random weights) on 512 px scenes, 128 px glimpses, 1 F-IID + 1 R-IID rollout of
              a fixed length T: s/step, glimpses/s, the bytes saved for backward at a chunk's
              backward (see SavedTensorMeter: the truncated-BPTT claim is that this does not
              grow with T) and peak memory. --precomputed feeds random float16 teacher features
              instead of running the teacher (the paper's setting, App. D.2). README:
              "Pretraining CanViT".
  foveal      [002, A.3.4] one training step of the foveal iterative ViT-S of paper 000
              (dim 384, depth 12, 6 heads, 8 state tokens, 16 multi-zoom + 5 x 5 grid patches
              of 16 px) on 224 px images: an episode of 8 random glimpses, one backward a step,
              an AdamW update; batch 8 in float32 on CPU, 256 in bf16 autocast on CUDA.
              s/step, glimpses/s, peak memory. No README table yet.
  dino        [000, Sec. 3.1] one step of sequential-to-global DINO (dino.DINOConfig: ViT-S,
              16 x 16 global grid, 8 local 7 x 7 views, 65,536 prototypes, EMA teacher) on 224 px
              images for each number of sequential glimpses: images/s, glimpses/s (every view's
              glimpses, teacher's too), peak memory; batch 2 float32 on CPU, 64 bf16 on CUDA.
  grpo        [002, A.2; 000, Sec. 3.3] GazeGRPO on a random, frozen foveal ViT-S: a rollout of
              G = 16 traces of T = 8 glimpses for each of B images (traces/s, glimpses/s), and
              one inner epoch (policy forward + backward + AdamW on the B*G*T stored states);
              B = 2 float32 on CPU, 64 bf16 on CUDA.
  flops       [003, App. G] the FLOP counts of Tables 5, 10 and 16 and Table 3's parameter
              counts from the formulas (count_flops, count_params), beside the paper's figures.
  data        SyntheticScenes rendering, ms per item at 128-1024 px in one thread, and the
              scenes/s a DataLoader with 2 workers delivers. No README table yet.

  gpu         the prepared GPU check, in one run (about 6 minutes on an H100; `--device cpu`
              is a dry run of the same code, not a measurement): tests/test_cuda.py (`pytest
              -m cuda`: extraction, the official references, bf16, compile, fused AdamW, a 1-GPU
              torchrun, resume after a kill), then one row per figure, each section in a child
              process under a time budget (a failure or a timeout is reported in its row):
              CanViT-B distillation throughput (bf16, compiled, batch 64, 512 px scenes, 128 px
              glimpses, 32 x 32 canvas) against the paper's ~1,670 glimpses/s on one H100 [003]
              and its memory at rollouts of T = 4 vs 20; CanViT-B latency per glimpse at batch 1;
              extraction from a 256 vs an 8192 px image ([000] Fig. 2: flat); the foveal ViT-S,
              SSL and GRPO steps above. One markdown table with the GPU's name is printed and
              written to --out, with its JSON and the logs beside it.

Peak memory: CUDA max_memory_allocated, reset before each row's timed steps; on CPU the
process's peak RSS (ru_maxrss, never reset: the peak so far in this process).

  python bench.py extraction [--sizes 256 512 ...] [--repeats 20] [--device cuda]
  python bench.py canvit [--batch 1 64] [--repeats 20] [--threads 2]
  python bench.py distill [--lengths 4 20] [--batch 64] [--dtype bfloat16] [--compile]
                          [--precomputed] [--size 512]
  python bench.py foveal [--batch 256] [--dtype bfloat16] [--compile] [--repeats 5]
  python bench.py dino [--seq_steps 4 8] [--batch 64] [--dtype bfloat16] [--compile]
  python bench.py grpo [--batch 64] [--group 16] [--steps 8] [--inner_epochs 8]
  python bench.py flops
  python bench.py data [--sizes 128 256 512 1024] [--n 100] [--workers 2]
  python bench.py gpu [--out out/gpu_check.md] [--budget SECONDS]
Every subcommand takes --device (default cuda when present; data always runs on the CPU) and
--threads (CPU threads; torch's default, data's 1).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import canvit
import data
import dino
import distill
import fovea
import grpo

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Shared machinery: the header line, timing, memory, a minimal training run
# ----------------------------------------------------------------------------------------------

def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else "CPU"


def header(dev: torch.device, what: str) -> None:
    print(f"{what}\ndevice: {device_name(dev)} ({dev.type}); torch {torch.__version__}; "
          f"{torch.get_num_threads()} CPU threads")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of `repeats` calls of fn() after `warmup` untimed ones, the device synchronised."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def reset_peak_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mb(dev: torch.device) -> float:
    """CUDA: max_memory_allocated since the last reset. CPU: the process's peak RSS so far."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux: KiB


class BenchRun:
    """What train.py's loop lends an objective's train_step (train.Run), for one process:
    autocast to `amp_dtype` (None: float32) and an optimizer step that clips the gradient norm
    at 1.0 ([003] Table 2) and steps AdamW over the trainable parameters; schedule_steps, the
    horizon of an objective's own schedules (DINO's teacher momentum, GRPO's std)."""
    rank, world, steps_per_epoch, schedule_steps = 0, 1, 1000, 10_000

    def __init__(self, params, device: torch.device, amp_dtype: torch.dtype | None):
        self.device, self.amp_dtype = device, amp_dtype
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, fused=device.type == "cuda")
        self.updates = 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimizer_step(self, frozen=()) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        for p in frozen:
            p.grad = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.updates += 1


class _Packed:
    """What autograd keeps in place of a saved tensor while a SavedTensorMeter is active."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Bytes that autograd keeps alive for backward passes, from the public
    `torch.autograd.graph.saved_tensors_hooks` (no patching).

    Autograd hands each tensor it saves for a backward to the pack hook, and drops what the
    hook returned once a backward has used it (or the graph is freed). The pack hook adds the
    bytes of the tensor's storage when no live saved tensor holds that storage yet (views and
    repeated saves of one buffer count once); a weakref finalizer on the packed object takes
    them off when the last saved tensor on that storage is released. So `live` = the bytes of
    the distinct storages that saved tensors hold at this moment, the parameters' own storages
    excluded (they exist anyway; under autocast their bf16 copies are counted, they are held for
    backward too). `peak` = its maximum since `reset()`. With truncated BPTT the graph of a chunk
    is freed by its backward, so the peak is the largest chunk's total at the start of its
    backward: the activation memory that should not grow with the rollout length.
    """

    def __init__(self, exclude=()):
        self.skip = {p.untyped_storage().data_ptr() for p in exclude}
        self.refs: dict[int, int] = {}                 # storage address -> live saved tensors
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda p: p.tensor)

    def reset(self) -> None:
        self.peak = self.live

    def _pack(self, t: Tensor) -> _Packed:
        packed = _Packed(t)
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.skip:
            if key not in self.refs:
                self.refs[key] = 0
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(packed, self._release, key, storage.nbytes())
        return packed

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _amp(dtype: str | None, dev: torch.device) -> torch.dtype | None:
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype {dtype!r}: choose float32 or bfloat16")
    return torch.bfloat16 if dtype == "bfloat16" else None


def _dtype_name(amp: torch.dtype | None) -> str:
    return "bfloat16" if amp == torch.bfloat16 else "float32"


def _compile_note(backend: str | None) -> str:
    if backend is None:
        return ""
    return ", compiled" + ("" if backend == "inductor" else f" ({backend} backend)")


# ----------------------------------------------------------------------------------------------
# extraction: [000, App. A] glimpse extraction cost vs image size
# ----------------------------------------------------------------------------------------------

def crop_resize(images: Tensor, boxes: Tensor, p: int) -> Tensor:
    """Naive baseline: crop each box (zero padded) and F.interpolate(antialias=True), one by one.
    images (B, C, H, W), boxes (B, P, 4) -> (B, P, C, p, p)."""
    B, C, H, W = images.shape
    out = []
    for b in range(B):
        for y0, x0, y1, x1 in boxes[b].round().long().tolist():
            crop = images[b:b + 1, :, max(y0, 0):min(y1, H), max(x0, 0):min(x1, W)]
            crop = F.pad(crop, (max(-x0, 0), max(x1 - W, 0), max(-y0, 0), max(y1 - H, 0)))
            out.append(F.interpolate(crop, size=(p, p), mode="bilinear", antialias=True,
                                     align_corners=False))
    return torch.cat(out).view(B, -1, C, p, p)


def bilinear_boxes(images: Tensor, boxes: Tensor, p: int) -> Tensor:
    """All boxes sampled bilinearly at their p x p cell centres in one grid_sample call.
    images (B, C, H, W), boxes (B, P, 4) -> (B, P, C, p, p)."""
    B, C, H, W = images.shape
    P = boxes.shape[1]
    t = (torch.arange(p, device=images.device, dtype=torch.float32) + 0.5) / p
    y0, x0, y1, x1 = boxes.unbind(-1)                                             # (B, P)
    ys = (y0[..., None] + (y1 - y0)[..., None] * t) / H * 2 - 1                   # (B, P, p)
    xs = (x0[..., None] + (x1 - x0)[..., None] * t) / W * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), -1)
    out = F.grid_sample(images, grid.reshape(B, P * p, p, 2), align_corners=False)  # (B,C,P*p,p)
    return out.view(B, C, P, p, p).transpose(1, 2)


def extraction_row(dev: torch.device, S: int, repeats: int) -> dict:
    """Median ms of one glimpse set (8 gazes x 41 patches of 16 px) from one S x S image, by
    each method. The gazes are the same at every size (seeded)."""
    gen = torch.Generator().manual_seed(0)
    gazes = (torch.rand(8, 2, generator=gen) * 1.6 - 0.8).to(dev)                 # 8 gazes
    img = torch.rand(1, 3, S, S, device=dev)
    ctx = fovea.foveal_context(gazes, (S, S), num_zoom=16, max_z=4.0, grid=5, grid_z=4.0)
    boxes = ctx.boxes.reshape(1, -1, 4)                                           # (1, 328, 4)
    table = fovea.integral_image(img)
    ms = lambda fn: statistics.median(timed(fn, dev, repeats)) * 1e3
    with_table = lambda: fovea.box_patches(fovea.integral_image(img), boxes, 16)
    return {"side": S,
            "integral_ms": ms(lambda: fovea.box_patches(table, boxes, 16)),
            "integral_table_ms": ms(with_table),
            "bilinear_ms": ms(lambda: bilinear_boxes(img, boxes, 16)),
            "naive_ms": ms(lambda: crop_resize(img, boxes, 16))}


def bench_extraction(args) -> None:
    dev = _device(args.device)
    header(dev, f"extraction: one glimpse set, 8 gazes x (16 multi-zoom + 25 grid) patches of "
                f"16x16 px from one image; median ms of {args.repeats}")
    print("| image side | integral (table ready) | integral + table build | bilinear | "
          "crop + interpolate (antialias) | naive / integral |")
    print("|---:|---:|---:|---:|---:|---:|")
    for S in args.sizes:
        r = extraction_row(dev, S, args.repeats)
        print(f"| {S} | {r['integral_ms']:.2f} | {r['integral_table_ms']:.1f} | "
              f"{r['bilinear_ms']:.2f} | {r['naive_ms']:.1f} | "
              f"{r['naive_ms'] / r['integral_ms']:.0f}x |", flush=True)


# ----------------------------------------------------------------------------------------------
# canvit: [003] per-glimpse latency and throughput
# ----------------------------------------------------------------------------------------------

def canvit_config(dev: torch.device) -> tuple[canvit.CanViTConfig, int, int]:
    """(config, glimpse px, canvas grid): CanViT-B, 128 px, 32 x 32 on CUDA; a small one on CPU."""
    if dev.type == "cuda":
        return canvit.CanViTConfig(), 128, 32
    small = canvit.BackboneConfig(embed_dim=192, num_heads=3, n_blocks=12)
    return canvit.CanViTConfig(backbone=small, canvas_num_heads=4, canvas_head_dim=64,
                               teacher_dim=384), 128, 16


def canvit_row(model: canvit.CanViT, step, dev: torch.device, glimpse_px: int, G: int,
               dtype: torch.dtype, batch: int, repeats: int) -> dict:
    """Seconds of one recurrent step (`step`: the model or its compiled twin; the state carried
    over) at `batch`, in inference mode, after 3 warm-up steps."""
    glimpse = torch.randn(batch, 3, glimpse_px, glimpse_px, device=dev)
    vp = canvit.random_viewpoints(batch, torch.Generator().manual_seed(0))
    center, scale = vp.center_yx.to(dev), vp.scale.to(dev)
    amp = torch.autocast(dev.type, dtype, enabled=dtype == torch.bfloat16)
    with torch.inference_mode(), amp:
        state = model.init_state(batch, G)

        def one_step():
            nonlocal state
            state = step(glimpse, state, center, scale).state
        times = timed(one_step, dev, repeats, warmup=3)
    ms = statistics.median(times) * 1e3
    return {"batch": batch, "ms": ms, "best_ms": min(times) * 1e3, "glimpses_s": batch / ms * 1e3}


def bench_canvit(args) -> None:
    """The median time of one recurrent step (state carried over) after 3 warm-up steps."""
    dev = _device(args.device)
    cfg, gp, G = canvit_config(dev)
    torch.manual_seed(0)
    model = canvit.CanViT(cfg).to(dev).eval()
    flops = count_flops(cfg, glimpse_grid=gp // cfg.backbone.patch_size, canvas_grid=G)
    header(dev, f"canvit: one recurrent step per glimpse, D={cfg.backbone.embed_dim} x "
                f"{cfg.backbone.n_blocks} blocks, Dc={cfg.canvas_dim}, glimpse {gp} px, canvas "
                f"{G}x{G}; {count_params(model) / 1e6:.1f}M params, "
                f"{flops['total'] / 1e9:.2f} GFLOPs/glimpse; median of {args.repeats} steps")
    print("| mode | dtype | batch | ms/step (median) | best ms | glimpses/s |")
    print("|---|---|---:|---:|---:|---:|")
    for compiled in (False, True):
        step = torch.compile(model, dynamic=False) if compiled else model
        for dtype in (torch.float32, torch.bfloat16):
            for batch in args.batch:
                r = canvit_row(model, step, dev, gp, G, dtype, batch, args.repeats)
                print(f"| {'compiled' if compiled else 'eager'} | {str(dtype)[6:]} | {batch} | "
                      f"{r['ms']:.2f} | {r['best_ms']:.2f} | {r['glimpses_s']:.1f} |", flush=True)


# ----------------------------------------------------------------------------------------------
# distill: [003, Sec. 5] a distillation training step vs the rollout length
# ----------------------------------------------------------------------------------------------

class DistillBench:
    """A Distillation objective [003, Sec. 5] (random teacher), its optimizer and a batch of
    random scenes; `row(T)` measures training steps with rollouts of exactly T glimpses.

    precomputed: the batch carries random float16 teacher features (what the shards give, the
    paper's setting [003, App. D.2]); else the teacher runs on the scenes at every step.
    model_cfg: the CanViT (default CanViT-B); its teacher is a DINOv3 ViT as wide as its
    teacher_dim (ViT-B/16 for CanViT-B). compile_backend: torch.compile the CanViT (None: eager).
    """

    def __init__(self, dev: torch.device, batch: int, amp: torch.dtype | None, size: int = 512,
                 compile_backend: str | None = None, precomputed: bool = False,
                 model_cfg: canvit.CanViTConfig | None = None, glimpse_px: int = 128):
        model_cfg = model_cfg or canvit.CanViTConfig()
        teacher = distill.TeacherConfig()
        if model_cfg.teacher_dim != teacher.backbone.embed_dim:
            teacher.backbone = canvit.backbone_config("vits16")          # 384 wide
        torch.manual_seed(0)
        with warnings.catch_warnings():                # a random teacher: known, and said below
            warnings.simplefilter("ignore", distill.RandomTeacherWarning)
            cfg = distill.DistillConfig(model=model_cfg, teacher=teacher, glimpse_px=glimpse_px,
                                        p_stop=1e-9)
            self.obj = obj = distill.Distillation(cfg, seed=0).to(dev)
        self.dev, self.batch, self.amp, self.size = dev, batch, amp, size
        self.precomputed, self.compile_backend = precomputed, compile_backend
        Dt, self.K = model_cfg.teacher_dim, cfg.chunk
        self.G = G = size // model_cfg.backbone.patch_size
        obj.model.set_standardizers(G, torch.zeros(1, Dt), torch.ones(1, Dt),
                                    torch.zeros(G * G, Dt), torch.ones(G * G, Dt))
        if compile_backend:
            obj.model.compile(backend=compile_backend)
        self.run = BenchRun(obj.model.parameters(), dev, amp)
        self.data = {"image": torch.randn(batch, 3, size, size, device=dev)}
        if precomputed:
            self.data["teacher_cls"] = torch.randn(batch, Dt, device=dev).half()
            self.data["teacher_patches"] = torch.randn(batch, G * G, Dt, device=dev).half()
        self.step = 0

    def describe(self) -> str:
        m = self.obj.cfg.model
        return (f"CanViT D={m.backbone.embed_dim} x {m.backbone.n_blocks} blocks, {self.batch} "
                f"scenes x 2 rollouts, {self.size} px scenes, {self.obj.cfg.glimpse_px} px "
                f"glimpses, canvas {self.G}x{self.G}, chunks of {self.K}, "
                f"{self.teacher_note()}, {_dtype_name(self.amp)}"
                f"{_compile_note(self.compile_backend)}")

    def teacher_note(self) -> str:
        if self.precomputed:
            return "precomputed teacher features (random float16)"
        t = self.obj.cfg.teacher.backbone
        return f"a random DINOv3 teacher (D={t.embed_dim} x {t.n_blocks}) in the loop"

    def train_step(self) -> dict:
        self.step += 1
        return self.obj.train_step(self.data, self.step, self.run)

    def row(self, T: int, repeats: int) -> dict:
        """A warm-up step (compilation), an untimed step under a SavedTensorMeter, then the
        median of `repeats` timed steps; peak memory over the timed ones."""
        if T % self.K:
            raise ValueError(f"rollout length {T} is not a multiple of the chunk length {self.K}")
        self.obj.cfg.max_chunks = T // self.K                    # p_stop ~ 0: exactly T glimpses
        self.train_step()                                        # warm-up (and compilation)
        meter = SavedTensorMeter(exclude=self.obj.parameters())
        with meter:                                              # an untimed step, measured
            glimpses = self.train_step()["glimpses"]
        reset_peak_memory(self.dev)
        s = statistics.median(timed(self.train_step, self.dev, repeats, warmup=0))
        return {"T": T, "s_step": s, "glimpses": glimpses, "glimpses_s": glimpses / s,
                "saved_mb": meter.peak / 2 ** 20, "peak_mb": peak_memory_mb(self.dev)}


def bench_distill(args) -> None:
    dev = _device(args.device)
    amp = _amp(args.dtype, dev)
    batch = args.batch or (64 if dev.type == "cuda" else 1)
    bench = DistillBench(dev, batch, amp, args.size, "inductor" if args.compile else None,
                         args.precomputed)
    header(dev, f"distill: {bench.describe()}; median of {args.repeats} steps")
    print("| rollout length T | s/step | glimpses/s | saved for backward at a chunk's backward "
          "(MB) | peak memory (MB) |\n|---:|---:|---:|---:|---:|")
    for T in args.lengths:
        if T % bench.K:
            raise SystemExit(f"--lengths: {T} is not a multiple of the chunk length {bench.K}")
        r = bench.row(T, args.repeats)
        print(f"| {T} | {r['s_step']:.2f} | {r['glimpses_s']:.1f} | {r['saved_mb']:.0f} | "
              f"{r['peak_mb']:.0f} |", flush=True)


# ----------------------------------------------------------------------------------------------
# foveal: [002, A.3.4] a training step of the foveal iterative ViT-S ([000] Sec. 4)
# ----------------------------------------------------------------------------------------------

def vit_s() -> fovea.FovealConfig:
    """[000] Sec. 4's foveal ViT-S: 384 wide, 12 blocks, 6 heads, N = 8 state tokens, 16
    multi-zoom + 5 x 5 foveal grid patches of 16 px (as dino.DINOConfig's model, with a head)."""
    return fovea.FovealConfig(dim=384, depth=12, heads=6, num_state=8, patch_px=16, num_zoom=16,
                              grid=5, grid_z=(3.0, 4.0), z_max=4.0)


def foveal_row(dev: torch.device, batch: int, amp: torch.dtype | None, size: int = 224,
               compile_backend: str | None = None, repeats: int = 3,
               warmup: int | None = None) -> dict:
    """FovealSupervised training steps (8 random glimpses, one backward a glimpse, AdamW) of
    the ViT-S on `batch` random images: the median of `repeats` after `warmup` (default 1, 2
    compiled) untimed steps; peak memory over the timed ones."""
    cfg = fovea.FovealTrainConfig(model=vit_s(), steps=8)
    torch.manual_seed(0)
    obj = fovea.FovealSupervised(cfg, seed=0).to(dev)
    if compile_backend:
        obj.model.compile(backend=compile_backend)
    run = BenchRun(obj.model.parameters(), dev, amp)
    gen = torch.Generator().manual_seed(0)
    data_batch = {"image": torch.randn(batch, 3, size, size, generator=gen).to(dev),
                  "label": torch.randint(cfg.model.num_classes, (batch,), generator=gen).to(dev)}
    step = 0

    def train_step():
        nonlocal step
        step += 1
        obj.train_step(data_batch, step, run)
    for _ in range(warmup if warmup is not None else 2 if compile_backend else 1):
        train_step()                                             # warm-up (and compilation)
    reset_peak_memory(dev)
    s = statistics.median(timed(train_step, dev, repeats, warmup=0))
    m = cfg.model
    return {"batch": batch, "tokens": m.num_state + m.num_zoom + m.grid ** 2, "s_step": s,
            "images_s": batch / s, "glimpses_s": batch * cfg.steps / s,
            "peak_mb": peak_memory_mb(dev)}


def bench_foveal(args) -> None:
    dev = _device(args.device)
    amp = _amp(args.dtype, dev)
    batch = args.batch or (256 if dev.type == "cuda" else 8)
    m = vit_s()
    with torch.device("meta"):
        params = sum(p.numel() for p in fovea.FovealViT(m).parameters()) / 1e6
    header(dev, f"foveal: FovealViT-S (384 x 12, 6 heads, {m.num_state} state tokens, "
                f"{m.num_zoom} + {m.grid}x{m.grid} patches of {m.patch_px} px, "
                f"{params:.1f}M params), 8 glimpses an episode, {args.size} px images, "
                f"{_dtype_name(amp)}{', compiled' if args.compile else ''}; "
                f"median of {args.repeats} steps")
    print("| batch | tokens a glimpse | s/step | images/s | glimpses/s | peak memory (MB) |")
    print("|---:|---:|---:|---:|---:|---:|", flush=True)
    r = foveal_row(dev, batch, amp, args.size, "inductor" if args.compile else None,
                   args.repeats)
    print(f"| {batch} | {r['tokens']} | {r['s_step']:.3f} | {r['images_s']:.1f} | "
          f"{r['glimpses_s']:.1f} | {r['peak_mb']:.0f} |", flush=True)


# ----------------------------------------------------------------------------------------------
# dino: [000, Sec. 3.1] a sequential-to-global DINO training step
# ----------------------------------------------------------------------------------------------

def dino_row(dev: torch.device, batch: int, amp: torch.dtype | None, seq_steps: int,
             size: int = 224, compile_backend: str | None = None, repeats: int = 2,
             warmup: int | None = None) -> dict:
    """DINOSequentialToGlobal training steps (dino.DINOConfig(), `seq_steps` sequential
    glimpses) on `batch` random images: the median of `repeats` after `warmup` (default 1, 2
    compiled) untimed steps; peak memory over the timed ones."""
    cfg = dataclasses.replace(dino.DINOConfig(), seq_steps=seq_steps)
    torch.manual_seed(0)
    obj = dino.DINOSequentialToGlobal(cfg, seed=0).to(dev)
    if compile_backend:
        # The objective calls its models' .view (the backbone) and .head, never a DINOModel's
        # forward: compile those (DINOModel.compile() would compile a forward nobody calls).
        for part in (obj.model.backbone, obj.model.head, obj.teacher.backbone, obj.teacher.head):
            part.compile(backend=compile_backend)
    run = BenchRun(obj.model.parameters(), dev, amp)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    step, glimpses = run.steps_per_epoch, 0        # after epoch 1: the prototypes train too

    def train_step():
        nonlocal step, glimpses
        step += 1
        glimpses = obj.train_step({"image": images}, step, run)["glimpses"]
    for _ in range(warmup if warmup is not None else 2 if compile_backend else 1):
        train_step()                                             # warm-up (and compilation)
    reset_peak_memory(dev)
    s = statistics.median(timed(train_step, dev, repeats, warmup=0))
    return {"seq_steps": seq_steps, "batch": batch, "s_step": s, "images_s": batch / s,
            "glimpses": glimpses, "glimpses_s": glimpses / s, "peak_mb": peak_memory_mb(dev)}


def bench_dino(args) -> None:
    dev = _device(args.device)
    amp = _amp(args.dtype, dev)
    batch = args.batch or (64 if dev.type == "cuda" else 2)
    c = dino.DINOConfig()
    header(dev, f"dino: sequential-to-global DINO step, FovealViT-S student + EMA teacher "
                f"(384 x 12, {c.model.num_state} state tokens), {c.global_grid}x{c.global_grid} "
                f"global grid, {c.n_local} local {c.local_grid}x{c.local_grid} views, "
                f"{c.out_dim:,} prototypes, {batch} images of {args.size} px, "
                f"{_dtype_name(amp)}{', compiled' if args.compile else ''}; "
                f"median of {args.repeats} steps. glimpses: every view's, the teacher's too")
    print("| sequential steps | s/step | images/s | glimpses a step | glimpses/s | "
          "peak memory (MB) |\n|---:|---:|---:|---:|---:|---:|", flush=True)
    for T in args.seq_steps:
        r = dino_row(dev, batch, amp, T, args.size, "inductor" if args.compile else None,
                     args.repeats)
        print(f"| {T} | {r['s_step']:.2f} | {r['images_s']:.1f} | {r['glimpses']} | "
              f"{r['glimpses_s']:.0f} | {r['peak_mb']:.0f} |", flush=True)


# ----------------------------------------------------------------------------------------------
# grpo: [002, A.2; 000, Sec. 3.3] GazeGRPO's rollout and inner epochs on a frozen ViT-S
# ----------------------------------------------------------------------------------------------

def grpo_objective(dev: torch.device, group: int, steps: int, inner_epochs: int,
                   policy_depth: int) -> grpo.GazeGRPO:
    """GazeGRPO through its own constructor, on a randomly initialised foveal ViT-S.

    GazeGRPO loads its frozen encoder from a checkpoint path (GRPOConfig.encoder), so a
    foveal_sup checkpoint is written to a temporary folder first, in train.py's layout (the
    keys fovea.read_checkpoint / load_frozen and GazeGRPO read: "model", "config" with the
    objective and data.num_classes, "export"); written here rather than by train.checkpoint,
    since nothing imports train.py (DESIGN.md's import graph)."""
    torch.manual_seed(0)
    sup = fovea.FovealSupervised(fovea.FovealTrainConfig(model=vit_s()), seed=0)
    ckpt = {"model": sup.model.state_dict(), "export": sup.export(),
            "config": {"objective": "foveal_sup", "data": {"num_classes": vit_s().num_classes}}}
    cfg = grpo.GRPOConfig(group=group, steps=steps, inner_epochs=inner_epochs,
                          policy=grpo.GazePolicyConfig(depth=policy_depth))
    with tempfile.TemporaryDirectory() as folder:
        torch.save(ckpt, Path(folder) / "ckpt.pt")
        cfg.encoder = str(Path(folder) / "ckpt.pt")
        obj = grpo.GazeGRPO(cfg, seed=0)
    return obj.to(dev)


def grpo_row(dev: torch.device, batch: int, amp: torch.dtype | None, group: int = 16,
             steps: int = 8, inner_epochs: int = 8, policy_depth: int = 6, size: int = 224,
             repeats: int = 3, warmup: int = 1) -> dict:
    """GazeGRPO on `batch` random images: the median time of a rollout (B*G traces of T
    glimpses through the frozen encoder, actions sampled) and of a whole train_step (a rollout,
    the advantages, `inner_epochs` updates). One inner epoch = (step - rollout) / inner_epochs:
    derived from the objective's own step rather than a second copy of its inner loop here."""
    obj = grpo_objective(dev, group, steps, inner_epochs, policy_depth)
    run = BenchRun(obj.model.parameters(), dev, amp)
    gen = torch.Generator().manual_seed(0)
    data_batch = {"image": torch.randn(batch, 3, size, size, generator=gen).to(dev),
                  "label": torch.randint(obj.num_classes, (batch,), generator=gen).to(dev)}
    std = obj.model.cfg.std_start

    def rollout():
        with run.autocast():                                     # as GazeGRPO.train_step
            obj.rollout(data_batch["image"], data_batch["label"], 0, 0, 1, std)
    t_roll = statistics.median(timed(rollout, dev, repeats, warmup))
    step = 0

    def train_step():
        nonlocal step
        step += 1
        obj.train_step(data_batch, step, run)
    reset_peak_memory(dev)
    t_step = statistics.median(timed(train_step, dev, repeats, warmup))
    traces = batch * group
    return {"batch": batch, "group": group, "steps": steps, "inner_epochs": inner_epochs,
            "rollout_s": t_roll, "traces_s": traces / t_roll,
            "glimpses_s": traces * steps / t_roll, "step_s": t_step,
            "inner_epoch_ms": max(t_step - t_roll, 0.0) / inner_epochs * 1e3,
            "states": traces * steps, "peak_mb": peak_memory_mb(dev)}


def bench_grpo(args) -> None:
    dev = _device(args.device)
    amp = _amp(args.dtype, dev)
    batch = args.batch or (64 if dev.type == "cuda" else 2)
    header(dev, f"grpo: GazeGRPO on a random frozen FovealViT-S (384 x 12, 16 multi-zoom + 5x5 "
                f"grid patches), policy of depth {args.policy_depth}, {batch} images of "
                f"{args.size} px x G = {args.group} traces x T = {args.steps} glimpses, "
                f"{args.inner_epochs} inner epochs, {_dtype_name(amp)}; median of "
                f"{args.repeats}. inner epoch: (train step - rollout) / inner epochs")
    print("| images | traces | rollout s | traces/s | glimpses/s | train step s | "
          "one inner epoch (ms) on B*G*T states | peak memory (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    r = grpo_row(dev, batch, amp, args.group, args.steps, args.inner_epochs, args.policy_depth,
                 args.size, args.repeats)
    print(f"| {batch} | {batch * args.group} | {r['rollout_s']:.3f} | {r['traces_s']:.0f} | "
          f"{r['glimpses_s']:.0f} | {r['step_s']:.3f} | {r['inner_epoch_ms']:.1f} "
          f"({r['states']} states) | {r['peak_mb']:.0f} |", flush=True)


# ----------------------------------------------------------------------------------------------
# flops: [003] App. G's FLOP counts (Tables 3, 5, 10, 16) and parameter counts (Table 3)
# ----------------------------------------------------------------------------------------------
# Table 9 primitives: a multiply-add is 2 FLOPs; Linear 2 d_in d_out per token, LN 5d,
# RoPE_apply 4d per token, SDPA 4 n_q n_kv d. Softmax, GELU, biases and residuals are left out.
# Which terms the paper's figures include (found by reproducing them): every ViT block counts
# its two LayerNorms and RoPE on Q and K of all n tokens (Eq. 18 + 2n RoPE_apply); Canvas
# Read / Write count LN on both sides and RoPE on both sides (Eqs. 21-22); the DINOv3 rows
# (Tables 5, 16) have no segmentation head, the canvit.CanViT rows of Table 5 do (Eq. 20, C_seg);
# Table 3's GFLOPs column has none. The VPE's (1, 3) @ (3, D/2) product (not in the paper,
# 3D FLOPs) is counted. With matmul_only the LN / RoPE terms are dropped: what
# torch.utils.flop_counter counts (matrix products, convolutions; SDPA as matmuls).

def _linear(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def _vit_block(n: int, d: int, hidden: int, matmul_only: bool) -> int:
    """Eq. (18) plus 2n RoPE_apply(d) (Q and K)."""
    f = _linear(n, d, 3 * d) + 4 * n * n * d + _linear(n, d, d) \
        + _linear(n, d, hidden) + _linear(n, hidden, d)
    return f if matmul_only else f + 2 * n * 5 * d + 2 * n * 4 * d


def _patch_embed(n_patches: int, p: int, d: int) -> int:
    return 2 * n_patches * p * p * 3 * d                              # Table 9: PatchEmbed


def count_flops(model, *, glimpse_grid: int = 8, canvas_grid: int = 32,
                image_hw: tuple[int, int] = (512, 512), seg_classes: int = 0,
                n_registers: int = 4, matmul_only: bool = False) -> dict[str, int]:
    """Forward FLOPs (App. G) of one canvit.CanViT glimpse or one DINOv3 ViT image.

    model: canvit.CanViT / canvit.CanViTConfig (Eqs. 19-22, with g x g glimpse patches and a G x G canvas;
    seg_classes > 0 adds C_seg, a linear probe on the canvas patches) or canvit.DINOv3ViT /
    canvit.BackboneConfig (Eq. 23, on image_hw pixels, n_registers storage tokens).
    Returns the parts and their 'total'.
    """
    if isinstance(model, canvit.DINOv3ViT):
        model, n_registers = model.cfg, model.n_storage_tokens
    if isinstance(model, canvit.CanViT):
        model = model.cfg
    if isinstance(model, canvit.BackboneConfig):                             # Eq. (23)
        b = model
        n_p = (image_hw[0] // b.patch_size) * (image_hw[1] // b.patch_size)
        parts = {"patch_embed": _patch_embed(n_p, b.patch_size, b.embed_dim),
                 "blocks": b.n_blocks * _vit_block(1 + n_registers + n_p, b.embed_dim,
                                                   int(b.embed_dim * b.ffn_ratio), matmul_only)}
        return {**parts, "total": sum(parts.values())}
    if not isinstance(model, canvit.CanViTConfig):
        raise TypeError(f"count_flops takes a canvit.CanViT, canvit.CanViTConfig, canvit.DINOv3ViT or canvit.BackboneConfig, "
                        f"got {type(model).__name__}")
    cfg, b = model, model.backbone
    d, dc = b.embed_dim, cfg.canvas_dim
    n_l = int(cfg.enable_vpe) + 1 + cfg.n_backbone_registers + glimpse_grid ** 2   # 71 in G.3
    n_c = cfg.n_canvas_registers + canvas_grid ** 2                                 # 1040 in G.3
    ln_rope = 0 if matmul_only else 5 * n_l * d + 5 * n_c * dc + 4 * n_l * dc + 4 * n_c * dc
    # Eq. (21): W_Q, W_O on the backbone side; canvas tokens are K and V after LN only
    read = _linear(n_l, d, dc) + 4 * n_l * n_c * dc + _linear(n_l, dc, d) + ln_rope
    # Eq. (22): W_K, W_V on the backbone side; canvas tokens are Q after LN, no W_O
    write = 2 * _linear(n_l, d, dc) + 4 * n_c * n_l * dc + ln_rope
    reads, writes = canvit.rw_schedule(b.n_blocks, cfg.rw_stride, cfg.enable_reads)
    parts = {
        "backbone": _patch_embed(glimpse_grid ** 2, b.patch_size, d)
                    + b.n_blocks * _vit_block(n_l, d, int(d * b.ffn_ratio), matmul_only),
        "vpe": _linear(1, 3, d // 2) if cfg.enable_vpe else 0,       # (1, 3) @ (3, D/2)
        "reads": len(reads) * read,
        "writes": len(writes) * write,
        "seg": _linear(canvas_grid ** 2, dc, seg_classes),          # Eq. (20): C_seg
    }
    return {**parts, "total": sum(parts.values()), "read_each": read, "write_each": write}


def count_params(module: torch.nn.Module, readout_heads: bool = True) -> int:
    """Number of parameters. Table 3 counts canvit.CanViT without its pretraining heads W_spatial and
    W_global (readout_heads=False): 95.2M for canvit.CanViT-B, 26.4M with a ViT-S backbone."""
    skip = set()
    if not readout_heads and isinstance(module, canvit.CanViT):
        skip = {id(p) for head in (module.scene_patches_head, module.scene_cls_head)
                for p in head.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)



def bench_flops(args) -> None:
    """App. G's tables from count_flops / count_params (no timing: the formulas)."""
    g = 1e9
    f = count_flops(canvit.CanViTConfig(), seg_classes=150)
    print("[003] Table 10, CanViT-B (8 x 8 glimpse, 32 x 32 canvas), GFLOPs\n"
          "| part | here | paper |\n|---|---:|---:|")
    for part, paper in (("backbone", 12.3), ("reads", 1.6), ("writes", 1.6), ("seg", 0.3),
                        ("total", 15.9)):
        print(f"| {part} | {f[part] / g:.2f} | {paper} |")
    print("\n[003] Table 5, CanViT-B by canvas grid (with C_seg), GFLOPs\n| canvas | here | paper |"
          "\n|---:|---:|---:|")
    for G, paper in ((8, 13.84), (16, 14.25), (32, 15.86), (64, 22.34)):
        here = count_flops(canvit.CanViTConfig(), canvas_grid=G, seg_classes=150)["total"] / g
        print(f"| {G} x {G} | {here:.2f} | {paper} |")
    print("\n[003] Tables 5 and 16, DINOv3 teachers by image side, GFLOPs\n| model | side | here | "
          "paper |\n|---|---:|---:|---:|")
    vit_s = canvit.BackboneConfig(embed_dim=384, num_heads=6)
    for name, b, sides in (("ViT-S", vit_s, ((128, 3.06), (192, 6.83), (256, 12.51), (512, 63.9))),
                           ("ViT-B", canvit.BackboneConfig(), ((128, 11.98), (144, 14.99),
                                                              (160, 18.38), (192, 26.32),
                                                              (512, 215.2)))):
        for side, paper in sides:
            print(f"| {name} | {side} | {count_flops(b, image_hw=(side, side))['total'] / g:.2f} "
                  f"| {paper} |")
    with torch.device("meta"):
        models = [("CanViT-B", canvit.CanViT(canvit.CanViTConfig()), 95.2),
                  ("CanViT, ViT-S backbone", canvit.CanViT(canvit.CanViTConfig(backbone=vit_s)), 26.4)]
    print("\n[003] Table 3, parameters without the pretraining readout heads (with them)\n"
          "| model | here (M) | paper (M) |\n|---|---:|---:|")
    for name, model, paper in models:
        print(f"| {name} | {count_params(model, readout_heads=False) / 1e6:.1f} "
              f"({count_params(model) / 1e6:.1f}) | {paper} |")


# ----------------------------------------------------------------------------------------------
# data: synthetic scene rendering and DataLoader throughput
# ----------------------------------------------------------------------------------------------

def bench_data(args) -> None:
    """ms per SyntheticScenes item (render + normalisation) in this process, then the scenes/s
    a DataLoader with `workers` workers delivers at 128 px in batches of 64. One CPU thread
    unless --threads says otherwise: the cost of one DataLoader worker."""
    if not args.threads:
        torch.set_num_threads(1)
    dev = torch.device("cpu")
    header(dev, f"data: SyntheticScenes, mean of {args.n} items (render + normalisation), "
                f"one process")
    print("| scene side (px) | ms per item |\n|---:|---:|")
    for size in args.sizes:
        ds = data.SyntheticScenes(args.n, size)
        ds[0]                                                     # warm-up
        t0 = time.perf_counter()
        for i in range(args.n):
            ds[i]
        print(f"| {size} | {(time.perf_counter() - t0) / args.n * 1e3:.2f} |", flush=True)
    loader = torch.utils.data.DataLoader(data.SyntheticScenes(1024, 128), batch_size=64,
                                         num_workers=args.workers, collate_fn=data.collate)
    t0 = time.perf_counter()
    count = sum(len(b["image"]) for b in loader)
    print(f"\n| DataLoader, 128 px, batches of 64 | scenes/s (worker start-up included) |\n"
          f"|---|---:|\n| {args.workers} workers, {count} scenes | "
          f"{count / (time.perf_counter() - t0):.0f} |")


# ----------------------------------------------------------------------------------------------
# The prepared GPU check (`python bench.py gpu`): the CUDA tests, then the headline figures
# ----------------------------------------------------------------------------------------------

PAPER_GLIMPSES_S = 1e9 / (166 * 3600)          # [003]: 1e9 glimpses in 166 h on one H100
PAPER_DISTILL = f"~{PAPER_GLIMPSES_S:,.0f} glimpses/s on one H100 [003] (1e9 in 166 h)"


class Rows:
    """A gpu section's rows, each appended to a JSON-lines file as soon as it is measured, so
    that what a section measured before its time ran out still reaches the table. A row that
    raises is written with its error and the section goes on."""

    def __init__(self, path: Path):
        self.path = path

    def measure(self, key: str, fn) -> dict | None:
        t0 = time.perf_counter()
        try:
            row, status = fn(), "ok"
        except Exception as e:                               # reported in the row, not fatal
            text = (str(e).strip().splitlines() or [""])[0][:160]
            row, status = {}, f"failed: {type(e).__name__}: {text}"
        row.update(key=key, status=status, seconds=round(time.perf_counter() - t0, 1))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: {status} ({row['seconds']} s)", flush=True)
        return row if status == "ok" else None


def _num(x: float) -> str:
    """A rate with 3 significant digits below 100 (CPU dry runs), whole numbers above."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _mb(x: float) -> str:
    return f"{x:,.0f} MB"


def gpu_distill(dev: torch.device, rows: Rows) -> None:
    """CanViT-B distillation throughput and memory at T = 4 (the paper's mean rollout: chunks of
    2, p_stop 0.5) and T = 20. CPU: the small CanViT, 256 px scenes, 1 scene."""
    cuda = dev.type == "cuda"
    if cuda:
        setup = functools.cache(lambda: DistillBench(dev, 64, torch.bfloat16, 512, "inductor",
                                                     precomputed=True))
    else:
        cfg, gp, _ = canvit_config(dev)
        setup = functools.cache(lambda: DistillBench(dev, 1, None, 256, "eager", True, cfg, gp))
    got = {}
    for T, repeats in ((4, 3), (20, 2)):
        def row(T=T, repeats=repeats):
            bench = setup()
            r = bench.row(T, repeats if cuda else 1)
            return {**r, "check": f"distill: training throughput, rollouts of T = {T}",
                    "setting": bench.describe(),
                    "result": f"{r['glimpses_s']:,.0f} glimpses/s "
                              f"({r['glimpses_s'] / PAPER_GLIMPSES_S:.2f}x the paper's), "
                              f"{r['s_step']:.2f} s/step",
                    "paper": PAPER_DISTILL}
        got[T] = rows.measure(f"distill_T{T}", row)

    def memory():
        if not (got[4] and got[20]):
            raise RuntimeError("needs both the T = 4 and the T = 20 rows")
        a, b = got[4], got[20]
        return {"check": "distill: memory vs rollout length (T = 4 vs 20)",
                "setting": "the two rows above; " + ("max_memory_allocated over the timed steps"
                                                     if cuda else "peak RSS of the process"),
                "result": f"saved for backward {_mb(a['saved_mb'])} vs {_mb(b['saved_mb'])}; "
                          f"peak {_mb(a['peak_mb'])} vs {_mb(b['peak_mb'])}",
                "paper": "[003] truncated BPTT: activation memory does not grow with T"}
    rows.measure("distill_memory", memory)


def gpu_canvit(dev: torch.device, rows: Rows) -> None:
    """CanViT-B inference latency per glimpse at batch 1, eager and compiled (bf16)."""
    cuda = dev.type == "cuda"
    cfg, gp, G = canvit_config(dev)
    torch.manual_seed(0)
    model = canvit.CanViT(cfg).to(dev).eval()
    dtype, backend = (torch.bfloat16, "inductor") if cuda else (torch.float32, "eager")
    for compiled in (False, True):
        def row(compiled=compiled):
            step = torch.compile(model, dynamic=False, backend=backend) if compiled else model
            r = canvit_row(model, step, dev, gp, G, dtype, 1, 20)
            mode = f"compiled{'' if cuda else ' (eager backend)'}" if compiled else "eager"
            return {**r, "check": f"CanViT inference latency, batch 1, {mode}",
                    "setting": f"D={cfg.backbone.embed_dim} x {cfg.backbone.n_blocks} blocks, "
                               f"{gp} px glimpse, canvas {G}x{G}, {_dtype_name(dtype)}, "
                               f"median of 20 steps",
                    "result": f"{r['ms']:.2f} ms/glimpse ({r['glimpses_s']:,.0f} glimpses/s)",
                    "paper": '[003] "hundreds of frames per second"'}
        rows.measure(f"canvit_{'compiled' if compiled else 'eager'}", row)


def gpu_extraction(dev: torch.device, rows: Rows) -> None:
    """The integral extraction of one glimpse set at a small and a large image: flat [000]."""
    cuda = dev.type == "cuda"
    small, large = (256, 8192) if cuda else (256, 1024)
    repeats = 10 if cuda else 3
    got = {}
    for name, S in (("small", small), ("large", large)):
        def row(S=S):
            r = extraction_row(dev, S, repeats)
            flat = (f"; {r['integral_ms'] / got[small]['integral_ms']:.2f}x the {small} px time"
                    if S == large and got.get(small) else "")
            return {**r, "check": f"extraction: one glimpse set from a {S} px image",
                    "setting": f"8 gazes x (16 multi-zoom + 5x5 grid) patches of 16 px; median "
                               f"of {repeats}",
                    "result": f"integral {r['integral_ms']:.2f} ms (table ready){flat}; "
                              f"{r['integral_table_ms']:.1f} ms with the table; bilinear "
                              f"{r['bilinear_ms']:.2f} ms; crop + interpolate "
                              f"{r['naive_ms']:.1f} ms",
                    "paper": "[000] Fig. 2: flat in the image size (table ready)"}
        got[S] = rows.measure(f"extraction_{name}", row)


def gpu_foveal(dev: torch.device, rows: Rows) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (256, torch.bfloat16) if cuda else (2, None)

    def row():
        r = foveal_row(dev, batch, amp, repeats=3 if cuda else 1)
        return {**r, "check": "foveal ViT-S training step (bench foveal)",
                "setting": f"{batch} images of 224 px x 8 random glimpses, {r['tokens']} tokens "
                           f"a glimpse, {_dtype_name(amp)}, eager",
                "result": f"{r['s_step']:.3f} s/step, {r['glimpses_s']:,.0f} glimpses/s, "
                          f"peak {_mb(r['peak_mb'])}",
                "paper": "-"}
    rows.measure("foveal", row)


def gpu_dino(dev: torch.device, rows: Rows) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (64, torch.bfloat16) if cuda else (2, None)
    for T in (4, 8):
        def row(T=T):
            r = dino_row(dev, batch, amp, T, repeats=2 if cuda else 1, warmup=1 if cuda else 0)
            return {**r, "check": f"SSL (dino) training step, {T} sequential glimpses",
                    "setting": f"dino.DINOConfig() ViT-S, {batch} images of 224 px, "
                               f"{_dtype_name(amp)}, eager",
                    "result": f"{_num(r['images_s'])} images/s, {_num(r['glimpses_s'])} "
                              f"glimpses/s, peak {_mb(r['peak_mb'])}",
                    "paper": "-"}
        rows.measure(f"dino_T{T}", row)


def gpu_grpo(dev: torch.device, rows: Rows) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (64, torch.bfloat16) if cuda else (2, None)

    def row():
        r = grpo_row(dev, batch, amp, repeats=3 if cuda else 1, warmup=1 if cuda else 0)
        return {**r, "check": "GRPO rollout and inner epoch (bench grpo)",
                "setting": f"frozen random ViT-S, {batch} images x G = 16 x T = 8, 8 inner "
                           f"epochs, policy depth 6, {_dtype_name(amp)}",
                "result": f"rollout {_num(r['traces_s'])} traces/s ({_num(r['glimpses_s'])} "
                          f"glimpses/s); one inner epoch {r['inner_epoch_ms']:.0f} ms on "
                          f"{r['states']:,} states; peak {_mb(r['peak_mb'])}",
                "paper": "-"}
    rows.measure("grpo", row)


# name, function, seconds allowed on CUDA, on CPU, its rows (in table order)
GPU_SECTIONS = (
    ("distill", gpu_distill, 95, 400, ("distill_T4", "distill_T20", "distill_memory")),
    ("canvit", gpu_canvit, 30, 120, ("canvit_eager", "canvit_compiled")),
    ("extraction", gpu_extraction, 20, 240, ("extraction_small", "extraction_large")),
    ("foveal", gpu_foveal, 15, 120, ("foveal",)),
    ("dino", gpu_dino, 25, 300, ("dino_T4", "dino_T8")),
    ("grpo", gpu_grpo, 25, 240, ("grpo",)),
)
PYTEST_SECONDS = (140, 300)                     # CUDA, CPU
TOTAL_SECONDS = (345, 1800)                     # the whole check: under ~6 minutes on an H100


def run_section(args) -> None:
    """One section, in a child process (the parent kills it when its time is up)."""
    sections = {name: fn for name, fn, *_ in GPU_SECTIONS}
    if args.section not in sections:
        raise SystemExit(f"--section {args.section!r}: choose one of {', '.join(sections)}")
    dev = _device(args.device)
    header(dev, f"gpu check, section {args.section}")
    sections[args.section](dev, Rows(Path(args.rows)))


def _kill_group(proc: subprocess.Popen) -> None:
    """End the child and what it started (its own process group: start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_child(cmd: list[str], log: Path, timeout: float,
               extra_env: dict | None = None) -> tuple[int | None, float]:
    """Run cmd with its output appended to `log`: (exit status or None on timeout, seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return rc, time.perf_counter() - t0


def run_cuda_tests(log: Path, timeout: float, dev: torch.device) -> dict:
    """`pytest -m cuda tests/test_cuda.py` in a child process: counts, failures, seconds."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "cuda",
           "tests/test_cuda.py"]
    if importlib.util.find_spec("xdist"):                # the slow tests are subprocesses
        cmd += ["-n", "4"]
    log.write_text("")
    rc, seconds = _run_child(cmd, log, timeout, {"CUDA_CHECK_DEVICE": dev.type})
    text = log.read_text()
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|"
                                                                r"errors?|deselected)", line)]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1] if summary
                              else ""):
        counts["errors" if word.startswith("error") else word] += int(n)
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if rc is None:
        status = f"timeout: past {timeout:.0f} s"
    elif rc == 0 or (rc == 5 and not failures):          # 5: nothing collected / all skipped
        status = "ok"
    else:
        status = f"failed (pytest exit {rc})"
    return {"key": "tests", "status": status, "seconds": round(seconds, 1), **counts,
            "failures": failures, "check": "tests/test_cuda.py (pytest -m cuda)",
            "setting": " ".join(cmd[1:]).replace(sys.executable, "python"),
            "result": ", ".join(f"{v} {k}" for k, v in counts.items())
                      + (f": {', '.join(failures[:6])}" if failures else ""),
            "paper": "all pass (all skip without a GPU)"}


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def gpu_report(meta: dict, rows: list[dict]) -> str:
    lines = [f"gpu check: {meta['device']} ({meta['kind']}); torch {meta['torch']}"
             f"{', CUDA ' + meta['cuda'] if meta['cuda'] else ''}; {meta['date']}; "
             f"{meta['cpu_threads']} CPU threads; {meta['seconds'] / 60:.1f} min in all"]
    if meta["kind"] != "cuda":
        lines.append("dry run on the CPU: the benchmarks' CPU sizes, torch.compile with the eager "
                     "backend; a check of the code path, not a measurement")
    lines.append("peak memory: " + ("CUDA max_memory_allocated, reset before each row's timed "
                                    "steps" if meta["kind"] == "cuda" else
                                    "peak RSS of the section's process (never reset)"))
    lines += ["", "| check | setting | result | paper / expected | status |",
              "|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f" ({r['seconds']:.0f} s)" if "seconds" in r else "")
        lines.append("| " + " | ".join(_cell(r.get(k, "-")) for k in
                                       ("check", "setting", "result", "paper")) +
                     f" | {_cell(status)} |")
    return "\n".join(lines) + "\n"


def bench_gpu(args) -> None:
    """`python bench.py gpu`: tests/test_cuda.py, then each section in a child process under its time budget, every
    one cut to what is left of the whole (keeping 10 s for each section still to come)."""
    t_start, dev = time.monotonic(), _device(args.device)
    cuda = dev.type == "cuda"
    pick = lambda pair: pair[0] if cuda else pair[1]
    deadline = t_start + (args.budget or pick(TOTAL_SECONDS))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(dev), "kind": dev.type, "torch": torch.__version__,
            "cuda": torch.version.cuda or "", "cpu_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    print(f"gpu check on {meta['device']} ({dev.type}), torch {meta['torch']}; budget "
          f"{deadline - t_start:.0f} s; logs beside {out}", flush=True)
    left = lambda later: deadline - time.monotonic() - 10 * later
    timeout = min(pick(PYTEST_SECONDS), left(len(GPU_SECTIONS)))
    tests = run_cuda_tests(out.with_name(out.stem + "_pytest.log"), timeout, dev)
    print(f"tests: {tests['result']} -> {tests['status']} ({tests['seconds']:.0f} s)", flush=True)
    rows, log = [tests], out.with_name(out.stem + "_sections.log")
    log.write_text("")
    for i, (name, _, cap_cuda, cap_cpu, keys) in enumerate(GPU_SECTIONS):
        timeout = min(cap_cuda if cuda else cap_cpu, left(len(GPU_SECTIONS) - 1 - i))
        got, note = {}, "skipped: no time left in the budget"
        if timeout >= 5:
            with tempfile.TemporaryDirectory() as tmp:
                jsonl = Path(tmp) / "rows.jsonl"
                jsonl.touch()
                cmd = [sys.executable, str(ROOT / "bench.py"), "gpu", "--device", dev.type,
                       "--section", name, "--rows", str(jsonl)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                rc, seconds = _run_child(cmd, log, timeout)
                got = {r["key"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
            tail = (log.read_text().strip().splitlines() or [""])[-1][:160]
            note = (f"timeout: the section ran past its {timeout:.0f} s" if rc is None else
                    f"failed: the section exited {rc}: {tail}" if rc else "not measured")
            print(f"section {name}: {'exit ' + str(rc) if rc is not None else 'timeout'} "
                  f"({seconds:.0f} s of {timeout:.0f})", flush=True)
        rows += [got.get(key, {"key": key, "check": key, "status": note}) for key in keys]
    meta["seconds"] = time.monotonic() - t_start
    report = gpu_report(meta, rows)
    out.write_text(report)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n" + report + f"\nwritten: {out}, {out.with_suffix('.json')}, "
          f"{out.stem}_pytest.log and {out.stem}_sections.log beside them", flush=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def step_args(p: argparse.ArgumentParser, size: int, repeats: int, compiled: str = "") -> None:
    """The options every training-step benchmark takes: image side, dtype, repeats, compile."""
    p.add_argument("--size", type=int, default=size, help="image / scene side (px)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed steps (median)")
    if compiled:
        p.add_argument("--compile", action="store_true", help=f"torch.compile {compiled}")


def main(argv=None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    common.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="bench", required=True)

    p = sub.add_parser("extraction", parents=[common], help="glimpse extraction vs image size")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=20, help="timed calls (median)")
    p.set_defaults(fn=bench_extraction)

    p = sub.add_parser("canvit", parents=[common], help="CanViT step latency / throughput")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=20, help="timed steps (median)")
    p.set_defaults(fn=bench_canvit)

    p = sub.add_parser("distill", parents=[common], help="CanViT-B distillation step, memory")
    p.add_argument("--batch", type=int, default=None, help="scenes (default: 64 CUDA, 1 CPU)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4, 20], help="rollout lengths T")
    step_args(p, size=512, repeats=1, compiled="the CanViT")
    p.add_argument("--precomputed", action="store_true",
                   help="teacher features in the batch, as shards give (no teacher forward)")
    p.set_defaults(fn=bench_distill)

    p = sub.add_parser("foveal", parents=[common], help="foveal ViT-S training step")
    p.add_argument("--batch", type=int, default=None, help="images (default: 256 CUDA, 8 CPU)")
    step_args(p, size=224, repeats=3, compiled="the FovealViT")
    p.set_defaults(fn=bench_foveal)

    p = sub.add_parser("dino", parents=[common], help="sequential-to-global DINO step")
    p.add_argument("--batch", type=int, default=None, help="images (default: 64 CUDA, 2 CPU)")
    p.add_argument("--seq_steps", type=int, nargs="+", default=[4, 8],
                   help="glimpses of the sequential views (the table's rows)")
    step_args(p, size=224, repeats=2, compiled="backbones and heads")
    p.set_defaults(fn=bench_dino)

    p = sub.add_parser("grpo", parents=[common], help="GazeGRPO rollout and inner epoch")
    p.add_argument("--batch", type=int, default=None, help="images (default: 64 CUDA, 2 CPU)")
    p.add_argument("--group", type=int, default=16, help="G traces an image ([002] A.3.4)")
    p.add_argument("--steps", type=int, default=8, help="T glimpses a trace ([002] A.3.4)")
    p.add_argument("--inner_epochs", type=int, default=8, help="[002] A.3.4")
    p.add_argument("--policy_depth", type=int, default=6,
                   help="policy decoder layers ([000] Sec. 4: 6; grpo's default, [002]: 1)")
    step_args(p, size=224, repeats=3)
    p.set_defaults(fn=bench_grpo)

    p = sub.add_parser("flops", parents=[common], help="[003] App. G FLOP and parameter counts")
    p.set_defaults(fn=bench_flops)

    p = sub.add_parser("data", parents=[common], help="synthetic scene rendering speed")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--n", type=int, default=100, help="items per size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.set_defaults(fn=bench_data)

    p = sub.add_parser("gpu", parents=[common], help="the CUDA tests, then the papers' headline figures")
    p.add_argument("--out", default="out/gpu_check.md", help="markdown; JSON and logs beside it")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check (default: 345 on CUDA, 1800 on CPU)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)   # internal: one child
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=lambda args: (run_section if args.section else bench_gpu)(args))

    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
