"""DINO self-distillation pieces and the sequential-to-global DINO objective (paper 000).

Papers
  [000]  "Self-supervised pretraining for an iterative image size agnostic vision transformer",
         arXiv 2604.20392.
  [DINO] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
         arXiv 2104.14294 (DINO v1; the head, the loss, centring, the schedules).
  [v2]   Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
         arXiv 2304.07193 (Sinkhorn-Knopp teacher, KoLeo).

[000] pretrains its foveal iterative ViT with DINO [000, Sec. 3.1]: a student matches an EMA
teacher's output distribution over K prototypes, the teacher's targets come from DINOv2's
Sinkhorn-Knopp online clustering instead of DINO v1's centring [000, Sec. 5.2], and a KoLeo term
spreads the student's features [000, App. C]. The projection head reads only the first state
token [000, Sec. 3.1]. The DINO pieces come first, small pure functions and one head module, each
computing what the official DINO / DINOv2 code does (pinned by `tests/reference/dino`); the
sequential-to-global objective (train.py's `dino`) is assembled from them further down.

Shapes
  B batch (rows of logits; the *global* batch where a function says so), K prototypes (the
  head's out_dim, 65,536 in [000] and DINOv2), D width (of the features fed to the head or KoLeo).

Paper -> code
  000 Sec. 3.1; DINO Sec. 3.1       projection head, weight-normed prototypes   DINOHead
  DINO Eq. 1-3                      cross-entropy H(P_t, P_s), student side     cross_entropy
  DINO Sec. 3.1, Eq. 4 (centring)   teacher softmax((t - c) / tau_t), its EMA   centered_probs,
                                                                                update_center
  000 Sec. 3.1, 5.2; v2 Sec. 4      Sinkhorn-Knopp teacher                      sinkhorn_knopp
  000 App. C; v2 Sec. 4             KoLeo regulariser                           koleo_loss
  000 Sec. 5.2 (as DINO)            momentum / tau_t schedules (lr, wd: train)  teacher_momentum,
                                                                                teacher_temperature
  000 Sec. 3.1, App. B              global / local views (top-down implicit crops),
                                    the sequential view      DINOSequentialToGlobal.draw_views
  DINO (multi-crop augmentation)    flip, jitter, grey, blur, solarise patches  Augment, ViewAugment
  000 Sec. 3.1, 4; App. C           all student vs all teacher outputs, head    DINOModel,
                                    on the first state token, KoLeo, EMA        DINOSequentialToGlobal
                                    teacher, no gradient across glimpses
  (collapse)                        teacher entropy, prototypes in use          collapse_stats

Run `python train.py --cfg dino_tiny.yaml` (then dino_probe_tiny.yaml and eval.py), `python
bench.py dino` (throughput), `python -m pytest tests/test_dino.py` (tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import fovea


# ---- --- The DINO pieces, as the official code computes them --- -----------------------------
def _trunc_normal_(w: Tensor, std: float, a: float = -2.0, b: float = 2.0) -> Tensor:
    """Fill w in place with N(0, std^2) truncated to [a, b] (absolute bounds), by inverse CDF.
    NOTE(paper): as official DINO (uniform -> erfinv), so a seeded head is identical to the
    official one; recent PyTorch's nn.init.trunc_normal_ samples otherwise (rejection)."""
    def cdf(v: float) -> float:                    # standard normal CDF
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0
    with torch.no_grad():
        w.uniform_(2 * cdf(a / std) - 1, 2 * cdf(b / std) - 1)
        w.erfinv_().mul_(std * math.sqrt(2.0)).clamp_(min=a, max=b)
    return w


def _distributed() -> bool:
    """True when a process group is up: the global-batch statistics are then all-reduced."""
    return dist.is_available() and dist.is_initialized()


