"""Tests of the functional style losses against the NumPy reference and textbook identities."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from stylenorm import functional, stats
from stylenorm import reference as ref
from stylenorm.functional import gram_loss, gram_matrix, mean_std_loss, mmd_loss

Case = dict[str, Any]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Any:
    # Every tensor here is tiny: on a busy machine, handing each reduction to a second intra-op
    # thread costs ~10 ms and dominates the file's runtime. Restored after the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


def _randn(shape: tuple[int, ...], gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=gen, dtype=torch.float64)


def _mask(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "binary":
        mask = torch.rand(shape, generator=gen) < 0.6
        mask.reshape(shape[0], shape[1], -1)[:, :, :2] = True  # at least two positions
        return mask
    # Soft weights, summing to more than 1 (correction=1 needs that) over any two positions.
    return 2 * torch.rand(shape, generator=gen, dtype=torch.float64) + 0.55


@st.composite
def pairs(draw: st.DrawFn, per_channel_mask: bool = False, max_positions: int = 6) -> Case:
    """Input and target features (spatial rank 1-3, sizes may differ) with optional masks."""
    rank = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    spatial_x = tuple(draw(st.integers(2, max_positions)) for _ in range(rank))
    spatial_y = tuple(draw(st.integers(2, max_positions)) for _ in range(rank))
    target_batch = draw(st.sampled_from([1, n]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    offset = draw(st.sampled_from([0.0, 2.0]))
    x = offset + _randn((n, c, *spatial_x), gen)
    y = _randn((target_batch, c, *spatial_y), gen, scale=draw(st.sampled_from([0.5, 3.0])))
    kinds = ["none", "binary", "soft"]
    mask_channels = c if per_channel_mask and draw(st.booleans()) else 1
    mask = _mask(
        draw(st.sampled_from(kinds)),
        (draw(st.sampled_from([1, n])), mask_channels, *spatial_x),
        gen,
    )
    target_mask = _mask(draw(st.sampled_from(kinds)), (target_batch, 1, *spatial_y), gen)
    return {"x": x, "y": y, "mask": mask, "target_mask": target_mask}


def _scale(*arrays: np.ndarray | None) -> float:
    return max(float(np.abs(a).max()) for a in arrays if a is not None)


# --------------------------------------------------------------------------------------------
# Reference agreement (float64 tight, float32 loose)
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(pairs(), st.sampled_from(["none", "hw", "chw"]), st.booleans())
def test_gram_matrix_matches_reference(case: Case, normalize: str, center: bool) -> None:
    x, mask = case["x"], case["mask"]
    expected = ref.gram_matrix(_np(x), normalize, _np(mask), center)
    got = gram_matrix(x, normalize=normalize, mask=mask, center=center)
    assert got.shape == (x.shape[0], x.shape[1], x.shape[1]) and got.dtype == torch.float64
    np.testing.assert_allclose(_np(got), expected, rtol=1e-10, atol=1e-12 * _scale(expected))
    got32 = gram_matrix(x.float(), normalize=normalize, mask=mask, center=center)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(_np(got32), expected, rtol=1e-4, atol=1e-5 * _scale(expected))


@settings(max_examples=40, deadline=None)
@given(
    pairs(),
    st.sampled_from(["none", "hw", "chw"]),
    st.sampled_from(["mean", "sum", "batchmean", "none"]),
    st.booleans(),
)
def test_gram_loss_matches_reference(case: Case, normalize: str, reduction: str, center: bool):
    x, y, mask, target_mask = case["x"], case["y"], case["mask"], case["target_mask"]
    options = {"normalize": normalize, "reduction": reduction, "center": center}
    expected = ref.gram_loss(
        _np(x), _np(y), mask=_np(mask), target_mask=_np(target_mask), **options
    )
    got = gram_loss(x, y, mask=mask, target_mask=target_mask, **options)
    assert got.shape == ((x.shape[0],) if reduction == "none" else ())
    np.testing.assert_allclose(_np(got), expected, rtol=1e-9, atol=1e-12 * _scale(expected))
    got32 = gram_loss(x.float(), y.float(), mask=mask, target_mask=target_mask, **options)
    np.testing.assert_allclose(_np(got32), expected, rtol=1e-3, atol=1e-4 * _scale(expected))


@settings(max_examples=40, deadline=None)
@given(
    pairs(per_channel_mask=True),
    st.sampled_from([0.0, 1e-5, 0.1]),
    st.sampled_from([None, 0.0, 1e-3]),
    st.sampled_from([0, 1]),
    st.sampled_from(["mean", "sum", "batchmean", "none"]),
)
def test_mean_std_loss_matches_reference(
    case: Case, eps: float, target_eps: float | None, correction: int, reduction: str
):
    x, y, mask, target_mask = case["x"], case["y"], case["mask"], case["target_mask"]
    options = {"eps": eps, "target_eps": target_eps, "correction": correction}
    expected = ref.mean_std_loss(
        _np(x), _np(y), reduction=reduction, mask=_np(mask), target_mask=_np(target_mask), **options
    )
    got = mean_std_loss(x, y, reduction=reduction, mask=mask, target_mask=target_mask, **options)
    assert got.shape == ((x.shape[0],) if reduction == "none" else ())
    np.testing.assert_allclose(_np(got), expected, rtol=1e-9, atol=1e-12)
    got32 = mean_std_loss(
        x.float(), y.float(), reduction=reduction, mask=mask, target_mask=target_mask, **options
    )
    np.testing.assert_allclose(_np(got32), expected, rtol=1e-3, atol=1e-4)


MMD_KERNELS = [
    {"kernel": "linear"},
    {"kernel": "polynomial", "degree": 1, "offset": 0.5},
    {"kernel": "polynomial", "degree": 2, "offset": 0.0},
    {"kernel": "polynomial", "degree": 2, "offset": 1.5},
    {"kernel": "polynomial", "degree": 3, "offset": 1.0},
    {"kernel": "gaussian", "sigma": 1.0},
    {"kernel": "gaussian", "sigma": 3.0},
]


@settings(max_examples=40, deadline=None)
@given(
    pairs(max_positions=4),
    st.sampled_from(MMD_KERNELS),
    st.sampled_from(["mean", "sum", "batchmean", "none"]),
)
def test_mmd_loss_matches_reference(case: Case, options: dict[str, Any], reduction: str) -> None:
    x, y, mask, target_mask = case["x"], case["y"], case["mask"], case["target_mask"]
    expected = ref.mmd_loss(
        _np(x), _np(y), reduction=reduction, mask=_np(mask), target_mask=_np(target_mask), **options
    )
    got = mmd_loss(x, y, reduction=reduction, mask=mask, target_mask=target_mask, **options)
    assert got.shape == ((x.shape[0],) if reduction == "none" else ())
    # Kernel values reach (|x|² + offset)^degree; the MMD cancels terms of that size.
    squared_norm = max(float(x.square().sum(1).max()), float(y.square().sum(1).max()))
    kernel_scale = 1.0
    if options["kernel"] != "gaussian":
        kernel_scale = (squared_norm + abs(options.get("offset", 0.0))) ** options.get("degree", 1)
    np.testing.assert_allclose(_np(got), expected, rtol=1e-8, atol=1e-13 * kernel_scale)
    got32 = mmd_loss(
        x.float(), y.float(), reduction=reduction, mask=mask, target_mask=target_mask, **options
    )
    np.testing.assert_allclose(_np(got32), expected, rtol=1e-3, atol=1e-5 * kernel_scale)


# --------------------------------------------------------------------------------------------
# Identities from the papers
# --------------------------------------------------------------------------------------------


def _features(*shape: int, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return offset + torch.randn(shape, generator=gen, dtype=torch.float64)


def test_mmd_polynomial_degree_two_is_unnormalised_gram_loss_over_m_squared() -> None:
    x, y = _features(3, 4, 5, 6), _features(3, 4, 6, 5, seed=1)
    m = 30
    gx, gy = x.reshape(3, 4, m) @ x.reshape(3, 4, m).mT, y.reshape(3, 4, m) @ y.reshape(3, 4, m).mT
    expected = ((gx - gy) ** 2).sum((1, 2)) / m**2
    got = mmd_loss(x, y, kernel="polynomial", degree=2, offset=0.0, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # ... i.e. C² times the "hw" Gram loss (Li et al. 2017, eq. 5 and sec. 3).
    hw = gram_loss(x, y, normalize="hw", reduction="none")
    torch.testing.assert_close(got, 16 * hw, rtol=1e-10, atol=1e-12)


def test_mmd_linear_is_squared_distance_of_means() -> None:
    x, y = _features(2, 5, 7, seed=2, offset=1.0), _features(1, 5, 9, seed=3)
    expected = (x.mean(2) - y.mean(2)).square().sum(1)
    torch.testing.assert_close(mmd_loss(x, y, kernel="linear", reduction="none"), expected)
    poly1 = mmd_loss(x, y, kernel="polynomial", degree=1, offset=3.0, reduction="none")
    torch.testing.assert_close(poly1, expected)


def test_mmd_of_identical_sets_is_zero() -> None:
    x = _features(2, 3, 4, 4)
    for options in MMD_KERNELS:
        value = mmd_loss(x, x.flip(-1), **options)  # same set of vectors, another order
        assert abs(float(value)) < 1e-10, options


def test_gram_normalizations_differ_by_c_and_c_squared() -> None:
    x, y = _features(2, 5, 4, 4), _features(2, 5, 4, 4, seed=1)
    chw, hw = gram_loss(x, y, normalize="chw"), gram_loss(x, y, normalize="hw")
    none = gram_loss(x, y, normalize="none")
    torch.testing.assert_close(hw, 25 * chw)
    torch.testing.assert_close(none, 16**2 * hw)


def test_centered_hw_gram_is_biased_covariance() -> None:
    x = _features(3, 4, 5, 5, offset=2.0)
    got = gram_matrix(x, normalize="hw", center=True)
    for n in range(3):
        torch.testing.assert_close(got[n], torch.cov(x[n].reshape(4, -1), correction=0))


def test_binary_mask_equals_selecting_positions() -> None:
    x = _features(1, 3, 6, 6)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 1:4, 2:6] = True
    selected = x[..., 1:4, 2:6]
    torch.testing.assert_close(gram_matrix(x, mask=mask), gram_matrix(selected))
    y = _features(1, 3, 5, 5, seed=1)
    for options in MMD_KERNELS:
        torch.testing.assert_close(
            mmd_loss(x, y, mask=mask, **options), mmd_loss(selected, y, **options)
        )


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 1), (1, 1, 6, 1), (2, 1, 1, 5)])
def test_masks_with_dims_of_one_broadcast_over_positions(mask_shape: tuple[int, ...]) -> None:
    # Each loss against the NumPy reference, which broadcasts the mask first, and against the
    # same mask expanded by hand; a mask of one weight per sample is no mask at all.
    gen = torch.Generator().manual_seed(4)
    x, y = _features(2, 3, 6, 5), _features(1, 3, 6, 5, seed=1)
    mask = 0.1 + torch.rand(mask_shape, generator=gen, dtype=torch.float64)
    full = mask.expand(mask_shape[0], 1, 6, 5).contiguous()
    cases: list[tuple[Any, Any, Case]] = [
        (gram_matrix, ref.gram_matrix, {"normalize": "hw"}),
        (gram_matrix, ref.gram_matrix, {"normalize": "chw", "center": True}),
    ]
    for fn, reference_fn, options in cases:
        got = fn(x, mask=mask, **options)
        np.testing.assert_allclose(
            got.numpy(), reference_fn(x.numpy(), mask=mask.numpy(), **options), rtol=1e-10
        )
        torch.testing.assert_close(got, fn(x, mask=full, **options))
    losses: list[tuple[Any, Any, Case]] = [
        (gram_loss, ref.gram_loss, {}),
        (mean_std_loss, ref.mean_std_loss, {"correction": 1}),
        *((mmd_loss, ref.mmd_loss, options) for options in MMD_KERNELS),
    ]
    for fn, reference_fn, options in losses:
        for where in ("mask", "target_mask"):
            weights = {where: mask if where == "mask" else mask[:1]}
            got = fn(x, y, **weights, **options)
            expected = reference_fn(
                x.numpy(), y.numpy(), **{where: weights[where].numpy()}, **options
            )
            np.testing.assert_allclose(
                got.numpy(), expected, rtol=1e-9, err_msg=f"{fn.__name__} {options} {where}"
            )
        if mask_shape == (2, 1, 1, 1) and "correction" not in options:
            # (Bessel's correction counts the total weight, not the positions.)
            torch.testing.assert_close(fn(x, y, mask=mask, **options), fn(x, y, **options))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_empty_batch_or_channels(shape: tuple[int, ...]) -> None:
    # As torch.nn.functional.mse_loss of empty tensors: empty Grams, a NaN mean, a zero sum;
    # but an MMD between features of no channels is a per-sample 0.
    x, y = torch.randn(shape), torch.randn(1, *shape[1:])
    assert gram_matrix(x).shape == (shape[0], shape[1], shape[1])
    for fn in (gram_loss, mean_std_loss, mmd_loss):
        mean = 0.0 if fn is mmd_loss and shape[0] else float("nan")
        for reduction, expected in (("mean", mean), ("sum", 0.0)):
            torch.testing.assert_close(
                fn(x, y, reduction=reduction), torch.tensor(expected), equal_nan=True
            )
        assert fn(x, y, reduction="none").shape[0] == shape[0]


def test_reductions_are_consistent() -> None:
    x, y = _features(3, 4, 5, 5), _features(1, 4, 6, 6, seed=1)
    for fn, per_sample_count in ((gram_loss, 16), (mean_std_loss, 4)):
        none = fn(x, y, reduction="none")
        torch.testing.assert_close(fn(x, y, reduction="mean"), none.mean())
        torch.testing.assert_close(fn(x, y, reduction="sum"), none.sum() * per_sample_count)
        torch.testing.assert_close(
            fn(x, y, reduction="batchmean"), none.sum() * per_sample_count / 3
        )
    none = mmd_loss(x, y, reduction="none")
    torch.testing.assert_close(mmd_loss(x, y, reduction="sum"), none.sum())
    torch.testing.assert_close(mmd_loss(x, y, reduction="batchmean"), none.mean())


def test_gram_loss_equals_mse_of_gram_matrices() -> None:
    x, y = _features(2, 3, 4, 5), _features(2, 3, 6, 2, seed=1)
    for normalize in ("none", "hw", "chw"):
        gx, gy = gram_matrix(x, normalize=normalize), gram_matrix(y, normalize=normalize)
        expected = torch.nn.functional.mse_loss(gx, gy)
        torch.testing.assert_close(gram_loss(x, y, normalize=normalize), expected)


def test_mean_std_loss_equals_mse_of_stats_from_stats_module() -> None:
    x, y = _features(2, 3, 4, 5), _features(1, 3, 6, 2, seed=1)
    for correction in (0, 1):
        mx, sx = stats.mean_std(x, correction=correction)
        my, sy = stats.mean_std(y, correction=correction)
        mse = torch.nn.functional.mse_loss
        expected = mse(mx, my.expand_as(mx)) + mse(sx, sy.expand_as(sx))
        torch.testing.assert_close(mean_std_loss(x, y, correction=correction), expected)


def test_non_contiguous_and_channels_last_inputs() -> None:
    x = _features(2, 3, 5, 4)
    y = _features(1, 3, 4, 5, seed=1)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for variant in (x_t, x_cl):
        torch.testing.assert_close(gram_matrix(variant), gram_matrix(x))
        torch.testing.assert_close(gram_loss(variant, y), gram_loss(x, y))
        torch.testing.assert_close(mean_std_loss(variant, y), mean_std_loss(x, y))
        torch.testing.assert_close(
            mmd_loss(variant, y, kernel="gaussian"), mmd_loss(x, y, kernel="gaussian")
        )


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------

LOSS_CASES = [
    (gram_loss, {"normalize": "chw"}),
    (gram_loss, {"normalize": "none", "center": True, "reduction": "sum"}),
    (mean_std_loss, {"eps": 1e-5}),
    (mean_std_loss, {"correction": 1, "reduction": "none"}),
    *((mmd_loss, options) for options in MMD_KERNELS),
]


@pytest.mark.parametrize(("fn", "options"), LOSS_CASES)
def test_losses_gradcheck_and_gradgradcheck(fn: Any, options: dict[str, Any]) -> None:
    x = _features(2, 2, 3, 2).requires_grad_()
    y = _features(1, 2, 2, 3, seed=1, offset=0.5).requires_grad_()
    assert gradcheck(lambda a, b: fn(a, b, **options), (x, y))
    assert gradgradcheck(lambda a, b: fn(a, b, **options), (x, y))


@pytest.mark.parametrize("loss", ["gram", "mean_std", "mmd"])
def test_losses_gradcheck_with_soft_masks(loss: str) -> None:
    x = _features(2, 2, 3, 2).requires_grad_()
    y = _features(2, 2, 2, 2, seed=1).requires_grad_()
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 1, 3, 2, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    target_mask = torch.rand(1, 1, 2, 2, generator=gen, dtype=torch.float64) + 0.1
    fn = {"gram": gram_loss, "mean_std": mean_std_loss, "mmd": mmd_loss}[loss]
    extra: dict[str, Any] = {"kernel": "gaussian"} if loss == "mmd" else {}

    def f(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fn(a, b, mask=w, target_mask=target_mask, **extra)

    assert gradcheck(f, (x, y, mask))
    assert gradgradcheck(f, (x, y, mask))


@pytest.mark.parametrize(
    ("normalize", "center", "masked"), [("chw", False, False), ("hw", True, True)]
)
def test_gram_matrix_gradcheck(normalize: str, center: bool, masked: bool) -> None:
    x = _features(2, 3, 2, 3).requires_grad_()
    mask = (
        torch.tensor([[[[1.0, 0.0, 2.0], [0.5, 1.0, 1.0]]]], dtype=torch.float64)
        if masked
        else None
    )

    def f(a: torch.Tensor) -> torch.Tensor:
        return gram_matrix(a, normalize=normalize, center=center, mask=mask)

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


# Shapes that take each path of the Gram product: 32-row blocks with a short last block
# (80 channels), 64-row blocks (300 channels), a single sample split into two halves of its
# positions (then blocked), an odd position count (one plain product), too few channels and
# too few positions (one plain product each).
GRAM_BLOCK_SHAPES = [
    (2, 80, 32, 64),
    (2, 300, 32, 32),
    (1, 64, 64, 64),
    (1, 64, 1, 4097),
    (3, 48, 16, 16),
    (2, 80, 16, 16),
]


def test_gram_block_rule() -> None:
    """Which rows per block the shapes above (and the benchmark's) take."""
    rows = functional._gram_block_rows
    assert rows(2, 80, 2048) == 32
    assert rows(2, 300, 1024) == 64
    assert rows(2, 64, 2048) == 32  # the two halves of (1, 64, 64, 64)
    assert rows(3, 48, 256) == 48
    assert rows(2, 80, 256) == 80  # too few positions: one bmm
    assert rows(2, 128, 1024) == 32
    assert rows(2, 64, 1024) == 64  # 2^16 values per sample: one bmm
    assert rows(1, 512, 4096) == 512  # a batch of one: one bmm
    assert rows(8, 64, 4096) == 32 and rows(4, 256, 1024) == 64  # benchmark shapes


@pytest.mark.parametrize("shape", GRAM_BLOCK_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gram_products_of_every_block_path_match_reference(
    shape: tuple[int, ...], layout: str
) -> None:
    """Large Grams (multiplied in blocks above the diagonal, the lower half copied) equal the
    float64 reference, with and without autograd."""
    gen = torch.Generator().manual_seed(5)
    x = 1.5 + _randn(shape, gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = _randn((1, *shape[1:]), gen, scale=2.0)
    expected = ref.gram_matrix(_np(x), "hw", None, True)
    expected_loss = ref.gram_loss(_np(x), _np(y), normalize="hw", reduction="sum", center=True)
    for requires_grad in (False, True):
        got = gram_matrix(x.clone().requires_grad_(requires_grad), normalize="hw", center=True)
        np.testing.assert_allclose(_np(got), expected, rtol=1e-10, atol=1e-12 * _scale(expected))
        loss = gram_loss(
            x.clone().requires_grad_(requires_grad), y, normalize="hw", reduction="sum", center=True
        )
        np.testing.assert_allclose(float(loss.detach()), expected_loss, rtol=1e-9)
    got32 = gram_matrix(x.float(), normalize="hw", center=True)
    np.testing.assert_allclose(_np(got32), expected, rtol=1e-4, atol=1e-5 * _scale(expected))


def test_blocked_gram_gradients_and_vmap() -> None:
    """The blocked forward inside the Gram Function: gradients (fast gradcheck) and vmap."""
    gen = torch.Generator().manual_seed(6)
    x = _randn((2, 64, 32, 64), gen).requires_grad_()
    assert gradcheck(lambda a: gram_matrix(a, normalize="chw"), (x,), fast_mode=True)
    # channels_last features get their gradient in their own layout (F^T S instead of S F).
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert gradcheck(lambda a: gram_matrix(a, normalize="chw"), (x_cl,), fast_mode=True)
    weights = _randn((2, 64, 64), gen)
    (grad_cl,) = torch.autograd.grad((gram_matrix(x_cl) * weights).sum(), x_cl)
    (grad,) = torch.autograd.grad((gram_matrix(x) * weights).sum(), x)
    assert grad_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-12, atol=1e-12)
    xs = _randn((2, 2, 64, 32, 64), gen)
    y = _randn((1, 64, 32, 64), gen)
    looped = torch.stack([gram_loss(a, y) for a in xs])
    torch.testing.assert_close(torch.func.vmap(lambda a: gram_loss(a, y))(xs), looped)


@pytest.mark.parametrize("mask_kind", ["binary", "soft"])
def test_masked_gram_in_blocks_in_both_layouts(mask_kind: str) -> None:
    """A fixed mask's Gram is the symmetric product of sqrt(w)-weighted features: blocked
    forward equal to the float64 reference, gradients (fast gradcheck) equal in both layouts
    and channels_last in channels_last, and vmap of the masked loss."""
    gen = torch.Generator().manual_seed(9)
    x = 1.5 + _randn((2, 80, 32, 64), gen)
    mask = torch.rand(2, 1, 32, 64, generator=gen, dtype=torch.float64)
    mask = (mask < 0.6).double() if mask_kind == "binary" else 2.0 * mask
    expected = ref.gram_matrix(_np(x), "hw", _np(mask), False)
    weights = _randn((2, 80, 80), gen)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout).requires_grad_()
        got = gram_matrix(xl, normalize="hw", mask=mask)
        np.testing.assert_allclose(_np(got), expected, rtol=1e-10, atol=1e-12 * _scale(expected))
        assert gradcheck(lambda a: gram_matrix(a, mask=mask), (xl,), fast_mode=True)
        (grad,) = torch.autograd.grad((gram_matrix(xl, mask=mask) * weights).sum(), xl)
        assert grad.is_contiguous(memory_format=layout)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    xs = _randn((2, 2, 80, 32, 64), gen)
    y = _randn((1, 80, 32, 64), gen)
    looped = torch.stack([gram_loss(a, y, mask=mask) for a in xs])
    torch.testing.assert_close(torch.func.vmap(lambda a: gram_loss(a, y, mask=mask))(xs), looped)


def test_masked_gram_forward_mode_derivative_in_the_mask() -> None:
    """A binary mask's tangent: the product as written (sqrt(w) has an infinite derivative at
    w = 0), equal to the derivative of the formula."""
    gen = torch.Generator().manual_seed(19)
    x = _randn((2, 3, 4, 5), gen)
    mask = (torch.rand(2, 1, 4, 5, generator=gen) < 0.5).double()
    mask[..., 0, :2] = 1.0
    tangent = _randn(mask.shape, gen)

    def formula(m: torch.Tensor) -> torch.Tensor:
        f = x.reshape(2, 3, -1)
        w = m.reshape(2, 1, -1)
        return torch.bmm(f * w, f.mT) / w.sum(-1, keepdim=True)

    _, ours = torch.func.jvp(lambda m: gram_matrix(x, normalize="hw", mask=m), (mask,), (tangent,))
    _, expected = torch.func.jvp(formula, (mask,), (tangent,))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_constant_features_give_finite_losses_and_gradients() -> None:
    x = torch.full((2, 3, 4, 4), 0.7, dtype=torch.float64, requires_grad=True)
    y = torch.full((1, 3, 4, 4), -1.5, dtype=torch.float64)
    for fn, options in LOSS_CASES:
        loss = fn(x, y, **options).sum()
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), (fn.__name__, options)
    # Same constants on both sides: zero loss, zero gradient.
    same = mean_std_loss(x, x.detach()[:1])
    (grad,) = torch.autograd.grad(same, x)
    assert float(same.detach()) == 0.0 and float(grad.abs().max()) == 0.0


