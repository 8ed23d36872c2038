"""Helpers that move models and checkpoints between torch.nn and stylenorm.

``load_legacy_state_dict`` loads a checkpoint whose ``InstanceNorm`` layers still carry
running-statistic buffers although the model's layers have ``track_running_stats=False`` (the
default since PyTorch 0.4; checkpoints of many style-transfer repositories predate it). torch
refuses such a checkpoint with "Unexpected running stats buffer(s)". Those buffers were never
used by the layers, so dropping them changes no output; this helper does it explicitly and tells
you which keys it dropped.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from . import norm, style

__all__ = [
    "LegacyLoadResult",
    "load_legacy_state_dict",
    "strip_legacy_running_stats",
    "style_parameters",
    "to_conditional",
    "to_stylenorm",
    "to_torch",
]

_RUNNING_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


class LegacyLoadResult(NamedTuple):
    """What :func:`load_legacy_state_dict` did: torch's missing/unexpected keys, plus the
    running-statistic keys it dropped.

    Attributes:
        missing_keys: keys of ``model`` the state dict lacked (as torch reports them).
        unexpected_keys: keys of the state dict ``model`` has no place for.
        dropped_keys: running-statistic keys of instance norms without tracked statistics,
            removed before loading.

    Example:
        >>> model = nn.Sequential(nn.InstanceNorm2d(3))
        >>> result = load_legacy_state_dict(
        ...     model, {"0.running_mean": torch.zeros(3), "0.running_var": torch.ones(3)})
        >>> result.missing_keys, result.unexpected_keys, result.dropped_keys
        ([], [], ['0.running_mean', '0.running_var'])
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    dropped_keys: list[str]


def strip_legacy_running_stats(
    model: nn.Module, state_dict: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Return a copy of ``state_dict`` without the running-statistic entries of every instance
    norm in ``model`` that has ``track_running_stats=False``, and the list of dropped keys.

    Works for torch's and stylenorm's ``InstanceNorm1d/2d/3d`` alike. The input mapping is not
    modified; its metadata (``_metadata``) is carried over.

    Example:
        >>> legacy = {"norm.running_mean": torch.zeros(3), "norm.running_var": torch.ones(3)}
        >>> model = nn.Sequential()
        >>> model.add_module("norm", nn.InstanceNorm2d(3))
        >>> cleaned, dropped = strip_legacy_running_stats(model, legacy)
        >>> dropped
        ['norm.running_mean', 'norm.running_var']
    """
    _check_model(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    stale = {
        f"{name}.{stat}" if name else stat
        # Every name of a shared module: the state dict lists it under each.
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, _InstanceNorm) and not module.track_running_stats
        for stat in _RUNNING_STAT_NAMES
    }
    cleaned = {k: v for k, v in state_dict.items() if k not in stale}
    dropped = [k for k in state_dict if k in stale]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        cleaned = _with_metadata(cleaned, metadata)
    return cleaned, dropped


def _with_metadata(state: dict[str, Any], metadata: Any) -> dict[str, Any]:
    ordered: OrderedDict[str, Any] = OrderedDict(state)
    ordered._metadata = metadata  # type: ignore[attr-defined]
    return ordered


def load_legacy_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> LegacyLoadResult:
    """Load ``state_dict`` into ``model``, dropping stale instance-norm running statistics.

    Equivalent to ``model.load_state_dict(cleaned, strict)`` with ``cleaned`` from
    :func:`strip_legacy_running_stats`; every other mismatch still raises (``strict=True``) or
    is reported, exactly as ``load_state_dict`` does.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3, affine=True))
        >>> legacy = dict(model.state_dict(), **{"1.running_mean": torch.zeros(3),
        ...                                      "1.running_var": torch.ones(3)})
        >>> load_legacy_state_dict(model, legacy).dropped_keys
        ['1.running_mean', '1.running_var']
    """
    cleaned, dropped = strip_legacy_running_stats(model, state_dict)
    result = model.load_state_dict(cleaned, strict=strict)
    return LegacyLoadResult(list(result.missing_keys), list(result.unexpected_keys), dropped)


_TO_STYLENORM: dict[type[nn.Module], type[_NormBase]] = {
    nn.BatchNorm1d: norm.BatchNorm1d,
    nn.BatchNorm2d: norm.BatchNorm2d,
    nn.BatchNorm3d: norm.BatchNorm3d,
    nn.InstanceNorm1d: norm.InstanceNorm1d,
    nn.InstanceNorm2d: norm.InstanceNorm2d,
    nn.InstanceNorm3d: norm.InstanceNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[_NormBase]] = {v: k for k, v in _TO_STYLENORM.items()}  # type: ignore[misc]


# A conversion's record: the module each original became (a module shared by several parents,
# or used twice in one, becomes one module again), and the children it replaced, to put back if
# the conversion fails half way.
_Memo = dict[int, nn.Module]
_Undo = list[tuple[nn.Module, str, nn.Module]]


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _convert_children(
    module: nn.Module, convert: Callable[[nn.Module], nn.Module], memo: _Memo, undo: _Undo
) -> None:
    """Replace each child ``c`` of ``module`` by ``convert(c)``, in place, recorded in ``undo``.
    Every slot (``_modules``), so a module used twice in one parent is converted in both; each
    module is converted once (``memo``), so one shared by several parents stays shared."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if id(child) not in memo:  # (the originals stay alive, in place or in undo: ids hold)
            memo[id(child)] = convert(child)
        new = memo[id(child)]
        if new is not child:
            undo.append((module, name, child))
            module.add_module(name, new)  # as torch's own conversions do: its hooks fire


