"""Evaluation of a frozen model: the command, its config, and the foveal ViT's protocol.

    python eval.py --ckpt runs/canvit_tiny/ckpt.pt --out_dir runs/canvit_tiny/eval
    python eval.py --ckpt runs/foveal_tiny/ckpt.pt --baseline runs/vit_tiny/ckpt.pt --out_dir DIR
    python eval.py --cfg my_eval.yaml --ckpt ... --n_val=512 --policies=c2f,riid   # overrides
    python eval.py --summarize DIR DIR DIR       # several evaluations (seeds): mean (min-max)
    python eval.py --compare A1,A2,A3 B1,B2,B3   # systems side by side: accuracy by glimpses, GFLOPs

Papers
  [002] Prisadnikov et al., "Vision encoders should be image size agnostic and task driven",
        arXiv 2508.16317: Sec. 6, Tables 1-2.
  [000] "Self-supervised pretraining for an iterative image size agnostic vision transformer",
        arXiv 2604.20392: Sec. 5 (ViT mode, k-NN, probes), Fig. 1 (resolution robustness).

The checkpoint's objective chooses the protocol:
  distill (CanViT; or an official Hugging Face folder)  eval_canvit.py  [003] Sec. 6, App. A, E, F
  foveal_sup, probe, dino (the foveal iterative ViT)     this file       [002] Sec. 6; [000] Sec. 5
  grpo (a learned gaze policy)                           its encoder's, with the policy beside the others
  vit_sup (the passive ViT, alone)                       this file       its top-1 on its own scenes
Both write results.json, tables.md and PNGs into --out_dir, the frozen models checked unchanged.

The foveal protocol (evaluate_foveal): top-1 / top-5 after every step with random gazes ([002]
Table 2's layout) and a fixed gaze sequence; "ViT mode" ([000] Sec. 5.3); [000] Fig. 1's sweep
over scenes 2x, 4x, 8x larger than in training (the same gazes in scene units), beside a passive
ViT baseline (`--baseline`, a `vit_sup` checkpoint) whose patches shrink as the scene grows;
k-NN on a dino or probe backbone; a grpo checkpoint's policy, rolled out as trained. Every
policy also gets [002]'s "compute follows the task" as an anytime rule (--stop_at): an episode
ends at the first glimpse whose top class probability reaches a threshold; the accuracy against
the mean glimpses an image spent, a table and anytime.png.

Config: EvalConfig below, through config.py: an optional YAML file (--cfg), then `--key=value`
or `--key value` (lists as `a,b,c`); unknown keys and bad values stop before any work.

Shapes
  B scenes, T steps, K classes, S scene side (px).

Paper -> code
  [002] Table 2  per-step top-1 / top-5, random gazes          evaluate_foveal, per_step
  [002] Sec. 6.1 shuffled ViT-patch groups, as trained          fovea.episode_patches
  [000] Sec. 5.3 ViT mode; Fig. 1 resolution robustness        evaluate_foveal
  [000] Sec. 5   k-NN on frozen first state tokens             knn, knn_top1
                 (and after gazes on the target: a diagnostic)  target_gazes
                 (and what the features owe to the object)      object_share, Swapped
  [000] Table 1, 3; [002] A.3.3  learned policy, deterministic  policy_episode
  [002] Sec. 1-3 compute follows the task: stop when sure     eval_canvit.anytime_curve
                 markdown tables, gaze pictures                 foveal_tables, save_gaze_picture

Tests: `python -m pytest tests/test_eval.py tests/test_eval_canvit.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

import canvit
import config
import data
import eval_canvit
import fovea
import grpo
from eval_canvit import (EvalError, Progress, anytime_curve, anytime_table, batches, cell, check_unchanged,
                         device_of, gflops, merge, save_curves, snapshot)


def _opt(default, help: str):
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    ckpt: str = _opt("", "train.py checkpoint (ckpt.pt) or official Hugging Face folder (required)")
    out_dir: str = _opt("", "where results.json, tables.md and the PNGs go (required)")
    T: int = _opt(0, "glimpses per rollout (0: CanViT's 21, [003] F.2; a foveal model's episode)")
    data: str = _opt("", "synthetic | fashion_mnist | ade20k | imagefolder ('' = the checkpoint's)")
    root: str = _opt("", "the data's folder where it moved ('' = the checkpoint's): Fashion-MNIST's "
                         "files, ADEChallengeData2016, or an ImageFolder root with train/ val/")
    scene_size: int = _opt(0, "scene side S in px (0 = the checkpoint's; 512 for an HF folder)")
    res_factors: tuple[int, ...] = _opt((), "evaluate at k S (and k G) for each k (none: CanViT 1,2, "
                                        "[003] 512/32, 1024/64; foveal 1,2,4,8, [000] Fig. 1)")
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
    knn: bool = _opt(False, "foveal: k-NN and object share of the first state token for any model "
                     "(always for a dino backbone and its probe)")
    baseline: str = _opt("", "foveal: a vit_sup checkpoint (the passive ViT) to compare with")
    repeats: int = _opt(3, "foveal: random gaze sequences averaged per scene")
    vit_grid: int = _opt(0, "foveal: ViT-mode grid side (0: scene px / patch px)")
    inhibit: float = _opt(0.1, "foveal policy: also the deterministic rule that skips actions within this "
                               "distance (scene units, side 2) of an earlier gaze (grpo.inhibited_mode); 0: off")
    stop_at: tuple[float, ...] = _opt((0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
                                      "stop when sure: an image's episode ends after the first glimpse "
                                      "whose top class probability reaches a threshold; the accuracy "
                                      "against mean glimpses at each (none: no stopping curves)")


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


# ---- Checkpoints and metrics -----------------------------------------------------------------
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


def hits(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """(B,) 1.0 where the label is among the k highest logits (top-k accuracy per image)."""
    return (logits.topk(min(k, logits.shape[-1]), -1).indices == labels[:, None]).any(-1).float()


def top1_top5(logits: Tensor, labels: Tensor) -> Tensor:
    """(2,) how many of the batch's images are right at top-1 and at top-5 (on the CPU)."""
    return torch.stack([hits(logits, labels, 1).sum(), hits(logits, labels, 5).sum()]).cpu()


