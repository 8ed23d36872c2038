r"""Style-loss modules that cache their target's statistics, and the published conventions.

The modules are thin: each computes its target's statistics once (the style image is fixed while
the input is optimised), keeps them as buffers that follow ``.to()`` and are *not* saved in the
``state_dict`` unless ``persistent=True``, and calls the function of the same name in
:mod:`stylenorm.functional` with them. Under ``torch.autocast`` they compute with autocast off:
every Gram, kernel and statistic is reduced in float32 and the loss is float32, as without
autocast.

:data:`CONVENTIONS` names the exact loss of well-known implementations, so a loss tuned in one
code base can be reproduced (or its weight converted) in another:

============================  =========================================================
name                          loss of one layer
============================  =========================================================
``"gatys2015"``               :math:`\frac{1}{4C^2M^2}\sum(G-A)^2` (unnormalized Grams)
``"pytorch_examples"``        ``mse_loss`` mean of Grams divided by :math:`CM`
``"magenta"``                 per-sample mean over :math:`C^2` of Grams divided by
                              :math:`M`, mean over the batch
``"pystiche"``                ``mse_loss`` mean of Grams divided by :math:`M`
``"adain_lua"``               biased stds (input :math:`\sqrt{v+10^{-6}}`, style no eps),
                              sum over :math:`C`, mean over the batch
``"adain_pytorch"``           unbiased :math:`\sqrt{v+10^{-5}}` both sides, ``mse_loss`` mean
``"li2017_bn"``               biased stds, no eps, mean over :math:`C` and the batch
============================  =========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from . import stats
from .functional import (
    GRAM_NORMALIZATIONS,
    LOSS_REDUCTIONS,
    _autocast_off,
    _check_choice,
    _check_mean_std_options,
    _check_mmd_options,
    _gram_loss_from_gram,
    _loss_gram,
    _loss_position_weights,
    _loss_target_mean_std,
    _mean_std_loss_from_stats,
    _mmd_loss_from_target,
    _mmd_side,
    _MMDSide,
    gram_loss,
    mean_std_loss,
)

__all__ = [
    "CONVENTIONS",
    "GramLoss",
    "MMDLoss",
    "MeanStdLoss",
    "StyleConvention",
    "StyleLoss",
    "get_convention",
]


class _CachedTargetLoss(nn.Module):
    """Shared base: target statistics live in buffers, persistent only when asked; computed with
    autocast off (see :func:`_autocast_off`)."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.persistent = bool(persistent)

    def _cache(self, name: str, value: Tensor | None) -> None:
        # A view (MMD's feature matrices can be one of the caller's target) is copied: the buffer
        # must neither follow the target's later in-place changes nor receive load_state_dict's.
        if value is not None:
            value = value.detach().clone() if value._base is not None else value.detach()
        self.register_buffer(name, value, self.persistent)

    def _check_input_device(self, input: object) -> None:
        """A clear error for input on another device than the cached target (a module not
        moved with ``.to(device)``); other bad input is left to the functional checks."""
        target = next(self.buffers(), None)
        if isinstance(input, Tensor) and target is not None:
            hint = "; move the loss with .to(device)"
            stats._check_device(input, "input", target, "the loss's cached target", hint)


