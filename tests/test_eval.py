"""eval.py: its config (train.py's system), the shared pieces, the command line's errors."""
import subprocess
import sys

import pytest
import torch

import eval as ev
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
    """Errors raised inside a protocol module reach the command line as one message."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args, message in ((["--ckpt", bad], "cannot be read"), (["--ckpt", tmp_path / "none.pt"], "not found")):
        res = subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args), "--out_dir",
                              str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_topk_hits_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 7, generator=gen), torch.randint(0, 7, (50,), generator=gen)
    for k in (1, 3, 7, 9):
        want = [float(labels[i].item() in sorted(range(7), key=lambda c: -logits[i, c].item())[:k])
                for i in range(50)]
        assert ev.hits(logits, labels, k).tolist() == want
