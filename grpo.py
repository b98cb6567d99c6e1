"""A Gaussian-mixture gaze policy trained with GRPO (papers 002, 000; also drives CanViT, 003).

Papers
  [002] Prisadnikov, Paudel, Fu, Van Gool, "Vision encoders should be image size agnostic and
        task driven", arXiv 2508.16317.
  [000] "Self-supervised pretraining for an iterative image size agnostic vision transformer",
        arXiv 2604.20392.
  [003] Berreby, Du, Durand, Krishna, "CanViT: Toward Active-Vision Foundation Models".

A frozen iterative encoder (the foveal ViT of fovea.py, or CanViT) carries a state from glimpse
to glimpse; the policy reads it and says where to look next: a small DETR-like transformer whose
K + 1 learned queries cross-attend to the state, the first K giving the means of a K-component
Gaussian mixture over the gaze, the last the mixture weights; the std is fixed or scheduled, not
learned [002, A.3.3; 000, Sec. 3.3]. GRPO [002, A.2], no critic: the old policy draws G traces of
T glimpses per image; each action is scored by what it did to the task head's belief in the
true class, normalised over the image's G traces at each step; the clipped ratio objective is
maximised for several inner epochs.

An action is a gaze (y, x) = (row, col) in [-1, 1]^2, (-1, -1) the top-left corner, as in
fovea.py ([002]: (x, y) in [0, 1], so lengths from other codes are doubled here), stored raw
(only the extraction clamps: sample_mixture); A = 3 adds a CanViT scale. Log-probs, ratios,
advantages and the mixture parameters are float32 (GazePolicy.forward).

Shapes
  B images, G traces per image (a group), T steps (actions per trace), N state tokens,
  D width, K mixture components, A action dims (2: (y, x); 3: (y, x, scale)).

Paper -> code
  002 A.2, Eq. 2            end-of-trace reward, every action      raw_advantages("final")
  002 A.2, Eq. 3            loss-improvement ratio per action      raw_advantages("improvement")
  000 Sec. 3.3, Eq. 2       P(true class) per step, disc. returns  raw_advantages("prob"),
                                                                   discounted_returns
  002 A.2, Eq. 4            per-image, per-step normalisation      group_advantages
  002 A.2, Eq. 1            clipped ratio objective (maximised)    clipped_objective, ratio_stats
  002 A.3.3; 000 Sec. 3.3   K-Gaussian mixture, fixed std          mixture_log_prob, sample_mixture,
                                                                   mixture_weight_entropy
  002 A.3.3                 deterministic action at inference      mixture_mode (the mixture's mode)
  (beyond the papers)       the same, no gaze twice at one place   inhibited_mode
  000 Sec. 3.3              "fixed diagonal variance schedule"     std_schedule
  002 A.3.3; 000 Sec. 4     DETR-like policy, K + 1 queries        GazePolicyConfig, GazePolicy
  (RAM, PR #30)             clamp only at extraction               to_gaze
  002 A.3.4                 the frozen encoder and its task head   FovealEncoder, load_encoder
  (beyond the papers)       CanViT's viewpoint, zero-shot head     CanViTEncoder
  002 A.2, A.3.4            G traces of T, inner epochs on states  GazeGRPO (rollout, train_step)

Run `python train.py --cfg grpo_tiny.yaml` (after foveal_tiny.yaml), `python eval.py --ckpt
runs/grpo_tiny/ckpt.pt --out_dir DIR`, `python bench.py grpo`, `pytest tests/test_grpo.py`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import canvit
import fovea


def _float(x: Tensor) -> Tensor:
    """float32 for everything but float64 (kept, so tests can check in double precision)."""
    return x if x.dtype == torch.float64 else x.float()


# ---- GRPO: rewards, returns and group-normalised advantages [002, A.2; 000, Sec. 3.3] --------
ADVANTAGE_KINDS = ("final", "improvement", "prob")


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Returns-to-go along the last dim: (..., T) -> (..., T), R_t = sum_{k >= t} gamma^(k-t) r_k
    (gamma = 0: R = r; gamma = 1: the plain sum of the rewards still to come)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    r = _float(rewards)
    R = torch.empty_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):      # T is small (8): R_t = r_t + gamma R_{t+1}
        running = r[..., t] + gamma * running
        R[..., t] = running
    return R


def raw_advantages(logp_true: Tensor, kind: str, gamma: float = 1.0) -> Tensor:
    """The un-normalised advantages alpha of the T actions of each trace: (B, G, T+1) -> (B, G, T).
    logp_true[..., t] is log P(true class) from the task head on the state after t glimpses
    (t = 0: the initial state, before any glimpse). Action t (0-based) takes the state from
    index t to t + 1; [002]'s 1-based s_{i,t} is our index t - 1.
      "final"        [002] Eq. 2: log P after the last glimpse, the same for every action.
      "improvement"  [002] Eq. 3: (l_t - l_{t+1}) / (l_t + l_{t+1}) with l = -log P, in [-1, 1].
      "prob"         [000] Eq. 2: reward r_t = P(true class) after action t, then the
                     discounted returns with gamma ([000] Sec. 3.3 leaves gamma unstated).
    gamma belongs to "prob" only ([002] has no returns): another gamma with "final" or
    "improvement" is an error, not ignored. Any leading shape; float32 (float64 kept).
    """
    if logp_true.dim() < 1 or logp_true.shape[-1] < 2:
        raise ValueError("logp_true needs T + 1 >= 2 entries on its last dim (states 0..T), "
                         f"got shape {tuple(logp_true.shape)}")
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; choose one of "
                         f"{', '.join(ADVANTAGE_KINDS)}")
    if kind != "prob" and gamma != 1.0:
        raise ValueError(f"gamma={gamma} applies to kind 'prob' only, not {kind!r}")
    logp = _float(logp_true)
    T = logp.shape[-1] - 1
    if kind == "final":
        # Eq. (2): alpha_{i,t} = log P(tau(s_{i,n+1}) = y), the last state's, for every t.
        return logp[..., -1:].expand(*logp.shape[:-1], T).clone()
    if kind == "improvement":
        # Eq. (3), l = -log P >= 0; the clamp drops a log-prob a hair above 0 (a head that rounds
        # log(softmax) rather than computing log_softmax), which would make l_t + l_{t+1} < 0.
        l = (-logp).clamp_min(0.0)
        num = l[..., :-1] - l[..., 1:]                                            # (..., T)
        den = l[..., :-1] + l[..., 1:]                                            # (..., T)
        # NOTE(paper): den = 0 only when P = 1 at both states (float32 log_softmax gives exactly
        # 0 for a confident head, common on easy images): no loss left to reduce, num = 0 too,
        # so 0 / 0 := 0 by dividing by max(den, tiny). For l >= 0, |num| <= den holds in floating
        # point too (rounding is monotone): the result stays in [-1, 1], never inf or nan.
        return num / den.clamp_min(torch.finfo(den.dtype).tiny)
    # [000] Eq. (2): r_t = P(tau(s_{t+1}) = y), the true-class probability after action t.
    # NOTE(paper): our copy of [000] lost the formula; "the predicted probability of the
    # ground-truth class" is read as that of the state the action produced (index t + 1).
    return discounted_returns(logp[..., 1:].exp(), gamma)


def group_advantages(alpha: Tensor, eps: float = 1e-6, scale: str = "group") -> Tensor:
    """[002] Eq. 4: normalise over the G traces of each image, separately at each step.
    alpha: (B, G, T) -> A (B, G, T), A = (alpha - mean_G) / (std_G + eps) in every (image, step)
    cell; a cell of G equal values gives exactly 0. scale="none" only centres (Dr. GRPO, arXiv
    2503.20783): a tiny std turns noise (late steps, saturated P) into unit-size advantages."""
    if alpha.dim() != 3:
        raise ValueError(f"alpha must be (B, G, T), got shape {tuple(alpha.shape)}")
    a = _float(alpha)
    centred = a - a.mean(1, keepdim=True)                                         # (B, G, T)
    if scale == "group":
        # NOTE(paper): sigma-hat is "the standard deviation" [002]; we use the population std
        # (divide by G): every non-flat cell then has unit mean square, whatever G. Bessel's
        # (TRL, verl), sqrt(G / (G - 1)) times larger, only rescales the step size in Eq. (1)
        # (min(rho cA, clip(rho) cA) = c min(rho A, clip(rho) A), c > 0), and fails at G = 1.
        std = centred.square().mean(1, keepdim=True).sqrt()                       # (B, 1, T)
        adv = centred / (std + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"unknown scale {scale!r}; choose group or none")
    # The mean of G equal floats can be an ulp off them: a flat cell is max == min, not std == 0.
    flat = a.amax(1, keepdim=True) == a.amin(1, keepdim=True)                     # (B, 1, T)
    return adv.masked_fill(flat, 0.0)


# ---- GRPO: the clipped ratio objective [002, A.2, Eq. 1] -------------------------------------
LOG_RATIO_CLAMP = 20.0   # verl's bound on log(pi / pi_old) before exp


def _ratio(logp: Tensor, logp_old: Tensor) -> tuple[Tensor, Tensor]:
    """(rho, log rho), rho = pi / pi_old from log-probs, the log-ratio clamped to +-20."""
    if logp.shape != logp_old.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_old {tuple(logp_old.shape)} differ")
    # Clamped as verl does: exp(20) ~ 5e8 stays finite in float32, so a sample far in the new
    # policy's tail cannot give inf * A or nan (no gradient beyond the clamp). It guards the
    # numerics, not rho's size: A < 0 with a large rho still takes Eq. (1)'s unclipped branch.
    log_rho = (_float(logp) - _float(logp_old).detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_rho.exp(), log_rho


def clipped_objective(logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_eps: float,
                      clip_eps_high: float | None = None) -> Tensor:
    """[002] Eq. 1, to MAXIMISE: mean of min(rho A, clip(rho, 1 - eps, 1 + eps) A) over cells, a
    0-dim float32 tensor. logp (with gradient), logp_old (the rollout's), advantages: one shape,
    (B, G, T) here. clip_eps_high replaces the upper bound (DAPO's "clip-higher"; [002]: one)."""
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} and logp {tuple(logp.shape)} "
                         "differ")
    rho, _ = _ratio(logp, logp_old)
    adv = _float(advantages).detach()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # Eq. (1): the pessimistic (min) of the unclipped and the clipped surrogate. Every trace has
    # T actions, so 002's (1/G) sum_i (1/|o_i|) sum_t, averaged over images, is the plain mean.
    surrogate = torch.minimum(rho * adv, rho.clamp(1.0 - clip_eps, 1.0 + high) * adv)
    return surrogate.mean()


