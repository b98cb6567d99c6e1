"""GPU checks: the CUDA path against the CPU, the official references, float32 and eager.

Every test is marked `cuda` and skips, with its reason, where torch sees no GPU, so the CPU CI
reports them skipped. Each takes seconds on a GPU; `python gpu_check.py` runs them first:
    python -m pytest -q -m cuda tests/test_cuda.py

  extraction      integral_image, box_patches (exact / nearest, eager / compiled) and
                  bilinear_glimpse on CUDA against the CPU
  references      CanViT's official rollout and DINOv3 on CUDA in float32, TF32 off, 1e-5
  precision       bf16 autocast rollouts of CanViT and of the foveal ViT against float32
  compile, AdamW  a compiled training step against the eager one; fused AdamW vs for-each
  train.py        a 1-GPU torchrun (NCCL) run of canvit_tiny and foveal_tiny; resume after a
                  SIGKILL on CUDA equal to an uninterrupted run
Each tolerance is derived where it is used.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import canvit
import fovea
from conftest import ROOT, load_reference
from test_canvit import perturbed, rollout_matches_reference, tiny_config
from test_fovea import tiny_foveal

# CUDA_CHECK_DEVICE=cpu runs the same code paths on the CPU (a dry run of the tests themselves,
# comparing the CPU with itself); a GPU run leaves it unset.
DEV = torch.device(os.environ.get("CUDA_CHECK_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEV.type == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]
F32_EPS = torch.finfo(torch.float32).eps           # 2^-23: the float32 ulp at 1


def to_device(x, dev):
    """Tensors anywhere in nested dicts / lists / tuples -> dev."""
    if torch.is_tensor(x):
        return x.to(dev)
    if isinstance(x, dict):
        return {k: to_device(v, dev) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, dev) for v in x)
    return x


@pytest.fixture
def no_tf32(monkeypatch):
    """float32 matmuls and convolutions in full float32 (TF32 keeps 10 mantissa bits: ~1e-3)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# ----------------------------------------------------------------------------------------------
# Extraction on CUDA = on the CPU
# ----------------------------------------------------------------------------------------------

def quantised_image(*shape, seed=0) -> torch.Tensor:
    """Pixels that are multiples of 2^-16 in [0, 1): every partial sum of up to 2^21 of them
    needs at most 37 significant bits, so a float64 running sum is exact in any order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** 16, shape, generator=g).float() / 2 ** 16


def test_integral_image_on_cuda_equals_the_cpu_table():
    """Exact equality, not a tolerance: the float64 sums of quantised pixels are exact whatever
    the order of the additions (CUDA's scan and the CPU's loop), and int64 sums always are."""
    for img in (quantised_image(2, 3, 300, 410), quantised_image(1, 3, 1024, 1536, seed=1)):
        cpu, gpu = fovea.integral_image(img), fovea.integral_image(img.to(DEV))
        assert gpu.sums.dtype == torch.float64 and gpu.sums.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(gpu.sums.cpu(), cpu.sums)
    u8 = (quantised_image(2, 3, 64, 80) * 256).to(torch.uint8)
    assert torch.equal(fovea.integral_image(u8.to(DEV)).sums.cpu(), fovea.integral_image(u8).sums)


def random_boxes(R: int, P: int, H: int, W: int, seed: int) -> torch.Tensor:
    """(R, P, 4) boxes of 1 px to twice the image, anywhere, many partly outside the image."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.empty(R, P, 2).uniform_(0, math.log(2 * max(H, W)), generator=g))
    y0 = torch.empty(R, P).uniform_(-0.3 * H, 1.1 * H, generator=g)
    x0 = torch.empty(R, P).uniform_(-0.3 * W, 1.1 * W, generator=g)
    return torch.stack([y0, x0, y0 + side[..., 0], x0 + side[..., 1]], -1)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "nearest"])
def test_box_patches_on_cuda_match_the_cpu(exact, compiled):
    """atol 1e-6: both devices compute in float64 from the same tables (equal, see above); only
    the order of additions and fused multiply-adds differ, ~1e-16 relative, ~1e-11 absolute on
    corner sums of up to ~1e5 that a cell mean then divides by its area. The float32 cast can
    round either way: 1 ulp, <= 6e-8 for values < 1. 1e-6 leaves a 16-ulp margin. Nearest
    corners snap y + 0.5 down; random boxes put no corner within 1e-11 px of a tie."""
    img = torch.rand(2, 3, 300, 410, generator=torch.Generator().manual_seed(2))
    rows = torch.arange(2).repeat_interleave(3)                  # 3 traces share each table
    gaze = torch.tensor([[0.1, -0.2], [0.8, 0.9], [-0.95, 0.3], [0.0, 0.0], [0.5, -0.7],
                         [-0.4, -0.4]])
    ctx = fovea.foveal_context(gaze, (300, 410), num_zoom=6, max_z=4.0, grid=3, grid_z=3.5)
    boxes = torch.cat([random_boxes(6, 24, 300, 410, seed=3), ctx.boxes], 1)     # (6, 33, 4)
    want = fovea.box_patches(fovea.integral_image(img).select(rows), boxes, 8, exact=exact,
                             compiled=False)
    got = fovea.box_patches(fovea.integral_image(img.to(DEV)).select(rows), boxes.to(DEV), 8,
                            exact=exact, compiled=compiled)
    assert got.device.type == DEV.type and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-6)


