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
              grow with T) and peak memory. README: "Pretraining CanViT".
  foveal      [002, A.3.4] one training step of the foveal iterative ViT-S of paper 000
              (dim 384, depth 12, 6 heads, 8 state tokens, 16 multi-zoom + 5 x 5 grid patches
              of 16 px) on 224 px images: an episode of 8 random glimpses, one backward a step,
              an AdamW update; batch 8 in float32 on CPU, 256 in bf16 autocast on CUDA.
              s/step, glimpses/s, peak memory. No README table yet.
  data        SyntheticScenes rendering, ms per item at 128-1024 px in one thread, and the
              scenes/s a DataLoader with 2 workers delivers. No README table yet.

Peak memory: CUDA max_memory_allocated over the timed steps; on CPU the process's peak RSS
(ru_maxrss, never reset: the peak so far in this process).

  python bench.py extraction [--sizes 256 512 ...] [--repeats 20] [--device cuda]
  python bench.py canvit [--batch 1 64] [--repeats 20] [--threads 2]
  python bench.py distill [--lengths 4 20] [--batch 64] [--dtype bfloat16] [--compile]
  python bench.py foveal [--batch 256] [--dtype bfloat16] [--compile] [--repeats 5]
  python bench.py data [--sizes 128 256 512 1024] [--n 100] [--workers 2]
Every subcommand takes --device (default cuda when present; data always runs on the CPU) and
--threads (CPU threads; torch's default, data's 1).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

