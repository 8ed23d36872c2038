"""Tests of stylenorm.functional.instance_norm / batch_norm against the float64 NumPy reference and
torch.nn.functional, with float64 gradcheck and gradgradcheck."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.checkpoint import checkpoint

import stylenorm
from stylenorm import functional, reference, stats


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _assert_close_at_scale(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``ours`` equals the float64 ``ref`` to ``tol``, relative and relative to ref's largest
    magnitude (gradients mix large and near-zero entries)."""
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(ours.detach().double(), ref, rtol=tol, atol=tol * scale)


def _affine(c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    return weight, bias


@st.composite
def features(draw: st.DrawFn) -> torch.Tensor:
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 3))))
    if int(np.prod(spatial)) == 1:
        spatial = (*spatial[:-1], 2)
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), *spatial)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
    x = offset + draw(st.sampled_from([1e-2, 1.0, 20.0])) * torch.randn(
        shape, generator=gen, dtype=torch.float64
    )
    if x.dim() in (4, 5) and draw(st.booleans()):
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x


# ------------------------------------------------------------------------------------------------
# Against the float64 reference


@settings(max_examples=40, deadline=None)
@given(features(), st.booleans(), st.sampled_from([1e-5, 1e-2]))
def test_instance_norm_matches_reference(x: torch.Tensor, affine: bool, eps: float):
    weight, bias = _affine(x.shape[1], 0) if affine else (None, None)
    running_mean = torch.randn(x.shape[1], dtype=torch.float64)
    running_var = torch.rand(x.shape[1], dtype=torch.float64) + 0.5
    expected_stats = reference.instance_norm_running_stats(
        _np(x), _np(running_mean), _np(running_var), 0.25
    )
    y = functional.instance_norm(x, running_mean, running_var, weight, bias, True, 0.25, eps)
    expected = reference.instance_norm(_np(x), weight, bias, eps)
    np.testing.assert_allclose(_np(y), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(running_mean), expected_stats[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(running_var), expected_stats[1], rtol=1e-10, atol=1e-10)
    # Evaluation with the updated running statistics: batch norm's formula with them.
    y_eval = functional.instance_norm(x, running_mean, running_var, weight, bias, False, 0.25, eps)
    expected_eval = reference.batch_norm(
        _np(x), weight, bias, eps, _np(running_mean), _np(running_var)
    )
    np.testing.assert_allclose(_np(y_eval), expected_eval, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(features(), st.booleans(), st.sampled_from([1e-5, 1e-2]))
def test_batch_norm_matches_reference(x: torch.Tensor, affine: bool, eps: float):
    weight, bias = _affine(x.shape[1], 1) if affine else (None, None)
    running_mean = torch.randn(x.shape[1], dtype=torch.float64)
    running_var = torch.rand(x.shape[1], dtype=torch.float64) + 0.5
    expected_stats = reference.batch_norm_running_stats(
        _np(x), _np(running_mean), _np(running_var), 0.25
    )
    y = functional.batch_norm(x, running_mean, running_var, weight, bias, True, 0.25, eps)
    scale = 1 + float(x.abs().max())
    np.testing.assert_allclose(_np(y), reference.batch_norm(_np(x), weight, bias, eps), 1e-9, 1e-9)
    np.testing.assert_allclose(_np(running_mean), expected_stats[0], 1e-10, 1e-12 * scale)
    np.testing.assert_allclose(_np(running_var), expected_stats[1], 1e-9, 1e-12 * scale**2)
    y_eval = functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.25, eps)
    expected_eval = reference.batch_norm(
        _np(x), weight, bias, eps, _np(running_mean), _np(running_var)
    )
    np.testing.assert_allclose(_np(y_eval), expected_eval, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["instance", "batch"])
def test_half_input_updates_float32_stats_from_float32_statistics(which: str, dtype: torch.dtype):
    x = (500.0 + torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))).to(dtype)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    if which == "instance":
        functional.instance_norm(x, running_mean, running_var, momentum=0.5)
        expected = reference.instance_norm_running_stats(_np(x), np.zeros(3), np.ones(3), 0.5)
    else:
        functional.batch_norm(x, running_mean, running_var, training=True, momentum=0.5)
        expected = reference.batch_norm_running_stats(_np(x), np.zeros(3), np.ones(3), 0.5)
    np.testing.assert_allclose(_np(running_mean), expected[0], rtol=1e-6)
    np.testing.assert_allclose(_np(running_var), expected[1], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Gradients


GRAD_SHAPES = [(2, 3, 5), (2, 3, 4, 3), (1, 2, 3, 3, 2), (3, 2, 4)]


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [(shape, False) for shape in GRAD_SHAPES] + [(s, True) for s in GRAD_SHAPES if len(s) > 3],
    ids=str,
)
@pytest.mark.parametrize("which", ["instance", "batch"])
def test_gradcheck_and_gradgradcheck(which: str, shape: tuple[int, ...], channels_last: bool):
    gen = torch.Generator().manual_seed(len(shape))
    x = 1.5 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    weight, bias = _affine(shape[1], 3)
    fn: Callable[..., torch.Tensor]
    if which == "instance":

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return functional.instance_norm(x, None, None, w, b, True, 0.1, 1e-3)

    else:

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-3)

    inputs = tuple(t.clone().requires_grad_() for t in (x, weight, bias))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("path", ["small", "function"])
