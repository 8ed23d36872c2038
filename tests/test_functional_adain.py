"""adain / adain_regions against the NumPy float64 reference, paper identities and autograd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from stylenorm import functional, reference, stats
from stylenorm.functional import StyleRegion, adain, adain_regions

F64 = torch.float64
N, C, H, W = 3, 4, 5, 6


def _np(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return t.detach().double().numpy()
    if isinstance(t, (list, tuple)):
        return [_np(v) for v in t]
    return t


def _randn(*shape: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return offset + scale * torch.randn(shape, generator=gen, dtype=F64)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


CONTENT = _randn(N, C, H, W, seed=0, scale=2.0, offset=1.0)


def _cases() -> dict[str, dict[str, Any]]:
    """Each mode of adain as keyword arguments (all besides ``content``)."""
    style = _randn(N, C, 7, 4, seed=1, scale=3.0, offset=-2.0)
    style1 = _randn(1, C, 8, 8, seed=2, scale=0.5, offset=4.0)
    binary = _rand(N, 1, H, W, seed=3) < 0.6
    binary[..., 0, :2] = True
    return {
        "style_batch_n": {"style": style},
        "style_broadcast": {"style": style1},
        "alpha_half": {"style": style, "alpha": 0.5},
        "alpha_extrapolate": {"style": style1, "alpha": 1.7},
        "alpha_negative": {"style": style, "alpha": -0.4},
        "alpha_per_sample": {"style": style, "alpha": torch.tensor([0.0, 0.3, 1.2], dtype=F64)},
        "unbiased": {"style": style, "correction": 1},
        "big_eps": {"style": style, "eps": 0.3},
        "stats_c": {"style_mean": _randn(C, seed=4), "style_std": _rand(C, seed=5) + 0.5},
        "stats_nc": {"style_mean": _randn(N, C, seed=4), "style_std": _rand(N, C, seed=5)},
        "stats_1c": {"style_mean": _randn(1, C, seed=4), "style_std": _rand(1, C, seed=5)},
        "spatial_maps": {
            "style_mean": _randn(N, C, H, W, seed=6),
            "style_std": _rand(N, C, H, W, seed=7) + 0.2,
        },
        "spatial_maps_broadcast": {
            "style_mean": _randn(1, C, H, 1, seed=6),
            "style_std": _rand(N, C, 1, W, seed=7) + 0.2,
            "alpha": 0.8,
        },
        "content_mask_binary": {"style": style, "content_mask": binary},
        "content_mask_soft": {"style": style1, "content_mask": _rand(1, 1, H, W, seed=8)},
        "content_mask_per_channel": {
            "style": style,
            "content_mask": _rand(N, C, H, W, seed=9) * 0.9 + 0.1,
            "alpha": 0.7,
        },
        "style_mask": {"style": style, "style_mask": _rand(N, 1, 7, 4, seed=10) + 0.1},
        "both_masks_unbiased": {
            "style": style1,
            "style_mask": _rand(1, C, 8, 8, seed=11) > 0.3,
            "content_mask": binary,
            "correction": 1,
        },
        "interp_list": {
            "style": [style, style1, _randn(1, C, 3, 3, seed=12)],
            "style_weights": torch.softmax(_randn(N, 3, seed=13), 1),
        },
        "interp_shared_weights": {
            "style": [style, style1],
            "style_weights": torch.tensor([0.25, 0.75], dtype=F64),
            "alpha": 0.6,
        },
        "interp_with_masks": {
            "style": [style, style1],
            "style_mask": [None, _rand(1, 1, 8, 8, seed=14) + 0.1],
            "style_weights": torch.tensor([0.5, 0.5], dtype=F64),
            "content_mask": binary,
        },
        "interp_precomputed": {
            "style_mean": [_randn(C, seed=15), _randn(N, C, seed=16)],
            "style_std": [_rand(1, C, seed=17), _rand(N, C, H, W, seed=18)],
            "style_weights": _rand(N, 2, seed=19),
        },
    }


MODES = list(_cases())


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_float64(mode: str) -> None:
    kwargs = _cases()[mode]
    out = adain(CONTENT, **kwargs)
    expected = reference.adain(_np(CONTENT), **{k: _np(v) for k, v in kwargs.items()})
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)
    assert out.shape == CONTENT.shape and out.dtype == F64


@pytest.mark.parametrize("mode", ["style_batch_n", "style_broadcast", "alpha_half", "unbiased"])
@pytest.mark.parametrize("spatial", [(9,), (3, 4, 2)])
def test_other_ranks_match_reference(mode: str, spatial: tuple[int, ...]) -> None:
    content = _randn(N, C, *spatial, seed=20, scale=2.0)
    kwargs = dict(_cases()[mode])
    kwargs["style"] = _randn(kwargs["style"].shape[0], C, *spatial[::-1], seed=21)
    out = adain(content, **kwargs)
    expected = reference.adain(_np(content), **{k: _np(v) for k, v in kwargs.items()})
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "mode",
    [
        "style_batch_n",
        "style_broadcast",
        "alpha_per_sample",
        "unbiased",
        "spatial_maps",
        "content_mask_per_channel",
        "interp_with_masks",
    ],
)
def test_channels_last_matches_reference_and_keeps_format(mode: str) -> None:
    kwargs = _cases()[mode]
    out = adain(CONTENT.to(memory_format=torch.channels_last), **kwargs)
    expected = reference.adain(_np(CONTENT), **{k: _np(v) for k, v in kwargs.items()})
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_stacked_styles_equal_list() -> None:
    styles = _randn(3, C, 6, 6, seed=22)
    weights = _rand(N, 3, seed=23)
    stacked = adain(CONTENT, styles, style_weights=weights)
    listed = adain(CONTENT, [styles[0:1], styles[1:2], styles[2:3]], style_weights=weights)
    torch.testing.assert_close(stacked, listed)
    means, stds = stats.mean_std(styles)
    torch.testing.assert_close(
        adain(CONTENT, style_mean=means, style_std=stds, style_weights=weights), stacked
    )


def test_identity_adain_x_x() -> None:
    # eps inside the root on both sides: the statistics cancel exactly.
    torch.testing.assert_close(adain(CONTENT, CONTENT), CONTENT, rtol=1e-12, atol=1e-12)
    x32 = CONTENT.float()
    torch.testing.assert_close(adain(x32, x32), x32, rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_content_and_one_is_adain() -> None:
    style = _cases()["style_batch_n"]["style"]
    torch.testing.assert_close(adain(CONTENT, style, alpha=0.0), CONTENT)
    mu, sigma = stats.mean_std(style)
    torch.testing.assert_close(
        adain(CONTENT, style, alpha=1.0), adain(CONTENT, style_mean=mu, style_std=sigma)
    )


def test_interpolation_equals_mixing_outputs() -> None:
    # Huang & Belongie sec. 7: AdaIN is affine in (mu_s, sigma_s), so for convex weights mixing the
    # statistics equals mixing the stylized outputs.
    styles = [_randn(1, C, 6, 6, seed=30 + k, scale=k + 1.0, offset=k) for k in range(3)]
    weights = torch.softmax(_randn(N, 3, seed=33), 1)
    mixed = adain(CONTENT, styles, style_weights=weights, alpha=0.8)
    outputs = sum(
        weights[:, k, None, None, None]
        * torch.from_numpy(reference.adain(_np(CONTENT), _np(s), alpha=0.8))
        for k, s in enumerate(styles)
    )
    assert isinstance(outputs, torch.Tensor)
    torch.testing.assert_close(mixed, outputs, rtol=1e-10, atol=1e-10)


def test_content_mask_outside_passes_through_and_soft_blends() -> None:
    style = _randn(1, C, 6, 6, seed=40, offset=5.0)
    mask = torch.zeros(1, 1, H, W, dtype=F64)
    mask[..., :3, :] = 1.0
    mask[..., 3, :] = 0.25
    out = adain(CONTENT, style, content_mask=mask)
    assert torch.equal(out[..., 4:, :], CONTENT[..., 4:, :])
    inside = adain(CONTENT, style, content_mask=mask > 0.5)
    # Soft value 0.25: a quarter of the way from the content to the stylized output.
    full = torch.from_numpy(reference.adain(_np(CONTENT), _np(style), content_mask=_np(mask)))
    torch.testing.assert_close(out, full)
    assert torch.equal(inside[..., 3:, :], CONTENT[..., 3:, :])


def test_content_mask_statistics_use_only_the_region() -> None:
    # The region's statistics, not the image's: outlier values outside the mask change nothing.
    style = _randn(1, C, 6, 6, seed=41)
    mask = torch.zeros(1, 1, H, W, dtype=torch.bool)
    mask[..., :2, :] = True
    altered = CONTENT.clone()
    altered[..., 2:, :] = 1000.0
    torch.testing.assert_close(
        adain(CONTENT, style, content_mask=mask)[..., :2, :],
        adain(altered, style, content_mask=mask)[..., :2, :],
    )


def _regions() -> list[tuple[torch.Tensor, ...]]:
    top = torch.zeros(1, 1, H, W, dtype=F64)
    top[..., :2, :] = 1.0
    bottom = torch.zeros(N, 1, H, W, dtype=F64)
    bottom[..., 3:, :] = 0.6
    bottom[..., 4:, 3:] = 1.0
    return [
        (_randn(1, C, 6, 6, seed=50, offset=3.0), top),
        (_randn(N, C, 4, 7, seed=51, offset=-3.0), bottom, _rand(N, 1, 4, 7, seed=52) + 0.1),
    ]


@pytest.mark.parametrize("alpha", [1.0, 0.4])
@pytest.mark.parametrize("correction", [0, 1])
def test_regions_match_reference(alpha: float, correction: int) -> None:
    regions = _regions()
    out = adain_regions(CONTENT, regions, alpha=alpha, correction=correction)
    expected = reference.adain_regions(
        _np(CONTENT), [_np(r) for r in regions], alpha=alpha, correction=correction
    )
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)
    # Row 2 belongs to no region: the content passes through.
    assert torch.equal(out[..., 2, :], CONTENT[..., 2, :])


@pytest.mark.parametrize("offset", [0.0, 50.0])  # the folded form, and term by term
@pytest.mark.parametrize("correction", [0, 1])
def test_region_missing_from_one_image_passes_it_through(offset: float, correction: int) -> None:
    # A segmentation class absent from the second image: its content mask is empty there, so
    # that image's region statistics are undefined, but the output is not (m = 0: the content).
    # The first image is as if stylized alone; everything stays finite, gradients included.
    content = (CONTENT + offset).requires_grad_()
    style_a, style_b = _randn(1, C, 6, 6, seed=53, offset=3.0), _randn(1, C, 5, 5, seed=54)
    upper = torch.zeros(N, 1, H, W, dtype=F64)
    upper[0, :, :3] = 1.0  # the second image has none of it
    lower = 1.0 - upper
    lower[1] = 0.7  # the second image: all lower region, softly
    regions = [(style_a, upper), (style_b, lower)]
    out = adain_regions(content, regions, correction=correction)
    expected = reference.adain_regions(
        _np(content[:1]), [(_np(s), _np(m[:1])) for s, m in regions], correction=correction
    )
    np.testing.assert_allclose(_np(out[:1]), expected, rtol=1e-9, atol=1e-9)
    only_lower = adain(content[1:], style_b, content_mask=lower[1:], correction=correction)
    torch.testing.assert_close(out[1:], only_lower)
    single = adain(content, style_a, content_mask=upper, correction=correction)
    assert torch.equal(single[1], content[1])
    (out.square().sum() + single.sum()).backward()
    assert content.grad is not None and bool(content.grad.isfinite().all())
    # The derivative in a soft mask that is zero on a whole image: that of blending in the
    # image stylized with its whole-map statistics (not one scaled by 1 / sqrt(eps)).
    soft = upper.clone().requires_grad_()
    adain(content.detach(), style_a, content_mask=soft, correction=correction).sum().backward()
    assert soft.grad is not None
    whole = adain(content.detach()[1:], style_a, correction=correction) - content.detach()[1:]
    torch.testing.assert_close(soft.grad[1:], whole.sum(1, keepdim=True))


def test_single_region_equals_adain_with_masks() -> None:
    style, mask, style_mask = _regions()[1]
    torch.testing.assert_close(
        adain_regions(CONTENT, [StyleRegion(style, mask, style_mask)], alpha=0.7),
        adain(CONTENT, style, content_mask=mask, style_mask=style_mask, alpha=0.7),
    )


@st.composite
def _adain_cases(draw: st.DrawFn) -> tuple[torch.Tensor, dict[str, Any]]:
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    spatial = tuple(draw(st.integers(2, 5)) for _ in range(draw(st.integers(1, 3))))
    seed = draw(st.integers(0, 2**16))
    content = _randn(n, c, *spatial, seed=seed, scale=draw(st.sampled_from([0.01, 1.0, 30.0])))
    style_spatial = tuple(draw(st.integers(2, 5)) for _ in range(len(spatial)))
    sn = draw(st.sampled_from([1, n]))
    kwargs: dict[str, Any] = {
        "style": _randn(
            sn, c, *style_spatial, seed=seed + 1, offset=draw(st.sampled_from([0, 50]))
        ),
        "alpha": draw(st.sampled_from([1.0, 0.5, 1.5])),
        "correction": draw(st.sampled_from([0, 1])),
    }
    mask_kind = draw(st.sampled_from(["none", "binary", "soft"]))
    if mask_kind != "none":
        mc = draw(st.sampled_from([1, c]))
        cmask = _rand(n, mc, *spatial, seed=seed + 2)
        flat = cmask.reshape(n, mc, -1)
        flat[:, :, :2] = 1.0  # at least two positions in every (sample, channel)
        kwargs["content_mask"] = cmask > 0.5 if mask_kind == "binary" else cmask
        smask = _rand(sn, 1, *style_spatial, seed=seed + 3) + 0.6  # total weight > correction
        kwargs["style_mask"] = smask
    return content, kwargs


@settings(max_examples=40, deadline=None)
@given(_adain_cases())
def test_hypothesis_matches_reference(case: tuple[torch.Tensor, dict[str, Any]]) -> None:
    content, kwargs = case
    out = adain(content, **kwargs)
    expected = reference.adain(_np(content), **{k: _np(v) for k, v in kwargs.items()})
    scale = float(np.abs(expected).max()) + 1.0
    np.testing.assert_allclose(_np(out), expected, rtol=1e-8, atol=1e-9 * scale)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

SMALL = (2, 2, 3, 2)


def _small_cases() -> dict[str, dict[str, Any]]:
    style = _randn(2, 2, 2, 2, seed=60, offset=1.0)
    mask = _rand(2, 1, 3, 2, seed=61) * 0.8 + 0.1
    return {
        "style": {"style": style},
        "style_broadcast_alpha": {"style": style[:1], "alpha": 0.6},
        "alpha_tensor": {"style": style, "alpha": torch.tensor([0.3, 1.4], dtype=F64)},
        "unbiased": {"style": style, "correction": 1},
        "stats": {"style_mean": _randn(2, 2, seed=62), "style_std": _rand(2, seed=63) + 0.5},
        "maps": {
            "style_mean": _randn(2, 2, 3, 2, seed=62),
            "style_std": _rand(1, 2, 3, 1, seed=63),
        },
        "soft_masks": {
            "style": style,
            "content_mask": mask,
            "style_mask": _rand(2, 2, 2, 2, seed=64),
        },
        "interp": {
            "style": [style, _randn(1, 2, 3, 1, seed=65)],
            "style_weights": _rand(2, 2, seed=66),
        },
        "interp_stats": {  # two stacked (C,) entries
            "style_mean": _randn(2, 2, seed=67),
            "style_std": _rand(2, 2, seed=68),
            "style_weights": _rand(2, seed=69),
        },
    }


@pytest.mark.parametrize("mode", list(_small_cases()))
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_and_gradgradcheck(mode: str, channels_last: bool) -> None:
    content = _randn(*SMALL, seed=70, scale=2.0)
    if channels_last:
        content = content.to(memory_format=torch.channels_last)
    kwargs = _small_cases()[mode]
    names: list[tuple[str, int | None]] = [("content", None)]
    leaves: list[torch.Tensor] = [content.requires_grad_()]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            names.append((key, None))
            leaves.append(value.requires_grad_())
        elif isinstance(value, list):
            for k, v in enumerate(value):
                names.append((key, k))
                leaves.append(v.requires_grad_())

    def fn(*args: torch.Tensor) -> torch.Tensor:
        call = dict(kwargs)
        for (key, k), arg in zip(names, args, strict=True):
            if k is None:
                call[key] = arg
            else:
                call[key] = list(call[key])
                call[key][k] = arg
        content = call.pop("content")
        return adain(content, **call)

    assert gradcheck(fn, tuple(leaves))
    assert gradgradcheck(fn, tuple(leaves))


def test_gradcheck_regions() -> None:
    content = _randn(*SMALL, seed=71).requires_grad_()
    style_a = _randn(1, 2, 3, 1, seed=72).requires_grad_()
    style_b = _randn(2, 2, 2, 1, seed=73).requires_grad_()
    mask_a = (_rand(2, 1, 3, 2, seed=74) * 0.5).requires_grad_()
    mask_b = (0.5 - mask_a.detach()).requires_grad_()

    def fn(
        content: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor
    ) -> torch.Tensor:
        return adain_regions(content, [(a, ma), (b, mb)], alpha=0.9)

    inputs = (content, style_a, style_b, mask_a, mask_b)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# Errors, dtypes, edge cases
# --------------------------------------------------------------------------------------------

STYLE = _randn(N, C, 4, 4, seed=80)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        (
            {"style": _randn(N, C + 1, 4, 4, seed=1)},
            ValueError,
            r"style of shape \(3, 5, 4, 4\).*content of shape \(3, 4, 5, 6\)",
        ),
        (
            {"style": _randn(2, C, 4, 4, seed=1)},
            ValueError,
            r"style.*batch size.*\(2, 4, 4, 4\).*\(3, 4, 5, 6\)",
        ),
        ({"style": STYLE[0, 0]}, ValueError, "style must have shape"),
        ({"style": STYLE.long()}, TypeError, "style"),
        ({}, ValueError, "style_mean is required"),
        ({"style_mean": _randn(C, seed=1)}, ValueError, "style_std is required"),
        ({"style": STYLE, "style_mean": _randn(C, seed=1)}, ValueError, "either style or"),
        (
            {
                "style_mean": _randn(C, seed=1),
                "style_std": _randn(C, seed=1),
                "style_mask": STYLE > 0,
            },
            ValueError,
            "style_mask",
        ),
        (
            {"style_mean": _randn(C + 1, seed=1), "style_std": _randn(C, seed=1)},
            ValueError,
            r"style_mean .*shape \(5,\)",
        ),
        (
            {"style_mean": _randn(C, seed=1), "style_std": _randn(N, C, 2, 2, seed=1)},
            ValueError,
            "style_std",
        ),
        (
            {"style_mean": _randn(C, seed=1).long(), "style_std": _randn(C, seed=1)},
            TypeError,
            "style_mean",
        ),
        ({"style": [STYLE, STYLE]}, TypeError, "style_weights"),
        (
            {"style": [STYLE, STYLE], "style_weights": _rand(N, 3, seed=1)},
            ValueError,
            r"style_weights must have shape \(N, K\) = \(3, 2\)",
        ),
        (
            {"style": [STYLE, STYLE], "style_weights": _rand(2, 2, seed=1)},
            ValueError,
            "style_weights",
        ),
        (
            {"style": [STYLE, STYLE], "style_weights": torch.ones(2, dtype=torch.long)},
            TypeError,
            "style_weights",
        ),
        (
            {"style": [STYLE, STYLE], "style_mask": [None], "style_weights": _rand(2, seed=1)},
            ValueError,
            "style_mask",
        ),
        ({"style": [], "style_weights": _rand(0, seed=1)}, ValueError, "at least one style"),
        (
            {"style": [STYLE, STYLE[:, :2]], "style_weights": _rand(2, seed=1)},
            ValueError,
            r"style\[1\]",
        ),
        (
            {"style": STYLE, "style_mask": -torch.ones(1, 1, 4, 4)},
            ValueError,
            "style_mask must be non-negative",
        ),
        (
            {"style": STYLE, "style_mask": torch.ones(1, 1, 5, 5)},
            ValueError,
            "style_mask must broadcast",
        ),
        (
            {"style": STYLE, "content_mask": torch.ones(1, 1, 4, 4)},
            ValueError,
            "content_mask must broadcast",
        ),
        (
            {"style": STYLE, "content_mask": torch.full((1, 1, H, W), 1.5)},
            ValueError,
            "content_mask must be at most 1",
        ),
        (
            {"style": STYLE, "content_mask": -torch.ones(1, 1, H, W)},
            ValueError,
            "content_mask must be non-negative",
        ),
        (
            {"style": STYLE, "style_mask": torch.zeros(1, 1, 4, 4)},
            ValueError,
            "style_mask must have a positive total weight",
        ),
        ({"style": STYLE, "alpha": True}, TypeError, "alpha"),
        ({"style": STYLE, "alpha": "1"}, TypeError, "alpha"),
        ({"style": STYLE, "alpha": float("nan")}, ValueError, "alpha must be finite"),
        ({"style": STYLE, "alpha": float("inf")}, ValueError, "alpha must be finite"),
        (
            {"style": STYLE, "alpha": torch.ones(2, dtype=torch.long)},
            TypeError,
            r"alpha must be a number or a floating tensor, got a tensor of dtype torch\.int64",
        ),
        (
            {"style_mean": torch.zeros(3, dtype=torch.long), "style_std": torch.ones(3)},
            TypeError,
            r"style_mean must be a floating-point tensor, got a tensor of dtype torch\.int64",
        ),
        ({"style": STYLE, "alpha": torch.ones(2, dtype=F64)}, ValueError, "alpha"),
        ({"style": STYLE, "eps": -1.0}, ValueError, "eps"),
        ({"style": STYLE, "eps": float("inf")}, ValueError, "eps"),
        ({"style": STYLE, "correction": -1}, ValueError, "correction"),
    ],
)
def test_errors_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], needle: str
) -> None:
    with pytest.raises(error, match=needle):
        adain(CONTENT, **kwargs)


def test_numpy_alpha_is_a_number() -> None:
    torch.testing.assert_close(
        adain(CONTENT, STYLE, alpha=np.float32(0.5)), adain(CONTENT, STYLE, alpha=0.5)
    )


@pytest.mark.parametrize("correction", [0, 1])
def test_eps_zero_is_finite_on_every_route(correction: int) -> None:
    """With eps = 0 a constant channel has no spread: its 1/sigma counts as 0 (torch's kernels'
    convention), so the output is the style mean on the fused route, and it was NaN on the
    masked and region routes, and with correction=1. Now every route gives the style mean, with
    finite gradients; a one-position region too."""
    content = torch.randn(2, 3, 4, 4, dtype=F64)
    content[:, 1] = 7.0  # a constant channel
    style = torch.randn(2, 3, 5, 5, dtype=F64)
    ones = torch.ones(1, 1, 4, 4, dtype=F64)
    style_mean = style.mean((2, 3))
    routes = {
        "fused": lambda x: adain(x, style, eps=0.0, correction=correction),
        "masked": lambda x: adain(x, style, eps=0.0, content_mask=ones, correction=correction),
        "regions": lambda x: adain_regions(x, [(style, ones)], eps=0.0, correction=correction),
    }
    for name, route in routes.items():
        x = content.clone().requires_grad_()
        out = route(x)
        expected = style_mean[:, 1, None, None].expand(2, 4, 4)
        torch.testing.assert_close(out[:, 1], expected, msg=name)
        if correction == 0:
            torch.testing.assert_close(out, adain(content, style, eps=0.0), msg=name)
        out.square().sum().backward()
        assert x.grad is not None and bool(x.grad.isfinite().all()), name
    # One position of a varying map: the region's content has no spread either.
    point = torch.zeros(1, 1, 4, 4, dtype=F64)
    point[..., 2, 3] = 1.0
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    out = adain(x, style, eps=0.0, content_mask=point)
    torch.testing.assert_close(out[..., 2, 3], style_mean)
    torch.testing.assert_close(out * (1 - point), x * (1 - point))


def test_content_errors() -> None:
    with pytest.raises(TypeError, match="content"):
        adain(CONTENT.long(), STYLE)
    with pytest.raises(ValueError, match="content"):
        adain(CONTENT[0, 0], STYLE)
    with pytest.raises(TypeError, match="content"):
        adain(CONTENT.numpy(), STYLE)  # type: ignore[arg-type]


def test_region_errors() -> None:
    style, mask = _regions()[0]
    with pytest.raises(ValueError, match="non-empty"):
        adain_regions(CONTENT, [])
    with pytest.raises(TypeError, match=r"regions\[0\]"):
        adain_regions(CONTENT, [style])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="content masks of all regions must be at most 1"):
        adain_regions(CONTENT, [(style, mask), (style, mask)])
    with pytest.raises(ValueError, match=r"regions\[1\].style"):
        adain_regions(CONTENT, [(style, mask), (style[:, :2], 1 - mask)])
    with pytest.raises(ValueError, match=r"regions\[0\].content_mask"):
        adain_regions(CONTENT, [(style, mask[..., :2])])


def test_inputs_not_modified() -> None:
    everything = [_cases()[mode] for mode in MODES]
    content = CONTENT.clone()
    snapshots = [
        {
            k: _np(v).copy() if v is not None else None
            for k, v in kw.items()
            if not isinstance(v, (int, float))
        }
        for kw in everything
    ]
    for kw, snap in zip(everything, snapshots, strict=True):
        adain(content, **kw)
        adain(content.to(memory_format=torch.channels_last), **kw)
        for key, before in snap.items():
            after = _np(kw[key])
            if isinstance(before, list):
                for b, a in zip(before, after, strict=True):
                    if b is not None:
                        np.testing.assert_array_equal(b, a)
            else:
                np.testing.assert_array_equal(before, after)
    assert torch.equal(content, CONTENT)
    regions = _regions()
    adain_regions(content, regions)
    assert torch.equal(content, CONTENT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "mode",
    [
        "style_batch_n",
        "style_broadcast",
        "alpha_half",
        "stats_nc",
        "spatial_maps",
        "content_mask_soft",
        "interp_list",
    ],
)
def test_low_precision_close_to_float32(dtype: torch.dtype, mode: str) -> None:
    kwargs = _cases()[mode]

    def cast(v: Any, to: torch.dtype) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(to)
        if isinstance(v, list):
            return [cast(u, to) for u in v]
        return v

    expected = adain(CONTENT.float(), **{k: cast(v, torch.float32) for k, v in kwargs.items()})
    out = adain(CONTENT.to(dtype), **{k: cast(v, dtype) for k, v in kwargs.items()})
    assert out.dtype == dtype and bool(out.isfinite().all())
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize(
    "mode", ["style_batch_n", "content_mask_soft", "interp_list", "alpha_half"]
)
def test_constant_channels_finite_values_and_gradients(mode: str) -> None:
    content = torch.full((N, C, H, W), 3.0, dtype=F64, requires_grad=True)
    kwargs = dict(_cases()[mode])
    constant_style = torch.full((1, C, 4, 4), -2.0, dtype=F64, requires_grad=True)
    if isinstance(kwargs["style"], list):
        kwargs["style"] = [constant_style, *kwargs["style"][1:]]
    else:
        kwargs["style"] = constant_style
    out = adain(content, **kwargs)
    assert bool(out.isfinite().all())
    (out * torch.randn_like(out)).sum().backward()
    assert content.grad is not None and bool(content.grad.isfinite().all())
    assert constant_style.grad is not None and bool(constant_style.grad.isfinite().all())


def test_single_spatial_position() -> None:
    content = _randn(2, 3, 1, 1, seed=90)
    style = _randn(2, 3, 4, 4, seed=91, offset=2.0)
    out = adain(content, style)
    np.testing.assert_allclose(_np(out), reference.adain(_np(content), _np(style)), atol=1e-12)


def test_empty_batch() -> None:
    content = torch.zeros(0, C, H, W)
    assert adain(content, torch.randn(1, C, 4, 4)).shape == content.shape


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_large_mean_small_std_float32(layout: str, alpha: float) -> None:
    # torch's channels_last group-norm kernel cancels here (E[x^2] - E[x]^2); ours must not.
    gen = torch.Generator().manual_seed(6)
    content = (100.0 + 0.1 * torch.randn(2, 3, 16, 16, generator=gen)).float()
    style = (5.0 + 2.0 * torch.randn(1, 3, 8, 8, generator=gen)).float()
    if layout == "channels_last":
        content = content.contiguous(memory_format=torch.channels_last)
    out = adain(content, style, alpha=alpha)
    expected = reference.adain(content.double().numpy(), style.double().numpy(), alpha=alpha)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-2, atol=1e-2)


def _plain_regions_adain(
    x: torch.Tensor, styles: list[torch.Tensor], masks: list[torch.Tensor]
) -> torch.Tensor:
    """Masked AdaIN written out (alpha = 1): each region's content statistics under its mask,
    its style's over the whole style image."""
    out = x
    for style, m in zip(styles, masks, strict=True):
        mean_s = style.mean((2, 3), keepdim=True)
        std_s = torch.sqrt((style - mean_s).square().mean((2, 3), keepdim=True) + 1e-5)
        total = m.sum((2, 3), keepdim=True)
        mean = (x * m).sum((2, 3), keepdim=True) / total
        var = ((x - mean).square() * m).sum((2, 3), keepdim=True) / total
        y = (x - mean) / torch.sqrt(var + 1e-5) * std_s + mean_s
        out = out + m * (y - x)
    return out


