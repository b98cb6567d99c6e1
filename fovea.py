"""Top-down glimpses (papers 002, 000; CanViT's glimpse, 003) and the foveal iterative ViT (002).

Papers
  [002] Prisadnikov, Paudel, Fu, Van Gool, "Vision encoders should be image size agnostic and
        task driven", arXiv 2508.16317.
  [000] "Self-supervised pretraining for an iterative image size agnostic vision transformer",
        arXiv 2604.20392.
  [003] Berreby, Du, Durand, Krishna, "CanViT: Toward Active-Vision Foundation Models".

A patch is *top-down*: its size is a fraction of the image, not a number of pixels, so a gaze
sees the same part of the scene at any resolution. Gazes become pixel boxes (the geometry), and
boxes fixed-size patches (the extraction: a box filter over a summed-area table built once per
image [000, App. A], whose cost per output pixel does not depend on the image or the box size,
and which does not alias).

The foveal iterative ViT [002, Sec. 5.2] looks through such patches, one gaze a step: N state
tokens and the glimpse's patch tokens go through ViT blocks, the state tokens come out as the
new state, no gradient crosses steps. Task heads read the state; stage 1 of [002] trains it all
with random gazes (an objective of train.py).

Conventions (one geometry for all three papers): a point is (y, x) = (row, col) in [-1, 1]^2,
(-1, -1) the top-left corner; a square patch of zoom z has side min(H, W) / 2^z px
[002, Sec. 5.1], in CanViT's terms scale s = 2^-z (of the shorter side); boxes are continuous
pixel rectangles (y0, x0, y1, x1), pixel (i, j) covering [i, i+1) x [j, j+1); outside the image
counts as zero (after normalisation: the mean colour), as in both official codes.

Shapes
  B batch, P patches per image, C channels, H x W image, p patch pixels (side), g grid side,
  M multi-zoom patches, gp glimpse pixels (side), T steps, N state tokens, D width, K classes.

Paper -> code
  002 Sec. 5.1, Alg. 1   multi-zoom patches             multizoom_patches
  000 App. B, Eq. 5-6    dense foveal grid              foveal_grid, foveal_context
  000 Sec. 5.3           "ViT mode" grid                vit_grid
  000 App. B, Eq. 7      random implicit crops          random_grid_crops, area_to_zoom
  000 App. A, Eq. 3      summed-area table              integral_image
  000 App. A, Eq. 4      box filter extraction          box_patches (exact=False: the paper's)
  003 Sec. 3             viewpoint -> glimpse           bilinear_glimpse, viewpoint_boxes
  002 Sec. 5.2, A.3.1    iterative ViT, state tokens    FovealViT, Block
  000 App. D             (x, y, z) MLP position         FovealViT.embed
  000 Sec. 5.3           ViT mode                       FovealViT.vit_mode
  002 A.3.2; 000 Sec. 4  task heads                     CombineMLPHead; LinearHead, TransformerHead
  002 A.3.4              random gazes, MixUp, stage 1   FovealSupervised, episode_patches, mixup
  002 Sec. 6.1           shuffled ViT-patch groups      episode_patches (glimpse "shuffled_vit")
  000 Sec. 5.1           stage 2, frozen dino backbone  FovealSupervised.probe
  (train.py checkpoints) checkpoint -> frozen model     read_checkpoint, load_frozen

Run `python fovea.py` (a picture of the patches), `python bench.py extraction` (`foveal`: a
training step), `python train.py --cfg foveal_tiny.yaml`, `python -m pytest tests/test_fovea.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---- Geometry: gazes and zoom levels -> pixel boxes ------------------------------------------
class Patches(NamedTuple):
    """Where the patches of a glimpse lie: boxes (B, P, 4) float32 pixel rectangles (y0, x0, y1,
    x1) of the image they were made for; yxz (B, P, 3) float32 patch centre (y, x) in [-1, 1]
    and zoom level z (side = min(H, W) / 2^z)."""
    boxes: Tensor
    yxz: Tensor


def cat_patches(*parts: Patches) -> Patches:
    """Concatenate patch sets along P (e.g. multi-zoom + foveal grid)."""
    return Patches(torch.cat([p.boxes for p in parts], 1), torch.cat([p.yxz for p in parts], 1))


def _check_centres(center_yx: Tensor) -> None:
    if center_yx.dim() != 2 or center_yx.shape[-1] != 2:
        raise ValueError(f"gaze centres must be (B, 2) (y, x), got shape {tuple(center_yx.shape)}")
    if not center_yx.is_floating_point():
        raise TypeError(f"gaze centres must be floating point, got {center_yx.dtype}")


def _square_boxes(cy: Tensor, cx: Tensor, side: Tensor) -> Tensor:
    """Pixel centres and sides (broadcastable) -> (..., 4) boxes (y0, x0, y1, x1)."""
    half = side / 2
    return torch.stack(torch.broadcast_tensors(cy - half, cx - half, cy + half, cx + half), -1)


def _to_pixels(center_yx: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, 2) (y, x) in [-1, 1] -> pixel row and column, (B,) each."""
    H, W = image_hw
    return (center_yx[:, 0] + 1) / 2 * H, (center_yx[:, 1] + 1) / 2 * W


