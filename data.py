"""Datasets: built-in synthetic scenes, Fashion-MNIST scenes, ImageNet-style folders, ADE20K
(papers 002, 000, 003).

Papers
  [002] Prisadnikov et al., "Vision encoders should be image size agnostic and task driven",
        arXiv 2508.16317.
  [000] "Self-supervised pretraining for an iterative image size agnostic vision transformer",
        arXiv 2604.20392.
  [003] Berreby et al., "CanViT: Toward Active-Vision Foundation Models".
  [RAM] Mnih et al., "Recurrent Models of Visual Attention", NIPS 2014 (cluttered translated MNIST).

Every dataset returns a dict per item, batched by `collate`: image (3, H, W) float32,
ImageNet-normalised; label () int64 (classification); mask (H, W) int64 (segmentation); index
(int); target (3,) float32 (synthetic, fashion_mnist: the target's centre (y, x) in [-1, 1] and
radius or half-side). A file that cannot be decoded yields {"index": i, "bad": "<path>: <reason>"}
instead, which `collate` drops and reports (`n_bad`, `bad`), in DataLoader workers too.

Datasets
  SyntheticScenes  the built-in default (no download possible on a fresh offline machine):
                   procedural scenes, deterministic per (seed, split, index), at any resolution.
                   A small "badge" carries a glyph, the label, among textured clutter: a low-
                   resolution view finds *where* it is, only a zoomed glimpse reads *what*.
  FashionMNISTScenes  Fashion-MNIST's items (Debian's dataset-fashion-mnist, offline) as plain,
                   cluttered translated [RAM] or object-centric scenes, exact at any resolution.
  ImageFolder      root/class/image.jpg; Resize + CenterCrop [003, Table 1 and App. D.2].
  ADE20K           ADEChallengeData2016 layout, resized directly to a square [003, App. F.2.1].

Shapes: H x W image, S scene side (H = W = S unless a (H, W) size is given), B batch.

Paper -> code
  003 Table 1, App. D.2   Resize(S) + CenterCrop(S), ImageNet norm   resize_center_crop, ImageFolder
  003 App. F.2.1          square resize; random resized crop [0.5, 2] + flip    ADE20K
  DESIGN.md "Data"        the built-in synthetic scenes                         render_scene
  RAM Sec. 4.1            cluttered translated scenes (here of Fashion-MNIST)   sample_layout, render_fashion
  LeCun's IDX format      the Fashion-MNIST files, checked                      read_idx, load_fashion_mnist

Run `python data.py` (pictures of sample scenes, out/*.png), `python bench.py data` (rendering
speed), `python -m pytest tests/test_data.py` (tests).
"""
from __future__ import annotations

import argparse
import colorsys
import gzip
import math
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


DATASETS = ("synthetic", "imagefolder", "ade20k", "fashion_mnist")


class DataError(ValueError):
    """A dataset that cannot be used as configured (a missing folder, an empty split, a class
    count that differs from the config's): train.py and eval.py print the message, no traceback."""


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # one of DATASETS
    root: str = ""              # imagefolder: holds train/ and val/ class folders; ade20k: ADEChallengeData2016;
                                # fashion_mnist: the four IDX files ('' = FASHION_MNIST_ROOT, Debian's)
    image_size: int = 128       # scene side S in pixels (paper 003: 512, Table 1)
    num_classes: int = 10       # synthetic: glyph classes (at most len(GLYPHS)); imagefolder: must match
                                # (0: any); fashion_mnist: 10
    length: int = 10_000        # synthetic, fashion_mnist: scenes in the train split
    val_length: int = 1_000     # synthetic, fashion_mnist: scenes in the val split
    seed: int = 0               # synthetic, fashion_mnist: scene seed
    target_min: float = 0.06    # synthetic: smallest target diameter, fraction of the image side
    target_max: float = 0.12    # synthetic: largest target diameter
    scene: str = "cluttered"    # fashion_mnist: plain | cluttered | crop (see "Fashion-MNIST scenes")
    item_min: float = 0.4375    # fashion_mnist: smallest item side, fraction of the scene side
                                # (28 / 64: RAM's unscaled 28 px item on a 64 px scene)
    item_max: float = 0.4375    # fashion_mnist: largest item side (object-centric scenes: 0.6-0.9)
    clutter: int = 4            # fashion_mnist: fragments a scene (RAM: 4 on 60 px, 8 on 100 px)
    fragment_px: int = 9        # fashion_mnist: fragment side in item pixels (RAM: 8)


# ---- Synthetic scenes: the generative process ------------------------------------------------
# A scene lives in continuous coordinates (y, x) in [-1, 1]^2 (DESIGN.md), and a pixel is the
# *area mean* of the scene over the pixel's box, computed analytically, so a render at any size
# is an anti-aliased view of the same scene: `render(i, 4S)` area-pooled 4x4 is `render(i, S)`
# up to the edge approximation below. Drawn in order, each later layer on top:
#   1. background: a random base colour plus 6 colour gratings cos(2 pi f.p + phi), |f| log-uniform
#      in [0.25, 16] cycles per unit (a grating's mean over a pixel (hy, hx) is the grating times
#      sinc(fy hy) sinc(fx hx), exactly).
#   2. clutter: 3 to 8 objects, each an ellipse, rectangle, triangle or star (mask classes 1-4;
#      0 is the background), of random size (radius 3%-17% of the side), aspect, rotation,
#      saturated colour and 0-2 fine gratings of its own, overlapping and leaving the image.
#   3. the target (mask class 5 + label): a badge (light disc, dark rim) of diameter target_size
#      (default 6%-12% of the side), fully inside the image, never occluded, holding a dark glyph
#      (GLYPHS[label]; clutter has none) rotated by up to +-15 degrees. Its strokes are 0.5%-2.6%
#      of the side wide (the fewer, the wider): at a low resolution the badge is visible (where
#      to look) but not the glyph (what it is): at 128 px the larger glyphs are just legible, at
#      64 px none is. Every glyph covers the same ink area: the mean colour gives nothing away.
# Edges use the signed distance d to the shape and the pixel size h: coverage
# clip(1/2 - d/h, 0, 1), the exact area fraction for a straight edge along a pixel axis.

CLUTTER_KINDS = ("ellipse", "rectangle", "triangle", "star")  # segment classes 1..4
TARGET_SEGMENT = 1 + len(CLUTTER_KINDS)                       # segment of class c: TARGET_SEGMENT + c

# Glyphs in the unit disc, (y, x) with y down: line segments (y0, x0, y1, x1) (a dot is a
# zero-length segment) and rings (cy, cx, radius). Stroke widths come from `_glyph_widths`.
GLYPHS = (
    ("plus", ((-.7, 0, .7, 0), (0, -.7, 0, .7)), ()),
    ("cross", ((-.5, -.5, .5, .5), (-.5, .5, .5, -.5)), ()),
    ("ring", (), ((0, 0, .55),)),
    ("equals", ((-.32, -.6, -.32, .6), (.32, -.6, .32, .6)), ()),
    ("pipes", ((-.6, -.32, .6, -.32), (-.6, .32, .6, .32)), ()),
    ("tee", ((-.55, -.6, -.55, .6), (-.55, 0, .65, 0)), ()),
    ("ell", ((-.65, -.4, .55, -.4), (.55, -.4, .55, .55)), ()),
    ("vee", ((-.55, -.6, .55, 0), (.55, 0, -.55, .6)), ()),
    ("triangle", ((-.6, 0, .45, -.6), (.45, -.6, .45, .6), (.45, .6, -.6, 0)), ()),
    ("dots", ((-.5, -.5, -.5, -.5), (0, 0, 0, 0), (.5, .5, .5, .5)), ()),
    ("square", ((-.5, -.5, -.5, .5), (-.5, .5, .5, .5), (.5, .5, .5, -.5), (.5, -.5, -.5, -.5)), ()),
    ("aitch", ((-.6, -.45, .6, -.45), (-.6, .45, .6, .45), (0, -.45, 0, .45)), ()),
    ("zed", ((-.5, -.5, -.5, .5), (-.5, .5, .5, -.5), (.5, -.5, .5, .5)), ()),
    ("arrow", ((-.65, 0, .65, 0), (-.65, 0, -.15, -.5), (-.65, 0, -.15, .5)), ()),
    ("bullseye", ((0, 0, 0, 0),), ((0, 0, .6),)),
    ("minus", ((0, -.6, 0, .6),), ()),
)
GLYPH_INK_AREA = 0.9    # ink area of every glyph in glyph units (its unit disc has area pi)


