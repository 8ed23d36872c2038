"""Parity of stylenorm's drop-in BatchNorm*d / InstanceNorm*d with torch.nn's classes.

Every comparison is with torch.nn (same constructor arguments, same state, same inputs) or, where
torch 2.13 is wrong, with the float64 NumPy reference in :mod:`stylenorm.reference`.

Tolerances (absolute and relative, on outputs, gradients and running statistics):
float64 1e-10; float32 1e-5; float16 1e-2 and bfloat16 6e-2 (one to two units in the last place
of values of order 1-4, the size of normalized outputs and of their gradients here).
"""

from __future__ import annotations

import inspect
import io
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

import stylenorm
from stylenorm import reference

NAMES = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]
SPATIAL = {"1d": (5,), "2d": (4, 5), "3d": (3, 4, 5)}
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation, which is slow on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(name: str, *args: Any, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """torch's and stylenorm's module built with the same arguments, ours holding torch's state."""
    ours = getattr(stylenorm, name)(*args, **kwargs)
    theirs = getattr(nn, name)(*args, **kwargs)
    # Non-trivial affine parameters, so that weight and bias gradients are exercised; drawn from
    # a generator of their own, so that a test's numbers do not depend on which tests ran first.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    tol: float,
    what: str,
    normwise: bool = False,
) -> None:
    """Elementwise ``|a - e| <= tol + tol |e|``; with ``normwise``, the absolute part scales
    with the largest ``|e|`` (for sums over many elements, whose small entries are cancellations
    of large terms)."""
    if expected is None:
        assert actual is None, what
        return
    assert actual is not None, what
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    atol = tol
    if normwise and expected.numel():
        atol *= max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, equal_nan=True, msg=what)


def _compare_state(theirs: nn.Module, ours: nn.Module, tol: float, skip: tuple[str, ...] = ()):
    torch_state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(torch_state) == list(our_state)
    for key, value in torch_state.items():
        if key not in skip:
            _close(our_state[key], value, tol, f"buffer/parameter {key}")
    for (name, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters(), strict=True):
        _close(q.grad, p.grad, tol, f"gradient of {name}", normwise=True)


def _keeps_channels_last(module: nn.Module, x: torch.Tensor) -> torch.memory_format | None:
    """The channels_last format our InstanceNorm keeps for ``x`` (torch's returns contiguous):
    all but evaluation of half input with float32 affine parameters that want a gradient,
    computed as torch.nn does (README)."""
    if not isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) or x.is_contiguous():
        return None
    weight = getattr(module, "weight", None)
    if (
        not module.training
        and module.track_running_stats
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight is not None
        and weight.dtype == torch.float32
        and weight.requires_grad
        and torch.is_grad_enabled()
    ):
        return None
    for fmt, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == rank and x.is_contiguous(memory_format=fmt):
            return fmt
    return None


def _step(
    theirs: nn.Module, ours: nn.Module, x: torch.Tensor, training: bool, tol: float, check_format
) -> None:
    """One forward/backward through both modules on copies of ``x``; outputs and input gradients
    must agree, and ``x`` must not change."""
    theirs.train(training)
    ours.train(training)
    before = x.clone()
    x_theirs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    x_ours = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    _close(y_ours, y_theirs, tol, f"output (training={training})")
    if check_format:
        fmt = _keeps_channels_last(ours, x)
        if fmt is not None:  # a deliberate difference: ours keeps channels_last, torch copies
            assert y_ours.is_contiguous(memory_format=fmt), "output memory format"
        else:
            assert y_ours.stride() == y_theirs.stride(), "output memory format"
    # The incoming gradient in the layout of torch's output, drawn with a seed taken from the
    # input's values: for a seeded input, the same whichever tests ran first.
    grad = torch.empty_like(y_theirs)
    seed = int(x.detach().double().abs().sum().mul(1e6)) % (1 << 31)
    grad.copy_(torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed)))
    y_theirs.backward(grad)
    y_ours.backward(grad.clone(memory_format=torch.preserve_format))
    _close(x_ours.grad, x_theirs.grad, tol, f"input gradient (training={training})")
    assert torch.equal(x, before), "input modified in place"


# ------------------------------------------------------------------------------------------------
# Constructor, state_dict, repr, isinstance


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_matches_torch(name: str):
    ours = inspect.signature(getattr(stylenorm, name).__init__)
    theirs = inspect.signature(getattr(nn, name).__init__)
    assert ours == theirs
    assert ours.parameters["bias"].kind is inspect.Parameter.KEYWORD_ONLY


CONSTRUCTOR_OPTIONS = [
    {},
    {"affine": True},
    {"affine": False},
    {"affine": True, "bias": False},
    {"track_running_stats": True},
    {"track_running_stats": False},
    {"eps": 1e-3, "momentum": None, "affine": True, "track_running_stats": True},
    {"momentum": 0.5, "dtype": torch.float64},
    {"device": "cpu", "dtype": torch.float16, "affine": True, "bias": False},
]


@pytest.mark.parametrize("options", CONSTRUCTOR_OPTIONS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_repr_move_both_ways(name: str, options: dict[str, Any]):
    theirs = getattr(nn, name)(4, **options)
    ours = getattr(stylenorm, name)(4, **options)
    assert repr(ours) == repr(theirs)
    assert ours.extra_repr() == theirs.extra_repr()
    for a, b in ((theirs, ours), (ours, theirs)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for key in sa:
            assert (sa[key].shape, sa[key].dtype, sa[key].device) == (
                sb[key].shape,
                sb[key].dtype,
                sb[key].device,
            ), key
            assert torch.equal(sa[key], sb[key]), key
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
        assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
        with torch.no_grad():
            for t in sa.values():
                t.add_(1) if t.is_floating_point() else t.add_(3)
        assert b.load_state_dict(sa, strict=True) == a.load_state_dict(sa, strict=True)
        for key, value in b.state_dict().items():
            assert torch.equal(value, sa[key]), key
    assert ours._version == theirs._version
    assert (
        ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    )


def test_meta_device_construction():
    ours = stylenorm.BatchNorm2d(3, device="meta")
    assert all(t.device.type == "meta" for t in ours.state_dict().values())


@pytest.mark.parametrize("dim", ["1d", "2d", "3d"])
def test_isinstance_and_subclass_of_torch_classes(dim: str):
    bn = getattr(stylenorm, f"BatchNorm{dim}")(3)
    inorm = getattr(stylenorm, f"InstanceNorm{dim}")(3)
    assert isinstance(bn, _BatchNorm) and isinstance(bn, _NormBase)
    assert isinstance(bn, getattr(nn, f"BatchNorm{dim}"))
    assert isinstance(inorm, _InstanceNorm) and isinstance(inorm, _NormBase)
    assert isinstance(inorm, getattr(nn, f"InstanceNorm{dim}"))
    assert not isinstance(inorm, _BatchNorm)
    assert not isinstance(bn, _InstanceNorm)


def test_convert_sync_batchnorm_converts_ours():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), stylenorm.BatchNorm2d(4, momentum=0.3, eps=1e-3))
    with torch.no_grad():
        model[1].weight.uniform_()
        model[1].running_mean.uniform_()
        model[1].num_batches_tracked.fill_(7)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sync = converted[1]
    assert type(sync) is nn.SyncBatchNorm
    assert (sync.num_features, sync.eps, sync.momentum, sync.affine) == (4, 1e-3, 0.3, True)
    assert sync.weight is model[1].weight and sync.bias is model[1].bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sync, name), getattr(model[1], name)), name