def _to_unit(py: Tensor, px: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Pixel rows and columns (same shape) -> (..., 2) (y, x) in [-1, 1]."""
    H, W = image_hw
    return torch.stack([py / H * 2 - 1, px / W * 2 - 1], -1)


def multizoom_patches(center_yx: Tensor, image_hw: tuple[int, int], num_patches: int = 16,
                      max_z: float = 4.0) -> Patches:
    """[002] Sec. 5.1, Alg. 1: M concentric square crops around each gaze (B, 2) (y, x) in
    [-1, 1], of zoom z = linspace(0, max_z, M) and side min(H, W) / 2^z (z = 0 spans the shorter
    side, each unit of z halves it). Returns Patches with P = M, coarsest first."""
    _check_centres(center_yx)
    B, dev = center_yx.shape[0], center_yx.device
    H, W = image_hw
    z = torch.linspace(0, max_z, num_patches, device=dev, dtype=torch.float32)   # (M,)
    side = min(H, W) / 2.0 ** z                                                   # (M,)
    py, px = _to_pixels(center_yx.float(), image_hw)                              # (B,)
    boxes = _square_boxes(py[:, None], px[:, None], side[None, :])               # (B, M, 4)
    yxz = torch.cat([center_yx.float()[:, None, :].expand(B, num_patches, 2),
                     z[None, :, None].expand(B, num_patches, 1)], -1)             # (B, M, 3)
    return Patches(boxes, yxz)


def foveal_grid(center_yx: Tensor, image_hw: tuple[int, int], grid: int,
                z: Tensor | float) -> Patches:
    """[000] App. B, Eq. 5-6: a g x g grid of square patches of zoom z centred on the gaze.
    Eq. 5: each patch has side S = min(H, W) / 2^z. Eq. 6: patch (i, j) is centred at
    gaze + ((i, j) - (g - 1) / 2) * S, so the grid (side g * S) is centred on the gaze.
    center_yx: (B, 2); z: a float or (B,). Returns Patches with P = g^2, row-major."""
    _check_centres(center_yx)
    B, dev = center_yx.shape[0], center_yx.device
    z = torch.as_tensor(z, dtype=torch.float32, device=dev).expand(B)             # (B,)
    side = min(image_hw) / 2.0 ** z                                               # (B,)
    offs = torch.arange(grid, device=dev, dtype=torch.float32) - (grid - 1) / 2   # (g,)
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")                            # (g, g)
    py, px = _to_pixels(center_yx.float(), image_hw)
    cy = py[:, None] + oy.reshape(1, -1) * side[:, None]                          # (B, g*g)
    cx = px[:, None] + ox.reshape(1, -1) * side[:, None]
    boxes = _square_boxes(cy, cx, side[:, None])                                  # (B, g*g, 4)
    yxz = torch.cat([_to_unit(cy, cx, image_hw),
                     z[:, None, None].expand(B, grid * grid, 1)], -1)             # (B, g*g, 3)
    return Patches(boxes, yxz)


def foveal_context(center_yx: Tensor, image_hw: tuple[int, int], num_zoom: int = 16,
                   max_z: float = 4.0, grid: int = 5, grid_z: Tensor | float = 3.0) -> Patches:
    """[000] Sec. 3.2: the composite context, multi-zoom patches (periphery) then the dense
    foveal grid (fovea). A fixed token count M + g^2 whatever the image size."""
    return cat_patches(multizoom_patches(center_yx, image_hw, num_zoom, max_z),
                       foveal_grid(center_yx, image_hw, grid, grid_z))


def vit_grid(batch: int, image_hw: tuple[int, int], grid: int,
             device: torch.device | str | None = None) -> Patches:
    """[000] Sec. 5.3 "ViT mode": a static g x g grid tiling the whole image, cells H/g x W/g
    px (zoom log2(g)). NOTE(paper): the paper does not say for a non-square image; tiling it keeps
    every pixel in view, and z = log2(g) is the zoom of the shorter side's cells."""
    H, W = image_hw
    centres = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid * 2 - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")                      # (g, g)
    yx = torch.stack([gy.reshape(-1), gx.reshape(-1)], -1)                        # (g*g, 2)
    py, px = (yx[:, 0] + 1) / 2 * H, (yx[:, 1] + 1) / 2 * W
    boxes = torch.stack([py - H / grid / 2, px - W / grid / 2,
                         py + H / grid / 2, px + W / grid / 2], -1)               # (g*g, 4)
    z = torch.full((grid * grid, 1), math.log2(grid), device=device)
    yxz = torch.cat([yx, z], -1)                                                  # (g*g, 3)
    return Patches(boxes.expand(batch, -1, -1), yxz.expand(batch, -1, -1))


def area_to_zoom(area: Tensor | float, grid: int,
                 image_hw: tuple[int, int] = (1, 1)) -> Tensor | float:
    """[000] App. B, Eq. 7: the zoom at which a g x g grid covers `area` (a fraction of H * W).

    A patch of zoom z has side min(H, W) / 2^z, so the grid covers g^2 min(H, W)^2 / 4^z /
    (H W); setting that to `area` gives z = log2(g * min(H, W) / sqrt(area * H * W)). For a
    square image z = log2(g / sqrt(area)); Eq. 7: area >= a_min <=> z <= log2(g / sqrt(a_min))."""
    H, W = image_hw
    ratio = grid * min(H, W) / math.sqrt(H * W)
    if isinstance(area, Tensor):
        return torch.log2(ratio / area.sqrt())
    return math.log2(ratio / math.sqrt(area))


def random_grid_crops(batch: int, image_hw: tuple[int, int], grid: int,
                      area_range: tuple[float, float], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Patches:
    """[000] App. B: a DINO random-resized crop done top-down, as a g x g foveal grid covering a
    ~ U(area_range) of the image (DINO: (0.32, 1) global, (0.05, 0.32) local views), its zoom
    from Eq. 7, its centre uniform where the whole grid stays inside the image.
    NOTE(paper): the paper picks "the zoom level range" from the area range; we draw the area
    uniformly, as torchvision's RandomResizedCrop (the augmentation being imitated) does."""
    H, W = image_hw
    a_lo, a_hi = area_range
    if not 0 < a_lo <= a_hi <= 1:
        raise ValueError(f"area_range must satisfy 0 < lo <= hi <= 1, got {area_range}")
    # A square grid fits inside the image only if its side <= min(H, W).
    a_hi = min(a_hi, min(H, W) / max(H, W))
    a_lo = min(a_lo, a_hi)
    u = torch.rand(batch, 3, generator=generator, device="cpu", dtype=torch.float64)
    area = a_lo + (a_hi - a_lo) * u[:, 0]                                         # (B,)
    span = torch.sqrt(area * H * W)                                               # grid side, px
    cy = span / 2 + u[:, 1] * (H - span)                                          # centre, px
    cx = span / 2 + u[:, 2] * (W - span)
    centre = _to_unit(cy, cx, image_hw).float().to(device)                        # (B, 2)
    z = area_to_zoom(area, grid, image_hw).float().to(device)                     # (B,)
    return foveal_grid(centre, image_hw, grid, z)


def viewpoint_boxes(center_yx: Tensor, scale: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """[003] viewpoint (centre, scale) -> (B, 4) pixel box: a square of side s * min(H, W)."""
    _check_centres(center_yx)
    py, px = _to_pixels(center_yx.float(), image_hw)
    return _square_boxes(py, px, scale.float() * min(image_hw))


# ---- Extraction: summed-area table + box filter [000, App. A] --------------------------------
class SummedAreaTable(NamedTuple):
    """The summed-area tables of B images [000, App. A], made by `integral_image`; a type of its
    own, so that an image passed where a table is expected fails with a message.
    sums: (B, C, H+1, W+1) float64 (int64 for integer images), channels-last, with
          sums[..., i, j] = the sum of image[..., :i, :j].
    rows: (R,) int64 or None (row b reads table b): the table each of R logical rows reads; the
          G traces (or V views) of an image share its table (`select`) without copies.
    """
    sums: Tensor
    rows: Tensor | None = None

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.sums.shape[-2] - 1, self.sums.shape[-1] - 1

    def __len__(self) -> int:                                     # logical rows R
        return self.sums.shape[0] if self.rows is None else self.rows.shape[0]

    def select(self, rows: Tensor) -> SummedAreaTable:
        """The logical rows `rows` (R',) of this table, sharing the tables: e.g. G traces of each
        of B images are `table.select(torch.arange(B).repeat_interleave(G))`."""
        rows = rows.to(self.sums.device)
        return SummedAreaTable(self.sums, rows if self.rows is None else self.rows[rows])

    def to(self, device) -> SummedAreaTable:
        return SummedAreaTable(self.sums.to(device),
                               None if self.rows is None else self.rows.to(device))


def integral_image(images: Tensor) -> SummedAreaTable:
    """[000] App. A, Eq. 3: the summed-area table of images (B, C, H, W), float or integer, with
    a zero first row and column (see SummedAreaTable). float64 (int64 for integers): a float32
    running sum over a 4096^2 image has lost the low bits a small box needs. Channels-last, so
    the C values of one corner are read together."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {_describe(images)}")
    acc = torch.float64 if images.is_floating_point() else torch.int64
    sums = images.to(acc).cumsum(2).cumsum(3)                                     # (B, C, H, W)
    sums = F.pad(sums, (1, 0, 1, 0))                                              # (B, C, H+1, W+1)
    return SummedAreaTable(sums.contiguous(memory_format=torch.channels_last))


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)} ({x.dtype})" if isinstance(x, Tensor) else type(x).__name__


def check_table(table) -> SummedAreaTable:
    """`table` if it is a SummedAreaTable, else a TypeError that says what to pass."""
    if isinstance(table, SummedAreaTable):
        return table
    raise TypeError(f"expected a SummedAreaTable from fovea.integral_image(images), got "
                    f"{_describe(table)}: pass fovea.integral_image(images), not the images")


def _corner_sums(sums: Tensor, rows: Tensor, ys: Tensor, xs: Tensor, exact: bool) -> Tensor:
    """Integral of the zero-extended image over [0, y) x [0, x) at every pair (ys[a], xs[b]):
    sums (B, C, H+1, W+1), rows (R,) the table of each row, ys (R, P, Ny), xs (R, P, Nx) pixel
    coordinates (float64) -> (R, P, Ny, Nx, C) float64. exact=True: the integral of the
    piecewise-constant pixel image is exactly the bilinear interpolation of the table between
    integer corners, so 4 weighted lookups give it at sub-pixel positions. exact=False: ys and
    xs are already integers, 1 lookup each. The image is zero outside, so clamping a corner to
    [0, H] x [0, W] is exact."""
    B, C, H1, W1 = sums.shape
    flat = sums.permute(0, 2, 3, 1).reshape(B, H1 * W1, C)                      # (B, N, C) view
    ys = ys.clamp(0, H1 - 1)
    xs = xs.clamp(0, W1 - 1)
    R, P, Ny, Nx = ys.shape[0], ys.shape[1], ys.shape[2], xs.shape[2]
    if exact:
        iy = ys.floor().clamp(max=H1 - 2)                                          # (R, P, Ny)
        ix = xs.floor().clamp(max=W1 - 2)
        fy, fx = ys - iy, xs - ix                                                  # in [0, 1]
        iy = torch.stack([iy, iy + 1], -1).long()                                  # (R, P, Ny, 2)
        ix = torch.stack([ix, ix + 1], -1).long()                                  # (R, P, Nx, 2)
        wy = torch.stack([1 - fy, fy], -1)                                         # (R, P, Ny, 2)
        wx = torch.stack([1 - fx, fx], -1)
        idx = iy[:, :, :, :, None, None] * W1 + ix[:, :, None, None, :, :]          # (R,P,Ny,2,Nx,2)
        vals = flat[rows[:, None], idx.reshape(R, -1)]                             # (R, n, C)
        vals = vals.reshape(R, P, Ny, 2, Nx, 2, C).to(torch.float64)
        w = wy[:, :, :, :, None, None] * wx[:, :, None, None, :, :]                # (R,P,Ny,2,Nx,2)
        return (vals * w[..., None]).sum((3, 5))                                   # (R,P,Ny,Nx,C)
    idx = ys.long()[:, :, :, None] * W1 + xs.long()[:, :, None, :]                 # (R, P, Ny, Nx)
    vals = flat[rows[:, None], idx.reshape(R, -1)]
    return vals.reshape(R, P, Ny, Nx, C).to(torch.float64)


def box_patches_eager(sums: Tensor, rows: Tensor, boxes: Tensor, patch_px: int,
                      exact: bool = True) -> Tensor:
    """The eager twin of `box_patches`, on the table's tensors (sums, rows); see there."""
    p = patch_px
    y0, x0, y1, x1 = boxes.to(torch.float64).unbind(-1)                          # (R, P) each
    t = torch.arange(p + 1, device=boxes.device, dtype=torch.float64) / p          # (p+1,)
    ys = y0[..., None] + (y1 - y0)[..., None] * t                                 # (R, P, p+1)
    xs = x0[..., None] + (x1 - x0)[..., None] * t
    if exact:
        # Eq. 4 with sub-pixel corners: the cell grid shares its edges, so (p+1)^2 corner
        # integrals give all p^2 cells.
        S = _corner_sums(sums, rows, ys, xs, exact=True)                          # (R,P,p+1,p+1,C)
        cells = S[:, :, 1:, 1:] - S[:, :, :-1, 1:] - S[:, :, 1:, :-1] + S[:, :, :-1, :-1]
        area = ((y1 - y0) * (x1 - x0) / (p * p))[:, :, None, None, None]           # (R,P,1,1,1)
    else:
        # Eq. 4 as in the paper: cell edges snapped to the nearest pixel corner. A cell smaller
        # than a pixel keeps at least one pixel (nearest-neighbour sampling when upsampling).
        ry, rx = torch.floor(ys + 0.5), torch.floor(xs + 0.5)                      # (R, P, p+1)
        lo_y, lo_x = ry[..., :-1], rx[..., :-1]                                   # (R, P, p)
        hi_y, hi_x = torch.maximum(ry[..., 1:], lo_y + 1), torch.maximum(rx[..., 1:], lo_x + 1)
        S = _corner_sums(sums, rows, torch.cat([lo_y, hi_y], -1), torch.cat([lo_x, hi_x], -1),
                         exact=False)                                              # (R,P,2p,2p,C)
        S_ll, S_lh = S[:, :, :p, :p], S[:, :, :p, p:]
        S_hl, S_hh = S[:, :, p:, :p], S[:, :, p:, p:]
        cells = S_hh - S_hl - S_lh + S_ll                                         # (R,P,p,p,C)
        area = ((hi_y - lo_y)[..., :, None] * (hi_x - lo_x)[..., None, :])[..., None]
    return (cells / area).permute(0, 1, 4, 2, 3).to(torch.float32)                # (R,P,C,p,p)


@functools.cache
def _box_patches_compiled():
    """`box_patches_eager` through torch.compile, made on first use (importing fovea stays
    fast). Static shapes: new box values never recompile."""
    return torch.compile(box_patches_eager, dynamic=False, fullgraph=True)


def box_patches(table: SummedAreaTable, boxes: Tensor, patch_px: int, exact: bool = True,
                compiled: bool = True) -> Tensor:
    """[000] App. A, Eq. 4: resample each box to a p x p patch by box filtering the table.

    table: a SummedAreaTable from `integral_image` (R logical rows); boxes: (R, P, 4) pixel
    rectangles (y0, x0, y1, x1) of any size and position, partly or wholly outside the image
    (outside counts as zero). Output pixel (i, j) is the mean of the image over cell (i, j) of
    its box. Returns (R, P, C, p, p) float32. exact=True: corners at their sub-pixel positions
    (bilinear lookups in the table), the exact area mean of the pixel image; exact=False: the
    paper's nearest-pixel corners. A fixed number of table lookups per output pixel, whatever
    the box or image size. compiled=False: the eager twin of the `torch.compile`d function."""
    table = check_table(table)
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != len(table):
        raise ValueError(f"expected boxes (R, P, 4) for the table's {len(table)} rows, got "
                         f"boxes of shape {tuple(boxes.shape)}")
    # A box must have positive, finite extent; checked on the device without a host sync.
    ok = ((boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])).all()
    torch._assert_async(ok, "box_patches: every box needs y1 > y0 and x1 > x0 (and no NaN)")
    rows = table.rows if table.rows is not None else torch.arange(len(table), device=boxes.device)
    fn = _box_patches_compiled() if compiled else box_patches_eager
    return fn(table.sums, rows, boxes, patch_px, exact)


# ---- CanViT's glimpse [003, Sec. 3]: bilinear grid_sample, exactly as the official code ------
def bilinear_glimpse(images: Tensor, center_yx: Tensor, scale: Tensor, glimpse_px: int) -> Tensor:
    """[003] Sec. 3: the glimpse at viewpoint (centre, scale), resampled to gp x gp pixels.
    images (B, C, H, W); center_yx (B, 2) in [-1, 1]; scale (B,) in (0, 1], the crop side as a
    fraction of the shorter image side. Output pixel (i, j) samples the image bilinearly at
    centre + scale * cell_centre(i, j) (align_corners=False, zeros outside): for a square scene,
    the official CanViT `sample_at_viewpoint`. Returns (B, C, gp, gp) float32. Cheap, but it
    aliases when the crop is much larger than gp pixels (see `box_patches`)."""
    _check_centres(center_yx)
    B, _, H, W = images.shape
    n = glimpse_px
    cells = (torch.arange(n, device=images.device, dtype=torch.float32) + 0.5) / n * 2 - 1
    sy = scale.float() * (min(H, W) / H)                                          # (B,) y half-extent
    sx = scale.float() * (min(H, W) / W)
    y = center_yx[:, 0, None].float() + sy[:, None] * cells                       # (B, gp)
    x = center_yx[:, 1, None].float() + sx[:, None] * cells
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), -1)  # (B,gp,gp,2) (x,y)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def viewpoint_glimpse(source: Tensor | SummedAreaTable, center_yx: Tensor, scale: Tensor,
                      glimpse_px: int) -> Tensor:
    """[003] The glimpse at a viewpoint (centre, scale) from `source`: images (B, C, H, W) give
    the official bilinear glimpse (`bilinear_glimpse`); a SummedAreaTable gives the box-filtered
    one [000, App. A], which does not alias. Returns (B, C, gp, gp) float32."""
    if isinstance(source, SummedAreaTable):
        boxes = viewpoint_boxes(center_yx, scale, source.image_hw)[:, None]       # (B, 1, 4)
        return box_patches(source, boxes, glimpse_px)[:, 0]
    return bilinear_glimpse(source, center_yx, scale, glimpse_px)