def test_bilinear_glimpse_on_cuda_matches_the_cpu():
    """float32 grid_sample on both sides: the sampling position is a float32 number of pixels
    (up to W), which the two devices may round differently (fused multiply-adds on the GPU),
    by about an ulp, W * 2^-23 px; a noise image in [0, 1] changes by up to 1 per pixel, so a
    value may move by about that much. atol = 4 ulps of W, plus 4 ulps of the value."""
    H, W = 256, 320
    scene = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(4))
    vp = canvit.random_viewpoints(3, torch.Generator().manual_seed(5))
    want = fovea.bilinear_glimpse(scene, vp.center_yx, vp.scale, 64)
    got = fovea.bilinear_glimpse(scene.to(DEV), vp.center_yx.to(DEV), vp.scale.to(DEV), 64)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=4 * W * F32_EPS + 4 * F32_EPS)


# ----------------------------------------------------------------------------------------------
# The official references on CUDA (float32, TF32 off): 1e-5 as on the CPU
# ----------------------------------------------------------------------------------------------

def test_canvit_matches_the_official_rollout_on_cuda(reference_dir, no_tf32):
    """Every tensor of the official rollout (tests/test_canvit.py), the model and the inputs on
    CUDA. 1e-5 (the references' tolerance): SDPA's CUDA kernels differ from an explicit softmax
    by ~1e-6 in float32, as the CPU one does."""
    ref = load_reference(reference_dir, "canvit/canvit_tiny_ref.pt")
    model = canvit.from_official(ref["state_dict"], ref["model_config"], ref["backbone_kwargs"])
    on_gpu = {**ref, **{k: to_device(ref[k], DEV) for k in ("scene", "init", "steps")}}
    worst = rollout_matches_reference(model.eval().to(DEV), on_gpu)
    print(f"CUDA: max abs diff over the reference rollout: {worst:.2e}")


@pytest.mark.parametrize("stress", [False, True], ids=["official", "stress"])
def test_dinov3_matches_official_on_cuda(reference_dir, no_tf32, stress):
    """The teacher on CUDA, float32: every output of the official DINOv3 at 1e-5."""
    ref = load_reference(reference_dir, "dinov3/dinov3_vits16_depth2_ref.pt")
    sd = {**ref["state_dict"], **(ref["stress_overrides"] if stress else {})}
    expected = ref["stress_outputs" if stress else "outputs"]
    model = canvit.load_dinov3(sd).eval().to(DEV)
    with torch.no_grad():
        out = model(ref["input"].to(DEV))
    for ours, theirs in [("cls", "x_norm_clstoken"), ("registers", "x_storage_tokens"),
                         ("patches", "x_norm_patchtokens"), ("prenorm", "x_prenorm")]:
        torch.testing.assert_close(out[ours].cpu(), expected[theirs], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bf16 autocast against float32 on CUDA
# ----------------------------------------------------------------------------------------------

def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_canvit_rollout_on_cuda_stays_close_to_float32():
    """The CPU test's bound (tests/test_canvit.py): canvas, coordinates, RoPE and VPE stay
    float32 under autocast [003, App. D.3], so over 5 glimpses of a noisy model the canvas and
    the predictions stay within 2% relative (Frobenius) error of float32 (CPU: ~0.5%). A
    canvas accumulated in bf16 (8 significant bits) would drift far past it."""
    torch.manual_seed(0)
    model = perturbed(canvit.CanViT(tiny_config())).eval().to(DEV)
    scene = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)).to(DEV)
    vps = canvit.policy_viewpoints("riid", 5, 2, torch.Generator().manual_seed(0))

    def rollout():
        state = model.init_state(2, 8)
        for t in range(5):
            center, scale = vps.center_yx[t].to(DEV), vps.scale[t].to(DEV)
            glimpse = fovea.bilinear_glimpse(scene, center, scale, 64)
            state = model(glimpse, state, center, scale).state
        return state, model.predict(state)
    with torch.no_grad():
        ref_state, ref_preds = rollout()
        with torch.autocast(DEV.type, torch.bfloat16):
            state, preds = rollout()
    assert state.canvas.dtype == torch.float32
    for name, a, b in [("canvas", state.canvas, ref_state.canvas),
                       ("patch predictions", preds.patches, ref_preds.patches),
                       ("CLS predictions", preds.cls, ref_preds.cls)]:
        assert relative(a, b) < 0.02, f"{name}: relative error {relative(a, b):.3f} under bf16"


