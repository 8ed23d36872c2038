"""Texture synthesis by matching feature statistics, with several style losses side by side.

Starting from noise, the pixels of an image are optimised (Adam or L-BFGS) until the features of
a fixed, randomly initialised multi-scale CNN (no download: random filters synthesise textures
well, Ustyuzhaninov et al. 2016) have the same statistics as those of an example texture
(Gatys, Ecker & Bethge 2015). Which statistics decide what the synthesis keeps:

  gram      Gram matrices of every layer (stylenorm.StyleLoss(loss="gram")): channel
            correlations, which carry shapes and arrangements;
  mean_std  per-channel means and standard deviations (loss="mean_std", the AdaIN loss):
            fewer numbers, so colours and edge densities match but shapes are looser;
  mmd       squared maximum mean discrepancy with a Gaussian kernel (Li et al. 2017), via
            stylenorm.functional.mmd_loss on random subsets of positions: matches the whole
            distribution of feature vectors;

and any published convention of stylenorm.CONVENTIONS (e.g. gatys2015, adain_lua) by name.

Writes texture_synthesis.png (rows: example textures; columns: the example, then one synthesis
per loss) and texture_loss_curves.png (each loss relative to its starting value).

    python examples/texture_synthesis.py                        # about a minute on 2 CPU cores
    python examples/texture_synthesis.py --losses gram,gatys2015,mmd --optimizer lbfgs
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Features,
    Progress,
    feature_extractor,
    int_at_least,
    parser_for,
    positive_int,
    report,
)
from _images import dots, labelled_grid, line_plot, marble, stack, stripes, waves, write_png

import stylenorm

TEXTURES: dict[str, Callable[[int], Tensor]] = {
    "dots": lambda size: dots(size, seed=3, count=int(size * size / 400)),
    "marble": lambda size: marble(size, seed=1),
    "stripes": lambda size: stripes(size, frequency=5.0),
    "waves": lambda size: waves(size),
}
LOSSES = ("gram", "mean_std", "mmd", *stylenorm.CONVENTIONS)


class SampledGaussianMMD(nn.Module):
    """Gaussian-kernel MMD per layer (Li et al. 2017), on subsets of positions.

    The Gaussian kernel needs kernel matrices of (positions x positions), too big for the early
    layers at full resolution. So the target keeps ``positions`` random positions per layer
    (cached in a :class:`stylenorm.MMDLoss` with its target-target term), and each call
    compares a strided grid of at most ``positions`` input positions at a random offset, a
    different one every step: a stochastic estimate of the full objective. The bandwidth of
    each layer is twice the median distance between the target's feature vectors (the usual
    heuristic, widened: a narrow kernel barely penalises a few outlying colours).
    """

    def __init__(self, targets: Features, positions: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.positions = positions
        self.generator = torch.Generator().manual_seed(seed)
        layers = {}
        for name, target in targets.items():
            flat = target.flatten(2)
            if flat.shape[-1] > positions:
                index = torch.randperm(flat.shape[-1], generator=self.generator)[:positions]
                flat = flat[..., index]
            sample = flat[0].T
            sigma = 2 * float(torch.cdist(sample, sample).median().clamp_min(1e-3))
            layers[name] = stylenorm.MMDLoss(flat, kernel="gaussian", sigma=sigma)
        self.layers = nn.ModuleDict(layers)

    def _subsample(self, features: Tensor) -> Tensor:
        height, width = features.shape[-2:]
        stride = 1
        while (height // stride) * (width // stride) > self.positions:
            stride *= 2
        dy, dx = torch.randint(stride, (2,), generator=self.generator).tolist()
        return features[..., dy::stride, dx::stride].flatten(2)

    def forward(self, inputs: Features) -> Tensor:
        terms = [loss(self._subsample(inputs[name])) for name, loss in self.layers.items()]
        return torch.stack(terms).sum()


def make_loss(name: str, targets: Features, seed: int) -> nn.Module:
    """The style loss ``name`` (see LOSSES) against the features ``targets`` of the example."""
    if name == "mmd":
        return SampledGaussianMMD(targets, seed=seed)
    return stylenorm.StyleLoss(targets, loss=name)


def smooth_noise(size: int, generator: torch.Generator) -> Tensor:
    """A grey image with soft colour blotches: a starting point without pixel noise (the losses
    constrain fine noise only weakly, so noise in the start would survive)."""
    coarse = 0.5 + 0.15 * torch.randn(1, 3, 8, 8, generator=generator)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


def total_variation(image: Tensor) -> Tensor:
    """Mean squared difference of neighbouring pixels: a small prior against pixel noise."""
    return (image.diff(dim=-1).square().mean() + image.diff(dim=-2).square().mean()) / 2


def synthesise(
    extractor: nn.Module,
    loss_fn: nn.Module,
    size: int,
    steps: int,
    optimizer: str,
    lr: float,
    tv_weight: float,
    generator: torch.Generator,
    progress: Progress,
) -> tuple[Tensor, list[float]]:
    """Optimise the pixels of an image to minimise ``loss_fn`` (divided by its starting value,
    so that every loss and layer choice has the same scale) plus ``tv_weight`` times the total
    variation. Return the image and the style-loss values relative to the start."""
    image = smooth_noise(size, generator).requires_grad_()
    with torch.no_grad():
        start = float(loss_fn(extractor(image)))
    losses: list[float] = []

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        style = loss_fn(extractor(image)) / start
        loss = style + tv_weight * total_variation(image)
        loss.backward()  # type: ignore[no-untyped-call]
        losses.append(float(style.detach()))
        progress.set(loss=losses[-1])
        progress.update()
        return loss

    if optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            [image], lr=1.0, max_iter=steps, max_eval=steps, history_size=20, tolerance_grad=0
        )
        opt.step(closure)  # type: ignore[no-untyped-call]
        progress.update(steps - len(losses))  # L-BFGS may stop early
    else:
        opt = torch.optim.Adam([image], lr=lr)
        # A decaying step size: Adam's steps stay large near the optimum, which leaves noise.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 20)
        for _ in range(steps):
            opt.step(closure)  # type: ignore[no-untyped-call]
            schedule.step()
            with torch.no_grad():
                image.clamp_(0, 1)
    return image.detach().clamp(0, 1)[0], losses


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the example; return the paths of the images it wrote."""
    parser = parser_for(__doc__, out="texture-synthesis")
    parser.add_argument("--size", type=int_at_least(24), default=128, help="image size in pixels")
    parser.add_argument("--steps", type=positive_int, default=200, help="optimisation steps")
    parser.add_argument(
        "--textures",
        default="dots,marble,waves",
        help=f"comma-separated example textures from {', '.join(TEXTURES)}",
    )
    parser.add_argument(
        "--losses",
        default="gram,mean_std,mmd",
        help=f"comma-separated losses from {', '.join(LOSSES)}",
    )
    parser.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam")
    parser.add_argument("--lr", type=float, default=0.03, help="Adam's learning rate")
    parser.add_argument(
        "--tv", type=float, default=0.5, help="weight of the total-variation prior (0: none)"
    )
    args = parser.parse_args(argv)
    textures = [name.strip() for name in args.textures.split(",") if name.strip()]
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    for name in textures:
        if name not in TEXTURES:
            parser.error(f"unknown texture {name!r}; choose from {', '.join(TEXTURES)}")
    for name in losses:
        if name not in LOSSES:
            parser.error(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    if not textures or not losses:
        parser.error("--textures and --losses must each name at least one")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    extractor = feature_extractor(args.vgg, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    tiles: list[Tensor] = []
    plots: list[Tensor] = []
    progress = Progress(len(textures) * len(losses) * args.steps, "texture synthesis")
    for texture_name in textures:
        example = TEXTURES[texture_name](args.size)
        with torch.no_grad():
            targets = extractor(example[None])
        tiles.append(example)
        curves: dict[str, list[float]] = {}
        for loss_name in losses:
            loss_fn = make_loss(loss_name, targets, args.seed)
            result, history = synthesise(
                extractor, loss_fn, args.size, args.steps, args.optimizer, args.lr, args.tv,
                generator, progress,
            )  # fmt: skip
            tiles.append(result)
            curves[loss_name] = history
        plots.append(
            line_plot(curves, width=360, height=240, title=texture_name, y_label="loss/start")
        )
    progress.close()

    labels = [name for _ in textures for name in ("example", *losses)]
    picture = labelled_grid(
        tiles, columns=len(losses) + 1, labels=labels, title="texture synthesis"
    )
    paths = [
        write_png(out / "texture_synthesis.png", picture),
        write_png(out / "texture_loss_curves.png", stack(plots, horizontal=True, pad=12)),
    ]
    report(f"texture synthesis: {time.perf_counter() - start:.0f} s; wrote {paths[0]}, {paths[1]}")
    return paths


if __name__ == "__main__":
    main()