@torch.no_grad()
def ratio_stats(logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_eps: float,
                clip_eps_high: float | None = None) -> dict[str, Tensor]:
    """What a log line needs about the ratio, from clipped_objective's inputs; 0-dim float32:
      clip_frac_low   fraction of cells with rho < 1 - eps and A < 0 (clipped: no gradient)
      clip_frac_high  fraction of cells with rho > 1 + eps and A > 0 (clipped: no gradient)
      clip_frac       their sum
      approx_kl       k3 = mean((rho - 1) - log rho), Schulman's unbiased, non-negative
                      estimate of KL(pi_old || pi) on samples of pi_old
      ratio_mean      mean rho (1 exactly on the first inner epoch)
    """
    rho, log_rho = _ratio(logp, logp_old)
    adv = _float(advantages)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    low_frac = ((rho < 1.0 - clip_eps) & (adv < 0)).float().mean()
    high_frac = ((rho > 1.0 + high) & (adv > 0)).float().mean()
    return {"clip_frac": low_frac + high_frac, "clip_frac_low": low_frac,
            "clip_frac_high": high_frac, "approx_kl": ((rho - 1.0) - log_rho).mean(),
            "ratio_mean": rho.mean()}


# ---- The action distribution: K isotropic Gaussians, fixed std [002, A.3.3; 000, Sec. 3.3] ---
def _std_tensor(std: float | Tensor, like: Tensor) -> Tensor:
    """The std as a float32 tensor on like's device: 0-dim, or the batch shape (...)."""
    if isinstance(std, Tensor):
        return std.to(device=like.device, dtype=torch.float32)
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    return torch.tensor(float(std), device=like.device)


