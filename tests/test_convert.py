"""Model conversion between torch.nn and stylenorm norms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import stylenorm
from stylenorm.convert import to_stylenorm, to_torch

PAIRS = [
    (nn.BatchNorm1d, stylenorm.BatchNorm1d, (4, 3, 7)),
    (nn.BatchNorm2d, stylenorm.BatchNorm2d, (4, 3, 5, 6)),
    (nn.BatchNorm3d, stylenorm.BatchNorm3d, (4, 3, 3, 4, 5)),
    (nn.InstanceNorm1d, stylenorm.InstanceNorm1d, (4, 3, 7)),
    (nn.InstanceNorm2d, stylenorm.InstanceNorm2d, (4, 3, 5, 6)),
    (nn.InstanceNorm3d, stylenorm.InstanceNorm3d, (4, 3, 3, 4, 5)),
]


def _model(norm_cls: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Identity(),
        nn.Sequential(norm_cls(3, affine=True, track_running_stats=True), nn.ReLU()),
        norm_cls(3, affine=False, track_running_stats=False, momentum=None),
    )


@pytest.mark.parametrize(("torch_cls", "ours_cls", "shape"), PAIRS)
@pytest.mark.parametrize("training", [True, False])
def test_round_trip_keeps_tensors_mode_and_numbers(torch_cls, ours_cls, shape, training):
    model = _model(torch_cls).double().train(training)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    reference = copy.deepcopy(model)
    weight = model[1][0].weight
    converted = to_stylenorm(model)
    assert type(converted[1][0]) is ours_cls and type(converted[2]) is ours_cls
    assert converted[1][0].weight is weight, "parameters must be shared, not copied"
    assert converted[1][0].training == training and converted[2].momentum is None
    assert set(converted.state_dict()) == set(reference.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-10, atol=1e-10)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-10, atol=1e-12)
    back = to_torch(converted)
    assert type(back[1][0]) is torch_cls and back[1][0].weight is weight
    torch.testing.assert_close(back(x), reference(x), rtol=1e-10, atol=1e-10)


def test_root_norm_is_replaced_and_others_untouched():
    root = nn.BatchNorm2d(3)
    assert type(to_stylenorm(root)) is stylenorm.BatchNorm2d
    sync = nn.SyncBatchNorm(3)
    lazy = nn.LazyBatchNorm2d()
    model = nn.Sequential(sync, lazy, nn.GroupNorm(1, 3))
    converted = to_stylenorm(model)
    assert converted[0] is sync and converted[1] is lazy and type(converted[2]) is nn.GroupNorm


@pytest.mark.parametrize(("torch_cls", "ours_cls", "shape"), PAIRS[:2])
def test_swaps_keep_non_persistent_buffers_and_attributes(torch_cls, ours_cls, shape):
    """The state_dict stays the original's (a buffer registered non-persistent is not saved
    after the swap either), and qconfig carries over, both ways (as torch's
    convert_sync_batchnorm keeps it); other instance attributes do not: an instance-level
    forward (a wrapper's hook) would run the old layer instead of the new."""
    layer = torch_cls(3)
    running_mean = layer.running_mean
    del layer._buffers["running_mean"]
    layer.register_buffer("running_mean", running_mean, persistent=False)
    layer.qconfig = "q"
    layer.tag = {"stage": 1}
    keys = list(layer.state_dict())
    assert "running_mean" not in keys
    ours = to_stylenorm(nn.Sequential(layer))[0]
    back = to_torch(nn.Sequential(ours))[0]
    for converted, cls in ((ours, ours_cls), (back, torch_cls)):
        assert type(converted) is cls
        assert list(converted.state_dict()) == keys
        assert converted.running_mean is running_mean
        assert converted.qconfig == "q" and not hasattr(converted, "tag")
    wrapped = torch_cls(3)
    wrapped.forward = lambda *args: pytest.fail("the old layer ran")  # type: ignore[method-assign]
    swapped = to_stylenorm(nn.Sequential(wrapped))[0]
    assert "forward" not in vars(swapped)
    swapped(torch.randn(shape))
    layer.load_state_dict(ours.state_dict())  # strict, both ways
    ours.load_state_dict(layer.state_dict())


def test_bias_false_and_dtype_kept():
    model = nn.Sequential(nn.BatchNorm2d(3, bias=False, dtype=torch.float64))
    converted = to_stylenorm(model)
    assert converted[0].bias is None and converted[0].weight.dtype == torch.float64
    assert "bias=False" in repr(converted[0])


# ------------------------------------------------------------------------------------------------
# to_conditional, style_parameters, StyleSequential


def _single_style_network() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.InstanceNorm2d(4, affine=True),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1),
            stylenorm.InstanceNorm2d(4, affine=True),
            nn.ReLU(),
        ),
        nn.InstanceNorm2d(4),  # not affine: nothing to condition, left alone
        nn.BatchNorm2d(4),
    )
    with torch.no_grad():
        for m in (net[1], net[3][1]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    return net.eval()


def test_to_conditional_starts_every_style_at_the_original():
    """Every bank row equals the original gamma/beta, so every style (an int, per-sample ids or
    mixing weights) computes the original network's output; state_dict keys are unchanged."""
    net = _single_style_network()
    x = torch.randn(3, 3, 8, 8)
    expected = net(x)
    keys = list(net.state_dict())
    gamma = net[1].weight.detach().clone()
    converted = stylenorm.to_conditional(net, num_styles=5)
    assert type(converted) is stylenorm.StyleSequential
    assert type(converted[1]) is stylenorm.ConditionalInstanceNorm2d
    assert type(converted[3]) is stylenorm.StyleSequential
    assert type(converted[3][1]) is stylenorm.ConditionalInstanceNorm2d
    assert type(converted[4]) is nn.InstanceNorm2d and type(converted[5]) is nn.BatchNorm2d
    assert not converted.training and not converted[3][1].training
    assert list(converted.state_dict()) == keys
    torch.testing.assert_close(converted[1].weight, gamma.expand(5, 4))
    mixture = torch.softmax(torch.randn(3, 5), dim=1)
    for style in (0, 4, torch.tensor([0, 2, 4]), mixture):
        torch.testing.assert_close(converted(x, style), expected, rtol=1e-5, atol=1e-5)


def test_styles_diverge_after_fine_tuning_style_parameters():
    """Training style_parameters for one style changes that style's output only."""
    converted = stylenorm.to_conditional(_single_style_network(), num_styles=3)
    x = torch.randn(2, 3, 8, 8)
    before = converted(x, 0).detach()
    banks = list(stylenorm.style_parameters(converted))
    assert banks == [
        converted[1].weight,
        converted[1].bias,
        converted[3][1].weight,
        converted[3][1].bias,
    ]
    rows = [b.detach().clone() for b in banks]
    optimizer = torch.optim.SGD(banks, lr=0.5)
    target = torch.randn_like(before)
    for _ in range(3):
        optimizer.zero_grad()
        (converted(x, 2) - target).square().mean().backward()
        optimizer.step()
    for bank, row in zip(banks, rows, strict=True):
        torch.testing.assert_close(bank[:2], row[:2], rtol=0, atol=0)  # untouched styles
        assert not torch.equal(bank[2], row[2])
    torch.testing.assert_close(converted(x, 0), before)
    torch.testing.assert_close(converted(x, 1), before)
    assert (converted(x, 2) - before).abs().max() > 1e-2
    mixed = converted(x, torch.tensor([0, 2]))
    torch.testing.assert_close(mixed[0], before[0])
    torch.testing.assert_close(mixed[1], converted(x, 2)[1])


@pytest.mark.parametrize(
    ("torch_cls", "cin_cls", "shape"),
    [
        (nn.InstanceNorm1d, stylenorm.ConditionalInstanceNorm1d, (2, 3, 7)),
        (stylenorm.InstanceNorm3d, stylenorm.ConditionalInstanceNorm3d, (2, 3, 3, 4, 5)),
    ],
)
def test_to_conditional_every_rank_and_root(torch_cls, cin_cls, shape):
    """A root instance norm becomes a conditional norm of the same rank (dtype, eps and
    bias=False carried over)."""
    norm = torch_cls(3, eps=1e-3, affine=True, bias=False, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    converted = stylenorm.to_conditional(norm, 2)
    assert type(converted) is cin_cls and converted.bias is None and converted.eps == 1e-3
    assert converted.weight.dtype == torch.float64
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(converted(x, 1), norm(x))


def test_to_conditional_keeps_frozen_parameters_frozen():
    norm = nn.InstanceNorm2d(3, affine=True)
    norm.weight.requires_grad_(False)
    converted = stylenorm.to_conditional(nn.Sequential(norm), 2)[0]
    assert not converted.weight.requires_grad and converted.bias.requires_grad
    assert [p.requires_grad for p in stylenorm.style_parameters(converted)] == [False, True]


def test_to_conditional_warns_for_tracked_statistics_and_checks_arguments():
    with pytest.warns(UserWarning, match="running statistics"):
        stylenorm.to_conditional(nn.InstanceNorm2d(3, affine=True, track_running_stats=True), 2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_styles"):
            stylenorm.to_conditional(nn.Sequential(), bad)
    for wrong in (2.0, True, "2"):
        with pytest.raises(TypeError, match="num_styles"):
            stylenorm.to_conditional(nn.Sequential(), wrong)
    # NumPy integers count, as for the layers' constructors.
    converted = stylenorm.to_conditional(nn.InstanceNorm2d(3, affine=True), np.int64(2))
    assert converted.weight.shape == (2, 3)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        stylenorm.to_conditional("model", 2)  # type: ignore[arg-type]


class _Block(nn.Module):
    """A residual block with a conditional norm: it takes the style itself."""

    takes_style = True

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = stylenorm.ConditionalInstanceNorm2d(3, num_styles=2)

    def forward(self, x: torch.Tensor, style: int | torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv(x), style)


def test_style_sequential_threads_the_style_and_stores_none():
    """StyleSequential hands the style to conditional norms, nested StyleSequentials and blocks
    that declare takes_style; other children get the input alone; nothing is stored."""
    torch.manual_seed(0)
    chain = stylenorm.StyleSequential(
        _Block(), nn.ReLU(), stylenorm.StyleSequential(stylenorm.ConditionalInstanceNorm2d(3, 2))
    )
    with torch.no_grad():
        chain[0].norm.weight[1].fill_(2.0)
        chain[2][0].bias[1].fill_(0.5)
    state = {k: v.clone() for k, v in chain.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    expected = [chain[2][0](torch.relu(x + chain[0].norm(chain[0].conv(x), s)), s) for s in (0, 1)]
    torch.testing.assert_close(chain(x, 1), expected[1])
    torch.testing.assert_close(chain(x, 0), expected[0])
    both = chain(x, torch.tensor([0, 1]))
    torch.testing.assert_close(both, torch.stack([expected[0][0], expected[1][1]]))
    assert vars(chain).keys() == vars(stylenorm.StyleSequential()).keys()  # no stored style
    for key, value in chain.state_dict().items():
        assert torch.equal(value, state[key])


def test_style_sequential_rejects_hidden_conditional_norms():
    """A child holding a conditional norm but taking no style is an error at construction."""
    hidden = nn.ModuleList([stylenorm.ConditionalInstanceNorm2d(3, 2)])
    with pytest.raises(TypeError, match="takes no style"):
        stylenorm.StyleSequential(nn.Identity(), hidden)
    with pytest.raises(TypeError, match="takes no style"):
        stylenorm.StyleSequential(nn.Sequential(stylenorm.ConditionalInstanceNorm2d(3, 2)))


def test_style_sequential_sum_and_repeat_stay_style_sequentials():
    norm = stylenorm.ConditionalInstanceNorm2d(3, 2)
    with torch.no_grad():
        norm.bias[1].fill_(1.0)
    chain = stylenorm.StyleSequential(norm, nn.ReLU())
    x = torch.randn(2, 3, 4, 4)
    once = chain(x, 1)
    for combined, expected in (
        (chain + nn.Sequential(nn.Identity()), once),
        (nn.Sequential(nn.Identity()) + chain, once),  # plain Sequential on the left too
        (nn.Sequential(nn.Tanh()) + chain, chain(torch.tanh(x), 1)),
        (chain * 2, chain(once, 1)),
        (2 * chain, chain(once, 1)),
    ):
        assert type(combined) is stylenorm.StyleSequential
        torch.testing.assert_close(combined(x, 1), expected)


# ------------------------------------------------------------------------------------------------
# Shared modules, training modes, failures


class _Plain(nn.Module):
    """A custom block with an affine instance norm that does not declare takes_style."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(4, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_to_conditional_keeps_repeated_and_shared_modules():
    """A ReLU object used twice in one Sequential stays in both places; a norm shared by two
    parents becomes one conditional norm, used in both (one set of style banks)."""
    act = nn.ReLU()
    shared = nn.InstanceNorm2d(4, affine=True)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), shared, act, nn.Sequential(nn.Conv2d(4, 4, 3), shared), act
    )
    x = torch.randn(2, 3, 12, 12)
    before = net(x)
    net = stylenorm.to_conditional(net, 3)
    assert len(net) == 5 and net[2] is net[4] is act
    assert isinstance(net[1], stylenorm.ConditionalInstanceNorm2d) and net[3][1] is net[1]
    assert len(list(stylenorm.style_parameters(net))) == 2
    torch.testing.assert_close(net(x, 2), before)


@pytest.mark.parametrize("convert", [to_stylenorm, to_torch])
def test_swapping_keeps_repeated_and_shared_norms(convert):
    cls = nn.BatchNorm2d if convert is to_stylenorm else stylenorm.BatchNorm2d
    bn = cls(3)
    inner = nn.Sequential(bn)
    model = nn.Sequential(bn, nn.ReLU(), bn, inner)
    model = convert(model)
    assert type(model[0]) is not cls and model[2] is model[0] and model[3][0] is model[0]
    model.double()  # one module: its buffers are converted once, for every place it is used
    model[3](torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert model[0].running_mean is model[3][0].running_mean
    assert int(model[0].num_batches_tracked) == 1


def test_to_conditional_keeps_every_training_mode():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, affine=True), nn.BatchNorm2d(4), nn.Dropout()
    )
    net[2].eval()  # a frozen BatchNorm, as when fine-tuning
    net[3].eval()
    modes = [m.training for m in net]
    net = stylenorm.to_conditional(net, 2)
    assert net.training and [m.training for m in net] == modes


def test_failed_conversion_leaves_the_model_as_it_was():
    net = nn.Sequential(nn.InstanceNorm2d(4, affine=True), _Plain())
    children = list(net)
    with pytest.raises(TypeError, match="takes no style"):
        stylenorm.to_conditional(net, 2)
    assert list(net) == children and type(net[1].norm) is nn.InstanceNorm2d
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(net(x), children[1](children[0](x)))


class _StyledBlock(nn.Module):
    """A block that takes the style and holds a plain instance norm as an attribute (not in a
    Sequential, whose rebuilding would register its children anyway)."""

    takes_style = True

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(3, affine=True)

    def forward(self, x: torch.Tensor, style: int | torch.Tensor) -> torch.Tensor:
        return self.norm(x, style)


@pytest.mark.parametrize("convert", [to_stylenorm, stylenorm.to_conditional])
def test_conversions_fire_module_registration_hooks(convert):
    """Replaced children are registered as torch's own conversions register them (add_module),
    so global module-registration hooks see each one, under the slot's name."""
    seen: list[tuple[str, str]] = []

    def hook(parent: nn.Module, name: str, child: nn.Module) -> None:
        seen.append((name, type(child).__name__))

    model = nn.Sequential(nn.Conv2d(3, 3, 1), _StyledBlock())
    args = (2,) if convert is stylenorm.to_conditional else ()
    handle = nn.modules.module.register_module_module_registration_hook(hook)
    try:
        converted = convert(model, *args)
    finally:
        handle.remove()
    new = converted[1].norm
    assert type(new).__module__.startswith("stylenorm")
    assert ("norm", type(new).__name__) in seen


def test_conversions_name_a_non_module():
    for fn in (to_stylenorm, to_torch, stylenorm.style_parameters):
        with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
            fn("model")  # type: ignore[arg-type]


def test_legacy_checkpoint_of_a_shared_instance_norm():
    norm = nn.InstanceNorm2d(3, affine=True)
    model = nn.Sequential(norm, nn.ReLU(), norm)
    stale = {f"{i}.{s}": torch.zeros(3) for i in (0, 2) for s in ("running_mean", "running_var")}
    result = stylenorm.load_legacy_state_dict(model, dict(model.state_dict(), **stale))
    assert sorted(result.dropped_keys) == sorted(stale)