class GramLoss(_CachedTargetLoss):
    r"""Gram-matrix style loss against a fixed target (Gatys et al. 2015); calls
    :func:`stylenorm.functional.gram_loss`.

    .. math::

        \ell = \operatorname{reduce}\big((G(x) - G(y))^2\big), \qquad
        G(y) \text{ computed once, at construction}

    Args:
        target: style features ``(1 or N, C, *spatial)``; detached, its Gram is cached.
        normalize: ``"none"``, ``"hw"`` or ``"chw"`` (default); see
            :func:`stylenorm.functional.gram_matrix`.
        reduction: ``"mean"`` (default), ``"sum"``, ``"batchmean"`` or ``"none"``.
        center: compare channel covariances instead of Gram matrices.
        target_mask: optional position weights ``(1 or N, 1, *spatial)`` of the target.
        persistent: save the cached Gram in the ``state_dict`` (default ``False``).

    Shape:
        - input: ``(N, C, *spatial)``; ``mask`` (forward): ``(N or 1, 1, *spatial)``
        - target_gram buffer: ``(1 or N, C, C)``, float32 for half targets
        - output: ``()`` or ``(N,)`` for ``reduction="none"``

    Example:
        >>> style = torch.randn(1, 8, 16, 16)
        >>> loss_fn = GramLoss(style)
        >>> x = torch.randn(2, 8, 12, 12, requires_grad=True)
        >>> loss = loss_fn(x)
        >>> loss.backward()
        >>> list(loss_fn.state_dict())
        []
    """

    target_gram: Tensor

    def __init__(
        self,
        target: Tensor,
        *,
        normalize: str = "chw",
        reduction: str = "mean",
        center: bool = False,
        target_mask: Tensor | None = None,
        persistent: bool = False,
    ) -> None:
        super().__init__(persistent)
        target = stats.check_features(target, "target")
        self.normalize = _check_choice(normalize, "normalize", GRAM_NORMALIZATIONS)
        self.reduction = _check_choice(reduction, "reduction", LOSS_REDUCTIONS)
        self.center = bool(center)
        with torch.no_grad(), _autocast_off(target):
            weights = _loss_position_weights(target_mask, target, "target_mask", "target")
            self._cache("target_gram", _loss_gram(target, normalize, weights, self.center))

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input_device(input)
        with _autocast_off(input):
            return _gram_loss_from_gram(
                input,
                self.target_gram,
                normalize=self.normalize,
                reduction=self.reduction,
                center=self.center,
                mask=mask,
            )

    def extra_repr(self) -> str:
        return (
            f"channels={self.target_gram.shape[1]}, normalize={self.normalize!r}, "
            f"reduction={self.reduction!r}, center={self.center}"
        )


class MeanStdLoss(_CachedTargetLoss):
    r"""Mean/std (AdaIN, BN-statistics) style loss against a fixed target; calls
    :func:`stylenorm.functional.mean_std_loss`.

    .. math::

        \ell = \operatorname{reduce}\big((\mu(x)-\mu(y))^2 + (\sigma(x)-\sigma(y))^2\big),
        \qquad \sigma = \sqrt{\operatorname{var} + \epsilon}

    Args:
        target: style features ``(1 or N, C, *spatial)``; its mean and std are cached.
        eps: added inside the input's square root (default ``1e-5``).
        target_eps: the same for the target (``None``: ``eps``).
        correction: 0 (biased, default) or 1 (unbiased) variance.
        reduction: ``"mean"`` (default), ``"sum"``, ``"batchmean"`` or ``"none"``.
        target_mask: optional weights ``(1 or N, C or 1, *spatial)`` of the target.
        persistent: save the cached statistics in the ``state_dict`` (default ``False``).

    Shape:
        - input: ``(N, C, *spatial)``; ``mask`` (forward): ``(N or 1, C or 1, *spatial)``
        - target_mean, target_std buffers: ``(1 or N, C)``
        - output: ``()`` or ``(N,)`` for ``reduction="none"``

    Example:
        >>> loss_fn = MeanStdLoss(torch.randn(1, 4, 8, 8), correction=1)
        >>> loss_fn(torch.randn(3, 4, 8, 8)).shape
        torch.Size([])
    """

    target_mean: Tensor
    target_std: Tensor

    def __init__(
        self,
        target: Tensor,
        *,
        eps: float = 1e-5,
        target_eps: float | None = None,
        correction: float = 0,
        reduction: str = "mean",
        target_mask: Tensor | None = None,
        persistent: bool = False,
    ) -> None:
        super().__init__(persistent)
        target = stats.check_features(target, "target")
        self.eps, self.target_eps, self.correction = _check_mean_std_options(
            eps, target_eps, correction, reduction
        )
        self.reduction = reduction
        with torch.no_grad(), _autocast_off(target):
            mean, std = _loss_target_mean_std(target, self.target_eps, self.correction, target_mask)
        self._cache("target_mean", mean)
        self._cache("target_std", std)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input_device(input)
        with _autocast_off(input):
            return _mean_std_loss_from_stats(
                input,
                self.target_mean,
                self.target_std,
                eps=self.eps,
                correction=self.correction,
                reduction=self.reduction,
                mask=mask,
            )

    def extra_repr(self) -> str:
        return (
            f"channels={self.target_mean.shape[1]}, eps={self.eps}, target_eps={self.target_eps},"
            f" correction={self.correction}, reduction={self.reduction!r}"
        )