# ---- The foveal iterative ViT [002, Sec. 5.2, A.3.1; 000, Sec. 2, 4, App. D] -----------------
@dataclass
class FovealConfig:
    """The foveal iterative ViT. Defaults: paper 002's ViT-B on 16 multi-zoom patches."""
    dim: int = 768                 # [002] A.3.1: ViT-B ([000] Sec. 4: ViT-S, 384)
    depth: int = 12                # [002] A.3.1, [000] Sec. 4
    heads: int = 12                # [002] A.3.1 ([000] Sec. 4: 6)
    mlp_ratio: float = 4.0         # ViT
    layerscale: float = 1e-5       # DINOv2's ViT ([002] A.3.1 "similar to DINOv2"); 0 = none
    num_state: int = 16            # [002] Sec. 6.2: N = 16 ([000] Sec. 5.4: N = 8)
    patch_px: int = 16             # [002] Sec. 5.1: every crop resized to 16 x 16
    num_zoom: int = 16             # [002] Sec. 6.2: M = 16 multi-zoom patches
    max_z: float = 4.0             # NOTE(paper): unstated; 4 puts the finest crop at 16 px of a 256 px image
    grid: int = 0                  # [000] Sec. 3.2: foveal grid side (5 in [000] Table 4); 0 = none ([002])
    grid_z: tuple[float, float] = (3.0, 4.0)  # [000] Sec. 3.2: "a predefined zoom range" (values unstated)
    z_max: float = 4.0             # [002] A.3.1: Z_max, the largest zoom the model sees (see FovealViT)
    pos_hidden: int = 256          # [002] A.3.1: "a small MLP" with 3 inputs (width unstated)
    head: str = "combine_mlp"      # "combine_mlp" [002] A.3.2 | "linear" | "transformer" [000] Sec. 4 | "none"
    num_classes: int = 1000        # ImageNet-1k
    exact: bool = True             # sub-pixel box filter; False: [000] App. A nearest-pixel corners
    compile_extraction: bool = True  # box_patches through torch.compile


