"""CanViT's evaluation [003, Sec. 6]: reconstruction, probes, policies, resolutions, pictures.

Paper
  [003] Berreby, Du, Durand, Krishna, "CanViT: Toward Active-Vision Foundation Models": Sec. 6,
        App. A, E (Table 4), F (Tables 6, 7). Official code: m2b3/CanViT-eval (evaluation) and
        m2b3/CanViT-specialize (probe training).

The checkpoint's CanViT (objective "distill", or an official Hugging Face folder), frozen and
checked bit-identical at the end, is rolled out on held-out scenes under each viewing policy for
T glimpses; after every glimpse we measure reconstruction (the cosine similarity of the
destandardized W_spatial / W_global predictions to the teacher's features, Table 4's metric,
and in the loss's z-scored space, Eq. 3), segmentation (mIoU of one probe on the canvas cells,
F.2.1) and classification (a probe on the recurrent CLS, and F.2.2's zero-shot route).
Probes train on cached frozen features of `n_train` scenes, every policy runs on `n_val` others,
and all is repeated at larger scenes and canvas grids of the same model (Table 6's "Res."
column, e.g. 512/32 and 1024/64), each with its own probes.

Shapes
  B scenes, T glimpses, N probe-training scenes, S scene side (px), G canvas grid side,
  K segment classes or labels, Dc canvas width, D backbone width, Dt teacher width.

Paper -> code
  App. F.1       R-IID, F-IID, C2F, F2C, full, entropy C2F     POLICIES, rollout
  App. E Table 4 reconstruction cosine similarity              step_metrics
  App. F.2.1     segmentation probe, AdamW warmup-cosine       SegProbe, cell_targets, train_probe
  App. F.2.1     mIoU (dataset-wide confusion matrix)          confusion_matrix, miou, predict_masks
  App. F.2.2     zero-shot classification through W_global     train_probes, step_metrics
  Sec. 6.1       the same weights at 2x scene and canvas grid  evaluate, fit_standardizers
  App. A         canvas PCA pictures                           pca_rgb, save_pictures
  Tables 4, 6, 7 markdown tables                               tables

What does not depend on the model (held-out batches, progress lines, the frozen-weight check,
several runs as mean (min-max)) lives here too: eval.py (the command, the foveal protocol)
imports this module, never the other way round. `cfg` is eval.py's EvalConfig.

Run `python eval.py --ckpt runs/canvit_tiny/ckpt.pt --out_dir runs/canvit_tiny/eval` (or an
official Hugging Face folder: config.json + model.safetensors); tests: tests/test_eval_canvit.py.
"""
from __future__ import annotations

import colorsys
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

import canvit
import data
import distill
import fovea
import grpo

POLICIES = {"c2f": "C2F", "entropy": "Entropy C2F", "fiid": "F-IID", "riid": "R-IID",
            "f2c": "F2C", "full": "Rep. full", "learned": "Learned (GRPO)",
            "learned_sampled": "Learned (GRPO), sampled"}                       # Table 6's rows, in its order
IGNORE = data.ADE20K_IGNORE                                          # mask value left out of mIoU


# ---- What every evaluation needs: errors, held-out batches, progress, frozen check -----------
class EvalError(ValueError):
    """A bad input (missing checkpoint, wrong objective, bad option): no traceback, a message."""


def device_of(cfg) -> torch.device:
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
    """Evaluation must leave the frozen models bit-identical (no new buffers either)."""
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


def merge(runs: list):
    """The results of several runs (the same structure) -> one, where a number that differs
    between runs becomes {"mean", "min", "max"} (a setting or a count common to all stays)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: merge([r[k] for r in runs]) for k in first if all(k in r for r in runs)}
    if isinstance(first, list):
        same = all(isinstance(r, list) and len(r) == len(first) for r in runs)
        return [merge([r[i] for r in runs]) for i in range(len(first))] if same else first
    if isinstance(first, (int, float)) and not isinstance(first, bool) and len(set(runs)) > 1:
        return {"mean": sum(runs) / len(runs), "min": min(runs), "max": max(runs)}
    return first


def cell(x, scale: float = 1.0, spec: str = ".1f") -> str:
    """A number of the tables as text, scaled: "v", or "mean (min-max)" for a merged one."""
    if isinstance(x, dict):
        return f"{x['mean'] * scale:{spec}} ({x['min'] * scale:{spec}}-{x['max'] * scale:{spec}})"
    return f"{x * scale:{spec}}"


# ---- Compute that follows the task: stop looking when sure [002, Sec. 1-3] -----------------
def stop_when_sure(confidence: Tensor, threshold: float) -> Tensor:
    """The anytime rule: each image stops after the first glimpse whose top class probability
    reaches `threshold`, else after the last. confidence (N, T) -> the stopping step (N,)."""
    reached = confidence >= threshold
    return torch.where(reached.any(1), reached.float().argmax(1), confidence.shape[1] - 1)


def anytime_curve(confidence: Tensor, correct: Tensor, thresholds) -> list[dict]:
    """Accuracy (%) against mean glimpses per image, one point per threshold (and the plain
    T-glimpse episode, threshold 1.01): confidence, correct (N, T) after each glimpse."""
    rows = torch.arange(len(confidence))
    points = []
    for th in (*thresholds, 1.01):
        stop = stop_when_sure(confidence, th)
        points.append({"threshold": th, "top1": round(100 * correct[rows, stop].float().mean().item(), 2),
                       "glimpses": round((stop + 1).float().mean().item(), 3)})
    return points


def save_curves(curves: dict, path: Path, size: tuple[int, int] = (640, 360)) -> str:
    """A PNG of accuracy (%) against mean glimpses per image, one line per policy (`curves` maps a
    name to anytime_curve's points), with axis ticks and the legend beside the plot."""
    W, H = size
    left, right, top, bottom = 44, 230, 16, 40                    # the legend takes the right margin
    pts = [p for c in curves.values() for p in c]
    x_hi = max(2, math.ceil(max(p["glimpses"] for p in pts)))
    y_lo = min(p["top1"] for p in pts) // 10 * 10
    y_hi = min(100, max(p["top1"] for p in pts) // 10 * 10 + 10)
    to_px = lambda g, a: (left + (g - 1) / (x_hi - 1) * (W - left - right),
                          H - bottom - (a - y_lo) / (y_hi - y_lo) * (H - top - bottom))
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.line([to_px(1, y_lo), to_px(x_hi, y_lo)], fill="black")
    draw.line([to_px(1, y_lo), to_px(1, y_hi)], fill="black")
    for g in range(1, x_hi + 1):
        x, y = to_px(g, y_lo)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x - 3, y + 6), str(g), fill="black")
    step = 2 if y_hi - y_lo <= 20 else 10
    for a in range(int(y_lo), int(y_hi) + 1, step):
        x, y = to_px(1, a)
        draw.line([(x - 4, y), (x, y)], fill="black")
        draw.text((x - 28, y - 6), f"{a:3d}", fill="black")
    draw.text((left + 60, H - 16), "mean glimpses per image", fill="black")
    draw.text((left + 4, 2), "top-1 (%)", fill="black")
    for i, (name, c) in enumerate(curves.items()):
        colour = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(i / max(len(curves), 1), 0.8, 0.75))
        xy = [to_px(p["glimpses"], p["top1"]) for p in sorted(c, key=lambda p: p["glimpses"])]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.line([(W - right + 12, top + 8 + 16 * i), (W - right + 30, top + 8 + 16 * i)], fill=colour, width=3)
        draw.text((W - right + 36, top + 2 + 16 * i), name, fill=colour)
    img.save(path)
    return str(path)