def test_bf16_foveal_rollout_on_cuda_stays_close_to_float32():
    """6 glimpses of a noisy 4-block foveal ViT: the state within 3%, the logits within 5%
    relative (Frobenius) error of float32. Why: bf16 keeps 8 significant bits (2^-9 = 0.2% a
    rounding); 24 blocks of roughly independent roundings give ~0.2% x sqrt(24) ~ 1%, and the
    final LayerNorm of every step keeps the state's scale, so errors do not compound. CPU
    autocast (where even LayerNorm runs in bf16), seeds 0-3: state 0.9-1.1%, logits 0.9-1.8%."""
    torch.manual_seed(0)
    cfg = tiny_foveal(dim=64, depth=4, heads=4, num_state=4, num_zoom=4, max_z=3.0, grid=3,
                      grid_z=(2.5, 3.0), z_max=3.0, num_classes=10)
    model = perturbed(fovea.FovealViT(cfg)).eval().to(DEV)
    gen = torch.Generator().manual_seed(0)
    table = fovea.integral_image(torch.rand(4, 3, 96, 128, generator=gen).to(DEV))
    gazes = (torch.rand(6, 4, 2, generator=gen) * 1.8 - 0.9).to(DEV)

    def rollout():
        state = None
        for gaze in gazes:
            state = model.step(table, state, gaze)
        return state, model.classify(state)
    with torch.no_grad():
        ref_state, ref_logits = rollout()
        with torch.autocast(DEV.type, torch.bfloat16):
            state, logits = rollout()
    assert relative(state, ref_state) < 0.03, f"state: {relative(state, ref_state):.3f}"
    assert relative(logits, ref_logits) < 0.05, f"logits: {relative(logits, ref_logits):.3f}"


# ----------------------------------------------------------------------------------------------
# torch.compile and fused AdamW on CUDA
# ----------------------------------------------------------------------------------------------

class CudaRun:
    """conftest.LocalRun on CUDA: autocast off, optimizer_step() steps `opt`."""
    rank, world, device, steps_per_epoch, schedule_steps = 0, 1, DEV, 1000, 10_000

    def __init__(self, opt):
        self.opt, self.updates = opt, 0

    def autocast(self):
        return torch.autocast(DEV.type, enabled=False)

    def optimizer_step(self, frozen=()):
        self.updates += 1
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def test_compiled_training_step_equals_eager(no_tf32):
    """One FovealSupervised step (3 glimpses, MixUp, a backward a glimpse) from the same weights,
    the model compiled as train.py does (`model.compile()`, box_patches' own compiled twin
    inside) vs all eager. SGD, so that the update is -lr * gradient and the comparison reads
    the gradients themselves (Adam's first step is ~lr * sign(g) and hides their size).
    Bound, per parameter tensor: |delta_c - delta_e| <= 1e-4 max |delta_e| + 2^-22 max |theta|.
    The fused kernels reorder float32 sums (~1e-6 relative an op; 1e-4 leaves a 100x margin
    over the few dozen ops of the backward); the second term is the rounding of theta - lr g.
    A wrong graph (a missing detach, a dropped term) is O(1) off."""
    lr = 0.5
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 48, 64, generator=gen).to(DEV),
             "label": torch.randint(5, (4,), generator=gen).to(DEV)}
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = fovea.FovealTrainConfig(model=tiny_foveal(compile_extraction=compiled), steps=3,
                                      mixup_alpha=0.8)
        obj = fovea.FovealSupervised(cfg, seed=0).to(DEV)
        before = {k: v.detach().clone() for k, v in obj.model.named_parameters()}
        if compiled:
            obj.model.compile()
        out = obj.train_step(batch, 7, CudaRun(torch.optim.SGD(obj.model.parameters(), lr=lr)))
        after = dict(obj.model.named_parameters())
        results[compiled] = (out["loss"].item(), {k: after[k].detach() - before[k] for k in before},
                             before)
    (loss_e, delta_e, theta), (loss_c, delta_c, _) = results[False], results[True]
    assert math.isclose(loss_c, loss_e, rel_tol=1e-5), (loss_c, loss_e)
    assert [k for k, d in delta_e.items() if not d.any()] == []       # every parameter learns
    for k in delta_e:
        bound = 1e-4 * delta_e[k].abs().max() + 2 * F32_EPS * theta[k].abs().max()
        diff = (delta_c[k] - delta_e[k]).abs().max()
        assert diff <= bound, f"{k}: compiled vs eager update differs by {diff:.2e} > {bound:.2e}"


