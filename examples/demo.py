"""stylenorm's main demo: statistics transfer on procedurally made images, written as pictures.

Runs offline in seconds on a CPU::

    python examples/demo.py --out stylenorm-demo

Each style image's per-channel pixel statistics (stylenorm.stats.mean_std) are imposed on the
content image through the drop-in InstanceNorm2d: normalise the content, then scale and shift by
the style's std and mean. The overview grid shows content, styles and results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _images import dots, grid, marble, scene, stripes, write_png

import stylenorm


def transfer_statistics(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give ``content`` (1, 3, H, W) the per-channel mean and std of ``style`` (1, 3, h, w)."""
    norm = stylenorm.InstanceNorm2d(3)
    mean, std = stylenorm.stats.mean_std(style)
    return norm(content) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="stylenorm-demo", help="output folder")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    args = parser.parse_args(argv)
    out = Path(args.out)
    content = scene(args.size)
    styles = [stripes(args.size), dots(args.size), marble(args.size)]
    results = []
    for k, style in enumerate(styles):
        print(f"[{k + 1}/{len(styles)}] transferring statistics of style {k}")
        result = transfer_statistics(content[None], style[None])[0]
        write_png(out / f"statistics_transfer_{k}.png", result)
        results.append(result)
    overview = grid([content, *styles, content, *results], columns=len(styles) + 1)
    path = write_png(out / "overview.png", overview)
    print(f"wrote {path} and {len(results)} individual images to {out.resolve()}")
    return path


if __name__ == "__main__":
    main()
