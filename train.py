"""One training entry point for every objective: config, DDP, the loop, checkpoints, logs.

    python train.py --cfg canvit_tiny.yaml                       # one process (CPU or GPU)
    torchrun --nproc_per_node 8 train.py --cfg canvit.yaml       # one node, 8 GPUs
    python train.py --cfg foveal_tiny.yaml --optim.lr=1e-3 --max_steps=200   # overrides
    python train.py --cfg foveal_tiny.yaml --print_config        # every key, resolved
    torchrun --nproc_per_node 8 train.py --cfg canvit.yaml --export_features DIR  # teacher shards

Objectives (each a class in its module; OBJECTIVES and `build_objective` name them, and
TrainConfig has one config section each)
  distill     passive-to-active dense latent distillation of CanViT [003, Sec. 5]  distill.py
  foveal_sup  the foveal ViT's stage 1 with random gazes [002, A.3.4]             fovea.py
  vit_sup     the passive patch-16 ViT baseline of [000] Fig. 1                   canvit.py
  dino        sequential-to-global self-supervised pretraining [000, Sec. 3.1]    dino.py
  probe       a task head on a frozen dino backbone, random gazes [000, Sec. 5.1]  fovea.py
  grpo        a gaze policy on a frozen encoder, by GRPO [002, A.2; 000, Sec. 3.3]  grpo.py

The loop owns the data (each process's share of every global batch, epochs, resuming
mid-epoch), the processes, the optimizer (AdamW, parameter groups, the learning-rate and
weight-decay schedules), gradient averaging, clipping, checkpoints and logs. An objective, an
nn.Module, owns its networks and its forward and backward passes:
  .model                        the network being trained (ckpt["model"], strictly loaded)
  .augment                      True: ImageNet's training view of real images (data.py)
  .train_step(batch, step, run) -> dict of 0-d tensors with "loss", plus "glimpses" (an int,
                                the throughput's); forwards under `run.autocast()`, backward
                                calls (truncated BPTT: several), run.optimizer_step() per update
  .updates_per_step             optimizer steps a train_step takes (default 1; GRPO: inner epochs)
and optionally
  .setup(dataset)               one-time work on rank 0 before step 0 (e.g. target statistics)
  .training_data(dataset, rank, world, seed) -> (dataset, sampler) or None (the loop's own):
                                its own data (distill: precomputed feature shards)
  .clip_groups()                (default: one clip group; DINO clips backbone and head apart)
  .label_classes() -> (key, K)  the config key and class count the data must match
  .log_keys                     metrics shown on the log line too (all go to log.jsonl)
  .extra_state() / .load_extra_state(d)   more to checkpoint (an EMA teacher, a random teacher)
  .export() -> {name: fovea.export_part(...)}   parts other runs reuse (`fovea.load_frozen`)
`run` holds rank, world, device, steps_per_epoch, schedule_steps (the schedules' horizon),
autocast() and optimizer_step(frozen=()) (see Run); what must follow an update (an EMA
teacher) follows that call.

Config: config.py's dataclass defaults, a YAML file, then `--a.b=value`; bad keys, types and
values stop the run before any work; the resolved config is saved beside the checkpoint and in
it. Reliability: rank 0 writes <out_dir>/ckpt.pt (save_checkpoint); a run started again resumes
from the newest readable one; SIGTERM / SIGINT save at the next step boundary and exit (status
143 / 130); a lock refuses a second run in the same out_dir; a non-finite loss stops the run
before any save. Log: a rank-0 line after the first step and every `log_every` steps (losses
averaged over the processes), the same fields in <out_dir>/log.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import canvit
import config
import data
import dino
import distill
import fovea
import grpo
from config import ConfigError


# ---- Config ----------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    lr: float = 4e-4               # [003] Table 2: peak learning rate
    init_lr: float = 1e-7          # [003] Table 2: initial learning rate
    warmup_steps: int = 100_000    # [003] Table 2
    schedule: str = "constant"     # [003] Table 2: warmup -> constant | "cosine" ([002] A.3.4)
    min_lr: float = 0.0            # end of the cosine decay
    weight_decay: float = 1e-4     # [003] Table 2
    weight_decay_end: float = -1.0  # cosine from weight_decay to this over the run; < 0: constant
    schedule_steps: int = 0        # the schedules' horizon; 0: max_steps ([000] App. E: 300 epochs
                                   # of schedules for a 100-epoch run)
    betas: tuple[float, float] = (0.9, 0.999)  # [003] Table 2
    grad_clip: float = 1.0         # [003] Table 2: max norm, per clip group (0 = off)


@dataclass
class TrainConfig:
    objective: str = "distill"     # one of OBJECTIVES
    out_dir: str = "runs/default"
    max_steps: int = 2_000_000     # [003] Table 2
    batch_size: int = 64           # global, in scenes: [003] Table 2
    seed: int = 0
    compile: bool = False          # torch.compile the model's step
    dtype: str = "bfloat16"        # autocast dtype for the forward ([003] Table 2: AMP bf16) | float32
    log_every: int = 50
    ckpt_every: int = 1000
    num_workers: int = 4           # DataLoader workers per process
    threads: int = 0               # CPU threads per process; 0: the cores left after the data workers
    data: data.DataConfig = field(default_factory=data.DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: distill.DistillConfig = field(default_factory=distill.DistillConfig)
    foveal: fovea.FovealTrainConfig = field(default_factory=fovea.FovealTrainConfig)
    vit: canvit.PassiveViTConfig = field(default_factory=canvit.PassiveViTConfig)
    dino: dino.DINOConfig = field(default_factory=dino.DINOConfig)
    probe: fovea.ProbeConfig = field(default_factory=fovea.ProbeConfig)
    grpo: grpo.GRPOConfig = field(default_factory=grpo.GRPOConfig)


OBJECTIVES = ("distill", "foveal_sup", "vit_sup", "dino", "probe", "grpo")


def build_objective(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.objective == "distill":
        return distill.Distillation(cfg.distill, seed=cfg.seed)
    if cfg.objective == "foveal_sup":
        return fovea.FovealSupervised(cfg.foveal, seed=cfg.seed)
    if cfg.objective == "vit_sup":
        return canvit.PassiveViTSupervised(cfg.vit, seed=cfg.seed)
    if cfg.objective == "dino":
        return dino.DINOSequentialToGlobal(cfg.dino, seed=cfg.seed)
    if cfg.objective == "probe":
        return fovea.FovealSupervised.probe(cfg.probe, seed=cfg.seed)
    if cfg.objective == "grpo":
        return grpo.GazeGRPO(cfg.grpo, seed=cfg.seed)
    raise ConfigError(f"objective: unknown {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")


# Fields that may change when a run resumes; any other difference means another experiment.
RESUMABLE_CHANGES = {"out_dir", "max_steps", "log_every", "ckpt_every", "compile", "num_workers", "threads"}


def usage() -> str:
    lines = ["train.py --cfg NAME [--section.key=value ...]   (--print_config shows every key)",
             "", "objectives: " + ", ".join(OBJECTIVES), "", "configs (in configs/, found by name):"]
    lines += [f"  {p.name:24} {config.describe(p)}" for p in config.shipped_configs()]
    return "\n".join(lines)


def parse_config(argv: list[str], world: int = 1) -> tuple[TrainConfig, str | None, bool]:
    """-> (config, export folder or None, print the config and exit). Raises ConfigError."""
    ap = argparse.ArgumentParser(prog="train.py", description="Train any objective of the project.",
                                 epilog=usage(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", help="YAML config (a path, or a name in the project root or configs/)")
    ap.add_argument("--export_features", metavar="DIR",
                    help="write the distill teacher's features of the dataset into DIR, then exit")
    ap.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    args, rest = ap.parse_known_args(argv)
    if not args.cfg:
        raise ConfigError("no --cfg given. Run one of the configs, e.g.\n  python train.py --cfg "
                          "canvit_tiny.yaml\n\n" + usage())
    cfg = TrainConfig()
    config.load_file(cfg, args.cfg)
    config.apply_cli(cfg, rest)
    check_config(cfg, world)
    return cfg, args.export_features, args.print_config


def check_config(cfg: TrainConfig, world: int) -> None:
    """Every value the run depends on, before any work: all problems in one message."""
    problems = []

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            problems.append(f"{key} = {value!r}: {allowed}")
    need(cfg.objective in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}")
    need(cfg.dtype in ("bfloat16", "float32"), "dtype", "bfloat16 or float32")
    for key in ("max_steps", "batch_size", "log_every", "ckpt_every"):
        need(getattr(cfg, key) >= 1, key, "an integer >= 1")
    need(cfg.batch_size % world == 0, "batch_size", f"a multiple of the {world} processes")
    need(cfg.num_workers >= 0, "num_workers", "an integer >= 0")
    need(cfg.threads >= 0, "threads", "an integer >= 0 (0: the free cores)")
    need(cfg.optim.schedule in ("constant", "cosine"), "optim.schedule", "constant or cosine")
    need(cfg.optim.lr > 0 and cfg.optim.warmup_steps >= 0, "optim.lr", "> 0 (and warmup_steps >= 0)")
    d = cfg.data
    need(d.dataset in data.DATASETS, "data.dataset", f"one of {', '.join(data.DATASETS)}")
    need(d.image_size >= 1, "data.image_size", "an integer >= 1 (pixels)")
    if d.dataset == "synthetic":
        need(1 <= d.num_classes <= len(data.GLYPHS), "data.num_classes", f"1 to {len(data.GLYPHS)} glyphs")
        need(d.length >= cfg.batch_size, "data.length", f">= batch_size ({cfg.batch_size}) scenes")
        need(0 < d.target_min <= data.TARGET_MAX, "data.target_min",
             f"a badge diameter in (0, {data.TARGET_MAX:.3f}] of the side (it must fit in the scene)")
        need(d.target_min <= d.target_max <= data.TARGET_MAX, "data.target_max",
             f"from data.target_min ({d.target_min}) to {data.TARGET_MAX:.3f} of the side")
    elif d.dataset == "fashion_mnist":
        n = len(data.FASHION_MNIST_CLASSES)
        need(d.num_classes == n, "data.num_classes", f"{n} (Fashion-MNIST's classes)")
        need(d.scene in data.SCENES, "data.scene", f"one of {', '.join(data.SCENES)} (object-centric scenes "
             "are cluttered ones with data.item_min=0.6, data.item_max=0.9, data.clutter=2)")
        need(d.length >= cfg.batch_size, "data.length", f">= batch_size ({cfg.batch_size}) scenes")
        need(d.val_length >= 1, "data.val_length", "an integer >= 1 (scenes)")
        need(0 < d.item_min <= 1, "data.item_min", "an item side in (0, 1] of the scene side (it must fit)")
        need(d.item_min <= d.item_max <= 1, "data.item_max", f"from data.item_min ({d.item_min}) to 1")
        need(d.clutter >= 0, "data.clutter", "an integer >= 0 (fragments a scene)")
        need(1 <= d.fragment_px <= data.ITEM_PX, "data.fragment_px", f"1 to {data.ITEM_PX} item pixels")
        try:                                     # the files, read once: the dataset reuses them
            for split in ("train", "val"):
                data.load_fashion_mnist(d.root, split)
        except data.DataError as e:
            problems.append(f"data.root = {d.root!r}: {e}")
    elif d.dataset in data.DATASETS:
        folder = "ADEChallengeData2016" if d.dataset == "ade20k" else "images (train/<class>/...)"
        need(bool(d.root) and Path(d.root).is_dir(), "data.root", f"a folder: set --data.root=/path/to/{folder}")
    if problems:
        raise ConfigError("\n  ".join(["bad config values (nothing was run):", *problems]))


# ---- Schedules (pure functions of the step) --------------------------------------------------
def learning_rate(step: int, o: OptimConfig, max_steps: int) -> float:
    """Linear warmup from init_lr to lr, then constant [003, Table 2] or cosine to min_lr [002, A.3.4]."""
    max_steps = o.schedule_steps or max_steps
    if step < o.warmup_steps:
        return o.init_lr + (o.lr - o.init_lr) * step / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def weight_decay(step: int, o: OptimConfig, max_steps: int) -> float:
    """Constant, or a cosine from weight_decay to weight_decay_end over the run (DINO: 0.04 -> 0.4)."""
    if o.weight_decay_end < 0:
        return o.weight_decay
    max_steps = o.schedule_steps or max_steps
    return o.weight_decay_end + (o.weight_decay - o.weight_decay_end) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, step / max(1, max_steps))))


# ---- Data: every process's share of every global batch, resumable mid-epoch ------------------
class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's share of every global batch, resumable mid-epoch (`skip`: that many
    samples into this process's epoch). Each epoch is a permutation of the dataset seeded by
    (seed, epoch), cut into global batches (an incomplete last one dropped), of which process r
    takes the r-th contiguous share: the global batches do not depend on the number of
    processes, and an objective finds its rows at rank * b ... (rank + 1) * b."""
    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.share = global_batch // world
        self.num_samples = n // global_batch * self.share
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = perm[:self.n // self.batch * self.batch].view(-1, self.world, self.share)[:, self.rank]
        return iter(mine.reshape(-1)[self.skip:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.skip


def data_position(step: int, batches_per_epoch: int) -> tuple[int, int]:
    """Batches already consumed -> (epoch, batches into that epoch)."""
    return step // batches_per_epoch, step % batches_per_epoch


def _quiet_worker(_: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which saves and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Batches:
    """This process's batches, epoch after epoch, from any step on; bad images counted."""
    def __init__(self, dataset, sampler, local_batch: int, cfg: TrainConfig, device: torch.device):
        self.dataset, self.sampler, self.b, self.cfg, self.device = dataset, sampler, local_batch, cfg, device
        self.per_epoch = sampler.num_samples // local_batch
        self.reported: set[str] = set()
        self.it = None

    def start(self, step: int) -> None:
        epoch, offset = data_position(step, self.per_epoch)
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):               # the epoch's augmentations
            self.dataset.set_epoch(epoch)
        self.sampler.skip = offset * self.b
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        self.it = iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.b, sampler=self.sampler, num_workers=self.cfg.num_workers,
            collate_fn=data.collate, pin_memory=self.device.type == "cuda", drop_last=True,
            generator=gen, worker_init_fn=_quiet_worker, persistent_workers=False))

    def next(self, step: int, say) -> tuple[dict, int]:
        """-> (batch on the device, bad images in it). A new epoch starts when one ends."""
        try:
            batch = next(self.it)
        except StopIteration:
            self.start(step)
            batch = next(self.it)
        n_bad = batch.pop("n_bad", 0)
        for reason in batch.pop("bad", []):
            if reason not in self.reported and len(self.reported) < 1000:   # each file once
                self.reported.add(reason)
                say(f"skipped a bad image: {reason}")
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}, n_bad


