"""Tests of canvit.py: official tensors (reference/canvit, reference/dinov3), the paper's numbers
(App. G FLOPs, Table 3 parameters), policies against analytic distributions, precision, API."""
import json
import math
import sys

import pytest
import torch

import bench
import canvit
import fovea
from conftest import load_reference

ATOL = RTOL = 1e-5   # reference READMEs: an explicit softmax differs from SDPA by <= 2e-6


def tiny_config(**overrides) -> canvit.CanViTConfig:
    """The reference's tiny CanViT (every width differs): D 64, Dc 96, Dt 40, 4 blocks."""
    fields = dict(backbone=canvit.BackboneConfig(embed_dim=64, num_heads=2, n_blocks=4),
                  n_backbone_registers=2, n_canvas_registers=4, canvas_num_heads=2,
                  canvas_head_dim=48, rw_stride=1, teacher_dim=40)
    return canvit.CanViTConfig(**{**fields, **overrides})


def perturbed(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> torch.nn.Module:
    """Default init hides errors (LayerScale 1e-5, identity norms): add noise to every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def ref(reference_dir):
    return load_reference(reference_dir, "canvit/canvit_tiny_ref.pt")


@pytest.fixture(scope="module")
def dino_ref(reference_dir):
    return load_reference(reference_dir, "dinov3/dinov3_vits16_depth2_ref.pt")


def close(actual, expected, what):
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=ATOL, rtol=RTOL), f"{what}: max abs diff {diff}"
    return diff


def rollout_matches_reference(model, ref):
    """Step the model through the reference viewpoints; compare every stored tensor."""
    captured = {}

    def keep(name):
        return lambda module, inputs, output: captured.__setitem__(name, output)

    hooks = [model.backbone.patch_embed.register_forward_hook(keep("patch_embed")),
             model.vpe.register_forward_hook(keep("vpe_encoder"))]
    blocks = model.backbone.blocks
    hooks += [b.register_forward_hook(keep(f"block{i}")) for i, b in enumerate(blocks)]
    hooks += [m.register_forward_hook(keep(f"read{i}")) for i, m in enumerate(model.canvas_read)]
    hooks += [m.register_forward_hook(keep(f"write{i}")) for i, m in enumerate(model.canvas_write)]
    worst = 0.0
    with torch.no_grad():
        state = model.init_state(1, ref["canvas_grid"])
        preds = model.predict(state)
        for name, actual in [("canvas", state.canvas), ("recurrent_cls", state.recurrent_cls),
                             ("pred_scene_patches", preds.patches), ("pred_scene_cls", preds.cls)]:
            worst = max(worst, close(actual, ref["init"][name], f"init {name}"))
        for t, step in enumerate(ref["steps"]):
            center, scale = step["viewpoint_center_yx"], step["viewpoint_scale"]
            glimpse = fovea.bilinear_glimpse(ref["scene"], center, scale, ref["glimpse_px"])
            out = model(glimpse, state, center, scale)
            state = out.state
            preds = model.predict(state)
            actual = {"glimpse": glimpse, "canvas": state.canvas,
                      "canvas_spatial": state.canvas[:, model.cfg.n_canvas_registers:],
                      "recurrent_cls": state.recurrent_cls, "local_patches": out.local_patches,
                      "vpe_out": out.vpe, "pred_scene_patches": preds.patches,
                      "pred_scene_cls": preds.cls, **captured}
            for name in ["glimpse", "canvas", "canvas_spatial", "recurrent_cls", "local_patches",
                         "vpe_out", "pred_scene_patches", "pred_scene_cls"]:
                worst = max(worst, close(actual[name], step[name], f"step {t} {name}"))
            for name, expected in step["intermediates"].items():
                worst = max(worst, close(actual[name], expected, f"step {t} {name}"))
    for h in hooks:
        h.remove()
    return worst


# ----------------------------------------------------------------------------------------------
# Official CanViT: every tensor of the reference rollout
# ----------------------------------------------------------------------------------------------

def test_rollout_matches_official_v01(ref):
    model = canvit.from_official(ref["state_dict"], ref["model_config"], ref["backbone_kwargs"])
    assert (model.read_after_blocks, model.write_after_blocks) == (
        ref["read_after_blocks"], ref["write_after_blocks"])
    worst = rollout_matches_reference(model.eval(), ref)
    print(f"max abs diff over the reference rollout: {worst:.2e}")


def test_v02_keys_load_to_the_same_model(ref):
    mc = {**ref["model_config_v02"]}                  # no teacher_dim: read from the weights
    model = canvit.from_official(ref["state_dict_v02"], mc, ref["backbone_kwargs"])
    ours = model.state_dict()
    assert sorted(ours) == sorted(ref["state_dict"])
    assert all(torch.equal(ours[k], v) for k, v in ref["state_dict"].items())
    # our 0.2 -> 0.1 renaming inverts the official 0.1 -> 0.2 map, key by key
    mapped = canvit._v02_to_v01_keys({v2: ref["state_dict"][v1]
                                      for v1, v2 in ref["key_map_v01_to_v02"].items()})
    assert sorted(mapped) == sorted(ref["key_map_v01_to_v02"])


def test_sr_rope_tables_and_positions(ref):
    hd_backbone = ref["backbone_kwargs"]["embed_dim"] // ref["backbone_kwargs"]["num_heads"]
    hd_canvas = ref["model_config"]["canvas_head_dim"]
    base = ref["backbone_kwargs"]["rope_base"]
    grid = ref["glimpse_px"] // ref["backbone_kwargs"]["patch_size"]
    G = ref["canvas_grid"]
    for step in ref["steps"]:
        pos = canvit.glimpse_positions(step["viewpoint_center_yx"], step["viewpoint_scale"], grid)
        close(pos, step["local_positions_yx"], "glimpse positions")
        close(canvit.grid_centers(G, G)[None], step["canvas_positions_yx"], "canvas positions")
        for name, p, hd in [("rope_local_backbone", pos, hd_backbone),
                            ("rope_local_canvas", pos, hd_canvas),
                            ("rope_canvas", canvit.grid_centers(G, G)[None], hd_canvas)]:
            sin, cos = canvit.rope_tables(p, canvit.rope_periods(hd, base))
            close(sin, step[name]["sin"], name)
            close(cos, step[name]["cos"], name)


def test_rw_schedule_matches_official_table(ref):
    for key, (reads, writes) in ref["rw_schedule_table"].items():
        n_blocks, stride = map(int, key.split("_"))
        assert canvit.rw_schedule(n_blocks, stride) == (reads, writes), key
    assert canvit.rw_schedule(12, 2, enable_reads=False) == ((), (3, 7, 11))


def test_fresh_init_matches_official_init(ref):
    """Same construction order as the official code: after manual_seed(0) the same weights."""
    torch.manual_seed(0)
    model = canvit.CanViT(canvit.official_config(ref["model_config"], ref["backbone_kwargs"]))
    model.add_standardizers(ref["canvas_grid"])
    ours = model.state_dict()
    assert sorted(ours) == sorted(ref["state_dict_init"])
    # The same draws; the uniform -> erfinv (trunc-normal) and Box-Muller (randn) kernels round
    # by CPU kind: a few ulps apart between AVX2 and AVX-512, up to 1.3e-7 with torch's scalar
    # kernels (ATEN_CPU_CAPABILITY=default); another draw differs by the init's std (0.02-0.1).
    ulps = dict(rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)
    for k, v in ref["state_dict_init"].items():
        torch.testing.assert_close(ours[k], v, **ulps, msg=k)
    torch.testing.assert_close(canvit.VPE(64).B, ref["state_dict"]["vpe.B"], **ulps)   # the frozen RFF matrix


def test_key_bias_is_masked(ref):
    sd = dict(ref["state_dict"])
    sd["backbone.blocks.0.attn.qkv.bias"] = sd["backbone.blocks.0.attn.qkv.bias"].clone()
    sd["backbone.blocks.0.attn.qkv.bias"][64:128] += 10.0              # the key slice
    model = canvit.from_official(sd, ref["model_config"], ref["backbone_kwargs"]).eval()
    rollout_matches_reference(model, ref)


def write_hf_folder(path, ref, v02: bool):
    from safetensors.torch import save_file
    path.mkdir()
    if v02:
        config = {"canvit_config": {**ref["model_config_v02"], "backbone_name": "vits16"},
                  "teacher_dim": ref["model_config"]["teacher_dim"], "teacher_patch_grid": 8}
        sd = ref["state_dict_v02"]
    else:
        config = {"backbone_name": "vits16", "model_config": ref["model_config"],
                  "canvas_patch_grid_sizes": [8]}
        sd = ref["state_dict"]
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))


@pytest.mark.parametrize("v02", [False, True])
def test_hugging_face_folder(ref, tmp_path, monkeypatch, v02):
    pytest.importorskip("safetensors")
    write_hf_folder(tmp_path / "ckpt", ref, v02)
    with pytest.raises(ValueError, match="shape mismatches"):   # the folder names vits16
        canvit.load_hf_folder(tmp_path / "ckpt")
    monkeypatch.setattr(canvit, "backbone_config",              # ... make it name the tiny one
                        lambda name: canvit.BackboneConfig(**ref["backbone_kwargs"]))
    rollout_matches_reference(canvit.load_hf_folder(tmp_path / "ckpt").eval(), ref)


def test_missing_safetensors_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        canvit.load_hf_folder(tmp_path)


def test_strict_loading_names_every_problem(ref):
    sd = dict(ref["state_dict"])
    del sd["vpe.norm.bias"]
    sd["unexpected.weight"] = torch.zeros(1)
    sd["scene_cls_head.proj.bias"] = torch.zeros(41)
    with pytest.raises(ValueError) as e:
        canvit.from_official(sd, ref["model_config"], ref["backbone_kwargs"])
    for name in ["vpe.norm.bias", "unexpected.weight",
                 "scene_cls_head.proj.bias: checkpoint (41,)"]:
        assert name in str(e.value)
    for bad in [{"canvas_update_mode": "convex"}, {"canvas_proj_mode": "full"}, {"foo": 1}]:
        with pytest.raises(ValueError):
            canvit.from_official(ref["state_dict"], {**ref["model_config"], **bad},
                                 ref["backbone_kwargs"])
    with pytest.raises(ValueError, match="valid"):
        canvit.backbone_config("vit_huge")


# ----------------------------------------------------------------------------------------------
# Official DINOv3 ViT (the teacher)
# ----------------------------------------------------------------------------------------------

DINO_OUTPUTS = [("cls", "x_norm_clstoken"), ("registers", "x_storage_tokens"),
                ("patches", "x_norm_patchtokens"), ("prenorm", "x_prenorm")]


@pytest.mark.parametrize("stress", [False, True])
def test_dinov3_matches_official(dino_ref, stress):
    sd = {**dino_ref["state_dict"], **(dino_ref["stress_overrides"] if stress else {})}
    expected = dino_ref["stress_outputs" if stress else "outputs"]
    model = canvit.load_dinov3(sd).eval()
    assert sorted(model.state_dict()) == sorted(dino_ref["state_dict_keys"])
    with torch.no_grad():
        out = model(dino_ref["input"])
    for ours, theirs in DINO_OUTPUTS:
        close(out[ours], expected[theirs], f"DINOv3 {ours}")
    sin, cos = model.rope_embed(canvit.grid_centers(4, 4)[None])
    close(sin[0, 0], dino_ref["rope_4x4"]["sin"], "DINOv3 RoPE sin")
    close(cos[0, 0], dino_ref["rope_4x4"]["cos"], "DINOv3 RoPE cos")
    close(model.rope_embed.periods, dino_ref["rope_periods"], "RoPE periods")


def test_dinov3_loads_from_a_pth_path(dino_ref, tmp_path):
    torch.save(dino_ref["state_dict"], tmp_path / "dinov3_vits16_depth2.pth")
    model = canvit.load_dinov3(tmp_path / "dinov3_vits16_depth2.pth").eval()
    with torch.no_grad():
        close(model(dino_ref["input"])["cls"], dino_ref["outputs"]["x_norm_clstoken"], "cls")
    assert canvit.CanViTConfig(backbone={"embed_dim": 384, "num_heads": 6}).backbone == \
        canvit.BackboneConfig(embed_dim=384, num_heads=6)


def test_dinov3_non_square_uses_per_axis_coordinates(dino_ref):
    """DINOv3's 'separate' normalisation: y by the patch rows, x by the columns. An h x w
    image's tokens must equal the same image's run with RoPE tables built independently."""
    model = canvit.load_dinov3({**dino_ref["state_dict"], **dino_ref["stress_overrides"]}).eval()
    image = torch.randn(1, 3, 32, 80, generator=torch.Generator().manual_seed(0))
    ys, xs = (torch.arange(2) + 0.5) / 2 * 2 - 1, (torch.arange(5) + 0.5) / 5 * 2 - 1
    pos = torch.tensor([[y, x] for y in ys for x in xs])[None]
    periods = 100.0 ** (torch.arange(16) / 16)
    angles = torch.cat([2 * math.pi * pos[..., :1] / periods,               # y frequencies
                        2 * math.pi * pos[..., 1:] / periods], -1)          # then x
    expected_rope = (angles.tile(2).sin()[:, None], angles.tile(2).cos()[:, None])
    calls = []
    original = model.rope_embed.forward
    model.rope_embed.forward = lambda p: calls.append(p) or original(p)
    with torch.no_grad():
        out = model(image)
        close(calls[0], pos, "non-square RoPE positions")
        x = torch.cat([model.cls_token, model.storage_tokens, model.patch_embed(image)], 1)
        for block in model.blocks:
            x = block(x, expected_rope)
    close(out["prenorm"], x, "non-square DINOv3 tokens")
    assert out["patches"].shape == (1, 10, 384) and out["registers"].shape == (1, 4, 384)


@pytest.mark.parametrize("name,depth", [("vits16", 12), ("vitb16", 12), ("vitl16", 24)])
def test_dinov3_architecture_inferred_from_official_keys(name, depth):
    cfg = canvit.backbone_config(name)
    with torch.device("meta"):
        sd = canvit.DINOv3ViT(cfg).state_dict()
    assert {"blocks.0.attn.qkv.bias_mask", "rope_embed.periods", "mask_token"} <= set(sd)
    sd["rope_embed.periods"] = canvit.rope_periods(64, 100.0)
    got, n_storage = canvit.dinov3_config(sd)
    assert got == cfg and got.n_blocks == depth and n_storage == 4
    with pytest.raises(ValueError, match="SwiGLU"):
        canvit.dinov3_config({**sd, "blocks.0.mlp.w1.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------
# Step interface, canvas, standardizers, precision, compile
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return perturbed(canvit.CanViT(tiny_config())).eval()


def rollout(model, scene, policy="riid", T=4, G=8, seed=0, step=None):
    vps = canvit.policy_viewpoints(policy, T, scene.shape[0], torch.Generator().manual_seed(seed))
    state = model.init_state(scene.shape[0], G)
    step = model if step is None else step
    for t in range(T):
        glimpse = fovea.bilinear_glimpse(scene, vps.center_yx[t], vps.scale[t], 64)
        state = step(glimpse, state, vps.center_yx[t], vps.scale[t]).state
    return state


def test_step_interface_shapes_and_no_in_place_change(tiny):
    B, G = 3, 6
    state = tiny.init_state(B, G)
    assert state.canvas.shape == (B, 4 + G * G, 96) and state.recurrent_cls.shape == (B, 1, 64)
    spatial = state.canvas[:, 4:]
    assert torch.equal(spatial, tiny.canvas_spatial_init.expand(B, G * G, -1))  # one vector
    before = [t.clone() for t in state] + [p.detach().clone() for p in tiny.parameters()]
    scene = torch.randn(B, 3, 96, 128)
    vp = canvit.random_viewpoints(B, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny(fovea.bilinear_glimpse(scene, vp.center_yx, vp.scale, 64), state,
                   vp.center_yx, vp.scale)
    after = list(state) + [p.detach() for p in tiny.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert out.state.canvas.shape == state.canvas.shape and out.local_patches.shape == (B, 16, 64)
    assert out.vpe.shape == (B, 64)
    preds = tiny.predict(out.state)
    assert preds.patches.shape == (B, G * G, 40) and preds.cls.shape == (B, 40)
    with pytest.raises(ValueError, match="square"):
        tiny(torch.zeros(B, 3, 64, 48), state, vp.center_yx, vp.scale)


def test_standardizers_fit_set_and_destandardize(tiny):
    g = torch.Generator().manual_seed(3)
    cls = torch.randn(4096, 40, generator=g) * 3 + 1
    patches = torch.randn(4096, 16, 40, generator=g) * torch.rand(16, 40, generator=g) + 2
    model = canvit.CanViT(tiny_config())
    state = model.init_state(2, 4)
    with pytest.raises(KeyError):
        model.predict(state, destandardize=True)
    model.add_standardizers(4)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(state, destandardize=True)
    model.fit_standardizers(cls, patches)
    c_std, p_std = model.standardizers(4)
    close(p_std.mean, patches.double().mean(0).float(), "patch mean")
    close(p_std.var, patches.double().var(0, unbiased=False).float(), "patch var")
    z_cls, z_patches = model.standardize_targets(cls[:8], patches[:8])
    close(z_patches, (patches[:8] - p_std.mean) / (p_std.var + 1e-6).sqrt(), "z-scores")
    raw, back = model.predict(state), model.predict(state, destandardize=True)
    close(back.patches, raw.patches * (p_std.var + 1e-6).sqrt() + p_std.mean, "destandardize")
    close(back.cls, raw.cls * (c_std.var + 1e-6).sqrt() + c_std.mean, "destandardize CLS")
    # the standardizers travel with the state dict, per canvas grid, as scene_standardizers.<G>
    fresh = canvit.CanViT(tiny_config())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.standardizers(4)[1].mean, p_std.mean)
    assert "scene_standardizers.4.mean" in model.state_dict()
    model.set_standardizers(8, torch.zeros(1, 40), torch.ones(1, 40), torch.zeros(64, 40),
                            torch.ones(64, 40))
    assert model.standardizers(8)[1].fitted


def test_any_canvas_grid_at_run_time(tiny):
    scene = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for G in (1, 4, 16):
            assert rollout(tiny, scene, G=G, T=2).canvas.shape == (2, 4 + G * G, 96)


def test_bf16_autocast_rollout_stays_close_to_float32(tiny):
    """App. D.3: canvas, coordinates, RoPE and VPE stay float32 under bf16 autocast. Over a
    5-glimpse rollout of a (noisy, so not trivially small) model, predictions and canvas stay
    within 2% relative (Frobenius) error of the float32 rollout (measured: about 0.5%)."""
    scene = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_state = rollout(tiny, scene, T=5)
        with torch.autocast("cpu", torch.bfloat16):
            state = rollout(tiny, scene, T=5)
            assert state.canvas.dtype == torch.float32
            vp = canvit.random_viewpoints(2)
            assert tiny.vpe(vp.center_yx, vp.scale).dtype == torch.float32
            assert tiny.canvas_rope(canvit.grid_centers(4, 4)[None])[0].dtype == torch.float32
        ref_preds, preds = tiny.predict(ref_state), tiny.predict(state)
    for name, a, b in [("canvas", state.canvas, ref_state.canvas),
                       ("patch predictions", preds.patches, ref_preds.patches),
                       ("CLS predictions", preds.cls, ref_preds.cls)]:
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 0.02, f"{name}: relative error {rel:.3f} under bf16 autocast"


def test_compiles_without_graph_breaks(tiny):
    scene = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    step = torch.compile(tiny, backend="eager", fullgraph=True)   # fails on any graph break
    with torch.no_grad():
        close(rollout(tiny, scene, T=2, step=step).canvas, rollout(tiny, scene, T=2).canvas,
              "compiled vs eager")


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = perturbed(canvit.CanViT(tiny_config()))
    scene = torch.randn(2, 3, 128, 128)
    state = rollout(model, scene, T=2)
    preds = model.predict(state)
    (preds.patches.square().mean() + preds.cls.square().mean()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


# ----------------------------------------------------------------------------------------------
# App. F.1: policies
# ----------------------------------------------------------------------------------------------

def crops_inside(vp) -> bool:
    return bool((vp.center_yx.abs() + vp.scale[..., None] <= 1 + 1e-6).all())


def test_random_viewpoints_scale_density_and_centres():
    """p(s) proportional to 1 - s on [0.05, 1]: CDF F(s) = 1 - (1 - s)^2 / 0.95^2. KS test at
    the 0.1% level; the centre divided by 1 - s is uniform on [-1, 1]."""
    n = 20000
    vp = canvit.random_viewpoints(n, torch.Generator().manual_seed(0))
    assert crops_inside(vp) and vp.scale.min() >= 0.05 and vp.scale.max() <= 1
    crit = 1.95 / math.sqrt(n)
    s = vp.scale.double().sort().values
    cdf = 1 - (1 - s) ** 2 / 0.95 ** 2
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (ecdf - cdf).abs().max() < crit
    u = (vp.center_yx[:, 0] / (1 - vp.scale)).double().sort().values
    assert (ecdf - (u + 1) / 2).abs().max() < crit
    again = canvit.random_viewpoints(n, torch.Generator().manual_seed(0))
    assert torch.equal(again.scale, vp.scale)                        # seeded


def test_quadtree_policies_cover_each_level():
    T, B = 21, 5                                                       # levels 0, 1, 2: 1 + 4 + 16
    c2f = canvit.policy_viewpoints("c2f", T, B, torch.Generator().manual_seed(0))
    f2c = canvit.policy_viewpoints("f2c", T, B, torch.Generator().manual_seed(1))
    for vp, spans in [(c2f, [(0, 1), (1, 5), (5, 21)]), (f2c, [(20, 21), (16, 20), (0, 16)])]:
        assert crops_inside(vp)
        for level, (a, b) in enumerate(spans):
            tiles = canvit.quadtree_level(level)
            assert torch.all(vp.scale[a:b] == 2.0 ** -level)
            for i in range(B):   # each tile of the level exactly once per scene: a tiling
                got = sorted(map(tuple, vp.center_yx[a:b, i].tolist()))
                assert got == sorted(map(tuple, tiles.center_yx.tolist()))
    orders = {tuple(map(tuple, c2f.center_yx[5:21, i].tolist())) for i in range(B)}
    assert len(orders) == B                                            # shuffled per scene
    assert canvit.policy_viewpoints("c2f", 3, 2).scale.tolist() == [[1, 1], [0.5, 0.5], [0.5, 0.5]]


def test_fiid_full_and_unknown_policy():
    fiid = canvit.policy_viewpoints("fiid", 6, 4, torch.Generator().manual_seed(0))
    assert torch.all(fiid.scale[0] == 1) and torch.all(fiid.center_yx[0] == 0)
    assert crops_inside(fiid) and fiid.scale[1:].lt(1).all()
    full = canvit.policy_viewpoints("full", 3, 2)
    assert torch.all(full.scale == 1) and torch.all(full.center_yx == 0)
    with pytest.raises(ValueError, match="valid"):
        canvit.policy_viewpoints("zigzag", 3, 2)


def test_entropy_guided_c2f_visits_uncertain_tiles_first():
    G, T = 8, 21
    entropy = torch.rand(2, G, G, generator=torch.Generator().manual_seed(0))
    entropy[0, :4, 4:] += 10                  # scene 0: top-right quadrant most uncertain
    entropy[1, 4:, :4] += 10                  # scene 1: bottom-left
    policy = canvit.EntropyGuidedC2F(T, G)
    vps = [policy.step(entropy) for _ in range(T)]
    assert torch.all(vps[0].scale == 1)
    assert vps[1].center_yx.tolist() == [[-0.5, 0.5], [0.5, -0.5]]
    # within level 1 then level 2, tiles come in decreasing mean entropy, each once
    for a, b, n in [(1, 5, 2), (5, 21, 4)]:
        for i in range(2):
            tile_h = entropy[i].view(n, G // n, n, G // n).mean((1, 3))
            centres = [((vp.center_yx[i] + 1) / 2 * n - 0.5).round().long() for vp in vps[a:b]]
            seq = [tile_h[r, c].item() for r, c in centres]
            assert seq == sorted(seq, reverse=True)
            assert len({tuple(c.tolist()) for c in centres}) == n * n
    with pytest.raises(RuntimeError):
        policy.step(entropy)
    h = canvit.predictive_entropy(torch.zeros(1, 150, 2, 2))
    close(h, torch.full((1, 2, 2), math.log(150)), "uniform entropy")


# ----------------------------------------------------------------------------------------------
# App. G FLOPs and Table 3 parameters
# ----------------------------------------------------------------------------------------------

def gflops(model, **kw) -> float:
    return bench.count_flops(model, **kw)["total"] / 1e9


def test_table10_canvit_b_breakdown():
    f = bench.count_flops(canvit.CanViTConfig(), glimpse_grid=8, canvas_grid=32, seg_classes=150)
    assert [round(f[k] / 1e9, 1) for k in ["backbone", "reads", "writes", "seg", "total"]] == [
        12.3, 1.6, 1.6, 0.3, 15.9]
    assert round(f["read_each"] / 1e9, 1) == round(f["write_each"] / 1e9, 1) == 0.5


def test_table5_and_table16_gflops():
    canvit_b = canvit.CanViTConfig()
    assert [round(gflops(canvit_b, canvas_grid=G, seg_classes=150), 2) for G in (8, 16, 32, 64)] \
        == [13.84, 14.25, 15.86, 22.34]
    vits, vitb = canvit.backbone_config("vits16"), canvit.backbone_config("vitb16")
    rows = [(vits, 128, 3.06), (vits, 192, 6.83), (vits, 256, 12.51), (vits, 512, 63.9),
            (vitb, 128, 11.98), (vitb, 144, 14.99), (vitb, 160, 18.38), (vitb, 192, 26.32),
            (vitb, 512, 215.21)]
    for cfg, px, paper in rows:
        assert round(gflops(cfg, image_hw=(px, px)), 2) == paper, (cfg.embed_dim, px)
    assert round(gflops(vitb, image_hw=(512, 512)), 1) == 215.2                  # Table 16


def test_table3_params_and_gflops():
    """Table 3: parameters without the pretraining heads, GFLOPs without a segmentation head."""
    rows = [(canvit.CanViTConfig(), 95.2, 15.5),
            (canvit.CanViTConfig(canvas_num_heads=2), 88.1, 13.1),               # a
            (canvit.CanViTConfig(enable_reads=False), 90.4, 13.9),               # d
            (canvit.CanViTConfig(rw_stride=6), 88.8, 13.4),                      # e
            (canvit.CanViTConfig(backbone=canvit.backbone_config("vits16")), 26.4, 5.7),  # j
            (canvit.CanViTConfig(enable_vpe=False), 95.2, 15.3)]                 # k
    for cfg, params, gf in rows:
        with torch.device("meta"):
            model = canvit.CanViT(cfg)
        assert round(bench.count_params(model, readout_heads=False) / 1e6, 1) == params
        assert round(gflops(cfg), 1) == gf


def test_matmul_flops_match_torch_flop_counter(tiny, dino_ref):
    """The matrix-product part of App. G's count equals torch's count on the real modules.
    The math SDPA backend runs attention as batched matmuls, which the counter sees (it does
    not know the fused CPU kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    B, G = 2, 8
    state = tiny.init_state(B, G)
    vp = canvit.random_viewpoints(B)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        tiny(torch.randn(B, 3, 64, 64), state, vp.center_yx, vp.scale)
    expected = bench.count_flops(tiny, glimpse_grid=4, canvas_grid=G, matmul_only=True)
    assert counter.get_total_flops() == B * expected["total"]
    teacher = canvit.load_dinov3(dino_ref["state_dict"])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        teacher(torch.randn(1, 3, 48, 80))
    assert counter.get_total_flops() == bench.count_flops(teacher, image_hw=(48, 80),
                                                           matmul_only=True)["total"]
