"""eval.py: its config (train.py's system), the command line's errors, and the foveal ViT's
protocol (per-step accuracy, ViT mode, k-NN, resolutions, baselines, learned policies)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import data
import eval as ev
import fovea
import grpo
import train
from conftest import ROOT


def test_config_file_then_overrides(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("n_val: 12\npolicies: [c2f, riid]\nres_factors: [1, 2]\n")
    cfg = ev.parse_args(["--cfg", str(p), "--ckpt", "c.pt", "--out_dir", "o", "--n_val=20",
                         "--res_factors", "1,4", "--baseline", "b.pt"])
    assert (cfg.n_val, cfg.policies, cfg.res_factors, cfg.baseline) == (20, ("c2f", "riid"), (1, 4), "b.pt")
    assert ev.EvalConfig().n_val == 256                                # defaults untouched


@pytest.mark.parametrize("args,message", [
    (["--out_dir", "o"], "--ckpt is required"),
    (["--ckpt", "c", "--out_dir", "o", "--n_vall=3"], "unknown config key 'n_vall'"),
    (["--ckpt", "c", "--out_dir", "o", "--n_val=0"], "n_val: must be >= 1"),
    (["--ckpt", "c", "--out_dir", "o", "--res_factors=1,x"], "res_factors: expected int"),
])
def test_bad_options_fail_with_a_clear_message(args, message):
    with pytest.raises(ev.EvalError, match=message):
        ev.parse_args(args)


def test_command_line_errors_are_messages_not_tracebacks(tmp_path):
    """Errors raised inside a protocol module reach the command line as one message: `cli` is
    what `python eval.py` runs (checked once in a subprocess)."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "cannot be read" in ev.cli(["--ckpt", str(bad), "--out_dir", str(tmp_path / "o")])
    assert "not found" in ev.cli(["--ckpt", str(tmp_path / "none.pt"), "--out_dir", str(tmp_path / "o")])
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(bad), "--out_dir",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "cannot be read" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_topk_hits_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 7, generator=gen), torch.randint(0, 7, (50,), generator=gen)
    for k in (1, 3, 7, 9):
        want = [float(labels[i].item() in sorted(range(7), key=lambda c: -logits[i, c].item())[:k])
                for i in range(50)]
        assert ev.hits(logits, labels, k).tolist() == want


# ---------------------------------------------------------------------------------------------
# The foveal iterative ViT [002, 000]
# ---------------------------------------------------------------------------------------------

FOVEAL = {"objective": "foveal_sup", "seed": 0, "dtype": "float32",
          "data": {"dataset": "synthetic", "image_size": 32, "length": 64, "val_length": 12},
          "foveal": {"steps": 3, "model": {"dim": 32, "depth": 1, "heads": 2, "num_state": 2, "patch_px": 8,
                                           "num_zoom": 3, "max_z": 2.0, "grid": 2, "grid_z": [2.0, 2.5],
                                           "num_classes": 10, "layerscale": 0.0}}}
VIT = {"objective": "vit_sup", "seed": 0, "dtype": "float32", "data": FOVEAL["data"],
       "vit": {"backbone": {"embed_dim": 32, "num_heads": 1, "n_blocks": 1, "patch_size": 8},
               "n_storage_tokens": 0, "num_classes": 10}}


def save_checkpoint(path, overrides: dict, objective):
    cfg = train.TrainConfig()
    config.apply_overrides(cfg, overrides)
    torch.manual_seed(0)
    obj = train.build_objective(cfg)
    torch.save(train.checkpoint(cfg, obj, step=3), path)
    return path


@pytest.fixture(scope="module")
def foveal_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("foveal")
    return save_checkpoint(d / "foveal.pt", FOVEAL, "foveal_sup"), save_checkpoint(d / "vit.pt", VIT, "vit_sup")