def _converted(model: nn.Module, convert: Callable[..., nn.Module]) -> nn.Module:
    """``convert(model, memo=, undo=)``; on an error, the model as it was (its replaced
    children put back)."""
    _check_model(model)
    undo: _Undo = []
    try:
        return convert(model, memo={}, undo=undo)
    except BaseException:
        for parent, name, child in reversed(undo):
            parent._modules[name] = child  # a revert, not a registration: no hooks fire
        raise


def _swap_norms(
    module: nn.Module,
    mapping: dict[type[nn.Module], type[_NormBase]],
    memo: _Memo,
    undo: _Undo,
) -> nn.Module:
    target = mapping.get(type(module))
    output = module
    if target is not None:
        assert isinstance(module, _NormBase)
        output = target(
            module.num_features,
            module.eps,
            module.momentum,  # type: ignore[arg-type]
            module.affine,
            module.track_running_stats,
            device="meta",
            bias=module.bias is not None,
        )
        # Share the very tensors, so optimizers, devices and dtypes carry over untouched.
        for name, param in module._parameters.items():
            output._parameters[name] = param
        for name, buffer in module._buffers.items():
            output._buffers[name] = buffer
        output._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        # The quantization config too, as torch's convert_sync_batchnorm keeps it. Not other
        # attributes: an instance-level forward (a wrapper's hook) or a pruned weight would
        # then bypass or corrupt the new layer.
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
        output.train(module.training)
    _convert_children(output, lambda child: _swap_norms(child, mapping, memo, undo), memo, undo)
    return output


def to_stylenorm(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm*d`` / ``InstanceNorm*d`` in ``model`` by stylenorm's.

    The new layers share the original parameters and buffers (same tensors: optimizer state,
    device and dtype carry over), keep the training mode, and compute the same numbers. Children
    are replaced in place; the (possibly new) root is returned, so write
    ``model = to_stylenorm(model)``. A layer used in several places (or twice in one container)
    becomes one new layer, used in all of them. Subclasses, lazy and sync variants are left
    alone; hooks registered on a replaced layer, and its instance attributes other than
    ``qconfig``, are not carried over.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True))
        >>> model = to_stylenorm(model)
        >>> type(model[1]).__module__
        'stylenorm.norm'
    """
    return _converted(model, functools.partial(_swap_norms, mapping=_TO_STYLENORM))


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of :func:`to_stylenorm`: stylenorm's drop-ins back to ``torch.nn``'s classes.

    Example:
        >>> model = to_torch(nn.Sequential(stylenorm.BatchNorm2d(4)))
        >>> type(model[0]) is nn.BatchNorm2d
        True
    """
    return _converted(model, functools.partial(_swap_norms, mapping=_TO_TORCH))