# ------------------------------------------------------------------------------------------------
# PyTorch's own sample inputs (torch.testing._internal.common_modules.module_db)


def _module_db_cases() -> list[Any]:
    try:
        import expecttest  # noqa: F401  (common_utils, imported by common_modules, needs it)
        from torch.testing._internal.common_modules import module_db
    except ImportError as error:  # pragma: no cover - depends on the environment
        reason = f"torch's module_db cannot be imported: {error}"
        return [pytest.param(None, -1, id="module_db", marks=pytest.mark.skip(reason=reason))]
    cases = []
    for info in module_db:
        if info.module_cls in [getattr(nn, n) for n in NAMES]:
            samples = info.module_inputs_func(
                info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
            )
            for index in range(len(samples)):
                cases.append(pytest.param(info, index, id=f"{info.module_cls.__name__}-{index}"))
    assert len(cases) >= 6 * 5, "module_db lost its norm samples"
    return cases


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("info", "index"), _module_db_cases())
def test_module_db_samples(info: Any, index: int, dtype: torch.dtype):
    name = info.module_cls.__name__
    tol = TOL[dtype]
    empty_train_steps = 0
    theirs = ours = None
    # train, train, eval, train, eval: running statistics must agree after each step.
    for step, training in enumerate((True, True, False, True, False)):
        torch.manual_seed(step)
        samples = info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=training
        )
        sample = samples[index]
        if theirs is None:
            args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            theirs, ours = _pair(name, *args, **{"dtype": dtype, **kwargs})
        assert ours is not None
        (x,) = sample.forward_input.args
        assert not sample.forward_input.kwargs
        # An empty training batch is the one place we differ on purpose: torch counts the step.
        empty_train_steps += int(training and x.numel() == 0)
        _step(theirs, ours, x.detach(), training, tol, check_format=True)
        skip = ("num_batches_tracked",) if empty_train_steps else ()
        _compare_state(theirs, ours, tol, skip)
        if empty_train_steps:
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) - (
                empty_train_steps
            )


# ------------------------------------------------------------------------------------------------
# Grid of constructor options x modes x dtypes x layouts

OPTION_GRID = [
    {"affine": affine, "bias": bias, "track_running_stats": track, "momentum": momentum}
    for affine, bias, track, momentum in itertools.product(
        (True, False), (True, False), (True, False), (0.1, None)
    )
    if affine or bias  # bias=False without affine is the same module as bias=True
]
# (input dtype, module dtype): pure precisions, and half input into a float32 module (autocast).
DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# (class, input rank, layout); BatchNorm1d also on (N, C) input, where "channels_last" is the
# transposed (C, N) memory and "strided" would be the same case again.
VARIANTS = [
    (name, rank, layout)
    for name, rank in [(name, name[-2:]) for name in NAMES] + [("BatchNorm1d", "0d")]
    for layout in LAYOUTS
    if (rank, layout) != ("0d", "strided")
]


def _make_input(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, generator: torch.Generator
) -> torch.Tensor:
    """A (N, C, *spatial) input with mean 0.5 and std 2 in the requested memory layout."""
    n, c, *spatial = shape
    if layout == "channels_last" and spatial:  # (N, *spatial, C) memory, any rank
        x = torch.randn((n, *spatial, c), generator=generator, dtype=torch.float64)
        x = x.movedim(-1, 1)
    elif layout == "strided":  # every other element of the last dimension
        x = torch.randn((*shape[:-1], 2 * shape[-1]), generator=generator, dtype=torch.float64)
        x = x[..., ::2]
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (0.5 + 2 * x).to(dtype)


@pytest.mark.parametrize(("dtype", "module_dtype"), DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize(("name", "rank", "layout"), VARIANTS, ids=lambda v: v)
def test_grid_parity(
    name: str,
    rank: str,
    layout: str,
    options: dict[str, Any],
    dtype: torch.dtype,
    module_dtype: torch.dtype,
):
    tol = TOL[dtype]
    eps = 1e-3 if options["momentum"] is None else 1e-5
    theirs, ours = _pair(name, 3, eps=eps, dtype=module_dtype, **options)
    generator = torch.Generator().manual_seed(0)
    shape = (4, 3, *SPATIAL.get(rank, ()))
    for training in (True, True, False, True, False):
        x = _make_input(shape, dtype, layout, generator)
        _step(theirs, ours, x, training, tol, check_format=True)
        # Half-precision inputs with float32 running statistics: ours update them in float32
        # (test_half_input_running_stats_precision), torch in half: compare at half's tolerance.
        _compare_state(theirs, ours, tol)


@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_unbatched_input(name: str, training: bool, track: bool):
    theirs, ours = _pair(name, 3, affine=True, track_running_stats=track, dtype=torch.float64)
    rank = {"1d": 1, "2d": 2, "3d": 3}[name[-2:]]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *SPATIAL[name[-2:]][:rank], dtype=torch.float64, generator=generator)
    for mode in (True, training, False, training):
        _step(theirs, ours, x, mode, TOL[torch.float64], check_format=True)
        _compare_state(theirs, ours, TOL[torch.float64])