@pytest.mark.parametrize("offset", [30.0, 1e3, 1e4])
@pytest.mark.parametrize("regions", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_gradients_at_large_mean_as_precise_as_plain_formula(
    offset: float, regions: int, layout: str
) -> None:
    # Masked AdaIN (one mask, or two regions) on float32 content whose mean dwarfs its spread:
    # output and input gradient no further from float64 than the plain formula's in float32,
    # and the output keeps the content's layout.
    gen = torch.Generator().manual_seed(4)
    x = (offset + torch.randn(2, 16, 32, 32, generator=gen)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    left = torch.zeros(2, 1, 32, 32)
    left[..., :20] = 1.0
    masks = [left, 1.0 - left][:regions]
    styles = [3.0 * torch.randn(1, 16, 8, 8, generator=gen) + 1.0 for _ in masks]
    grad = torch.randn(x.shape, generator=gen)

    def ours(x: torch.Tensor) -> torch.Tensor:
        if regions == 1:
            return adain(x, styles[0], content_mask=left)
        return adain_regions(x, list(zip(styles, masks, strict=True)))

    def result(fn: Any, dtype: torch.dtype) -> list[torch.Tensor]:
        xs = x.to(dtype).requires_grad_()
        y = fn(xs)
        return [t.detach().double() for t in (y, *torch.autograd.grad(y, xs, grad.to(dtype)))]

    double = ([t.double() for t in styles], [m.double() for m in masks])
    expected = result(lambda x: _plain_regions_adain(x, *double), torch.float64)
    got = result(ours, torch.float32)
    plain = result(lambda x: _plain_regions_adain(x, styles, masks), torch.float32)
    for name, o, p, e in zip(("y", "x"), got, plain, expected, strict=True):
        scale = float(e.abs().max())
        e_ours, e_plain = float((o - e).abs().max()) / scale, float((p - e).abs().max()) / scale
        assert e_ours <= 2 * e_plain + 1e-6, (name, e_ours, e_plain)
    out = ours(x)
    assert out.is_contiguous(memory_format=stats._memory_format(x))


@pytest.mark.parametrize("route", ["mask of ones", "one region", "half mask"])
def test_masked_output_at_large_means_is_as_exact_as_unmasked(route: str) -> None:
    """At a content mean of 1e4 the masked routes formed x + change, which rounds at x's
    magnitude where the output is far from x: 1.2e-3 off float64, against 4e-4 unmasked and
    6e-4 for torch.nn's InstanceNorm formula. Now y = r (x - mu) + mu_s is blended with x."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 8, 16, 16, generator=gen) + 1e4
    style = torch.randn(1, 8, 5, 5, generator=gen)
    ones = torch.ones(1, 1, 16, 16)
    mask = ones if route != "half mask" else torch.full((1, 1, 16, 16), 0.5)
    calls = {
        "mask of ones": lambda c, s: adain(c, s, content_mask=mask),
        "one region": lambda c, s: adain_regions(c, [(s, mask)]),
        "half mask": lambda c, s: adain(c, s, content_mask=mask),
    }
    call = calls[route]
    expected = call(x.double(), style.double())
    mean_s, std_s = stats.mean_std(style.double())
    mean_s, std_s = mean_s[..., None, None].float(), std_s[..., None, None].float()
    torch_nn = torch.nn.functional.instance_norm(x) * std_s + mean_s
    if route == "half mask":
        torch_nn = 0.5 * torch_nn + 0.5 * x
    ours_error = float((call(x, style).double() - expected).abs().max())
    torch_error = float((torch_nn.double() - expected).abs().max())
    assert ours_error <= torch_error, (ours_error, torch_error)


def test_gradcheck_term_by_term_path_at_large_mean() -> None:
    # A content mean 50 times its spread applies the styles term by term on x - mu.
    gen = torch.Generator().manual_seed(12)
    content = (50.0 + torch.randn(2, 3, 4, 5, generator=gen, dtype=F64)).requires_grad_()
    style = torch.randn(1, 3, 4, 4, generator=gen, dtype=F64).requires_grad_()
    mask = 0.2 + 0.8 * torch.rand(2, 1, 4, 5, generator=gen, dtype=F64)  # soft, in (0.2, 1)
    alpha = torch.tensor([0.3, 1.0], dtype=F64)
    mean_c, var_c = stats.mean_var(content.detach())
    assert stats._needs_refining(mean_c, torch.rsqrt(var_c), content)

    def fn(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return adain(c, s, content_mask=mask, alpha=alpha)

    assert gradcheck(fn, (content, style))
    assert gradgradcheck(fn, (content, style))


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_vmap_over_content_masks(offset: float) -> None:
    # Batched masks give batched content statistics, whose values cannot be read to choose a
    # path: vmap equals the loop at a small and at a large content mean.
    gen = torch.Generator().manual_seed(18)
    content = offset + torch.randn(2, 3, 6, 5, generator=gen, dtype=F64)
    style = torch.randn(1, 3, 4, 4, generator=gen, dtype=F64)
    masks = (torch.rand(4, 2, 1, 6, 5, generator=gen) < 0.7).double()
    masks[..., :2, :2] = 1.0
    looped = torch.stack([adain(content, style, content_mask=m) for m in masks])
    batched = torch.func.vmap(lambda m: adain(content, style, content_mask=m))(masks)
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_channels_last_without_gradient_is_exact_at_large_mean(
    offset: float, alpha: float, kernels: str, assert_small_inference_precise: Callable[..., None]
):
    # Small channels_last float32 content without a gradient takes the whole-tensor formula:
    # within 4x the error of rounding float64's output to float32, at a content mean of 1e3 too.
    gen = torch.Generator().manual_seed(4)
    content = offset + torch.randn(2, 64, 8, 8, generator=gen)
    content = content.contiguous(memory_format=torch.channels_last)
    style = 5 + 2 * torch.randn(1, 64, 16, 16, generator=gen)
    # as shipped, the whole-tensor formula; with every kernel forced, the blockwise code
    assert functional._formula_fits(content) is (kernels == "by-size")
    with torch.no_grad():
        out = adain(content, style, alpha=alpha)
    expected = reference.adain(_np(content), _np(style), alpha=alpha)
    assert_small_inference_precise(out, expected, content)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (4, 32, 32, 32)])
def test_content_whose_float32_squares_overflow(layout: str, shape: tuple[int, ...]) -> None:
    """Content features at 1e30 (a float32 sum of squares overflows; the folded form's variance
    is inf and its output the style mean, or NaN): the call runs again in float64, output and
    gradients as float64's."""
    gen = torch.Generator().manual_seed(4)
    content = (1e30 * torch.randn(shape, generator=gen, dtype=torch.float64) + 3e29).float()
    style = torch.randn(shape[0], shape[1], 8, 8, generator=gen) * 2 + 1
    if layout == "channels_last":
        content = content.contiguous(memory_format=torch.channels_last)
    xg = content.clone().requires_grad_()
    y = adain(xg, style, alpha=0.75)
    assert y.dtype == torch.float32 and y.stride() == content.stride()
    expected = reference.adain(_np(content), _np(style), alpha=0.75)
    # The alpha blend keeps a quarter of the content (2.5e29): relative to it.
    np.testing.assert_allclose(_np(y), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(shape, generator=gen)
    y.backward(grad)
    x64 = content.detach().double().requires_grad_()
    adain(x64, style.double(), alpha=0.75).backward(grad.double())
    assert xg.grad is not None and x64.grad is not None
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
