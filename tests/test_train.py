"""train.py: config, schedules, data order, and whole runs (DDP, resume, broken data).

The runs are real `python train.py` / `torchrun` subprocesses on tiny configs.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

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
    cfg, export = train.parse_config(["--cfg", str(p), "--foveal.model.depth=3", "--optim.lr", "2e-3",
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
    (["--objective=dino"], "unknown objective 'dino'"),
    (["--cfg", "no_such_config.yaml"], "config file 'no_such_config.yaml' not found"),
])
def test_bad_config_fails_with_a_clear_message(args, message):
    with pytest.raises(train.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        train.parse_config(args)


def test_bad_config_key_stops_the_run_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "canvit_tiny.yaml",
                          f"--out_dir={tmp_path / 'x'}", "--distill.modle.backbone.embed_dim=8"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    assert "unknown config key 'distill.modle'" in res.stderr
    assert not (tmp_path / "x").exists()


def test_every_shipped_config_parses(tmp_path):
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        cfg, _ = train.parse_config(["--cfg", str(p), f"--data.root={tmp_path}"])
        assert cfg.objective in ("distill", "foveal_sup", "vit_sup")


def test_a_dataset_root_must_be_set():
    with pytest.raises(train.ConfigError, match="data.root '' is not a folder"):
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


def test_sampler_partitions_ranks_and_resumes_mid_epoch():
    ds = list(range(50))
    samplers = [train.ResumableDistributedSampler(ds, 2, r, seed=5) for r in range(2)]
    for s in samplers:
        s.set_epoch(3)
    full = [list(s) for s in samplers]
    assert len(full[0]) == len(full[1]) == 25 and not set(full[0]) & set(full[1])
    samplers[1].skip = 10
    assert list(samplers[1]) == full[1][10:]
    samplers[1].set_epoch(4)
    assert list(samplers[1]) != full[1][10:]                         # a new permutation each epoch
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