# ---- Processes, the optimizer and what the loop lends an objective ---------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the env:// rendezvous (multi-node too)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", init_method="env://", device_id=torch.device("cuda", local))
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def param_groups(model: torch.nn.Module, decay: float) -> list[dict]:
    """Weight decay on matrices only (`wd_scale`: the groups the loop's schedule applies to).
    NOTE(paper): [003] gives one value (1e-4); sparing norms, biases, LayerScale and learned
    tokens is the usual ViT practice (DINOv2, timm)."""
    decayed, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decayed if p.dim() >= 2 and p.shape[0] > 1 else other).append(p)
    return [{"params": decayed, "weight_decay": decay, "wd_scale": 1.0},
            {"params": other, "weight_decay": 0.0, "wd_scale": 0.0}]


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over processes, one flat buffer per dtype. NOTE: not DDP, which expects
    one backward per forward: truncated BPTT runs a random number of chunks, each with its
    backward, so the average is taken once, before the update."""
    for p in params:                                         # same buffers on every rank
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in {p.grad.dtype for p in params}:
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class Run:
    """What the loop lends an objective's train_step: processes, autocast and optimizer steps."""
    def __init__(self, cfg: TrainConfig, objective, rank: int, world: int, device: torch.device,
                 steps_per_epoch: int):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.steps_per_epoch = steps_per_epoch
        self.schedule_steps = cfg.optim.schedule_steps or cfg.max_steps   # for an objective's own
        model = objective.model
        groups = param_groups(model, cfg.optim.weight_decay)
        in_groups = {id(p) for g in groups for p in g["params"]}
        self.params = [p for p in objective.parameters() if id(p) in in_groups]   # the model's order
        self.clip_groups = objective.clip_groups() if hasattr(objective, "clip_groups") else [self.params]
        self.opt = torch.optim.AdamW(groups, lr=cfg.optim.init_lr, betas=cfg.optim.betas,
                                     fused=device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.updates, self.grad_norm = 0, torch.zeros((), device=device)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_schedules(self, step: int) -> float:
        lr = learning_rate(step, self.cfg.optim, self.cfg.max_steps)
        wd = weight_decay(step, self.cfg.optim, self.cfg.max_steps)
        for g in self.opt.param_groups:
            g["lr"], g["weight_decay"] = lr, wd * g.get("wd_scale", 1.0)
        return lr

    def optimizer_step(self, frozen=()) -> None:
        """Average the gradients over processes, clip each clip group, update all parameters but
        `frozen` (their gradients are dropped, as DINO does for its last layer in epoch 1)."""
        if self.world > 1:
            all_reduce_grads(self.params, self.world)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norms = [torch.nn.utils.clip_grad_norm_(g, clip) for g in self.clip_groups]
        self.grad_norm = torch.stack(norms).square().sum().sqrt()
        for p in frozen:
            p.grad = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.updates += 1


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # peak RSS (Linux: KiB)


# ---- Checkpoints and the run folder ----------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write a temporary file, read it back, keep the current checkpoint as ckpt_prev.pt, then
    rename over it: a crash or a full disk at any moment leaves ckpt.pt readable (the previous
    one is linked to ckpt_prev.pt, not moved there, so ckpt.pt never goes missing)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    if fovea.read_checkpoint(tmp)["step"] != ckpt["step"]:
        raise OSError(f"{tmp} did not read back as written")
    if path.exists():
        prev = path.with_name("ckpt_prev.pt")
        prev_tmp = prev.with_name(prev.name + f".tmp{os.getpid()}")
        try:
            os.link(path, prev_tmp)                 # a second name for the same file
        except OSError:                             # a file system without hard links
            shutil.copyfile(path, prev_tmp)
        os.replace(prev_tmp, prev)
    os.replace(tmp, path)


def load_latest(out: Path, say) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint of out_dir (ckpt.pt, else ckpt_prev.pt) and its path."""
    damaged = []
    for path in (out / "ckpt.pt", out / "ckpt_prev.pt"):
        if not path.exists():
            continue
        try:
            ckpt = fovea.read_checkpoint(path)
        except fovea.CheckpointError as e:
            damaged.append(str(e))
            continue
        for message in damaged:
            say(f"warning: {message}\n  resuming from {path} (step {ckpt['step']}) instead")
        return ckpt, path
    if damaged:
        raise fovea.CheckpointError("no readable checkpoint to resume from:\n  " + "\n  ".join(damaged)
                                    + f"\n  move them out of {out} to start the run afresh")
    return None, None


def check_resumable(saved: dict, now: dict, default: dict, prefix: str = "") -> None:
    """Raise if the checkpoint's config differs from this run's beyond RESUMABLE_CHANGES. A key
    the checkpoint lacks (a field added by a later version of the code) counts as its default."""
    for key in sorted(set(saved) | set(now)):
        name = prefix + key
        a = saved.get(key, default.get(key, "<missing>"))
        b = now.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            check_resumable(a, b, default.get(key, {}), name + ".")
        elif name not in RESUMABLE_CHANGES and a != b:
            raise ConfigError(f"the checkpoint in this out_dir was made with {name}={a!r}, this run "
                              f"has {name}={b!r}; use another out_dir for a different experiment")


@contextlib.contextmanager
def run_folder(path: str, master: bool):
    """out_dir, checked writable and locked for this run (before any work); removed again if the
    run stops before writing anything into it. The lock is a POSIX record lock (fcntl.lockf): the
    kernel drops it when this process ends, however it ends, and forked DataLoader workers do not
    inherit it (an flock would live on in orphaned workers after a SIGKILL)."""
    out = Path(path)
    if not master:
        yield out
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / "lock", "a+")
    except OSError as e:
        raise ConfigError(f"out_dir = {path!r} is not writable ({e.strerror}): choose another out_dir") from None
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:                                          # EACCES or EAGAIN: held elsewhere
        lock.seek(0)
        raise ConfigError(f"out_dir = {path!r} is in use by another run ({lock.read().strip() or 'a process'}); "
                          "wait for it to end, or use another out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    lock.flush()
    for stale in out.glob("ckpt*.pt.tmp*"):                  # a write cut short by a kill
        stale.unlink()
    try:
        yield out
    finally:
        (out / "lock").unlink(missing_ok=True)
        lock.close()
        if created and not any(out.iterdir()):
            out.rmdir()


class StopSignal:
    """SIGTERM (cluster schedulers, before a kill) and SIGINT (Ctrl-C) ask the loop to stop;
    the handlers before the run are back when it ends."""
    def __enter__(self) -> StopSignal:
        self.signum = 0
        self.before = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.before.items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        if self.signum:                                      # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


# ---- Feature export (distill, --export_features) ---------------------------------------------
def export(cfg: TrainConfig, folder: str, rank: int, world: int, device: torch.device) -> None:
    """[003] App. D.2: the teacher's features of every scene, into float16 shards (resumable)."""
    torch.manual_seed(cfg.seed)                              # a random teacher is the same everywhere
    teacher = distill.make_teacher(cfg.distill.teacher).to(device)
    dataset = data.build_dataset(cfg.data)
    done = distill.export_features(teacher, dataset, folder, cfg.distill.shard_size, cfg.seed, rank, world,
                                   batch_size=cfg.batch_size // world, num_workers=cfg.num_workers,
                                   collate=data.collate)
    print(f"rank {rank}: wrote {len(done)} shard(s) into {folder}")
    if rank == 0 and not cfg.distill.teacher.weights:          # keep a random teacher with its features
        torch.save(teacher.state_dict(), Path(folder) / "teacher.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        distill.write_index(folder, math.ceil(len(dataset) / cfg.distill.shard_size), {
            "dataset_len": len(dataset), "shard_size": cfg.distill.shard_size, "seed": cfg.seed,
            "image_size": cfg.data.image_size, "teacher_weights": cfg.distill.teacher.weights,
            "data": config.as_dict(cfg.data)})
        print(f"index written: {Path(folder) / 'index.json'}")