class _WeightNormLinear(nn.Module):
    """A bias-free Linear(in_features, out_features) with weight-normalised rows (dim 0):
    row k = g_k * v_k / ||v_k||. NOTE(paper): official DINO wraps a Linear with the deprecated
    `nn.utils.weight_norm`; the same computation without its hooks (and warning), its parameter
    names and shapes (`weight_g` (out, 1), `weight_v` (out, in)): official heads load strictly."""
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # PyTorch's default Linear init for the direction (what the official head keeps).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """(out, in) effective weight g * v / ||v||, recomputed from g and v on every call."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:                       # (..., in) -> (..., out)
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO v1's projection head: MLP -> L2-normalised bottleneck -> weight-normed prototypes; x
    (B, in_dim) -> (B, out_dim) logits, the state-dict keys those of the official v1 head. MLP:
    Linear(in_dim, hidden_dim), GELU, Linear(hidden_dim, hidden_dim), GELU, Linear(hidden_dim,
    bottleneck_dim) (v1's defaults: 3 layers, no BatchNorm); the prototypes: K = out_dim rows of
    a _WeightNormLinear. Init, as official: trunc-normal(std 0.02) weights and zero biases for
    the MLP Linears only; the prototypes keep PyTorch's default Linear init for v and g = 1: at
    init every prototype is a unit vector, every logit a cosine in [-1, 1]. norm_last_layer=True
    freezes g (DINO v1's default; DINOv2's head trains it).
    NOTE(paper): DINOv3's head has no weight norm at all; [000] follows DINO / DINOv2 here."""
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),      # exact (erf) GELU
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        # NOTE(paper): official DINO initialises before the last layer exists, so the prototypes
        # keep their default init; doing it in the same order also draws the same random numbers.
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight, std=0.02)          # truncation at +-2 (absolute)
                nn.init.zeros_(m.bias)
        self.last_layer = _WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)   # g stays 1: unit prototypes

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototypes' parameters (weight_g, weight_v): DINO drops their gradients during the
        first epoch (v1: `p.grad = None` for every name containing "last_layer" after clipping)."""
        return list(self.last_layer.parameters())

    def normalized_bottleneck(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, bottleneck_dim) unit vectors (the MLP output, L2-normalised)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects (B, {self.in_dim}) inputs, got {tuple(x.shape)}")
        y = self.mlp(x)
        # NOTE(paper): official DINO normalises with eps 1e-12 in the activations' dtype; DINOv2
        # raises it to 1e-6 for fp16, where 1e-12 underflows (a zero row gives 0/0). Here: float32
        # with eps 1e-12 (safe under bf16/fp16 autocast or half weights), cast back after.
        return F.normalize(y.float(), p=2, dim=-1, eps=1e-12).to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim) logits: cosines to the prototypes, times g."""
        return self.last_layer(self.normalized_bottleneck(x))


def cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """DINO Eq. 1-3: batch mean of H(q, p_s) = -sum_k q_k log softmax(s / tau_s)_k, a float32
    scalar. student_logits (B, K); teacher_probs (B, K) targets q (rows sum to 1, no gradient
    wanted); student_temp tau_s (0.1 in DINO and [000])."""
    if student_logits.shape != teacher_probs.shape or student_logits.dim() != 2:
        raise ValueError(f"expected two (B, K) tensors, got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_probs.shape)}")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)          # (B, K)
    return -(teacher_probs.float() * log_p).sum(dim=-1).mean()