class Block(nn.Module):
    """Pre-norm ViT block (DINOv2 style, LayerScale). `query_pos` (B, n, D) is added to the
    inputs of the attention's queries and keys, as DETR adds its object queries [002, A.3.1]."""
    def __init__(self, dim: int, heads: int, mlp_ratio: float, layerscale: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(dim * mlp_ratio), dim))
        self.ls1 = nn.Parameter(torch.full((dim,), layerscale)) if layerscale else None
        self.ls2 = nn.Parameter(torch.full((dim,), layerscale)) if layerscale else None

    def forward(self, x: Tensor, query_pos: Tensor) -> Tensor:
        B, n, D = x.shape
        h = self.norm1(x)
        qk = self.qk(h + query_pos).view(B, n, 2, self.heads, D // self.heads)
        q, k = qk.permute(2, 0, 3, 1, 4)                                          # (B, heads, n, hd)
        v = self.v(h).view(B, n, self.heads, D // self.heads).transpose(1, 2)     # (B, heads, n, hd)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, D)
        a = self.proj(a)
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.ls2 if self.ls2 is not None else m)


class CombineMLPHead(nn.Module):
    """[002] A.3.2: a learned linear combination of the N state vectors, then an MLP."""
    def __init__(self, dim: int, num_state: int, num_classes: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((num_state,), 1.0 / num_state))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))

    def forward(self, state: Tensor) -> Tensor:                                   # (B, N, D) -> (B, K)
        return self.mlp(torch.einsum("n,bnd->bd", self.weights.to(state.dtype), state))


