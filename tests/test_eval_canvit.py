"""eval_canvit.py (through eval.py): metrics against brute force, probes, frozen weights, seeds, the CLI."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import distill
import eval as ev
import eval_canvit as ec
import fovea
import grpo
import config
import train
from conftest import TINY_DISTILL_SECTION

# A distillation run as train.py would save it: 64 px scenes, 4 x 4 canvas, 32 px glimpses.
TINY = {
    "objective": "distill", "seed": 0, "dtype": "float32",
    "data": {"dataset": "synthetic", "image_size": 64, "length": 64, "val_length": 32},
    "distill": TINY_DISTILL_SECTION,
}
FAST = ["--n_train", "16", "--n_val", "8", "--T", "6", "--probe_T", "3", "--probe_steps", "20",
        "--probe_lr", "3e-2", "--probe_batch", "4", "--batch_size", "5", "--pictures", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    """A second thread is ~20x slower when another process shares a 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_tiny_checkpoint(path, objective="distill"):
    cfg = train.TrainConfig()
    config.apply_overrides(cfg, {**TINY, "objective": objective})
    torch.manual_seed(0)
    obj = distill.Distillation(cfg.distill, seed=0)
    obj.setup(data.build_dataset(cfg.data))                    # fits the 4 x 4 standardizers
    torch.save(train.checkpoint(cfg, obj, step=7), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt.pt")


@pytest.fixture(scope="module")
def tiny(ckpt):
    """model, teacher, info, cfg, train / val datasets, cached features and probes at 64/4."""
    torch.set_num_threads(1)
    cfg = ev.parse_args(["--ckpt", str(ckpt), "--out_dir", "unused", *FAST])
    _, source = ev.read_checkpoint(cfg.ckpt)
    model, teacher, info = ec.load_canvit(source, cfg)
    train_ds, val_ds = ec.datasets(cfg, info, 64)
    feats = ec.collect_features(model, teacher, train_ds, cfg, info, 64, 4)
    probes, logs = ec.train_probes(model, feats, train_ds, cfg, torch.device("cpu"))
    return dict(model=model, teacher=teacher, info=info, cfg=cfg, train_ds=train_ds, val_ds=val_ds,
                feats=feats, probes=probes, logs=logs)


# ---------------------------------------------------------------------------------------------
# Metrics against brute force
# ---------------------------------------------------------------------------------------------

def brute_force_miou(preds, targets, K, ignore=255) -> float:
    inter, union = np.zeros(K), np.zeros(K)
    for p, t in zip(preds, targets):                            # image by image, class by class
        valid = t != ignore
        for c in range(K):
            inter[c] += np.sum((p == c) & (t == c) & valid)
            union[c] += np.sum(((p == c) | (t == c)) & valid)
    return float(np.mean([inter[c] / union[c] for c in range(K) if union[c] > 0]))


def test_confusion_matrix_and_miou_match_brute_force():
    g = torch.Generator().manual_seed(0)
    K = 6
    target = torch.randint(0, K - 1, (5, 17, 13), generator=g)         # class K-1 never true
    pred = torch.where(torch.rand(5, 17, 13, generator=g) < 0.6, target,
                       torch.randint(0, K - 2, (5, 17, 13), generator=g))    # K-1: never predicted
    target[:, :3] = 255                                                # ignored rows
    conf = ec.confusion_matrix(pred, target, K)
    for c in range(K):
        for d in range(K):
            assert conf[c, d] == int(((target == c) & (pred == d)).sum())
    assert conf.sum() == int((target != 255).sum())
    assert ec.miou(conf) == pytest.approx(brute_force_miou(pred.numpy(), target.numpy(), K), abs=1e-12)
    assert ec.miou(torch.eye(3, dtype=torch.int64) * 5) == 1.0
    conf_b = ec.confusion_matrix(pred[:2], target[:2], K) + ec.confusion_matrix(pred[2:], target[2:], K)
    assert torch.equal(conf, conf_b)                                   # dataset-wide sums


def test_cell_targets_match_brute_force():
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 5, (2, 12, 12), generator=g)
    masks[0, :5, :7] = 255
    q = ec.cell_targets(masks, 3, 5)                                   # cells of 4 x 4 px
    for b in range(2):
        for i in range(3):
            for j in range(3):
                cell = masks[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                for c in range(5):
                    assert q[b, c, i, j] == pytest.approx(float((cell == c).sum()) / 16)
    with pytest.raises(ec.EvalError, match="whole number of cells"):
        ec.cell_targets(masks, 5, 5)


def test_predicted_masks_are_bilinear_upsampling_then_argmax():
    logits = torch.randn(7, 4, 3, 3)
    up = F.interpolate(logits, size=(48, 48), mode="bilinear", align_corners=False)
    got = ec.predict_masks(logits, 48)
    # channels-last interpolation rounds apart from the default layout's by an ulp at most: a
    # pixel may differ only where its two best classes are that close
    top2 = up.topk(2, dim=1).values
    assert ((got == up.argmax(1)) | (top2[:, 0] - top2[:, 1] < 1e-5)).all()


def test_policy_metrics_match_a_brute_force_recomputation(tiny):
    """mIoU, top-1 (both routes) and cosine similarities of evaluate_policies, recomputed scene
    by scene and class by class on the same batches of the deterministic 'full' policy."""
    t = tiny
    cfg = dataclasses.replace(t["cfg"], policies=("full",), T=3, n_val=7, batch_size=3, pictures=0)
    model, probes, G, S = t["model"], t["probes"], 4, 64
    stds, _ = ec.fit_standardizers(model, t["feats"], G)
    res, _ = ec.evaluate_policies(model, t["teacher"], probes, stds, t["val_ds"], cfg, t["info"], S, G)
    K = t["val_ds"].num_segment_classes
    preds, masks = [[] for _ in range(3)], []
    correct, zero_shot, cos = np.zeros(3), np.zeros(3), np.zeros(3)
    with torch.no_grad():
        for batch in ec.batches(t["val_ds"], 7, 3):
            images, B = batch["image"], len(batch["image"])
            t_patches = t["teacher"](images)["patches"]
            state = model.init_state(B, G)
            for step in range(3):
                center, scale = torch.zeros(B, 2), torch.ones(B)
                state = model(fovea.bilinear_glimpse(images, center, scale, 32), state, center, scale).state
                seg = probes["seg"](state.canvas[:, 2:].reshape(B, G, G, -1))
                preds[step] += list(F.interpolate(seg, size=(S, S), mode="bilinear", align_corners=False)
                                     .argmax(1).numpy())
                cls_hat = model.predict(state, destandardize=True)
                for b in range(B):
                    label = int(batch["label"][b])
                    correct[step] += int(probes["cls"](state.recurrent_cls[b]).argmax()) == label
                    zero_shot[step] += int(probes["teacher_cls"](cls_hat.cls[b]).argmax()) == label
                    cos[step] += np.mean([F.cosine_similarity(cls_hat.patches[b, i], t_patches[b, i],
                                                              0).item() for i in range(G * G)])
            masks += list(batch["mask"].numpy())
    for step in range(3):
        assert res["full"]["miou"][step] == pytest.approx(brute_force_miou(preds[step], masks, K), abs=1e-9)
        assert res["full"]["top1_cls_probe"][step] == pytest.approx(correct[step] / 7)
        assert res["full"]["top1_zero_shot"][step] == pytest.approx(zero_shot[step] / 7)
        assert res["full"]["patch_cos"][step] == pytest.approx(cos[step] / 7, abs=1e-5)
    assert res["n_val"] == 7
    assert res["full"]["center_spread"] == [0.0] * 3 and res["full"]["scale_spread"] == [0.0] * 3


def test_viewpoint_spread_is_the_spread_of_the_rollouts_viewpoints_over_the_scenes(tiny):
    """The viewpoint-spread row: the RMS distance of the centres from their mean and the std of the
    scale over all held-out scenes, per step, recomputed with numpy from the same R-IID rollouts."""
    t = tiny
    cfg = dataclasses.replace(t["cfg"], policies=("riid",), T=3, n_val=7, batch_size=3, pictures=0)
    stds, _ = ec.fit_standardizers(t["model"], t["feats"], 4)
    res, _ = ec.evaluate_policies(t["model"], t["teacher"], t["probes"], stds, t["val_ds"], cfg, t["info"], 64, 4)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + list(ec.POLICIES).index("riid"))
    where = [[] for _ in range(3)]
    with torch.inference_mode():
        for batch in ec.batches(t["val_ds"], 7, 3):
            for step, vp, _ in ec.rollout(t["model"], batch["image"], "riid", 3, 4, t["info"]["glimpse_px"],
                                          gen, t["info"]["glimpse_method"]):
                where[step] += [(*vp.center_yx[b].tolist(), vp.scale[b].item()) for b in range(len(vp.scale))]
    for step in range(3):
        w = np.array(where[step])                                          # (7, 3): y, x, scale
        centre = np.sqrt(((w[:, :2] - w[:, :2].mean(0)) ** 2).sum(1).mean())
        assert res["riid"]["center_spread"][step] == pytest.approx(centre, abs=1e-6)
        assert res["riid"]["scale_spread"][step] == pytest.approx(w[:, 2].std(), abs=1e-6)
        assert centre > 0.1


