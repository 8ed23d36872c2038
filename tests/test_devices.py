"""Every layer, statistic and loss on each device present: the CPU always, CUDA when there is one.

The other test files run on the CPU. Here the same public API runs on every device, in both
memory layouts and at sizes that take each route on the CPU (torch's ``var_mean`` below 4096
values, the kernels above, the blockwise channels_last code from 2^18 values), and is checked
against independent results: torch.nn's class on the same device, the float64 NumPy reference,
and autograd through the plain formula in float64 on the CPU (for the losses' gradients, the
same loss in float64 on the CPU, which the loss test files check against the reference). Half
precision stays close to float64; tensors of two devices give a clear error, small control
values are moved. Those device checks run on the CPU as well, with the meta device as the
other one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import stylenorm
from stylenorm import functional as SF
from stylenorm import reference, stats

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
LAYOUTS = ["contiguous", "channels_last"]
# 150 values (torch.var_mean), 2^15 (the kernels), 2^18 (blockwise channels_last).
SHAPES = [(2, 3, 5, 5), (4, 32, 16, 16), (2, 32, 64, 64)]
EPS = 1e-5


def _features(
    shape: tuple[int, ...],
    device: str,
    layout: str,
    mean: float = 0.5,
    std: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``(x, x64)``: features on ``device`` in ``dtype`` and ``layout``, and the same values
    (after rounding to ``dtype``) in float64 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    x64 = mean + std * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x64.to(dtype)
    x64 = x.double()
    x = x.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, x64


def _random(shape: tuple[int, ...], seed: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _rel_err(
    actual: Tensor | np.ndarray, expected: Tensor | np.ndarray, floor: float = 1.0
) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64 on the CPU."""
    a = torch.as_tensor(actual).detach().cpu().double()
    e = torch.as_tensor(expected).detach().cpu().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert bool(torch.isfinite(a).all()), "non-finite values"
    return float((a - e).abs().max() / e.abs().max().clamp_min(floor))


def _grads(
    fn: Callable[..., Tensor], inputs: list[Tensor], grad_out: Tensor | None
) -> tuple[Tensor, list[Tensor]]:
    """``fn(*inputs)`` and the gradients of ``sum(out * grad_out)`` (or of a scalar ``out``)
    with respect to ``inputs``, which are detached copies that require grad."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    loss = out if grad_out is None else (out * grad_out.to(out.device, out.dtype)).sum()
    return out, list(torch.autograd.grad(loss, leaves))


def _plain_norm(x: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the positions of each (sample, channel)."""
    dims = tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    return (x - mean) / (var + EPS).sqrt()


def _as_map(v: Tensor, ndim: int) -> Tensor:
    """A (C,) or (N, C) vector as a map that broadcasts over (N, C, *spatial)."""
    v = v if v.dim() == 2 else v[None]
    return v.reshape(*v.shape, *([1] * (ndim - 2)))


def _on(device: str, *tensors: Tensor) -> list[Tensor]:
    return [t.to(device=device, dtype=torch.float32) for t in tensors]