def test_fused_adamw_matches_foreach():
    """train.py's AdamW(fused=True) on CUDA vs the for-each one: 5 steps of the same gradients,
    two parameter groups (decay / none, as train.param_groups), a warm-up of the learning rate.
    Both compute the same float32 formula in another order: each step rounds theta twice (the
    decay, the update), half an ulp each on either side, so they may part by 2 ulps a step,
    ulp(theta) <= |theta| 2^-23, plus a few ulps of the update (<= lr): after n steps
    |diff| <= n * 2^-23 (2 max |theta| + 4 lr)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (3, 5, 7), (48,), (1,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 10 ** -i for i, s in enumerate(shapes)]
             for _ in range(5)]
    lr = 1e-2
    final = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(p.to(DEV, copy=True)) for p in init]
        opt = torch.optim.AdamW([{"params": params[:2], "weight_decay": 0.05},
                                 {"params": params[2:], "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.999), fused=fused, foreach=not fused)
        for step, step_grads in enumerate(grads):
            for g in opt.param_groups:
                g["lr"] = lr * (step + 1) / len(grads)
            for p, g in zip(params, step_grads):
                p.grad = g.to(DEV)
            opt.step()
        final[fused] = [p.detach().cpu() for p in params]
    for a, b in zip(final[False], final[True]):
        bound = len(grads) * F32_EPS * (2 * a.abs().max().item() + 4 * lr)
        assert (a - b).abs().max().item() <= bound
    assert not torch.equal(final[True][0], init[0])


# ----------------------------------------------------------------------------------------------
# train.py on CUDA: a 1-GPU torchrun (NCCL), and resuming after a SIGKILL
# ----------------------------------------------------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cfg", ["canvit_tiny.yaml", "foveal_tiny.yaml"])
def test_torchrun_one_gpu(tmp_path, cfg):
    """torchrun's env:// rendezvous on one GPU takes the NCCL path of train.py; bf16 autocast,
    as the configs advise on a GPU. Finite losses at every step, the run on cuda."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "train.py"), "--cfg", cfg, "--max_steps=3", "--log_every=1",
           "--num_workers=0", "--dtype=bfloat16", f"--out_dir={out}"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert f"1 process(es) on {DEV.type}" in res.stdout, res.stdout[-2000:]
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log), log


# train.py with the kernels pinned to deterministic ones, so that two runs can be compared at
# 1e-6: SDPA's math backend (the flash / memory-efficient backwards accumulate with atomics),
# deterministic algorithms where torch has them (a warning where it has none: the float64
# cumsum of the summed-area table), cuBLAS with a fixed workspace. What is tested is resuming.
DETERMINISTIC = ("import runpy, sys, torch; "
                 "torch.use_deterministic_algorithms(True, warn_only=True); "
                 "torch.backends.cuda.enable_flash_sdp(False); "
                 "torch.backends.cuda.enable_mem_efficient_sdp(False); "
                 "torch.backends.cuda.enable_cudnn_sdp(False); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_resume_after_sigkill_on_cuda_matches_an_uninterrupted_run(tmp_path):
    """tests/test_train.py's CPU test on CUDA (foveal_tiny): SIGKILL after a step-k checkpoint
    (a checkpoint every step), the same command again, the final weights equal to an
    uninterrupted run's at 1e-6: the optimizer state, RNG states and data position come back
    from the checkpoint on the GPU."""
    n = 40
    env = {**ENV, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def cmd(out, *extra):
        return [sys.executable, "-c", DETERMINISTIC, str(ROOT / "train.py"), "--cfg",
                "foveal_tiny.yaml", f"--out_dir={out}", f"--max_steps={n}", "--log_every=1",
                "--num_workers=0", "--foveal.model.compile_extraction=false", *extra]

    def finish(args):
        res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"train.py failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(cmd(straight))
    proc = subprocess.Popen(cmd(killed, "--ckpt_every=1"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:   # the step-4 log line follows the
        log = killed / "log.jsonl"                            # step-3 checkpoint
        if log.is_file() and log.read_text().count("\n") >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(killed / "ckpt.pt", weights_only=False)["step"]
    assert 3 <= step_at_kill < n, f"killed at step {step_at_kill} of {n}"
    res = finish(cmd(killed, "--ckpt_every=1"))
    assert f"resumed from {killed / 'ckpt.pt'} at step {step_at_kill}" in res.stdout
    a = torch.load(straight / "ckpt.pt", weights_only=False)
    b = torch.load(killed / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == n and a["model"].keys() == b["model"].keys()
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item()
               for k in a["model"] if a["model"][k].numel())
    assert diff < 1e-6, f"resumed run differs from the uninterrupted one by {diff:.2e}"