# ---------------------------------------------------------------------------------------------
# Probes, frozen weights, seeds
# ---------------------------------------------------------------------------------------------

def test_probes_train_on_frozen_features(tiny):
    feats = tiny["feats"]
    assert feats["cells"].shape == (16, 3, 16, 32) and feats["cells"].dtype == torch.float16
    assert feats["cls"].shape == (16, 3, 32) and feats["q"].shape == (16, 15, 4, 4)
    assert set(tiny["logs"]) == {"seg", "teacher_seg", "cls", "teacher_cls"}
    cfg = dataclasses.replace(tiny["cfg"], probe_steps=60, probe_lr=1e-2, probe_batch=8)
    torch.manual_seed(0)
    seg_probe = ec.SegProbe(32, 15)
    cls_probe = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 10))
    for probe, loss_fn, whole in ((seg_probe, ec.seg_loss, (feats["cells"], feats["q"])),
                                  (cls_probe, ec.cls_loss, (feats["cls"], feats["label"]))):
        before = loss_fn(probe.eval(), *whole).item()          # the loss on all 16 cached scenes
        ec.train_probe(probe, loss_fn, whole, cfg, seed=0)
        after = loss_fn(probe.eval(), *whole).item()
        assert after < 0.7 * before, (loss_fn.__name__, before, after)
    # a probe learns what the features hold: labels planted in the recurrent-CLS features
    cfg = dataclasses.replace(tiny["cfg"], probe_steps=150, probe_lr=1e-2)
    labels = torch.arange(64) % 10
    planted = torch.randn(64, 3, 32) + 3 * F.one_hot(labels, 32)[:, None].float()
    probe = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 10))
    losses = ec.train_probe(probe, ec.cls_loss, (planted, labels), cfg, seed=0)
    assert np.mean(losses[-10:]) < 0.3 * losses[0]
    assert (probe.eval()(planted[:, 0]).argmax(1) == labels).float().mean() > 0.9