import canvit
import data
import distill
import fovea


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
    at 1.0 ([003] Table 2) and steps AdamW over the trainable parameters."""
    rank, world, steps_per_epoch = 0, 1, 1000

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


def bench_extraction(args) -> None:
    dev = _device(args.device)
    gen = torch.Generator().manual_seed(0)
    gazes = (torch.rand(8, 2, generator=gen) * 1.6 - 0.8).to(dev)                 # 8 gazes
    header(dev, f"extraction: one glimpse set, 8 gazes x (16 multi-zoom + 25 grid) patches of "
                f"16x16 px from one image; median ms of {args.repeats}")
    print("| image side | integral (table ready) | integral + table build | bilinear | "
          "crop + interpolate (antialias) | naive / integral |")
    print("|---:|---:|---:|---:|---:|---:|")
    for S in args.sizes:
        img = torch.rand(1, 3, S, S, generator=gen).to(dev)
        ctx = fovea.foveal_context(gazes, (S, S), num_zoom=16, max_z=4.0, grid=5, grid_z=4.0)
        boxes = ctx.boxes.reshape(1, -1, 4)                                       # (1, 328, 4)
        table = fovea.integral_image(img)
        ms = lambda fn: statistics.median(timed(fn, dev, args.repeats)) * 1e3
        t_int = ms(lambda: fovea.box_patches(table, boxes, 16))
        t_tab = ms(lambda: fovea.box_patches(fovea.integral_image(img), boxes, 16))
        t_bil = ms(lambda: bilinear_boxes(img, boxes, 16))
        t_naive = ms(lambda: crop_resize(img, boxes, 16))
        print(f"| {S} | {t_int:.2f} | {t_tab:.1f} | {t_bil:.2f} | {t_naive:.1f} | "
              f"{t_naive / t_int:.0f}x |", flush=True)


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


def bench_canvit(args) -> None:
    """The median time of one recurrent step (state carried over) after 3 warm-up steps."""
    dev = _device(args.device)
    cfg, gp, G = canvit_config(dev)
    torch.manual_seed(0)
    model = canvit.CanViT(cfg).to(dev).eval()
    flops = canvit.count_flops(cfg, glimpse_grid=gp // cfg.backbone.patch_size, canvas_grid=G)
    header(dev, f"canvit: one recurrent step per glimpse, D={cfg.backbone.embed_dim} x "
                f"{cfg.backbone.n_blocks} blocks, Dc={cfg.canvas_dim}, glimpse {gp} px, canvas "
                f"{G}x{G}; {canvit.count_params(model) / 1e6:.1f}M params, "
                f"{flops['total'] / 1e9:.2f} GFLOPs/glimpse; median of {args.repeats} steps")
    print("| mode | dtype | batch | ms/step (median) | best ms | glimpses/s |")
    print("|---|---|---:|---:|---:|---:|")
    for compiled in (False, True):
        step = torch.compile(model, dynamic=False) if compiled else model
        for dtype in (torch.float32, torch.bfloat16):
            for batch in args.batch:
                glimpse = torch.randn(batch, 3, gp, gp, device=dev)
                vp = canvit.random_viewpoints(batch, torch.Generator().manual_seed(0))
                center, scale = vp.center_yx.to(dev), vp.scale.to(dev)
                amp = torch.autocast(dev.type, dtype, enabled=dtype == torch.bfloat16)
                with torch.inference_mode(), amp:
                    state = model.init_state(batch, G)

                    def one_step():
                        nonlocal state
                        state = step(glimpse, state, center, scale).state
                    times = timed(one_step, dev, args.repeats, warmup=3)
                ms = statistics.median(times) * 1e3
                print(f"| {'compiled' if compiled else 'eager'} | {str(dtype)[6:]} | {batch} | "
                      f"{ms:.2f} | {min(times) * 1e3:.2f} | {batch / ms * 1e3:.1f} |", flush=True)


# ----------------------------------------------------------------------------------------------
# distill: [003, Sec. 5] a distillation training step vs the rollout length
# ----------------------------------------------------------------------------------------------

def bench_distill(args) -> None:
    dev = _device(args.device)
    amp = _amp(args.dtype, dev)
    batch = args.batch or (64 if dev.type == "cuda" else 1)
    torch.manual_seed(0)
    with warnings.catch_warnings():                    # a random teacher: known, and said below
        warnings.simplefilter("ignore", distill.RandomTeacherWarning)
        obj = distill.Distillation(distill.DistillConfig(p_stop=1e-9), seed=0).to(dev)
    S, K, Dt = 512, obj.cfg.chunk, obj.cfg.model.teacher_dim
    G = S // obj.cfg.model.backbone.patch_size
    obj.model.set_standardizers(G, torch.zeros(1, Dt), torch.ones(1, Dt), torch.zeros(G * G, Dt),
                                torch.ones(G * G, Dt))
    if args.compile:
        obj.model.compile()
    run = BenchRun(obj.model.parameters(), dev, amp)
    images = torch.randn(batch, 3, S, S, device=dev)
    header(dev, f"distill: CanViT-B step from a random ViT-B/16 teacher, {batch} scenes x 2 "
                f"rollouts, {S} px scenes, {obj.cfg.glimpse_px} px glimpses, chunks of {K}, "
                f"{'bfloat16' if amp else 'float32'}{', compiled' if args.compile else ''}; "
                f"median of {args.repeats} steps")
    print("| rollout length T | s/step | glimpses/s | saved for backward at a chunk's backward "
          "(MB) | peak memory (MB) |\n|---:|---:|---:|---:|---:|")
    step = 0
    for T in args.lengths:
        if T % K:
            raise SystemExit(f"--lengths: {T} is not a multiple of the chunk length {K}")
        obj.cfg.max_chunks = T // K                               # p_stop ~ 0: exactly T glimpses

        def train_step():
            nonlocal step
            step += 1
            return obj.train_step({"image": images}, step, run)
        train_step()                                              # warm-up (and compilation)
        meter = SavedTensorMeter(exclude=obj.parameters())
        with meter:                                               # an untimed step, measured
            glimpses = train_step()["glimpses"]
        reset_peak_memory(dev)
        s = statistics.median(timed(train_step, dev, args.repeats, warmup=0))
        print(f"| {T} | {s:.2f} | {glimpses / s:.1f} | {meter.peak / 2 ** 20:.0f} | "
              f"{peak_memory_mb(dev):.0f} |", flush=True)


# ----------------------------------------------------------------------------------------------
# foveal: [002, A.3.4] a training step of the foveal iterative ViT-S ([000] Sec. 4)
# ----------------------------------------------------------------------------------------------

def bench_foveal(args) -> None:
    dev = _device(args.device)
    amp = _amp(args.dtype, dev)
    batch = args.batch or (256 if dev.type == "cuda" else 8)
    vit_s = fovea.FovealConfig(dim=384, depth=12, heads=6, num_state=8, patch_px=16,
                               num_zoom=16, grid=5, grid_z=(3.0, 4.0), z_max=4.0)
    cfg = fovea.FovealTrainConfig(model=vit_s, steps=8)
    torch.manual_seed(0)
    obj = fovea.FovealSupervised(cfg, seed=0).to(dev)
    if args.compile:
        obj.model.compile()
    run = BenchRun(obj.model.parameters(), dev, amp)
    S, K = args.size, vit_s.num_classes
    gen = torch.Generator().manual_seed(0)
    data_batch = {"image": torch.randn(batch, 3, S, S, generator=gen).to(dev),
                  "label": torch.randint(K, (batch,), generator=gen).to(dev)}
    P = vit_s.num_zoom + vit_s.grid ** 2
    params = sum(p.numel() for p in obj.model.parameters()) / 1e6
    header(dev, f"foveal: FovealViT-S (384 x 12, 6 heads, {vit_s.num_state} state tokens, "
                f"{vit_s.num_zoom} + {vit_s.grid}x{vit_s.grid} patches of {vit_s.patch_px} px, "
                f"{params:.1f}M params), {cfg.steps} glimpses an episode, {S} px images, "
                f"{'bfloat16' if amp else 'float32'}{', compiled' if args.compile else ''}; "
                f"median of {args.repeats} steps")
    print("| batch | tokens a glimpse | s/step | images/s | glimpses/s | peak memory (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    step = 0

    def train_step():
        nonlocal step
        step += 1
        obj.train_step(data_batch, step, run)
    for _ in range(2 if args.compile else 1):                    # warm-up (and compilation)
        train_step()
    reset_peak_memory(dev)
    s = statistics.median(timed(train_step, dev, args.repeats, warmup=0))
    print(f"| {batch} | {vit_s.num_state + P} | {s:.3f} | {batch / s:.1f} | "
          f"{batch * cfg.steps / s:.1f} | {peak_memory_mb(dev):.0f} |", flush=True)


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
# Command line
# ----------------------------------------------------------------------------------------------

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
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the CanViT")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per length (median)")
    p.set_defaults(fn=bench_distill)

    p = sub.add_parser("foveal", parents=[common], help="foveal ViT-S training step")
    p.add_argument("--batch", type=int, default=None, help="images (default: 256 CUDA, 8 CPU)")
    p.add_argument("--size", type=int, default=224, help="image side (px)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the FovealViT")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median)")
    p.set_defaults(fn=bench_foveal)

    p = sub.add_parser("data", parents=[common], help="synthetic scene rendering speed")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--n", type=int, default=100, help="items per size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.set_defaults(fn=bench_data)

    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