_TO_CONDITIONAL: dict[type[nn.Module], type[style._ConditionalInstanceNorm]] = {
    nn.InstanceNorm1d: style.ConditionalInstanceNorm1d,
    nn.InstanceNorm2d: style.ConditionalInstanceNorm2d,
    nn.InstanceNorm3d: style.ConditionalInstanceNorm3d,
}


def _conditional(module: nn.Module, memo: _Memo, undo: _Undo, num_styles: int) -> nn.Module:
    for kind, target in _TO_CONDITIONAL.items():
        if isinstance(module, kind) and module.affine:
            return target.from_instance_norm(module, num_styles).train(module.training)
    _convert_children(module, lambda child: _conditional(child, memo, undo, num_styles), memo, undo)
    if type(module) is nn.Sequential and any(
        isinstance(m, style._ConditionalInstanceNorm) for m in module.modules()
    ):
        chain = style.StyleSequential(OrderedDict(module._modules))  # every slot, repeats too
        chain.training = module.training  # the container's own flag only: children keep theirs
        return chain
    return module


def to_conditional(model: nn.Module, num_styles: int) -> nn.Module:
    r"""Turn a single-style network into a ``num_styles``-style one (Dumoulin et al. 2017).

    Every affine ``InstanceNorm{1,2,3}d`` (torch's or stylenorm's) becomes the
    :class:`~stylenorm.ConditionalInstanceNorm2d` (1d/3d) of the same rank, built by
    ``from_instance_norm``: every row of its banks starts as the norm's :math:`\gamma` and
    :math:`\beta`, so each style first computes exactly what the original network computed,
    :math:`y = \gamma_s \hat x + \beta_s` with :math:`\gamma_s = \gamma, \beta_s = \beta`.
    Fine-tune :func:`style_parameters` (alone, or with the rest) to let the styles diverge.

    The converted norms take ``(input, style)``. Every ``nn.Sequential`` that holds one becomes a
    :class:`~stylenorm.StyleSequential` with the same children and names (the same
    ``state_dict`` keys), whose ``forward(input, style)`` passes the style on: a plain chain of
    layers is ready to call as ``model(x, style)``. A custom module's ``forward`` must pass the
    style to its conditional norms itself (and set ``takes_style = True`` to sit inside a
    ``StyleSequential``).

    Other layers, non-affine instance norms (nothing to condition) and other norms are left
    alone; the conversion is in place for children, hooks of replaced modules are not carried
    over, and the (possibly new) root is returned: write ``model = to_conditional(model, S)``.
    A module used in several places (or twice in one ``Sequential``) is converted once and
    stays shared; the training modes of all layers are kept. If the conversion fails (a custom
    module without ``takes_style`` inside a ``Sequential``), the model is left as it was.
    An instance norm that tracks running statistics warns: a conditional norm always uses
    instance statistics, so its evaluation-mode output differs.

    Args:
        model: the network.
        num_styles: number of styles :math:`S`, positive.

    Returns:
        The converted network.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True), nn.ReLU())
        >>> x = torch.randn(2, 3, 16, 16)
        >>> before = net(x)
        >>> net = to_conditional(net, num_styles=4)
        >>> type(net).__name__, type(net[1]).__name__
        ('StyleSequential', 'ConditionalInstanceNorm2d')
        >>> torch.allclose(net(x, 3), before, atol=1e-6)
        True
    """
    _check_model(model)
    (count,) = style._positive_sizes(num_styles=num_styles)  # as the layers' constructors
    return _converted(model, functools.partial(_conditional, num_styles=count))


def style_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The style banks (``weight``, and ``bias`` if any) of every conditional norm in ``model``.

    Train these alone to fit new styles into a converted network (each once, even if shared).

    Example:
        >>> net = to_conditional(nn.Sequential(nn.InstanceNorm2d(4, affine=True)), 3)
        >>> [tuple(p.shape) for p in style_parameters(net)]
        [(3, 4), (3, 4)]
        >>> optimizer = torch.optim.Adam(style_parameters(net), lr=1e-3)
    """
    _check_model(model)
    return _style_parameters(model)


def _style_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, style._ConditionalInstanceNorm):
            for param in module.style_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param