def anytime_table(curves: dict) -> str:
    """Markdown: per policy, top-1 (%) and mean glimpses at each stopping threshold."""
    ths = [p["threshold"] for p in next(iter(curves.values()))]
    head = ("| policy | " + " | ".join("no stop" if t > 1 else f"p >= {t:g}" for t in ths)
            + " |\n|---|" + "---:|" * len(ths) + "\n")
    return head + "".join(f"| {name} | " + " | ".join(f"{cell(p['top1'])} ({cell(p['glimpses'], spec='.2f')})"
                                                     for p in c) + " |\n" for name, c in curves.items())


def gflops(fn) -> float:
    """GFLOPs of one call of fn(), as torch.utils.flop_counter counts them (matrix products,
    convolutions and attention: what dominates a transformer); attention through the math
    backend, whose matrix products the counter sees (it does not know the fused CPU kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.inference_mode():
        fn()
    return counter.get_total_flops() / 1e9


# ---- Metrics (F.2.1: mIoU over a global confusion matrix; top-1) -----------------------------
def confusion_matrix(pred: Tensor, target: Tensor, K: int, ignore: int = IGNORE) -> Tensor:
    """(K, K) int64 pixel counts, row = true class, column = predicted, where target != ignore.
    One bincount; ignored pixels go to an extra bin (no boolean indexing: 8x faster on CPU)."""
    t = target.to(torch.int32)
    idx = torch.where(t != ignore, t * K + pred.to(torch.int32), K * K)
    return torch.bincount(idx.flatten(), minlength=K * K + 1)[:K * K].view(K, K)


def miou(conf: Tensor) -> float:
    """Mean IoU over the classes present (union > 0) of a dataset-wide confusion matrix: counts
    are summed over all images first, as mmsegmentation and the official mIoUAccumulator do."""
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    present = union > 0
    return (inter[present] / union[present]).mean().item() if present.any() else float("nan")


def cell_targets(masks: Tensor, G: int, K: int, ignore: int = IGNORE) -> Tensor:
    """(B, S, S) masks -> (B, K, G, G) fraction of each cell's pixels in each class (ignored
    pixels count for none), by one bincount: memory O(pixels), not O(pixels x K)."""
    B, H, W = masks.shape
    if H % G or W % G:
        raise EvalError(f"scene {H}x{W} px is not a whole number of cells of a {G}x{G} canvas")
    rows = torch.arange(H, device=masks.device) // (H // G)
    cols = torch.arange(W, device=masks.device) // (W // G)
    cell = (rows[:, None] * G + cols[None, :]).expand(B, H, W)                 # (B, S, S)
    b = torch.arange(B, device=masks.device)[:, None, None].expand(B, H, W)
    valid = masks != ignore
    idx = ((b * G * G + cell) * K + masks.long())[valid]
    counts = torch.bincount(idx, minlength=B * G * G * K).view(B, G, G, K)
    return (counts.float() / (H // G * W // G)).permute(0, 3, 1, 2)        # (B, K, G, G)


def predict_masks(logits: Tensor, size: int) -> Tensor:
    """(B, K, G, G) logits -> (B, S, S) classes: bilinear upsampling then argmax (as the official
    CanViT-eval), channels-last (3x faster on CPU), a few images at a time (never (B, K, S, S))."""
    n = max(1, 2 ** 22 // (logits.shape[1] * size * size))
    logits = logits.float().contiguous(memory_format=torch.channels_last)
    return torch.cat([F.interpolate(chunk, size=(size, size), mode="bilinear",
                                    align_corners=False).argmax(1) for chunk in logits.split(n)])


# ---- Probes (F.2.1, F.2.2) and their training on cached frozen features ----------------------
class SegProbe(nn.Module):
    """F.2.1: LayerNorm + Dropout (0.1) + BatchNorm + Conv 1x1; (B, G, G, D) -> (B, K, G, G).
    NOTE(paper): as the official probe (and DINOv3's), the dropout drops whole channels."""
    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.ln, self.dropout = nn.LayerNorm(dim), nn.Dropout2d(dropout)
        self.bn, self.conv = nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)                      # official init
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln(x).permute(0, 3, 1, 2)                   # (B, G, G, D) -> (B, D, G, G)
        return self.conv(self.bn(self.dropout(x)))