# -------------------------------------------------------------------- the drop-in layers
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_instance_norm_on_device(device: str, layout: str, shape: tuple[int, ...]) -> None:
    """Output, input/weight/bias gradients and running statistics of InstanceNorm2d agree with
    torch.nn's on the same device and with float64; channels_last stays channels_last."""
    c = shape[1]
    x, x64 = _features(shape, device, layout)
    weight, bias = _random((c,), 1, 0.5, 1.5), _random((c,), 2)
    grad_out = _random(shape, 3)
    ours = stylenorm.InstanceNorm2d(c, affine=True, track_running_stats=True, device=device)
    theirs = nn.InstanceNorm2d(c, affine=True, track_running_stats=True, device=device)
    for module in (ours, theirs):
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)

    def run(module: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
            return torch.func.functional_call(
                module, {"weight": w, "bias": b}, (x,), strict=False, tie_weights=False
            )

        return fn

    out, grads = _grads(run(ours), [x, *_on(device, weight, bias)], grad_out)
    out_t, grads_t = _grads(run(theirs), [x, *_on(device, weight, bias)], grad_out)

    def plain(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return _plain_norm(x) * _as_map(w, x.dim()) + _as_map(b, x.dim())

    out64, grads64 = _grads(plain, [x64, weight, bias], grad_out)
    assert out.device == x.device
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert _rel_err(out, reference.instance_norm(x64.numpy(), weight, bias)) < 1e-5
    assert _rel_err(out, out64) < 1e-5
    assert _rel_err(out, out_t) < 1e-5
    for ours_g, theirs_g, want in zip(grads, grads_t, grads64, strict=True):
        assert _rel_err(ours_g, want) < 2e-5
        assert _rel_err(ours_g, theirs_g) < 2e-5
    for name in ("running_mean", "running_var"):
        assert _rel_err(getattr(ours, name), getattr(theirs, name)) < 1e-6, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_on_device(
    device: str, layout: str, shape: tuple[int, ...], training: bool
) -> None:
    """BatchNorm2d's output, gradients, running statistics and step count match torch.nn's on
    the same device, and its output matches float64."""
    c = shape[1]
    x, x64 = _features(shape, device, layout, mean=2.0)
    grad_out = _random(shape, 3).to(device=device, dtype=torch.float32)
    ours = stylenorm.BatchNorm2d(c, device=device)
    theirs = nn.BatchNorm2d(c, device=device)
    for module in (ours, theirs):
        with torch.no_grad():
            module.weight.copy_(_random((c,), 1, 0.5, 1.5))
            module.bias.copy_(_random((c,), 2))
            module.running_mean.copy_(_random((c,), 4))
            module.running_var.copy_(_random((c,), 5, 0.5, 2.0))
        module.train(training)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    outs = [module(xi) for module, xi in zip((ours, theirs), xs, strict=True)]
    for out in outs:
        out.backward(grad_out)
    expected = reference.batch_norm(
        x64.numpy(),
        ours.weight.detach().cpu(),
        ours.bias.detach().cpu(),
        running_mean=None if training else ours.running_mean.cpu(),
        running_var=None if training else ours.running_var.cpu(),
    )
    assert _rel_err(outs[0], expected) < 1e-5
    assert _rel_err(outs[0], outs[1]) < 1e-5
    assert xs[0].grad is not None and xs[1].grad is not None
    assert _rel_err(xs[0].grad, xs[1].grad) < 1e-5
    for name in ("weight", "bias"):
        mine, torch_grad = getattr(ours, name).grad, getattr(theirs, name).grad
        assert mine is not None and torch_grad is not None
        assert _rel_err(mine, torch_grad) < 1e-5, name
    for name in ("running_mean", "running_var"):
        assert _rel_err(getattr(ours, name), getattr(theirs, name)) < 1e-6, name
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


# -------------------------------------------------------------------- style layers
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conditional_instance_norm_on_device(
    device: str, layout: str, shape: tuple[int, ...]
) -> None:
    """CIN with one style id per sample and with mixing weights, each on the CPU or the device:
    output against the reference, gradients of input and banks against float64."""
    n, c = shape[:2]
    styles = 3
    x, x64 = _features(shape, device, layout)
    weight, bias = _random((styles, c), 1, 0.5, 1.5), _random((styles, c), 2)
    grad_out = _random(shape, 3)
    ids = torch.arange(n) % styles
    mix = _random((n, styles), 4, 0.0, 1.0)
    mix = mix / mix.sum(1, keepdim=True)
    # ids and mixing weights on the CPU are moved to the device, as on the device
    choices = [(ids, ids), (ids.to(device), ids), (mix.float(), mix), (mix.float().to(device), mix)]
    for style, style64 in choices:

        def ours(x: Tensor, w: Tensor, b: Tensor, style: Tensor = style) -> Tensor:
            return SF.conditional_instance_norm(x, style, w, b)

        def plain(x: Tensor, w: Tensor, b: Tensor, style64: Tensor = style64) -> Tensor:
            gamma, beta = (
                (w[style64], b[style64]) if style64.dim() == 1 else (style64 @ w, style64 @ b)
            )
            return _plain_norm(x) * _as_map(gamma, x.dim()) + _as_map(beta, x.dim())

        out, grads = _grads(ours, [x, *_on(device, weight, bias)], grad_out)
        out64, grads64 = _grads(plain, [x64, weight, bias], grad_out)
        assert out.device == x.device
        expected = reference.conditional_instance_norm(x64.numpy(), style64.numpy(), weight, bias)
        assert _rel_err(out, expected) < 1e-5
        assert _rel_err(out, out64) < 1e-5
        for got, want in zip(grads, grads64, strict=True):
            assert _rel_err(got, want) < 2e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_adain_on_device(device: str, layout: str, shape: tuple[int, ...]) -> None:
    """AdaIN from style features with a per-sample alpha on the CPU, from given (mean, std), and
    with a content mask:
    outputs against the reference; content and style gradients against float64."""
    content, content64 = _features(shape, device, layout, seed=0)
    style, style64 = _features(shape, device, layout, mean=2.0, std=3.0, seed=1)
    grad_out = _random(shape, 3)
    alpha = 0.6

    def ours(x: Tensor, s: Tensor) -> Tensor:
        # alpha per sample, on the CPU: moved to the content's device
        return SF.adain(x, s, alpha=torch.full((shape[0],), alpha))

    def plain(x: Tensor, s: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim()))
        s_var, s_mean = torch.var_mean(s, dim=dims, keepdim=True, correction=0)
        y = _plain_norm(x) * (s_var + EPS).sqrt() + s_mean
        return alpha * y + (1 - alpha) * x

    out, grads = _grads(ours, [content, style], grad_out)
    out64, grads64 = _grads(plain, [content64, style64], grad_out)
    assert out.device == content.device
    expected = reference.adain(content64.numpy(), style64.numpy(), alpha=alpha)
    assert _rel_err(out, expected) < 1e-5
    assert _rel_err(out, out64) < 1e-5
    for got, want in zip(grads, grads64, strict=True):
        assert _rel_err(got, want) < 2e-5

    mean64, std64 = reference.mean_std(style64.numpy())
    given = SF.adain(
        content,
        style_mean=torch.from_numpy(mean64).float().to(device),
        style_std=torch.from_numpy(std64).float().to(device),
    )
    assert _rel_err(given, reference.adain(content64.numpy(), style64.numpy())) < 1e-5

    mask64 = (_random((shape[0], 1, *shape[2:]), 5) > 0).double()
    masked = SF.adain(content, style, content_mask=mask64.float().to(device))
    expected = reference.adain(content64.numpy(), style64.numpy(), content_mask=mask64.numpy())
    assert _rel_err(masked, expected) < 1e-5


# -------------------------------------------------------------------- statistics and losses
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mean", [0.5, 1e3])
def test_mean_std_on_device(device: str, layout: str, shape: tuple[int, ...], mean: float) -> None:
    """stats.mean_std against float64: the mean to float32 rounding; the std within 2e-6 of
    float64 at a mean of 0.5 and 1e-5 at a mean 1000x the spread (where E[x^2] - E[x]^2 in
    float32 is 0.05-0.18 off), and within 4x the error of torch.var_mean on the same device
    (plus a float32 floor); gradients against float64."""
    x, x64 = _features(shape, device, layout, mean=mean)
    got_mean, got_std = stats.mean_std(x)
    want_mean, want_std = reference.mean_std(x64.numpy())
    dims = tuple(range(2, x.dim()))
    var_t, _ = torch.var_mean(x, dim=dims, correction=0)
    std_t = (var_t + EPS).sqrt()
    assert got_mean.device == x.device
    assert _rel_err(got_mean, want_mean) < 1e-6
    torch_err = float((std_t.cpu().double() - torch.from_numpy(want_std)).abs().max())
    ours_err = float((got_std.cpu().double() - torch.from_numpy(want_std)).abs().max())
    assert ours_err < (2e-6 if mean < 10 else 1e-5)
    assert ours_err <= 4 * torch_err + 1e-6 * max(1.0, abs(mean) * 1e-3)

    g_mean, g_std = _random(want_mean.shape, 6), _random(want_std.shape, 7)

    def ours(x: Tensor) -> Tensor:
        m, s = stats.mean_std(x)
        return (m * g_mean.to(m)).sum() + (s * g_std.to(s)).sum()

    def plain(x: Tensor) -> Tensor:
        var, m = torch.var_mean(x, dim=dims, correction=0)
        return (m * g_mean).sum() + ((var + EPS).sqrt() * g_std).sum()

    _, (grad,) = _grads(ours, [x], None)
    _, (grad64,) = _grads(plain, [x64], None)
    assert _rel_err(grad, grad64) < (2e-5 if mean < 10 else 1e-3)


LOSSES: dict[str, tuple[Callable[..., Tensor], Callable[..., Any]]] = {
    "gram_matrix": (lambda x, y: SF.gram_matrix(x), lambda x, y: reference.gram_matrix(x)),
    "gram_loss": (SF.gram_loss, reference.gram_loss),
    "mean_std_loss": (SF.mean_std_loss, reference.mean_std_loss),
    "mmd_polynomial": (SF.mmd_loss, reference.mmd_loss),
    "mmd_gaussian": (
        lambda x, y: SF.mmd_loss(x, y, kernel="gaussian", sigma=8.0),
        lambda x, y: reference.mmd_loss(x, y, kernel="gaussian", sigma=8.0),
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_on_device(device: str, layout: str, shape: tuple[int, ...], name: str) -> None:
    """Each loss (and the Gram matrix) against the reference, and its input gradient against
    the same function run in float64 on the CPU."""
    fn, ref = LOSSES[name]
    x, x64 = _features(shape, device, layout, seed=0)
    y, y64 = _features((1, *shape[1:]), device, layout, mean=1.0, std=2.0, seed=1)
    got = fn(x, y)
    assert got.device == x.device
    assert _rel_err(got, ref(x64.numpy(), y64.numpy()), floor=0.0) < 1e-5
    grad_out = None if got.dim() == 0 else _random(tuple(got.shape), 3)
    _, (grad,) = _grads(lambda x: fn(x, y), [x], grad_out)
    _, (grad64,) = _grads(lambda x: fn(x, y64), [x64], grad_out)
    scale = float(grad64.abs().max())
    assert float((grad.cpu().double() - grad64).abs().max()) <= 2e-5 * scale


# -------------------------------------------------------------------- half precision
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_device(device: str, layout: str, dtype: torch.dtype) -> None:
    """float16/bfloat16 features at a mean 30x their spread: InstanceNorm (float32 parameters
    and running statistics), AdaIN, the statistics and the Gram loss are finite and as close
    to float64 (of the same rounded input) as the output's own rounding allows; the running
    statistics are updated from float32 statistics; the loss is float32."""
    shape = (2, 32, 32, 32)
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    x, x64 = _features(shape, device, layout, mean=30.0, dtype=dtype)
    style, style64 = _features(shape, device, layout, mean=2.0, std=3.0, dtype=dtype, seed=1)

    norm = stylenorm.InstanceNorm2d(32, affine=True, track_running_stats=True, device=device)
    grad_out = _random(shape, 3).to(dtype)
    xg = x.detach().clone().requires_grad_()
    out = norm(xg)
    out.backward(grad_out.to(device))
    assert out.dtype == dtype and out.device == x.device
    assert _rel_err(out, reference.instance_norm(x64.numpy())) < 2 * ulp
    x_ref = x64.clone().requires_grad_()
    _plain_norm(x_ref).backward(grad_out.double())
    assert xg.grad is not None and x_ref.grad is not None and norm.weight.grad is not None
    assert _rel_err(xg.grad, x_ref.grad, floor=0.0) < 2 * ulp
    weight_grad = (_plain_norm(x64) * grad_out.double()).sum((0, 2, 3))
    assert _rel_err(norm.weight.grad, weight_grad, floor=0.0) < 1e-5
    run_mean, run_var = reference.instance_norm_running_stats(
        x64.numpy(), np.zeros(32), np.ones(32)
    )
    assert _rel_err(norm.running_mean, run_mean) < 1e-5
    assert _rel_err(norm.running_var, run_var) < 1e-5

    adain = SF.adain(x, style)
    assert _rel_err(adain, reference.adain(x64.numpy(), style64.numpy())) < 2 * ulp

    mean, std = stats.mean_std(x)
    want_mean, want_std = reference.mean_std(x64.numpy())
    assert mean.dtype == dtype and std.dtype == dtype  # computed in float32, then rounded
    assert _rel_err(mean, want_mean) < ulp
    assert _rel_err(std, want_std) < ulp

    loss = SF.gram_loss(x, style)
    assert loss.dtype == torch.float32
    want = reference.gram_loss(x64.numpy(), style64.numpy())
    assert abs(float(loss) - float(want)) <= 1e-5 * abs(float(want))


# -------------------------------------------------------------------- two devices
OTHER = "cuda" if torch.cuda.is_available() else "meta"


def _other(t: Tensor) -> Tensor:
    return t.to(OTHER)


MISMATCHES: dict[str, tuple[Callable[[Tensor, Tensor], object], str]] = {
    "adain style": (lambda x, m: SF.adain(x, _other(x)), "style must be on the device of content"),
    "adain style_mean": (
        lambda x, m: SF.adain(x, style_mean=_other(x[:, :, 0, 0]), style_std=x[:, :, 0, 0]),
        "style_mean must be on the device of content",
    ),
    "adain style_std": (
        lambda x, m: SF.adain(x, style_mean=x[:, :, 0, 0], style_std=_other(x[:, :, 0, 0])),
        "style_std must be on the device of content",
    ),
    "adain content_mask": (
        lambda x, m: SF.adain(x, x, content_mask=_other(m)),
        "content_mask must be on the device of content",
    ),
    "adain style_mask": (
        lambda x, m: SF.adain(x, x, style_mask=_other(m)),
        "style_mask must be on the device of style",
    ),
    "adain_regions content_mask": (
        lambda x, m: SF.adain_regions(x, [(x, _other(m))]),
        r"regions\[0\].content_mask must be on the device of content",
    ),
    "mean_std mask": (
        lambda x, m: stats.mean_std(x, mask=_other(m)),
        "mask must be on the device of x",
    ),
    "gram_loss target": (lambda x, m: SF.gram_loss(x, _other(x)), "target must be on the device"),
    "gram_loss mask": (
        lambda x, m: SF.gram_loss(x, x, mask=_other(m)),
        "mask must be on the device of input",
    ),
    "mean_std_loss target": (
        lambda x, m: SF.mean_std_loss(x, _other(x)),
        "target must be on the device of input",
    ),
    "mmd_loss target": (lambda x, m: SF.mmd_loss(x, _other(x)), "target must be on the device"),
    "cin weight": (
        lambda x, m: SF.conditional_instance_norm(x, 0, _other(torch.ones(2, 3))),
        "weight must be on the device of input",
    ),
    "cin bias": (
        lambda x, m: SF.conditional_instance_norm(x, 0, torch.ones(2, 3), _other(torch.ones(2, 3))),
        "bias must be on the device of input",
    ),
    "GramLoss": (
        lambda x, m: stylenorm.GramLoss(_other(x))(x),
        "input must be on the device of the loss's cached target",
    ),
    "MeanStdLoss": (
        lambda x, m: stylenorm.MeanStdLoss(_other(x))(x),
        "input must be on the device of the loss's cached target",
    ),
    "MMDLoss": (
        lambda x, m: stylenorm.MMDLoss(_other(x))(x),
        "input must be on the device of the loss's cached target",
    ),
}


@pytest.mark.parametrize("name", sorted(MISMATCHES))
def test_tensors_on_two_devices_raise(name: str) -> None:
    """An argument on another device than the features it goes with is a ValueError that names
    it (not a kernel's RuntimeError, and no silent copy)."""
    fn, message = MISMATCHES[name]
    x = torch.randn(2, 3, 4, 4)
    mask = torch.ones(2, 1, 4, 4)
    with pytest.raises(ValueError, match=message):
        fn(x, mask)


@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d"])
def test_drop_in_device_mismatch_raises_like_torch(name: str) -> None:
    """The drop-ins raise torch.nn's error for parameters on another device."""
    x = torch.randn(2, 3, 4, 4)
    kwargs: dict[str, Any] = {"affine": True} if name.startswith("Instance") else {}
    errors = []
    for module in (getattr(stylenorm, name)(3, **kwargs), getattr(nn, name)(3, **kwargs)):
        module.weight = nn.Parameter(_other(module.weight.detach()))
        with pytest.raises(RuntimeError) as error:
            module(x)
        errors.append(error.value)
    assert type(errors[0]) is type(errors[1])
    assert str(errors[0]) == str(errors[1])


def test_control_values_move_to_the_device() -> None:
    """Style ids, mixing weights, style_weights and a per-sample alpha on the CPU work with
    features on another device; so does a half input with float32 parameters there."""
    x = _other(torch.randn(2, 3, 4, 4))
    cin = stylenorm.ConditionalInstanceNorm2d(3, 4, device=x.device)
    for style in (torch.tensor([0, 3]), torch.full((2, 4), 0.25)):
        assert cin(x, style).device == x.device
    assert SF.adain(x, x, alpha=torch.tensor([0.3, 0.6])).device == x.device
    mixed = SF.adain(x, [x, x], style_weights=torch.tensor([0.5, 0.5]))
    assert mixed.device == x.device
    norm = stylenorm.InstanceNorm2d(3, affine=True, device=x.device)
    half = norm(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.device == x.device


# -------------------------------------------------------------------- routes off the CPU
class _CountOps(TorchDispatchMode):
    """Counts the aten ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _ops(fn: Callable[[Tensor], object], x: Tensor) -> Counter[str]:
    with _CountOps() as mode:
        fn(x)
    return mode.ops


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_measured_routes_stay_on_the_cpu(layout: str) -> None:
    """The routes measured faster on the CPU (group-norm statistics, symmetric Gram blocks,
    blockwise channels_last code) are not taken on another device, where torch's one kernel
    (var_mean, bmm, a contiguous copy and group norm) was measured faster (CUDA, README); the
    meta device stands in for CUDA here."""
    x = torch.randn(4, 256, 32, 32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    meta = x.to("meta")

    def statistics(t: Tensor) -> object:
        return stats.mean_std(t)

    def gram(t: Tensor) -> object:
        return SF.gram_matrix(t)

    on_cpu, off_cpu = _ops(statistics, x), _ops(statistics, meta)
    assert on_cpu["var_mean"] == 0
    assert off_cpu["var_mean"] == 1 and off_cpu["native_group_norm"] == 0
    assert _ops(gram, x)["bmm"] > 1  # the blocks on and above the diagonal
    assert _ops(gram, meta)["bmm"] == 1
    blockwise = layout == "channels_last"
    assert stats._blockwise_channels_last(x) == blockwise
    assert not stats._blockwise_channels_last(meta)
