"""CanViT: a ViT backbone that reads from and writes to a scene-wide latent canvas (paper 003).

Paper
  [003] Berreby, Du, Durand, Krishna, "CanViT: Toward Active-Vision Foundation Models".
        Official code: m2b3/CanViT-PyTorch (MIT); the DINOv3 teacher: facebookresearch/dinov3.

At each timestep a glimpse (a fixed-size crop at a viewpoint: centre (y, x) in [-1, 1]^2 and
scale s, the crop side as a fraction of the scene side) goes through a DINOv3-style RoPE ViT with
a Viewpoint Encoding (VPE) token, a recurrent CLS token and register tokens. Between blocks the
backbone reads from and writes to (Canvas Attention Read / Write) the canvas: canvas registers
and a G x G grid of patches tiling the scene, broadcast from one learned vector, sharing scene
coordinates with the glimpse through scene-relative RoPE (SR-RoPE). Token-wise linear heads
decode the canvas into the teacher's scene-wide patch features and the CLS into its CLS (Eq. 2).
The same ViT class, with 4 registers and a final LayerNorm, is the DINOv3 teacher (and a plain
passive patch-16 ViT baseline).

Shapes
  B batch, T glimpses, D backbone width, Dc canvas width, Dt teacher width, g glimpse grid
  side (patches), G canvas grid side, R backbone registers, Rc canvas registers,
  N tokens, H heads, hd head dim, h x w patch grid of a full image.

Paper -> code
  Sec. 3, App. C.1       viewpoint, glimpse                  Viewpoint, fovea.bilinear_glimpse
  Sec. 4, App. B         SR-RoPE (float32)                   grid_centers, glimpse_positions,
                                                             rope_periods, rope_tables, apply_rope
  Sec. 4, App. B         Canvas Attention Read / Write       CanvasRead, CanvasWrite
  Sec. 4, Table 1        R/W placement along depth (stride)  rw_schedule
  Sec. 4, App. C Eq. 9   VPE: RFF of (y/s, x/s, log s)       vpe_coordinates, VPE
  Sec. 4                 canvas broadcast, recurrent CLS     CanViT.init_state, CanViT.forward
  Sec. 5.1, Eq. (2)      W_spatial, W_global                 Readout, CanViT.predict
  Sec. 5.1, App. F.2     per-position z-scores, destand.     Standardizer, CanViT.fit_standardizers
  App. D.1 Table 1       CanViT-B sizes                      CanViTConfig, BackboneConfig
  App. D.3               precision                           float32 coordinates/RoPE/VPE/canvas
  Sec. 5.2, App. F.1     R-IID, F-IID, C2F, F2C, full,       random_viewpoints, policy_viewpoints,
                         entropy-guided C2F                  EntropyGuidedC2F
  App. G Eq. (18)-(23)   FLOPs (Tables 5, 10, 16)            bench.count_flops (`bench.py flops`)
  App. E, Table 3        parameter counts                    bench.count_params
  DINOv3 [28]            teacher ViT                         DINOv3ViT, load_dinov3
  official checkpoints   0.1 / 0.2 keys, Hugging Face dir    from_official, load_hf_folder

State-dict names are the official canvit-pytorch 0.1 ones (`canvas_read.0.q_proj.weight`, ...;
0.2 names are mapped back) and, for the teacher, the official DINOv3 ones.

Run `python canvit.py` for a demo, `python bench.py canvit` (latency) and `python bench.py flops`
(App. G), `python -m pytest tests/test_canvit.py` for the tests.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fovea


# ---- Configuration (App. D.1, Table 1) -------------------------------------------------------
@dataclass
class BackboneConfig:
    """A DINOv3-style ViT; fields as the official `backbone_kwargs`. Defaults: ViT-B/16."""
    embed_dim: int = 768            # Table 1: backbone embedding dim
    num_heads: int = 12             # ViT-B/16: head_dim 64, as every DINOv3 ViT
    n_blocks: int = 12              # Table 11: L = 12
    patch_size: int = 16            # Table 1: 16^2 px patches
    ffn_ratio: float = 4.0          # App. G.2: r = 4
    rope_base: float = 100.0        # Table 1: RoPE base period
    layerscale_init: float = 1e-5   # Table 2: ViT LayerScale init


def backbone_config(name: str) -> BackboneConfig:
    """The official backbone names (DINOv3 sizes, head_dim 64)."""
    if name == "vits16":
        return BackboneConfig(embed_dim=384, num_heads=6, n_blocks=12)
    if name == "vitb16":
        return BackboneConfig(embed_dim=768, num_heads=12, n_blocks=12)
    if name == "vitl16":
        return BackboneConfig(embed_dim=1024, num_heads=16, n_blocks=24)
    raise ValueError(f"unknown backbone {name!r}; valid: 'vits16', 'vitb16', 'vitl16', "
                     "or a dict of BackboneConfig fields")


@dataclass
class CanViTConfig:
    """CanViT's architecture; field names as the official 0.1 `model_config`. Defaults: CanViT-B."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # Table 1: ViT-B/16
    n_backbone_registers: int = 5   # Table 1: backbone registers (ephemeral)
    n_canvas_registers: int = 16    # Table 1: canvas registers (persistent)
    canvas_num_heads: int = 8       # Table 1: Canvas Attention heads
    canvas_head_dim: int = 128      # Table 1: Canvas Attention head dim (D_can = 1024)
    rw_stride: int = 2              # Table 1: Canvas Attention R/W stride
    enable_reads: bool = True       # Table 3 d ablates the reads
    enable_vpe: bool = True         # Table 1: VPE token enabled
    vpe_sigma: float = 1.0          # Table 1: VPE RFF standard deviation
    teacher_dim: int = 768          # Sec. 5.1: DINOv3 ViT-B teacher width

    def __post_init__(self):
        if isinstance(self.backbone, dict):                            # e.g. from YAML
            self.backbone = BackboneConfig(**self.backbone)

    @property
    def canvas_dim(self) -> int:
        return self.canvas_num_heads * self.canvas_head_dim


