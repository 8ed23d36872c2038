"""Colour and statistics transfer with AdaIN: strength, style mixing and two styles in two regions.

AdaIN (Huang & Belongie 2017) gives every channel of the content the mean and standard deviation
of the same channel of the style. On pixels (three channels) that is a colour transfer; on the
features of a shallow random convolutional encoder (64 random 5x5 filters and a ReLU, no
download) it also transfers local contrast and edge statistics. Features are turned back into
an image by optimising the pixels until the encoder's output matches them.

The grid shows, one row each:

  pixels     stylenorm.AdaIN on the RGB values, alpha = 0 (content), 0.5, 1 and 1.5
             (alpha > 1 extrapolates: more than the style's statistics);
  features   the same on the random features, decoded;
  mix        interpolation between two styles (AdaIN's style_weights);
  regions    one style in the sky, another on the ground (AdaIN.forward_regions, i.e.
             stylenorm.functional.adain_regions), on pixels and on features.

    python examples/adain_transfer.py                  # about 20 s on 2 CPU cores
    python examples/adain_transfer.py --size 192 --decode-steps 300
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Progress,
    RandomFeatures,
    VGGFeatures,
    int_at_least,
    parser_for,
    positive_int,
    report,
)
from _images import dots, labelled_grid, marble, scene, stripes, waves, write_png

import stylenorm


class Encoder(nn.Module):
    """The first feature map of a feature extractor: ``(N, 3, H, W)`` -> ``(N, C, H, W)``."""

    def __init__(self, vgg: str | None, seed: int) -> None:
        super().__init__()
        self.extractor: nn.Module
        if vgg is not None:
            self.extractor = VGGFeatures(vgg, depth=1)
        else:
            self.extractor = RandomFeatures(levels=1, width=64, seed=seed)

    def forward(self, image: Tensor) -> Tensor:
        features: dict[str, Tensor] = self.extractor(image)
        return next(iter(features.values()))


def decode(
    encoder: nn.Module, targets: Tensor, start: Tensor, steps: int, lr: float = 0.02
) -> Tensor:
    """Images whose features match ``targets`` ``(N, C, H, W)``: pixels optimised with Adam from
    ``start``, all N at once (Adam's per-pixel steps keep the N problems independent)."""
    image = start.clone().expand(targets.shape[0], -1, -1, -1).contiguous().requires_grad_()
    opt = torch.optim.Adam([image], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 20)
    progress = Progress(steps, "decoding features")
    for _ in progress:
        opt.zero_grad(set_to_none=True)
        loss = (encoder(image) - targets).square().mean()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        schedule.step()
        with torch.no_grad():
            image.clamp_(0, 1)
        progress.set(loss=float(loss.detach()))
    return image.detach()


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the example; return the paths of the images it wrote."""
    parser = parser_for(__doc__, out="adain-transfer")
    parser.add_argument("--size", type=int_at_least(3), default=128, help="image size in pixels")
    parser.add_argument(
        "--decode-steps", type=positive_int, default=150, help="pixel optimisation steps"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    size = args.size
    content = scene(size)[None]
    style_a = marble(size, seed=1)[None]
    style_b = dots(size, seed=3, count=int(size * size / 400))[None]
    style_c = stripes(size, colors=[(0.95, 0.75, 0.1), (0.15, 0.1, 0.3)], frequency=5.0)[None]
    style_d = waves(size)[None]
    adain = stylenorm.AdaIN()
    alphas = (0.0, 0.5, 1.0, 1.5)
    weights = (1.0, 2 / 3, 1 / 3, 0.0)
    # Sky and ground of the scene: the two regions of the last row.
    ground = (content.mean(1, keepdim=True) < 0.55).float()
    ground = nn.functional.max_pool2d(ground, 5, 1, 2)  # close the sun's outline
    sky_ground = [(style_c, 1 - ground), (style_d, ground)]

    # Pixels: the statistics of the three colour channels.
    pixel_alpha = [adain(content, style_a, alpha=alpha) for alpha in alphas]
    pixel_regions = adain.forward_regions(content, sky_ground)
    pixel_regions_half = adain.forward_regions(content, sky_ground, alpha=0.5)

    # Features of the random encoder; every target is decoded in one batch.
    encoder = Encoder(args.vgg, args.seed)
    with torch.no_grad():
        c, a, b = encoder(content), encoder(style_a), encoder(style_b)
        sky = encoder(style_c)
        grass = encoder(style_d)
        targets = [adain(c, a, alpha=alpha) for alpha in alphas]
        mix = torch.tensor(weights)
        targets += [adain(c, [a, b], style_weights=torch.stack([w, 1 - w])) for w in mix]
        targets.append(adain.forward_regions(c, [(sky, 1 - ground), (grass, ground)]))
    decoded = decode(encoder, torch.cat(targets), content, args.decode_steps)
    feature_alpha, feature_mix = decoded[:4], decoded[4:8]
    feature_regions = decoded[8]

    one = lambda batch: batch[0]  # noqa: E731
    tiles = [
        one(content), one(style_a), *map(one, pixel_alpha),
        one(content), one(style_a), *feature_alpha,
        one(style_a), one(style_b), *feature_mix,
        ground[0].expand(3, -1, -1), one(style_c), one(style_d), one(pixel_regions),
        one(pixel_regions_half), feature_regions,
    ]  # fmt: skip
    labels = [
        "content", "style", *(f"alpha {alpha:g}" for alpha in alphas),
        "content", "style", *(f"alpha {alpha:g}" for alpha in alphas),
        "style 1", "style 2", *(f"{w:.2f}/{1 - w:.2f}" for w in weights),
        "mask", "sky style", "ground style", "pixels", "alpha 0.5", "features",
    ]  # fmt: skip
    picture = labelled_grid(
        tiles,
        columns=6,
        labels=labels,
        row_labels=["pixels", "features", "mix", "regions"],
        title="adain: statistics transfer",
    )
    path = write_png(Path(args.out) / "adain_transfer.png", picture)
    report(f"adain transfer: {time.perf_counter() - start:.0f} s; wrote {path}")
    return [path]


if __name__ == "__main__":
    main()
