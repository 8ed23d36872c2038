"""stylenorm benchmark suite: our time against a baseline's, side by side in one process.

    python benchmarks/run.py                    # the full table on this machine's CPU (and CUDA)
    python benchmarks/run.py --quick            # tiny shapes, a smoke run
    python benchmarks/run.py --ops adain,cin --shapes 8x64x64x64 --memory

For each operation, shape, layout (contiguous / channels_last) and dtype (float32 / bfloat16, and
for the layers ``bfloat16/float32``: bfloat16 activations into a float32 layer, mixed precision)
it times forward and forward+backward of stylenorm and of its baseline with
``torch.utils.benchmark``, alternating the two (``--rounds`` times) so drifts of the machine hit
both alike, and prints the medians, their ratio (baseline / ours: above 1 means stylenorm is
faster), and each time divided by one ``clone()`` of the input (the memory-bandwidth yardstick).
Baselines: ``torch.nn`` for the drop-in layers, and the plain formula people copy (separate
mean/var/expand ops) for everything else. ``--compile`` adds two rows per case: ours against
``torch.compile`` of the baseline, and both compiled (what a user who compiles the model gets).
``--self-check`` adds a row that times the baseline against itself, alternated the same way:
its ratio would be 1 on a quiet machine, so its spread is what noise alone does to a ratio.
``--memory`` measures the peak memory of one forward+backward of each side in a fresh
process (on CPU the growth of the peak RSS after a warm-up, Linux only; ``max_memory_allocated``
on CUDA).

Times are steady-state: every case is warmed up first, and with glibc (``--allocator steady``,
the default) the process keeps freed memory instead of handing it back to the system
(``mallopt``: trimming off, mmap threshold at its 32 MiB maximum), as a caching allocator does.
With glibc's dynamic defaults (``--allocator default``) a freed block of a few MiB is returned
to the system or kept depending on what was freed before, so a timed loop pays a page fault per
4 KiB of every output, or none, from one run to the next: either side's time then swings up to
4x between runs of the same code. Figures use torch's default thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.benchmark import Timer

import stylenorm
from stylenorm import functional as SF

SHAPES = [(8, 64, 64, 64), (4, 256, 32, 32), (1, 64, 256, 256), (16, 32, 64, 64)]
QUICK_SHAPES = [(2, 4, 8, 8)]
EPS = 1e-5
NUM_STYLES = 4
# The plain MMD formula builds M x M kernel matrices: at 64x64 maps (M = 4096) one
# forward+backward takes 10 s here, so it runs up to 32x32 maps only.
MMD_BASELINE_MAX_POSITIONS = 1024

Fn = Callable[[], Tensor]


@dataclasses.dataclass
class Case:
    """Both sides of one benchmark: ``ours(x)`` and ``baseline(x)`` return a tensor to sum."""

    ours: Callable[[Tensor], Tensor]
    baseline: Callable[[Tensor], Tensor] | None  # None: the baseline cannot run at this size
    baseline_name: str


# Baseline names of the rows that ``--compile`` and ``--self-check`` add (benchmarks/report.py
# tables them apart).
COMPILED_BASELINE = "torch.compile(baseline)"
BOTH_COMPILED = "both compiled"
SELF_CHECK = "baseline against itself"


# ---------------------------------------------------------------- plain formulas (baselines)
def plain_mean_std(x: Tensor, correction: int = 0) -> tuple[Tensor, Tensor]:
    dims = tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=correction)
    return mean, (var + EPS).sqrt()


def plain_gram(x: Tensor) -> Tensor:
    n, c = x.shape[:2]
    f = x.reshape(n, c, -1)
    return torch.bmm(f, f.transpose(1, 2)) / (c * f.shape[-1])


def _style_for(x: Tensor) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    style = 2.0 + 3.0 * torch.randn(x.shape, generator=gen)
    style = style.to(device=x.device, dtype=x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        style = style.contiguous(memory_format=torch.channels_last)
    return style


def parse_dtype(name: str) -> tuple[torch.dtype, torch.dtype]:
    """``"bfloat16"``: input and parameters in bfloat16; ``"bfloat16/float32"``: bfloat16 input
    through a float32 module (mixed precision, for :data:`MIXED_OPS` only)."""
    input_name, _, param_name = name.partition("/")
    return getattr(torch, input_name), getattr(torch, param_name or input_name)


def make_case(op: str, x: Tensor, param_dtype: torch.dtype | None = None) -> Case:
    """Both sides of ``op`` for input ``x``; the layers' parameters and buffers in
    ``param_dtype`` (``x.dtype`` by default)."""
    n, c = x.shape[:2]
    dev, dt = x.device, param_dtype or x.dtype
    if op in ("instance_norm", "instance_norm_tracked"):
        options = {"affine": True, "track_running_stats": op == "instance_norm_tracked"}
        ours_in = stylenorm.InstanceNorm2d(c, **options, device=dev, dtype=dt)
        torch_in = nn.InstanceNorm2d(c, **options, device=dev, dtype=dt)
        return Case(ours_in, torch_in, "torch.nn.InstanceNorm2d")
    if op == "batch_norm":
        ours_bn = stylenorm.BatchNorm2d(c, device=dev, dtype=dt)
        torch_bn = nn.BatchNorm2d(c, device=dev, dtype=dt)
        return Case(ours_bn, torch_bn, "torch.nn.BatchNorm2d")
    if op == "mean_std":

        def ours_ms(t: Tensor) -> Tensor:
            mean, std = stylenorm.stats.mean_std(t)
            return mean + std

        def plain_ms(t: Tensor) -> Tensor:
            mean, std = plain_mean_std(t)
            return mean + std

        return Case(ours_ms, plain_ms, "torch.var_mean")
    if op == "cin":
        cin = stylenorm.ConditionalInstanceNorm2d(c, NUM_STYLES, device=dev, dtype=dt)
        with torch.no_grad():
            cin.weight.uniform_(0.5, 1.5)
            cin.bias.uniform_(-1, 1)
        ids = torch.arange(n, device=dev) % NUM_STYLES

        def plain_cin(t: Tensor) -> Tensor:
            mean, std = plain_mean_std(t)
            gamma = cin.weight[ids].reshape(n, c, 1, 1)
            beta = cin.bias[ids].reshape(n, c, 1, 1)
            return (t - mean) / std * gamma + beta

        return Case(lambda t: cin(t, ids), plain_cin, "plain formula")
    if op in ("adain", "adain_alpha"):
        style = _style_for(x)
        adain = stylenorm.AdaIN()
        alpha = 1.0 if op == "adain" else 0.6

        def plain_adain(t: Tensor) -> Tensor:
            c_mean, c_std = plain_mean_std(t)
            s_mean, s_std = plain_mean_std(style)
            out = (t - c_mean) / c_std * s_std + s_mean
            return out if alpha == 1.0 else alpha * out + (1 - alpha) * t

        def ours_adain(t: Tensor) -> Tensor:
            return adain(t, style, alpha=alpha)

        return Case(ours_adain, plain_adain, "plain formula")
    if op == "gram_matrix":
        return Case(SF.gram_matrix, plain_gram, "bmm / (C*M)")
    if op == "gram_loss":
        style = _style_for(x)
        loss = stylenorm.GramLoss(style)
        target = plain_gram(style)

        def plain_gram_loss(t: Tensor) -> Tensor:
            return F.mse_loss(plain_gram(t), target.expand(t.shape[0], c, c))

        return Case(loss, plain_gram_loss, "bmm + mse_loss")
    if op == "mean_std_loss":
        style = _style_for(x)
        loss = stylenorm.MeanStdLoss(style)
        s_mean, s_std = plain_mean_std(style)

        def plain_ms_loss(t: Tensor) -> Tensor:
            mean, std = plain_mean_std(t)
            return F.mse_loss(mean, s_mean) + F.mse_loss(std, s_std)

        return Case(loss, plain_ms_loss, "var_mean + mse_loss")
    if op == "mmd_loss":
        style = _style_for(x)
        positions = x[0, 0].numel()
        if positions > MMD_BASELINE_MAX_POSITIONS:
            gib = 3 * n * positions**2 * x.element_size() / 2**30
            return Case(
                lambda t: SF.mmd_loss(t, style),
                None,
                f"kernel matrices skipped: {gib:.1f} GiB",
            )

        def plain_mmd(t: Tensor) -> Tensor:
            # Biased MMD^2 with k(a, b) = (a.b)^2 from the kernel matrices (Li et al. 2017).
            fx, fy = t.flatten(2), style.flatten(2)
            kxx = torch.bmm(fx.transpose(1, 2), fx).square().mean((1, 2))
            kyy = torch.bmm(fy.transpose(1, 2), fy).square().mean((1, 2))
            kxy = torch.bmm(fx.transpose(1, 2), fy).square().mean((1, 2))
            return (kxx + kyy - 2 * kxy).mean()

        return Case(lambda t: SF.mmd_loss(t, style), plain_mmd, "kernel matrices")
    raise ValueError(f"unknown op {op!r}")


OPS = [
    "instance_norm",
    "instance_norm_tracked",
    "batch_norm",
    "cin",
    "adain",
    "adain_alpha",
    "mean_std",
    "gram_matrix",
    "gram_loss",
    "mean_std_loss",
    "mmd_loss",
]
# The ops with parameters, which a mixed-precision dtype ("bfloat16/float32") applies to; the
# other ops skip it.
MIXED_OPS = {"instance_norm", "instance_norm_tracked", "batch_norm"}


# ---------------------------------------------------------------- timing
# glibc mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64 bits.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


def steady_allocator() -> str:
    """Make glibc keep freed memory for reuse (no trimming, blocks up to 32 MiB from the heap),
    so timed loops measure the kernels and not page faults; returns a description for the
    table's title. Tensors above 32 MiB are still mmapped and faulted in on every allocation."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default allocator"
    mallopt = ctypes.CDLL("libc.so.6").mallopt  # int mallopt(int param, int value)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    trim_off = mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1: never trim
    if mmap_set and trim_off:
        return "glibc no-trim, mmap threshold 32 MiB"
    return f"glibc, mallopt refused: mmap threshold set {mmap_set}, trimming off {trim_off}"