class LinearHead(nn.Module):
    """[000] Sec. 4: a linear layer on the first state token."""
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, state: Tensor) -> Tensor:                                   # (B, N, D) -> (B, K)
        return self.fc(state[:, 0])


class TransformerHead(nn.Module):
    """[000] Sec. 4: one transformer layer pooling all state tokens into a learned token, then
    a linear layer. NOTE(paper): the pooling token and its LayerNorm are our reading."""
    def __init__(self, dim: int, heads: int, num_classes: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = Block(dim, heads, 4.0, 0.0)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, state: Tensor) -> Tensor:                                   # (B, N, D) -> (B, K)
        x = torch.cat([self.token.expand(state.shape[0], -1, -1), state], 1)      # (B, 1 + N, D)
        x = self.block(x, torch.zeros_like(x))
        return self.fc(self.norm(x[:, 0]))


class FovealViT(nn.Module):
    """The iterative transformer of [002] Sec. 5.2: N state tokens evolve over glimpses. Each
    step embeds the glimpse's top-down patches (linear patch embedding + an MLP of the patch's
    (x, y, z)), runs the ViT blocks on [state; patches] and keeps the state outputs (`forward`).

    Zoom levels enter the position MLP as z / Z_max [002, A.3.1], so every zoom the model meets
    must lie in [0, Z_max] (`cfg.z_max`): multi-zoom (max_z), the foveal grid (grid_z), ViT mode
    (log2 g), DINO's views. What the config can produce is checked here and where it is made
    (`check_zoom`); any other z out of range stops the run with a device-side assert."""
    def __init__(self, cfg: FovealConfig):
        super().__init__()
        self.cfg = cfg
        self.check_zoom(cfg.max_z, "model.max_z (the finest multi-zoom patch)")
        if cfg.grid:
            self.check_zoom(max(cfg.grid_z), "model.grid_z (the foveal grid)")
        D, p = cfg.dim, cfg.patch_px
        self.patch_embed = nn.Linear(3 * p * p, D)
        self.pos_mlp = nn.Sequential(nn.Linear(3, cfg.pos_hidden), nn.GELU(), nn.Linear(cfg.pos_hidden, D))
        self.state_prompt = nn.Parameter(torch.randn(1, cfg.num_state, D) * 0.02)  # the task prompt
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.layerscale)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D)
        if cfg.head == "combine_mlp":
            self.head = CombineMLPHead(D, cfg.num_state, cfg.num_classes)
        elif cfg.head == "linear":
            self.head = LinearHead(D, cfg.num_classes)
        elif cfg.head == "transformer":
            self.head = TransformerHead(D, cfg.heads, cfg.num_classes)
        elif cfg.head == "none":                         # a self-supervised backbone [000]
            self.head = None
        else:
            raise ValueError(f"unknown head {cfg.head!r}; choose combine_mlp, linear, transformer or none")

    def check_zoom(self, z: float, what: str) -> None:
        """Refuse a zoom level the position MLP was not made for (z / Z_max outside [0, 1])."""
        if not 0 <= z <= self.cfg.z_max + 1e-6:
            raise ValueError(f"{what} gives zoom level z = {z:.3f}, outside [0, model.z_max = "
                             f"{self.cfg.z_max:g}]: the position MLP sees z / z_max [002, A.3.1]; "
                             f"raise model.z_max to at least {z:.3f} (a new model) or keep z in range")

    def init_state(self, batch_size: int) -> Tensor:
        """The learned initial state s_1 [002, Sec. 4], (B, N, D): what a policy observes before
        the first glimpse. To step from it, pass state=None to `forward` / `step`."""
        return self.state_prompt.expand(batch_size, -1, -1)

    def glimpse(self, gaze_yx: Tensor, image_hw: tuple[int, int], grid_z: Tensor | float | None = None) -> Patches:
        """The top-down patches seen at a gaze: multi-zoom [002], plus the foveal grid [000]."""
        mz = multizoom_patches(gaze_yx, image_hw, self.cfg.num_zoom, self.cfg.max_z)
        if not self.cfg.grid:
            return mz
        z = sum(self.cfg.grid_z) / 2 if grid_z is None else grid_z
        return cat_patches(mz, foveal_grid(gaze_yx, image_hw, self.cfg.grid, z))

    def embed(self, table: SummedAreaTable, patches: Patches, transform=None) -> Tensor:
        """Extract the patches from the summed-area table and embed them: (B, P, D).
        transform: applied to the extracted pixels (B, P, 3, p, p) first (an augmentation)."""
        p = self.cfg.patch_px
        pix = box_patches(table, patches.boxes, p, self.cfg.exact, self.cfg.compile_extraction)
        if transform is not None:
            pix = transform(pix)
        tokens = self.patch_embed(pix.flatten(2))                                 # (B, P, 3*p*p) -> (B, P, D)
        y, x, z = patches.yxz.unbind(-1)
        torch._assert_async(((z >= 0) & (z <= self.cfg.z_max + 1e-6)).all(),
                            "FovealViT: a patch zoom level is outside [0, model.z_max]")
        # [002] A.3.1: position from (x, y, z), each in [0, 1] (z scaled by Z_max). NOTE(paper):
        # float32 under autocast (DESIGN: coordinates stay float32; bf16 snaps to 1/256 steps).
        xyz = torch.stack([(x + 1) / 2, (y + 1) / 2, z / self.cfg.z_max], -1)      # (B, P, 3)
        with torch.autocast(xyz.device.type, enabled=False):
            pos = self.pos_mlp(xyz.float())
        return tokens + pos.to(tokens.dtype)

    def forward(self, table: SummedAreaTable, state: Tensor | None, patches: Patches,
                transform=None) -> Tensor:
        """One step: the state (B, N, D) and the patches of one glimpse -> new state (B, N, D).
        state None: the first step, from the learned task prompt s_1, which trains with this
        step's loss [002, Sec. 4; 000, Sec. 2.1]. A state from an earlier step is detached: no
        gradient crosses steps (no BPTT [002, Sec. 5.2]). transform: see `embed`."""
        B = patches.boxes.shape[0]
        state = self.state_prompt.expand(B, -1, -1) if state is None else state.detach()
        tokens = self.embed(table, patches, transform)                            # (B, P, D)
        x = torch.cat([state.to(tokens.dtype), tokens], 1)                        # (B, N + P, D)
        # NOTE(paper): "similarly to DETR the state query vectors are added to each layer as skip
        # connections" [002, A.3.1]. DETR adds its queries to the input of every attention layer;
        # we add the incoming state to the query/key inputs of every block at the state slots.
        # Adding it to the residual stream instead would compound across steps.
        query_pos = F.pad(state.to(tokens.dtype), (0, 0, 0, tokens.shape[1]))     # (B, N + P, D)
        for blk in self.blocks:
            x = blk(x, query_pos)
        # The state leaves through the final LayerNorm (DINOv2's), so it keeps its scale over steps.
        return self.norm(x[:, :self.cfg.num_state])                               # (B, N, D)

    def step(self, table: SummedAreaTable, state: Tensor | None, gaze_yx: Tensor,
             grid_z: Tensor | float | None = None) -> Tensor:
        """The step interface: (table, state or None, gaze) -> new state (the foveal context)."""
        return self(table, state, self.glimpse(gaze_yx, check_table(table).image_hw, grid_z))

    def vit_mode(self, table: SummedAreaTable, grid: int = 16) -> Tensor:
        """[000] Sec. 5.3: the same model run once, from the prompt, on a static g x g grid over
        the whole image (its zoom log2 g must be within model.z_max)."""
        table = check_table(table)
        self.check_zoom(math.log2(grid), f"ViT mode with a {grid} x {grid} grid")
        patches = vit_grid(len(table), table.image_hw, grid, table.sums.device)
        return self(table, None, patches)

    def classify(self, state: Tensor) -> Tensor:
        """Task head: (B, N, D) -> (B, K) logits."""
        if self.head is None:
            raise ValueError("this FovealViT has no task head (head: none, a self-supervised "
                             "backbone): train one with the objective `probe`")
        return self.head(state)


