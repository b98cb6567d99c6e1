"""Benchmarks: the speed and memory tables of the README, one subcommand each.

The model files carry only their papers; everything that times or measures them lives here
(nanoGPT keeps bench.py beside model.py for the same reason). Every subcommand prints a header
line (device, torch version, CPU threads, the setting) and a markdown table ready to paste. Peak
memory: CUDA max_memory_allocated, reset before each row's timed steps; on CPU the process's
peak RSS (ru_maxrss, never reset: the peak so far in this process).

Subcommands (each section's banner below says what it measures and from which paper):
extraction [000, App. A], canvit [003], distill [003, Sec. 5], foveal [002, A.3.4], dino [000,
Sec. 3.1], grpo [002, A.2; 000, Sec. 3.3], flops [003, App. G], data (scene rendering), and gpu:
the prepared GPU check (~6 min on an H100; `--device cpu` is a dry run, not a measurement):
tests/test_cuda.py, then one row per headline figure, each section in a child process under a
time budget (a failure or timeout reported in its row).

  python bench.py extraction [--sizes 256 512 ...] [--repeats 20] [--device cuda]
  python bench.py distill [--lengths 4 20] [--batch 64] [--dtype bfloat16] [--compile]
  python bench.py gpu [--out out/gpu_check.md] [--budget SECONDS]   (SUBCOMMAND --help: all options)
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


# ---- Shared machinery: the header line, timing, memory, a minimal training run ---------------
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


def md_head(*columns: str, text: int = 0) -> str:
    """A markdown table's header: the first `text` columns left-aligned, the numbers right."""
    return "| " + " | ".join(columns) + " |\n|" + "---|" * text + "---:|" * (len(columns) - text)


def md_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


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


def time_steps(obj, batch: dict, run, repeats: int, warmup: int, step: int = 0
               ) -> tuple[dict, dict]:
    """obj.train_step on one batch: `warmup` untimed steps (compilation), then `repeats` timed
    ones -> ({"s_step": their median seconds, "peak_mb": peak memory}, the last step's metrics)."""
    last = {}

    def one() -> None:
        nonlocal step, last
        step += 1
        last = obj.train_step(batch, step, run)
    for _ in range(warmup):
        one()
    reset_peak_memory(run.device)
    s = statistics.median(timed(one, run.device, repeats, warmup=0))
    return {"s_step": s, "peak_mb": peak_memory_mb(run.device)}, last