VPE_SEED = 42      # official: the frozen RFF matrix is drawn from its own generator, seed 42
MIN_SCALE = 0.05   # Sec. 5.2: s_min = 0.05 (0.25% of the scene's area)


# ---- Sec. 4: scene-relative RoPE, R/W placement, VPE coordinates (pure, float32) -------------
def rope_periods(head_dim: int, base: float, device=None) -> Tensor:
    """(head_dim/4,) float32 periods base^(k / (head_dim/4)), from 1 to base scene units."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    n = head_dim // 4
    return base ** (torch.arange(n, dtype=torch.float32, device=device) / n)


def grid_centers(rows: int, cols: int, device=None) -> Tensor:
    """(rows*cols, 2) float32 (y, x) cell centres (i + 0.5) / n * 2 - 1 of a grid tiling [-1, 1]^2,
    row-major: for an h x w image, DINOv3's RoPE grid with per-axis ("separate") normalisation."""
    y = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) / rows * 2 - 1
    x = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) / cols * 2 - 1
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), -1).reshape(rows * cols, 2)


def glimpse_positions(center_yx: Tensor, scale: Tensor, grid: int) -> Tensor:
    """SR-RoPE: (B, g*g, 2) scene positions of the glimpse patches, centre + scale * cell centre."""
    cells = grid_centers(grid, grid, center_yx.device)                            # (g*g, 2)
    return center_yx.float()[:, None, :] + scale.float()[:, None, None] * cells


def rope_tables(positions: Tensor, periods: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N, 2) positions -> (sin, cos), each (B, 1, N, 4 * len(periods)), float32: angles
    2 pi pos / period, all y then all x frequencies, tiled twice (rotate-half pairs i, i + hd/2)."""
    angles = 2 * math.pi * positions.float()[..., None] / periods.float()        # (B, N, 2, hd/4)
    angles = angles.flatten(-2).tile(2)                                           # (B, N, hd)
    return angles.sin()[:, None], angles.cos()[:, None]


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the last N tokens of x (B, H, N_total, hd), in float32; the first N_total - N
    (VPE, CLS, registers) are not spatial and pass unchanged. Returns x's dtype."""
    sin, cos = rope
    n_prefix = x.shape[2] - sin.shape[2]
    xs = x[:, :, n_prefix:].float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xs[..., half:], xs[..., :half]], -1)
    return torch.cat([x[:, :, :n_prefix], (xs * cos + rotated * sin).to(x.dtype)], 2)


