"""Evaluation of a frozen model: the command line, its config, and the pieces both protocols share.

    python eval.py --ckpt runs/canvit_tiny/ckpt.pt --out_dir runs/canvit_tiny/eval
    python eval.py --ckpt runs/foveal_tiny/ckpt.pt --baseline runs/vit_tiny/ckpt.pt --out_dir DIR
    python eval.py --cfg my_eval.yaml --ckpt ... --n_val=512 --policies=c2f,riid   # overrides

The checkpoint's objective chooses the protocol:
  distill (CanViT; or an official Hugging Face folder)  eval_canvit.py  [003] Sec. 6, App. A, E, F
  foveal_sup, probe, dino (the foveal iterative ViT)     eval_foveal.py  [002] Sec. 6; [000] Sec. 5
  grpo (a learned gaze policy)                           its encoder's, with the policy beside the others
Both write results.json, tables.md and PNG pictures into --out_dir, and check that the frozen
models are bit-identical after evaluation.

Config: EvalConfig below, with train.py's config system (config.py): an optional YAML file
(--cfg), then `--key=value` or `--key value` (lists as `a,b,c`); unknown keys and bad values stop
before any work. Shared here: reading checkpoints, held-out batches, frozen-weight checks, top-k
hits, probe training on cached features (F.2.1), progress lines.

Tests: `python -m pytest tests/test_eval.py tests/test_eval_canvit.py tests/test_eval_foveal.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

import config
import data
import fovea


class EvalError(ValueError):
    """A bad input (missing checkpoint, wrong objective, bad option): no traceback, a message."""


def _opt(default, help: str):
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    ckpt: str = _opt("", "train.py checkpoint (ckpt.pt) or official Hugging Face folder (required)")
    out_dir: str = _opt("", "where results.json, tables.md and the PNGs go (required)")
    T: int = _opt(0, "glimpses per rollout (0: 21 for CanViT, [003] F.2; the training episode "
                     "for a foveal model)")
    data: str = _opt("", "synthetic | ade20k | imagefolder ('' = the checkpoint's dataset)")
    root: str = _opt("", "ADEChallengeData2016 folder, or an ImageFolder root with train/ val/")
    scene_size: int = _opt(0, "scene side S in px (0 = the checkpoint's; 512 for an HF folder)")
    res_factors: tuple[int, ...] = _opt((), "evaluate at k S (and k G) for each k (none: 1,2 for "
                                        "CanViT, [003] 512/32 and 1024/64; 1,2,4,8 for a foveal "
                                        "model, [000] Fig. 1)")
    n_val: int = _opt(256, "held-out scenes every policy is evaluated on")
    batch_size: int = _opt(64, "scenes per frozen-model batch")
    pictures: int = _opt(3, "scenes shown in each picture (0 = none)")
    seed: int = _opt(0, "seeds policy randomness and probes (the scenes do not depend on it)")
    device: str = _opt("", "cpu | cuda ('' = cuda when available)")
    threads: int = _opt(0, "CPU threads (0: every core)")
    # CanViT [003]
    policies: tuple[str, ...] = _opt(("c2f", "entropy", "fiid", "riid", "f2c", "full"),
                                     "CanViT: viewing policies, from c2f, entropy, fiid, riid, f2c, full")
    canvas_grid: int = _opt(0, "CanViT: canvas grid G (0 = S / patch size, the teacher's grid)")
    glimpse_px: int = _opt(0, "CanViT: glimpse side in px (0 = the checkpoint's; 128 for an HF folder)")
    teacher_weights: str = _opt("", "CanViT: DINOv3 .pth for an HF folder (train.py checkpoints know it)")
    n_train: int = _opt(512, "probe-training scenes (CanViT; their features are cached) or k-NN "
                             "training scenes (a foveal dino / probe backbone)")
    probe_T: int = _opt(10, "CanViT: glimpses of the probe-training sequences ([003] F.2.1: 10)")
    probe_policy: str = _opt("riid", "CanViT: policy of the probe-training sequences (official: R-IID)")
    probe_steps: int = _opt(500, "CanViT: probe optimizer steps ([003] F.2.1: 40,000; CPU default)")
    probe_batch: int = _opt(16, "CanViT: scenes per probe step ([003] F.2.1: 16), all T_probe steps each")
    probe_lr: float = _opt(1e-2, "CanViT: peak AdamW lr ([003] F.2.1: 3e-4 for 40k steps; CPU default)")
    probe_wd: float = _opt(1e-3, "CanViT: AdamW weight decay ([003] F.2.1)")
    # The foveal iterative ViT [002, 000]
    baseline: str = _opt("", "foveal: a vit_sup checkpoint (the passive ViT) to compare with")
    repeats: int = _opt(3, "foveal: random gaze sequences averaged per scene")
    vit_grid: int = _opt(0, "foveal: ViT-mode grid side (0: scene px / patch px)")


def usage() -> str:
    rows = [f"  --{f.name:16} {f.metadata['help']}" for f in dataclasses.fields(EvalConfig)]
    return "options (--key=value or --key value):\n" + "\n".join(rows)


def parse_args(argv: list[str]) -> EvalConfig:
    """EvalConfig from an optional --cfg YAML file and overrides; checked before any work."""
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0], epilog=usage(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", help="YAML file of EvalConfig keys (optional)")
    args, rest = ap.parse_known_args(argv)
    cfg = EvalConfig()
    try:
        if args.cfg:
            config.load_file(cfg, args.cfg)
        config.apply_cli(cfg, rest)
    except config.ConfigError as e:
        raise EvalError(str(e)) from None
    for key in ("ckpt", "out_dir"):
        if not getattr(cfg, key):
            raise EvalError(f"--{key} is required\n{usage()}")
    small = [k for k in ("n_val", "batch_size", "n_train", "probe_T", "probe_steps", "probe_batch",
                         "repeats") if getattr(cfg, k) < 1]
    if small or min(cfg.res_factors, default=1) < 1 or cfg.T < 0:
        raise EvalError(f"{', '.join(small) or 'res_factors / T'}: must be >= 1 (T >= 0)")
    return cfg


# ----------------------------------------------------------------------------------------------
# Checkpoints, held-out data, frozen models
# ----------------------------------------------------------------------------------------------

def read_checkpoint(path: str) -> tuple[str, dict | Path]:
    """-> (objective, checkpoint dict); an official Hugging Face folder is ("distill", folder)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EvalError(f"{p} is a folder without config.json: not a Hugging Face checkpoint")
        return "distill", p
    try:
        ckpt = fovea.read_checkpoint(p)
    except fovea.CheckpointError as e:
        raise EvalError(f"{e} (or an official Hugging Face folder: config.json + model.safetensors)") from None
    return ckpt["config"].get("objective"), ckpt