@torch.no_grad()
def centered_probs(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """DINO v1's teacher targets softmax((t - c) / tau_t), (B, K) float32 without gradient, from
    teacher_logits (B, K), center (1, K) or (K,), teacher_temp tau_t."""
    if teacher_logits.dim() != 2 or center.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"expected (B, K) logits and a (1, K) centre, got "
                         f"{tuple(teacher_logits.shape)} and {tuple(center.shape)}")
    return F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """DINO Eq. 4, v1's centre EMA: c <- m c + (1 - m) mean_rows(t), over the global batch.
    center (1, K) or (K,); teacher_logits (B, K) raw (before the temperature), every teacher row
    of the step (both global crops); momentum m (0.9 in DINO). Returns a new float32 centre of
    `center`'s shape. Official order: a step's loss uses the centre from before the step, then
    the centre is updated. NOTE(paper): DINO v1 calls all_reduce unconditionally; here only when
    a process group is up, so one process works without one."""
    if teacher_logits.dim() != 2 or center.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"expected (B, K) logits and a (1, K) centre, got "
                         f"{tuple(teacher_logits.shape)} and {tuple(center.shape)}")
    K = teacher_logits.shape[1]
    row_sum = teacher_logits.float().sum(dim=0, keepdim=True)                    # (1, K)
    n_rows = torch.full((1, 1), float(teacher_logits.shape[0]), device=row_sum.device)
    if _distributed():
        # NOTE(paper): v1 divides by B_local * world_size; the rows are counted here instead
        # (one all-reduce for sums and count), the same when every rank holds as many rows.
        stats = torch.cat([row_sum, n_rows], dim=1)                               # (1, K + 1)
        dist.all_reduce(stats)                                                    # SUM over ranks
        row_sum, n_rows = stats[:, :K], stats[:, K:]
    batch_center = (row_sum / n_rows).reshape(center.shape)
    return center.float() * momentum + batch_center * (1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher: targets with (roughly) equal mass on every prototype.
    teacher_logits (B_local, K) of this rank; teacher_temp tau_t. On the global batch when a
    process group is up (B counts all ranks' samples; the total and per-prototype sums are
    all-reduced, per-sample sums local). -> (B_local, K) float32 probabilities, no gradient:
    rows sum to 1, each prototype gets about B / K of the mass (exactly after many iterations)."""
    if teacher_logits.dim() != 2:
        raise ValueError(f"expected (B, K) teacher logits, got {tuple(teacher_logits.shape)}")
    distributed = _distributed()
    scores = teacher_logits.float() / teacher_temp                                # (B_local, K)
    # NOTE(paper): official DINOv2 exponentiates the scores directly, which overflows (inf, then
    # NaN) past ~88 in float32. Subtracting the global max (shared by every rank) scales Q by a
    # constant, which the first normalisation removes. (A sample whose best score is ~100 below
    # it would still underflow to 0/0; DINO heads' bounded logits stay far from both limits.)
    shift = scores.max()
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    Q = torch.exp(scores - shift).t()                                             # (K, B_local)
    K = Q.shape[0]
    # The total mass and the global batch size B (0-d tensors: no host sync).
    total, B = Q.sum(), torch.tensor(float(Q.shape[1]), device=Q.device)
    if distributed:
        # NOTE(paper): DINOv2 takes B = B_local * world_size; counting the samples of every rank
        # is the same for equal local batches and stays right for unequal ones.
        stats = torch.stack([total, B])
        dist.all_reduce(stats)
        total, B = stats[0], stats[1]
    Q /= total
    for _ in range(n_iterations):
        prototype_mass = Q.sum(dim=1, keepdim=True)                               # (K, 1)
        if distributed:
            dist.all_reduce(prototype_mass)
        Q /= prototype_mass                      # each prototype: mass 1/K over the global batch
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)          # each sample: mass 1/B (local, no communication)
        Q /= B
    Q *= B                                       # each sample's row sums to 1
    return Q.t()                                                                  # (B_local, K)


def koleo_loss(x: Tensor) -> Tensor:
    """DINOv2's KoLeo regulariser: -mean_i log(d_i + eps), d_i the distance from z_i to its
    nearest neighbour in the batch (picked by cosine, without gradient), z the L2-normalised
    rows of x (B, D), B >= 2 (DINOv2 and [000]: the student's pre-head CLS / first state token
    of one global crop, per crop and summed, weight 0.1). Returns a float32 scalar.
    NOTE(paper): DINOv2's eps are kept exactly: normalize eps 1e-8; nn.PairwiseDistance eps
    1e-8, which is added to the difference vector (identical rows give 1e-8 * sqrt(D), not 0);
    1e-8 inside the log. As there, autocast is off; unlike there, half inputs become float32."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs (B, D) features with B >= 2, got {tuple(x.shape)}")
    eps = 1e-8
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float(), p=2, dim=-1, eps=eps)                           # (B, D)
        with torch.no_grad():
            cos = z @ z.t()                                                        # (B, B)
            cos.fill_diagonal_(-1.0)                   # a row is not its own neighbour
            nearest = cos.argmax(dim=1)                                            # (B,)
        d = (z - z[nearest] + eps).norm(p=2, dim=-1)                               # (B,)
        return -torch.log(d + eps).mean()


# ---- Views of one image, all top-down [000, Sec. 3.1, App. B]; DINO's augmentation -----------
@dataclass
class Augment:
    """DINO's per-view augmentation [DINO, App.; v2], as probabilities (each view draws its own)."""
    flip: float = 0.5              # horizontal flip
    jitter: float = 0.8            # colour jitter: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1
    grey: float = 0.2              # random greyscale
    blur: float = 0.5              # Gaussian blur, sigma ~ U(0.1, 2) px of a 16 px patch (DINO_PATCH_PX)
    solarize: float = 0.0          # invert pixel values >= 1/2


