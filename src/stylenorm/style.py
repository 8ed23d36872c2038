r"""Style layers: ``ConditionalInstanceNorm1d/2d/3d``, ``AdaIN`` and ``StyleAdaIN``.

Thin modules over :mod:`stylenorm.functional` (the math lives there): the conditional norms own
one :math:`\gamma` and one :math:`\beta` row per style (Dumoulin et al. 2017), ``AdaIN`` is
parameter-free (Huang & Belongie 2017) and ``StyleAdaIN`` maps a style code to the AdaIN
statistics with a learned linear layer (Karras et al. 2019). The style is always an argument of
``forward``, never state stored on the module; :class:`StyleSequential` threads it through a
chain of layers.

The style layers run under ``torch.compile(fullgraph=True)``, ``torch.export`` and ONNX export;
they are not TorchScript-scriptable (the drop-in norms of :mod:`stylenorm.norm` are).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from . import functional, stats

__all__ = [
    "AdaIN",
    "ConditionalInstanceNorm1d",
    "ConditionalInstanceNorm2d",
    "ConditionalInstanceNorm3d",
    "StyleAdaIN",
    "StyleSequential",
]

_CIN = TypeVar("_CIN", bound="_ConditionalInstanceNorm")


class _ConditionalInstanceNorm(nn.Module):
    """Shared behaviour of the conditional instance norms; subclasses set the expected rank."""

    _batched_dim: int  # rank of a batched input: 3, 4 or 5
    takes_style: ClassVar[bool] = True  # StyleSequential passes it the style

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        num_styles: int,
        eps: float = 1e-5,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_features, num_styles = _positive_sizes(num_features=num_features, num_styles=num_styles)
        self.num_features = num_features
        self.eps = stats._check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_styles, num_features, **factory))  # type: ignore[arg-type]
        if bias:
            self.bias = nn.Parameter(torch.empty(num_styles, num_features, **factory))  # type: ignore[arg-type]
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def num_styles(self) -> int:
        """Number of styles :math:`S`: the rows of the banks."""
        return int(self.weight.shape[0])

    def reset_parameters(self) -> None:
        """Every style starts as the identity affine map: :math:`\\gamma = 1, \\beta = 0`.

        Example:
            >>> norm = ConditionalInstanceNorm2d(3, num_styles=2)
            >>> _ = norm.weight.data.mul_(5.0)
            >>> norm.reset_parameters()
            >>> bool((norm.weight == 1).all()), bool((norm.bias == 0).all())
            (True, True)
        """
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_styles={self.num_styles}, eps={self.eps}, "
            f"bias={self.bias is not None}"
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (self._batched_dim - 1, self._batched_dim):
            raise ValueError(
                f"expected {self._batched_dim - 1}D or {self._batched_dim}D input "
                f"(got {input.dim()}D input)"
            )
        channels = input.shape[-self._batched_dim + 1]
        if channels != self.num_features:
            raise ValueError(
                f"expected input's size at dim={input.dim() - self._batched_dim + 1} to match "
                f"num_features ({self.num_features}), but got: {channels}."
            )

    def forward(self, input: Tensor, style: int | Tensor) -> Tensor:
        r"""Normalize ``input`` and apply the style's :math:`\gamma_s, \beta_s`.

        Args:
            input: ``(N, C, *spatial)``, or unbatched ``(C, *spatial)``.
            style: an ``int`` or 0-dim integer tensor (one style for the batch), an integer
                tensor ``(N,)`` (one id per sample), or floating mixing weights ``(N, S)`` /
                ``(S,)`` (style interpolation; a floating tensor is always read as weights).
                See :func:`stylenorm.functional.conditional_instance_norm`.

        Returns:
            The output, of the input's shape and memory format.
        """
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        if input.dim() == self._batched_dim - 1:
            if isinstance(style, Tensor) and not (
                style.dim() == 0 or (style.is_floating_point() and style.dim() == 1)
            ):
                raise ValueError(
                    f"unbatched input needs one style for it (an int, a 0-dim id tensor or "
                    f"(num_styles,) mixing weights), got style of shape {tuple(style.shape)}"
                )
            out = functional.conditional_instance_norm(
                input.unsqueeze(0), style, self.weight, self.bias, self.eps
            )
            return out.squeeze(0)
        return functional.conditional_instance_norm(input, style, self.weight, self.bias, self.eps)

    def style_parameters(self) -> Iterator[nn.Parameter]:
        """The style banks (``weight``, and ``bias`` if any): train these alone to fit a style.

        Rows of styles absent from a batch get an exactly zero gradient; plain SGD or Adam
        (without weight decay) leaves them unchanged. Weight decay would shrink every row.

        Example:
            >>> norm = ConditionalInstanceNorm2d(3, num_styles=4)
            >>> optimizer = torch.optim.Adam(norm.style_parameters(), lr=1e-3)
            >>> [tuple(p.shape) for p in norm.style_parameters()]
            [(4, 3), (4, 3)]
        """
        yield self.weight
        if self.bias is not None:
            yield self.bias

    @torch.no_grad()
    def add_styles(
        self,
        count: int = 1,
        init: Literal["mean", "copy", "identity"] = "mean",
        *,
        source: int | None = None,
    ) -> list[int]:
        """Grow the banks by ``count`` styles; existing rows are kept. Returns the new ids.

        The new rows start as the ``"mean"`` of the existing styles, a ``"copy"`` of style
        ``source``, or the ``"identity"`` (:math:`\\gamma = 1, \\beta = 0`).

        ``weight`` and ``bias`` become new, larger ``Parameter`` objects: build the optimizer
        after growing. A ``state_dict`` saved before growing has the old number of rows; load it
        into a module of that size, then grow it again::

            m = ConditionalInstanceNorm2d(C, old_num_styles)
            m.load_state_dict(old_state_dict)
            m.add_styles(k)

        and a state_dict saved after growing loads into a module built with the new
        ``num_styles``.

        Example:
            >>> m = ConditionalInstanceNorm2d(3, num_styles=2)
            >>> m.add_styles(1, init="copy", source=0)
            [2]
            >>> m.weight.shape
            torch.Size([3, 3])
        """
        (count,) = _positive_sizes(count=count)
        old = self.num_styles
        if init == "copy":
            if source is None or isinstance(source, bool) or not hasattr(type(source), "__index__"):
                raise TypeError(f"init='copy' needs an int source style id, got {source!r}")
            source = operator.index(source)
            if not 0 <= source < old:
                raise IndexError(
                    f"source style id {source} is out of range for num_styles={old} "
                    f"(valid ids are 0 to {old - 1})"
                )
        elif source is not None:
            raise ValueError(f"source is only used with init='copy', got init={init!r}")
        if init not in ("mean", "copy", "identity"):
            raise ValueError(f"init must be 'mean', 'copy' or 'identity', got {init!r}")

        def grown(bank: Tensor, identity: float) -> nn.Parameter:
            if init == "mean":
                row = bank.mean(0, keepdim=True)
            elif init == "copy":
                row = bank[source : source + 1]  # type: ignore[operator]
            else:
                row = torch.full_like(bank[:1], identity)
            return nn.Parameter(torch.cat([bank, row.expand(count, -1)]), bank.requires_grad)

        self.weight = grown(self.weight, 1.0)
        if self.bias is not None:
            self.bias = grown(self.bias, 0.0)
        return list(range(old, old + count))

    @classmethod
    def from_instance_norm(cls: type[_CIN], module: nn.Module, num_styles: int) -> _CIN:
        """Build a conditional norm whose every style starts as an affine InstanceNorm's.

        Takes torch's or stylenorm's ``InstanceNorm{1,2,3}d(affine=True)`` of the matching rank;
        every row of the banks is its :math:`\\gamma`/:math:`\\beta`, with the same ``eps``,
        device and dtype. A conditional norm always normalizes with the instance statistics, so
        running statistics are dropped (a ``UserWarning`` says so when the norm tracks them).

        Example:
            >>> norm = torch.nn.InstanceNorm2d(3, affine=True)
            >>> cin = ConditionalInstanceNorm2d.from_instance_norm(norm, num_styles=4)
            >>> x = torch.randn(2, 3, 8, 8)
            >>> torch.allclose(cin(x, 3), norm(x), atol=1e-6)
            True
        """
        expected = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}
        kind = expected[cls._batched_dim]
        if not isinstance(module, kind):
            raise TypeError(
                f"{cls.__name__}.from_instance_norm expects a {kind.__name__}, "
                f"got {type(module).__name__}"
            )
        if not module.affine or module.weight is None:
            raise ValueError(f"{type(module).__name__} must be affine=True to copy its gamma/beta")
        if module.track_running_stats:
            warnings.warn(
                "the InstanceNorm tracks running statistics; the conditional norm always uses "
                "instance statistics, so its evaluation-mode output differs",
                UserWarning,
                stacklevel=2,
            )
        weight = module.weight
        new = cls(
            module.num_features,
            num_styles,
            module.eps,
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(weight.detach().expand_as(new.weight))
            if new.bias is not None and module.bias is not None:
                new.bias.copy_(module.bias.detach().expand_as(new.bias))
        # A frozen gamma or beta stays frozen.
        new.weight.requires_grad_(weight.requires_grad)
        if new.bias is not None and module.bias is not None:
            new.bias.requires_grad_(module.bias.requires_grad)
        return new


_CIN_DOC = r"""Conditional instance normalization over a {rank_in} input (Dumoulin et al. 2017).

    .. math::

        y = \gamma_s \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}
            + \beta_s

    with the mean and biased variance per sample and channel over the spatial dimensions, and
    one learned row :math:`\gamma_s, \beta_s` of the ``(num_styles, num_features)`` banks per
    style. ``forward(input, style)`` takes the style as an ``int`` (whole batch), an integer
    tensor ``(N,)`` (one id per sample) or floating mixing weights ``(N, num_styles)`` /
    ``(num_styles,)`` (style interpolation: :math:`\gamma = w\,\Gamma`, :math:`\beta = w\,B`).
    Only the selected rows get a gradient. See
    :func:`stylenorm.functional.conditional_instance_norm`.

    Args:
        num_features: number of channels :math:`C`.
        num_styles: number of styles :math:`S`.
        eps: added to the variance inside the square root. Default: 1e-5.
        bias: learn :math:`\beta` too (keyword-only). Default: True.
        device, dtype: factory keyword arguments for the banks.

    Attributes:
        weight: the :math:`\gamma` bank ``(num_styles, num_features)``, initialized to ones.
        bias: the :math:`\beta` bank, initialized to zeros, or None.

    Shape:
        - Input: :math:`{shape_in}` or unbatched :math:`{shape_unbatched}` (with one style)
        - Style: ``int``, :math:`()`, :math:`(N)`, :math:`(N, S)` or :math:`(S)`
        - Output: same shape as the input

    Example::

        >>> m = {name}(4, num_styles=3)
        >>> x = torch.randn({example})
        >>> m(x, 2).shape == m(x, torch.tensor([0, 2])).shape == x.shape
        True
        >>> mixed = m(x, torch.tensor([0.5, 0.5, 0.0]))  # halfway between styles 0 and 1
    """


class ConditionalInstanceNorm1d(_ConditionalInstanceNorm):
    __doc__ = _CIN_DOC.format(
        name="ConditionalInstanceNorm1d",
        rank_in="3D (or unbatched 2D)",
        shape_in="(N, C, L)",
        shape_unbatched="(C, L)",
        example="2, 4, 16",
    )
    _batched_dim = 3


class ConditionalInstanceNorm2d(_ConditionalInstanceNorm):
    __doc__ = _CIN_DOC.format(
        name="ConditionalInstanceNorm2d",
        rank_in="4D (or unbatched 3D)",
        shape_in="(N, C, H, W)",
        shape_unbatched="(C, H, W)",
        example="2, 4, 8, 8",
    )
    _batched_dim = 4


class ConditionalInstanceNorm3d(_ConditionalInstanceNorm):
    __doc__ = _CIN_DOC.format(
        name="ConditionalInstanceNorm3d",
        rank_in="5D (or unbatched 4D)",
        shape_in="(N, C, D, H, W)",
        shape_unbatched="(C, D, H, W)",
        example="2, 4, 4, 4, 4",
    )
    _batched_dim = 5


class AdaIN(nn.Module):
    r"""Adaptive instance normalization (Huang & Belongie 2017), parameter-free.

    .. math::

        y = \sigma_s \frac{x - \mu_c}{\sigma_c} + \mu_s, \qquad
        \text{out} = m\,(\alpha y + (1 - \alpha) x) + (1 - m)\,x

    with :math:`\sigma = \sqrt{\operatorname{var} + \epsilon}` on both sides. ``forward`` takes the
    arguments of :func:`stylenorm.functional.adain` (style images or precomputed statistics,
    ``alpha``, masks, interpolation weights); :meth:`forward_regions` those of
    :func:`stylenorm.functional.adain_regions` (several styles in several regions).

    Args:
        eps: added to the variances inside the square roots. Default: 1e-5.
        correction: 0 for the biased variance (default), 1 for the unbiased one.

    Shape:
        - Content: :math:`(N, C, *)`; style: :math:`(N \text{ or } 1, C, *)`
        - Output: same shape as the content

    Example::

        >>> adain = AdaIN()
        >>> content, style = torch.randn(2, 3, 16, 16), torch.randn(1, 3, 24, 24)
        >>> adain(content, style, alpha=0.8).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, eps: float = 1e-5, correction: float = 0) -> None:
        super().__init__()
        self.eps = stats._check_eps(eps)
        stats._check_correction(correction)
        self.correction = correction

    def extra_repr(self) -> str:
        return f"eps={self.eps}, correction={self.correction}"

    def forward(
        self,
        content: Tensor,
        style: Tensor | Sequence[Tensor] | None = None,
        *,
        style_mean: Tensor | Sequence[Tensor] | None = None,
        style_std: Tensor | Sequence[Tensor] | None = None,
        alpha: float | Tensor = 1.0,
        content_mask: Tensor | None = None,
        style_mask: Tensor | Sequence[Tensor | None] | None = None,
        style_weights: Tensor | None = None,
    ) -> Tensor:
        r""":math:`\alpha\,\mathrm{AdaIN}(x, s) + (1 - \alpha)\,x`, with the layer's ``eps`` and
        ``correction``: :func:`stylenorm.functional.adain`.

        Args:
            content: ``(N, C, *spatial)``.
            style: style images ``(N or 1, C, *spatial')``, or K of them (a sequence or a
                stack) mixed by ``style_weights``; or None with ``style_mean``/``style_std``.
            style_mean, style_std: precomputed target statistics ``(C,)``, ``(N or 1, C)`` or
                maps ``(N or 1, C, *spatial)`` (or K of each, mixed by ``style_weights``).
            alpha: style strength, a number or a ``()``/``(N,)`` tensor.
            content_mask: ``(N or 1, 1 or C, *spatial)`` weights of the content positions
                whose statistics are measured and which are stylized.
            style_mask: weights of the style positions (one per style image, or None).
            style_weights: ``(N, K)`` or ``(K,)`` weights of K styles.

        Returns:
            The stylized features, of the content's shape and memory format.
        """
        return functional.adain(
            content,
            style,
            style_mean=style_mean,
            style_std=style_std,
            alpha=alpha,
            content_mask=content_mask,
            style_mask=style_mask,
            style_weights=style_weights,
            eps=self.eps,
            correction=self.correction,
        )

    def forward_regions(
        self,
        content: Tensor,
        regions: Sequence[
            functional.StyleRegion | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor | None]
        ],
        *,
        alpha: float | Tensor = 1.0,
    ) -> Tensor:
        r"""Several styles in several regions: :func:`stylenorm.functional.adain_regions`.

        .. math::

            y = \Big(1 - \sum_r m_r\Big) x + \sum_r m_r z_r, \qquad
            z_r = \alpha\,\mathrm{AdaIN}(x, s_r) + (1 - \alpha)\,x

        where region :math:`r`'s content statistics are measured under its content mask
        :math:`m_r` and its style :math:`s_r`'s under its style mask.

        Args:
            content: ``(N, C, *spatial)``.
            regions: :class:`~stylenorm.functional.StyleRegion` s or tuples ``(style,
                content_mask[, style_mask])``, masks ``(N or 1, 1 or C, *spatial)``.
            alpha: content/style trade-off as in :meth:`forward`.

        Returns:
            ``(N, C, *spatial)``.

        Example:
            >>> content, style = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
            >>> everywhere = torch.ones(1, 1, 8, 8)
            >>> y = AdaIN().forward_regions(content, [(style, everywhere)])
            >>> torch.allclose(y, AdaIN()(content, style), atol=1e-6)
            True
        """
        return functional.adain_regions(
            content, regions, alpha=alpha, eps=self.eps, correction=self.correction
        )