def device_of(cfg: EvalConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def batches(ds, n: int, batch_size: int):
    """The first n scenes of a fixed shuffle (seed 0: the same scenes whatever --seed), batched."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    for i in range(0, n, batch_size):
        batch = data.collate([ds[j] for j in order[i:i + batch_size]])
        for reason in batch.pop("bad"):
            print(f"skipped a bad image: {reason}", file=sys.stderr)
        if "image" in batch:
            yield batch


def snapshot(*modules) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()}
            for m in modules if m is not None]


def check_unchanged(modules, snaps: list[dict]) -> None:
    """Evaluation must leave the frozen model bit-identical (no new buffers either)."""
    for m, before in zip([m for m in modules if m is not None], snaps):
        after = m.state_dict()
        changed = sorted(set(before) ^ set(after)) + [k for k in before if k in after
                                                      and not torch.equal(before[k], after[k])]
        if changed:
            raise RuntimeError(f"evaluation changed the frozen {type(m).__name__}: {changed[:10]}")


class Progress:
    """A line about every `every` seconds (and at the end): what, how far, elapsed, ETA."""

    def __init__(self, what: str, total: int, every: float = 20.0):
        self.what, self.total, self.every = what, total, every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        clock = lambda s: time.strftime("%H:%M:%S", time.gmtime(s))
        eta = (now - self.t0) / max(done, 1) * (self.total - done)
        print(f"  {self.what}: {done}/{self.total}, {clock(now - self.t0)} elapsed, ETA {clock(eta)}",
              flush=True)


# ----------------------------------------------------------------------------------------------
# Metrics and probes trained on cached frozen features ([003] F.2.1)
# ----------------------------------------------------------------------------------------------

def hits(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """(B,) 1.0 where the label is among the k highest logits (top-k accuracy per image)."""
    return (logits.topk(min(k, logits.shape[-1]), -1).indices == labels[:, None]).any(-1).float()


def warmup_cosine(step: int, steps: int, peak: float) -> float:
    """F.2.1: linear warmup over the first 1,500 / 40,000 of the steps, then cosine to zero."""
    warmup = max(1, round(steps * 1500 / 40000))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_probe(probe: nn.Module, loss_fn, inputs: tuple[Tensor, ...], cfg: EvalConfig,
                seed: int) -> list[float]:
    """F.2.1: AdamW with a warmup-cosine schedule; each step draws probe_batch scenes (with
    replacement) from the cached inputs (N, ...). Returns the loss of every step."""
    device = next(probe.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.probe_lr, weight_decay=cfg.probe_wd)
    probe.train()
    losses = []
    for step in range(cfg.probe_steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, cfg.probe_steps, cfg.probe_lr)
        idx = torch.randint(len(inputs[0]), (cfg.probe_batch,), generator=gen)
        loss = loss_fn(probe, *(x[idx].to(device) for x in inputs))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"probe loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------
# Several runs in one table: mean (min-max)
# ----------------------------------------------------------------------------------------------

class Stat(float):
    """A number measured in several runs: its mean, printed with the range, "mean (min-max)"."""

    def __new__(cls, values):
        values = [float(v) for v in values]
        stat = super().__new__(cls, sum(values) / len(values))
        stat.lo, stat.hi, stat.n = min(values), max(values), len(values)
        return stat

    def __mul__(self, k):
        return _scaled(self, lambda v: v * k)

    __rmul__ = __mul__

    def __truediv__(self, k):
        return _scaled(self, lambda v: v / k)

    def __format__(self, spec: str) -> str:
        return f"{float(self):{spec}} ({self.lo:{spec}}-{self.hi:{spec}})"


def _scaled(s: Stat, f) -> Stat:
    out = float.__new__(Stat, f(float(s)))
    out.lo, out.hi, out.n = f(s.lo), f(s.hi), s.n
    return out


def merge(runs: list):
    """The results of several runs (identical structure) -> one, each number a Stat."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: merge([r[k] for r in runs]) for k in first if all(k in r for r in runs)}
    if isinstance(first, list):
        return [merge([r[i] for r in runs]) for i in range(len(first))] if all(
            len(r) == len(first) for r in runs) else first
    if isinstance(first, (int, float)) and not isinstance(first, bool) and len(set(runs)) > 1:
        return Stat(runs)
    return first                                # the same in every run (a setting, a count)


def summarize(dirs: list[str]) -> str:
    """`python eval.py --summarize DIR ...`: the tables of several evaluations (e.g. seeds) as
    mean (min-max) over them, from their results.json."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    merged = merge(runs)
    module = "eval_canvit" if runs[0].get("objective") == "distill" else "eval_foveal"
    head = f"mean (min-max) over {len(runs)} evaluations: {', '.join(dirs)}\n\n"
    return head + importlib.import_module(module).tables(merged)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def write(out_dir: str, results: dict, tables: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "tables.md").write_text(tables)
    print(tables + f"wrote {out / 'results.json'}, {out / 'tables.md'} and the pictures in {out}")


def main(argv: list[str]) -> dict:
    if argv[:1] == ["--summarize"]:
        print(summarize(argv[1:]), end="")
        return {}
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    objective, source = read_checkpoint(cfg.ckpt)
    # The protocols import this module for its shared pieces, so they are imported here.
    if objective == "grpo":                                     # a policy: its encoder's protocol
        encoder = fovea.read_checkpoint(source["config"]["grpo"]["encoder"])["config"]["objective"]
        objective = "distill" if encoder == "distill" else "foveal_sup"
    if objective == "distill":                                  # CanViT [003]
        protocol = importlib.import_module("eval_canvit")
    elif objective in ("foveal_sup", "probe", "dino"):         # the foveal iterative ViT [002, 000]
        protocol = importlib.import_module("eval_foveal")
    else:
        raise EvalError(f"{cfg.ckpt} was trained with objective {objective!r}; eval.py evaluates "
                        "'distill' (CanViT), 'foveal_sup', 'probe' and 'dino' (foveal ViT) checkpoints")
    results, tables = protocol.evaluate(source, cfg)
    write(cfg.out_dir, results, tables)
    return results


if __name__ == "__main__":
    # Run through the module `eval` rather than `__main__`, so that eval_canvit and eval_foveal,
    # which import `eval`, share this run's classes (EvalError above all).
    cli = importlib.import_module("eval")
    try:
        cli.main(sys.argv[1:])
    except (cli.EvalError, fovea.CheckpointError) as e:
        sys.exit(f"eval.py: {e}")