class BenchRun:
    """What train.py's loop lends an objective's train_step (train.Run), for one process: autocast
    to `amp_dtype` (None: float32), an AdamW step clipping the gradient norm at 1.0 ([003] Table
    2); schedule_steps: the horizon of its own schedules (DINO's momentum, GRPO's std)."""
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
    `torch.autograd.graph.saved_tensors_hooks` (no patching). The pack hook counts a saved
    tensor's storage once however many saved tensors (views, repeated saves) hold it; a weakref
    finalizer on the packed object takes the bytes off when autograd releases the last of them
    (after a backward, or when the graph is freed). `live`: the distinct storages saved tensors
    hold now, the parameters' own excluded (they exist anyway; their bf16 autocast copies
    count). `peak`: its maximum since `reset()`. With truncated BPTT a chunk's backward frees its
    graph, so the peak is the largest chunk's total at its backward: the activation memory that
    should not grow with the rollout length."""
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


# ---- extraction: [000, App. A] glimpse extraction cost vs image size -------------------------
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
    print(md_head("image side", "integral (table ready)", "integral + table build", "bilinear",
                  "crop + interpolate (antialias)", "naive / integral"))
    for S in args.sizes:
        r = extraction_row(dev, S, args.repeats)
        print(md_row(S, f"{r['integral_ms']:.2f}", f"{r['integral_table_ms']:.1f}",
                     f"{r['bilinear_ms']:.2f}", f"{r['naive_ms']:.1f}",
                     f"{r['naive_ms'] / r['integral_ms']:.0f}x"), flush=True)


# ---- canvit: [003] per-glimpse latency and throughput ----------------------------------------
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
    over) at `batch`, inference mode, after 3 warm-up steps."""
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
    dev = _device(args.device)
    cfg, gp, G = canvit_config(dev)
    torch.manual_seed(0)
    model = canvit.CanViT(cfg).to(dev).eval()
    flops = count_flops(cfg, glimpse_grid=gp // cfg.backbone.patch_size, canvas_grid=G)
    header(dev, f"canvit: one recurrent step per glimpse, D={cfg.backbone.embed_dim} x "
                f"{cfg.backbone.n_blocks} blocks, Dc={cfg.canvas_dim}, glimpse {gp} px, canvas "
                f"{G}x{G}; {count_params(model) / 1e6:.1f}M params, "
                f"{flops['total'] / 1e9:.2f} GFLOPs/glimpse; median of {args.repeats} steps")
    print(md_head("mode", "dtype", "batch", "ms/step (median)", "best ms", "glimpses/s", text=2))
    for compiled in (False, True):
        step = torch.compile(model, dynamic=False) if compiled else model
        for dtype in (torch.float32, torch.bfloat16):
            for batch in args.batch:
                r = canvit_row(model, step, dev, gp, G, dtype, batch, args.repeats)
                print(md_row("compiled" if compiled else "eager", str(dtype)[6:], batch,
                             f"{r['ms']:.2f}", f"{r['best_ms']:.2f}", f"{r['glimpses_s']:.1f}"),
                      flush=True)


# ---- distill: [003, Sec. 5] a distillation training step vs the rollout length ---------------
class DistillBench:
    """A Distillation objective [003, Sec. 5] (random teacher), its optimizer and a batch of
    random scenes; `row(T)` measures training steps with rollouts of exactly T glimpses.
    precomputed: random float16 teacher features in the batch (as the shards give them, [003,
    App. D.2]), else the teacher runs at every step. model_cfg: the CanViT (default CanViT-B),
    its DINOv3 teacher as wide as its teacher_dim. compile_backend: torch.compile the CanViT."""
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
        m, t = self.obj.cfg.model, self.obj.cfg.teacher.backbone
        teacher = ("precomputed teacher features (random float16)" if self.precomputed else
                   f"a random DINOv3 teacher (D={t.embed_dim} x {t.n_blocks}) in the loop")
        backend = self.compile_backend
        compiled = "" if backend is None else ", compiled" + (
            "" if backend == "inductor" else f" ({backend} backend)")
        return (f"CanViT D={m.backbone.embed_dim} x {m.backbone.n_blocks} blocks, {self.batch} "
                f"scenes x 2 rollouts, {self.size} px scenes, {self.obj.cfg.glimpse_px} px "
                f"glimpses, canvas {self.G}x{self.G}, chunks of {self.K}, {teacher}, "
                f"{_dtype_name(self.amp)}{compiled}")

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
    print(md_head("rollout length T", "s/step", "glimpses/s",
                  "saved for backward at a chunk's backward (MB)", "peak memory (MB)"))
    for T in args.lengths:
        if T % bench.K:
            raise SystemExit(f"--lengths: {T} is not a multiple of the chunk length {bench.K}")
        r = bench.row(T, args.repeats)
        print(md_row(T, f"{r['s_step']:.2f}", f"{r['glimpses_s']:.1f}", f"{r['saved_mb']:.0f}",
                     f"{r['peak_mb']:.0f}"), flush=True)


# ---- foveal: [002, A.3.4] a training step of the foveal iterative ViT-S ([000] Sec. 4) -------
def vit_s() -> fovea.FovealConfig:
    """[000] Sec. 4's foveal ViT-S: 384 wide, 12 blocks, 6 heads, N = 8 state tokens, 16
    multi-zoom + 5 x 5 foveal grid patches of 16 px (as dino.DINOConfig's model, with a head)."""
    return fovea.FovealConfig(dim=384, depth=12, heads=6, num_state=8, patch_px=16, num_zoom=16,
                              grid=5, grid_z=(3.0, 4.0), z_max=4.0)


def foveal_row(dev: torch.device, batch: int, amp: torch.dtype | None, size: int = 224,
               compile_backend: str | None = None, repeats: int = 3,
               warmup: int | None = None) -> dict:
    """FovealSupervised training steps (8 random glimpses, one backward a glimpse, AdamW) of
    the ViT-S on `batch` random images after `warmup` (default 1, 2 compiled) untimed steps."""
    cfg = fovea.FovealTrainConfig(model=vit_s(), steps=8)
    torch.manual_seed(0)
    obj = fovea.FovealSupervised(cfg, seed=0).to(dev)
    if compile_backend:
        obj.model.compile(backend=compile_backend)
    gen = torch.Generator().manual_seed(0)
    data_batch = {"image": torch.randn(batch, 3, size, size, generator=gen).to(dev),
                  "label": torch.randint(cfg.model.num_classes, (batch,), generator=gen).to(dev)}
    r, _ = time_steps(obj, data_batch, BenchRun(obj.model.parameters(), dev, amp), repeats,
                      warmup if warmup is not None else 2 if compile_backend else 1)
    m = cfg.model
    return {**r, "batch": batch, "tokens": m.num_state + m.num_zoom + m.grid ** 2,
            "images_s": batch / r["s_step"], "glimpses_s": batch * cfg.steps / r["s_step"]}


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
    print(md_head("batch", "tokens a glimpse", "s/step", "images/s", "glimpses/s",
                  "peak memory (MB)"), flush=True)
    r = foveal_row(dev, batch, amp, args.size, "inductor" if args.compile else None,
                   args.repeats)
    print(md_row(batch, r["tokens"], f"{r['s_step']:.3f}", f"{r['images_s']:.1f}",
                 f"{r['glimpses_s']:.1f}", f"{r['peak_mb']:.0f}"), flush=True)


# ---- dino: [000, Sec. 3.1] a sequential-to-global DINO training step -------------------------
def dino_row(dev: torch.device, batch: int, amp: torch.dtype | None, seq_steps: int,
             size: int = 224, compile_backend: str | None = None, repeats: int = 2,
             warmup: int | None = None) -> dict:
    """DINOSequentialToGlobal training steps (dino.DINOConfig(), `seq_steps` glimpses) on `batch`
    random images after `warmup` (default 1, 2 compiled) untimed ones, past epoch 1."""
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
    r, metrics = time_steps(obj, {"image": images}, run, repeats,
                            warmup if warmup is not None else 2 if compile_backend else 1,
                            step=run.steps_per_epoch)
    glimpses = metrics["glimpses"]
    return {**r, "seq_steps": seq_steps, "batch": batch, "images_s": batch / r["s_step"],
            "glimpses": glimpses, "glimpses_s": glimpses / r["s_step"]}


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
    print(md_head("sequential steps", "s/step", "images/s", "glimpses a step", "glimpses/s",
                  "peak memory (MB)"), flush=True)
    for T in args.seq_steps:
        r = dino_row(dev, batch, amp, T, args.size, "inductor" if args.compile else None,
                     args.repeats)
        print(md_row(T, f"{r['s_step']:.2f}", f"{r['images_s']:.1f}", r["glimpses"],
                     f"{r['glimpses_s']:.0f}", f"{r['peak_mb']:.0f}"), flush=True)


# ---- grpo: [002, A.2; 000, Sec. 3.3] GazeGRPO's rollout and inner epochs, frozen ViT-S -------
def grpo_objective(dev: torch.device, group: int, steps: int, inner_epochs: int,
                   policy_depth: int) -> grpo.GazeGRPO:
    """GazeGRPO through its own constructor, on a randomly initialised foveal ViT-S: it loads its
    encoder from a checkpoint path, so a foveal_sup checkpoint in train.py's layout (the keys
    GazeGRPO reads) is written to a temporary folder first, here since nothing imports train.py."""
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
    """GazeGRPO on `batch` random images: the median time of a rollout (B*G traces of T glimpses,
    actions sampled) and of a whole train_step; one inner epoch = (step - rollout) / inner_epochs,
    from the objective's own step rather than a second copy of its inner loop here."""
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
    r, _ = time_steps(obj, data_batch, run, repeats, warmup)
    traces, t_step = batch * group, r["s_step"]
    return {"batch": batch, "group": group, "steps": steps, "inner_epochs": inner_epochs,
            "rollout_s": t_roll, "traces_s": traces / t_roll,
            "glimpses_s": traces * steps / t_roll, "step_s": t_step,
            "inner_epoch_ms": max(t_step - t_roll, 0.0) / inner_epochs * 1e3,
            "states": traces * steps, "peak_mb": r["peak_mb"]}


def bench_grpo(args) -> None:
    dev = _device(args.device)
    amp = _amp(args.dtype, dev)
    batch = args.batch or (64 if dev.type == "cuda" else 2)
    header(dev, f"grpo: GazeGRPO on a random frozen FovealViT-S (384 x 12, 16 multi-zoom + 5x5 "
                f"grid patches), policy of depth {args.policy_depth}, {batch} images of "
                f"{args.size} px x G = {args.group} traces x T = {args.steps} glimpses, "
                f"{args.inner_epochs} inner epochs, {_dtype_name(amp)}; median of "
                f"{args.repeats}. inner epoch: (train step - rollout) / inner epochs")
    print(md_head("images", "traces", "rollout s", "traces/s", "glimpses/s", "train step s",
                  "one inner epoch (ms) on B*G*T states", "peak memory (MB)"), flush=True)
    r = grpo_row(dev, batch, amp, args.group, args.steps, args.inner_epochs, args.policy_depth,
                 args.size, args.repeats)
    print(md_row(batch, batch * args.group, f"{r['rollout_s']:.3f}", f"{r['traces_s']:.0f}",
                 f"{r['glimpses_s']:.0f}", f"{r['step_s']:.3f}",
                 f"{r['inner_epoch_ms']:.1f} ({r['states']} states)", f"{r['peak_mb']:.0f}"),
          flush=True)


# ---- flops: [003] App. G's FLOP counts (Tables 3, 5, 10, 16), parameters (Table 3) -----------
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
    """Forward FLOPs (App. G) of one CanViT glimpse or one DINOv3 ViT image: the parts and their
    'total'. model: a canvit.CanViT or CanViTConfig (Eqs. 19-22, g x g glimpse patches, a G x G
    canvas; seg_classes > 0 adds C_seg, a linear probe on the canvas patches), or a DINOv3ViT or
    BackboneConfig (Eq. 23, on image_hw pixels, n_registers storage tokens)."""
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
          + md_head("part", "here", "paper", text=1))
    for part, paper in (("backbone", 12.3), ("reads", 1.6), ("writes", 1.6), ("seg", 0.3),
                        ("total", 15.9)):
        print(md_row(part, f"{f[part] / g:.2f}", paper))
    print("\n[003] Table 5, CanViT-B by canvas grid (with C_seg), GFLOPs\n"
          + md_head("canvas", "here", "paper"))
    for G, paper in ((8, 13.84), (16, 14.25), (32, 15.86), (64, 22.34)):
        here = count_flops(canvit.CanViTConfig(), canvas_grid=G, seg_classes=150)["total"] / g
        print(md_row(f"{G} x {G}", f"{here:.2f}", paper))
    print("\n[003] Tables 5 and 16, DINOv3 teachers by image side, GFLOPs\n"
          + md_head("model", "side", "here", "paper", text=1))
    vit_s = canvit.BackboneConfig(embed_dim=384, num_heads=6)
    for name, b, sides in (("ViT-S", vit_s, ((128, 3.06), (192, 6.83), (256, 12.51), (512, 63.9))),
                           ("ViT-B", canvit.BackboneConfig(), ((128, 11.98), (144, 14.99),
                                                              (160, 18.38), (192, 26.32),
                                                              (512, 215.2)))):
        for side, paper in sides:
            here = count_flops(b, image_hw=(side, side))["total"] / g
            print(md_row(name, side, f"{here:.2f}", paper))
    with torch.device("meta"):
        models = [("CanViT-B", canvit.CanViT(canvit.CanViTConfig()), 95.2),
                  ("CanViT, ViT-S backbone", canvit.CanViT(canvit.CanViTConfig(backbone=vit_s)), 26.4)]
    print("\n[003] Table 3, parameters without the pretraining readout heads (with them)\n"
          + md_head("model", "here (M)", "paper (M)", text=1))
    for name, model, paper in models:
        print(md_row(name, f"{count_params(model, readout_heads=False) / 1e6:.1f} "
                           f"({count_params(model) / 1e6:.1f})", paper))


