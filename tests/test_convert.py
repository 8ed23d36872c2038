"""Model conversion between torch.nn and stylenorm norms."""

from __future__ import annotations

import copy

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


def test_bias_false_and_dtype_kept():
    model = nn.Sequential(nn.BatchNorm2d(3, bias=False, dtype=torch.float64))
    converted = to_stylenorm(model)
    assert converted[0].bias is None and converted[0].weight.dtype == torch.float64
    assert "bias=False" in repr(converted[0])