# ---- Stage-1 training with random gazes [002, A.3.4] (an objective of train.py) --------------
@dataclass
class FovealTrainConfig:
    model: FovealConfig = field(default_factory=FovealConfig)
    steps: int = 8                 # [002] A.3.4: 8 steps per episode
    glimpse: str = "foveal"        # "foveal": random gazes [002] A.3.4 | "shuffled_vit": [002] Sec. 6.1
    vit_grid: int = 16             # shuffled_vit: g x g patches of the image, split into `steps` groups
    mixup_alpha: float = 0.8       # [002] A.3.4 uses MixUp (alpha unstated; DeiT's 0.8); 0 = off
    label_smoothing: float = 0.0   # unstated in [002]; foveal_sup.yaml sets DeiT's 0.1


def mixup_lambda(gen: torch.Generator, alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha), reproducibly from the seeded torch generator (torch has no
    seeded Beta sampler: the generator seeds Python's random.betavariate)."""
    return random.Random(int(torch.randint(2 ** 62, (), generator=gen))).betavariate(alpha, alpha)


def mixup(images: Tensor, labels: Tensor, num_classes: int, lam: float) -> tuple[Tensor, Tensor]:
    """MixUp (Zhang et al. 2018): each image with its neighbour in the batch (pairs 0-1, 2-3, ...).

    images (B, C, H, W), labels (B,) -> mixed images and soft targets (B, K), both lam * own +
    (1 - lam) * partner. NOTE: DeiT mixes each image with the flipped local batch, whose pairs
    change with the number of processes; in the (randomly ordered) batch a neighbour is as
    random a partner, and the same on any number of processes (each holds a contiguous, even
    share of the global batch). The last image of an odd batch (bad images dropped) is its own
    partner: it is not mixed."""
    B = images.shape[0]
    partner = torch.arange(B, device=images.device) ^ 1                           # 0<->1, 2<->3, ...
    partner[partner == B] = B - 1
    target = F.one_hot(labels, num_classes).float()                               # (B, K)
    return lam * images + (1 - lam) * images[partner], lam * target + (1 - lam) * target[partner]


def supervised_batch(gen: torch.Generator, images: Tensor, labels: Tensor, num_classes: int,
                     mixup_alpha: float) -> tuple[Tensor, Tensor]:
    """Images and soft targets (B, K) of a supervised step: MixUp with lambda drawn from `gen`
    when mixup_alpha > 0 (one lambda for the global batch), else one-hot labels."""
    if mixup_alpha > 0:
        return mixup(images, labels, num_classes, mixup_lambda(gen, mixup_alpha))
    return images, F.one_hot(labels, num_classes).float()


def fixed_gazes(T: int) -> Tensor:
    """A fixed gaze sequence (T, 2): the centre, then the centres of a 3 x 3 grid's outer cells
    clockwise from the top-left, then again; the same for every image."""
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    seq = [(0.0, 0.0)] + [(2 / 3 * y, 2 / 3 * x) for y, x in ring]
    return torch.tensor([seq[t % len(seq)] for t in range(T)])


def episode_patches(model: FovealViT, cfg: FovealTrainConfig, gen: torch.Generator | None,
                    batch: int, image_hw: tuple[int, int], device) -> list[Patches]:
    """The patches of every step of an episode for `batch` images, one Patches per step.
    glimpse "foveal" [002, A.3.4]: gaze centres uniform over the image at every step, the foveal
    grid's zoom uniform in grid_z; "shuffled_vit" [002, Sec. 6.1]: the g^2 patches of a ViT grid,
    shuffled into `steps` groups, one a step. gen None: a fixed episode, the same for every
    image (`fixed_gazes` at the middle grid zoom, or the grid in raster order)."""
    T = cfg.steps
    if cfg.glimpse == "shuffled_vit":
        g = cfg.vit_grid
        grid = vit_grid(batch, image_hw, g, device)
        order = (torch.arange(g * g).expand(batch, -1) if gen is None
                 else torch.rand(batch, g * g, generator=gen).argsort(1)).to(device)  # (B, g*g)
        take = lambda x, i: x.gather(1, i[..., None].expand(-1, -1, x.shape[-1]))
        return [Patches(take(grid.boxes, i), take(grid.yxz, i)) for i in order.chunk(T, 1)]
    lo, hi = model.cfg.grid_z
    if gen is None:
        gazes, zs = fixed_gazes(T)[:, None].expand(T, batch, 2), torch.full((T, batch), (lo + hi) / 2)
    else:
        gazes = torch.rand(T, batch, 2, generator=gen) * 2 - 1                    # (T, B, 2)
        zs = lo + (hi - lo) * torch.rand(T, batch, generator=gen)                 # (T, B)
    return [model.glimpse(gazes[t].to(device), image_hw, zs[t].to(device)) for t in range(T)]


@dataclass
class ProbeConfig:
    """[000] Sec. 5.1, stage 2: a task head on a frozen pretrained backbone, random gazes."""
    backbone: str = ""             # a `dino` run's checkpoint (its EMA teacher's backbone)
    reinit: bool = False           # True: that architecture with random weights (the baseline)
    head: str = "linear"           # [000] Sec. 4: "linear" on the first state token | "transformer"
    num_classes: int = 1000
    steps: int = 8                 # [000] Sec. 5.1: random gazes, the episode of pretraining
    label_smoothing: float = 0.0


class FovealSupervised(nn.Module):
    """Cross-entropy after every step of an episode of random glimpses, averaged over steps:
    stage 1 of [002] (train.py's `foveal_sup`), and, with a frozen backbone, stage 2 of [000]
    (train.py's `probe`: `FovealSupervised.probe`, only the new task head learns).

    Randomness (gazes, grid zooms, patch shuffles, MixUp's lambda) is drawn for the global batch
    from a generator seeded by (seed, step), each process taking its contiguous share: a run is
    the same on any number of processes and after a resume."""
    augment = True                 # ImageNet's random resized crop + flip ([002] Sec. 2; data.py)
    classes_key = "foveal.model.num_classes"

    def __init__(self, cfg: FovealTrainConfig, seed: int):
        super().__init__()
        if cfg.glimpse not in ("foveal", "shuffled_vit"):
            raise ValueError(f"unknown glimpse {cfg.glimpse!r}; choose foveal or shuffled_vit")
        if cfg.glimpse == "shuffled_vit" and cfg.vit_grid ** 2 % cfg.steps:
            raise ValueError(f"shuffled_vit: {cfg.vit_grid}^2 patches do not split into {cfg.steps} groups")
        self.cfg, self.seed = cfg, seed
        self.model = FovealViT(cfg.model)
        if cfg.glimpse == "shuffled_vit":
            self.model.check_zoom(math.log2(cfg.vit_grid), f"shuffled_vit's {cfg.vit_grid}-cell grid")

    @classmethod
    def probe(cls, cfg: ProbeConfig, seed: int) -> FovealSupervised:
        """[000] Sec. 5.1, stage 2: the backbone of a `dino` run (its EMA teacher), frozen, and a
        new task head trained on its states after each random gaze of an episode (no MixUp: DINO's
        linear evaluation). The checkpoint exports the whole model as "encoder", the form a
        foveal_sup run exports, so evaluation and a gaze policy take either."""
        if not cfg.backbone:
            raise CheckpointError("probe.backbone: set the checkpoint of a dino run (runs/<run>/ckpt.pt)")
        ckpt = read_checkpoint(cfg.backbone)
        objective = ckpt["config"].get("objective")
        if objective != "dino":
            raise CheckpointError(f"probe.backbone = {cfg.backbone} is a {objective!r} checkpoint; the "
                                  "probe stage takes a self-supervised backbone: a 'dino' checkpoint "
                                  "(a foveal_sup run has its own task head: evaluate it directly)")
        frozen = load_frozen(ckpt, "encoder", FovealViT, what=f"probe.backbone = {cfg.backbone}")
        model_cfg = dataclasses.replace(frozen.cfg, head=cfg.head, num_classes=cfg.num_classes)
        obj = cls(FovealTrainConfig(model=model_cfg, steps=cfg.steps, mixup_alpha=0.0,
                                    label_smoothing=cfg.label_smoothing), seed)
        obj.classes_key = "probe.num_classes"
        if not cfg.reinit:                 # all but the new head, checked key by key
            ours, theirs = obj.model.state_dict(), frozen.state_dict()
            backbone = {k for k in ours if not k.startswith("head.")}
            if backbone != set(theirs):
                raise CheckpointError(f"probe.backbone = {cfg.backbone}: its keys differ from the "
                                      f"model's: {sorted(backbone ^ set(theirs))[:5]}")
            obj.model.load_state_dict({**ours, **theirs}, strict=True)
        for name, p in obj.model.named_parameters():
            p.requires_grad_(name.startswith("head."))
        return obj

    def label_classes(self) -> tuple[str, int]:
        return self.classes_key, self.cfg.model.num_classes

    def train_step(self, batch: dict, step: int, run) -> dict:
        """One episode of `steps` glimpses for the process's images (train.py's interface). A
        frozen backbone builds no graph: only the head's part of each step is differentiated."""
        images, labels = batch["image"], batch["label"]
        B, dev, K = images.shape[0], images.device, self.cfg.model.num_classes
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        images, target = supervised_batch(gen, images, labels, K, self.cfg.mixup_alpha)
        mine = slice(run.rank * B, (run.rank + 1) * B)     # this process's share of the global batch
        episode = episode_patches(self.model, self.cfg, gen, B * run.world, tuple(images.shape[-2:]), dev)
        table = integral_image(images)                     # once per image, on the device
        state, losses = None, []                           # None: start from the prompt s_1
        for patches in episode:
            with run.autocast():
                state = self.model(table, state, Patches(patches.boxes[mine], patches.yxz[mine]))
                logits = self.model.classify(state)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing)
            (loss / len(episode)).backward()               # one graph per step: no BPTT
            losses.append(loss.detach())
        run.optimizer_step()
        hit = (logits.argmax(-1) == target.argmax(-1)).float().mean()
        return {"loss": torch.stack(losses).mean(), "loss_first": losses[0], "loss_last": losses[-1],
                "acc_last": hit.detach(), "glimpses": B * len(episode)}

    def export(self) -> dict:
        """The trained encoder with its task head, for evaluation and a gaze policy [002, A.3.4]."""
        return {"encoder": export_part(self.model, cfg=self.model.cfg)}


