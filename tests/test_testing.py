"""Tests of stylenorm.testing: the one-line check of a user's loss against the reference."""

from __future__ import annotations

import pytest
import torch

from stylenorm.functional import gram_loss, gram_matrix, mean_std_loss, mmd_loss
from stylenorm.losses import CONVENTIONS, get_convention
from stylenorm.testing import REFERENCES, assert_close_to_reference, assert_matches_reference


def _hand_written_fast_neural_style(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def gram(f: torch.Tensor) -> torch.Tensor:
        n, c, h, w = f.shape
        flat = f.reshape(n, c, h * w)
        return flat @ flat.transpose(1, 2) / (c * h * w)

    return torch.nn.functional.mse_loss(gram(x), gram(y).expand(x.shape[0], -1, -1))


def test_hand_written_loss_passes_under_its_conventions() -> None:
    assert_matches_reference(_hand_written_fast_neural_style, "pytorch_examples")
    assert_matches_reference(_hand_written_fast_neural_style, "gram_loss", normalize="chw")
    assert_matches_reference(
        _hand_written_fast_neural_style, "gram_loss", target_shape=(1, 3, 6, 5)
    )


def test_wrong_convention_fails_and_names_the_factor() -> None:
    # A C·H·W Gram checked as an H·W one: off by exactly C² = 9.
    with pytest.raises(AssertionError, match=r"actual = 0\.111111 = 1/C² × reference"):
        assert_matches_reference(_hand_written_fast_neural_style, "gram_loss", normalize="hw")
    with pytest.raises(AssertionError, match=r"actual = 4 = 4 × reference"):
        assert_matches_reference(
            lambda x, y: 4 * get_convention("gatys2015")(x, y), "gatys2015", input_shape=(1, 3, 5)
        )


def test_unbiased_std_is_caught() -> None:
    assert_matches_reference(lambda x, y: mean_std_loss(x, y, correction=1), "adain_pytorch")
    with pytest.raises(AssertionError, match="adain_pytorch"):
        assert_matches_reference(lambda x, y: mean_std_loss(x, y, correction=0), "adain_pytorch")


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_every_convention_passes_against_its_reference(name: str) -> None:
    assert_matches_reference(get_convention(name), name, input_shape=(2, 3, 5, 4))


def test_function_names_and_options() -> None:
    assert_matches_reference(lambda x: gram_matrix(x, center=True), "gram_matrix", center=True)
    assert_matches_reference(
        lambda x, y: mmd_loss(x, y, kernel="gaussian", sigma=2.0),
        "mmd_loss",
        kernel="gaussian",
        sigma=2.0,
        input_shape=(2, 3, 3, 3),
        target_shape=(1, 3, 2, 4),
    )
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.randn(1, 3, 5, dtype=torch.float64)
    assert_close_to_reference(
        gram_loss(x, y, reduction="none"), "gram_loss", x, y, reduction="none"
    )


def test_bad_name_and_shape_mismatch() -> None:
    assert "gram_loss" in REFERENCES
    with pytest.raises(ValueError, match="name must be one of gram_matrix, gram_loss"):
        assert_matches_reference(gram_loss, "gramloss")
    with pytest.raises(AssertionError, match=r"shape \(2,\), the reference has shape \(\)"):
        assert_matches_reference(lambda x, y: gram_loss(x, y, reduction="none"), "gram_loss")


def test_scalar_mismatch_names_no_factor_unless_one_matches() -> None:
    # Two scalars are always proportional: a wrong loss that is off by no named factor gets no
    # "convention factor" hint (here, the arguments swapped), one off by C² still does.
    lua = get_convention("adain_lua")
    with pytest.raises(AssertionError) as swapped:
        assert_matches_reference(lambda x, y: lua(y, x), "adain_lua")
    assert "convention factor" not in str(swapped.value)
    with pytest.raises(AssertionError, match=r"= C² × reference"):
        assert_matches_reference(lambda x, y: 9 * lua(x, y), "adain_lua")


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="name must be one of"):
        assert_matches_reference(gram_loss, ["magenta"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="input_shape must be a sequence of ints, got int"):
        assert_matches_reference(gram_loss, "gram_loss", input_shape=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"input_shape must be \(N, C, \*spatial\)"):
        assert_matches_reference(gram_loss, "gram_loss", input_shape=(0, 3, 4, 4))
    with pytest.raises(ValueError, match=r"target_shape must be \(N, C, \*spatial\)"):
        assert_matches_reference(gram_loss, "gram_loss", target_shape=(2, 3))
    with pytest.raises(ValueError, match="target_shape must be None for 'gram_matrix'"):
        assert_matches_reference(gram_matrix, "gram_matrix", target_shape=(1, 3, 4, 4))
