"""One network, several styles: ConditionalInstanceNorm2d, style interpolation, adding a style.

Trains a small image transformation network (Johnson et al. 2016, shrunk: a few convolutions, two
residual blocks) whose every normalization is a stylenorm.ConditionalInstanceNorm2d with one
gamma/beta row per style (Dumoulin et al. 2017). The weights of the convolutions are shared by
all styles; a style is just its rows. Training data, styles and the loss network are all made on
the fly: procedural content images, procedural textures as styles, and a random multi-scale CNN
for the losses (a style loss, stylenorm.StyleLoss, per style, plus a content loss).

Then:
  * style interpolation: mixing weights instead of a style id (gamma = w @ Gamma) blend styles
    the network never saw blended (multi_style_interpolation.png);
  * a new style: add_styles() grows every bank by one row, and fine-tuning only
    stylenorm.style_parameters(net) (everything else frozen) learns it in a few steps; the
    old styles' outputs stay exactly the same (multi_style_new_style.png);
  * the training loss curve (multi_style_training.png).

    python examples/multi_style_network.py                # 2-3 minutes on 2 CPU cores
    python examples/multi_style_network.py --steps 1500 --size 96   # better, slower
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Progress, feature_extractor, int_at_least, parser_for, positive_int, report
from _images import (
    dots,
    labelled_grid,
    line_plot,
    marble,
    resize,
    scene,
    shapes,
    stripes,
    waves,
    write_png,
)

import stylenorm

CIN = stylenorm.ConditionalInstanceNorm2d


class ConvNorm(nn.Module):
    """Convolution (reflection padded), conditional instance norm, optional ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int, num_styles: int, stride: int = 1, relu: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, padding_mode="reflect")
        self.norm = CIN(cout, num_styles)
        self.relu = relu

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        x = self.norm(self.conv(x), style)
        return torch.relu(x) if self.relu else x


class MultiStyleNet(nn.Module):
    """A small feed-forward stylisation network; ``forward(image, style)`` with ``style`` a
    ``(N,)`` tensor of ids or ``(N, num_styles)`` mixing weights."""

    def __init__(self, num_styles: int, width: int = 24) -> None:
        super().__init__()
        self.head = ConvNorm(3, width, 5, num_styles)
        self.down = ConvNorm(width, 2 * width, 3, num_styles, stride=2)
        self.blocks = nn.ModuleList(
            [ConvNorm(2 * width, 2 * width, 3, num_styles, relu=k % 2 == 0) for k in range(4)]
        )
        self.up = ConvNorm(2 * width, width, 3, num_styles)
        self.tail = nn.Conv2d(width, 3, 5, padding=2, padding_mode="reflect")

    def forward(self, image: Tensor, style: Tensor) -> Tensor:
        x = self.down(self.head(image - 0.5, style), style)
        for k in range(0, len(self.blocks), 2):  # residual blocks of two layers
            x = x + self.blocks[k + 1](self.blocks[k](x, style), style)
        x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return torch.sigmoid(self.tail(self.up(x, style)))

    def norms(self) -> Iterator[stylenorm.ConditionalInstanceNorm2d]:
        yield from (m for m in self.modules() if isinstance(m, CIN))

    @property
    def num_styles(self) -> int:
        return next(self.norms()).num_styles


def style_images(size: int) -> list[Tensor]:
    """The training styles: three procedural textures."""
    return [
        stripes(size, colors=[(0.95, 0.75, 0.1), (0.15, 0.1, 0.3)], frequency=4.0),
        dots(size, seed=3, count=max(8, int(size * size / 300))),
        marble(size, seed=1),
    ]


