r"""Functional core of stylenorm: every operation as a pure function, the math in its docstring.

The ``nn`` modules of stylenorm own parameters and buffers and call the function of the same name
here; every statistic comes from :mod:`stylenorm.stats`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import stats

__all__ = ["batch_norm", "instance_norm"]


def _check_spatial_size_for_training(input: Tensor) -> None:
    # Same condition and message as torch.nn.functional.instance_norm.
    size = list(input.shape)
    positions = 1
    for s in size[2:]:
        positions *= s
    if positions == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {size}"
        )


@torch.no_grad()
def _update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    momentum: float,
) -> None:
    """Exponential moving average ``r <- (1 - momentum) r + momentum s``, computed in float32
    (float64 for float64 buffers) and written back in the buffer's dtype."""
    for buffer, value in ((running_mean, mean), (running_var, var)):
        if buffer is None:
            continue
        acc = stats.compute_dtype(buffer.dtype)
        updated = torch.lerp(buffer.to(acc), value.to(acc), momentum)
        buffer.copy_(updated)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Instance normalization, a drop-in for :func:`torch.nn.functional.instance_norm`.

    .. math::

        y_{ncm} = \frac{x_{ncm} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}} \gamma_c + \beta_c

    with the biased per-sample, per-channel statistics of :func:`stylenorm.stats.mean_var`
    (Ulyanov et al. 2016). With ``use_input_stats=False`` the running statistics replace
    :math:`\mu, \sigma^2` (evaluation mode of a module that tracks them). With
    ``use_input_stats=True`` and running buffers given, they are updated in place as
    :math:`r \leftarrow (1 - m) r + m\,\operatorname{mean}_n(s_n)`, with the per-instance mean and
    *unbiased* variance, as torch does.

    Same arguments, numbers, gradients and errors as torch's function, except where torch is
    wrong: correct gradients for a batch of one with a channels_last incoming gradient, an empty
    batch returns an empty output and leaves running statistics untouched, and half-precision
    inputs update float32 running statistics from float32 statistics.

    Args:
        input: ``(N, C, *spatial)``.
        running_mean, running_var: optional ``(C,)`` buffers.
        weight, bias: optional ``(C,)`` affine parameters :math:`\gamma, \beta`.
        use_input_stats: normalize with the input's statistics (True) or the running ones.
        momentum: weight of the new statistics in the running average.
        eps: added to the variance inside the square root.

    Shape:
        Input ``(N, C, *spatial)``; output the same shape (and memory format).

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = instance_norm(x)
        >>> torch.allclose(y, torch.nn.functional.instance_norm(x), atol=1e-5)
        True
    """
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *spatial), got {input.dim()}D input")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(
                "Expected running_mean and running_var to be defined when use_input_stats is false"
            )
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    _check_spatial_size_for_training(input)
    n, c = input.shape[0], input.shape[1]
    if n > 0 and (running_mean is not None or running_var is not None):
        with torch.no_grad():
            mean, var = stats._mean_var(input.detach(), 1.0, None)
        _update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), momentum)
    # One group per channel is instance norm; the group-norm kernel is a single fused pass, keeps
    # channels_last, and has correct gradients where instance_norm's CPU kernel does not.
    x = input.contiguous(memory_format=stats._memory_format(input))
    return F.group_norm(x, c, weight, bias, eps) if c > 0 else input.clone()


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch normalization, a drop-in for :func:`torch.nn.functional.batch_norm`.

    .. math::

        y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} \gamma_c + \beta_c

    where in training :math:`\mu_c, \sigma^2_c` are the biased statistics of channel :math:`c`
    over ``(N, *spatial)`` (Ioffe & Szegedy 2015) and the running buffers, when given, are updated
    with the mean and the *unbiased* variance; in evaluation the running statistics are used.

    Same numbers and errors as torch's function (which it calls), except: an empty batch
    returns an empty output and leaves the running statistics untouched, and half-precision input
    updates float32 running statistics from float32 statistics instead of half-precision ones.

    Args:
        input: ``(N, C)`` or ``(N, C, *spatial)``.
        running_mean, running_var: ``(C,)`` buffers or None.
        weight, bias: optional ``(C,)`` affine parameters.
        training: use (and track) the batch statistics.
        momentum: weight of the new statistics in the running average.
        eps: added to the variance inside the square root.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = batch_norm(x, None, None, training=True)
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True))
        True
    """
    tracks = running_mean is not None or running_var is not None
    if training and input.dim() >= 2 and input.shape[0] == 0:
        # torch would fill nothing but still count the step; an empty batch carries no statistics.
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    if training and tracks and input.dtype in (torch.float16, torch.bfloat16):
        buffer = running_mean if running_mean is not None else running_var
        assert buffer is not None
        if buffer.dtype not in (torch.float16, torch.bfloat16):
            out = F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
            with torch.no_grad():
                # Channel statistics over (N, *spatial): view channels as the only "channel" axis.
                per_channel = input.detach().transpose(0, 1).unsqueeze(0)
                mean, var = stats._mean_var(per_channel, 1.0, None)
            _update_running_stats(running_mean, running_var, mean[0], var[0], momentum)
            return out
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