@pytest.mark.parametrize("name", NAMES[1:3] + NAMES[4:])
def test_output_memory_format(name: str):
    """For channels_last input torch's BatchNorm returns channels_last, its InstanceNorm a
    contiguous tensor; our BatchNorm does the same, our InstanceNorm keeps channels_last (no
    transposing copy: a deliberate, documented difference; the values are the same)."""
    fmt = torch.channels_last if name.endswith("2d") else torch.channels_last_3d
    shape = (2, 3, 4, 5) if name.endswith("2d") else (2, 3, 3, 4, 5)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    theirs, ours = _pair(name, 3, affine=True)
    y_theirs, y_ours = theirs(x), ours(x)
    if name.startswith("Batch"):
        assert y_theirs.is_contiguous(memory_format=fmt)
    else:
        assert y_theirs.is_contiguous() and not y_theirs.is_contiguous(memory_format=fmt)
    if name.startswith("Batch"):
        assert y_ours.stride() == y_theirs.stride()
    else:
        assert y_ours.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["InstanceNorm2d", "InstanceNorm3d"])
def test_channels_last_input_with_large_mean(name: str, dtype: torch.dtype):
    """torch 2.13's channels_last CPU group-norm kernel loses the variance of features with a
    large mean (E[x^2] - E[x]^2); our instance norm, built on group norm, must not."""
    fmt = torch.channels_last if name.endswith("2d") else torch.channels_last_3d
    shape = (2, 3, 16, 16) if name.endswith("2d") else (2, 3, 6, 6, 6)
    generator = torch.Generator().manual_seed(7)
    x64 = 100.0 + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
    x = x64.to(dtype).contiguous(memory_format=fmt)
    theirs, ours = _pair(name, 3, track_running_stats=True, momentum=1.0, dtype=dtype)
    expected = reference.instance_norm(x.double().numpy())
    tol = 1e-3 if dtype == torch.float32 else 1e-8  # |x| / std = 1000 digits are lost to rounding
    np.testing.assert_allclose(ours(x).double().numpy(), expected, rtol=0, atol=tol)
    np.testing.assert_allclose(theirs(x).double().numpy(), expected, rtol=0, atol=tol)
    _, var = reference.instance_norm_running_stats(x.double().numpy(), np.zeros(3), np.ones(3), 1)
    np.testing.assert_allclose(ours.running_var.double().numpy(), var, rtol=tol)


# ------------------------------------------------------------------------------------------------
# Errors and warnings


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
            outcome: tuple[Any, ...] = ("ok", tuple(result.shape))
        except Exception as error:
            outcome = (type(error), str(error))
    return (*outcome, [(w.category, str(w.message)) for w in caught])


ERROR_CASES = [
    ("BatchNorm1d", {}, (2, 3, 4, 5), True),  # wrong rank
    ("BatchNorm1d", {}, (3,), True),
    ("BatchNorm2d", {}, (3, 4, 5), True),
    ("BatchNorm3d", {}, (2, 3, 4, 5), False),
    ("InstanceNorm1d", {}, (3,), True),
    ("InstanceNorm2d", {}, (2, 3, 4, 5, 6), False),
    ("InstanceNorm3d", {}, (3, 4, 5), True),
    ("BatchNorm1d", {}, (1, 3), True),  # one value per channel in training
    ("BatchNorm2d", {}, (1, 3, 1, 1), True),
    ("BatchNorm3d", {"track_running_stats": False}, (1, 3, 1, 1, 1), True),
    ("BatchNorm2d", {}, (1, 3, 1, 1), False),  # ... is fine in evaluation
    ("InstanceNorm1d", {}, (2, 3, 1), True),  # one spatial element in training
    ("InstanceNorm2d", {"affine": True}, (3, 1, 1), True),
    ("InstanceNorm3d", {"track_running_stats": True}, (2, 3, 1, 1, 1), True),
    ("InstanceNorm2d", {}, (2, 3, 1, 1), False),  # ... and in evaluation without running stats
    ("InstanceNorm2d", {"track_running_stats": True}, (2, 3, 1, 1), False),  # ... fine with them
    ("InstanceNorm2d", {"affine": True}, (2, 4, 5, 5), True),  # channel count: affine raises
    ("InstanceNorm2d", {"affine": True}, (4, 5, 5), False),
    ("InstanceNorm2d", {}, (2, 4, 5, 5), True),  # ... otherwise warns
    ("InstanceNorm1d", {}, (4, 5), False),
    ("InstanceNorm2d", {"track_running_stats": True}, (2, 4, 5, 5), True),  # ... then fails
    ("InstanceNorm2d", {"track_running_stats": True}, (2, 4, 5, 5), False),
    ("BatchNorm2d", {}, (2, 4, 5, 5), True),  # BN: torch's kernel error
    ("BatchNorm2d", {"affine": False}, (2, 4, 5, 5), False),
]


@pytest.mark.parametrize(("name", "options", "shape", "training"), ERROR_CASES, ids=str)
def test_errors_and_warnings_match_torch(
    name: str, options: dict[str, Any], shape: tuple[int, ...], training: bool
):
    theirs, ours = _pair(name, 3, **options)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(shape)
    expected = _outcome(lambda: theirs(x))
    assert _outcome(lambda: ours(x)) == expected
    # torch counts the step before its "one value per channel" check fails; so do we.
    _compare_state(theirs, ours, 0.0)


def test_half_input_wrong_channel_count_matches_torch():
    theirs, ours = _pair("BatchNorm2d", 4)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float16)
    assert _outcome(lambda: ours(x)) == _outcome(lambda: theirs(x))


