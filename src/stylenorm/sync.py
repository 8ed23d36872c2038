r"""``SyncBatchNorm`` for any ``torch.distributed`` backend: gloo on CPU as well as NCCL on GPU.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so training on several CPU processes has no
synchronised batch norm. :class:`SyncBatchNorm` here normalises with the statistics of the batch
concatenated over every rank of the process group:

.. math::

    n = \sum_r n_r, \qquad \mu = \frac{1}{n}\sum_r n_r \mu_r, \qquad
    \sigma^2 = \frac{1}{n}\sum_r \left[ M_{2,r} + n_r (\mu_r - \mu)^2 \right]

(Chan et al.'s parallel combination of per-rank counts, means and sums of squared deviations
:math:`M_{2,r}`: no cancellation, and ranks with an empty batch contribute nothing). The backward
pass all-reduces :math:`\sum \partial y` and :math:`\sum \partial y\,\hat x` so each rank's input
gradient is the gradient of the *global* loss, as for one process with the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from . import stats
from .norm import _BatchNorm

__all__ = ["SyncBatchNorm"]


def _channel_view(x: Tensor, values: Tensor) -> Tensor:
    return values.reshape((1, -1) + (1,) * (x.dim() - 2))


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        momentum: float | None,
        eps: float,
        group: Any,
        world_size: int,
    ) -> Tensor:
        acc = stats.compute_dtype(x.dtype)
        channels = x.shape[1]
        local_count = x.numel() // channels
        if local_count > 0:
            mean_l, var_l = stats._channel_mean_var(x.detach(), 0.0)
        else:
            mean_l = var_l = torch.zeros(channels, dtype=acc, device=x.device)
        count_l = torch.full((channels,), float(local_count), dtype=acc, device=x.device)
        packed = torch.stack([count_l, mean_l, var_l * local_count])
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=group)
        counts, means, m2s = torch.stack(gathered).unbind(1)
        total = counts.sum(0)
        n = int(total[0].item())
        if n == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value in the "
                f"batch concatenated over the process group (input size {list(x.shape)})"
            )
        mean = (counts * means).sum(0) / total.clamp_min(1)
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        var = m2 / total.clamp_min(1)
        invstd = (var + eps).rsqrt()

        if n > 0 and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if n > 0 and (running_mean is not None or running_var is not None):
            factor = momentum if momentum is not None else 0.0
            if momentum is None and num_batches_tracked is not None:
                factor = 1.0 / float(num_batches_tracked.item())
            for buffer, value in ((running_mean, mean), (running_var, m2 / (n - 1))):
                if buffer is not None:
                    buf_acc = stats.compute_dtype(buffer.dtype)
                    buffer.copy_(torch.lerp(buffer.to(buf_acc), value.to(buf_acc), factor))

        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        out = (x.to(acc) * _channel_view(x, scale) + _channel_view(x, shift)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total = max(n, 1)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        dims = _reduce_dims(x)
        g = grad_out.to(acc)
        x_hat = (x.to(acc) - _channel_view(x, mean)) * _channel_view(x, invstd)
        if x.numel() > 0:
            sum_dy = g.sum(dims)
            sum_dy_xhat = (g * x_hat).sum(dims)
        else:
            sum_dy = sum_dy_xhat = torch.zeros_like(mean)
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            packed = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(packed, group=ctx.group)
            mean_dy, mean_dy_xhat = (packed / ctx.total).unbind(0)
            scale = invstd if weight is None else invstd * weight.to(acc)
            grad_input = (
                (g - _channel_view(x, mean_dy) - x_hat * _channel_view(x, mean_dy_xhat))
                * _channel_view(x, scale)
            ).to(x.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm synchronised over a process group, on CPU (gloo) and GPU alike.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    with :math:`\mu, \sigma^2` the biased per-channel statistics of the batch concatenated over
    all ranks of ``process_group`` (the default group when None). Same numbers and gradients as
    one :class:`stylenorm.BatchNorm2d` over that global batch; ranks may hold different batch
    sizes, including none; running statistics (and ``num_batches_tracked``) are identical on every
    rank. In evaluation, or outside an initialised process group of two or more ranks, it is
    :class:`stylenorm.BatchNorm2d`. Same constructor and ``state_dict`` as
    :class:`torch.nn.SyncBatchNorm`, and an instance of torch's ``_BatchNorm``; deliberately not a
    subclass of ``torch.nn.SyncBatchNorm``, which ``DistributedDataParallel`` refuses on CPU.

    Args:
        num_features: number of channels :math:`C`.
        eps, momentum, affine, track_running_stats, bias, device, dtype: as for BatchNorm.
        process_group: the group whose ranks share statistics (None: the default group).

    Shape:
        - Input: :math:`(N, C, *)`, at least 2D, channels_last welcome.
        - Output: same shape.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> model = SyncBatchNorm.convert_sync_batchnorm(model)   # then wrap in DDP
        >>> type(model[1]).__name__
        'SyncBatchNorm'
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        need_sync = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        # torch.nn.SyncBatchNorm's checks, in its order, on every path.
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        if not need_sync:
            return super().forward(input)
        # The kernels of the single-process path check these; the synchronised one has none,
        # and would broadcast a 1-channel input or fail after a buffer moved.
        for name in ("running_mean", "running_var", "weight", "bias"):
            vector = getattr(self, name)
            if vector is not None and vector.numel() != input.shape[1]:
                raise RuntimeError(
                    f"{name} should contain {input.shape[1]} elements not {vector.numel()}"
                )
        track = self.track_running_stats
        out: Tensor = _SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.num_batches_tracked if track else None,
            self.momentum,
            self.eps,
            group,
            dist.get_world_size(group),
        )
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every ``BatchNorm*d`` in ``module`` (torch's or stylenorm's) by this class.

        Parameters and buffers are shared, not copied (as torch's converter does); training mode
        is kept. Returns the converted module (a new object when ``module`` itself is a batch
        norm).

        Example:
            >>> net = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(4)))
            >>> isinstance(net[0], SyncBatchNorm)
            True
        """
        output = module
        if isinstance(module, _TorchBatchNorm) and not isinstance(module, cls):
            output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
            )
            if module.affine:
                output.weight = module.weight
                output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output