# DINO v1's probabilities per view; NOTE(paper): [000] does not say which its views get. DINO's
# teacher sees its two global crops, one always blurred (GLOBAL_1), the other rarely blurred and
# sometimes solarised (GLOBAL_2); so do [000]'s two teacher views: the global view GLOBAL_1, the
# sequential view GLOBAL_2. The student's global view gets GLOBAL_2 (DINO pairs the teacher's
# crop 1 with the student's crop 2), its sequential view a local crop's (the glimpses play DINO's
# local crops, [000] Sec. 1).
GLOBAL_1 = Augment(blur=1.0)
GLOBAL_2 = Augment(blur=0.1, solarize=0.2)
LOCAL = Augment(blur=0.5)


class ViewAugment(NamedTuple):
    """The augmentation drawn for R views: which are flipped, greyed, solarized, the colour jitter
    (R, 4: brightness, contrast, saturation, hue shift; 1, 1, 1, 0 = none), blur sigma (R,; 0)."""
    flip: Tensor
    grey: Tensor
    solarize: Tensor
    jitter: Tensor
    sigma: Tensor

    @staticmethod
    def draw(gen: torch.Generator, R: int, p: Augment) -> ViewAugment:
        u = torch.rand(R, 10, generator=gen)
        apply = u[:, 4] < p.jitter
        jitter = torch.stack([0.6 + 0.8 * u[:, 5], 0.6 + 0.8 * u[:, 6], 0.8 + 0.4 * u[:, 7],
                              0.2 * u[:, 8] - 0.1], 1)                              # (R, 4)
        jitter = torch.where(apply[:, None], jitter, torch.tensor([1.0, 1.0, 1.0, 0.0]))
        sigma = torch.where(u[:, 3] < p.blur, 0.1 + 1.9 * u[:, 9], torch.zeros(R))
        return ViewAugment(u[:, 0] < p.flip, u[:, 1] < p.grey, u[:, 2] < p.solarize, jitter, sigma)

    def take(self, rows) -> ViewAugment:
        return ViewAugment(*(x[rows] for x in self))

    def geometry(self, patches: fovea.Patches, width: int) -> fovea.Patches:
        """A flipped view of the image at these positions reads the mirrored boxes (the pixels
        are mirrored back in `__call__`): the positions (y, x, z) stay those of the view."""
        y0, x0, y1, x1 = patches.boxes.unbind(-1)
        mirrored = torch.stack([y0, width - x1, y1, width - x0], -1)
        flip = self.flip.to(patches.boxes.device)[:, None, None]
        return fovea.Patches(torch.where(flip, mirrored, patches.boxes), patches.yxz)

    def __call__(self, pix: Tensor) -> Tensor:
        """(R, P, 3, p, p) ImageNet-normalised patches of R views -> augmented, the same shape."""
        mean = torch.tensor(IMAGENET_MEAN, device=pix.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pix.device).view(1, 1, 3, 1, 1)
        dev = lambda x: x.to(pix.device)
        x = (pix.float() * std + mean).clamp(0, 1)                            # [0, 1] RGB
        x = torch.where(dev(self.flip)[:, None, None, None, None], x.flip(-1), x)
        # Colour jitter, in torchvision's order brightness, contrast, saturation, hue.
        # NOTE(paper): torchvision shuffles the order per image; a fixed order is used here. The
        # contrast reference (the mean grey level of the image) is that of the view's patches.
        b, c, s, h = (dev(self.jitter[:, i]).view(-1, 1, 1, 1, 1) for i in range(4))
        x = (x * b).clamp(0, 1)
        m = _grey(x).mean((1, 2, 3, 4), keepdim=True)
        x = ((x - m) * c + m).clamp(0, 1)
        g = _grey(x)
        x = ((x - g) * s + g).clamp(0, 1)
        x = _shift_hue(x, h)
        x = torch.where(dev(self.grey)[:, None, None, None, None], _grey(x).expand_as(x), x)
        x = _blur(x, dev(self.sigma) * (x.shape[-1] / DINO_PATCH_PX))
        x = torch.where(dev(self.solarize)[:, None, None, None, None] & (x >= 0.5), 1 - x, x)
        return ((x - mean) / std).to(pix.dtype)