# ---- Foveal ViT: step accuracy, ViT mode, k-NN, resolution ([002] Sec. 6; [000] Sec. 5) ------
def load_foveal(ckpt: dict) -> fovea.FovealViT:
    """A foveal_sup, probe or dino run's frozen FovealViT (uncompiled extraction: shapes vary)."""
    model = fovea.load_frozen(ckpt, "encoder", fovea.FovealViT)
    model.cfg.compile_extraction = False
    return model


def episode_config(ckpt: dict, model: fovea.FovealViT, T: int) -> fovea.FovealTrainConfig:
    """The episodes the model was trained on: foveal_sup's section, else random gazes."""
    saved = ckpt["config"].get("foveal") if ckpt["config"]["objective"] == "foveal_sup" else None
    if saved and saved["glimpse"] == "shuffled_vit":
        if (saved["vit_grid"] ** 2) % T:
            raise EvalError(f"--T {T}: the {saved['vit_grid']}^2 ViT patches do not split into {T} groups")
        return fovea.FovealTrainConfig(model=model.cfg, steps=T, glimpse="shuffled_vit", vit_grid=saved["vit_grid"])
    return fovea.FovealTrainConfig(model=model.cfg, steps=T)


def trained_steps(ckpt: dict) -> int:
    c = ckpt["config"]
    return {"foveal_sup": lambda: c["foveal"]["steps"], "probe": lambda: c["probe"]["steps"],
            "dino": lambda: c["dino"]["seq_steps"]}[c["objective"]]()


