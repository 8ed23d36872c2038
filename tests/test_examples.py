"""Smoke tests of the example scripts: each runs at tiny sizes and writes valid PNGs.

The examples are scripts, not a package: they are imported from ``examples/`` through
``sys.path``. Sizes and step counts are tiny, so this checks wiring, not picture quality.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["texture_synthesis", "adain_transfer", "multi_style_network", "drop_in", "demo"]


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, ModuleType]]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import adain_transfer
        import demo
        import drop_in
        import multi_style_network
        import texture_synthesis

        yield {
            "texture_synthesis": texture_synthesis,
            "adain_transfer": adain_transfer,
            "multi_style_network": multi_style_network,
            "drop_in": drop_in,
            "demo": demo,
        }
    finally:
        sys.path.remove(str(EXAMPLES))


def check_png(path: Path) -> tuple[int, int]:
    """Assert ``path`` is a PNG that decodes; return its (width, height)."""
    from _images import read_png, read_png_size

    assert path.is_file(), f"{path.name} was not written"
    width, height = read_png_size(path)
    image = read_png(path)
    assert tuple(image.shape) == (3, height, width)
    assert width >= 16 and height >= 16
    return width, height


def test_texture_synthesis(examples: dict[str, ModuleType], tmp_path: Path) -> None:
    argv = ["--size", "24", "--steps", "2", "--textures", "dots,waves", "--out", str(tmp_path)]
    paths = examples["texture_synthesis"].main([*argv, "--losses", "gram,mean_std,mmd"])
    assert {p.name for p in paths} == {"texture_synthesis.png", "texture_loss_curves.png"}
    for path in paths:
        check_png(path)
    lbfgs = ["--optimizer", "lbfgs", "--losses", "gatys2015", "--textures", "stripes"]
    check_png(examples["texture_synthesis"].main([*argv, *lbfgs])[0])


def test_texture_synthesis_rejects_unknown_loss(
    examples: dict[str, ModuleType], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        examples["texture_synthesis"].main(["--losses", "nope", "--out", str(tmp_path)])


def test_adain_transfer(examples: dict[str, ModuleType], tmp_path: Path) -> None:
    paths = examples["adain_transfer"].main(
        ["--size", "24", "--decode-steps", "2", "--out", str(tmp_path)]
    )
    assert [p.name for p in paths] == ["adain_transfer.png"]
    check_png(paths[0])


def test_multi_style_network(examples: dict[str, ModuleType], tmp_path: Path) -> None:
    argv = ["--size", "16", "--steps", "2", "--finetune-steps", "2", "--batch", "3"]
    paths = examples["multi_style_network"].main([*argv, "--width", "4", "--out", str(tmp_path)])
    assert [p.name for p in paths] == [
        "multi_style_interpolation.png",
        "multi_style_new_style.png",
        "multi_style_training.png",
    ]
    for path in paths:
        check_png(path)


def test_drop_in(
    examples: dict[str, ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = examples["drop_in"].main(["--size", "16", "--out", str(tmp_path)])
    check_png(paths[0])
    assert (tmp_path / "legacy_checkpoint.pth").is_file()
    printed = capsys.readouterr().out
    assert "max |torch - stylenorm|" in printed
    assert "dropped: 1.running_mean, 1.running_var, 4.running_mean, 4.running_var" in printed


def test_demo_quick(examples: dict[str, ModuleType], tmp_path: Path) -> None:
    path = examples["demo"].main(["--quick", "--out", str(tmp_path)])
    assert path == tmp_path / "overview.png"
    check_png(path)
    for name in ["texture_synthesis", "adain_transfer", "multi_style_interpolation", "drop_in"]:
        check_png(tmp_path / f"{name}.png")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(
    examples: dict[str, ModuleType], script: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        examples[script].main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--out" in printed
    assert printed.count("\n") > 5  # the module docstring is the description


@pytest.mark.parametrize("script", ["texture_synthesis", "adain_transfer", "multi_style_network"])
def test_vgg_needs_torchvision_or_a_file(
    examples: dict[str, ModuleType], script: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing-vgg19.pth")
    with pytest.raises(SystemExit, match=r"torchvision|no such file"):
        examples[script].main(["--vgg", missing, "--size", "24", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("texture_synthesis", ["--size", "23"], "at least 24"),
        ("texture_synthesis", ["--textures", ","], "at least one"),
        ("texture_synthesis", ["--losses", "gram,nope"], "unknown loss 'nope'"),
        ("multi_style_network", ["--size", "11"], "at least 12"),
        ("multi_style_network", ["--loss", "bogus"], "unknown --loss 'bogus'"),
        ("adain_transfer", ["--size", "2"], "at least 3"),
        ("drop_in", ["--size", "2"], "at least 3"),
        ("demo", ["--width", "0"], "at least 1"),
    ],
)
def test_bad_options_stop_before_any_work(
    examples: dict[str, ModuleType],
    script: str,
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # argparse's usage error (exit status 2), not a traceback after the work has run.
    with pytest.raises(SystemExit) as stop:
        examples[script].main([*argv, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