class MMDLoss(_CachedTargetLoss):
    r"""Squared MMD between per-position features and a fixed target (Li et al. 2017); calls
    :func:`stylenorm.functional.mmd_loss`.

    For the closed-form kernels (linear, polynomial of degree 1 or 2) the target's mean and
    :math:`C \times C` second moment are cached; otherwise its features, position weights and the
    target-target kernel term :math:`q^\top K_{yy} q` (so each call forms only the
    :math:`M_x \times M_x` and :math:`M_x \times M_y` kernel matrices).

    Args:
        target: style features ``(1 or N, C, *spatial)``.
        kernel, degree, offset, sigma, reduction: as :func:`stylenorm.functional.mmd_loss`.
        target_mask: optional position weights ``(1 or N, 1, *spatial)``.
        persistent: save the cached statistics in the ``state_dict`` (default ``False``).

    Shape:
        - input: ``(N, C, *spatial)``; ``mask`` (forward): ``(N or 1, 1, *spatial)``
        - output: ``()`` or ``(N,)`` for ``reduction="none"``

    Example:
        >>> loss_fn = MMDLoss(torch.randn(1, 4, 6, 6), kernel="gaussian", sigma=2.0)
        >>> bool(loss_fn(torch.randn(2, 4, 5, 5)) >= 0)
        True
    """

    def __init__(
        self,
        target: Tensor,
        *,
        kernel: str = "polynomial",
        degree: int = 2,
        offset: float = 0.0,
        sigma: float = 1.0,
        reduction: str = "mean",
        target_mask: Tensor | None = None,
        persistent: bool = False,
    ) -> None:
        super().__init__(persistent)
        target = stats.check_features(target, "target")
        self.kernel, self.degree, self.offset, self.sigma = _check_mmd_options(
            kernel, degree, offset, sigma, reduction
        )
        self.reduction = reduction
        with torch.no_grad(), _autocast_off(target):
            weights = _loss_position_weights(target_mask, target, "target_mask", "target")
            side = _mmd_side(
                target, weights, self.kernel, self.degree, self.offset, self.sigma, True
            )
        for name, value in side._asdict().items():
            self._cache(f"target_{name}", value)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input_device(input)
        target = _MMDSide(*(getattr(self, f"target_{name}") for name in _MMDSide._fields))
        with _autocast_off(input):
            return _mmd_loss_from_target(
                input,
                target,
                kernel=self.kernel,
                degree=self.degree,
                offset=self.offset,
                sigma=self.sigma,
                reduction=self.reduction,
                mask=mask,
            )

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel!r}, degree={self.degree}, offset={self.offset}, "
            f"sigma={self.sigma}, reduction={self.reduction!r}"
        )


# --------------------------------------------------------------------------------------------
# Published conventions
# --------------------------------------------------------------------------------------------


