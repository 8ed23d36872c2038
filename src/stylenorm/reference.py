r"""Plain NumPy float64 reference implementations: the oracle stylenorm is tested against.

Every function here is written to be read next to the paper it comes from, one short function per
operation, with no attention paid to speed. Inputs are array-likes of shape ``(N, C, *spatial)``;
everything is computed in float64. Use these in your own unit tests to check a style-transfer
implementation against a formula you can read in a minute::

    >>> import numpy as np
    >>> from stylenorm import reference
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    >>> reference.instance_norm(x).std(axis=(2, 3)).round(3).tolist()[0]
    [1.0, 1.0, 1.0]

This module never imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "batch_norm",
    "batch_norm_running_stats",
    "instance_norm",
    "instance_norm_running_stats",
    "mean_std",
    "mean_var",
]

Array = NDArray[np.float64]


def _f64(x: Any) -> Array:
    return np.asarray(x, dtype=np.float64)


def _spatial_axes(x: Array) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


def _channel_shape(x: Array) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector over (N, C, *spatial)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def mean_var(x: Any, correction: float = 0, mask: Any = None) -> tuple[Array, Array]:
    r"""Per-sample, per-channel weighted mean and variance over the spatial axes.

    :math:`\mu = \sum w x / W`, :math:`\sigma^2 = \sum w (x-\mu)^2 / (W - \text{correction})`,
    :math:`W = \sum w`; :math:`w \equiv 1` without a mask. Returns two ``(N, C)`` arrays.
    """
    x = _f64(x)
    axes = _spatial_axes(x)
    w = np.ones_like(x) if mask is None else np.broadcast_to(_f64(mask), x.shape)
    total = w.sum(axis=axes)
    mean = (w * x).sum(axis=axes) / total
    centered = x - mean.reshape(mean.shape + (1,) * len(axes))
    var = (w * centered**2).sum(axis=axes) / (total - correction)
    return mean, var


def mean_std(
    x: Any, eps: float = 1e-5, correction: float = 0, mask: Any = None
) -> tuple[Array, Array]:
    r"""Per-sample, per-channel mean and :math:`\sqrt{\sigma^2 + \epsilon}`; ``(N, C)`` each."""
    mean, var = mean_var(x, correction, mask)
    return mean, np.sqrt(var + eps)


def _affine(y: Array, weight: Any, bias: Any) -> Array:
    if weight is not None:
        y = y * _f64(weight).reshape(_channel_shape(y))
    if bias is not None:
        y = y + _f64(bias).reshape(_channel_shape(y))
    return y


def instance_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Array:
    r"""Instance normalization (Ulyanov et al. 2016), biased variance, ``eps`` inside the root.

    :math:`y_{ncm} = \gamma_c (x_{ncm} - \mu_{nc}) / \sqrt{\sigma^2_{nc} + \epsilon} + \beta_c`.
    """
    x = _f64(x)
    mean, var = mean_var(x)
    extra = (1,) * (x.ndim - 2)
    y = (x - mean.reshape(mean.shape + extra)) / np.sqrt(var.reshape(var.shape + extra) + eps)
    return _affine(y, weight, bias)


def instance_norm_running_stats(
    x: Any, running_mean: Any, running_var: Any, momentum: float = 0.1
) -> tuple[Array, Array]:
    r"""Running statistics after one training step of ``InstanceNorm*d(track_running_stats=True)``.

    PyTorch's convention: the batch average of the per-instance mean and of the per-instance
    *unbiased* variance enters an exponential moving average,
    :math:`r \leftarrow (1 - m) r + m \cdot \operatorname{mean}_n(s_n)`.
    """
    x = _f64(x)
    mean, var = mean_var(x, correction=1)
    new_mean = (1 - momentum) * _f64(running_mean) + momentum * mean.mean(axis=0)
    new_var = (1 - momentum) * _f64(running_var) + momentum * var.mean(axis=0)
    return new_mean, new_var


def _batch_mean_var(x: Array, correction: float) -> tuple[Array, Array]:
    axes = (0, *_spatial_axes(x))
    count = x.size / x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(_channel_shape(x))) ** 2).sum(axis=axes) / (count - correction)
    return mean, var


def batch_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    running_mean: Any = None,
    running_var: Any = None,
) -> Array:
    r"""Batch normalization (Ioffe & Szegedy 2015).

    With ``running_mean``/``running_var`` given, normalizes with them (evaluation mode);
    otherwise with the biased statistics over ``(N, *spatial)`` of each channel (training mode):
    :math:`y = \gamma (x - \mu_c) / \sqrt{\sigma^2_c + \epsilon} + \beta`.
    """
    x = _f64(x)
    if running_mean is not None and running_var is not None:
        mean, var = _f64(running_mean), _f64(running_var)
    else:
        mean, var = _batch_mean_var(x, 0)
    shape = _channel_shape(x)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return _affine(y, weight, bias)


def batch_norm_running_stats(
    x: Any, running_mean: Any, running_var: Any, momentum: float = 0.1
) -> tuple[Array, Array]:
    r"""Running statistics after one training step of ``BatchNorm*d``.

    :math:`r \leftarrow (1 - m) r + m s` with the batch mean and the *unbiased* batch variance
    over ``(N, *spatial)`` (PyTorch's convention); ``momentum=1/k`` at step ``k`` gives
    ``momentum=None``'s cumulative average.
    """
    x = _f64(x)
    mean, var = _batch_mean_var(x, 1)
    new_mean = (1 - momentum) * _f64(running_mean) + momentum * mean
    new_var = (1 - momentum) * _f64(running_var) + momentum * var
    return new_mean, new_var
