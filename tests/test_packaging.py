"""What `pip install .` (not editable) ships: every package of the source tree."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_installed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "segnet_cli").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
    assert "segnet_cli.weights" in listed  # the bundled model