class StyleAdaIN(nn.Module):
    r"""StyleGAN's learned AdaIN (Karras et al. 2019, eq. 1): a style code sets the statistics.

    .. math::

        [\gamma, \beta] = A w + b, \qquad
        y = \gamma \frac{x - \mu(x)}{\sqrt{\sigma^2(x) + \epsilon}} + \beta

    i.e. :func:`stylenorm.functional.adain` with ``style_std = gamma`` and ``style_mean = beta``.
    The linear map's bias starts at 1 for the :math:`\gamma` half and 0 for the :math:`\beta`
    half, so a fresh layer starts close to a plain instance norm; its weight has
    :class:`torch.nn.Linear`'s default initialization.

    Args:
        style_dim: size :math:`D` of the style code :math:`w`.
        num_features: number of channels :math:`C`.
        eps: added to the variance inside the square root. Default: 1e-5.
        device, dtype: factory keyword arguments for the linear layer.

    Attributes:
        affine: the ``Linear(style_dim, 2 * num_features)``; output ``[:C]`` is
            :math:`\gamma`, ``[C:]`` is :math:`\beta`.

    Shape:
        - Input: :math:`(N, C, *)`; style code: :math:`(N, D)` or :math:`(1, D)` (one for all)
        - Output: same shape as the input

    Example::

        >>> m = StyleAdaIN(style_dim=16, num_features=8)
        >>> m(torch.randn(2, 8, 4, 4), torch.randn(2, 16)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self,
        style_dim: int,
        num_features: int,
        eps: float = 1e-5,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.style_dim, self.num_features = _positive_sizes(
            style_dim=style_dim, num_features=num_features
        )
        self.eps = stats._check_eps(eps)
        self.affine = nn.Linear(style_dim, 2 * num_features, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear's default weight; bias 1 for :math:`\\gamma`, 0 for :math:`\\beta`.

        Example:
            >>> layer = StyleAdaIN(style_dim=8, num_features=3)
            >>> layer.reset_parameters()
            >>> layer.affine.bias.tolist()
            [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        """
        self.affine.reset_parameters()
        with torch.no_grad():
            self.affine.bias[: self.num_features].fill_(1.0)
            self.affine.bias[self.num_features :].zero_()

    def extra_repr(self) -> str:
        return f"style_dim={self.style_dim}, num_features={self.num_features}, eps={self.eps}"

    def forward(self, input: Tensor, style: Tensor) -> Tensor:
        input = stats.check_features(input, "input")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"input must have num_features={self.num_features} channels, got input of shape "
                f"{tuple(input.shape)}"
            )
        if not isinstance(style, Tensor):
            raise TypeError(f"style must be a torch.Tensor, got {type(style).__name__}")
        dtype = self.affine.weight.dtype
        autocast_dtype = style.dtype in (torch.float32, torch.float16, torch.bfloat16)
        casts = autocast_dtype and functional._autocast_enabled(style)
        if not style.is_floating_point() or (style.dtype != dtype and not casts):
            raise TypeError(
                f"style must be a floating-point tensor of the layer's dtype ({dtype}), got "
                f"{style.dtype}"
            )
        if style.dim() != 2 or style.shape[1] != self.style_dim:
            raise ValueError(
                f"style must be a style code of shape (N, style_dim) = (N, {self.style_dim}), "
                f"got style of shape {tuple(style.shape)}"
            )
        if style.shape[0] not in (1, input.shape[0]):
            raise ValueError(
                f"style must have one code per sample (or one for all): got style of shape "
                f"{tuple(style.shape)} for input of shape {tuple(input.shape)}"
            )
        gamma, beta = self.affine(style).chunk(2, dim=1)
        return functional.adain(input, style_mean=beta, style_std=gamma, eps=self.eps)


