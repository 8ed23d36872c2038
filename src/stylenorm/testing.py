"""Check your own style-loss implementation against stylenorm's NumPy reference in one line.

Example:
    >>> import torch
    >>> def my_style_loss(x, y):  # fast-neural-style's loss, written by hand
    ...     def gram(f):
    ...         n, c, h, w = f.shape
    ...         f = f.reshape(n, c, h * w)
    ...         return f @ f.mT / (c * h * w)
    ...     return torch.nn.functional.mse_loss(gram(x), gram(y))
    >>> assert_matches_reference(my_style_loss, "gram_loss", normalize="chw")
    >>> assert_matches_reference(my_style_loss, "pytorch_examples")

A mismatch raises ``AssertionError`` that says by which factor the results differ when they are
proportional, and which convention factor (4, C, C², M, ...) that is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from . import reference

__all__ = ["REFERENCES", "assert_close_to_reference", "assert_matches_reference"]

REFERENCES: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "gram_matrix": reference.gram_matrix,
        "gram_loss": reference.gram_loss,
        "mean_std_loss": reference.mean_std_loss,
        "mmd_loss": reference.mmd_loss,
        "gatys2015": reference.gatys2015_style_loss,
        "pytorch_examples": reference.pytorch_examples_style_loss,
        "magenta": reference.magenta_style_loss,
        "pystiche": reference.pystiche_gram_loss,
        "adain_lua": reference.adain_lua_style_loss,
        "adain_pytorch": reference.adain_pytorch_style_loss,
        "li2017_bn": reference.li2017_bn_style_loss,
    }
)
"""Reference (NumPy float64) function of each name accepted by the assertions."""


def _to_numpy(value: Any) -> NDArray[np.float64]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _factor_hint(
    actual: NDArray[np.float64], expected: NDArray[np.float64], shape: Sequence[int]
) -> str:
    """Name the constant factor between proportional results, if there is one. Two scalars are
    always proportional: for them, only a named factor is a hint."""
    norm = float((expected * expected).sum())
    if actual.shape != expected.shape or norm == 0.0:
        return ""
    ratio = float((actual * expected).sum()) / norm
    if (
        not math.isfinite(ratio)
        or not np.allclose(actual, ratio * expected, rtol=1e-6, atol=0.0)
        or math.isclose(ratio, 1.0, rel_tol=1e-6)
    ):
        return ""
    n, c, m = shape[0], shape[1], math.prod(shape[2:])
    named: dict[str, float] = {
        "4": 4,
        "C": c,
        "C²": c * c,
        "M": m,
        "M²": m * m,
        "N": n,
        "C·M": c * m,
    }
    named.update({"4·C²": 4 * c * c, "(C·M)²": (c * m) ** 2})
    for label, factor in list(named.items()):
        named[f"1/{label}"] = 1.0 / factor
    matches = [
        label for label, factor in named.items() if math.isclose(ratio, factor, rel_tol=1e-6)
    ]
    if not matches and expected.size == 1:
        return ""
    which = f" = {' or '.join(matches)}" if matches else ""
    return f"\nactual = {ratio:.6g}{which} × reference (N={n}, C={c}, M={m}): a convention factor?"


def _check_name(name: object) -> None:
    if not isinstance(name, str) or name not in REFERENCES:
        raise ValueError(f"name must be one of {', '.join(REFERENCES)}; got {name!r}")


def _check_shape(shape: object, argument: str) -> tuple[int, ...]:
    """``(N, C, *spatial)`` of positive ints, at least one spatial dimension."""
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise TypeError(f"{argument} must be a sequence of ints, got {type(shape).__name__}")
    sizes = tuple(shape)
    if (
        len(sizes) < 3
        or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes)
        or any(s <= 0 for s in sizes)
    ):
        raise ValueError(
            f"{argument} must be (N, C, *spatial) with positive sizes, got {tuple(shape)!r}"
        )
    return sizes


def assert_close_to_reference(
    actual: Any,
    name: str,
    input: Any,
    target: Any = None,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-12,
    **options: Any,
) -> None:
    """Assert ``actual`` equals the reference ``name`` evaluated on ``input`` (and ``target``).

    Args:
        actual: your result (tensor or array-like).
        name: a key of :data:`REFERENCES`: ``"gram_matrix"``, ``"gram_loss"``,
            ``"mean_std_loss"``, ``"mmd_loss"`` or a convention name such as ``"gatys2015"``.
        input, target: the features your result was computed from (tensors or arrays).
        rtol, atol: tolerances of :func:`numpy.testing.assert_allclose`.
        **options: keyword arguments of the reference (e.g. ``normalize="hw"``).

    Example:
        >>> x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        >>> g = x.reshape(2, 3, 16) @ x.reshape(2, 3, 16).mT / 16
        >>> assert_close_to_reference(g, "gram_matrix", x, normalize="hw")
    """
    _check_name(name)
    args = [_to_numpy(input)] + ([] if target is None else [_to_numpy(target)])
    expected = np.asarray(REFERENCES[name](*args, **options), dtype=np.float64)
    got = _to_numpy(actual)
    if got.shape != expected.shape:
        raise AssertionError(
            f"{name}: result has shape {got.shape}, the reference has shape {expected.shape}"
        )
    try:
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
    except AssertionError as error:
        hint = _factor_hint(got, expected, args[0].shape)
        message = f"{name}{options or ''} differs from the reference:{hint}\n{error}"
        raise AssertionError(message) from None


def assert_matches_reference(
    fn: Callable[..., Any],
    name: str,
    *,
    input_shape: Sequence[int] = (2, 3, 6, 5),
    target_shape: Sequence[int] | None = None,
    seed: int = 0,
    rtol: float = 1e-7,
    atol: float = 1e-12,
    **options: Any,
) -> None:
    """Run ``fn`` on random float64 features and compare with the reference ``name``.

    ``fn(input)`` is called for ``"gram_matrix"`` and ``fn(input, target)`` otherwise, with
    float64 tensors (copies, so an in-place ``fn`` cannot corrupt the check). Features are
    non-negative, like the ReLU activations style losses are computed on.

    Args:
        fn: your implementation.
        name: a key of :data:`REFERENCES`.
        input_shape: ``(N, C, *spatial)`` of the input.
        target_shape: of the target; default ``input_shape``. Use batch 1 to check broadcasting.
        seed: seed of the random features.
        rtol, atol: tolerances.
        **options: keyword arguments of the reference, i.e. the convention ``fn`` implements.

    Example:
        >>> from stylenorm.losses import get_convention
        >>> assert_matches_reference(get_convention("adain_pytorch"), "adain_pytorch")
    """
    _check_name(name)
    input_sizes = _check_shape(input_shape, "input_shape")
    if name == "gram_matrix" and target_shape is not None:
        raise ValueError("target_shape must be None for 'gram_matrix', which takes no target")
    gen = torch.Generator().manual_seed(seed)
    input = torch.randn(input_sizes, generator=gen, dtype=torch.float64).relu()
    if name == "gram_matrix":
        actual = fn(input.clone())
        assert_close_to_reference(actual, name, input, rtol=rtol, atol=atol, **options)
        return
    shape = input_sizes if target_shape is None else _check_shape(target_shape, "target_shape")
    target = 0.5 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64).relu()
    actual = fn(input.clone(), target.clone())
    assert_close_to_reference(actual, name, input, target, rtol=rtol, atol=atol, **options)