def rw_schedule(n_blocks: int, rw_stride: int, enable_reads: bool = True
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Blocks after which Canvas Attention reads and writes: (reads, writes). Sec. 4: reads and
    writes alternate along depth every rw_stride blocks (R, W, R, W, ...);
    NOTE(paper): as in the official code, the last block always gets a write, so that the canvas
    holds the glimpse's final tokens; where a read and a write follow the same block the read
    comes first. Without reads (Table 3 d) the writes stay where they were."""
    if rw_stride < 1:
        raise ValueError(f"rw_stride must be >= 1, got {rw_stride}")
    slots = list(range(rw_stride - 1, n_blocks, rw_stride))
    reads, writes = slots[0::2], slots[1::2]
    if not writes or writes[-1] != n_blocks - 1:
        writes.append(n_blocks - 1)
    return (tuple(reads) if enable_reads else ()), tuple(writes)


def vpe_coordinates(center_yx: Tensor, scale: Tensor) -> Tensor:
    """App. C, Eq. (9): the scale-invariant viewpoint (y/s, x/s, log s), (B, 3) float32.
    NOTE(paper): Eq. (9) lists (x/s, y/s, log s); the official code and checkpoints use (y, x)."""
    s = scale.float()
    return torch.stack([center_yx[:, 0].float() / s, center_yx[:, 1].float() / s, s.log()], -1)


# ---- The RoPE ViT (DINOv3 style): patch embedding, pre-norm blocks with LayerScale -----------
class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)          # (B, D, h, w) -> (B, h*w, D)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))                           # exact (erf) GELU


class MaskedKeyBiasLinear(nn.Linear):
    """The fused qkv projection with its key bias masked to zero (DINOv3's LinearKMaskedBias):
    F.linear(x, W, bias * bias_mask) as in both official codes. `bias_mask` is saved in DINOv3
    checkpoints (persistent), not in CanViT ones."""
    def __init__(self, dim: int, persistent_mask: bool):
        super().__init__(dim, 3 * dim)
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask, persistent=persistent_mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, persistent_mask: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MaskedKeyBiasLinear(dim, persistent_mask)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 x (B, H, N, hd)
        out = F.scaled_dot_product_attention(apply_rope(q, rope), apply_rope(k, rope), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))        # (B, H, N, hd) -> (B, N, D)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, persistent_mask: bool):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D)
        self.attn = SelfAttention(D, cfg.num_heads, persistent_mask)
        self.ls1 = LayerScale(D, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = Mlp(D, int(D * cfg.ffn_ratio))
        self.ls2 = LayerScale(D, cfg.layerscale_init)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopeEmbed(nn.Module):
    """Holds the RoPE periods (a buffer: DINOv3 checkpoints save them as `rope_embed.periods`)."""
    def __init__(self, head_dim: int, base: float, persistent: bool):
        super().__init__()
        self.register_buffer("periods", rope_periods(head_dim, base), persistent=persistent)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_tables(positions, self.periods)


class ViTBackbone(nn.Module):
    """Patch-16 embedding and pre-norm RoPE blocks, no absolute position embedding. CanViT drives
    the blocks itself (reads and writes between them); `DINOv3ViT` adds CLS, registers, norm."""
    def __init__(self, cfg: BackboneConfig, dinov3_buffers: bool = False):
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} not divisible by {cfg.num_heads} heads")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.blocks = nn.ModuleList(Block(cfg, dinov3_buffers) for _ in range(cfg.n_blocks))
        self.rope_embed = RopeEmbed(cfg.embed_dim // cfg.num_heads, cfg.rope_base, dinov3_buffers)
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv3's init: truncated normal(0.02) Linear weights, zero biases, LayerScale constant,
        patch embedding uniform(+-1/sqrt(fan_in)) (as the official CanViT backbone)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, self.cfg.layerscale_init)
            elif isinstance(m, PatchEmbed):
                bound = 1 / math.sqrt(3 * self.cfg.patch_size ** 2)
                nn.init.uniform_(m.proj.weight, -bound, bound)
                nn.init.uniform_(m.proj.bias, -bound, bound)


class DINOv3ViT(ViTBackbone):
    """The DINOv3 ViT (the teacher of Sec. 5.1) and the passive ViT baseline. Tokens [CLS,
    storage (register) tokens, patches]; forward on (B, 3, H, W) images with H, W multiples of
    the patch size (H != W allowed) returns, after the final LayerNorm, {"cls": (B, D),
    "registers": (B, R, D), "patches": (B, h*w, D)} and "prenorm" (B, N, D)."""
    def __init__(self, cfg: BackboneConfig, n_storage_tokens: int = 4):
        super().__init__(cfg, dinov3_buffers=True)
        D = cfg.embed_dim
        self.n_storage_tokens = n_storage_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        if n_storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, D))
            nn.init.normal_(self.storage_tokens, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # iBOT masking only: unused here
        self.norm = nn.LayerNorm(D)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        B, _, H, W = images.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image {H}x{W} px is not a whole number of {p} px patches")
        tokens = [self.cls_token.expand(B, -1, -1), self.patch_embed(images)]
        if self.n_storage_tokens:
            tokens.insert(1, self.storage_tokens.expand(B, -1, -1))
        x = torch.cat(tokens, 1)                                       # (B, 1 + R + h*w, D)
        rope = self.rope_embed(grid_centers(H // p, W // p, images.device)[None])
        for block in self.blocks:
            x = block(x, rope)
        xn = self.norm(x)
        r = 1 + self.n_storage_tokens
        return {"cls": xn[:, 0], "registers": xn[:, 1:r], "patches": xn[:, r:], "prenorm": x}


class ViTClassifier(nn.Module):
    """The passive, bottom-up patch-16 ViT baseline: DINOv3ViT and a linear head on its CLS.
    (B, 3, H, W) -> (B, K) logits; a larger image means more, finer patches."""
    def __init__(self, cfg: BackboneConfig, num_classes: int, n_storage_tokens: int = 4):
        super().__init__()
        self.vit = DINOv3ViT(cfg, n_storage_tokens)
        self.head = nn.Linear(cfg.embed_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.vit(images)["cls"])


@dataclass
class PassiveViTConfig:
    """The bottom-up patch-16 ViT baseline of [000] Fig. 1 (ViTClassifier), supervised."""
    backbone: BackboneConfig = field(default_factory=lambda: backbone_config("vits16"))
    n_storage_tokens: int = 4
    num_classes: int = 1000
    mixup_alpha: float = 0.8       # as the foveal model it is compared with
    label_smoothing: float = 0.0


class PassiveViTSupervised(nn.Module):
    """Cross-entropy of the passive ViT on whole images, with MixUp (train.py's `vit_sup`):
    the baseline of [000] Fig. 1, and a teacher for distillation on a new domain."""
    augment = True                 # as the foveal model: random resized crop + flip

    def __init__(self, cfg: PassiveViTConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.model = ViTClassifier(cfg.backbone, cfg.num_classes, cfg.n_storage_tokens)

    def train_step(self, batch: dict, step: int, run) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)   # the (seed, step) stream
        images, target = fovea.supervised_batch(gen, batch["image"], batch["label"],
                                                self.cfg.num_classes, self.cfg.mixup_alpha)
        with run.autocast():
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing)
        loss.backward()
        run.optimizer_step()
        acc = (logits.argmax(-1) == target.argmax(-1)).float().mean()
        return {"loss": loss.detach(), "acc": acc.detach(), "glimpses": images.shape[0]}

    def export(self) -> dict:
        """The classifier (eval.py's baseline) and its ViT (a distillation teacher)."""
        vit = self.model.vit
        return {"classifier": fovea.export_part(self.model, cfg=vit.cfg, num_classes=self.cfg.num_classes,
                                                n_storage_tokens=vit.n_storage_tokens),
                "backbone": fovea.export_part(vit, cfg=vit.cfg, n_storage_tokens=vit.n_storage_tokens)}


# ---- Sec. 4: VPE token, Canvas Attention, heads, standardizers -------------------------------
class VPE(nn.Module):
    """Sec. 4, App. C: random Fourier features of (y/s, x/s, log s), then LayerNorm. The RFF
    matrix `B` (D/2, 3) ~ N(0, sigma^2) is a frozen buffer; float32, autocast off (App. D.3)."""
    def __init__(self, dim: int, sigma: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(VPE_SEED)
        self.register_buffer("B", sigma * torch.randn(dim // 2, 3, generator=g, device="cpu"))
        self.norm = nn.LayerNorm(dim)
        self.norm.weight.data.fill_(1 / math.sqrt(dim))               # official init

    def forward(self, center_yx: Tensor, scale: Tensor) -> Tensor:
        with torch.autocast(center_yx.device.type, enabled=False):
            proj = vpe_coordinates(center_yx, scale) @ self.B.float().T  # (B, 3) @ (3, D/2)
            return self.norm(torch.cat([proj.cos(), proj.sin()], -1))      # (B, D)


class CanvasAttention(nn.Module):
    """App. B: cross-attention with LayerNorm on both sides and SR-RoPE on queries and keys."""
    def __init__(self, q_dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_norm, self.kv_norm = nn.LayerNorm(q_dim), nn.LayerNorm(kv_dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_rope, kv_rope) -> Tensor:
        """(B, Nq, Dc), (B, Nkv, Dc) x2 -> (B, Nq, Dc); RoPE rotates the spatial tokens only."""
        def heads(t):                                                  # (B, N, Dc) -> (B, H, N, hd)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        q, k = apply_rope(heads(q), q_rope), apply_rope(heads(k), kv_rope)
        return F.scaled_dot_product_attention(q, k, heads(v)).transpose(1, 2).flatten(2)


class CanvasRead(CanvasAttention):
    """Backbone tokens query the canvas. Learned Q and O on the backbone side; the canvas is
    K and V after LayerNorm only (Sec. 4, asymmetric projections)."""
    def __init__(self, dim: int, canvas_dim: int, num_heads: int):
        super().__init__(dim, canvas_dim, num_heads)
        self.q_proj = nn.Linear(dim, canvas_dim)
        self.out_proj = nn.Linear(canvas_dim, dim)

    def forward(self, local: Tensor, canvas: Tensor, local_rope, canvas_rope) -> Tensor:
        kv = self.kv_norm(canvas)
        q = self.q_proj(self.q_norm(local))
        return self.out_proj(self.attend(q, kv, kv, local_rope, canvas_rope))  # (B, N_local, D)


class CanvasWrite(CanvasAttention):
    """Canvas tokens query the backbone. Learned K and V on the backbone side; the canvas is
    the query after LayerNorm, and the output is added to it without projection."""
    def __init__(self, dim: int, canvas_dim: int, num_heads: int):
        super().__init__(canvas_dim, dim, num_heads)
        self.k_proj = nn.Linear(dim, canvas_dim)
        self.v_proj = nn.Linear(dim, canvas_dim)

    def forward(self, canvas: Tensor, local: Tensor, canvas_rope, local_rope) -> Tensor:
        kv = self.kv_norm(local)
        return self.attend(self.q_norm(canvas), self.k_proj(kv), self.v_proj(kv),
                           canvas_rope, local_rope)                    # (B, N_canvas, Dc)


class Readout(nn.Module):
    """Eq. (2): a token-wise LayerNorm + Linear head (W_spatial or W_global)."""
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        self.norm.weight.data.fill_(1 / math.sqrt(dim))               # official init

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class Standardizer(nn.Module):
    """Sec. 5.1: per-position z-scores (x - mean) / sqrt(var + eps), stats (N, Dt) as buffers."""
    def __init__(self, n_tokens: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(n_tokens, dim))
        self.register_buffer("var", torch.ones(n_tokens, dim))
        self.register_buffer("_initialized", torch.tensor(False))

    @property
    def fitted(self) -> bool:
        return bool(self._initialized)

    def set(self, mean: Tensor, var: Tensor) -> None:
        if mean.shape != self.mean.shape or var.shape != self.var.shape:
            raise ValueError(f"stats must be {tuple(self.mean.shape)}, got {tuple(mean.shape)}, "
                             f"{tuple(var.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
            raise ValueError("standardizer stats must be finite with var >= 0")
        with torch.no_grad():
            self.mean.copy_(mean)
            self.var.copy_(var)
            self._initialized.fill_(True)

    def fit(self, samples: Tensor) -> None:
        """samples (S, N, Dt), e.g. 4096 teacher outputs; biased variance, in float64."""
        x = samples.double()
        self.set(x.mean(0).float(), x.var(0, unbiased=False).float())

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("standardizer is not fitted: call CanViT.fit_standardizers or "
                               "set_standardizers (or load a checkpoint that has them)")

    def standardize(self, x: Tensor) -> Tensor:
        self._check()
        return (x - self.mean) / (self.var + self.eps).sqrt()

    def destandardize(self, x: Tensor) -> Tensor:
        self._check()
        return x * (self.var + self.eps).sqrt() + self.mean


# ---- Sec. 4: CanViT --------------------------------------------------------------------------
class Viewpoint(NamedTuple):
    """Where a glimpse looks: centre (..., 2) as (y, x) in [-1, 1] and scale (...) in (0, 1]."""
    center_yx: Tensor
    scale: Tensor


class State(NamedTuple):
    """What CanViT carries from one glimpse to the next (official names)."""
    canvas: Tensor          # (B, Rc + G*G, Dc) float32: canvas registers, then the G x G grid
    recurrent_cls: Tensor   # (B, 1, D)

    def detach(self) -> State:
        return State(self.canvas.detach(), self.recurrent_cls.detach())


class StepOutput(NamedTuple):
    state: State
    local_patches: Tensor   # (B, g*g, D): the glimpse's patch tokens after the last block
    vpe: Tensor | None      # (B, D): the VPE token after the last block


class Predictions(NamedTuple):
    cls: Tensor             # (B, Dt): teacher CLS
    patches: Tensor         # (B, G*G, Dt): teacher patch features, row-major over the scene


class CanViT(nn.Module):
    """Canvas Vision Transformer; one call processes one glimpse (Fig. 2): state =
    model.init_state(B, G); out = model(glimpse, state, center_yx, scale); preds =
    model.predict(out.state). Nothing is modified in place."""
    def __init__(self, cfg: CanViTConfig):
        super().__init__()
        self.cfg = cfg
        b = cfg.backbone
        D, Dc = b.embed_dim, cfg.canvas_dim
        self.backbone = ViTBackbone(b)
        self.read_after_blocks, self.write_after_blocks = rw_schedule(
            b.n_blocks, cfg.rw_stride, cfg.enable_reads)
        self.canvas_read = nn.ModuleList(
            CanvasRead(D, Dc, cfg.canvas_num_heads) for _ in self.read_after_blocks)
        self.canvas_write = nn.ModuleList(
            CanvasWrite(D, Dc, cfg.canvas_num_heads) for _ in self.write_after_blocks)
        self._read_at = {blk: i for i, blk in enumerate(self.read_after_blocks)}
        self._write_at = {blk: i for i, blk in enumerate(self.write_after_blocks)}
        # Sec. 4: the canvas grid is broadcast from one learned patch at any run-time size
        self.canvas_register_init = nn.Parameter(torch.randn(1, cfg.n_canvas_registers, Dc)
                                                 * (1 / math.sqrt(Dc)))
        self.canvas_spatial_init = nn.Parameter(torch.randn(1, 1, Dc) * (1 / math.sqrt(Dc)))
        self.recurrent_cls_init = nn.Parameter(torch.randn(1, 1, D) * (1 / math.sqrt(D)))
        self.backbone_registers = nn.Parameter(torch.empty(1, cfg.n_backbone_registers, D))
        nn.init.normal_(self.backbone_registers, std=0.02)
        self.vpe = VPE(D, cfg.vpe_sigma) if cfg.enable_vpe else None
        self.canvas_rope = RopeEmbed(cfg.canvas_head_dim, b.rope_base, persistent=False)
        self.scene_patches_head = Readout(Dc, cfg.teacher_dim)        # W_spatial
        self.scene_cls_head = Readout(D, cfg.teacher_dim)             # W_global
        self.cls_standardizers = nn.ModuleDict()                      # keyed by canvas grid G
        self.scene_standardizers = nn.ModuleDict()

    # -- the step interface -------------------------------------------------------------------

    def init_state(self, batch_size: int, canvas_grid: int) -> State:
        """The state before any glimpse: canvas (B, Rc + G*G, Dc), recurrent CLS (B, 1, D)."""
        registers = self.canvas_register_init.expand(batch_size, -1, -1)
        patches = self.canvas_spatial_init.expand(batch_size, canvas_grid ** 2, -1)
        return State(torch.cat([registers, patches], 1),
                     self.recurrent_cls_init.expand(batch_size, -1, -1))

    def canvas_grid(self, canvas: Tensor) -> int:
        n = canvas.shape[1] - self.cfg.n_canvas_registers
        G = math.isqrt(n)
        if G * G != n:
            raise ValueError(f"{n} canvas patches do not form a square grid")
        return G

    def forward(self, glimpse: Tensor, state: State, center_yx: Tensor, scale: Tensor
                ) -> StepOutput:
        """One glimpse (B, 3, g*p, g*p) taken at viewpoint (center_yx (B, 2), scale (B,))."""
        B, _, H, W = glimpse.shape
        p = self.cfg.backbone.patch_size
        if H != W or H % p:
            raise ValueError(f"glimpse must be square in whole {p} px patches, got {H}x{W}")
        g = H // p
        patches = self.backbone.patch_embed(glimpse)                  # (B, g*g, D)
        prefix = [state.recurrent_cls, self.backbone_registers.expand(B, -1, -1)]
        if self.vpe is not None:
            prefix.insert(0, self.vpe(center_yx, scale)[:, None].to(patches.dtype))
        x = torch.cat([*prefix, patches], 1)           # (B, N_local, D): [VPE, CLS, regs, patches]
        n_prefix = x.shape[1] - g * g
        # SR-RoPE (App. B): glimpse patches at centre + scale * cell, canvas cells fixed; float32
        positions = glimpse_positions(center_yx, scale, g)            # (B, g*g, 2)
        rope_local = self.backbone.rope_embed(positions)              # backbone head dim
        rope_local_canvas = self.canvas_rope(positions)               # canvas head dim
        canvas = state.canvas
        G = self.canvas_grid(canvas)
        rope_canvas = self.canvas_rope(grid_centers(G, G, canvas.device)[None])
        for i, block in enumerate(self.backbone.blocks):
            x = block(x, rope_local)
            if i in self._read_at:    # Read: the backbone queries the canvas, residual to x
                x = x + self.canvas_read[self._read_at[i]](x, canvas, rope_local_canvas,
                                                           rope_canvas)
            if i in self._write_at:   # Write: the canvas queries the backbone, residual to it
                # App. D.3: the float32 canvas accumulates (bf16 residuals promote to float32)
                canvas = canvas + self.canvas_write[self._write_at[i]](canvas, x, rope_canvas,
                                                                       rope_local_canvas)
        c = 1 if self.vpe is not None else 0
        return StepOutput(State(canvas, x[:, c:c + 1].contiguous()),
                          x[:, n_prefix:].contiguous(),
                          x[:, 0] if self.vpe is not None else None)

    # -- decoding (Sec. 5.1, Eq. 2) and standardization ----------------------------------------

    def predict(self, state: State, destandardize: bool = False) -> Predictions:
        """Eq. (2): Z_t = W_spatial LN(C_t) over the canvas patches, z_t = W_global LN(h_t), in
        the loss's standardized space (Eq. 3), or mapped back to DINOv3's by destandardize with
        the standardizers of this canvas grid (App. F.2)."""
        patches = self.scene_patches_head(state.canvas[:, self.cfg.n_canvas_registers:])
        cls = self.scene_cls_head(state.recurrent_cls[:, 0])
        if destandardize:
            cls_std, patch_std = self.standardizers(self.canvas_grid(state.canvas))
            cls, patches = cls_std.destandardize(cls), patch_std.destandardize(patches)
        return Predictions(cls, patches)

    def standardizers(self, grid: int) -> tuple[Standardizer, Standardizer]:
        """(CLS, patch) standardizers of canvas grid G; KeyError if there are none."""
        if str(grid) not in self.scene_standardizers:
            raise KeyError(f"no standardizers for canvas grid {grid} (have "
                           f"{sorted(int(k) for k in self.scene_standardizers)}): fit or set them")
        return self.cls_standardizers[str(grid)], self.scene_standardizers[str(grid)]

    def add_standardizers(self, grid: int) -> tuple[Standardizer, Standardizer]:
        """Get or create the (unfitted) standardizers of canvas grid G."""
        if str(grid) not in self.scene_standardizers:
            device = self.canvas_spatial_init.device
            self.cls_standardizers[str(grid)] = Standardizer(1, self.cfg.teacher_dim).to(device)
            self.scene_standardizers[str(grid)] = Standardizer(grid ** 2,
                                                               self.cfg.teacher_dim).to(device)
        return self.standardizers(grid)

    def fit_standardizers(self, teacher_cls: Tensor, teacher_patches: Tensor) -> None:
        """Sec. 5.1: fit from a sample of teacher outputs, cls (S, Dt) and patches (S, G*G, Dt)."""
        cls_std, patch_std = self.add_standardizers(math.isqrt(teacher_patches.shape[1]))
        cls_std.fit(teacher_cls[:, None])
        patch_std.fit(teacher_patches)

    def set_standardizers(self, grid: int, cls_mean: Tensor, cls_var: Tensor,
                          patch_mean: Tensor, patch_var: Tensor) -> None:
        """Set known stats: cls (1, Dt) and patches (G*G, Dt)."""
        cls_std, patch_std = self.add_standardizers(grid)
        cls_std.set(cls_mean, cls_var)
        patch_std.set(patch_mean, patch_var)

    def standardize_targets(self, teacher_cls: Tensor, teacher_patches: Tensor
                            ) -> tuple[Tensor, Tensor]:
        """Teacher cls (B, Dt), patches (B, G*G, Dt) -> the z-scored targets of Eq. (3)."""
        cls_std, patch_std = self.standardizers(math.isqrt(teacher_patches.shape[1]))
        return cls_std.standardize(teacher_cls), patch_std.standardize(teacher_patches)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict by default; creates the standardizers of every canvas grid the dict holds."""
        for key in state_dict:
            if m := re.match(r"(?:cls|scene)_standardizers\.(\d+)\.", key):
                self.add_standardizers(int(m[1]))
        if strict:
            _check_state_dict(self, state_dict, "CanViT")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ---- Loading official checkpoints (canvit-pytorch 0.1 / 0.2, Hugging Face, DINOv3) -----------
# and the teacher of a train.py distill run (shared by distill, grpo and eval)

def _check_state_dict(module: nn.Module, state_dict: dict, what: str) -> None:
    """Raise one error naming every missing key, unexpected key and shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} state dict does not match the model: "
                         f"{len(missing)} missing {missing}; {len(unexpected)} unexpected "
                         f"{unexpected}; {len(shapes)} shape mismatches {shapes}")


# canvit-pytorch 0.2 renamed the 0.1 keys (its legacy.py); these rules map them back, in order.
_V02_TO_V01 = [
    (r"^canvit\.", ""),
    (r"^canvas_reads\.", "canvas_read."), (r"^canvas_writes\.", "canvas_write."),
    *((rf"^(canvas_(?:read|write)\.\d+)\.{old}\.", rf"\1.{new}.") for old, new in (
        ("q_map", "q_proj"), ("k_map", "k_proj"), ("v_map", "v_proj"), ("o_map", "out_proj"),
        ("ln_q", "q_norm"), ("ln_kv", "kv_norm"))),
    (r"^init_canvas_registers$", "canvas_register_init"),
    (r"^init_canvas_patch$", "canvas_spatial_init"),
    (r"^init_recurrent_cls$", "recurrent_cls_init"),
    (r"^vpe\.frequencies$", "vpe.B"),
    (r"^teacher_patch_readout\.", "scene_patches_head."),
    (r"^teacher_cls_readout\.", "scene_cls_head."),
    (r"\.fitted$", "._initialized"),
]


def _v02_to_v01_keys(state_dict: dict) -> dict:
    """0.2 names -> 0.1 names. 0.2 holds one teacher grid; its G is read from the stats' shape."""
    std = state_dict.get("teacher_patch_standardizer.mean")
    grid = math.isqrt(std.shape[0]) if std is not None else None
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _V02_TO_V01:
            new = re.sub(pattern, repl, new)
        new = re.sub(r"^teacher_patch_standardizer\.", f"scene_standardizers.{grid}.", new)
        new = re.sub(r"^teacher_cls_standardizer\.", f"cls_standardizers.{grid}.", new)
        out[new] = value
    return out


def official_config(model_config: dict, backbone: str | dict | None = None) -> CanViTConfig:
    """Our config from the official 0.1 `model_config` (0.2 `canvit_config` fields accepted) and
    a backbone name or dict of sizes. Options this implementation does not have are errors."""
    mc = dict(model_config)
    if "num_canvas_registers" in mc:                                   # 0.2 field names
        renames = {"num_canvas_registers": "n_canvas_registers",
                   "num_backbone_registers": "n_backbone_registers"}
        mc = {renames.get(k, k): v for k, v in mc.items()}
        if backbone is None:
            backbone = mc.get("backbone_name")
        mc.pop("backbone_name", None)
        if mc.pop("canvas_projections", "asymmetric") != "asymmetric":
            raise ValueError("only canvas_projections='asymmetric' (Sec. 4) is implemented")
    if mc.pop("canvas_update_mode", "additive") != "additive":
        raise ValueError("only canvas_update_mode='additive' (Sec. 4) is implemented")
    if mc.pop("canvas_proj_mode", "asymmetric") != "asymmetric":
        raise ValueError("only canvas_proj_mode='asymmetric' (Sec. 4) is implemented")
    if mc.pop("gate_bias_init", None) is not None:
        raise ValueError("gate_bias_init belongs to the 'convex' update, not implemented")
    known = {f.name for f in fields(CanViTConfig)} - {"backbone", "vpe_sigma"}
    if set(mc) - known:
        raise ValueError(f"unknown model_config fields {sorted(set(mc) - known)}; "
                         f"known: {sorted(known)}")
    if backbone is None:
        raise ValueError("give the backbone: 'vits16', 'vitb16', 'vitl16' or a dict of sizes")
    bb = backbone_config(backbone) if isinstance(backbone, str) else BackboneConfig(**backbone)
    return CanViTConfig(backbone=bb, **mc)


def from_official(state_dict: dict, model_config: dict, backbone: str | dict | None = None
                  ) -> CanViT:
    """A CanViT from an official checkpoint: 0.1 or 0.2 key names, loaded strictly. model_config:
    the 0.1 fields (as in the reference file's `model_config`, or a 0.2 `canvit_config`);
    teacher_dim is read from the weights when absent. backbone: 'vits16', 'vitb16', 'vitl16' or
    a dict of BackboneConfig fields (the official `backbone_kwargs`)."""
    if any(k.startswith(("canvit.", "teacher_")) for k in state_dict):
        state_dict = _v02_to_v01_keys(state_dict)
    mc = dict(model_config)
    if "teacher_dim" not in mc:
        mc["teacher_dim"] = state_dict["scene_cls_head.proj.weight"].shape[0]
    model = CanViT(official_config(mc, backbone))
    model.load_state_dict(state_dict, strict=True)
    return model


def load_hf_folder(path: str | Path) -> CanViT:
    """A downloaded Hugging Face checkpoint folder (config.json + model.safetensors), 0.1 or 0.2."""
    path = Path(path)
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError("reading model.safetensors needs the `safetensors` package: "
                          "pip install safetensors") from e
    config = json.loads((path / "config.json").read_text())
    state_dict = load_file(str(path / "model.safetensors"))
    if "model_config" in config and "backbone_name" in config:          # canvit-pytorch 0.1
        model = from_official(state_dict, config["model_config"], config["backbone_name"])
        grids = config.get("canvas_patch_grid_sizes")
    elif "canvit_config" in config:                                     # canvit-pytorch 0.2
        mc = {**config["canvit_config"], "teacher_dim": config["teacher_dim"]}
        model = from_official(state_dict, mc)
        grids = [config["teacher_patch_grid"]] if "teacher_patch_grid" in config else None
    else:
        raise ValueError(f"{path}/config.json is neither a canvit-pytorch 0.1 checkpoint "
                         f"(backbone_name, model_config) nor 0.2 (canvit_config); keys: "
                         f"{sorted(config)}")
    have = sorted(int(k) for k in model.scene_standardizers)
    if grids is not None and sorted(grids) != have:
        raise ValueError(f"config.json names standardizer grids {grids}, weights hold {have}")
    return model


def dinov3_config(state_dict: dict) -> tuple[BackboneConfig, int]:
    """(architecture, number of storage tokens) of an official DINOv3 ViT state dict."""
    if "cls_token" not in state_dict:
        raise ValueError("not a DINOv3 ViT backbone state dict (no 'cls_token')")
    if any(".mlp.w1." in k for k in state_dict):
        raise ValueError("SwiGLU DINOv3 ViTs (S+/H+/7B) are not supported: only ViT-S/B/L (MLP)")
    D = state_dict["cls_token"].shape[-1]
    n_blocks = 1 + max(int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    periods = state_dict["rope_embed.periods"]
    n = periods.shape[0]
    if 4 * n != 64:
        raise ValueError(f"rope_embed.periods has {n} entries: head_dim {4 * n}, expected 64")
    base = round(float(periods[1].float()) ** n, 3)                 # periods[k] = base^(k/n)
    cfg = BackboneConfig(embed_dim=D, num_heads=D // 64, n_blocks=n_blocks,
                         patch_size=state_dict["patch_embed.proj.weight"].shape[-1],
                         ffn_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / D,
                         rope_base=base)
    storage = state_dict.get("storage_tokens")
    return cfg, (storage.shape[1] if storage is not None else 0)


def load_dinov3(state_dict_or_path) -> DINOv3ViT:
    """The DINOv3 ViT-S/B/L from its official weights (e.g. dinov3_vitb16_pretrain_lvd1689m.pth),
    architecture inferred from the state dict, keys loaded strictly."""
    sd = state_dict_or_path
    if isinstance(sd, (str, Path)):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    cfg, n_storage = dinov3_config(sd)
    if not torch.allclose(sd["rope_embed.periods"].float(), rope_periods(64, cfg.rope_base),
                          rtol=1e-5):
        raise ValueError("rope_embed.periods is not base^(k/16): unsupported RoPE periods")
    # NOTE(paper): the forward is bias * bias_mask as in DINOv3, with the loaded mask; the
    # released checkpoints are reported to hold all-zero qkv biases and masks (DINOv3 issue 195)
    for k, mask in sd.items():
        if k.endswith("qkv.bias_mask") and not torch.isfinite(mask).all():
            raise ValueError(f"{k} is not finite: the checkpoint's key-bias mask was never set")
    model = DINOv3ViT(cfg, n_storage)
    _check_state_dict(model, sd, "DINOv3")
    model.load_state_dict(sd, strict=True)
    return model


def load_teacher(path: str, what: str) -> DINOv3ViT:
    """A frozen teacher from a path: official DINOv3 weights, or the passive ViT ("backbone") of a
    train.py `vit_sup` checkpoint (a teacher for a new domain). `what` names the setting in errors."""
    if not Path(path).is_file():
        raise fovea.CheckpointError(f"{what} = {path}: not a file (give the official DINOv3 .pth "
                                    "or a vit_sup run's ckpt.pt)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(saved, dict) and {"config", "model"} <= set(saved):          # a train.py run
        return fovea.load_frozen(saved, "backbone", DINOv3ViT, what=f"{what} = {path}")
    return load_dinov3(saved).eval().requires_grad_(False)


def run_teacher(ckpt: dict, moved_to: str = "", what: str = "teacher") -> DINOv3ViT | None:
    """The frozen teacher of a train.py distill run: saved in it (a random one), else read from
    the path it was trained with, or from `moved_to` where the file has moved; None when the run
    knows neither (it read precomputed features)."""
    if "teacher" in ckpt.get("export", {}):
        return fovea.load_frozen(ckpt, "teacher", DINOv3ViT)
    path = (moved_to or ckpt.get("extra", {}).get("teacher_weights")
            or ckpt["config"]["distill"]["teacher"]["weights"])
    return load_teacher(path, what) if path else None


# ---- Sec. 5.2, App. F.1: viewing policies (viewpoints (T, B, ...) unless said otherwise) -----
def random_viewpoints(batch: int, generator: torch.Generator | None = None,
                      min_scale: float = MIN_SCALE) -> Viewpoint:
    """Sec. 5.2: L^2 ~ U([0, (1 - s_min)^2]), s = 1 - L, so p(s) is proportional to 1 - s on
    [s_min, 1]; the centre is uniform in the box |y|, |x| <= 1 - s (crop inside the scene).
    Returns CPU tensors center_yx (B, 2), scale (B,) (all policies do: move them with .to)."""
    L = (torch.rand(batch, generator=generator) * (1 - min_scale) ** 2).sqrt()
    center = (torch.rand(batch, 2, generator=generator) * 2 - 1) * L[:, None]
    return Viewpoint(center, 1 - L)


def quadtree_level(level: int) -> Viewpoint:
    """App. F.1: the 2^l x 2^l non-overlapping tiles of scale 2^-l, row-major: (4^l, 2), (4^l,)."""
    n = 2 ** level
    return Viewpoint(grid_centers(n, n), torch.full((n * n,), 1.0 / n))


def _levels_covering(n_glimpses: int) -> int:
    levels, total = 0, 0
    while total < n_glimpses:
        total, levels = total + 4 ** levels, levels + 1
    return levels


def _shuffled_levels(levels, n_glimpses: int, batch: int, generator) -> Viewpoint:
    centers, scales = [], []
    for level in levels:
        tiles = quadtree_level(level)
        order = torch.rand(batch, len(tiles.scale), generator=generator).argsort(1)  # (B, n)
        centers.append(tiles.center_yx[order].transpose(0, 1))        # (n, B, 2)
        scales.append(tiles.scale[order].transpose(0, 1))             # (n, B)
    return Viewpoint(torch.cat(centers)[:n_glimpses], torch.cat(scales)[:n_glimpses])


def policy_viewpoints(policy: str, n_glimpses: int, batch: int,
                      generator: torch.Generator | None = None) -> Viewpoint:
    """Viewpoints (T, B, 2), (T, B) of a non-adaptive policy (App. F.1): 'riid' random i.i.d. crops
    (Sec. 5.2); 'fiid' the full scene then i.i.d. crops; 'c2f' the quadtree from coarse to fine,
    levels V_0, s1(V_1), s2(V_2), ... with an independent random order within each level and
    scene, truncated to T; 'f2c' fine to coarse; 'full' the full scene (0, 0, 1) at every step.
    Entropy-guided C2F is `EntropyGuidedC2F`."""
    T, B = n_glimpses, batch
    if policy == "riid":
        vp = random_viewpoints(T * B, generator)
        return Viewpoint(vp.center_yx.view(T, B, 2), vp.scale.view(T, B))
    if policy == "fiid":
        vp = policy_viewpoints("riid", T, B, generator)
        return Viewpoint(torch.cat([torch.zeros(1, B, 2), vp.center_yx[1:]]),
                         torch.cat([torch.ones(1, B), vp.scale[1:]]))
    if policy == "c2f":
        return _shuffled_levels(range(_levels_covering(T)), T, B, generator)
    if policy == "f2c":
        # NOTE(paper): "the reverse of C2F"; as in the official code, the levels needed to
        # reach T glimpses are visited finest first (the exact reverse of C2F when T = 1, 5,
        # 21, ...), each level in a random order.
        return _shuffled_levels(reversed(range(_levels_covering(T))), T, B, generator)
    if policy == "full":
        return Viewpoint(torch.zeros(T, B, 2), torch.ones(T, B))
    raise ValueError(f"unknown policy {policy!r}; valid: 'riid', 'fiid', 'c2f', 'f2c', 'full' "
                     "(and EntropyGuidedC2F)")


def predictive_entropy(logits: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) along dim, e.g. (B, K, G, G) -> (B, G, G)."""
    log_p = torch.log_softmax(logits.float(), dim)
    return -(log_p.exp() * log_p).sum(dim)


class EntropyGuidedC2F:
    """App. F.1: C2F's levels in order; within a level, the unvisited tile whose canvas cells
    have the highest mean entropy (a (B, G, G) map from any probe on the current canvas) is
    visited next. Deterministic. Call `step(entropy)` once per glimpse."""
    def __init__(self, n_glimpses: int, canvas_grid: int):
        self.n_glimpses, self.G, self.t = n_glimpses, canvas_grid, 0
        finest = 2 ** (_levels_covering(n_glimpses) - 1)
        if canvas_grid % finest:
            raise ValueError(f"canvas grid {canvas_grid} is not a multiple of the finest "
                             f"quadtree level's {finest} tiles per side")
        levels = range(_levels_covering(n_glimpses))
        self.level_start = [sum(4 ** k for k in range(lv)) for lv in levels]  # first t per level
        self.visited: Tensor | None = None

    def step(self, entropy: Tensor) -> Viewpoint:
        """entropy (B, G, G) -> the next viewpoint, center_yx (B, 2), scale (B,), on its device."""
        if self.t >= self.n_glimpses:
            raise RuntimeError(f"the policy was made for {self.n_glimpses} glimpses")
        level = max(lv for lv, start in enumerate(self.level_start) if self.t >= start)
        if self.t == self.level_start[level]:
            self.visited = torch.zeros(entropy.shape[0], 4 ** level, dtype=torch.bool,
                                       device=entropy.device)
        self.t += 1
        B, n = entropy.shape[0], 2 ** level
        c = self.G // n                                                # cells per tile side
        tile_entropy = entropy.float().reshape(B, n, c, n, c).mean((2, 4)).flatten(1)  # (B, n*n)
        choice = tile_entropy.masked_fill(self.visited, float("-inf")).argmax(1)      # (B,)
        self.visited[torch.arange(B, device=entropy.device), choice] = True
        tiles = quadtree_level(level)
        return Viewpoint(tiles.center_yx.to(entropy.device)[choice],
                         tiles.scale.to(entropy.device)[choice])


# ---- Demo (`python canvit.py`); benchmarks and App. G's FLOP counts are in bench.py ----------
if __name__ == "__main__":
    # A C2F rollout of a small random CanViT on a random scene: how much each glimpse writes.
    torch.manual_seed(0)
    model = CanViT(CanViTConfig(backbone=BackboneConfig(embed_dim=64, num_heads=2, n_blocks=4),
                                n_backbone_registers=2, n_canvas_registers=4, canvas_num_heads=2,
                                canvas_head_dim=48, rw_stride=1, teacher_dim=40)).eval()
    scene, vps = torch.randn(2, 3, 256, 256), policy_viewpoints("c2f", 5, 2)
    state = model.init_state(2, 16)
    with torch.no_grad():
        for t in range(5):
            glimpse = fovea.bilinear_glimpse(scene, vps.center_yx[t], vps.scale[t], 64)
            new = model(glimpse, state, vps.center_yx[t], vps.scale[t]).state
            delta = (new.canvas - state.canvas).norm() / state.canvas.norm()
            print(f"t={t} viewpoint y,x={vps.center_yx[t, 0].tolist()} s={vps.scale[t, 0]:.3f} "
                  f"relative canvas update {delta:.3f}")
            state = new
