"""Shared test fixtures: the official reference tensors and deterministic threading."""
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import the top-level modules (fovea, canvit, ...)
REFERENCE = ROOT / "tests" / "reference"            # the official outputs (tests/reference/README.md)
WORKSPACE_REFERENCE = ROOT.parent / "shared" / "reference"   # where they came from, when present

# Two threads on the 2-core CI machine; TEST_THREADS=1 leaves a core to a run beside the tests.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", min(2, os.cpu_count() or 1))))

# The `distill` config section of a tiny CanViT run (64 px scenes, 4 x 4 canvas, 32 px glimpses)
# shared by the training and evaluation tests.
TINY_DISTILL_SECTION = {
    "glimpse_px": 32, "n_stats": 16,
    "model": {"backbone": {"embed_dim": 32, "num_heads": 1, "n_blocks": 2},
              "n_backbone_registers": 1, "n_canvas_registers": 2, "canvas_num_heads": 1,
              "canvas_head_dim": 32, "rw_stride": 1, "teacher_dim": 64},
    "teacher": {"backbone": {"embed_dim": 64, "num_heads": 1, "n_blocks": 1}}}


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """tests/reference: the official implementations' outputs, shipped with the project."""
    return REFERENCE


def load_reference(reference_dir: Path, relpath: str) -> dict:
    path = reference_dir / relpath
    if not path.is_file():
        raise FileNotFoundError(f"reference file {path} is missing (see tests/reference/README.md)")
    return torch.load(path, weights_only=False)


class LocalRun:
    """What train.py lends an objective's train_step, for one process without the loop:
    autocast off; optimizer_step() steps `opt` when given, else leaves the gradients for the
    test to read."""
    rank, world, device, steps_per_epoch, schedule_steps = 0, 1, torch.device("cpu"), 1000, 10_000

    def __init__(self, opt=None):
        self.opt, self.updates, self.frozen = opt, 0, []

    def autocast(self):
        return contextlib.nullcontext()

    def optimizer_step(self, frozen=()):
        self.updates += 1
        self.frozen.append(list(frozen))
        if self.opt is not None:
            for p in frozen:
                p.grad = None
            self.opt.step()
            self.opt.zero_grad()