def test_evaluation_leaves_the_frozen_model_bit_identical(tiny):
    t = tiny
    model, teacher = t["model"], t["teacher"]
    before = ec.snapshot(model, teacher)
    keys = set(model.state_dict())
    cfg = dataclasses.replace(t["cfg"], T=5, n_val=4, res_factors=(2,))
    for S, G in ((64, 4), (128, 8)):                              # a grid without standardizers too
        train_ds, val_ds = ec.datasets(cfg, t["info"], S)
        feats = ec.collect_features(model, teacher, train_ds, cfg, t["info"], S, G)
        probes, _ = ec.train_probes(model, feats, train_ds, cfg, torch.device("cpu"))
        stds, source = ec.fit_standardizers(model, feats, G)
        ec.evaluate_policies(model, teacher, probes, stds, val_ds, cfg, t["info"], S, G)
    assert source.startswith("fitted") and set(model.state_dict()) == keys   # nothing added
    ec.check_unchanged((model, teacher), before)
    after = ec.snapshot(model, teacher)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a)
    assert not model.training and all(p.grad is None and not p.requires_grad for p in model.parameters())
    broken = [dict(before[0]), before[1]]
    broken[0]["canvas_spatial_init"] = broken[0]["canvas_spatial_init"] + 1e-7
    with pytest.raises(RuntimeError, match="canvas_spatial_init"):
        ec.check_unchanged((model, teacher), broken)