# ---- The run, in phases ----------------------------------------------------------------------
def set_threads(cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu":
        # More compute threads than free cores makes every parallel op wait for a descheduled
        # thread (seen here: 7 s/step instead of 0.2 s with 2 workers on 2 cores).
        cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(cfg.threads or max(1, cores - cfg.num_workers))


def training_data(cfg: TrainConfig, objective, rank: int, world: int):
    """The dataset (the objective's view of cfg.data) and this process's sampler."""
    dataset = data.build_dataset(cfg.data, "train", augment=objective.augment, seed=cfg.seed)
    if hasattr(objective, "label_classes") and hasattr(dataset, "num_classes"):
        key, K = objective.label_classes()
        if dataset.num_classes != K:
            raise ConfigError(f"{key} = {K}, but the data ({cfg.data.dataset}"
                              f"{', ' + cfg.data.root if cfg.data.root else ''}) have {dataset.num_classes} "
                              f"classes: set {key}={dataset.num_classes}")
        if K < 2:
            raise ConfigError(f"{key} = {K}: a single class leaves nothing to learn (loss 0)")
    custom = objective.training_data(dataset, rank, world, cfg.seed) if hasattr(objective, "training_data") else None
    if custom is not None:
        dataset, sampler = custom
    else:
        sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed)
    if sampler.num_samples < cfg.batch_size // world:
        raise ConfigError(f"batch_size = {cfg.batch_size}: the dataset has {len(dataset)} samples, "
                          "fewer than one global batch")
    return dataset, sampler


