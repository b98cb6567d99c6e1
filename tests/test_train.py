"""train.py: config, schedules, data order, and whole runs (DDP, resume, broken data).

Whole runs are train.py's command line on tiny configs: in this process (`cli`, what `python
train.py` runs) where the process boundary does not matter, in forked gloo processes for 2
processes against 1, and as real `python train.py` / `torchrun` subprocesses where it does (a
SIGKILL, a signal, a second process asking for the lock, the launcher itself).
"""
import contextlib
import gzip
import io
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

import data
import dino
import eval as ev
import fovea
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


def write_config(tmp: Path, cfg: dict | Path) -> Path:
    """A config dict written to tmp/<out_dir name>.yaml (a path is used as it is)."""
    if not isinstance(cfg, dict):
        return cfg
    path = tmp / (Path(cfg["out_dir"]).name + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp: Path, cfg: dict | Path, *extra: str, expect_error: bool = False) -> str:
    """train.py's command line in this process on a config (file or dict) -> what it printed;
    with expect_error, the one message it ends with instead (a failure otherwise)."""
    out, threads, cwd = io.StringIO(), torch.get_num_threads(), os.getcwd()
    os.chdir(tmp)
    try:
        with contextlib.redirect_stdout(out):
            message = train.cli(["--cfg", str(write_config(tmp, cfg)), *extra])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    if expect_error:
        assert message is not None, out.getvalue()[-2000:]
        return message
    assert message is None, f"train.py failed: {message}\n{out.getvalue()[-3000:]}"
    return out.getvalue()


def _rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    message = train.cli(argv)
    if message:
        raise SystemExit(message)


def run_processes(tmp: Path, cfg: dict, *extra: str, nproc: int = 2) -> None:
    """train.py in `nproc` processes forked from this one (gloo, env:// rendezvous, as torchrun
    sets it up), without importing torch again in each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--cfg", str(write_config(tmp, cfg)), *extra]
    mp.start_processes(_rank, args=(nproc, port, argv), nprocs=nproc, join=True, start_method="fork")


def subprocess_run(tmp: Path, cfg: dict | Path, *extra: str, nproc: int = 1, wait: bool = True,
                   timeout: int = 300):
    """Run `python train.py` (or torchrun) in a subprocess; wait=False: the Popen, running."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, str(ROOT / "train.py"), "--cfg", str(write_config(tmp, cfg)), *extra]
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
    message = run(tmp_path, ROOT / "configs" / "canvit_tiny.yaml", f"--out_dir={tmp_path / 'x'}",
                  "--distill.modle.backbone.embed_dim=8", expect_error=True)
    assert "unknown config key 'distill.modle'" in message
    assert not (tmp_path / "x").exists()


def test_the_config_list_gives_each_config_one_complete_line():
    """`python train.py` lists the configs, each with the whole first sentence of its header."""
    for p in (ROOT / "configs").glob("*.yaml"):
        line = train.config.describe(p)
        assert line.endswith(".") and "\n" not in line and 20 < len(line) <= 110, (p.name, line)
    listing = train.usage()
    assert all(f"{p.name:24} {train.config.describe(p)}" in listing for p in (ROOT / "configs").glob("*.yaml"))


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
    # The tiny SSL recipes keep DINO's prototype freeze and temperature warm-up: prototypes trained
    # from step 0 flatten the teacher's targets (README, "Sequential-to-global DINO").
    for name in ["dino_tiny.yaml"] + (["dino_fmnist_tiny.yaml"] if fmnist else []):
        k = cfg(name).dino
        assert k.freeze_last_layer_epochs == 1 and (k.warmup_teacher_temp, k.warmup_teacher_temp_epochs) == (0.04, 30)
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
# Whole runs: processes
# ---------------------------------------------------------------------------------------------