def test_foveal_evaluation(foveal_ckpts, tmp_path):
    fov, vit = foveal_ckpts
    args = ["--ckpt", str(fov), "--baseline", str(vit), "--n_val", "12", "--batch_size", "5",
            "--repeats", "2", "--res_factors", "1,2"]
    res = ev.main([*args, "--out_dir", str(tmp_path / "a")])
    r1 = res["resolution"]["1x"]
    assert res["steps"] == 3 and res["vit_grid"] == 4 and r1["n"] == 12 and res["frozen_weights_unchanged"]
    assert (tmp_path / "a" / "results.json").is_file() and "passive ViT baseline" in (tmp_path / "a" / "tables.md").read_text()
    from PIL import Image                                # the gazes of an episode over 3 scenes
    picture = Image.open(res["pictures"][0])
    assert res["pictures"][0].endswith("gazes.png") and picture.size == (2 * 192, 3 * 192 + 16)
    # Step 1 with random gazes, recomputed independently: the same generator draws, one batch at a time.
    model = ev.load_foveal(torch.load(fov, weights_only=False))
    ds = data.SyntheticScenes(12, 32, split="val")
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    gen, correct = torch.Generator().manual_seed(0), 0.0
    for i in range(0, 12, 5):
        batch = data.collate([ds[j] for j in order[i:i + 5]])
        for _ in range(2):
            gazes = torch.rand(3, len(batch["label"]), 2, generator=gen) * 2 - 1
            zs = 2.0 + 0.5 * torch.rand(3, len(batch["label"]), generator=gen)
            table = fovea.integral_image(batch["image"])
            with torch.no_grad():                                   # the step interface, directly
                state = model.step(table, None, gazes[0], zs[0])
                correct += (model.classify(state).argmax(-1) == batch["label"]).sum().item() / 2
    assert r1["random"]["top1"][0] == pytest.approx(100 * correct / 12, abs=0.01)
    # The seed draws the random gazes (recomputed above from it) and nothing else.
    other = ev.main([*args[:-2], "--res_factors", "1", "--out_dir", str(tmp_path / "c"), "--seed", "1",
                     "--knn", "true", "--n_train", "10"])
    o1 = other["resolution"]["1x"]
    assert o1["fixed"] == r1["fixed"] and o1["vit_mode"] == r1["vit_mode"] and o1["random"] != r1["random"]
    assert "knn" not in res and set(other["knn"]["object_share"]) == {"vit", "random", "target"}


def test_shuffled_vit_evaluation(tmp_path):
    """[002] Sec. 6.1: evaluated on the ViT grid shuffled into groups, as trained."""
    cfg = {**FOVEAL, "foveal": {**FOVEAL["foveal"], "glimpse": "shuffled_vit", "vit_grid": 4, "steps": 4}}
    path = save_checkpoint(tmp_path / "shuffled.pt", cfg, "foveal_sup")
    res = ev.main(["--ckpt", str(path), "--out_dir", str(tmp_path / "o"), "--n_val", "6", "--repeats", "1",
                   "--res_factors", "1"])
    assert res["glimpse"] == "shuffled_vit" and len(res["resolution"]["1x"]["random"]["top1"]) == 4
    model = ev.load_foveal(torch.load(path, weights_only=False))
    tcfg = fovea.FovealTrainConfig(model=model.cfg, steps=4, glimpse="shuffled_vit", vit_grid=4)
    groups = fovea.episode_patches(model, tcfg, torch.Generator().manual_seed(0), 2, (32, 32), "cpu")
    boxes = torch.cat([g.boxes for g in groups], 1)                 # every grid patch exactly once
    assert sorted(map(tuple, boxes[0].tolist())) == sorted(map(tuple, fovea.vit_grid(1, (32, 32), 4).boxes[0].tolist()))
    with pytest.raises(ev.EvalError, match="do not split into 3 groups"):
        ev.main(["--ckpt", str(path), "--out_dir", str(tmp_path / "o"), "--T", "3"])


def test_foveal_evaluation_rejects_a_wrong_baseline(foveal_ckpts, tmp_path):
    with pytest.raises(ev.EvalError, match="objective 'foveal_sup', not vit_sup"):
        ev.main(["--ckpt", str(foveal_ckpts[0]), "--baseline", str(foveal_ckpts[0]), "--out_dir", str(tmp_path)])


def test_knn_matches_a_brute_force_vote():
    gen = torch.Generator().manual_seed(0)
    train_f = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
    test_f = torch.nn.functional.normalize(torch.randn(10, 8, generator=gen), dim=1)
    train_y, test_y = torch.randint(0, 3, (30,), generator=gen), torch.randint(0, 3, (10,), generator=gen)
    right = 0
    for i in range(10):                                     # one test feature at a time
        sims = sorted(((float(test_f[i] @ train_f[j]), int(train_y[j])) for j in range(30)), reverse=True)[:5]
        votes = [sum(math.exp(s / 0.07) for s, y in sims if y == c) for c in range(3)]
        right += max(range(3), key=lambda c: votes[c]) == int(test_y[i])
    assert ev.knn_top1(train_f, train_y, test_f, test_y, 3, k=5) == pytest.approx(right / 10)


