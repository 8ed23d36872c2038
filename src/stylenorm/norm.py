r"""Drop-in ``BatchNorm1d/2d/3d`` and ``InstanceNorm1d/2d/3d``.

Each class subclasses torch's class of the same name, so the constructor, parameters, buffers,
``state_dict``, ``extra_repr``, errors and warnings are torch's own, and every
``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` / ``_NormBase`` / ``InstanceNorm2d`` check
in user or library code (``convert_sync_batchnorm``, weight-decay filters, freezing helpers) still
holds. Only the computation is replaced, by :mod:`stylenorm.functional`:

- instance norm runs as one fused group-norm pass (several times faster on CPU), with correct
  gradients for a batch of one whose incoming gradient is channels_last (torch 2.13's CPU kernel
  returns wrong ones); channels_last input keeps its layout, and on the CPU from 2^18 values
  and 16 channels up (2^17 with a gradient), or without a gradient from 64 (sample, channel)
  pairs of 16 channels, is normalized on that layout without transposing copies;
- batch norm in training on contiguous float32/float64 CPU input of at least 2^19 values and 64
  spatial positions per sample takes stylenorm's statistics and torch's evaluation kernel and
  training backward (faster, the same numbers to float32 rounding); every other case calls
  torch's kernel;
- an empty batch returns an empty output and leaves every running statistic, and
  ``num_batches_tracked``, untouched (torch's ``InstanceNorm`` raises ``IndexError`` or writes NaN
  into its running statistics; torch's ``BatchNorm`` counts the empty step, which skews
  ``momentum=None``'s cumulative average);
- half-precision input updates float32 running statistics from float32 statistics;
- ``torch.compile(fullgraph=True)`` and ``torch.export`` trace every mode, including
  BatchNorm's cumulative average (``momentum=None``) in training, which torch's class cannot
  (it reads ``float(num_batches_tracked)``, a data-dependent guard): here the factor
  :math:`1/n` stays a tensor.

``torch.jit.script`` works on every drop-in, so they replace scripted torch.nn norms; a scripted
module computes with torch's kernels (``F.batch_norm``, ``F.instance_norm``: torch's numbers and
its quirks above, except that an empty batch still leaves BatchNorm's running statistics and
count untouched), since TorchScript cannot compile :mod:`stylenorm.functional`. So does a module
traced by ``torch.jit.trace``, whose graph cannot follow our value-dependent routes. Under
``torch.fx.symbolic_trace`` the drop-ins are leaf modules, as torch.nn's are.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.jit import is_tracing as _is_tracing  # type: ignore[attr-defined]
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from . import functional

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]


@torch.jit.unused
def _fx_leaf(module: nn.Module, input: Tensor) -> Tensor | None:
    """Under ``torch.fx.symbolic_trace``, a ``call_module`` node for ``module`` (None otherwise).

    fx traces through every module outside ``torch.nn`` and stops at value-dependent control
    flow, which ours have (the input checks, the choice of route), where torch.nn's classes are
    leaves. So a drop-in called on a proxy records itself as a leaf, as torch.nn's do: the
    traced graph calls the module, which computes as in eager mode. (A drop-in traced as the
    root fails as torch.nn's does, on its input checks.)
    """
    if not isinstance(input, torch.fx.Proxy):
        return None
    tracer = input.tracer
    if getattr(tracer, "root", None) is module:
        return None
    proxy: Tensor = tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})
    return proxy


class _InstanceNorm(_TorchInstanceNorm):
    """Shared behaviour of the drop-in instance norms: torch's module, stylenorm's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        """torch's checks, messages and unbatched handling, then our kernel; a leaf under fx."""
        if not torch.jit.is_scripting():  # type: ignore[attr-defined]
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)  # type: ignore[no-untyped-call]
        no_batch_dim: int = self._get_no_batch_dim()  # type: ignore[no-untyped-call]
        channel_dim = input.dim() - no_batch_dim
        channels = input.size(channel_dim)
        if channels != self.num_features:
            # torch's rule and words: an error with affine parameters, else a warning.
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={channel_dim} to match num_features"
                    f" ({self.num_features}), but got: {channels}."
                )
            warnings.warn(
                f"input's size at dim={channel_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == no_batch_dim:
            unbatched: Tensor = self._handle_no_batch_input(input)  # type: ignore[no-untyped-call]
            return unbatched
        return self._apply_instance_norm(input)

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        use_input_stats = self.training or not self.track_running_stats
        momentum = self.momentum if self.momentum is not None else 0.0
        tracing = _is_tracing()  # type: ignore[no-untyped-call]
        if torch.jit.is_scripting() or tracing:  # type: ignore[attr-defined]
            # TorchScript cannot compile stylenorm.functional: a scripted module computes with
            # torch's kernel (same numbers, torch's quirks; see the class docs). So does one
            # traced by torch.jit.trace, whose graph must not depend on the data's values (our
            # routes read them) nor hold out= ops (not differentiable when replayed).
            return F.instance_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                use_input_stats,
                momentum,
                self.eps,
            )
        return self._stylenorm_instance_norm(input, use_input_stats, momentum)

    @torch.jit.unused
    def _stylenorm_instance_norm(
        self, input: Tensor, use_input_stats: bool, momentum: float
    ) -> Tensor:
        return functional.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            momentum,
            self.eps,
        )