def resume(out: Path, cfg: TrainConfig, objective, run: Run, dataset, say) -> dict:
    """Restore the newest readable checkpoint of out_dir, or start: -> the loop's counters."""
    state = {"step": 0, "bad_images": 0, "skipped": 0, "checkpoint": None}
    ckpt, path = load_latest(out, say) if run.rank == 0 else (None, None)
    if run.world > 1:                        # rank 0 chose the file; every process reads it
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
        if run.rank and path is not None:
            ckpt = fovea.read_checkpoint(path)
    if ckpt is None:
        if run.rank == 0 and hasattr(objective, "setup"):
            objective.setup(dataset)                         # e.g. target statistics; shared below
        torch.manual_seed(cfg.seed + run.rank)               # per-rank stream from here on
        return state
    check_resumable(ckpt["config"], config.as_dict(cfg), config.as_dict(TrainConfig()))
    if len(ckpt["rng"]) != run.world:     # the data order follows the global batch; RNG streams do not
        say(f"warning: the checkpoint was written by {len(ckpt['rng'])} processes, this run has "
            f"{run.world}: it continues on the same data, but per-process random streams restart differently")
    objective.model.load_state_dict(ckpt["model"], strict=True)
    run.opt.load_state_dict(ckpt["optimizer"])
    if hasattr(objective, "load_extra_state"):
        objective.load_extra_state(ckpt["extra"])
    set_rng_state(ckpt["rng"][run.rank % len(ckpt["rng"])])
    say(f"resumed from {path} at step {ckpt['step']}")
    return {**state, "step": ckpt["step"], "bad_images": ckpt.get("bad_images", 0),
            "skipped": ckpt.get("skipped", 0), "checkpoint": ckpt["step"]}


