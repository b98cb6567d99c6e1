"""grpo.py: the GRPO math against brute force and hand-worked numbers; the mixture against
torch.distributions; the policy network's contract (bounds, gradients, determinism)."""
import math
import statistics

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import eval as ev
import eval_canvit
import fovea
import grpo

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# discounted_returns, raw_advantages
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_discounted_returns_match_a_double_loop(gamma):
    r = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = grpo.discounted_returns(r, gamma)
    T = r.shape[-1]
    want = torch.zeros_like(r)
    for t in range(T):
        for k in range(t, T):
            want[..., t] += gamma ** (k - t) * r[..., k]     # Python: 0.0 ** 0 == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_discounted_returns_reject_gamma_outside_0_1():
    with pytest.raises(ValueError, match="gamma"):
        grpo.discounted_returns(torch.zeros(1, 3), 1.5)


# Two traces of one image, P(true class) at states 0..3 (T = 3 actions).
P_TRACES = torch.tensor([[[0.25, 0.5, 0.25, 1.0],
                          [0.5, 0.25, 0.5, 0.5]]], dtype=torch.float64)


def test_raw_advantages_final_is_the_last_log_prob_for_every_action():
    got = grpo.raw_advantages(P_TRACES.log(), "final")
    want = torch.tensor([[[0.0, 0.0, 0.0], [-LN2, -LN2, -LN2]]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_raw_advantages_improvement_by_hand():
    # l = -log P = [2, 1, 2, 0] ln 2 and [1, 2, 1, 1] ln 2; Eq. 3 per action:
    # (2-1)/(2+1), (1-2)/(1+2), (2-0)/(2+0) and (1-2)/3, (2-1)/3, (1-1)/2.
    got = grpo.raw_advantages(P_TRACES.log(), "improvement")
    want = torch.tensor([[[1 / 3, -1 / 3, 1.0], [-1 / 3, 1 / 3, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_raw_advantages_improvement_is_safe_when_p_is_one_twice():
    # P = 1 -> 1 (0/0: defined 0), P = 1 -> 1 - 1e-7 (worse: -1), and a log-prob a hair above 0.
    logp = torch.tensor([[[0.0, 0.0, math.log1p(-1e-7), 1e-8]]])
    got = grpo.raw_advantages(logp, "improvement")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([[[0.0, -1.0, 1.0]]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma, want", [
    # r = P after each action = [0.5, 0.25, 1.0] and [0.25, 0.5, 0.5].
    (1.0, [[1.75, 1.25, 1.0], [1.25, 1.0, 0.5]]),
    # R_2 = r_2, R_1 = r_1 + R_2 / 2, R_0 = r_0 + R_1 / 2.
    (0.5, [[0.875, 0.75, 1.0], [0.625, 0.75, 0.5]]),
    (0.0, [[0.5, 0.25, 1.0], [0.25, 0.5, 0.5]]),
])
def test_raw_advantages_prob_by_hand(gamma, want):
    got = grpo.raw_advantages(P_TRACES.log(), "prob", gamma)
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64), rtol=0, atol=1e-12)


def test_raw_advantages_reject_unknown_kind_and_stray_gamma():
    with pytest.raises(ValueError, match="final, improvement, prob"):
        grpo.raw_advantages(P_TRACES.log(), "reward")
    with pytest.raises(ValueError, match="gamma"):
        grpo.raw_advantages(P_TRACES.log(), "improvement", gamma=0.9)


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------

def test_group_advantages_match_per_cell_statistics():
    alpha = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = grpo.group_advantages(alpha, eps=0.0)
    for b in range(3):
        for t in range(4):
            vals = alpha[b, :, t].tolist()
            mu, sd = statistics.fmean(vals), statistics.pstdev(vals)   # population std (1/G)
            want = torch.tensor([(v - mu) / sd for v in vals], dtype=torch.float64)
            torch.testing.assert_close(got[b, :, t], want, rtol=0, atol=1e-12)
    # Zero mean and unit (population) std in every (image, step) cell.
    torch.testing.assert_close(got.mean(1), torch.zeros(3, 4, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(got.std(1, unbiased=False), torch.ones(3, 4, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_group_advantages_are_per_step_and_per_image():
    alpha = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2))
    base = grpo.group_advantages(alpha)
    shifted = alpha.clone()
    shifted[:, :, 2] += 10.0                 # one step's rewards shifted for every trace
    shifted[1] = shifted[1] * 7.0 - 3.0      # one image's rewards rescaled
    torch.testing.assert_close(grpo.group_advantages(shifted), base, rtol=0, atol=1e-4)


def test_group_advantages_zero_variance_cells_are_exactly_zero():
    alpha = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # In IEEE double, (0.1 + 0.1 + 0.1) / 3 = 0.10000000000000002 (any summation order): the
    # centred values are ~1e-17, not 0: only an explicit flat-cell test makes A exactly 0.
    alpha[0, :, 1] = 0.1
    alpha[1, :, 3] = -2.7
    assert (alpha - alpha.mean(1, keepdim=True))[0, :, 1].abs().max() > 0   # the premise
    got = grpo.group_advantages(alpha)
    assert (got[0, :, 1] == 0).all() and (got[1, :, 3] == 0).all()
    assert (got[0, :, 0] != 0).any()
    assert (grpo.group_advantages(torch.ones(2, 1, 3)) == 0).all()   # G = 1: no baseline, no signal


def test_group_advantages_scale_none_only_centres():
    alpha = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(grpo.group_advantages(alpha, scale="none"),
                               alpha - alpha.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="group or none"):
        grpo.group_advantages(alpha, scale="batch")


# ---------------------------------------------------------------------------------------------
# clipped_objective, ratio_stats
# ---------------------------------------------------------------------------------------------

RATIOS = [0.5, 0.85, 1.0, 1.15, 1.5]          # below, inside and above the range [0.8, 1.2]
ADVS = [1.3, -0.7]
EPS = 0.2


def _cells():
    """logp, logp_old, A of shape (1, 5, 2): every ratio with a positive and a negative A."""
    old = torch.randn(1, 5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rho = torch.tensor(RATIOS, dtype=torch.float64)[None, :, None].expand(1, 5, 2)
    adv = torch.tensor(ADVS, dtype=torch.float64)[None, None, :].expand(1, 5, 2).clone()
    return (old + rho.log()).requires_grad_(), old, adv


def test_clipped_objective_matches_a_loop_over_cells():
    logp, old, adv = _cells()
    got = grpo.clipped_objective(logp, old, adv, EPS)
    terms = []
    for lp, lo, a in zip(logp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist()):
        rho = math.exp(lp - lo)
        terms.append(min(rho * a, min(max(rho, 1 - EPS), 1 + EPS) * a))
    assert got.dim() == 0
    assert abs(got.item() - sum(terms) / len(terms)) < 1e-12


def test_clipped_objective_gradient_vanishes_only_where_clipped_toward_the_advantage():
    logp, old, adv = _cells()
    grpo.clipped_objective(logp, old, adv, EPS).backward()
    n = logp.numel()
    rho = torch.tensor(RATIOS, dtype=torch.float64)[:, None].expand(5, 2)
    a = torch.tensor(ADVS, dtype=torch.float64)[None, :].expand(5, 2)
    # d(rho A)/d logp = rho A; clipped (zero gradient): rho > 1 + eps with A > 0 and
    # rho < 1 - eps with A < 0. rho = 1.5 with A < 0 and rho = 0.5 with A > 0 are not clipped.
    clipped = ((rho > 1 + EPS) & (a > 0)) | ((rho < 1 - EPS) & (a < 0))
    want = torch.where(clipped, torch.zeros_like(rho), rho * a / n)
    torch.testing.assert_close(logp.grad[0], want, rtol=1e-10, atol=1e-12)
    assert clipped.sum() == 2


def test_clipped_objective_at_the_old_policy_is_the_policy_gradient():
    # logp from parameters through the mixture log-density; logp_old is the same, detached.
    gen = torch.Generator().manual_seed(6)
    means = torch.randn(2, 3, 4, 3, 2, generator=gen).requires_grad_()   # (B, G, T, K, A)
    logits = torch.randn(2, 3, 4, 3, generator=gen).requires_grad_()
    action = torch.randn(2, 3, 4, 2, generator=gen)
    adv = torch.randn(2, 3, 4, generator=gen)
    logp = grpo.mixture_log_prob(means, logits, 0.5, action)                # (B, G, T)
    rho, _ = grpo._ratio(logp, logp.detach())
    assert (rho == 1).all()
    stats = grpo.ratio_stats(logp, logp.detach(), adv, EPS)
    assert stats["ratio_mean"] == 1 and stats["clip_frac"] == 0 and stats["approx_kl"] == 0
    g = torch.autograd.grad(grpo.clipped_objective(logp, logp.detach(), adv, EPS),
                            [means, logits], retain_graph=True)
    want = torch.autograd.grad((adv * logp).mean(), [means, logits])
    for a, b in zip(g, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_ratio_stats_match_counts():
    # (rho, A): two clipped low, one clipped high, three not clipped (0.7 with A > 0,
    # 1.5 with A < 0, 1.0); mean rho != 1, so k3 differs from k1 = mean(-log rho).
    cells = [(0.5, -1.0), (0.6, -2.0), (0.7, 1.0), (1.5, 1.0), (1.5, -1.0), (1.0, 1.0)]
    rho = torch.tensor([c[0] for c in cells], dtype=torch.float64)
    adv = torch.tensor([c[1] for c in cells], dtype=torch.float64)
    old = torch.linspace(-3.0, -1.0, 6, dtype=torch.float64)
    stats = grpo.ratio_stats(old + rho.log(), old, adv, EPS)
    assert stats["clip_frac_low"].item() == pytest.approx(2 / 6)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert stats["clip_frac"].item() == pytest.approx(3 / 6)
    assert stats["ratio_mean"].item() == pytest.approx(sum(c[0] for c in cells) / 6)
    k3 = sum((r - 1) - math.log(r) for r, _ in cells) / 6
    assert stats["approx_kl"].item() == pytest.approx(k3, rel=1e-6)


def test_log_ratio_is_clamped_before_exp():
    logp = torch.tensor([0.0, 0.0], requires_grad=True)
    old = torch.tensor([-200.0, 200.0])            # exp(+-200) is inf / 0 in float32
    adv = torch.tensor([-1.0, 1.0])
    obj = grpo.clipped_objective(logp, old, adv, EPS)
    obj.backward()
    assert torch.isfinite(obj) and torch.isfinite(logp.grad).all()
    assert obj.item() == pytest.approx((-math.exp(20.0) + math.exp(-20.0)) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The mixture: log-density, sampling, mode, weight entropy, std schedule
# ---------------------------------------------------------------------------------------------

def _torch_mixture(means, logits, std):
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means, std), 1))


@pytest.mark.parametrize("A", [2, 3])
def test_mixture_log_prob_matches_torch_distributions(A):
    gen = torch.Generator().manual_seed(7)
    means = torch.rand(3, 4, 5, A, generator=gen) * 2 - 1         # (B, G, K, A)
    logits = torch.randn(3, 4, 5, generator=gen) * 2
    action = torch.randn(3, 4, A, generator=gen)
    got = grpo.mixture_log_prob(means, logits, 0.3, action)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, _torch_mixture(means, logits, 0.3).log_prob(action),
                               rtol=0, atol=1e-5)
    std = torch.rand(3, 4, generator=gen) * 0.5 + 0.05             # one std per row
    got = grpo.mixture_log_prob(means, logits, std, action)
    want = _torch_mixture(means, logits, std[..., None, None]).log_prob(action)
    # |log p| reaches ~250 here, where a float32 ulp is 1.5e-5: 1e-5 plus 1e-6 relative.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_mixture_density_integrates_to_one():
    means = torch.tensor([[-0.6, 0.2], [0.5, 0.5], [0.1, -0.7]])
    logits = torch.tensor([0.3, -1.0, 1.2])
    h = 0.01
    ticks = torch.arange(-3.0, 3.0, h) + h / 2    # >= 9 std beyond every mean: no mass is lost
    gy, gx = torch.meshgrid(ticks, ticks, indexing="ij")
    pts = torch.stack([gy.reshape(-1), gx.reshape(-1)], -1)        # (n, 2)
    n = pts.shape[0]
    logp = grpo.mixture_log_prob(means.expand(n, 3, 2), logits.expand(n, 3), 0.25, pts)
    assert logp.exp().double().sum().item() * h * h == pytest.approx(1.0, abs=1e-4)


def test_sample_mixture_frequencies_and_moments():
    n, K = 20000, 3
    means = torch.tensor([[-0.5, 0.4], [0.3, 0.8], [0.7, -0.6]])
    logits = torch.tensor([0.0, 1.0, -1.0])
    std = 0.2
    gen = torch.Generator().manual_seed(8)
    u, noise = torch.rand(n, generator=gen), torch.randn(n, 2, generator=gen)
    action, k = grpo.sample_mixture(means.expand(n, K, 2), logits.expand(n, K), std, u, noise)
    assert action.shape == (n, 2) and k.shape == (n,) and action.dtype == torch.float32
    # Component counts vs softmax(logits): chi-square with K - 1 = 2 degrees of freedom;
    # P(chi2_2 > 13.8) = 1e-3. Seeded, so the test is deterministic.
    p = torch.softmax(logits, 0)
    counts = torch.bincount(k, minlength=K).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 13.8
    # Per component: the sample mean is within 5 standard errors (std / sqrt(n_k)) of mu_k and
    # the sample std within 5 of its standard errors (~ std / sqrt(2 n_k)) of std.
    for j in range(K):
        a = action[k == j].double()
        nk = a.shape[0]
        assert ((a.mean(0) - means[j]).abs() < 5 * std / math.sqrt(nk)).all()
        assert ((a.std(0) - std).abs() < 5 * std / math.sqrt(2 * nk)).all()


def test_sample_mixture_per_row_std():
    # Half the rows with a tiny std: their samples sit on a component mean.
    n = 4000
    means = torch.tensor([[0.2, -0.3], [-0.6, 0.5]]).expand(n, 2, 2)
    std = torch.cat([torch.full((n // 2,), 1e-4), torch.full((n // 2,), 0.5)])
    gen = torch.Generator().manual_seed(12)
    a, k = grpo.sample_mixture(means, torch.zeros(n, 2), std, torch.rand(n, generator=gen),
                               torch.randn(n, 2, generator=gen))
    dev = (a - means[torch.arange(n), k]).abs()
    assert dev[: n // 2].max() < 1e-3 and dev[n // 2:].max() > 0.5


def test_inhibition_of_return_takes_the_best_action_away_from_earlier_gazes():
    """grpo.inhibited_mode against a brute-force search of the density outside the inhibited discs
    (a 0.005 lattice): with the heavy component's place visited it takes the best place left (the
    light component's mean, or the heavy one's flank where that is denser); nothing visited: the
    mode; everything inhibited: the mode."""
    means = torch.tensor([[[0.5, 0.5], [-0.5, -0.4], [0.9, -0.9]]] * 3)
    logits = torch.tensor([[0.6, 0.3, 0.1]] * 3).log()
    std, radius = 0.15, 0.3
    visited = [torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]), torch.tensor([[0.5, 0.5], [-0.5, -0.4], [0.0, 0.0]])]
    got = grpo.inhibited_mode(means, logits, std, visited, radius)
    g = torch.linspace(-1, 1, 401)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    for b in range(3):
        density = grpo.mixture_log_prob(means[b].expand(len(grid), -1, -1), logits[b].expand(len(grid), -1), std, grid)
        for v in visited:
            density = density.masked_fill((grid - v[b]).norm(dim=-1) < radius, -float("inf"))
        brute = grid[density.argmax()]
        assert grpo.mixture_log_prob(means[b], logits[b], std, got[b]) >= density.max() - 0.02, (b, got[b], brute)
        assert min((got[b] - v[b]).norm() for v in visited) >= radius
    assert (got[0] - means[0, 1]).norm() < 1e-4                      # the light component's mean
    assert (got[1] - means[1, 2]).norm() < 1e-4                      # both visited: the third
    torch.testing.assert_close(grpo.inhibited_mode(means, logits, std, [], radius), grpo.mixture_mode(means, logits, std))
    torch.testing.assert_close(grpo.inhibited_mode(means, logits, std, visited, 5.0), grpo.mixture_mode(means, logits, std))


def test_the_deterministic_action_is_the_mode_of_the_whole_mixture():
    """[002] A.3.3's deterministic action: the policy's most likely action. Two nearby components of
    weight 0.3 make the mode between them, not at the lone heaviest component (0.4), whose mean the
    old rule returned; each answer is checked against a brute-force search of the density."""
    means = torch.tensor([[[0.1, 0.0], [-0.1, 0.0], [0.8, 0.5]],        # overlapping pair + heavier loner
                          [[0.9, 0.9], [-0.9, 0.1], [0.0, -0.9]]])      # far apart: the heaviest mean
    logits = torch.tensor([[0.3, 0.3, 0.4], [0.2, 0.5, 0.3]]).log()
    std = 0.15
    mode = grpo.mixture_mode(means, logits, std)
    g = torch.linspace(-1.2, 1.2, 481)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)     # 0.005 spacing
    for b in range(2):
        density = grpo.mixture_log_prob(means[b].expand(len(grid), -1, -1), logits[b].expand(len(grid), -1),
                                        std, grid)
        brute = grid[density.argmax()]
        assert (mode[b] - brute).norm() < 0.01, (b, mode[b], brute)
        assert grpo.mixture_log_prob(means[b], logits[b], std, mode[b]) >= density.max() - 1e-6
    assert mode[0].norm() < 0.01                                         # between the pair
    assert (mode[1] - means[1, 1]).norm() < 1e-3                         # one component dominates there
    # a std per row, and leading batch dimensions
    rows = grpo.mixture_mode(means[None].expand(3, -1, -1, -1), logits[None].expand(3, -1, -1),
                             torch.full((3, 2), std))
    torch.testing.assert_close(rows, mode[None].expand(3, -1, -1))


def test_mixture_weight_entropy():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(grpo.mixture_weight_entropy(logits),
                               Categorical(logits=logits).entropy())
    assert grpo.mixture_weight_entropy(torch.zeros(5)).item() == pytest.approx(math.log(5))
    one = torch.tensor([0.0, -math.inf, -math.inf])
    assert grpo.mixture_weight_entropy(one).item() == 0.0          # 0 log 0 = 0, not nan


def test_std_schedule():
    assert grpo.std_schedule(0, 100, 0.5, 0.2) == pytest.approx(0.5)
    assert grpo.std_schedule(50, 100, 0.5, 0.2) == pytest.approx(0.35)              # cosine mid
    assert grpo.std_schedule(25, 100, 0.5, 0.2) == pytest.approx(0.2 + 0.15 * (1 + 0.5 ** 0.5))
    assert grpo.std_schedule(100, 100, 0.5, 0.2) == pytest.approx(0.2)
    assert grpo.std_schedule(500, 100, 0.5, 0.2) == pytest.approx(0.2)              # held
    assert grpo.std_schedule(25, 100, 0.5, 0.2, "linear") == pytest.approx(0.425)
    assert grpo.std_schedule(70, 100, 0.5, 0.2, "constant") == 0.5
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        grpo.std_schedule(0, 100, 0.5, 0.2, "step")


# ---------------------------------------------------------------------------------------------
# GazePolicy
# ---------------------------------------------------------------------------------------------

def _policy(memory_dims=(24,), **kw):
    torch.manual_seed(0)
    cfg = grpo.GazePolicyConfig(**{"dim": 32, "heads": 4, **kw})
    return grpo.GazePolicy(cfg, memory_dims)


def test_policy_shapes_and_float32_under_autocast():
    policy = _policy(depth=2, action_dim=3, num_components=5)
    mem = [torch.randn(3, 7, 24)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        means, logits = policy(mem)
    assert means.shape == (3, 5, 3) and logits.shape == (3, 5)
    assert means.dtype == torch.float32 and logits.dtype == torch.float32


def test_policy_means_stay_in_the_image():
    policy = _policy()
    mem = [torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(14)) * 5]
    means, _ = policy(mem)
    assert (means.abs() < 1).all()
    with torch.no_grad():                       # even with a huge output layer
        policy.mean_head.weight.mul_(1e4)
        policy.mean_head.bias.fill_(50.0)
    means, _ = policy(mem)
    assert (means.abs() <= 1).all() and (means.abs() > 0.99).any()


def test_policy_every_parameter_gets_a_gradient():
    policy = _policy(memory_dims=(24, 12), depth=2)
    gen = torch.Generator().manual_seed(15)
    means, logits = policy([torch.randn(2, 5, 24, generator=gen),
                            torch.randn(2, 9, 12, generator=gen)])
    loss = (means * torch.randn(means.shape, generator=gen)).sum() \
        + (logits * torch.randn(logits.shape, generator=gen)).sum()
    loss.backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_policy_has_no_dropout():
    policy = _policy(depth=2).train()
    mem = [torch.randn(3, 6, 24)]
    m1, l1 = policy(mem)
    m2, l2 = policy(mem)
    assert torch.equal(m1, m2) and torch.equal(l1, l2)


def test_policy_two_streams_of_different_widths():
    policy = _policy(memory_dims=(48, 16))
    cls, canvas = torch.randn(2, 1, 48), torch.randn(2, 16, 16)
    means, logits = policy([cls, canvas])
    assert means.shape == (2, 4, 2) and logits.shape == (2, 4)
    # Both streams are read: changing either changes the output.
    assert not torch.equal(policy([cls + torch.randn(2, 1, 48), canvas])[0], means)
    assert not torch.equal(policy([cls, canvas.flip(-1)])[0], means)
    with pytest.raises(ValueError, match="memory stream 1"):
        policy([cls, torch.randn(2, 16, 48)])
    with pytest.raises(ValueError, match="2 memory streams"):
        policy([cls])


def test_policy_starts_spread_over_the_image_with_even_weights():
    policy = _policy()
    means, logits = policy([torch.randn(5, 6, 24)])
    # K = 4: near the quadrant centres (+-0.5, +-0.5), pairwise ~1 apart, not all at one point.
    anchors = torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    assert (means - anchors).abs().max() < 0.05
    assert torch.cdist(means, means)[:, [0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3]].min() > 0.9
    assert (grpo.mixture_weight_entropy(logits) > math.log(4) - 1e-3).all()


# ---------------------------------------------------------------------------------------------
# The objective: rollouts, inner epochs, encoders [002, A.2, A.3.4]
# ---------------------------------------------------------------------------------------------

class ToyEncoder(torch.nn.Module):
    """An encoder whose task head believes in the true class the more, the nearer the gaze of
    step t was to TARGETS[t]: log-odds -4 ||gaze - target_t||^2. The state tells the step; what
    GRPO must learn at each step is known, and only per-step advantages matched to their own
    actions teach both."""
    action_dim = 2
    TARGETS = torch.tensor([[0.5, -0.25], [-0.5, 0.5]])

    def __init__(self):
        super().__init__()
        self.memory_dims, self.positional = (4,), (False,)

    def start(self, scenes, rows):
        return None, None

    def initial(self, n):
        return torch.zeros(n, 2, 4)

    def observe(self, state):
        return [state], [None]

    def step(self, source, state, action):
        t = 0 if state is None else int(state[0, 1, 1].item())               # glimpses so far
        d = (grpo.to_gaze(action) - self.TARGETS[t]).square().sum(-1)
        out = torch.zeros(len(action), 2, 4)
        out[:, 0, 0], out[:, 1, 1] = -4 * d, t + 1
        return out

    def classify(self, state):
        return torch.stack([state[:, 0, 0], torch.zeros(len(state))], 1)       # class 0 = true


def toy_grpo(**kw):
    cfg = grpo.GRPOConfig(encoder="toy", policy=grpo.GazePolicyConfig(dim=16, heads=2, std_start=0.3,
                                                                      std_end=0.3), group=8, steps=2,
                          inner_epochs=4, reward="prob", gamma=0.0, **kw)
    obj = grpo.GazeGRPO.__new__(grpo.GazeGRPO)
    torch.nn.Module.__init__(obj)
    obj.cfg, obj.seed, obj.encoder, obj.num_classes = cfg, 0, ToyEncoder(), 2
    obj.model = grpo.GazePolicy(cfg.policy, (4,))
    obj.updates_per_step, obj.actions = cfg.inner_epochs, cfg.steps - (cfg.first_gaze == "centre")
    return obj


def test_the_first_inner_epoch_has_ratio_one_and_grpo_learns_where_to_look():
    from conftest import LocalRun
    torch.manual_seed(0)
    obj = toy_grpo()
    opt = torch.optim.AdamW(obj.model.parameters(), lr=1e-2)
    batch = {"image": torch.zeros(6, 3, 8, 8), "label": torch.zeros(6, dtype=torch.long)}
    run = LocalRun(opt)
    first = obj.train_step(batch, 0, run)
    assert first["first_ratio"].item() == 1.0 and run.updates == 4           # one update an epoch

    def distances():                                  # the deterministic action at each step
        out, state = [], torch.zeros(1, 2, 4)
        for t in range(2):
            means, logits = obj.model([state])
            gaze = grpo.mixture_mode(means, logits, 0.3)
            out.append((gaze[0] - ToyEncoder.TARGETS[t]).norm().item())
            state = obj.encoder.step(None, None if t == 0 else state, gaze)
        return out
    before = distances()
    for step in range(1, 80):
        obj.train_step(batch, step, run)
    after = distances()
    assert all(a < 0.2 and a < 0.5 * b for a, b in zip(after, before)), (before, after)


def test_rollouts_share_tables_and_store_what_they_sampled(tmp_path):
    """A real foveal encoder: B tables for B * G traces; the stored log-probs are the policy's
    at the stored raw actions; nothing of the encoder learns."""
    import dataclasses
    import train
    from conftest import LocalRun
    from test_fovea import tiny_foveal
    cfg = train.TrainConfig()
    config_mod = __import__("config")
    config_mod.apply_overrides(cfg, {"objective": "foveal_sup", "data": {"image_size": 32},
                                     "foveal": {"model": dataclasses.asdict(tiny_foveal(num_classes=10))}})
    torch.manual_seed(0)
    torch.save(train.checkpoint(cfg, train.build_objective(cfg), step=1), tmp_path / "sup.pt")
    obj = grpo.GazeGRPO(grpo.GRPOConfig(encoder=str(tmp_path / "sup.pt"), group=4, steps=3, inner_epochs=2,
                                        policy=grpo.GazePolicyConfig(dim=16, heads=2)), seed=0)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    source, _ = obj.encoder.start(images, torch.arange(3).repeat_interleave(4))
    assert len(source) == 12 and source.sums.shape[0] == 3
    roll = obj.rollout(images, labels, step=0, rank=0, world=1, std=0.4)
    assert roll["actions"].shape == (12, 3, 2) and roll["logp_true"].shape == (3, 4, 4)
    for t in range(3):
        means, logits = obj.model(obj.encoder.observe(roll["obs"][t])[0])
        torch.testing.assert_close(grpo.mixture_log_prob(means, logits, 0.4, roll["actions"][:, t]),
                                   roll["logp_old"][:, t])
    opt = torch.optim.AdamW(obj.model.parameters(), lr=1e-3)
    out = obj.train_step({"image": images, "label": labels}, 0, LocalRun(opt))
    assert out["first_ratio"].item() == 1.0
    assert all(p.grad is None and not p.requires_grad for p in obj.encoder.parameters())
    with pytest.raises(__import__("fovea").CheckpointError,
                       match=r"is a 'dino' checkpoint \(an SSL backbone without a task head.*foveal_sup or probe"):
        cfg_dino = train.TrainConfig()
        config_mod.apply_overrides(cfg_dino, {"objective": "dino", "dino": {
            "model": {**dataclasses.asdict(tiny_foveal(head="none", num_classes=0)), "z_max": 4.5},
            "global_grid": 4, "local_grid": 2, "out_dim": 16, "hidden_dim": 24, "bottleneck_dim": 8}})
        torch.save(train.checkpoint(cfg_dino, train.build_objective(cfg_dino), step=1), tmp_path / "dino.pt")
        grpo.GazeGRPO(grpo.GRPOConfig(encoder=str(tmp_path / "dino.pt")), seed=0)


def test_a_policy_for_canvit(tmp_path):
    """CanViT (a distill run): viewpoints (centre, scale) inside the scene, the zero-shot
    classifier fitted before the policy learns, the canvas read with its cell positions."""
    import train
    import config
    import data
    from conftest import LocalRun, TINY_DISTILL_SECTION
    cfg = train.TrainConfig()
    config.apply_overrides(cfg, {"objective": "distill", "data": {"image_size": 64, "length": 32},
                                 "distill": TINY_DISTILL_SECTION})
    torch.manual_seed(0)
    distiller = train.build_objective(cfg)
    distiller.setup(data.build_dataset(cfg.data))
    torch.save(train.checkpoint(cfg, distiller, step=1), tmp_path / "canvit.pt")
    obj = grpo.GazeGRPO(grpo.GRPOConfig(encoder=str(tmp_path / "canvit.pt"), group=3, steps=2, inner_epochs=2,
                                        classifier_steps=20, policy=grpo.GazePolicyConfig(dim=16, heads=2)), seed=0)
    assert isinstance(obj.encoder, grpo.CanViTEncoder) and obj.model.cfg.action_dim == 3
    before = obj.encoder.classifier.weight.clone()
    obj.setup(data.build_dataset(cfg.data))
    assert not torch.equal(before, obj.encoder.classifier.weight)           # fitted, then frozen
    assert not obj.encoder.classifier.weight.requires_grad
    vp = obj.encoder.viewpoint(torch.tensor([[5.0, -5.0, -9.0], [0.3, 0.2, 9.0], [0.9, 0.9, 0.0]]))
    assert torch.allclose(vp.scale, torch.tensor([0.05, 1.0, 0.525]))
    assert (vp.center_yx.abs() <= (1 - vp.scale)[:, None] + 1e-6).all()     # inside the scene
    batch = data.collate([data.build_dataset(cfg.data)[i] for i in range(4)])
    opt = torch.optim.AdamW(obj.model.parameters(), lr=1e-3)
    pos_before = obj.model.pos_mlp[0].weight.clone()
    out = obj.train_step(batch, 0, LocalRun(opt))
    assert out["first_ratio"].item() == 1.0
    assert not torch.equal(pos_before, obj.model.pos_mlp[0].weight)        # the cell positions are read
    assert all(p.grad is None and not p.requires_grad for p in obj.encoder.model.parameters())


def test_a_policy_for_canvit_distilled_from_a_teacher_on_disk(tmp_path):
    """A distill run whose teacher was read from a path (a vit_sup run here) keeps only that path:
    the policy's zero-shot classifier reads the same teacher from it, or from grpo.teacher_weights
    once the file has moved; a path that leads nowhere is named in the error."""
    import shutil
    import train
    import config
    from conftest import TINY_DISTILL_SECTION
    vit_cfg = train.TrainConfig()
    config.apply_overrides(vit_cfg, {"objective": "vit_sup", "vit": {
        "backbone": {"embed_dim": 64, "num_heads": 1, "n_blocks": 1, "patch_size": 8}, "num_classes": 10}})
    torch.manual_seed(0)
    vit = train.build_objective(vit_cfg)
    torch.save(train.checkpoint(vit_cfg, vit, step=1), tmp_path / "vit.pt")
    cfg = train.TrainConfig()
    section = {**TINY_DISTILL_SECTION, "teacher": {"weights": str(tmp_path / "vit.pt")}}
    config.apply_overrides(cfg, {"objective": "distill", "data": {"image_size": 64, "length": 32},
                                 "distill": section})
    distiller = train.build_objective(cfg)
    torch.save(train.checkpoint(cfg, distiller, step=1), tmp_path / "canvit.pt")
    small = dict(group=2, steps=2, inner_epochs=1, classifier_steps=2,
                 policy=grpo.GazePolicyConfig(dim=16, heads=2))
    images = torch.randn(2, 3, 64, 64)
    obj = grpo.GazeGRPO(grpo.GRPOConfig(encoder=str(tmp_path / "canvit.pt"), **small), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(obj.teacher(images)["cls"], vit.model.vit(images)["cls"], rtol=0, atol=0)
    shutil.move(tmp_path / "vit.pt", tmp_path / "moved.pt")
    with pytest.raises(fovea.CheckpointError, match="grpo.teacher_weights.*vit.pt: not a file"):
        grpo.GazeGRPO(grpo.GRPOConfig(encoder=str(tmp_path / "canvit.pt"), **small), seed=0)
    obj = grpo.GazeGRPO(grpo.GRPOConfig(encoder=str(tmp_path / "canvit.pt"),
                                        teacher_weights=str(tmp_path / "moved.pt"), **small), seed=0)
    # eval.py finds the same teacher the same way (--teacher_weights where it moved)
    args = ["--ckpt", str(tmp_path / "canvit.pt"), "--out_dir", str(tmp_path / "o")]
    _, eval_teacher, _ = eval_canvit.load_canvit(
        fovea.read_checkpoint(str(tmp_path / "canvit.pt")),
        ev.parse_args([*args, "--teacher_weights", str(tmp_path / "moved.pt")]))
    with torch.no_grad():
        for teacher in (obj.teacher, eval_teacher):
            torch.testing.assert_close(teacher(images)["cls"], vit.model.vit(images)["cls"], rtol=0, atol=0)
    with pytest.raises(fovea.CheckpointError, match="--teacher_weights.*vit.pt: not a file"):
        eval_canvit.load_canvit(fovea.read_checkpoint(str(tmp_path / "canvit.pt")), ev.parse_args(args))