def _check_mixture(means: Tensor, logits: Tensor) -> None:
    if means.dim() < 2 or logits.shape != means.shape[:-1]:
        raise ValueError(f"means must be (..., K, A) and logits (..., K), got {tuple(means.shape)} "
                         f"and {tuple(logits.shape)}")


def mixture_log_prob(means: Tensor, logits: Tensor, std: float | Tensor, action: Tensor) -> Tensor:
    """log pi(a) of the K-Gaussian mixture, float32: (..., K, A), (..., K), std, (..., A) -> (...):
    logsumexp_k [log_softmax(logits)_k + sum_d log N(a_d; mu_kd, std)], std a float or a tensor
    broadcastable to (...) (one per row), isotropic. Evaluate it at the raw, unclamped action."""
    _check_mixture(means, logits)
    mu = means.float()
    s = _std_tensor(std, mu)
    A = mu.shape[-1]
    z = (action.float()[..., None, :] - mu) / s[..., None, None]                 # (..., K, A)
    log_normal = (-0.5 * z.square().sum(-1)
                  - A * (s.log() + 0.5 * math.log(2 * math.pi))[..., None])       # (..., K)
    return torch.logsumexp(F.log_softmax(logits.float(), -1) + log_normal, -1)   # (...)


@torch.no_grad()
def sample_mixture(means: Tensor, logits: Tensor, std: float | Tensor, u: Tensor,
                   noise: Tensor) -> tuple[Tensor, Tensor]:
    """Draw k ~ Categorical(logits) (the inverse CDF of the weights at u), then a = mu_k + std *
    noise; no gradient. (..., K, A), (..., K), std (as mixture_log_prob), u (...) in [0, 1),
    noise (..., A) ~ N(0, I) -> action (..., A) float32, component (...,) int64. The random
    numbers are given: a caller draws them for the global batch and takes its rows (the traces
    do not depend on the number of processes).
    NOTE(paper): not clamped. [002] wants actions "between 0 and 1"; we store the raw sample,
    take both log-probs at it and clamp only the glimpse centre (to_gaze), as RAM since its PR
    #30: an unbiased policy gradient for an environment that clips its input. Clamping first
    (GFNet, AdaptiveNN) evaluates the density at a point never sampled, onto which every sample
    past the border collapses, with the density there rather than the tail's mass."""
    _check_mixture(means, logits)
    K, A = means.shape[-2:]
    cdf = F.softmax(logits.float(), -1).cumsum(-1)                                # (..., K)
    k = (u.to(cdf.device)[..., None] > cdf).sum(-1).clamp(max=K - 1)             # (...)
    mu = means.float().gather(-2, k[..., None, None].expand(*k.shape, 1, A)).squeeze(-2)  # (..., A)
    return mu + _std_tensor(std, mu)[..., None] * noise.to(mu.device), k


def _log_density_at(means: Tensor, logits: Tensor, std: float | Tensor, points: Tensor) -> Tensor:
    """log pi at C points per row: (..., K, A), (..., K), std, (..., C, A) -> (..., C)."""
    lead = points.shape[:-1]
    return mixture_log_prob(means[..., None, :, :].expand(*lead, *means.shape[-2:]),
                            logits[..., None, :].expand(*lead, means.shape[-2]),
                            _std_tensor(std, means)[..., None], points)


def mixture_mode(means: Tensor, logits: Tensor, std: float | Tensor, iters: int = 50) -> Tensor:
    """The deterministic action at inference [002, A.3.3]: the mode of the whole mixture, the
    action the policy finds most likely. (..., K, A), (..., K), std (as mixture_log_prob) ->
    (..., A) float32.
    NOTE(paper): "deterministic actions during inference" is read as the mixture's highest
    density. Mean-shift (x <- sum_k r_k mu_k / sum_k r_k, r_k = w_k N(x; mu_k, std), an ascent
    for equal isotropic components) runs from every component mean; the end point of highest
    density wins. The heaviest component's mean, the usual proxy, is not the mode where
    components overlap: two nearby components of weight 0.3 outweigh a lone one of 0.4."""
    _check_mixture(means, logits)
    mu = means.float()
    s = _std_tensor(std, mu)[..., None, None]                                     # (..., 1, 1)
    log_w = F.log_softmax(logits.float(), -1)
    x = mu.clone()                                                                # (..., K starts, A)
    for _ in range(iters):
        d2 = (x[..., :, None, :] - mu[..., None, :, :]).square().sum(-1)          # (..., K starts, K)
        r = F.softmax(log_w[..., None, :] - 0.5 * d2 / s.square(), -1)
        x = r @ mu
    best = _log_density_at(mu, log_w, std, x).argmax(-1)                         # (...)
    return x.gather(-2, best[..., None, None].expand(*best.shape, 1, x.shape[-1])).squeeze(-2)