# ---- k-NN on frozen first-state-token features [000, Sec. 5; DINO's protocol] ----------------
@torch.inference_mode()
def first_tokens(model: fovea.FovealViT, ds, n: int, cfg: EvalConfig, episode: fovea.FovealTrainConfig,
                 mode: str, grid: int) -> tuple[Tensor, Tensor]:
    """L2-normalised first state tokens (n, D) and labels (n,): after ViT mode ("vit"), after an
    episode of random gazes ("random", drawn from --seed) or of gazes on the target ("target")."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    feats, labels = [], []
    for batch in batches(ds, n, cfg.batch_size):
        images = batch["image"].to(device)
        table, hw = fovea.integral_image(images), tuple(images.shape[-2:])
        if mode == "vit":
            state = model.vit_mode(table, grid)
        elif mode == "random":
            state = None
            for patches in fovea.episode_patches(model, episode, gen, len(images), hw, device):
                state = model(table, state, patches)
        else:
            state, (lo, hi) = None, model.cfg.grid_z
            gazes = target_gazes(batch["target"], gen, episode.steps)
            zs = lo + (hi - lo) * torch.rand(episode.steps, len(images), generator=gen)
            for t in range(episode.steps):
                state = model(table, state, model.glimpse(gazes[t].to(device), hw, zs[t].to(device)))
        feats.append(torch.nn.functional.normalize(state[:, 0].float(), dim=-1).cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def target_gazes(target: Tensor, gen: torch.Generator, T: int) -> Tensor:
    """(T, B, 2) gazes on each scene's target (B, 3: centre y, x, and radius or half-side): the
    centre plus a uniform offset of up to half the radius on each axis, inside a disc or a square."""
    offset = (torch.rand(T, len(target), 2, generator=gen) * 2 - 1) * 0.5 * target[None, :, 2:3]
    return (target[None, :, :2] + offset).clamp(-1, 1)


def knn_top1(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
             num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """DINO's weighted k-NN: each test feature votes with its k most similar training features
    (cosine), weighted by exp(similarity / temperature). -> top-1 accuracy."""
    sim = test @ train.T                                                          # (n_test, n_train)
    top, idx = sim.topk(min(k, train.shape[0]), dim=1)
    votes = torch.zeros(test.shape[0], num_classes).scatter_add_(1, train_labels[idx], (top / temperature).exp())
    return (votes.argmax(1) == test_labels).float().mean().item()


class Swapped(torch.utils.data.Dataset):
    """The scenes of `ds` with only their object changed (`ds.swapped`), in the same order."""
    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds.swapped(i)


def object_share(feats: Tensor, swapped: Tensor) -> float:
    """What unit features (n, D) owe to the object: the mean cosine distance between a scene's
    feature and that of the same scene with another object (`swapped`, same gazes), over the
    mean distance between two different scenes' features. 0: blind to the object; about 1: a
    new object moves the feature as far as a new scene does."""
    n = len(feats)
    swap = (1 - (feats * swapped).sum(1)).mean()
    between = (n * n - feats.sum(0).square().sum()) / (n * n - n)  # sum over i != j of 1 - f_i.f_j
    return (swap / between).item()


def knn(model: fovea.FovealViT, dcfg: data.DataConfig, cfg: EvalConfig, T: int, grid: int) -> dict:
    """k-NN top-1 (%) of the first state token, after ViT mode, after T random gazes and, where
    the scenes mark their target (built-in, Fashion-MNIST), after T gazes on it: does the
    sequence encode the object when it looks at it? Where the scenes can swap their object
    (built-in, Fashion-MNIST), also the object share of each mode's features (`object_share`):
    is what the features tell apart the object, or the rest of the scene?"""
    train_ds = data.build_dataset(dataclasses.replace(dcfg, length=max(cfg.n_train, 1)), "train")
    val_ds = data.build_dataset(dataclasses.replace(dcfg, val_length=cfg.n_val), "val")
    episode = fovea.FovealTrainConfig(model=model.cfg, steps=T)
    n_train, n_val = min(cfg.n_train, len(train_ds)), min(cfg.n_val, len(val_ds))
    out = {"k": 20, "n_train": n_train}
    for mode in ("vit", "random") + (("target",) if "target" in val_ds[0] else ()):
        a = first_tokens(model, train_ds, n_train, cfg, episode, mode, grid)
        b = first_tokens(model, val_ds, n_val, cfg, episode, mode, grid)
        out[mode] = round(100 * knn_top1(*a, *b, train_ds.num_classes), 2)
        if hasattr(val_ds, "swapped") and val_ds.num_classes > 1 and n_val > 1:   # same gazes: same seed
            swapped = first_tokens(model, Swapped(val_ds), n_val, cfg, episode, mode, grid)[0]
            out.setdefault("object_share", {})[mode] = round(object_share(b[0], swapped), 3)
    return out


def load_baseline(path: str) -> tuple[canvit.ViTClassifier, int]:
    """The frozen passive ViT of a `vit_sup` checkpoint, and the scene size it was trained at."""
    objective, ckpt = read_checkpoint(path)
    if objective != "vit_sup":
        raise EvalError(f"--baseline {path} was trained with objective {objective!r}, not vit_sup")
    model = fovea.load_frozen(ckpt, "classifier", canvit.ViTClassifier, what=f"--baseline {path}")
    return model, ckpt["config"]["data"]["image_size"]


@torch.inference_mode()
def per_step(model: fovea.FovealViT, images: Tensor, glimpses: list[fovea.Patches]) -> list[Tensor]:
    """Logits after every step of an episode, one Patches per step -> T x (B, K)."""
    table = fovea.integral_image(images)
    state, out = None, []                                   # None: from the prompt s_1
    for patches in glimpses:
        state = model(table, state, patches)
        out.append(model.classify(state))
    return out


@torch.inference_mode()
def policy_episode(model: fovea.FovealViT, policy: grpo.GazePolicy, images: Tensor, T: int,
                   first_gaze: str, std: float, gen: torch.Generator | None,
                   inhibit: float = 0.0) -> tuple[list, list]:
    """An episode whose gazes the learned policy chooses, through grpo's encoder wrapper and
    episode (as GRPO trained it) -> (Patches, logits) per step: the deterministic action (gen
    None: the mixture's mode at the given std [002, A.3.3]; inhibit > 0: the best action at
    least that far from every earlier gaze, grpo.inhibited_mode), or one sampled with that std."""
    B, hw = images.shape[0], tuple(images.shape[-2:])
    enc = grpo.FovealEncoder(model)
    source, state = enc.start(images, torch.arange(B, device=images.device))
    visited = []                                                   # the gazes so far, (B, 2) each
    if gen is not None:
        choose = lambda means, logits, t: grpo.sample_mixture(
            means, logits, std, torch.rand(B, generator=gen), torch.randn(B, 2, generator=gen))[0]
    elif inhibit > 0:
        choose = lambda means, logits, t: grpo.inhibited_mode(means, logits, std, visited, inhibit)
    else:
        choose = lambda means, logits, t: grpo.mixture_mode(means, logits, std)
    glimpses, logits = [], []
    for _, _, _, action, state in grpo.episode(policy, enc, source, state, B, T, choose, first_gaze):
        visited.append(grpo.to_gaze(action))
        glimpses.append(enc.glimpse(action, hw))
        logits.append(enc.classify(state))
    return glimpses, logits


def on_target(glimpses: list[fovea.Patches], target: Tensor, square: bool) -> Tensor:
    """(T,) how many gazes of each step fell on the target: the synthetic badge, a disc (centre,
    radius), or a Fashion-MNIST item, a square (centre, half-side)."""
    gaze = torch.stack([p.yxz[:, 0, :2] for p in glimpses]).cpu()                  # (T, B, 2)
    d = gaze - target[None, :, :2]
    d = d.abs().amax(-1) if square else d.norm(dim=-1)
    return (d <= target[None, :, 2]).float().sum(1)


def save_heatmap(gazes: list[Tensor], path: Path, tile: int = 128) -> str:
    """Where the policy looks over many scenes: each step's 2-D gaze histogram (white: often)."""
    bins = 32
    canvas = Image.new("RGB", (len(gazes) * (tile + 4), tile + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for t, g in enumerate(gazes):                                                  # (n, 2) (y, x)
        idx = ((g.clamp(-1, 1 - 1e-6) + 1) / 2 * bins).long()
        hist = torch.zeros(bins, bins).index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(g)), accumulate=True)
        img = (hist / hist.max().clamp_min(1) * 255).byte().numpy()
        canvas.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST).convert("RGB"), (t * (tile + 4), 16))
        draw.text((t * (tile + 4) + 4, 2), f"step {t + 1}", fill="black")
    canvas.save(path)
    return str(path)


