r"""Per-sample, per-channel statistics of feature maps: the one place stylenorm reduces.

Every layer and loss in stylenorm measures activations through this module, so that the
variance convention, the ``eps`` placement and the dtype promotion are the same everywhere.

For an input ``x`` of shape ``(N, C, *spatial)`` with :math:`M = \prod \text{spatial}` positions
and optional non-negative weights :math:`w` (a mask), the statistics of sample :math:`n`, channel
:math:`c` are

.. math::

    \mu_{nc} = \frac{\sum_m w_{ncm} x_{ncm}}{W_{nc}}, \qquad
    \sigma^2_{nc} = \frac{\sum_m w_{ncm} (x_{ncm} - \mu_{nc})^2}{W_{nc} - \text{correction}},
    \qquad W_{nc} = \sum_m w_{ncm}

with :math:`w \equiv 1` (so :math:`W = M`) when no mask is given. ``correction=0`` is the biased
(population) variance that instance norm, AdaIN and most style losses use; ``correction=1`` is
Bessel's unbiased variance (what ``torch.var`` returns by default and what some ports of AdaIN
use). The standard deviation is :math:`\sqrt{\sigma^2 + \epsilon}`, with ``eps`` *inside* the root,
so a constant channel has a finite value and a finite gradient.

Half and bfloat16 inputs are reduced in float32; results come back in the input's dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

__all__ = ["check_features", "check_mask", "compute_dtype", "mean_std", "mean_var"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype statistics of ``dtype`` tensors are accumulated in.

    float64 stays float64; every other floating dtype (float16, bfloat16, float32) is reduced in
    float32, which keeps half-precision statistics from overflowing or losing digits.

    Raises ``TypeError`` for anything but a floating ``torch.dtype``.

    Example:
        >>> compute_dtype(torch.bfloat16)
        torch.float32
    """
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return torch.float32  # (float8 and other floating dtypes)


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` at any level of functorch wrapping."""
    if _is_compiling():  # dynamo traces vmap itself and cannot trace these queries
        return False
    return _batched_eagerly(t)


def _batched_eagerly(t: Tensor) -> bool:
    """:func:`_is_vmapped` for a caller that has checked it is not compiling."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _transformed(*tensors: Tensor | None) -> bool:
    """Whether a ``torch.func`` transform wraps any of these tensors, or autograd's own vmap
    batches one (incoming gradients of ``torch.autograd.grad(..., is_grads_batched=True)``).
    Backwards then stay out of place (an in-place op on an unbatched temporary cannot take a
    batched operand). False under torch.compile, which cannot trace these queries."""
    if _is_compiling():
        return False
    functorch = torch._C._functorch
    return any(
        t is not None
        and (functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t))
        for t in tensors
    )


def _values_unknown(*tensors: Tensor) -> bool:
    """Whether value checks (``bool(...)`` of a reduction) must be skipped: under
    ``torch.compile``, on the meta device, or for tensors batched by ``vmap``, where reading a
    value is data-dependent control flow. Eager calls always check."""
    return _is_compiling() or any(t.device.type == "meta" or _batched_eagerly(t) for t in tensors)


def check_features(x: object, name: str = "input") -> Tensor:
    """Validate a feature map of shape ``(N, C, *spatial)``; return it typed as a Tensor.

    Raises ``TypeError`` for a non-tensor or non-floating tensor and ``ValueError`` for a rank
    below 3 or a map without spatial positions.

    Example:
        >>> check_features(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
        >>> check_features(torch.randn(3, 4), "style")
        Traceback (most recent call last):
        ...
        ValueError: style must have shape (N, C, *spatial) with at least one spatial dimension, ...
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 3:
        raise ValueError(
            f"{name} must have shape (N, C, *spatial) with at least one spatial dimension, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if any(s == 0 for s in x.shape[2:]):
        raise ValueError(f"{name} has no spatial positions: shape {tuple(x.shape)}")
    return x


def _check_device(t: Tensor, name: str, x: Tensor, x_name: str = "input", hint: str = "") -> None:
    """Raise ``ValueError`` unless ``t`` is on ``x``'s device: a clear error naming the argument
    instead of a kernel's, and no silent copy between devices."""
    if t.device != x.device:
        raise ValueError(
            f"{name} must be on the device of {x_name} ({x.device}), got {t.device}{hint}"
        )


def check_mask(mask: object, x: Tensor, name: str = "mask", x_name: str = "input") -> Tensor:
    """Validate a weight mask for ``x`` and return it as a floating tensor.

    A mask has the rank of ``x``; each of its dimensions is 1 or equal to ``x``'s, so
    ``(N, 1, *spatial)`` and ``(N, C, *spatial)`` are both accepted. A spatial dimension of 1
    broadcasts: the mask is returned expanded to ``x``'s spatial size, so that each of its values
    weighs every position it covers (``(N, 1, 1, 1)`` weighs the whole map). Boolean masks become
    0/1 weights in the statistics' compute dtype. Negative, infinite and NaN weights are rejected
    in eager mode.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> check_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), x).shape
        torch.Size([1, 1, 4, 4])
        >>> check_mask(torch.ones(1, 1, 1, 1), x).shape  # one weight for the whole map
        torch.Size([1, 1, 4, 4])
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    _check_device(mask, name, x, x_name)
    if mask.dim() != x.dim() or any(
        m not in (1, s) for m, s in zip(mask.shape, x.shape, strict=True)
    ):
        raise ValueError(
            f"{name} must broadcast to {x_name} with the same rank, i.e. shape (N or 1, C or 1, "
            f"*spatial) for {x_name} of shape {tuple(x.shape)}; got {name} of shape "
            f"{tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool or not mask.is_floating_point():
        if mask.is_complex():
            raise TypeError(f"{name} must be real, got dtype {mask.dtype}")
        mask = mask.to(compute_dtype(x.dtype))
    if not _values_unknown(mask) and mask.numel():
        low, high = torch.stack(torch.aminmax(mask.detach())).tolist()  # one read
        if not (low >= 0 and high < math.inf):  # NaN fails too
            raise ValueError(
                f"{name} must be non-negative and finite (weights), got values from {low} to {high}"
            )
    if mask.shape[2:] != x.shape[2:]:
        mask = mask.expand(*mask.shape[:2], *x.shape[2:])
    return mask


def _num_positions(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout torch's normalization kernels accept ``x`` in without a copy.

    channels_last only when torch's own stride heuristic agrees: the batch stride must span a
    whole sample (a size-1 batch dimension may otherwise carry a stride that makes the kernel
    reject the tensor).
    """
    if _is_vmapped(x):  # vmap hides strides; its batching rules take any layout
        return torch.contiguous_format
    if not x.is_contiguous() and x.stride(0) >= math.prod(x.shape[1:]):
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


# Below these sizes the blockwise channels-last code (a few dozen small torch ops of fixed cost,
# and strided reductions that vectorize over the channels) loses to one contiguous copy and
# torch's fused contiguous kernel; measured with benchmarks/run.py's kernels on CPU.
_BLOCKWISE_MIN_NUMEL = 1 << 18
_BLOCKWISE_MIN_CHANNELS = 16
# Where a gradient is recorded, from half that size: the closed-form backward of the blockwise
# code saves the transposing copies of the incoming gradient and of the input gradient. Measured
# forward+backward (CPU, float32, alternated in one process, medians of three) at 2^17 values
# against the contiguous route: 1.12x-1.47x faster for InstanceNorm, CIN and AdaIN, from
# (4,32,32,32) to (1,32,64,64); at 2^16 values 0.61x-0.77x.
_BLOCKWISE_MIN_NUMEL_WITH_GRADIENT = 1 << 17


def _blockwise_channels_last(x: Tensor, *others: Tensor | None) -> bool:
    """Whether ``x`` is channels_last, on the CPU and large enough, in elements and in
    channels, for the blockwise (N, M, C) code. On CUDA its few dozen small ops each cost a
    kernel launch: measured on an H200 at the benchmark shapes, InstanceNorm through it took
    3.4x-10x torch.nn's time, which copies to contiguous; so there every channels_last input takes
    that copy and torch's kernel. Smaller channels_last inputs are reduced by the whole-tensor
    formula where :func:`_formula_pays`, by ``torch.var_mean`` when tiny, contiguous otherwise
    (and normalized contiguous, or by ``functional._formula_norm``). ``others``
    are the tensors computed with ``x`` (affine parameters): the blockwise autograd Function has
    no vmap rule, so a vmapped one sends ``x`` the contiguous way too. Under torch.compile it is
    not used either (it has ``out=`` into strided views, which dynamo rejects): the statistics
    and, without a gradient, the normalization are traced the contiguous way, which the compiler
    fuses; with a gradient the normalization traces its formula
    (``functional._formula_norm``). Where ``x`` or ``others`` record a gradient, the size
    threshold is ``_BLOCKWISE_MIN_NUMEL_WITH_GRADIENT`` (the normalizations; the statistics'
    own Function asks from inside its forward, where no gradient is recorded)."""
    return (
        _memory_format(x) != torch.contiguous_format
        and x.device.type == "cpu"
        and not _is_compiling()
        and not any(t is not None and _is_vmapped(t) for t in others)
        and x.shape[1] >= _BLOCKWISE_MIN_CHANNELS
        and (
            x.numel() >= _BLOCKWISE_MIN_NUMEL
            or (x.numel() >= _BLOCKWISE_MIN_NUMEL_WITH_GRADIENT and _recording(x, *others))
        )
    )


def _positions(x: Tensor) -> Tensor:
    """The ``(N, M, C)`` view of a channels_last ``(N, C, *spatial)`` tensor (a copy otherwise)."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def _virtual_samples(positions: Tensor) -> int:
    """Into how many equal parts to split each sample's positions of an ``(N, M, C)`` view so
    that the blockwise reductions over dim 1 have at least 4 rows of outputs (a power of two
    dividing M; 1 if none or if the view cannot be split without a copy). torch spreads such a
    reduction over threads by its outputs: with a batch of one, only C of them, and two threads
    barely beat one."""
    n, m, c = positions.shape
    if n >= 4 or (n > 1 and positions.stride(0) != m * c):
        return 1
    parts = 1
    while n * parts < 4 and m % (2 * parts) == 0:
        parts *= 2
    return parts


def _split_samples(positions: Tensor, parts: int) -> Tensor:
    """The ``(N * parts, M / parts, C)`` view of an ``(N, M, C)`` view (see
    :func:`_virtual_samples`): each sample's positions cut into ``parts`` consecutive runs."""
    n, m, c = positions.shape
    return positions.reshape(n * parts, m // parts, c)  # a view (batched gradients: vmap's)


def _per_run(values: Tensor, parts: int) -> Tensor:
    """``(N, C)`` per-sample values as the ``(N * parts, 1, C)`` values of each run of
    positions of :func:`_split_samples`, to broadcast over a run."""
    return (values.repeat_interleave(parts, 0) if parts > 1 else values).unsqueeze(1)


# Values per block of the blockwise two-pass statistics (:func:`_positions_mean_var`,
# :func:`_rows_mean_var`, :func:`_rows_refined_mean_var`): 2 MiB of float32 (1 MiB per thread,
# the L2 cache of this project's CPUs); measured faster than 2^18 values per block (fewer small
# ops; 1.25x for the rows of batch norm's statistics), with no clear gain beyond.
_BLOCK_VALUES = 1 << 19


def _position_blocks(positions: Tensor) -> int:
    """Positions per block so that an ``(N, block, C)`` temporary holds about
    ``_BLOCK_VALUES`` values (in cache)."""
    return max(1, _BLOCK_VALUES // max(1, positions.shape[0] * positions.shape[2]))


def _centred_into(chunk: Tensor, mean: Tensor, work: Tensor) -> Tensor:
    """``chunk - mean`` written into ``work`` (same shape, compute dtype) and returned.

    Blockwise loops reuse one ``work`` buffer from block to block: a fresh temporary per block
    is a fresh allocation, whose page faults (glibc hands blocks of this size back to the system
    or not, depending on what was freed before) can cost more than the arithmetic.
    """
    if chunk.dtype == work.dtype:
        return torch.sub(chunk, mean, out=work)
    # Half: upcast into the buffer (mixed-dtype elementwise kernels are slow on CPU).
    return work.copy_(chunk).sub_(mean)


def _block_workspace(blocks: tuple[Tensor, ...]) -> Tensor:
    """A flat buffer in the compute dtype as large as the first (largest) block, for
    :func:`_centred_into`; :func:`_workspace_for` views it in each block's shape."""
    first = blocks[0]
    return torch.empty(first.numel(), dtype=compute_dtype(first.dtype), device=first.device)


def _workspace_for(work: Tensor, chunk: Tensor) -> Tensor:
    """A contiguous view of the flat ``work`` buffer in ``chunk``'s shape (a strided narrowing
    would make the last, shorter block's ``out=`` non-contiguous, which torch.compile rejects)."""
    return work[: chunk.numel()].view(chunk.shape)


def _block_moments(chunk: Tensor, work: Tensor) -> tuple[Tensor, Tensor]:
    """Two-pass mean and centred sum of squares over dim 1 of one cache-sized block, in the
    compute dtype of ``work`` (a reused flat buffer, :func:`_block_workspace`); dim 1 is
    dropped."""
    mean = chunk.mean(1, keepdim=True, dtype=work.dtype)
    centred = _centred_into(chunk, mean, _workspace_for(work, chunk))
    # square_ + sum on the buffer: torch.linalg.vecdot is many times slower on CPU here.
    return mean.squeeze(1), centred.square_().sum(1)


def _shifted(estimate: Tensor, spread: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    r"""The corrected two-pass step: from the mean of the squared deviations about
    ``estimate`` (``spread``) and the mean deviation ``shift``, the mean
    :math:`\tilde\mu + \delta` and the variance :math:`\overline{d^2} - \delta^2`, never
    below zero (also for a (near-)constant channel in rounding)."""
    return estimate + shift, (spread - shift.square()).clamp_min_(0.0)


def _positions_mean_var(positions: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor, float]:
    r"""Biased mean and variance over dim 1 of an ``(N, M, C)`` tensor, ``(N, C)`` each, in the
    compute dtype (float32 for half inputs), and the largest :math:`|\mu| / \sigma` among them
    (:func:`_largest_mean_to_spread`; NaN where it cannot be read, so that every comparison with
    it is False). A constant channel (:math:`\sigma = 0`) counts as :math:`|\mu| /
    \sqrt{\epsilon}`: a normalization passes its own ``eps``, at which such a channel's terms
    cancel; with ``eps = 0`` (statistics alone) it does not count.

    The classic two-pass algorithm, which is stable on features with a large mean (no
    E[x^2] - E[x]^2): first the mean, with torch's sum over M (one read of the data; half
    inputs are upcast block by block in a reused buffer instead of copied whole), then the
    squares of :math:`d = x - \tilde\mu` summed block by block in a reused cache-sized buffer.
    All blocks are centred on the one mean of the whole sample, so no merge formula is needed.
    A batch of one or two is cut into runs of positions (:func:`_virtual_samples`) so that both
    threads reduce.

    That first mean :math:`\tilde\mu` is 2-3 units in the last place off, which
    :math:`x - \mu` carries into outputs and gradients at large |mean| / std. Where some
    (sample, channel) exceeds ``_REFINE_ABOVE_RATIO``, a third pass sums the deviations: the
    corrected two-pass algorithm,

    .. math::

        \mu = \tilde\mu + \frac{\sum d}{M}, \quad
        \sigma^2 = \frac{\sum d^2}{M} - \Big(\frac{\sum d}{M}\Big)^2
    """
    acc = compute_dtype(positions.dtype)
    n, m, c = positions.shape
    parts = _virtual_samples(positions)
    runs = _split_samples(positions, parts)
    chunks = torch.split(runs, _position_blocks(runs), 1)
    work = _block_workspace(chunks)

    def merged(run_values: Tensor) -> Tensor:  # sums over the runs of each sample
        return run_values.view(n, parts, c).sum(1) if parts > 1 else run_values

    def centred_sums(square: bool) -> Tensor:  # sums of d, or of d^2, block by block
        sums = torch.zeros((n * parts, c), dtype=acc, device=positions.device)
        for chunk in chunks:
            centred = _centred_into(chunk, run_mean, _workspace_for(work, chunk))
            sums += (centred.square_() if square else centred).sum(1)
        return merged(sums)

    if positions.dtype == acc:
        mean = merged(runs.sum(1)) / m
    else:
        run_sums = torch.zeros((n * parts, c), dtype=acc, device=positions.device)
        for chunk in chunks:
            run_sums += _workspace_for(work, chunk).copy_(chunk).sum(1)
        mean = merged(run_sums) / m
    run_mean = _per_run(mean, parts)
    var = centred_sums(square=True) / m
    ratio = _largest_mean_to_spread(mean, var, eps, positions, math.nan)
    if ratio > _REFINE_ABOVE_RATIO:
        mean, var = _shifted(mean, var, centred_sums(square=False) / m)
    return mean, var, ratio


def _rows_mean_var(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Biased mean and variance of each row of a contiguous ``(R, M)`` float32/float64 tensor.

    The classic two-pass algorithm (mean, then centred squares: stable on large means), run on
    cache-sized blocks of rows (``_BLOCK_VALUES`` values each) so the centred temporary never
    costs a full-size allocation.
    """
    per_block = max(1, _BLOCK_VALUES // max(1, rows.shape[1]))
    chunks = torch.split(rows, per_block, 0)
    work = _block_workspace(chunks)
    means, sums_sq = zip(*(_block_moments(chunk, work) for chunk in chunks), strict=True)
    return torch.cat(means), torch.cat(sums_sq) / rows.shape[1]


# Largest |mean| / std of a (sample, channel) row for which batch norm keeps the rows' first
# two-pass statistics. Their float32 mean is a few units in the last place off, which the output
# and the gradients carry (x * a + b folds it in), and merging the rows in float32 rounds off the
# spread of their means. Measured against float64 at (8,64,32,32): unrefined, output and
# weight-gradient errors 1.4x-3x torch.nn's (whose kernel accumulates in double) from
# |mean| / std = 10, running variance 3x at 1e3 and 50x at 1e4; refined without the float64
# merge, still 2x-3x from 10 and 20x at 1e4; with both, within 1.1x of torch.nn's at 10 to 1e4.
# (Below the bound, errors stay within a few units in the last place: up to 1.6x torch.nn's.)
_BATCH_REFINE_ABOVE_RATIO = 3.0


def _batch_mean_var_contiguous(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batch norm's biased per-channel mean and variance of a contiguous float32/float64
    ``(N, C, *spatial)`` tensor, ``(C,)`` each.

    Each (sample, channel) row is reduced two-pass (:func:`_rows_mean_var`), refined by the
    corrected two-pass (:func:`_rows_refined_mean_var`, then in float64) where some row's
    |mean| / std exceeds ``_BATCH_REFINE_ABOVE_RATIO`` (a constant row at a nonzero value
    counts); the N rows of a channel, all of M positions, merge with Chan et al.'s formula for
    equal counts:

        mean_c = mean_n(mean_nc),   var_c = mean_n(var_nc) + mean_n((mean_nc - mean_c)^2).
    """
    n, c = x.shape[0], x.shape[1]
    rows = x.view(n * c, -1)
    row_mean, row_var = _rows_mean_var(rows)
    # Some var < (mean / ratio)^2, in two ops on the N * C values (the general ratio check cost
    # 20-30 us more, 4% of the forward at (4,256,32,32)).
    slack = torch.addcmul(row_var, row_mean, row_mean, value=-1.0 / _BATCH_REFINE_ABOVE_RATIO**2)
    if bool(slack.min() < 0):
        # Refined, and merged in float64: the spread of the row means about the channel's mean
        # is then small against the mean, and float32 would round it off.
        row_mean, row_var = _rows_refined_mean_var(rows, row_mean, torch.float64)
    row_mean, row_var = row_mean.view(n, c), row_var.view(n, c)
    mean = row_mean.mean(0)
    var = row_var.mean(0) + (row_mean - mean).square().mean(0)
    return mean.to(x.dtype), var.to(x.dtype)


# Largest |mean| / std of a (sample, channel) for which the group-norm reduction's statistics
# are kept. That kernel accumulates in float32, and its variance error grows with the ratio:
# measured relative errors 1e-6 to 2e-6 at 100, 6e-6 to 1.1e-5 at 1e3, 1e-4 to 2e-4 at 1e4
# (torch.var_mean: 6e-8 at all three).
_REFINE_ABOVE_RATIO = 30.0


# Up to this many (sample, channel) statistics, :func:`_largest_mean_to_std` and
# :func:`_largest_mean_to_spread` read them as Python floats: their chains of eight to eleven
# torch ops on a few values cost about 1.5 us each, the Python loop about 0.1 us a value.
_FEW_STATISTICS = 64


def _finite_max(values: Iterable[float]) -> float:
    """The largest finite value, 0.0 for none (NaN and infinities left out)."""
    return max((v for v in values if math.isfinite(v)), default=0.0)


class _Overflow(Exception):
    """The float32 statistics of finite input overflowed: raised by :func:`_overflowed` inside a
    function wrapped by :func:`_float64_on_overflow`, which computes the call again in float64."""


# How many calls wrapped by :func:`_float64_on_overflow` this thread is inside.
_RESCUE = threading.local()


def _overflowed(x: Tensor | None) -> None:
    r"""Called where some statistic of ``x`` came out infinite or NaN. A float32 (or bfloat16)
    sum of squares overflows once :math:`M \sigma^2` passes 3.4e38, from :math:`\sigma` about
    3e17 at 64x64 positions: the variance becomes inf (1/sigma 0, so the output is its shift,
    as torch.nn's) or, in the group-norm kernel's E[x^2] - E[x]^2, NaN. Where ``x`` itself is
    finite and a caller can compute again in float64 (:func:`_float64_on_overflow`), raise
    :class:`_Overflow`; otherwise (no ``x``, NaN or infinite input, float64, no such caller)
    return, and the statistics stand."""
    if (
        x is not None
        and getattr(_RESCUE, "depth", 0) > 0
        and x.dtype in (torch.float32, torch.bfloat16)
        and bool(torch.isfinite(x).all())
    ):
        raise _Overflow


def _float64_on_overflow(*keep: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Wrap a public function of a features input (its first parameter) so that where its float32
    statistics overflow on finite input (:func:`_overflowed`), it runs again with every
    floating-point tensor argument in float64 (no float32 or bfloat16 input can overflow
    there), except the parameters named in ``keep`` (running statistics, which the call updates
    in place in their own dtype, under torch.func transforms too), and its tensor results come
    back in the input's dtype. Gradients flow through the casts. Costs nothing but a counter
    where nothing overflows; under torch.compile, which reads no statistics, the function runs
    as it is."""

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(fn)
        features = next(iter(signature.parameters))

        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if _is_compiling():
                return fn(*args, **kwargs)
            _RESCUE.depth = getattr(_RESCUE, "depth", 0) + 1
            try:
                return fn(*args, **kwargs)
            except _Overflow:
                pass
            finally:
                _RESCUE.depth -= 1
            bound = signature.bind(*args, **kwargs)
            dtype = bound.arguments[features].dtype
            for name, value in bound.arguments.items():
                if name not in keep:
                    bound.arguments[name] = _widened(value)
            return _narrowed(fn(*bound.args, **bound.kwargs), dtype)  # type: ignore[arg-type]

        return wrapper

    return decorate


def _widened(value: Any) -> Any:
    """Floating-point tensors, also in lists, tuples and named tuples, in float64."""
    if isinstance(value, Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, list):
        return [_widened(v) for v in value]
    if isinstance(value, tuple):
        items = [_widened(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _narrowed(value: _R, dtype: torch.dtype) -> _R:
    """Floating-point tensors (also in tuples) in ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value  # type: ignore[return-value]
    if isinstance(value, tuple):
        items = [_narrowed(v, dtype) for v in value]
        narrowed = type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        return narrowed  # type: ignore[return-value]
    return value


def _largest_mean_to_std(mean: Tensor, rstd: Tensor, x: Tensor, unknown: float = 0.0) -> float:
    """The largest ``|mean| * rstd`` of the (sample, channel) statistics of CPU ``x`` (entries
    with rstd = inf, constant channels of statistics without eps, and NaN excepted);
    ``unknown`` where it cannot be read: under compile or vmap (of ``x``, or of the parameters
    or masks the statistics came from), which cannot branch on values, and on other devices,
    where reading it would synchronize."""
    if x.device.type != "cpu" or _values_unknown(x, mean, rstd):
        return unknown
    return _largest_product(mean, rstd, x)


def _largest_product(mean: Tensor, rstd: Tensor, x: Tensor | None) -> float:
    """:func:`_largest_mean_to_std` of statistics whose values can be read. Where a mean is not
    finite or an rstd is 0 or NaN (a variance that overflowed), :func:`_overflowed` first (not
    with ``x`` None: a negative eps makes NaN rstds of its own)."""
    if mean.numel() == 0:
        return 0.0
    if mean.numel() <= _FEW_STATISTICS:
        means, rstds = mean.reshape(-1).tolist(), rstd.reshape(-1).tolist()
        if not math.isfinite(sum(means)) or math.isnan(sum(rstds)) or min(rstds) <= 0:
            _overflowed(x)
        return _finite_max(abs(m) * r for m, r in zip(means, rstds, strict=True))
    # In float64, like the Python floats above: no overflow to inf, which counts as nothing.
    size, rstd = mean.double().abs(), rstd.double()
    ratio = (size * rstd).nan_to_num_(0.0, 0.0, 0.0)
    # Plus 0 * |mean| * std, which is NaN where a mean is not finite or an rstd is 0 or NaN
    # (0 where rstd = inf): one op, no second reduction.
    largest = float(torch.add(ratio, size / rstd, alpha=0.0).amax())
    if math.isfinite(largest):
        return largest
    _overflowed(x)
    return float(ratio.amax())


def _largest_mean_to_spread(
    mean: Tensor, var: Tensor, eps: float, x: Tensor, unknown: float = 0.0
) -> float:
    """:func:`_largest_mean_to_std` with the spread ``std``, or ``sqrt(eps)`` for a constant
    channel: what a (sample, channel)'s |mean| is measured against when choosing between a
    fused form whose terms cancel and an exact one. Not ``sqrt(var + eps)``: a spread far below
    ``sqrt(eps)`` cancels as much as its |mean| / std says (6.7x torch.nn's weight-gradient
    error at |mean| / std = 30, std 1e-4). With ``eps = 0`` a constant channel does not
    count."""
    if x.device.type != "cpu" or _values_unknown(x, mean, var):
        return unknown
    return _largest_spread_ratio(mean, var, eps, x)


def _largest_spread_ratio(mean: Tensor, var: Tensor, eps: float, x: Tensor) -> float:
    """:func:`_largest_mean_to_spread` of statistics whose values can be read (an infinite or
    NaN variance or mean: :func:`_overflowed`)."""
    if mean.numel() <= _FEW_STATISTICS:
        return _largest_ratio(mean.reshape(-1).tolist(), var.reshape(-1).tolist(), eps, x)
    var = var.double()  # eps in float64 too (1e-50 is 0 in float32)
    # (A NaN variance stays NaN, so that its rstd does.)
    watched = x if eps >= 0 else None
    return _largest_product(mean, torch.rsqrt(torch.where(var <= 0, eps, var)), watched)


def _largest_ratio(means: list[float], variances: Iterable[float], eps: float, x: Tensor) -> float:
    """:func:`_largest_mean_to_spread` of statistics read as Python floats (an infinite or NaN
    variance or mean: :func:`_overflowed`)."""
    variances = list(variances)
    # (A negative eps, which torch's kernels allow, makes NaN variances of its own.)
    if eps >= 0 and not math.isfinite(sum(means) + sum(variances)):
        _overflowed(x)
    root_eps = math.sqrt(eps) if eps >= 0 else math.nan  # torch's kernels allow eps < 0

    def ratio(m: float, v: float) -> float:
        spread = math.sqrt(v) if v > 0 else root_eps
        return abs(m) / spread if spread > 0 else math.nan

    return _finite_max(map(ratio, means, variances))


def _largest_mean_to_spread_of_rstd(mean: Tensor, rstd: Tensor, eps: float, x: Tensor) -> float:
    """:func:`_largest_mean_to_spread` of statistics given as a kernel's ``mean`` and
    ``rstd = 1 / sqrt(var + eps)``, the variance recovered as ``rstd**-2 - eps``: for up to
    ``_FEW_STATISTICS`` of them in Python floats, two torch ops fewer (about 4 us a call)."""
    if x.device.type != "cpu" or _values_unknown(x, mean, rstd):
        return 0.0
    if mean.numel() > _FEW_STATISTICS:  # (the device and value checks are done)
        return _largest_spread_ratio(mean, _var_of_rstd(rstd, eps), eps, x)
    variances = (1.0 / (r * r) - eps if r != 0 else math.inf for r in rstd.reshape(-1).tolist())
    return _largest_ratio(mean.reshape(-1).tolist(), variances, eps, x)


def _check_finite(var: Tensor, x: Tensor) -> None:
    """:func:`_overflowed` where the variances of CPU ``x`` (or their sum) are not finite, for
    the paths that read no |mean| / std (one reduction and a read, about 2 us); nothing where
    values cannot be read or reading them would synchronize."""
    if x.device.type != "cpu" or _values_unknown(x, var):
        return
    if not math.isfinite(float(var.sum(dtype=torch.float64))):
        _overflowed(x)


def _var_of_rstd(rstd: Tensor, eps: float) -> Tensor:
    """The variance of a kernel's ``rstd = 1 / sqrt(var + eps)``: ``rstd**-2 - eps``, never below
    zero (a constant channel, in rounding)."""
    return rstd.pow(-2).sub_(eps).clamp_min_(0.0)


def _needs_refining(mean: Tensor, rstd: Tensor, x: Tensor) -> bool:
    """Whether :func:`_largest_mean_to_std` exceeds ``_REFINE_ABOVE_RATIO``."""
    return _largest_mean_to_std(mean, rstd, x) > _REFINE_ABOVE_RATIO


def _rows_refined_mean_var(
    rows: Tensor, estimate: Tensor, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    r"""Mean and biased variance of each row of a contiguous ``(R, M)`` float32/float64 tensor,
    by the corrected two-pass algorithm about a first ``estimate`` of the row means:

    .. math::

        d = x - \tilde\mu, \quad \mu = \tilde\mu + \frac{\sum d}{M}, \quad
        \sigma^2 = \frac{\sum d^2}{M} - \Big(\frac{\sum d}{M}\Big)^2

    The deviations are formed element by element from a mean already close to the true one,
    so nothing large cancels. Cache-sized blocks of rows reuse one buffer. The last step, and
    the results, in ``dtype`` (default: the rows'), so that float64 keeps the mean's digits.
    """
    per_block = max(1, _BLOCK_VALUES // max(1, rows.shape[1]))
    chunks = torch.split(rows, per_block, 0)
    work = _block_workspace(chunks)
    sums, sums_sq = [], []
    for chunk, first in zip(chunks, torch.split(estimate, per_block, 0), strict=True):
        centred = _centred_into(chunk, first.unsqueeze(1), _workspace_for(work, chunk))
        sums.append(centred.sum(1))
        sums_sq.append(centred.square_().sum(1))
    dtype = dtype or rows.dtype
    spread, shift = (torch.cat(s).to(dtype) / rows.shape[1] for s in (sums_sq, sums))
    return _shifted(estimate.to(dtype), spread, shift)


# Below this many values :class:`_MeanVar` takes ``torch.var_mean``: its reduction (Welford's,
# stable at any mean) is then faster than the group-norm kernel and the checks around it
# (measured on CPU, float32: 10 us against 24 us at 1024 values, 18 against 28 at 2048, even
# at 4096, 2.2x-5x slower from 16384), and as precise: relative errors against float64 of
# 3e-8 to 5e-8 for the variance at means 0 to 1e4, against our kernels' 5e-8 to 1.9e-7.
_VAR_MEAN_BELOW_NUMEL = 1 << 12


class _MeanVar(torch.autograd.Function):
    """Mean and variance over the trailing dims with one fused reduction and a closed-form VJP.

    The forward pass uses the (contiguous) group-norm reduction kernel with one group per channel:
    a single Welford-style pass, free of E[x^2] - E[x]^2 cancellation and many times faster than
    ``torch.var_mean`` on CPU, refined by a corrected two-pass where some channel's
    |mean| / std exceeds ``_REFINE_ABOVE_RATIO`` (the kernel's float32 error grows with that
    ratio); channels_last input takes two passes on its (N, M, C) view, and a third above that
    ratio (:func:`_positions_mean_var`), or where small (:func:`_formula_pays`) the corrected
    two-pass in whole-tensor ops (:func:`_formula_mean_var`). Below
    ``_VAR_MEAN_BELOW_NUMEL`` values, and off the CPU (CUDA), ``torch.var_mean``. The backward
    pass is the exact derivative

        d mean / d x = 1/M,   d var / d x = 2 (x - mean) / (M - correction),

    written in differentiable torch ops so double backward works. Under ``torch.func.vmap``
    torch derives the batching rule from these torch ops (``generate_vmap_rule``). It has no
    forward-mode rule: where forward-mode derivatives flow (:func:`_forward_mode`), the
    statistics are plain differentiable torch ops instead.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, correction: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        n, c = x.shape[0], x.shape[1]
        m = _num_positions(x)
        if x.numel() < _VAR_MEAN_BELOW_NUMEL or x.device.type != "cpu":
            # Tiny: one torch.var_mean, faster than the kernels' fixed cost and as precise. On
            # CUDA too, at any size: one stable (Welford) kernel, where the group-norm route
            # below, which also writes a normalized output, and its conversions measured
            # 2.2x-2.9x var_mean's time (H200, float32, the benchmark shapes).
            dims = tuple(range(2, x.dim()))
            var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)), dims, correction=0)
        elif _blockwise_channels_last(x):
            # channels_last: torch's channels_last group-norm kernel computes the variance as
            # E[x^2] - E[x]^2, which cancels on features with a large mean, and a contiguous copy
            # costs a slow transposing pass. The (N, M, C) view of the same memory reduces well
            # over M: the mean, then the squares of x - mean, summed block by block in a reused
            # cache-sized buffer. Half inputs are upcast block by block, not copied whole.
            mean, var, _ = _positions_mean_var(_positions(x))
        elif _memory_format(x) != torch.contiguous_format and _formula_pays(x):
            # Small channels_last: the corrected two-pass in whole-tensor ops on its layout.
            mean, var = _formula_mean_var(x.to(compute_dtype(x.dtype)))
            mean, var = mean.reshape(n, c), var.reshape(n, c)
            _check_finite(var, x)
        else:
            acc = compute_dtype(x.dtype)
            # One copy at most (Tensor.to ignores memory_format when it does not copy).
            xs = (
                x.contiguous()
                if x.dtype == acc
                else x.to(acc, memory_format=torch.contiguous_format)
            )
            _, mean, rstd = torch.ops.aten.native_group_norm(xs, None, None, n, c, m, c, 0.0)
            mean, rstd = mean.reshape(n, c), rstd.reshape(n, c)
            # rstd = 1 / sqrt(var); a constant channel gives rstd = inf and var = 0 exactly.
            var = rstd.reciprocal().square()
            if _needs_refining(mean, rstd, xs):
                mean, var = _rows_refined_mean_var(xs.view(n * c, m), mean.view(n * c))
                mean, var = mean.view(n, c), var.view(n, c)
        if correction != 0:
            var = var * (m / (m - correction))
        return mean, var

    @staticmethod
    def setup_context(
        ctx: torch.autograd.function.FunctionCtx,
        inputs: tuple[Tensor, float],
        output: tuple[Tensor, Tensor],
    ) -> None:
        x, correction = inputs
        mean, _ = output
        ctx.save_for_backward(x, mean)
        ctx.correction = correction  # type: ignore[attr-defined]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_mean: Tensor | None, grad_var: Tensor | None
    ) -> tuple[Tensor | None, None]:
        x, mean = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None
        m = _num_positions(x)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        offset = None if grad_mean is None else grad_mean.reshape(shape) / m
        if grad_var is None:
            assert offset is not None
            return offset.to(x.dtype).expand_as(x), None
        scale = grad_var.reshape(shape) * (2.0 / (m - ctx.correction))  # type: ignore[attr-defined]
        centered = x - mean.reshape(shape)  # subtract first: exact where x is close to a large mean
        if torch.is_grad_enabled() or _transformed(grad_mean, grad_var):
            # Double backward or batched gradients: out of place.
            grad = centered * scale
            grad = grad if offset is None else grad + offset
        else:
            grad = centered.mul_(scale)
            if offset is not None:
                grad.add_(offset)
        return grad.to(x.dtype), None


def _check_weight_total(total: Tensor, minimum: float, name: str) -> None:
    """Raise if a mask's total weight is at most ``minimum`` anywhere (eager mode only)."""
    if _values_unknown(total) or total.numel() == 0:
        return
    if bool(total.min() <= minimum):
        need = (
            "a positive total weight"
            if minimum == 0
            else (f"a total weight greater than correction={minimum:g}")
        )
        raise ValueError(
            f"{name} must have {need} for every sample"
            + ("" if total.dim() == 1 else " and channel")
            + f"; got a minimum total weight of {float(total.min())}"
        )


def _weighted_mean_var(
    x: Tensor, mask: Tensor, correction: float, name: str = "mask", empty_ok: bool = False
) -> tuple[Tensor, Tensor]:
    """See :func:`_mean_var`."""
    dims = tuple(range(2, x.dim()))
    xs = x.to(compute_dtype(x.dtype))
    w = mask.to(xs.dtype)
    total = w.sum(dims).expand(x.shape[0], x.shape[1])
    empty = None
    if empty_ok:
        empty = total <= 0
        if _values_unknown(total) or bool(empty.any()):
            total = torch.where(empty, 1.0 + correction, total)  # finite until replaced below
        else:
            empty = None
    _check_weight_total(total, correction, name)
    # The corrected two-pass algorithm, weighted: the first mean is a few units in the last place
    # off, which the deviations' weighted sum (zero in exact arithmetic) corrects; without it
    # the variance had 1e3x the unmasked path's error at |mean| / std = 1e5.
    mean = (xs * w).sum(dims) / total
    centered = xs - mean.reshape(mean.shape + (1,) * len(dims))
    weighted = centered * w
    shift = weighted.sum(dims) / total
    spread = ((weighted * centered).sum(dims) - total * shift.square()).clamp_min(0.0)
    var = spread / (total - correction)
    mean = mean + shift
    _check_finite(var.detach(), x)
    if empty is not None:
        # The unmasked statistics there: the caller multiplies by the (zero) mask, so they do not
        # change its output, and they keep the mask's gradient what it would be for the whole map
        # (placeholders of mean 0 and variance 0 made it scale with 1 / sqrt(eps)).
        whole_mean, whole_var = _mean_var(x, correction, None)
        mean, var = torch.where(empty, whole_mean, mean), torch.where(empty, whole_var, var)
    return mean, var


def _mean_var(
    x: Tensor,
    correction: float,
    mask: Tensor | None,
    mask_name: str = "mask",
    empty_ok: bool = False,
    x_name: str = "input",
) -> tuple[Tensor, Tensor]:
    """Validated mean/var in the compute dtype (float32 for half inputs); for internal use.
    ``mask_name`` names the mask in the error for weights that sum to zero (at most
    ``correction``), ``x_name`` the features in the error for too few positions; with
    ``empty_ok``, a (sample, channel) whose weights are all zero gets the unmasked statistics
    instead, for callers that multiply the result by the mask again."""
    if mask is not None:
        return _weighted_mean_var(x, mask, correction, mask_name, empty_ok)
    m = _num_positions(x)
    if m - correction <= 0:
        raise ValueError(
            f"{x_name} has {m} spatial positions, too few for correction={correction} (more "
            f"than {correction} needed): {x_name} of shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        empty = x.new_zeros((x.shape[0], x.shape[1]), dtype=compute_dtype(x.dtype))
        return empty + x.sum(tuple(range(2, x.dim()))), empty.clone()
    if _forward_mode(x):
        mean, var = _formula_mean_var(x.to(compute_dtype(x.dtype)), correction)
        shape = (x.shape[0], x.shape[1])
        return mean.reshape(shape), var.reshape(shape)
    if (
        _recording(x)
        or _is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(x)  # under a transform: its rules
    ):
        mean, var = _apply(_MeanVar, x, float(correction))
        return mean, var
    return _MeanVar.forward(x, float(correction))


# Channels_last CPU input too small for the blockwise code (below ``_BLOCKWISE_MIN_NUMEL``
# values), in at least ``_FORMULA_MIN_INSTANCES`` (sample, channel) pairs of at least
# ``_BLOCKWISE_MIN_CHANNELS`` channels, takes the whole-tensor formula on its own layout
# (:func:`_formula_deviations`) instead of a transposing copy to torch's contiguous kernels
# (CPU, float32, 2 threads, alternated in one process):
# - normalized without a gradient (module forward, medians of three runs of five rounds, eight
#   shapes of 2^15 to 2^17 values): 1.30x-2.54x faster for InstanceNorm, 1.17x-1.72x for AdaIN
#   (README). With fewer pairs torch's reductions over the positions barely use both threads:
#   (1,32,64,64) 414 us against 341 us, (1,16,128,128) 752 us against 276 us. From 2^18 values
#   the blockwise code is as fast or faster (0.68x-0.79x at (4,256,32,32));
# - statistics (:class:`_MeanVar`'s forward): 41-57 us against 66-118 us at (1,512,8,8),
#   (2,64,16,16), (4,32,32,32) and (2,128,16,16) (a transposing copy of the first alone took 70
#   us); with fewer pairs about even or slower ((1,16,64,64): 77 us against 68 us), and 4.9x
#   slower at 2^18.
_FORMULA_MIN_INSTANCES = 64


def _formula_pays(x: Tensor) -> bool:
    """Whether channels_last ``x`` takes the whole-tensor formula in eager mode: on CPU (where
    it was measured), at the sizes above. False under torch.compile, which traces the
    contiguous statistics (and decides the normalization in ``functional._formula_fits``)."""
    return (
        not _is_compiling()
        and x.device.type == "cpu"
        and x.shape[1] >= _BLOCKWISE_MIN_CHANNELS
        and x.shape[0] * x.shape[1] >= _FORMULA_MIN_INSTANCES
        and x.numel() < _BLOCKWISE_MIN_NUMEL
    )


def _formula_deviations(xs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The corrected two-pass statistics over the spatial dims of ``xs`` (already in its compute
    dtype) as plain differentiable torch ops: the mean :math:`\mu = \tilde\mu + \delta`, the
    deviations :math:`d = x - \tilde\mu` (full size) from a first mean :math:`\tilde\mu`
    (detached: nothing depends on it in exact arithmetic), their mean :math:`\delta` and the
    variance :math:`\overline{d^2} - \delta^2`, the statistics kept as ``(N, C, 1, ...)``.
    Sums that add one by one (a compiler's) do not cost digits at large means, and ``d`` is
    formed element by element from a mean close to the true one, so outputs built on it
    (:math:`x - \mu = d - \delta`) stay exact there."""
    dims = tuple(range(2, xs.dim()))
    rough = xs.detach().mean(dims, keepdim=True)
    deviations = xs - rough
    offset = deviations.mean(dims, keepdim=True)
    mean, var = _shifted(rough, deviations.square().mean(dims, keepdim=True), offset)
    return mean, deviations, offset, var


def _formula_mean_var(xs: Tensor, correction: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean and variance over the spatial dims of ``xs`` (already in its compute dtype) as plain
    differentiable torch ops, kept as ``(N, C, 1, ...)``: :func:`_formula_deviations`'s,
    with the variance divided by ``M - correction``. For forward-mode derivatives."""
    mean, _, _, var = _formula_deviations(xs)
    if correction:
        m = _num_positions(xs)
        var = var * (m / (m - correction))
    return mean, var


def _recording(*tensors: Tensor | None) -> bool:
    """Whether autograd records an op on these tensors. Where it does not (``no_grad``,
    inference, inputs that need no gradient), the autograd Functions of stylenorm run their
    forward directly, without :func:`_apply`'s cost."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Twins of the autograd Functions, by Function (:func:`_ctx_style`).
_CTX_STYLE_TWINS: dict[type[torch.autograd.Function], type[torch.autograd.Function]] = {}


def _ctx_style(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """A twin of ``function`` whose ``forward`` takes ``ctx`` first and calls ``function``'s
    ``forward`` and ``setup_context``: the same computation, saved tensors and backward, and
    its backward node bears ``function``'s name. Made once per Function, for :func:`_apply`."""
    twin = _CTX_STYLE_TWINS.get(function)
    if twin is None:

        def forward(ctx: Any, *args: Any) -> Any:
            output = function.forward(*args)
            function.setup_context(ctx, args, output)
            return output

        def body(namespace: dict[str, Any]) -> None:
            namespace["forward"] = staticmethod(forward)
            namespace["backward"] = staticmethod(function.backward)
            namespace["__module__"] = __name__

        # types.new_class: torch's metaclass names the backward node after the class.
        twin = types.new_class(function.__name__, (torch.autograd.Function,), exec_body=body)
        _CTX_STYLE_TWINS[function] = twin
    return twin


def _apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)``, for calls that pass every argument positionally.

    ``autograd.Function.apply`` of a Function with a separate ``setup_context`` (which
    torch.func transforms need) binds the arguments to ``forward``'s signature with
    :mod:`inspect` on every call, to fill in defaults: about 15 us a call on CPU, as long as a
    small op (a one-op Function: 21 us against 6-7 us, torch 2.12 to 2.15). A ``forward`` that
    takes ``ctx`` itself is applied without that binding. With every parameter of ``forward``
    given (checked) there are no defaults to fill, so where no torch.func transform is active
    this applies :func:`_ctx_style`'s twin, which runs the same ``forward`` and
    ``setup_context`` and records the same backward. Under a transform, for a tensor wrapped by
    one, and under torch.compile (which traces ``Function.apply`` itself), ``function.apply``.
    """
    functorch = torch._C._functorch
    if (
        _is_compiling()
        or len(args) != function.forward.__code__.co_argcount  # defaults to fill in
        or torch._C._are_functorch_transforms_active()
        or any(isinstance(a, Tensor) and functorch.is_functorch_wrapped_tensor(a) for a in args)
    ):
        return function.apply(*args)  # type: ignore[no-untyped-call]
    return _ctx_style(function).apply(*args)  # type: ignore[no-untyped-call]


def _has_tangent(t: Tensor) -> bool:
    """Whether ``t`` is a forward-AD dual tensor (``torch.autograd.forward_ad.make_dual``)."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None  # type: ignore[no-untyped-call]


def _forward_mode(x: Tensor) -> bool:
    """Whether forward-mode derivatives flow through ``x``: it carries a forward-AD tangent, or
    a ``torch.func.jvp`` transform (``jacfwd``, ``hessian``) is active. An
    ``autograd.Function``'s own ``jvp`` rule would lose the outer tangent of nested forward
    transforms (``jacfwd(jacfwd(f))`` gave zero second derivatives), and torch.compile cannot
    trace one; plain torch ops are right at every order. False under torch.compile, which
    traces the transforms itself."""
    if _is_compiling():
        return False
    if _has_tangent(x):
        return True
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    jvp = torch._C._functorch.TransformType.Jvp
    return any(level.key() == jvp for level in retrieve_all_functorch_interpreters())


def _channel_mean_var(x: Tensor, correction: float) -> tuple[Tensor, Tensor]:
    """Per-channel statistics over the batch and spatial dims, i.e. batch norm's, of an
    ``(N, C, *)`` tensor with ``N * prod(*) > correction``; ``(C,)`` each, in the compute dtype."""
    per_channel = x.transpose(0, 1).unsqueeze(0)  # (1, C, N, *spatial)
    mean, var = _mean_var(per_channel, correction, None)
    return mean[0], var[0]


def _is_real(value: object) -> bool:
    """A real Python or NumPy number (``numbers.Real``: not a bool, a tensor or a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _described(value: object) -> str:
    """What a rejected argument is, for an error message: a tensor's dtype, else its type."""
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype}"
    return type(value).__name__


def _check_eps(eps: object, name: str = "eps") -> float:
    """``eps`` as a float: a finite non-negative real number (NumPy's too). Other types are a
    ``TypeError``; NaN, infinity and negative values a ``ValueError``."""
    if not _is_real(eps):
        raise TypeError(f"{name} must be a finite non-negative number, got {_described(eps)}")
    value = float(eps)  # type: ignore[arg-type]
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite non-negative number, got {eps!r}")
    return value


def _check_correction(correction: object) -> float:
    if not _is_real(correction):
        raise TypeError(f"correction must be a number, got {_described(correction)}")
    value = float(correction)  # type: ignore[arg-type]
    if not 0 <= value < math.inf:  # NaN fails too
        raise ValueError(f"correction must be non-negative and finite, got {correction}")
    return value


@_float64_on_overflow()
def mean_var(
    x: Tensor, *, correction: float = 0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Per-sample, per-channel mean and variance over every dimension after the channel one.

    .. math::

        \mu_{nc} = \frac{1}{W_{nc}} \sum_m w_{ncm} x_{ncm}, \qquad
        \sigma^2_{nc} = \frac{1}{W_{nc} - \text{correction}} \sum_m w_{ncm}(x_{ncm}-\mu_{nc})^2

    where :math:`W_{nc} = \sum_m w_{ncm}` is the mask's total weight (the number of positions
    :math:`M` without a mask). With a binary mask this is exactly the statistics of the selected
    positions; soft masks give the weighted (frequency-weight) statistics.

    Args:
        x: features of shape ``(N, C, *spatial)``, one or more spatial dimensions.
        correction: 0 for the biased variance (the default, as instance norm), 1 for Bessel's
            unbiased variance.
        mask: optional non-negative weights of shape ``(N or 1, C or 1, *spatial)``; bool or
            floating. Its total weight must exceed ``correction`` for every sample and channel.

    Returns:
        ``(mean, var)``, each of shape ``(N, C)`` and of ``x``'s dtype (reduced in float32 for
        half and bfloat16 inputs). Differentiable to any order in ``x`` (and in a soft ``mask``).

    The reduction is stable (no :math:`E[x^2]-E[x]^2` cancellation): one pass of torch's
    group-norm kernel, or two on a large channels_last input's own layout, refined by a
    corrected pass at large means; so features with a large mean keep their variance. On the
    CPU, from 4096 values, finite float32 or bfloat16 features whose float32 sum of squares
    overflows (:math:`M \sigma^2` above 3.4e38) are reduced again in float64 (the variance
    then rounds to inf only where it exceeds float32's range).

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> mean, var = mean_var(x)
        >>> mean.shape, var.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
        >>> torch.allclose(var, x.var(dim=(2, 3), correction=0), atol=1e-5)
        True
    """
    x = check_features(x, "x")
    corr = _check_correction(correction)
    w = None if mask is None else check_mask(mask, x, "mask", "x")
    mean, var = _mean_var(x, corr, w, x_name="x")
    return mean.to(x.dtype), var.to(x.dtype)


@_float64_on_overflow()
def mean_std(
    x: Tensor, *, eps: float = 1e-5, correction: float = 0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Per-sample, per-channel mean and standard deviation, with ``eps`` inside the root.

    .. math::

        \mu_{nc} \text{ as in } :func:`mean_var`, \qquad
        \sigma_{nc} = \sqrt{\operatorname{var}_{nc} + \epsilon}

    Putting :math:`\epsilon` inside the root (as instance norm does) keeps the gradient finite on
    constant channels, where :math:`\sqrt{\operatorname{var}} + \epsilon` has an infinite one.

    Args:
        x: features of shape ``(N, C, *spatial)``.
        eps: added to the variance before the square root; must be non-negative. With 0, a
            constant channel's std is 0 and its gradient NaN, as ``torch.std``'s.
        correction: 0 (biased, default) or 1 (unbiased) variance; see :func:`mean_var`.
        mask: optional non-negative weights of shape ``(N or 1, C or 1, *spatial)``.

    Returns:
        ``(mean, std)``, each of shape ``(N, C)`` and of ``x``'s dtype.

    Example:
        >>> x = 3.0 + 2.0 * torch.randn(4, 8, 32, 32)
        >>> mean, std = mean_std(x)
        >>> bool((mean - 3).abs().max() < 0.5), bool((std - 2).abs().max() < 0.5)
        (True, True)
    """
    x = check_features(x, "x")
    corr = _check_correction(correction)
    eps = _check_eps(eps)
    w = None if mask is None else check_mask(mask, x, "mask", "x")
    mean, var = _mean_var(x, corr, w, x_name="x")
    return mean.to(x.dtype), (var + eps).sqrt().to(x.dtype)