def checkpoint(cfg: TrainConfig, objective, step: int, optimizer: dict | None = None,
               rng: list | None = None, **counters) -> dict:
    """A checkpoint: the trained model, what resuming needs, and the objective's exported parts."""
    return {"model": objective.model.state_dict(), "optimizer": optimizer or {}, "step": step,
            "rng": rng or [], "config": config.as_dict(cfg), **counters,
            "extra": objective.extra_state() if hasattr(objective, "extra_state") else {},
            "export": objective.export() if hasattr(objective, "export") else {}}


def save(out: Path, cfg: TrainConfig, objective, run: Run, state: dict, per_epoch: int) -> None:
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.rank == 0:
        step = state["step"]
        save_checkpoint(out / "ckpt.pt", checkpoint(
            cfg, objective, step, run.opt.state_dict(), rngs, bad_images=state["bad_images"],
            skipped=state["skipped"], data=dict(zip(("epoch", "batch"), data_position(step, per_epoch)))))
    state["checkpoint"] = state["step"]


class Logger:
    """Metrics summed over a window, averaged over processes at log time; a line and JSONL."""
    def __init__(self, out: Path, cfg: TrainConfig, run: Run, say, keys: tuple[str, ...] = ()):
        self.cfg, self.run, self.say, self.keys = cfg, run, say, keys    # keys: on the line too
        self.file = open(out / "log.jsonl", "a") if run.rank == 0 else None
        self.sums: dict[str, torch.Tensor] = {}
        self.nonfinite = torch.zeros((), device=run.device)
        self.t0, self.ema_ms, self.bad = time.perf_counter(), None, 0
        self.glimpses, self.steps, self.measured = 0, 0, 0          # in this window

    def add(self, metrics: dict | None, bad: int) -> None:
        """One step's metrics (None: a skipped step) and its bad images on this process."""
        self.bad += bad
        self.steps += 1
        if metrics is None:
            return
        self.glimpses += metrics.pop("glimpses", 0)
        self.measured += 1
        self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(metrics["loss"])).float())
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def settle_bad_images(self, state: dict) -> None:
        """Add every process's bad images since the last call to the run's count."""
        bad = torch.tensor(float(self.bad), device=self.run.device)
        if self.run.world > 1:
            dist.all_reduce(bad)
        state["bad_images"] += int(bad.item())
        self.bad = 0

    def check_finite(self, state: dict, out: Path) -> None:
        """One host sync, at log / save time; every process agrees."""
        flag = self.nonfinite.clone()
        if self.run.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            kept = (f"the last good checkpoint (step {state['checkpoint']}) in {out} is kept as it was"
                    if state["checkpoint"] is not None else "no checkpoint was written yet")
            raise FloatingPointError(f"a non-finite loss occurred before step {state['step']}; {kept}")

    def write(self, state: dict, lr: float) -> None:
        self.settle_bad_images(state)
        step, run, n = state["step"], self.run, max(1, self.steps)
        keys = sorted(self.sums)
        totals = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.glimpses), device=run.device)])
        if run.world > 1:
            dist.all_reduce(totals)
            totals[:len(keys)] /= run.world
        now = time.perf_counter()
        ms = (now - self.t0) * 1e3 / n
        self.ema_ms = ms if self.ema_ms is None else 0.9 * self.ema_ms + 0.1 * ms
        record = {"step": step, **{k: round(float(v) / max(1, self.measured), 6) for k, v in zip(keys, totals)},
                  "lr": lr, "grad_norm": round(float(run.grad_norm), 4), "ms_per_step": round(ms, 1),
                  "glimpses_per_s": round(float(totals[-1]) / (now - self.t0), 1),
                  "mem_mb": round(memory_mb(run.device)), "bad_images": state["bad_images"],
                  "skipped_steps": state["skipped"]}
        eta = time.strftime("%H:%M:%S", time.gmtime((self.cfg.max_steps - step) * self.ema_ms / 1e3))
        extra = "".join(f" | {k} {record[k]:.4g}" for k in self.keys if k in record)
        extra += f" | {record['bad_images']} bad images" if record["bad_images"] else ""
        loss = f"{record['loss']:.4f}" if "loss" in record else "-"
        self.say(f"step {step:>7}/{self.cfg.max_steps} | loss {loss} | lr {lr:.2e} | "
                 f"{ms:.0f} ms/step | {record['glimpses_per_s']:.0f} glimpses/s | "
                 f"{record['mem_mb']} MB | ETA {eta}" + extra)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.t0, self.sums = time.perf_counter(), {}
        self.glimpses, self.steps, self.measured = 0, 0, 0


