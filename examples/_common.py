"""Code shared by the examples: a random multi-scale CNN feature extractor (or VGG-19 from a local
file), a text progress bar and the command-line options every example has.

Random, untrained convolutional networks are good enough feature extractors for texture and
style statistics (Ustyuzhaninov et al. 2016, "Texture synthesis using shallow convolutional
networks with random filters"; He et al. 2016, "A powerful generative model using random
weights for the deep image representation"), so the examples need no download. Users who have
VGG-19 weights on disk can pass ``--vgg PATH`` to use them instead.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import ClassVar, TextIO, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

Features = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


class RandomFeatures(nn.Module):
    """A shallow multi-scale CNN with fixed random filters (Ustyuzhaninov et al. 2016).

    The image is blurred and halved ``levels - 1`` times (an image pyramid); at every level one
    ``kernel_size`` convolution with ``width`` He-initialised random filters (reflection padded)
    and a ReLU gives that scale's features, so the coarse levels see large structures and the
    fine ones the detail. The weights are frozen.

    Input: images ``(N, 3, H, W)`` in [0, 1]. Output: ``{"level1": (N, width, H, W),
    "level2": (N, width, H/2, W/2), ...}``.
    """

    def __init__(
        self, levels: int = 4, width: int = 96, kernel_size: int = 5, seed: int = 0
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = [f"level{k + 1}" for k in range(levels)]
        convs = []
        for _ in range(levels):
            conv = nn.Conv2d(3, width, kernel_size, padding=kernel_size // 2)
            conv.padding_mode = "reflect"
            with torch.no_grad():
                weight = torch.randn(conv.weight.shape, generator=generator)
                conv.weight.copy_(weight * math.sqrt(2.0 / (3 * kernel_size**2)))
                conv.bias.copy_(0.1 * torch.randn(width, generator=generator))
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        self.requires_grad_(False)

    def forward(self, image: Tensor) -> Features:
        x = (image - 0.5) * 4.0  # roughly unit-variance input for the random filters
        out: Features = {}
        for k, (name, conv) in enumerate(zip(self.names, self.convs, strict=True)):
            if k:  # antialiased halving: plain 2x2 pooling leaves a grid pattern in the pixels
                x = nn.functional.interpolate(
                    x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False
                )
            out[name] = torch.relu(conv(x))
        return out


class VGGFeatures(nn.Module):
    """VGG-19's ``relu1_1`` ... ``relu4_1`` (Gatys et al.'s style layers) from a local weight file.

    Needs torchvision (only for the architecture; the weights come from ``path``, a state_dict
    of ``torchvision.models.vgg19``).
    """

    _LAYERS: ClassVar[dict[str, int]] = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20}

    def __init__(self, path: str | Path, depth: int = 4) -> None:
        super().__init__()
        try:
            import torchvision
        except ImportError:
            raise SystemExit(
                "error: --vgg needs torchvision for the VGG-19 architecture; install it with "
                "`pip install torchvision`, or leave out --vgg to use the random feature "
                "extractor (no download needed)"
            ) from None
        if not Path(path).is_file():
            raise SystemExit(f"error: --vgg: no such file: {path}")
        model = torchvision.models.vgg19()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        names = list(self._LAYERS)[:depth]
        self.names = names
        self.cut = {self._LAYERS[name]: name for name in names}
        self.features = model.features[: max(self.cut) + 1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: Tensor) -> Features:
        x = (image - self.mean) / self.std
        out: Features = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.cut:
                out[self.cut[index]] = x
        return out


def feature_extractor(
    vgg: str | None, levels: int = 4, width: int = 96, seed: int = 0
) -> RandomFeatures | VGGFeatures:
    """VGG-19 (``levels`` style layers) from the file ``vgg`` if given, else a
    :class:`RandomFeatures` with ``levels`` scales of ``width`` filters."""
    if vgg is not None:
        return VGGFeatures(vgg, depth=levels)
    return RandomFeatures(levels, width, seed=seed)


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------


class Progress:
    """A one-line text progress bar on stderr: ``desc [#####.....] 40/100 0:03<0:05 loss=0.1``.

    Use as ``for step in Progress(range(n), "train"): ...`` or call :meth:`update` yourself;
    :meth:`set` adds values shown after the bar. Redraws at most ten times a second.
    """

    def __init__(
        self,
        iterable: Iterable[T] | int,
        desc: str = "",
        stream: TextIO | None = None,
        width: int = 24,
    ) -> None:
        if isinstance(iterable, int):
            self.iterable: Iterable[object] = range(iterable)
            self.total = iterable
        else:
            self.iterable = iterable
            self.total = len(iterable) if hasattr(iterable, "__len__") else 0
        self.desc, self.width = desc, width
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.info: dict[str, str] = {}
        self.start = self.last_draw = time.perf_counter()

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable:
                yield item  # type: ignore[misc]
                self.update()
        finally:
            self.close()

    def set(self, **values: float | str) -> None:
        """Show ``name=value`` after the bar (floats with 4 significant digits)."""
        for name, value in values.items():
            self.info[name] = f"{value:.4g}" if isinstance(value, float) else str(value)

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self.last_draw >= 0.1 or self.count == self.total:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        elapsed = now - self.start
        if self.total:
            done = min(self.count / self.total, 1.0)
            filled = int(done * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            remaining = elapsed / done * (1 - done) if done > 0 else 0.0
            line = f"{self.desc} [{bar}] {self.count}/{self.total} "
            line += f"{_clock(elapsed)}<{_clock(remaining)}"
        else:
            line = f"{self.desc} {self.count} {_clock(elapsed)}"
        line += "".join(f" {name}={value}" for name, value in self.info.items())
        self.stream.write("\r" + line.ljust(79) + end)
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.perf_counter(), end="\n")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parser_for(doc: str | None, out: str, vgg: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the examples' shared options: ``--out``, ``--seed`` and (if
    ``vgg``) ``--vgg``.

    The description is the script's module docstring, printed as written by ``--help``.
    """
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    if not vgg:
        return parser
    parser.add_argument(
        "--vgg",
        metavar="PATH",
        default=None,
        help="use VGG-19 weights from this local file (a torchvision vgg19 state_dict; needs "
        "torchvision) instead of the random feature extractor",
    )
    return parser


def positive_int(value: str) -> int:
    """argparse type: an integer > 0."""
    return int_at_least(1)(value)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer of at least ``minimum`` (an image size that the networks'
    reflection padding and downsampling can take)."""

    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer of at least {minimum}, got {value}"
            )
        return number

    return parse


def report(message: str) -> None:
    """Print a status line (stdout, flushed, so it interleaves well with the progress bar)."""
    print(message, flush=True)