def inhibited_mode(means: Tensor, logits: Tensor, std: float | Tensor, visited: list[Tensor],
                   radius: float, grid: int = 41) -> Tensor:
    """A deterministic action that does not look twice at one place: the mixture's highest density
    among candidate actions at least `radius` from every visited gaze (the mode, the component
    means and a grid x grid lattice over [-1, 1]^2). means (B, K, 2), logits (B, K), visited: the
    earlier gazes, (B, 2) each -> (B, 2) float32. With nothing visited it is `mixture_mode`; where
    every candidate is inhibited it falls back to the mode.
    NOTE(paper): not in [002]; inhibition of return, an option of the deterministic rule at
    inference. Repeating the mode re-reads the same patches (states the encoder, trained on
    random gazes, never saw), which is where the plain mode fell behind sampled gazes."""
    _check_mixture(means, logits)
    if means.dim() != 3 or means.shape[-1] != 2:
        raise ValueError(f"inhibited_mode takes (B, K, 2) means (a 2-D gaze), got {tuple(means.shape)}")
    B = means.shape[0]
    mode = mixture_mode(means, logits, std)
    g = torch.linspace(-1, 1, grid, device=means.device)
    lattice = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(1, -1, 2).expand(B, -1, -1)
    cand = torch.cat([mode[:, None], means.float(), lattice], 1)                  # (B, C, 2)
    score = _log_density_at(means.float(), logits, std, cand)                     # (B, C)
    for v in visited:
        score = score.masked_fill((cand - v.float()[:, None]).norm(dim=-1) < radius, -math.inf)
    best = cand.gather(1, score.argmax(-1)[:, None, None].expand(-1, 1, 2))[:, 0]
    return torch.where(torch.isfinite(score).any(-1, keepdim=True), best, mode)