def test_inputs_are_not_modified() -> None:
    x, y = _features(2, 3, 4, 4), _features(1, 3, 4, 4, seed=1)
    mask = torch.rand(2, 1, 4, 4, dtype=torch.float64) + 0.1
    copies = [t.clone() for t in (x, y, mask)]
    gram_matrix(x, mask=mask, center=True)
    gram_loss(x, y, mask=mask)
    mean_std_loss(x, y, mask=mask)
    for options in MMD_KERNELS:
        mmd_loss(x, y, mask=mask, **options)
    for original, copy in zip((x, y, mask), copies, strict=True):
        assert torch.equal(original, copy)


# --------------------------------------------------------------------------------------------
# Half precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close_to_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    # Values near 100 over 64 positions: an unnormalised half Gram loss would overflow float16.
    x = (100 + 10 * torch.randn(2, 4, 8, 8, generator=gen)).to(dtype)
    y = (90 + 20 * torch.randn(1, 4, 8, 8, generator=gen)).to(dtype)
    x32, y32 = x.float(), y.float()
    g = gram_matrix(x, normalize="hw")
    assert g.dtype == dtype and torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), gram_matrix(x32, normalize="hw"), rtol=1e-2, atol=0.0)
    for fn, options in [
        (gram_loss, {"normalize": "none"}),
        (gram_loss, {"normalize": "chw"}),
        (mean_std_loss, {}),
        (mmd_loss, {"kernel": "polynomial"}),
        (mmd_loss, {"kernel": "gaussian", "sigma": 30.0}),
    ]:
        low = fn(x, y, **options)
        assert low.dtype == torch.float32 and torch.isfinite(low), (fn.__name__, options)
        torch.testing.assert_close(low, fn(x32, y32, **options), rtol=1e-4, atol=1e-6)
        if options.get("normalize") == "none":
            continue  # its true gradient (~1e8 here) exceeds float16's range: nothing to test
        (grad,) = torch.autograd.grad(fn(x.requires_grad_(), y, **options), x)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        x = x.detach()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("fn", [gram_loss, mean_std_loss, mmd_loss])
