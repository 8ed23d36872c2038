"""Smoke test: the benchmark suite runs every operation on tiny shapes (no timing checks)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def test_quick_run_covers_every_op(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("stylenorm_benchmarks", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    rows = module.main(["--quick", "--layouts", "contiguous,channels_last"])
    ops = {row["op"] for row in rows}
    assert ops == set(module.OPS)
    # every op: 2 layouts x 2 dtypes x (fwd, fwd+bwd)
    assert len(rows) == len(module.OPS) * 2 * 2 * 2
    for row in rows:
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0
        assert math.isclose(row["ratio"], row["baseline_ms"] / row["ours_ms"], rel_tol=1e-9)
    out = capsys.readouterr().out
    assert "| ratio |" in out and "torch.nn.InstanceNorm2d" in out