class _ReadOnlyOptions(dict[str, Any]):
    """A dict that refuses changes (a convention's options) and still copies and pickles."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_sealed", False):
            self._read_only()
        super().__init__(*args, **kwargs)
        self._sealed = True

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a convention's options are read-only: build a new StyleConvention")

    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    update = pop = popitem = setdefault = clear = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type[_ReadOnlyOptions], tuple[dict[str, Any]]]:
        return _ReadOnlyOptions, (dict(self),)

    def __hash__(self) -> int:  # type: ignore[override]
        # Read-only, so hashable: a convention can be a set member or a dict key.
        return hash(tuple(sorted(self.items(), key=lambda item: item[0])))


@dataclass(frozen=True)
class StyleConvention:
    r"""The exact style loss of one published implementation, as options of a stylenorm loss.

    ``convention(input, target)`` is ``scale * loss(input, target, **options)`` with ``loss``
    :func:`~stylenorm.functional.gram_loss` or :func:`~stylenorm.functional.mean_std_loss`: the
    loss of *one layer*; sum layers with their weights (or use :class:`StyleLoss`).

    Attributes:
        name: key in :data:`CONVENTIONS`.
        loss: ``"gram"`` or ``"mean_std"``.
        options: keyword arguments of the loss function; kept as a read-only copy (build a
            new convention, or use ``dataclasses.replace``, to change them).
        scale: constant factor in front (Gatys' :math:`\frac14`).
        formula: the source's formula, in Markdown/LaTeX (for the README table).
        source: where the formula comes from.

    Example:
        >>> x, y = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        >>> gatys = get_convention("gatys2015")
        >>> g = lambda f: f.reshape(4, 64) @ f.reshape(4, 64).T
        >>> expected = ((g(x) - g(y)) ** 2).sum() / (4 * 4**2 * 64**2)
        >>> torch.allclose(gatys(x, y), expected)
        True
    """

    name: str
    loss: str
    options: Mapping[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    formula: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.loss not in ("gram", "mean_std"):
            raise ValueError(f"loss must be 'gram' or 'mean_std', got {self.loss!r}")
        if not isinstance(self.options, Mapping):
            raise TypeError(
                f"options must be a mapping of the loss's keyword arguments, got "
                f"{type(self.options).__name__}"
            )
        # A read-only copy: a preset changed by accident would change every later loss.
        object.__setattr__(self, "options", _ReadOnlyOptions(self.options))

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:
        if self.loss == "gram":
            value = gram_loss(input, target, **self.options)
        else:
            value = mean_std_loss(input, target, **self.options)
        return value * self.scale if self.scale != 1.0 else value

    def module(
        self, target: Tensor, *, target_mask: Tensor | None = None, persistent: bool = False
    ) -> nn.Module:
        """The cached-target module of this loss: :class:`GramLoss` or :class:`MeanStdLoss` with
        this convention's options, the target's statistics computed once. Its value is the
        convention's loss divided by ``scale`` (the scale is applied by :class:`StyleLoss`).

        Args:
            target: style features ``(N or 1, C, *spatial)``.
            target_mask: optional weights ``(N or 1, 1 or C, *spatial)`` over the target.
            persistent: keep the cached statistics in the module's state_dict.

        Example:
            >>> convention = CONVENTIONS["pytorch_examples"]  # scale 1
            >>> target, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
            >>> loss = convention.module(target)
            >>> type(loss).__name__, torch.allclose(loss(x), convention(x, target))
            ('GramLoss', True)
        """
        if self.loss == "gram":
            return GramLoss(target, target_mask=target_mask, persistent=persistent, **self.options)
        return MeanStdLoss(target, target_mask=target_mask, persistent=persistent, **self.options)


_CONVENTION_LIST = [
    StyleConvention(
        "gatys2015",
        "gram",
        {"normalize": "hw", "reduction": "mean"},
        scale=0.25,
        formula=r"$\frac{1}{4C^2M^2}\sum_{ij}(G_{ij}-A_{ij})^2$, $G = FF^\top$; batch mean",
        source="Gatys, Ecker & Bethge 2015, A Neural Algorithm of Artistic Style, eq. 4",
    ),
    StyleConvention(
        "pytorch_examples",
        "gram",
        {"normalize": "chw", "reduction": "mean"},
        formula=r"`mse_loss` (mean over $N C^2$) of $FF^\top/(CHW)$",
        source="pytorch/examples `fast_neural_style/neural_style/utils.py`, `neural_style.py`",
    ),
    StyleConvention(
        "magenta",
        "gram",
        {"normalize": "hw", "reduction": "mean"},
        formula=r"mean over $C^2$ of $(FF^\top/(HW) - \cdot)^2$ per sample, mean over batch",
        source="magenta `models/image_stylization/learning.py`",
    ),
    StyleConvention(
        "pystiche",
        "gram",
        {"normalize": "hw", "reduction": "mean"},
        formula=r"`mse_loss` (mean) of $FF^\top/M$ (`GramLoss(normalize=True)`, weight 1)",
        source="pystiche `gram_matrix(normalize=True)`, `GramLoss` defaults",
    ),
    StyleConvention(
        "adain_lua",
        "mean_std",
        {"eps": 1e-6, "target_eps": 0.0, "correction": 0, "reduction": "batchmean"},
        formula=(
            r"$\frac1N\sum_{n,c}(\mu_x-\mu_y)^2 + (\sqrt{v_x+10^{-6}}-\sqrt{v_y})^2$, "
            "biased $v$"
        ),
        source="xunhuang1995/AdaIN-style `lib/StyleINLossModule.lua` (CUDA `nn.Sqrt(1e-6)`)",
    ),
    StyleConvention(
        "adain_pytorch",
        "mean_std",
        {"eps": 1e-5, "correction": 1, "reduction": "mean"},
        formula=r"`mse_loss` of $\mu$ + `mse_loss` of $\sqrt{v+10^{-5}}$, unbiased $v$",
        source="naoto0804/pytorch-AdaIN `function.py` `calc_mean_std`, `net.py`",
    ),
    StyleConvention(
        "li2017_bn",
        "mean_std",
        {"eps": 0.0, "correction": 0, "reduction": "mean"},
        formula=r"$\frac1C\sum_c(\mu_x-\mu_y)^2+(\sigma_x-\sigma_y)^2$, biased, no eps",
        source="Li, Wang, Liu & Hou 2017, Demystifying Neural Style Transfer (BN statistics)",
    ),
]

CONVENTIONS: Mapping[str, StyleConvention] = MappingProxyType({c.name: c for c in _CONVENTION_LIST})
"""Named published style losses; see :class:`StyleConvention`."""


def get_convention(name: str | StyleConvention) -> StyleConvention:
    """Return the :class:`StyleConvention` called ``name`` (a convention passes through).

    Example:
        >>> get_convention("pytorch_examples").options["normalize"]
        'chw'
    """
    if isinstance(name, StyleConvention):
        return name
    if not isinstance(name, str) or name not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}; got {name!r}")
    return CONVENTIONS[name]


# --------------------------------------------------------------------------------------------
# Multi-layer style loss
# --------------------------------------------------------------------------------------------

_LAYER_LOSSES: Mapping[str, Any] = MappingProxyType(
    {"gram": GramLoss, "mean_std": MeanStdLoss, "mmd": MMDLoss}
)


def _by_string_keys(mapping: Mapping[Any, Tensor], argument: str) -> dict[str, Tensor]:
    """``mapping`` with its keys as strings (a state_dict's module names), which must stay
    distinct."""
    keyed = {str(k): v for k, v in mapping.items()}
    if len(keyed) != len(mapping):
        raise ValueError(f"{argument} has keys that are equal as strings: {list(mapping)}")
    return keyed


_T = TypeVar("_T")


def _in_layer(name: str, fn: Callable[..., _T], *args: object, about: tuple[str, ...] = ()) -> _T:
    """``fn(*args)``, its argument errors prefixed with the layer they concern: all of them, or
    with ``about``, those whose message starts with one of these argument names (an option's
    error is every layer's, and is raised as it is)."""
    try:
        return fn(*args)
    except (ValueError, TypeError, IndexError) as error:
        if about and not str(error).startswith(about):
            raise
        raise type(error)(f"layer {name!r}: {error}") from error


class StyleLoss(nn.Module):
    r"""Weighted sum of per-layer style losses against fixed targets.

    .. math::

        \mathcal{L} = \sum_l w_l \, s\, \ell_l(x_l, y_l)

    where :math:`\ell_l` is a :class:`GramLoss`, :class:`MeanStdLoss` or :class:`MMDLoss` (or
    the loss of a named convention, with its scale :math:`s`; otherwise :math:`s = 1`) built on the
    target of layer :math:`l`.

    Args:
        targets: style features per layer: a mapping ``{name: (1 or N, C_l, *spatial_l)}`` or a
            sequence of tensors.
        weights: per-layer weights :math:`w_l` (a mapping with the same keys, a sequence of the
            same length, or ``None`` for all 1).
        loss: ``"gram"`` (default), ``"mean_std"``, ``"mmd"``, or a convention name of
            :data:`CONVENTIONS` / a :class:`StyleConvention`.
        target_masks: optional position weights of the targets, per layer (each layer's
            module's ``target_mask``): a mapping with some of the keys of ``targets``, or a
            sequence of the same length with ``None`` for an unmasked layer. Each must match
            its layer's spatial size (resize a mask to every layer yourself, as Gatys et al.
            2017 do for spatial control).
        persistent: save the cached targets in the ``state_dict`` (default ``False``).
        **options: keyword arguments of every layer's module (e.g. ``normalize="hw"``); not
            allowed together with a convention.

    Forward takes the input features in the same form as ``targets``: a mapping that holds (at
    least) the target's keys (extra entries, e.g. a content layer, are ignored), or a sequence of
    the same length; and optionally ``masks``, the input's position weights per layer, in the
    form of ``target_masks`` (each layer's module's ``mask``).

    Shape:
        - targets: layer ``l`` ``(1 or N, C_l, *spatial_l)``
        - target_masks: layer ``l`` ``(1 or N, 1, *spatial_l)`` (``MeanStdLoss``: ``C_l`` or 1
          channels)
        - inputs: layer ``l`` ``(N, C_l, *spatial'_l)``; masks: ``(N or 1, 1, *spatial'_l)``
        - output: ``()``, or ``(N,)`` with ``reduction="none"``

    Example:
        >>> style = {"relu1": torch.randn(1, 4, 16, 16), "relu2": torch.randn(1, 8, 8, 8)}
        >>> loss_fn = StyleLoss(style, weights={"relu1": 1.0, "relu2": 0.5}, loss="magenta")
        >>> x = {"relu1": torch.randn(2, 4, 16, 16), "relu2": torch.randn(2, 8, 8, 8)}
        >>> loss_fn(x).shape
        torch.Size([])
        >>> sky = torch.zeros(2, 1, 16, 16)
        >>> sky[..., :8, :] = 1.0  # the first layer's loss on the upper half only
        >>> loss_fn(x, masks={"relu1": sky}).shape
        torch.Size([])
    """

    def __init__(
        self,
        targets: Mapping[str, Tensor] | Sequence[Tensor],
        *,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        loss: str | StyleConvention = "gram",
        target_masks: Mapping[str, Tensor | None] | Sequence[Tensor | None] | None = None,
        persistent: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if isinstance(targets, Mapping):
            self.keyed = True
            items = list(_by_string_keys(targets, "targets").items())
        elif isinstance(targets, Sequence) and not isinstance(targets, (str, Tensor)):
            self.keyed = False
            items = [(str(i), v) for i, v in enumerate(targets)]
        else:
            raise TypeError(
                f"targets must be a mapping or a sequence of tensors, got {type(targets).__name__}"
            )
        if not items:
            raise ValueError("targets must hold at least one layer")
        names = [k for k, _ in items]
        self.layer_weights = self._check_weights(weights, names)
        masks = self._per_layer(target_masks, "target_masks", names)
        make: Callable[[Tensor, Tensor | None], nn.Module]
        if isinstance(loss, str) and loss in _LAYER_LOSSES:
            self.convention: StyleConvention | None = None
            self.scale = 1.0
            layer: type[nn.Module] = _LAYER_LOSSES[loss]

            def make(target: Tensor, mask: Tensor | None) -> nn.Module:
                return layer(target, target_mask=mask, persistent=persistent, **options)

        else:
            if not isinstance(loss, StyleConvention) and (
                not isinstance(loss, str) or loss not in CONVENTIONS
            ):
                choices = ", ".join([*_LAYER_LOSSES, *CONVENTIONS])
                raise ValueError(
                    f"loss must be one of {choices} or a StyleConvention; got {loss!r}"
                )
            if options:
                raise TypeError(
                    f"options {sorted(options)} cannot be combined with a convention; "
                    "a convention fixes every option"
                )
            convention = self.convention = get_convention(loss)
            self.scale = convention.scale

            def make(target: Tensor, mask: Tensor | None) -> nn.Module:
                return convention.module(target, target_mask=mask, persistent=persistent)

        # Errors about a layer's target or target mask name the layer; the options' do not.
        about = ("target ", "target_mask ")
        self.layers = nn.ModuleDict(
            {k: _in_layer(k, make, t, masks[k], about=about) for k, t in items}
        )

    def _per_layer(
        self,
        masks: Mapping[str, Tensor | None] | Sequence[Tensor | None] | None,
        argument: str,
        names: list[str],
    ) -> dict[str, Tensor | None]:
        """``masks`` in the form of the targets, as ``{layer: mask or None}``."""
        if masks is None:
            return dict.fromkeys(names)
        if self.keyed:
            if not isinstance(masks, Mapping):
                raise TypeError(
                    f"{argument} must be a mapping like targets, got {type(masks).__name__}"
                )
            keys = {str(k): v for k, v in masks.items()}
            unknown = sorted(set(keys) - set(names))
            if unknown:
                raise ValueError(f"{argument} has layers {unknown} that targets lack")
        else:
            if isinstance(masks, (Mapping, str, Tensor)) or not isinstance(masks, Sequence):
                raise TypeError(
                    f"{argument} must be a sequence like targets, got {type(masks).__name__}"
                )
            if len(masks) != len(names):
                raise ValueError(
                    f"{argument} must have one entry (a mask or None) per layer "
                    f"({len(names)}); got {len(masks)}"
                )
            keys = dict(zip(names, masks, strict=True))
        for k, v in keys.items():
            if v is not None and not isinstance(v, Tensor):
                raise TypeError(
                    f"{argument}[{k!r}] must be a tensor or None, got {type(v).__name__}"
                )
        return {k: keys.get(k) for k in names}

    @staticmethod
    def _check_weights(
        weights: Mapping[str, float] | Sequence[float] | None, names: list[str]
    ) -> dict[str, float]:
        if weights is None:
            return dict.fromkeys(names, 1.0)
        if isinstance(weights, Mapping):
            keys = {str(k) for k in weights}
            if keys != set(names):
                raise ValueError(
                    f"weights must have the keys of targets {names}; got {sorted(keys)}"
                )
            given = {str(k): v for k, v in weights.items()}
        else:
            values = list(weights)
            if len(values) != len(names):
                raise ValueError(
                    f"weights must have one entry per layer ({len(names)}); got {len(values)}"
                )
            given = dict(zip(names, values, strict=True))
        checked = {}
        for name, value in given.items():
            boolean = isinstance(value, bool) or str(getattr(value, "dtype", "")).endswith("bool")
            try:
                number = None if boolean or isinstance(value, str) else float(value)
            except (TypeError, ValueError, RuntimeError):  # (a tensor of more than one value)
                number = None
            except OverflowError:  # an int beyond float's range
                number = math.inf
            if number is None:
                raise TypeError(f"weights[{name!r}] must be a number, got {value!r}")
            if not math.isfinite(number):
                raise ValueError(f"weights[{name!r}] must be finite, got {number}")
            checked[name] = number
        return checked

    def forward(
        self,
        inputs: Mapping[str, Tensor] | Sequence[Tensor],
        masks: Mapping[str, Tensor | None] | Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        if self.keyed:
            if not isinstance(inputs, Mapping):
                raise TypeError(
                    f"inputs must be a mapping like targets, got {type(inputs).__name__}"
                )
            given = _by_string_keys(inputs, "inputs")  # the targets' keys became strings
            missing = [k for k in self.layers if k not in given]
            if missing:
                raise ValueError(f"inputs lack the layers {missing} of the targets")
            features = {k: given[k] for k in self.layers}
        else:
            if isinstance(inputs, Mapping) or not isinstance(inputs, Sequence):
                raise TypeError(
                    f"inputs must be a sequence like targets, got {type(inputs).__name__}"
                )
            if len(inputs) != len(self.layers):
                raise ValueError(
                    f"inputs must hold {len(self.layers)} feature maps, got {len(inputs)}"
                )
            features = {str(i): x for i, x in enumerate(inputs)}
        layer_masks = self._per_layer(masks, "masks", list(self.layers))
        total: Tensor | None = None
        for name, layer in self.layers.items():
            term = _in_layer(name, layer, features[name], layer_masks[name])
            term = term * (self.layer_weights[name] * self.scale)
            total = term if total is None else total + term
        assert total is not None
        return total

    def extra_repr(self) -> str:
        loss = self.convention.name if self.convention is not None else "per-layer"
        return f"convention={loss!r}, weights={self.layer_weights}"
