"""train.py: config, schedules, data order, and whole runs (DDP, resume, broken data).

The runs are real `python train.py` / `torchrun` subprocesses on tiny configs.
"""
import gzip
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import data
import train
from conftest import ROOT, TINY_DISTILL_SECTION

# A distillation run small enough for a few CPU seconds a step-batch.
TINY_DISTILL = {
    "objective": "distill", "max_steps": 6, "batch_size": 8, "dtype": "float32", "seed": 3,
    "log_every": 2, "ckpt_every": 100, "num_workers": 0,
    "data": {"dataset": "synthetic", "image_size": 64, "length": 64},
    "optim": {"lr": 2e-3, "init_lr": 1e-4, "warmup_steps": 2},
    "distill": TINY_DISTILL_SECTION,
}


# The same for the foveal ViT (MixUp on) and the passive ViT baseline.
TINY_FOVEAL = {
    "objective": "foveal_sup", "max_steps": 3, "batch_size": 8, "dtype": "float32", "seed": 3,
    "log_every": 1, "ckpt_every": 100, "num_workers": 0,
    "data": {"dataset": "synthetic", "image_size": 48, "length": 64},
    "optim": {"lr": 2e-3, "init_lr": 1e-4, "warmup_steps": 2},
    "foveal": {"steps": 2, "mixup_alpha": 0.8,
               "model": {"dim": 32, "depth": 1, "heads": 2, "num_state": 2, "num_zoom": 3, "max_z": 2.0,
                         "z_max": 2.0, "grid": 2, "grid_z": [2.0, 2.0], "num_classes": 10,
                         "compile_extraction": False}},
}
TINY_VIT = {
    **{k: v for k, v in TINY_FOVEAL.items() if k != "foveal"}, "objective": "vit_sup",
    "vit": {"backbone": {"embed_dim": 32, "num_heads": 2, "n_blocks": 1, "patch_size": 8},
            "n_storage_tokens": 0, "num_classes": 10, "mixup_alpha": 0.8},
}


TINY_DINO = {
    **{k: v for k, v in TINY_FOVEAL.items() if k != "foveal"}, "objective": "dino",
    "data": {"dataset": "synthetic", "image_size": 32, "length": 64},
    "dino": {"global_grid": 4, "local_grid": 2, "n_local": 2, "seq_steps": 2, "out_dim": 16, "hidden_dim": 24,
             "bottleneck_dim": 8, "warmup_teacher_temp_epochs": 0,
             "model": {"dim": 32, "depth": 1, "heads": 2, "num_state": 2, "patch_px": 8, "num_zoom": 3,
                       "max_z": 2.0, "grid": 2, "grid_z": [2.0, 2.5], "z_max": 4.5, "head": "none",
                       "num_classes": 0, "compile_extraction": False}},
}


