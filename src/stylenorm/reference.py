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
    "adain",
    "adain_lua_style_loss",
    "adain_pytorch_style_loss",
    "adain_regions",
    "batch_norm",
    "batch_norm_running_stats",
    "conditional_instance_norm",
    "gatys2015_style_loss",
    "gram_loss",
    "gram_matrix",
    "instance_norm",
    "instance_norm_running_stats",
    "li2017_bn_style_loss",
    "magenta_style_loss",
    "mean_std",
    "mean_std_loss",
    "mean_var",
    "mmd_loss",
    "pystiche_gram_loss",
    "pytorch_examples_style_loss",
    "style_adain",
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
    :math:`W = \sum w`; :math:`w \equiv 1` without a mask.

    Shape:
        - x: ``(N, C, *spatial)``; mask: broadcastable to ``x``, e.g. ``(N or 1, 1, *spatial)``
        - output: two ``(N, C)`` arrays, the mean and the variance

    Example:
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
        >>> mean, var = mean_var(x, correction=1)
        >>> mean.shape, bool(np.allclose(var, x.var(axis=(2, 3), ddof=1)))
        ((2, 3), True)
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
    r"""Per-sample, per-channel mean and :math:`\sqrt{\sigma^2 + \epsilon}` (see :func:`mean_var`).

    Shape:
        - x: ``(N, C, *spatial)``; mask: broadcastable to ``x``, e.g. ``(N or 1, 1, *spatial)``
        - output: two ``(N, C)`` arrays, the mean and the standard deviation

    Example:
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
        >>> mean, std = mean_std(x)
        >>> bool(np.allclose(std, np.sqrt(x.var(axis=(2, 3)) + 1e-5)))
        True
    """
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

    Shape:
        - x: ``(N, C, *spatial)``; weight, bias: optional ``(C,)``
        - output: ``(N, C, *spatial)``

    Example:
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
        >>> y = instance_norm(x, weight=[1.0, 2.0, 3.0], bias=[0.0, 1.0, 2.0])
        >>> bool(np.allclose(y.mean(axis=(2, 3)), [0.0, 1.0, 2.0]))
        True
        >>> y.std(axis=(2, 3)).round(3).tolist()
        [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
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

    Shape:
        - x: ``(N, C, *spatial)``; running_mean, running_var: ``(C,)``
        - output: two ``(C,)`` arrays, the new running mean and running variance

    Example:
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
        >>> mean, var = instance_norm_running_stats(x, np.zeros(3), np.ones(3), momentum=0.5)
        >>> bool(np.allclose(var, 0.5 + 0.5 * x.var(axis=(2, 3), ddof=1).mean(axis=0)))
        True
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

    Shape:
        - x: ``(N, C, *spatial)``; weight, bias, running_mean, running_var: optional ``(C,)``
        - output: ``(N, C, *spatial)``

    Example:
        >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4))
        >>> batch_norm(x).std(axis=(0, 2, 3)).round(3).tolist()  # training mode: batch statistics
        [1.0, 1.0, 1.0]
        >>> y = batch_norm(x, eps=0, running_mean=[1.0] * 3, running_var=[4.0] * 3)  # evaluation
        >>> bool(np.allclose(y, (x - 1) / 2))
        True
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

    Shape:
        - x: ``(N, C, *spatial)``; running_mean, running_var: ``(C,)``
        - output: two ``(C,)`` arrays, the new running mean and running variance

    Example:
        >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4))
        >>> mean, var = batch_norm_running_stats(x, np.zeros(3), np.ones(3), momentum=0.1)
        >>> bool(np.allclose(var, 0.9 + 0.1 * x.var(axis=(0, 2, 3), ddof=1)))
        True
    """
    x = _f64(x)
    mean, var = _batch_mean_var(x, 1)
    new_mean = (1 - momentum) * _f64(running_mean) + momentum * mean
    new_var = (1 - momentum) * _f64(running_var) + momentum * var
    return new_mean, new_var


# ==============================================================================================
# Style layers
# ==============================================================================================


def _as_map(stat: Any, ndim: int) -> Array:
    """A ``(C,)``, ``(N, C)`` or ``(N, C, *spatial)`` statistic, broadcastable to the features."""
    stat = _f64(stat)
    if stat.ndim == 1:
        stat = stat[None]
    return np.reshape(stat, stat.shape + (1,) * (ndim - stat.ndim))


def _per_sample(value: Any, ndim: int) -> Array:
    """A number or an ``(N,)`` vector, broadcastable over ``(N, C, *spatial)``."""
    return np.reshape(_f64(value), (-1,) + (1,) * (ndim - 1))


def conditional_instance_norm(
    x: Any, style: Any, weight: Any, bias: Any = None, eps: float = 1e-5
) -> Array:
    r"""Conditional instance norm: :math:`y = \gamma_s (x - \mu) / \sqrt{\sigma^2 + \epsilon} +
    \beta_s`, the style an int, one id per sample, or mixing weights :math:`\gamma = w \Gamma`.

    Shape:
        - x: ``(N, C, *spatial)``; weight, bias: ``(S, C)`` for ``S`` styles (bias optional)
        - style: an int, ``(N,)`` ints, or float mixing weights ``(S,)`` or ``(N, S)``
        - output: ``(N, C, *spatial)``

    Example:
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
        >>> weight, bias = np.arange(1.0, 7.0).reshape(2, 3), np.zeros((2, 3))
        >>> y = conditional_instance_norm(x, [0.5, 0.5], weight, bias)
        >>> bool(np.allclose(y, instance_norm(x, weight.mean(axis=0))))
        True
    """
    x, weight = _f64(x), _f64(weight)
    bias = np.zeros_like(weight) if bias is None else _f64(bias)
    style = np.asarray(style)
    if np.issubdtype(style.dtype, np.floating):  # interpolation weights (N, S) or (S,)
        gamma, beta = style @ weight, style @ bias
    else:  # one id, or one id per sample
        gamma, beta = weight[style], bias[style]
    gamma = np.broadcast_to(gamma, (x.shape[0], x.shape[1]))
    beta = np.broadcast_to(beta, (x.shape[0], x.shape[1]))
    return _as_map(gamma, x.ndim) * instance_norm(x, eps=eps) + _as_map(beta, x.ndim)


def adain(
    content: Any,
    style: Any = None,
    style_mean: Any = None,
    style_std: Any = None,
    alpha: Any = 1.0,
    content_mask: Any = None,
    style_mask: Any = None,
    style_weights: Any = None,
    eps: float = 1e-5,
    correction: float = 0,
) -> Array:
    r"""AdaIN: :math:`y = \sigma_s (x - \mu_c) / \sigma_c + \mu_s`, then
    :math:`m (\alpha y + (1 - \alpha) x) + (1 - m) x`.

    With ``style_weights`` (N, K) or (K,), ``style`` (or ``style_mean``/``style_std``) is a list of
    K entries (``style_mask`` a list of K masks or None) and the statistics are mixed:
    :math:`\mu_s = \sum_k w_k \mu_k`, :math:`\sigma_s = \sum_k w_k \sigma_k`.

    Shape:
        - content: ``(N, C, *spatial)``; style: ``(1 or N, C, *spatial_s)``
        - style_mean, style_std: ``(C,)`` or ``(N, C)``; alpha: a number or ``(N,)``
        - content_mask, style_mask: broadcastable to content, style, e.g. ``(N, 1, *spatial)``
        - output: ``(N, C, *spatial)``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, s = rng.normal(size=(2, 3, 4, 4)), rng.normal(2.0, 3.0, size=(2, 3, 8, 8))
        >>> bool(np.allclose(adain(x, s, alpha=0.0), x))
        True
        >>> bool(np.allclose(mean_std(adain(x, s)), mean_std(s), rtol=1e-4))
        True
    """
    x = _f64(content)
    if style_weights is None:
        if style is not None:
            style_mean, style_std = mean_std(style, eps, correction, style_mask)
        mu_s, sigma_s = _as_map(style_mean, x.ndim), _as_map(style_std, x.ndim)
    else:
        w = np.atleast_2d(_f64(style_weights))
        if style is not None:
            masks = [None] * len(style) if style_mask is None else style_mask
            pairs = [mean_std(s, eps, correction, m) for s, m in zip(style, masks, strict=True)]
            style_mean, style_std = [p[0] for p in pairs], [p[1] for p in pairs]
        mu_s, sigma_s = np.zeros(()), np.zeros(())
        for k in range(w.shape[1]):
            mu_s = mu_s + _per_sample(w[:, k], x.ndim) * _as_map(style_mean[k], x.ndim)
            sigma_s = sigma_s + _per_sample(w[:, k], x.ndim) * _as_map(style_std[k], x.ndim)
    mu_c, sigma_c = mean_std(x, eps, correction, content_mask)
    y = sigma_s * (x - _as_map(mu_c, x.ndim)) / _as_map(sigma_c, x.ndim) + mu_s
    a = _per_sample(alpha, x.ndim)
    z = a * y + (1 - a) * x
    m = 1.0 if content_mask is None else _f64(content_mask)
    return np.asarray(m * z + (1 - m) * x, dtype=np.float64)


def adain_regions(
    content: Any, regions: Any, alpha: float = 1.0, eps: float = 1e-5, correction: float = 0
) -> Array:
    r"""Spatial control: :math:`x + \sum_r m_r (z_r - x)` with :math:`z_r` the AdaIN output of
    region ``(style, content_mask[, style_mask])`` (statistics measured under its masks).

    Shape:
        - content: ``(N, C, *spatial)``; output: ``(N, C, *spatial)``
        - regions: ``(style, content_mask[, style_mask])`` tuples; style
          ``(1 or N, C, *spatial_s)``, masks broadcastable to content and style, e.g.
          ``(N, 1, *spatial)``

    Example:
        >>> x, s = np.random.default_rng(0).normal(size=(2, 1, 3, 4, 4))
        >>> y = adain_regions(x, [(s, np.arange(4) < 2)])  # AdaIN on columns 0, 1; the rest kept
        >>> bool(np.allclose(y[..., :2].mean(axis=(2, 3)), s.mean(axis=(2, 3))))
        True
        >>> np.array_equal(y[..., 2:], x[..., 2:])
        True
    """
    x = _f64(content)
    out = x.copy()
    for region in regions:
        style, mask = region[0], region[1]
        style_mask = region[2] if len(region) > 2 else None
        z = adain(
            x,
            style,
            alpha=alpha,
            style_mask=style_mask,
            eps=eps,
            correction=correction,
            content_mask=mask,
        )  # = m z_r + (1 - m) x
        out += z - x
    return out


def style_adain(x: Any, w: Any, weight: Any, bias: Any, eps: float = 1e-5) -> Array:
    r"""StyleGAN's AdaIN (Karras et al. 2019, eq. 1): :math:`[\gamma, \beta] = w A^T + b`,
    :math:`y = \gamma \operatorname{IN}(x) + \beta`.

    Shape:
        - x: ``(N, C, *spatial)``; w: ``(N, D)`` latents; weight: ``(2C, D)``; bias: ``(2C,)``
        - output: ``(N, C, *spatial)``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, w, a = rng.normal(size=(2, 3, 16)), rng.normal(size=(2, 5)), rng.normal(size=(6, 5))
        >>> y = style_adain(x, w, a, np.zeros(6))  # beta = (w A^T)[:, C:] is the output's mean
        >>> bool(np.allclose(y.mean(axis=2), (w @ a.T)[:, 3:]))
        True
    """
    x = _f64(x)
    styles = _f64(w) @ _f64(weight).T + _f64(bias)
    c = x.shape[1]
    gamma, beta = styles[:, :c], styles[:, c:]
    return _as_map(gamma, x.ndim) * instance_norm(x, eps=eps) + _as_map(beta, x.ndim)


# ==============================================================================================
# Style losses and the published conventions
# ==============================================================================================


def _flat(x: Any) -> Array:
    """``(N, C, *spatial)`` -> ``(N, C, M)`` float64."""
    arr = np.asarray(x, dtype=np.float64)
    return np.asarray(arr.reshape(arr.shape[0], arr.shape[1], -1))


def _position_weights(mask: Any, x: Array, batch: int | None = None) -> Array:
    """``(batch, M)`` position weights of a ``(N or 1, 1, *spatial)`` mask for ``x``
    ``(N, C, *spatial)``, its dimensions of size 1 broadcast (ones without a mask); ``batch``
    defaults to ``N``."""
    batch = x.shape[0] if batch is None else batch
    positions = int(np.prod(x.shape[2:]))
    if mask is None:
        return np.ones((batch, positions))
    w = np.asarray(mask, dtype=np.float64)
    w = np.broadcast_to(w, (w.shape[0], 1, *x.shape[2:])).reshape(w.shape[0], positions)
    return np.asarray(np.broadcast_to(w, (batch, positions)))


def _reduce(per_element: Array, reduction: str) -> Array:
    if reduction == "mean":
        return np.asarray(per_element.mean())
    if reduction == "sum":
        return np.asarray(per_element.sum())
    if reduction == "batchmean":
        return np.asarray(per_element.sum() / per_element.shape[0])
    if reduction == "none":
        return np.asarray(per_element.reshape(per_element.shape[0], -1).mean(axis=1))
    raise ValueError(f"unknown reduction {reduction!r}")


def gram_matrix(x: Any, normalize: str = "chw", mask: Any = None, center: bool = False) -> Array:
    r""":math:`G = F \operatorname{diag}(w) F^\top / Z`, :math:`Z \in \{1, W, C W\}`; ``(N, C, C)``.

    ``W`` is the total position weight (``M`` without a mask); ``center`` first removes the
    weighted channel means.

    Shape:
        - x: ``(N, C, *spatial)``; mask: ``(N or 1, 1, *spatial)``
        - output: ``(N, C, C)``

    Example:
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
        >>> g = gram_matrix(x, "chw")
        >>> g.shape, bool(np.allclose(g, np.einsum("nchw,ndhw->ncd", x, x) / (3 * 4 * 5)))
        ((2, 3, 3), True)
    """
    x_arr = np.asarray(x, dtype=np.float64)
    f = _flat(x_arr)
    w = _position_weights(mask, x_arr)
    if center:
        mean, _ = mean_var(x_arr, 0, None if mask is None else np.asarray(mask, dtype=np.float64))
        f = f - mean[:, :, None]
    gram = np.einsum("ncm,ndm,nm->ncd", f, f, w)
    total = w.sum(axis=1)[:, None, None]
    divisor = {"none": np.ones_like(total), "hw": total, "chw": f.shape[1] * total}[normalize]
    return np.asarray(gram / divisor)


def gram_loss(
    input: Any,
    target: Any,
    normalize: str = "chw",
    reduction: str = "mean",
    mask: Any = None,
    target_mask: Any = None,
    center: bool = False,
) -> Array:
    r"""Squared error of Gram matrices, the target's broadcast over the batch when it has one.

    :math:`\operatorname{reduce}\big((G(x) - G(y))^2\big)` with :math:`G` :func:`gram_matrix`;
    ``reduction`` ``"mean"`` (over N·C·C), ``"sum"``, ``"batchmean"`` (sum / N) or ``"none"``
    (the mean over C·C per sample).

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - mask, target_mask: ``(N or 1, 1, *spatial)``, ``(1 or N, 1, *spatial_t)``
        - output: ``()``, or ``(N,)`` for ``reduction="none"``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(1, 3, 8, 8))
        >>> d = gram_matrix(x, "hw") - gram_matrix(y, "hw")
        >>> float(gram_loss(x, x)), bool(np.isclose(gram_loss(x, y, "hw", "sum"), (d**2).sum()))
        (0.0, True)
    """
    g_x = gram_matrix(input, normalize, mask, center)
    g_y = gram_matrix(target, normalize, target_mask, center)
    return _reduce((g_x - g_y) ** 2, reduction)


def mean_std_loss(
    input: Any,
    target: Any,
    eps: float = 1e-5,
    target_eps: float | None = None,
    correction: float = 0,
    reduction: str = "mean",
    mask: Any = None,
    target_mask: Any = None,
) -> Array:
    r""":math:`(\mu_x - \mu_y)^2 + (\sigma_x - \sigma_y)^2` per (sample, channel), then reduced;
    :math:`\sigma = \sqrt{\mathrm{var} + \epsilon}` (``target_eps`` for the target, default
    ``eps``).

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - mask, target_mask: broadcastable to input, target, e.g. ``(N, 1, *spatial)``
        - output: ``()``, or ``(N,)`` for ``reduction="none"``

    Example:
        >>> x, y = np.random.default_rng(0).normal(size=(2, 2, 3, 4, 4))
        >>> (mx, sx), (my, sy) = mean_std(x), mean_std(y)
        >>> float(mean_std_loss(x, x))
        0.0
        >>> bool(np.isclose(mean_std_loss(x, y), ((mx - my) ** 2 + (sx - sy) ** 2).mean()))
        True
    """
    target_eps = eps if target_eps is None else target_eps
    mu_x, var_x = mean_var(input, correction, mask)
    mu_y, var_y = mean_var(target, correction, target_mask)
    sigma_x, sigma_y = np.sqrt(var_x + eps), np.sqrt(var_y + target_eps)
    return _reduce((mu_x - mu_y) ** 2 + (sigma_x - sigma_y) ** 2, reduction)


def _kernel(a: Array, b: Array, kernel: str, degree: int, offset: float, sigma: float) -> Array:
    """Kernel matrix between the rows of ``a`` ``(Ma, C)`` and of ``b`` ``(Mb, C)``."""
    if kernel == "linear":
        return np.asarray(a @ b.T)
    if kernel == "polynomial":
        return np.asarray((a @ b.T + offset) ** degree)
    squared_distance = ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1)
    return np.asarray(np.exp(-squared_distance / (2 * sigma**2)))


def mmd_loss(
    input: Any,
    target: Any,
    kernel: str = "polynomial",
    degree: int = 2,
    offset: float = 0.0,
    sigma: float = 1.0,
    reduction: str = "mean",
    mask: Any = None,
    target_mask: Any = None,
) -> Array:
    r"""Biased squared MMD per sample (Li et al. 2017) between the per-position feature vectors,
    :math:`p^\top K_{xx} p + q^\top K_{yy} q - 2 p^\top K_{xy} q` with :math:`p = w / \sum w`.

    Kernels: ``"linear"`` :math:`a^\top b`, ``"polynomial"`` :math:`(a^\top b + c)^d`, otherwise
    Gaussian :math:`\exp(-\lVert a - b \rVert^2 / 2\sigma^2)`.

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - mask, target_mask: ``(N or 1, 1, *spatial)``, ``(1 or N, 1, *spatial_t)``
        - output: ``()``, or ``(N,)`` for ``reduction="none"``

    Example:
        With the default kernel :math:`(a^\top b)^2` the MMD is the squared Frobenius distance of
        the ``"hw"`` Gram matrices (Li et al.'s identity):

        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
        >>> mmd = mmd_loss(x, y, reduction="none")
        >>> bool(np.allclose(mmd, 3**2 * gram_loss(x, y, "hw", reduction="none")))
        True
    """
    x_arr, y_arr = _f64(input), _f64(target)
    fx, fy = _flat(x_arr), _flat(y_arr)
    fy = np.broadcast_to(fy, (fx.shape[0], *fy.shape[1:]))
    wx = _position_weights(mask, x_arr)
    wy = _position_weights(target_mask, y_arr, fx.shape[0])
    values = []
    for n in range(fx.shape[0]):
        x, y = fx[n].T, fy[n].T  # (M, C): one feature vector per position
        p, q = wx[n] / wx[n].sum(), wy[n] / wy[n].sum()
        k_xx = _kernel(x, x, kernel, degree, offset, sigma)
        k_yy = _kernel(y, y, kernel, degree, offset, sigma)
        k_xy = _kernel(x, y, kernel, degree, offset, sigma)
        values.append(p @ k_xx @ p + q @ k_yy @ q - 2 * p @ k_xy @ q)
    per_sample = np.array(values)
    return per_sample if reduction == "none" else _reduce(per_sample, reduction)


# --------------------------------------------------------------------------------------------
# Published conventions, each in its source's own terms (one layer; sum layers yourself)
# --------------------------------------------------------------------------------------------


def gatys2015_style_loss(input: Any, target: Any) -> Array:
    r"""Gatys et al. 2015, eq. 4: :math:`E = \frac{1}{4 N_l^2 M_l^2} \sum_{ij} (G_{ij} - A_{ij})^2`
    with unnormalized Grams, :math:`N_l` channels, :math:`M_l` positions; averaged over the batch
    (the paper has one image). The paper's input and style image have the same size; where they
    differ, each Gram is divided by its own number of positions,
    :math:`\frac{1}{4 N_l^2} \sum_{ij} (G_{ij} / M_x - A_{ij} / M_y)^2` (otherwise the Grams'
    scales differ by the ratio of the sizes).

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - output: ``()``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(1.0, 2.0, size=(1, 3, 8, 8))
        >>> bool(np.isclose(gatys2015_style_loss(x, y), gram_loss(x, y, "hw") / 4))
        True
    """
    fx, fy = _flat(input), _flat(target)
    channels = fx.shape[1]
    losses = []
    for n in range(fx.shape[0]):
        g = fx[n] @ fx[n].T / fx.shape[2]
        a = fy[n % fy.shape[0]] @ fy[n % fy.shape[0]].T / fy.shape[2]
        losses.append(((g - a) ** 2).sum() / (4 * channels**2))
    return np.asarray(np.mean(losses))


def pytorch_examples_style_loss(input: Any, target: Any) -> Array:
    r"""pytorch/examples fast_neural_style: ``gram = F F^T / (C H W)`` per sample, then
    ``mse_loss`` (mean over N·C·C) against the style Gram repeated over the batch.

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - output: ``()``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(1.0, 2.0, size=(1, 3, 8, 8))
        >>> bool(np.isclose(pytorch_examples_style_loss(x, y), gram_loss(x, y, "chw")))
        True
    """
    fx, fy = _flat(input), _flat(target)
    g_x = fx @ fx.transpose(0, 2, 1) / (fx.shape[1] * fx.shape[2])
    g_y = fy @ fy.transpose(0, 2, 1) / (fy.shape[1] * fy.shape[2])
    return np.asarray(((g_x - np.broadcast_to(g_y, g_x.shape)) ** 2).mean())


def magenta_style_loss(input: Any, target: Any) -> Array:
    r"""Magenta image_stylization ``learning.py``: ``gram = F^T F / (H W)``, then the mean of the
    squared difference over ``[1, 2]`` (C·C, per sample), then the mean over the batch.

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - output: ``()``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(1.0, 2.0, size=(1, 3, 8, 8))
        >>> bool(np.isclose(magenta_style_loss(x, y), gram_loss(x, y, "hw")))
        True
    """
    fx, fy = _flat(input), _flat(target)
    g_x = np.einsum("ncm,ndm->ncd", fx, fx) / fx.shape[2]
    g_y = np.einsum("ncm,ndm->ncd", fy, fy) / fy.shape[2]
    per_sample = ((g_x - g_y) ** 2).mean(axis=(1, 2))
    return np.asarray(per_sample.mean())


def pystiche_gram_loss(input: Any, target: Any, score_weight: float = 1.0) -> Array:
    r"""pystiche ``GramLoss`` defaults: ``gram_matrix(x, normalize=True)`` divides ``F F^T`` by
    the number of positions; ``mse_loss`` (mean) times ``score_weight`` (1).

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - output: ``()``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(1.0, 2.0, size=(1, 3, 8, 8))
        >>> bool(np.isclose(pystiche_gram_loss(x, y, 2.0), 2 * gram_loss(x, y, "hw")))
        True
    """
    fx, fy = _flat(input), _flat(target)
    g_x = np.matmul(fx, fx.transpose(0, 2, 1)) / fx.shape[-1]
    g_y = np.matmul(fy, fy.transpose(0, 2, 1)) / fy.shape[-1]
    return np.asarray(score_weight * np.mean((g_x - np.broadcast_to(g_y, g_x.shape)) ** 2))


def adain_lua_style_loss(input: Any, target: Any) -> Array:
    r"""xunhuang1995/AdaIN-style ``lib/StyleINLossModule.lua`` as trained (on CUDA): input std
    ``nn.Sqrt(1e-6)`` of the biased variance, i.e. :math:`\sqrt{\mathrm{var} + 10^{-6}}`; style
    std ``torch.std(y, 3, true)`` (biased, no eps); ``MSECriterion`` with ``sizeAverage=false``
    (a sum over N·C) for the means and for the stds, each divided by N.

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - output: ``()``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(1.0, 2.0, size=(1, 3, 8, 8))
        >>> lua = mean_std_loss(x, y, eps=1e-6, target_eps=0, reduction="batchmean")
        >>> bool(np.isclose(adain_lua_style_loss(x, y), lua))
        True
    """
    fx, fy = _flat(input), _flat(target)
    mu_x, mu_y = fx.mean(axis=2), fy.mean(axis=2)
    std_x = np.sqrt(((fx - mu_x[:, :, None]) ** 2).mean(axis=2) + 1e-6)
    std_y = np.sqrt(((fy - mu_y[:, :, None]) ** 2).mean(axis=2))
    batch = fx.shape[0]
    mean_loss = ((mu_x - mu_y) ** 2).sum() / batch
    std_loss = ((std_x - std_y) ** 2).sum() / batch
    return np.asarray(mean_loss + std_loss)


def adain_pytorch_style_loss(input: Any, target: Any) -> Array:
    r"""naoto0804/pytorch-AdaIN ``calc_mean_std``: ``sqrt(var(dim=2) + 1e-5)`` with torch's default
    unbiased variance, on both sides; ``MSELoss()`` (mean over N·C) of means plus of stds.

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - output: ``()``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(1.0, 2.0, size=(1, 3, 8, 8))
        >>> bool(np.isclose(adain_pytorch_style_loss(x, y), mean_std_loss(x, y, correction=1)))
        True
    """
    fx, fy = _flat(input), _flat(target)
    std_x = np.sqrt(fx.var(axis=2, ddof=1) + 1e-5)
    std_y = np.sqrt(fy.var(axis=2, ddof=1) + 1e-5)
    mu_x, mu_y = fx.mean(axis=2), fy.mean(axis=2)
    mu_y, std_y = np.broadcast_to(mu_y, mu_x.shape), np.broadcast_to(std_y, std_x.shape)
    return np.asarray(((mu_x - mu_y) ** 2).mean() + ((std_x - std_y) ** 2).mean())


def li2017_bn_style_loss(input: Any, target: Any) -> Array:
    r"""Li et al. 2017 (Demystifying NST), BN-statistics loss:
    :math:`\frac{1}{N_l}\sum_i (\mu^i_x - \mu^i_y)^2 + (\sigma^i_x - \sigma^i_y)^2` over the
    :math:`N_l` channels, biased :math:`\sigma`, no eps; averaged over the batch.

    Shape:
        - input: ``(N, C, *spatial)``; target: ``(1 or N, C, *spatial_t)``
        - output: ``()``

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 3, 4, 4)), rng.normal(1.0, 2.0, size=(1, 3, 8, 8))
        >>> bool(np.isclose(li2017_bn_style_loss(x, y), mean_std_loss(x, y, eps=0)))
        True
    """
    fx, fy = _flat(input), _flat(target)
    per_sample = []
    for n in range(fx.shape[0]):
        x, y = fx[n], fy[n % fy.shape[0]]
        d_mean = (x.mean(axis=1) - y.mean(axis=1)) ** 2
        d_std = (x.std(axis=1) - y.std(axis=1)) ** 2
        per_sample.append((d_mean + d_std).sum() / x.shape[0])
    return np.asarray(np.mean(per_sample))
