"""stylenorm's demo: every example at a small size, and one overview picture. No download.

Runs, in about two to three minutes on 2 CPU cores:

  texture_synthesis.py    Gram vs mean/std vs MMD texture synthesis (StyleLoss, MMDLoss)
  adain_transfer.py       AdaIN on pixels and random features: alpha, mixing, regions
  multi_style_network.py  a ConditionalInstanceNorm2d network: 3 styles, mixing, a 4th added
  drop_in.py              torch.nn -> stylenorm, conditional layers, legacy checkpoints

and writes their pictures plus overview.png to one folder (default stylenorm-demo/)::

    python examples/demo.py
    python examples/demo.py --out my-folder --quick      # tiny sizes, seconds (a smoke test)
    python examples/demo.py --docs docs                  # refresh the pictures of README

Each example has its own options and larger defaults: ``python examples/<name>.py --help``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adain_transfer
import drop_in
import multi_style_network
import texture_synthesis
from _common import parser_for, positive_int, report
from _images import read_png, resize, stack, text, write_png

# Demo-sized settings of each example (the scripts' own defaults are larger), and tiny ones.
SETTINGS = {
    "texture_synthesis": (
        ["--size", "96", "--steps", "120", "--textures", "dots,waves"],
        ["--size", "32", "--steps", "3", "--textures", "dots"],
    ),
    "adain_transfer": (
        ["--size", "96", "--decode-steps", "100"],
        ["--size", "32", "--decode-steps", "2"],
    ),
    "multi_style_network": (
        ["--size", "64", "--steps", "700", "--finetune-steps", "100"],
        ["--size", "32", "--steps", "3", "--finetune-steps", "2", "--batch", "3", "--width", "8"],
    ),
    "drop_in": (["--size", "96"], ["--size", "32"]),
}  # fmt: skip
MODULES = {
    "texture_synthesis": texture_synthesis,
    "adain_transfer": adain_transfer,
    "multi_style_network": multi_style_network,
    "drop_in": drop_in,
}
# The pictures of the overview (each carries its own title).
OVERVIEW = ["texture_synthesis.png", "adain_transfer.png", "multi_style_interpolation.png"]


def overview(folder: Path, width: int) -> Path:
    """Stack the main pictures of the examples, each scaled to ``width``, into overview.png."""
    parts = [text("stylenorm demo", 4)]
    for name in OVERVIEW:
        image = read_png(folder / name)
        height = round(image.shape[-2] * width / image.shape[-1])
        parts.append(resize(image, height, width))
    return write_png(folder / "overview.png", stack(parts, pad=16))


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the demo; return the path of the overview picture."""
    parser = parser_for(__doc__, out="stylenorm-demo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--docs",
        metavar="DIR",
        default=None,
        help="also write the pictures, rounded to 5 bits per channel (small files), to DIR "
        "as README's docs/ pictures (overview.png becomes demo_overview.png)",
    )
    parser.add_argument(
        "--width", type=positive_int, default=600, help="width of the overview picture in pixels"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    common = ["--out", str(out), "--seed", str(args.seed)]
    vgg = [] if args.vgg is None else ["--vgg", args.vgg]
    for k, (name, module) in enumerate(MODULES.items()):
        full, quick = SETTINGS[name]
        report(f"[{k + 1}/{len(MODULES)}] {name}.py {' '.join(quick if args.quick else full)}")
        module.main(
            [*(quick if args.quick else full), *common, *(vgg if name != "drop_in" else [])]
        )
    path = overview(out, args.width)
    pictures = sorted(p.name for p in out.glob("*.png"))
    if args.docs is not None:
        for name in pictures:
            target = "demo_overview.png" if name == "overview.png" else name
            write_png(Path(args.docs) / target, read_png(out / name), bits=5)
        report(f"wrote {len(pictures)} small copies to {Path(args.docs).resolve()}/")
    report(
        f"demo finished in {time.perf_counter() - start:.0f} s with {torch.get_num_threads()} "
        f"threads; pictures in {out.resolve()}/: {', '.join(pictures)}"
    )
    return path


if __name__ == "__main__":
    main()