def image_folder(root: Path, classes: int = 2, per_class: int = 8, seed: int = 0) -> Path:
    """root/train/<class>/<i>.png: random images of varied sizes."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in torch.randint(30, 70, (2,), generator=gen))
            Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()).save(d / f"{i}.png")
    return root


def run(tmp: Path, cfg: dict | Path, *extra: str, nproc: int = 1, wait: bool = True, timeout: int = 300):
    """Run train.py in a subprocess on a config file, or on a dict written to tmp/<out_dir>.yaml."""
    if isinstance(cfg, dict):
        path = tmp / (Path(cfg["out_dir"]).name + ".yaml")
        path.write_text(yaml.safe_dump(cfg))
    else:
        path = cfg
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, str(ROOT / "train.py"), "--cfg", str(path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"train.py failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def with_out(cfg: dict, out: Path, **top) -> dict:
    return {**cfg, "out_dir": str(out), **top}


def params(out: Path) -> dict:
    return torch.load(out / "ckpt.pt", weights_only=False)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def test_config_yaml_then_cli_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("objective: foveal_sup\noptim: {lr: 1e-4, betas: [0.8, 0.9]}\nfoveal: {model: {dim: 64}}\n")
    cfg, export, _ = train.parse_config(["--cfg", str(p), "--foveal.model.depth=3", "--optim.lr", "2e-3",
                                      "--compile=true", "--foveal.model.grid_z=[2.5, 3]"])
    assert export is None and cfg.objective == "foveal_sup"
    assert cfg.optim.lr == 2e-3 and cfg.optim.betas == (0.8, 0.9) and cfg.compile is True
    assert cfg.foveal.model.dim == 64 and cfg.foveal.model.depth == 3 and cfg.foveal.model.grid_z == (2.5, 3.0)
    assert train.TrainConfig().optim.lr == 4e-4                      # defaults untouched


@pytest.mark.parametrize("args,message", [
    (["--optim.lrr=1"], "unknown config key 'optim.lrr'; valid keys in optim: betas, grad_clip"),
    (["--max_steps=1.5"], "max_steps: expected int"),
    (["--compile=yes"], "compile: expected true or false"),
    (["--optim=3"], "'optim' is a section"),
    (["--optim.betas=[0.9]"], "optim.betas: expected 2 values"),
    (["--objective=dinov9"], "objective = 'dinov9': one of distill, foveal_sup"),
    (["--cfg", "no_such_config.yaml"], "config file 'no_such_config.yaml' not found"),
])
def test_bad_config_fails_with_a_clear_message(args, message):
    args = args if "--cfg" in args else ["--cfg", "foveal_tiny.yaml", *args]
    with pytest.raises(train.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        train.parse_config(args)


def test_bad_config_key_stops_the_run_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "canvit_tiny.yaml",
                          f"--out_dir={tmp_path / 'x'}", "--distill.modle.backbone.embed_dim=8"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    assert "unknown config key 'distill.modle'" in res.stderr
    assert not (tmp_path / "x").exists()


def test_paper_recipes_hold_the_papers_values(tmp_path):
    """The shipped recipes against the papers' numbers, typed in from the papers."""
    # (the Fashion-MNIST configs read their files' default folder: Debian's package)
    cfg = lambda name: train.parse_config(["--cfg", name] + ([] if "fmnist" in name else [f"--data.root={tmp_path}"]))[0]
    fmnist = all((Path(data.FASHION_MNIST_ROOT) / (f + ".gz")).is_file() for *names, _ in
                 data.FASHION_MNIST_FILES.values() for f in names) or os.environ.get("REQUIRE_FASHION_MNIST")
    c = cfg("canvit.yaml")                                           # [003] Tables 1 and 2
    assert (c.objective, c.batch_size, c.max_steps, c.dtype) == ("distill", 64, 2_000_000, "bfloat16")
    assert (c.optim.lr, c.optim.init_lr, c.optim.warmup_steps, c.optim.weight_decay) == (4e-4, 1e-7, 100_000, 1e-4)
    assert (c.distill.glimpse_px, c.distill.min_scale, c.distill.chunk, c.distill.p_stop) == (128, 0.05, 2, 0.5)
    assert (c.distill.model.backbone.embed_dim, c.distill.model.backbone.n_blocks, c.data.image_size) == (768, 12, 512)
    f = cfg("foveal_sup.yaml")                                       # [002] A.3.1, A.3.4, Sec. 6.2
    assert (f.objective, f.batch_size, f.optim.lr, f.optim.schedule) == ("foveal_sup", 1024, 5e-4, "cosine")
    assert f.max_steps == 300 * (1_281_167 // 1024) and f.foveal.steps == 8 and f.foveal.mixup_alpha > 0
    m = f.foveal.model
    assert (m.dim, m.depth, m.heads, m.num_state, m.num_zoom, m.patch_px, m.grid) == (768, 12, 12, 16, 16, 16, 0)
    s = cfg("foveal_shuffled.yaml")                                  # [002] Sec. 6.1
    assert (s.foveal.glimpse, s.foveal.steps, s.foveal.vit_grid, s.foveal.model.num_state, s.data.image_size) \
        == ("shuffled_vit", 4, 16, 32, 256)
    d = cfg("dino.yaml")                                             # [000] Sec. 4, 5.2, App. B
    assert (d.batch_size, d.optim.lr, d.optim.weight_decay, d.optim.weight_decay_end) == (1024, 2e-3, 0.04, 0.4)
    assert d.optim.warmup_steps == 10 * (1_281_167 // 1024) and d.max_steps == 300 * (1_281_167 // 1024)
    m, k = d.dino.model, d.dino
    assert (m.dim, m.depth, m.heads, m.num_state, m.patch_px, m.grid) == (384, 12, 6, 8, 16, 5)
    assert (k.out_dim, k.student_temp, k.warmup_teacher_temp, k.teacher_temp, k.warmup_teacher_temp_epochs) \
        == (65536, 0.1, 0.04, 0.07, 30)
    assert (k.global_grid, k.global_area, k.local_area, k.n_local, k.seq_steps, k.centering) == \
        (16, (0.32, 1.0), (0.05, 0.32), 8, 8, "sinkhorn_knopp")
    light = cfg("dino_light.yaml")                                   # [000] App. E
    assert light.max_steps * 3 == light.optim.schedule_steps == d.max_steps
    g = cfg("grpo.yaml")                                             # [002] A.3.4
    assert (g.batch_size, g.grpo.group, g.grpo.steps, g.grpo.inner_epochs) == (4096, 16, 8, 8)
    assert g.max_steps == 4 * (1_281_167 // 4096)
    # Every shipped config builds its objective (model sizes, geometry and zoom range agree).
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        if "fmnist" in p.name and not fmnist:
            continue                                  # no Fashion-MNIST here (CI installs it)
        built = cfg(p.name)
        # (the DINOv3 teacher of distill is big; probe and grpo read another run's checkpoint,
        # and are built in their own tests)
        if built.objective not in ("distill", "probe", "grpo"):
            train.build_objective(built)


def test_a_dataset_root_must_be_set():
    with pytest.raises(train.ConfigError, match="data.root = '': a folder: set --data.root="):
        train.parse_config(["--cfg", "canvit.yaml"])


# ---------------------------------------------------------------------------------------------
# Schedules and data order
# ---------------------------------------------------------------------------------------------

def test_learning_rate_schedules():
    o = train.OptimConfig()                                          # [003] Table 2
    assert train.learning_rate(0, o, 2_000_000) == pytest.approx(1e-7)
    assert train.learning_rate(50_000, o, 2_000_000) == pytest.approx((1e-7 + 4e-4) / 2)
    assert train.learning_rate(100_000, o, 2_000_000) == pytest.approx(4e-4)
    assert train.learning_rate(1_999_999, o, 2_000_000) == pytest.approx(4e-4)
    c = train.OptimConfig(lr=5e-4, init_lr=0.0, warmup_steps=10, schedule="cosine", min_lr=1e-6)
    assert train.learning_rate(10, c, 110) == pytest.approx(5e-4)
    assert train.learning_rate(60, c, 110) == pytest.approx(1e-6 + (5e-4 - 1e-6) * 0.5)
    assert train.learning_rate(110, c, 110) == pytest.approx(1e-6)


def test_sampler_gives_each_process_its_share_of_the_global_batch():
    B, n = 8, 50                                                     # 6 global batches, 2 left over
    one = train.GlobalBatchSampler(n, B, 0, 1, seed=5)
    two = [train.GlobalBatchSampler(n, B, r, 2, seed=5) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    whole = list(one)
    assert len(whole) == 48 and len(set(whole)) == 48
    halves = [list(s) for s in two]
    for k in range(6):                          # global batch k: rank 0 the first half, rank 1 the second
        assert halves[0][4 * k:4 * k + 4] + halves[1][4 * k:4 * k + 4] == whole[8 * k:8 * k + 8]
    two[1].skip = 8
    assert list(two[1]) == halves[1][8:] and len(two[1]) == 16
    two[1].set_epoch(4)
    assert list(two[1]) != halves[1][8:]                             # a new permutation each epoch
    assert train.data_position(25, 12) == (2, 1)


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------

def test_torchrun_two_processes_on_the_tiny_config(tmp_path):
    out = tmp_path / "ddp_tiny"
    res = run(tmp_path, ROOT / "configs" / "canvit_tiny.yaml", "--max_steps=3", "--log_every=1", "--num_workers=0", "--batch_size=4",
              "--distill.n_stats=16", f"--out_dir={out}", nproc=2)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert "2 process(es)" in res.stdout
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 3


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(tmp_path, with_out(TINY_DISTILL, one, max_steps=3))
    run(tmp_path, with_out(TINY_DISTILL, two, max_steps=3), nproc=2)
    a, b = params(one), params(two)
    assert max_diff(a, b) < 1e-5
    # The comparison has teeth: a third of a step's update is far above the tolerance.
    three = tmp_path / "one_more"
    run(tmp_path, with_out(TINY_DISTILL, three, max_steps=4))
    assert max_diff(a, params(three)) > 1e-4


@pytest.mark.parametrize("name", ["foveal_sup", "vit_sup", "dino", "grpo"])
def test_objectives_do_not_depend_on_the_process_count(tmp_path, name):
    """MixUp, random gazes, the ImageFolder training augmentation, DINO's views and photometric
    augmentation are drawn for the global batch, and Sinkhorn-Knopp and KoLeo run over it:
    2 processes x 4 images give the weights of 1 process x 8."""
    if name == "dino":
        # Weights after one step (Adam's first updates amplify float noise: 3e-8 after one step,
        # 2e-5 after three), and the logged loss, KoLeo and teacher entropy of two steps, which
        # move when Sinkhorn-Knopp or KoLeo see only part of the batch.
        runs = {n: tmp_path / f"p{n}" for n in (1, 2)}
        for n, out in runs.items():
            run(tmp_path, with_out(TINY_DINO, out, max_steps=2, log_every=1, ckpt_every=1), nproc=n)
        first = {n: torch.load(out / "ckpt_prev.pt", weights_only=False) for n, out in runs.items()}
        assert max_diff(first[1]["model"], first[2]["model"]) < 1e-6
        assert max_diff(first[1]["extra"]["teacher"], first[2]["extra"]["teacher"]) < 1e-6
        logs = {n: [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
                for n, out in runs.items()}
        for a, b in zip(logs[1], logs[2]):
            for key in ("loss", "dino_loss", "koleo", "teacher_entropy", "prototypes_used"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])
        return
    if name == "grpo":         # a policy on a frozen foveal_sup encoder: traces drawn globally
        run(tmp_path, with_out(TINY_FOVEAL, tmp_path / "encoder", max_steps=1))
        cfg = {**{k: v for k, v in TINY_FOVEAL.items() if k != "foveal"}, "objective": "grpo", "max_steps": 2,
               "grpo": {"encoder": str(tmp_path / "encoder" / "ckpt.pt"), "group": 4, "steps": 2,
                        "inner_epochs": 2, "policy": {"dim": 16, "heads": 2}}}
        runs = {n: tmp_path / f"p{n}" for n in (1, 2)}
        for n, out in runs.items():
            run(tmp_path, with_out(cfg, out), nproc=n)
        assert max_diff(params(runs[1]), params(runs[2])) < 1e-5
        logs = {n: [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
                for n, out in runs.items()}
        for a, b in zip(logs[1], logs[2]):
            for key in ("loss", "reward", "acc_1", "acc_2", "clip_frac"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])
        return
    cfg = dict(TINY_FOVEAL if name == "foveal_sup" else TINY_VIT)
    root = image_folder(tmp_path / "folder")
    cfg["data"] = {"dataset": "imagefolder", "root": str(root), "image_size": 48, "num_classes": 2}
    section = "foveal" if name == "foveal_sup" else "vit"
    model_cfg = cfg[section]["model"] if name == "foveal_sup" else cfg[section]
    model_cfg = {**model_cfg, "num_classes": 2}
    cfg[section] = ({**cfg[section], "model": model_cfg} if name == "foveal_sup" else model_cfg)
    one, two = tmp_path / "one", tmp_path / "two"
    run(tmp_path, with_out(cfg, one))
    run(tmp_path, with_out(cfg, two), nproc=2)
    assert max_diff(params(one), params(two)) < 1e-5


def test_a_run_is_repeatable_on_one_machine(tmp_path):
    """The same command twice gives bit-identical weights (foveal_tiny's settings: threads 1)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run(tmp_path, with_out(TINY_FOVEAL, out, max_steps=4, threads=1))
    assert max_diff(params(outs[0]), params(outs[1])) == 0


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    n = 10
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(tmp_path, with_out(TINY_DISTILL, straight, max_steps=n))
    cfg = with_out(TINY_DISTILL, killed, max_steps=n, ckpt_every=1)  # writing a checkpoint every step
    proc = run(tmp_path, cfg, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:                                     # kill after a step-k checkpoint
        try:
            if torch.load(killed / "ckpt.pt", weights_only=False)["step"] >= 4:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(killed / "ckpt.pt", weights_only=False)["step"]
    assert 4 <= step_at_kill < n
    (killed / "ckpt.pt.tmp99999").write_bytes(b"\x00" * 100)          # a write cut short
    res = run(tmp_path, cfg)                                          # the same command again
    assert f"resumed from {killed / 'ckpt.pt'} at step {step_at_kill}" in res.stdout
    assert not list(killed.glob("ckpt.pt.tmp*"))
    assert torch.load(killed / "ckpt.pt", weights_only=False)["step"] == n
    assert max_diff(params(straight), params(killed)) < 1e-6


def test_resume_refuses_a_different_experiment(tmp_path):
    out = tmp_path / "exp"
    run(tmp_path, with_out(TINY_DISTILL, out, max_steps=2))
    config_before = (out / "config.yaml").read_text()
    path = tmp_path / "exp.yaml"
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", str(path), "--optim.lr=0.1"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and "optim.lr=0.002" in res.stderr
    assert (out / "config.yaml").read_text() == config_before          # nothing saved is lost


def test_a_checkpoint_from_before_a_config_section_existed_resumes():
    """A key the checkpoint lacks counts as its default: a later version that adds a config
    section still resumes older runs, but not with a changed value of the new key."""
    now = train.config.as_dict(train.TrainConfig())
    older = {k: v for k, v in now.items() if k != "grpo"}
    train.check_resumable(older, now, now)
    changed = train.config.as_dict(train.TrainConfig())
    changed["grpo"]["group"] = 4
    with pytest.raises(train.ConfigError, match="grpo.group=16.*grpo.group=4"):
        train.check_resumable(older, changed, now)
    with pytest.raises(train.ConfigError, match="seed=0.*seed=1"):
        train.check_resumable(now, {**now, "seed": 1}, now)


def test_a_folder_with_broken_images_trains(tmp_path):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        d = tmp_path / "folder" / "train" / c
        d.mkdir(parents=True)
        for i in range(6):
            px = (torch.rand(40, 48, 3, generator=gen) * 255).byte().numpy()
            Image.fromarray(px).save(d / f"{i}.png")
        (d / "truncated.jpg").write_bytes((d / "0.png").read_bytes()[:60])
        (d / "empty.jpg").write_bytes(b"")
        (d / "notes.jpg").write_text("not an image")
    cfg = {"objective": "foveal_sup", "out_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 6,
           "dtype": "float32", "log_every": 1, "ckpt_every": 100, "num_workers": 2,
           "data": {"dataset": "imagefolder", "root": str(tmp_path / "folder"), "image_size": 32, "num_classes": 2},
           "optim": {"lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"},
           "foveal": {"steps": 2, "model": {"dim": 32, "depth": 1, "heads": 1, "num_state": 2, "num_zoom": 3,
                                            "max_z": 2.0, "num_classes": 2, "compile_extraction": False}}}
    res = run(tmp_path, cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["bad_images"] > 0
    assert "skipped a bad image" in res.stdout


def test_training_on_exported_features_keeps_the_random_teacher(tmp_path):
    feats, out = tmp_path / "features", tmp_path / "on_features"
    cfg = with_out(TINY_DISTILL, out, max_steps=2)
    cfg["distill"] = {**cfg["distill"], "shard_size": 24}
    run(tmp_path, cfg, "--export_features", str(feats))
    assert sorted(p.name for p in feats.iterdir()) == ["index.json", "shard_000000.pt", "shard_000001.pt",
                                                       "shard_000002.pt", "teacher.pt"]
    run(tmp_path, cfg, f"--distill.teacher.features={feats}")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert max_diff(ckpt["extra"]["teacher"], torch.load(feats / "teacher.pt")) == 0
    assert all(math.isfinite(json.loads(l)["loss"]) for l in (out / "log.jsonl").read_text().splitlines())


# ---------------------------------------------------------------------------------------------
# Failing early and clearly, losing nothing, surviving preemption
# ---------------------------------------------------------------------------------------------

def cli(tmp: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=tmp, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_values_are_refused_before_any_work_in_one_message(tmp_path):
    out = tmp_path / "never"
    res = cli(tmp_path, "--cfg", "foveal_tiny.yaml", f"--out_dir={out}", "--log_every=0", "--batch_size=0",
              "--max_steps=-1", "--num_workers=-1", "--data.dataset=imagefolderr")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    for key in ("log_every = 0", "batch_size = 0", "max_steps = -1", "num_workers = -1",
                "data.dataset = 'imagefolderr': one of synthetic, imagefolder, ade20k"):
        assert key in res.stderr, (key, res.stderr)
    assert not out.exists()                                           # nothing was made
    res = cli(tmp_path, "--cfg", "foveal_tiny.yaml", f"--out_dir={out}", "--data.target_min=0.8",
              "--data.target_max=0.95")                               # a badge that cannot fit
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "data.target_max = 0.95: from data.target_min (0.8) to 0.909 of the side" in res.stderr
    assert not out.exists()


def test_fashion_mnist_files_and_settings_are_checked_before_any_work(tmp_path):
    """A missing or damaged Fashion-MNIST file, or a scene setting out of range: one refusal
    naming the key, the file and how to get the files; no traceback, nothing made."""
    out = tmp_path / "never"
    (tmp_path / "cut").mkdir()
    whole = gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 60_000, 28, 28) + bytes(47_040_000), 1)
    (tmp_path / "cut" / "train-images-idx3-ubyte.gz").write_bytes(whole[:-1000])
    for root, says in ((tmp_path / "none", "none: not a folder"),
                       (tmp_path / "cut", "train-images-idx3-ubyte.gz: a truncated or damaged gzip file")):
        res = cli(tmp_path, "--cfg", "foveal_fmnist_tiny.yaml", f"--out_dir={out}", f"--data.root={root}",
                  "--data.item_min=0", "--data.item_max=1.5", "--data.clutter=-1", "--data.fragment_px=29",
                  "--data.scene=object", "--data.num_classes=5")
        assert res.returncode != 0 and "Traceback" not in res.stderr
        for key in (says, "apt-get install dataset-fashion-mnist", "data.item_min = 0", "data.item_max = 1.5",
                    "data.clutter = -1", "data.fragment_px = 29", "data.scene = 'object'", "data.num_classes = 5"):
            assert key in res.stderr, (key, res.stderr)
        assert not out.exists()


def test_a_yaml_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: foveal_sup\noptim: {lr: 1e-3\nmax_steps: 3\n")
    res = cli(tmp_path, "--cfg", str(bad))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{bad}: not valid YAML (line 3" in res.stderr


def test_no_config_says_what_to_run_and_help_lists_objectives_and_configs(tmp_path):
    res = cli(tmp_path)
    assert res.returncode != 0 and "no --cfg given" in res.stderr and "Traceback" not in res.stderr
    for p in (ROOT / "configs").glob("*.yaml"):
        assert p.name in res.stderr
    helped = cli(tmp_path, "--help")
    assert helped.returncode == 0 and "--print_config" in helped.stdout
    assert "objectives: distill, foveal_sup, vit_sup" in helped.stdout and "foveal_tiny.yaml" in helped.stdout
    shown = cli(tmp_path, "--cfg", "foveal_tiny.yaml", "--print_config", "--optim.lr=0.5")
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["optim"]["lr"] == 0.5


def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = cli(tmp_path, "--cfg", "foveal_tiny.yaml", f"--out_dir={blocker / 'run'}", "--max_steps=1")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"out_dir = '{blocker / 'run'}' is not writable" in res.stderr


def test_class_count_mismatch_and_a_single_class_are_refused(tmp_path):
    root = image_folder(tmp_path / "folder", classes=2)
    base = with_out(TINY_FOVEAL, tmp_path / "mismatch")
    base["data"] = {"dataset": "imagefolder", "root": str(root), "image_size": 48, "num_classes": 0}
    path = tmp_path / "mismatch.yaml"
    path.write_text(yaml.safe_dump(base))
    res = cli(tmp_path, "--cfg", str(path))                          # the model has 10 classes
    assert res.returncode != 0 and "foveal.model.num_classes = 10, but the data" in res.stderr
    assert "set foveal.model.num_classes=2" in res.stderr and not (tmp_path / "mismatch").exists()
    one = image_folder(tmp_path / "one", classes=1)
    res = cli(tmp_path, "--cfg", str(path), f"--data.root={one}", "--foveal.model.num_classes=1")
    assert res.returncode != 0 and "a single class leaves nothing to learn" in res.stderr


def test_a_non_finite_loss_stops_and_says_what_was_kept(tmp_path):
    out = tmp_path / "nan"
    res = cli(tmp_path, "--cfg", "foveal_tiny.yaml", f"--out_dir={out}", "--max_steps=6", "--log_every=1",
              "--num_workers=0", "--optim.lr=1e30", "--optim.init_lr=1e30", "--optim.grad_clip=0",
              "--batch_size=4", "--data.length=64")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "a non-finite loss occurred" in res.stderr and "no checkpoint was written yet" in res.stderr


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    cfg = with_out(TINY_DISTILL, out, max_steps=4, ckpt_every=2)
    run(tmp_path, cfg)
    assert torch.load(out / "ckpt_prev.pt", weights_only=False)["step"] == 2
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:1000])        # damaged
    res = run(tmp_path, with_out(TINY_DISTILL, out, max_steps=6, ckpt_every=2))
    assert f"{out / 'ckpt.pt'} cannot be read" in res.stdout
    assert f"resumed from {out / 'ckpt_prev.pt'} at step 2" in res.stdout
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 6
    for name in ("ckpt.pt", "ckpt_prev.pt"):                           # both damaged: a clear stop
        (out / name).write_bytes(b"\x00" * 64)
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(with_out(TINY_DISTILL, out, max_steps=8)))
    res = cli(tmp_path, "--cfg", str(path))
    assert res.returncode != 0 and "no readable checkpoint" in res.stderr and "Traceback" not in res.stderr
    assert "ckpt_prev.pt" in res.stderr and "start the run afresh" in res.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_next_step_and_the_resumed_run_is_uninterrupted(tmp_path, sig):
    n = 8
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(tmp_path, with_out(TINY_DISTILL, straight, max_steps=n))
    cfg = with_out(TINY_DISTILL, stopped, max_steps=n, log_every=1, ckpt_every=100)
    proc = run(tmp_path, cfg, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not (stopped / "log.jsonl").is_file():
        time.sleep(0.05)
    while time.time() < deadline and len((stopped / "log.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, output
    step = torch.load(stopped / "ckpt.pt", weights_only=False)["step"]
    assert 2 <= step < n and f"checkpoint of step {step} saved" in output
    assert "resume with the same command" in output and "Traceback" not in output
    res = run(tmp_path, cfg)
    assert f"resumed from {stopped / 'ckpt.pt'} at step {step}" in res.stdout
    assert max_diff(params(straight), params(stopped)) < 1e-6


def test_a_second_run_in_the_same_out_dir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    out = tmp_path / "shared"
    cfg = with_out(TINY_DISTILL, out, max_steps=200, log_every=1)
    first = run(tmp_path, cfg, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.jsonl").is_file():
        time.sleep(0.05)
    res = cli(tmp_path, "--cfg", str(tmp_path / "shared.yaml"))
    assert res.returncode != 0 and "is in use by another run (pid" in res.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = run(tmp_path, with_out(TINY_DISTILL, out, max_steps=2, log_every=1))     # not stuck
    assert again.returncode == 0


def test_bad_images_are_counted_across_a_resume_and_reported_once(tmp_path):
    root = image_folder(tmp_path / "folder", classes=2, per_class=6)
    for c in ("class0", "class1"):
        (root / "train" / c / "broken.jpg").write_bytes(b"not an image")
    cfg = with_out(TINY_FOVEAL, tmp_path / "run", max_steps=6, batch_size=4, log_every=3, ckpt_every=3)
    cfg["data"] = {"dataset": "imagefolder", "root": str(root), "image_size": 48, "num_classes": 2}
    cfg["foveal"] = {**cfg["foveal"], "model": {**cfg["foveal"]["model"], "num_classes": 2}}
    res = run(tmp_path, cfg)                                          # 14 images: 2 epochs of 3 steps
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["bad_images"] for r in log] == [2, 4]                   # both broken files each epoch
    assert res.stdout.count("skipped a bad image") == 2               # each file named once
    run(tmp_path, with_out(cfg, tmp_path / "run", max_steps=9))          # resumed at step 6
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["bad_images"] == 6                                 # not restarted from 0


def test_the_log_shows_the_global_loss_and_the_run_is_alive_after_one_step(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    first = run(tmp_path, with_out(TINY_DISTILL, one, max_steps=2, log_every=2))
    second = run(tmp_path, with_out(TINY_DISTILL, two, max_steps=2, log_every=2), nproc=2)
    loss = lambda out: json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"]
    assert loss(one) == pytest.approx(loss(two), abs=1e-5)            # the mean over both processes
    assert "step 1 done in" in first.stdout and re.search(r"ETA \d\d:\d\d:\d\d", first.stdout)
    assert (second.stdout + second.stderr).count("RANDOMLY INITIALISED") == 1   # said once