# DINO blurs its crops resized to 224 / 96 px with sigma ~ U(0.1, 2) px, and ViT-S/16 cuts them
# into 16 px patches: relative to a patch, sigma is U(0.1, 2) / 16. A view's patches here are
# resampled to p px (8 in the tiny configs), so the drawn sigma is scaled by p / 16: the same blur
# relative to what a patch sees (tests/test_dino.py checks the equivalence).
DINO_PATCH_PX = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)      # data.py's normalisation (dino.py imports no data.py)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _grey(x: Tensor) -> Tensor:
    """(..., 3, p, p) RGB -> (..., 1, p, p) luma (ITU-R 601, as torchvision)."""
    return (0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :])


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB x (..., 3, p, p) in [0, 1] by `shift` turns (broadcastable), via HSV."""
    r, g, b = x.unbind(-3)
    v, _ = x.max(-3)
    c = v - x.min(-3).values                                                   # chroma
    safe = torch.where(c > 0, c, torch.ones_like(c))
    hue = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2,
                                                                (r - g) / safe + 4)) / 6
    hue = torch.where(c > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift.squeeze(-3)) % 1.0
    # HSV -> RGB: channel k = v - c * clamp(min(k', 4 - k'), 0, 1), k' = (n + 6 h) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(3, 1, 1)
    k = (n + hue.unsqueeze(-3) * 6) % 6
    return v.unsqueeze(-3) - c.unsqueeze(-3) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur (kernel 9, as DINOv2) of each patch, sigma (R,) px per view.
    NOTE(paper): a view's patches are blurred one by one (reflected at their edges), the
    top-down stand-in for blurring the resized crop before cutting it into patches."""
    R, P, C, p, _ = x.shape
    t = torch.arange(9, device=x.device, dtype=torch.float32) - 4
    k = torch.exp(-t ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))                 # (R, 9)
    k = torch.where((sigma > 0)[:, None], k, (t == 0).float())                       # none: delta
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(P * C, 0)                     # (R*P*C, 9)
    flat = x.reshape(1, R * P * C, p, p)
    flat = F.conv2d(F.pad(flat, (4, 4, 0, 0), mode="reflect"), k[:, None, None, :], groups=R * P * C)
    flat = F.conv2d(F.pad(flat, (0, 0, 4, 4), mode="reflect"), k[:, None, :, None], groups=R * P * C)
    return flat.view(R, P, C, p, p)


# ---- The sequential-to-global objective [000, Sec. 3.1, 5.2, App. C] -------------------------
@dataclass
class DINOConfig:
    """[000]'s pretraining; defaults: the paper's ViT-S recipe (Sec. 4, 5.2, App. B)."""
    model: fovea.FovealConfig = field(default_factory=lambda: fovea.FovealConfig(
        dim=384, depth=12, heads=6, num_state=8, patch_px=16,       # [000] Sec. 4: ViT-S, N = 8, 16 px
        num_zoom=16, max_z=4.0, grid=5, grid_z=(3.0, 4.0),        # [000] Table 4: 5 x 5 grid
        z_max=5.0,                                               # DINO's local views reach z = 4.97
        head="none", num_classes=0))
    global_grid: int = 16          # [000] App. B: a 16 x 16 grid (DINOv2's 224 px / 14)
    global_area: tuple[float, float] = (0.32, 1.0)   # [000] Sec. 3.1 (DINOv2)
    local_grid: int = 7            # [000] Sec. 3.1: "as DINOv2": 98 px / 14
    local_area: tuple[float, float] = (0.05, 0.32)   # [000] Sec. 3.1 (DINOv2)
    n_local: int = 8               # [000] Sec. 3.1: 8 local views
    seq_steps: int = 8             # [000] Sec. 3.1: 8 random foveal glimpses
    out_dim: int = 65536           # [000] Sec. 4: 65,536 prototypes
    hidden_dim: int = 2048         # DINO head
    bottleneck_dim: int = 256
    norm_last_layer: bool = False  # NOTE(paper): DINOv2's head (which [000] follows) trains g
    student_temp: float = 0.1      # [000] Sec. 5.2
    teacher_temp: float = 0.07     # [000] Sec. 5.2: 0.04 -> 0.07 over the first 30 epochs
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    centering: str = "sinkhorn_knopp"  # [000] Sec. 5.2 | "centering" (DINO v1)
    center_momentum: float = 0.9   # DINO v1 (centering only)
    koleo_weight: float = 0.1      # [000] App. C "as DINOv2": 0.1 (see DINOSequentialToGlobal)
    momentum_teacher: float = 0.996  # DINO ViT-S: cosine from 0.996 to 1 over the run
    freeze_last_layer_epochs: int = 1  # DINO: no update of the prototypes in epoch 1
    augment: bool = True           # DINO's photometric augmentation of each view


