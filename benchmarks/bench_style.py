"""Conditional instance norm and AdaIN: stylenorm against the plain formula, side by side.

The plain formula is what most code writes: ``torch.var_mean`` over the spatial dims, then
``(x - mean) / sqrt(var + eps) * scale + shift`` as separate broadcast ops. Both run in one process,
interleaved, with ``torch.utils.benchmark.Timer`` on ``torch.get_num_threads()`` threads; ratio
> 1 means stylenorm is faster. Usage::

    python benchmarks/bench_style.py          # shapes (8, 64, 64, 64) and (4, 256, 32, 32)
    python benchmarks/bench_style.py --quick  # tiny shapes, a smoke test
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.benchmark import Timer

from stylenorm import functional

EPS = 1e-5


def plain_cin(x: Tensor, ids: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    gamma, beta = weight[ids][:, :, None, None], bias[ids][:, :, None, None]
    return (x - mean) / torch.sqrt(var + EPS) * gamma + beta


def plain_adain(content: Tensor, style: Tensor, alpha: float) -> Tensor:
    var_c, mean_c = torch.var_mean(content, dim=(2, 3), keepdim=True, correction=0)
    var_s, mean_s = torch.var_mean(style, dim=(2, 3), keepdim=True, correction=0)
    out = (content - mean_c) / torch.sqrt(var_c + EPS) * torch.sqrt(var_s + EPS) + mean_s
    return alpha * out + (1 - alpha) * content


def ours_cin(x: Tensor, ids: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return functional.conditional_instance_norm(x, ids, weight, bias, EPS)


def ours_adain(content: Tensor, style: Tensor, alpha: float) -> Tensor:
    return functional.adain(content, style, alpha=alpha, eps=EPS)


def _time(fn: Callable[[], object], min_run_time: float) -> float:
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def _forward_backward(fn: Callable[[], Tensor], inputs: Sequence[Tensor]) -> Callable[[], object]:
    def run() -> object:
        out = fn()
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def _cases(
    shape: tuple[int, int, int, int], channels_last: bool
) -> list[tuple[str, Callable[[], Tensor], Callable[[], Tensor], list[Tensor]]]:
    n, c = shape[0], shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    style = (2 + 3 * torch.randn(shape, generator=gen)).contiguous(memory_format=fmt)
    style.requires_grad_()
    weight = torch.rand(8, c, generator=gen).requires_grad_()
    bias = torch.randn(8, c, generator=gen).requires_grad_()
    ids = torch.randint(0, 8, (n,), generator=gen)
    return [
        (
            "CIN ids",
            lambda: ours_cin(x, ids, weight, bias),
            lambda: plain_cin(x, ids, weight, bias),
            [x, weight, bias],
        ),
        (
            "AdaIN",
            lambda: ours_adain(x, style, 1.0),
            lambda: plain_adain(x, style, 1.0),
            [x, style],
        ),
        (
            "AdaIN a=.6",
            lambda: ours_adain(x, style, 0.6),
            lambda: plain_adain(x, style, 0.6),
            [x, style],
        ),
    ]


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short runs")
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing")
    args = parser.parse_args(argv)
    shapes = [(2, 4, 8, 8)] if args.quick else [(8, 64, 64, 64), (4, 256, 32, 32)]
    min_run_time = 0.01 if args.quick else args.min_run_time
    layouts = [False, True] if args.channels_last or args.quick else [False]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms (median)")
    header = f"{'case':<12}{'shape':<18}{'layout':<8}{'pass':<9}{'ours':>9}{'plain':>9}{'ratio':>8}"
    print(header)
    rows: list[dict[str, object]] = []
    for shape in shapes:
        for channels_last in layouts:
            for name, ours, plain, inputs in _cases(shape, channels_last):
                for label, make in (
                    ("fwd", lambda f: f),
                    ("fwd+bwd", lambda f, inputs=inputs: _forward_backward(f, inputs)),
                ):
                    # Interleave: ours, plain, ours, plain; keep each side's best median.
                    times = {"ours": float("inf"), "plain": float("inf")}
                    for _ in range(1 if args.quick else 2):
                        for side, fn in (("ours", ours), ("plain", plain)):
                            times[side] = min(times[side], _time(make(fn), min_run_time))
                    ratio = times["plain"] / times["ours"]
                    layout = "cl" if channels_last else "nchw"
                    print(
                        f"{name:<12}{shape!s:<18}{layout:<8}{label:<9}"
                        f"{times['ours'] * 1e3:>9.3f}{times['plain'] * 1e3:>9.3f}{ratio:>7.1f}x"
                    )
                    rows.append(
                        {"case": name, "shape": shape, "layout": layout, "pass": label, **times}
                    )
    return rows


if __name__ == "__main__":
    main()