def test_mixed_dtypes_match_torch():
    # float64 input into a float32 instance norm without affine parameters works in torch.
    theirs, ours = _pair("InstanceNorm2d", 3, track_running_stats=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
        _compare_state(theirs, ours, 1e-6)
    theirs, ours = _pair("InstanceNorm2d", 3, affine=True)
    assert _outcome(lambda: ours(x))[0] is _outcome(lambda: theirs(x))[0] is RuntimeError
    # Half input into parameters of float64 or of the other half type: torch's error (the
    # group-norm route used to cast the parameters to float32 and compute).
    for param_dtype in (torch.float64, torch.bfloat16):
        for training in (True, False):
            theirs, ours = _pair("InstanceNorm2d", 3, affine=True, dtype=param_dtype)
            theirs.train(training)
            ours.train(training)
            half = torch.randn(2, 3, 5, 5, dtype=torch.float16)
            expected = _outcome(lambda: theirs(half))  # noqa: B023 (called at once)
            assert expected[0] is RuntimeError
            assert _outcome(lambda: ours(half)) == expected  # noqa: B023


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_input_torch_rejects_leaves_the_state_alone(name: str, training: bool, affine: bool):
    """Integer input, and float64 input into a float32 module with affine parameters: torch's
    error, raised before any running statistic moves (an instance norm used to update them
    from the input first, then fail in its kernel with another error)."""
    theirs, ours = _pair(name, 3, affine=affine, track_running_stats=True)
    theirs.train(training)
    ours.train(training)
    shape = (4, 3) + SPATIAL[name[-2:]]
    inputs = [torch.randint(-3, 3, shape)]
    if affine:
        inputs.append(torch.randn(shape, dtype=torch.float64))
    for x in inputs:
        expected = _outcome(lambda: theirs(x))  # noqa: B023 (called at once)
        assert expected[0] != "ok"
        assert _outcome(lambda: ours(x)) == expected  # noqa: B023
        _compare_state(theirs, ours, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_input_without_channels_matches_torch(name: str, training: bool, dtype: torch.dtype):
    """(N, 0, *spatial) input into a module of 3 channels: torch's result or torch's error, and
    the state as torch leaves it (half BatchNorm used to fail in its float32 running update)."""
    theirs, ours = _pair(name, 3, track_running_stats=True)
    theirs.train(training)
    ours.train(training)
    x = torch.randn((2, 0) + SPATIAL[name[-2:]], dtype=dtype)
    assert _outcome(lambda: ours(x)) == _outcome(lambda: theirs(x))
    # An empty input is not a step (README): torch counts one, the buffers stay as they were.
    _compare_state(theirs, ours, 0.0, skip=("num_batches_tracked",))
    if name.startswith("BatchNorm"):
        assert int(ours.num_batches_tracked) == 0


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_evaluation_parameter_gradients_on_any_layout(layout: str, dtype: torch.dtype):
    """Evaluation with running statistics, half input not contiguous: the weight and bias
    gradients are summed as accurately as torch.nn's (torch's batch-norm backward on such a
    layout sums them in half precision: a bias gradient 1.7e-3 off, relative, in bfloat16)."""
    theirs, ours = _pair("InstanceNorm2d", 16, affine=True, track_running_stats=True)
    theirs.eval()
    ours.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 32, 32, generator=generator).to(dtype)
    x = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(-1, -2),
        "expanded": x[:1].expand(8, -1, -1, -1),
    }[layout]
    g = torch.randn(8, 16, 32, 32, generator=generator).to(dtype)
    out = ours(x)
    out.backward(g)
    expected = theirs(x)
    expected.backward(g)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # torch.nn's way, there
    x64, g64 = x.double(), g.double()
    rstd = (theirs.running_var.double() + theirs.eps).rsqrt().view(1, -1, 1, 1)
    xhat = (x64 - theirs.running_mean.double().view(1, -1, 1, 1)) * rstd
    exact = {"bias": g64.sum((0, 2, 3)), "weight": (g64 * xhat).sum((0, 2, 3))}
    for name, value in exact.items():
        ours_error = (getattr(ours, name).grad.double() - value).abs().max()
        torch_error = (getattr(theirs, name).grad.double() - value).abs().max()
        assert ours_error <= 2 * torch_error + 1e-6 * value.abs().max(), name


# ------------------------------------------------------------------------------------------------
# torch's quirks, kept


