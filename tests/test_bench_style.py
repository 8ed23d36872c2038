"""Smoke test: the style benchmark's quick mode runs and reports every case (no timing checks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_style.py"


def test_quick_mode_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_style", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    cases = {(row["case"], row["layout"], row["pass"]) for row in rows}
    assert len(cases) == len(rows) == 3 * 2 * 2  # 3 cases x 2 layouts x (fwd, fwd+bwd)
    assert all(row["ours"] > 0 and row["plain"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert "ratio" in out and "AdaIN" in out and "CIN" in out
