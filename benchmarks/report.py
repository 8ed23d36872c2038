"""Markdown report of benchmark results: the issue's targets checked, then the full table.

    python benchmarks/run.py --json cpu.json
    python benchmarks/report.py cpu.json [more.json ...] > report.md

Each JSON file is what ``run.py --json`` writes. Several files are merged: a case run more than
once keeps its median run (the lower middle one for an even count), so repeated runs damp the
noise of a shared machine. The targets are checked on the float32
rows of each device against the eager baselines; the rows of ``run.py --compile`` (ours against
the compiled baseline, and both compiled) and of ``--self-check`` (the baseline against itself)
get tables of their own; the full table has one line per case and baseline, with both passes
side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Target:
    """A speed or memory target: ``value(row) >= minimum`` (or ``<= maximum``) on every row
    that ``applies`` selects."""

    name: str
    applies: Callable[[Row], bool]
    minimum: float | None = None
    maximum: float | None = None
    memory: bool = False

    def value(self, row: Row) -> float | None:
        value = row.get("memory_ratio") if self.memory else row.get("ratio")
        return None if value is None or math.isnan(value) else float(value)

    def describe(self) -> str:
        unit = "x the baseline's peak memory" if self.memory else "x"
        if self.minimum is not None:
            return f">= {self.minimum:.3g}{unit}"
        return f"<= {self.maximum:.3g}{unit}"

    def met(self, value: float) -> bool:
        if self.minimum is not None:
            return value >= self.minimum
        assert self.maximum is not None
        return value <= self.maximum


# The baseline names of ``run.py``'s extra rows: ours against the compiled baseline and both
# compiled (``--compile``), the baseline against itself (``--self-check``). The targets are set
# against the eager baselines; these get tables of their own.
COMPILED_BASELINE = "torch.compile(baseline)"
BOTH_COMPILED = "both compiled"
SELF_CHECK = "baseline against itself"
EXTRA_ROWS = (COMPILED_BASELINE, BOTH_COMPILED, SELF_CHECK)


def _is(op: str, pass_: str | None = None, layout: str | None = None) -> Callable[[Row], bool]:
    def applies(row: Row) -> bool:
        return (
            row["op"] == op
            and row["baseline"] not in EXTRA_ROWS
            and (pass_ is None or row["pass"] == pass_)
            and (layout is None or row["layout"] == layout)
        )

    return applies


# The speed issue's targets (CPU, float32). Ratios are baseline time / ours.
TARGETS = [
    Target("InstanceNorm forward", _is("instance_norm", "fwd"), minimum=3.0),
    Target("InstanceNorm forward+backward", _is("instance_norm", "fwd+bwd"), minimum=2.0),
    Target(
        "InstanceNorm channels_last forward",
        _is("instance_norm", "fwd", "channels_last"),
        minimum=3.0,
    ),
    Target(
        "InstanceNorm channels_last forward+backward",
        _is("instance_norm", "fwd+bwd", "channels_last"),
        minimum=3.0,
    ),
    # The same targets for a layer that tracks running statistics (no target of the issue's,
    # but the same drop-in claim).
    Target(
        "InstanceNorm track_running_stats forward", _is("instance_norm_tracked", "fwd"), minimum=3.0
    ),
    Target(
        "InstanceNorm track_running_stats forward+backward",
        _is("instance_norm_tracked", "fwd+bwd"),
        minimum=2.0,
    ),
    Target(
        "InstanceNorm track_running_stats channels_last forward+backward",
        _is("instance_norm_tracked", "fwd+bwd", "channels_last"),
        minimum=3.0,
    ),
    Target("BatchNorm (never slower)", _is("batch_norm"), minimum=1.0),
    Target("ConditionalInstanceNorm forward+backward", _is("cin", "fwd+bwd"), minimum=3.0),
    Target("AdaIN forward+backward", _is("adain", "fwd+bwd"), minimum=3.0),
    Target("AdaIN alpha=0.6 forward+backward", _is("adain_alpha", "fwd+bwd"), minimum=3.0),
    Target("stats.mean_std vs torch.var_mean", _is("mean_std", "fwd"), minimum=3.0),
    Target("gram_loss within 1.15x of bmm + mse_loss", _is("gram_loss"), minimum=1 / 1.15),
    Target("mean_std_loss vs the plain formula", _is("mean_std_loss"), minimum=2.0),
    Target("AdaIN peak memory", _is("adain", "fwd+bwd"), maximum=0.7, memory=True),
    Target("CIN peak memory", _is("cin", "fwd+bwd"), maximum=0.7, memory=True),
]


def load(paths: Iterable[str]) -> tuple[list[Row], list[str]]:
    """Rows of every file and their header lines. A case measured in several files (repeated
    runs) keeps the run with the median ratio, the lower of the middle two for an even count;
    peak memory comes from the ``--memory`` run, whose brief timings are not used."""
    runs: dict[tuple[Any, ...], list[Row]] = {}
    headers: list[str] = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows = data["rows"] if isinstance(data, dict) else data
        if isinstance(data, dict) and data.get("header") and data["header"] not in headers:
            headers.append(data["header"])
        memory_run = any("ours_peak_mib" in row for row in rows)
        for row in rows:
            row = {**row, "_memory_run": memory_run}
            key = tuple(row[k] for k in ("device", "op", "shape", "layout", "dtype", "pass"))
            runs.setdefault((*key, row["baseline"]), []).append(row)
    merged = []
    for rows in runs.values():
        extra = {k: v for row in rows for k, v in row.items() if k.endswith(("peak_mib", "_ratio"))}
        # Memory runs (--memory, timed briefly) give their peaks, not their times, where the
        # case has timing runs too.
        timing = [r for r in rows if not r["_memory_run"]] or rows
        timed = sorted(timing, key=lambda r: -math.inf if r["ratio"] is None else r["ratio"])
        merged.append({**extra, **timed[(len(timed) - 1) // 2]})
    return merged, headers


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if math.isclose(low, high, rel_tol=5e-3) else f"{low:.2f}x-{high:.2f}x"


def target_table(rows: list[Row]) -> list[str]:
    lines = [
        "| device | target | wanted | float32 measured | met | bfloat16 (no target) | "
        "bfloat16 into float32 layers (no target) |",
        "|---|---|---|---|---|---|---|",
    ]
    for device in sorted({row["device"] for row in rows}):
        for target in TARGETS:
            selected = [r for r in rows if r["device"] == device and target.applies(r)]
            f32 = [v for r in selected if r["dtype"] == "float32" if (v := target.value(r))]
            bf16 = [v for r in selected if r["dtype"] == "bfloat16" if (v := target.value(r))]
            mixed = [
                v for r in selected if r["dtype"] == "bfloat16/float32" if (v := target.value(r))
            ]
            if not f32 and not bf16 and not mixed:
                continue
            met = "-" if not f32 else ("yes" if all(target.met(v) for v in f32) else "**no**")
            f32_span, bf16_span, mixed_span = (_span(v) if v else "-" for v in (f32, bf16, mixed))
            lines.append(
                f"| {device} | {target.name} | {target.describe()} | {f32_span} | {met} | "
                f"{bf16_span} | {mixed_span} |"
            )
    return lines


def extra_table(rows: list[Row], baseline: str) -> list[str]:
    """The ratios of the rows with this extra baseline (:data:`EXTRA_ROWS`), per operation, pass
    and layout, over the shapes; none if no row has it."""
    extra = [r for r in rows if r["baseline"] == baseline and r["ratio"] is not None]
    if not extra:
        return []
    layouts = sorted({r["layout"] for r in extra}, key=lambda name: name != "contiguous")
    present = {(r["pass"], r["layout"]) for r in extra}
    columns = [(p, lay) for p in ("fwd", "fwd+bwd") for lay in layouts if (p, lay) in present]
    lines = [
        f"| device | op | dtype | {' | '.join(f'{p} {layout}' for p, layout in columns)} |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    cases: dict[tuple[str, str, str], list[Row]] = {}
    for row in extra:
        cases.setdefault((row["device"], row["op"], row["dtype"]), []).append(row)
    for (device, op, dtype), selected in cases.items():
        cells = []
        for pass_, layout in columns:
            ratios = [r["ratio"] for r in selected if (r["pass"], r["layout"]) == (pass_, layout)]
            cells.append(_span(ratios) if ratios else "-")
        lines.append(f"| {device} | {op} | {dtype} | {' | '.join(cells)} |")
    return lines


def full_table(rows: list[Row]) -> list[str]:
    lines = [
        "| device | op | shape | layout | dtype | fwd ms (ours / baseline) | fwd ratio | "
        "fwd+bwd ms (ours / baseline) | fwd+bwd ratio | fwd+bwd /clone (ours / baseline) | "
        "peak MiB (ours / baseline) | baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases: dict[tuple[Any, ...], dict[str, Row]] = {}
    for row in rows:
        key = tuple(row[k] for k in ("device", "op", "shape", "layout", "dtype", "baseline"))
        cases.setdefault(key, {})[row["pass"]] = row
    for (device, op, shape, layout, dtype, baseline), passes in cases.items():
        cells = []
        for name in ("fwd", "fwd+bwd"):
            row = passes.get(name)
            if row is None:
                cells += ["-", "-"]
                continue
            if row["ratio"] is None:  # the baseline did not run at this size
                cells += [f"{row['ours_ms']:.2f} / -", "-"]
            else:
                cells += [
                    f"{row['ours_ms']:.2f} / {row['baseline_ms']:.2f}",
                    f"{row['ratio']:.2f}x",
                ]
        both = passes.get("fwd+bwd")
        clone = "-"
        if both is not None:
            base = both["baseline_clone"]
            clone = f"{both['ours_clone']:.1f} / {'-' if base is None else f'{base:.1f}'}"
        memory = (
            f"{both['ours_peak_mib']:.0f} / {both['baseline_peak_mib']:.0f}"
            if both is not None and "ours_peak_mib" in both
            else "-"
        )
        lines.append(
            f"| {device} | {op} | {shape} | {layout} | {dtype} | {' | '.join(cells)} | {clone} | "
            f"{memory} | {baseline} |"
        )
    return lines


def report(paths: list[str]) -> str:
    rows, headers = load(paths)
    out = [f"{header}" for header in headers]
    out += ["", *target_table(rows)]
    titles = {
        COMPILED_BASELINE: "Ours against the compiled baseline (ratio = its time / ours):",
        BOTH_COMPILED: "Both compiled (ratio = compiled baseline / compiled ours):",
        SELF_CHECK: "The baseline against itself (ratio = its time / its time again: noise alone):",
    }
    for baseline, title in titles.items():
        extra = extra_table(rows, baseline)
        if extra:
            out += ["", title, "", *extra]
    out += ["", *full_table(rows)]
    return "\n".join(out).strip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="JSON files written by run.py --json")
    args = parser.parse_args(argv)
    sys.stdout.write(report(args.files))


if __name__ == "__main__":
    main()