# ---- data: synthetic scene rendering and DataLoader throughput -------------------------------
def bench_data(args) -> None:
    """ms per SyntheticScenes item (render + normalisation) in this process, then the scenes/s
    a DataLoader with `workers` workers delivers at 128 px in batches of 64. One CPU thread
    unless --threads says otherwise: the cost of one DataLoader worker."""
    if not args.threads:
        torch.set_num_threads(1)
    dev = torch.device("cpu")
    header(dev, f"data: SyntheticScenes, mean of {args.n} items (render + normalisation), "
                f"one process")
    print(md_head("scene side (px)", "ms per item"))
    for size in args.sizes:
        ds = data.SyntheticScenes(args.n, size)
        ds[0]                                                     # warm-up
        t0 = time.perf_counter()
        for i in range(args.n):
            ds[i]
        print(md_row(size, f"{(time.perf_counter() - t0) / args.n * 1e3:.2f}"), flush=True)
    loader = torch.utils.data.DataLoader(data.SyntheticScenes(1024, 128), batch_size=64,
                                         num_workers=args.workers, collate_fn=data.collate)
    t0 = time.perf_counter()
    count = sum(len(b["image"]) for b in loader)
    print("\n" + md_head("DataLoader, 128 px, batches of 64", "scenes/s (worker start-up included)",
                         text=1))
    print(md_row(f"{args.workers} workers, {count} scenes",
                 f"{count / (time.perf_counter() - t0):.0f}"))


