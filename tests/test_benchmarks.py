"""Smoke test: the benchmark suite runs every operation on tiny shapes (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def test_quick_run_covers_every_op(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _load("stylenorm_benchmarks", SUITE, monkeypatch)
    # The default allocator: the steady one would change malloc settings of the test process.
    args = ["--quick", "--layouts", "contiguous,channels_last", "--allocator", "default"]
    args += ["--devices", "cpu"]  # on a CUDA machine the suite would add the CUDA rows
    rows = module.main(args)
    ops = {row["op"] for row in rows}
    assert ops == set(module.OPS)
    # every op: 2 layouts x 2 dtypes x (fwd, fwd+bwd); the layers a third, mixed precision
    assert len(rows) == (len(module.OPS) * 2 + len(module.MIXED_OPS)) * 2 * 2
    mixed = {row["op"] for row in rows if row["dtype"] == "bfloat16/float32"}
    assert mixed == module.MIXED_OPS
    for row in rows:
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0
        assert math.isclose(row["ratio"], row["baseline_ms"] / row["ours_ms"], rel_tol=1e-9)
    out = capsys.readouterr().out
    assert "| ratio |" in out and "torch.nn.InstanceNorm2d" in out


def test_quick_run_with_compile_and_self_check_adds_their_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = _load("stylenorm_benchmarks", SUITE, monkeypatch)
    # aot_eager: the same capture and autograd tracing as inductor, without a C++ compiler.
    args = ["--quick", "--ops", "instance_norm,cin", "--layouts", "channels_last"]
    args += ["--dtypes", "float32", "--allocator", "default", "--compile", "--self-check"]
    args += ["--devices", "cpu"]
    rows = module.main([*args, "--compile-backend", "aot_eager"])
    extra = (module.COMPILED_BASELINE, module.BOTH_COMPILED, module.SELF_CHECK)
    baselines = {(row["op"], row["baseline"]) for row in rows}
    assert baselines == {
        (op, name)
        for op, eager in (("instance_norm", "torch.nn.InstanceNorm2d"), ("cin", "plain formula"))
        for name in (eager, *extra)
    }
    assert len(rows) == 2 * 4 * 2  # ops x baselines x passes
    assert all(row["ratio"] > 0 for row in rows)
    # the report tables these rows apart by the same names
    report = _load("stylenorm_benchmarks_report", SUITE.with_name("report.py"), monkeypatch)
    assert report.EXTRA_ROWS == extra


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)
def test_steady_allocator_is_set_and_named(tmp_path: Path) -> None:
    # In its own process: the suite's default switches glibc's trimming off for the timed loops.
    out = tmp_path / "steady.json"
    args = ["--quick", "--ops", "mean_std", "--layouts", "contiguous", "--dtypes", "float32"]
    subprocess.run([sys.executable, str(SUITE), *args, "--json", str(out)], check=True)
    header = json.loads(out.read_text())["header"]
    assert header.endswith("glibc no-trim, mmap threshold 32 MiB, input mean 0.5")


def _load(name: str, path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_report_of_a_quick_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = _load("stylenorm_benchmarks_run", SUITE, monkeypatch)
    report = _load("stylenorm_benchmarks_report", SUITE.with_name("report.py"), monkeypatch)
    out = tmp_path / "quick.json"
    rows = suite.main(["--quick", "--json", str(out), "--allocator", "default", "--devices", "cpu"])
    text = report.report([str(out)])
    assert text.startswith("stylenorm benchmarks, ")
    # one full-table line per (op, layout, dtype) case, both passes on it
    case_lines = [line for line in text.splitlines() if line.startswith("| cpu | ")]
    ops = {row["op"] for row in rows}
    for op in ops:
        assert any(f"| cpu | {op} | 2x4x8x8 |" in line for line in case_lines)
    assert "| cpu | InstanceNorm forward | >= 3x |" in text


def test_report_flags_a_missed_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    report = _load("stylenorm_benchmarks_report", SUITE.with_name("report.py"), monkeypatch)
    row = {
        "device": "cpu",
        "op": "instance_norm",
        "shape": "8x64x64x64",
        "layout": "contiguous",
        "dtype": "float32",
        "ours_ms": 1.0,
        "ours_clone": 1.0,
        "baseline_clone": 2.0,
        "baseline": "torch.nn.InstanceNorm2d",
    }
    rows = [
        {**row, "pass": "fwd", "baseline_ms": 2.0, "ratio": 2.0},  # below the 3x target
        {**row, "pass": "fwd+bwd", "baseline_ms": 2.5, "ratio": 2.5},  # above the 2x target
        # mixed precision: its own column, no target
        {**row, "pass": "fwd+bwd", "dtype": "bfloat16/float32", "baseline_ms": 0.9, "ratio": 0.9},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    lines = report.report([str(path)]).splitlines()
    assert "| cpu | InstanceNorm forward | >= 3x | 2.00x | **no** | - | - |" in lines
    assert "| cpu | InstanceNorm forward+backward | >= 2x | 2.50x | yes | - | 0.90x |" in lines


def test_report_keeps_the_median_run_and_memory_from_the_memory_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    report = _load("stylenorm_benchmarks_report", SUITE.with_name("report.py"), monkeypatch)
    base = _cin_row(baseline_ms=10.0)
    paths = []
    for k, ours_ms in enumerate((1.0, 4.0, 2.0)):  # ratios 10, 2.5, 5: the median is 5
        path = tmp_path / f"run{k}.json"
        path.write_text(json.dumps([{**base, "ours_ms": ours_ms, "ratio": 10.0 / ours_ms}]))
        paths.append(str(path))
    memory = {**base, "ours_ms": 10.0, "ratio": 1.0, "ours_peak_mib": 16.0}
    memory.update(baseline_peak_mib=48.0, memory_ratio=1 / 3)
    path = tmp_path / "memory.json"
    path.write_text(json.dumps([memory]))
    rows, _ = report.load([str(path), *paths])
    assert len(rows) == 1
    assert rows[0]["ratio"] == 5.0  # not the memory run's brief timing
    assert rows[0]["memory_ratio"] == 1 / 3
    rows, _ = report.load(paths[:2])  # ratios 10 and 2.5: the lower middle one
    assert rows[0]["ratio"] == 2.5


def test_report_keeps_compiled_and_self_check_rows_out_of_the_targets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    report = _load("stylenorm_benchmarks_report", SUITE.with_name("report.py"), monkeypatch)
    rows = [
        _cin_row(baseline_ms=5.0),
        _cin_row(baseline=report.COMPILED_BASELINE, baseline_ms=0.5),
        _cin_row(layout="channels_last", baseline=report.COMPILED_BASELINE, baseline_ms=1.5),
        _cin_row(baseline=report.BOTH_COMPILED, baseline_ms=2.0),
        _cin_row(baseline=report.SELF_CHECK, ours_ms=5.0, baseline_ms=4.5),
    ]
    for r in rows:
        r.update(ratio=r["baseline_ms"] / r["ours_ms"])
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    lines = report.report([str(path)]).splitlines()
    # the 0.5x against the compiled formula does not count against the 3x target
    assert (
        "| cpu | ConditionalInstanceNorm forward+backward | >= 3x | 5.00x | yes | - | - |" in lines
    )
    header = "| device | op | dtype | fwd+bwd contiguous | fwd+bwd channels_last |"
    assert lines[lines.index(header) + 2] == "| cpu | cin | float32 | 0.50x | 1.50x |"
    header = "| device | op | dtype | fwd+bwd contiguous |"
    assert lines[lines.index(header) + 2] == "| cpu | cin | float32 | 2.00x |"
    self_check = lines.index(
        "The baseline against itself (ratio = its time / its time again: noise alone):"
    )
    assert lines[self_check + 4] == "| cpu | cin | float32 | 0.90x |"


def _cin_row(**fields: Any) -> dict[str, Any]:
    """A row as run.py writes it, for a CIN forward+backward case (contiguous float32 at
    8x64x64x64, ours 1 ms, against the plain formula), with ``fields`` replacing those."""
    row: dict[str, Any] = {
        "device": "cpu",
        "op": "cin",
        "shape": "8x64x64x64",
        "layout": "contiguous",
        "dtype": "float32",
        "pass": "fwd+bwd",
        "ours_ms": 1.0,
        "ours_clone": 1.0,
        "baseline_clone": 2.0,
        "baseline": "plain formula",
    }
    row.update(fields)
    return row
