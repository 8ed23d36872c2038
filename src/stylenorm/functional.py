r"""Functional core of stylenorm: every operation as a pure function, the math in its docstring.

The ``nn`` modules of stylenorm own parameters and buffers and call the function of the same name
here; every statistic comes from :mod:`stylenorm.stats`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import stats

__all__ = [
    "StyleRegion",
    "adain",
    "adain_regions",
    "batch_norm",
    "conditional_instance_norm",
    "gram_loss",
    "gram_matrix",
    "instance_norm",
    "mean_std_loss",
    "mmd_loss",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _check_spatial_size_for_training(input: Tensor) -> None:
    # Same condition and message as torch.nn.functional.instance_norm.
    positions = 1
    for s in input.shape[2:]:
        positions *= s
    if positions == 1:
        # torch prints the torch.Size, e.g. "torch.Size([1, 3, 1, 1])".
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {input.size()}"
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
    (float64 for float64 buffers) and written back in the buffer's dtype, in place. Under
    ``torch.func`` transforms, as torch's kernels do: captured buffers take the primal
    statistics, buffers passed in batched their own batch's, unbatched ones under ``vmap``
    raise torch's error."""
    for buffer, value in ((running_mean, mean), (running_var, var)):
        if buffer is None:
            continue
        if not stats._transformed(buffer, value):  # (under compile too)
            _lerp_into(buffer, value, momentum)
            continue
        # Below every transform, as torch's kernels update their buffers: a buffer captured
        # from outside is plain; one passed in (vmap's in_dims, functional_call) is unwrapped
        # with its batch dims in front, as the statistics are.
        plain_buffer, plain_value = _unwrapped(buffer), _unwrapped(_at_level_of(buffer, value))
        if plain_value.dim() < plain_buffer.dim():  # batched buffers, unbatched input
            plain_value = plain_value.expand_as(plain_buffer)
        with torch._C._DisableFuncTorch():
            _lerp_into(plain_buffer, plain_value, momentum)


def _lerp_into(buffer: Tensor, value: Tensor, momentum: float | Tensor) -> None:
    """``buffer <- (1 - momentum) buffer + momentum value`` in place, in the compute dtype, as
    torch's kernels form it: an infinite running variance stays inf (``lerp``'s
    ``r + m (v - r)`` made it NaN, inf - inf, and every later step too)."""
    acc = stats.compute_dtype(buffer.dtype)
    if buffer.dtype == acc == value.dtype and not isinstance(momentum, Tensor):
        buffer.mul_(1.0 - momentum).add_(value, alpha=momentum)
        return
    weight = momentum.to(acc) if isinstance(momentum, Tensor) else momentum
    buffer.copy_(buffer.to(acc) * (1 - weight) + value.to(acc) * weight)


# torch's error for tracked running statistics of a norm under vmap (its batch rule's words).
_VMAP_RUNNING_STATS_ERROR = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will "
    "be updated in place, were not batched.\nIf you are using a module and do not need eval "
    "mode, please set `track_running_stats` to be False.If you are using a prebuilt module and "
    "do not need eval mode, please see the functorch website for resources on how to patch "
    "your module to work with vmap"
)


def _at_level_of(buffer: Tensor, value: Tensor) -> Tensor:
    """``value`` unwrapped from the ``torch.func`` transforms that the running-statistics
    ``buffer`` is not wrapped in, as torch's batch-norm kernels update their buffers: under
    ``grad``/``jvp`` with buffers captured from outside, the primal statistics (a running average
    carries no gradient); under ``vmap`` with unbatched buffers, torch's RuntimeError."""
    functorch = torch._C._functorch
    level = functorch.maybe_get_level(buffer)  # -1 for a plain tensor
    while functorch.is_functorch_wrapped_tensor(value) and functorch.maybe_get_level(value) > level:
        if functorch.is_batchedtensor(value):
            raise RuntimeError(_VMAP_RUNNING_STATS_ERROR)
        value = functorch.get_unwrapped(value)
    return value