def test_object_share_is_the_swap_distance_over_the_distance_between_scenes():
    """Against a loop over pairs; 0 where the features ignore the object, about 1 where a new
    object is as new as a new scene (the swapped features another draw of the same kind)."""
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)
    feats, other = unit(torch.randn(40, 8, dtype=torch.float64)), unit(torch.randn(40, 8, dtype=torch.float64))
    between = [1 - feats[i] @ feats[j] for i in range(40) for j in range(40) if i != j]
    swap = [1 - feats[i] @ other[i] for i in range(40)]
    assert ev.object_share(feats, other) == pytest.approx((sum(swap) / 40 / (sum(between) / len(between))).item())
    assert ev.object_share(feats, feats) == pytest.approx(0, abs=1e-12)
    big, big_other = unit(torch.randn(4000, 8)), unit(torch.randn(4000, 8))
    assert ev.object_share(big, big_other) == pytest.approx(1, abs=0.05)


def test_dino_and_probe_checkpoints(tmp_path):
    """A dino backbone: k-NN only; its probe: the per-step tables, [000] Table 1's layout, k-NN."""
    from test_fovea import dino_checkpoint
    dino_checkpoint(tmp_path / "dino.pt")
    args = ["--n_val", "8", "--n_train", "12", "--batch_size", "4", "--repeats", "1", "--res_factors", "1",
            "--pictures", "0"]
    res = ev.main(["--ckpt", str(tmp_path / "dino.pt"), "--out_dir", str(tmp_path / "d"), *args])
    assert set(res["knn"]) == {"k", "n_train", "vit", "random", "target", "object_share"} and res["resolution"] == {}
    assert set(res["knn"]["object_share"]) == {"vit", "random", "target"}
    assert "gazes on the target" in (tmp_path / "d" / "tables.md").read_text()
    cfg = train.TrainConfig()
    config.apply_overrides(cfg, {"objective": "probe", "data": {"image_size": 32},
                                 "probe": {"backbone": str(tmp_path / "dino.pt"), "num_classes": 10, "steps": 2}})
    torch.save(train.checkpoint(cfg, train.build_objective(cfg), step=2), tmp_path / "probe.pt")
    res = ev.main(["--ckpt", str(tmp_path / "probe.pt"), "--out_dir", str(tmp_path / "p"), *args])
    assert len(res["resolution"]["1x"]["random"]["top1"]) == 2 and "knn" in res
    assert "| this model |" in (tmp_path / "p" / "tables.md").read_text()


def test_object_share_sees_the_scenes_twice_with_the_same_gazes(tmp_path, monkeypatch):
    """With `swapped` giving the scene unchanged, every mode's share is 0: the second pass draws
    the same gazes (random, and on the target) for the same scenes."""
    from test_fovea import dino_checkpoint
    dino_checkpoint(tmp_path / "dino.pt")
    monkeypatch.setattr(data.SyntheticScenes, "swapped", data.SyntheticScenes.__getitem__)
    res = ev.main(["--ckpt", str(tmp_path / "dino.pt"), "--out_dir", str(tmp_path / "d"), "--n_val", "9",
                   "--n_train", "6", "--batch_size", "4", "--res_factors", "1", "--pictures", "0"])
    assert res["knn"]["object_share"] == {"vit": 0.0, "random": 0.0, "target": 0.0}


def test_gazes_on_the_target_fall_inside_it_and_spread_over_its_middle():
    """k-NN "on the target": every gaze inside the badge (a disc) and inside the Fashion-MNIST item
    (a square), spread over the middle half of its radius on each axis."""
    target = torch.tensor([[0.2, -0.3, 0.4], [-0.8, 0.8, 0.2], [0.0, 0.5, 0.05]])   # centre y, x; radius
    gazes = ev.target_gazes(target, torch.Generator().manual_seed(0), 2000)       # (T, B, 2)
    offset = (gazes - target[None, :, :2]) / target[None, :, 2:3]                 # in radii
    assert gazes.shape == (2000, 3, 2) and offset.norm(dim=-1).max() <= 0.5 * 2 ** 0.5 + 1e-6
    assert offset.abs().amax((0, 1)).min() > 0.49 and offset.mean((0, 1)).abs().max() < 0.02