def num_segment_classes(num_classes: int) -> int:
    """Mask classes of SyntheticScenes: background, 4 clutter kinds, one target per class."""
    return TARGET_SEGMENT + num_classes


def _skeleton_distance(y: np.ndarray, x: np.ndarray, glyph: int) -> np.ndarray:
    """Distance from points (y, x) (any broadcastable shape) to GLYPHS[glyph]'s skeleton."""
    _, segments, rings = GLYPHS[glyph]
    d = np.full(np.broadcast_shapes(y.shape, x.shape), np.inf, np.float32)
    for y0, x0, y1, x1 in segments:
        by, bx = y1 - y0, x1 - x0
        t = np.clip(((y - y0) * by + (x - x0) * bx) / max(by * by + bx * bx, 1e-12), 0, 1)
        d = np.minimum(d, np.hypot(y - y0 - t * by, x - x0 - t * bx))
    for cy, cx, r in rings:
        d = np.minimum(d, np.abs(np.hypot(y - cy, x - cx) - r))
    return d


def _glyph_widths() -> np.ndarray:
    """Half stroke width per glyph such that its ink area is GLYPH_INK_AREA (a distance quantile)."""
    c = (np.arange(256, dtype=np.float32) + 0.5) / 128 - 1
    return np.array([np.quantile(_skeleton_distance(c[:, None], c[None, :], g), GLYPH_INK_AREA / 4)
                     for g in range(len(GLYPHS))], np.float32)


GLYPH_WIDTHS = _glyph_widths()


def _coverage(d: np.ndarray, h: float) -> np.ndarray:
    """Area fraction of a pixel of side h covered by {signed distance < 0}, for a straight edge."""
    return np.clip(0.5 - d / h, 0.0, 1.0)


def _stroke_coverage(s: np.ndarray, w: float, h: float) -> np.ndarray:
    """Area fraction of a pixel (side h, centre at distance s >= 0 from a stroke's axis) covered
    by the stroke of half-width w: the 1-D overlap of [s - h/2, s + h/2] with [-w, w]."""
    return np.clip((np.minimum(s + h / 2, w) - np.maximum(s - h / 2, -w)) / h, 0.0, 1.0)


def _gratings(ys: np.ndarray, xs: np.ndarray, hy: float, hx: float, f: np.ndarray,
              phase: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Pixel-area means of sum_k amp_k cos(2 pi (f_k . (y, x)) + phase_k) on a pixel grid:
    ys: (h,), xs: (w,) pixel centres; f: (K, 2) cycles per unit (fy, fx); phase: (K,); amp: (K, 3)
    -> (3, h, w) float32. Separable: cos(a + b) = cos a cos b - sin a sin b, so one (3h, 2K) x
    (2K, w) product; a pixel (hy, hx) mean multiplies a grating by sinc(fy hy) sinc(fx hx)."""
    att = np.sinc(f[:, 0] * hy) * np.sinc(f[:, 1] * hx)                           # (K,)
    ay = 2 * np.pi * f[:, 0, None] * ys[None, :]                                   # (K, h)
    bx = 2 * np.pi * f[:, 1, None] * xs[None, :] + phase[:, None]                  # (K, w)
    left = np.concatenate([np.cos(ay), -np.sin(ay)], 0).T                          # (h, 2K)
    right = np.concatenate([np.cos(bx), np.sin(bx)], 0)                            # (2K, w)
    a = np.concatenate([amp, amp], 0) * np.concatenate([att, att])[:, None]        # (2K, 3)
    left = (left[None] * a.T[:, None, :]).reshape(3 * len(ys), -1)                 # (3h, 2K)
    # einsum, not @: numpy's BLAS starts its own threads, which fight the training loop's (and
    # other workers') threads for the cores; einsum's own loop is single-threaded and as fast here.
    out = np.einsum("ik,kj->ij", left.astype(np.float32), right.astype(np.float32))  # (3h, w)
    return out.reshape(3, len(ys), len(xs))                                        # (3, h, w)


TARGET_MARGIN = 1.1                # the badge's centre keeps 1.1 radii from every edge
TARGET_MAX = 1 / TARGET_MARGIN     # so its diameter is at most 1 / 1.1 of the side


def _colour(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*s), rng.uniform(*v)), np.float32)


def _random_gratings(rng: np.random.Generator, k: int, f_lo: float, f_hi: float, sigma: float):
    """k gratings: |f| log-uniform in [f_lo, f_hi] cycles per unit, random direction and phase,
    colour amplitudes N(0, sigma) shrinking with frequency. Returns (f (k, 2), phase (k,), amp (k, 3))."""
    mag = np.exp(rng.uniform(math.log(f_lo), math.log(f_hi), k))
    ang = rng.uniform(0, np.pi, k)
    f = np.stack([mag * np.sin(ang), mag * np.cos(ang)], 1)
    amp = rng.normal(0, sigma, (k, 3)) / (1 + mag[:, None] / 4)
    return f, rng.uniform(0, 2 * np.pi, k), amp


SPLITS = ("train", "val", "test")   # a scene's split is part of its seed


def sample_scene(index: int, seed: int = 0, split: str = "train", num_classes: int = 10,
                 target_size: tuple[float, float] = (0.06, 0.12),
                 clutter: tuple[int, int] = (3, 8)) -> dict:
    """The random parameters of scene `index`: a pure function of (seed, split, index), not of
    the resolution, so every render of the scene shows the same content."""
    if not 1 <= num_classes <= len(GLYPHS):
        raise ValueError(f"num_classes must be in [1, {len(GLYPHS)}] (one glyph per class), got {num_classes}")
    if not 0 < target_size[0] <= target_size[1] <= TARGET_MAX:
        raise ValueError(f"target_size {target_size}: badge diameters must satisfy 0 < min <= max <= "
                         f"{TARGET_MAX:.3f} of the side (the badge and its margin must fit in the scene)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    label = int(rng.integers(num_classes))
    background = (_colour(rng, (0.0, 0.6), (0.3, 0.8)),
                  *_random_gratings(rng, 6, 0.25, 16.0, rng.uniform(0.03, 0.15)))
    objects = []
    for _ in range(int(rng.integers(clutter[0], clutter[1] + 1))):
        kind = int(rng.integers(len(CLUTTER_KINDS)))
        r = math.exp(rng.uniform(math.log(0.06), math.log(0.35)))              # radius, scene units
        angles = np.linspace(0, 2 * np.pi, 4, endpoint=False)[:3] + rng.uniform(-0.35, 0.35, 3)
        objects.append(dict(
            kind=kind, cy=rng.uniform(-1.1, 1.1), cx=rng.uniform(-1.1, 1.1), r=r,
            aspect=rng.uniform(0.4, 1.0), angle=rng.uniform(0, np.pi),
            triangle=np.stack([np.sin(angles), np.cos(angles)], 1) * rng.uniform(0.6, 1.0, (3, 1)),
            star=(int(rng.integers(3, 8)), rng.uniform(0.15, 0.5)),
            colour=_colour(rng, (0.35, 1.0), (0.25, 1.0)),
            texture=_random_gratings(rng, int(rng.integers(0, 3)), 3.0, 30.0, 0.25)))
    radius = rng.uniform(*target_size)          # diameter fraction of the side = radius in units
    cy, cx = rng.uniform(-1 + radius * TARGET_MARGIN, 1 - radius * TARGET_MARGIN, 2)
    target = dict(cy=cy, cx=cx, r=radius, angle=rng.uniform(-np.pi / 12, np.pi / 12),
                  fill=_colour(rng, (0.0, 0.25), (0.85, 1.0)), ink=_colour(rng, (0.0, 0.6), (0.0, 0.2)))
    return dict(label=label, background=background, objects=objects, target=target)


# ---- Synthetic scenes: rendering -------------------------------------------------------------
def _span(c: float, rb: float, lo: float, step: float, n: int) -> slice:
    """Pixels whose centres lie within rb (+ one pixel) of c, along one axis starting at lo."""
    i0 = max(int(math.floor((c - rb - lo) / step - 1.5)), 0)
    i1 = min(int(math.ceil((c + rb - lo) / step + 0.5)), n)
    return slice(i0, max(i0, i1))


def _clutter_distance(o: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of clutter object o at local rotated coordinates (u, v)."""
    r, a = o["r"], o["aspect"]
    kind = CLUTTER_KINDS[o["kind"]]
    if kind == "ellipse":  # the usual approximation k0 (k0 - 1) / k1 of the ellipse distance
        k0 = np.hypot(u / r, v / (r * a))
        k1 = np.hypot(u / r ** 2, v / (r * a) ** 2)
        return k0 * (k0 - 1) / np.maximum(k1, 1e-9)
    if kind == "star":     # rho - R(phi), divided by |grad| so it is a distance near the edge
        k, m = o["star"]
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        R = r * (1 + m * np.cos(k * phi)) / (1 + m)
        dR = -r * m * k * np.sin(k * phi) / (1 + m)
        return (rho - R) / np.sqrt(1 + (dR / np.maximum(rho, 1e-6)) ** 2)
    if kind == "rectangle":
        verts = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]], np.float32) * [r, r * a]
    else:
        verts = o["triangle"] * r
    # Convex polygon: max over edges of the signed distance to the edge's line.
    d = np.full(np.broadcast_shapes(u.shape, v.shape), -np.inf, np.float32)
    centroid = verts.mean(0)
    for p, q in zip(verts, np.roll(verts, -1, 0)):
        n = np.array([q[1] - p[1], p[0] - q[0]]) / np.hypot(*(q - p))
        n = -n if n @ (centroid - p) > 0 else n
        d = np.maximum(d, (u - p[0]) * n[0] + (v - p[1]) * n[1])
    return d