class _BatchNorm(_TorchBatchNorm):
    """Shared behaviour of the drop-in batch norms: torch's module, stylenorm's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # type: ignore[attr-defined]
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)  # type: ignore[no-untyped-call]
        # An empty batch is not a step (see functional.batch_norm): nothing is counted or updated.
        step = self.training and self.track_running_stats and input.numel() > 0
        if step:
            if self.num_batches_tracked is not None:  # nested: TorchScript skips it when None
                self.num_batches_tracked.add_(1)
        # Batch statistics in training, and in evaluation when no running statistics exist.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed when they are read (evaluation) or updated (tracked training).
        pass_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        tracing = _is_tracing()  # type: ignore[no-untyped-call]
        if torch.jit.is_scripting() or tracing:  # type: ignore[attr-defined]
            # TorchScript cannot compile stylenorm.functional: torch's kernel, torch's update.
            # torch.jit.trace takes it too (see _InstanceNorm._apply_instance_norm).
            momentum = 0.0 if self.momentum is None else self.momentum
            if step and self.momentum is None:
                if self.num_batches_tracked is not None:
                    momentum = 1.0 / float(self.num_batches_tracked)
            if self.training and input.numel() == 0:
                running_mean, running_var = None, None
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                use_batch_stats,
                momentum,
                self.eps,
            )
        if step and self.momentum is None and self.num_batches_tracked is not None:
            return self._cumulative_average_step(input)
        return self._stylenorm_batch_norm(input, running_mean, running_var, use_batch_stats)

    @torch.jit.unused
    def _stylenorm_batch_norm(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        use_batch_stats: bool,
    ) -> Tensor:
        return functional.batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )

    @torch.jit.unused
    def _cumulative_average_step(self, input: Tensor) -> Tensor:
        r"""A training step with ``momentum=None``: the running statistics become the cumulative
        average of the ``n = num_batches_tracked`` batches seen, :math:`r \leftarrow r + (s - r)
        / n`.

        The factor :math:`1/n` stays a tensor. torch's class reads ``float(num_batches_tracked)``,
        a host read that ``torch.compile(fullgraph=True)`` and ``torch.export`` refuse as a
        data-dependent guard; here the whole step is tensor operations, so it traces.
        """
        running_mean, running_var = self.running_mean, self.running_var
        assert self.num_batches_tracked is not None
        # The kernel writes the batch mean and unbiased variance into scratch buffers (momentum 1
        # replaces them outright); the output is the same as with the real buffers.
        batch_mean = None if running_mean is None else torch.zeros_like(running_mean)
        batch_var = None if running_var is None else torch.zeros_like(running_var)
        out = functional.batch_norm(
            input, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps
        )
        factor = self.num_batches_tracked.to(torch.float64).reciprocal()
        with torch.no_grad():
            for buffer, value in ((running_mean, batch_mean), (running_var, batch_var)):
                if buffer is not None and value is not None:
                    functional._lerp_into(buffer, value, factor)
        return out


_IN_DOC = r"""Drop-in for :class:`torch.nn.{name}`: instance normalization over a {rank_in} input.

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta

    with the mean and biased variance taken per sample and channel over the spatial dimensions
    (Ulyanov et al. 2016). Same constructor, parameters, buffers, ``state_dict``, numbers and
    errors as torch's class (it *is* a subclass of it), with torch's quirks kept: the running
    variance is the unbiased one, ``num_batches_tracked`` never increments, ``momentum=None``
    leaves the running statistics unchanged, and a channel-count mismatch only warns when
    ``affine=False``. Computed by :func:`stylenorm.functional.instance_norm`: faster, and right
    where torch 2.13 is wrong (see the module docs).

    Args:
        num_features: number of channels :math:`C`.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: weight of new statistics in the running average. Default: 0.1.
        affine: learnable per-channel :math:`\gamma` (ones) and :math:`\beta` (zeros).
            Default: False.
        track_running_stats: keep running statistics and use them in evaluation. Default: False.
        bias: with ``affine``, whether to learn :math:`\beta` too (keyword-only). Default: True.
        device, dtype: factory keyword arguments for the parameters and buffers.

    Shape:
        - Input: :math:`{shape_in}` or :math:`{shape_unbatched}`
        - Output: same shape as the input

    Example::

        >>> import stylenorm
        >>> m = stylenorm.{name}(4, affine=True)
        >>> x = torch.randn({example})
        >>> torch.allclose(m(x), torch.nn.{name}(4, affine=True)(x), atol=1e-5)
        True
    """

_BN_DOC = r"""Drop-in for :class:`torch.nn.{name}`: batch normalization over a {rank_in} input.

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta

    with the mean and biased variance taken per channel over the batch and spatial dimensions in
    training (Ioffe & Szegedy 2015), and the running statistics (updated with the unbiased
    variance) in evaluation. Same constructor, parameters, buffers, ``state_dict``, numbers and
    errors as torch's class (it *is* a subclass of it), computed by
    :func:`stylenorm.functional.batch_norm`; an empty batch leaves running statistics and
    ``num_batches_tracked`` untouched, and half-precision input updates float32 running statistics
    in float32.

    Args:
        num_features: number of channels :math:`C`.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: weight of new statistics in the running average; ``None`` for a cumulative
            average. Default: 0.1.
        affine: learnable per-channel :math:`\gamma` (ones) and :math:`\beta` (zeros).
            Default: True.
        track_running_stats: keep running statistics and use them in evaluation. Default: True.
        bias: with ``affine``, whether to learn :math:`\beta` too (keyword-only). Default: True.
        device, dtype: factory keyword arguments for the parameters and buffers.

    Shape:
        - Input: :math:`{shape_in}`
        - Output: same shape as the input

    Example::

        >>> import stylenorm
        >>> m = stylenorm.{name}(4)
        >>> x = torch.randn({example})
        >>> torch.allclose(m(x), torch.nn.{name}(4)(x), atol=1e-5)
        True
    """


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _IN_DOC.format(
        name="InstanceNorm1d",
        rank_in="3D (or unbatched 2D)",
        shape_in="(N, C, L)",
        shape_unbatched="(C, L)",
        example="2, 4, 16",
    )


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _IN_DOC.format(
        name="InstanceNorm2d",
        rank_in="4D (or unbatched 3D)",
        shape_in="(N, C, H, W)",
        shape_unbatched="(C, H, W)",
        example="2, 4, 8, 8",
    )


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _IN_DOC.format(
        name="InstanceNorm3d",
        rank_in="5D (or unbatched 4D)",
        shape_in="(N, C, D, H, W)",
        shape_unbatched="(C, D, H, W)",
        example="2, 4, 4, 4, 4",
    )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    __doc__ = _BN_DOC.format(
        name="BatchNorm1d",
        rank_in="2D or 3D",
        shape_in="(N, C)` or :math:`(N, C, L)",
        example="8, 4, 16",
    )


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    __doc__ = _BN_DOC.format(
        name="BatchNorm2d", rank_in="4D", shape_in="(N, C, H, W)", example="8, 4, 8, 8"
    )


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    __doc__ = _BN_DOC.format(
        name="BatchNorm3d", rank_in="5D", shape_in="(N, C, D, H, W)", example="8, 4, 4, 4, 4"
    )