def test_a_grpo_checkpoint_is_evaluated_beside_random_gazes(foveal_ckpts, tmp_path):
    """The policy's episodes (deterministic and sampled) beside random and fixed gazes, with the
    gazes that fell on the badge, a picture of learned traces and a heat map."""
    cfg = train.TrainConfig()
    config.apply_overrides(cfg, {"objective": "grpo", "data": FOVEAL["data"],
                                 "grpo": {"encoder": str(foveal_ckpts[0]), "group": 2, "steps": 3,
                                          "policy": {"dim": 16, "heads": 2}}})
    torch.manual_seed(0)
    torch.save(train.checkpoint(cfg, train.build_objective(cfg), step=1), tmp_path / "grpo.pt")
    res = ev.main(["--ckpt", str(tmp_path / "grpo.pt"), "--out_dir", str(tmp_path / "o"), "--n_val", "6",
                   "--batch_size", "3", "--repeats", "1", "--res_factors", "1"])
    r1 = res["resolution"]["1x"]
    assert len(r1["policy"]["top1"]) == len(r1["policy_sampled"]["top1"]) == 3
    assert set(r1["on_target"]) == set(r1["anytime"]) == {"random", "fixed", "policy", "policy_inhibit", "policy_sampled"}
    assert all(0 <= v <= 100 for v in r1["on_target"]["policy"])
    assert [Path(p).name for p in res["pictures"]] == ["gazes.png", "anytime.png", "policy_gazes.png"]
    # the anytime row without stopping is the plain episode's last step
    assert r1["anytime"]["policy"][-1] == {"threshold": 1.01, "top1": r1["policy"]["top1"][-1], "glimpses": 3.0}
    md = (tmp_path / "o" / "tables.md").read_text()
    assert "learned policy (mode), top-1" in md and "(inhibition of return), top-1" in md and "| ViT | Rand | Policy |" in md
    # The deterministic episodes, recomputed step by step: the mixture's mode, and the best action
    # at least 0.1 (eval's default) from the earlier gazes.
    model = ev.load_foveal(torch.load(foveal_ckpts[0], weights_only=False))
    policy = fovea.load_frozen(tmp_path / "grpo.pt", "policy", grpo.GazePolicy)
    ds = data.SyntheticScenes(12, 32, split="val")
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()[:6]
    batch = data.collate([ds[j] for j in order])
    std = grpo.GazePolicyConfig().std_end
    for name in ("policy", "policy_inhibit"):
        state, table, visited, hits = None, fovea.integral_image(batch["image"]), [], []
        with torch.no_grad():
            for t in range(3):
                means, weights = policy([model.init_state(6) if state is None else state])
                action = (grpo.mixture_mode(means, weights, std) if name == "policy"
                          else grpo.inhibited_mode(means, weights, std, visited, 0.1))
                visited.append(action.clamp(-1, 1))
                state = model(table, state, model.glimpse(visited[-1], (32, 32), sum(model.cfg.grid_z) / 2))
                hits.append(100 * (model.classify(state).argmax(-1) == batch["label"]).float().mean().item())
        assert r1[name]["top1"] == pytest.approx(hits, abs=0.01), name
        glimpses, _ = ev.policy_episode(model, policy, batch["image"], 3, "policy", std, None,
                                        0.1 if name == "policy_inhibit" else 0.0)
        gazes = [p.yxz[:, 0, :2] for p in glimpses]                # each glimpse's first patch: the gaze
        torch.testing.assert_close(torch.stack(gazes), torch.stack(visited), atol=1e-6, rtol=0)
        if name == "policy_inhibit":                               # never within 0.1 of an earlier gaze
            assert all((gazes[t] - gazes[u]).norm(dim=-1).min() >= 0.1 - 1e-6 for t in range(3) for u in range(t))
    off = ev.main(["--ckpt", str(tmp_path / "grpo.pt"), "--out_dir", str(tmp_path / "off"), "--n_val", "3",
                   "--batch_size", "3", "--repeats", "1", "--res_factors", "1", "--inhibit", "0", "--stop_at", "0.5"])
    assert "policy_inhibit" not in off["resolution"]["1x"] and off["policy"]["inhibit"] == 0


