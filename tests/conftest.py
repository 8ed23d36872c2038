"""Shared fixtures.

stylenorm picks its own kernels (blockwise channels-last statistics, the batch-norm fast path,
the precise contiguous instance norm's autograd Function) only above a size where they beat
torch's; below it, torch's kernels run. Test inputs are small,
so every test of the normalization and statistics modules runs twice: with the size thresholds
as shipped (small inputs take torch's kernels) and with them at zero (every input takes
stylenorm's own kernels, as a large one would).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from stylenorm import functional, reference, stats

# Test modules whose inputs go through the size dispatch.
_DISPATCHED_MODULES = {
    "test_devices",
    "test_functional_adain",
    "test_functional_cin",
    "test_functional_losses",
    "test_functional_norm",
    "test_losses",
    "test_norm",
    "test_stats",
    "test_style",
}

_THRESHOLDS = (
    (stats, "_BLOCKWISE_MIN_NUMEL"),
    (stats, "_BLOCKWISE_MIN_NUMEL_WITH_GRADIENT"),
    (stats, "_BLOCKWISE_MIN_CHANNELS"),
    (stats, "_VAR_MEAN_BELOW_NUMEL"),
    (functional, "_BATCH_NORM_FAST_PATH_MIN_NUMEL"),
    (functional, "_BATCH_NORM_FAST_PATH_MIN_POSITIONS"),
    (functional, "_CONTIGUOUS_NORM_MIN_NUMEL"),
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rsplit(".", 1)[-1] in _DISPATCHED_MODULES:
        metafunc.parametrize("kernels", ["by-size", "own"], indirect=True)


@pytest.fixture(autouse=True)
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``"by-size"``: thresholds as shipped; ``"own"``: stylenorm's kernels at every size.
    Autouse, so that every test of a dispatched module gets it (a fixture a test does not ask
    for is not set up by an indirect parametrization alone); elsewhere it is ``"by-size"``."""
    param = getattr(request, "param", "by-size")
    if param == "own":
        for module, name in _THRESHOLDS:
            monkeypatch.setattr(module, name, 0)
    yield param


@pytest.fixture
def blockwise_at_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """channels_last input of any size takes the blockwise (N, M, C) code, as a large one does."""
    monkeypatch.setattr(stats, "_BLOCKWISE_MIN_NUMEL", 0)
    monkeypatch.setattr(stats, "_BLOCKWISE_MIN_NUMEL_WITH_GRADIENT", 0)
    monkeypatch.setattr(stats, "_BLOCKWISE_MIN_CHANNELS", 0)


@pytest.fixture
def assert_small_inference_precise(
    kernels: str,
) -> Callable[[torch.Tensor, np.ndarray, torch.Tensor], None]:
    """A check of the float32 output ``out`` of small channels_last input ``x`` normalized
    without a gradient, against float64's ``expected``: as shipped (the whole-tensor formula),
    within 4x the error of rounding ``expected`` to float32; with every kernel forced (the
    blockwise code), within 2x torch.nn's instance-norm error on ``x`` (measured 6e-6 at a mean
    of 1e3), plus 1e-6."""

    def check(out: torch.Tensor, expected: np.ndarray, x: torch.Tensor) -> None:
        want = torch.from_numpy(expected)
        scale = float(want.abs().max())
        error = float((out.double() - want).abs().max()) / scale
        if kernels == "by-size":
            rounding = float((want.float().double() - want).abs().max()) / scale
            assert error <= 4 * rounding, (error, rounding)
            return
        plain = torch.from_numpy(reference.instance_norm(x.double().numpy()))
        torch_nn = torch.nn.functional.instance_norm(x)
        torch_error = float((torch_nn.double() - plain).abs().max() / plain.abs().max())
        assert error <= 2 * torch_error + 1e-6, (error, torch_error)

    return check