class Scene(NamedTuple):
    image: np.ndarray    # (H, W, 3) float32 in [0, 1]
    label: int
    mask: np.ndarray     # (H, W) int64 segment classes
    target: np.ndarray   # (3,) float32: the badge's centre (y, x) in [-1, 1] and radius


def render_params(p: dict, size: int | tuple[int, int],
                  window: tuple[float, float, float, float] = (-1.0, -1.0, 1.0, 1.0)) -> Scene:
    """Render sampled scene parameters `p` (from `sample_scene`) at `size` pixels, S or (H, W).
    window: the scene rectangle (y0, x0, y1, x1) shown (a smaller one: a zoomed glimpse at full
    detail); a non-square size stretches it, as DESIGN.md's [-1, 1]^2 image coordinates do."""
    H, W = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    y0, x0, y1, x1 = window
    hy, hx = (y1 - y0) / H, (x1 - x0) / W
    h = math.sqrt(hy * hx)                                   # pixel side for edge coverage
    ys = (y0 + (np.arange(H) + 0.5) * hy).astype(np.float32)   # (H,) pixel centres
    xs = (x0 + (np.arange(W) + 0.5) * hx).astype(np.float32)   # (W,)
    base, f, phase, amp = p["background"]
    img = _gratings(ys, xs, hy, hx, f, phase, amp) + base[:, None, None]          # (3, H, W)
    mask = np.zeros((H, W), np.int64)
    for o in p["objects"]:
        bound = o["r"] * (math.sqrt(2) if CLUTTER_KINDS[o["kind"]] == "rectangle" else 1.0)
        sl = (_span(o["cy"], bound, y0, hy, H), _span(o["cx"], bound, x0, hx, W))
        if sl[0].start == sl[0].stop or sl[1].start == sl[1].stop:
            continue
        dy, dx = ys[sl[0], None] - o["cy"], xs[None, sl[1]] - o["cx"]             # (h, 1), (1, w)
        c, s = math.cos(o["angle"]), math.sin(o["angle"])
        alpha = _coverage(_clutter_distance(o, c * dy + s * dx, c * dx - s * dy), h)  # (h, w)
        colour = o["colour"][:, None, None] + _gratings(ys[sl[0]], xs[sl[1]], hy, hx, *o["texture"])
        region = img[(slice(None),) + sl]                                            # (3, h, w) view
        region += alpha * (colour - region)                                            # alpha blend
        mask[sl][alpha >= 0.5] = 1 + o["kind"]
    t, label = p["target"], p["label"]
    sl = (_span(t["cy"], t["r"], y0, hy, H), _span(t["cx"], t["r"], x0, hx, W))
    if sl[0].start < sl[0].stop and sl[1].start < sl[1].stop:
        rim, g = 0.1 * t["r"], 0.7 * t["r"]                   # dark rim width, glyph disc radius
        w = GLYPH_WIDTHS[label] * g                           # stroke half-width
        # Strokes thinner than a pixel: the straight-edge coverage errs at stroke ends and joins,
        # so the badge (a few pixels then) is supersampled k x k, sub-pixels no wider than w / 2.
        k = min(16, math.ceil(2 * h / w))
        off = (np.arange(k, dtype=np.float32) + 0.5) / k - 0.5                        # (k,)
        dy = (ys[sl[0], None] + off * hy).reshape(-1, 1) - t["cy"]                    # (h k, 1)
        dx = (xs[sl[1], None] + off * hx).reshape(1, -1) - t["cx"]                    # (1, w k)
        rho = np.hypot(dy, dx)
        c, s = math.cos(t["angle"]), math.sin(t["angle"])
        skel = _skeleton_distance((c * dy + s * dx) / g, (c * dx - s * dy) / g, label)
        ink = np.maximum(_coverage(t["r"] - rim - rho, h / k), _stroke_coverage(skel * g, w, h / k))
        disc = _coverage(rho - t["r"], h / k)                                          # (h k, w k)
        fill, dark = t["fill"][:, None, None], t["ink"][:, None, None]                 # (3, 1, 1)
        n = (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        alpha = disc.reshape(n[0], k, n[1], k).mean((1, 3))                            # (h, w)
        colour = (disc * (fill + ink * (dark - fill))).reshape(3, n[0], k, n[1], k).mean((2, 4))
        img[(slice(None),) + sl] = img[(slice(None),) + sl] * (1 - alpha) + colour     # premultiplied
        mask[sl][alpha >= 0.5] = TARGET_SEGMENT + label
    image = np.clip(img, 0.0, 1.0).transpose(1, 2, 0)                             # (H, W, 3)
    return Scene(image, label, mask, np.array([t["cy"], t["cx"], t["r"]], np.float32))


def render_scene(index: int, size: int | tuple[int, int], seed: int = 0, split: str = "train",
                 num_classes: int = 10, target_size: tuple[float, float] = (0.06, 0.12),
                 clutter: tuple[int, int] = (3, 8),
                 window: tuple[float, float, float, float] = (-1.0, -1.0, 1.0, 1.0)) -> Scene:
    """Scene `index` of the synthetic dataset (seed, split) rendered at `size` (S or (H, W))."""
    p = sample_scene(index, seed, split, num_classes, target_size, clutter)
    return render_params(p, size, window)


def _normalise(image: np.ndarray) -> Tensor:
    """(H, W, 3) float in [0, 1] or uint8 -> (3, H, W) float32 ImageNet-normalised."""
    x = torch.from_numpy(np.require(image, requirements="CW")).permute(2, 0, 1).float()  # (3, H, W)
    if image.dtype == np.uint8:
        x = x / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


class SyntheticScenes(Dataset):
    """The built-in synthetic scenes (see "Synthetic scenes: the generative process" above),
    deterministic per (seed, split, index) in any process; image_size S or (H, W). Item i: image
    (3, H, W) float32 normalised, label () int64 in [0, num_classes), mask (H, W) int64 in
    [0, num_segment_classes), index i, target (3,) float32 (badge centre y, x, radius)."""
    def __init__(self, length: int, image_size: int | tuple[int, int], num_classes: int = 10,
                 seed: int = 0, split: str = "train", target_size: tuple[float, float] = (0.06, 0.12),
                 clutter: tuple[int, int] = (3, 8)):
        sample_scene(0, seed, split, num_classes, target_size, clutter)   # validates the arguments
        self.length, self.image_size, self.num_classes = length, image_size, num_classes
        self.seed, self.split, self.target_size, self.clutter = seed, split, target_size, clutter
        self.num_segment_classes = num_segment_classes(num_classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} scenes")
        s = render_scene(i, self.image_size, self.seed, self.split, self.num_classes,
                         self.target_size, self.clutter)
        return {"image": _normalise(s.image), "label": torch.tensor(s.label, dtype=torch.int64),
                "mask": torch.from_numpy(s.mask), "index": i, "target": torch.from_numpy(s.target)}

    def swapped(self, i: int) -> dict:
        """Scene i with only its object changed: the glyph of class (label + 1 + i mod (C - 1))
        mod C in the same badge, on the same background and clutter. The other class's scene
        tells what a representation owes to the object (eval.py's object share). Item as
        __getitem__'s, without the mask."""
        if self.num_classes < 2:
            raise ValueError("swapped scenes need at least 2 classes (another glyph to draw)")
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} scenes")
        p = sample_scene(i, self.seed, self.split, self.num_classes, self.target_size, self.clutter)
        p["label"] = (p["label"] + 1 + i % (self.num_classes - 1)) % self.num_classes
        s = render_params(p, self.image_size)
        return {"image": _normalise(s.image), "label": torch.tensor(s.label, dtype=torch.int64),
                "index": i, "target": torch.from_numpy(s.target)}