def main(argv: list[str]) -> None:
    # -- set up: config (fails before any work), processes, threads, the run folder --------------
    cfg, export_dir, show = parse_config(argv, int(os.environ.get("WORLD_SIZE", 1)))
    if show:
        print(config.as_yaml(cfg), end="")
        return
    rank, world, device = setup_distributed()
    say = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
    if rank:
        warnings.simplefilter("ignore", distill.RandomTeacherWarning)   # said once, by rank 0
    set_threads(cfg, device)
    if export_dir:
        return export(cfg, export_dir, rank, world, device)
    with StopSignal() as stop, run_folder(cfg.out_dir, rank == 0) as out:
        # -- the objective, its data and optimizer; resume ----------------------------------------
        torch.manual_seed(cfg.seed)              # the same initialisation on every rank
        objective = build_objective(cfg).to(device)
        dataset, sampler = training_data(cfg, objective, rank, world)
        batches = Batches(dataset, sampler, cfg.batch_size // world, cfg, device)
        run = Run(cfg, objective, rank, world, device, batches.per_epoch)
        state = resume(out, cfg, objective, run, dataset, say)
        if rank == 0:                            # after the resume check: never clobber
            (out / "config.yaml").write_text(config.as_yaml(cfg))
        if world > 1:                            # rank 0's weights and fitted statistics everywhere
            shared = [{k: v.cpu() for k, v in objective.model.state_dict().items()} if rank == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            objective.model.load_state_dict(shared[0], strict=True)
        if cfg.compile:
            objective.model.compile()            # in place: state_dict keys unchanged
        n = sum(p.numel() for p in run.params)
        say(f"objective {cfg.objective}: {f'{n / 1e6:.2f}M' if n >= 10_000 else f'{n:,}'} trainable "
            f"parameters, {world} process(es) on {device}, global batch {cfg.batch_size}, "
            f"{len(dataset)} samples, {batches.per_epoch} steps an epoch")
        log = Logger(out, cfg, run, say, getattr(objective, "log_keys", ()))
        batches.start(state["step"])
        t_first = time.perf_counter()
        # -- the loop ------------------------------------------------------------------------
        while state["step"] < cfg.max_steps:
            batch, bad = batches.next(state["step"], say)
            flags = torch.tensor([float(stop.signum), float("image" not in batch)], device=device)
            if world > 1:                        # every process stops or skips together
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                return preempted(out, cfg, objective, run, state, batches, log, int(flags[0]), say)
            lr = run.set_schedules(state["step"])
            updates = run.updates
            if flags[1]:                         # a process got only bad images: nobody updates
                state["skipped"] += 1
                log.add(None, bad)
            else:
                log.add(objective.train_step(batch, state["step"], run), bad)
                expected = getattr(objective, "updates_per_step", 1)
                if run.updates - updates != expected:
                    raise RuntimeError(f"{type(objective).__name__}.train_step made {run.updates - updates} "
                                       f"optimizer steps, not {expected} (updates_per_step)")
            state["step"] += 1
            if state["step"] == 1:
                say(f"step 1 done in {time.perf_counter() - t_first:.1f} s (start-up included); a line "
                    f"every {cfg.log_every} steps")
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
                log.check_finite(state, out)
                log.write(state, lr)
            if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.max_steps:
                log.check_finite(state, out)
                log.settle_bad_images(state)
                save(out, cfg, objective, run, state, batches.per_epoch)
        say(f"done: {state['step']} steps; checkpoint {out / 'ckpt.pt'}, log {out / 'log.jsonl'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def preempted(out, cfg, objective, run, state, batches, log, signum, say) -> None:
    """Save at this step boundary and exit with the signal's status: resume with the same command."""
    log.check_finite(state, out)
    if state["checkpoint"] != state["step"]:
        log.settle_bad_images(state)
        save(out, cfg, objective, run, state, batches.per_epoch)
    name = signal.Signals(signum).name
    say(f"{name}: checkpoint of step {state['step']} saved in {out}; resume with the same command")
    raise SystemExit(128 + signum)


def cli(argv: list[str]) -> str | None:
    """main(), with every error a user can fix (a bad config, checkpoint or dataset, a
    non-finite loss) turned into the one message the command prints instead of a traceback."""
    try:
        main(argv)
    except (ConfigError, fovea.CheckpointError, data.DataError) as e:
        return f"train.py: {e}"
    except FloatingPointError as e:
        return f"train.py: stopped: {e}"
    return None


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