def viewpoints(tiny, policy, seed, T=6):
    images = tiny["val_ds"][0]["image"][None].repeat(3, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        steps = list(ec.rollout(tiny["model"], images, policy, T, 4, 32, gen,
                                seg_probe=tiny["probes"]["seg"]))
    return torch.cat([torch.cat([vp.center_yx, vp.scale[:, None]], 1) for _, vp, _ in steps])


@pytest.mark.parametrize("policy", ["riid", "fiid", "c2f", "f2c"])
def test_seeds_make_policies_repeatable(tiny, policy):
    assert torch.equal(viewpoints(tiny, policy, 0), viewpoints(tiny, policy, 0))
    assert not torch.equal(viewpoints(tiny, policy, 0), viewpoints(tiny, policy, 1))


def test_deterministic_policies_and_seeded_results(tiny):
    for policy in ("full", "entropy"):                          # no randomness at all
        assert torch.equal(viewpoints(tiny, policy, 0), viewpoints(tiny, policy, 1))
    full = viewpoints(tiny, "full", 0)
    assert (full[:, :2] == 0).all() and (full[:, 2] == 1).all()
    t = tiny
    cfg = dataclasses.replace(t["cfg"], policies=("riid", "entropy"), T=4, n_val=5, pictures=0)
    stds, _ = ec.fit_standardizers(t["model"], t["feats"], 4)
    run = lambda c: ec.evaluate_policies(t["model"], t["teacher"], t["probes"], stds, t["val_ds"], c,
                                         t["info"], 64, 4)[0]
    first = run(cfg)
    assert first == run(cfg)                                    # same seed: the same numbers
    other = run(dataclasses.replace(cfg, seed=1))
    assert other["riid"] != first["riid"] and other["entropy"] == first["entropy"]


# ---------------------------------------------------------------------------------------------
# Pictures, the command line, bad inputs
# ---------------------------------------------------------------------------------------------

def test_pca_rgb_separates_clusters_and_ignores_token_scale():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 32, generator=g)
    group = torch.arange(16) % 2
    tokens = centres[group] + 0.1 * torch.randn(16, 32, generator=g)
    rgb = ec.pca_rgb(tokens)
    assert rgb.shape == (16, 3) and rgb.dtype == np.uint8
    assert rgb.min(0).tolist() == [0, 0, 0] and rgb.max(0).tolist() == [255, 255, 255]   # min-max
    first = rgb[:, 0].astype(int)                                  # PC 1 splits the two groups
    a, b = first[group == 0], first[group == 1]
    assert a.min() > b.max() or b.min() > a.max()
    scaled = tokens * torch.rand(16, 1, generator=g).add(0.5) + 3.0  # App. A: LayerNorm'd tokens
    assert np.abs(ec.pca_rgb(scaled).astype(int) - rgb).max() <= 1


def run_cli(capsys, *args):
    """eval.py's command line in this process (`cli` is what `python eval.py` runs: test_eval.py
    checks the wiring once): -> (the error message or None, stdout, stderr)."""
    capsys.readouterr()
    message = ev.cli([str(a) for a in args])
    out = capsys.readouterr()
    return message, out.out, out.err


