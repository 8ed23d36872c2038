"""The style modules: ConditionalInstanceNorm1d/2d/3d, AdaIN and StyleAdaIN."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import stylenorm
from stylenorm import reference
from stylenorm.functional import adain, adain_regions
from stylenorm.style import (
    AdaIN,
    ConditionalInstanceNorm1d,
    ConditionalInstanceNorm2d,
    ConditionalInstanceNorm3d,
    StyleAdaIN,
)

F64 = torch.float64
CLASSES = [
    (ConditionalInstanceNorm1d, nn.InstanceNorm1d, stylenorm.InstanceNorm1d, (7,)),
    (ConditionalInstanceNorm2d, nn.InstanceNorm2d, stylenorm.InstanceNorm2d, (5, 4)),
    (ConditionalInstanceNorm3d, nn.InstanceNorm3d, stylenorm.InstanceNorm3d, (3, 2, 4)),
]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _randomize(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize(("cls", "_t", "_s", "spatial"), CLASSES)
def test_parameters_and_initialization(cls: type, _t: type, _s: type, spatial: tuple[int, ...]):
    m = cls(6, 3)
    assert m.weight.shape == m.bias.shape == (3, 6)
    assert torch.equal(m.weight, torch.ones(3, 6)) and torch.equal(m.bias, torch.zeros(3, 6))
    assert m.num_styles == 3 and m.num_features == 6 and m.eps == 1e-5
    assert set(m.state_dict()) == {"weight", "bias"}
    assert "num_styles=3" in repr(m)
    no_bias = cls(6, 3, bias=False, dtype=F64)
    assert no_bias.bias is None and no_bias.weight.dtype == F64
    assert set(no_bias.state_dict()) == {"weight"}
    with pytest.raises(ValueError, match="num_styles"):
        cls(6, 0)


@pytest.mark.parametrize(("cls", "_t", "_s", "spatial"), CLASSES)
@pytest.mark.parametrize(
    "style", [1, torch.tensor([2, 0, 2]), torch.tensor([[0.2, 0.3, 0.5]] * 3, dtype=F64)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(
    cls: type, _t: type, _s: type, spatial: tuple[int, ...], style: object, bias: bool
) -> None:
    m = cls(4, 3, eps=1e-3, bias=bias, dtype=F64)
    _randomize(m)
    x = torch.randn(3, 4, *spatial, dtype=F64)
    out = m(x, style)
    expected = reference.conditional_instance_norm(
        _np(x),
        style if isinstance(style, int) else style.numpy(),
        _np(m.weight),
        _np(m.bias) if bias else None,
        eps=1e-3,
    )
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("cls", "_t", "_s", "spatial"), CLASSES)
def test_unbatched_input(cls: type, _t: type, _s: type, spatial: tuple[int, ...]) -> None:
    m = cls(4, 3, dtype=F64)
    _randomize(m)
    x = torch.randn(4, *spatial, dtype=F64)
    for style in (2, torch.tensor(2), torch.tensor([0.0, 0.0, 1.0], dtype=F64)):
        out = m(x, style)
        assert out.shape == x.shape
        expected = reference.conditional_instance_norm(_np(x)[None], 2, _np(m.weight), _np(m.bias))[
            0
        ]
        np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="unbatched input needs one style"):
        m(x, torch.tensor([1]))


@pytest.mark.parametrize(("cls", "torch_cls", "_s", "spatial"), CLASSES)
def test_rank_and_channel_errors_like_torch(
    cls: type, torch_cls: type, _s: type, spatial: tuple[int, ...]
) -> None:
    m = cls(4, 3)
    ours_torch = torch_cls(4, affine=True)
    rank = len(spatial) + 2
    for bad in (torch.randn(*[2] * (rank - 2)), torch.randn(*[2] * (rank + 1))):
        with pytest.raises(ValueError) as ours:
            m(bad, 0)
        with pytest.raises(ValueError) as theirs:
            ours_torch(bad)
        assert str(ours.value) == str(theirs.value)
        assert f"expected {rank - 1}D or {rank}D input (got {bad.dim()}D input)" == str(ours.value)
    wrong_channels = torch.randn(2, 5, *spatial)
    with pytest.raises(ValueError) as ours:
        m(wrong_channels, 0)
    with pytest.raises(ValueError) as theirs:
        ours_torch(wrong_channels)
    assert str(ours.value) == str(theirs.value)


def test_constructor_argument_types() -> None:
    with pytest.raises(TypeError, match="num_styles must be an int, got float"):
        ConditionalInstanceNorm2d(3, 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_features must be an int, got float"):
        ConditionalInstanceNorm2d(3.0, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="eps must be a finite non-negative number, got str"):
        ConditionalInstanceNorm2d(3, 2, eps="a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got a tensor of dtype torch\.float32"):
        AdaIN(eps=torch.tensor(1e-5))  # type: ignore[arg-type]
    # Real numbers of other types (numpy's) are numbers.
    assert AdaIN(eps=np.float32(1e-3), correction=np.int64(1)).eps == pytest.approx(1e-3)
    # eps = inf would give NaN outputs (inf / inf for a constant channel, 0 * inf), so the
    # style layers refuse it at construction, as they refuse NaN and negative values.
    for eps in (math.inf, math.nan, -1e-5):
        for make in (
            functools.partial(ConditionalInstanceNorm2d, 3, 2),
            AdaIN,
            functools.partial(StyleAdaIN, 4, 3),
        ):
            with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
                make(eps=eps)
    with pytest.raises(ValueError, match="correction must be non-negative and finite"):
        AdaIN(correction=-1)
    # Integers of other types (numpy's) are ints.
    m = ConditionalInstanceNorm2d(np.int64(3), np.int16(2))  # type: ignore[arg-type]
    assert (m.num_features, m.num_styles) == (3, 2) and type(m.num_features) is int


def test_style_errors_through_module() -> None:
    m = ConditionalInstanceNorm2d(4, 3)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(IndexError, match="style id 3"):
        m(x, 3)
    with pytest.raises(IndexError, match="style id 5"):
        m(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="style ids must have shape"):
        m(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="style mixing weights"):
        m(x, torch.rand(2, 4))
    with pytest.raises(TypeError, match="input"):
        m(x.numpy(), 0)


@pytest.mark.parametrize(("cls", "torch_cls", "ours_cls", "spatial"), CLASSES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_instance_norm_equals_instance_norm(
    cls: type, torch_cls: type, ours_cls: type, spatial: tuple[int, ...], bias: bool
) -> None:
    for source_cls in (torch_cls, ours_cls):
        norm = source_cls(4, eps=1e-3, affine=True, bias=bias, dtype=F64)
        _randomize(norm, seed=3)
        cin = cls.from_instance_norm(norm, num_styles=5)
        assert isinstance(cin, cls)
        assert cin.num_styles == 5 and cin.eps == 1e-3 and cin.weight.dtype == F64
        assert (cin.bias is None) == (not bias)
        x = torch.randn(3, 4, *spatial, dtype=F64)
        expected = norm(x)
        for style in (0, 4, torch.tensor([1, 3, 2]), torch.full((5,), 0.2, dtype=F64)):
            torch.testing.assert_close(cin(x, style), expected, rtol=1e-10, atol=1e-10)
        # The banks are copies: training a style leaves the InstanceNorm alone.
        assert cin.weight.data_ptr() != norm.weight.data_ptr()


def test_from_instance_norm_errors_and_warning() -> None:
    with pytest.raises(TypeError, match="InstanceNorm2d"):
        ConditionalInstanceNorm2d.from_instance_norm(nn.InstanceNorm1d(4, affine=True), 2)
    with pytest.raises(ValueError, match="affine"):
        ConditionalInstanceNorm2d.from_instance_norm(nn.InstanceNorm2d(4), 2)
    with pytest.warns(UserWarning, match="running statistics"):
        ConditionalInstanceNorm2d.from_instance_norm(
            nn.InstanceNorm2d(4, affine=True, track_running_stats=True), 2
        )


@pytest.mark.parametrize("init", ["mean", "copy", "identity"])
def test_add_styles_keeps_old_rows(init: str) -> None:
    m = ConditionalInstanceNorm2d(4, 3)
    _randomize(m)
    old_weight, old_bias = m.weight.detach().clone(), m.bias.detach().clone()
    source = 1 if init == "copy" else None
    ids = m.add_styles(2, init, source=source)  # type: ignore[arg-type]
    assert ids == [3, 4] and m.num_styles == 5
    assert m.weight.shape == m.bias.shape == (5, 4)
    assert torch.equal(m.weight[:3], old_weight) and torch.equal(m.bias[:3], old_bias)
    expected = {
        "mean": (old_weight.mean(0), old_bias.mean(0)),
        "copy": (old_weight[1], old_bias[1]),
        "identity": (torch.ones(4), torch.zeros(4)),
    }[init]
    for row in ids:
        torch.testing.assert_close(m.weight[row], expected[0])
        torch.testing.assert_close(m.bias[row], expected[1])
    assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    m(torch.randn(2, 4, 3, 3), torch.tensor([4, 0]))


def test_add_styles_errors() -> None:
    m = ConditionalInstanceNorm2d(4, 3)
    with pytest.raises(ValueError, match="count"):
        m.add_styles(0)
    with pytest.raises(TypeError, match="source"):
        m.add_styles(1, "copy")
    with pytest.raises(IndexError, match="source style id 3"):
        m.add_styles(1, "copy", source=3)
    with pytest.raises(ValueError, match="init"):
        m.add_styles(1, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source"):
        m.add_styles(1, "mean", source=0)
    with pytest.raises(TypeError, match="count must be an int, got float"):
        m.add_styles(1.0)  # type: ignore[arg-type]
    assert m.num_styles == 3
    # NumPy integers are ints, for the count and the source alike.
    assert m.add_styles(np.int64(1), "copy", source=np.int32(0)) == [3]  # type: ignore[arg-type]
    torch.testing.assert_close(m.weight[3], m.weight[0])


def test_state_dict_recipe_after_growing() -> None:
    old = ConditionalInstanceNorm2d(4, 3, bias=False)
    _randomize(old)
    saved = old.state_dict()
    grown = ConditionalInstanceNorm2d(4, 3, bias=False)
    grown.add_styles(2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        grown.load_state_dict(saved)
    # The documented recipe: load at the old size, then grow again.
    restored = ConditionalInstanceNorm2d(4, 3, bias=False)
    restored.load_state_dict(saved)
    restored.add_styles(2)
    assert torch.equal(restored.weight[:3], old.weight)
    # A grown checkpoint loads into a module built with the new size.
    fresh = ConditionalInstanceNorm2d(4, 5, bias=False)
    fresh.load_state_dict(restored.state_dict())
    assert torch.equal(fresh.weight, restored.weight)


def test_fine_tune_a_new_style_with_the_rest_frozen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ConditionalInstanceNorm2d(4, 2))
    cin = model[1]
    _randomize(cin)
    (new_id,) = cin.add_styles(1)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in cin.style_parameters():
        p.requires_grad_(True)
    assert list(cin.style_parameters()) == [cin.weight, cin.bias]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(cin.style_parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6)
    target = torch.randn(2, 4, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        loss = (cin(model[0](x), new_id) - target).square().mean()
        loss.backward()
        opt.step()
    after = list(model.parameters())
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # conv frozen
    assert torch.equal(before[2][:2], after[2][:2]) and torch.equal(before[3][:2], after[3][:2])
    assert not torch.equal(before[2][new_id], after[2][new_id])


def test_module_gradcheck_only_selected_styles() -> None:
    m = ConditionalInstanceNorm2d(3, 4, dtype=F64)
    _randomize(m)
    x = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    ids = torch.tensor([3, 1])
    out = m(x, ids)
    out.backward(torch.randn_like(out))
    assert m.weight.grad is not None
    assert torch.equal(m.weight.grad[[0, 2]], torch.zeros(2, 3, dtype=F64))
    assert bool(m.weight.grad[[1, 3]].abs().sum(1).gt(0).all())

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, {"weight": weight, "bias": bias}, (x, ids))

    inputs = (
        x,
        m.weight.detach().clone().requires_grad_(),
        m.bias.detach().clone().requires_grad_(),
    )
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_half_precision_module() -> None:
    m = ConditionalInstanceNorm2d(4, 3)
    _randomize(m)
    x = torch.randn(2, 4, 8, 8)
    expected = m(x, torch.tensor([0, 2]))
    for dtype in (torch.float16, torch.bfloat16):
        out = m.to(dtype)(x.to(dtype), torch.tensor([0, 2]))
        assert out.dtype == dtype and bool(out.isfinite().all())
        torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=0.15)
        m.float()


def test_adain_module_is_the_function() -> None:
    content, style = torch.randn(2, 3, 6, 6), torch.randn(1, 3, 5, 5)
    module = AdaIN(eps=1e-3, correction=1)
    assert list(module.parameters()) == [] and "correction=1" in repr(module)
    mask = torch.rand(2, 1, 6, 6)
    torch.testing.assert_close(
        module(content, style, alpha=0.5, content_mask=mask),
        adain(content, style, alpha=0.5, content_mask=mask, eps=1e-3, correction=1),
    )
    regions = [(style, mask * 0.5), (style + 3, 0.5 - mask * 0.5)]
    torch.testing.assert_close(
        module.forward_regions(content, regions),
        adain_regions(content, regions, eps=1e-3, correction=1),
    )


def test_style_adain_matches_reference_and_starts_at_one() -> None:
    m = StyleAdaIN(style_dim=5, num_features=3, eps=1e-4, dtype=F64)
    assert torch.equal(m.affine.bias[:3], torch.ones(3, dtype=F64))
    assert torch.equal(m.affine.bias[3:], torch.zeros(3, dtype=F64))
    assert m.affine.weight.shape == (6, 5)
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    w = torch.randn(2, 5, dtype=F64)
    expected = reference.style_adain(
        _np(x), _np(w), _np(m.affine.weight), _np(m.affine.bias), eps=1e-4
    )
    np.testing.assert_allclose(_np(m(x, w)), expected, rtol=1e-10, atol=1e-10)
    # With a zero style code (and the initial bias) it is a plain instance norm.
    zero = m(x, torch.zeros(2, 5, dtype=F64))
    np.testing.assert_allclose(
        _np(zero), stylenorm.reference.instance_norm(_np(x), eps=1e-4), atol=1e-10
    )


def test_style_adain_gradients_and_errors() -> None:
    m = StyleAdaIN(4, 3, dtype=F64)
    x = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    w = torch.randn(2, 4, dtype=F64, requires_grad=True)
    assert gradcheck(m, (x, w))
    assert gradgradcheck(m, (x, w))
    with pytest.raises(ValueError, match=r"style must be a style code of shape \(N, style_dim\)"):
        m(x, torch.randn(2, 5, dtype=F64))
    with pytest.raises(TypeError, match="style"):
        m(x, [1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"style must have one code per sample .* \(3, 4\)"):
        m(x, torch.randn(3, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"input must have num_features=3 channels, .* \(2, 4, 3"):
        m(torch.randn(2, 4, 3, 3, dtype=F64), w)
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor"):
        m(x.detach().numpy(), w)  # type: ignore[arg-type]
    # A code of another dtype is named (nn.Linear's own error does not say which argument).
    for dtype in (torch.float32, torch.int64):
        with pytest.raises(TypeError, match=r"style must be a floating-point tensor of the layer"):
            m(x, w.detach().to(dtype))
    # One code for the whole batch: as that code repeated.
    one = w[:1].detach()
    torch.testing.assert_close(m(x, one), m(x, one.expand(2, 4)))


def test_style_adain_code_under_autocast() -> None:
    """Under autocast the linear map casts the code itself: a float32 code for a bfloat16 layer
    is fine there."""
    m = StyleAdaIN(4, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 5, 5), torch.randn(2, 4))
        assert out.shape == (2, 3, 5, 5) and bool(torch.isfinite(out).all())
        # ... but not a float64 code, which autocast leaves alone.
        with pytest.raises(TypeError, match="style must be a floating-point tensor of the layer"):
            m(torch.randn(2, 3, 5, 5), torch.randn(2, 4, dtype=F64))


def test_style_adain_constructor_checks_sizes() -> None:
    with pytest.raises(TypeError, match="style_dim must be an int, got bool"):
        StyleAdaIN(True, 3)  # type: ignore[arg-type]
    for num_features in (0, -1):
        with pytest.raises(ValueError, match=f"num_features must be positive.*={num_features}"):
            StyleAdaIN(8, num_features)
    m = StyleAdaIN(np.int64(8), np.int16(3))  # type: ignore[arg-type]
    assert (m.style_dim, m.num_features) == (8, 3) and type(m.style_dim) is int
