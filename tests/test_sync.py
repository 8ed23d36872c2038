"""stylenorm.SyncBatchNorm over 2 and 3 CPU processes (gloo, file store) against one process
running stylenorm/torch BatchNorm on the concatenated batch."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import stylenorm

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}"
    )


def _global_batch(sizes: list[int], channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(sum(sizes), 4, 5, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, g


def _worker(rank: int, world: int, store_path: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        _check_layer(rank, sizes, momentum=0.1, channels_last=False)
        _check_layer(rank, sizes, momentum=None, channels_last=True)
        _check_ddp(rank, world, sizes)
        # Every rank done before any closes its connections: gloo aborted a rank now and then
        # ("terminate called without an active exception") when a peer tore down first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_layer(rank: int, sizes: list[int], momentum: float | None, channels_last: bool) -> None:
    x, g = _global_batch(sizes, channels_last)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    reference = torch.nn.BatchNorm2d(4, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    ours = stylenorm.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    assert isinstance(ours, stylenorm.SyncBatchNorm)
    for step in range(3):
        xs = (x * (1 + step)).requires_grad_()
        ref_out = reference(xs)
        ref_gx, ref_gw, ref_gb = torch.autograd.grad(
            ref_out, (xs, reference.weight, reference.bias), g
        )
        xl = (x[local] * (1 + step)).detach().requires_grad_()
        out = ours(xl)
        gx, gw, gb = torch.autograd.grad(out, (xl, ours.weight, ours.bias), g[local])
        _close(out, ref_out[local], f"rank {rank} step {step} output")
        _close(gx, ref_gx[local], f"rank {rank} step {step} input grad")
        # Parameter gradients are per-rank sums, as for torch's SyncBatchNorm (DDP averages).
        totals = torch.stack([gw, gb])
        dist.all_reduce(totals)
        _close(totals[0], ref_gw, "weight grad summed over ranks")
        _close(totals[1], ref_gb, "bias grad summed over ranks")
        assert ours.running_mean is not None and ours.running_var is not None
        _close(ours.running_mean, reference.running_mean, "running_mean")
        _close(ours.running_var, reference.running_var, "running_var")
        assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked)
    ours.eval()
    reference.eval()
    _close(ours(x[local]), reference(x)[local], "eval output")


def _check_ddp(rank: int, world: int, sizes: list[int]) -> None:
    torch.manual_seed(1)
    reference = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)
    ).double()
    model = stylenorm.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    ddp = DistributedDataParallel(model)
    x, _ = _global_batch(sizes, channels_last=False)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(x.shape[0], 2, 5, 6, generator=gen, dtype=torch.float64)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    (reference(x) * g).sum().backward()
    (ddp(x[local]) * g[local]).sum().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert p.grad is not None and p_ref.grad is not None
        # DDP averages over ranks the per-rank gradients of the global loss's pieces.
        _close(p.grad * world, p_ref.grad, f"DDP grad of {name}")
    bn = model[1]
    _close(bn.running_mean, reference[1].running_mean, "DDP running_mean")
    _close(bn.running_var, reference[1].running_var, "DDP running_var")


@pytest.mark.parametrize("sizes", [[2, 3], [3, 0, 2]], ids=["2-ranks", "3-ranks-one-empty"])
def test_sync_batch_norm_matches_single_process(sizes: list[int]):
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_worker, args=(len(sizes), store, sizes), nprocs=len(sizes), join=True)


def test_without_process_group_is_batch_norm():
    layer = stylenorm.SyncBatchNorm(3)
    twin = stylenorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), twin(x))
    torch.testing.assert_close(layer.running_var, twin.running_var)
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("training", [True, False])
def test_errors_without_process_group_are_torch_nn_s(training: bool):
    for channels, x in ((0, torch.randn(2, 0, 4)), (3, torch.randn(3))):
        with pytest.raises(ValueError) as ours:
            stylenorm.SyncBatchNorm(channels).train(training)(x)
        with pytest.raises(ValueError) as theirs:
            nn.SyncBatchNorm(channels).train(training)(x)
        assert str(ours.value) == str(theirs.value)


def test_convert_keeps_parameters_and_mode():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), stylenorm.BatchNorm2d(4), nn.BatchNorm1d(2))
    net[1].eval()
    converted = stylenorm.SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(converted[1], stylenorm.SyncBatchNorm)
    assert isinstance(converted[2], stylenorm.SyncBatchNorm)
    assert converted[1].weight is net[1].weight
    assert not converted[1].training
    assert set(converted.state_dict()) == set(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(2)).state_dict()
    )


def test_channel_mismatch_when_synchronising(monkeypatch: pytest.MonkeyPatch):
    """Input with the wrong channel count gets the error of the single-process path, before
    any collective and before any buffer moves (it was broadcast from 1 channel, or failed
    after num_batches_tracked had counted the step). The check precedes every collective, so
    a process group of two is simulated (no peer is needed to reach it)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for affine, track in ((True, True), (True, False), (False, True)):
        layer = stylenorm.SyncBatchNorm(4, affine=affine, track_running_stats=track)
        state = copy.deepcopy(layer.state_dict())
        for channels in (1, 3):
            with pytest.raises(RuntimeError, match=r"should contain [13] elements") as ours:
                layer(torch.randn(3, channels, 3, 3))
            with pytest.raises(RuntimeError) as theirs:
                stylenorm.BatchNorm2d(4, affine=affine, track_running_stats=track)(
                    torch.randn(3, channels, 3, 3)
                )
            assert str(ours.value) == str(theirs.value)
        for key, value in layer.state_dict().items():
            assert torch.equal(value, state[key]), key