def mixture_weight_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the mixture weights, (..., K) -> (...), for logging: log K = uniform,
    0 = one component. (With a fixed std the components' own entropy is a constant.)"""
    return torch.special.entr(F.softmax(logits.float(), -1)).sum(-1)


def std_schedule(step: int, total: int, start: float, end: float, kind: str = "cosine") -> float:
    """The policy std at a training step: start at step 0, end at step >= total. [000] Sec. 3.3:
    "a fixed diagonal variance schedule"; [002] A.3.3: "a fixed parameter" (kind="constant").
    NOTE(paper): neither gives values. AdaptiveNN's 0.25 -> 0.10 (cosine or linear) in [0, 1]
    units is 0.5 -> 0.2 in our [-1, 1] (GazePolicyConfig's defaults). A rollout keeps its std
    for all its inner epochs: with another, old and new log-probs differ at the first epoch."""
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    frac = min(max(step / total, 0.0), 1.0)
    if kind == "constant":
        return float(start)
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown std schedule {kind!r}; choose cosine, linear or constant")


def to_gaze(action: Tensor) -> Tensor:
    """The glimpse centre of a raw sampled action, (..., A) clamped to [-1, 1]: inside the image
    (a scale coordinate inside the range the caller maps). The only clamp (see sample_mixture)."""
    return action.clamp(-1.0, 1.0)


# ---- The policy: a DETR-like decoder with K + 1 queries [002, A.3.3; 000, Sec. 3.3, 4] -------
@dataclass
class GazePolicyConfig:
    """The gaze policy. Defaults: [002]'s one-decoder reading, small next to the encoder."""
    dim: int = 256                 # NOTE(paper): unstated ([000] Sec. 3.3: "lightweight")
    depth: int = 1                 # NOTE(paper): [002] A.3.3 "DETR-like", depth unstated: 1;
                                   # [000] Sec. 4: a 6-block transformer (depth=6)
    heads: int = 8                 # NOTE(paper): unstated
    mlp_ratio: float = 4.0         # NOTE(paper): unstated; the ViT / DETR ratio
    num_components: int = 4        # K. NOTE(paper): unstated; 4 anchors = the quadrant centres,
                                   # and G = 16 traces still draw each component ~4 times a step
    action_dim: int = 2            # [002] A.3.3: a gaze, (y, x) here; 3 adds a CanViT scale
    head_init_std: float = 1e-3    # NOTE(paper): ours; output layers start near the anchors
    std_start: float = 0.5         # NOTE(paper): unstated; AdaptiveNN's 0.25 in [0, 1] units
    std_end: float = 0.2           # NOTE(paper): unstated; AdaptiveNN's 0.10 in [0, 1] units
    std_kind: str = "cosine"       # [000] Sec. 3.3 "variance schedule"; "constant": [002] A.3.3


def anchor_grid(num_components: int, action_dim: int) -> Tensor:
    """K anchor points spread over the image, (K, A) float32 in (-1, 1): the first K cell
    centres, row-major, of the smallest r x c grid (r = ceil(sqrt(K))) holding K cells; beyond
    (y, x) coordinates are 0, mid-range. K = 4: (+-0.5, +-0.5)."""
    rows = math.ceil(math.sqrt(num_components))
    cols = math.ceil(num_components / rows)
    cy = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows * 2 - 1
    cx = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols * 2 - 1
    gy, gx = torch.meshgrid(cy, cx, indexing="ij")                                # (r, c)
    yx = torch.stack([gy.reshape(-1), gx.reshape(-1)], -1)[:num_components]       # (K, 2)
    return F.pad(yx, (0, action_dim - 2))                                         # (K, A)


class Attention(nn.Module):
    """Multi-head attention from queries (B, n, D) to keys and values (B, m, D). No dropout."""
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q_in: Tensor, k_in: Tensor, v_in: Tensor) -> Tensor:
        B, n, D = q_in.shape
        m, h = k_in.shape[1], self.heads
        q = self.q(q_in).view(B, n, h, D // h).transpose(1, 2)                    # (B, h, n, D/h)
        k = self.k(k_in).view(B, m, h, D // h).transpose(1, 2)                    # (B, h, m, D/h)
        v = self.v(v_in).view(B, m, h, D // h).transpose(1, 2)                    # (B, h, m, D/h)
        a = F.scaled_dot_product_attention(q, k, v)                               # (B, h, n, D/h)
        return self.proj(a.transpose(1, 2).reshape(B, n, D))                      # (B, n, D)


class DecoderLayer(nn.Module):
    """A pre-norm DETR decoder layer: self-attention among the queries, cross-attention to the
    memory, MLP. `pos` (1, n, D), the learned queries, is added to the self-attention's query and
    key inputs and the cross-attention's queries in every layer, as DETR adds its object queries:
    the K + 1 queries stay distinct at any depth."""
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h + pos, h + pos, h)
        x = x + self.cross_attn(self.norm2(x) + pos, memory, memory)
        return x + self.mlp(self.norm3(x))


class GazePolicy(nn.Module):
    """[002] A.3.3: K + 1 learned queries cross-attend to the encoder's state; the first K
    outputs give the component means, the last one the K mixture logits.

    memory_dims: each memory stream's width: the foveal ViT's state tokens (B, N, D); CanViT's
    recurrent CLS (B, 1, D) and canvas (B, h*w, D_canvas). Each stream gets its own LayerNorm +
    Linear to `dim` (its bias tells the streams apart), then they are concatenated. No dropout:
    the rollout's log-probs and the update's must come from one function."""
    def __init__(self, cfg: GazePolicyConfig, memory_dims: tuple[int, ...],
                 positional: tuple[bool, ...] | None = None):
        super().__init__()
        K, A, D = cfg.num_components, cfg.action_dim, cfg.dim
        if not memory_dims:
            raise ValueError("memory_dims must name at least one memory stream")
        if K < 1 or A < 2 or D % cfg.heads:
            raise ValueError(f"need num_components >= 1, action_dim >= 2 and dim divisible by "
                             f"heads, got K={K}, A={A}, dim={D}, heads={cfg.heads}")
        std_schedule(0, 1, cfg.std_start, cfg.std_end, cfg.std_kind)   # reject a bad kind now
        self.cfg = cfg
        self.memory_dims = tuple(memory_dims)
        self.memory_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, D))
                                         for d in self.memory_dims)
        # positional[i]: stream i comes with a (y, x) per token (CanViT's canvas cells, which
        # cross-attention would otherwise see as an unordered bag), embedded by a small MLP.
        self.positional = tuple(positional or (False,) * len(self.memory_dims))
        self.pos_mlp = (nn.Sequential(nn.Linear(2, D), nn.GELU(), nn.Linear(D, D))
                        if any(self.positional) else None)
        self.queries = nn.Parameter(torch.randn(1, K + 1, D) * 0.02)   # K means + 1 weights
        self.layers = nn.ModuleList(DecoderLayer(D, cfg.heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D)
        self.mean_head = nn.Linear(D, A)      # shared by the K mean queries (DETR's box head)
        self.logit_head = nn.Linear(D, K)     # on the last query
        # Component k's mean is tanh(atanh(anchor_k) + mean_head(q_k)). NOTE(paper): our init.
        # Small output weights (std head_init_std, zero bias) put the means within ~1e-2 of K
        # anchors spread over the image, the weights ~uniform (no anchors: all means at tanh(0),
        # one spot; large outputs: means in tanh's flat tails, peaked weights). Not zero: no
        # gradient would pass back on the first step. Anchors are a buffer (learned = the bias).
        self.register_buffer("mean_offsets", torch.atanh(anchor_grid(K, A)))   # (K, A)
        for head in (self.mean_head, self.logit_head):
            nn.init.normal_(head.weight, std=cfg.head_init_std)
            nn.init.zeros_(head.bias)

    def forward(self, memories: list[Tensor], positions: list[Tensor | None] | None = None
                ) -> tuple[Tensor, Tensor]:
        """memories: one (B, N_i, memory_dims[i]) tensor per stream (a positional one with
        positions[i] (N_i, 2) (y, x) in [-1, 1]) -> means (B, K, A) in (-1, 1), logits (B, K)."""
        if len(memories) != len(self.memory_dims):
            raise ValueError(f"expected {len(self.memory_dims)} memory streams, "
                             f"got {len(memories)}")
        for i, (m, d) in enumerate(zip(memories, self.memory_dims)):
            if m.dim() != 3 or m.shape[-1] != d or m.shape[0] != memories[0].shape[0]:
                raise ValueError(f"memory stream {i} must be (B, N, {d}) with a common B, "
                                 f"got {tuple(m.shape)}")
        K = self.cfg.num_components
        # NOTE(paper): float32 even under autocast (the policy is small). The means enter the
        # log-ratio as (a - mu) dmu / std^2: bf16 rounding (~4e-3 at 1) moves log rho by ~0.08 at
        # std 0.05, 40% of a 0.2 clip range, and rollout and update batches need not round alike.
        with torch.autocast(memories[0].device.type, enabled=False):
            streams = [proj(m.float()) for proj, m in zip(self.memory_proj, memories)]
            for i, pos in enumerate(positions or []):
                if self.positional[i]:
                    streams[i] = streams[i] + self.pos_mlp(pos.float())[None]
            mem = torch.cat(streams, 1)                                           # (B, sum N_i, D)
            x = self.queries.expand(mem.shape[0], -1, -1)                         # (B, K + 1, D)
            for layer in self.layers:
                x = layer(x, mem, self.queries)
            x = self.norm(x)
            # tanh bounds every coordinate to (-1, 1): a mean is always inside the image.
            means = torch.tanh(self.mean_offsets + self.mean_head(x[:, :K]))     # (B, K, A)
            logits = self.logit_head(x[:, K])                                     # (B, K)
        return means, logits


# ---- Frozen encoders the policy steers: the foveal ViT [002, 000] and CanViT [003] -----------
class FovealEncoder(nn.Module):
    """A frozen foveal ViT with its task head (a foveal_sup or probe run): the policy reads its
    N state tokens; an action (y, x) is a gaze, its foveal grid at the middle of the zoom range
    (NOTE(paper): the policy gives only the centre [002 A.3.3, 000 Sec. 3.3]; training drew z)."""
    action_dim = 2

    def __init__(self, model: fovea.FovealViT):
        super().__init__()
        if model.head is None:
            raise ValueError("the encoder has no task head (a dino backbone): probe it first")
        self.model = model.eval().requires_grad_(False)
        self.memory_dims, self.positional = (model.cfg.dim,), (False,)

    def start(self, scenes: Tensor, rows: Tensor):
        """The frozen source of B scenes for R rows (rows[r]: its scene) and the initial state."""
        return fovea.integral_image(scenes).select(rows), None

    def observe(self, state) -> tuple[list[Tensor], list]:
        return [state], [None]

    def initial(self, n: int) -> Tensor:
        return self.model.init_state(n)

    def glimpse(self, action: Tensor, image_hw: tuple[int, int]) -> fovea.Patches:
        """The patches an action looks at: the foveal context at the clamped gaze."""
        lo, hi = self.model.cfg.grid_z
        return self.model.glimpse(to_gaze(action), image_hw, (lo + hi) / 2)

    def step(self, source, state, action: Tensor):
        return self.model(source, state, self.glimpse(action, source.image_hw))

    def classify(self, state) -> Tensor:
        return self.model.classify(state)


class CanViTEncoder(nn.Module):
    """A frozen distilled CanViT and a frozen classifier on its state (beyond the papers, [003]
    Sec. 7's future work). The policy reads the recurrent CLS and the canvas cells (with their
    (y, x)); an action (y, x, u) is a viewpoint: scale s = s_min + (1 - s_min) (u + 1) / 2 and
    centre (y, x) (1 - s), the crop inside the scene as CanViT's random viewpoints. NOTE: a scale
    coordinate rather than a schedule lets the policy choose a coarse or a fine look at every
    step (C2F's lesson: the order of scales matters). The glimpse is the distillation's
    (bilinear, or "integral": box-filtered). The classifier is [003] F.2.2's zero-shot route:
    W_global's prediction of the teacher's CLS, destandardized, through a linear probe trained
    on the teacher's CLS (None where only the policy's actions are needed)."""
    action_dim = 3

    def __init__(self, model: canvit.CanViT, classifier: nn.Linear | None, canvas_grid: int,
                 glimpse_px: int, min_scale: float, method: str = "bilinear"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.classifier = classifier.eval().requires_grad_(False) if classifier is not None else None
        self.G, self.glimpse_px, self.min_scale, self.method = canvas_grid, glimpse_px, min_scale, method
        self.memory_dims = (model.cfg.backbone.embed_dim, model.cfg.canvas_dim)
        self.positional = (False, True)
        self.register_buffer("cells_yx", canvit.grid_centers(canvas_grid, canvas_grid), persistent=False)

    def start(self, scenes: Tensor, rows: Tensor):
        source = fovea.integral_image(scenes).select(rows) if self.method == "integral" else scenes[rows]
        return source, self.model.init_state(len(rows), self.G)

    def initial(self, n: int):
        return self.model.init_state(n, self.G)

    def observe(self, state) -> tuple[list[Tensor], list]:
        cells = state.canvas[:, self.model.cfg.n_canvas_registers:]
        return [state.recurrent_cls, cells], [None, self.cells_yx.view(-1, 2)]

    def viewpoint(self, action: Tensor) -> canvit.Viewpoint:
        """A raw action (R, 3) -> the viewpoint (see the class docstring)."""
        a = to_gaze(action)
        scale = self.min_scale + (1 - self.min_scale) * (a[:, 2] + 1) / 2
        return canvit.Viewpoint(a[:, :2] * (1 - scale)[:, None], scale)

    def step(self, source, state, action: Tensor):
        vp = self.viewpoint(action)
        glimpse = fovea.viewpoint_glimpse(source, vp.center_yx, vp.scale, self.glimpse_px)
        return self.model(glimpse, state, vp.center_yx, vp.scale).state

    def classify(self, state) -> Tensor:
        predicted = self.model.predict(state, destandardize=True).cls                # (B, Dt)
        return self.classifier(predicted.float())


def load_encoder(path: str) -> tuple[nn.Module, dict]:
    """The frozen encoder of grpo.encoder: a foveal_sup or probe run (its "encoder" with the task
    head), or a distill run (CanViT; its classifier is trained by the objective's setup)."""
    ckpt = fovea.read_checkpoint(path)
    objective = ckpt["config"].get("objective")
    if objective in ("foveal_sup", "probe"):
        model = fovea.load_frozen(ckpt, "encoder", fovea.FovealViT, what=f"grpo.encoder = {path}")
        model.cfg.compile_extraction = False
        return FovealEncoder(model), ckpt
    if objective == "distill":
        return fovea.load_frozen(ckpt, "encoder", canvit.CanViT, what=f"grpo.encoder = {path}"), ckpt
    kind = "an SSL backbone without a task head: probe it first" if objective == "dino" else "not an encoder"
    raise fovea.CheckpointError(f"grpo.encoder = {path} is a {objective!r} checkpoint ({kind}); a gaze "
                                "policy needs a frozen encoder with a task head: a foveal_sup or probe "
                                "run, or a distill run (CanViT)")


@torch.no_grad()
def episode(policy: GazePolicy, encoder: nn.Module, source, state, n: int, T: int, choose,
            first_gaze: str = "policy"):
    """T glimpses of a gaze policy through a frozen encoder, as GRPO trains it and eval.py
    evaluates it: yields (observation, means, logits, action, new state) per glimpse. source,
    state: from encoder.start (state None: the initial one, of n rows); choose(means, logits, t)
    -> glimpse t's action (sampled, or the deterministic rule). first_gaze "centre": glimpse 0
    looks at the centre, the policy is not asked (observation, means, logits None)."""
    for t in range(T):
        if t == 0 and first_gaze == "centre":
            observed, means, logits = None, None, None
            action = torch.zeros(n, encoder.action_dim, device=policy.queries.device)
        else:
            observed = state if state is not None else encoder.initial(n)
            means, logits = policy(*encoder.observe(observed))
            action = choose(means, logits, t)
        state = encoder.step(source, state, action)
        yield observed, means, logits, action, state


# ---- Training: rollouts of G traces, then inner epochs [002, A.2, A.3.4; 000, Sec. 3.3] ------
@dataclass
class GRPOConfig:
    encoder: str = ""              # the frozen encoder's checkpoint (a foveal_sup, probe or distill run)
    policy: GazePolicyConfig = field(default_factory=GazePolicyConfig)
    group: int = 16                # [002] A.3.4: G = 16 traces an image
    steps: int = 8                 # [002] A.3.4: traces of T = 8
    inner_epochs: int = 8          # [002] A.3.4: 8 inner epochs a batch
    reward: str = "prob"           # "prob" [000] Sec. 3.3 | "final" | "improvement" [002] A.2
    gamma: float = 0.7             # "prob" only. NOTE(paper): unstated; GFNet's and AdaptiveNN's 0.7
    clip_eps: float = 0.2          # NOTE(paper): unstated; PPO's 0.2
    adv_scale: str = "group"       # [002] Eq. 4 | "none" (only centred)
    first_gaze: str = "policy"     # [000] Sec. 2.1: the first gaze from s_1 | "centre": a fixed one
    # CanViT (a distill encoder)
    glimpse_px: int = 0            # 0: the distillation's
    min_scale: float = 0.05        # [003] Table 2: s_min
    teacher_weights: str = ""      # the distill run's teacher, where it moved ("" = the path it was trained with)
    classifier_scenes: int = 512   # scenes for the zero-shot classifier (a linear probe on the teacher's CLS)
    classifier_steps: int = 500


class GazeGRPO(nn.Module):
    """train.py's objective `grpo`: a Gaussian-mixture gaze policy on a frozen encoder.

    Each step: G traces of T glimpses for each of the B images, one batch of B * G through the
    frozen encoder (an image's summed-area table shared by its traces), actions sampled without
    gradient; the rewards from the task head's log P(true class) after every glimpse, normalised
    per image and step [002 Eq. 4]; then `inner_epochs` optimizer steps of the clipped objective
    [002 Eq. 1] on the stored states and log-probs (the first epoch's ratio is exactly 1)."""
    augment = True                 # the task head's training view
    updates_per_step: int

    def __init__(self, cfg: GRPOConfig, seed: int):
        super().__init__()
        if not cfg.encoder:
            raise fovea.CheckpointError("grpo.encoder: set the checkpoint of a foveal_sup, probe or distill run")
        if cfg.first_gaze not in ("policy", "centre"):
            raise ValueError(f"grpo.first_gaze: {cfg.first_gaze!r}; choose policy or centre")
        self.cfg, self.seed = cfg, seed
        encoder, ckpt = load_encoder(cfg.encoder)
        if isinstance(encoder, canvit.CanViT):     # the classifier comes in setup()
            d = ckpt["config"]["distill"]
            self.teacher = canvit.run_teacher(ckpt, cfg.teacher_weights,  # for the classifier
                                              "the teacher of grpo.encoder (grpo.teacher_weights)")
            G = ckpt["config"]["data"]["image_size"] // encoder.cfg.backbone.patch_size
            classifier = nn.Linear(encoder.cfg.teacher_dim, ckpt["config"]["data"]["num_classes"])
            encoder = CanViTEncoder(encoder, classifier, G, cfg.glimpse_px or d["glimpse_px"], cfg.min_scale,
                                    d.get("glimpse_method", "bilinear"))
        self.encoder = encoder
        self.num_classes = ckpt["config"]["data"]["num_classes"]
        policy = GazePolicyConfig(**{**asdict(cfg.policy), "action_dim": encoder.action_dim})
        self.model = GazePolicy(policy, encoder.memory_dims, encoder.positional)
        self.updates_per_step = cfg.inner_epochs
        self.actions = cfg.steps - (cfg.first_gaze == "centre")

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()                                      # frozen, always
        return self

    def label_classes(self) -> tuple[str, int]:
        return "data.num_classes (the encoder's)", self.num_classes

    def extra_state(self) -> dict:
        return {"classifier": self.encoder.classifier.state_dict()} if hasattr(self.encoder, "classifier") else {}

    def load_extra_state(self, extra: dict) -> None:
        if "classifier" in extra:
            self.encoder.classifier.load_state_dict(extra["classifier"], strict=True)

    def export(self) -> dict:
        p = self.model
        return {"policy": fovea.export_part(p, cfg=p.cfg, memory_dims=list(p.memory_dims), positional=list(p.positional)),
                **({"classifier": {"state_dict": self.encoder.classifier.state_dict()}}
                   if hasattr(self.encoder, "classifier") else {})}

    @torch.no_grad()
    def setup(self, dataset) -> None:
        """CanViT: fit the zero-shot classifier, a linear probe on the teacher's CLS of
        classifier_scenes scenes ([003] F.2.2), before the policy learns; then frozen."""
        if not isinstance(self.encoder, CanViTEncoder):
            return
        if self.teacher is None:
            raise fovea.CheckpointError("grpo.encoder: this distill run's teacher is unknown (it read "
                                        "precomputed features): set grpo.teacher_weights, the zero-shot "
                                        "classifier needs it")
        device = self.encoder.cells_yx.device
        n = min(self.cfg.classifier_scenes, len(dataset))
        items = [dataset[i] for i in range(n)]
        images = torch.stack([it["image"] for it in items]).to(device)
        labels = torch.stack([it["label"] for it in items]).to(device)
        feats = torch.cat([self.teacher.to(device)(x)["cls"].float() for x in images.split(64)])
        probe = self.encoder.classifier
        with torch.enable_grad():
            opt = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-3)
            probe.requires_grad_(True)
            for _ in range(self.cfg.classifier_steps):
                loss = F.cross_entropy(probe(feats), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
            probe.requires_grad_(False)

    @torch.no_grad()
    def rollout(self, scenes: Tensor, labels: Tensor, step: int, rank: int, world: int,
                std: float) -> dict:
        """G traces of the B scenes: observations, raw actions and their log-probs, log P(true)."""
        cfg, enc = self.cfg, self.encoder
        B, G, T, A = scenes.shape[0], cfg.group, self.actions, enc.action_dim
        R = B * G
        rows = torch.arange(B, device=scenes.device).repeat_interleave(G)          # image of each trace
        source, state = enc.start(scenes, rows)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(T, R * world, generator=gen)[:, rank * R:(rank + 1) * R].to(scenes.device)
        noise = torch.randn(T, R * world, A, generator=gen)[:, rank * R:(rank + 1) * R].to(scenes.device)
        truth = labels[rows]
        logp_true, right, obs, actions, logp_old = [], [], [], [], []

        def look(s) -> None:                                     # the task head on a state
            logp = F.log_softmax(enc.classify(s).float(), -1)
            logp_true.append(logp.gather(1, truth[:, None])[:, 0])
            right.append((logp.argmax(-1) == truth).float())
        first = int(cfg.first_gaze == "centre")                  # a fixed first glimpse, not stored
        sample = lambda means, logits, t: sample_mixture(means, logits, std, u[t - first], noise[t - first])[0]
        if not first:
            look(enc.initial(R))
        for observed, means, logits, action, state in episode(self.model, enc, source, state, R, T + first,
                                                              sample, cfg.first_gaze):
            if observed is not None:
                obs.append(observed)
                actions.append(action)
                logp_old.append(mixture_log_prob(means, logits, std, action))
            look(state)
        return {"obs": obs, "actions": torch.stack(actions, 1), "logp_old": torch.stack(logp_old, 1),
                "logp_true": torch.stack(logp_true, 1).view(B, G, T + 1),
                "right": torch.stack(right, 1).view(B, G, T + 1)}

    def train_step(self, batch: dict, step: int, run) -> dict:
        cfg = self.cfg
        scenes, labels = batch["image"], batch["label"]
        B, G, T = scenes.shape[0], cfg.group, self.actions
        p = self.model.cfg
        std = std_schedule(step, run.schedule_steps, p.std_start, p.std_end, p.std_kind)
        self.model.eval()                                        # no dropout anyway; old == new
        with run.autocast():
            roll = self.rollout(scenes, labels, step, run.rank, run.world, std)
        alpha = raw_advantages(roll["logp_true"], cfg.reward, cfg.gamma if cfg.reward == "prob" else 1.0)
        adv = group_advantages(alpha, scale=cfg.adv_scale)                         # (B, G, T)
        # The stored observations of every step, as one batch of B * G * T rows for the policy.
        obs = roll["obs"]
        memories = [torch.cat([self.encoder.observe(o)[0][i] for o in obs]) for i in range(len(self.encoder.memory_dims))]
        positions = self.encoder.observe(obs[0])[1]
        actions = roll["actions"].transpose(0, 1).reshape(T * B * G, -1)            # (T*R, A) step-major
        logp_old = roll["logp_old"].transpose(0, 1).reshape(-1)
        advantages = adv.view(B * G, T).transpose(0, 1).reshape(-1)
        stats = []
        for epoch in range(cfg.inner_epochs):
            means, logits = self.model(memories, positions)
            logp = mixture_log_prob(means, logits, std, actions)
            objective = clipped_objective(logp, logp_old, advantages, cfg.clip_eps)
            (-objective).backward()
            stats.append(ratio_stats(logp, logp_old, advantages, cfg.clip_eps))
            run.optimizer_step()
        first = 1 + (cfg.first_gaze == "centre")                 # the glimpse count at index 1
        acc = {f"acc_{t + first - 1}": roll["right"][..., t].mean() for t in range(1, T + 1)}
        return {"loss": -objective.detach(), "reward": alpha.mean(), "adv_std": adv.std(),
                "clip_frac": torch.stack([s["clip_frac"] for s in stats[1:] or stats]).mean(),
                "approx_kl": stats[-1]["approx_kl"], "first_ratio": stats[0]["ratio_mean"],
                "weight_entropy": mixture_weight_entropy(logits).mean().detach(),
                "std": torch.tensor(std), **acc, "glimpses": B * G * cfg.steps}