# ---- Decoding real images with Pillow: any mode -> RGB; bad files become "bad" items ---------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff",
                    ".webp", ".gif")
ALPHA_BACKGROUND = (255, 255, 255)   # transparent pixels are composited on white, as viewers show them


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. 16/32-bit grey ("I;16*", "I", "F") is scaled to 8 bits (Pillow's
    own convert would clip it): "I;16*" by 1/257; "I" and "F" by 1/257 when within [0, 65535] but
    above 255, "F" by 255 when within [0, 1], as-is when within [0, 255], else min-max. Alpha
    ("RGBA", "LA", "PA", palette transparency) is composited on ALPHA_BACKGROUND. CMYK, YCbCr,
    palette, 1-bit and grey go through Pillow's convert."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode.startswith("I;16") or (0 <= lo and 255 < hi <= 65535):
            a = a / 257.0
        elif im.mode == "F" and 0 <= lo and hi <= 1:
            a = a * 255.0
        elif lo < 0 or hi > 65535:
            a = (a - lo) / max(hi - lo, 1e-12) * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: str, min_side: int = 0, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path` fully (raises on any problem), in its own mode. min_side > 0: a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= min_side ("draft"
    mode: huge JPEGs are cheap). Any other image of more than max_pixels pixels raises instead of
    filling memory; one beyond twice Pillow's MAX_IMAGE_PIXELS raises
    Image.DecompressionBombError when opened."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # handled by the size check
        with Image.open(path) as im:
            if min_side > 0 and im.format == "JPEG":
                im.draft(im.mode if im.mode in ("L", "RGB") else None, (min_side, min_side))
            if im.size[0] * im.size[1] > max_pixels:
                raise ValueError(f"{im.size[0]}x{im.size[1]} pixels is more than max_pixels={max_pixels}")
            im.load()
            return im.copy()                                  # detached from the file it closes


def _bad(index: int, path: str, e: BaseException) -> dict:
    return {"index": index, "bad": f"{path}: {type(e).__name__}: {e}"}


# ---- ImageFolder [003, Table 1, App. D.2]: Resize(S) + CenterCrop(S), ImageNet norm ----------
def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size (bilinear, antialiased), then the centre size x size crop, as
    torchvision's Resize(size) + CenterCrop(size). Done as one resize of the source box that
    the crop covers: the same sample positions and filter, without resizing the unused border."""
    w, h = im.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return im.resize((size, size), Image.BILINEAR, box=box)


def random_resized_crop_box(rng: np.random.Generator, W: int, H: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The crop box (left, top, right, bottom) of torchvision's RandomResizedCrop: an area
    fraction ~ U(scale) and a log-uniform aspect ratio in `ratio`, up to 10 tries to fit the
    image, else the central crop of the nearest allowed aspect ratio."""
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            return left, top, left + w, top + h
    if W / H < ratio[0]:
        w, h = W, round(W / ratio[0])
    elif W / H > ratio[1]:
        w, h = round(H * ratio[1]), H
    else:
        w, h = W, H
    left, top = (W - w) // 2, (H - h) // 2
    return left, top, left + w, top + h


class ImageFolder(Dataset):
    """root/<class>/**/<image> (classes are the sorted folder names), as torchvision's.

    Item i: image (3, S, S) float32 normalised, label () int64, index i; or, when the file
    cannot be decoded (truncated, empty, not an image, too large), {"index": i, "bad": reason}.
    Files without an image extension are listed in `self.ignored`. Paths (UTF-8 bytes) and
    labels are numpy arrays: lists of objects would be copied into every worker (refcounts).

    augment=False: Resize(S) + CenterCrop(S) [003, Table 1]. augment=True: ImageNet's training
    view, RandomResizedCrop(S, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip with p 1/2
    ([002] Sec. 2 calls random resized crops "very important" for ViTs). NOTE(paper): the papers
    give no details; as DeiT, the crop is resized bicubically, and nothing else of DeiT's recipe
    (RandAugment, random erasing, CutMix) is applied: [002] A.3.4 names only MixUp. Draws depend
    on (seed, epoch, index) (`set_epoch`), not on the worker: a resumed run sees the same crops."""
    def __init__(self, root: str, image_size: int, max_pixels: int = Image.MAX_IMAGE_PIXELS,
                 augment: bool = False, seed: int = 0):
        if not os.path.isdir(root):
            raise DataError(f"{root!r} is not a folder: data.root must hold train/ and val/, each with "
                            "one folder of images per class (root/train/<class>/<image>)")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"no class folders in {root!r} (expected {root}/<class>/<image>)")
        paths, labels, self.ignored = [], [], []
        for label, name in enumerate(self.classes):
            for folder, subfolders, files in os.walk(os.path.join(root, name), followlinks=True):
                subfolders.sort()
                for f in sorted(files):
                    path = os.path.join(folder, f)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                        paths.append(path.encode())
                        labels.append(label)
                    else:
                        self.ignored.append(path)
        if not paths:
            raise DataError(f"no images under {root!r} (the split is empty; image extensions: "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        self.paths, self.labels = np.array(paths), np.array(labels, np.int64)
        self.image_size, self.max_pixels, self.num_classes = image_size, max_pixels, len(self.classes)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations to draw (set before each epoch's DataLoader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path, label = self.paths[i].decode(), int(self.labels[i])
        S = self.image_size
        try:
            if not self.augment:
                im = resize_center_crop(to_rgb(load_image(path, S, self.max_pixels)), S)
            else:
                # Decode big JPEGs at a reduced scale that still gives the smallest crop
                # (8% of the area) about S pixels a side.
                im = to_rgb(load_image(path, math.ceil(S / math.sqrt(0.08)), self.max_pixels))
                rng = np.random.default_rng([self.seed, self.epoch, i])
                im = im.resize((S, S), Image.BICUBIC, box=random_resized_crop_box(rng, *im.size))
                if rng.uniform() < 0.5:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
            image = _normalise(np.asarray(im))
        except Exception as e:  # any decoding failure is a bad file: counted, never fatal
            return _bad(i, path, e)
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64), "index": i}


# ---- ADE20K (SceneParse150) segmentation [003, App. F.2.1] -----------------------------------
ADE20K_IGNORE = 255
# Annotation PNG values: 0 = "other" (not one of the 150 classes), 1..150 the classes. Training
# labels: 1..150 -> 0..149, and 0 (or anything above 150) -> 255, the ignore index.
_ADE20K_LUT = np.full(256, ADE20K_IGNORE, np.int64)
_ADE20K_LUT[1:151] = np.arange(150)


class ADE20K(Dataset):
    """ADEChallengeData2016: root/images/<split>/*.jpg with root/annotations/<split>/*.png,
    split "training" or "validation". Item i: image (3, S, S) float32 normalised, mask (S, S)
    int64 in 0..149 or 255 (ignore), index i; or a "bad" item (see ImageFolder).
    [003, F.2.1] resizes every image directly to S x S, aspect ratio not kept (mask: nearest).
    augment=True (probe training, F.2.1): a random resized crop of scale r ~ U[0.5, 2.0] and a
    horizontal flip with probability 1/2, drawn as a function of (seed, epoch, index)."""
    num_classes = num_segment_classes = 150
    ignore_index = ADE20K_IGNORE

    def __init__(self, root: str, split: str = "training", image_size: int = 512, augment: bool = False,
                 seed: int = 0):
        if split not in ("training", "validation"):
            raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
        images, annotations = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
        for d in (images, annotations):
            if not os.path.isdir(d):
                raise DataError(f"{d!r} not found: data.root must be the ADEChallengeData2016 folder "
                                "(images/ and annotations/, each with training/ and validation/)")
        stems = sorted(f[:-4] for f in os.listdir(images) if f.lower().endswith(".jpg"))
        missing = [s for s in stems if not os.path.isfile(os.path.join(annotations, s + ".png"))]
        if missing or not stems:
            raise DataError(f"{len(stems)} images in {images!r}, {len(missing)} without an "
                                    f"annotation in {annotations!r} (e.g. {missing[:3]})")
        self.samples = [(os.path.join(images, s + ".jpg"), os.path.join(annotations, s + ".png")) for s in stems]
        self.image_size, self.augment, self.seed, self.epoch = image_size, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image_path, mask_path = self.samples[i]
        try:
            im = to_rgb(load_image(image_path))
            ann = load_image(mask_path)
            if ann.mode not in ("L", "P") or ann.size != im.size:
                raise ValueError(f"annotation is {ann.mode} {ann.size}, expected L/P {im.size}")
        except Exception as e:  # any decoding failure is a bad file: counted, never fatal
            return _bad(i, image_path, e)
        S = self.image_size
        if not self.augment:
            image = _normalise(np.asarray(im.resize((S, S), Image.BILINEAR)))
            mask = torch.from_numpy(_ADE20K_LUT[np.asarray(ann.resize((S, S), Image.NEAREST))])
            return {"image": image, "mask": mask, "index": i}
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, mask = _random_resized_crop(im, ann, S, rng)
        if rng.uniform() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return {"image": image, "mask": mask, "index": i}


def _random_resized_crop(im: Image.Image, ann: Image.Image, S: int, rng: np.random.Generator,
                         scale: tuple[float, float] = (0.5, 2.0)) -> tuple[Tensor, Tensor]:
    """Resize image and annotation to n x n, n = round(r S), r ~ U[scale], then take a random
    S x S window: a crop when n >= S; when n < S, the scene is placed at a random offset inside
    the window, on the mean colour (0 after normalisation) with the ignore label. Returns image
    (3, S, S) float32 normalised and mask (S, S) int64.
    NOTE(paper): F.2.1 says "random resized crop with scale range [0.5, 2.0]"; a crop scale
    above 1 only makes sense as the mmsegmentation / DINOv3 recipe it follows (random rescale by
    a ratio in [0.5, 2], then a random crop of the target size, padded with ignore), on a square."""
    n = max(1, round(rng.uniform(*scale) * S))
    W, H = im.size
    if n >= S:
        oy, ox = (int(v) for v in rng.integers(0, n - S + 1, 2))
        # The window [oy, oy + S) x [ox, ox + S) of the n x n resize, as a box in source pixels:
        # one resize of just that box samples exactly where the full resize + crop would.
        box = (ox * W / n, oy * H / n, (ox + S) * W / n, (oy + S) * H / n)
        image = _normalise(np.asarray(im.resize((S, S), Image.BILINEAR, box=box)))
        mask = torch.from_numpy(_ADE20K_LUT[np.asarray(ann.resize((S, S), Image.NEAREST, box=box))])
        return image, mask
    oy, ox = (int(v) for v in rng.integers(0, S - n + 1, 2))
    image = torch.zeros(3, S, S)
    mask = torch.full((S, S), ADE20K_IGNORE, dtype=torch.int64)
    image[:, oy:oy + n, ox:ox + n] = _normalise(np.asarray(im.resize((n, n), Image.BILINEAR)))
    mask[oy:oy + n, ox:ox + n] = torch.from_numpy(_ADE20K_LUT[np.asarray(ann.resize((n, n), Image.NEAREST))])
    return image, mask


# ---- Fashion-MNIST scenes: IDX files; plain, cluttered translated [RAM], item crops ----------
# Fashion-MNIST (Xiao, Rasul and Vollgraf, arXiv 1708.07747): 60,000 training and 10,000 test
# photographs of clothing, 28 x 28 grey, 10 classes, in four IDX files. The train split's scenes
# are made only of the 60k training items, the val split's only of the 10k test items, clutter
# included: the two never share an item.
#
# A scene is defined in scene units (y, x) in [-1, 1]^2 (DESIGN.md) and is piecewise constant:
# an item is a square of 28 x 28 constant cells, a clutter fragment a smaller square of them, the
# background black; where layers overlap the scene is their maximum (a fragment never darkens the
# item). A pixel is the exact area mean of the scene over the pixel's box: all layers' cell edges
# cut the window into a non-uniform grid on which the scene is constant, and one (S, C) matrix of
# overlaps per axis averages it onto the pixels. So a render at 2S box-downsampled 2 x 2 is the
# render at S up to float rounding, and the resolution sweeps see one scene at every size.
#
# Scene kinds (data.scene):
#   plain      the item fills the scene, nothing else: at 28 px the dataset's image itself, the
#              sanity anchor against the dataset's own benchmark table.
#   cluttered  [RAM] Sec. 4.1's cluttered translated protocol: the item, its side uniform in
#              [item_min, item_max] of the scene side, at a uniformly random place fully inside
#              the scene, plus `clutter` fragments (fragment_px x fragment_px crops, in item
#              pixels at a random place, of other random items of the split), each at a random
#              place fully inside the scene. Defaults: a 28 px item and 4 fragments of 9 px on a
#              64 px scene (RAM: 60 px and 4 fragments of 8 px; 100 px and 8). Object-centric
#              scenes are cluttered ones with item sides 0.6-0.9 and 2 fragments (OBJECT_CENTRIC,
#              dino_fmnist_tiny.yaml): the item fills most of any view, as an ImageNet
#              photograph's object does, so self-supervised views share it.
#   crop       the window of cluttered scene i on its item's square, fragments included, at S px:
#              the input of an "upper bound" passive ViT that is told where the item is.
# NOTE(paper): RAM's fragments are drawn at the digit's own scale; here too a fragment is drawn
# at the item's scale (its side is fragment_px / 28 of the item's), so that the clutter has the
# item's stroke widths whatever the item size.

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"   # Debian's package dataset-fashion-mnist
FASHION_MNIST_FILES = {                                     # split: (images, labels, items)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_HOWTO = (
    "get the files with `sudo apt-get install dataset-fashion-mnist` (Debian, Ubuntu: into "
    f"{FASHION_MNIST_ROOT}), or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
    "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion) into one folder and set "
    "data.root to it")
ITEM_PX = 28                              # an item's side in its own pixels
SCENES = ("plain", "cluttered", "crop")
OBJECT_CENTRIC = dict(item_size=(0.6, 0.9), clutter=2)   # the object-centric cluttered scenes


def read_idx(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The values of an IDX file of unsigned bytes that must hold an array of `shape` (.gz: read
    through gzip), as a read-only uint8 array; DataError naming the file and what was expected
    when it is missing, unreadable, of another type or shape, truncated or too long.

    IDX (LeCun's MNIST format): 4 magic bytes 0, 0, the type code (0x08: unsigned byte) and the
    number of dimensions; each dimension's size as a big-endian uint32; the values in C order."""
    want = f"IDX of unsigned bytes, {' x '.join(map(str, shape))}"
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: not found (expected {want})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:   # a cut or damaged gzip stream
        raise DataError(f"{path}: a truncated or damaged gzip file ({e}); expected {want}") from None
    except OSError as e:                                     # a folder, no permission
        raise DataError(f"{path}: cannot be read ({e}); expected {want}") from None
    head = 4 + 4 * len(shape)
    magic = bytes([0, 0, 0x08, len(shape)])
    if raw[:4] != magic:
        raise DataError(f"{path}: magic number 0x{raw[:4].hex()}, expected 0x{magic.hex()} ({want})")
    if len(raw) < head:
        raise DataError(f"{path}: {len(raw)} bytes, a truncated header (expected {want})")
    dims = struct.unpack(f">{len(shape)}I", raw[4:head])
    if dims != tuple(shape):
        raise DataError(f"{path}: dimensions {' x '.join(map(str, dims))}, expected {want}")
    n = math.prod(shape)
    if len(raw) - head != n:
        what = "truncated" if len(raw) - head < n else "longer than its header says"
        raise DataError(f"{path}: {len(raw) - head} values, expected {n} ({want}): the file is {what}")
    return np.frombuffer(raw, np.uint8, n, head).reshape(shape)


_FASHION_MNIST_LOADED: dict = {}   # (split, the files' paths, sizes and times) -> (images, labels)


def load_fashion_mnist(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The items of split "train" (the 60k file) or "val" (the 10k test file) in folder `root`
    ('' = FASHION_MNIST_ROOT): images (N, 28, 28) uint8, labels (N,) int64 in 0..9. Each file
    is NAME.gz or NAME; loaded once per process (47 MB for the 60k items) and kept (DataLoader
    workers inherit them). DataError (path, what was expected, how to get the files) for a
    missing or damaged file."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = root or FASHION_MNIST_ROOT
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a folder (expected the four Fashion-MNIST IDX files in it); "
                        f"{FASHION_MNIST_HOWTO}")
    image_name, label_name, n = FASHION_MNIST_FILES[split]
    paths = []
    for name in (image_name, label_name):
        gz = os.path.join(root, name + ".gz")
        paths.append(gz if os.path.exists(gz) or not os.path.exists(gz[:-3]) else gz[:-3])
    stats = [os.stat(p) if os.path.exists(p) else None for p in paths]
    key = (split, *((os.path.realpath(p), s and s.st_size, s and s.st_mtime_ns)
                    for p, s in zip(paths, stats)))
    if key not in _FASHION_MNIST_LOADED:
        try:
            images = read_idx(paths[0], (n, ITEM_PX, ITEM_PX))
            labels = read_idx(paths[1], (n,))
            K = len(FASHION_MNIST_CLASSES)
            if labels.max() >= K:
                raise DataError(f"{paths[1]}: a label {labels.max()}, expected 0 to {K - 1}")
        except DataError as e:
            raise DataError(f"{e}; {FASHION_MNIST_HOWTO}") from None
        _FASHION_MNIST_LOADED[key] = images, labels.astype(np.int64)
    return _FASHION_MNIST_LOADED[key]


def sample_layout(index: int, n_items: int, seed: int = 0, split: str = "train", scene: str = "cluttered",
                  item_size: tuple[float, float] = (0.4375, 0.4375), clutter: int = 4,
                  fragment_px: int = 9) -> dict:
    """Where scene `index` puts what: a pure function of (seed, split, index) and the settings.
    The item is index % n_items (a longer dataset shows the items again at new places). Returns
    item (int), box (cy, cx, h): the item's centre and half-side in scene units (h: also its side
    as a fraction of the scene's), and fragments: (j, top, left, cy, cx) for item j's crop at row
    top, column left (item pixels), centred at (cy, cx)."""
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")
    item = index % n_items
    if scene == "plain":
        return dict(item=item, box=(0.0, 0.0, 1.0), fragments=[])
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    h = rng.uniform(*item_size)                              # half-side = side / scene side
    cy, cx = rng.uniform(-1 + h, 1 - h, 2)                   # fully inside the scene
    hf = h * fragment_px / ITEM_PX                           # a fragment at the item's scale
    fragments = []
    for _ in range(clutter):
        j = int(rng.integers(n_items - 1))
        j += j >= item                                       # another item of the split
        top, left = (int(v) for v in rng.integers(0, ITEM_PX - fragment_px + 1, 2))
        fy, fx = rng.uniform(-1 + hf, 1 - hf, 2)
        fragments.append((j, top, left, fy, fx))
    return dict(item=item, box=(cy, cx, h), fragments=fragments)


def _cell_edges(starts: list[float], sides: list[float], cells: list[int], lo: float,
                hi: float) -> np.ndarray:
    """(C + 1,) sorted edges, within [lo, hi], of the cells of all layers along one axis: layer k
    spans [starts[k], starts[k] + sides[k]] in cells[k] equal cells."""
    edges = [np.array([lo, hi])] + [s + w * np.arange(n + 1) / n for s, w, n in zip(starts, sides, cells)]
    return np.unique(np.clip(np.concatenate(edges), lo, hi))


def _overlaps(edges: np.ndarray, lo: float, hi: float, size: int) -> np.ndarray:
    """(size, C): the fraction of pixel i's interval (size pixels across [lo, hi]) in cell c."""
    p = lo + (hi - lo) * np.arange(size + 1) / size                                  # (size + 1,)
    inner = np.minimum(p[1:, None], edges[None, 1:]) - np.maximum(p[:-1, None], edges[None, :-1])
    return np.clip(inner, 0.0, None) / (p[1:] - p[:-1])[:, None]                      # (size, C)


def render_layers(layers: list[tuple[np.ndarray, float, float, float]], size: int,
                  window: tuple[float, float, float, float] = (-1.0, -1.0, 1.0, 1.0)) -> np.ndarray:
    """Area means over size x size pixels of the window (y0, x0, y1, x1) of a black scene of
    square layers, each (values (n, n) in [0, 1], top y, left x, side in scene units), composited
    by their maximum. float64 throughout. Returns (size, size) float32."""
    y0, x0, y1, x1 = window
    tops, lefts, sides = ([layer[k] for layer in layers] for k in (1, 2, 3))
    cells = [len(layer[0]) for layer in layers]
    ey, ex = _cell_edges(tops, sides, cells, y0, y1), _cell_edges(lefts, sides, cells, x0, x1)
    my, mx = (ey[:-1] + ey[1:]) / 2, (ex[:-1] + ex[1:]) / 2                   # (Cy,), (Cx,) cell centres
    scene = np.zeros((len(my), len(mx)))                                       # (Cy, Cx) constant cells
    for values, top, left, side in layers:
        n = len(values)                                                        # the layer's cells i, j
        iy = np.floor((my - top) / side * n).astype(np.int64)                  # (Cy,)
        ix = np.floor((mx - left) / side * n).astype(np.int64)                 # (Cx,)
        in_y, in_x = (iy >= 0) & (iy < n), (ix >= 0) & (ix < n)
        covered = np.ix_(in_y, in_x)
        scene[covered] = np.maximum(scene[covered], values[np.ix_(iy[in_y], ix[in_x])])
    oy, ox = _overlaps(ey, y0, y1, size), _overlaps(ex, x0, x1, size)          # (S, Cy), (S, Cx)
    # einsum, not @: numpy's BLAS threads would fight the training loop's for the cores.
    rows = np.einsum("ic,cd->id", oy, scene)                                   # (S, Cx)
    return np.einsum("id,jd->ij", rows, ox).astype(np.float32)                 # (S, S)


def fashion_layers(images: np.ndarray, layout: dict, scene: str = "cluttered",
                   fragment_px: int = 9) -> tuple[list, list, tuple, np.ndarray]:
    """The layers of `layout` (from `sample_layout`) made of `images` (N, 28, 28) uint8: the
    item's and the fragments', the window rendered (the crop scene: the item's square), and the
    target (3,) float32, the item's centre (y, x) and half-side in that window's [-1, 1]."""
    cy, cx, h = layout["box"]
    item = [(images[layout["item"]] / 255.0, cy - h, cx - h, 2 * h)]
    side = 2 * h * fragment_px / ITEM_PX
    clutter = [(images[j, top:top + fragment_px, left:left + fragment_px] / 255.0,
                fy - side / 2, fx - side / 2, side) for j, top, left, fy, fx in layout["fragments"]]
    if scene == "crop":
        return item, clutter, (cy - h, cx - h, cy + h, cx + h), np.array([0, 0, 1], np.float32)
    return item, clutter, (-1.0, -1.0, 1.0, 1.0), np.array([cy, cx, h], np.float32)


def render_fashion(images: np.ndarray, layout: dict, size: int, scene: str = "cluttered",
                   fragment_px: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """The scene of `layout` at size x size px: grey (S, S) float32 in [0, 1] and the target."""
    item, clutter, window, target = fashion_layers(images, layout, scene, fragment_px)
    return render_layers(item + clutter, size, window), target


def fashion_mask(images: np.ndarray, layout: dict, label: int, size: int, scene: str = "cluttered",
                 fragment_px: int = 9) -> np.ndarray:
    """(S, S) int64 segment classes: 2 + label where the item shows, 1 where a clutter fragment
    does, 0 elsewhere. NOTE: Fashion-MNIST has no masks; a pixel shows a layer where that layer
    alone would be at least 0.1 bright there and the other no brighter (the silhouette, as the
    max compositing draws it)."""
    item, clutter, window, _ = fashion_layers(images, layout, scene, fragment_px)
    a = render_layers(item, size, window)
    b = render_layers(clutter, size, window) if clutter else np.zeros_like(a)
    return np.where((a >= 0.1) & (a >= b), 2 + label, np.where(b >= 0.1, 1, 0)).astype(np.int64)


def _grey_image(grey: np.ndarray) -> Tensor:
    """(S, S) grey in [0, 1] -> (3, S, S) normalised, grey in R, G and B."""
    return _normalise(np.repeat(grey[:, :, None], 3, axis=2))


class FashionMNISTScenes(Dataset):
    """Scenes of Fashion-MNIST items (see "Fashion-MNIST scenes" above) of one split: images
    (N, 28, 28) uint8 and labels (N,) int64 of that split only (load_fashion_mnist). Item i:
    image (3, S, S) float32 normalised (grey in R, G and B), label () int64 (the item's; clutter
    never counts), index i, target (3,) float32 (the item's centre y, x and half-side), mask
    (S, S) int64 (fashion_mask: 0 background, 1 clutter, 2 + label the item).
    Deterministic per (seed, split, index); the same scene at any image_size S. Not augmented:
    the random placement varies the views; plain scenes are the benchmark's unaugmented set."""
    num_classes = len(FASHION_MNIST_CLASSES)
    num_segment_classes = 2 + num_classes

    def __init__(self, images: np.ndarray, labels: np.ndarray, length: int, image_size: int,
                 scene: str = "cluttered", item_size: tuple[float, float] = (0.4375, 0.4375),
                 clutter: int = 4, fragment_px: int = 9, seed: int = 0, split: str = "train"):
        if images.ndim != 3 or images.shape[1:] != (ITEM_PX, ITEM_PX) or images.dtype != np.uint8 \
                or labels.shape != images.shape[:1]:
            raise ValueError(f"images must be (N, {ITEM_PX}, {ITEM_PX}) uint8 with (N,) labels, got "
                             f"{images.shape} {images.dtype} and {labels.shape}")
        if not 0 < item_size[0] <= item_size[1] <= 1:
            raise ValueError(f"item_size {item_size}: sides must satisfy 0 < min <= max <= 1 (of the "
                             "scene side)")
        if clutter < 0 or not 1 <= fragment_px <= ITEM_PX or (clutter and len(images) < 2):
            raise ValueError(f"clutter = {clutter} fragments of {fragment_px} px: need clutter >= 0, "
                             f"1 <= fragment_px <= {ITEM_PX} and, with clutter, at least 2 items")
        sample_layout(0, len(images), seed, split, scene, item_size, clutter, fragment_px)  # validates
        self.images, self.labels, self.length, self.image_size = images, labels, length, image_size
        self.scene, self.item_size, self.clutter, self.fragment_px = scene, item_size, clutter, fragment_px
        self.seed, self.split = seed, split

    def __len__(self) -> int:
        return self.length

    def layout(self, i: int) -> dict:
        """Where scene i puts what (`sample_layout` with this dataset's settings)."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} scenes")
        return sample_layout(i, len(self.images), self.seed, self.split, self.scene, self.item_size,
                             self.clutter, self.fragment_px)

    def render(self, i: int, size: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
        """Scene i at `size` px (default image_size): grey (S, S) float32, label, target (3,)."""
        layout = self.layout(i)
        grey, target = render_fashion(self.images, layout, size or self.image_size, self.scene,
                                      self.fragment_px)
        return grey, int(self.labels[layout["item"]]), target

    def __getitem__(self, i: int) -> dict:
        grey, label, target = self.render(i)
        mask = fashion_mask(self.images, self.layout(i), label, self.image_size, self.scene, self.fragment_px)
        return {"image": _grey_image(grey), "label": torch.tensor(label, dtype=torch.int64), "index": i,
                "target": torch.from_numpy(target), "mask": torch.from_numpy(mask)}

    def swapped(self, i: int) -> dict:
        """Scene i with only its item changed: an item of another class (drawn from (seed, split,
        i)) in the same square, with the same fragments. The other class's scene tells what a
        representation owes to the object (eval.py's object share). Item as __getitem__'s,
        without the mask."""
        layout = self.layout(i)
        others = np.flatnonzero(self.labels != self.labels[layout["item"]])
        if not len(others):
            raise ValueError("swapped scenes need items of at least 2 classes")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i, 1])
        layout["item"] = int(others[rng.integers(len(others))])
        grey, target = render_fashion(self.images, layout, self.image_size, self.scene, self.fragment_px)
        return {"image": _grey_image(grey),
                "label": torch.tensor(int(self.labels[layout["item"]]), dtype=torch.int64), "index": i,
                "target": torch.from_numpy(target)}


# ---- Batching and building from the config ---------------------------------------------------
def collate(samples: list[dict | None]) -> dict:
    """Batch dataset items: tensors stacked to (B, ...), ints to a (B,) int64 tensor, anything
    else listed. Bad items ({"bad": reason}) and None are dropped: the batch carries `n_bad`
    (int) and `bad` (list of reasons, each beginning with the file's path), so the training loop
    can sum them. When every item is bad the batch holds only n_bad and bad (B = 0): skip it,
    and under DDP still run the step's collectives (e.g. a zero loss) the other ranks wait on."""
    good = [s for s in samples if s is not None and "bad" not in s]
    batch: dict = {"n_bad": len(samples) - len(good),
                   "bad": [s["bad"] for s in samples if s is not None and "bad" in s]}
    if not good:
        return batch
    keys = good[0].keys()
    if any(s.keys() != keys for s in good):
        raise ValueError(f"items with different keys in one batch: {sorted({tuple(s) for s in good})}")
    for k in keys:
        values = [s[k] for s in good]
        if isinstance(values[0], Tensor):
            batch[k] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[k] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[k] = values
    return batch


def build_dataset(cfg: DataConfig, split: str = "train", augment: bool = False, seed: int = 0) -> Dataset:
    """The dataset of `cfg` for split "train" or "val". augment (train split only): ImageFolder's
    random resized crop + flip, ADE20K's F.2.1 augmentation, drawn from (seed, epoch, index).
    The synthetic scenes (val: their own random stream) are never augmented: they are endless
    already, and a mirrored glyph is not its class; nor are Fashion-MNIST's."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    augment = augment and split == "train"
    if cfg.dataset == "synthetic":
        return SyntheticScenes(cfg.length if split == "train" else cfg.val_length, cfg.image_size,
                               cfg.num_classes, cfg.seed, split, (cfg.target_min, cfg.target_max))
    elif cfg.dataset == "imagefolder":
        ds = ImageFolder(os.path.join(cfg.root, split), cfg.image_size, augment=augment, seed=seed)
        if cfg.num_classes and ds.num_classes != cfg.num_classes:
            raise DataError(f"data.num_classes = {cfg.num_classes}, but {os.path.join(cfg.root, split)!r} "
                            f"has {ds.num_classes} class folders: set --data.num_classes={ds.num_classes}")
        return ds
    elif cfg.dataset == "ade20k":
        return ADE20K(cfg.root, "training" if split == "train" else "validation", cfg.image_size,
                      augment=augment, seed=seed)
    elif cfg.dataset == "fashion_mnist":
        if cfg.num_classes != len(FASHION_MNIST_CLASSES):
            raise DataError(f"data.num_classes = {cfg.num_classes}, but Fashion-MNIST has "
                            f"{len(FASHION_MNIST_CLASSES)} classes")
        images, labels = load_fashion_mnist(cfg.root, split)
        return FashionMNISTScenes(images, labels, cfg.length if split == "train" else cfg.val_length,
                                  cfg.image_size, cfg.scene, (cfg.item_min, cfg.item_max), cfg.clutter,
                                  cfg.fragment_px, cfg.seed, split)
    raise DataError(f"data.dataset = {cfg.dataset!r}: one of {', '.join(DATASETS)}")


# ---- Demo (`python data.py`); the benchmarks are in bench.py ---------------------------------
def _save_rows(path: str, rows: list[list[np.ndarray]]) -> None:
    """Save rows of RGB tiles in [0, 1] as one picture, each tile framed in white."""
    framed = [np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=1) for t in row], 1)
              for row in rows]
    Image.fromarray((np.concatenate(framed, 0) * 255).round().astype(np.uint8)).save(path)


def save_grid(path: str, n: int = 6, size: int = 256, seed: int = 0) -> None:
    """One row per scene: the scene, its mask, a 64 px render (what a coarse view sees), and a
    zoomed render of the target window (what a glimpse on it sees)."""
    hues = [colorsys.hsv_to_rgb((k * 0.618) % 1.0, 0.7, 0.95) for k in range(1, num_segment_classes(len(GLYPHS)))]
    pal, rows = np.array([(0.0, 0.0, 0.0)] + hues), []                # mask colours, background black
    for i in range(n):
        p = sample_scene(i, seed)
        s = render_params(p, size)
        cy, cx, r = s.target
        zoom = render_params(p, size, (cy - 2 * r, cx - 2 * r, cy + 2 * r, cx + 2 * r)).image
        coarse = np.kron(render_params(p, 64).image, np.ones((size // 64, size // 64, 1)))
        rows.append([s.image, pal[s.mask], coarse, zoom])
    _save_rows(path, rows)


def save_fashion_grid(path: str, root: str = "", n: int = 6, scene_px: int = 64,
                      size: int = 128) -> list[str]:
    """One row per scene kind (plain, cluttered, object-centric, crop) of the first n val
    scenes, each rendered at `size` px (2x the scene_px scenes the tiny configs train on), the
    item's square outlined in olive on the cluttered rows. -> the classes of the cluttered row."""
    images, labels = load_fashion_mnist(root, "val")
    kinds = (("plain", {}), ("cluttered", {}), ("cluttered", OBJECT_CENTRIC), ("crop", {}))
    rows, names = [], []
    for scene, kw in kinds:
        ds = FashionMNISTScenes(images, labels, n, scene_px, scene, split="val", **kw)
        tiles = []
        for i in range(n):
            grey, label, (cy, cx, h) = ds.render(i, size)
            tile = np.repeat(grey[:, :, None], 3, axis=2)
            if scene == "cluttered":                    # outline the item's square
                box = (np.array([cy - h, cx - h, cy + h, cx + h]) + 1) / 2 * size
                y0, x0, y1, x1 = np.clip(box.round().astype(int), 0, size - 1)
                tile[[y0, y1], x0:x1 + 1] = tile[y0:y1 + 1, [x0, x1]] = (0.5, 0.5, 0.0)
            tiles.append(tile)
            if scene == "cluttered" and not kw:
                names.append(FASHION_MNIST_CLASSES[label])
        rows.append(tiles)
    _save_rows(path, rows)
    return names


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="the folder the sample pictures go into")
    parser.add_argument("--root", default="", help=f"Fashion-MNIST's folder ('' = {FASHION_MNIST_ROOT})")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "synthetic_scenes.png")
    save_grid(out)
    print(f"wrote {os.path.abspath(out)}: scene | mask | 64 px view | zoom on the target; "
          f"labels {[GLYPHS[sample_scene(i)['label']][0] for i in range(6)]}")
    out = os.path.join(args.out, "fashion_mnist_scenes.png")
    try:
        names = save_fashion_grid(out, args.root)
    except DataError as e:
        raise SystemExit(f"data.py: no Fashion-MNIST picture: {e}")
    print(f"wrote {os.path.abspath(out)}: rows plain, cluttered, object-centric (the item outlined), crop; "
          f"val scenes 0-5 at 128 px (2x the 64 px training scenes); items {names}")