class DINOModel(nn.Module):
    """A foveal ViT, DINO's head on its first state token [000, Sec. 3.1, 4]: student or teacher."""
    def __init__(self, cfg: DINOConfig):
        super().__init__()
        self.backbone = fovea.FovealViT(cfg.model)
        self.head = DINOHead(cfg.model.dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                             norm_last_layer=cfg.norm_last_layer)

    def view(self, table: fovea.SummedAreaTable, patches: fovea.Patches, aug: ViewAugment | None,
             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One step on a view: -> (new state (R, N, D), first state token (R, D))."""
        if aug is not None:
            patches = aug.geometry(patches, table.image_hw[1])
        state = self.backbone(table, state, patches, transform=aug)
        return state, state[:, 0]


class _GatherRows(torch.autograd.Function):
    """All processes' rows (B, D) -> (B_global, D), in rank order; the backward sums the
    gradients of every process and returns this process's rows (public collectives only)."""
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start, n = ctx.rows
        return grad[start:start + n]


def gather_rows(x: Tensor) -> Tensor:
    return _GatherRows.apply(x) if _distributed() else x


def teacher_temperature(cfg: DINOConfig, step: int, steps_per_epoch: int) -> float:
    """[000] Sec. 5.2: linear 0.04 -> 0.07 over 30 epochs, then 0.07 (per iteration, as DINOv2)."""
    warm = cfg.warmup_teacher_temp_epochs * steps_per_epoch
    if step >= warm:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / max(1, warm - 1)


def teacher_momentum(cfg: DINOConfig, step: int, total_steps: int) -> float:
    """DINO: the EMA momentum follows a cosine from momentum_teacher to 1 over the run."""
    return 1 - (1 - cfg.momentum_teacher) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


class DINOSequentialToGlobal(nn.Module):
    """[000] Sec. 3.1, App. C: sequential-to-global DINO; train.py's objective `dino`. Views of
    each image, all top-down implicit crops of the image as it is (App. B): global (a 16 x 16
    grid over 32-100% of the area), local (7 x 7 over 5-32%) and sequential (8 random foveal
    glimpses carried through the state). The EMA teacher sees a global and a sequential view
    (its target after the last glimpse only); the student another global view, 8 local views and
    another sequential view (an output after every glimpse). Every student output is matched
    with every teacher output by DINO's cross-entropy, the teacher's targets from Sinkhorn-Knopp
    over the global batch, the head on the first state token only. Each step's loss is
    backpropagated on its own: no gradient crosses glimpses, memory is flat in steps.

    NOTE(paper): KoLeo [000, App. C] "as DINOv2": weight 0.1 on the student's pre-head first
    state token of its global view, the neighbours searched over the global batch (as DINOv3's
    distributed KoLeo; DINOv2: within each GPU's batch), so the run does not depend on the
    number of processes. Randomness (views, augmentations) is drawn for the global batch from a
    generator seeded by (seed, step); each process takes its contiguous share."""
    augment = False                # the views are its own augmentation (the data: one fixed view)
    # On the log line (collapse_stats): learning shows as view_match rising and teacher_entropy
    # falling below ln K; stagnation as logit_spread and the entropies flat at ln K; collapse as
    # marginal_entropy and prototypes_used falling while feature_cos -> 1.
    log_keys = ("teacher_entropy", "marginal_entropy", "logit_spread", "prototypes_used",
                "feature_cos", "view_match")

    def __init__(self, cfg: DINOConfig, seed: int):
        super().__init__()
        if cfg.centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"dino.centering: {cfg.centering!r}; choose sinkhorn_knopp or centering")
        if cfg.model.head != "none":
            raise ValueError(f"dino.model.head = {cfg.model.head!r}: the DINO head replaces the task head; "
                             "set head: none (a probe trains one later)")
        self.cfg, self.seed = cfg, seed
        self.model = DINOModel(cfg)                                         # the student
        self.teacher = DINOModel(cfg)
        self.teacher.load_state_dict(self.model.state_dict())
        self.teacher.requires_grad_(False)
        for name, grid, (lo, _) in (("global", cfg.global_grid, cfg.global_area),
                                    ("local", cfg.local_grid, cfg.local_area)):
            self.model.backbone.check_zoom(fovea.area_to_zoom(lo, grid), f"dino.{name}_grid / {name}_area")
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))       # DINO v1 centering only
        self.episode = fovea.FovealTrainConfig(model=cfg.model, steps=cfg.seq_steps)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()                                               # as DINOv2: eval mode
        return self

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """DINOv2 / v3 clip the backbone's and the head's gradients separately."""
        return [[p for p in m.parameters() if p.requires_grad] for m in (self.model.backbone, self.model.head)]

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "center": self.center}

    def load_extra_state(self, extra: dict) -> None:
        self.teacher.load_state_dict(extra["teacher"], strict=True)
        self.center.copy_(extra["center"])

    def export(self) -> dict:
        """The teacher's backbone, which DINO evaluates [DINO Sec. 3.1], for probes and eval."""
        return {"encoder": fovea.export_part(self.teacher.backbone, cfg=self.cfg.model)}

    def draw_views(self, gen: torch.Generator, B: int, hw: tuple[int, int], device) -> dict:
        """Every view of B images (the global batch): Patches and ViewAugments by name."""
        cfg, model = self.cfg, self.model.backbone
        crops = lambda n, grid, area: fovea.random_grid_crops(n, hw, grid, area, gen, device)
        views = {"global_t": crops(B, cfg.global_grid, cfg.global_area),
                 "global_s": crops(B, cfg.global_grid, cfg.global_area),
                 "local": crops(B * cfg.n_local, cfg.local_grid, cfg.local_area),   # image b: rows 8b..8b+7
                 "seq_t": fovea.episode_patches(model, self.episode, gen, B, hw, device),
                 "seq_s": fovea.episode_patches(model, self.episode, gen, B, hw, device)}
        draw = lambda R, p: ViewAugment.draw(gen, R, p) if cfg.augment else None
        augs = {"global_t": draw(B, GLOBAL_1), "global_s": draw(B, GLOBAL_2),
                "local": draw(B * cfg.n_local, LOCAL), "seq_t": draw(B, GLOBAL_2), "seq_s": draw(B, LOCAL)}
        return {"patches": views, "augs": augs}

    @torch.no_grad()
    def targets(self, logits: Tensor, temp: float) -> Tensor:
        """Teacher targets (R, K): Sinkhorn-Knopp [000 Sec. 5.2], or DINO v1's centring."""
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        probs = centered_probs(logits, self.center, temp)
        self.center.copy_(update_center(self.center, logits, self.cfg.center_momentum))
        return probs

    def train_step(self, batch: dict, step: int, run) -> dict:
        cfg = self.cfg
        images = batch["image"]
        B, hw, dev = images.shape[0], tuple(images.shape[-2:]), images.device
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        views = self.draw_views(gen, B * run.world, hw, dev)
        mine, L = torch.arange(run.rank * B, (run.rank + 1) * B), cfg.n_local
        mine_local = (mine[:, None] * L + torch.arange(L)).reshape(-1)          # (B * L,)
        aug = lambda name, rows: None if views["augs"][name] is None else views["augs"][name].take(rows)
        pick = lambda p, rows: fovea.Patches(p.boxes[rows.to(dev)], p.yxz[rows.to(dev)])
        take = lambda name, rows: (pick(views["patches"][name], rows), aug(name, rows))
        table = fovea.integral_image(images)
        temp = teacher_temperature(cfg, step, run.steps_per_epoch)
        # The teacher: a global view and the last state of a sequential view (no gradient).
        with torch.no_grad(), run.autocast():
            _, tok = self.teacher.view(table, *take("global_t", mine))
            t_global = self.teacher.head.normalized_bottleneck(tok)               # (B, bottleneck)
            t_logits = [self.teacher.head.last_layer(t_global)]
            state, seq_aug = None, aug("seq_t", mine)
            for patches in views["patches"]["seq_t"]:
                state, tok = self.teacher.view(table, pick(patches, mine), seq_aug, state)
            t_logits.append(self.teacher.head(tok))
        t_logits = torch.cat(t_logits).float()                                     # (2B, K)
        q = self.targets(t_logits, temp).view(2, B, -1)                           # (2, B, K)
        # The student: every output against both teacher targets; 2 (1 + L + T) terms in all.
        n_terms = 2 * (1 + L + cfg.seq_steps)
        ce = lambda logits, reps: sum(cross_entropy(logits, q[i].repeat_interleave(reps, 0), cfg.student_temp)
                                      for i in range(2))
        with run.autocast():
            _, tok = self.model.view(table, *take("global_s", mine))
            s_global = self.model.head.normalized_bottleneck(tok)                 # (B, bottleneck)
            loss_global = ce(self.model.head.last_layer(s_global), 1)
            koleo = koleo_loss(gather_rows(tok.float()))                          # over the global batch
            _, tok_local = self.model.view(table.select(torch.arange(B).repeat_interleave(L)),
                                           *take("local", mine_local))
            loss_local = ce(self.model.head(tok_local), L) * L
        (( loss_global + loss_local) / n_terms + cfg.koleo_weight * koleo).backward()
        losses = [loss_global.detach(), loss_local.detach()]
        state, seq_aug = None, aug("seq_s", mine)
        for patches in views["patches"]["seq_s"]:                              # no BPTT
            with run.autocast():
                state, tok = self.model.view(table, pick(patches, mine), seq_aug, state)
                loss_t = ce(self.model.head(tok), 1)
            (loss_t / n_terms).backward()
            losses.append(loss_t.detach())
        frozen = (self.model.head.last_layer_parameters()
                  if step < cfg.freeze_last_layer_epochs * run.steps_per_epoch else ())
        grads = {f"grad_{name}": grad_norm(m) for name, m in (("backbone", self.model.backbone),
                                                              ("head", self.model.head))}
        run.optimizer_step(frozen=frozen)
        self.update_teacher(teacher_momentum(cfg, step, run.schedule_steps))
        return {"loss": torch.stack(losses).sum() / n_terms + cfg.koleo_weight * koleo.detach(),
                "dino_loss": torch.stack(losses).sum() / n_terms, "koleo": koleo.detach(),
                "loss_first_glimpse": losses[2] / 2, "loss_last_glimpse": losses[-1] / 2,
                **collapse_stats(t_logits, q.view(2 * B, -1), temp, t_global, s_global.detach()),
                **grads, "weight_g": self.model.head.last_layer.weight_g.detach().float().mean(),
                "teacher_temp": torch.tensor(temp), "glimpses": B * (2 + L + 2 * cfg.seq_steps)}

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """DINO: teacher <- m teacher + (1 - m) student, parameters only, after each update."""
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.lerp_(s.detach(), 1 - m)