def test_torchrun_two_processes_log_the_global_loss(tmp_path):
    """The launcher users run: torchrun, 2 processes on the README's tiny config; its log holds
    the mean loss over both processes (the 1-process run of the same global batch logs the
    same), the first line comes after step 1, and the random teacher is announced once."""
    args = ["--max_steps=2", "--log_every=1", "--num_workers=0", "--batch_size=4", "--distill.n_stats=16"]
    res = subprocess_run(tmp_path, ROOT / "configs" / "canvit_tiny.yaml", *args, f"--out_dir={tmp_path / 'two'}",
                         nproc=2)
    printed = run(tmp_path, ROOT / "configs" / "canvit_tiny.yaml", *args, f"--out_dir={tmp_path / 'one'}")
    logs = {n: [json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    assert [r["step"] for r in logs["two"]] == [1, 2] and "2 process(es)" in res.stdout
    for a, b in zip(logs["one"], logs["two"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert "step 1 done in" in printed and re.search(r"ETA \d\d:\d\d:\d\d", printed)
    assert (res.stdout + res.stderr).count("RANDOMLY INITIALISED") == 1


def test_the_foveal_recipe_reads_the_badge_in_enough_episodes_a_step(tmp_path):
    """foveal_tiny's early plateau: with random gazes only about one gaze in seven lands on the badge
    that carries the label, so a step's gradient comes from the few episodes that saw it (at batch 16,
    about 2 per glimpse, and seeds sat at ln 10 for 1,000+ steps, one for all 4,000). The recipe must
    give at least 16 such episodes per glimpse, counted on its own scenes and random gazes."""
    cfg = train.parse_config(["--cfg", "foveal_tiny.yaml", f"--data.root={tmp_path}"])[0]
    obj = train.build_objective(cfg)
    ds = data.build_dataset(cfg.data, "train")
    hits = []
    for step in range(4):
        batch = data.collate([ds[step * cfg.batch_size + i] for i in range(cfg.batch_size)])
        gen = torch.Generator().manual_seed(step)
        episode = fovea.episode_patches(obj.model, obj.cfg, gen, cfg.batch_size, (64, 64), "cpu")
        hits.append(ev.on_target(episode, batch["target"], square=False))           # (T,)
    per_glimpse = torch.stack(hits).mean()
    assert 0.08 * cfg.batch_size < per_glimpse < 0.25 * cfg.batch_size      # one gaze in 4-12 on the badge
    assert per_glimpse >= 16, f"{per_glimpse:.1f} episodes a glimpse see the badge"


@pytest.mark.parametrize("name", ["distill", "foveal_sup", "vit_sup", "dino", "grpo"])
def test_objectives_do_not_depend_on_the_process_count(tmp_path, name):
    """2 processes x b = 1 process x 2b: MixUp, random gazes, the ImageFolder training
    augmentation, DINO's views and photometric augmentation, GRPO's traces, the distillation's
    rollouts are drawn for the global batch, and Sinkhorn-Knopp and KoLeo run over it."""
    one, two = tmp_path / "one", tmp_path / "two"
    if name == "distill":
        cfg = with_out(TINY_DISTILL, one, max_steps=3)
    elif name == "dino":
        # Weights after one step (Adam's first updates amplify float noise: 3e-8 after one step,
        # 2e-5 after three), and the logged loss, KoLeo and teacher entropy of two steps, which
        # move when Sinkhorn-Knopp or KoLeo see only part of the batch.
        cfg = with_out(TINY_DINO, one, max_steps=2, log_every=1, ckpt_every=1)
    elif name == "grpo":                     # a policy on a frozen foveal_sup encoder
        run(tmp_path, with_out(TINY_FOVEAL, tmp_path / "encoder", max_steps=1))
        cfg = {**{k: v for k, v in TINY_FOVEAL.items() if k != "foveal"}, "objective": "grpo", "max_steps": 2,
               "out_dir": str(one), "grpo": {"encoder": str(tmp_path / "encoder" / "ckpt.pt"), "group": 4,
                                             "steps": 2, "inner_epochs": 2, "policy": {"dim": 16, "heads": 2}}}
    else:                                    # the ImageFolder training augmentation too
        cfg = dict(TINY_FOVEAL if name == "foveal_sup" else TINY_VIT, out_dir=str(one))
        cfg["data"] = {"dataset": "imagefolder", "root": str(image_folder(tmp_path / "folder")),
                       "image_size": 48, "num_classes": 2}
        if name == "foveal_sup":
            cfg["foveal"] = {**cfg["foveal"], "model": {**cfg["foveal"]["model"], "num_classes": 2}}
        else:
            cfg["vit"] = {**cfg["vit"], "num_classes": 2}
    run(tmp_path, cfg)
    run_processes(tmp_path, with_out(cfg, two))
    if name == "dino":
        first = {out: torch.load(out / "ckpt_prev.pt", weights_only=False) for out in (one, two)}
        assert max_diff(first[one]["model"], first[two]["model"]) < 1e-6
        assert max_diff(first[one]["extra"]["teacher"], first[two]["extra"]["teacher"]) < 1e-6
    else:
        assert max_diff(params(one), params(two)) < 1e-5
    keys = {"dino": ("loss", "dino_loss", "koleo", "teacher_entropy", "prototypes_used"),
            "grpo": ("loss", "reward", "acc_1", "acc_2", "clip_frac")}.get(name, ("loss",))
    logs = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (one, two)]
    for a, b in zip(*logs):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])
    if name == "distill":      # the comparison has teeth: a third of a step's update is far above it
        run(tmp_path, with_out(cfg, tmp_path / "one_more", max_steps=4))
        assert max_diff(params(one), params(tmp_path / "one_more")) > 1e-4


def test_the_dino_log_line_shows_collapse_and_stagnation(tmp_path):
    """The signs a user watches (collapse_stats) are on dino's log line, and log.jsonl has them
    with the gradient norms of backbone and head and the prototypes' mean g."""
    printed = run(tmp_path, with_out(TINY_DINO, tmp_path / "d", max_steps=2, log_every=1))
    line = [l for l in printed.splitlines() if l.startswith("step       2/")][0]
    for key in dino.DINOSequentialToGlobal.log_keys:
        assert f"| {key} " in line, (key, line)
    record = json.loads((tmp_path / "d" / "log.jsonl").read_text().splitlines()[-1])
    assert record["grad_backbone"] > 0 and record["grad_head"] > 0 and record["weight_g"] == pytest.approx(1.0)
    assert 0 <= record["view_match"] <= 1 and record["marginal_entropy"] <= math.log(16) + 1e-6


def test_a_run_is_repeatable_on_one_machine(tmp_path):
    """The same command twice gives bit-identical weights (foveal_tiny's settings: threads 1).
    Exact on one machine; another CPU kind rounds float32 matrix products differently."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run(tmp_path, with_out(TINY_FOVEAL, out, max_steps=4, threads=1))
    assert max_diff(params(outs[0]), params(outs[1])) == 0


# ---------------------------------------------------------------------------------------------
# Resuming, preemption, the lock
# ---------------------------------------------------------------------------------------------

def test_a_killed_run_with_workers_restarts_at_once_and_resumes_exactly(tmp_path):
    """SIGKILL (an OOM kill, a node failure) with DataLoader workers on: while the run lives a
    second run in its out_dir is refused; right after the kill the same command runs (the lock
    died with the process, not with its orphaned workers) and resumes the newest checkpoint,
    ending with the weights of an uninterrupted run."""
    n = 10
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(tmp_path, with_out(TINY_DISTILL, straight, max_steps=n))
    cfg = with_out(TINY_DISTILL, killed, max_steps=n, ckpt_every=1, num_workers=2)
    proc = subprocess_run(tmp_path, cfg, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:                                     # kill after a step-k checkpoint
        try:
            if torch.load(killed / "ckpt.pt", weights_only=False)["step"] >= 4:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.05)
    message = run(tmp_path, cfg, expect_error=True)
    assert f"out_dir = '{killed}' is in use by another run (pid {proc.pid}" in message
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(killed / "ckpt.pt", weights_only=False)["step"]
    assert 4 <= step_at_kill < n
    (killed / "ckpt.pt.tmp99999").write_bytes(b"\x00" * 100)          # a write cut short
    printed = run(tmp_path, cfg)                                      # the same command, at once
    assert f"resumed from {killed / 'ckpt.pt'} at step {step_at_kill}" in printed
    assert not list(killed.glob("ckpt.pt.tmp*"))
    assert torch.load(killed / "ckpt.pt", weights_only=False)["step"] == n
    assert max_diff(params(straight), params(killed)) < 1e-6


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """An uninterrupted 8-step TINY_DISTILL run, the reference of the preemption tests."""
    tmp = tmp_path_factory.mktemp("straight")
    run(tmp, with_out(TINY_DISTILL, tmp / "straight", max_steps=8))
    return tmp / "straight"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_next_step_and_the_resumed_run_is_uninterrupted(tmp_path, sig, straight_run):
    stopped = tmp_path / "stopped"
    cfg = with_out(TINY_DISTILL, stopped, max_steps=8, log_every=1, ckpt_every=100)
    proc = subprocess_run(tmp_path, cfg, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not (stopped / "log.jsonl").is_file():
        time.sleep(0.05)
    while time.time() < deadline and len((stopped / "log.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, output
    step = torch.load(stopped / "ckpt.pt", weights_only=False)["step"]
    assert 2 <= step < 8 and f"checkpoint of step {step} saved" in output
    assert "resume with the same command" in output and "Traceback" not in output
    printed = run(tmp_path, cfg)
    assert f"resumed from {stopped / 'ckpt.pt'} at step {step}" in printed
    assert max_diff(params(straight_run), params(stopped)) < 1e-6


def test_ckpt_pt_exists_at_every_moment_of_a_save(tmp_path, monkeypatch):
    """A kill can land between any two file operations of a save: each is made to fail in turn
    (as if the process died there), and ckpt.pt must still read as the old or the new step, and
    ckpt_prev.pt, where it exists, as the old one."""
    real_replace, calls = os.replace, []
    ckpt = lambda step: {"step": step, "model": {}, "config": {}}

    def dies_at(k):
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == k:
                raise KeyboardInterrupt("killed")
            real_replace(src, dst)
        return replace
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        out.mkdir()
        train.save_checkpoint(out / "ckpt.pt", ckpt(1))
        calls.clear()
        monkeypatch.setattr(os, "replace", dies_at(k))
        with pytest.raises(KeyboardInterrupt):
            train.save_checkpoint(out / "ckpt.pt", ckpt(2))
        monkeypatch.setattr(os, "replace", real_replace)
        assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 1, k
        if (out / "ckpt_prev.pt").exists():
            assert torch.load(out / "ckpt_prev.pt", weights_only=False)["step"] == 1
    train.save_checkpoint(out / "ckpt.pt", ckpt(3))                      # and a whole save rotates
    assert [torch.load(out / n, weights_only=False)["step"] for n in ("ckpt.pt", "ckpt_prev.pt")] == [3, 1]


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    run(tmp_path, with_out(TINY_DISTILL, out, max_steps=4, ckpt_every=2))
    assert torch.load(out / "ckpt_prev.pt", weights_only=False)["step"] == 2
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:1000])        # damaged
    printed = run(tmp_path, with_out(TINY_DISTILL, out, max_steps=6, ckpt_every=2))
    assert f"{out / 'ckpt.pt'} cannot be read" in printed
    assert f"resumed from {out / 'ckpt_prev.pt'} at step 2" in printed
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 6
    for name in ("ckpt.pt", "ckpt_prev.pt"):                           # both damaged: a clear stop
        (out / name).write_bytes(b"\x00" * 64)
    message = run(tmp_path, with_out(TINY_DISTILL, out, max_steps=8), expect_error=True)
    assert "no readable checkpoint" in message and "ckpt_prev.pt" in message and "start the run afresh" in message


def test_resume_refuses_a_different_experiment(tmp_path):
    out = tmp_path / "exp"
    run(tmp_path, with_out(TINY_DISTILL, out, max_steps=2))
    config_before = (out / "config.yaml").read_text()
    message = run(tmp_path, tmp_path / "exp.yaml", "--optim.lr=0.1", expect_error=True)
    assert "optim.lr=0.002" in message
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


# ---------------------------------------------------------------------------------------------
# Data: broken images, exported features, real folders
# ---------------------------------------------------------------------------------------------

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
    printed = run(tmp_path, cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["bad_images"] > 0
    assert "skipped a bad image" in printed


def test_bad_images_are_counted_across_a_resume_and_reported_once(tmp_path):
    root = image_folder(tmp_path / "folder", classes=2, per_class=6)
    for c in ("class0", "class1"):
        (root / "train" / c / "broken.jpg").write_bytes(b"not an image")
    cfg = with_out(TINY_FOVEAL, tmp_path / "run", max_steps=6, batch_size=4, log_every=3, ckpt_every=3)
    cfg["data"] = {"dataset": "imagefolder", "root": str(root), "image_size": 48, "num_classes": 2}
    cfg["foveal"] = {**cfg["foveal"], "model": {**cfg["foveal"]["model"], "num_classes": 2}}
    printed = run(tmp_path, cfg)                                      # 14 images: 2 epochs of 3 steps
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["bad_images"] for r in log] == [2, 4]                   # both broken files each epoch
    assert printed.count("skipped a bad image") == 2                  # each file named once
    run(tmp_path, with_out(cfg, tmp_path / "run", max_steps=9))          # resumed at step 6
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["bad_images"] == 6                                 # not restarted from 0


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


def test_every_data_error_is_one_message_and_leaves_nothing(tmp_path):
    """Real folders that do not fit the config: a missing train/ folder, fewer class folders than
    data.num_classes, a split without images, a model whose class count differs from the data's,
    a single class; and eval.py on a folder without val/. Each a one-line refusal naming the
    problem, before any work: no traceback, no out_dir left behind."""
    base = with_out(TINY_FOVEAL, tmp_path / "never")
    seven = image_folder(tmp_path / "seven", classes=7, per_class=1)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "b").mkdir()
    cases = [({"root": str(tmp_path)}, f"{str(tmp_path / 'train')!r} is not a folder: data.root must hold train/"),
             ({"root": str(seven)}, f"data.num_classes = 10, but {str(seven / 'train')!r} has 7 class folders: "
                                    "set --data.num_classes=7"),
             ({"root": str(empty), "num_classes": 2}, "the split is empty"),
             ({"root": str(seven), "num_classes": 0}, "foveal.model.num_classes = 10, but the data"),
             ({"root": str(image_folder(tmp_path / "one", classes=1)), "num_classes": 0},
              "foveal.model.num_classes = 10, but the data")]
    for data, expected in cases:
        cfg = {**base, "data": {"dataset": "imagefolder", "image_size": 48, **data}}
        assert expected in run(tmp_path, cfg, expect_error=True)
        assert not (tmp_path / "never").exists()
    cfg = {**base, "data": {"dataset": "imagefolder", "image_size": 48, "root": str(image_folder(tmp_path / "single", classes=1)),
                            "num_classes": 0}}
    assert "a single class leaves nothing to learn" in run(tmp_path, cfg, "--foveal.model.num_classes=1",
                                                           expect_error=True)
    two = image_folder(tmp_path / "two", classes=2)
    cfg = with_out(TINY_FOVEAL, tmp_path / "trained", max_steps=1)
    cfg["data"] = {"dataset": "imagefolder", "root": str(two), "image_size": 48, "num_classes": 2}
    cfg["foveal"] = {**cfg["foveal"], "model": {**cfg["foveal"]["model"], "num_classes": 2}}
    run(tmp_path, cfg)
    message = ev.cli(["--ckpt", str(tmp_path / "trained" / "ckpt.pt"), "--out_dir", str(tmp_path / "e")])
    assert f"{str(two / 'val')!r} is not a folder" in message


# ---------------------------------------------------------------------------------------------
# Failing early and clearly, losing nothing
# ---------------------------------------------------------------------------------------------

def test_the_command_prints_one_message_and_no_traceback(tmp_path):
    """`python train.py` runs `cli`: no --cfg says what to run, --help lists the objectives and
    configs, --print_config shows the resolved keys, a bad value is one message."""
    cli = lambda *args: subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                                       text=True, cwd=tmp_path, timeout=120)
    res = cli()
    assert res.returncode != 0 and "no --cfg given" in res.stderr and "Traceback" not in res.stderr
    for p in (ROOT / "configs").glob("*.yaml"):
        assert p.name in res.stderr
    helped = cli("--help")
    assert helped.returncode == 0 and "--print_config" in helped.stdout
    assert "objectives: distill, foveal_sup, vit_sup" in helped.stdout and "foveal_tiny.yaml" in helped.stdout
    shown = cli("--cfg", "foveal_tiny.yaml", "--print_config", "--optim.lr=0.5", "--log_every=0")
    assert shown.returncode != 0 and "log_every = 0" in shown.stderr and "Traceback" not in shown.stderr
    shown = run(tmp_path, ROOT / "configs" / "foveal_tiny.yaml", "--print_config", "--optim.lr=0.5")
    assert yaml.safe_load(shown)["optim"]["lr"] == 0.5


def test_bad_values_are_refused_before_any_work_in_one_message(tmp_path):
    out = tmp_path / "never"
    foveal_tiny = ROOT / "configs" / "foveal_tiny.yaml"
    message = run(tmp_path, foveal_tiny, f"--out_dir={out}", "--log_every=0", "--batch_size=0",
                  "--max_steps=-1", "--num_workers=-1", "--data.dataset=imagefolderr", expect_error=True)
    for key in ("log_every = 0", "batch_size = 0", "max_steps = -1", "num_workers = -1",
                "data.dataset = 'imagefolderr': one of synthetic, imagefolder, ade20k"):
        assert key in message, (key, message)
    assert not out.exists()                                           # nothing was made
    message = run(tmp_path, foveal_tiny, f"--out_dir={out}", "--data.target_min=0.8", "--data.target_max=0.95",
                  expect_error=True)                                  # a badge that cannot fit
    assert "data.target_max = 0.95: from data.target_min (0.8) to 0.909 of the side" in message
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
        message = run(tmp_path, ROOT / "configs" / "foveal_fmnist_tiny.yaml", f"--out_dir={out}",
                      f"--data.root={root}", "--data.item_min=0", "--data.item_max=1.5", "--data.clutter=-1",
                      "--data.fragment_px=29", "--data.scene=object", "--data.num_classes=5", expect_error=True)
        for key in (says, "apt-get install dataset-fashion-mnist", "data.item_min = 0", "data.item_max = 1.5",
                    "data.clutter = -1", "data.fragment_px = 29", "data.scene = 'object'", "data.num_classes = 5"):
            assert key in message, (key, message)
        assert not out.exists()


def test_a_yaml_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: foveal_sup\noptim: {lr: 1e-3\nmax_steps: 3\n")
    assert f"{bad}: not valid YAML (line 3" in run(tmp_path, bad, expect_error=True)


def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    message = run(tmp_path, ROOT / "configs" / "foveal_tiny.yaml", f"--out_dir={blocker / 'run'}", "--max_steps=1",
                  expect_error=True)
    assert f"out_dir = '{blocker / 'run'}' is not writable" in message


def test_a_non_finite_loss_stops_and_says_what_was_kept(tmp_path):
    message = run(tmp_path, ROOT / "configs" / "foveal_tiny.yaml", f"--out_dir={tmp_path / 'nan'}",
                  "--max_steps=6", "--log_every=1", "--num_workers=0", "--optim.lr=1e30", "--optim.init_lr=1e30",
                  "--optim.grad_clip=0", "--batch_size=4", "--data.length=64", expect_error=True)
    assert "a non-finite loss occurred" in message and "no checkpoint was written yet" in message