def test_instance_norm_never_counts_batches_and_uses_unbiased_running_var():
    theirs, ours = _pair("InstanceNorm2d", 3, momentum=0.3, track_running_stats=True)
    mean, var = np.zeros(3), np.ones(3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = _make_input((4, 3, 4, 5), torch.float64, "contiguous", generator).float()
        theirs(x)
        ours(x)
        mean, var = reference.instance_norm_running_stats(x.double().numpy(), mean, var, 0.3)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 0
    np.testing.assert_allclose(ours.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
    _compare_state(theirs, ours, 1e-5)


def test_instance_norm_momentum_none_leaves_running_stats_unchanged():
    theirs, ours = _pair("InstanceNorm2d", 3, momentum=None, track_running_stats=True)
    with torch.no_grad():
        for m in (theirs, ours):
            m.running_mean.fill_(0.25)
            m.running_var.fill_(2.0)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    for m in (theirs, ours):
        assert torch.equal(m.running_mean, torch.full((3,), 0.25))
        assert torch.equal(m.running_var, torch.full((3,), 2.0))


@pytest.mark.parametrize("affine", [True, False])
def test_channel_mismatch_warns_only_without_affine(affine: bool):
    ours = stylenorm.InstanceNorm2d(4, affine=affine)
    x = torch.randn(2, 3, 5, 5)
    if affine:
        with pytest.raises(ValueError, match="to match num_features"):
            ours(x)
    else:
        with pytest.warns(UserWarning, match="does not match num_features"):
            y = ours(x)
        np.testing.assert_allclose(y.double().numpy(), reference.instance_norm(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Where torch is wrong


@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_of_one_channels_last_gradient(
    spatial: tuple[int, ...], affine: bool, input_layout: str
):
    """torch 2.13's CPU instance norm returns wrong gradients for N=1 with a channels_last
    incoming gradient; ours match the float64 formula."""
    name = f"InstanceNorm{len(spatial)}d"
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    theirs, ours = _pair(name, 4, affine=affine, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((1, 4, *spatial), generator=generator, dtype=torch.float64)
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    grad = grad.contiguous(memory_format=fmt)
    if input_layout == "channels_last":
        x = x.contiguous(memory_format=fmt)
    # Reference: the float64 formula's gradient, from autograd on plain tensor ops.
    params = [p.detach().clone().requires_grad_() for p in theirs.parameters()]
    x_ref = x.clone().requires_grad_()
    mean = x_ref.mean(tuple(range(2, x.dim())), keepdim=True)
    var = x_ref.var(tuple(range(2, x.dim())), keepdim=True, correction=0)
    y_ref = (x_ref - mean) / torch.sqrt(var + 1e-5)
    if affine:
        shape = (1, 4) + (1,) * len(spatial)
        y_ref = y_ref * params[0].reshape(shape) + params[1].reshape(shape)
    np.testing.assert_allclose(
        y_ref.detach().numpy(),
        reference.instance_norm(x, *[p.detach() for p in params]),
        rtol=1e-12,
        atol=1e-12,  # entries near 0: their relative rounding depends on the summation order
    )
    expected = torch.autograd.grad(y_ref, [x_ref, *params], grad)

    def grads(module: nn.Module) -> tuple[torch.Tensor, ...]:
        x_in = x.clone().requires_grad_()
        return torch.autograd.grad(module(x_in), [x_in, *module.parameters()], grad)

    got_theirs, got_ours = grads(theirs), grads(ours)
    for ours_grad, ref_grad in zip(got_ours, expected, strict=True):
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-10, atol=1e-10)
    torch_error = max(float((a - b).abs().max()) for a, b in zip(got_theirs, expected, strict=True))
    assert torch_error > 1e-3, "torch's gradient is right here now: the workaround may go"


@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_batch_of_one_channels_last_gradient_in_evaluation(
    spatial: tuple[int, ...], dtype: torch.dtype, input_layout: str
):
    """The same torch bug with running statistics (evaluation), where the output is an affine
    map of x: ours match its float64 gradient, for half input (float32 parameters) too."""
    name = f"InstanceNorm{len(spatial)}d"
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    theirs, ours = _pair(name, 4, affine=True, track_running_stats=True, dtype=module_dtype)
    with torch.no_grad():
        for module in (theirs, ours):
            module.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
            module.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    theirs.eval()
    ours.eval()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn((1, 4, *spatial), generator=generator).to(dtype)
    grad = torch.randn(x.shape, generator=generator).to(dtype).contiguous(memory_format=fmt)
    if input_layout == "channels_last":
        x = x.contiguous(memory_format=fmt)
    shape = (1, 4) + (1,) * len(spatial)
    params = [p.detach().double().requires_grad_() for p in ours.parameters()]
    x_ref = x.double().requires_grad_()
    rstd = (ours.running_var.double() + ours.eps).rsqrt().reshape(shape)
    y_ref = (x_ref - ours.running_mean.double().reshape(shape)) * rstd
    y_ref = y_ref * params[0].reshape(shape) + params[1].reshape(shape)
    expected = torch.autograd.grad(y_ref, [x_ref, *params], grad.double())

    def grads(module: nn.Module) -> tuple[torch.Tensor, ...]:
        x_in = x.clone().requires_grad_()
        return torch.autograd.grad(module(x_in), [x_in, *module.parameters()], grad)

    tol = 1e-12 if dtype == torch.float64 else 2e-3
    for ours_grad, ref_grad in zip(grads(ours), expected, strict=True):
        torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=tol, atol=tol)
    torch_error = max(
        float((a.double() - b).abs().max()) for a, b in zip(grads(theirs), expected, strict=True)
    )
    assert torch_error > 1e-1, "torch's gradient is right here now"


@pytest.mark.parametrize(
    ("name", "training", "unbatched"),
    [
        ("BatchNorm2d", True, False),
        ("BatchNorm2d", False, False),
        ("InstanceNorm2d", False, False),
        ("InstanceNorm2d", False, True),
    ],
)
def test_batch_of_one_channels_last_input_with_contiguous_gradient(
    name: str, training: bool, unbatched: bool
):
    """An HWC image permuted to (C, H, W) (and unsqueezed) is a channels_last batch of one; with
    a contiguous incoming gradient torch 2.13's CPU batch-norm backward gets the input, weight
    and bias gradients wrong (torch.nn's BatchNorm2d in training and evaluation, and our tracked
    InstanceNorm in evaluation, which ran that kernel). Ours match the float64 formula."""
    options = {"track_running_stats": True}
    if name.startswith("Instance"):
        options["affine"] = True
    theirs, ours = _pair(name, 3, dtype=torch.float64, **options)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (theirs, ours):
            module.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            module.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
            module.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            module.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
            module.train(training)
    image = torch.rand(7, 6, 3, generator=generator, dtype=torch.float64)  # (H, W, C)
    x = image.permute(2, 0, 1) if unbatched else image.permute(2, 0, 1).unsqueeze(0)
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64)  # contiguous
    view = (3, 1, 1)
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    x_ref = x.clone().requires_grad_()
    if training:
        dims = tuple(d for d in range(x.dim()) if d != x.dim() - 3)
        mean = x_ref.mean(dims, keepdim=True)
        var = x_ref.var(dims, keepdim=True, correction=0)
    else:
        mean = ours.running_mean.reshape(view)
        var = ours.running_var.reshape(view)
    y_ref = (x_ref - mean) / torch.sqrt(var + 1e-5) * params[0].reshape(view)
    y_ref = y_ref + params[1].reshape(view)
    expected = torch.autograd.grad(y_ref, [x_ref, *params], grad)

    def grads(module: nn.Module) -> tuple[torch.Tensor, ...]:
        x_in = x.clone(memory_format=torch.preserve_format).requires_grad_()
        return torch.autograd.grad(module(x_in), [x_in, *module.parameters()], grad)

    for ours_grad, ref_grad in zip(grads(ours), expected, strict=True):
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-10, atol=1e-10)
    if name.startswith("BatchNorm"):
        torch_error = max(
            float((a - b).abs().max()) for a, b in zip(grads(theirs), expected, strict=True)
        )
        assert torch_error > 1e-3, "torch's gradient is right here now: the hook may go"
    # Double backward and torch.func.grad take the same route.
    x_in = x.clone(memory_format=torch.preserve_format).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: ours(t), (x_in,))
    weights = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    ours.eval()
    state = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    func_grad = torch.func.grad(
        lambda t: (torch.func.functional_call(ours, state, (t,)) * weights).sum()
    )(x)
    x_in = x.clone(memory_format=torch.preserve_format).requires_grad_()
    (ours(x_in) * weights).sum().backward()
    torch.testing.assert_close(func_grad, x_in.grad)
    # Under vmap each sample is such a batch of one, and no channels_last copy can be made:
    # the hook stands aside (vmap computes the batch's gradient by its own rules).
    if not unbatched:
        per_sample = torch.func.vmap(
            torch.func.grad(
                lambda t: (torch.func.functional_call(ours, state, (t,)) * weights).sum()
            )
        )(torch.stack([x, x]))
        torch.testing.assert_close(per_sample[0], x_in.grad)