# ---- Checkpoints of train.py -> frozen models (one home: distill, dino, grpo, eval) ----------
# A train.py checkpoint: the run's "config", its trained "model" (for resuming) and "export",
# named parts for downstream use (`export_part`: a foveal_sup run's "encoder", a vit_sup run's
# "classifier" and "backbone", ...), asked for by name and class (`load_frozen`). It is read here,
# in the module every other one imports, so no module needs train.py or another objective's keys.

class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a train.py checkpoint, with errors that name the file and say what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: give the ckpt.pt of a train.py run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:                     # truncated, corrupt, not a torch file
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}): the file "
                              "is damaged or not a checkpoint; use another one (a run keeps the "
                              "previous one as ckpt_prev.pt)") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise CheckpointError(f"{path} is not a train.py checkpoint (a dict with 'model' and 'config')")
    return ckpt


def load_frozen(source: str | Path | dict, name: str, cls: type, what: str = "") -> nn.Module:
    """The part `name` that a train.py run exported, rebuilt as `cls`, strictly loaded, frozen
    (eval mode, no gradients). source: a checkpoint path or an already loaded checkpoint dict;
    what: the config key asking for it, for the error messages."""
    ckpt = read_checkpoint(source) if not isinstance(source, dict) else source
    where = f"{what + ' = ' if what else ''}{source if not isinstance(source, dict) else 'the checkpoint'}"
    objective = ckpt["config"].get("objective", "?")
    exports = ckpt.get("export", {})
    if name not in exports:
        raise CheckpointError(f"{where} is a checkpoint of objective {objective!r}, which holds no "
                              f"{name!r} (it holds {sorted(exports) or 'nothing to reuse'}); a "
                              f"{cls.__name__} {name} is needed")
    entry = exports[name]
    if entry["class"] != cls.__name__:
        raise CheckpointError(f"{where}: its {name!r} (objective {objective!r}) is a {entry['class']}, "
                              f"but a {cls.__name__} is needed")
    return rebuild(entry, cls).eval().requires_grad_(False)


