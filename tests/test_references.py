"""tests/reference: the shipped official outputs are those of the development workspace."""
import hashlib
from pathlib import Path

import pytest

from conftest import REFERENCE, WORKSPACE_REFERENCE

SHIPPED = sorted(p.relative_to(REFERENCE) for p in REFERENCE.rglob("*.pt"))


def test_every_shipped_file_is_described():
    readme = (REFERENCE / "README.md").read_text()
    assert len(SHIPPED) == 5
    for rel in SHIPPED:
        assert f"`{rel}`" in readme or f"`{rel.parent}/{rel.stem}" in readme, rel


@pytest.mark.parametrize("rel", SHIPPED, ids=str)
def test_shipped_copy_equals_the_original(rel: Path):
    original = WORKSPACE_REFERENCE / rel
    if not original.is_file():
        pytest.skip(f"the originals are not beside this clone ({WORKSPACE_REFERENCE})")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(REFERENCE / rel) == digest(original)