@pytest.mark.parametrize("options", [{"affine": True}, {"track_running_stats": True}, {}], ids=str)
@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
def test_instance_norm_empty_batch(name: str, options: dict[str, Any]):
    theirs, ours = _pair(name, 3, **options)
    x = torch.randn(0, 3, *SPATIAL[name[-2:]], requires_grad=True)
    try:
        theirs(x)
        torch_result = "ok"
    except IndexError:
        torch_result = "IndexError"
    assert torch_result == ("IndexError" if options.get("affine") else "ok")
    if options.get("track_running_stats"):  # torch writes NaN into its running statistics
        assert torch.isnan(theirs.running_mean).all() and torch.isnan(theirs.running_var).all()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    y = ours(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (5, 3, 0, 4)], ids=["N=0", "H=0"])
def test_batch_norm_empty_batch_is_not_a_step(shape: tuple[int, ...]):
    """torch counts an empty batch in num_batches_tracked, so momentum=None's cumulative
    average weights the next real batch by 1/3 instead of 1/2; ours average the real batches."""
    theirs, ours = _pair("BatchNorm2d", 3, momentum=None)
    generator = torch.Generator().manual_seed(4)
    first = _make_input((4, 3, 4, 4), torch.float64, "contiguous", generator).float()
    second = 3.0 + 0.5 * _make_input((6, 3, 4, 4), torch.float64, "contiguous", generator).float()
    empty = torch.randn(shape)
    for x in (first, empty, second):
        y_theirs, y_ours = theirs(x), ours(x)
        torch.testing.assert_close(y_ours, y_theirs)
    assert int(theirs.num_batches_tracked) == 3 and int(ours.num_batches_tracked) == 2
    # Cumulative average of the two real batches: momentum 1 then 1/2.
    mean, var = reference.batch_norm_running_stats(first.numpy(), np.zeros(3), np.ones(3), 1.0)
    mean, var = reference.batch_norm_running_stats(second.numpy(), mean, var, 0.5)
    np.testing.assert_allclose(ours.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
    assert not np.allclose(theirs.running_mean.double().numpy(), mean, rtol=1e-3)


@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_running_stats_precision(name: str, dtype: torch.dtype):
    """Half input, float32 running statistics (autocast-style): ours update them to float32
    precision of the float64 reference. torch's instance norm is two to four orders of magnitude
    further off; torch's batch norm accumulates in float32 (a few 1e-6 here), and ours is its
    kernel: there, the same precision."""
    theirs, ours = _pair(name, 3, momentum=0.5, track_running_stats=True)
    generator = torch.Generator().manual_seed(5)
    mean, var = np.zeros(3), np.ones(3)
    update = (
        reference.batch_norm_running_stats
        if name.startswith("Batch")
        else reference.instance_norm_running_stats
    )
    for _ in range(3):
        # A large mean makes half-precision statistics lose digits.
        x = (1000.0 + 3.0 * torch.randn(8, 3, 16, 16, generator=generator)).to(dtype)
        theirs(x)
        ours(x)
        mean, var = update(x.double().numpy(), mean, var, 0.5)
    assert ours.running_mean.dtype == theirs.running_mean.dtype == torch.float32

    def error(module: nn.Module) -> float:
        return max(
            float(np.abs(module.running_mean.double().numpy() - mean).max() / np.abs(mean).max()),
            float(np.abs(module.running_var.double().numpy() - var).max() / np.abs(var).max()),
        )

    ours_error, torch_error = error(ours), error(theirs)
    assert ours_error < 1e-5
    if name.startswith("Instance"):  # measured: torch 5e-4 (float16), 4e-3 (bfloat16)
        assert torch_error > 20 * ours_error, (torch_error, ours_error)


# ------------------------------------------------------------------------------------------------
# Beyond torch: legacy checkpoints with stale instance-norm running statistics


@pytest.mark.parametrize("offset", [0.0, 10.0, 100.0, 1e4])
@pytest.mark.parametrize(
    ("dtype", "affine"),
    [
        (torch.float32, False),
        (torch.float32, True),
        (torch.bfloat16, True),
        (torch.bfloat16, False),
    ],
    ids=str,
)
def test_tracked_instance_norm_running_stats_from_the_normalization(
    offset: float, dtype: torch.dtype, affine: bool, monkeypatch: pytest.MonkeyPatch
):
    """Tracked training takes its running statistics from the normalization's own statistics
    (no second pass over the input), float32-precise (refined at large means; half input is
    normalized with float32 parameters, so in float32): as close to the float64 update as
    torch.nn's, at a contiguous size where the group-norm route runs."""
    theirs, ours = _pair(
        "InstanceNorm2d", 16, affine=affine, momentum=0.5, track_running_stats=True
    )
    generator = torch.Generator().manual_seed(6)
    x = (offset + 3.0 * torch.randn(4, 16, 64, 64, generator=generator)).to(dtype)
    passes: list[int] = []
    mean_var = stylenorm.stats._mean_var
    monkeypatch.setattr(stylenorm.stats, "_mean_var", lambda *a: passes.append(1) or mean_var(*a))
    theirs(x)
    ours(x)
    assert passes == []
    mean, var = reference.instance_norm_running_stats(
        x.double().numpy(), np.zeros(16), np.ones(16), 0.5
    )

    def error(module: nn.Module) -> float:
        return max(
            float(np.abs(module.running_mean.double().numpy() - mean).max() / max(offset, 1.0)),
            float(np.abs(module.running_var.double().numpy() / var - 1).max()),
        )

    assert error(ours) <= max(2 * error(theirs), 5e-7), (error(ours), error(theirs))


def _legacy_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        stylenorm.InstanceNorm2d(4, affine=True),
        nn.InstanceNorm2d(4),
        stylenorm.InstanceNorm2d(4, track_running_stats=True),
    )


def _legacy_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    # A pre-0.4 checkpoint: a plain dict (no version metadata) with running statistics everywhere.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in ("1", "2"):
        state[f"{layer}.running_mean"] = torch.randn(4)
        state[f"{layer}.running_var"] = torch.rand(4) + 0.5
    return state


