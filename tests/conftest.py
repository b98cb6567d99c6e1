"""Shared test fixtures: the official reference tensors and deterministic threading."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import the top-level modules (fovea, canvit, ...)
REFERENCE = ROOT.parent / "shared" / "reference"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """`../shared/reference` beside the project root; tests that need it skip without it."""
    if not REFERENCE.is_dir():
        pytest.skip(f"official reference tensors not found at {REFERENCE} "
                    "(they sit beside the project in the development workspace and in CI)")
    return REFERENCE


def load_reference(reference_dir: Path, relpath: str) -> dict:
    path = reference_dir / relpath
    if not path.is_file():
        pytest.skip(f"reference file {path} is missing")
    return torch.load(path, weights_only=False)
