"""One training entry point for every objective: config, DDP, the loop, checkpoints, logs.

    python train.py --cfg canvit_tiny.yaml                       # one process (CPU or GPU)
    torchrun --nproc_per_node 8 train.py --cfg canvit.yaml       # one node, 8 GPUs
    python train.py --cfg foveal_tiny.yaml --optim.lr=1e-3 --max_steps=200   # overrides
    torchrun --nproc_per_node 8 train.py --cfg canvit.yaml --export_features DIR  # teacher shards

Objectives (each comes from its module; train.py only runs them)
  distill     passive-to-active dense latent distillation of CanViT [003, Sec. 5]  distill.py
  foveal_sup  the foveal ViT's stage-1 training with random gazes [002, A.3.4]    fovea.py
  vit_sup     the passive patch-16 ViT baseline of [000] Fig. 1 (canvit.ViTClassifier)  below

An objective is an nn.Module with
  .model                      the network being trained (saved as ckpt["model"], strictly loaded)
  .train_step(batch, step, autocast, rank, world) -> dict of floats with "loss" and "glimpses";
                              it runs the forward passes under `autocast()` and calls backward
                              itself (truncated BPTT needs several backward passes a step)
  .setup(dataset) (optional)  one-time work before step 0 (e.g. fitting target statistics)
  .extra_state() / .load_extra_state(d) (optional)  more to keep in the checkpoint

Config: the dataclasses below and those of the modules are the single home of defaults; a YAML
file overrides them and `--a.b=value` overrides that. Unknown keys and wrong types stop the run
before any work. The resolved config is saved beside the checkpoint and inside it.
Checkpoint: <out_dir>/ckpt.pt, a plain dict written by rank 0 to a temporary file and then
os.replace'd; a run started again with the same command resumes from it exactly.
Log: a rank-0 line every `log_every` steps and the same fields in <out_dir>/log.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

import canvit
import data
import distill
import fovea

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclass
class OptimConfig:
    lr: float = 4e-4               # [003] Table 2: peak learning rate
    init_lr: float = 1e-7          # [003] Table 2: initial learning rate
    warmup_steps: int = 100_000    # [003] Table 2
    schedule: str = "constant"     # [003] Table 2: warmup -> constant | "cosine" ([002] A.3.4)
    min_lr: float = 0.0            # end of the cosine decay
    weight_decay: float = 1e-4     # [003] Table 2
    betas: tuple[float, float] = (0.9, 0.999)  # [003] Table 2
    grad_clip: float = 1.0         # [003] Table 2: max norm (0 = off)


@dataclass
class PassiveViTConfig:
    """The bottom-up patch-16 ViT baseline of [000] Fig. 1 (canvit.ViTClassifier), supervised."""
    backbone: canvit.BackboneConfig = field(default_factory=lambda: canvit.backbone_config("vits16"))
    n_storage_tokens: int = 4
    num_classes: int = 1000
    mixup_alpha: float = 0.8       # as the foveal model it is compared with
    label_smoothing: float = 0.0


class PassiveViTSupervised(torch.nn.Module):
    """Cross-entropy of the passive ViT on whole images, with MixUp (the objective `vit_sup`)."""
    augment = True                 # as the foveal model: random resized crop + flip

    def __init__(self, cfg: PassiveViTConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.model = canvit.ViTClassifier(cfg.backbone, cfg.num_classes, cfg.n_storage_tokens)

    def train_step(self, batch: dict, step: int, autocast, rank: int = 0, world: int = 1) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)   # the (seed, step) stream
        images, target = fovea.supervised_batch(gen, batch["image"], batch["label"],
                                                self.cfg.num_classes, self.cfg.mixup_alpha)
        with autocast():
            logits = self.model(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), target,
                                                     label_smoothing=self.cfg.label_smoothing)
        loss.backward()
        acc = (logits.argmax(-1) == target.argmax(-1)).float().mean()
        return {"loss": loss.detach(), "acc": acc.detach(), "glimpses": images.shape[0]}


@dataclass
class TrainConfig:
    objective: str = "distill"     # distill | foveal_sup | vit_sup
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
    vit: PassiveViTConfig = field(default_factory=PassiveViTConfig)


OBJECTIVES = ("distill", "foveal_sup", "vit_sup")

# Fields that may change when a run resumes; any other difference means another experiment.
RESUMABLE_CHANGES = {"out_dir", "max_steps", "log_every", "ckpt_every", "compile", "num_workers", "threads"}


class ConfigError(ValueError):
    pass


def _coerce(value, typ, key: str):
    """Check (and, for strings from the command line or YAML's '1e-4', convert) one value."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        elem = args if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
        if len(elem) != len(value):
            raise ConfigError(f"{key}: expected {len(elem)} values, got {value!r}")
        return origin(_coerce(v, t, key) for v, t in zip(value, elem))
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if typ is int else float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and value != int(value)):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        return typ(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {typ}")


def apply_overrides(cfg, overrides: dict, prefix: str = "") -> None:
    """Recursively override dataclass `cfg` in place; unknown keys and wrong types raise."""
    hints = typing.get_type_hints(type(cfg))
    valid = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key '{name}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(sorted(valid))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, str):                       # --section='{a: 1, b: 2}'
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ConfigError(f"'{name}' is a section: expected a mapping, got {value!r}")
            apply_overrides(current, value, name + ".")
        else:
            setattr(cfg, key, _coerce(value, hints[key], name))


def find_config(path: str) -> Path:
    """A config path as given, or by name in the project root or its configs/ folder."""
    for p in (Path(path), HERE / path, HERE / "configs" / path, HERE / "configs" / Path(path).name):
        if p.is_file():
            return p
    raise ConfigError(f"config file {path!r} not found (looked in ., {HERE} and {HERE / 'configs'})")


def parse_config(argv: list[str]) -> tuple[TrainConfig, str | None]:
    """-> (config, export folder or None)."""
    ap = argparse.ArgumentParser(description="Train any objective of the project.",
                                 epilog="Any config field can be overridden as --section.key=value.")
    ap.add_argument("--cfg", help="YAML config (a path, or a name in the project root or configs/)")
    ap.add_argument("--export_features", metavar="DIR",
                    help="write the distill teacher's features of the dataset into DIR, then exit")
    args, rest = ap.parse_known_args(argv)
    cfg = TrainConfig()
    if args.cfg:
        loaded = yaml.safe_load(find_config(args.cfg).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.cfg}: the top level must be a mapping")
        apply_overrides(cfg, loaded)
    i = 0
    while i < len(rest):                                     # --a.b=value or --a.b value
        arg = rest[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(rest):
            key, value, i = arg[2:], rest[i + 1], i + 1
        else:
            raise ConfigError(f"{arg} needs a value")
        node: dict = {}
        *parents, leaf = key.split(".")
        cursor = node
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = value
        apply_overrides(cfg, node)
        i += 1
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if cfg.dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"dtype must be bfloat16 or float32, got {cfg.dtype!r}")
    if cfg.data.dataset in ("imagefolder", "ade20k") and not (cfg.data.root and Path(cfg.data.root).is_dir()):
        raise ConfigError(f"data.root {cfg.data.root!r} is not a folder: set --data.root=/path/to/"
                          f"{'ADEChallengeData2016' if cfg.data.dataset == 'ade20k' else 'images'}")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ConfigError(f"optim.schedule must be constant or cosine, got {cfg.optim.schedule!r}")
    return cfg, args.export_features


# ----------------------------------------------------------------------------------------------
# Schedules (pure functions of the step)
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, o: OptimConfig, max_steps: int) -> float:
    """Linear warmup from init_lr to lr, then constant [003, Table 2] or cosine to min_lr [002, A.3.4]."""
    if step < o.warmup_steps:
        return o.init_lr + (o.lr - o.init_lr) * step / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Distributed data order that can resume mid-epoch