@pytest.mark.parametrize(
    ("target", "kwargs", "error", "match"),
    [
        (torch.randn(2, 4, 4, 4), {}, ValueError, r"target must have the channels.*C=3.*C=4"),
        (
            torch.randn(3, 3, 4, 4),
            {},
            ValueError,
            r"target must have batch size 1 .* or 2 .*got batch size 3",
        ),
        (torch.randn(3, 4), {}, ValueError, r"target must have shape \(N, C, \*spatial\)"),
        ([1.0], {}, TypeError, "target must be a torch.Tensor"),
        (torch.ones(1, 3, 4, 4, dtype=torch.long), {}, TypeError, "target must be a floating"),
        (torch.randn(1, 3, 4, 4), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        (
            torch.randn(1, 3, 4, 4),
            {"mask": torch.ones(2, 1, 3, 4)},
            ValueError,
            r"mask must broadcast to input .* got mask of shape \(2, 1, 3, 4\)",
        ),
        (
            torch.randn(1, 3, 5, 5),
            {"target_mask": torch.zeros(1, 1, 5, 5)},
            ValueError,
            "target_mask must have a positive total weight",
        ),
        (
            torch.randn(1, 3, 4, 4),
            {"mask": -torch.ones(1, 1, 4, 4)},
            ValueError,
            "mask must be non-negative",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(
    fn: Any, target: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fn(X, target, **kwargs)


def test_bad_input_rank_and_options() -> None:
    y = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, \*spatial\).*2D"):
        gram_loss(torch.randn(2, 3), y)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, \*spatial\)"):
        gram_matrix(torch.randn(3, 4))
    with pytest.raises(ValueError, match="normalize must be one of 'none', 'hw', 'chw'; got 'cwh'"):
        gram_matrix(X, normalize="cwh")
    with pytest.raises(ValueError, match="normalize must be one of"):
        gram_loss(X, y, normalize="HW")
    with pytest.raises(
        ValueError, match="kernel must be one of 'linear', 'polynomial', 'gaussian'"
    ):
        mmd_loss(X, y, kernel="rbf")
    with pytest.raises(ValueError, match="degree must be a positive integer"):
        mmd_loss(X, y, degree=0)
    for sigma in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="sigma must be a finite positive number"):
            mmd_loss(X, y, kernel="gaussian", sigma=sigma)
    for eps in (-1.0, math.inf):
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            mean_std_loss(X, y, eps=eps)
    for eps in (math.nan, math.inf):
        with pytest.raises(ValueError, match="target_eps must be a finite non-negative number"):
            mean_std_loss(X, y, target_eps=eps)
    with pytest.raises(ValueError, match="correction must be non-negative"):
        mean_std_loss(X, y, correction=-1)


@pytest.mark.parametrize("loss", [gram_loss, mean_std_loss, mmd_loss])
def test_target_of_another_spatial_rank(loss: Any) -> None:
    """Statistics and Grams do not depend on how positions are laid out: a flattened target
    gives the value of the unflattened one."""
    x = torch.randn(2, 4, 5, 6)
    target = torch.randn(1, 4, 3, 7)
    torch.testing.assert_close(loss(x, target.flatten(2)), loss(x, target))


def test_too_few_positions_names_the_target() -> None:
    with pytest.raises(ValueError, match=r"^target has 1 spatial positions, too few"):
        mean_std_loss(X, torch.randn(1, 3, 1, 1), correction=1)
    with pytest.raises(ValueError, match=r"^input has 1 spatial positions"):
        mean_std_loss(torch.randn(2, 3, 1, 1), torch.randn(1, 3, 4, 4), correction=1)


def test_gram_masks_must_weight_positions_not_channels() -> None:
    with pytest.raises(ValueError, match=r"mask must weight positions.*\(N or 1, 1, \*spatial\)"):
        gram_matrix(X, mask=torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"target_mask must weight positions"):
        mmd_loss(X, X, target_mask=torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="mask must have a positive total weight"):
        gram_matrix(X, mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    # Per-channel masks are fine for the per-channel statistics of mean_std_loss ...
    mean_std_loss(X, X, mask=torch.ones(2, 3, 4, 4))
    # ... but each (sample, channel) needs weight above the correction.
    mask = torch.ones(2, 3, 4, 4)
    mask[1, 2] = 0
    with pytest.raises(ValueError, match=r"mask must have a positive total weight .* and channel"):
        mean_std_loss(X, X, mask=mask)
    mask[1, 2, 0, 0] = 1
    with pytest.raises(ValueError, match="greater than correction=1"):
        mean_std_loss(X, X, mask=mask, correction=1)


def test_losses_trace_without_graph_breaks() -> None:
    # Shape checks are Python, value checks are skipped while compiling: fullgraph works.
    x, y = torch.randn(2, 3, 5, 5), torch.randn(1, 3, 4, 4)
    mask = torch.rand(2, 1, 5, 5) + 0.1
    cases = [
        lambda a, b: gram_matrix(a, mask=mask, center=True),
        lambda a, b: gram_loss(a, b, mask=mask),
        lambda a, b: mean_std_loss(a, b, correction=1),
        lambda a, b: mmd_loss(a, b),
        lambda a, b: mmd_loss(a, b, kernel="gaussian", mask=mask),
    ]
    for fn in cases:
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, y), fn(x, y))
