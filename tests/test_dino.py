"""dino.py's DINO pieces: the official DINO / DINOv2 / DINOv3 numbers (`reference/dino`), the
losses assembled from the public pieces, and independent checks (brute force, invariants,
2 processes == 1)."""
import datetime
import math
import statistics
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch.nn.functional as F

import dino
import fovea
from conftest import LocalRun, load_reference

ATOL = 1e-5          # tensors against the official code
LOSS_ATOL = 2e-5     # loss values against the official code


@pytest.fixture(scope="module")
def head_ref(reference_dir):
    return load_reference(reference_dir, "dino/dino_head_ref.pt")


@pytest.fixture(scope="module")
def v1_ref(reference_dir):
    return load_reference(reference_dir, "dino/dino_loss_v1_ref.pt")


@pytest.fixture(scope="module")
def v2_ref(reference_dir):
    return load_reference(reference_dir, "dino/dinov2_refs.pt")


def _close(a, b, atol=ATOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:g}"


# ----------------------------------------------------------------------------------------------
# DINOHead
# ----------------------------------------------------------------------------------------------

def head_args(ref) -> dict:
    """The official head's constructor arguments that DINOHead has (v1's defaults: 3 layers,
    no BatchNorm, which the reference used)."""
    c = ref["config"]
    assert (c["nlayers"], c["use_bn"]) == (3, False)
    return {k: c[k] for k in ("in_dim", "out_dim", "hidden_dim", "bottleneck_dim", "norm_last_layer")}


def test_head_matches_official(head_ref):
    """Strict loading of the official v1 head: the same keys, trainable flags and outputs."""
    head = dino.DINOHead(**head_args(head_ref))
    head.load_state_dict(head_ref["state_dict"], strict=True)
    assert list(head.state_dict()) == list(head_ref["state_dict"])
    assert {n: p.requires_grad for n, p in head.named_parameters()} == head_ref["requires_grad"]
    assert isinstance(head.mlp[1], torch.nn.GELU) and head.mlp[1].approximate == "none"
    with torch.no_grad():
        _close(head(head_ref["input"]), head_ref["output"])
        _close(head.normalized_bottleneck(head_ref["input"]), head_ref["bottleneck_normalized"])


def test_seeded_head_init_is_the_official_one(head_ref):
    """Same seed, same construction order, same draws: the official init. The uniform draws
    are identical on any CPU; erfinv's float32 rounding is not (AVX-512 against AVX2: 4.7e-10
    on weights of std 0.02; torch's scalar kernels: 3e-8), so the comparison allows 1e-7, about
    40 ulps of such a weight; another draw differs by ~0.02."""
    torch.manual_seed(0)
    sd = dino.DINOHead(**head_args(head_ref)).state_dict()
    for k, v in head_ref["state_dict"].items():
        torch.testing.assert_close(sd[k], v, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7,
                                   msg=k)


def test_head_init_statistics():
    """trunc-normal(0.02) / zero bias for the MLP only; default Linear init for v; g = 1."""
    torch.manual_seed(0)
    head = dino.DINOHead(64, 512, hidden_dim=256, bottleneck_dim=128)
    for name, p in head.mlp.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert abs(p.std().item() - 0.02) < 0.002, name
    v = head.last_layer.weight_v
    bound = 1 / math.sqrt(128)                  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), .)
    assert v.abs().max().item() <= bound and abs(v.std().item() - bound / math.sqrt(3)) < 0.005
    assert torch.all(head.last_layer.weight_g == 1)