def seg_loss(probe: nn.Module, feats: Tensor, q: Tensor) -> Tensor:
    """Pixel cross-entropy, averaged over timesteps, of feats (b, T, G*G, D) against cell class
    fractions q (b, K, G, G). NOTE(paper): the official code takes the mask's nearest pixel per
    cell; the fractions give the exact pixel-level loss of a per-cell prediction, and do not
    lose objects smaller than a cell (the synthetic target badge is about one cell wide)."""
    b, T, N, D = feats.shape
    G = math.isqrt(N)
    logp = F.log_softmax(probe(feats.float().reshape(b * T, G, G, D)), 1)      # (b*T, K, G, G)
    q = q.float().repeat_interleave(T, 0)                                      # (b*T, K, G, G)
    return -(q * logp).sum() / q.sum().clamp_min(1e-6)


def cls_loss(probe: nn.Module, feats: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over timesteps: feats (b, T, D), labels (b,)."""
    logits = probe(feats.float().flatten(0, 1))                              # (b*T, K)
    return F.cross_entropy(logits, labels.repeat_interleave(feats.shape[1]))


def warmup_cosine(step: int, steps: int, peak: float) -> float:
    """F.2.1: linear warmup over the first 1,500 / 40,000 of the steps, then cosine to zero."""
    warmup = max(1, round(steps * 1500 / 40000))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_probe(probe: nn.Module, loss_fn, inputs: tuple[Tensor, ...], cfg, seed: int) -> list[float]:
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


# ---- Loading CanViT and its teacher ----------------------------------------------------------
def load_canvit(source: dict | Path, cfg) -> tuple[canvit.CanViT, nn.Module | None,
                                                                dict]:
    """CanViT, its teacher (None when unknown) and the run's settings, from a train.py
    checkpoint (teacher rebuilt strictly from `extra`, as in training) or a Hugging Face folder."""
    if isinstance(source, Path):
        model = canvit.load_hf_folder(source)
        teacher = canvit.load_teacher(cfg.teacher_weights, "--teacher_weights") if cfg.teacher_weights else None
        # Table 1 / Table 2: 512 px scenes, 128 px bilinear glimpses
        info = {"step": None, "glimpse_px": 128, "glimpse_method": "bilinear",
                "data": data.DataConfig(image_size=512)}
    else:
        d = source["config"]["distill"]
        model = fovea.load_frozen(source, "encoder", canvit.CanViT)
        teacher = canvit.run_teacher(source, cfg.teacher_weights, "the run's teacher (--teacher_weights)")
        info = {"step": source.get("step"), "glimpse_px": d["glimpse_px"],
                "glimpse_method": d.get("glimpse_method", "bilinear"),
                "data": data.DataConfig(**source["config"]["data"])}
    if cfg.glimpse_px:
        info["glimpse_px"] = cfg.glimpse_px
    if teacher is None:
        print("!! no teacher: neither saved in the checkpoint nor given (--teacher_weights); "
              "reconstruction and zero-shot classification are skipped", file=sys.stderr)
    for m in (model, teacher):
        if m is not None:
            m.eval().requires_grad_(False)
    return model, teacher, info


# ---- Rollouts under a policy (App. F.1) ------------------------------------------------------
def rollout(model: canvit.CanViT, scenes: Tensor, policy: str, T: int, G: int, glimpse_px: int,
            gen: torch.Generator, method: str = "bilinear", seg_probe: nn.Module | None = None,
            learned: tuple | None = None):
    """Yield (t, Viewpoint (B, 2), (B,), State) after each of T glimpses of scenes (B, 3, S, S).
    Static policies: canvit.policy_viewpoints (from `gen`); 'entropy': EntropyGuidedC2F on the
    seg probe's per-cell entropy of the canvas before the glimpse (as the official evaluation);
    'learned' / 'learned_sampled': a GRPO policy (`learned` = (policy, min_scale, std,
    first_gaze)) through grpo's CanViT wrapper and episode, as trained, its deterministic action
    or one sampled with that std (from `gen`)."""
    B, device = scenes.shape[0], scenes.device
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    if policy.startswith("learned"):
        net, min_scale, std, first_gaze = learned
        enc = grpo.CanViTEncoder(model, None, G, glimpse_px, min_scale, method).to(device)
        source, state = enc.start(scenes, torch.arange(B, device=device))
        choose = (lambda means, logits, t: grpo.mixture_mode(means, logits, std)) if policy == "learned" else (
            lambda means, logits, t: grpo.sample_mixture(means, logits, std, torch.rand(B, generator=gen),
                                                         torch.randn(B, enc.action_dim, generator=gen))[0])
        with amp:
            steps = grpo.episode(net, enc, source, state, B, T, choose, first_gaze)
            for t, (_, _, _, action, state) in enumerate(steps):
                yield t, enc.viewpoint(action), state
        return
    state = model.init_state(B, G)
    source = fovea.integral_image(scenes) if method == "integral" else scenes
    if policy == "entropy":
        if seg_probe is None:
            raise EvalError("the entropy-guided C2F policy needs the segmentation probe (masks)")
        guide = canvit.EntropyGuidedC2F(T, G)
    else:
        vps = canvit.policy_viewpoints(policy, T, B, gen)
    for t in range(T):
        if policy == "entropy":
            logits = seg_probe(canvas_cells(model, state.canvas).float())
            vp = guide.step(canvit.predictive_entropy(logits))
        else:
            vp = canvit.Viewpoint(vps.center_yx[t].to(device), vps.scale[t].to(device))
        glimpse = fovea.viewpoint_glimpse(source, vp.center_yx, vp.scale, glimpse_px)
        with amp:
            state = model(glimpse, state, vp.center_yx, vp.scale).state
        yield t, vp, state


def canvas_cells(model: canvit.CanViT, canvas: Tensor) -> Tensor:
    """(B, Rc + G*G, Dc) canvas -> (B, G, G, Dc) spatial cells (F.2: registers excluded)."""
    cells = canvas[:, model.cfg.n_canvas_registers:]
    G = math.isqrt(cells.shape[1])
    return cells.reshape(cells.shape[0], G, G, -1)


# ---- One resolution: cache frozen features, train probes, evaluate every policy --------------
def datasets(cfg, info: dict, S: int):
    """(probe-training, held-out) datasets at scene size S: train / val (synthetic, ImageFolder:
    resize + centre crop, F.2.2) or training / validation (ADE20K: resized to S x S, F.2.1)."""
    dc = dataclasses.replace(info["data"], dataset=cfg.data or info["data"].dataset,
                             root=cfg.root or info["data"].root, image_size=S)
    if dc.dataset == "imagefolder":               # class count from the folders, not the config
        sets = tuple(data.ImageFolder(os.path.join(dc.root, s), S) for s in ("train", "val"))
    else:
        sets = data.build_dataset(dc, "train"), data.build_dataset(dc, "val")
    for ds, n in zip(sets, (cfg.n_train, cfg.n_val)):
        if len(ds) < n:
            raise EvalError(f"{dc.dataset} split has {len(ds)} scenes, fewer than {n} requested")
    return sets

def collect_features(model, teacher, ds, cfg, info: dict, S: int, G: int) -> dict:
    """Cache, for n_train scenes, the frozen canvas cells (N, T, G*G, Dc) float16 and recurrent
    CLS (N, T, D) after each glimpse of probe_T-step probe_policy rollouts, cell class fractions
    (N, K, G, G), labels (N,) and teacher CLS (N, Dt) / patches (N, G*G, Dt).
    NOTE(paper): F.2.1 trains on "sequences of T = 10 timesteps", policy unnamed; the official
    probe training draws R-IID viewpoints, one probe for all timesteps, its loss averaged over
    them (seg_loss, cls_loss). One rollout per scene is cached (the official code draws new
    viewpoints, and augmentations, at every step)."""
    device = model.canvas_spatial_init.device
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 999)
    out: dict[str, list] = {}
    progress = Progress(f"[{S}/{G}x{G}] frozen features of probe-training scenes", cfg.n_train)
    with torch.inference_mode():
        for batch in batches(ds, cfg.n_train, cfg.batch_size):
            images = batch["image"].to(device)
            cells, cls = [], []
            for _, _, state in rollout(model, images, cfg.probe_policy, cfg.probe_T, G,
                                       info["glimpse_px"], gen, info["glimpse_method"]):
                cells.append(state.canvas[:, model.cfg.n_canvas_registers:].half().cpu())
                cls.append(state.recurrent_cls[:, 0].float().cpu())
            item = {"cells": torch.stack(cells, 1), "cls": torch.stack(cls, 1)}
            if "mask" in batch:
                item["q"] = cell_targets(batch["mask"], G, ds.num_segment_classes).half()
            if "label" in batch:
                item["label"] = batch["label"]
            if teacher is not None:
                t_cls, t_patches = distill.teacher_features(teacher, images, G)
                item["t_cls"], item["t_patches"] = t_cls.cpu(), t_patches.cpu()
            for k, v in item.items():
                out.setdefault(k, []).append(v)
            progress(sum(len(c) for c in out["cls"]))
    # cat outside inference mode: the probes need ordinary tensors to train on
    return {k: torch.cat(v) for k, v in out.items()}


def train_probes(model, feats: dict, ds, cfg, device) -> tuple[dict, dict]:
    """Seg probe on canvas cells, linear probe on the recurrent CLS, and the teacher's probes
    (CLS: the zero-shot route of F.2.2; patches: a passive reference). -> (probes, loss logs).
    NOTE(paper): the paper classifies only zero-shot, with DINOv3's ImageNet-1k probe (App. H);
    here the teacher-CLS probe is trained on the same scenes' teacher CLS, and the probe on the
    recurrent CLS (LayerNorm + Linear: the CLS is a pre-norm residual stream) is our addition."""
    probes, logs = {}, {}
    Dc, D, Dt = model.cfg.canvas_dim, model.cfg.backbone.embed_dim, model.cfg.teacher_dim
    jobs = []                                            # (name, make the probe, loss, inputs)
    if "q" in feats:
        K = ds.num_segment_classes
        jobs.append(("seg", lambda: SegProbe(Dc, K), seg_loss, (feats["cells"], feats["q"])))
        if "t_patches" in feats:
            jobs.append(("teacher_seg", lambda: SegProbe(Dt, K), seg_loss,
                         (feats["t_patches"][:, None], feats["q"])))
    if "label" in feats:
        C = ds.num_classes
        jobs.append(("cls", lambda: nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C)), cls_loss,
                     (feats["cls"], feats["label"])))
        if "t_cls" in feats:
            jobs.append(("teacher_cls", lambda: nn.Linear(Dt, C), cls_loss,
                         (feats["t_cls"][:, None], feats["label"])))
    for i, (name, make, loss_fn, inputs) in enumerate(jobs):
        torch.manual_seed(cfg.seed * 1000 + i)            # initialisation and dropout
        probe = make().to(device)
        logs[name] = train_probe(probe, loss_fn, inputs, cfg, seed=cfg.seed * 1000 + i)
        probes[name] = probe.eval()
    return probes, logs


def fit_standardizers(model, feats: dict, G: int) -> tuple[tuple, str]:
    """The (CLS, patch) standardizers of grid G: the checkpoint's, or, for a grid it has none for
    (a larger canvas), fitted on the probe-training scenes' teacher features outside the model.
    NOTE(paper): as the official models, one pair per canvas grid (`canvas_patch_grid_sizes`)."""
    if str(G) in model.scene_standardizers:
        return model.standardizers(G), "checkpoint"
    cls_std = canvit.Standardizer(1, model.cfg.teacher_dim)
    patch_std = canvit.Standardizer(G * G, model.cfg.teacher_dim)
    cls_std.fit(feats["t_cls"][:, None])
    patch_std.fit(feats["t_patches"])
    device = model.canvas_spatial_init.device
    source = f"fitted on {len(feats['t_cls'])} probe-training scenes"
    return (cls_std.to(device), patch_std.to(device)), source


def step_metrics(model, probes: dict, stds, state, truth: dict, S: int
                 ) -> tuple[dict, Tensor | None, Tensor | None]:
    """Sums over a batch of every metric after one glimpse, the predicted masks (B, S, S) and the
    zero-shot class probabilities (B, K) (None where there is no teacher or no label).
    NOTE(paper): Table 4 does not say in which space its cosine is; the official evaluation logs
    both, so do we: destandardized predictions vs the teacher's features (F.2's decoding), and
    z-scores vs z-scored targets (the loss's space, Eq. 3)."""
    sums, pred, zero_shot = {}, None, None
    if "t_cls" in truth:                                 # Table 4: destandardized vs teacher
        z = model.predict(state)                                             # z-scored (Eq. 3)
        cls_hat = stds[0].destandardize(z.cls.float()[:, None])[:, 0]        # (B, Dt)
        patches_hat = stds[1].destandardize(z.patches.float())               # (B, G*G, Dt)
        cos = lambda a, b: F.cosine_similarity(a, b, dim=-1)           # per position (or CLS)
        sums["patch_cos"] = cos(patches_hat, truth["t_patches"]).mean(1).sum()
        sums["cls_cos"] = cos(cls_hat, truth["t_cls"]).sum()
        sums["patch_cos_z"] = cos(z.patches.float(), truth["z_patches"]).mean(1).sum()
        sums["cls_cos_z"] = cos(z.cls.float(), truth["z_cls"]).sum()
        if "teacher_cls" in probes:                      # F.2.2: zero-shot through W_global
            zero_shot = probes["teacher_cls"](cls_hat).float().softmax(-1)
            sums["zero_shot_correct"] = correct(zero_shot, truth["label"])
    if "seg" in probes:
        logits = probes["seg"](canvas_cells(model, state.canvas).float())      # (B, K, G, G)
        pred = predict_masks(logits, S)
        sums["conf"] = confusion_matrix(pred, truth["mask"], logits.shape[1])
    if "cls" in probes:
        logits = probes["cls"](state.recurrent_cls[:, 0].float())             # (B, K)
        sums["cls_correct"] = correct(logits, truth["label"])
    return sums, pred, zero_shot


def correct(logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1: how many of (B, K) logits have their largest value at the label (B,)."""
    return (logits.argmax(-1) == labels).sum()


class Tally(dict):
    """Sums over the held-out scenes, keyed by name or by (policy, metric, timestep)."""
    def add(self, key, value) -> None:
        value = value.detach().cpu() if torch.is_tensor(value) else value
        self[key] = self[key] + value if key in self else value


# step_metrics' sums -> the results' keys (each a mean over the scenes, per timestep)
MEANS = {"patch_cos": "patch_cos", "cls_cos": "cls_cos", "patch_cos_z": "patch_cos_z",
         "cls_cos_z": "cls_cos_z", "cls_correct": "top1_cls_probe", "zero_shot_correct": "top1_zero_shot"}


@torch.inference_mode()
def evaluate_policies(model, teacher, probes: dict, stds, ds, cfg, info: dict,
                      S: int, G: int, learned: tuple | None = None) -> tuple[dict, dict]:
    """Every policy for T glimpses on the n_val held-out scenes -> (results: per policy, each metric
    per timestep, the passive teacher's, the floors; pictures: the first scenes' rollouts)."""
    device, T = model.canvas_spatial_init.device, cfg.T
    policies = [p for p in cfg.policies if p != "entropy" or "seg" in probes]
    if len(policies) < len(cfg.policies):
        print("entropy C2F skipped: it needs the segmentation probe, and these data have no masks")
    gens = {p: torch.Generator().manual_seed(cfg.seed * 1000 + list(POLICIES).index(p))
            for p in policies}                            # the same viewpoints at every resolution
    tally, pics, n = Tally(), {"policies": {p: [] for p in policies}}, 0
    sure = {p: ([], []) for p in policies}              # zero-shot top probability, right: (B, T)
    progress = Progress(f"[{S}/{G}x{G}] policies on held-out scenes", cfg.n_val)
    for i, batch in enumerate(batches(ds, cfg.n_val, cfg.batch_size)):
        images = batch["image"].to(device)
        truth = {k: batch[k].to(device) for k in ("mask", "label") if k in batch}
        k, n = (cfg.pictures if i == 0 else 0), n + len(images)         # pictures: first scenes
        # The floors (the most frequent class everywhere) and the passive teacher's probes.
        if "label" in truth:
            tally.add("label_counts", torch.bincount(truth["label"], minlength=ds.num_classes))
        if "mask" in truth:
            valid = truth["mask"][truth["mask"] != IGNORE]
            tally.add("pixel_counts", torch.bincount(valid, minlength=ds.num_segment_classes))
        if teacher is not None:
            truth["t_cls"], truth["t_patches"] = distill.teacher_features(teacher, images, G)
            truth["z_cls"] = stds[0].standardize(truth["t_cls"][:, None])[:, 0]
            truth["z_patches"] = stds[1].standardize(truth["t_patches"])
            if "teacher_seg" in probes:
                logits = probes["teacher_seg"](truth["t_patches"].view(len(images), G, G, -1))
                tally.add("teacher_conf", confusion_matrix(predict_masks(logits, S), truth["mask"],
                                                           logits.shape[1]))
            if "teacher_cls" in probes:
                tally.add("teacher_correct", correct(probes["teacher_cls"](truth["t_cls"]), truth["label"]))
        if k:
            pics.update(images=images[:k].cpu(), masks=truth["mask"][:k].cpu() if "mask" in truth else None,
                        teacher=truth["t_patches"][:k].cpu() if teacher is not None else None)
        for p in policies:
            steps = []
            for t, vp, state in rollout(model, images, p, T, G, info["glimpse_px"], gens[p],
                                        info["glimpse_method"], probes.get("seg"), learned):
                sums, pred, zero_shot = step_metrics(model, probes, stds, state, truth, S)
                if zero_shot is not None:
                    steps.append(zero_shot.cpu())
                for name, value in sums.items():
                    tally.add((p, name, t), value)
                where = torch.cat([vp.center_yx, vp.scale.view(-1, 1)], 1).double()    # (B, 3)
                tally.add((p, "where", t), torch.cat([where.sum(0), where.square().sum(0)]))
                if k:
                    pics["policies"][p].append({
                        "center": vp.center_yx[:k].cpu(), "scale": vp.scale[:k].cpu(),
                        "cells": canvas_cells(model, state.canvas)[:k].float().cpu(),
                        "seg": pred[:k].cpu() if pred is not None else None})
            if steps:
                probs = torch.stack(steps, 1)                                            # (B, T, K)
                sure[p][0].append(probs.amax(-1))
                sure[p][1].append(probs.argmax(-1) == truth["label"].cpu()[:, None])
        progress(n)
    results = {"n_val": n}
    for p in policies:
        results[p] = {key: [float(tally[p, name, t]) / n for t in range(T)]
                      for name, key in MEANS.items() if (p, name, 0) in tally}
        if (p, "conf", 0) in tally:
            results[p]["miou"] = [miou(tally[p, "conf", t]) for t in range(T)]
        # How much the viewpoints differ between scenes: the RMS distance of the centre from its
        # mean over the scenes (scene units, the side is 2) and the scale's std; 0 for C2F.
        var = [(tally[p, "where", t][3:] / n - (tally[p, "where", t][:3] / n).square()).clamp(min=0)
               for t in range(T)]
        results[p]["center_spread"] = [float(v[:2].sum().sqrt()) for v in var]
        results[p]["scale_spread"] = [float(v[2].sqrt()) for v in var]
        if cfg.stop_at and sure[p][0]:                   # stop when sure, zero-shot
            results[p]["anytime"] = anytime_curve(torch.cat(sure[p][0]), torch.cat(sure[p][1]), cfg.stop_at)
    if "pixel_counts" in tally:          # IoU of the majority class c: N_c / N; the others: 0
        pixels = tally["pixel_counts"].double()
        results["floor_miou"] = (pixels.max() / pixels.sum() / (pixels > 0).sum()).item()
    if "label_counts" in tally:
        results["floor_top1"] = tally["label_counts"].max().item() / n
    if "teacher_conf" in tally:
        results["teacher_miou"] = miou(tally["teacher_conf"])
    if "teacher_correct" in tally:
        results["teacher_top1"] = float(tally["teacher_correct"]) / n
    return results, pics


# ---- App. A: pictures (Pillow) ---------------------------------------------------------------
def pca_rgb(tokens: Tensor) -> np.ndarray:
    """App. A: (N, D) tokens -> (N, 3) uint8: LayerNorm each token, PCA across tokens, the first
    three components as RGB, each min-max scaled over the tokens shown."""
    x = F.layer_norm(tokens.float(), tokens.shape[-1:])
    x = x - x.mean(0)
    _, _, V = torch.linalg.svd(x, full_matrices=False)                       # V: (min(N, D), D)
    rgb = x @ V[:3].T                                                        # (N, <=3)
    rgb = F.pad(rgb, (0, 3 - rgb.shape[1]))
    rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values).clamp_min(1e-8)
    return (rgb.numpy() * 255).round().astype(np.uint8)


def _palette(K: int) -> np.ndarray:
    """(256, 3) uint8: class 0 black, classes 1..K-1 well-spread hues, the rest (ignore) white."""
    pal = np.full((256, 3), 255, np.uint8)
    pal[0] = 0
    for c in range(1, K):
        pal[c] = [round(255 * v) for v in colorsys.hsv_to_rgb((c * 0.618) % 1.0, 0.75, 0.95)]
    return pal


def save_pictures(pics: dict, path_prefix: Path, K: int | None, tile: int = 128) -> list[str]:
    """One PNG per policy (-> the paths): per scene, rows = the scene with the glimpse boxes so
    far (the current one yellow), canvas PCA, predicted segmentation; columns = reference (scene,
    teacher PCA, true mask), then the tables' timesteps."""
    mean = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    scenes = ((pics["images"] * std + mean).clamp(0, 1) * 255).round().byte()
    scenes = scenes.permute(0, 2, 3, 1).numpy()                      # (n, S, S, 3) uint8
    pal = _palette(K) if K else None
    head, written = 14, []

    def grid_image(rgb: np.ndarray) -> Image.Image:                       # (G*G, 3) -> tile
        G = math.isqrt(len(rgb))
        return Image.fromarray(rgb.reshape(G, G, 3)).resize((tile, tile), Image.NEAREST)

    def mask_image(mask: Tensor) -> Image.Image:
        rgb = pal[mask.numpy().astype(np.int64)]                          # (S, S, 3)
        return Image.fromarray(rgb).resize((tile, tile), Image.NEAREST)
    for policy, steps in pics["policies"].items():
        cols = _columns(len(steps))                                   # the tables' timesteps
        canvas = Image.new("RGB", ((len(cols) + 1) * tile, len(scenes) * 3 * tile + head), "white")
        draw = ImageDraw.Draw(canvas)
        for c, label in enumerate(["reference"] + [f"t={t}" for t in cols]):
            draw.text((c * tile + 4, 1), label, fill="black")
        for i in range(len(scenes)):
            y0 = head + i * 3 * tile
            scene = Image.fromarray(scenes[i]).resize((tile, tile), Image.BILINEAR)
            canvas.paste(scene, (0, y0))
            if pics["teacher"] is not None:
                canvas.paste(grid_image(pca_rgb(pics["teacher"][i])), (0, y0 + tile))
            if pics["masks"] is not None:
                canvas.paste(mask_image(pics["masks"][i]), (0, y0 + 2 * tile))
            for c, t in enumerate(cols):
                x0, view = (c + 1) * tile, scene.copy()
                vd = ImageDraw.Draw(view)
                for u in range(t + 1):                   # earlier glimpses grey, this one yellow
                    box = fovea.viewpoint_boxes(steps[u]["center"][i:i + 1],
                                                steps[u]["scale"][i:i + 1], (tile, tile))
                    y_a, x_a, y_b, x_b = box[0].tolist()
                    vd.rectangle([x_a, y_a, x_b - 1, y_b - 1], width=2 if u == t else 1,
                                 outline=(255, 230, 0) if u == t else (150, 150, 150))
                canvas.paste(view, (x0, y0))
                cells = steps[t]["cells"][i].flatten(0, 1)               # (G*G, Dc)
                canvas.paste(grid_image(pca_rgb(cells)), (x0, y0 + tile))
                if steps[t]["seg"] is not None:
                    canvas.paste(mask_image(steps[t]["seg"][i]), (x0, y0 + 2 * tile))
        path = f"{path_prefix}_{policy}.png"
        canvas.save(path)
        written.append(path)
    return written


# ---- Tables 4, 6, 7 (markdown) ---------------------------------------------------------------
def _columns(T: int) -> list[int]:
    """Table 6's timesteps (0-4, 9, 16, 20) for long rollouts, every step for short ones."""
    return [t for t in (0, 1, 2, 3, 4, 9, 16, 20) if t < T] if T > 10 else list(range(T))


TABLES = (   # (title, the key a policy's results need, one cell at step t)
    ("Reconstruction (Table 4's metric): cosine similarity x100 between destandardized "
     "predictions and the teacher's features, patches / CLS", "patch_cos",
     lambda r, t: f"{cell(r['patch_cos'][t], 100)} / {cell(r['cls_cos'][t], 100)}"),
    ("Reconstruction in the z-scored space of the loss (Eq. 3): cosine x100, patches / CLS",
     "patch_cos_z",
     lambda r, t: f"{cell(r['patch_cos_z'][t], 100)} / {cell(r['cls_cos_z'][t], 100)}"),
    ("Segmentation mIoU (%) (Table 6's layout): probe on the frozen canvas cells", "miou",
     lambda r, t: cell(r['miou'][t], 100)),
    ("Classification top-1 (%): linear probe on the frozen recurrent CLS", "top1_cls_probe",
     lambda r, t: cell(r['top1_cls_probe'][t], 100)),
    ("Classification top-1 (%), zero-shot (Table 7's layout): W_global prediction, "
     "destandardized, through the teacher-CLS probe", "top1_zero_shot",
     lambda r, t: cell(r['top1_zero_shot'][t], 100)),
    ("Viewpoints from scene to scene: RMS distance of the centre from its mean over the scenes "
     "(scene side = 2) / std of the scale", "center_spread",
     lambda r, t: f"{cell(r['center_spread'][t], 1, '.2f')} / {cell(r['scale_spread'][t], 1, '.2f')}"),
)


def tables(results: dict) -> str:
    """Markdown: one table per metric, rows policy x resolution, columns timesteps."""
    res = results["resolutions"]
    cols = _columns(results["config"]["T"])
    head = ("| Policy | Res. | " + " | ".join(f"t = {t}" for t in cols) + " |\n"
            + "|---|---|" + "---|" * len(cols) + "\n")
    out = ""
    for title, key, at_step in TABLES:
        rows = [f"| {POLICIES[p]} | {r['scene_px']}/{r['canvas_grid']}² | "
                + " | ".join(at_step(r[p], t) for t in cols) + " |"
                for r in res for p in POLICIES if p in r and key in r[p]]
        if rows:
            out += f"**{title}**\n\n{head}" + "\n".join(rows) + "\n\n"
    for r in res:
        curves = {f"{POLICIES[p]}, {r['scene_px']}/{r['canvas_grid']}²": r[p]["anytime"]
                  for p in POLICIES if p in r and "anytime" in r[p]}
        if curves:
            out += ("**Stop when sure** (zero-shot): top-1 (%) (mean glimpses a scene) when a rollout "
                    "ends at the first glimpse whose top class probability reaches p\n\n"
                    + anytime_table(curves) + "\n")
    for r in res:
        for what, keys in (("Passive teacher (probes on its whole-scene features)",
                            ("teacher_miou", "teacher_top1")),
                           ("Floor (the most frequent class everywhere)",
                            ("floor_miou", "floor_top1"))):
            ref = [f"{name} {cell(r[key], 100)}%" for key, name in zip(keys, ("mIoU", "top-1"))
                   if key in r]
            if ref:
                out += f"{what} at {r['scene_px']}/{r['canvas_grid']}²: {', '.join(ref)}\n\n"
    return out

# ---- Driver ----------------------------------------------------------------------------------
def check_options(cfg) -> None:
    if {"learned", "learned_sampled"} & set(cfg.policies):
        raise EvalError("--policies: 'learned' and 'learned_sampled' come from a grpo checkpoint (--ckpt runs/<grpo run>/ckpt.pt)")
    bad = [p for p in (*cfg.policies, cfg.probe_policy) if p not in POLICIES]
    if bad or cfg.probe_policy == "entropy":
        raise EvalError(f"unknown policy {bad or ['entropy']} (the probes' policy cannot be "
                        f"entropy); valid: {', '.join(POLICIES)}")


def evaluate(source: dict | Path, cfg) -> tuple[dict, str]:
    """[003] Sec. 6, all metrics at all resolutions -> (results, markdown tables); PNGs: out_dir."""
    check_options(cfg)
    learned = None
    if isinstance(source, dict) and source["config"]["objective"] == "grpo":   # a learned policy
        g = source["config"]["grpo"]
        learned = (fovea.load_frozen(source, "policy", grpo.GazePolicy).to(device_of(cfg)), g["min_scale"],
                   g["policy"]["std_end"], g.get("first_gaze", "policy"))
        source = fovea.read_checkpoint(g["encoder"])
        # the policy's glimpse count by default; its rows beside the others at equal counts
        cfg = dataclasses.replace(cfg, T=cfg.T or g["steps"], policies=(*cfg.policies, "learned", "learned_sampled"))
    # CanViT's defaults: T = 21 glimpses ([003] F.2) at 1x and 2x the scene and grid (Table 6).
    cfg = dataclasses.replace(cfg, T=cfg.T or 21, res_factors=cfg.res_factors or (1, 2))
    device = device_of(cfg)
    model, teacher, info = load_canvit(source, cfg)
    for m in (model, teacher):
        if m is not None:
            m.to(device)
    snaps = snapshot(model, teacher)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = model.cfg.backbone.patch_size
    S0 = cfg.scene_size or info["data"].image_size
    G0 = cfg.canvas_grid or S0 // p
    results = {"checkpoint": str(cfg.ckpt), "objective": "distill", "step": info["step"],
               "config": dataclasses.asdict(cfg), "glimpse_px": info["glimpse_px"],
               "resolutions": []}
    if learned is not None:                   # the std of the sampled row: the policy's final one
        results["policy"] = {"std_sampled": learned[2]}
    gp = info["glimpse_px"]
    vp = canvit.Viewpoint(torch.zeros(1, 2, device=device), torch.ones(1, device=device))
    results["gflops"] = {"glimpse": gflops(lambda: model(torch.zeros(1, 3, gp, gp, device=device),
                                                         model.init_state(1, G0), *vp))}
    t_start = time.perf_counter()
    # NOTE(paper): each resolution gets its own probes: Table 6's 1024/64 rows use probes trained
    # at 1024/64 (the official probes are per scene size and canvas grid, "s512-c32").
    for k in cfg.res_factors:
        S, G = S0 * k, G0 * k
        if "entropy" in cfg.policies:
            try:
                canvit.EntropyGuidedC2F(cfg.T, G)                       # checks G against the tiles
            except ValueError as e:
                raise EvalError(f"entropy policy at {S}/{G}: {e}") from None
        t0 = time.perf_counter()
        train_ds, val_ds = datasets(cfg, info, S)
        feats = collect_features(model, teacher, train_ds, cfg, info, S, G)
        probes, logs = train_probes(model, feats, train_ds, cfg, device)
        stds, std_source = (fit_standardizers(model, feats, G) if teacher is not None
                            else (None, None))
        res, pics = evaluate_policies(model, teacher, probes, stds, val_ds, cfg, info, S, G, learned)
        losses = {name: {"first": l[0], "last_10pct": float(np.mean(l[-max(1, len(l) // 10):]))}
                  for name, l in logs.items()}
        res.update(scene_px=S, canvas_grid=G, standardizers=std_source, n_train=len(feats["cells"]),
                   probe_loss=losses)
        if cfg.pictures:
            K = getattr(val_ds, "num_segment_classes", None) if "seg" in probes else None
            res["pictures"] = save_pictures(pics, out / f"rollout_{S}px", K)
        curves = {POLICIES[p]: res[p]["anytime"] for p in POLICIES if p in res and "anytime" in res[p]}
        if curves:
            res.setdefault("pictures", []).append(save_curves(curves, out / f"anytime_{S}px.png"))
        results["resolutions"].append(res)
        del feats
        print(f"[{S}/{G}x{G}] done in {time.perf_counter() - t0:.0f} s; probe losses (first "
              "step -> last 10%): " + ", ".join(f"{n} {v['first']:.3f} -> {v['last_10pct']:.3f}"
                                         for n, v in losses.items()), flush=True)
    check_unchanged((model, teacher), snaps)                     # frozen: bit-identical weights
    results["frozen_check"] = "passed: model and teacher state dicts bit-identical after evaluation"
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    return results, tables(results)