def export_part(module: nn.Module, **args) -> dict:
    """A part of a run for downstream use: its class, the arguments that build it (dataclass
    configs stored as plain dicts, so that a checkpoint does not pickle the code's classes) and
    its weights. `rebuild(entry, type(module))` makes it again."""
    plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in args.items()}
    return {"class": type(module).__name__, "args": plain, "state_dict": module.state_dict()}


def _from_plain(typ, value):
    """A saved argument back into its annotated type: dicts into dataclasses (nested ones too),
    lists into tuples; a field a later version added keeps its default."""
    if dataclasses.is_dataclass(typ) and isinstance(value, dict):
        hints = typing.get_type_hints(typ)
        return typ(**{k: _from_plain(hints[k], v) for k, v in value.items()})
    if typing.get_origin(typ) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def rebuild(entry: dict, cls: type) -> nn.Module:
    """cls(**args) from an `export_part` entry, its weights strictly loaded."""
    hints = typing.get_type_hints(cls.__init__)
    model = cls(**{k: _from_plain(hints.get(k), v) for k, v in entry["args"].items()})
    model.load_state_dict(entry["state_dict"], strict=True)
    return model


# ---- Demo (`python fovea.py`); the benchmarks are in bench.py --------------------------------
def _test_image(size: int) -> Tensor:
    """A deterministic (1, 3, size, size) float image in [0, 1] with detail at every scale:
    smooth colour gradients, rings, a checkerboard whose squares shrink towards the centre."""
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(u, u, indexing="ij")
    r = (x ** 2 + y ** 2).sqrt()
    checker = ((torch.floor(x * 40 / (r + 0.15)) + torch.floor(y * 40 / (r + 0.15))) % 2)
    rings = 0.5 + 0.5 * torch.cos(60 * r)
    img = torch.stack([0.6 * (x + 1) / 2 + 0.4 * checker,
                       0.5 * rings + 0.5 * (y + 1) / 2,
                       0.7 * checker * (r < 0.35) + 0.3 * (1 - r).clamp(0, 1)])
    return img.clamp(0, 1)[None]


def _demo(out_path: str, size: int = 512) -> None:
    """Draw the multi-zoom patches and the foveal grid over an image, and the patches seen."""
    from PIL import Image, ImageDraw
    img = _test_image(size)
    gaze = torch.tensor([[0.15, -0.2]])                                           # (y, x)
    mz = multizoom_patches(gaze, (size, size), num_patches=8, max_z=3.5)
    fg = foveal_grid(gaze, (size, size), grid=5, z=4.5)
    table = integral_image(img)
    patches = box_patches(table, cat_patches(mz, fg).boxes, 32, compiled=False)[0]  # (P, 3, p, p)
    to_pil = lambda t: Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    canvas = Image.new("RGB", (size + 16 + 8 * 36, size), "white")
    scene = to_pil(img[0])
    draw = ImageDraw.Draw(scene)
    for i, b in enumerate(mz.boxes[0].tolist()):
        draw.rectangle([b[1], b[0], b[3], b[2]], outline=(255, int(255 * i / 7), 0), width=2)
    for b in fg.boxes[0].tolist():
        draw.rectangle([b[1], b[0], b[3], b[2]], outline=(0, 255, 255), width=1)
    canvas.paste(scene, (0, 0))
    for i in range(patches.shape[0]):                       # 8 multi-zoom, then the 5 x 5 grid
        row, col = (0, i) if i < 8 else (2 + (i - 8) // 5, (i - 8) % 5)
        canvas.paste(to_pil(patches[i]), (size + 16 + col * 36, 8 + row * 36))
    ImageDraw.Draw(canvas).text((size + 16, 8 + 36 + 8), "multi-zoom (top), foveal grid (below)",
                                fill="black")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    print(f"wrote {out_path}: {mz.boxes.shape[1]} multi-zoom patches (orange, coarse to fine) and "
          f"a 5x5 foveal grid (cyan) around gaze (y, x) = {tuple(round(v, 2) for v in gaze[0].tolist())}, "
          f"each resampled to 32x32 by box filtering")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/fovea_demo.png", help="where the picture goes")
    _demo(ap.parse_args().out)