def test_head_logits_are_cosines_at_init():
    torch.manual_seed(1)
    head = dino.DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(256, 16) * 10
    with torch.no_grad():
        logits, z = head(x), head.normalized_bottleneck(x)
    v = head.last_layer.weight_v.detach()
    assert torch.allclose(z.norm(dim=-1), torch.ones(256), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(z[:, None, :], v[None, :, :], dim=-1)  # (B, K)
    _close(logits, cos, atol=1e-6)
    assert logits.abs().max().item() <= 1 + 1e-6


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_norm_last_layer_freezes_g(norm_last_layer):
    head = dino.DINOHead(8, 16, hidden_dim=16, bottleneck_dim=4, norm_last_layer=norm_last_layer)
    g, v = head.last_layer.weight_g, head.last_layer.weight_v
    assert g.requires_grad is (not norm_last_layer)
    head(torch.randn(6, 8)).pow(2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    if norm_last_layer:
        assert g.grad is None
    else:
        assert g.grad is not None and g.grad.abs().sum() > 0
    # What a training loop drops in epoch 0: the official rule is every name with "last_layer".
    official = [p for n, p in head.named_parameters() if "last_layer" in n]
    assert [id(p) for p in head.last_layer_parameters()] == [id(p) for p in official]


def test_weight_norm_equals_explicit_g_v_over_norm_v():
    torch.manual_seed(2)
    head = dino.DINOHead(8, 5, hidden_dim=16, bottleneck_dim=3, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.tensor([[2.0], [-0.5], [1.0], [3.0], [0.1]]))
        head.last_layer.weight_v.copy_(torch.randn(5, 3) * 4)
    g, v = head.last_layer.weight_g.detach(), head.last_layer.weight_v.detach()
    z = torch.randn(4, 3)
    expected = torch.zeros(4, 5)
    for k in range(5):
        norm_k = math.sqrt(sum(v[k, j].item() ** 2 for j in range(3)))
        for b in range(4):
            expected[b, k] = g[k, 0] * sum(v[k, j] * z[b, j] for j in range(3)) / norm_k
    with torch.no_grad():
        _close(head.last_layer(z), expected, atol=1e-5)


def test_head_normalisation_is_safe_in_half_precision():
    """A zero bottleneck row: fp16's 1e-12 eps would underflow to 0 and give 0/0."""
    torch.manual_seed(3)
    head = dino.DINOHead(8, 16, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(5, 8)
    x[0] = 0                                            # zero biases at init: zero bottleneck
    with torch.no_grad():
        ref = head(x)
        half = head.half()(x.half())
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
        _close(half.float(), ref, atol=2e-2)
        head.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = head(x)
        assert torch.isfinite(bf).all()
        _close(bf.float(), ref, atol=3e-2)


# ----------------------------------------------------------------------------------------------
# cross_entropy, centring
# ----------------------------------------------------------------------------------------------

def test_cross_entropy_equals_a_double_loop():
    torch.manual_seed(4)
    s, q = torch.randn(3, 5), torch.softmax(torch.randn(3, 5), -1)
    tau = 0.1
    total = 0.0
    for b in range(3):
        log_z = math.log(sum(math.exp(s[b, j].item() / tau) for j in range(5)))
        for k in range(5):
            total -= q[b, k].item() * (s[b, k].item() / tau - log_z)
    _close(dino.cross_entropy(s, q, tau), torch.tensor(total / 3), atol=1e-5)
    s16, q16 = s.bfloat16(), q.bfloat16()
    out = dino.cross_entropy(s16, q16, tau)
    assert out.dtype == torch.float32
    _close(out, dino.cross_entropy(s16.float(), q16.float(), tau), atol=1e-6)


def test_centring_functions_are_pure_and_gradient_free():
    t = torch.randn(6, 4, requires_grad=True)
    c = torch.randn(1, 4)
    c_copy, t_copy = c.clone(), t.detach().clone()
    probs = dino.centered_probs(t, c, 0.05)
    new_c = dino.update_center(c, t, 0.9)
    assert not probs.requires_grad and not new_c.requires_grad
    assert torch.equal(c, c_copy) and torch.equal(t.detach(), t_copy)
    _close(probs, torch.softmax((t_copy - c) / 0.05, -1), atol=1e-6)
    _close(new_c, 0.9 * c + 0.1 * t_copy.mean(0, keepdim=True), atol=1e-6)
    assert dino.update_center(c.view(4), t, 0.9).shape == (4,)


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------

def _naive_sinkhorn(logits, temp, n_iterations, dtype):
    """The official recipe without the shift, in a chosen dtype (independent of dino.py)."""
    Q = torch.exp(logits.to(dtype) / temp).t()                                  # (K, B)
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


def test_sinkhorn_matches_official(v1_ref, v2_ref):
    ref = v2_ref["sinkhorn"]
    assert ref["n_iterations"] == 3
    _close(dino.sinkhorn_knopp(ref["input"], 0.07), ref["output"])
    _close(dino.sinkhorn_knopp(ref["input"], 0.04), ref["output_temp0.04"])
    _close(dino.sinkhorn_knopp(ref["input_big"], 0.07), ref["output_big"])
    # DINOv2's targets for a DINO head's teacher outputs (both global crops together)
    teacher = v1_ref["steps"][0]["teacher_output"]
    probs = v2_ref["dinov2_dino_loss_sinkhorn"]["teacher_probs"]
    _close(dino.sinkhorn_knopp(teacher, 0.04), probs.reshape(teacher.shape))


def test_sinkhorn_marginals():
    torch.manual_seed(5)
    B, K = 12, 20
    logits = torch.randn(B, K, requires_grad=True)
    Q = dino.sinkhorn_knopp(logits, 0.1)
    assert Q.shape == (B, K) and Q.dtype == torch.float32 and not Q.requires_grad
    _close(Q.sum(dim=1), torch.ones(B), atol=1e-6)
    # Many iterations: every prototype gets the same share B / K of the mass.
    Q = dino.sinkhorn_knopp(logits, 0.1, n_iterations=1000)
    _close(Q.sum(dim=1), torch.ones(B), atol=1e-6)
    _close(Q.sum(dim=0), torch.full((K,), B / K), atol=1e-4)


def test_sinkhorn_survives_what_overflows_a_naive_exp():
    torch.manual_seed(6)
    logits = torch.randn(8, 16)
    # Moderate scores: the shift changes nothing.
    _close(dino.sinkhorn_knopp(logits, 0.07), _naive_sinkhorn(logits, 0.07, 3, torch.float32),
           atol=1e-6)
    # Scores around 125 +- 40 (logits 5 +- 0.5 at tau 0.04): a float32 exp overflows (NaN),
    # float64 does not.
    big = 5 + 0.5 * logits
    assert torch.isnan(_naive_sinkhorn(big, 0.04, 3, torch.float32)).any()
    out = dino.sinkhorn_knopp(big, 0.04)
    assert torch.isfinite(out).all()
    _close(out, _naive_sinkhorn(big, 0.04, 3, torch.float64))   # fp32 rounding of scores ~125


# ----------------------------------------------------------------------------------------------
# KoLeo
# ----------------------------------------------------------------------------------------------

def test_koleo_matches_official(v2_ref):
    ref = v2_ref["koleo"]
    x = ref["input"].clone().requires_grad_(True)
    loss = dino.koleo_loss(x)
    loss.backward()
    _close(loss, ref["loss"], atol=LOSS_ATOL)
    _close(loss, ref["dinov3_KoLeoLoss_same_input"], atol=LOSS_ATOL)
    _close(x.grad, ref["grad_wrt_input"])
    _close(dino.koleo_loss(ref["input_with_duplicate_rows_0_1"]), ref["loss_with_duplicate"],
           atol=LOSS_ATOL)


def _koleo_brute_force(x):
    """Float64 loops with DINOv2's three eps (normalize, PairwiseDistance, log)."""
    eps, n, d = 1e-8, x.shape[0], x.shape[1]
    z = [[x[i, j].item() / max(math.sqrt(sum(x[i, k].item() ** 2 for k in range(d))), eps)
          for j in range(d)] for i in range(n)]
    total = 0.0
    for i in range(n):
        dots = [sum(a * b for a, b in zip(z[i], z[j])) if j != i else -math.inf
                for j in range(n)]
        nn_i = max(range(n), key=lambda j: dots[j])
        dist_i = math.sqrt(sum((z[i][k] - z[nn_i][k] + eps) ** 2 for k in range(d)))
        total -= math.log(dist_i + eps)
    return torch.tensor(total / n)


def test_koleo_equals_brute_force_with_every_eps():
    """A tiny row (norm 1e-10 < eps) and a duplicate pair exercise the eps."""
    torch.manual_seed(7)
    x = torch.randn(6, 5)
    x[1] = x[0]
    x[4] = x[4] / x[4].norm() * 1e-10
    _close(dino.koleo_loss(x), _koleo_brute_force(x), atol=LOSS_ATOL)


def test_koleo_runs_in_float32_under_autocast():
    """Two near neighbours of row 0 whose cosines (0.999, 0.9995) tie in bf16."""
    x = torch.zeros(8, 16)
    x[0, 0] = 1
    x[1, 0], x[1, 1] = 0.999, math.sqrt(1 - 0.999 ** 2)      # farther
    x[2, 0], x[2, 2] = 0.9995, math.sqrt(1 - 0.9995 ** 2)    # nearer
    for i in range(3, 8):
        x[i, i + 3] = 1
    expected = _koleo_brute_force(x)                    # row 0's neighbour is row 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = dino.koleo_loss(x)
    assert under.dtype == torch.float32
    _close(under, expected, atol=1e-5)
    xb = torch.randn(8, 16).bfloat16()
    out = dino.koleo_loss(xb)
    assert out.dtype == torch.float32
    _close(out, dino.koleo_loss(xb.float()), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Assembled losses (built here from the public pieces)
# ----------------------------------------------------------------------------------------------

def _crops(step, n_crops=4, n_global=2):
    return step["student_output"].chunk(n_crops), step["teacher_output"], n_global


def test_dino_v1_loss_two_consecutive_steps(v1_ref):
    """v1: skip same-view pairs (2 * ncrops - 2 terms); the centre is updated after the loss."""
    cfg = v1_ref["config"]
    ours = dino.DINOConfig(teacher_temp=cfg["teacher_temp"], warmup_teacher_temp=cfg["warmup_teacher_temp"],
                           warmup_teacher_temp_epochs=cfg["warmup_teacher_temp_epochs"])
    temps = torch.tensor([dino.teacher_temperature(ours, epoch, 1) for epoch in range(cfg["nepochs"])],
                         dtype=torch.float64)
    _close(temps, v1_ref["teacher_temp_schedule"], atol=1e-12)       # per epoch, as v1
    center = torch.zeros(1, cfg["out_dim"])
    for step in v1_ref["steps"]:
        tau_t = dino.teacher_temperature(ours, step["epoch"], 1)
        assert abs(tau_t - step["teacher_temp"]) < 1e-12
        _close(center, step["center_before"], atol=1e-7)
        student, teacher, n_global = _crops(step, cfg["ncrops"], cfg["n_global"])
        q = dino.centered_probs(teacher, center, tau_t).chunk(n_global)
        terms = [dino.cross_entropy(student[v], q[i], cfg["student_temp"])
                 for i in range(n_global) for v in range(cfg["ncrops"]) if v != i]
        assert len(terms) == 2 * cfg["ncrops"] - 2
        _close(sum(terms) / len(terms), step["loss"], atol=LOSS_ATOL)
        center = dino.update_center(center, teacher, cfg["center_momentum"])
        _close(center, step["center_after"], atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

def test_schedules_match_official(v2_ref):
    """The schedules the training path uses (train.py's lr and weight decay, dino.py's teacher
    momentum and temperature) against DINO v1's cosine_scheduler and DINOv2's CosineScheduler,
    5 epochs of 3 iterations."""
    import train
    ref, n = v2_ref["schedules"], 15
    wd = train.OptimConfig(weight_decay=0.04, weight_decay_end=0.4)
    _close([train.weight_decay(i, wd, n) for i in range(n)], ref["dino_v1_cosine_wd"])
    momentum = dino.DINOConfig(momentum_teacher=0.996)
    _close([dino.teacher_momentum(momentum, i, n) for i in range(n)], ref["dino_v1_cosine_momentum"])
    # DINOv2: the teacher temperature warms up linearly over its whole 6 iterations, then stays
    temp = dino.DINOConfig(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=6)
    _close([dino.teacher_temperature(temp, i, 1) for i in range(6)], ref["dinov2_teacher_temp"])
    assert dino.teacher_temperature(temp, 6, 1) == dino.teacher_temperature(temp, 10 ** 6, 1) == 0.07
    # lr: a cosine from 5e-4 to 1e-6 after a warmup of one epoch (3 iterations). NOTE: train.py's
    # warmup reaches the peak at iteration 3 (CanViT's linear warmup); v1's linspace at 2.
    lr = train.OptimConfig(lr=5e-4, init_lr=0.0, warmup_steps=3, schedule="cosine", min_lr=1e-6)
    _close([train.learning_rate(i, lr, n) for i in range(3, n)], ref["dino_v1_cosine_lr"][3:])
    _close([train.learning_rate(i, lr, n) for i in range(3, n)], ref["dinov2_CosineScheduler_lr"][3:])


# ----------------------------------------------------------------------------------------------
# 2 processes == 1
# ----------------------------------------------------------------------------------------------

def _two_process_data():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(12, 24, generator=g)
    logits[5:] = logits[5:] * 1.5 + 0.5    # the two ranks differ in scale, max and mean
    center = torch.randn(1, 24, generator=g)
    return logits, center


def _two_process_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        logits, center = _two_process_data()
        mine = logits[:5] if rank == 0 else logits[5:]     # unequal local batches: 5 and 7
        torch.save({"sk": dino.sinkhorn_knopp(mine, 0.1),
                    "center": dino.update_center(center, mine, 0.9)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_center_two_processes_equal_one(tmp_path):
    """Two gloo ranks holding 5 and 7 rows of one batch give the 1-process result on all 12."""
    # fork: the children need not import torch again (seconds each on a busy machine).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_two_process_worker, args=(str(tmp_path / "pg_init"), str(tmp_path)),
                       nprocs=2, join=True, start_method=method)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert not dist.is_initialized()
    logits, center = _two_process_data()
    _close(torch.cat([p["sk"] for p in parts]), dino.sinkhorn_knopp(logits, 0.1), atol=1e-6)
    whole = dino.update_center(center, logits, 0.9)
    for p in parts:
        _close(p["center"], whole, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The sequential-to-global objective [000, Sec. 3.1]
# ---------------------------------------------------------------------------------------------

def tiny_dino(**kw) -> dino.DINOConfig:
    model = fovea.FovealConfig(dim=32, depth=1, heads=2, num_state=3, patch_px=8, num_zoom=3, max_z=2.0,
                               grid=2, grid_z=(2.0, 2.5), z_max=4.5, head="none", num_classes=0,
                               layerscale=0.0, compile_extraction=False)
    base = dict(model=model, global_grid=4, local_grid=2, n_local=3, seq_steps=3, out_dim=16,
                hidden_dim=24, bottleneck_dim=8, warmup_teacher_temp_epochs=0)
    return dino.DINOConfig(**{**base, **kw})


def scenes(B=4, S=32, seed=0):
    return {"image": torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))}


def test_every_student_output_meets_every_teacher_output():
    """The loss equals DINO's cross-entropy summed over all 2 x (1 + L + T) pairs, recomputed
    from the views: the teacher's global and last sequential outputs (Sinkhorn-Knopp over the
    batch) against the student's global, local and every sequential output."""
    torch.manual_seed(0)
    cfg = tiny_dino(augment=False)
    obj = dino.DINOSequentialToGlobal(cfg, seed=3)
    with torch.no_grad():                                  # a teacher different from the student
        for p in obj.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = scenes()
    teacher_before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    out = obj.train_step(batch, step=5, run=LocalRun())
    obj.teacher.load_state_dict(teacher_before)                # as it was for the step's targets
    views = obj.draw_views(torch.Generator().manual_seed(3 * 1_000_003 + 5), 4, (32, 32), "cpu")["patches"]
    table = fovea.integral_image(batch["image"])
    t, s = obj.teacher, obj.model
    with torch.no_grad():
        tokens_t = [t.backbone(table, None, views["global_t"])[:, 0]]
        state = None
        for p in views["seq_t"]:
            state = t.backbone(table, state, p)
        tokens_t.append(state[:, 0])
        q = dino.sinkhorn_knopp(torch.cat([t.head(x) for x in tokens_t]), 0.07).view(2, 4, -1)
        outs = [s.head(s.backbone(table, None, views["global_s"])[:, 0])]
        local = s.backbone(table.select(torch.arange(4).repeat_interleave(3)), None, views["local"])[:, 0]
        outs += [s.head(local.view(4, 3, -1)[:, v]) for v in range(3)]
        state = None
        for p in views["seq_s"]:
            state = s.backbone(table, state, p)
            outs.append(s.head(state[:, 0]))
    terms = [dino.cross_entropy(o, q[i], 0.1) for o in outs for i in range(2)]
    assert len(terms) == 2 * (1 + 3 + 3)
    torch.testing.assert_close(out["dino_loss"], torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    # The throughput counts each view of each image once: the two global views, the teacher's
    # and the student's sequential glimpses, the local views.
    rows = lambda patches: patches.boxes.shape[0]
    n_views = rows(views["global_t"]) + rows(views["global_s"]) + rows(views["local"]) \
        + sum(map(rows, views["seq_t"])) + sum(map(rows, views["seq_s"]))
    assert out["glimpses"] == n_views == 4 * (2 + 3 + 2 * 3)


class _Held:
    """A saved tensor, counted while autograd keeps it (for a backward not yet run)."""
    live = peak = 0

    def __init__(self, t):
        self.t = t
        _Held.live += 1
        _Held.peak = max(_Held.peak, _Held.live)
        weakref.finalize(self, _Held._gone)

    @staticmethod
    def _gone():
        _Held.live -= 1


def test_no_gradient_crosses_glimpses_and_memory_does_not_grow_with_them():
    """Each glimpse's loss is backpropagated on its own: the tensors held for backward at any
    moment do not grow with the length of the sequential view (full BPTT would hold them all)."""
    peaks = {}
    for T in (2, 6):
        torch.manual_seed(0)
        obj = dino.DINOSequentialToGlobal(tiny_dino(seq_steps=T, n_local=1), seed=0)
        _Held.live = _Held.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(_Held, lambda h: h.t):
            obj.train_step(scenes(), step=0, run=LocalRun())
        peaks[T] = _Held.peak
    assert peaks[2] > 0 and peaks[6] == peaks[2]


def test_ema_teacher_after_the_update_and_the_frozen_prototypes():
    torch.manual_seed(0)
    cfg = tiny_dino(momentum_teacher=0.9, freeze_last_layer_epochs=1)
    obj = dino.DINOSequentialToGlobal(cfg, seed=0)
    opt = torch.optim.AdamW([p for p in obj.model.parameters() if p.requires_grad], lr=1e-2)
    run = LocalRun(opt)
    run.steps_per_epoch, run.schedule_steps = 10, 100
    teacher_before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    last_before = [p.clone() for p in obj.model.head.last_layer_parameters()]
    obj.train_step(scenes(), step=0, run=run)                 # epoch 0: prototypes frozen
    assert all(torch.equal(a, b) for a, b in zip(last_before, obj.model.head.last_layer_parameters()))
    m = dino.teacher_momentum(cfg, 0, 100)
    student = obj.model.state_dict()
    for k, v in obj.teacher.state_dict().items():              # teacher <- m teacher + (1 - m) student
        torch.testing.assert_close(v, m * teacher_before[k] + (1 - m) * student[k], rtol=1e-5, atol=1e-6)
    obj.train_step(scenes(), step=10, run=run)                 # epoch 1: they learn
    assert any(not torch.equal(a, b) for a, b in zip(last_before, obj.model.head.last_layer_parameters()))


def test_schedules_of_the_objective():
    cfg = dino.DINOConfig()
    assert dino.teacher_temperature(cfg, 0, 1251) == pytest.approx(0.04)
    assert dino.teacher_temperature(cfg, 30 * 1251 - 1, 1251) == pytest.approx(0.07)
    assert dino.teacher_temperature(cfg, 15 * 1251, 1251) == pytest.approx(0.055, abs=1e-4)
    assert dino.teacher_temperature(cfg, 40 * 1251, 1251) == pytest.approx(0.07)
    assert dino.teacher_momentum(cfg, 0, 1000) == pytest.approx(0.996)
    assert dino.teacher_momentum(cfg, 500, 1000) == pytest.approx(0.998)
    assert dino.teacher_momentum(cfg, 1000, 1000) == pytest.approx(1.0)


def test_a_flipped_view_is_the_view_of_the_flipped_image():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 40, 40, generator=gen)
    view = fovea.random_grid_crops(2, (40, 40), 4, (0.3, 0.6), torch.Generator().manual_seed(1))
    aug = dino.ViewAugment.draw(gen, 2, dino.Augment(flip=1.0, jitter=0, grey=0, blur=0, solarize=0))
    got = aug(fovea.box_patches(fovea.integral_image(img), aug.geometry(view, 40).boxes, 8, compiled=False))
    want = fovea.box_patches(fovea.integral_image(img.flip(-1)), view.boxes, 8, compiled=False)
    # the augmentation works in [0, 1] RGB of ImageNet-normalised pixels: compare in that space
    torch.testing.assert_close(got, ((want * torch.tensor(dino.IMAGENET_STD).view(3, 1, 1)
                                      + torch.tensor(dino.IMAGENET_MEAN).view(3, 1, 1)).clamp(0, 1)
                                     - torch.tensor(dino.IMAGENET_MEAN).view(3, 1, 1))
                               / torch.tensor(dino.IMAGENET_STD).view(3, 1, 1), rtol=1e-4, atol=1e-4)


def test_hue_shift_matches_colorsys_and_blur_a_direct_convolution():
    import colorsys
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 3, 4, 4, generator=gen)
    shifted = dino._shift_hue(x, torch.tensor(0.3).view(1, 1, 1, 1, 1))
    for i in range(4):
        for j in range(4):
            h, s, v = colorsys.rgb_to_hsv(*x[0, 0, :, i, j].tolist())
            want = colorsys.hsv_to_rgb((h + 0.3) % 1, s, v)
            torch.testing.assert_close(shifted[0, 0, :, i, j], torch.tensor(want), rtol=1e-4, atol=1e-5)
    patch = torch.rand(1, 1, 3, 8, 8, generator=gen)
    sigma = 1.3
    got = dino._blur(patch, torch.tensor([sigma]))[0, 0]
    t = torch.arange(9.0) - 4
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(k, k) / k.sum() ** 2                     # the 2-D kernel, independently
    padded = F.pad(patch[0, 0][None], (4, 4, 4, 4), mode="reflect")[0]
    want = torch.stack([torch.stack([torch.stack([(padded[c, i:i + 9, j:j + 9] * k2).sum() for j in range(8)])
                                     for i in range(8)]) for c in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dino._blur(patch, torch.tensor([0.0])), patch)   # sigma 0: untouched


def test_blur_on_small_patches_is_dinos_blur_relative_to_a_patch():
    """DINO blurs a crop cut into 16 px patches with sigma in pixels of that crop. The same view
    read at 8 px a patch must come out as DINO's blurred 16 px patches reduced to 8 px (2 x 2
    means): the blur's strength relative to a patch is DINO's, whatever patch size the model reads."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    f = torch.randn(3, 4, 4, generator=gen)
    img = sum(f[:, i, j, None, None] * torch.cos(6.28 * (i * yy + j * xx) + i) for i in range(4) for j in range(4))
    integral = fovea.integral_image((0.5 + 0.08 * img).clamp(0, 1)[None])      # a smooth scene
    view = fovea.random_grid_crops(1, (96, 96), 4, (0.5, 0.8), torch.Generator().manual_seed(1))
    p16 = fovea.box_patches(integral, view.boxes, 16, compiled=False)
    p8 = fovea.box_patches(integral, view.boxes, 8, compiled=False)            # = p16 in 2 x 2 means
    for sigma in (1.0, 2.0):                                                   # DINO's sigma, 16 px patches
        blur = dino.ViewAugment(torch.tensor([False]), torch.tensor([False]), torch.tensor([False]),
                                torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([sigma]))
        dinos = F.avg_pool2d(blur(p16).flatten(0, 2), 2).view_as(p8)
        effect = (p8 - dinos).abs().mean()                                     # what the blur changes
        assert (blur(p8) - dinos).abs().mean() < 0.5 * effect                  # unscaled sigma: 1.9-2.5 x


def test_collapse_statistics():
    K = 8
    uniform = torch.full((6, K), 1 / K)
    stats = dino.collapse_stats(torch.randn(6, K), uniform)
    assert stats["teacher_entropy"].item() == pytest.approx(math.log(K))
    one_hot = F.one_hot(torch.tensor([2, 2, 2, 2, 2, 2]), K).float()
    stats = dino.collapse_stats(one_hot * 10, one_hot)
    assert stats["teacher_entropy"].item() == pytest.approx(0, abs=1e-6) and stats["prototypes_used"] == 1


def test_stagnation_statistics_against_loops():
    """The log's stagnation signs, each against a direct loop over rows and pairs."""
    torch.manual_seed(0)
    B, K, F_ = 5, 7, 4
    logits, t, temp = torch.randn(B, K), torch.randn(B, F_), 0.04
    s = t + 0.3 * torch.randn(B, F_)
    s[3] = t[0]                                                  # image 3's view matches image 0
    stats = dino.collapse_stats(logits, F.softmax(logits, 1), temp, t, s)
    marginal = sum(F.softmax(logits[b] / temp, 0) for b in range(B)) / B
    assert stats["marginal_entropy"].item() == pytest.approx(-sum(p * math.log(p) for p in marginal.tolist()), rel=1e-5)
    spread = sum(statistics.stdev(logits[b].tolist()) for b in range(B)) / B
    assert stats["logit_spread"].item() == pytest.approx(spread, rel=1e-5)
    cos = [F.cosine_similarity(t[i], t[j], 0).item() for i in range(B) for j in range(B) if i != j]
    assert stats["feature_cos"].item() == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    nearest = [max(range(B), key=lambda j: F.cosine_similarity(s[i], t[j], 0).item()) for i in range(B)]
    assert nearest[3] == 0
    assert stats["view_match"].item() == pytest.approx(sum(n == i for i, n in enumerate(nearest)) / B)


def test_the_teachers_two_views_get_dinos_two_global_augmentations():
    """DINO's teacher sees two global crops, one always blurred, the other blurred 10% of the
    time and solarised 20%: the global view gets the first set, the sequential view the second."""
    obj = dino.DINOSequentialToGlobal(tiny_dino(), seed=0)
    augs = obj.draw_views(torch.Generator().manual_seed(0), 2000, (32, 32), "cpu")["augs"]
    blurred = lambda name: (augs[name].sigma > 0).float().mean().item()
    solarised = lambda name: augs[name].solarize.float().mean().item()
    assert blurred("global_t") == 1.0 and solarised("global_t") == 0.0
    assert blurred("seq_t") == pytest.approx(0.1, abs=0.02) and solarised("seq_t") == pytest.approx(0.2, abs=0.03)
    assert blurred("global_s") == pytest.approx(0.1, abs=0.02) and blurred("seq_s") == pytest.approx(0.5, abs=0.04)