def grad_norm(module: nn.Module) -> Tensor:
    """L2 norm of this process's gradients of `module` (before averaging and clipping)."""
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


@torch.no_grad()
def collapse_stats(teacher_logits: Tensor, teacher_probs: Tensor, teacher_temp: float | None = None,
                   teacher_feats: Tensor | None = None, student_feats: Tensor | None = None) -> dict:
    """What shows collapse or stagnation coming. teacher_logits (R, K), teacher_probs (R, K) the
    targets (after Sinkhorn-Knopp or centring); teacher_feats / student_feats (B, F) the two
    networks' bottlenecks of one global view of each image (row b of both: image b).
      teacher_entropy   mean entropy of a target: ln K uniform (nothing to learn), 0 one-hot
      marginal_entropy  entropy of the batch mean of softmax(logits / tau_t), before SK or the
                        centre: falls when every image picks the same prototypes (a collapse
                        Sinkhorn-Knopp's equipartition hides from teacher_entropy)
      logit_spread      std of a teacher row over the K prototypes: as it flattens, the targets
                        turn uniform (stagnation)
      prototypes_used   prototypes that are some row's argmax (over all processes)
      feature_cos       mean cosine between the teacher's features of two different images (-> 1:
                        every image the same vector)
      view_match        how often the teacher feature nearest to the student's view of image b is
                        image b's own: the instance signal DINO starts from
    All but prototypes_used are this process's estimates, which the log averages."""
    K = teacher_logits.shape[1]
    used = torch.bincount(teacher_logits.argmax(1), minlength=K).float()
    if _distributed():
        dist.all_reduce(used)
    entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1)
    out = {"teacher_entropy": entropy(teacher_probs).mean(), "prototypes_used": (used > 0).sum().float(),
           "logit_spread": teacher_logits.float().std(1).mean()}
    if teacher_temp is not None:
        out["marginal_entropy"] = entropy(F.softmax(teacher_logits.float() / teacher_temp, 1).mean(0))
    if teacher_feats is not None and student_feats is not None:
        t, s = F.normalize(teacher_feats.float(), dim=1), F.normalize(student_feats.float(), dim=1)
        B = t.shape[0]
        off = ~torch.eye(B, dtype=torch.bool, device=t.device)
        out["feature_cos"] = (t @ t.t())[off].mean() if B > 1 else torch.zeros(())
        out["view_match"] = ((s @ t.t()).argmax(1) == torch.arange(B, device=t.device)).float().mean()
    return out