def _unwrapped(t: Tensor) -> Tensor:
    """The plain tensor under every ``torch.func`` wrapper of ``t``, each batch dim moved to
    the front (the outermost transform's first): a view of the same memory."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            t = functorch.get_unwrapped(t).movedim(functorch.maybe_get_bdim(t), 0)
        else:
            t = functorch.get_unwrapped(t)
    return t


def _in_layout(t: Tensor, layout: torch.memory_format) -> Tensor:
    """``t`` in the memory format of the input it was computed from (under torch.func
    transforms, whose batched tangents and vmap hide layouts, as it is)."""
    if layout == torch.contiguous_format or not _plain_autograd(t):
        return t
    return t.contiguous(memory_format=layout)


def _centred_affine(x: Tensor, mean: Tensor, a: Tensor, shift: Tensor | None) -> Tensor:
    r"""``(x - mean) * a + shift`` with per-(sample, channel) ``(N, C)`` statistics in the compute
    dtype (``a``'s), formed on ``x - mean``, in ``x``'s layout and returned in ``x``'s dtype.

    The forms that fold the mean into the shift, ``x * a + (shift - mean * a)`` (ours and torch's
    batch-norm kernels), cancel where :math:`|\mu| / \sigma` is large: a constant channel at 1e4
    came out 0.08 off its shift in float32 (torch.nn: 0.027), at 3e3 0.03 off in half precision.
    Here it is exactly the shift. Half input is computed in float32 and rounded once. Not
    differentiable (in-place ops): for the forwards of the autograd Functions."""
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if x.dtype == a.dtype:
        y = torch.sub(x, mean.reshape(view))
    else:
        y = x.to(a.dtype).sub_(mean.reshape(view))  # (a float32 copy of half x)
    if shift is None:
        y.mul_(a.reshape(view))
    else:
        torch.addcmul(shift.expand(x.shape[0], x.shape[1]).reshape(view), y, a.reshape(view), out=y)
    return y.to(x.dtype)


class _ChannelsLastNorm(torch.autograd.Function):
    r"""Instance normalization with a per-sample, per-channel affine map, for channels_last input.

    ``y = (x - mu) * rsqrt(var + eps) * scale + shift`` with ``scale``/``shift`` of shape (N, C)
    (or None) in the compute dtype, computed on the ``(N, M, C)`` view of the input's memory: no
    transposing copy, the output keeps channels_last and the input's dtype, statistics are stable
    (:func:`stylenorm.stats._positions_mean_var`). Half inputs are computed in float32 and
    rounded once. The output is one fused pass ``x * a + b`` with per-(sample, channel) constants,
    except where some (sample, channel) has :math:`|\mu| / \sigma` above
    ``stats._REFINE_ABOVE_RATIO`` (read on CPU only; a constant channel counts as its value
    over :math:`\sqrt\epsilon`): there the two terms cancel (3x torch.nn's error at 1e3), so
    ``(x - mean) * a + shift`` takes a pass more, and the mean is refined by a corrected pass
    (its 2-3 units in the last place would also cost the gradients 6x torch.nn's error at
    1e3). Returns ``(y, mean, var, ratio)``, ratio that largest one
    (:func:`stylenorm.stats._positions_mean_var`); the statistics are for running averages
    and carry no gradient. The backward pass is the closed form (Ulyanov et al.'s instance norm
    derivative):

    .. math::

        \partial x = a \Big(g - \overline{g} - \frac{(x - \mu)}{\sigma^2 + \epsilon}
        \overline{g (x - \mu)}\Big), \qquad a = \frac{\text{scale}}{\sqrt{\sigma^2+\epsilon}}

    with bars the means over positions. Where that ratio is at most
    ``_PRECISE_GRADIENT_ABOVE_RATIO`` for every (sample, channel), the batch has more than
    one sample and each at most ``_FOLDED_MAX_SAMPLE_NUMEL`` values, it is computed in a few
    whole-batch ops with the mean folded into per-(sample, channel) constants
    (:func:`_channels_last_norm_backward_batched`); otherwise on ``x - mean``: for float32/64
    batches of more than one sample block by block
    (:func:`_channels_last_norm_backward_blockwise`), for a batch of one and half inputs per
    sample by torch's channels_last batch-norm backward kernel from the saved statistics (small
    samples: the whole-batch ops). Double backward recomputes through differentiable ops.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        mean, var, ratio = stats._positions_mean_var(stats._positions(x), eps)
        refine = ratio > stats._REFINE_ABOVE_RATIO  # False for NaN, where it cannot be read
        rstd = torch.rsqrt(var + eps)
        a = rstd if scale is None else rstd * scale
        if refine:  # any dtype: the fused forms below cancel there
            return _centred_affine(x, mean, a, shift), mean, var, ratio
        out = torch.empty_like(x)
        if x.dtype == a.dtype:
            view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
            b = -mean * a if shift is None else shift - mean * a
            torch.addcmul(b.reshape(view), x, a.reshape(view), out=out)
        else:
            # Half input: torch's channels_last batch-norm kernel in evaluation mode, per sample,
            # with our statistics as the running ones: one fused pass, computed in float32 and
            # rounded once (mixed-dtype elementwise ops are slow on CPU).
            for i in range(x.shape[0]):
                torch.ops.aten.native_batch_norm.out(
                    x[i : i + 1],
                    None if scale is None else scale[i].contiguous(),
                    None if shift is None else shift[i].contiguous(),
                    mean[i],
                    var[i],
                    False,
                    0.0,
                    eps,
                    out=out[i : i + 1],
                    # Two buffers: some backends fill them even in evaluation mode.
                    save_mean=mean.new_empty(0),
                    save_invstd=mean.new_empty(0),
                )
        return out, mean, var, ratio

    @staticmethod
    def setup_context(
        ctx: Any,
        inputs: tuple[Tensor, Tensor | None, Tensor | None, float],
        output: tuple[Tensor, Tensor, Tensor, float],
    ) -> None:
        x, scale, shift, eps = inputs
        _, mean, var, ratio = output
        # x, the affine tensors, the mean and 1 / sqrt(var + eps); the statistics carry no
        # gradient.
        ctx.save_for_backward(x, scale, shift, mean, torch.rsqrt(var + eps))
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        ctx.fold_mean = (
            x.shape[0] > 1
            and x[0].numel() <= _FOLDED_MAX_SAMPLE_NUMEL
            and x.dtype == mean.dtype
            and ratio <= _PRECISE_GRADIENT_ABOVE_RATIO
        )

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any,
        grad: Tensor,
        _grad_mean: Tensor | None,
        _grad_var: Tensor | None,
        _grad_ratio: None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, scale, shift, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: recompute with differentiable ops
            return _instance_norm_double_backward(ctx, grad, x, scale, shift)
        needs_x, needs_scale, needs_shift = ctx.needs_input_grad[:3]
        mask = [needs_x, scale is not None and needs_scale, shift is not None and needs_shift]
        if stats._transformed(grad):
            # Batched incoming gradients (autograd.grad's is_grads_batched runs this under
            # vmap): out-of-place whole-batch ops, which vmap batches; no reused buffers.
            batched = _channels_last_norm_backward_batched(
                grad, x, scale, mean, rstd, mask, centre=True
            )
            return (*batched, None)
        # Each sample's instance norm is batch norm of a batch of one: torch's channels_last
        # batch-norm backward kernel (any float dtype; half computed in float32) runs per sample
        # on our saved statistics. It forms x - mean element by element from the stable mean, so
        # the closed form above holds at large means too.
        if grad.stride() != x.stride():
            # The kernel's vectorized path needs the gradient in x's exact layout (a batch of one
            # may carry any stride on its size-1 batch dimension).
            grad = torch.empty_like(x).copy_(grad)
        if ctx.fold_mean or x[0].numel() < _KERNEL_MIN_SAMPLE_NUMEL:
            batched = _channels_last_norm_backward_batched(
                grad, x, scale, mean, rstd, mask, centre=not ctx.fold_mean
            )
            return (*batched, None)
        if x.shape[0] >= _BLOCKWISE_BACKWARD_MIN_BATCH and x.dtype == mean.dtype:
            return (*_channels_last_norm_backward_blockwise(grad, x, scale, mean, rstd, mask), None)
        n = x.shape[0]
        grad_x = torch.empty_like(x) if mask[0] and n > 1 else None
        sums_g_xhat, sums_g = [], []
        for i in range(n):
            sample_x, sample_scale, sample_shift = torch.ops.aten.native_batch_norm_backward(
                grad[i : i + 1],
                x[i : i + 1],
                # The kernel reads the weight as a contiguous vector.
                None if scale is None else scale[i].contiguous(),
                None,
                None,
                mean[i],
                rstd[i],
                True,
                ctx.eps,
                mask,
            )
            if grad_x is not None:  # copied while in cache, between equal strides
                grad_x[i : i + 1].copy_(sample_x)
            elif mask[0]:
                grad_x = sample_x
            sums_g_xhat.append(sample_scale)
            sums_g.append(sample_shift)
        grad_scale = torch.stack(sums_g_xhat) if mask[1] else None  # sums of g * x_hat
        grad_shift = torch.stack(sums_g) if mask[2] else None  # sums of g
        return grad_x, grad_scale, grad_shift, None


def _channels_last_norm(
    x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_ChannelsLastNorm`, its forward run directly where no gradient is recorded."""
    if stats._recording(x, scale, shift):
        result: tuple[Tensor, Tensor, Tensor, float] = stats._apply(
            _ChannelsLastNorm, x, scale, shift, eps
        )
    else:
        result = _ChannelsLastNorm.forward(x, scale, shift, eps)
    return result[:3]


# Largest |mean| / std of a (sample, channel) for which contiguous instance norm keeps the
# gradient of torch's group-norm kernel (a dy + b x + c, whose last two terms cancel as the
# ratio grows). Measured against float64, worst of 16 cases each: at 1 its errors equal
# torch.nn's (weight gradient 6.5e-7 against 6.9e-7); at 2 the weight gradient is 1.9e-6
# against 5.6e-7, at 5 3.9e-6 against 7.2e-7, at 30 1.7e-5 against 6e-7.
_PRECISE_GRADIENT_ABOVE_RATIO = 1.0


# Below this many values, the precise path takes torch.nn's batch norm of the (1, N*C, M) view
# rather than :class:`_ContiguousNorm`: measured forward+backward at |mean|/std = 3 (CPU, float32),
# 123 us against 243 us at 2^13 values, 274 us against 301 us at 2^17, but 432 us against 351 us
# at 2^18 and 3.3 ms against 1.8 ms at 2^21.
_CONTIGUOUS_NORM_MIN_NUMEL = 1 << 18


def _per_instance(
    t: Tensor | None, n: int, c: int, dtype: torch.dtype | None = None
) -> Tensor | None:
    """A ``(C,)`` or ``(N, C)`` parameter as the contiguous ``(N * C,)`` vector (in ``dtype``)
    that torch's kernels read for the ``(1, N*C, M)`` view: they take the raw buffer, so an
    expanded or strided parameter must be copied."""
    if t is None:
        return None
    return t.expand(n, c).reshape(n * c).to(dtype or t.dtype).contiguous()


def _plain_autograd(*tensors: Tensor | None) -> bool:
    """Whether no ``torch.func`` transform (grad, vjp, jacrev, vmap, jvp) wraps these tensors,
    none is batched by autograd's own vmap (batched incoming gradients) and none carries a
    forward-mode tangent. Only then do the precise paths run their
    ``autograd.Function`` (no forward-mode rule; recomputation under transforms) and ``out=``
    kernels; otherwise torch's own differentiable kernels stand. Under torch.compile, which
    traces the transforms itself and not these queries, True (the callers' other conditions
    keep the compiled graph on torch's kernels)."""
    if stats._is_compiling():
        return True
    return not (
        stats._transformed(*tensors)
        or any(t is not None and stats._has_tangent(t) for t in tensors)
    )


def _group_norm_instances(
    x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's group-norm kernel with one group per (sample, channel) of contiguous ``x``, so
    statistics and output come from one fused call; ``scale``/``shift`` None, ``(C,)`` or
    ``(N, C)``. Returns ``(y, mean, rstd)``, the statistics ``(N, C)``."""
    if (
        x.device.type != "cpu"
        and x.dtype in (torch.float16, torch.bfloat16)
        and any(p is not None and p.dtype == torch.float32 for p in (scale, shift))
    ):
        # CUDA's kernel takes parameters of the input's dtype only (the CPU's takes float32 ones
        # with a half input): normalize in float32, as torch.nn's half instance norm does. Other
        # mixes are left to the kernel's error, as on the CPU.
        y, mean, rstd = _group_norm_instances(x.float(), scale, shift, eps)
        return y.to(x.dtype), mean, rstd
    n, c = x.shape[0], x.shape[1]
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # The CPU kernel reduces and normalizes a half input in float32 with float32 parameters
        # (ones if none), and returns float32 statistics; with half ones, or none, it rounds its
        # statistics to half precision (a variance 6e-3 off, relative, in bfloat16).
        scale = x.new_ones(c, dtype=torch.float32) if scale is None else scale.float()
        shift = None if shift is None else shift.float()
    m = stats._num_positions(x)
    if n == 1:  # one sample: its (1, C) parameters are the kernel's own (C,) ones
        scale = None if scale is None else scale.reshape(c)
        shift = None if shift is None else shift.reshape(c)
    if (scale is None or scale.dim() == 1) and (shift is None or shift.dim() == 1):
        # The kernel reads the parameters' raw buffers: contiguous (a strided view may not be).
        weight = None if scale is None else scale.contiguous()
        bias = None if shift is None else shift.contiguous()
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, m, c, eps)
        return y, mean, rstd
    # Per-sample parameters: the (1, N*C, M) view, whose groups are the (sample, channel) pairs.
    weight, bias = _per_instance(scale, n, c), _per_instance(shift, n, c)
    y, mean, rstd = torch.native_group_norm(
        x.view(1, n * c, m), weight, bias, 1, n * c, m, n * c, eps
    )
    return y.view(x.shape), mean.view(n, c), rstd.view(n, c)


class _ContiguousNorm(torch.autograd.Function):
    r"""Instance normalization of contiguous input with a per-sample, per-channel affine map,
    for inputs with a large |mean| / std, where the group-norm kernel loses digits.

    ``y = (x - mu) * rsqrt(var + eps) * scale + shift`` with ``scale``/``shift`` of shape (N, C)
    (or None). The forward pass takes the output and statistics that
    :func:`_group_norm_instances` computed already (``first``: ``y``, ``mean``, ``rstd``, without
    gradient) and returns them. They come in a tuple, which autograd does not look into: a
    tensor argument returned as an output would become a view, on which in-place ops (a
    following ``ReLU(inplace=True)``) fail. With ``refine`` (some (sample, channel) above
    ``stats._REFINE_ABOVE_RATIO``, where the kernel's float32 1/sigma is off by 3e-6 at
    |mean|/sigma = 1e3), the statistics are refined by a corrected two-pass and the output
    recomputed from them on ``x - mean``, ``(x - mean) * a + shift``. Returns ``(y, mean, rstd)``,
    the statistics ``(N, C)`` in float32 for half inputs.

    The backward pass is the closed form of :class:`_ChannelsLastNorm`, computed by torch's
    batch-norm backward kernel on the ``(1, N*C, M)`` view from the saved statistics, as
    torch.nn's instance norm does: it forms ``x - mean`` element by element.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        scale: Tensor | None,
        shift: Tensor | None,
        eps: float,
        first: tuple[Tensor, Tensor, Tensor],
        refine: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, rstd = first
        acc = stats.compute_dtype(x.dtype)
        # Half inputs: statistics (and below, parameters) in float32, which torch's batch-norm
        # kernels take with a half input; copies, as outputs must not alias the saved inputs.
        mean, rstd = mean.to(acc, copy=True), rstd.to(acc, copy=True)
        if refine:
            n, c = x.shape[0], x.shape[1]
            flat = x.view(1, n * c, -1)
            mean, var = stats._rows_refined_mean_var(flat[0].to(acc), mean.reshape(n * c))
            mean, rstd = mean.view(n, c), torch.rsqrt(var + eps).view(n, c)
            a = rstd if scale is None else rstd * scale.to(acc)
            y = _centred_affine(x, mean, a, None if shift is None else shift.to(acc))
        return y, mean, rstd

    @staticmethod
    def setup_context(
        ctx: Any,
        inputs: tuple[
            Tensor, Tensor | None, Tensor | None, float, tuple[Tensor, Tensor, Tensor], bool
        ],
        output: tuple[Tensor, Tensor, Tensor],
    ) -> None:
        x, scale, shift, eps = inputs[:4]
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, shift, mean, rstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor, _grad_mean: Tensor | None, _grad_rstd: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, scale, shift, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: recompute with differentiable ops
            return (*_instance_norm_double_backward(ctx, grad, x, scale, shift), None, None)
        n, c = x.shape[0], x.shape[1]
        needs_x, needs_scale, needs_shift = ctx.needs_input_grad[:3]
        mask = [needs_x, scale is not None and needs_scale, shift is not None and needs_shift]
        grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
            # Contiguous, for the view (and the kernel mishandles some channels_last gradients
            # of a batch of one).
            grad.contiguous().view(1, n * c, -1),
            x.view(1, n * c, -1),
            _per_instance(scale, n, c, mean.dtype),
            None,
            None,
            mean.view(n * c),
            rstd.view(n * c),
            True,
            ctx.eps,
            mask,
        )
        return (
            grad_x.view(x.shape) if mask[0] else None,
            grad_scale.view(n, c) if mask[1] else None,  # sums of g * x_hat
            grad_shift.view(n, c) if mask[2] else None,  # sums of g
            None,
            None,
            None,
        )


def _formula_norm(
    x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Instance norm as plain differentiable ops: :math:`(x - \mu) \cdot
    \text{rsqrt}(\sigma^2 + \epsilon) \cdot \text{scale} + \text{shift}` with
    ``scale``/``shift`` None, ``(C,)``, ``(1, C)`` or ``(N, C)``. Returns ``(y, mean, var)``,
    the biased statistics ``(N, C)`` in the compute dtype; half inputs are computed in float32
    and rounded once.

    The statistics are the corrected two-pass ones of :func:`stats._formula_deviations`, so
    the float32 sums of a compiler, which add one by one, do not cost digits at large means;
    and the output is formed on its deviations, x minus a first mean, element by element (then
    exact at any mean). Used where the eager kernels do not fit:

    - under torch.compile, for channels_last (and channels_last_3d) input that records a
      gradient. The compiler fuses these ops into reductions and elementwise loops on the
      input's own layout, forward and backward, where the eager route (a contiguous copy,
      torch's group norm, a copy back) compiled to a forward+backward 3.3x-4.8x as slow (CPU).
      Measured at |mean|/std = 1e3, output and gradients have eager torch.nn's error (the
      plain two-pass: 8x-29x it, the group-norm route: 19x-120x); the correction costs 5%-15%.
      Compiled without a gradient, the eager route stays: its forward is the faster one.
    - for the double backward of the closed-form Functions, which recompute the output.
    - in eager mode on CPU, for small channels_last input that records no gradient
      (:func:`_formula_fits`), where it is faster than the contiguous copies around torch's
      group norm.
    """
    acc = stats.compute_dtype(x.dtype)
    ones = (1,) * (x.dim() - 2)  # (C,) -> (C, 1, ...), (N, C) -> (N, C, 1, ...)
    mean, deviations, offset, var = stats._formula_deviations(x.to(acc))
    stats._check_finite(var.detach(), x)
    a = torch.rsqrt(var + eps)
    if scale is not None:
        a = a * scale.to(acc).reshape(scale.shape + ones)
    b = -offset * a  # (x - mean) a = d a - offset a, with d = x - rough
    if shift is not None:
        b = b + shift.to(acc).reshape(shift.shape + ones)
    y = torch.addcmul(b, deviations, a)
    n, c = x.shape[0], x.shape[1]
    return y.to(x.dtype), mean.reshape(n, c), var.reshape(n, c)


def _formula_fits(x: Tensor, *params: Tensor | None) -> bool:
    """Whether channels_last ``x`` (with the affine ``params``) takes :func:`_formula_norm`:
    under torch.compile where a gradient is recorded, and in eager mode where none is and
    :func:`stats._formula_pays` (a few whole-tensor ops, no transposing copies, and the exact
    corrected two-pass statistics). torch.func transforms keep their routes. The same eager
    input with a gradient takes another route, whose output can differ in the last bits."""
    if stats._memory_format(x) == torch.contiguous_format:
        return False
    if stats._is_compiling():
        return stats._recording(x, *params)
    return (
        stats._formula_pays(x) and not stats._recording(x, *params) and _plain_autograd(x, *params)
    )


def _batch_norm_instances(
    x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float
) -> Tensor:
    """Instance norm of contiguous ``x`` as torch.nn computes it: torch's batch-norm kernel in
    training mode on the ``(1, N*C, M)`` view, with its gradient. Also where ``eps <= 0``: the
    kernel takes a constant channel's 1/sigma as 0 when ``var + eps`` is 0 (output the shift,
    gradients 0, as torch.nn's), where the group-norm kernel and the closed forms give NaN."""
    n, c = x.shape[0], x.shape[1]
    weight, bias = _per_instance(scale, n, c), _per_instance(shift, n, c)
    flat = x.view(1, n * c, -1)
    training = torch.batch_norm(flat, weight, bias, None, None, True, 0.0, eps, False)
    return training.view(x.shape)


def _contiguous_norm(x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float) -> Tensor:
    """The output of :func:`_contiguous_norm_and_stats`."""
    return _contiguous_norm_and_stats(x, scale, shift, eps, False)[0]


def _contiguous_norm_and_stats(
    x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float, want_stats: bool
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    r"""Instance norm of ``x`` (made contiguous) with ``scale``/``shift`` None, ``(C,)`` or
    ``(N, C)``: torch's group-norm kernel, one group per (sample, channel), with its own
    gradient; where some (sample, channel) has a large |mean| / std, :class:`_ContiguousNorm`
    (or, for small inputs up to ``stats._REFINE_ABOVE_RATIO``, torch.nn's batch norm of the
    ``(1, N*C, M)`` view, :func:`_batch_norm_instances`), whose statistics and gradient do not
    lose digits there. The bound is ``_PRECISE_GRADIENT_ABOVE_RATIO`` where a gradient is
    recorded, and ``stats._REFINE_ABOVE_RATIO`` (where the forward's 1/sigma starts to lose
    digits) where not. Off the CPU (CUDA), where reading the statistics would synchronize, the
    group norm stands. Under torch.func transforms (:func:`_plain_autograd`) and torch.compile,
    which cannot branch on values, the group norm stands. ``eps <= 0`` takes
    :func:`_batch_norm_instances` on every device.

    Returns the output and, with ``want_stats`` and where this computed them as precisely as
    :func:`stylenorm.stats.mean_var` would (in the compute dtype, refined above
    ``stats._REFINE_ABOVE_RATIO``), the biased statistics ``(mean, var)``, ``(N, C)`` without
    gradient, for running averages; else None."""
    x = x.contiguous()
    if eps <= 0:
        return _batch_norm_instances(x, scale, shift, eps), None
    y, mean, rstd = _group_norm_instances(x, scale, shift, eps)
    if x.device.type != "cpu":  # the check below would synchronize: no precise path there
        return y, None
    recording = stats._recording(x, scale, shift)
    bound = _PRECISE_GRADIENT_ABOVE_RATIO if recording else stats._REFINE_ABOVE_RATIO
    ratio = stats._largest_mean_to_spread_of_rstd(mean.detach(), rstd.detach(), eps, x)
    if not _plain_autograd(x, scale, shift):
        return y, None
    if ratio <= bound:
        return y, _stats_of_rstd(mean, rstd, eps, x) if want_stats else None
    n, c = x.shape[0], x.shape[1]
    refine = ratio > stats._REFINE_ABOVE_RATIO
    if recording and x.numel() < _CONTIGUOUS_NORM_MIN_NUMEL and not refine:
        # Small: torch.nn's own way (the Function's fixed cost in Python is more than it saves
        # here). Not above the refining bound, where its output, x * a + (shift - mean * a),
        # cancels: a constant channel at 1e4 came out 0.05 off its shift, at 1e8 969 off.
        return _batch_norm_instances(x, scale, shift, eps), None
    full_scale = None if scale is None else scale.expand(n, c)
    full_shift = None if shift is None else shift.expand(n, c)
    first = (y.detach(), mean.detach(), rstd.detach())  # no second group-norm pass
    if recording:
        result: tuple[Tensor, Tensor, Tensor] = stats._apply(
            _ContiguousNorm, x, full_scale, full_shift, eps, first, refine
        )
    else:
        result = _ContiguousNorm.forward(x, full_scale, full_shift, eps, first, refine)
    return result[0], _stats_of_rstd(result[1], result[2], eps, x) if want_stats else None


def _stats_of_rstd(
    mean: Tensor, rstd: Tensor, eps: float, x: Tensor
) -> tuple[Tensor, Tensor] | None:
    """``(mean, var)`` without gradient from a kernel's ``mean`` and ``rstd = 1 / sqrt(var +
    eps)`` of contiguous ``x``, where they are in its compute dtype (statistics rounded to half
    precision: None). ``rstd**-2 - eps`` keeps the variance's digits only down to about eps
    (relative error about 1e-7 eps / var: 0.25 at a spread of 1e-6 with eps 1e-5, torch.nn's
    5e-8): rows below ``_VAR_OF_RSTD_MIN_EPS`` eps are reduced again by the corrected
    two-pass about the kernel's mean (on the CPU; elsewhere, where the check would synchronize,
    they stand)."""
    if mean.dtype != stats.compute_dtype(x.dtype):
        return None
    mean, var = mean.detach().reshape(rstd.shape), stats._var_of_rstd(rstd.detach(), eps)
    if x.device.type != "cpu" or eps <= 0 or stats._values_unknown(x, var):
        return mean, var
    low = var < _VAR_OF_RSTD_MIN_EPS * eps
    if bool(low.any()):
        rows = low.view(-1).nonzero().squeeze(1)
        values = x.detach().reshape(var.numel(), -1)  # one row per (sample, channel)
        chosen = values.index_select(0, rows).to(var.dtype)
        exact = stats._rows_refined_mean_var(chosen, mean.reshape(-1).index_select(0, rows))[1]
        var = var.view(-1).index_copy(0, rows, exact).view(var.shape)
    return mean, var


# Where the variance recovered from a kernel's 1/sqrt(var + eps) is below this many eps, the
# running averages take it from the data instead (:func:`_stats_of_rstd`): above it, its
# relative error stays under 1e-8.
_VAR_OF_RSTD_MIN_EPS = 10.0


# Up to this many values per sample (and with more than one sample), the channels_last backward
# at small |mean| / std folds the mean into constants in whole-batch ops rather than calling
# torch's kernel per sample: measured forward+backward side by side (CPU, float32, 9 rounds),
# 1.13x-1.33x faster at 2^17 and 2^18 values per sample (N = 3 to 16), even at (2, 64, 64, 64),
# but 0.88x-0.93x at 2^20 (N = 2 and 4), where the kernel's per-sample passes stay in cache.
_FOLDED_MAX_SAMPLE_NUMEL = 1 << 18


# From this many samples, float32/float64 channels_last backward that is not folded takes
# :func:`_channels_last_norm_backward_blockwise` rather than torch's kernel per sample (whose
# parameter gradients are looser; with one sample the blockwise form is slower).
_BLOCKWISE_BACKWARD_MIN_BATCH = 2


# Below this many values per sample, the per-sample batch-norm backward calls cost more than
# they save: measured on CPU, the batched closed form was 1.3x faster at 2^13 values per sample,
# about even at 2^14, and 1.0x-1.9x slower from 2^16 up.
_KERNEL_MIN_SAMPLE_NUMEL = 1 << 14


def _channels_last_norm_backward_batched(
    grad: Tensor,
    x: Tensor,
    scale: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    mask: list[bool],
    centre: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    r"""The backward of :class:`_ChannelsLastNorm` in a few whole-batch ops on the ``(N, M, C)``
    views: the same closed form, as :math:`\partial x = a g + b v + c` with per-(sample,
    channel) constants. With ``centre``, :math:`v = x - \mu` is formed first, which is exact at
    any :math:`|\mu| / \sigma`. Without, :math:`v = x` and the mean is folded into the
    constants: one pass fewer, but :math:`b x` and :math:`c` cancel as :math:`|\mu| / \sigma`
    grows. Measured against float64 (float32, relative to the largest entry), the folded weight
    gradient is as accurate as torch.nn's kernel to a ratio of 2 (4.1e-7 against 3.9e-7 at 1),
    1.8x its error at 3 and 3.7x at 10; input and bias gradients equal at 10."""
    acc = mean.dtype
    n, c, m = x.shape[0], x.shape[1], x[0, 0].numel()
    g = stats._positions(grad).to(acc)
    values = stats._positions(x).to(acc)
    if centre:
        values = values - mean.unsqueeze(1)
    # Batches of one or two: sums over runs of positions, so that both threads reduce.
    parts = stats._virtual_samples(g)

    def sum_positions(t: Tensor) -> Tensor:
        return stats._split_samples(t, parts).sum(1).view(n, parts, c).sum(1)

    sum_g = sum_positions(g)
    sum_g_values = sum_positions(values * g)
    if not centre:
        sum_g_values -= mean * sum_g  # sum of g (x - mean)
    sum_g_xhat = sum_g_values.mul_(rstd)
    grad_x = None
    if mask[0]:
        a = rstd if scale is None else rstd * scale
        coef = -a * rstd * sum_g_xhat / m
        const = -a * sum_g / m
        if not centre:
            const -= coef * mean
        flat = torch.addcmul(const.unsqueeze(1), values, coef.unsqueeze(1))
        flat.addcmul_(g, a.unsqueeze(1))
        # channels_last memory (a view; reshape for batched gradients, whose layout is vmap's)
        spatial_last = flat.reshape(n, *x.shape[2:], c)
        grad_x = spatial_last.movedim(-1, 1).to(x.dtype)
    return grad_x, sum_g_xhat if mask[1] else None, sum_g if mask[2] else None


def _channels_last_norm_backward_blockwise(
    grad: Tensor,
    x: Tensor,
    scale: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    mask: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    r"""The backward of :class:`_ChannelsLastNorm` on the ``(N, M, C)`` views, block by block in
    one reused cache-sized buffer (float32/float64): the same closed form as
    :func:`_channels_last_norm_backward_batched` on :math:`d = x - \mu`, formed element by
    element in both passes. First the sums :math:`\sum g d` and :math:`\sum g` with torch's
    reductions, then :math:`\partial x = a g + (c_1 d + c_0)`.

    torch's channels_last batch-norm backward kernel, which this replaces for batches of more
    than one sample, adds the positions one by one and folds the mean out of the sums: against
    float64 its weight gradient had 2x-4x torch.nn's error from 2^12 positions at
    |mean|/std = 3 (1.1e-6 against 2.9e-7 at (8, 64, 64, 64)) and at 2^14 positions at a mean of
    0.5 (1.5e-6 against 4.6e-7 at (2, 64, 128, 128)); these sums measured 1.5e-7 to 2.4e-7
    there. Forward+backward side by side, two runs: 0.77x-1.03x of the kernel's time at
    |mean|/std = 3 at (8, 64, 64, 64), (4, 256, 32, 32) and (16, 32, 64, 64), 1.03x-1.16x at
    (2, 64, 128, 128) and a mean of 0.5. With one sample it took 1.3x-1.6x as long, so a batch
    of one keeps the kernel (where torch.nn's own gradient is wrong altogether)."""
    acc = mean.dtype
    positions, grads = stats._positions(x), stats._positions(grad)
    n, m, c = positions.shape
    parts = stats._virtual_samples(positions)
    block = stats._position_blocks(stats._split_samples(positions, parts))

    def blocks(t: Tensor) -> tuple[Tensor, ...]:
        return torch.split(stats._split_samples(t, parts), block, 1)

    chunks, grad_chunks = blocks(positions), blocks(grads)
    work = stats._block_workspace(chunks)
    run_mean = stats._per_run(mean, parts)
    sums = torch.zeros((2, n * parts, c), dtype=acc, device=x.device)
    for chunk, g in zip(chunks, grad_chunks, strict=True):
        centred = stats._centred_into(chunk, run_mean, stats._workspace_for(work, chunk))
        sums[0] += centred.mul_(g).sum(1)
        sums[1] += g.sum(1)
    if parts > 1:
        sums = sums.view(2, n, parts, c).sum(2)
    sum_g_xhat, sum_g = sums[0] * rstd, sums[1]
    grad_x = None
    if mask[0]:
        a = rstd if scale is None else rstd * scale
        a_run = stats._per_run(a, parts)
        coef = stats._per_run(-a * rstd * sum_g_xhat / m, parts)
        const = stats._per_run(-a * sum_g / m, parts)
        grad_x = torch.empty_like(x)
        outs = blocks(stats._positions(grad_x))
        for chunk, g, out in zip(chunks, grad_chunks, outs, strict=True):
            centred = stats._centred_into(chunk, run_mean, stats._workspace_for(work, chunk))
            torch.addcmul(const, centred, coef, out=centred)
            torch.addcmul(centred, g, a_run, out=out)
    return grad_x, sum_g_xhat if mask[1] else None, sum_g if mask[2] else None


def _instance_norm_double_backward(
    ctx: Any, grad: Tensor, x: Tensor, scale: Tensor | None, shift: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    y = _formula_norm(x, scale, shift, ctx.eps)[0]
    return _grads_by_recomputation(ctx, grad, y, (x, scale, shift))


def _grads_by_recomputation(
    ctx: Any, grad: Tensor, y: Tensor, inputs: tuple[Tensor, Tensor | None, Tensor | None]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    """Double backward of the normalization Functions: the vector-Jacobian product of ``y``,
    recomputed from ``inputs`` with differentiable ops, for the inputs that need a gradient."""
    needs = [
        need and t is not None for t, need in zip(inputs, ctx.needs_input_grad[:3], strict=True)
    ]
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None]
    found = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    out = [next(found) if need else None for need in needs]
    return out[0], out[1], out[2], None


@stats._float64_on_overflow("running_mean", "running_var")
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
    batch returns an empty output and leaves running statistics untouched, half-precision
    inputs update float32 running statistics from float32 statistics, and on the CPU features
    so large that a float32 sum of their squares overflows (torch: the bias, or NaN) are
    computed again in float64 (:func:`stylenorm.stats.mean_var`).

    Args:
        input: ``(N, C, *spatial)``.
        running_mean, running_var: optional ``(C,)`` buffers.
        weight, bias: optional ``(C,)`` affine parameters :math:`\gamma, \beta`.
        use_input_stats: normalize with the input's statistics (True) or the running ones.
        momentum: weight of the new statistics in the running average.
        eps: added to the variance inside the square root.

    Shape:
        Input ``(N, C, *spatial)``; output the same shape. channels_last input gives a
        channels_last output (torch copies to contiguous; the values are the same).

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = instance_norm(x)
        >>> torch.allclose(y, torch.nn.functional.instance_norm(x), atol=1e-5)
        True
    """
    if _torch_handles(input):
        return F.instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )
    if use_input_stats:
        # Also rejects inputs without spatial dimensions, with torch's message.
        _check_spatial_size_for_training(input)
    elif running_mean is None or running_var is None:
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false"
        )
    n, c = input.shape[0], input.shape[1]
    vectors = (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    )
    # torch repeats each vector N times first (Tensor.repeat refuses more than one dimension),
    # then its kernel checks the (N * C,) repeated vectors; same order, same words.
    if any(vector is not None and vector.dim() > 1 for _, vector in vectors):
        raise RuntimeError(
            "Number of dimensions of repeat dims can not be smaller than number of dimensions "
            "of tensor"
        )
    for name, vector in vectors:
        if vector is not None and vector.numel() != c:
            raise RuntimeError(f"{name} should contain {n * c} elements not {n * vector.numel()}")
    if not use_input_stats:
        assert running_mean is not None and running_var is not None
        layout = stats._memory_format(input)
        dtypes = {t.dtype for _, t in vectors if t is not None}
        half_float32 = input.dtype in (torch.float16, torch.bfloat16) and dtypes == {torch.float32}
        if dtypes - {input.dtype} and not half_float32:
            # Mixed dtypes the batch-norm kernel does not take: torch's own function, which
            # casts the running statistics as it needs, or raises torch's error.
            out = F.instance_norm(
                input, running_mean, running_var, weight, bias, False, momentum, eps
            )
            return out if stats._recording(input, weight, bias) else _in_layout(out, layout)
        if half_float32 and not input.is_contiguous() and stats._recording(weight, bias):
            # Half input, float32 parameters that want a gradient: on any layout but the
            # contiguous one, the kernel's backward sums their gradients in half precision
            # (the bias gradient 1.7e-3 off, relative, in bfloat16; torch.nn's, on a contiguous
            # copy, 6e-8). Computed contiguous, as torch.nn does, with its contiguous output.
            input = input.contiguous()
            layout = torch.contiguous_format
        # The aten op, not F.batch_norm: torch's instance norm does not reject a negative eps.
        # The output keeps the input's memory format (torch's instance norm copies to contiguous).
        out = torch.batch_norm(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            False,
            0.0,
            eps,
            torch.backends.cudnn.enabled,
        )
        return _in_layout(_kernel_grad_in_layout(out, input), layout)
    if input.numel() == 0:
        # Empty output with zero parameter gradients (group norm's weight gradient is NaN here).
        return torch.batch_norm(
            input, weight, bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
        )
    if not _kernel_dtypes_match(input, weight, bias):
        # Parameters of a dtype torch's kernels do not take with this input (float64 ones with
        # float32 or half input, bfloat16 ones with float16): torch's own function, which raises
        # torch's error before any running statistic moves (the group-norm route cast them).
        return F.instance_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    tracking = running_mean is not None or running_var is not None
    layout = stats._memory_format(input)
    on_own_layout = None
    # eps <= 0 takes torch.nn's kernel (:func:`_contiguous_norm_and_stats`) in every layout.
    own_routes = eps > 0
    if own_routes and _formula_fits(input, weight, bias):
        # Compiled with a gradient, or small without one: the formula on the input's layout.
        on_own_layout = _formula_norm(input, weight, bias, eps)
    elif (
        own_routes
        and stats._blockwise_channels_last(input, weight, bias)
        and _plain_autograd(input, weight, bias)
    ):
        # channels_last: statistics on the channels-last view of the same memory and one fused
        # scale-and-shift pass, no transposing copy; the output keeps channels_last (torch's
        # copies to contiguous). torch's channels_last group-norm kernel is not used: it computes
        # the variance as E[x^2] - E[x]^2, which cancels on features with a large mean.
        n_c = (n, c)
        scale = None if weight is None else weight.to(stats.compute_dtype(input.dtype)).expand(n_c)
        shift = None if bias is None else bias.to(stats.compute_dtype(input.dtype)).expand(n_c)
        # Half inputs are computed in float32: one rounding at the end.
        on_own_layout = _channels_last_norm(input, scale, shift, eps)
    batch_stats: tuple[Tensor, Tensor] | None
    if on_own_layout is not None:
        out, own_mean, own_var = on_own_layout
        batch_stats = (own_mean, own_var)
    else:
        # One group per (sample, channel) is instance norm: a single fused pass, with correct
        # gradients where instance_norm's CPU kernel has none (N = 1, channels_last gradient),
        # and torch.nn's precision where |mean|/std is large (:func:`_contiguous_norm`). Other
        # small channels_last input is normalized contiguous and keeps its layout.
        out, batch_stats = _contiguous_norm_and_stats(input, weight, bias, eps, tracking)
        out = _in_layout(out, layout)
    if tracking:  # after the kernel, which raises torch's errors first, as torch.nn does
        if batch_stats is None:
            with torch.no_grad():
                batch_stats = stats._mean_var(input.detach(), 0.0, None)
        mean, var = batch_stats
        m = math.prod(input.shape[2:])  # positions per (sample, channel)
        mean = _sum_means_where_not_finite(mean, input, m)
        _update_running_stats(
            running_mean, running_var, mean.mean(0), var.mean(0) * (m / (m - 1)), momentum
        )
    return out


@torch.no_grad()
def _sum_means_where_not_finite(mean: Tensor, x: Tensor, m: int) -> Tensor:
    """The ``(N, C)`` instance means of ``x`` for its running average, as torch's kernel takes
    them where some is not finite: ``sum / M``. A +inf among finite values makes that mean inf;
    the centred and Welford forms of our routes and of the group-norm kernel make it NaN
    (inf - inf), and the running mean NaN where torch.nn's is inf. Only where some mean is not
    finite (their float64 sum, read on the CPU, about 2 us; unread under compile and vmap)."""
    if x.device.type != "cpu" or stats._values_unknown(x, mean):
        return mean
    if math.isfinite(float(mean.sum(dtype=torch.float64))):
        return mean
    # Summed in float64, as torch's CPU kernel does: a float32 sum of -inf and values of 1e36
    # would overflow to +inf on the way and give NaN.
    sums = x.detach().reshape(x.shape[0], x.shape[1], -1).sum(2, dtype=torch.float64)
    return torch.where(mean.isfinite(), mean, (sums.reshape(mean.shape) / m).to(mean.dtype))


def _channels_last_grad(grad: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.contiguous(memory_format=torch.channels_last)


def _kernel_grad_in_layout(out: Tensor, input: Tensor) -> Tensor:
    """``out`` of torch's batch-norm kernel on ``input``, with a hook that hands the kernel's
    backward its incoming gradient in the input's layout where that backward needs it.

    torch's CPU batch-norm backward is wrong for a 4D batch of one in channels_last memory
    (an HWC image permuted to CHW and unsqueezed is one) whose incoming gradient is not
    channels_last: against float64, the input gradient came out 20 off (relative to values
    of about 1) in training and 6 off in evaluation, the weight gradient off too. torch.nn's
    BatchNorm2d has it; its InstanceNorm, which copies to contiguous, does not. Batches of
    more than one, 3D and 5D input are right. Not under torch.compile, which decomposes the
    kernel, nor under vmap, which cannot make a channels_last copy (and batches the samples)."""
    if (
        out.requires_grad
        and input.dim() == 4
        and input.shape[0] == 1
        and input.device.type == "cpu"
        and not input.is_contiguous()
        and input.is_contiguous(memory_format=torch.channels_last)
        and not stats._is_compiling()
        and not stats._is_vmapped(input)
    ):
        out.register_hook(_channels_last_grad)  # type: ignore[no-untyped-call]
    return out


def _torch_handles(input: object) -> bool:
    """Whether a normalization is left to torch's own function whole: input that is not a
    floating-point tensor (torch's errors) or has no channels (torch's empty results)."""
    return (
        not isinstance(input, Tensor)
        or not input.is_floating_point()
        or (input.dim() >= 2 and input.shape[1] == 0)
    )


def _kernel_dtypes_match(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether torch's normalization kernels accept these parameter dtypes for ``input``: equal
    dtypes, or float32 parameters with a half-precision input. Other mixes take the kernel path,
    which raises torch's own error."""
    for param in (weight, bias):
        if param is None or param.dtype == input.dtype:
            continue
        if not (input.dtype in (torch.float16, torch.bfloat16) and param.dtype == torch.float32):
            return False
    return True


class _BatchNormTrain(torch.autograd.Function):
    r"""Training batch norm of a contiguous float32/float64 CPU input from stylenorm's statistics.

    torch's CPU training kernel for contiguous input reduces each channel over its N strided
    runs and takes several times longer than its evaluation kernel. Here the statistics, given
    (from :func:`stylenorm.stats._batch_mean_var_contiguous`: stable two-pass rows, merged
    exactly), set the output through torch's fused evaluation kernel, and the gradient comes
    from torch's own training backward, given the same mean and
    :math:`1/\sqrt{\sigma^2+\epsilon}`: torch's numbers to float32 rounding. The statistics
    are inputs without a gradient (computed, and the running ones updated, before this
    Function saves anything: non-reentrant checkpointing recomputes a forward only until its
    saved tensors are back, and torch's kernel updates its running statistics before it saves).
    Double backward recomputes through ``F.batch_norm``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float
    ) -> Tensor:
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def setup_context(
        ctx: Any,
        inputs: tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor, float],
        output: Tensor,
    ) -> None:
        x, weight, bias, mean, var, eps = inputs
        ctx.save_for_backward(x, weight, bias, mean, torch.rsqrt(var + eps))
        ctx.eps = eps

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: recompute with differentiable ops
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps)
            return *_grads_by_recomputation(ctx, grad, y, (x, weight, bias)), None, None
        needs = ctx.needs_input_grad[:3]
        mask = [
            bool(needs[0]),
            bool(needs[1] and weight is not None),
            bool(needs[2] and bias is not None),
        ]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return grad_x, grad_w, grad_b, None, None, None


# Below these sizes torch's training kernel is faster than the fast path's fixed cost (a custom
# autograd Function and a few dozen small ops) or than its reduction of short rows; measured on
# CPU with benchmarks/run.py's kernels.
_BATCH_NORM_FAST_PATH_MIN_NUMEL = 1 << 19
_BATCH_NORM_FAST_PATH_MIN_POSITIONS = 64


def _batch_norm_fast_path(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> bool:
    """Whether training batch norm can take :class:`_BatchNormTrain`: a contiguous float32 or
    float64 CPU input with spatial dims, large enough to gain (sizes above), and (C,) vectors of
    its dtype. Anything else goes to torch's function, with its checks and errors."""
    if (
        stats._is_compiling()  # first: no shape guards for a compiled graph
        or input.numel() < _BATCH_NORM_FAST_PATH_MIN_NUMEL  # then the cheapest test
        or input.dim() < 3
        or input.numel() < 2 * input.shape[1]
        or input.device.type != "cpu"
        or input.dtype not in (torch.float32, torch.float64)
        or not input.is_contiguous()
        or stats._num_positions(input) < _BATCH_NORM_FAST_PATH_MIN_POSITIONS
        # No torch.func transform or forward-mode tangent: the Function has no jvp rule.
        or not _plain_autograd(input, weight, bias)
    ):
        return False
    if (running_mean is None) != (running_var is None):
        return False
    c = input.shape[1]
    return all(
        t is None or (t.shape == (c,) and t.dtype == input.dtype and t.device == input.device)
        for t in (running_mean, running_var, weight, bias)
    )


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

    Same numbers and errors as torch's function: it calls it, except in training on large
    contiguous float32/float64 CPU input, where it reproduces its numbers faster.

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
    if _torch_handles(input):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not training:
        out = F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
        return _kernel_grad_in_layout(out, input)
    tracks = running_mean is not None or running_var is not None
    if input.dim() >= 2 and input.numel() == 0 and input.shape[1] > 0:
        # An empty batch (N = 0, or no spatial positions) carries no statistics: nothing to update.
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    if _batch_norm_fast_path(input, running_mean, running_var, weight, bias):
        # Contiguous float CPU input: torch's training kernel is slow here; same numbers faster.
        if eps <= 0.0:  # F.batch_norm's check, which this path does not go through
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        mean, var = stats._batch_mean_var_contiguous(input.detach())
        if tracks:  # first, as torch's kernel does (see _BatchNormTrain)
            count = input.numel() // input.shape[1]
            _update_running_stats(
                running_mean, running_var, mean, var * (count / (count - 1)), momentum
            )
        if stats._recording(input, weight, bias):
            result: Tensor = stats._apply(_BatchNormTrain, input, weight, bias, mean, var, eps)
            return result
        return _BatchNormTrain.forward(input, weight, bias, mean, var, eps)
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _kernel_grad_in_layout(out, input)


# ==============================================================================================
# Style layers: conditional instance norm and AdaIN
# ==============================================================================================

# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _style_keepdim(t: Tensor, rank: int) -> Tensor:
    """``(N, C)`` -> ``(N, C, 1, ..., 1)`` of the given rank."""
    return t.reshape(t.shape + (1,) * (rank - t.dim()))


def _cin_normalize(x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float) -> Tensor:
    r"""``(x - \mu_{nc}) / \sqrt{\sigma^2_{nc} + \epsilon} \cdot scale + shift``, usually in
    one fused pass (:func:`_contiguous_norm`, :class:`_ChannelsLastNorm`); channels_last
    input that :func:`_formula_fits` (compiled with a gradient, small without one) takes
    :func:`_formula_norm`.

    ``scale`` and ``shift`` are ``(C,)`` (shared by the batch) or ``(N, C)`` (per sample), in the
    statistics' compute dtype (float32 weights with a half input are fine for the kernel).
    """
    n, c = x.shape[0], x.shape[1]
    if x.numel() == 0:  # the formula's empty ops, so that scale and shift get (zero) gradients
        return _formula_norm(x, scale, shift, eps)[0]
    layout = stats._memory_format(x)
    # The group-norm kernel refuses one value per group; the statistics path gives y = shift.
    single_position = all(size == 1 for size in x.shape[2:])
    if layout != torch.contiguous_format and not single_position:
        if eps <= 0:  # torch's batch-norm kernel (:func:`_batch_norm_instances`), contiguous
            return _in_layout(_cin_normalize(x.contiguous(), scale, shift, eps), layout)
        if _formula_fits(x, scale, shift):
            return _formula_norm(x, scale, shift, eps)[0]
        if not stats._blockwise_channels_last(x, scale, shift) or not _plain_autograd(
            x, scale, shift
        ):  # small, or under a torch.func transform: contiguous, same layout
            return _in_layout(_cin_normalize(x.contiguous(), scale, shift, eps), layout)
        # Stable statistics and one scale-and-shift pass on the channels-last view, with a
        # closed-form backward; the output keeps channels_last. (torch's channels_last CPU
        # group-norm kernel computes the variance as E[x^2] - E[x]^2, which cancels on features
        # with a large mean.)
        acc = stats.compute_dtype(x.dtype)
        full_scale = None if scale is None else scale.to(acc).expand(n, c)
        full_shift = None if shift is None else shift.to(acc).expand(n, c)
        return _channels_last_norm(x, full_scale, full_shift, eps)[0]
    if not single_position:
        return _contiguous_norm(x, scale, shift, eps)
    # A single position: x - mu is exactly 0, so y = shift. Formed as written, in the compute
    # dtype: folding the mean into the shift, -mu * a + shift, cancels (and overflows a half
    # x * a, with a up to 1 / sqrt(eps)).
    mean, var = stats._mean_var(x, 0.0, None)
    a = torch.rsqrt(var + eps)
    if eps == 0:  # 1/sigma of the constant channel taken as 0, as torch's kernels do
        a = torch.where(var == 0, 0.0, a)
    if scale is not None:
        a = a * scale
    rank = x.dim()
    y = (x.to(mean.dtype) - _style_keepdim(mean, rank)) * _style_keepdim(a, rank)
    if shift is not None:
        y = y + _style_keepdim(shift.expand(n, c), rank)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Conditional instance normalization
# --------------------------------------------------------------------------------------------


def _cin_check_bank(weight: object, bias: object, input: Tensor) -> None:
    num_channels = input.shape[1]
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {stats._described(weight)}")
    stats._check_device(weight, "weight", input)
    if weight.dim() != 2 or weight.shape[1] != num_channels:
        raise ValueError(
            f"weight must have shape (num_styles, C) = (num_styles, {num_channels}) for input "
            f"with C={num_channels} channels, got weight of shape {tuple(weight.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {stats._described(bias)}")
        stats._check_device(bias, "bias", input)
        if bias.shape != weight.shape:
            raise ValueError(
                f"bias must have the shape of weight {tuple(weight.shape)}, "
                f"got bias of shape {tuple(bias.shape)}"
            )


def _cin_check_ids(ids: Tensor, num_styles: int) -> None:
    if stats._values_unknown(ids) or ids.numel() == 0:
        return
    if ids.device.type == "cpu" and ids.numel() <= stats._FEW_STATISTICS:
        values = ids.reshape(-1).tolist()  # a few ids: Python's min and max, no torch ops
        low, high = min(values), max(values)
    else:
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one read (a CUDA sync), not two
    if low < 0 or high >= num_styles:
        bad = low if low < 0 else high
        raise IndexError(
            f"style id {bad} is out of range for num_styles={num_styles} "
            f"(valid ids are 0 to {num_styles - 1})"
        )


def _cin_ids(style: Tensor, num_styles: int, device: torch.device) -> Tensor:
    """Integer style ids, range-checked (:func:`_cin_check_ids`), as ``long`` on ``device``.
    Under torch.compile and vmap, where the ids cannot be read, a negative id would index from
    the end (compiled code wraps it): it is sent out of range instead, where the indexing
    kernel's own bounds check raises."""
    _cin_check_ids(style, num_styles)
    ids = style.to(device=device, dtype=torch.long)
    if not stats._values_unknown(ids):
        return ids
    return torch.where(ids < 0, num_styles, ids)


def _cin_select(
    style: int | Tensor, weight: Tensor, bias: Tensor | None, batch: int
) -> tuple[Tensor, Tensor | None]:
    """The ``(gamma, beta)`` a style selects: ``(C,)`` if shared by the batch, else ``(N, C)``."""
    num_styles = weight.shape[0]
    if isinstance(style, bool):
        raise TypeError("style must be an int, an integer tensor or a floating tensor, got bool")
    if not isinstance(style, Tensor) and hasattr(type(style), "__index__"):
        style = operator.index(style)  # NumPy's integers too
        if not 0 <= style < num_styles:
            raise IndexError(
                f"style id {int(style)} is out of range for num_styles={num_styles} "
                f"(valid ids are 0 to {num_styles - 1})"
            )
        return weight[style], None if bias is None else bias[style]
    if not isinstance(style, Tensor):
        raise TypeError(
            f"style must be an int, an integer tensor of ids or a floating tensor of mixing "
            f"weights, got {type(style).__name__}"
        )
    if style.dtype == torch.bool or style.is_complex():
        raise TypeError(f"style must hold integer ids or real mixing weights, got {style.dtype}")
    if style.is_floating_point():
        # Style interpolation (Dumoulin et al. 2017, sec. 4): gamma = w @ weight, beta = w @ bias.
        if style.shape not in ((num_styles,), (batch, num_styles)):
            raise ValueError(
                f"style mixing weights must have shape (N, num_styles) = ({batch}, {num_styles}) "
                f"or (num_styles,) = ({num_styles},), got style of shape {tuple(style.shape)} "
                f"(per-sample style ids must be an integer tensor: style.long())"
            )
        mix = style.to(device=weight.device, dtype=weight.dtype)  # like the ids below
        return mix @ weight, None if bias is None else mix @ bias
    if style.dim() == 0:
        ids = _cin_ids(style.reshape(1), num_styles, weight.device)
        gamma = weight.index_select(0, ids)[0]
        return gamma, None if bias is None else bias.index_select(0, ids)[0]
    if style.shape != (batch,):
        raise ValueError(
            f"style ids must have shape (N,) = ({batch},), one id per sample, "
            f"got style of shape {tuple(style.shape)}"
        )
    ids = _cin_ids(style, num_styles, weight.device)
    # index_select's gradient is zero outside the selected rows: only chosen styles are trained.
    return weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids)


@stats._float64_on_overflow()
def conditional_instance_norm(
    input: Tensor,
    style: int | Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Conditional instance normalization (Dumoulin et al. 2017, eq. 5).

    .. math::

        y_{ncm} = \gamma_{s_n, c} \frac{x_{ncm} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}}
            + \beta_{s_n, c}

    with the biased per-sample, per-channel statistics of :func:`stylenorm.stats.mean_var` and
    one row of the banks :math:`\gamma, \beta \in \mathbb{R}^{S \times C}` per style. A style is

    - an ``int`` or a 0-dim integer tensor: one style for the whole batch;
    - an integer tensor ``(N,)``: style :math:`s_n` for sample :math:`n`;
    - a floating tensor ``(N, S)`` or ``(S,)`` of mixing weights :math:`w` (style interpolation,
      Dumoulin et al. 2017 sec. 4): :math:`\gamma_n = \sum_s w_{ns} \gamma_s` and
      :math:`\beta_n = \sum_s w_{ns} \beta_s`, i.e. ``w @ weight`` and ``w @ bias``. The weights
      are not normalized; use a convex combination to interpolate. A floating tensor is
      always read as weights, also where ``N = S``: per-sample ids given as floats (from a
      float collate, say) must be cast first, ``style.long()``.

    Only the selected rows (rows with a non-zero mixing weight) receive a non-zero gradient. Ids
    are checked before anything is computed: an id outside ``[0, S)`` raises ``IndexError``.

    Computed as one fused group-norm pass (the batch viewed as ``N*C`` groups), with a
    precise backward (and, above |mean|/std = 30, refined statistics) where some |mean|/std
    exceeds 1 (on the CPU); large channels_last CPU input takes one blockwise statistics pass and
    one scale-and-shift pass on its own layout instead (small channels_last input without a
    gradient, a few whole-tensor ops), and channels_last input gives channels_last output.
    Under torch.compile, channels_last input with a gradient is traced as the formula on its
    own layout (corrected two-pass statistics), which compiles to a faster backward.

    Args:
        input: features ``(N, C, *spatial)``.
        style: style id(s) or mixing weights, see above.
        weight: the :math:`\gamma` bank, ``(S, C)``.
        bias: the :math:`\beta` bank, ``(S, C)``, or None for no shift.
        eps: added to the variance inside the square root. Default: 1e-5.

    Shape:
        - Input: :math:`(N, C, *)`; style: ``int``, :math:`()`, :math:`(N)`, :math:`(N, S)`
          or :math:`(S)`
        - Output: :math:`(N, C, *)`, same memory format as the input

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> weight, bias = torch.rand(4, 3), torch.randn(4, 3)
        >>> y = conditional_instance_norm(x, torch.tensor([0, 3]), weight, bias)
        >>> ref = torch.nn.functional.instance_norm(x[1:], weight=weight[3], bias=bias[3])
        >>> torch.allclose(y[1:], ref, atol=1e-5)
        True
    """
    input = stats.check_features(input, "input")
    eps = stats._check_eps(eps)
    _cin_check_bank(weight, bias, input)
    gamma, beta = _cin_select(style, weight, bias, input.shape[0])
    dtype = stats.compute_dtype(input.dtype)
    return _cin_normalize(input, gamma.to(dtype), None if beta is None else beta.to(dtype), eps)


# --------------------------------------------------------------------------------------------
# Adaptive instance normalization
# --------------------------------------------------------------------------------------------


class StyleRegion(NamedTuple):
    """One region of :func:`adain_regions`: where (``content_mask``) which style goes.

    A plain tuple ``(style, content_mask)`` or ``(style, content_mask, style_mask)`` works too.

    Attributes:
        style: style features ``(N or 1, C, *style_spatial)``.
        content_mask: weights ``(N or 1, 1 or C, *spatial)`` in [0, 1] over the content: where
            the content statistics are measured and the stylized output is written.
        style_mask: optional non-negative weights ``(N or 1, 1 or C, *style_spatial)``: which
            style positions count in the style statistics.

    Example:
        >>> content, style = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
        >>> left = torch.zeros(1, 1, 8, 8)
        >>> left[..., :4] = 1.0
        >>> region = StyleRegion(style, left)
        >>> region.style_mask is None
        True
        >>> adain_regions(content, [region, StyleRegion(3 * style, 1 - left)]).shape
        torch.Size([1, 3, 8, 8])
    """

    style: Tensor
    content_mask: Tensor
    style_mask: Tensor | None = None


def _adain_shape_error(name: str, what: str, got: Tensor, content: Tensor) -> ValueError:
    return ValueError(
        f"{name} must {what}; got {name} of shape {tuple(got.shape)} "
        f"for content of shape {tuple(content.shape)}"
    )


def _adain_image_stats(
    style: object,
    style_mask: object,
    content: Tensor,
    correction: float,
    eps: float,
    name: str = "style",
    mask_name: str = "style_mask",
) -> tuple[Tensor, Tensor]:
    """Mean and std ``(N or 1, C)`` of a style image batch, in the content's compute dtype."""
    s = stats.check_features(style, name)
    stats._check_device(s, name, content, "content")
    if s.shape[1] != content.shape[1]:
        raise _adain_shape_error(name, "have the content's number of channels", s, content)
    if s.shape[0] not in (1, content.shape[0]):
        raise _adain_shape_error(name, "have batch size 1 or the content's batch size", s, content)
    mask = None if style_mask is None else stats.check_mask(style_mask, s, mask_name, name)
    mean, var = stats._mean_var(s, correction, mask, mask_name, x_name=name)
    dtype = stats.compute_dtype(content.dtype)
    return mean.to(dtype), (var + eps).sqrt().to(dtype)


def _adain_given_stats(value: object, name: str, content: Tensor) -> Tensor:
    """A precomputed statistic as a tensor broadcastable to ``content``, keepdim form."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {stats._described(value)}")
    stats._check_device(value, name, content, "content")
    n, c, rank = content.shape[0], content.shape[1], content.dim()
    shape = tuple(value.shape)
    if shape == (c,):
        value = value.reshape(1, c)
    elif not (
        value.dim() in (2, rank)
        and shape[0] in (1, n)
        and shape[1] == c
        and all(v in (1, s) for v, s in zip(shape[2:], content.shape[2:], strict=False))
    ):
        raise _adain_shape_error(
            name,
            "have shape (C,), (N or 1, C) or (N or 1, C, *spatial) matching content",
            value,
            content,
        )
    return _style_keepdim(value.to(stats.compute_dtype(content.dtype)), rank)


def _adain_check_weights(weights: object, count: int, content: Tensor) -> Tensor:
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        raise TypeError(
            f"style_weights must be a floating-point tensor, got {stats._described(weights)}"
        )
    n = content.shape[0]
    if weights.shape not in ((count,), (n, count)):
        raise ValueError(
            f"style_weights must have shape (N, K) = ({n}, {count}) or (K,) = ({count},) for "
            f"K={count} styles and content of shape {tuple(content.shape)}, got "
            f"style_weights of shape {tuple(weights.shape)}"
        )
    # Small control values: moved to the content's device, like CIN's style ids.
    dtype = stats.compute_dtype(content.dtype)
    return weights.to(device=content.device, dtype=dtype).reshape(-1, count)


def _adain_split(value: object, name: str, images: bool) -> list[object]:
    """The K entries of a sequence, or of a tensor stacked along dim 0.

    A stack of style images (``images=True``) keeps a batch dim of 1 per entry.
    """
    if isinstance(value, Tensor):
        return [value[k : k + 1] if images else value[k] for k in range(value.shape[0])]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(value).__name__}")


def _adain_style_stats(
    content: Tensor,
    style: Tensor | Sequence[Tensor] | None,
    style_mean: Tensor | Sequence[Tensor] | None,
    style_std: Tensor | Sequence[Tensor] | None,
    style_mask: Tensor | Sequence[Tensor | None] | None,
    style_weights: Tensor | None,
    correction: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Target mean and std, broadcastable to ``content`` (keepdim form), compute dtype."""
    rank = content.dim()
    if style is not None:
        if style_mean is not None or style_std is not None:
            raise ValueError("give either style or style_mean/style_std, not both")
    else:
        if style_mean is None or style_std is None:
            missing = "style_mean" if style_mean is None else "style_std"
            raise ValueError(f"{missing} is required: give style, or both style_mean and style_std")
        if style_mask is not None:
            raise ValueError("style_mask needs style images; it cannot apply to style_mean/std")

    if style_weights is None:
        if style is not None:
            if not isinstance(style, Tensor):
                raise TypeError(
                    f"style must be a tensor (a sequence of styles needs style_weights), "
                    f"got {type(style).__name__}"
                )
            mean, std = _adain_image_stats(style, style_mask, content, correction, eps)
            return _style_keepdim(mean, rank), _style_keepdim(std, rank)
        return (
            _adain_given_stats(style_mean, "style_mean", content),
            _adain_given_stats(style_std, "style_std", content),
        )

    # Interpolation of K styles (Huang & Belongie 2017, sec. 7): AdaIN is affine in (mean, std),
    # so mixing the K outputs equals one AdaIN with the mixed statistics.
    means: list[Tensor] = []
    stds: list[Tensor] = []
    if style is not None:
        styles = _adain_split(style, "style", images=True)
        masks: list[object] = [None] * len(styles)
        if style_mask is not None:
            masks = _adain_split(style_mask, "style_mask", images=True)
        if len(masks) != len(styles):
            raise ValueError(
                f"style_mask must give one mask (or None) per style: got {len(masks)} masks for "
                f"{len(styles)} styles"
            )
        for k, (s, m) in enumerate(zip(styles, masks, strict=True)):
            mean, std = _adain_image_stats(
                s, m, content, correction, eps, f"style[{k}]", f"style_mask[{k}]"
            )
            means.append(_style_keepdim(mean, rank))
            stds.append(_style_keepdim(std, rank))
    else:
        assert style_mean is not None and style_std is not None
        mean_list = _adain_split(style_mean, "style_mean", images=False)
        std_list = _adain_split(style_std, "style_std", images=False)
        if len(mean_list) != len(std_list):
            raise ValueError(
                f"style_mean and style_std must give the same number of styles, got "
                f"{len(mean_list)} and {len(std_list)}"
            )
        for k, (m, s) in enumerate(zip(mean_list, std_list, strict=True)):
            means.append(_adain_given_stats(m, f"style_mean[{k}]", content))
            stds.append(_adain_given_stats(s, f"style_std[{k}]", content))
    if not means:
        raise ValueError("interpolation needs at least one style, got an empty sequence")
    weights = _adain_check_weights(style_weights, len(means), content)
    first = _style_keepdim(weights[:, 0], rank)
    mean, std = first * means[0], first * stds[0]
    for k in range(1, len(means)):
        w = _style_keepdim(weights[:, k], rank)
        mean, std = torch.addcmul(mean, w, means[k]), torch.addcmul(std, w, stds[k])
    return mean, std


def _adain_check_alpha(alpha: object, content: Tensor) -> float | Tensor:
    if stats._is_real(alpha):
        value = float(alpha)  # type: ignore[arg-type]
        if not math.isfinite(value):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        return value
    if not isinstance(alpha, Tensor) or not alpha.is_floating_point():
        raise TypeError(
            f"alpha must be a number or a floating tensor, got {stats._described(alpha)}"
        )
    if alpha.shape not in ((), (content.shape[0],)):
        raise _adain_shape_error("alpha", "be a number or have shape () or (N,)", alpha, content)
    # Moved to the content's device, like the style weights.
    alpha = alpha.to(device=content.device, dtype=stats.compute_dtype(content.dtype))
    return _style_keepdim(alpha.reshape(-1), content.dim())


def _adain_check_content_masks(masks: list[Tensor]) -> None:
    """Region weights must add up to at most 1 at every position (they split the output)."""
    if stats._values_unknown(*masks):
        return
    total = masks[0] if len(masks) == 1 else sum(masks[1:], masks[0])
    assert isinstance(total, Tensor)
    if total.numel() and bool(total.max() > 1 + 1e-5):
        what = "content_mask" if len(masks) == 1 else "the content masks of all regions"
        raise ValueError(
            f"{what} must be at most 1 (in total) at every position, got a maximum of "
            f"{float(total.max())}: the output blends stylized and content features by it"
        )


class _AdaINTerm(NamedTuple):
    r"""One style's part of the output: :math:`y = r (x - \mu_c) + \mu_s` with
    :math:`r = \sigma_s/\sigma_c`, blended with the content by :math:`\alpha` and the mask
    :math:`m`. As a change to the content, :math:`m\,(k\,(x - \mu_c) + s)` with
    :math:`k = \alpha(r - 1)` and :math:`s = \alpha(\mu_s - \mu_c)`, so that
    :math:`x + k (x - \mu_c) + s = \alpha y + (1 - \alpha) x` (:func:`_adain_apply`)."""

    mean: Tensor  # mu_c, (N, C, 1, ..., 1)
    ratio: Tensor  # sigma_s / sigma_c
    style_mean: Tensor  # mu_s
    alpha: float | Tensor
    mask: Tensor | None
    large_mean: bool  # some |mu_c| / sqrt(var_c + eps) above stats._REFINE_ABOVE_RATIO

    @property
    def k(self) -> Tensor:
        return self.alpha * (self.ratio - 1.0)

    @property
    def shift(self) -> Tensor:
        return self.alpha * (self.style_mean - self.mean)


def _adain_coefficients(
    content: Tensor,
    content_mask: Tensor | None,
    mean_s: Tensor,
    std_s: Tensor,
    alpha: float | Tensor,
    correction: float,
    eps: float,
    mask_name: str = "content_mask",
) -> _AdaINTerm:
    r""":class:`_AdaINTerm` of one style, with the content statistics under ``content_mask``
    (``mask_name`` in errors). Where the mask is empty for a sample, its statistics are
    placeholders: the term is multiplied by that mask, so the content passes through."""
    rank = content.dim()
    mean_c, var_c = stats._mean_var(
        content, correction, content_mask, mask_name, empty_ok=True, x_name="content"
    )
    spread = var_c + eps
    if eps > 0:
        inv_std_c = torch.rsqrt(spread)
    else:
        # eps = 0: a constant channel (or a one-position region) has no spread; its 1/sigma is
        # taken as 0, as torch's kernels and the fused path (_cin_normalize) take it, so the
        # output is the style mean, not NaN. (rsqrt of 1 on the other branch: finite gradients.)
        positive = spread > 0
        inv_std_c = torch.where(positive, torch.rsqrt(torch.where(positive, spread, 1.0)), 0.0)
    # With eps: the folded form's terms scale with 1/sqrt(var + eps), so a spread far below
    # sqrt(eps) cancels no more (measured: at std 1e-4, |mean|/std 1e3, output 1.3e-5 folded
    # against 1.0e-5 term by term and for the plain formula; input gradient 1.5e-7 for all).
    large_mean = stats._needs_refining(mean_c.detach(), inv_std_c.detach(), content)
    mean_c, inv_std_c = _style_keepdim(mean_c, rank), _style_keepdim(inv_std_c, rank)
    return _AdaINTerm(mean_c, std_s * inv_std_c, mean_s, alpha, content_mask, large_mean)


def _adain_apply(content: Tensor, terms: list[_AdaINTerm]) -> Tensor:
    r"""``x + \sum_r m_r (k_r (x - \mu_r) + s_r)``.

    Usually folded into ``A x + B`` (:math:`A = 1 + \sum_r m_r k_r`,
    :math:`B = \sum_r m_r (s_r - k_r \mu_r)`) and applied in one ``addcmul`` pass. Where some
    content mean is large against its spread, as the blend
    :math:`(1 - \sum_r w_r) x + \sum_r w_r y_r` of :math:`y_r = r_r (x - \mu_r) + \mu_{s,r}`
    with :math:`w_r = \alpha m_r` instead: the gradient of the folded form sums ``g x`` and
    ``g mu`` separately, which then cancel (the input gradient was 15x further from float64 at
    |mean|/std = 1e3), and ``x + change`` rounds at the content's magnitude where the output is
    far from it (at a content mean of 1e4, 1.2e-3 off float64 with a mask of ones, against
    4e-4 unmasked).
    """
    if any(term.large_mean for term in terms):
        total: float | Tensor = 0.0
        blend: float | Tensor = 0.0
        for term in terms:
            weight = term.alpha if term.mask is None else term.alpha * term.mask
            stylized = torch.addcmul(term.style_mean, content - term.mean, term.ratio)
            blend, total = blend + weight * stylized, total + weight
        if isinstance(total, float) and total == 1.0:  # the style alone, alpha = 1
            out = blend
        else:
            out = blend + content * (1.0 - total)
        assert isinstance(out, Tensor)
        return out.to(content.dtype)
    if len(terms) == 1 and terms[0].mask is None:
        k = terms[0].k
        scale, shift = 1.0 + k, terms[0].shift - k * terms[0].mean
    else:
        # Regions split the output.
        scale = torch.ones((), dtype=terms[0].ratio.dtype, device=content.device)
        shift = torch.zeros((), dtype=terms[0].ratio.dtype, device=content.device)
        for term in terms:
            k = term.k
            b = term.shift - k * term.mean
            if term.mask is None:
                scale, shift = scale + k, shift + b
            else:
                scale = torch.addcmul(scale, k, term.mask)
                shift = torch.addcmul(shift, b, term.mask)
    # Spatial maps (masks, SPADE-style statistics) follow the content's layout, so the output
    # keeps channels_last.
    layout = stats._memory_format(content)
    scale = scale.to(content.dtype).contiguous(memory_format=layout)
    shift = shift.to(content.dtype).contiguous(memory_format=layout)
    return torch.addcmul(shift, content, scale)


@stats._float64_on_overflow()
def adain(
    content: Tensor,
    style: Tensor | Sequence[Tensor] | None = None,
    *,
    style_mean: Tensor | Sequence[Tensor] | None = None,
    style_std: Tensor | Sequence[Tensor] | None = None,
    alpha: float | Tensor = 1.0,
    content_mask: Tensor | None = None,
    style_mask: Tensor | Sequence[Tensor | None] | None = None,
    style_weights: Tensor | None = None,
    eps: float = 1e-5,
    correction: float = 0,
) -> Tensor:
    r"""Adaptive instance normalization (Huang & Belongie 2017, eq. 8), with its extensions.

    .. math::

        y = \sigma_s \frac{x - \mu_c}{\sigma_c} + \mu_s, \qquad
        \text{out} = m \,(\alpha y + (1 - \alpha) x) + (1 - m)\, x

    where :math:`\mu_c, \sigma_c` are the per-sample, per-channel statistics of the content
    (weighted by the content mask :math:`m` if given, else :math:`m \equiv 1`), :math:`\mu_s,
    \sigma_s` those of the style (weighted by the style mask) or given directly, and
    :math:`\sigma = \sqrt{\operatorname{var} + \epsilon}` with the biased variance by default on
    both sides, so ``adain(x, x)`` returns ``x`` up to rounding.

    - **Style** ``(N or 1, C, *style_spatial)``: any spatial size, batch 1 broadcasts.
    - **Precomputed statistics** ``style_mean``/``style_std`` instead of ``style`` (a style
      encoder's output, StyleGAN's :math:`y_s, y_b`): ``(C,)``, ``(N or 1, C)``, or spatial maps
      ``(N or 1, C, *spatial)`` matching the content (dims of 1 broadcast) for spatially varying
      modulation (the SPADE idea).
    - **Interpolation** (paper sec. 7.2): with ``style_weights`` :math:`w` of shape ``(N, K)``
      or ``(K,)``, ``style`` is a sequence of K style tensors (each ``(N or 1, C, *)``, sizes may
      differ) or a ``(K, C, *)`` stack of K single style images, and ``style_mask`` a matching
      sequence (entries may be None) or stack; with precomputed statistics, ``style_mean`` and
      ``style_std`` are sequences of K entries or tensors stacked along a leading K dim. The
      statistics are mixed, :math:`\mu_s = \sum_k w_k \mu_k`, :math:`\sigma_s = \sum_k w_k
      \sigma_k`, in one pass; since AdaIN is affine in :math:`(\mu_s, \sigma_s)`, this equals
      :math:`\sum_k w_k \operatorname{AdaIN}(x, s_k)` whenever :math:`\sum_k w_k = 1`.
    - **Content-style trade-off** ``alpha``: 1 is full stylization, 0 returns the content;
      values outside [0, 1] extrapolate (more, or "negative", style) and are allowed.
    - **Spatial control** (paper sec. 7.4): ``content_mask`` (values in [0, 1]) restricts where
      the content statistics are measured and where the output is written: outside it the
      content passes through, a soft mask blends (a sample whose content mask is empty, say a
      region missing from that image, passes through whole). ``style_mask`` restricts which
      style positions count (it must not be empty). Statistics are normalized by the mask's
      total weight. For several regions with several styles in one call see
      :func:`adain_regions`.

    Gradients flow to the content, the style, the precomputed statistics, the interpolation
    weights, a soft mask and a tensor ``alpha``, to any order. Without masks, spatial maps or
    ``correction``, this is one fused group-norm pass (plus one ``add`` when ``alpha != 1``),
    with the precise backward of :func:`instance_norm` at large content means (under
    torch.compile, channels_last content with a gradient is traced as the formula instead, as
    in :func:`conditional_instance_norm`).

    Args:
        content: content features ``(N, C, *spatial)``.
        style: style features, or K of them with ``style_weights``.
        style_mean: precomputed target mean (instead of ``style``).
        style_std: precomputed target standard deviation (instead of ``style``).
        alpha: content-style trade-off, a number or a tensor ``()`` or ``(N,)``. Default: 1.
        content_mask: weights in [0, 1], ``(N or 1, 1 or C, *spatial)``, bool or floating.
        style_mask: non-negative weights ``(N_s or 1, 1 or C, *style_spatial)`` for ``style``.
        style_weights: interpolation weights ``(N, K)`` or ``(K,)``.
        eps: added to both variances inside the square roots. Default: 1e-5.
        correction: 0 for the biased variance (default), 1 for Bessel's unbiased one (as some
            ports of AdaIN use); applies to the content and to style images.

    Shape:
        - Content: :math:`(N, C, *)`; output: the same shape and memory format.

    Example:
        >>> content, style = torch.randn(2, 3, 16, 16), 5 + 2 * torch.randn(1, 3, 32, 32)
        >>> out = adain(content, style)
        >>> mean, std = stats.mean_std(out)
        >>> bool((mean - 5).abs().max() < 0.3), bool((std - 2).abs().max() < 0.3)
        (True, True)
        >>> torch.allclose(adain(content, content), content, atol=1e-5)
        True
    """
    content = stats.check_features(content, "content")
    eps = stats._check_eps(eps)
    corr = stats._check_correction(correction)
    alpha_value = _adain_check_alpha(alpha, content)
    mean_s, std_s = _adain_style_stats(
        content, style, style_mean, style_std, style_mask, style_weights, corr, eps
    )
    cmask = None
    if content_mask is not None:
        cmask = stats.check_mask(content_mask, content, "content_mask", "content")
        _adain_check_content_masks([cmask])
    n, c, rank = content.shape[0], content.shape[1], content.dim()
    per_channel = mean_s.shape[2:] == std_s.shape[2:] == (1,) * (rank - 2)
    shared = mean_s.shape[0] == std_s.shape[0] == 1 and not isinstance(alpha_value, Tensor)
    fused = cmask is None and per_channel and corr == 0
    if fused:
        # alpha * y + (1 - alpha) x with y an instance norm scaled by std_s and shifted by mean_s.
        scale, shift = std_s, mean_s
        if isinstance(alpha_value, Tensor) or alpha_value != 1.0:
            scale, shift = alpha_value * scale, alpha_value * shift
        if shared:  # (C,): the kernel's own per-channel parameters, no per-sample copies
            scale, shift = scale.reshape(c), shift.reshape(c)
        else:
            scale, shift = scale.reshape(-1, c).expand(n, c), shift.reshape(-1, c).expand(n, c)
        out = _cin_normalize(content, scale, shift, eps)
        if isinstance(alpha_value, Tensor):
            return torch.addcmul(out, content, (1.0 - alpha_value).to(content.dtype))
        if alpha_value != 1.0:
            return torch.add(out, content, alpha=1.0 - alpha_value)
        return out
    term = _adain_coefficients(content, cmask, mean_s, std_s, alpha_value, corr, eps)
    return _adain_apply(content, [term])


@stats._float64_on_overflow()
def adain_regions(
    content: Tensor,
    regions: Sequence[StyleRegion | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor | None]],
    *,
    alpha: float | Tensor = 1.0,
    eps: float = 1e-5,
    correction: float = 0,
) -> Tensor:
    r"""AdaIN with several styles in several regions at once (Huang & Belongie 2017, sec. 7.4).

    .. math::

        \text{out} = x + \sum_r m_r \left(\alpha y_r + (1 - \alpha) x - x\right), \qquad
        y_r = \sigma_{s_r} \frac{x - \mu_{c,r}}{\sigma_{c,r}} + \mu_{s_r}

    Region :math:`r` is a :class:`StyleRegion` ``(style, content_mask, style_mask=None)``: the
    content statistics :math:`\mu_{c,r}, \sigma_{c,r}` are measured under ``content_mask``
    :math:`m_r`, the style statistics under ``style_mask``, and :math:`y_r` is written where
    :math:`m_r` is set. Positions outside every region keep the content; soft masks blend. The
    content masks must add up to at most 1 at every position (disjoint binary masks are the
    paper's case). Each region is exactly :func:`adain` with that region's masks, and the result
    is computed in one pass over the content per region plus one output pass.

    Args:
        content: content features ``(N, C, *spatial)``.
        regions: a non-empty sequence of :class:`StyleRegion` or plain tuples
            ``(style, content_mask)`` / ``(style, content_mask, style_mask)``.
        alpha: content-style trade-off shared by all regions (number, or tensor ``()``/``(N,)``).
        eps: added to the variances inside the square roots. Default: 1e-5.
        correction: 0 (biased, default) or 1 (unbiased) variance.

    Shape:
        - Content: :math:`(N, C, *)`; masks :math:`(N \text{ or } 1, 1 \text{ or } C, *)`;
          output: the same shape as the content.

    Example:
        >>> content = torch.randn(1, 3, 8, 8)
        >>> left = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
        >>> left[..., :4] = True
        >>> sky, ground = torch.randn(1, 3, 8, 8) + 4, torch.randn(1, 3, 8, 8) - 4
        >>> out = adain_regions(content, [(sky, left), (ground, ~left)])
        >>> bool(out[..., :4].mean() > 3), bool(out[..., 4:].mean() < -3)
        (True, True)
    """
    content = stats.check_features(content, "content")
    eps = stats._check_eps(eps)
    corr = stats._check_correction(correction)
    alpha_value = _adain_check_alpha(alpha, content)
    if isinstance(regions, Tensor) or not isinstance(regions, Sequence) or len(regions) == 0:
        raise ValueError("regions must be a non-empty sequence of (style, content_mask[, mask])")
    parsed: list[StyleRegion] = []
    for r, item in enumerate(regions):
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise TypeError(
                f"regions[{r}] must be a StyleRegion or a tuple (style, content_mask[, "
                f"style_mask]), got {type(item).__name__}"
            )
        parsed.append(StyleRegion(*item))
    masks = [
        stats.check_mask(p.content_mask, content, f"regions[{r}].content_mask", "content")
        for r, p in enumerate(parsed)
    ]
    _adain_check_content_masks(masks)
    terms: list[_AdaINTerm] = []
    for r, (region, mask) in enumerate(zip(parsed, masks, strict=True)):
        mean_s, std_s = _adain_image_stats(
            region.style,
            region.style_mask,
            content,
            corr,
            eps,
            f"regions[{r}].style",
            f"regions[{r}].style_mask",
        )
        term = _adain_coefficients(
            content,
            mask,
            _style_keepdim(mean_s, content.dim()),
            _style_keepdim(std_s, content.dim()),
            alpha_value,
            corr,
            eps,
            f"regions[{r}].content_mask",
        )
        terms.append(term)
    return _adain_apply(content, terms)


# ==============================================================================================
# Style losses: Gram matrices, Gram loss, mean/std loss and MMD
# ==============================================================================================

GRAM_NORMALIZATIONS = ("none", "hw", "chw")
LOSS_REDUCTIONS = ("mean", "sum", "batchmean", "none")
MMD_KERNELS = ("linear", "polynomial", "gaussian")


# --------------------------------------------------------------------------------------------
# Validation helpers (shared by every loss; shapes are checked in Python, values in eager only)
# --------------------------------------------------------------------------------------------


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {expected}; got {value!r}")
    return value


def _check_same_channels(
    input_channels: int,
    target_channels: int,
    input_name: str = "input",
    target_name: str = "target",
) -> None:
    if input_channels != target_channels:
        raise ValueError(
            f"{target_name} must have the channels of {input_name}: expected C={input_channels}, "
            f"got C={target_channels}"
        )


def _check_batch(
    input_batch: int, target_batch: int, input_name: str = "input", target_name: str = "target"
) -> None:
    if target_batch not in (1, input_batch):
        raise ValueError(
            f"{target_name} must have batch size 1 (one target for every sample) or "
            f"{input_batch} (the batch size of {input_name}); got batch size {target_batch}"
        )


def _check_pair(input: object, target: object) -> tuple[Tensor, Tensor]:
    x = stats.check_features(input, "input")
    y = stats.check_features(target, "target")
    stats._check_device(y, "target", x)
    _check_same_channels(x.shape[1], y.shape[1])
    _check_batch(x.shape[0], y.shape[0])
    return x, y


def _autocast_off(x: object) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled on ``x``'s device while a loss or Gram matrix is computed.

    Autocast would run the Gram and kernel matrix products in half precision (bfloat16 Grams, a
    bfloat16 Gaussian MMD several percent off); without it every statistic is reduced in float32
    (:func:`stylenorm.stats.compute_dtype`), so under autocast a loss is the float32 loss of the
    same (possibly half-precision) input.
    """
    if not isinstance(x, Tensor):  # left to the argument checks, which name it
        return contextlib.nullcontext()
    if _autocast_enabled(x):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_enabled(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (False where it has none, e.g. meta)."""
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _float32_under_autocast(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with autocast off on the device of its first argument (see _autocast_off)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        first = args[0] if args else None
        if not isinstance(first, Tensor):
            return fn(*args, **kwargs)
        with _autocast_off(first):
            return fn(*args, **kwargs)

    return wrapper


def _loss_position_weights(mask: Tensor | None, x: Tensor, name: str, x_name: str) -> Tensor | None:
    """Validate a per-position mask for a Gram/MMD and return it as ``(N or 1, 1, M)`` weights.

    Per-channel masks are rejected: a Gram entry pairs two channels, so weighting channel ``i``
    and ``j`` differently has no single meaning.
    """
    if mask is None:
        return None
    w = stats.check_mask(mask, x, name, x_name)
    if w.shape[1] != 1:
        raise ValueError(
            f"{name} must weight positions, not channels: expected shape (N or 1, 1, *spatial) "
            f"for {x_name} of shape {tuple(x.shape)}; got {name} of shape {tuple(mask.shape)}"
        )
    w = w.to(stats.compute_dtype(x.dtype)).reshape(w.shape[0], 1, -1)
    stats._check_weight_total(w.sum(-1).reshape(-1), 0.0, name)
    return w


def _loss_features(x: Tensor) -> Tensor:
    """The ``(N, C, M)`` feature matrices in the compute dtype (reshape: x may be strided; M
    spelled out, so that an empty batch reshapes too)."""
    return x.to(stats.compute_dtype(x.dtype)).reshape(
        x.shape[0], x.shape[1], stats._num_positions(x)
    )


def _loss_reduce(per_element: Tensor, reduction: str) -> Tensor:
    """Reduce an ``(N, ...)`` tensor of per-element losses as documented in the module."""
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum":
        return per_element.sum()
    if reduction == "batchmean":
        return per_element.sum() / per_element.shape[0]
    return per_element.reshape(per_element.shape[0], math.prod(per_element.shape[1:])).mean(1)


# --------------------------------------------------------------------------------------------
# Gram matrix and Gram loss
# --------------------------------------------------------------------------------------------


def _gram_block_rows(batch: int, channels: int, positions: int) -> int:
    """Rows per block of :func:`_symmetric_bmm`; ``channels`` (one block) where blocks lose.

    Measured on CPU (2 threads, float32): 32-row blocks are fastest up to 128 channels and
    64-row blocks from 256 channels, 1.1x-1.4x faster than one ``bmm``. With fewer than 64
    channels, 1024 positions or 2^17 values per sample the saving is below the cost of the
    extra calls (blocks against one ``bmm``, batches of 2 and 8: 0.56x-0.96x at 256 positions
    and 64 to 512 channels, 0.86x-1.02x at (64, 1024); 1.05x-1.15x at (64, 4096) and
    (128, 4096), 0.95x-1.13x at (128, 1024), 1.21x-1.44x from 256 channels and 1024
    positions), and with a batch of one the smaller products lose the second thread.
    """
    if batch < 2 or channels < 64 or positions < 1024 or channels * positions < 1 << 17:
        return channels
    return 32 if channels < 256 else 64


def _symmetric_bmm(lhs: Tensor, rhs: Tensor) -> Tensor:
    r"""``lhs @ rhs.mT`` for ``(N, C, M)`` operands whose product is known to be symmetric.

    Only the blocks on and above the diagonal are multiplied: each block of rows
    :math:`i{:}j` of ``lhs`` against rows :math:`i{:}C` of ``rhs``, about
    :math:`(1 + 1/k)/2` of the work for :math:`k` blocks; the entries below the diagonal are
    the transposes of those above. Every entry is the same kind of sum of products as in the
    full product. On the CPU only; elsewhere one ``bmm``. A single sample
    with at least 4096 (an even number of) positions is split into two halves of its positions,
    multiplied as a batch of two and summed, which keeps both threads of ``bmm`` busy. Assembled
    with ``cat`` (no in-place writes), so the forward of :class:`_Gram` also runs under
    ``vmap``.
    """
    batch, channels, positions = lhs.shape
    if lhs.device.type != "cpu":
        # The blocks are a CPU measure: on CUDA one bmm is one launch, and the blocks' dozen
        # measured 2x-25x its time (H200, float32, 64-256 channels, 1024-65536 positions).
        return torch.bmm(lhs, rhs.mT)
    if batch == 1 and positions >= 4096 and positions % 2 == 0:
        halves = (channels, 2, positions // 2)
        product = _symmetric_bmm(
            lhs[0].view(halves).transpose(0, 1), rhs[0].view(halves).transpose(0, 1)
        )
        return product.sum(0, keepdim=True)
    step = _gram_block_rows(batch, channels, positions)
    if step >= channels:
        return torch.bmm(lhs, rhs.mT)
    blocks: list[tuple[int, Tensor]] = []  # (first row, rows first..stop against first..C)
    rows = []
    for start in range(0, channels, step):
        stop = min(start + step, channels)
        below = [block[:, :, start - first : stop - first].mT for first, block in blocks]
        block = torch.bmm(lhs[:, start:stop], rhs[:, start:].mT)
        rows.append(torch.cat([*below, block], dim=2))
        blocks.append((start, block))
    return torch.cat(rows, dim=1)


def _scaled_gram(features: Tensor, scale: float) -> Tensor:
    r""":math:`s\,F F^\top` without autograd: the forward of :class:`_Gram`."""
    gram = _symmetric_bmm(features, features)
    return gram if scale == 1.0 else gram.mul_(scale)


class _Gram(torch.autograd.Function):
    r"""Scaled Gram matrices :math:`G = s\,F F^\top` of ``(N, C, M)`` features, ``(N, C, C)``.

    Both passes use the symmetry of the product. The forward multiplies only the blocks on and
    above the diagonal (:func:`_symmetric_bmm`; on the CPU, where they pay), and the backward is
    :math:`\partial F = s\,(\partial G + \partial G^\top) F`: one batched matmul where
    autograd's generic ``bmm`` backward takes two (one per operand). The backward is written in
    differentiable ops, so double backward works.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(features: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        return _scaled_gram(features, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float], output: Tensor) -> None:
        features, scale = inputs
        ctx.save_for_backward(features)
        ctx.scale = scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (features,) = ctx.saved_tensors
        symmetric = grad + grad.mT
        if features.stride(1) == 1 and features.stride(2) != 1:
            # channels_last memory, (N, M, C) contiguous: (S F)^T = F^T S for a symmetric S, so
            # the gradient is computed in the features' own layout (autograd would otherwise
            # copy a contiguous gradient into channels_last, a transposing copy).
            grad_features = torch.bmm(features.mT, symmetric).mT
        else:
            grad_features = torch.bmm(symmetric, features)
        return (grad_features if ctx.scale == 1.0 else grad_features * ctx.scale), None


def _gram(features: Tensor, scale: float) -> Tensor:
    """:class:`_Gram` of ``(N, C, M)`` features, its forward run directly where no gradient is
    recorded."""
    if not stats._recording(features):
        return _scaled_gram(features, scale)
    gram: Tensor = stats._apply(_Gram, features, scale)
    return gram


def _loss_gram(x: Tensor, normalize: str, weights: Tensor | None, center: bool) -> Tensor:
    """Unvalidated Gram matrices of ``x`` in the compute dtype; ``weights`` is ``(N|1, 1, M)``."""
    features = _loss_features(x)
    if center:
        mask = None if weights is None else weights.reshape(weights.shape[0], 1, *x.shape[2:])
        mean, _ = stats._mean_var(x, 0.0, mask)
        features = features - mean.to(features.dtype).unsqueeze(-1)
    if weights is None:
        count = float(features.shape[-1])
        # (max: zero channels give an empty Gram, whatever its scale)
        scale = {"none": 1.0, "hw": 1.0 / count}.get(normalize, 1.0 / max(count * x.shape[1], 1))
        return _gram(features, scale)
    if weights.requires_grad or not _plain_autograd(weights) or stats._is_compiling():
        # A mask with a gradient (sqrt(w) has an infinite derivative at 0), under a torch.func
        # transform (vmap, forward-mode tangents) or compile (where negative weights are not
        # rejected): the product as written.
        gram = torch.bmm(features * weights, features.mT)
    else:
        # F diag(w) F^T = (F sqrt(w)) (F sqrt(w))^T: the symmetric product, blocked forward and
        # one-matmul backward in the features' layout.
        gram = _gram(features * weights.sqrt(), 1.0)
    if normalize == "none":
        return gram
    total = weights.sum(-1, keepdim=True)
    return gram / (total if normalize == "hw" else total * x.shape[1])


@_float32_under_autocast
def gram_matrix(
    x: Tensor, *, normalize: str = "chw", mask: Tensor | None = None, center: bool = False
) -> Tensor:
    r"""Per-sample Gram matrices of feature maps (Gatys et al. 2015, eq. 3).

    .. math::

        G_n = \frac{1}{Z} F_n \operatorname{diag}(w_n) F_n^\top, \qquad
        Z = \begin{cases} 1 & \texttt{"none"} \\ W_n & \texttt{"hw"} \\ C\,W_n & \texttt{"chw"}
        \end{cases}

    where :math:`F_n` is the ``(C, M)`` feature matrix of sample :math:`n`, :math:`w_n` the
    position weights (all ones without a mask) and :math:`W_n = \sum_m w_{nm}` (:math:`= M`
    without a mask). With ``center=True`` the weighted mean of each channel (from
    :func:`stylenorm.stats.mean_var`) is removed first, so ``normalize="hw"`` gives the biased
    channel covariance.

    Args:
        x: features of shape ``(N, C, *spatial)``, any number (at least one) of spatial dims.
        normalize: ``"none"``, ``"hw"`` (divide by the number of positions) or ``"chw"``
            (divide by channels times positions, the default, as PyTorch's fast-neural-style).
        mask: optional non-negative position weights of shape ``(N or 1, 1, *spatial)``, bool or
            floating, with a positive total for every sample. Per-channel masks are rejected
            (a Gram entry pairs two channels). The count in ``"hw"``/``"chw"`` is the mask's
            total weight.
        center: subtract the (weighted) channel means before forming the Gram matrix.

    Returns:
        Gram matrices of ``x``'s dtype. Half/bfloat16 inputs are multiplied and summed in
        float32; only the result is rounded, so ``"hw"``/``"chw"`` Grams are safe, but a float16
        ``"none"`` Gram (a sum over all positions) can exceed float16's range: use the losses,
        which stay in float32, or ``x.float()``.

    Shape:
        - x: ``(N, C, *spatial)``
        - output: ``(N, C, C)``

    Example:
        >>> x = torch.randn(2, 3, 4, 5)
        >>> g = gram_matrix(x, normalize="hw")
        >>> g.shape
        torch.Size([2, 3, 3])
        >>> f = x.reshape(2, 3, 20)
        >>> torch.allclose(g, f @ f.mT / 20, atol=1e-6)
        True
    """
    x = stats.check_features(x, "x")
    _check_choice(normalize, "normalize", GRAM_NORMALIZATIONS)
    weights = _loss_position_weights(mask, x, "mask", "x")
    return _loss_gram(x, normalize, weights, bool(center)).to(x.dtype)


def _gram_loss_from_gram(
    input: Tensor,
    target_gram: Tensor,
    *,
    normalize: str,
    reduction: str,
    center: bool,
    mask: Tensor | None,
) -> Tensor:
    """:func:`gram_loss` with the target's Gram matrices precomputed (``(1 or N, C, C)``)."""
    input = stats.check_features(input, "input")
    _check_same_channels(input.shape[1], target_gram.shape[1])
    _check_batch(input.shape[0], target_gram.shape[0])
    weights = _loss_position_weights(mask, input, "mask", "input")
    gram = _loss_gram(input, normalize, weights, center)
    target_gram = target_gram.to(gram.dtype).expand_as(gram)
    if reduction == "none":
        return _loss_reduce((gram - target_gram).square(), reduction)
    loss = F.mse_loss(gram, target_gram, reduction="sum" if reduction == "batchmean" else reduction)
    return loss / input.shape[0] if reduction == "batchmean" else loss


@_float32_under_autocast
def gram_loss(
    input: Tensor,
    target: Tensor,
    *,
    normalize: str = "chw",
    reduction: str = "mean",
    mask: Tensor | None = None,
    target_mask: Tensor | None = None,
    center: bool = False,
) -> Tensor:
    r"""Squared error between the Gram matrices of ``input`` and ``target`` (Gatys et al. 2015).

    .. math::

        \ell_n = \frac{1}{C^2} \sum_{i,j} \big(G(x)_{n,ij} - G(y)_{n,ij}\big)^2

    with :math:`G` the :func:`gram_matrix` of the same ``normalize``, ``center`` and masks;
    ``reduction="mean"`` returns :math:`\frac{1}{N}\sum_n \ell_n` (the ``mse_loss`` of the
    Grams), ``"sum"`` returns :math:`C^2 \sum_n \ell_n`, ``"batchmean"``
    :math:`\frac{C^2}{N}\sum_n \ell_n` and ``"none"`` the vector :math:`(\ell_n)`.

    Named conventions (Gatys' :math:`\frac{1}{4 C^2 M^2}\sum(G-A)^2`, fast-neural-style's
    ``chw`` Gram, Magenta, pystiche) are in :mod:`stylenorm.losses`.

    Args:
        input: features ``(N, C, *spatial)``, usually of the image being optimised.
        target: style features ``(1 or N, C, *spatial')``; the spatial size may differ.
        normalize: ``"none"``, ``"hw"`` or ``"chw"`` (default); see :func:`gram_matrix`.
        reduction: ``"mean"`` (default), ``"sum"``, ``"batchmean"`` or ``"none"``.
        mask, target_mask: optional position weights ``(N or 1, 1, *spatial)`` of each side.
        center: compare channel covariances instead of raw Gram matrices.

    Returns:
        A scalar, or ``(N,)`` for ``reduction="none"``; float32 for half/bfloat16 inputs,
        otherwise ``input``'s dtype. Differentiable in ``input`` and ``target``.

    Shape:
        - input: ``(N, C, *spatial)``, target: ``(1 or N, C, *spatial')``
        - output: ``()`` or ``(N,)``

    Example:
        >>> x, y = torch.randn(2, 3, 8, 8), torch.randn(1, 3, 6, 6)
        >>> loss = gram_loss(x, y)
        >>> g = gram_matrix(x)
        >>> torch.allclose(loss, torch.nn.functional.mse_loss(g, gram_matrix(y).expand_as(g)))
        True
    """
    input, target = _check_pair(input, target)
    _check_choice(normalize, "normalize", GRAM_NORMALIZATIONS)
    _check_choice(reduction, "reduction", LOSS_REDUCTIONS)
    target_weights = _loss_position_weights(target_mask, target, "target_mask", "target")
    target_gram = _loss_gram(target, normalize, target_weights, bool(center))
    return _gram_loss_from_gram(
        input,
        target_gram,
        normalize=normalize,
        reduction=reduction,
        center=bool(center),
        mask=mask,
    )


# --------------------------------------------------------------------------------------------
# Mean / standard deviation loss
# --------------------------------------------------------------------------------------------


def _loss_mean_var(
    x: Tensor, correction: float, mask: Tensor | None, name: str, x_name: str
) -> tuple[Tensor, Tensor]:
    """Mean and variance in the compute dtype, with mask errors that name the argument."""
    if mask is None:
        return stats._mean_var(x, correction, None, x_name=x_name)
    return stats._mean_var(x, correction, stats.check_mask(mask, x, name, x_name), name)


def _mean_std_loss_from_stats(
    input: Tensor,
    target_mean: Tensor,
    target_std: Tensor,
    *,
    eps: float,
    correction: float,
    reduction: str,
    mask: Tensor | None,
) -> Tensor:
    """:func:`mean_std_loss` with the target's ``(1 or N, C)`` mean and std precomputed."""
    input = stats.check_features(input, "input")
    _check_same_channels(input.shape[1], target_mean.shape[1])
    _check_batch(input.shape[0], target_mean.shape[0])
    mean, var = _loss_mean_var(input, correction, mask, "mask", "input")
    std = (var + eps).sqrt()
    per_channel = (mean - target_mean.to(mean.dtype)).square() + (
        std - target_std.to(std.dtype)
    ).square()
    return _loss_reduce(per_channel, reduction)


def _loss_target_mean_std(
    target: Tensor, eps: float, correction: float, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    mean, var = _loss_mean_var(target, correction, mask, "target_mask", "target")
    return mean, (var + eps).sqrt()


def _check_mean_std_options(
    eps: object, target_eps: object, correction: object, reduction: object
) -> tuple[float, float, float]:
    eps_value = stats._check_eps(eps)
    target_value = eps_value if target_eps is None else stats._check_eps(target_eps, "target_eps")
    corr = stats._check_correction(correction)
    _check_choice(reduction, "reduction", LOSS_REDUCTIONS)
    return eps_value, target_value, corr


@_float32_under_autocast
def mean_std_loss(
    input: Tensor,
    target: Tensor,
    *,
    eps: float = 1e-5,
    target_eps: float | None = None,
    correction: float = 0,
    reduction: str = "mean",
    mask: Tensor | None = None,
    target_mask: Tensor | None = None,
) -> Tensor:
    r"""Squared error between per-channel means plus between per-channel standard deviations.

    The AdaIN style loss (Huang & Belongie 2017, as their code computes it: squared errors) and
    the BN-statistics loss of Li et al. 2017:

    .. math::

        \ell_{nc} = (\mu_{nc}(x) - \mu_{nc}(y))^2 + (\sigma_{nc}(x) - \sigma_{nc}(y))^2,
        \qquad \sigma = \sqrt{\operatorname{var} + \epsilon}

    with the statistics of :func:`stylenorm.stats.mean_std`. ``reduction="mean"`` returns
    :math:`\frac{1}{NC}\sum_{n,c}\ell_{nc}` (the ``mse_loss`` of the means plus that of the
    stds), ``"sum"`` the sum, ``"batchmean"`` the sum over channels averaged over the batch
    (the original Lua AdaIN code) and ``"none"`` the per-sample mean over channels ``(N,)``.

    Args:
        input: features ``(N, C, *spatial)``.
        target: style features ``(1 or N, C, *spatial')``.
        eps: added to the input's variance inside the square root (default ``1e-5``).
            ``eps=0`` has an infinite gradient on a constant channel.
        target_eps: the same for the target; ``None`` (default) uses ``eps``.
        correction: 0 for the biased variance (default), 1 for the unbiased one.
        reduction: ``"mean"`` (default), ``"sum"``, ``"batchmean"`` or ``"none"``.
        mask, target_mask: optional weights ``(N or 1, C or 1, *spatial)`` (per-channel masks
            are allowed here); weighted statistics as in :func:`stylenorm.stats.mean_var`.

    Returns:
        A scalar, or ``(N,)`` for ``reduction="none"``; float32 for half/bfloat16 inputs.

    Shape:
        - input: ``(N, C, *spatial)``, target: ``(1 or N, C, *spatial')``
        - output: ``()`` or ``(N,)``

    Example:
        >>> x, y = torch.randn(2, 3, 8, 8), 2 + 3 * torch.randn(1, 3, 8, 8)
        >>> loss = mean_std_loss(x, y)
        >>> (mx, sx), (my, sy) = stats.mean_std(x), stats.mean_std(y)
        >>> mse = torch.nn.functional.mse_loss
        >>> torch.allclose(loss, mse(mx, my.expand_as(mx)) + mse(sx, sy.expand_as(sx)))
        True
    """
    input, target = _check_pair(input, target)
    eps_value, target_value, corr = _check_mean_std_options(eps, target_eps, correction, reduction)
    target_mean, target_std = _loss_target_mean_std(target, target_value, corr, target_mask)
    return _mean_std_loss_from_stats(
        input,
        target_mean,
        target_std,
        eps=eps_value,
        correction=corr,
        reduction=reduction,
        mask=mask,
    )


# --------------------------------------------------------------------------------------------
# Maximum mean discrepancy
# --------------------------------------------------------------------------------------------


class _MMDSide(NamedTuple):
    r"""What the MMD needs of one side's per-position feature vectors.

    Closed-form kernels (linear, polynomial of degree 1 or 2) need only the weighted ``mean``
    ``(B, C)`` and second ``moment`` ``(B, C, C)``; the others keep the ``features``
    ``(B, C, M)``, the normalized position ``weights`` ``(B or 1, 1, M)`` and, for a cached
    target, the ``self_term`` :math:`\sum_{ij} q_i q_j k(y_i, y_j)` of shape ``(B,)``.
    """

    mean: Tensor | None = None
    moment: Tensor | None = None
    features: Tensor | None = None
    weights: Tensor | None = None
    self_term: Tensor | None = None


def _mmd_closed_form(kernel: str, degree: int) -> bool:
    return kernel == "linear" or (kernel == "polynomial" and degree <= 2)


def _check_mmd_options(
    kernel: object, degree: object, offset: object, sigma: object, reduction: object
) -> tuple[str, int, float, float]:
    name = _check_choice(kernel, "kernel", MMD_KERNELS)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be a positive integer, got {degree!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a number, got {type(offset).__name__}")
    if not -math.inf < offset < math.inf:  # (not math.isfinite: compiled, offset may be symbolic)
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a finite positive number, got {sigma!r}")
    _check_choice(reduction, "reduction", LOSS_REDUCTIONS)
    return name, degree, float(offset), float(sigma)


def _loss_kernel_matrix(
    a: Tensor, b: Tensor, kernel: str, degree: int, offset: float, sigma: float
) -> Tensor:
    """``(B, Ma, Mb)`` kernel values between the columns of ``a`` ``(B, C, Ma)`` and ``b``."""
    if kernel == "gaussian":
        # Distances are shift-invariant: centring on a's mean keeps |a|^2 + |b|^2 - 2 a.b
        # from cancelling catastrophically on features with a large mean.
        shift = a.detach().mean(-1, keepdim=True)
        a, b = a - shift, b - shift
        squared = a.square().sum(1).unsqueeze(2) + b.square().sum(1).unsqueeze(1) - 2 * (a.mT @ b)
        return torch.exp(squared * (-0.5 / sigma**2))
    return (a.mT @ b + offset).pow(degree)


def _loss_kernel_mean(kernel_matrix: Tensor, p: Tensor, q: Tensor) -> Tensor:
    r""":math:`\sum_{ij} p_i q_j K_{ij}` per batch entry; ``p``, ``q`` are ``(B or 1, 1, M)``."""
    batch = kernel_matrix.shape[0]
    left = p.expand(batch, 1, p.shape[-1])
    right = q.expand(batch, 1, q.shape[-1])
    return torch.bmm(torch.bmm(left, kernel_matrix), right.mT).reshape(batch)


def _mmd_side(
    x: Tensor,
    weights: Tensor | None,
    kernel: str,
    degree: int,
    offset: float,
    sigma: float,
    with_self_term: bool,
) -> _MMDSide:
    """Summarise one side; ``weights`` are the raw ``(B or 1, 1, M)`` position weights."""
    if _mmd_closed_form(kernel, degree):
        mask = None if weights is None else weights.reshape(weights.shape[0], 1, *x.shape[2:])
        mean, _ = stats._mean_var(x, 0.0, mask)
        moment = None
        if kernel == "polynomial" and degree == 2:
            moment = _loss_gram(x, "hw", weights, center=False)
        return _MMDSide(mean=mean, moment=moment)
    features = _loss_features(x)
    if weights is None:
        p = features.new_full((1, 1, features.shape[-1]), 1.0 / features.shape[-1])
    else:
        p = weights / weights.sum(-1, keepdim=True)
    self_term = None
    if with_self_term:
        k = _loss_kernel_matrix(features, features, kernel, degree, offset, sigma)
        self_term = _loss_kernel_mean(k, p, p)
    return _MMDSide(features=features, weights=p, self_term=self_term)


def _mmd_loss_from_target(
    input: Tensor,
    target: _MMDSide,
    *,
    kernel: str,
    degree: int,
    offset: float,
    sigma: float,
    reduction: str,
    mask: Tensor | None,
) -> Tensor:
    """:func:`mmd_loss` with the target summarised by :func:`_mmd_side` (self term included)."""
    input = stats.check_features(input, "input")
    reference = target.mean if target.mean is not None else target.features
    assert reference is not None
    _check_same_channels(input.shape[1], reference.shape[1])
    _check_batch(input.shape[0], reference.shape[0])
    weights = _loss_position_weights(mask, input, "mask", "input")
    side = _mmd_side(input, weights, kernel, degree, offset, sigma, with_self_term=True)
    if side.mean is not None:
        assert target.mean is not None
        # Linear: k = a.b gives |mu_x - mu_y|^2. Polynomial degree 2: (a.b + c)^2 expands to
        # |S_x - S_y|_F^2 + 2c |mu_x - mu_y|^2 with S the second-moment matrix (c^2 cancels).
        # Degree 1: (a.b + c) gives the linear result, the offset cancels.
        per_sample = (side.mean - target.mean.to(side.mean.dtype)).square().sum(1)
        if side.moment is not None:
            assert target.moment is not None
            moment_term = (side.moment - target.moment.to(side.moment.dtype)).square().sum((1, 2))
            per_sample = moment_term + (2 * offset) * per_sample
        return _loss_reduce(per_sample, reduction)
    assert side.features is not None and side.weights is not None and side.self_term is not None
    assert target.features is not None and target.weights is not None
    assert target.self_term is not None
    batch = input.shape[0]
    target_features = target.features.to(side.features.dtype).expand(batch, -1, -1)
    cross_matrix = _loss_kernel_matrix(
        side.features, target_features, kernel, degree, offset, sigma
    )
    cross = _loss_kernel_mean(cross_matrix, side.weights, target.weights.to(cross_matrix.dtype))
    per_sample = side.self_term - 2 * cross + target.self_term.to(cross.dtype)
    return _loss_reduce(per_sample, reduction)


@_float32_under_autocast
def mmd_loss(
    input: Tensor,
    target: Tensor,
    *,
    kernel: str = "polynomial",
    degree: int = 2,
    offset: float = 0.0,
    sigma: float = 1.0,
    reduction: str = "mean",
    mask: Tensor | None = None,
    target_mask: Tensor | None = None,
) -> Tensor:
    r"""Squared maximum mean discrepancy between per-position features (Li et al. 2017).

    Each sample is read as two sets of :math:`C`-dimensional vectors, the columns
    :math:`x_i` of the input's and :math:`y_j` of the target's feature matrix, with position
    weights :math:`p_i = w_i / W` and :math:`q_j` (uniform :math:`1/M` without masks). The
    biased (V-statistic) estimate is

    .. math::

        \mathrm{MMD}^2 = \sum_{i,i'} p_i p_{i'} k(x_i, x_{i'})
            + \sum_{j,j'} q_j q_{j'} k(y_j, y_{j'}) - 2 \sum_{i,j} p_i q_j k(x_i, y_j)

    with the kernels of Li et al. 2017 (Demystifying Neural Style Transfer, sec. 3):
    ``"linear"`` :math:`k(a,b) = a^\top b`, ``"polynomial"`` :math:`(a^\top b + c)^d`
    (``offset`` :math:`c`, ``degree`` :math:`d`) and ``"gaussian"``
    :math:`\exp(-\lVert a-b \rVert^2 / 2\sigma^2)`.

    Identities (tested): the linear kernel gives :math:`\lVert \mu_x - \mu_y \rVert^2`, the
    squared distance between the mean feature vectors; the polynomial kernel of degree 2 and
    offset 0 gives :math:`\sum_{ij}(G_x - G_y)_{ij}^2 / M^2` for unnormalized Grams and equal
    :math:`M`, i.e. :math:`C^2` times the ``"hw"`` Gram loss. These (and polynomial degree 1 or 2
    with any offset) are computed in closed form from means and :math:`C\times C` moments.
    Other kernels form the :math:`M_x \times M_x` and :math:`M_x \times M_y` kernel matrices:
    memory :math:`O(N M^2)`, e.g. 64 MiB per sample at 64×64 positions in float32.

    Args:
        input: features ``(N, C, *spatial)``.
        target: features ``(1 or N, C, *spatial')``.
        kernel: ``"linear"``, ``"polynomial"`` (default) or ``"gaussian"``.
        degree: polynomial degree, a positive integer (default 2).
        offset: polynomial offset :math:`c` (default 0).
        sigma: Gaussian bandwidth :math:`\sigma > 0` (default 1, in feature units: choose it
            near the typical distance between feature vectors).
        reduction: over the per-sample values: ``"mean"`` (default) and ``"batchmean"`` average
            them, ``"sum"`` sums them, ``"none"`` returns them ``(N,)``.
        mask, target_mask: optional position weights ``(N or 1, 1, *spatial)``.

    Returns:
        A scalar or ``(N,)``; float32 for half/bfloat16 inputs. The V-statistic is non-negative
        for positive-definite kernels up to rounding (it is not clamped, to keep gradients).

    Shape:
        - input: ``(N, C, *spatial)``, target: ``(1 or N, C, *spatial')``
        - output: ``()`` or ``(N,)``

    Example:
        >>> x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> mmd = mmd_loss(x, y, reduction="none")
        >>> gx, gy = gram_matrix(x, normalize="none"), gram_matrix(y, normalize="none")
        >>> torch.allclose(mmd, (gx - gy).square().sum((1, 2)) / 16**2, atol=1e-5)
        True
    """
    input, target = _check_pair(input, target)
    kernel, degree, offset, sigma = _check_mmd_options(kernel, degree, offset, sigma, reduction)
    target_weights = _loss_position_weights(target_mask, target, "target_mask", "target")
    target_side = _mmd_side(target, target_weights, kernel, degree, offset, sigma, True)
    return _mmd_loss_from_target(
        input,
        target_side,
        kernel=kernel,
        degree=degree,
        offset=offset,
        sigma=sigma,
        reduction=reduction,
        mask=mask,
    )
