"""conditional_instance_norm against the NumPy float64 reference, autograd and its error cases."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from stylenorm import functional, reference
from stylenorm.functional import conditional_instance_norm

F64 = torch.float64


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _style_np(style: int | torch.Tensor) -> object:
    return style if isinstance(style, int) else style.numpy()


def _make(
    n: int = 3, c: int = 4, spatial: tuple[int, ...] = (5, 6), s: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 2.0 + 3.0 * torch.randn((n, c, *spatial), generator=gen, dtype=F64)
    weight = torch.rand(s, c, generator=gen, dtype=F64) + 0.5
    bias = torch.randn(s, c, generator=gen, dtype=F64)
    return x, weight, bias


def _styles(n: int, s: int) -> dict[str, int | torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "int": s - 1,
        "scalar_tensor": torch.tensor(1),
        "ids": torch.randint(0, s, (n,), generator=gen),
        "ids_int32": torch.arange(n, dtype=torch.int32) % s,
        "mixture": torch.rand(n, s, generator=gen, dtype=F64),
        "shared_mixture": torch.rand(s, generator=gen, dtype=F64),
    }


MODES = list(_styles(3, 5))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference_float64(mode: str, spatial: tuple[int, ...], with_bias: bool) -> None:
    x, weight, bias = _make(spatial=spatial)
    style = _styles(3, 5)[mode]
    out = conditional_instance_norm(x, style, weight, bias if with_bias else None)
    expected = reference.conditional_instance_norm(
        _np(x), _style_np(style), _np(weight), _np(bias) if with_bias else None
    )
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)
    assert out.dtype == F64 and out.shape == x.shape


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_matches_reference_and_keeps_format(mode: str) -> None:
    x, weight, bias = _make(spatial=(5, 6))
    style = _styles(3, 5)[mode]
    out = conditional_instance_norm(x.to(memory_format=torch.channels_last), style, weight, bias)
    expected = reference.conditional_instance_norm(_np(x), _style_np(style), _np(weight), _np(bias))
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_channels_last_without_gradient_is_exact_at_large_mean(
    offset: float, kernels: str, assert_small_inference_precise: Callable[..., None]
) -> None:
    # Small channels_last float32 input without a gradient takes the whole-tensor formula:
    # within 4x the error of rounding float64's output to float32, at a mean of 1e3 too.
    gen = torch.Generator().manual_seed(3)
    x = offset + torch.randn(2, 64, 8, 8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(4, 64, generator=gen) + 0.5, torch.randn(4, 64, generator=gen)
    ids = torch.tensor([1, 3])
    # as shipped, the whole-tensor formula; with every kernel forced, the blockwise code
    assert functional._formula_fits(x, weight, bias) is (kernels == "by-size")
    with torch.no_grad():
        out = conditional_instance_norm(x, ids, weight, bias)
    expected = reference.conditional_instance_norm(_np(x), ids.numpy(), _np(weight), _np(bias))
    assert_small_inference_precise(out, expected, x)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_non_contiguous_input() -> None:
    x, weight, bias = _make(spatial=(6, 5))
    xt = x.transpose(2, 3)
    ids = torch.tensor([0, 2, 4])
    out = conditional_instance_norm(xt, ids, weight, bias)
    expected = reference.conditional_instance_norm(_np(xt), ids.numpy(), _np(weight), _np(bias))
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)


def test_mixture_of_one_hot_equals_ids() -> None:
    # Dumoulin et al.'s interpolation reduces to selection for one-hot weights.
    x, weight, bias = _make()
    ids = torch.tensor([4, 0, 2])
    one_hot = torch.nn.functional.one_hot(ids, 5).to(F64)
    torch.testing.assert_close(
        conditional_instance_norm(x, one_hot, weight, bias),
        conditional_instance_norm(x, ids, weight, bias),
    )


@st.composite
def _cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 5))
    s = draw(st.integers(1, 4))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 3))))
    x, weight, bias = _make(n, c, spatial, s, draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["int", "ids", "mixture", "shared_mixture"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    style: object
    if kind == "int":
        style = draw(st.integers(0, s - 1))
    elif kind == "ids":
        style = torch.randint(0, s, (n,), generator=gen)
    elif kind == "mixture":
        style = torch.randn(n, s, generator=gen, dtype=F64)
    else:
        style = torch.randn(s, generator=gen, dtype=F64)
    return x, weight, bias, style


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_hypothesis_matches_reference(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, object],
):
    x, weight, bias, style = case
    assert isinstance(style, (int, torch.Tensor))
    out = conditional_instance_norm(x, style, weight, bias)
    expected = reference.conditional_instance_norm(_np(x), _style_np(style), _np(weight), _np(bias))
    np.testing.assert_allclose(_np(out), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["int", "ids", "mixture", "shared_mixture"])
def test_gradcheck_and_gradgradcheck(mode: str) -> None:
    x, weight, bias = _make(n=2, c=3, spatial=(3, 2), s=3)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    style = _styles(2, 3)[mode]
    if isinstance(style, torch.Tensor) and style.is_floating_point():
        style = style.clone().requires_grad_()
        inputs: tuple[torch.Tensor, ...] = (x, weight, bias, style)

        def fn(*args: torch.Tensor) -> torch.Tensor:
            return conditional_instance_norm(args[0], args[3], args[1], args[2])
    else:
        inputs = (x, weight, bias)

        def fn(*args: torch.Tensor) -> torch.Tensor:
            return conditional_instance_norm(args[0], style, args[1], args[2])

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_gradcheck_channels_last_per_sample() -> None:
    x, weight, bias = _make(n=2, c=3, spatial=(3, 2), s=3)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    weight.requires_grad_()
    ids = torch.tensor([2, 0])

    def fn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conditional_instance_norm(x, ids, weight, bias)

    assert gradcheck(fn, (x, weight))
    assert gradgradcheck(fn, (x, weight))


@pytest.mark.parametrize(
    "style", [2, torch.tensor([1, 3, 1]), torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0])]
)
def test_only_selected_rows_get_gradient(style: int | torch.Tensor) -> None:
    x, weight, bias = _make()
    weight.requires_grad_()
    bias.requires_grad_()
    out = conditional_instance_norm(x, style, weight, bias)
    (out * torch.randn_like(out)).sum().backward()
    selected = {2} if isinstance(style, int) else {1, 3}
    assert weight.grad is not None and bias.grad is not None
    for row in range(5):
        used = row in selected
        assert bool(weight.grad[row].abs().sum() > 0) == used
        assert bool(bias.grad[row].abs().sum() > 0) == used


@pytest.mark.parametrize(
    ("style", "error", "needle"),
    [
        (5, IndexError, "style id 5"),
        (-1, IndexError, "style id -1"),
        (torch.tensor([0, 7, 1]), IndexError, "style id 7"),
        (torch.tensor([0, -2, 1]), IndexError, "style id -2"),
        (torch.tensor(9), IndexError, "style id 9"),
        (torch.tensor([0, 1]), ValueError, "style ids must have shape (N,) = (3,)"),
        (torch.tensor([[0, 1, 2]]), ValueError, "style ids"),
        (torch.rand(2, 5, dtype=F64), ValueError, "style mixing weights"),
        (torch.rand(3, 4, dtype=F64), ValueError, "style mixing weights"),
        (torch.ones(3, dtype=torch.bool), TypeError, "style"),
        (True, TypeError, "style"),
        ("a", TypeError, "style"),
        (1.5, TypeError, "style"),
        # Per-sample ids as floats are mixing weights of the wrong shape: the message says so.
        (torch.tensor([0.0, 1.0, 2.0]), ValueError, "must be an integer tensor: style.long()"),
    ],
)
def test_style_errors(style: object, error: type[Exception], needle: str) -> None:
    x, weight, bias = _make()
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        conditional_instance_norm(x, style, weight, bias)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-3, 5])
@pytest.mark.parametrize("batch", [3, 70])
def test_out_of_range_ids_few_and_many(batch: int, bad: int) -> None:
    # Up to 64 ids are checked as Python ints, more by one torch reduction: the same error.
    x = torch.randn(batch, 2, 3, 3, dtype=F64)
    weight, bias = torch.rand(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64)
    ids = torch.arange(batch) % 5
    ids[batch // 2] = bad
    with pytest.raises(IndexError, match=f"style id {bad} is out of range for num_styles=5"):
        conditional_instance_norm(x, ids, weight, bias)
    ids[batch // 2] = 4  # in range again: accepted, and sample n takes row ids[n]
    out = conditional_instance_norm(x, ids, weight, bias)
    expected = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(
        x.var((2, 3), unbiased=False, keepdim=True) + 1e-5
    ) * weight[ids, :, None, None] + bias[ids, :, None, None]
    torch.testing.assert_close(out, expected)


def test_numpy_integer_style_is_an_int() -> None:
    x, weight, bias = _make()
    torch.testing.assert_close(
        conditional_instance_norm(x, np.int64(2), weight, bias),
        conditional_instance_norm(x, 2, weight, bias),
    )
    with pytest.raises(IndexError, match="style id 7"):
        conditional_instance_norm(x, np.int16(7), weight, bias)


def test_bank_and_input_errors() -> None:
    x, weight, bias = _make()
    with pytest.raises(ValueError, match="weight must have shape"):
        conditional_instance_norm(x, 0, weight[:, :3], bias)
    with pytest.raises(ValueError, match="bias must have the shape of weight"):
        conditional_instance_norm(x, 0, weight, bias[:4])
    with pytest.raises(TypeError, match="weight"):
        conditional_instance_norm(x, 0, weight.long(), bias)
    with pytest.raises(TypeError, match="input"):
        conditional_instance_norm(x.long(), 0, weight, bias)
    with pytest.raises(ValueError, match="input"):
        conditional_instance_norm(x[0, 0], 0, weight, bias)
    with pytest.raises(ValueError, match="eps"):
        conditional_instance_norm(x, 0, weight, bias, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a finite"):
        conditional_instance_norm(x, 0, weight, bias, eps=float("inf"))


def test_inputs_not_modified() -> None:
    x, weight, bias = _make()
    mix = torch.rand(3, 5, dtype=F64)
    copies = [t.clone() for t in (x, weight, bias, mix)]
    conditional_instance_norm(x, mix, weight, bias)
    conditional_instance_norm(
        x.to(memory_format=torch.channels_last), torch.tensor([1, 2, 3]), weight, bias
    )
    for before, after in zip(copies, (x, weight, bias, mix), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int", "ids", "mixture"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_close_to_float32(dtype: torch.dtype, mode: str, channels_last: bool) -> None:
    x, weight, bias = _make(n=3, c=4, spatial=(8, 8))
    x = x.float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    style = _styles(3, 5)[mode]
    if isinstance(style, torch.Tensor) and style.is_floating_point():
        style = style.float()
    expected = conditional_instance_norm(x, style, weight.float(), bias.float())
    for w, b in ((weight.float(), bias.float()), (weight.to(dtype), bias.to(dtype))):
        out = conditional_instance_norm(x.to(dtype), style, w, b)
        assert out.dtype == dtype and bool(out.isfinite().all())
        tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * 4)


def test_constant_channels_finite_values_and_gradients() -> None:
    x = torch.full((2, 3, 4, 4), 7.0, dtype=F64, requires_grad=True)
    weight = torch.rand(2, 3, dtype=F64, requires_grad=True)
    bias = torch.randn(2, 3, dtype=F64, requires_grad=True)
    out = conditional_instance_norm(x, torch.tensor([0, 1]), weight, bias)
    # A constant channel normalizes to 0, leaving the bias.
    torch.testing.assert_close(out, bias[[0, 1]][:, :, None, None].expand_as(out))
    out.sum().backward()
    for t in (x, weight, bias):
        assert t.grad is not None and bool(t.grad.isfinite().all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("value", [1.0, 100.0, 1e4])
def test_single_position_gives_the_bias_exactly(dtype: torch.dtype, value: float) -> None:
    # One position per channel: x - mean is exactly 0, so y = bias, whatever the value (a folded
    # -mean * a + bias cancelled, and overflowed half precision at 1e4). The derivative in x is
    # 0 (the output does not depend on it), in the weight 0, in the bias 1.
    x = torch.full((2, 3, 1, 1), value, dtype=dtype, requires_grad=True)
    weight = (torch.rand(4, 3, dtype=F64) + 0.5).requires_grad_()
    bias = torch.randn(4, 3, dtype=F64).requires_grad_()
    style = torch.tensor([1, 3])
    out = conditional_instance_norm(x, style, weight.to(dtype), bias.to(dtype))
    expected = bias.detach()[style].to(dtype)[:, :, None, None]
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and weight.grad is not None and bias.grad is not None
    assert bool((x.grad == 0).all()) and bool((weight.grad == 0).all())
    torch.testing.assert_close(bias.grad[style], torch.ones(2, 3, dtype=F64))


@pytest.mark.parametrize("size", [8, 128])  # below and above the custom-backward threshold
@pytest.mark.parametrize("grad", [False, True])
def test_constant_channels_at_large_mean_give_the_bias_exactly(size: int, grad: bool) -> None:
    # |mean| / sqrt(eps) is huge, so the statistics are refined; the output must then be formed on
    # x - mean, which is exactly 0 here (a kernel's x * a + (bias - mean * a) came out 0.08 off at
    # 1e4). Below 2^18 values with a gradient the route is torch.nn's own batch norm, whose error
    # bounds ours there (see README); so that case is held to torch.nn's.
    x = torch.full((4, 16, size, size), 1e4, requires_grad=grad)
    weight, bias = torch.rand(2, 16) + 0.5, torch.randn(2, 16)
    style = torch.tensor([0, 1, 1, 0])
    with torch.set_grad_enabled(grad):
        out = conditional_instance_norm(x, style, weight, bias)
    error = (out.detach() - bias[style][:, :, None, None]).abs().max()
    if grad and size == 8:
        # torch.nn's affine instance norm: batch norm of the (1, N*C, M) view.
        flat = x.detach().reshape(1, 64, -1)
        inst_weight, inst_bias = weight[style].reshape(64), bias[style].reshape(64)
        torch_nn = F.batch_norm(flat, None, None, inst_weight, inst_bias, training=True)
        torch_error = (torch_nn - inst_bias[:, None]).abs().max()
        assert float(error) <= float(torch_error) * (1 + 1e-6)
    else:
        assert float(error) == 0.0


def test_empty_batch() -> None:
    x, weight, bias = _make(n=0)
    weight.requires_grad_()
    bias.requires_grad_()
    out = conditional_instance_norm(x, torch.zeros(0, dtype=torch.long), weight, bias)
    assert out.shape == x.shape
    # Connected to the banks, as torch.nn's affine instance norm is: zero gradients.
    out.sum().backward()
    assert weight.grad is not None and bias.grad is not None
    assert not weight.grad.any() and not bias.grad.any()


@pytest.mark.parametrize("mode", ["int", "ids"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_small_std_float32(mode: str, layout: str) -> None:
    # torch's channels_last group-norm kernel cancels here (E[x^2] - E[x]^2); ours must not.
    gen = torch.Generator().manual_seed(5)
    x = (100.0 + 0.1 * torch.randn(2, 3, 16, 16, generator=gen)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(4, 3, generator=gen) + 0.5, torch.randn(4, 3, generator=gen)
    style = _styles(2, 4)[mode]
    out = conditional_instance_norm(x, style, weight, bias)
    expected = reference.conditional_instance_norm(_np(x), _style_np(style), _np(weight), _np(bias))
    np.testing.assert_allclose(_np(out), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("path", ["small", "function", "channels_last"])
@pytest.mark.usefixtures("blockwise_at_any_size")
def test_large_mean_gradients_as_precise_as_torch_nn(
    offset: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Per-sample (gamma, beta) on float32 features whose mean dwarfs their spread: output and
    # gradients no worse, against float64 of the same values, than torch.nn's instance norm
    # followed by the same affine map in float32. Contiguous (both precise paths) and
    # channels_last (refined statistics, per-sample kernel backward).
    monkeypatch.setattr(functional, "_CONTIGUOUS_NORM_MIN_NUMEL", 1 << 40 if path == "small" else 0)
    monkeypatch.setattr(functional, "_KERNEL_MIN_SAMPLE_NUMEL", 0)
    gen = torch.Generator().manual_seed(7)
    x = (offset + torch.randn(3, 4, 16, 16, generator=gen)).float()
    if path == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(5, 4, generator=gen) + 0.5, torch.randn(5, 4, generator=gen)
    ids = torch.tensor([4, 0, 2])
    grad = torch.randn(x.shape, generator=gen)

    def explicit(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mean = x.mean((2, 3), keepdim=True)
        var = (x - mean).square().mean((2, 3), keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[ids, :, None, None] + b[ids, :, None, None]

    def with_torch_nn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x) * w[ids, :, None, None] + b[ids, :, None, None]

    def results(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        y = fn(*inputs)
        return [t.detach().double() for t in (y, *torch.autograd.grad(y, inputs, grad.to(dtype)))]

    expected = results(explicit, torch.float64)
    ours = results(lambda x, w, b: conditional_instance_norm(x, ids, w, b), torch.float32)
    theirs = results(with_torch_nn, torch.float32)
    for name, o, t, e in zip(("y", "x", "weight", "bias"), ours, theirs, expected, strict=True):
        scale = float(e.abs().max())
        e_ours, e_theirs = float((o - e).abs().max()) / scale, float((t - e).abs().max()) / scale
        assert e_ours <= 2 * e_theirs + 1e-6, (name, e_ours, e_theirs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (4, 32, 32, 32)])
def test_features_whose_float32_squares_overflow(layout: str, shape: tuple[int, ...]) -> None:
    """At 1e30 a float32 sum of squares overflows (torch.nn's instance norm outputs zeros, the
    group-norm kernel NaN): the call runs again in float64, output and gradients as float64's."""
    gen = torch.Generator().manual_seed(2)
    x = (1e30 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    n, c = shape[0], shape[1]
    weight = (torch.rand(3, c, generator=gen) + 0.5).requires_grad_()
    bias = torch.randn(3, c, generator=gen).requires_grad_()
    ids = torch.tensor([0, 2, 1, 0][:n])
    xg = x.clone().requires_grad_()
    y = conditional_instance_norm(xg, ids, weight, bias)
    assert y.dtype == torch.float32 and y.stride() == x.stride()
    expected = reference.conditional_instance_norm(_np(x), ids.numpy(), _np(weight), _np(bias))
    np.testing.assert_allclose(_np(y), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(shape, generator=gen)
    y.backward(grad)
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    conditional_instance_norm(inputs[0], ids, inputs[1], inputs[2]).backward(grad.double())
    for ours, ref in zip((xg, weight, bias), inputs, strict=True):
        assert ours.grad is not None and ref.grad is not None
        scale = float(ref.grad.abs().max())
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-5 * scale)
