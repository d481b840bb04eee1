"""The layout rules (../shared/STYLE.md): no module of the package or of the benchmarks passes
400 lines."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "demask"
MAX_LINES = 400
MODULES = sorted(SRC.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def test_the_package_is_found():
    assert len(MODULES) > 20 and SRC / "train.py" in MODULES
    assert ROOT / "benchmarks" / "ablation.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_no_module_passes_400_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it"