def test_gradcheck_contiguous_instance_norm_precise_paths(
    path: str, per_sample: bool, monkeypatch: pytest.MonkeyPatch
):
    # |mean|/std well above 1 takes the precise paths (not the group-norm gradient); a mean of
    # 50 times the spread also refines the statistics. Shared and per-sample (CIN) parameters.
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 1 << 40 if path == "small" else 0)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    x = x + torch.tensor([3.0, -50.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.rand(2 if per_sample else 1, 3, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(scale.shape, generator=gen, dtype=torch.float64)
    if not per_sample:
        scale, shift = scale[0], shift[0]

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional._contiguous_norm(x, w, b, 1e-3)

    inputs = tuple(t.clone().requires_grad_() for t in (x, scale, shift))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("which", ["instance", "batch"])
def test_gradcheck_evaluation_mode(which: str):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight, bias = (t.requires_grad_() for t in _affine(3, 4))
    running_mean = torch.randn(3, dtype=torch.float64)
    running_var = torch.rand(3, dtype=torch.float64) + 0.5
    fn: Callable[..., torch.Tensor]
    if which == "instance":

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return functional.instance_norm(x, running_mean, running_var, w, b, False)

    else:

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return functional.batch_norm(x, running_mean, running_var, w, b, False)

    assert gradcheck(fn, (x, weight, bias))
    assert gradgradcheck(fn, (x, weight, bias))


# ------------------------------------------------------------------------------------------------
# Same errors as torch.nn.functional


def _outcome(call: Callable[[], torch.Tensor]) -> tuple[Any, ...]:
    try:
        y = call()
    except Exception as error:
        return type(error), str(error)
    return "ok", tuple(y.shape), y.dtype


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


INSTANCE_CASES: list[tuple[str, Callable[[Callable[..., torch.Tensor]], torch.Tensor]]] = [
    ("no running stats in eval", lambda f: f(_x(2, 3, 4), use_input_stats=False)),
    ("1D input", lambda f: f(_x(3))),
    ("2D input training", lambda f: f(_x(2, 3))),
    ("2D input eval", lambda f: f(_x(2, 3), torch.zeros(3), torch.ones(3), use_input_stats=False)),
    ("one spatial element", lambda f: f(_x(2, 3, 1, 1))),
    ("running_mean size", lambda f: f(_x(2, 3, 4), torch.zeros(4), torch.ones(5))),
    ("running_var size", lambda f: f(_x(2, 3, 4), torch.zeros(3), torch.ones(5))),
    ("weight size", lambda f: f(_x(2, 3, 4), None, None, torch.ones(4), torch.ones(5))),
    ("bias size", lambda f: f(_x(2, 3, 4), None, None, torch.ones(3), torch.ones(5))),
    # a (C, 1) parameter broadcasts against the (1, C, 1, 1) statistics of a batch of one
    (
        "weight of two dims, channels_last batch of one",
        lambda f: f(
            _x(1, 64, 4, 4).contiguous(memory_format=torch.channels_last), weight=_x(64, 1)
        ),
    ),
    ("bias of two dims", lambda f: f(_x(1, 3, 4), bias=_x(3, 1))),
    ("running_mean of two dims", lambda f: f(_x(2, 3, 4), _x(3, 1), torch.ones(3))),
    (
        "weight size eval",
        lambda f: f(_x(2, 3, 4), torch.zeros(3), torch.ones(3), torch.ones(4), None, False),
    ),
    (
        "negative eps eval",
        lambda f: f(_x(2, 3, 4), torch.zeros(3), torch.ones(3), use_input_stats=False, eps=-0.5),
    ),
    # torch takes a negative eps in training too (the |mean|/spread check must not raise)
    ("negative eps training", lambda f: f(_x(2, 3, 4, 4), eps=-1e-6)),
    (
        "negative eps training, channels_last",
        lambda f: f(_x(2, 32, 4, 4).contiguous(memory_format=torch.channels_last), eps=-1e-6),
    ),
    (
        "float64 input, float32 stats eval",
        lambda f: f(
            _x(2, 3, 4, dtype=torch.float64), torch.zeros(3), torch.ones(3), None, None, False
        ),
    ),
    ("integer input", lambda f: f(torch.ones(2, 3, 4, dtype=torch.long))),
]
BATCH_CASES: list[tuple[str, Callable[[Callable[..., torch.Tensor]], torch.Tensor]]] = [
    ("one value per channel", lambda f: f(_x(1, 3), None, None, training=True)),
    ("zero eps training", lambda f: f(_x(2, 3), None, None, training=True, eps=0.0)),
    (
        "zero eps training, fast path",
        lambda f: f(_x(8, 64, 32, 32), None, None, training=True, eps=0.0),
    ),
    (
        "negative eps training, fast path",
        lambda f: f(_x(8, 64, 32, 32), torch.zeros(64), torch.ones(64), training=True, eps=-1e-3),
    ),
    ("negative eps eval", lambda f: f(_x(2, 3), torch.zeros(3), torch.ones(3), eps=-1.0)),
    ("running_mean size", lambda f: f(_x(2, 3, 4), torch.zeros(4), torch.ones(4), training=True)),
    (
        "running_mean size, half input",
        lambda f: f(
            _x(2, 3, 4, dtype=torch.float16),
            torch.zeros(4),
            torch.ones(4),
            torch.ones(4),
            training=True,
        ),
    ),
    (
        "mixed float64 input",
        lambda f: f(_x(2, 3, dtype=torch.float64), torch.zeros(3), torch.ones(3), training=True),
    ),
]


@pytest.mark.parametrize(("case", "call"), INSTANCE_CASES, ids=[c[0] for c in INSTANCE_CASES])
def test_instance_norm_errors_match_torch(
    case: str, call: Callable[[Callable[..., torch.Tensor]], torch.Tensor]
):
    expected = _outcome(lambda: call(F.instance_norm))
    got = _outcome(lambda: call(functional.instance_norm))
    if case == "integer input":  # both NotImplementedError; the kernel's name differs
        assert got[0] is expected[0] is NotImplementedError
    else:
        assert got == expected


@pytest.mark.parametrize(("case", "call"), BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batch_norm_errors_match_torch(
    case: str, call: Callable[[Callable[..., torch.Tensor]], torch.Tensor]
):
    assert _outcome(lambda: call(functional.batch_norm)) == _outcome(lambda: call(F.batch_norm))


# ------------------------------------------------------------------------------------------------
# Empty inputs, and inputs left alone


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (0, 3, 2, 2)], ids=str)
@pytest.mark.parametrize("which", ["instance", "batch"])
def test_empty_input_returns_empty_and_keeps_running_stats(which: str, shape: tuple[int, ...]):
    x = torch.randn(shape, requires_grad=True)
    weight, bias = (t.float().requires_grad_() for t in _affine(3, 5))
    running_mean, running_var = torch.full((3,), 0.5), torch.full((3,), 2.0)
    if which == "instance":
        y = functional.instance_norm(x, running_mean, running_var, weight, bias, True, 0.1)
    else:
        y = functional.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and weight.grad is not None
    assert torch.equal(weight.grad, torch.zeros(3))
    assert torch.equal(running_mean, torch.full((3,), 0.5))
    assert torch.equal(running_var, torch.full((3,), 2.0))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["instance", "batch"])
def test_inputs_not_modified(which: str, training: bool):
    x = torch.randn(3, 2, 4, 4).contiguous(memory_format=torch.channels_last)
    weight, bias = (t.float() for t in _affine(2, 6))
    copies = [t.clone() for t in (x, weight, bias)]
    fn = functional.instance_norm if which == "instance" else functional.batch_norm
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    fn(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    for original, copy in zip((x, weight, bias), copies, strict=True):
        assert torch.equal(original, copy)
        assert original.stride() == copy.stride()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_layout", ["same", "contiguous"])
@pytest.mark.parametrize("shape", [(2, 2048, 15, 15), (1, 512, 24, 24)])
def test_channels_last_instance_norm_in_several_blocks(
    dtype: torch.dtype, grad_layout: str, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
):
    # Enough (sample, channel) pairs that the channels-last statistics work in several position
    # blocks (at 2^18 values per block, which these shapes were sized for; the last one short);
    # a batch of one is also cut into runs of positions. Forward and all gradients against
    # torch's group norm in float64 on the same (rounded) values; half inputs are computed in
    # float32, rounded once.
    monkeypatch.setattr(stats, "_BLOCK_VALUES", 1 << 18)
    gen = torch.Generator().manual_seed(11)
    layout_probe = torch.empty(shape).contiguous(memory_format=torch.channels_last)
    assert stats._blockwise_channels_last(layout_probe)
    positions = stats._positions(layout_probe)
    runs = stats._split_samples(positions, stats._virtual_samples(positions))
    assert runs.shape[0] == (4 if shape[0] == 1 else shape[0])  # 225 positions: no runs
    assert runs.shape[1] % stats._position_blocks(runs) != 0  # uneven blocks
    x64 = 40.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight64, bias64 = _affine(shape[1], 3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = weight64.to(acc).requires_grad_()
    bias = bias64.to(acc).requires_grad_()
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if grad_layout == "same":
        grad = grad.contiguous(memory_format=torch.channels_last)
    y = functional.instance_norm(x, weight=weight, bias=bias)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.backward(grad)

    x_ref = x.detach().double().contiguous().requires_grad_()
    w_ref = weight.detach().double().requires_grad_()
    b_ref = bias.detach().double().requires_grad_()
    y_ref = F.group_norm(x_ref, shape[1], w_ref, b_ref, 1e-5)
    y_ref.backward(grad.double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[
        dtype
    ]
    assert x.grad is not None and weight.grad is not None and bias.grad is not None
    for ours, ref in ((y, y_ref), (x.grad, x_ref.grad), (weight.grad, w_ref.grad)):
        assert ref is not None
        _assert_close_at_scale(ours, ref, tol)
    assert b_ref.grad is not None
    torch.testing.assert_close(bias.grad.double(), b_ref.grad, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["strided-affine", "odd-grad-stride", "affine-grads-only"])
def test_channels_last_instance_norm_unusual_strides_and_grads(dtype: torch.dtype, case: str):
    # The large channels_last path hands torch's batch-norm backward kernel one sample at a time.
    # Affine parameters that are strided views, an incoming gradient of a batch of one whose
    # (size-1) batch dimension has an odd stride, and gradients wanted for the affine
    # parameters only must all give float64 group norm's numbers.
    gen = torch.Generator().manual_seed(13)
    shape = (1, 64, 64, 64) if case == "odd-grad-stride" else (2, 64, 48, 48)
    x64 = 5.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last)
    assert stats._blockwise_channels_last(x)
    x.requires_grad_(case != "affine-grads-only")
    table = torch.randn(shape[1], 3, generator=gen, dtype=torch.float64).float()
    weight, bias = table[:, 0].clone(), table[:, 1].clone()
    if case == "strided-affine":
        table.requires_grad_()
        weight, bias = table[:, 0], table[:, 2]  # stride 3
        assert weight.stride() == (3,)
    else:
        weight.requires_grad_()
        bias.requires_grad_()
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    if case == "odd-grad-stride":
        grad = grad.as_strided(grad.shape, (7, *grad.stride()[1:]))
        assert grad.is_contiguous(memory_format=torch.channels_last) and grad.stride() != x.stride()
    y = functional.instance_norm(x, weight=weight, bias=bias)
    y.backward(grad)

    x_ref = x.detach().double().requires_grad_()
    w_ref = weight.detach().double().requires_grad_()
    b_ref = bias.detach().double().requires_grad_()
    F.group_norm(x_ref, shape[1], w_ref, b_ref, 1e-5).backward(grad.double())
    if case == "strided-affine":
        assert table.grad is not None
        got_w, got_b = table.grad[:, 0], table.grad[:, 2]
        assert not table.grad[:, 1].any()
    else:
        got_w, got_b = weight.grad, bias.grad
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    pairs = [(got_w, w_ref.grad), (got_b, b_ref.grad)]
    if case == "affine-grads-only":
        assert x.grad is None
    else:
        pairs.append((x.grad, x_ref.grad))
    for ours, ref in pairs:
        assert ours is not None and ref is not None
        _assert_close_at_scale(ours, ref, tol)


@pytest.fixture
def backward_forms(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The ``centre`` argument of every call of the channels_last batched backward (True: on
    x - mean, False: the mean folded into constants); no call means torch's kernel ran."""
    forms: list[bool] = []
    batched = functional._channels_last_norm_backward_batched

    def spy(*args: Any, centre: bool) -> Any:
        forms.append(centre)
        return batched(*args, centre=centre)

    monkeypatch.setattr(functional, "_channels_last_norm_backward_batched", spy)
    return forms


def _spy_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[None]:
    """A list that grows by one entry at every call of ``functional.<name>``."""
    calls: list[None] = []
    original = getattr(functional, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, name, spy)
    return calls


@pytest.mark.parametrize("mean", [1.5, 1e3])
@pytest.mark.parametrize("shape", [(2, 3, 4, 3), (1, 2, 3, 3, 2), (3, 4, 2, 2)], ids=str)
@pytest.mark.parametrize("form", ["kernel", "blockwise", "centred", "folded"])
@pytest.mark.usefixtures("blockwise_at_any_size")
def test_channels_last_backward_forms_gradcheck(
    shape: tuple[int, ...],
    form: str,
    mean: float,
    backward_forms: list[bool],
    monkeypatch: pytest.MonkeyPatch,
):
    # The channels_last path's four backward forms (torch's batch-norm backward kernel per
    # sample, for a batch of one or half precision; the closed form on x - mean block by block,
    # for large samples; the batched closed form on x - mean, for small samples; the batched
    # form with the mean folded into constants, for small |mean| / std and more than one
    # sample), each forced
    # at a small size: float64 gradcheck and gradgradcheck with a shared affine map (instance
    # norm) and with a per-sample one (conditional instance norm, AdaIN). At a mean of 1e3 the
    # forward refines its statistics and the double backward recomputes at that mean.
    large = form in ("kernel", "blockwise")
    monkeypatch.setattr(functional, "_KERNEL_MIN_SAMPLE_NUMEL", 0 if large else 1 << 40)
    min_batch = 1 if form == "blockwise" else 1 << 40
    monkeypatch.setattr(functional, "_BLOCKWISE_BACKWARD_MIN_BATCH", min_batch)
    blockwise_calls = _spy_calls(monkeypatch, "_channels_last_norm_backward_blockwise")
    bound = math.inf if form == "folded" else -1.0
    monkeypatch.setattr(functional, "_PRECISE_GRADIENT_ABOVE_RATIO", bound)
    gen = torch.Generator().manual_seed(17)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = (mean + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).contiguous(
        memory_format=fmt
    )
    assert stats._blockwise_channels_last(x)
    n, c = shape[0], shape[1]
    weight, bias = _affine(c, 3)
    scale = torch.randn(n, c, generator=gen, dtype=torch.float64)
    shift = torch.randn(n, c, generator=gen, dtype=torch.float64)

    def shared(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional.instance_norm(x, None, None, w, b, True, 0.1, 1e-3)

    def per_sample(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional._cin_normalize(x, w, b, 1e-3)

    for fn, affine in ((shared, (weight, bias)), (per_sample, (scale, shift))):
        inputs = tuple(t.clone().requires_grad_() for t in (x, *affine))
        assert inputs[0].is_contiguous(memory_format=fmt)
        assert gradcheck(fn, inputs)
        assert gradgradcheck(fn, inputs)
    folded = form == "folded" and shape[0] > 1
    assert set(backward_forms) == (set() if large else {not folded})
    assert bool(blockwise_calls) == (form == "blockwise")


@pytest.mark.parametrize(
    ("offset", "channels"),
    [(0.5, 32), (3.0, 8), (100.0, 8)],  # 0.5: samples above the folded form's size
)
def test_channels_last_parameter_gradients_on_large_samples_as_precise_as_torch_nn(
    offset: float, channels: int
):
    # Two samples of 2^14 positions, float32, where the backward is the blockwise closed form:
    # against float64, the weight and bias gradients within 1.2x torch.nn's error (measured;
    # the statistics' rounding), held to 1.5x. torch's channels_last batch-norm backward
    # kernel, which this form replaced, measured 2.0x and 3.9x torch.nn's weight-gradient error
    # at the first two cases (it adds the positions one by one and folds the mean out).
    gen = torch.Generator().manual_seed(int(offset) + channels)
    shape = (2, channels, 128, 128)
    x64 = offset + torch.randn(shape, generator=gen, dtype=torch.float64)
    grad64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight64 = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias64 = torch.randn(channels, generator=gen, dtype=torch.float64)
    refs = [t.clone().requires_grad_() for t in (x64, weight64, bias64)]
    expected = torch.autograd.grad(_instance_norm_formula(*refs), refs, grad64)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    grad = grad64.float().contiguous(memory_format=torch.channels_last)

    def errors(fn: Callable[..., torch.Tensor]) -> list[float]:
        inputs = [t.clone().requires_grad_() for t in (x, weight64.float(), bias64.float())]
        got = torch.autograd.grad(fn(*inputs), inputs, grad)
        return [
            float((g.double() - e).abs().max() / e.abs().max())
            for g, e in zip(got, expected, strict=True)
        ]

    ours = errors(lambda x, w, b: functional.instance_norm(x, weight=w, bias=b))
    theirs = errors(lambda x, w, b: F.instance_norm(x, weight=w, bias=b))
    for name, e_ours, e_theirs in zip(("x", "weight", "bias"), ours, theirs, strict=True):
        assert e_ours <= 1.5 * e_theirs, (name, ours, theirs)


def test_batch_norm_fast_path_is_taken_where_expected(kernels: str):
    # The contiguous float CPU training path (stylenorm's statistics, torch's backward) must be
    # what the reference and gradcheck tests exercise with kernels="own" (every size), and only
    # large inputs with enough positions take it as shipped; everything else is torch's kernel.
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    c = torch.zeros(3, dtype=torch.float64)
    own = kernels == "own"
    assert functional._batch_norm_fast_path(x, None, None, None, None) == own
    assert functional._batch_norm_fast_path(x, c, c + 1, c + 1, c) == own
    assert (
        functional._batch_norm_fast_path(x[:, :, :1, :1].contiguous(), None, None, None, None)
        == own
    )
    large = torch.empty(8, 64, 32, 32)  # 2^19 values, 1024 positions
    assert functional._batch_norm_fast_path(large, None, None, None, None)
    half_as_large = torch.empty(4, 64, 32, 32)
    assert functional._batch_norm_fast_path(half_as_large, None, None, None, None) == own
    short_rows = torch.empty(64, 512, 4, 4)  # 2^19 values in rows of 16 positions
    assert functional._batch_norm_fast_path(short_rows, None, None, None, None) == own
    assert not functional._batch_norm_fast_path(x[:1, :, :1, :1], None, None, None, None)
    assert not functional._batch_norm_fast_path(
        x.contiguous(memory_format=torch.channels_last), None, None, None, None
    )
    assert not functional._batch_norm_fast_path(x.bfloat16(), None, None, None, None)
    assert not functional._batch_norm_fast_path(x[:, :, 0, 0], None, None, None, None)  # (N, C)
    assert not functional._batch_norm_fast_path(x, c.float(), c.float(), None, None)
    assert not functional._batch_norm_fast_path(x, c, None, None, None)


@pytest.mark.parametrize("offset", [10.0, 1e3, -1e4])
def test_batch_norm_fast_path_as_precise_as_torch_nn_at_large_mean(offset: float):
    # At the fast path's size (2^19 values): output, gradients and running variance against
    # float64, no further off than torch.nn's kernel (which accumulates in double). The rows'
    # first float32 means, merged in float32, cost up to 3x its output error and 50x its
    # running-variance error at 1e4.
    gen = torch.Generator().manual_seed(22)
    x = offset + torch.randn(8, 64, 32, 32, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    assert functional._batch_norm_fast_path(x, None, None, None, None)

    def run(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        xs = x.to(dtype, copy=True).requires_grad_()  # each run its own leaf and gradient
        weight, bias = (torch.ones(64, dtype=dtype, requires_grad=True) for _ in range(2))
        running = (torch.zeros(64, dtype=dtype), torch.ones(64, dtype=dtype))
        y = fn(xs, *running, weight, bias, True, 0.5, 1e-5)
        y.backward(grad.to(dtype))
        assert xs.grad is not None and weight.grad is not None
        return [t.detach().double() for t in (y, xs.grad, weight.grad, running[1])]

    truth = run(F.batch_norm, torch.float64)
    ours, theirs = run(functional.batch_norm, torch.float32), run(F.batch_norm, torch.float32)
    for name, o, t, r in zip(
        ("output", "input grad", "weight grad", "running var"), ours, theirs, truth, strict=True
    ):
        scale = float(r.abs().max())
        our_error, their_error = float((o - r).abs().max()), float((t - r).abs().max())
        assert our_error <= 1.3 * their_error + 1e-7 * scale, (name, our_error, their_error)


_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("param_dtype", [*_FLOATS, None], ids=str)
@pytest.mark.parametrize("stats_dtype", _FLOATS, ids=str)
@pytest.mark.parametrize("input_dtype", _FLOATS, ids=str)
def test_instance_norm_evaluation_with_mixed_dtypes_matches_torch(
    input_dtype: torch.dtype, stats_dtype: torch.dtype, param_dtype: torch.dtype | None
):
    """Running statistics and affine parameters of any float dtypes: torch's exact output, or
    torch's error (half input with half parameters and float32 running statistics used to fail
    in the batch-norm kernel, where torch's instance norm works)."""
    gen = torch.Generator().manual_seed(40)
    x = (5.0 + 3.0 * torch.randn(2, 3, 6, 6, generator=gen)).to(input_dtype)
    running = (5.0 + torch.randn(3, generator=gen), 1.0 + 9.0 * torch.rand(3, generator=gen))
    mean, var = (t.to(stats_dtype) for t in running)
    affine = (
        [None, None]
        if param_dtype is None
        else [torch.randn(3, generator=gen).to(param_dtype) for _ in "wb"]
    )

    def outcome(fn: Callable[..., torch.Tensor]) -> tuple[Any, ...]:
        try:
            return ("ok", fn(x, mean, var, *affine, use_input_stats=False))
        except RuntimeError as error:
            return ("error", str(error))

    ours, theirs = outcome(functional.instance_norm), outcome(F.instance_norm)
    assert ours[0] == theirs[0]
    if ours[0] != "ok":
        assert ours[1] == theirs[1]
        return
    assert ours[1].dtype == theirs[1].dtype
    # Half input with float32 statistics (and parameters): the batch-norm kernel computes in
    # float32, where torch first rounds the statistics to half precision. Ours is as close to
    # the float64 formula of the same values, or closer; other mixes are torch's function.
    w64, b64 = (None if t is None else t.double() for t in affine)
    truth = F.instance_norm(
        x.double(), mean.double(), var.double(), w64, b64, use_input_stats=False
    )
    our_error, torch_error = ((r.double() - truth).abs().max() for r in (ours[1], theirs[1]))
    assert our_error <= torch_error


def test_batch_norm_fast_path_size_under_forward_mode_and_transforms():
    """At the fast path's size, forward-mode derivatives (jvp, forward AD, a tangent on the
    weight alone) and torch.func transforms run torch's differentiable kernel: torch.nn's
    results, where the fast path's Function (no jvp rule) raised NotImplementedError."""
    gen = torch.Generator().manual_seed(31)
    x, tangent = (torch.randn(8, 16, 64, 64, generator=gen, dtype=torch.float64) for _ in "xt")
    weight, bias = _affine(16, 32)
    assert functional._batch_norm_fast_path(x, None, None, weight, bias)

    def ours(t: torch.Tensor, w: torch.Tensor = weight) -> torch.Tensor:
        return functional.batch_norm(t, None, None, w, bias, True)

    def theirs(t: torch.Tensor, w: torch.Tensor = weight) -> torch.Tensor:
        return F.batch_norm(t, None, None, w, bias, True)

    close = {"rtol": 1e-9, "atol": 1e-9}
    for fn in (
        lambda f: torch.func.jvp(f, (x,), (tangent,)),
        lambda f: torch.func.jvp(lambda w: f(x, w), (weight,), (weight.flip(0),)),
        lambda f: torch.func.grad(lambda t: f(t).pow(3).sum())(x),
    ):
        torch.testing.assert_close(fn(ours), fn(theirs), **close)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        got = torch.autograd.forward_ad.unpack_dual(ours(dual)).tangent
        expected = torch.autograd.forward_ad.unpack_dual(theirs(dual)).tangent
    torch.testing.assert_close(got, expected, **close)


@pytest.mark.parametrize("size", [(2, 3, 4, 4), (8, 64, 32, 32)], ids=["small", "fast-path"])
def test_batch_norm_under_non_reentrant_checkpoint_matches_torch(size: tuple[int, ...]):
    """torch.utils.checkpoint (non-reentrant) runs a BatchNorm's forward again in backward; as
    with torch.nn, the running statistics take both updates, and the step count both steps (the
    fast path's update came after its saved tensors, where the recomputation stops early)."""
    gen = torch.Generator().manual_seed(33)
    x = 3.0 + torch.randn(size, generator=gen)
    theirs, ours = nn.BatchNorm2d(size[1]), stylenorm.BatchNorm2d(size[1])
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        checkpoint(module, leaf, use_reentrant=False).square().sum().backward()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 100.0, -3e3])
def test_batch_norm_float32_against_float64_at_large_mean(offset: float):
    # Forward, running statistics and gradients of float32 batch norm against float64 of the
    # same values, with features whose mean dwarfs their spread (no E[x^2] - E[x]^2 here).
    gen = torch.Generator().manual_seed(21)
    x64 = offset + 0.5 * torch.randn(6, 4, 9, 7, generator=gen, dtype=torch.float64)
    grad = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
    weight64, bias64 = _affine(4, 5)
    results = {}
    for dtype in (torch.float64, torch.float32):
        x, weight, bias = (t.to(dtype).clone().requires_grad_() for t in (x64, weight64, bias64))
        running = (torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype))
        y = functional.batch_norm(x, *running, weight, bias, True, 0.3, 1e-5)
        y.backward(grad.to(dtype))
        assert x.grad is not None and weight.grad is not None and bias.grad is not None
        results[dtype] = [t.detach().double() for t in (y, *running, x.grad, weight.grad)]
    expected_running = reference.batch_norm_running_stats(_np(x64), np.zeros(4), np.ones(4), 0.3)
    np.testing.assert_allclose(_np(results[torch.float64][1]), expected_running[0], rtol=1e-12)
    np.testing.assert_allclose(_np(results[torch.float64][2]), expected_running[1], rtol=1e-12)
    expected_y = reference.batch_norm(_np(x64), _np(weight64), _np(bias64), 1e-5)
    np.testing.assert_allclose(_np(results[torch.float64][0]), expected_y, rtol=1e-9, atol=1e-9)
    # float32 against float64 on the float32-rounded input (its own reference values).
    x32_64 = x64.float().double()
    expected_running32 = reference.batch_norm_running_stats(
        _np(x32_64), np.zeros(4), np.ones(4), 0.3
    )
    np.testing.assert_allclose(_np(results[torch.float32][1]), expected_running32[0], rtol=1e-6)
    np.testing.assert_allclose(_np(results[torch.float32][2]), expected_running32[1], rtol=1e-4)
    expected_y32 = reference.batch_norm(_np(x32_64), _np(weight64), _np(bias64), 1e-5)
    # float32 rounds x - mean at the input's own ulp, scaled up by 1/std = 2.
    atol = 2e-5 + 8 * 1.2e-7 * abs(offset) / 0.5
    np.testing.assert_allclose(_np(results[torch.float32][0]), expected_y32, atol=atol)
    theirs = F.batch_norm(x64.float(), None, None, weight64.float(), bias64.float(), True)
    ours_error = np.abs(_np(results[torch.float32][0]) - expected_y32).max()
    # Both at the level of that rounding (torch's fused evaluation kernel computes x * a + b).
    assert ours_error <= 3 * np.abs(_np(theirs) - expected_y32).max() + 1e-6
    for ours, ref in zip(results[torch.float32][3:], results[torch.float64][3:], strict=True):
        torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


@pytest.mark.parametrize(
    "which",
    [
        "instance_channels_last",
        "instance_contiguous_3",
        "instance_contiguous_40",
        "batch_contiguous",
    ],
)
def test_func_grad_of_custom_backward_paths(which: str, monkeypatch: pytest.MonkeyPatch):
    # torch.func.grad needs autograd Functions with setup_context: every custom backward path
    # (contiguous instance norm at mean 3 and at mean 40, which refines its statistics).
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    if which.startswith("instance_contiguous"):
        x = x + float(which.rsplit("_", 1)[1])
    weight, bias = _affine(4, 9)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    if which == "instance_channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if which.startswith("instance"):
            y = functional.instance_norm(x, None, None, w, bias)
        else:
            y = functional.batch_norm(x, None, None, w, bias, True)
        return (y * g).sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(x, weight)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss(xr, wr).backward()
    assert xr.grad is not None and wr.grad is not None
    torch.testing.assert_close(grads[0], xr.grad)
    torch.testing.assert_close(grads[1], wr.grad)


def _instance_norm_formula(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Instance norm written out, for float64 autograd references (eps = 1e-5)."""
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    view = (1, -1) + (1,) * len(dims)
    return (x - mean) / torch.sqrt(var + 1e-5) * w.view(view) + b.view(view)


# Half precision only where its spacing at the mean (eps * mean) leaves the unit spread visible.
LARGE_MEANS = [(torch.float32, m) for m in (3.0, 30.0, 1e3, 1e4)] + [
    (torch.bfloat16, 30.0),
    (torch.float16, 30.0),
    (torch.float16, 1e3),
]


@pytest.mark.parametrize(("dtype", "offset"), LARGE_MEANS, ids=str)
@pytest.mark.parametrize("path", ["small", "function"])
def test_contiguous_instance_norm_as_precise_as_torch_at_large_mean(
    offset: float, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
):
    # Output and gradients of contiguous instance norm on features whose mean dwarfs their
    # spread, against float64 of the same values: no worse than torch.nn's own error in the
    # same dtype (in float32 the group-norm kernel's gradient is 10x-30x worse here, its 1/sigma
    # too above 1e3). Parameters in the input's dtype.
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 1 << 40 if path == "small" else 0)
    _assert_as_precise_as_torch_nn(offset, dtype, torch.contiguous_format)


@pytest.mark.parametrize("offset", [0.9, 3.0, 30.0, 1e3])
@pytest.mark.parametrize("path", ["small", "function"])
def test_contiguous_instance_norm_with_tiny_spread_as_precise_as_torch(
    offset: float, path: str, monkeypatch: pytest.MonkeyPatch
):
    # Features whose spread (1e-4) is far below sqrt(eps): the path is chosen on |mean|/std, not
    # |mean|/sqrt(var + eps), which stays below 1 here and kept group norm's gradient (6.7x
    # torch.nn's weight-gradient error at 30).
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 1 << 40 if path == "small" else 0)
    _assert_as_precise_as_torch_nn(offset, torch.float32, torch.contiguous_format, spread=1e-4)


@pytest.mark.parametrize("offset", [0.0, 0.9, 3.0, 30.0, 1e3, 1e4])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("spread", [1.0, 1e-4])
@pytest.mark.usefixtures("blockwise_at_any_size")
def test_channels_last_instance_norm_as_precise_as_torch_at_large_mean(
    offset: float,
    batch: int,
    spread: float,
    backward_forms: list[bool],
    monkeypatch: pytest.MonkeyPatch,
):
    # The same on the channels_last path, float32: up to |mean|/std = 1 a batch of more than one
    # sample takes the backward with the mean folded into constants, above it (and for one
    # sample) torch's batch-norm backward kernel; both must match torch.nn's error. With a
    # spread far below sqrt(eps) the decision is still |mean|/std (|mean|/sqrt(var + eps) would
    # fold at 30, with 6.7x torch.nn's weight-gradient error).
    monkeypatch.setattr(functional, "_KERNEL_MIN_SAMPLE_NUMEL", 0)
    _assert_as_precise_as_torch_nn(offset, torch.float32, torch.channels_last, batch, spread)
    assert backward_forms == ([False] if batch > 1 and offset < 1 else [])


@pytest.mark.parametrize("offset", [0.0, 30.0, 1e3, 1e4])
@pytest.mark.parametrize("spread", [1.0, 1e-4])
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (1, 64, 4, 4, 4)], ids=str)
def test_channels_last_without_gradient_is_exact_at_any_mean(
    shape: tuple[int, ...],
    offset: float,
    spread: float,
    kernels: str,
    assert_small_inference_precise: Callable[..., None],
):
    # Small channels_last input that records no gradient takes the whole-tensor formula
    # (corrected two-pass statistics, output formed on x - mean): output within 4x the error
    # of rounding float64's to float32 at every mean (measured: 1.2e-7 at most, where
    # torch.nn's reaches 2e-4 at 1e4), its layout kept, running statistics as float64's.
    gen = torch.Generator().manual_seed(int(offset) + len(shape))
    signs = torch.randn(shape[0], shape[1], *(1,) * (len(shape) - 2), generator=gen).sign()
    x = spread * (offset * signs + torch.randn(shape, generator=gen))
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = x.contiguous(memory_format=layout)
    weight, bias = (t.float() for t in _affine(shape[1], 7))
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    with torch.no_grad():
        # as shipped, the whole-tensor formula; with every kernel forced, the blockwise code
        assert functional._formula_fits(x, weight, bias) is (kernels == "by-size")
        y = functional.instance_norm(x, running_mean, running_var, weight, bias, momentum=0.5)
    assert_small_inference_precise(y, reference.instance_norm(_np(x), _np(weight), _np(bias)), x)
    assert y.is_contiguous(memory_format=layout)
    want_mean, want_var = reference.instance_norm_running_stats(
        _np(x), np.zeros(shape[1]), np.ones(shape[1]), 0.5
    )
    # the batch mean of per-sample means of +-offset: float32 rounding at their size
    np.testing.assert_allclose(
        _np(running_mean), want_mean, rtol=1e-6, atol=1e-6 * spread * max(offset, 1.0)
    )
    np.testing.assert_allclose(_np(running_var), want_var, rtol=1e-5)


def test_channels_last_formula_route_only_without_gradient(kernels: str):
    # The formula is for inference; a recorded gradient keeps the closed-form backward's route.
    # With every kernel forced (size thresholds at zero) the blockwise code takes all sizes.
    shipped = kernels == "by-size"
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    weight = torch.ones(64, requires_grad=True)
    assert functional._formula_fits(x, None, None) is shipped
    assert not functional._formula_fits(x, weight, None)
    assert not functional._formula_fits(x.requires_grad_(), None, None)
    with torch.no_grad():
        assert functional._formula_fits(x, weight, None) is shipped
    # too few (sample, channel) pairs, too few channels, too large, or contiguous: other routes
    assert not functional._formula_fits(
        torch.randn(1, 32, 64, 64).to(memory_format=torch.channels_last)
    )
    assert not functional._formula_fits(
        torch.randn(8, 8, 8, 8).to(memory_format=torch.channels_last)
    )
    assert not functional._formula_fits(
        torch.randn(1, 64, 64, 64).to(memory_format=torch.channels_last)
    )
    assert not functional._formula_fits(torch.randn(2, 64, 8, 8))


@pytest.mark.parametrize(
    ("dtype", "offset"),
    [(dtype, 0.0) for dtype in (torch.bfloat16, torch.float16)]
    + [(dtype, offset) for dtype, offset in LARGE_MEANS if dtype != torch.float32],
    ids=str,
)
@pytest.mark.usefixtures("blockwise_at_any_size")
def test_channels_last_half_instance_norm_as_precise_as_torch(
    dtype: torch.dtype, offset: float, monkeypatch: pytest.MonkeyPatch
):
    # Half precision on the channels_last path: statistics in float32 (upcast block by block),
    # the output from torch's batch-norm kernel in float32, one rounding. Its errors against
    # float64 are those of rounding float64's results (measured: equal), where torch.nn's are up
    # to 70x larger at a mean of 30.
    monkeypatch.setattr(functional, "_KERNEL_MIN_SAMPLE_NUMEL", 0)
    _assert_as_precise_as_torch_nn(offset, dtype, torch.channels_last, within_rounding=True)


@pytest.mark.parametrize("value", [0.0, 0.5, 1e3, 12345.0])
@pytest.mark.usefixtures("blockwise_at_any_size")
def test_channels_last_constant_channel_exact(
    value: float, backward_forms: list[bool], monkeypatch: pytest.MonkeyPatch
):
    # A constant channel (a blank image through padded convolutions) in an otherwise standard
    # normal batch: its output is exactly the bias and its weight gradient 0, as in float64;
    # the other gradients as close to float64 as torch.nn's. A nonzero constant v counts as
    # |mean| / sqrt(eps) = v / sqrt(eps), so it takes the exact forms (the folded backward
    # gave a weight gradient of -1.31 at 1e3); an all-zero channel may fold.
    monkeypatch.setattr(functional, "_KERNEL_MIN_SAMPLE_NUMEL", 0)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 16, 16, generator=gen)
    x[:, 1] = value
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen)
    weight, bias = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)

    def results(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        y = fn(inputs[0], weight=inputs[1], bias=inputs[2])
        outputs = (y, *torch.autograd.grad(y, inputs, grad.to(dtype)))
        return [t.detach().double() for t in outputs]

    y, grad_x, grad_w, grad_b = results(functional.instance_norm, torch.float32)
    expected = results(F.instance_norm, torch.float64)
    theirs = results(F.instance_norm, torch.float32)
    assert torch.equal(y[:, 1], bias[1].double().expand_as(y[:, 1]))
    assert grad_w[1] == 0
    for ours, want, torch_nn in zip((y, grad_x, grad_w, grad_b), expected, theirs, strict=True):
        scale = float(want.abs().max())
        error, torch_error = (float((t - want).abs().max()) / scale for t in (ours, torch_nn))
        assert error <= 2 * torch_error + 1e-6, (error, torch_error)
    assert backward_forms == ([False] if value == 0 else [])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.usefixtures("blockwise_at_any_size")
def test_channels_last_half_constant_channel_at_large_value_exact(dtype: torch.dtype, grad: bool):
    # Half input whose constant channel's |mean| / sqrt(eps) is large: the output must be formed
    # on x - mean (torch's batch-norm kernel folds the mean into the shift, which left 0.03 at
    # 3e3), so the channel gives exactly its bias; the others as in float32, rounded.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 16, 8, 8, generator=gen)
    x[:, 0] = torch.tensor([777.7, 1234.5, 3003.3, 6007.1]).view(4, 1, 1)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    weight, bias = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    with torch.set_grad_enabled(grad):
        y = functional.instance_norm(x, weight=weight, bias=bias)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[:, 0], bias[0].to(dtype).expand_as(y[:, 0]))
    expected = F.instance_norm(x.detach().float(), weight=weight, bias=bias).to(dtype)
    torch.testing.assert_close(y[:, 1:], expected[:, 1:], rtol=0, atol=2 * 2.0**-7 * 4)


def _assert_as_precise_as_torch_nn(
    offset: float,
    dtype: torch.dtype,
    layout: torch.memory_format,
    batch: int = 3,
    spread: float = 1.0,
    within_rounding: bool = False,
) -> None:
    """Output and gradients of instance norm no less precise than torch.nn's in the same dtype,
    against float64; with ``within_rounding`` also within 1.5x the error of rounding the float64
    results to ``dtype``."""
    gen = torch.Generator().manual_seed(int(offset))
    shape = (batch, 8, 24, 24)
    signs = torch.randn(shape[0], shape[1], 1, 1, generator=gen).sign()
    x = (spread * (offset * signs + torch.randn(shape, generator=gen))).to(dtype)
    x = x.contiguous(memory_format=layout)
    weight, bias = (t.to(dtype) for t in _affine(shape[1], 2))
    grad = torch.randn(shape, generator=gen).to(dtype)
    refs = [x.double().requires_grad_(), weight.double().requires_grad_(), bias.double()]
    refs[2].requires_grad_()
    expected_y = _instance_norm_formula(*refs)
    expected = [expected_y.detach(), *torch.autograd.grad(expected_y, refs, grad.double())]

    def errors(fn: Callable[..., torch.Tensor]) -> list[float]:
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(*inputs)
        got = [y, *torch.autograd.grad(y, inputs, grad)]
        return [
            float((g.detach().double() - e).abs().max() / e.abs().max())
            for g, e in zip(got, expected, strict=True)
        ]

    ours = errors(lambda x, w, b: functional.instance_norm(x, weight=w, bias=b))
    theirs = errors(lambda x, w, b: F.instance_norm(x, weight=w, bias=b))
    for name, e_ours, e_theirs in zip(("y", "x", "weight", "bias"), ours, theirs, strict=True):
        assert e_ours <= 2 * e_theirs + 1e-6, (name, e_ours, e_theirs)
    if within_rounding:
        for name, e_ours, want in zip(("y", "x", "weight", "bias"), ours, expected, strict=True):
            rounding = float((want.to(dtype).double() - want).abs().max() / want.abs().max())
            assert e_ours <= 1.5 * rounding, (name, e_ours, rounding)


@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0])
@pytest.mark.parametrize("path", ["small", "function"])
def test_contiguous_instance_norm_output_takes_in_place_ops(
    offset: float, path: str, monkeypatch: pytest.MonkeyPatch
):
    # ReLU(inplace=True) right after the norm, as in most style networks, on every contiguous
    # path (group norm, the Function with and without refined statistics, torch.nn's way):
    # gradients as float64 torch.nn's through the same in-place ReLU.
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 1 << 40 if path == "small" else 0)
    gen = torch.Generator().manual_seed(3)
    x = offset + torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64)
    weight, bias = _affine(3, 4)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (functional.instance_norm, F.instance_norm):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(inputs[0], weight=inputs[1], bias=inputs[2])
        y.relu_()
        grads.append(torch.autograd.grad(y, inputs, grad))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("offset", [0.0, 3.0, 50.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_func_transforms_of_instance_norm(
    offset: float, layout: str, monkeypatch: pytest.MonkeyPatch
):
    # grad, jacrev, jacfwd, hessian and vmap with respect to the weight, on every path (the
    # precise and channels_last Functions in plain autograd, torch's own kernels under the
    # transforms), against eager autograd of the same function.
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(14)
    x = offset + torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = _affine(4, 15)

    def per_channel(w: torch.Tensor) -> torch.Tensor:
        return functional.instance_norm(x, weight=w, bias=bias).square().sum((0, 2, 3))

    def cubed(w: torch.Tensor) -> torch.Tensor:
        return functional.instance_norm(x, weight=w, bias=bias).pow(3).sum()

    w = weight.clone().requires_grad_()
    outputs = per_channel(w)
    jacobian = torch.stack([torch.autograd.grad(o, w, retain_graph=True)[0] for o in outputs])
    (first,) = torch.autograd.grad(cubed(w), w, create_graph=True)
    hessian = torch.stack([torch.autograd.grad(g, w, retain_graph=True)[0] for g in first])
    close = {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(torch.func.grad(cubed)(weight), first.detach(), **close)
    torch.testing.assert_close(torch.func.jacrev(per_channel)(weight), jacobian, **close)
    torch.testing.assert_close(torch.func.jacfwd(per_channel)(weight), jacobian, **close)
    torch.testing.assert_close(torch.func.hessian(cubed)(weight), hessian, **close)
    weights = torch.stack([weight, 2.0 * weight])
    looped = torch.stack([functional.instance_norm(x, weight=v, bias=bias) for v in weights])
    batched = torch.func.vmap(lambda v: functional.instance_norm(x, weight=v, bias=bias))(weights)
    torch.testing.assert_close(batched, looped, **close)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_strided_and_expanded_affine_parameters(offset: float, monkeypatch: pytest.MonkeyPatch):
    # torch's kernels read parameters as raw buffers: strided views and expanded scalars must
    # give the numbers and gradients of contiguous copies (float64 torch.nn as reference).
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(16)
    x = offset + torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    table = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    scalar = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for weight, bias in ((table[:, 0], table[:, 2]), (scalar.expand(4), table[:, 1])):
        expected = F.instance_norm(x, weight=weight, bias=bias)
        wanted = torch.autograd.grad(expected, (table, scalar), grad, allow_unused=True)
        got = functional.instance_norm(x, weight=weight, bias=bias)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        for ours, theirs in zip(
            torch.autograd.grad(got, (table, scalar), grad, allow_unused=True), wanted, strict=True
        ):
            assert (ours is None) == (theirs is None)
            if ours is not None:
                torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Features so large that a float32 sum of squares overflows


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (4, 32, 32, 32)])
@pytest.mark.parametrize("scale", [1e18, 1e30])
def test_instance_norm_where_float32_squares_overflow(
    layout: str, shape: tuple[int, ...], scale: float
):
    """Once M sigma^2 passes 3.4e38 (sigma about 3e17 at 64x64 positions) a float32 sum of squares
    overflows: torch.nn then outputs the bias (its 1/sigma is 0), torch's group-norm kernel NaN
    (E[x^2] - E[x]^2 = inf - inf). Such calls run again in float64: output, gradients and
    running statistics are float64's, rounded to float32 (a running variance of 1e59 is inf)."""
    gen = torch.Generator().manual_seed(3)
    x = (scale * (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight, bias = (p.float().requires_grad_() for p in _affine(c, 5))
    xg = x.clone().requires_grad_()
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    y = functional.instance_norm(xg, running_mean, running_var, weight, bias)
    assert y.dtype == torch.float32 and y.stride() == x.stride()
    expected = reference.instance_norm(_np(x), _np(weight), _np(bias))
    np.testing.assert_allclose(_np(y), expected, rtol=1e-5, atol=1e-5)

    grad = torch.randn(shape, generator=gen)
    y.backward(grad)
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    F.instance_norm(inputs[0], weight=inputs[1], bias=inputs[2]).backward(grad.double())
    for ours, ref in zip((xg, weight, bias), inputs, strict=True):
        assert ours.grad is not None and ours.grad.dtype == torch.float32
        _assert_close_at_scale(ours.grad, ref.grad, 1e-5)

    mean_ref, var_ref = reference.instance_norm_running_stats(_np(x), np.zeros(c), np.ones(c))
    np.testing.assert_allclose(running_mean.numpy(), mean_ref.astype(np.float32), rtol=1e-6)
    with np.errstate(over="ignore"):  # 1e59 is inf in float32
        var_ref = var_ref.astype(np.float32)
    np.testing.assert_allclose(running_var.numpy(), var_ref, rtol=1e-6)


def test_instance_norm_of_nan_or_infinite_input_is_not_computed_again(
    monkeypatch: pytest.MonkeyPatch,
):
    """Non-finite input makes non-finite statistics of its own: no float64 pass, torch.nn's NaN."""
    monkeypatch.setattr(stats, "_widened", _refuse_float64)
    for bad in (math.nan, math.inf):
        for shape in ((2, 4, 16, 16), (4, 32, 32, 32)):
            x = torch.randn(shape)
            x[1, 2, 3, 4] = bad
            for xs in (x, x.contiguous(memory_format=torch.channels_last)):
                y = functional.instance_norm(xs.clone().requires_grad_())
                expected = F.instance_norm(xs)
                assert torch.equal(y.isnan(), expected.isnan())
                assert bool(y[1, 2].isnan().all()) and not bool(y[0].isnan().any())


def _refuse_float64(*args: Any) -> Any:
    raise AssertionError("computed again in float64")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_hard_finite_input_is_not_computed_again_in_float64(
    layout: str, monkeypatch: pytest.MonkeyPatch
):
    """Constant channels (with and without eps), |mean| / std of 1e6, tiny spreads, half
    precision, one position and zero eps keep their float32 paths."""
    monkeypatch.setattr(stats, "_widened", _refuse_float64)
    gen = torch.Generator().manual_seed(0)
    for shape in ((2, 4, 4, 4), (2, 16, 32, 32), (4, 32, 32, 32)):
        base = torch.randn(shape, generator=gen)
        cases = [base * 1e-6 + 1e4, base.clone(), base * 1e15]
        cases[1][:, 1] = 7.0  # constant channels
        cases[1][0, 0] = 0.0
        for i, x in enumerate(cases):
            for dtype in (torch.float32, torch.bfloat16, torch.float16)[: 2 if i == 2 else 3]:
                xs = x.to(dtype)  # (1e15 is inf in float16)
                if layout == "channels_last":
                    xs = xs.contiguous(memory_format=torch.channels_last)
                y = functional.instance_norm(xs.clone().requires_grad_())
                y.sum().backward()
                assert not bool(y.isnan().any())
                functional.instance_norm(xs, eps=0.0)
                functional.instance_norm(xs * 1e-3, eps=-1e-5)  # NaN where var + eps < 0
                stats.mean_std(xs, eps=0.0)
                stats.mean_var(xs)
    # Variances that are each finite but whose float32 total is not (M sigma^2 = 1.6e38).
    x = torch.randn(16, 16, 4, 4, generator=gen) * 2e18
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for mask in (None, torch.rand(16, 1, 4, 4, generator=gen) + 0.5):
        stats.mean_var(x, mask=mask)
    functional.instance_norm(x)


def test_overflow_recompute_takes_keyword_arguments_and_transforms():
    """The float64 recompute binds the call's own arguments (the features passed by name too),
    and updates running statistics in place under torch.func.grad, captured ones included."""
    gen = torch.Generator().manual_seed(9)
    x = (1e30 * torch.randn(4, 32, 32, 32, generator=gen, dtype=torch.float64)).float()
    style = torch.randn(4, 32, 8, 8, generator=gen)
    np.testing.assert_allclose(
        _np(functional.instance_norm(input=x)), reference.instance_norm(_np(x)), atol=1e-5
    )
    np.testing.assert_allclose(
        _np(functional.adain(content=x, style=style)),
        reference.adain(_np(x), _np(style)),
        rtol=1e-5,
        atol=1e-5,
    )
    mean, std = stats.mean_std(x=x)
    mean_ref, std_ref = reference.mean_std(_np(x))
    np.testing.assert_allclose(_np(mean), mean_ref, rtol=1e-5, atol=1e-5 * np.abs(mean_ref).max())
    np.testing.assert_allclose(_np(std), std_ref, rtol=1e-6)

    running_mean, running_var = torch.zeros(32), torch.ones(32)

    def loss(weight: torch.Tensor) -> torch.Tensor:
        y = functional.instance_norm(x / 1e12, running_mean, running_var, weight=weight)
        return (y * y.detach()).sum()

    grad = torch.func.grad(loss)(torch.ones(32))
    np.testing.assert_allclose(_np(grad), 32 * 32 * 4 * np.ones(32), rtol=1e-4)  # sums of x_hat^2
    expected = reference.instance_norm_running_stats(_np(x / 1e12), np.zeros(32), np.ones(32))
    np.testing.assert_allclose(_np(running_mean), expected[0], rtol=1e-5)
    np.testing.assert_allclose(_np(running_var), expected[1], rtol=1e-5)


@pytest.mark.parametrize("value", [1e4, 1e8])
def test_small_input_with_a_constant_channel_at_a_large_value_recording_a_gradient(value: float):
    """Below 2^18 values with a gradient, torch.nn's batch-norm form x * a + (bias - mean * a)
    cancels on a constant channel at a large value (0.05 off its bias at 1e4, 969 at 1e8 with
    weight 2): above the refining bound ours is formed on x - mean, the bias exactly; AdaIN
    (the same route) gives the style mean. Gradients as float64's."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    x[:, 0] = value
    weight, bias = torch.tensor([2.0, 0.7, 1.3]), torch.tensor([0.5, -1.0, 0.25])
    w, b, xg = weight.clone().requires_grad_(), bias.clone().requires_grad_(), x.clone()
    xg.requires_grad_()
    y = functional.instance_norm(xg, weight=w, bias=b)
    np.testing.assert_allclose(_np(y), reference.instance_norm(_np(x), _np(w), _np(b)), atol=1e-5)
    grad = torch.randn(x.shape, generator=gen)
    y.backward(grad)
    inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    F.instance_norm(inputs[0], weight=inputs[1], bias=inputs[2]).backward(grad.double())
    for ours, ref in zip((xg, w, b), inputs, strict=True):
        assert ours.grad is not None and ref.grad is not None
        _assert_close_at_scale(ours.grad, ref.grad, 1e-5)
    style = torch.randn(2, 3, 8, 8, generator=gen) * 2 + 10
    out = functional.adain(x.clone().requires_grad_(), style)
    np.testing.assert_allclose(_np(out), reference.adain(_np(x), _np(style)), atol=1e-5)