class Objective(nn.Module):
    """Content loss (features of the input) plus one style loss per style, each divided by
    its value for a flat grey image so that the weights mean the same for every style."""

    def __init__(self, extractor: nn.Module, styles: Sequence[Tensor], loss: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.loss = loss
        grey = torch.full((1, 3, *styles[0].shape[-2:]), 0.5)
        with torch.no_grad():
            self.grey_features = extractor(grey)
        self.style_losses = nn.ModuleList()
        self.style_scales: list[float] = []
        for style in styles:
            self.add_style(style)

    @torch.no_grad()
    def add_style(self, style: Tensor) -> None:
        loss_fn = stylenorm.StyleLoss(self.extractor(style[None]), loss=self.loss)
        self.style_losses.append(loss_fn)
        self.style_scales.append(float(loss_fn(self.grey_features)))

    def forward(
        self, output: Tensor, content: Tensor, style: Tensor, content_weight: float
    ) -> Tensor:
        out_features = self.extractor(output)
        with torch.no_grad():
            content_features = self.extractor(content)
        names = list(out_features)[:2]  # the two finest scales carry the layout
        content_loss = sum(
            (out_features[n] - content_features[n]).square().mean()
            / content_features[n].square().mean()
            for n in names
        )
        style_loss = torch.zeros(())
        for s in style.unique().tolist():
            chosen = style == s
            features = {name: f[chosen] for name, f in out_features.items()}
            style_loss = style_loss + self.style_losses[s](features) / self.style_scales[s] * (
                chosen.float().mean()
            )
        return style_loss + content_weight * content_loss


def train(
    net: nn.Module,
    objective: Objective,
    data: Tensor,
    styles: Sequence[int],
    parameters: Sequence[nn.Parameter],
    steps: int,
    batch: int,
    lr: float,
    content_weight: float,
    generator: torch.Generator,
    desc: str,
) -> list[float]:
    """Adam on ``parameters``; each batch: random content images, random ids from ``styles``."""
    opt = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    ids = torch.tensor(list(styles))
    history: list[float] = []
    progress = Progress(steps, desc)
    for _ in progress:
        index = torch.randint(len(data), (batch,), generator=generator)
        style = ids[torch.randint(len(ids), (batch,), generator=generator)]
        content = data[index]
        if torch.rand((), generator=generator) < 0.5:
            content = content.flip(-1)
        loss = objective(net(content, style), content, style, content_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        schedule.step()
        history.append(float(loss.detach()))
        progress.set(loss=history[-1])
    return history


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the example; return the paths of the images it wrote."""
    parser = parser_for(__doc__, out="multi-style-network")
    parser.add_argument("--size", type=int_at_least(12), default=64, help="training image size")
    parser.add_argument("--steps", type=positive_int, default=800, help="training steps")
    parser.add_argument(
        "--finetune-steps", type=positive_int, default=150, help="steps to learn the new style"
    )
    parser.add_argument("--batch", type=positive_int, default=6, help="images per step")
    parser.add_argument("--width", type=positive_int, default=24, help="network width")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam's learning rate")
    parser.add_argument("--content-weight", type=float, default=0.15, help="content loss weight")
    parser.add_argument(
        "--loss",
        default="gram",
        help="style loss: gram, mean_std, or a convention name of stylenorm.CONVENTIONS",
    )
    args = parser.parse_args(argv)
    losses = ("gram", "mean_std", *stylenorm.CONVENTIONS)
    if args.loss not in losses:
        parser.error(f"unknown --loss {args.loss!r}; choose from {', '.join(losses)}")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    size = args.size

    data = torch.stack([shapes(size, seed=1000 + k) for k in range(64)])
    styles = style_images(size)
    extractor = feature_extractor(args.vgg, levels=3, width=64, seed=args.seed)
    objective = Objective(extractor, styles, args.loss)
    net = MultiStyleNet(len(styles), args.width)
    history = train(
        net, objective, data, range(len(styles)), list(net.parameters()), args.steps,
        args.batch, args.lr, args.content_weight, generator, "training 3 styles",
    )  # fmt: skip

    # Style interpolation: mixing weights along style 1 -> 2 -> 3.
    tests = torch.stack([scene(size), shapes(size, seed=7)])
    path_weights = [
        (1, 0, 0), (0.5, 0.5, 0), (0, 1, 0), (0, 0.5, 0.5), (0, 0, 1), (0.5, 0, 0.5),
        (1 / 3, 1 / 3, 1 / 3),
    ]  # fmt: skip
    display = 2 * size if size < 128 else size
    big = lambda image: resize(image, display, display)  # noqa: E731
    net.eval()
    tiles, labels = [], []
    blank = torch.ones(3, display, display)
    pure = {(1, 0, 0): 0, (0, 1, 0): 1, (0, 0, 1): 2}
    tiles.append(blank)
    labels.append("")
    for w in path_weights:
        tiles.append(big(styles[pure[w]]) if w in pure else blank)
        labels.append(f"style {pure[w] + 1}" if w in pure else "")
    with torch.no_grad():
        for image in tests:
            tiles.append(big(image))
            labels.append("content")
            for w in path_weights:
                mix = torch.tensor(w, dtype=torch.float32)
                tiles.append(big(net(image[None], mix[None])[0]))
                labels.append("/".join(f"{v:.2g}" for v in w))
    interpolation = labelled_grid(
        tiles, columns=len(path_weights) + 1, labels=labels,
        title="one network, 3 styles, mixed by weights",
    )  # fmt: skip

    # A new style: grow every bank, freeze everything else, train only the style rows.
    new_style = waves(size)
    with torch.no_grad():
        before_old = net(tests, torch.zeros(len(tests), dtype=torch.long))
    for norm in net.norms():
        norm.add_styles(1, init="mean")
    new_id = net.num_styles - 1
    with torch.no_grad():
        before_new = net(tests, torch.full((len(tests),), new_id))
    net.requires_grad_(False)
    style_parameters = list(stylenorm.style_parameters(net))
    for parameter in style_parameters:
        parameter.requires_grad_(True)
    objective.add_style(new_style)
    net.train()
    finetune_history = train(
        net, objective, data, [new_id], style_parameters, args.finetune_steps, args.batch,
        args.lr * 4, args.content_weight, generator, "fine-tuning style 4",
    )  # fmt: skip
    net.eval()
    with torch.no_grad():
        after_new = net(tests, torch.full((len(tests),), new_id))
        after_old = net(tests, torch.zeros(len(tests), dtype=torch.long))
    unchanged = float((after_old - before_old).abs().max())
    trained = sum(p.numel() for p in style_parameters)
    total = sum(p.numel() for p in net.parameters())
    report(
        f"new style learned with {trained} of {total} parameters "
        f"({100 * trained / total:.1f}%); style 1's output changed by at most {unchanged:.1e}"
    )
    new_tiles = [big(new_style)]
    new_labels = ["new style"]
    for k in range(len(tests)):
        new_tiles += [big(tests[k]), big(before_new[k]), big(after_new[k]), big(after_old[k])]
        new_labels += ["content", "mean init", "fine-tuned", "style 1 same"]
        if k == 0:
            new_tiles.append(torch.ones(3, display, display))
            new_labels.append("")
    new_picture = labelled_grid(
        new_tiles, columns=5, labels=new_labels, title="add_styles + style_parameters()"
    )
    curves = line_plot(
        {"3 styles": history, "new style": finetune_history}, title="multi-style training"
    )
    paths = [
        write_png(out / "multi_style_interpolation.png", interpolation),
        write_png(out / "multi_style_new_style.png", new_picture),
        write_png(out / "multi_style_training.png", curves),
    ]
    report(f"multi-style network: {time.perf_counter() - start:.0f} s; wrote {len(paths)} images")
    return paths


if __name__ == "__main__":
    main()
