"""From torch.nn.InstanceNorm2d to stylenorm: swap the layers, go conditional, load old checkpoints.

A model written with torch.nn.InstanceNorm2d (here a small stylisation network in an
nn.Sequential) goes through the three steps a user of stylenorm takes:

  1. stylenorm.to_stylenorm(model) swaps every torch norm for stylenorm's drop-in (a subclass of
     torch's, sharing the very same parameter tensors); the outputs agree to the last bits;
  2. stylenorm.to_conditional(model, num_styles) turns each affine InstanceNorm2d into a
     ConditionalInstanceNorm2d (from_instance_norm: num_styles copies of its gamma/beta, so
     every style starts as the original model) and the nn.Sequential into a
     stylenorm.StyleSequential whose forward(x, style) passes the style on; then the style
     rows can be trained apart (stylenorm.style_parameters; see multi_style_network.py);
  3. stylenorm.load_legacy_state_dict loads a checkpoint written by an old PyTorch (< 0.4),
     whose InstanceNorms still carry running_mean/running_var buffers: torch refuses it,
     stylenorm drops exactly those unused buffers and says which.

Prints a short report and writes drop_in.png (the input, the torch model's output, stylenorm's
output, and the conditional model with styles 1 to 3 after editing their gamma/beta rows).

    python examples/drop_in.py            # one second
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import int_at_least, parser_for, positive_int, report
from _images import labelled_grid, resize, scene, write_png

import stylenorm


def build_model(width: int = 16) -> nn.Sequential:
    """A small image-to-image network with torch's affine InstanceNorm2d, as users write it."""
    return nn.Sequential(
        nn.Conv2d(3, width, 5, padding=2, padding_mode="reflect"),
        nn.InstanceNorm2d(width, affine=True),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
        nn.InstanceNorm2d(width, affine=True),
        nn.ReLU(),
        nn.Conv2d(width, 3, 5, padding=2, padding_mode="reflect"),
        nn.Sigmoid(),
    )


def legacy_checkpoint(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state_dict as PyTorch < 0.4 wrote it: stale running stats on every
    InstanceNorm (they were saved, though the layers never used them)."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, nn.InstanceNorm2d):
            state[f"{name}.running_mean"] = torch.randn(module.num_features)
            state[f"{name}.running_var"] = torch.rand(module.num_features) + 0.5
    return state


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the example; return the paths of the images it wrote."""
    parser = parser_for(__doc__, out="drop-in", vgg=False)
    parser.add_argument("--size", type=int_at_least(3), default=96, help="image size in pixels")
    parser.add_argument("--width", type=positive_int, default=16, help="channels of the model")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    image = scene(args.size)[None]

    model = build_model(args.width)
    with torch.no_grad():  # a "trained" model: non-trivial gamma and beta
        for layer in model:
            if isinstance(layer, nn.InstanceNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0, 0.3)
    model.eval()

    # 1. Drop-in replacement.
    swapped = stylenorm.to_stylenorm(copy.deepcopy(model))
    with torch.no_grad():
        reference, ours = model(image), swapped(image)
    kinds = sorted({type(m).__module__ + "." + type(m).__name__ for m in swapped.modules()})
    norms = [k for k in kinds if "Norm" in k]
    report("1. to_stylenorm")
    report(f"   norm layers now: {', '.join(norms)}")
    still_torch = isinstance(swapped[1], nn.InstanceNorm2d)
    report(f"   isinstance(layer, torch.nn.InstanceNorm2d): {still_torch}")
    report(f"   max |torch - stylenorm| = {float((reference - ours).abs().max()):.1e}")

    # 2. Conditional model, every style starting as the original layer.
    num_styles = 3
    conditional = stylenorm.to_conditional(copy.deepcopy(swapped), num_styles)
    with torch.no_grad():
        same = max(
            float((conditional(image, s) - reference).abs().max()) for s in range(num_styles)
        )
        # Make styles 2 and 3 differ: their own gamma/beta rows (what training would do).
        generator = torch.Generator().manual_seed(args.seed)
        for layer in conditional:
            if isinstance(layer, stylenorm.ConditionalInstanceNorm2d):
                shape = layer.weight[1:].shape
                layer.weight[1:] *= 1 + 0.8 * torch.randn(shape, generator=generator)
                layer.bias[1:] += 0.8 * torch.randn(shape, generator=generator)
        styled = [conditional(image, s) for s in range(num_styles)]
        mixed = conditional(image, torch.tensor([0.0, 0.5, 0.5]))
    report(f"2. to_conditional with {num_styles} styles: {type(conditional).__name__}")
    report(f"   max |conditional(x, s) - original| before editing styles = {same:.1e}")
    banks = sum(p.numel() for p in stylenorm.style_parameters(conditional))
    total = sum(p.numel() for p in conditional.parameters())
    report(f"   parameters: {total}, of which style banks (gamma/beta rows): {banks}")

    # 3. A checkpoint from an old PyTorch.
    path = out / "legacy_checkpoint.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(legacy_checkpoint(model), path)
    legacy = torch.load(path, weights_only=True)
    fresh = build_model(args.width)
    report("3. load_legacy_state_dict")
    try:
        fresh.load_state_dict(legacy)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "running stats" in line), lines[0])
        short = reason if len(reason) <= 100 else reason[:97] + "..."
        report(f"   torch's load_state_dict refuses it: {short}")
    result = stylenorm.load_legacy_state_dict(fresh, legacy)
    fresh.eval()
    with torch.no_grad():
        loaded_diff = float((fresh(image) - reference).abs().max())
    report(f"   dropped: {', '.join(result.dropped_keys)}")
    report(f"   missing: {result.missing_keys}, unexpected: {result.unexpected_keys}")
    report(f"   max |loaded model - original| = {loaded_diff:.1e}")

    size = 128
    tiles = [resize(t[0], size, size) for t in (image, reference, ours, *styled, mixed)]
    labels = ["input", "torch.nn", "stylenorm", "style 1", "style 2", "style 3", "mix 2+3"]
    picture = labelled_grid(tiles, columns=len(tiles), labels=labels, title="drop-in")
    written = write_png(out / "drop_in.png", picture)
    report(f"drop-in: {time.perf_counter() - start:.1f} s; wrote {written} and {path}")
    return [written]


if __name__ == "__main__":
    main()
