"""Tests of the style-loss modules and of the named published conventions."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from stylenorm import reference as ref
from stylenorm.functional import gram_loss, mean_std_loss, mmd_loss
from stylenorm.losses import (
    CONVENTIONS,
    GramLoss,
    MeanStdLoss,
    MMDLoss,
    StyleConvention,
    StyleLoss,
    get_convention,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Tiny tensors: a second intra-op thread only adds hand-off latency on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # ReLU-like activations: non-negative, with some exact zeros.
    return torch.randn(shape, generator=gen, dtype=torch.float64).relu().mul(2).to(dtype)


# --------------------------------------------------------------------------------------------
# Presets against each source's formula, written independently in NumPy
# --------------------------------------------------------------------------------------------

PRESET_REFERENCES = {
    "gatys2015": ref.gatys2015_style_loss,
    "pytorch_examples": ref.pytorch_examples_style_loss,
    "magenta": ref.magenta_style_loss,
    "pystiche": ref.pystiche_gram_loss,
    "adain_lua": ref.adain_lua_style_loss,
    "adain_pytorch": ref.adain_pytorch_style_loss,
    "li2017_bn": ref.li2017_bn_style_loss,
}


def test_every_convention_has_a_reference_formula_and_source() -> None:
    assert set(PRESET_REFERENCES) == set(CONVENTIONS)
    for convention in CONVENTIONS.values():
        assert convention.formula and convention.source


@pytest.mark.parametrize("name", sorted(PRESET_REFERENCES))
@pytest.mark.parametrize(
    ("n", "target_batch", "target_size"),
    [(1, 1, (6, 5)), (3, 1, (6, 5)), (3, 3, (6, 5)), (2, 1, (9, 7))],
)
def test_preset_matches_source_formula(
    name: str, n: int, target_batch: int, target_size: tuple[int, int]
) -> None:
    x, y = _features(n, 4, 6, 5), _features(target_batch, 4, *target_size, seed=1)
    expected = PRESET_REFERENCES[name](x.numpy(), y.numpy())
    got = get_convention(name)(x, y)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-11, atol=0)
    # The cached-target multi-layer module reproduces it too.
    np.testing.assert_allclose(StyleLoss([y], loss=name)([x]).numpy(), expected, rtol=1e-11)
    # float32 features: the same number to float32 accuracy.
    got32 = get_convention(name)(x.float(), y.float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), expected, rtol=1e-4)


def test_gatys_single_image_matches_paper_equation_exactly() -> None:
    # E_l = 1/(4 N_l² M_l²) Σ (G - A)², G = F Fᵀ (eq. 4), for one image.
    x, y = _features(1, 3, 4, 4), _features(1, 3, 4, 4, seed=2)
    f, p = x.numpy().reshape(3, 16), y.numpy().reshape(3, 16)
    expected = ((f @ f.T - p @ p.T) ** 2).sum() / (4 * 3**2 * 16**2)
    np.testing.assert_allclose(get_convention("gatys2015")(x, y).numpy(), expected, rtol=1e-12)


def test_convention_factors_between_gram_conventions() -> None:
    # CONVENTIONS.md: the 1/(CHW) Gram loss is C² smaller than the 1/(HW) one; Gatys is ¼ of it.
    x, y = _features(2, 5, 4, 4), _features(1, 5, 4, 4, seed=1)
    examples, magenta = get_convention("pytorch_examples")(x, y), get_convention("magenta")(x, y)
    torch.testing.assert_close(magenta, 25 * examples)
    torch.testing.assert_close(get_convention("gatys2015")(x, y), magenta / 4)
    torch.testing.assert_close(get_convention("pystiche")(x, y), magenta)


def test_adain_conventions_differ_as_documented() -> None:
    # Lua: sum over C / N; PyTorch port: mean over N·C with unbiased stds.
    x, y = _features(2, 4, 8, 8), _features(1, 4, 8, 8, seed=1)
    lua = get_convention("adain_lua")(x, y)
    biased_mean = mean_std_loss(x, y, eps=1e-6, target_eps=0.0, reduction="mean")
    torch.testing.assert_close(lua, 4 * biased_mean)
    port = get_convention("adain_pytorch")(x, y)
    torch.testing.assert_close(port, mean_std_loss(x, y, correction=1))
    assert not torch.isclose(port, mean_std_loss(x, y, correction=0), rtol=1e-3)


def test_get_convention_errors_and_passthrough() -> None:
    with pytest.raises(ValueError, match=r"convention must be one of gatys2015, .*; got 'gatys'"):
        get_convention("gatys")
    with pytest.raises(ValueError, match="loss must be 'gram' or 'mean_std', got 'gramm'"):
        StyleConvention("mine", "gramm")
    custom = StyleConvention("mine", "gram", {"normalize": "none"}, scale=2.0)
    assert get_convention(custom) is custom
    x, y = _features(1, 2, 3, 3), _features(1, 2, 3, 3, seed=1)
    torch.testing.assert_close(custom(x, y), 2 * gram_loss(x, y, normalize="none"))
    # Frozen, so hashable: equal conventions hash alike and can key a dict.
    twin = StyleConvention("mine", "gram", {"normalize": "none"}, scale=2.0)
    assert twin == custom and hash(twin) == hash(custom)
    assert len({custom, twin, *CONVENTIONS.values()}) == len(CONVENTIONS) + 1


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

MODULE_CASES: list[tuple[type[torch.nn.Module], Any, dict[str, Any]]] = [
    (GramLoss, gram_loss, {}),
    (GramLoss, gram_loss, {"normalize": "hw", "reduction": "none", "center": True}),
    (MeanStdLoss, mean_std_loss, {}),
    (MeanStdLoss, mean_std_loss, {"eps": 0.0, "target_eps": 1e-3, "correction": 1}),
    (MeanStdLoss, mean_std_loss, {"reduction": "batchmean"}),
    (MMDLoss, mmd_loss, {}),
    (MMDLoss, mmd_loss, {"kernel": "linear", "reduction": "sum"}),
    (MMDLoss, mmd_loss, {"kernel": "polynomial", "degree": 3, "offset": 1.0}),
    (MMDLoss, mmd_loss, {"kernel": "gaussian", "sigma": 2.0, "reduction": "none"}),
]


@pytest.mark.parametrize(("module", "fn", "options"), MODULE_CASES)
def test_cached_target_is_a_copy(module: type[torch.nn.Module], fn: Any, options: dict[str, Any]):
    # Changing the caller's target in place afterwards changes nothing, and loading a state
    # dict writes into the module's buffers, not into the tensor it was built from.
    x, y = _features(2, 3, 4, 4), _features(1, 3, 4, 4, seed=1)
    kept = y.clone()
    loss_fn = module(y, persistent=True, **options)
    before = loss_fn(x)
    y.mul_(3.0)
    torch.testing.assert_close(loss_fn(x), before)
    torch.testing.assert_close(before, fn(x, kept, **options))
    other = module(_features(1, 3, 4, 4, seed=2), persistent=True, **options)
    target = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    blank = module(target, persistent=True, **options)
    blank.load_state_dict(other.state_dict())
    assert torch.equal(target, torch.zeros_like(target))


def test_loss_modules_name_a_non_tensor_input() -> None:
    y = _features(1, 3, 4, 4)
    for module in (GramLoss, MeanStdLoss, MMDLoss):
        with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got list"):
            module(y)([1.0])  # type: ignore[arg-type]


@pytest.mark.parametrize(("module", "fn", "options"), MODULE_CASES)
def test_module_equals_function_and_caches_target(module: Any, fn: Any, options: dict[str, Any]):
    target = _features(1, 3, 5, 6, seed=1)
    gen = torch.Generator().manual_seed(4)
    target_mask = torch.rand(1, 1, 5, 6, generator=gen, dtype=torch.float64) + 0.1
    mask = torch.rand(2, 1, 4, 4, generator=gen, dtype=torch.float64) + 0.1
    loss_fn = module(target.clone(), target_mask=target_mask, **options)
    x = _features(2, 3, 4, 4).requires_grad_()
    expected = fn(x, target, target_mask=target_mask, mask=mask, **options)
    got = loss_fn(x, mask)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss_fn(x), fn(x, target, target_mask=target_mask, **options))
    # Cached: buffers, no gradient to the target, not in the state_dict by default.
    buffers = dict(loss_fn.named_buffers())
    assert buffers and all(name.startswith("target_") for name in buffers)
    assert all(not b.requires_grad for b in buffers.values())
    assert loss_fn.state_dict() == {}
    (grad,) = torch.autograd.grad(got.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize(("module", "fn", "options"), MODULE_CASES[::2])
def test_module_buffers_persistent_on_request_and_follow_to(
    module: Any, fn: Any, options: dict[str, Any]
) -> None:
    target = _features(1, 3, 5, 5, dtype=torch.float32)
    kept = module(target, persistent=True, **options)
    state = kept.state_dict()
    assert set(state) == {name for name, b in kept.named_buffers()}
    restored = module(torch.zeros(1, 3, 5, 5), persistent=True, **options)
    restored.load_state_dict(state)
    x = _features(2, 3, 4, 4, seed=5, dtype=torch.float32)
    torch.testing.assert_close(restored(x), kept(x))
    # .to(float64) moves the cached statistics; the result is then float64 and exact.
    loss_fn = module(target, **options).to(torch.float64)
    assert all(b.dtype == torch.float64 for b in loss_fn.buffers())
    got = loss_fn(x.double())
    assert got.dtype == torch.float64
    expected = fn(x.double(), target.double(), **options)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_cached_target_is_a_snapshot() -> None:
    target = _features(1, 3, 4, 4)
    loss_fn = GramLoss(target)
    x = _features(2, 3, 4, 4, seed=1)
    before = loss_fn(x)
    target.add_(1.0)  # the user's tensor changes; the cache does not
    torch.testing.assert_close(loss_fn(x), before)


def test_module_input_errors_name_the_argument() -> None:
    loss_fn = MeanStdLoss(_features(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"target must have the channels of input: .*C=4, got C=3"):
        loss_fn(_features(2, 4, 4, 4))
    with pytest.raises(
        ValueError, match=r"target must have batch size 1 .* or 3 .*got batch size 2"
    ):
        loss_fn(_features(3, 3, 4, 4))
    with pytest.raises(ValueError, match="normalize must be one of"):
        GramLoss(_features(1, 3, 4, 4), normalize="c")
    with pytest.raises(ValueError, match="kernel must be one of"):
        MMDLoss(_features(1, 3, 4, 4), kernel="rbf")
    with pytest.raises(ValueError, match="target_mask must weight positions"):
        GramLoss(_features(1, 3, 4, 4), target_mask=torch.ones(1, 3, 4, 4))
    # A layer's target with too few positions for the convention's unbiased variance: the
    # message names the layer and the target.
    targets = {"relu1_1": _features(1, 3, 8, 8), "relu5_1": _features(1, 5, 1, 1)}
    with pytest.raises(ValueError, match=r"^layer 'relu5_1': target has 1 spatial positions"):
        StyleLoss(targets, loss="adain_pytorch")


def test_repr_shows_the_convention() -> None:
    assert "normalize='hw'" in repr(GramLoss(_features(1, 2, 3, 3), normalize="hw"))
    assert "gatys2015" in repr(StyleLoss([_features(1, 2, 3, 3)], loss="gatys2015"))


# --------------------------------------------------------------------------------------------
# StyleLoss
# --------------------------------------------------------------------------------------------


def _layers(n: int, seed: int) -> dict[str, torch.Tensor]:
    return {
        "relu1_1": _features(n, 3, 8, 8, seed=seed),
        "relu2_1": _features(n, 5, 4, 4, seed=seed + 1),
        "relu3_1": _features(n, 6, 2, 3, seed=seed + 2),
    }


WEIGHTS = {"relu1_1": 1.0, "relu2_1": 0.25, "relu3_1": 3.0}


@pytest.mark.parametrize(
    ("loss", "fn", "options"),
    [
        ("gram", gram_loss, {"normalize": "hw"}),
        ("mean_std", mean_std_loss, {"correction": 1}),
        ("mmd", mmd_loss, {"kernel": "gaussian", "sigma": 3.0}),
    ],
)
def test_style_loss_is_weighted_sum_of_layer_losses(loss: str, fn: Any, options: dict[str, Any]):
    targets, inputs = _layers(1, 0), _layers(2, 10)
    expected = sum(w * fn(inputs[k], targets[k], **options) for k, w in WEIGHTS.items())
    by_name = StyleLoss(targets, weights=WEIGHTS, loss=loss, **options)
    torch.testing.assert_close(by_name(inputs), expected)
    # Extra layers in the input mapping (e.g. a content layer) are ignored.
    torch.testing.assert_close(by_name({**inputs, "relu4_2": torch.randn(2, 7, 2, 2)}), expected)
    as_list = StyleLoss(
        list(targets.values()), weights=list(WEIGHTS.values()), loss=loss, **options
    )
    torch.testing.assert_close(as_list(list(inputs.values())), expected)
    unweighted = StyleLoss(targets, loss=loss, **options)
    torch.testing.assert_close(
        unweighted(inputs), sum(fn(inputs[k], targets[k], **options) for k in WEIGHTS)
    )


def _masks(n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"relu1_1": (8, 8), "relu2_1": (4, 4), "relu3_1": (2, 3)}
    return {
        k: torch.rand(n, 1, *hw, generator=generator, dtype=torch.float64)
        for k, hw in shapes.items()
    }


@pytest.mark.parametrize(
    ("loss", "fn", "options"),
    [
        ("gram", gram_loss, {"normalize": "hw"}),
        ("mean_std", mean_std_loss, {"correction": 1}),
        ("mmd", mmd_loss, {"kernel": "gaussian", "sigma": 3.0}),
        ("magenta", get_convention("magenta"), {}),
        ("adain_pytorch", get_convention("adain_pytorch"), {}),
    ],
)
def test_style_loss_masks_are_the_layer_losses_masks(
    loss: str, fn: Any, options: dict[str, Any]
) -> None:
    targets, inputs = _layers(1, 0), _layers(2, 10)
    target_masks, masks = _masks(1, 20), _masks(2, 30)
    target_masks["relu2_1"] = None  # type: ignore[assignment]
    del masks["relu3_1"]
    convention = isinstance(fn, StyleConvention)
    layer_fn = {"gram": gram_loss, "mean_std": mean_std_loss}[fn.loss] if convention else fn
    scale = fn.scale if convention else 1.0
    layer_options = dict(fn.options) if convention else options
    expected = sum(
        w
        * scale
        * layer_fn(
            inputs[k],
            targets[k],
            mask=masks.get(k),
            target_mask=target_masks[k],
            **layer_options,
        )
        for k, w in WEIGHTS.items()
    )
    by_name = StyleLoss(targets, weights=WEIGHTS, loss=loss, target_masks=target_masks, **options)
    torch.testing.assert_close(by_name(inputs, masks=masks), expected)
    as_list = StyleLoss(
        list(targets.values()),
        weights=list(WEIGHTS.values()),
        loss=loss,
        target_masks=list(target_masks.values()),
        **options,
    )
    listed = [masks.get(k) for k in targets]
    torch.testing.assert_close(as_list(list(inputs.values()), listed), expected)
    # The masks change the loss (the test above is not the unmasked one).
    assert not torch.allclose(by_name(inputs), expected)


def test_style_loss_mask_errors() -> None:
    targets, inputs = _layers(1, 0), _layers(2, 10)
    with pytest.raises(ValueError, match=r"target_masks has layers \['relu9'\] that targets lack"):
        StyleLoss(targets, target_masks={"relu9": torch.ones(1, 1, 8, 8)})
    with pytest.raises(TypeError, match="target_masks must be a mapping like targets"):
        StyleLoss(targets, target_masks=[None, None, None])
    with pytest.raises(TypeError, match="target_masks must be a sequence like targets"):
        StyleLoss(list(targets.values()), target_masks=torch.ones(1, 1, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"target_masks must have one entry .* \(3\); got 1"):
        StyleLoss(list(targets.values()), target_masks=[None])
    with pytest.raises(TypeError, match=r"target_masks\['0'\] must be a tensor or None, got float"):
        StyleLoss(list(targets.values()), target_masks=[1.0, None, None])  # type: ignore[list-item]
    # A mask of another layer's size: the layer's own error, naming the layer and the argument.
    with pytest.raises(ValueError, match=r"layer 'relu2_1': target_mask must broadcast"):
        StyleLoss(targets, target_masks={"relu2_1": torch.ones(1, 1, 8, 8)})
    loss_fn = StyleLoss(targets)
    with pytest.raises(ValueError, match=r"masks has layers \['conv'\] that targets lack"):
        loss_fn(inputs, masks={"conv": torch.ones(2, 1, 8, 8)})
    with pytest.raises(ValueError, match=r"layer 'relu1_1': mask must broadcast to input"):
        loss_fn(inputs, masks={"relu1_1": torch.ones(2, 1, 4, 4)})
    with pytest.raises(ValueError, match=r"layer 'relu2_1': .*channels"):
        loss_fn({**inputs, "relu2_1": torch.randn(2, 4, 4, 4, dtype=torch.float64)})


def test_style_loss_with_convention_applies_its_scale() -> None:
    targets, inputs = _layers(1, 0), _layers(2, 10)
    gatys = get_convention("gatys2015")
    expected = sum(w * gatys(inputs[k], targets[k]) for k, w in WEIGHTS.items())
    torch.testing.assert_close(
        StyleLoss(targets, weights=WEIGHTS, loss="gatys2015")(inputs), expected
    )
    torch.testing.assert_close(StyleLoss(targets, weights=WEIGHTS, loss=gatys)(inputs), expected)


def test_conventions_are_read_only_and_copy() -> None:
    """A preset's options cannot be changed by accident (every later loss would change), and a
    StyleLoss holding a convention still deep-copies, pickles and saves."""
    preset = get_convention("pytorch_examples")
    with pytest.raises(TypeError, match="read-only"):
        preset.options["normalize"] = "none"  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        preset.options.update(normalize="none")  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="read-only"):
        preset.options.__init__(normalize="none")  # type: ignore[misc]
    assert preset.options["normalize"] == "chw"
    with pytest.raises(TypeError, match="options must be a mapping"):
        StyleConvention("mine", "gram", None)  # type: ignore[arg-type]
    options = {"normalize": "hw"}
    mine = StyleConvention("mine", "gram", options)
    options["normalize"] = "none"  # the caller's dict is copied
    assert mine.options == {"normalize": "hw"}
    assert dataclasses.asdict(mine)["options"] == {"normalize": "hw"}
    assert copy.deepcopy(mine) == mine == pickle.loads(pickle.dumps(mine))
    targets, inputs = _layers(1, 0), _layers(2, 10)
    loss_fn = StyleLoss(targets, loss="gatys2015")
    buffer = io.BytesIO()
    torch.save(loss_fn, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(loss_fn), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(copied(inputs), loss_fn(inputs))


def test_style_loss_state_dict_and_to() -> None:
    targets = _layers(1, 0)
    assert StyleLoss(targets).state_dict() == {}
    kept = StyleLoss(targets, persistent=True)
    assert set(kept.state_dict()) == {f"layers.{k}.target_gram" for k in targets}
    moved = StyleLoss({k: v.float() for k, v in targets.items()}).to(torch.float64)
    assert all(b.dtype == torch.float64 for b in moved.buffers())


def test_style_loss_errors() -> None:
    targets, inputs = _layers(1, 0), _layers(2, 10)
    with pytest.raises(ValueError, match=r"weights must have the keys of targets"):
        StyleLoss(targets, weights={"relu1_1": 1.0})
    with pytest.raises(ValueError, match=r"weights must have one entry per layer \(3\); got 2"):
        StyleLoss(list(targets.values()), weights=[1.0, 2.0])
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=r"weights\['relu2_1'\] must be finite"):
            StyleLoss(targets, weights={**WEIGHTS, "relu2_1": bad})
    with pytest.raises(TypeError, match=r"weights\['0'\] must be a number, got 'a'"):
        StyleLoss(list(targets.values()), weights="abc")  # type: ignore[arg-type]
    for boolean in (True, np.True_, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"weights\['1'\] must be a number, got "):
            StyleLoss(list(targets.values()), weights=[1.0, boolean, 2.0])
    with pytest.raises(ValueError, match=r"weights\['0'\] must be finite, got inf"):
        StyleLoss(list(targets.values()), weights=[10**400, 1, 1])
    # An option's error is every layer's: raised as the loss raises it, without a layer name.
    for options, error in (
        ({"normalize": "bad"}, ValueError),
        ({"foo": 1}, TypeError),
        ({"loss": "mean_std", "eps": -1.0}, ValueError),
    ):
        with pytest.raises(error) as raised:
            StyleLoss(targets, **options)
        assert "layer" not in str(raised.value)
    # Numbers of other types (numpy's, 0-d tensors) are numbers.
    mixed = StyleLoss(list(targets.values()), weights=[np.float32(0.5), torch.tensor(2.0), 1])
    assert list(mixed.layer_weights.values()) == [0.5, 2.0, 1.0]
    with pytest.raises(ValueError, match="loss must be one of gram, mean_std, mmd, gatys2015"):
        StyleLoss(targets, loss="gramm")
    with pytest.raises(TypeError, match="cannot be combined with a convention"):
        StyleLoss(targets, loss="magenta", normalize="chw")
    with pytest.raises(TypeError, match="targets must be a mapping or a sequence"):
        StyleLoss(torch.randn(1, 3, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets must hold at least one layer"):
        StyleLoss({})
    loss_fn = StyleLoss(targets)
    with pytest.raises(ValueError, match=r"inputs lack the layers \['relu3_1'\]"):
        loss_fn({k: inputs[k] for k in ("relu1_1", "relu2_1")})
    with pytest.raises(TypeError, match="inputs must be a mapping like targets"):
        loss_fn(list(inputs.values()))
    # Keys that are not strings: looked up as the strings the targets' keys became.
    y, x = _features(1, 3, 4, 4), _features(2, 3, 4, 4, seed=1)
    torch.testing.assert_close(StyleLoss({0: y})({0: x}), gram_loss(x, y))
    with pytest.raises(ValueError, match="targets has keys that are equal as strings"):
        StyleLoss({0: y, "0": y})
    with pytest.raises(ValueError, match="inputs has keys that are equal as strings"):
        StyleLoss({0: y})({0: x, "0": x})
    with pytest.raises(ValueError, match="inputs must hold 3 feature maps, got 2"):
        StyleLoss(list(targets.values()))(list(inputs.values())[:2])