# ----------------------------------------------------------------------------------------------

class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's share of every global batch, resumable mid-epoch.

    Each epoch is a permutation of the dataset seeded by (seed, epoch), cut into global batches
    of `global_batch` samples (an incomplete last one is dropped); process r of `world` takes the
    r-th contiguous share of global_batch / world samples of each. The global batches do not
    depend on the number of processes, and an objective finds its rows of the global batch at
    rank * b ... (rank + 1) * b. `skip` starts that many samples into this process's epoch.
    """

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


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

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
    """Write to a temporary file in the same folder, then rename: a crash mid-write leaves the
    previous checkpoint intact."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def check_resumable(saved: dict, now: dict, prefix: str = "") -> None:
    """Raise if the checkpoint's config differs from this run's beyond RESUMABLE_CHANGES."""
    for key in sorted(set(saved) | set(now)):
        name = prefix + key
        a, b = saved.get(key, "<missing>"), now.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            check_resumable(a, b, name + ".")
        elif name not in RESUMABLE_CHANGES and a != b:
            raise ConfigError(f"the checkpoint in this out_dir was made with {name}={a!r}, this run "
                              f"has {name}={b!r}; use another out_dir for a different experiment")


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))   # tuples -> lists, as YAML writes them


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

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


def build_objective(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.objective == "distill":
        return distill.Distillation(cfg.distill, seed=cfg.seed)
    if cfg.objective == "foveal_sup":
        return fovea.FovealSupervised(cfg.foveal, seed=cfg.seed)
    if cfg.objective == "vit_sup":
        return PassiveViTSupervised(cfg.vit, seed=cfg.seed)
    raise ConfigError(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only. NOTE(paper): [003] gives one value (1e-4); sparing norms,
    biases, LayerScale and learned tokens follows the usual ViT practice (DINOv2, timm)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and p.shape[0] > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks, one flat buffer per dtype.

    NOTE: DistributedDataParallel expects one backward per forward; truncated BPTT runs a random
    number of chunks, each with its backward, so the average is taken once, after the last one.
    """
    for p in params:                                         # same buffers on every rank
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch._utils._flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat /= world
        for g, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
            g.copy_(synced)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # peak RSS (Linux: KiB)


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
            "data": config_dict(cfg.data)})
        print(f"index written: {Path(folder) / 'index.json'}")


def main(argv: list[str]) -> None:
    cfg, export_dir = parse_config(argv)                     # fails before any work
    rank, world, device = setup_distributed()
    master = rank == 0
    say = (lambda *a, **k: print(*a, **k, flush=True)) if master else (lambda *a, **k: None)
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if device.type == "cpu":
        # More compute threads than free cores makes every parallel op wait for a descheduled
        # thread (seen here: 7 s/step instead of 0.2 s with 2 workers on 2 cores).
        cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(cfg.threads or max(1, cores - cfg.num_workers))
    if export_dir:
        export(cfg, export_dir, rank, world, device)
        if world > 1:
            dist.destroy_process_group()
        return
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("ckpt.pt.tmp*"):               # a write cut short by a kill
            stale.unlink()

    # Model: the same initialisation on every rank (seeded alike); other randomness per rank.
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg).to(device)
    model = objective.model                                  # the raw module: what is saved
    dataset = data.build_dataset(cfg.data, "train", augment=objective.augment, seed=cfg.seed)
    if cfg.objective == "distill" and cfg.distill.teacher.features:   # stream precomputed shards
        dataset = distill.TeacherFeatures(cfg.distill.teacher.features, dataset)
        sampler = distill.ShardSampler(dataset.counts, dataset.shard_size, rank, world, cfg.seed)
    else:
        sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed)
    local_batch = cfg.batch_size // world
    loader_gen = torch.Generator()
    batches_per_epoch = sampler.num_samples // local_batch
    if batches_per_epoch == 0:
        raise ConfigError(f"the dataset has {len(dataset)} samples, fewer than one batch of {cfg.batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.init_lr,
                            betas=cfg.optim.betas, fused=device.type == "cuda")

    step = 0
    if ckpt_path.exists():                                   # automatic resume
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        check_resumable(ckpt["config"], config_dict(cfg))
        if len(ckpt["rng"]) != world:     # the data order follows the global batch; RNG streams do not
            say(f"warning: {ckpt_path} was written by {len(ckpt['rng'])} processes, this run has {world}: "
                "it continues on the same data, but per-process random streams restart differently")
        model.load_state_dict(ckpt["model"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        if hasattr(objective, "load_extra_state"):
            objective.load_extra_state(ckpt["extra"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
        say(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    else:
        if master and hasattr(objective, "setup"):
            objective.setup(dataset)                         # e.g. target statistics; shared below
        torch.manual_seed(cfg.seed + rank)                   # per-rank stream from here on
    if master:                                               # after the resume check: never clobber
        (out / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    if world > 1:              # identical start on every rank: rank 0's weights and fitted statistics
        shared = [{k: v.cpu() for k, v in model.state_dict().items()} if master else None]
        dist.broadcast_object_list(shared, src=0)
        if not master:
            model.load_state_dict(shared[0], strict=True)
        del shared

    if cfg.compile:
        model.compile()                                      # in place: state_dict keys unchanged
    amp_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    say(f"objective {cfg.objective}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, "
        f"{world} process(es) on {device}, global batch {cfg.batch_size}, {len(dataset)} samples")

    def loader_from(step: int):
        epoch, offset = data_position(step, batches_per_epoch)
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):                    # the epoch's augmentations
            dataset.set_epoch(epoch)
        sampler.skip = offset * local_batch
        loader_gen.manual_seed(cfg.seed * 7919 + epoch)
        return iter(torch.utils.data.DataLoader(
            dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg.num_workers,
            collate_fn=data.collate, pin_memory=device.type == "cuda", drop_last=True,
            generator=loader_gen, persistent_workers=False))

    log_file = open(out / "log.jsonl", "a") if master else None
    batches = loader_from(step)
    t_last, ema_ms, n_bad, glimpses = time.perf_counter(), None, 0, 0
    sums: dict[str, torch.Tensor] = {}                       # metrics summed over the log window
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def check_finite() -> None:                              # one host sync, at log / save time
        if nonfinite.item():
            raise FloatingPointError(f"a non-finite loss occurred before step {step}; the last good "
                                     f"checkpoint in {out} is kept as it was")

    while step < cfg.max_steps:
        try:
            batch = next(batches)
        except StopIteration:                                # epoch boundary
            batches = loader_from(step)
            continue
        n_bad += batch.pop("n_bad", 0)
        for reason in batch.pop("bad", []):
            say(f"skipped a bad image: {reason}")
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        lr = learning_rate(step, cfg.optim, cfg.max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        if "image" in batch:                                 # else every image was bad: zero gradient
            metrics = objective.train_step(batch, step, autocast, rank, world)
            glimpses += metrics.pop("glimpses") * world
            nonfinite |= ~torch.isfinite(metrics["loss"])
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        if world > 1:
            all_reduce_grads(params, world)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                     if cfg.optim.grad_clip > 0 else torch.zeros(()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            check_finite()
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            now = time.perf_counter()
            ms = (now - t_last) * 1e3 / n
            ema_ms = ms if ema_ms is None else 0.9 * ema_ms + 0.1 * ms
            record = {"step": step, **{k: round(float(v) / n, 6) for k, v in sums.items()},
                      "lr": lr, "grad_norm": round(float(grad_norm), 4), "ms_per_step": round(ms, 1),
                      "glimpses_per_s": round(glimpses / (now - t_last), 1),
                      "mem_mb": round(memory_mb(device)), "bad_images": n_bad}
            eta = (cfg.max_steps - step) * ema_ms / 1e3
            say(f"step {step:>7}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                f"{ms:.0f} ms/step | {record['glimpses_per_s']:.0f} glimpses/s | "
                f"{record['mem_mb']} MB | ETA {eta / 3600:.2f} h" + (f" | {n_bad} bad images" if n_bad else ""))
            if master:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            t_last, glimpses, sums = time.perf_counter(), 0, {}

        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            check_finite()
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if master:
                save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "rng": rngs, "data": dict(zip(("epoch", "batch"), data_position(step, batches_per_epoch))),
                    "config": config_dict(cfg),
                    "extra": objective.extra_state() if hasattr(objective, "extra_state") else {}})
    if master:
        log_file.close()
        say(f"done: {step} steps; checkpoint {ckpt_path}, log {out / 'log.jsonl'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