def test_torch_refuses_legacy_checkpoint():
    checkpoint = _legacy_checkpoint(_legacy_model())
    torch_model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.InstanceNorm2d(4, affine=True),
        nn.InstanceNorm2d(4),
        nn.InstanceNorm2d(4, track_running_stats=True),
    )
    for target in (_legacy_model(), torch_model):
        with pytest.raises(RuntimeError, match="Unexpected running stats buffer"):
            target.load_state_dict(checkpoint)


def test_load_legacy_state_dict_loads_explicitly():
    torch.manual_seed(6)
    source = _legacy_model()
    with torch.no_grad():
        source[1].weight.uniform_()
        source[3].running_var.uniform_(0.5, 2)
    checkpoint = _legacy_checkpoint(source)
    snapshot = {k: v.clone() for k, v in checkpoint.items()}
    model = _legacy_model()
    result = stylenorm.load_legacy_state_dict(model, checkpoint)
    assert sorted(result.dropped_keys) == sorted(
        ["1.running_mean", "1.running_var", "2.running_mean", "2.running_var"]
    )
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert list(checkpoint) == list(snapshot)  # input not modified
    assert all(torch.equal(checkpoint[k], snapshot[k]) for k in snapshot)
    # The tracked layer keeps its (loaded) running statistics.
    assert torch.equal(model[3].running_var, checkpoint["3.running_var"])
    x = torch.randn(2, 3, 8, 8)
    for training in (False, True):
        source.train(training)
        model.train(training)
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_load_legacy_state_dict_other_mismatches_still_raise():
    checkpoint = _legacy_checkpoint(_legacy_model())
    extra = dict(checkpoint, **{"0.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "0.extra"'):
        stylenorm.load_legacy_state_dict(_legacy_model(), extra)
    missing = {k: v for k, v in checkpoint.items() if k != "0.weight"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.weight"'):
        stylenorm.load_legacy_state_dict(_legacy_model(), missing)
    wrong = dict(checkpoint, **{"1.weight": torch.zeros(5)})
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.weight"):
        stylenorm.load_legacy_state_dict(_legacy_model(), wrong)
    result = stylenorm.load_legacy_state_dict(_legacy_model(), extra, strict=False)
    assert result.unexpected_keys == ["0.extra"] and result.missing_keys == []
    cleaned, dropped = stylenorm.strip_legacy_running_stats(_legacy_model(), checkpoint)
    assert set(checkpoint) - set(cleaned) == set(dropped)
    assert "3.running_mean" in cleaned


# ------------------------------------------------------------------------------------------------
# Functional layer called the way the modules call it


def test_module_forward_equals_torch_functional():
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    ours = stylenorm.InstanceNorm2d(4, affine=True, dtype=torch.float64)
    torch.testing.assert_close(
        ours(x), F.instance_norm(x, None, None, ours.weight, ours.bias), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tracked_instance_norm_where_float32_squares_overflow(inference: bool, layout: str):
    """A layer whose features overflow a float32 sum of squares (at 1e30) is computed again in
    float64 (`stylenorm.stats`): its output and running statistics are float64's, its input is
    left as it was, also under inference mode (whose tensors keep no version counter)."""
    gen = torch.Generator().manual_seed(8)
    x = (1e30 * (torch.randn(4, 32, 32, 32, generator=gen, dtype=torch.float64) + 1)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    before, version = x.clone(), x._version
    layer = stylenorm.InstanceNorm2d(32, affine=True, track_running_stats=True)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.normal_(generator=gen)
    with torch.inference_mode(inference):
        y = layer(x)
    assert torch.equal(x, before) and x._version == version
    expected = reference.instance_norm(
        x.double().numpy(),
        layer.weight.detach().double().numpy(),
        layer.bias.detach().double().numpy(),
    )
    np.testing.assert_allclose(y.detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    mean_ref, var_ref = reference.instance_norm_running_stats(
        x.double().numpy(), np.zeros(32), np.ones(32)
    )
    np.testing.assert_allclose(layer.running_mean.double().numpy(), mean_ref, rtol=1e-6)
    assert (var_ref > np.finfo(np.float32).max).all()  # about 1e59: inf in float32
    assert bool(torch.isinf(layer.running_var).all())


@pytest.mark.parametrize("cls", ["InstanceNorm1d", "BatchNorm1d"])
def test_infinite_running_variance_stays_inf_like_torch(cls: str):
    """A running variance that overflowed to inf stays inf at the next step, as torch.nn's
    (1 - m) r + m s; the lerp form r + m (s - r) made it NaN (inf - inf), and NaN for good."""
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1)) * 1e20
    kwargs: dict[str, Any] = (
        {"track_running_stats": True} if cls == "InstanceNorm1d" else {"momentum": None}
    )
    ours, theirs = getattr(stylenorm, cls)(3, **kwargs), getattr(nn, cls)(3, **kwargs)
    for _ in range(3):
        ours(x), theirs(x)
    assert torch.equal(ours.running_var, theirs.running_var)
    assert bool(torch.isinf(ours.running_var).all())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "both"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (4, 64, 32, 32), (1, 8, 128, 128)])
def test_tracked_instance_norm_with_an_infinite_value_like_torch(
    shape: tuple[int, ...], layout: str, value: float | str
):
    """An infinite value in a tracked InstanceNorm batch makes that channel's running mean
    infinite, as torch.nn's sum / M does (our centred and Welford routes made it NaN); a NaN,
    or +inf and -inf in one channel, make it NaN. The other channels' running statistics are
    unchanged by it, on every route (small formula, channels_last blockwise, group-norm
    kernel)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if value == "both":
        x[0, 1, 0, 0], x[-1, 1, -1, -1] = math.inf, -math.inf
    else:
        x[0, 1, 0, 0] = value
    ours = stylenorm.InstanceNorm2d(shape[1], track_running_stats=True)
    theirs = nn.InstanceNorm2d(shape[1], track_running_stats=True)
    ours(x), theirs(x)
    _assert_same_non_finite_running_stats(ours, theirs, channel=1)
    expected = -math.inf if value == -math.inf else math.inf if value == math.inf else math.nan
    torch.testing.assert_close(ours.running_mean[1], torch.tensor(expected), equal_nan=True)


def _assert_same_non_finite_running_stats(
    ours: nn.Module, theirs: nn.Module, channel: int, half: bool = False
):
    """Running statistics equal to torch.nn's: the same value (inf, -inf or NaN) in
    ``channel``, the others close (for half input loosely: torch.nn's half-precision
    statistics are the less precise ones)."""
    others = [i for i in range(ours.running_mean.numel()) if i != channel]
    rtol, atol = (1e-2, 1e-3) if half else (1e-5, 1e-6)
    for name in ("running_mean", "running_var"):
        mine, torchs = getattr(ours, name), getattr(theirs, name)
        torch.testing.assert_close(mine[channel], torchs[channel], equal_nan=True)
        torch.testing.assert_close(mine[others], torchs[others], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_tracked_instance_norm_with_an_infinite_value_in_other_ranks_and_dtypes(
    rank: int, dtype: torch.dtype
):
    """The same in 1d/2d/3d and float64/half precision (half input with float32 buffers),
    -inf among finite values as large as 1e36 included (float32 partial sums overflowed to
    +inf there and gave NaN; torch's kernel, and ours, sum in float64)."""
    shape = (2, 3) + (12,) * rank
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    big = 1e36 if dtype == torch.float64 else 1e3
    x[0, 1] = big
    x[(0, 1) + (0,) * rank] = -math.inf
    x = x.to(dtype)
    buffers = torch.float64 if dtype == torch.float64 else torch.float32
    cls = f"InstanceNorm{rank}d"
    ours = getattr(stylenorm, cls)(3, track_running_stats=True, dtype=buffers)
    theirs = getattr(nn, cls)(3, track_running_stats=True, dtype=buffers)
    ours(x), theirs(x)
    _assert_same_non_finite_running_stats(ours, theirs, 1, half=dtype != torch.float64)
    assert ours.running_mean[1].item() == -math.inf


def test_tracked_instance_norm_float32_sums_of_huge_values_and_minus_inf():
    """float32 input: -inf among values of 1e36 gives a running mean of -inf, as torch.nn's
    (a float32 sum overflowed to +inf first, then NaN)."""
    x = torch.full((1, 2, 64, 64), 1e36)
    x[0, 1, 0, 0] = -math.inf
    ours = stylenorm.InstanceNorm2d(2, track_running_stats=True)
    theirs = nn.InstanceNorm2d(2, track_running_stats=True)
    ours(x), theirs(x)
    assert ours.running_mean[1].item() == theirs.running_mean[1].item() == -math.inf


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (4, 32, 32, 32)])
def test_instance_norm_with_zero_eps_like_torch(layout: str, shape: tuple[int, ...]):
    """eps=0: a constant channel's 1/sigma is taken as 0 by torch's kernel (output the bias,
    gradients 0; ours gave NaN), and a spread of 1e-20 keeps finite gradients; CIN alike."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen)
    x[:, 0] = 3.7
    x[:, 1] *= 1e-20
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=gen)
    results = []
    for layer in (
        stylenorm.InstanceNorm2d(shape[1], eps=0.0, affine=True),
        nn.InstanceNorm2d(shape[1], eps=0.0, affine=True),
    ):
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.backward(grad)
        results.append((y, xg.grad, layer.weight.grad, layer.bias.grad))
    for ours, theirs in zip(*results, strict=True):
        assert ours is not None and theirs is not None
        assert bool(ours.isfinite().all())
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    cin = stylenorm.ConditionalInstanceNorm2d(shape[1], 2, eps=0.0)
    ids = torch.zeros(shape[0], dtype=torch.long)
    torch.testing.assert_close(cin(x, ids), results[1][0], rtol=1e-5, atol=1e-5)
    single = x[:, :, :1, :1]  # one position: every channel constant
    torch.testing.assert_close(cin(single, ids), torch.zeros_like(single))


@pytest.mark.parametrize("shape", [(2, 8, 32, 32), (4, 32, 32, 32)])
def test_tracked_instance_norm_running_variance_far_below_eps(shape: tuple[int, ...]):
    """A variance far below eps, recovered from a kernel's 1/sqrt(var + eps) as rstd**-2 - eps,
    kept only eps's digits (0.25 off, relative, at a spread of 1e-6 with eps 1e-5): such rows
    are reduced again from the data. Against float64 (torch.nn: 1.5e-4 at 1e-6), and a
    constant channel's variance exactly 0."""
    gen = torch.Generator().manual_seed(13)
    spreads = torch.tensor([1e-3, 1e-4, 1e-6, 0.0]).repeat(shape[1] // 4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * spreads.view(1, -1, 1, 1) + 0.3
    x = x.float()
    layer = stylenorm.InstanceNorm2d(shape[1], track_running_stats=True, momentum=1.0)
    layer(x)
    expected = x.double().var((2, 3), unbiased=True).mean(0)
    got = layer.running_var.double()
    assert torch.equal(got[3::4], expected[3::4])  # constant channels: 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Graph tools: torch.fx and torch.jit.trace


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace_keeps_drop_ins_as_leaves(name: str):
    """fx stops at value-dependent control flow, which ours have; torch.nn's classes are leaf
    modules. Ours record themselves as leaves too, and the graph calls them."""
    channels = 6
    ours = getattr(stylenorm, name)(channels, affine=True)
    model = nn.Sequential(nn.Identity(), ours, nn.ReLU())
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "2"]
    x = 3.0 + torch.randn((4, channels) + SPATIAL[name[-2:]])
    torch.testing.assert_close(graph_module(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*is deprecated:DeprecationWarning")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_like_torch_nn(name: str, training: bool):
    """A trace must not depend on the data's values (our routes read them: the check that runs
    the trace twice saw different graphs at a large mean) nor hold out= ops (a trace replayed
    with a gradient failed). Traced, the drop-ins record torch's kernels, as torch.nn's do:
    saved, loaded and run with a gradient, they match torch.nn's trace."""
    theirs, ours = _pair(name, 8, affine=True, track_running_stats=True)
    x = 2.0 + torch.randn((4, 8) + SPATIAL[name[-2:]])
    if name.endswith("2d"):
        x = x.contiguous(memory_format=torch.channels_last)
    for module in (theirs, ours):
        module.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = [torch.jit.trace(module, x) for module in (theirs, ours)]
    buffer = io.BytesIO()
    torch.jit.save(traced[1], buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    results = []
    for module in (traced[0], loaded):
        x_in = x.clone().requires_grad_()
        out = module(x_in)
        out.square().sum().backward()
        results.append((out, x_in.grad))
    torch.testing.assert_close(results[1], results[0])