class Trace:
    """For the pictures, per step of the first scenes' episode: the gaze (y, x), what it saw
    sharply (the foveal grid, else the finest multi-zoom patch), whether the prediction is right."""
    def __init__(self, model: fovea.FovealViT, glimpses: list[fovea.Patches], logits: list[Tensor],
                 labels: Tensor, n: int):
        g, M = model.cfg.grid, model.cfg.num_zoom
        self.gaze = torch.stack([p.yxz[:n, 0, :2] for p in glimpses]).cpu()          # (T, n, 2)
        sharp = [p.boxes[:n, M:] if g else p.boxes[:n, M - 1:M] for p in glimpses]   # (n, P, 4)
        self.box = torch.stack([torch.cat([b[..., :2].amin(1), b[..., 2:].amax(1)], -1)
                                for b in sharp]).cpu()                                # (T, n, 4) px
        self.right = torch.stack([l[:n].argmax(-1) == labels[:n] for l in logits]).cpu()  # (T, n)


def save_gaze_picture(images: Tensor, traces: dict[str, Trace], path: Path, tile: int = 192) -> str:
    """One row per scene, one column per trace: the numbered fixations joined by lines, the region
    each saw sharply, a number green when the prediction after that step is right, else red."""
    mean = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    scenes = ((images * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    S = images.shape[-1]
    head = 16
    canvas = Image.new("RGB", (len(traces) * tile, len(scenes) * tile + head), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, trace) in enumerate(traces.items()):
        draw.text((c * tile + 4, 2), name, fill="black")
        for i in range(len(scenes)):
            view = Image.fromarray(scenes[i]).resize((tile, tile), Image.BILINEAR)
            d = ImageDraw.Draw(view)
            pts = [((x + 1) / 2 * tile, (y + 1) / 2 * tile) for y, x in trace.gaze[:, i].tolist()]
            for t, (x, y) in enumerate(pts):
                y0, x0, y1, x1 = (trace.box[t, i] * tile / S).tolist()
                d.rectangle([x0, y0, x1, y1], outline=(255, 230, 0), width=1)
                if t:
                    d.line([pts[t - 1], (x, y)], fill=(255, 255, 255), width=1)
            for t, (x, y) in enumerate(pts):
                colour = (0, 200, 0) if trace.right[t, i] else (230, 0, 0)
                d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=colour, outline="white")
                d.text((x - 3, y - 6), str(t + 1), fill="white")
            canvas.paste(view, (c * tile, head + i * tile))
    canvas.save(path)
    return str(path)


def eval_data(dcfg: data.DataConfig, cfg: EvalConfig, **changes) -> data.DataConfig:
    """The run's data config, with --data / --root where the files moved, and `changes`."""
    return dataclasses.replace(dcfg, dataset=cfg.data or dcfg.dataset, root=cfg.root or dcfg.root, **changes)


def evaluate_foveal(ckpt: dict, cfg: EvalConfig) -> tuple[dict, str]:
    """The foveal protocol (see the module's docstring) -> (results, markdown tables); pictures
    of the gazes go into out_dir. A grpo checkpoint's policy: deterministic and sampled."""
    device = device_of(cfg)
    policy, grpo_cfg = None, None
    if ckpt["config"]["objective"] == "grpo":                   # the policy, and its encoder's run
        policy = fovea.load_frozen(ckpt, "policy", grpo.GazePolicy).to(device)
        grpo_cfg = ckpt["config"]["grpo"]
        ckpt = fovea.read_checkpoint(grpo_cfg["encoder"])
    model = load_foveal(ckpt).to(device)
    baseline, base_S = load_baseline(cfg.baseline) if cfg.baseline else (None, None)
    frozen = [m.to(device) for m in (model, baseline, policy) if m is not None]
    snaps = snapshot(*frozen)
    mcfg, dcfg = model.cfg, eval_data(data.DataConfig(**ckpt["config"]["data"]), cfg)
    objective = ckpt["config"]["objective"]
    S, T = dcfg.image_size, cfg.T or trained_steps(ckpt)
    if baseline is not None and base_S != S:
        raise EvalError(f"the baseline was trained on {base_S} px scenes, the foveal model on {S} px")
    grid = cfg.vit_grid or S // mcfg.patch_px                   # ViT mode: native patches at S
    results: dict = {"objective": objective, "step": ckpt.get("step"), "scene_px": S, "steps": T,
                     "vit_grid": grid, "repeats": cfg.repeats, "resolution": {}}
    if policy is not None:
        results["policy"] = {"first_gaze": grpo_cfg["first_gaze"], "std_sampled": grpo_cfg["policy"]["std_end"],
                             "inhibit": cfg.inhibit}
    names = ("random", "fixed")
    if policy is not None:
        names += ("policy",) + (("policy_inhibit",) if cfg.inhibit > 0 else ()) + ("policy_sampled",)
    if objective in ("probe", "dino") or cfg.knn:              # [000]: k-NN on the backbone
        results["knn"] = knn(model, dcfg, cfg, T, grid)
        print(f"k-NN top-1 (first state token): ViT mode {results['knn']['vit']}, after {T} random "
              f"gazes {results['knn']['random']}, on the target {results['knn'].get('target', '-')}; object "
              f"share {results['knn'].get('object_share', '-')}", flush=True)
    if model.head is None:                                      # a dino backbone: k-NN only
        check_unchanged(frozen, snaps)
        return results, foveal_tables(results)
    train_cfg = episode_config(ckpt, model, T)
    results["glimpse"] = train_cfg.glimpse
    table1 = fovea.integral_image(torch.zeros(1, 3, S, S, device=device))
    results["gflops"] = {"glimpse": gflops(lambda: model.classify(model.step(table1, None, torch.zeros(1, 2, device=device)))),
                         "vit_mode": gflops(lambda: model.classify(model.vit_mode(table1, grid)))}
    if baseline is not None:
        results["gflops"]["baseline"] = gflops(lambda: baseline(torch.zeros(1, 3, S, S, device=device)))
    for k in cfg.res_factors or (1, 2, 4, 8):
        ds = data.build_dataset(dataclasses.replace(dcfg, image_size=S * k, val_length=cfg.n_val), "val")
        square = isinstance(ds, data.FashionMNISTScenes)        # the target: an item, else a badge
        gen = torch.Generator().manual_seed(cfg.seed)           # the same glimpses at every resolution
        top = {name: torch.zeros(2, T) for name in names}       # hits: top-1, top-5
        on = {name: torch.zeros(T) for name in names}           # gazes on the target
        sure = {name: ([], []) for name in names}               # top probability, right, (B, T) each
        gazes = [[] for _ in range(T)]                          # the policy's, for the heat map
        vit_top, base_top, n = torch.zeros(2), torch.zeros(2), 0
        policy_gen = torch.Generator().manual_seed(cfg.seed + 1)
        progress = Progress(f"[{S * k} px] held-out scenes", min(cfg.n_val, len(ds)))
        for batch in batches(ds, min(cfg.n_val, len(ds)), cfg.batch_size):
            images, labels = batch["image"].to(device), batch["label"].to(device)
            B, first, n = images.shape[0], n == 0, n + images.shape[0]
            score = lambda logits: top1_top5(logits, labels)
            hw = tuple(images.shape[-2:])
            traces = {}

            def tally(name, glimpses, logits, weight=1.0):
                for t, lt in enumerate(logits):
                    top[name][:, t] += score(lt) * weight
                if "target" in batch:
                    on[name] += on_target(glimpses, batch["target"], square) * weight
                probs = torch.stack(logits, 1).float().softmax(-1).cpu()                 # (B, T, K)
                sure[name][0].append(probs.amax(-1))
                sure[name][1].append(probs.argmax(-1) == labels.cpu()[:, None])
            for r in range(cfg.repeats):
                glimpses = fovea.episode_patches(model, train_cfg, gen, B, hw, device)
                logits = per_step(model, images, glimpses)
                tally("random", glimpses, logits, 1 / cfg.repeats)
                if r == 0:
                    traces["random gazes"] = Trace(model, glimpses, logits, labels, cfg.pictures)
            episodes = {"fixed": (fovea.episode_patches(model, train_cfg, None, B, hw, device), None)}
            if policy is not None:
                rules = {"policy": (None, 0.0), "policy_inhibit": (None, cfg.inhibit),
                         "policy_sampled": (policy_gen, 0.0)}
                for name in names[2:]:
                    gen_p, inhibit = rules[name]
                    episodes[name] = policy_episode(model, policy, images, T, grpo_cfg["first_gaze"],
                                                    grpo_cfg["policy"]["std_end"], gen_p, inhibit)
            for name, (glimpses, logits) in episodes.items():
                logits = logits or per_step(model, images, glimpses)
                tally(name, glimpses, logits)
                label = {"fixed": "fixed gazes", "policy": "learned policy"}.get(name)
                if label:
                    traces[label] = Trace(model, glimpses, logits, labels, cfg.pictures)
                if name == "policy":
                    for t, p in enumerate(glimpses):
                        gazes[t].append(p.yxz[:, 0, :2].cpu())
            with torch.inference_mode():
                vit_top += score(model.classify(model.vit_mode(fovea.integral_image(images), grid)))
                if baseline is not None:
                    base_top += score(baseline(images))
            if first and k == 1 and cfg.pictures and train_cfg.glimpse == "foveal":
                Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
                results["pictures"] = [save_gaze_picture(images[:cfg.pictures].cpu(), traces,
                                                         Path(cfg.out_dir) / "gazes.png")]
            progress(n)
        pct = lambda x: [round(100 * v / n, 2) for v in x.tolist()]
        res = {"scene_px": S * k, "n": n, "vit_mode": dict(zip(("top1", "top5"), pct(vit_top))),
               **{name: {"top1": pct(h[0]), "top5": pct(h[1])} for name, h in top.items()}}
        if "target" in ds[0]:
            res["on_target"] = {name: pct(b) for name, b in on.items()}
        if cfg.stop_at:                                          # stop when sure, per policy
            res["anytime"] = {name: anytime_curve(torch.cat(c), torch.cat(r), cfg.stop_at)
                              for name, (c, r) in sure.items()}
            if k == 1:
                Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
                results.setdefault("pictures", []).append(save_curves(
                    {NAMES[name]: c for name, c in res["anytime"].items()}, Path(cfg.out_dir) / "anytime.png"))
        if policy is not None and k == 1 and cfg.pictures:
            results.setdefault("pictures", []).append(
                save_heatmap([torch.cat(g) for g in gazes], Path(cfg.out_dir) / "policy_gazes.png"))
        if baseline is not None:
            res["baseline"] = dict(zip(("top1", "top5"), pct(base_top)))
        results["resolution"][f"{k}x"] = res
        print(f"{S * k} px: top-1 by step (random gazes) {res['random']['top1']}, ViT mode "
              f"{res['vit_mode']['top1']}" + (f", baseline {res['baseline']['top1']}" if baseline else ""),
              flush=True)
    check_unchanged(frozen, snaps)
    results["frozen_weights_unchanged"] = True
    return results, foveal_tables(results)


NAMES = {"random": "random gazes", "fixed": "fixed gazes", "policy": "learned policy (mode)",
         "policy_inhibit": "learned policy (inhibition of return)", "policy_sampled": "learned policy (sampled)"}


def foveal_tables(results: dict) -> str:
    """Markdown: [002] Table 2's layout per step (and [000] Table 3's, with a policy), ViT mode,
    the resolution sweep; [000] Table 1's (ViT | Rand | Policy) and k-NN for a probed backbone."""
    out = ""
    if "knn" in results:
        kn = results["knn"]
        out += (f"k-NN top-1 (%) on the frozen first state token (k = {kn['k']}, {kn['n_train']} "
                f"training scenes): ViT mode {cell(kn['vit'])}, after {results['steps']} random gazes "
                f"{cell(kn['random'])}" + (f", after {results['steps']} gazes on the target "
                                          f"{cell(kn['target'])}" if "target" in kn else "") + "\n\n")
        if "object_share" in kn:
            out += ("Object share of those features (the cosine distance to the same scene with another "
                    "object over that between two scenes; 0: blind to the object): "
                    + ", ".join(f"{m} {v:.3f}" for m, v in kn["object_share"].items()) + "\n\n")
    if "1x" not in results["resolution"]:
        return out
    r1, T = results["resolution"]["1x"], results["steps"]
    shuffled = results["glimpse"] == "shuffled_vit"
    rnd, fix = ("random patch groups", "raster-order groups") if shuffled else ("random gazes", "fixed gazes")
    head = "| | " + " | ".join(f"step {t + 1}" for t in range(T)) + " |\n|---|" + "---:|" * T + "\n"
    row = lambda name, xs: f"| {name} | " + " | ".join(cell(x) for x in xs) + " |\n"
    out += (f"Per-step accuracy (%) at the training resolution ({results['scene_px']} px, "
            f"{r1['n']} held-out scenes, {rnd} averaged over {results['repeats']} draws):\n\n"
            + head + row(f"{rnd}, top-1", r1["random"]["top1"]) + row(f"{rnd}, top-5", r1["random"]["top5"])
            + row(f"{fix}, top-1", r1["fixed"]["top1"]) + row(f"{fix}, top-5", r1["fixed"]["top5"]))
    if "policy" in r1:                                           # [002] Table 2, [000] Table 3
        out += (row("learned policy (mode), top-1", r1["policy"]["top1"]) + row("learned policy (mode), top-5", r1["policy"]["top5"])
                + (row("learned policy (inhibition of return), top-1", r1["policy_inhibit"]["top1"])
                   if "policy_inhibit" in r1 else "")
                + row("learned policy (sampled), top-1", r1["policy_sampled"]["top1"]))
    if "on_target" in r1:
        out += "".join(row(f"gazes on the target, {name}", r1["on_target"][name]) for name in r1["on_target"])
    out += (f"\nViT mode ({results['vit_grid']} x {results['vit_grid']} grid, one step): top-1 "
            f"{cell(r1['vit_mode']['top1'])}, top-5 {cell(r1['vit_mode']['top5'])}\n\n")
    if results["objective"] == "probe" or "policy" in r1:       # [000] Table 1's layout
        pol = f" {cell(r1['policy']['top1'][-1])} |" if "policy" in r1 else " - |"
        out += ("| top-1 (%) | ViT | Rand | Policy |\n|---|---:|---:|---:|\n"
                f"| this model | {cell(r1['vit_mode']['top1'])} | {cell(r1['random']['top1'][-1])} |{pol}\n\n")
    keys = list(results["resolution"])
    out += ("Top-1 (%) when testing on larger scenes than in training:\n\n| model | "
            + " | ".join(f"{k} ({results['resolution'][k]['scene_px']} px)" for k in keys)
            + " |\n|---|" + "---:|" * len(keys) + "\n")
    res = [results["resolution"][k] for k in keys]
    out += row(f"foveal, {T} steps of {rnd}", [r["random"]["top1"][-1] for r in res])
    out += row("foveal, ViT mode", [r["vit_mode"]["top1"] for r in res])
    if "baseline" in r1:
        out += row("passive ViT baseline", [r["baseline"]["top1"] for r in res])
    if "anytime" in r1:
        out += ("\nStop when sure: top-1 (%) (mean glimpses an image) when an episode ends at the first "
                "glimpse whose top class probability reaches p:\n\n"
                + anytime_table({NAMES[name]: c for name, c in r1["anytime"].items()}))
    return out


# ---- The passive ViT alone: its top-1 on its own scenes ----------------------------------------
def evaluate_passive(ckpt: dict, cfg: EvalConfig) -> tuple[dict, str]:
    """A vit_sup run (the passive ViT) on its own held-out scenes, at each --res_factors (default
    1): top-1 / top-5, and its GFLOPs for one look at the whole scene."""
    device = device_of(cfg)
    model = fovea.load_frozen(ckpt, "classifier", canvit.ViTClassifier).to(device)
    snaps = snapshot(model)
    dcfg = eval_data(data.DataConfig(**ckpt["config"]["data"]), cfg)
    S = dcfg.image_size
    results = {"objective": "vit_sup", "step": ckpt.get("step"), "scene_px": S, "resolution": {},
               "gflops": {"look": gflops(lambda: model(torch.zeros(1, 3, S, S, device=device)))}}
    for k in cfg.res_factors or (1,):
        ds = data.build_dataset(dataclasses.replace(dcfg, image_size=S * k, val_length=cfg.n_val), "val")
        right, n = torch.zeros(2), 0
        for batch in batches(ds, min(cfg.n_val, len(ds)), cfg.batch_size):
            with torch.inference_mode():
                logits = model(batch["image"].to(device))
            right += top1_top5(logits, batch["label"].to(device))
            n += len(logits)
        results["resolution"][f"{k}x"] = {"scene_px": S * k, "n": n, "top1": round(100 * right[0].item() / n, 2),
                                          "top5": round(100 * right[1].item() / n, 2)}
    check_unchanged([model], snaps)
    return results, passive_tables(results)


def passive_tables(results: dict) -> str:
    res = results["resolution"]
    return ("Passive ViT, top-1 / top-5 (%) on held-out scenes:\n\n| scene | top-1 | top-5 |\n|---|---:|---:|\n"
            + "".join(f"| {r['scene_px']} px ({k}) | {cell(r['top1'])} | {cell(r['top5'])} |\n" for k, r in res.items()))


def compare(groups: list[str]) -> str:
    """`python eval.py --compare DIR[,DIR...] ...`: one table across systems, each group of
    evaluations (seeds, comma-separated) merged: top-1 (%) after 1, 2, 4 and 8 glimpses and
    GFLOPs a glimpse, for a foveal ViT (random gazes; a grpo evaluation: its learned policy), a
    CanViT (C2F; a grpo evaluation: its learned policy; zero-shot through the teacher's
    classifier) and a passive ViT (one look at the whole scene, whatever the column)."""
    rows = []
    steps = (1, 2, 4, 8)
    for group in groups:
        runs = [json.loads((Path(d) / "results.json").read_text()) for d in group.split(",")]
        r = merge(runs)
        at = lambda xs, scale=1.0: [cell(xs[t - 1], scale) if t <= len(xs) else "-" for t in steps]
        if r["objective"] == "vit_sup":
            top = r["resolution"]["1x"]["top1"]
            rows.append(("passive ViT, the whole scene", [cell(top)] * len(steps), r["gflops"]["look"]))
        elif r["objective"] == "distill":
            res = r["resolutions"][0]
            key, name = ("learned", "CanViT, learned policy") if "learned" in res else ("c2f", "CanViT, C2F")
            rows.append((name, at(res[key]["top1_zero_shot"], 100), r["gflops"]["glimpse"]))
        else:
            key, name = ("policy", "foveal ViT, learned policy") if "policy" in r else ("random", "foveal ViT, random gazes")
            rows.append((name, at(r["resolution"]["1x"][key]["top1"]), r["gflops"]["glimpse"]))
    head = ("| system | " + " | ".join(f"{t} glimpse{'s' * (t > 1)}" for t in steps)
            + " | GFLOPs a glimpse |\n|---|" + "---:|" * (len(steps) + 1) + "\n")
    return head + "".join(f"| {name} | " + " | ".join(cells) + f" | {cell(g, spec='.3f')} |\n"
                          for name, cells, g in rows)


# ---- Several runs in one table, and the command line -----------------------------------------
def summarize(args: list[str]) -> str:
    """`python eval.py --summarize DIR ... [--plot FILE]`: the tables of several evaluations (e.g.
    seeds) as mean (min-max) over them, from their results.json; --plot: a PNG of the mean
    stop-when-sure curves (accuracy against mean glimpses, per policy)."""
    plot = args[args.index("--plot") + 1] if "--plot" in args else None
    dirs = [a for a in args if a not in ("--plot", plot)]
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    merged = merge(runs)
    canvit = runs[0].get("objective") == "distill"
    tables = {"distill": eval_canvit.tables, "vit_sup": passive_tables}.get(runs[0].get("objective"), foveal_tables)
    out = f"mean (min-max) over {len(runs)} evaluations: {', '.join(dirs)}\n\n" + tables(merged)
    if plot:
        mean = lambda x: x["mean"] if isinstance(x, dict) else x
        found = ({f"{eval_canvit.POLICIES[p]}, {r['scene_px']} px": r[p]["anytime"] for r in merged["resolutions"]
                  for p in eval_canvit.POLICIES if "anytime" in r.get(p, {})} if canvit else
                 {NAMES[p]: c for p, c in merged.get("resolution", {}).get("1x", {}).get("anytime", {}).items()})
        if not found:
            raise EvalError("--plot: these evaluations have no stop-when-sure curves (run them with --stop_at)")
        curves = {name: [{"glimpses": mean(p["glimpses"]), "top1": mean(p["top1"])} for p in c]
                  for name, c in found.items()}
        out += f"\nwrote {save_curves(curves, Path(plot))} (the means' curves)\n"
    return out


def write(out_dir: str, results: dict, tables: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "tables.md").write_text(tables)
    print(tables + f"wrote {out / 'results.json'}, {out / 'tables.md'} and the pictures in {out}")


def main(argv: list[str]) -> dict:
    if argv[:1] in (["--summarize"], ["--compare"]):
        print((summarize if argv[0] == "--summarize" else compare)(argv[1:]), end="")
        return {}
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    objective, source = read_checkpoint(cfg.ckpt)
    if objective == "grpo":                                     # a policy: its encoder's protocol
        encoder = fovea.read_checkpoint(source["config"]["grpo"]["encoder"])["config"]["objective"]
        objective = "distill" if encoder == "distill" else "foveal_sup"
    if objective == "distill":                                  # CanViT [003]
        results, tables = eval_canvit.evaluate(source, cfg)
    elif objective in ("foveal_sup", "probe", "dino"):         # the foveal iterative ViT [002, 000]
        results, tables = evaluate_foveal(source, cfg)
    elif objective == "vit_sup":                                # the passive ViT alone
        results, tables = evaluate_passive(source, cfg)
    else:
        raise EvalError(f"{cfg.ckpt} was trained with objective {objective!r}; eval.py evaluates 'distill' "
                        "(CanViT), 'foveal_sup', 'probe', 'dino' (foveal ViT) and 'vit_sup' checkpoints")
    write(cfg.out_dir, results, tables)
    return results


def cli(argv: list[str]) -> str | None:
    """main(), with every error a user can fix turned into the one message the command prints."""
    try:
        main(argv)
    except (EvalError, fovea.CheckpointError, data.DataError) as e:
        return f"eval.py: {e}"
    return None


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