class StyleSequential(nn.Sequential):
    r"""A :class:`torch.nn.Sequential` whose ``forward(input, style)`` hands ``style`` to its
    conditional instance norms.

    .. math::

        y = f_L(\dots f_2(f_1(x; s); s) \dots; s), \qquad
        f_l(x; s) = \begin{cases} f_l(x, s) & \text{if } f_l \text{ takes a style} \\
        f_l(x) & \text{otherwise} \end{cases}

    The style is an argument of every call and is never stored, so one model serves every style
    (and a batch of mixed styles) without state. Build it like ``nn.Sequential`` (modules, or an
    ``OrderedDict`` to keep names; the ``state_dict`` keys are those of the same
    ``nn.Sequential``), or get one from :func:`stylenorm.to_conditional`.

    A child gets the style when its class sets ``takes_style = True``: the conditional norms, a
    nested ``StyleSequential``, and your own blocks (a residual block with conditional norms:
    give it ``forward(input, style)`` and the class attribute ``takes_style = True``). Any
    other child holding a conditional norm is an error when the container is built (children
    added later are not checked).

    Args:
        *args: the modules, or one ``OrderedDict`` of named modules, as for ``nn.Sequential``.

    Shape:
        - Input: what the first module takes; style: anything
          :class:`ConditionalInstanceNorm2d` takes (``int``, ids ``(N)``, mixing weights
          ``(N, S)`` or ``(S)``)
        - Output: what the last module returns

    Example::

        >>> net = StyleSequential(
        ...     torch.nn.Conv2d(3, 8, 3, padding=1),
        ...     ConditionalInstanceNorm2d(8, num_styles=4),
        ...     torch.nn.ReLU(),
        ... )
        >>> x = torch.randn(2, 3, 16, 16)
        >>> net(x, 1).shape == net(x, torch.tensor([0, 3])).shape == (2, 8, 16, 16)
        True
    """

    takes_style: ClassVar[bool] = True

    def __init__(self, *args: nn.Module | dict[str, nn.Module]) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        for name, child in self.named_children():
            if not _takes_style(child) and any(
                isinstance(m, _ConditionalInstanceNorm) for m in child.modules()
            ):
                raise TypeError(
                    f"child {name!r} ({type(child).__name__}) holds conditional instance norms "
                    "but takes no style: wrap it in StyleSequential too (a nested Sequential), "
                    "or give its class forward(input, style) and takes_style = True"
                )

    def forward(self, input: Tensor, style: int | Tensor) -> Tensor:  # type: ignore[override]
        for module in self:
            input = module(input, style) if _takes_style(module) else module(input)
        return input

    # ``chain + other``, ``other + chain`` and ``chain * k`` stay StyleSequentials (torch.nn's
    # build a Sequential, which could not be given the style), as slicing does. Python asks a
    # subclass on the right for ``__radd__`` before the plain Sequential's ``__add__``.
    def __add__(self, other: nn.Sequential) -> StyleSequential:
        return StyleSequential(*super().__add__(other))

    def __radd__(self, other: nn.Sequential) -> StyleSequential:
        if not isinstance(other, nn.Sequential):
            return NotImplemented
        return StyleSequential(*other, *self)

    def __mul__(self, other: int) -> StyleSequential:
        return StyleSequential(*super().__mul__(other))

    def __rmul__(self, other: int) -> StyleSequential:
        return self.__mul__(other)


def _positive_sizes(**sizes: object) -> tuple[int, ...]:
    """The sizes given by name as ints (numpy integers too), each a positive integer; a
    ``TypeError`` or ``ValueError`` naming them otherwise."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    values = tuple(operator.index(value) for value in sizes.values())  # type: ignore[arg-type]
    if min(values) <= 0:
        got = " and ".join(f"{name}={value}" for name, value in zip(sizes, values, strict=True))
        raise ValueError(f"{' and '.join(sizes)} must be positive, got {got}")
    return values


def _takes_style(module: nn.Module) -> bool:
    return getattr(type(module), "takes_style", False) is True