def test_cli_end_to_end(ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    message, stdout, _ = run_cli(capsys, "--ckpt", ckpt, "--out_dir", out, *FAST, "--res_factors", "1,2")
    assert message is None, message
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 7 and results["frozen_check"].startswith("passed")
    assert [(r["scene_px"], r["canvas_grid"]) for r in results["resolutions"]] == [(64, 4), (128, 8)]
    low, high = results["resolutions"]
    assert low["standardizers"] == "checkpoint" and high["standardizers"].startswith("fitted")
    for r in results["resolutions"]:
        for policy in ev.EvalConfig().policies:                   # the defaults: every static one
            for key in ("patch_cos", "cls_cos", "patch_cos_z", "cls_cos_z", "miou", "top1_cls_probe",
                        "top1_zero_shot"):
                assert len(r[policy][key]) == 6 and all(np.isfinite(r[policy][key])), (policy, key)
        for path in r["pictures"]:
            assert Image.open(path).size[0] > 0
        assert len(r["pictures"]) == len(ev.EvalConfig().policies) + 1         # and anytime_<S>px.png
        for policy in ev.EvalConfig().policies:                   # no stopping: the last glimpse's
            assert r[policy]["anytime"][-1]["top1"] == pytest.approx(100 * r[policy]["top1_zero_shot"][-1], abs=0.01)
    assert results["gflops"]["glimpse"] > 0
    tables = (out / "tables.md").read_text()
    assert "mIoU" in tables and "| C2F | 128/8² |" in tables and tables in stdout
    row = next(line for line in tables.splitlines() if line.startswith("| C2F | 64/4² |"))
    assert len(re.findall(r"\d+\.\d", row)) >= 6                  # a number at every timestep


def test_default_glimpse_count_is_21_for_canvit(ckpt, tmp_path):
    res = ev.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path), *FAST[:4], "--probe_T", "2",
                   "--probe_steps", "2", "--batch_size", "8", "--pictures", "0", "--policies", "full",
                   "--res_factors", "1"])
    assert res["config"]["T"] == 21 and len(res["resolutions"][0]["full"]["miou"]) == 21
    assert "| t = 20 |" in (tmp_path / "tables.md").read_text()