def test_gazes_on_the_target_are_a_disc_for_a_badge_and_a_square_for_an_item():
    target = torch.tensor([[0.0, 0.0, 0.5]])                    # centre (0, 0), radius / half-side 0.5
    gazes = [fovea.Patches(torch.zeros(1, 1, 4), torch.tensor([[[y, x, 0.0]]]))
             for y, x in ((0.4, 0.4), (0.3, 0.0), (0.6, 0.0))]   # a corner, inside, outside
    assert ev.on_target(gazes, target, square=False).tolist() == [0.0, 1.0, 0.0]
    assert ev.on_target(gazes, target, square=True).tolist() == [1.0, 1.0, 0.0]


def test_a_passive_vit_alone_and_the_systems_side_by_side(foveal_ckpts, tmp_path):
    """A vit_sup checkpoint alone: its top-1 recomputed image by image; --compare puts it beside
    the foveal model's per-glimpse rows, each with GFLOPs a glimpse."""
    fov, vit = foveal_ckpts
    res = ev.main(["--ckpt", str(vit), "--out_dir", str(tmp_path / "v"), "--n_val", "7", "--batch_size", "3"])
    model = fovea.load_frozen(vit, "classifier", __import__("canvit").ViTClassifier)
    ds = data.SyntheticScenes(7, 32, split="val")
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        right = sum(int(model(ds[j]["image"][None]).argmax(-1).item() == int(ds[j]["label"])) for j in order)
    assert res["resolution"]["1x"]["top1"] == pytest.approx(100 * right / 7, abs=0.01)
    # one look: the patch embedding and the blocks' matrix products (32 px: 16 patches + CLS)
    n, d = 17, 32
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    expected = (2 * 16 * 8 * 8 * 3 * d + block + 2 * d * 10) / 1e9
    assert res["gflops"]["look"] == pytest.approx(expected, rel=1e-6)
    ev.main(["--ckpt", str(fov), "--out_dir", str(tmp_path / "f"), "--n_val", "7", "--repeats", "1",
             "--res_factors", "1", "--pictures", "0"])
    table = ev.compare([str(tmp_path / "f"), str(tmp_path / "v")])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert set(rows) == {"foveal ViT, random gazes", "passive ViT, the whole scene"}
    assert rows["passive ViT, the whole scene"][:4] == [f"{res['resolution']['1x']['top1']:.1f}"] * 4
    assert rows["foveal ViT, random gazes"][3] == "-"                 # an episode of 3: no 8th glimpse


def test_summarize_plots_the_mean_stop_when_sure_curves(tmp_path, monkeypatch):
    """--summarize ... --plot: the curves drawn are the seeds' mean points, each policy once."""
    def run(top1, glimpses):
        curve = [{"threshold": 0.5, "top1": top1, "glimpses": glimpses}, {"threshold": 1.01, "top1": 90.0, "glimpses": 8.0}]
        return {"objective": "foveal_sup", "steps": 8, "glimpse": "foveal", "repeats": 1, "scene_px": 32, "vit_grid": 4,
                "resolution": {"1x": {"n": 5, "scene_px": 32, "random": {"top1": [1.0] * 8, "top5": [2.0] * 8},
                                      "fixed": {"top1": [3.0] * 8, "top5": [4.0] * 8},
                                      "vit_mode": {"top1": 5.0, "top5": 6.0},
                                      "anytime": {"random": curve, "fixed": curve}}}}
    for i, (top1, glimpses) in enumerate([(80.0, 2.0), (90.0, 3.0)]):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "results.json").write_text(json.dumps(run(top1, glimpses)))
    drawn = {}
    monkeypatch.setattr(ev, "save_curves", lambda curves, path: drawn.update(curves) or str(path))
    out = ev.summarize([str(tmp_path / "s0"), "--plot", str(tmp_path / "a.png"), str(tmp_path / "s1")])
    assert "a.png" in out and "85.0 (80.0-90.0) (2.50 (2.00-3.00))" in out
    assert drawn == {name: [{"glimpses": 2.5, "top1": 85.0}, {"glimpses": 8.0, "top1": 90.0}]
                     for name in ("random gazes", "fixed gazes")}