def _output_grad(out: Tensor, cache: dict[str, Tensor]) -> Tensor | None:
    """The gradient fed to ``out``'s backward: ones in ``out``'s own dtype and layout, what the
    next layer of a network delivers (a channels_last output gets a channels_last gradient);
    None for a scalar (a loss). Kept in ``cache`` so it is not allocated in the timed loop."""
    if out.dim() == 0:
        return None
    grad = cache.get("grad")
    if grad is None or grad.shape != out.shape or grad.stride() != out.stride():
        grad = cache["grad"] = torch.ones_like(out)
    return grad


def _runner(fn: Callable[[Tensor], Tensor], x: Tensor, backward: bool) -> Fn:
    if not backward:

        def forward_only() -> Tensor:
            with torch.no_grad():
                return fn(x)

        return forward_only
    xg = x.detach().clone().requires_grad_()
    cache: dict[str, Tensor] = {}

    def forward_backward() -> Tensor:
        out = fn(xg)
        out.backward(_output_grad(out, cache))
        xg.grad = None
        return out

    return forward_backward


def _median_seconds(fn: Fn, min_run_time: float) -> float:
    # Timer runs single-threaded unless told: time with the thread count torch uses by default.
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_pair(ours: Fn, baseline: Fn, rounds: int, min_run_time: float) -> tuple[float, float]:
    for fn in (ours, baseline):
        fn()
        fn()
    ours_times, base_times = [], []
    for _ in range(rounds):
        ours_times.append(_median_seconds(ours, min_run_time))
        base_times.append(_median_seconds(baseline, min_run_time))
    ours_times.sort()
    base_times.sort()
    return ours_times[len(ours_times) // 2], base_times[len(base_times) // 2]


def make_input(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: str, offset: float = 0.5
) -> Tensor:
    """Standard normal features shifted by ``offset`` (their mean), in ``layout``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = offset + torch.randn(shape, generator=gen)
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def peak_memory(
    op: str,
    side: str,
    shape: tuple[int, ...],
    layout: str,
    dtype: str,
    device: str,
    offset: float = 0.5,
) -> float:
    """Peak extra memory (MiB) of one forward+backward after a warm-up one: on CPU in a fresh
    process (the growth of its peak RSS), on CUDA in this one (the caching allocator's
    ``max_memory_allocated``, which counts live tensors only)."""
    if device == "cuda":
        return _peak_mib(op, side, shape, layout, dtype, device, offset)
    args = [
        sys.executable,
        __file__,
        "--_measure",
        json.dumps([op, side, shape, layout, dtype, device, offset]),
    ]
    # Every allocation above 64 KiB mmapped and returned on free: RSS then follows live tensors
    # instead of glibc's cached heap.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_mib(
    op: str,
    side: str,
    shape: tuple[int, ...],
    layout: str,
    dtype: str,
    device: str,
    offset: float,
) -> float:
    """One warm-up forward+backward (one-time allocations: thread pools, library workspaces,
    the output gradient), then the peak extra memory (MiB) of a second one: the caching
    allocator's on CUDA, the growth of this process's peak RSS on CPU."""
    input_dtype, param_dtype = parse_dtype(dtype)
    x = make_input(tuple(shape), layout, input_dtype, device, offset)
    case = make_case(op, x, param_dtype)
    fn = case.ours if side == "ours" else case.baseline
    assert fn is not None
    xg = x.detach().clone().requires_grad_()
    cache: dict[str, Tensor] = {}

    def forward_backward() -> None:
        out = fn(xg)
        out.backward(_output_grad(out, cache))

    forward_backward()
    xg.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # Reset the peak-RSS high-water mark to the current RSS (Linux), then measure the peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status("VmRSS")
    forward_backward()
    return max(_proc_status("VmHWM") - before, 0) / 2**20


def _measure(spec: str) -> None:
    """``--_measure``: :func:`_peak_mib` of a JSON case, in the fresh process ``peak_memory``
    starts."""
    print(_peak_mib(*json.loads(spec)))


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke)")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of ops")
    parser.add_argument("--shapes", default=None, help="e.g. 8x64x64x64,4x256x32x32")
    parser.add_argument("--layouts", default="contiguous,channels_last")
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16,bfloat16/float32",
        help="input dtypes; A/B: A input through a module in B (the layers only)",
    )
    parser.add_argument("--devices", default=None, help="cpu,cuda (default: all available)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of ours/baseline")
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also ours against torch.compile of the baseline, and both compiled",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend for --compile"
    )
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="also the baseline against itself: the spread that noise alone gives a ratio",
    )
    parser.add_argument(
        "--offset",
        type=float,
        default=0.5,
        help="mean of the standard normal input features; above 1, contiguous instance norm "
        "(and CIN, AdaIN) takes its precise path in forward+backward (the forward, timed "
        "without a gradient, only above 30)",
    )
    parser.add_argument("--memory", action="store_true", help="measure peak fwd+bwd memory")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--allocator",
        choices=("steady", "default"),
        default="steady",
        help="steady: glibc keeps freed memory (no page faults in timed loops); default: as is",
    )
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        _measure(args._measure)
        return []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rounds, min_run_time = (1, 0.01) if args.quick else (args.rounds, args.min_run_time)
    devices = (
        args.devices.split(",")
        if args.devices
        else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    )
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")

    allocator = steady_allocator() if args.allocator == "steady" else "default allocator"
    title = (
        f"stylenorm benchmarks, {datetime.date.today()}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, threads={torch.get_num_threads()}, "
        f"{allocator}, input mean {args.offset:g}"
    )
    if "cuda" in devices and torch.cuda.is_available():
        title += f", {torch.cuda.get_device_name()}"
    print(f"# {title}")
    header = (
        "| device | op | shape | layout | dtype | pass | ours ms | baseline ms | "
        "ratio | ours/clone | baseline/clone | baseline |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows: list[dict[str, Any]] = []
    for device in devices:
        for op in ops:
            for shape in shapes:
                for layout in args.layouts.split(","):
                    for dtype_name in args.dtypes.split(","):
                        rows.extend(
                            _bench_one(
                                op, shape, layout, dtype_name, device, rounds, min_run_time, args
                            )
                        )
                        if args.json:  # after every case: a run cut short keeps its rows
                            _write_json(args.json, title, rows)
    if args.json:
        _write_json(args.json, title, rows)
    return rows


def _write_json(path: str, title: str, rows: list[dict[str, Any]]) -> None:
    """Write the rows through a temporary file, so that a run killed mid-write leaves the last
    complete file."""
    with open(path + ".tmp", "w") as f:
        json.dump({"header": title, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)


def _row(
    case: tuple[str, str, str, str, str],
    backward: bool,
    ours_s: float,
    base_s: float | None,
    clone_s: float,
    base_name: str,
) -> dict[str, Any]:
    """One result row; ``base_s`` is None where the baseline cannot run at this size."""
    device, op, shape, layout, dtype_name = case
    return {
        "device": device,
        "op": op,
        "shape": shape,
        "layout": layout,
        "dtype": dtype_name,
        "pass": "fwd+bwd" if backward else "fwd",
        "ours_ms": ours_s * 1e3,
        "baseline_ms": None if base_s is None else base_s * 1e3,
        "ratio": None if base_s is None else base_s / ours_s,
        "ours_clone": ours_s / clone_s,
        "baseline_clone": None if base_s is None else base_s / clone_s,
        "baseline": base_name,
    }


def _print_row(row: dict[str, Any]) -> None:
    def cell(key: str, spec: str) -> str:
        return "-" if row[key] is None else format(row[key], spec)

    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    line = (
        f"| {row['device']} | {row['op']} | {row['shape']} | {row['layout']} | {row['dtype']} | "
        f"{row['pass']} | {cell('ours_ms', '.3f')} | {cell('baseline_ms', '.3f')} | "
        f"{ratio} | {cell('ours_clone', '.1f')} | {cell('baseline_clone', '.1f')} "
        f"| {row['baseline']} |"
    )
    if "memory_ratio" in row:
        line += (
            f" peak MiB {row['ours_peak_mib']:.0f} vs {row['baseline_peak_mib']:.0f}"
            f" ({row['memory_ratio']:.2f}x) |"
        )
    print(line, flush=True)


def _bench_one(
    op: str,
    shape: tuple[int, ...],
    layout: str,
    dtype_name: str,
    device: str,
    rounds: int,
    min_run_time: float,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    input_dtype, param_dtype = parse_dtype(dtype_name)
    if param_dtype != input_dtype and op not in MIXED_OPS:
        return []
    x = make_input(shape, layout, input_dtype, device, args.offset)
    case = make_case(op, x, param_dtype)
    clone_s = _median_seconds(lambda: x.clone(), min_run_time)
    key = (device, op, "x".join(map(str, shape)), layout, dtype_name)
    rows = []
    if case.baseline is None:  # ours alone
        for backward in (False, True):
            fn = _runner(case.ours, x, backward)
            fn()
            ours_s = sorted(_median_seconds(fn, min_run_time) for _ in range(rounds))[rounds // 2]
            rows.append(_row(key, backward, ours_s, None, clone_s, case.baseline_name))
            _print_row(rows[-1])
        return rows
    sides = [(case.baseline_name, case.ours, case.baseline)]
    if args.compile:
        # A fresh compiler cache per case: the formulas are closures of one code object, and
        # past torch._dynamo's recompile limit a case would silently run uncompiled.
        torch._dynamo.reset()
        backend = args.compile_backend
        compiled_baseline = torch.compile(case.baseline, backend=backend)
        sides.append((COMPILED_BASELINE, case.ours, compiled_baseline))
        sides.append((BOTH_COMPILED, torch.compile(case.ours, backend=backend), compiled_baseline))
    if args.self_check:
        sides.append((SELF_CHECK, case.baseline, case.baseline))
    for backward in (False, True):
        for base_name, ours_fn, base_fn in sides:
            ours_s, base_s = time_pair(
                _runner(ours_fn, x, backward), _runner(base_fn, x, backward), rounds, min_run_time
            )
            row = _row(key, backward, ours_s, base_s, clone_s, base_name)
            if args.memory and backward and base_name == case.baseline_name:
                where = (shape, layout, dtype_name, device, args.offset)
                ours_mb = peak_memory(op, "ours", *where)
                base_mb = peak_memory(op, "baseline", *where)
                row.update(
                    ours_peak_mib=ours_mb,
                    baseline_peak_mib=base_mb,
                    memory_ratio=ours_mb / base_mb if base_mb else float("nan"),
                )
            rows.append(row)
            _print_row(row)
    return rows


if __name__ == "__main__":
    main()
