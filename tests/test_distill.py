"""distill.py: rollouts, truncated BPTT, the loss, standardization, teacher-feature shards."""
import math
import weakref

import pytest
import torch

import canvit
import config
import data
import distill
import fovea
from conftest import LocalRun

TINY = distill.DistillConfig(
    model=canvit.CanViTConfig(backbone=canvit.BackboneConfig(embed_dim=32, num_heads=1, n_blocks=2),
                              n_backbone_registers=1, n_canvas_registers=2, canvas_num_heads=1,
                              canvas_head_dim=32, rw_stride=1, teacher_dim=64),
    teacher=distill.TeacherConfig(backbone=canvit.BackboneConfig(embed_dim=64, num_heads=1, n_blocks=1)),
    glimpse_px=32, n_stats=16)


def tiny_objective(**changes) -> distill.Distillation:
    torch.manual_seed(0)
    cfg = distill.DistillConfig(**{**TINY.__dict__, **changes})
    return distill.Distillation(cfg, seed=1)


def scenes(n: int = 4, size: int = 64) -> dict:
    ds = data.SyntheticScenes(n, size)
    return data.collate([ds[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Sec. 5.2: rollout lengths and viewpoints
# ---------------------------------------------------------------------------------------------

def test_rollout_lengths_follow_the_geometric_law():
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.tensor([distill.num_chunks(gen, 0.5, 64) for _ in range(n)])
    assert counts.min() == 1
    assert abs(counts.double().mean().item() - 2.0) < 0.05          # mean 1 / p_stop chunks: T = 4
    for k in range(1, 6):                                             # P(k) = (1 - p)^(k - 1) p
        expect = 0.5 ** k
        assert abs((counts == k).double().mean().item() - expect) < 4 * math.sqrt(expect * (1 - expect) / n)
    capped = [distill.num_chunks(gen, 0.01, 3) for _ in range(200)]
    assert max(capped) == 3


def test_rollout_viewpoints():
    gen = torch.Generator().manual_seed(1)
    T, B = 6, 3000
    vp = distill.rollout_viewpoints(gen, T, B, n_fiid=1, n_riid=1, min_scale=0.05)
    assert vp.center_yx.shape == (T, 2 * B, 2) and vp.scale.shape == (T, 2 * B)
    assert (vp.scale[0, :B] == 1).all() and (vp.center_yx[0, :B] == 0).all()   # F-IID starts full
    rest = torch.cat([vp.scale[0, B:], vp.scale[1:].reshape(-1)])
    assert (vp.center_yx.abs() <= 1 - vp.scale[..., None] + 1e-6).all()          # crops inside
    # p(s) proportional to 1 - s on [0.05, 1]: CDF F(s) = 1 - ((1 - s) / 0.95)^2 (KS distance).
    s = rest.sort().values.double()
    cdf = 1 - ((1 - s) / 0.95) ** 2
    ks = (cdf - torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)).abs().max()
    assert s.min() >= 0.05 and ks < 1.63 / math.sqrt(len(s))                   # 1% level


# ---------------------------------------------------------------------------------------------
# Truncated BPTT
# ---------------------------------------------------------------------------------------------

def record_states(obj, monkeypatch) -> list:
    """Wrap CanViT.forward to record the state each glimpse receives."""
    seen, forward = [], type(obj.model).forward

    def spy(self, glimpse, state, center_yx, scale):
        seen.append(state)
        return forward(self, glimpse, state, center_yx, scale)
    monkeypatch.setattr(type(obj.model), "forward", spy)
    return seen


def test_no_gradient_crosses_a_chunk_boundary(monkeypatch):
    obj = tiny_objective(p_stop=1e-9, max_chunks=3, chunk=2)          # always 3 chunks: T = 6
    batch = scenes()
    obj.setup(data.SyntheticScenes(16, 64))
    seen = record_states(obj, monkeypatch)
    out = obj.train_step(batch, step=0, run=LocalRun())
    assert out["rollout_len"] == 6 and len(seen) == 6
    for t, state in enumerate(seen):
        if t in (2, 4):  # chunk starts: the state is cut from the previous chunk's graph
            assert not state.canvas.requires_grad and not state.recurrent_cls.requires_grad
        else:            # t = 0 (learned initial canvas) and within a chunk: the gradient flows
            assert state.canvas.requires_grad and state.canvas.grad_fn is not None
    assert all(p.grad is not None for p in obj.model.parameters() if p.requires_grad)


def saved_at_each_backward(fn) -> list[tuple[int, int]]:
    """Run fn() under the public torch.autograd.graph.saved_tensors_hooks; for each backward
    pass, (tensors, bytes) saved for backward and still alive when it starts (at its first
    unpack): the pack hook counts a saved tensor in, a weakref finalizer on what it packed
    counts it out when autograd releases it (after the backward that used it)."""
    live, at_backward, packing = [0, 0], [], [False]

    class Box:
        def __init__(self, t):
            self.t = t

    def release(nbytes):
        live[0], live[1] = live[0] - 1, live[1] - nbytes

    def pack(t):
        box, nbytes = Box(t), t.numel() * t.element_size()
        live[0], live[1], packing[0] = live[0] + 1, live[1] + nbytes, True
        weakref.finalize(box, release, nbytes)
        return box

    def unpack(box):
        if packing[0]:                       # the first unpack after a forward: a backward starts
            at_backward.append(tuple(live))
            packing[0] = False
        return box.t
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fn()
    return at_backward


def test_memory_does_not_grow_with_the_rollout_length():
    """The tensors autograd keeps at each chunk's backward are as many (and as large) in chunk 1
    as in chunk 8."""
    obj = tiny_objective(p_stop=1e-9, max_chunks=8, chunk=2)
    obj.setup(data.SyntheticScenes(16, 64))
    batch = scenes()
    at_backward = saved_at_each_backward(lambda: obj.train_step(batch, step=0, run=LocalRun()))
    assert len(at_backward) == 8 and at_backward[0][0] > 0
    assert max(at_backward) == min(at_backward)


# ---------------------------------------------------------------------------------------------
# The loss and standardization
# ---------------------------------------------------------------------------------------------

def test_loss_is_the_official_mean_squared_error():
    gen = torch.Generator().manual_seed(2)
    pred = canvit.Predictions(torch.randn(3, 8, generator=gen), torch.randn(3, 16, 8, generator=gen))
    cls_t, patch_t = torch.randn(3, 8, generator=gen), torch.randn(3, 16, 8, generator=gen)
    patch, cls = distill.reconstruction_loss(pred, cls_t, patch_t)
    assert patch.item() == pytest.approx(((pred.patches - patch_t) ** 2).sum().item() / (3 * 16 * 8))
    assert cls.item() == pytest.approx(((pred.cls - cls_t) ** 2).sum().item() / (3 * 8))
    zero = distill.reconstruction_loss(canvit.Predictions(cls_t, patch_t), cls_t, patch_t)
    assert zero[0] == 0 and zero[1] == 0


def test_setup_standardizes_the_teacher_per_position():
    obj = tiny_objective(n_stats=48)
    ds = data.SyntheticScenes(48, 64)
    obj.setup(ds)
    batch = data.collate([ds[i] for i in range(48)])
    cls, patches = obj.model.standardize_targets(*distill.teacher_features(obj.teacher, batch["image"]))
    assert patches.shape == (48, 16, 64)
    torch.testing.assert_close(patches.mean(0), torch.zeros(16, 64), atol=1e-4, rtol=0)
    torch.testing.assert_close(patches.var(0, unbiased=False), torch.ones(16, 64), atol=1e-3, rtol=0)
    # and destandardization inverts it exactly
    cls_std, patch_std = obj.model.standardizers(4)
    raw = distill.teacher_features(obj.teacher, batch["image"])[1]
    torch.testing.assert_close(patch_std.destandardize(patch_std.standardize(raw)), raw, atol=1e-5, rtol=1e-6)


def test_a_training_step_lowers_the_loss_on_a_fixed_batch():
    obj = tiny_objective(p_stop=1.0)                                 # T = 2
    obj.setup(data.SyntheticScenes(16, 64))
    batch = scenes(8)
    opt = torch.optim.AdamW(obj.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        losses.append(obj.train_step(batch, step=0, run=LocalRun(opt))["loss"].item())
    assert losses[-1] < 0.8 * losses[0]


def test_integral_glimpses_train_too():
    obj = tiny_objective(glimpse_method="integral", p_stop=1.0)
    obj.setup(data.SyntheticScenes(16, 64))
    out = obj.train_step(scenes(), step=0, run=LocalRun())
    assert math.isfinite(out["loss"].item())


def test_teacher_size_must_match_the_student_head():
    with pytest.raises(ValueError, match="teacher is 64 wide"):
        tiny_objective(model=canvit.CanViTConfig(**{**TINY.model.__dict__, "teacher_dim": 32}))


# ---------------------------------------------------------------------------------------------
# App. D.2: feature shards
# ---------------------------------------------------------------------------------------------

def test_shards_round_trip(tmp_path):
    torch.manual_seed(0)
    teacher = distill.make_teacher(TINY.teacher)
    ds = data.SyntheticScenes(10, 64)
    folder = tmp_path / "features"
    written = [distill.export_features(teacher, ds, folder, shard_size=4, seed=7, rank=r, world=2,
                                       batch_size=3, num_workers=0, collate=data.collate) for r in range(2)]
    assert written == [[0, 2], [1]]
    distill.write_index(folder, 3, {"dataset_len": 10, "shard_size": 4})
    feats = distill.TeacherFeatures(folder, ds)
    assert len(feats) == 10 and feats.counts == [4, 4, 2]
    seen = []
    for p in range(10):
        item = feats[p]
        seen.append(item["index"])
        want = teacher(ds[item["index"]]["image"][None])                 # recomputed independently
        assert item["teacher_cls"].dtype == torch.float16
        torch.testing.assert_close(item["teacher_cls"].float(), want["cls"][0], atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(item["teacher_patches"].float(), want["patches"][0], atol=2e-2, rtol=1e-2)
        assert torch.equal(item["image"], ds[item["index"]]["image"])
    assert sorted(seen) == list(range(10)) and seen != list(range(10))   # all, once, shuffled
    # An interrupted export resumes: existing shards are kept.
    assert distill.export_features(teacher, ds, folder, shard_size=4, seed=7, num_workers=0,
                                   collate=data.collate) == []
    with pytest.raises(ValueError, match="exported for 10 scenes"):
        distill.TeacherFeatures(folder, data.SyntheticScenes(11, 64))


def test_shard_sampler_gives_each_process_its_shards():
    counts = [4, 4, 4, 4, 2]
    samplers = [distill.ShardSampler(counts, 4, r, 2, seed=0) for r in range(2)]
    orders = [list(s) for s in samplers]
    assert len(orders[0]) == len(orders[1]) == 8 and not set(orders[0]) & set(orders[1])
    assert {p // 4 for p in orders[0]} == {0, 2} and {p // 4 for p in orders[1]} == {1, 3}
    assert orders[0][:4] in ([0, 1, 2, 3], [8, 9, 10, 11])               # a shard is read in order
    samplers[0].skip = 5
    assert list(samplers[0]) == orders[0][5:]


def test_a_vit_sup_checkpoint_serves_as_teacher(tmp_path):
    import train
    cfg = train.TrainConfig()
    config.apply_overrides(cfg, {"objective": "vit_sup", "vit": {
        "backbone": {"embed_dim": 32, "num_heads": 1, "n_blocks": 1, "patch_size": 8}, "num_classes": 5}})
    torch.manual_seed(0)
    objective = train.build_objective(cfg)
    classifier = objective.model
    torch.save(train.checkpoint(cfg, objective, step=1), tmp_path / "vit.pt")
    teacher = distill.make_teacher(distill.TeacherConfig(weights=str(tmp_path / "vit.pt")))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images)["cls"], classifier.vit(images)["cls"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(fovea.CheckpointError, match="not a file"):
        distill.make_teacher(distill.TeacherConfig(weights=str(tmp_path / "missing.pth")))
