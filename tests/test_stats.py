"""Tests of stylenorm.stats against the NumPy float64 reference and textbook identities."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from stylenorm import reference, stats

DTYPES_LOW = [torch.float16, torch.bfloat16]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@st.composite
def features_and_mask(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    spatial_rank = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    spatial = tuple(draw(st.integers(2, 6)) for _ in range(spatial_rank))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    offset = draw(st.sampled_from([0.0, 3.0, -100.0]))
    x = offset + scale * torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64)
    correction = draw(st.sampled_from([0, 1]))
    kind = draw(st.sampled_from(["none", "binary", "soft", "per_channel"]))
    mask: torch.Tensor | None = None
    if kind != "none":
        mc = c if kind == "per_channel" else 1
        shape = (n, mc, *spatial)
        if kind == "binary":
            mask = torch.rand(shape, generator=gen) < 0.6
            mask.reshape(n, mc, -1)[:, :, :2] = True  # at least two selected positions
        else:
            # weights >= 0.6 on >= 2 positions: total weight > correction
            mask = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.6
    return x, mask, correction


@settings(max_examples=60, deadline=None)
@given(features_and_mask())
def test_mean_var_matches_reference_float64(case: tuple[torch.Tensor, torch.Tensor | None, int]):
    x, mask, correction = case
    mean, var = stats.mean_var(x, correction=correction, mask=mask)
    ref_mean, ref_var = reference.mean_var(_np(x), correction, None if mask is None else _np(mask))
    scale = float(np.abs(_np(x)).max()) + 1e-300
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-12, atol=1e-13 * scale)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-9, atol=1e-13 * scale**2)
    assert mean.shape == var.shape == x.shape[:2]
    assert mean.dtype == var.dtype == torch.float64


@settings(max_examples=40, deadline=None)
@given(features_and_mask(), st.sampled_from([0.0, 1e-5, 0.1]))
def test_mean_std_matches_reference_float32(
    case: tuple[torch.Tensor, torch.Tensor | None, int], eps: float
):
    x, mask, correction = case
    x32 = x.float()
    mask32 = None if mask is None or mask.dtype == torch.bool else mask.float()
    mask32 = mask if mask is not None and mask.dtype == torch.bool else mask32
    mean, std = stats.mean_std(x32, eps=eps, correction=correction, mask=mask32)
    ref_mean, ref_std = reference.mean_std(
        _np(x32), eps, correction, None if mask32 is None else _np(mask32)
    )
    scale = float(np.abs(_np(x32)).max())
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(_np(std), ref_std, rtol=1e-4, atol=1e-6 * scale)
    assert mean.dtype == std.dtype == torch.float32


def test_matches_torch_var_mean():
    x = torch.randn(3, 5, 7, 9)
    for correction in (0, 1):
        var, mean = torch.var_mean(x, dim=(2, 3), correction=correction)
        m, v = stats.mean_var(x, correction=correction)
        torch.testing.assert_close(m, mean)
        torch.testing.assert_close(v, var)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_input_takes_var_mean(layout: str, dtype: torch.dtype, kernels: str):
    # Below 4096 values the statistics are torch.var_mean's (in float32 for half input),
    # bit for bit, as shipped; with kernels="own" our kernels, to float32 rounding.
    x = (1e3 + torch.randn(2, 16, 8, 8)).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0)
    m, v = stats._mean_var(x, 0.0, None)
    exact = kernels == "by-size"
    torch.testing.assert_close(m, mean, rtol=0 if exact else 2e-7, atol=0)
    torch.testing.assert_close(v, var, rtol=0 if exact else 1e-6, atol=0)
    big = 1e3 + torch.randn(4, 16, 8, 8)  # 4096 values: our kernels
    assert not torch.equal(stats._mean_var(big, 0.0, None)[1], torch.var_mean(big, (2, 3))[0])


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4, 1e6])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_does_not_cancel(offset: float, layout: str):
    # E[x^2] - E[x]^2 in float32 loses every digit of a unit variance at mean 1e4, and a float32
    # one-pass (Welford) reduction loses digits in proportion to |mean| / std (1e-4 at 1e4).
    # Ours must be as close to the float64 statistics of the float32 input as torch.var_mean.
    gen = torch.Generator().manual_seed(0)
    x = (offset + torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = stats.mean_var(x)
    ref_mean, ref_var = reference.mean_var(_np(x))
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-6)
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=2e-7)
    torch_var, torch_mean = torch.var_mean(x, (2, 3), correction=0)
    torch.testing.assert_close(var, torch_var, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(mean, torch_mean, rtol=2e-7, atol=0.0)


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
def test_masked_statistics_at_large_means(offset: float):
    """Weighted statistics are refined like the unmasked ones: with a mask of ones they are as
    close to float64 as without (they had 1e3x the variance error at |mean| / std = 1e5), and a
    soft mask's stay as close to the reference's."""
    gen = torch.Generator().manual_seed(0)
    x = (offset + 0.1 * torch.randn(2, 8, 64, 64, generator=gen, dtype=torch.float64)).float()
    soft = torch.rand(2, 1, 64, 64, generator=gen)
    _, plain_var = stats.mean_var(x)
    exact_var = reference.mean_var(_np(x))[1]
    plain_error = np.abs(_np(plain_var) / exact_var - 1).max()
    for mask in (torch.ones(1, 1, 64, 64), soft):
        mean, var = stats.mean_var(x, mask=mask)
        ref_mean, ref_var = reference.mean_var(_np(x), mask=_np(mask))
        assert np.abs(_np(var) / ref_var - 1).max() <= max(2 * plain_error, 3e-7)
        np.testing.assert_allclose(_np(mean), ref_mean, rtol=2e-7)


def test_refined_large_mean_statistics_gradients_and_vmap():
    """The refined path (|mean| / std above the group-norm bound): gradients to second order,
    and vmap (which keeps the one-pass numbers) against a loop."""
    gen = torch.Generator().manual_seed(7)
    x = (300.0 + torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    assert stats._needs_refining(*_group_norm_moments(x.detach()), x.detach())
    assert gradcheck(lambda t: stats.mean_std(t, correction=1), (x,))
    assert gradgradcheck(lambda t: stats.mean_std(t), (x,))
    xs = x.detach().unsqueeze(0).expand(2, -1, -1, -1, -1) + torch.arange(2.0).view(2, 1, 1, 1, 1)
    looped = [torch.stack(stats.mean_var(t)) for t in xs]
    torch.testing.assert_close(
        torch.func.vmap(lambda t: torch.stack(stats.mean_var(t)))(xs), torch.stack(looped)
    )


def _group_norm_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape[0], x.shape[1]
    _, mean, rstd = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), c, 0.0)
    return mean.reshape(n, c), rstd.reshape(n, c)


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3, 1e4])
def test_small_channels_last_statistics(offset: float, kernels: str):
    # Small channels_last input of 16+ channels and 64+ (sample, channel) pairs: as shipped, the
    # corrected two-pass in whole-tensor ops on its layout; kernels="own": the blockwise code.
    # Either way as close to float64 as torch.var_mean, at any mean; gradients exact.
    gen = torch.Generator().manual_seed(4)
    x = (offset + torch.randn(2, 32, 16, 16, generator=gen, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=torch.channels_last)
    assert stats._formula_pays(x) is (kernels == "by-size")
    mean, var = stats.mean_var(x)
    ref_mean, ref_var = reference.mean_var(_np(x))
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-6)
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=2e-7, atol=1e-7)
    half_mean, half_var = stats.mean_var(x.bfloat16())
    ref_mean, ref_var = reference.mean_var(_np(x.bfloat16()))
    np.testing.assert_allclose(_np(half_var.float()), ref_var, rtol=1e-2)
    np.testing.assert_allclose(_np(half_mean.float()), ref_mean, rtol=1e-2, atol=1e-2)
    x64 = x.double().requires_grad_()
    small = torch.randn(1, 64, 8, 8, dtype=torch.float64)  # 4096 values: not torch.var_mean
    small = small.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert stats._formula_pays(small) is (kernels == "by-size")
    assert gradcheck(lambda t: stats.mean_std(t, correction=1), (small,), fast_mode=True)
    mean64, var64 = stats.mean_var(x64, correction=1)
    ref_mean, ref_var = reference.mean_var(_np(x64), 1)
    np.testing.assert_allclose(_np(var64), ref_var, rtol=1e-12)
    np.testing.assert_allclose(_np(mean64), ref_mean, rtol=1e-12, atol=1e-12)
    grad = torch.autograd.grad(mean64.sum() + var64.sum(), x64)[0]
    m = 16 * 16
    expected = 1 / m + 2 * (x64 - x64.mean((2, 3), keepdim=True)) / (m - 1)
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d"])
def test_large_mean_small_std_every_layout(layout: str):
    # torch's channels_last group-norm kernel cancels here (E[x^2] - E[x]^2); ours must not.
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 4, 16, 16) if layout == "channels_last_3d" else (2, 3, 16, 16)
    x = (100.0 + 0.1 * torch.randn(shape, generator=gen)).float()
    if layout != "contiguous":
        x = x.contiguous(memory_format=getattr(torch, layout))
    _, var = stats.mean_var(x)
    _, ref = reference.mean_var(_np(x))
    np.testing.assert_allclose(_np(var), ref, rtol=1e-3)


# The |mean| / spread ratios that pick the precise paths, by hand: spread = std, or sqrt(eps) for
# a constant channel (std 0) or an unknown one (NaN); entries with spread 0 or a NaN mean count
# as nothing. Rows of (mean, var) and the largest ratio at eps = 1e-2 and at eps = 0.
_RATIO_MEANS = [3.0, -8.0, math.nan, 2.0, 0.0, -5.0]
_RATIO_VARS = [4.0, 0.0, 1.0, math.nan, 0.0, 25.0]
# eps 1e-2: 8 / 0.1; eps 0: 3 / 2 (then 5 / 5); eps 1e-50 (0 in float32): 8 / 1e-25; a negative
# eps (torch's kernels take one): no spread for the constant channels, 3 / 2.
_RATIO_EXPECTED = {1e-2: 80.0, 0.0: 1.5, 1e-50: 8e25, -1e-2: 1.5}


@pytest.mark.parametrize("eps", sorted(_RATIO_EXPECTED))
@pytest.mark.parametrize("route", ["python", "torch"])
@pytest.mark.parametrize("shape", [(6,), (2, 3)])
def test_largest_mean_to_spread_both_routes(
    eps: float, route: str, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
):
    # A few statistics are read as Python floats, many by torch ops: the same rule either way.
    if route == "torch":
        monkeypatch.setattr(stats, "_FEW_STATISTICS", -1)
    mean = torch.tensor(_RATIO_MEANS).reshape(shape)
    var = torch.tensor(_RATIO_VARS).reshape(shape)
    x = torch.zeros(1, 6, 2)
    got = stats._largest_mean_to_spread(mean, var, eps, x)
    assert got == pytest.approx(_RATIO_EXPECTED[eps], rel=1e-6)
    # The same rule from a given 1 / spread (inf: a constant channel without eps, left out).
    rstd = torch.tensor([0.5, math.inf, 1.0, math.nan, 2.0, 0.2]).reshape(shape)
    assert stats._largest_mean_to_std(mean, rstd, x) == pytest.approx(1.5, rel=1e-6)
    assert stats._largest_mean_to_std(mean[:0], rstd[:0], x) == 0.0
    assert math.isnan(stats._largest_mean_to_spread(mean, var, eps, x.to("meta"), math.nan))
    # The same rule from a kernel's rstd = 1 / sqrt(var + eps), the variance recovered from it
    # (in Python floats for a few statistics, by torch ops for many).
    kernel_rstd = torch.rsqrt(var + eps)
    got = stats._largest_mean_to_spread_of_rstd(mean, kernel_rstd, eps, x)
    assert got == pytest.approx(_RATIO_EXPECTED[eps], rel=1e-6)
    assert stats._largest_mean_to_spread_of_rstd(mean, kernel_rstd, eps, x.to("meta")) == 0.0


def test_apply_skips_argument_binding_outside_transforms(monkeypatch: pytest.MonkeyPatch):
    # stats._apply applies a twin of the Function whose forward takes ctx, without the inspect
    # binding that Function.apply does on every call for a Function with setup_context (in
    # Python up to torch 2.13, in C++ from 2.14): same outputs, same backward node's name, same
    # gradients.
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    expected = stats._MeanVar.apply(x, 1.0)
    expected_grad = torch.autograd.grad(expected[0].sum() + expected[1].square().sum(), x)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("arguments bound with inspect")

    with monkeypatch.context() as patched:
        patched.setattr(inspect, "signature", refuse)
        mean, var = stats._apply(stats._MeanVar, x, 1.0)
        grad = torch.autograd.grad(mean.sum() + var.square().sum(), x)
    assert type(mean.grad_fn).__qualname__ == type(expected[0].grad_fn).__qualname__
    assert stats._ctx_style(stats._MeanVar) is stats._ctx_style(stats._MeanVar)  # made once
    torch.testing.assert_close((mean, var), expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)

    # Under a torch.func transform, the full apply (which dispatches the transform).
    def loss(t: torch.Tensor) -> torch.Tensor:
        m, v = stats._apply(stats._MeanVar, t, 1.0)
        return m.sum() + v.square().sum()

    torch.testing.assert_close(torch.func.grad(loss)(x.detach()), expected_grad[0])


def test_binary_mask_equals_selected_positions():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    mask = torch.zeros(2, 1, 6, 5, dtype=torch.bool)
    mask[0, :, :3] = True
    mask[1, :, 2:, 1:] = True
    for correction in (0, 1):
        mean, var = stats.mean_var(x, correction=correction, mask=mask)
        for n in range(2):
            picked = x[n][:, mask[n, 0]]
            torch.testing.assert_close(mean[n], picked.mean(-1))
            torch.testing.assert_close(var[n], picked.var(-1, correction=correction))


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 1), (1, 1, 6, 1), (1, 3, 1, 5), (2, 1, 1, 5)])
@pytest.mark.parametrize("correction", [0, 1])
def test_mask_with_dims_of_one_weighs_every_position_it_covers(
    mask_shape: tuple[int, ...], correction: int
):
    # A dimension of 1 broadcasts over the positions, as in NumPy: the weights of the
    # broadcast mask, not one weight per mask entry.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64)
    mask = 0.1 + torch.rand(mask_shape, generator=gen, dtype=torch.float64)
    mean, var = stats.mean_var(x, correction=correction, mask=mask)
    w = mask.expand(2, 3, 6, 5)
    total = w.sum((2, 3))
    expected_mean = (w * x).sum((2, 3)) / total
    centred = x - expected_mean[..., None, None]
    expected_var = (w * centred**2).sum((2, 3)) / (total - correction)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)
    ref_mean, ref_var = reference.mean_var(x.numpy(), correction, mask.numpy())
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-12)
    if mask_shape == (2, 1, 1, 1) and correction == 0:
        # One weight per sample: the unmasked statistics (Bessel's correction counts weight).
        torch.testing.assert_close((mean, var), stats.mean_var(x, correction=correction))


def test_soft_mask_scale_invariant():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    a = stats.mean_var(x, mask=mask)
    b = stats.mean_var(x, mask=7.5 * mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spatial", [(9,), (4, 5), (3, 4, 2), (2, 2, 3, 2)])
@pytest.mark.parametrize("correction", [0, 1])
def test_gradcheck_gradgradcheck(spatial: tuple[int, ...], correction: int):
    x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)

    def fn(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stats.mean_std(t, correction=correction)

    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))
    assert gradgradcheck(lambda t: stats.mean_var(t, correction=correction), (x,))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("correction", [0, 1])
def test_forward_mode_derivatives(layout: str, correction: int):
    # torch.func.jvp, forward AD, jacfwd, jacfwd of jacfwd (a custom jvp rule gave zeros there)
    # and hessian, against the same transforms of the textbook formula (jacfwd against jacrev).
    gen = torch.Generator().manual_seed(correction)
    x = 5 + torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stats.mean_var(x, correction=correction)

    def formula(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3)), x.var((2, 3), correction=correction)

    got, expected = (torch.func.jvp(f, (x,), (tangent,)) for f in (ours, formula))
    torch.testing.assert_close(got, expected)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        _, std = stats.mean_std(dual, eps=0.0, correction=correction)
        std_tangent = torch.autograd.forward_ad.unpack_dual(std).tangent
    torch.testing.assert_close(std_tangent, expected[1][1] / (2 * expected[0][1].sqrt()))

    def std_sum(x: torch.Tensor) -> torch.Tensor:
        return stats.mean_std(x, eps=0.0, correction=correction)[1].pow(3).sum()

    jac = torch.func.jacfwd(lambda x: stats.mean_std(x, correction=correction)[1])(x)
    torch.testing.assert_close(
        jac, torch.func.jacrev(lambda x: stats.mean_std(x, correction=correction)[1])(x)
    )
    second = torch.func.jacfwd(torch.func.jacfwd(lambda x: ours(x)[1].sum()))(x)
    expected_second = torch.func.jacfwd(torch.func.jacfwd(lambda x: formula(x)[1].sum()))(x)
    torch.testing.assert_close(second, expected_second)
    hessian = torch.func.hessian(std_sum)(x)
    expected_hessian = torch.autograd.functional.hessian(
        lambda x: formula(x)[1].sqrt().pow(3).sum(), x
    )
    torch.testing.assert_close(hessian, expected_hessian)


@pytest.mark.parametrize("dtype", DTYPES_LOW)
def test_forward_mode_derivative_of_half_input(dtype: torch.dtype):
    # Half input: tangents computed in float32 and rounded once to the input's dtype, so they
    # equal float64's within that dtype's rounding.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=gen).to(dtype)
    tangent = torch.randn(x.shape, generator=gen).to(dtype)
    _, tangents = torch.func.jvp(stats.mean_var, (x,), (tangent,))
    expected = torch.func.jvp(
        lambda x: (x.mean((2, 3)), x.var((2, 3), correction=0)), (x.double(),), (tangent.double(),)
    )[1]
    for got, want in zip(tangents, expected, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype))


def test_gradcheck_only_mean_or_only_var_used():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: stats.mean_var(t)[0], (x,))
    assert gradcheck(lambda t: stats.mean_var(t)[1], (x,))
    assert gradgradcheck(lambda t: stats.mean_var(t)[1], (x,))


def test_gradcheck_masked():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 1, 4, 5, dtype=torch.float64) + 0.1).requires_grad_()
    assert gradcheck(lambda t, w: stats.mean_std(t, correction=1, mask=w), (x, mask))
    assert gradgradcheck(lambda t, w: stats.mean_std(t, mask=w), (x, mask))


def test_gradient_matches_autograd_of_formula():
    x = torch.randn(3, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    gm, gs = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mean, std = stats.mean_std(x, eps=1e-3, correction=1)
    (ours,) = torch.autograd.grad((mean * gm).sum() + (std * gs).sum(), x)
    ref_mean = x.mean((2, 3))
    ref_std = (x.var((2, 3), correction=1) + 1e-3).sqrt()
    (ref,) = torch.autograd.grad((ref_mean * gm).sum() + (ref_std * gs).sum(), x)
    torch.testing.assert_close(ours, ref)


def test_constant_channel_finite_value_and_gradient():
    x = torch.full((2, 3, 4, 4), 2.5, requires_grad=True)
    mean, std = stats.mean_std(x)
    assert torch.equal(mean, torch.full((2, 3), 2.5))
    torch.testing.assert_close(std, torch.full((2, 3), math.sqrt(1e-5)))
    (mean.sum() + std.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    _, var = stats.mean_var(x.detach())
    assert torch.equal(var, torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", DTYPES_LOW)
def test_half_precision_reduced_in_float32(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    # Values whose squares overflow float16 (max 65504) and a large common offset.
    x = (300.0 + 200.0 * torch.randn(2, 4, 32, 32, generator=gen)).to(dtype)
    mean, std = stats.mean_std(x)
    assert mean.dtype == std.dtype == dtype
    ref_mean, ref_std = reference.mean_std(_np(x))
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-2)
    np.testing.assert_allclose(_np(std), ref_std, rtol=1e-2)
    x.requires_grad_()
    g = torch.autograd.grad(stats.mean_std(x)[1].sum(), x)[0]
    assert g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.parametrize(
    "layout",
    ["channels_last", "transposed", "sliced", "expanded", "channels_last_3d"],
)
def test_memory_layouts(layout: str):
    base = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(2, 3)
    elif layout == "sliced":
        x = torch.randn(2, 6, 6, 10, dtype=torch.float64)[:, ::2, :, ::2]
    elif layout == "expanded":
        x = torch.randn(1, 3, 6, 5, dtype=torch.float64).expand(4, 3, 6, 5)
    else:
        x = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last_3d
        )
    ref_mean, ref_var = reference.mean_var(_np(x), 1)
    mean, var = stats.mean_var(x, correction=1)
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-12)


def test_input_not_modified():
    x = torch.randn(2, 3, 5, 5)
    mask = torch.rand(2, 1, 5, 5)
    x0, mask0 = x.clone(), mask.clone()
    stats.mean_std(x, mask=mask, correction=1)
    stats.mean_std(x)
    assert torch.equal(x, x0) and torch.equal(mask, mask0)


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    mean, std = stats.mean_std(x)
    assert mean.shape == std.shape == (0, 3)


def test_compute_dtype():
    assert stats.compute_dtype(torch.float16) == torch.float32
    assert stats.compute_dtype(torch.bfloat16) == torch.float32
    assert stats.compute_dtype(torch.float32) == torch.float32
    assert stats.compute_dtype(torch.float64) == torch.float64
    for wrong in (torch.int64, torch.complex64, "float32", None):
        with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype"):
            stats.compute_dtype(wrong)  # type: ignore[arg-type]


def test_numpy_numbers_are_numbers_and_tensors_are_not():
    x = torch.randn(2, 3, 8)
    expected = stats.mean_std(x, correction=1, eps=1e-3)
    got = stats.mean_std(x, correction=np.int64(1), eps=np.float32(1e-3))  # type: ignore[arg-type]
    torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="eps must be a finite non-negative number, got a tensor"):
        stats.mean_std(x, eps=torch.tensor(1e-3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="correction must be a number, got bool"):
        stats.mean_var(x, correction=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"x": torch.randn(2, 3)}, ValueError, r"x must have shape \(N, C, \*spatial\)"),
        ({"x": torch.ones(2, 3, 4, dtype=torch.long)}, TypeError, "x must be a floating"),
        ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
        ({"x": torch.randn(2, 3, 0)}, ValueError, "no spatial positions"),
        ({"x": torch.randn(2, 3, 4), "mask": torch.ones(2, 3, 5)}, ValueError, "mask must"),
        ({"x": torch.randn(2, 3, 4), "mask": torch.ones(2, 4)}, ValueError, "mask must"),
        ({"x": torch.randn(2, 3, 4), "mask": torch.ones(3, 1, 4)}, ValueError, "mask must"),
        ({"x": torch.randn(2, 3, 4), "mask": -torch.ones(2, 1, 4)}, ValueError, "non-negative"),
        (
            {"x": torch.randn(2, 3, 4), "mask": torch.zeros(2, 1, 4)},
            ValueError,
            "mask must have a positive total weight for every sample and channel",
        ),
        ({"x": torch.randn(2, 3, 4), "mask": "m"}, TypeError, "mask must be a torch.Tensor"),
        ({"x": torch.randn(2, 3, 1), "correction": 1}, ValueError, "correction=1"),
        ({"x": torch.randn(2, 3, 4), "correction": -1}, ValueError, "correction"),
        ({"x": torch.randn(2, 3, 4), "correction": "1"}, TypeError, "correction"),
        ({"x": torch.randn(2, 3, 4), "eps": -1.0}, ValueError, "eps"),
        ({"x": torch.randn(2, 3, 4), "eps": float("nan")}, ValueError, "eps"),
        ({"x": torch.randn(2, 3, 4), "eps": float("inf")}, ValueError, "eps"),
        ({"x": torch.randn(2, 3, 4), "correction": float("nan")}, ValueError, "correction"),
        ({"x": torch.randn(2, 3, 4), "correction": float("inf")}, ValueError, "correction"),
        (
            {"x": torch.randn(2, 3, 4), "mask": torch.tensor([[[1.0, float("nan"), 1.0, 1.0]]])},
            ValueError,
            "non-negative and finite",
        ),
        (
            {"x": torch.randn(2, 3, 4), "mask": torch.tensor([[[1.0, float("inf"), 1.0, 1.0]]])},
            ValueError,
            "non-negative and finite",
        ),
    ],
)
def test_errors(kwargs: dict[str, object], error: type[Exception], pattern: str):
    fn = stats.mean_std if "eps" in kwargs else stats.mean_var
    with pytest.raises(error, match=pattern):
        fn(**kwargs)  # type: ignore[arg-type]


def test_mask_with_weight_at_most_correction_is_an_error():
    x = torch.randn(1, 2, 4)
    mask = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    stats.mean_var(x, mask=mask)  # one position: a biased variance (zero) is defined
    with pytest.raises(ValueError, match="correction"):
        stats.mean_var(x, mask=mask, correction=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d"])
@pytest.mark.parametrize("batch", [2, 1])
def test_channels_last_blocks_sum_exactly(
    layout: str, dtype: torch.dtype, batch: int, monkeypatch: pytest.MonkeyPatch
):
    # Enough (sample, channel) pairs that the positions are reduced in several cache-sized
    # blocks (at 2^18 values per block, which these shapes were sized for), the last one short:
    # the blockwise sums must equal the reference, also at a large mean, and half inputs must be
    # reduced in float32. A batch of one is also cut into runs of positions, merged exactly.
    monkeypatch.setattr(stats, "_BLOCK_VALUES", 1 << 18)
    gen = torch.Generator().manual_seed(5)
    spatial = (3, 5, 16) if layout == "channels_last_3d" else (15, 16)
    x64 = 100.0 + 0.5 * torch.randn((batch, 2048, *spatial), generator=gen, dtype=torch.float64)
    x = x64.to(dtype).contiguous(memory_format=getattr(torch, layout))
    positions = stats._positions(x)
    parts = stats._virtual_samples(positions)
    assert parts == 4 // batch  # 240 positions: 2 runs of 120, or 4 of 60
    positions = stats._split_samples(positions, parts)
    block = stats._position_blocks(positions)
    assert 1 < block < positions.shape[1] and positions.shape[1] % block != 0  # uneven blocks
    for correction in (0, 1):
        # The internal helper: statistics in the compute dtype, before mean_var rounds them.
        mean, var = stats._mean_var(x, correction, None)
        ref_mean, ref_var = reference.mean_var(_np(x), correction)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(_np(mean), ref_mean, rtol=tol)
        np.testing.assert_allclose(_np(var), ref_var, rtol=1e3 * tol)
        assert mean.dtype == stats.compute_dtype(dtype)


def test_blockwise_channels_last_only_where_it_pays(kernels: str):
    # As shipped, small or narrow channels_last inputs are reduced contiguous (torch's fused
    # kernel is faster there); kernels="own" sends every channels_last input blockwise.
    own = kernels == "own"
    cl = torch.channels_last

    def blockwise(*shape: int) -> bool:
        return stats._blockwise_channels_last(torch.empty(shape).contiguous(memory_format=cl))

    assert blockwise(8, 64, 32, 32)  # 2^19 values, 64 channels
    assert blockwise(2, 8, 4, 4) == own
    assert blockwise(2, 8, 256, 256) == own  # narrow rows of 8 channels
    assert not stats._blockwise_channels_last(torch.empty(8, 64, 32, 32))  # contiguous
    # 2^17 values: blockwise only where a gradient is recorded (its backward saves copies)
    x = torch.empty(2, 64, 32, 32).contiguous(memory_format=cl)
    weight = torch.ones(64, requires_grad=True)
    assert stats._blockwise_channels_last(x) == own
    assert stats._blockwise_channels_last(x, weight)
    assert stats._blockwise_channels_last(x.requires_grad_())
    with torch.no_grad():
        assert stats._blockwise_channels_last(x, weight) == own
    small = torch.empty(2, 64, 16, 32).contiguous(memory_format=cl)  # 2^16 values
    assert stats._blockwise_channels_last(small, weight) == own


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 16, 16, 16), (4, 32, 32, 32)])
@pytest.mark.parametrize("scale", [1e18, 1e30])
def test_mean_std_where_float32_squares_overflow(layout: str, shape: tuple[int, ...], scale: float):
    """From 4096 values, statistics whose float32 sum of squares overflows are computed again in
    float64: the standard deviation (1e30 here) is float64's, where the float32 variance (1e60)
    can only be inf; the gradient too."""
    gen = torch.Generator().manual_seed(1)
    x = (scale * (torch.randn(shape, generator=gen, dtype=torch.float64) - 2.0)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_()
    mean, std = stats.mean_std(xg)
    mean_ref, std_ref = reference.mean_std(_np(x))
    np.testing.assert_allclose(_np(mean), mean_ref, rtol=1e-6)
    np.testing.assert_allclose(_np(std), std_ref, rtol=1e-6)
    var = stats.mean_var(x)[1]
    with np.errstate(over="ignore"):  # 1e60 is inf in float32
        var_ref = (std_ref**2).astype(np.float32)
    np.testing.assert_allclose(_np(var), var_ref, rtol=1e-6)
    (std.sum() + mean.sum()).backward()
    x64 = x.detach().double().requires_grad_()
    m64, s64 = stats.mean_std(x64)
    (s64.sum() + m64.sum()).backward()
    assert xg.grad is not None and x64.grad is not None
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (4, 32, 32, 32)])
def test_masked_mean_std_where_float32_squares_overflow(shape: tuple[int, ...]):
    """Weighted statistics of features at 1e30 (their float32 weighted squares overflow) are
    computed again in float64, as the unmasked ones."""
    gen = torch.Generator().manual_seed(6)
    x = (1e30 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    mask = torch.rand((shape[0], 1, *shape[2:]), generator=gen) + 0.25
    mean, std = stats.mean_std(x, mask=mask)
    mean_ref, std_ref = reference.mean_std(_np(x), mask=_np(mask))
    np.testing.assert_allclose(_np(mean), mean_ref, rtol=1e-5)
    np.testing.assert_allclose(_np(std), std_ref, rtol=1e-5)