# ---- The GPU check (`python bench.py gpu`): the CUDA tests, then the headline figures --------
PAPER_GLIMPSES_S = 1e9 / (166 * 3600)          # [003]: 1e9 glimpses in 166 h on one H100
PAPER_DISTILL = f"~{PAPER_GLIMPSES_S:,.0f} glimpses/s on one H100 [003] (1e9 in 166 h)"


def measure(rows: Path, key: str, fn, check: str, setting, result, paper: str = "-"
            ) -> dict | None:
    """One row of a gpu section: fn() -> its numbers r; `setting` and `result` are text, or
    functions of r. Appended to the JSON-lines file `rows` as soon as it is measured, so that
    what a section measured before its time ran out still reaches the table; a row that raises
    is written with its error and the section goes on."""
    t0 = time.perf_counter()
    try:
        r = fn()
        text = lambda x: x(r) if callable(x) else x
        row, status = {**r, "check": check, "setting": text(setting), "result": text(result),
                       "paper": paper}, "ok"
    except Exception as e:                                   # reported in the row, not fatal
        text = (str(e).strip().splitlines() or [""])[0][:160]
        row, status = {}, f"failed: {type(e).__name__}: {text}"
    row.update(key=key, status=status, seconds=round(time.perf_counter() - t0, 1))
    with open(rows, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{key}: {status} ({row['seconds']} s)", flush=True)
    return row if status == "ok" else None


def _num(x: float) -> str:
    """A rate with 3 significant digits below 100 (CPU dry runs), whole numbers above."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _mb(x: float) -> str:
    return f"{x:,.0f} MB"


def gpu_distill(dev: torch.device, rows: Path) -> None:
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
        got[T] = measure(rows, f"distill_T{T}",
                         lambda T=T, repeats=repeats: setup().row(T, repeats if cuda else 1),
                         f"distill: training throughput, rollouts of T = {T}",
                         lambda r: setup().describe(),
                         lambda r: f"{r['glimpses_s']:,.0f} glimpses/s "
                                   f"({r['glimpses_s'] / PAPER_GLIMPSES_S:.2f}x the paper's), "
                                   f"{r['s_step']:.2f} s/step",
                         PAPER_DISTILL)

    def both() -> dict:
        if not (got[4] and got[20]):
            raise RuntimeError("needs both the T = 4 and the T = 20 rows")
        return {}
    a, b = got[4], got[20]
    measure(rows, "distill_memory", both, "distill: memory vs rollout length (T = 4 vs 20)",
            "the two rows above; " + ("max_memory_allocated over the timed steps" if cuda
                                      else "peak RSS of the process"),
            lambda r: f"saved for backward {_mb(a['saved_mb'])} vs {_mb(b['saved_mb'])}; "
                      f"peak {_mb(a['peak_mb'])} vs {_mb(b['peak_mb'])}",
            "[003] truncated BPTT: activation memory does not grow with T")


def gpu_canvit(dev: torch.device, rows: Path) -> None:
    """CanViT-B inference latency per glimpse at batch 1, eager and compiled (bf16)."""
    cuda = dev.type == "cuda"
    cfg, gp, G = canvit_config(dev)
    torch.manual_seed(0)
    model = canvit.CanViT(cfg).to(dev).eval()
    dtype, backend = (torch.bfloat16, "inductor") if cuda else (torch.float32, "eager")
    for compiled in (False, True):
        def row(compiled=compiled) -> dict:
            step = torch.compile(model, dynamic=False, backend=backend) if compiled else model
            return canvit_row(model, step, dev, gp, G, dtype, 1, 20)
        mode = f"compiled{'' if cuda else ' (eager backend)'}" if compiled else "eager"
        measure(rows, f"canvit_{'compiled' if compiled else 'eager'}", row,
                f"CanViT inference latency, batch 1, {mode}",
                f"D={cfg.backbone.embed_dim} x {cfg.backbone.n_blocks} blocks, {gp} px glimpse, "
                f"canvas {G}x{G}, {_dtype_name(dtype)}, median of 20 steps",
                lambda r: f"{r['ms']:.2f} ms/glimpse ({r['glimpses_s']:,.0f} glimpses/s)",
                '[003] "hundreds of frames per second"')


def gpu_extraction(dev: torch.device, rows: Path) -> None:
    """The integral extraction of one glimpse set at a small and a large image: flat [000]."""
    cuda = dev.type == "cuda"
    small, large = (256, 8192) if cuda else (256, 1024)
    repeats = 10 if cuda else 3
    got = {}

    def result(r: dict) -> str:
        flat = (f"; {r['integral_ms'] / got[small]['integral_ms']:.2f}x the {small} px time"
                if r["side"] == large and got.get(small) else "")
        return (f"integral {r['integral_ms']:.2f} ms (table ready){flat}; "
                f"{r['integral_table_ms']:.1f} ms with the table; bilinear "
                f"{r['bilinear_ms']:.2f} ms; crop + interpolate {r['naive_ms']:.1f} ms")
    for name, S in (("small", small), ("large", large)):
        got[S] = measure(rows, f"extraction_{name}", lambda S=S: extraction_row(dev, S, repeats),
                         f"extraction: one glimpse set from a {S} px image",
                         f"8 gazes x (16 multi-zoom + 5x5 grid) patches of 16 px; median of "
                         f"{repeats}", result, "[000] Fig. 2: flat in the image size (table ready)")


def gpu_foveal(dev: torch.device, rows: Path) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (256, torch.bfloat16) if cuda else (2, None)
    measure(rows, "foveal", lambda: foveal_row(dev, batch, amp, repeats=3 if cuda else 1),
            "foveal ViT-S training step (bench foveal)",
            lambda r: f"{batch} images of 224 px x 8 random glimpses, {r['tokens']} tokens a "
                      f"glimpse, {_dtype_name(amp)}, eager",
            lambda r: f"{r['s_step']:.3f} s/step, {r['glimpses_s']:,.0f} glimpses/s, "
                      f"peak {_mb(r['peak_mb'])}")


def gpu_dino(dev: torch.device, rows: Path) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (64, torch.bfloat16) if cuda else (2, None)
    for T in (4, 8):
        measure(rows, f"dino_T{T}",
                lambda T=T: dino_row(dev, batch, amp, T, repeats=2 if cuda else 1,
                                     warmup=1 if cuda else 0),
                f"SSL (dino) training step, {T} sequential glimpses",
                f"dino.DINOConfig() ViT-S, {batch} images of 224 px, {_dtype_name(amp)}, eager",
                lambda r: f"{_num(r['images_s'])} images/s, {_num(r['glimpses_s'])} glimpses/s, "
                          f"peak {_mb(r['peak_mb'])}")


def gpu_grpo(dev: torch.device, rows: Path) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (64, torch.bfloat16) if cuda else (2, None)
    measure(rows, "grpo",
            lambda: grpo_row(dev, batch, amp, repeats=3 if cuda else 1, warmup=1 if cuda else 0),
            "GRPO rollout and inner epoch (bench grpo)",
            f"frozen random ViT-S, {batch} images x G = 16 x T = 8, 8 inner epochs, policy depth "
            f"6, {_dtype_name(amp)}",
            lambda r: f"rollout {_num(r['traces_s'])} traces/s ({_num(r['glimpses_s'])} "
                      f"glimpses/s); one inner epoch {r['inner_epoch_ms']:.0f} ms on "
                      f"{r['states']:,} states; peak {_mb(r['peak_mb'])}")


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
    sections[args.section](dev, Path(args.rows))


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
        except subprocess.TimeoutExpired:     # end the child and what it started (its group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
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
    lines += ["", md_head("check", "setting", "result", "paper / expected", "status", text=5)]
    for r in rows:
        status = r["status"] + (f" ({r['seconds']:.0f} s)" if "seconds" in r else "")
        cells = [r.get(k, "-") for k in ("check", "setting", "result", "paper")] + [status]
        lines.append(md_row(*map(_cell, cells)))
    return "\n".join(lines) + "\n"


def bench_gpu(args) -> None:
    """`python bench.py gpu`: tests/test_cuda.py, then each section in a child process under its
    time budget, cut to what is left of the whole (keeping 10 s for each section to come)."""
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


# ---- Command line ----------------------------------------------------------------------------
def step_args(p: argparse.ArgumentParser, batch: str, size: int, repeats: int,
              compiled: str = "") -> None:
    """The options of every training-step benchmark: batch, image side, dtype, repeats, compile."""
    p.add_argument("--batch", type=int, default=None, help=batch)
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
    p.add_argument("--lengths", type=int, nargs="+", default=[4, 20], help="rollout lengths T")
    step_args(p, "scenes (default: 64 CUDA, 1 CPU)", size=512, repeats=1, compiled="the CanViT")
    p.add_argument("--precomputed", action="store_true",
                   help="teacher features in the batch, as shards give (no teacher forward)")
    p.set_defaults(fn=bench_distill)
    p = sub.add_parser("foveal", parents=[common], help="foveal ViT-S training step")
    step_args(p, "images (default: 256 CUDA, 8 CPU)", size=224, repeats=3, compiled="the FovealViT")
    p.set_defaults(fn=bench_foveal)
    p = sub.add_parser("dino", parents=[common], help="sequential-to-global DINO step")
    p.add_argument("--seq_steps", type=int, nargs="+", default=[4, 8],
                   help="glimpses of the sequential views (the table's rows)")
    step_args(p, "images (default: 64 CUDA, 2 CPU)", size=224, repeats=2,
              compiled="backbones and heads")
    p.set_defaults(fn=bench_dino)
    p = sub.add_parser("grpo", parents=[common], help="GazeGRPO rollout and inner epoch")
    p.add_argument("--group", type=int, default=16, help="G traces an image ([002] A.3.4)")
    p.add_argument("--steps", type=int, default=8, help="T glimpses a trace ([002] A.3.4)")
    p.add_argument("--inner_epochs", type=int, default=8, help="[002] A.3.4")
    p.add_argument("--policy_depth", type=int, default=6,
                   help="policy decoder layers ([000] Sec. 4: 6; grpo's default, [002]: 1)")
    step_args(p, "images (default: 64 CUDA, 2 CPU)", size=224, repeats=3)
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