def test_official_hugging_face_folder(ckpt, tmp_path, capsys):
    """A canvit-pytorch 0.1 folder (config.json + model.safetensors), with a DINOv3 teacher file."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    saved = torch.load(ckpt, weights_only=False)
    d = saved["config"]["distill"]
    folder = tmp_path / "hf"
    folder.mkdir()
    model_config = {k: v for k, v in d["model"].items() if k not in ("backbone", "vpe_sigma")}
    (folder / "config.json").write_text(json.dumps({"backbone_name": d["model"]["backbone"],
                                                    "model_config": model_config,
                                                    "canvas_patch_grid_sizes": [4]}))
    save_file({k: v.contiguous() for k, v in saved["model"].items()}, str(folder / "model.safetensors"))
    torch.save(saved["extra"]["teacher"], tmp_path / "dinov3.pth")
    cfg = ev.parse_args(["--ckpt", str(folder), "--out_dir", "x"])
    model, teacher, info = ec.load_canvit(ev.read_checkpoint(cfg.ckpt)[1], cfg)
    assert teacher is None and info["glimpse_px"] == 128 and info["data"].image_size == 512
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    out = tmp_path / "eval"
    hf_args = ["--ckpt", folder, "--out_dir", out, *FAST, "--res_factors", "1", "--scene_size", "64",
               "--glimpse_px", "32"]
    message, _, _ = run_cli(capsys, *hf_args, "--policies", "full,c2f", "--teacher_weights", tmp_path / "dinov3.pth")
    assert message is None, message
    r = json.loads((out / "results.json").read_text())["resolutions"][0]
    assert r["standardizers"] == "checkpoint" and set(r["c2f"]) >= {"miou", "patch_cos", "top1_zero_shot"}
    message, _, stderr = run_cli(capsys, *hf_args, "--policies", "full")
    assert message is None and "no teacher" in stderr
    r = json.loads((out / "results.json").read_text())["resolutions"][0]
    assert "miou" in r["full"] and "patch_cos" not in r["full"] and "teacher_top1" not in r


def test_bad_inputs_fail_with_clear_messages(ckpt, tmp_path, capsys):
    message, _, _ = run_cli(capsys, "--ckpt", tmp_path / "missing.pt", "--out_dir", tmp_path / "o")
    assert "not found" in message
    with pytest.raises(ec.EvalError, match="objective 'segment'.*evaluates 'distill'"):
        other = save_tiny_checkpoint(tmp_path / "f.pt", "segment")      # an objective it does not know
        ev.main(["--ckpt", str(other), "--out_dir", str(tmp_path)])
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    with pytest.raises(ec.EvalError, match="not a train.py checkpoint"):
        ev.main(["--ckpt", str(tmp_path / "junk.pt"), "--out_dir", str(tmp_path)])
    with pytest.raises(ec.EvalError, match="unknown policy"):
        ev.main(["--ckpt", str(ckpt), "--out_dir", "x", "--policies", "c2f,zigzag"])
    with pytest.raises(ec.EvalError, match="entropy policy"):     # 3 x 3 canvas, 4 x 4 finest tiles
        ev.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path), "--canvas_grid", "3", "--T", "21"])


def fake_image(path, g, size=40):
    Image.fromarray(torch.randint(0, 256, (size, size + 8, 3), generator=g).byte().numpy()).save(path)


@pytest.mark.parametrize("kind", ["imagefolder", "ade20k"])
def test_real_data_layouts(ckpt, tmp_path, kind):
    """ImageFolder (labels only: classification) and ADEChallengeData2016 (masks with the ignore
    label: segmentation; the entropy policy needs it) on a few random files."""
    g, root = torch.Generator().manual_seed(0), tmp_path / "data"
    for split, ade_split in (("train", "training"), ("val", "validation")):
        for i in range(6):
            if kind == "imagefolder":
                (root / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
                fake_image(root / split / f"class{i % 2}" / f"{i}.jpg", g)
            else:
                for sub in ("images", "annotations"):
                    (root / sub / ade_split).mkdir(parents=True, exist_ok=True)
                fake_image(root / "images" / ade_split / f"{i}.jpg", g)
                ann = torch.randint(0, 4, (40, 48), generator=g).byte().numpy()     # 0 = "other"
                Image.fromarray(ann).save(root / "annotations" / ade_split / f"{i}.png")
    results = ev.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path / "out"), *FAST, "--n_train", "6",
                       "--n_val", "6", "--res_factors", "1", "--data", kind, "--root", str(root)])
    r = results["resolutions"][0]
    if kind == "imagefolder":
        assert "entropy" not in r and "miou" not in r["c2f"] and len(r["c2f"]["top1_cls_probe"]) == 6
    else:
        assert "entropy" in r and "top1_cls_probe" not in r["c2f"] and len(r["entropy"]["miou"]) == 6
    assert len(r["c2f"]["patch_cos"]) == 6 and (tmp_path / "out" / "rollout_64px_c2f.png").is_file()


def test_constant_prediction_floor(tiny):
    t = tiny
    cfg = dataclasses.replace(t["cfg"], policies=("full",), T=1, n_val=9, batch_size=4, pictures=0)
    stds, _ = ec.fit_standardizers(t["model"], t["feats"], 4)
    res, _ = ec.evaluate_policies(t["model"], t["teacher"], t["probes"], stds, t["val_ds"], cfg,
                                  t["info"], 64, 4)
    masks = np.stack([b for batch in ec.batches(t["val_ds"], 9, 4) for b in batch["mask"].numpy()])
    labels = np.concatenate([batch["label"].numpy() for batch in ec.batches(t["val_ds"], 9, 4)])
    K = t["val_ds"].num_segment_classes
    most = np.bincount(masks.ravel(), minlength=K).argmax()
    assert res["floor_miou"] == pytest.approx(brute_force_miou(np.full_like(masks, most), masks, K))
    assert res["floor_top1"] == pytest.approx(np.mean(labels == np.bincount(labels).argmax()))


def test_probes_follow_the_seed(tiny):
    """Probe initialisation, dropout and batches follow --seed (the policies' draws: the tests
    above): the same seed gives the same probes, another seed other ones."""
    t = tiny
    weights = lambda seed: [p.detach().clone() for probe in ec.train_probes(
        t["model"], t["feats"], t["train_ds"], dataclasses.replace(t["cfg"], seed=seed),
        torch.device("cpu"))[0].values() for p in probe.parameters()]
    first = weights(0)
    assert all(torch.equal(a, b) for a, b in zip(first, weights(0)))
    assert any(not torch.equal(a, b) for a, b in zip(first, weights(1)))


class TwoComponents(torch.nn.Module):
    """A stand-in policy: component 0 at (0.5, -0.25) with scale action 0 and ~all the weight,
    component 1 far away; whatever the state."""
    def forward(self, streams, positions):
        B = streams[0].shape[0]
        means = torch.tensor([[0.5, -0.25, 0.0], [-0.8, 0.8, 0.9]]).expand(B, 2, 3)
        return means, torch.tensor([6.0, -6.0]).expand(B, 2)


def test_learned_policy_rows_take_the_mode_or_a_sample_with_the_policy_std(tiny):
    images = torch.stack([tiny["val_ds"][i]["image"] for i in range(4)]).repeat(50, 1, 1, 1)
    std = 0.1

    def rollout(policy):
        with torch.inference_mode():
            return [vp for _, vp, _ in ec.rollout(tiny["model"], images, policy, 2, 4, 32,
                                                  torch.Generator().manual_seed(0),
                                                  learned=(TwoComponents(), 0.05, std, "policy"))]
    mode = grpo.CanViTEncoder(tiny["model"], None, 4, 32, 0.05).viewpoint(torch.tensor([[0.5, -0.25, 0.0]]))
    for vp in rollout("learned"):                                  # the heaviest mean, every time
        assert torch.equal(vp.center_yx, mode.center_yx.expand(200, 2)) and torch.equal(vp.scale, mode.scale.expand(200))
    for vp in rollout("learned_sampled"):        # around it, spread by std: scale s_min + (1 - s_min)(u + 1) / 2
        assert (vp.scale.std() - (1 - 0.05) / 2 * std).abs() < 0.01
        assert (vp.scale.mean() - mode.scale).abs() < 0.01
        assert (vp.center_yx.mean(0) - mode.center_yx[0]).abs().max() < 0.02


def test_a_learned_canvit_policy_joins_the_policy_tables(ckpt, tmp_path):
    cfg = train.TrainConfig()
    config.apply_overrides(cfg, {"objective": "grpo", "data": TINY["data"],
                                 "grpo": {"encoder": str(ckpt), "group": 2, "steps": 3, "classifier_steps": 5,
                                          "policy": {"dim": 16, "heads": 2, "std_start": 0.4, "std_end": 0.15}}})
    torch.manual_seed(0)
    torch.save(train.checkpoint(cfg, train.build_objective(cfg), step=1), tmp_path / "grpo.pt")
    res = ev.main(["--ckpt", str(tmp_path / "grpo.pt"), "--out_dir", str(tmp_path / "o"), *FAST,
                   "--T", "0", "--res_factors", "1", "--policies", "c2f,riid", "--pictures", "0"])
    r = res["resolutions"][0]
    assert set(r) >= {"c2f", "riid", "learned", "learned_sampled"}
    assert res["policy"]["std_sampled"] == 0.15                     # sampled with the final std
    assert len(r["learned"]["top1_zero_shot"]) == len(r["learned_sampled"]["top1_zero_shot"]) == 3
    tables = (tmp_path / "o" / "tables.md").read_text()
    assert "| Learned (GRPO) | 64/4² |" in tables and "| Learned (GRPO), sampled | 64/4² |" in tables
    with pytest.raises(ec.EvalError, match="'learned' and 'learned_sampled' come from a grpo checkpoint"):
        ev.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path / "x"), "--policies", "learned"])


def test_stop_when_sure_on_hand_built_probabilities():
    """The anytime rule: an image stops at its first glimpse whose top probability reaches the
    threshold (else the last) and is judged there."""
    confidence = torch.tensor([[0.3, 0.95, 0.99], [0.9, 0.2, 0.5], [0.1, 0.2, 0.3]])
    correct = torch.tensor([[False, True, True], [False, True, True], [True, False, True]])
    assert ec.stop_when_sure(confidence, 0.9).tolist() == [1, 0, 2]
    assert ec.stop_when_sure(confidence, 0.96).tolist() == [2, 2, 2]
    curve = ec.anytime_curve(confidence, correct, (0.9, 0.96))
    assert curve[0] == {"threshold": 0.9, "top1": pytest.approx(200 / 3, abs=0.01), "glimpses": pytest.approx(2.0)}
    assert curve[1]["top1"] == 100.0 and curve[2] == {"threshold": 1.01, "top1": 100.0, "glimpses": 3.0}
    assert "| a | 66.7 (2.00) | 100.0 (3.00) | 100.0 (3.00) |" in ec.anytime_table({"a": curve})
