"""The coded step without a Trainer: one forward per partition, the encoding weights applied exactly."""

import contextlib

import pytest
import torch

from lightning_draco.codes import CyclicRepetitionCode, FractionalRepetitionCode
from lightning_draco.data import PartitionBatch
from lightning_draco.strategy.coded_step import CodedStep


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1)).double()


def _batch(partitions):
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in partitions]
    return PartitionBatch(batches=parts, partitions=list(partitions), epoch=0, index=0)


def _gradient(model, step, batch, part):
    """The gradient of one partition's loss alone, under that partition's seeds, as a flat vector."""
    model.zero_grad()
    one = PartitionBatch(batches=[batch.batches[part]], partitions=[batch.partitions[part]], epoch=0, index=0)
    loss = CodedStep(FractionalRepetitionCode(1, 0), 0, step.seed, torch.device("cpu")).summed_step(
        one, lambda x: model(x).square().mean()
    )
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("code, rank", [(FractionalRepetitionCode(6, 1), 4), (CyclicRepetitionCode(5, 1), 2)])
def test_the_gradient_that_leaves_is_the_weighted_sum_of_the_partition_gradients(code, rank):
    model = _model()
    step = CodedStep(code, rank, seed=3, device=torch.device("cpu"))
    batch = _batch(code.partitions(rank))
    forward = lambda x: model(x).square().mean()  # noqa: E731
    model.zero_grad()
    if step.summed:
        loss = step.summed_step(batch, forward)
    else:
        params = list(model.parameters())
        loss = step.weighted_step(batch, forward, params, no_sync=contextlib.nullcontext)
        step.add_side_gradients()
    loss.backward()
    sent = torch.cat([p.grad.flatten() for p in model.parameters()]) * step.scale
    expected = sum(w * _gradient(model, step, batch, j) for j, w in enumerate(step.weights))
    torch.testing.assert_close(sent, expected, rtol=1e-12, atol=1e-12)


def test_a_partition_that_returns_no_loss_is_named():
    step = CodedStep(FractionalRepetitionCode(3, 1), 0, seed=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"returned None for partition 1"):
        step.summed_step(_batch([1]), lambda x: None)


def test_holders_of_a_partition_draw_the_same_dropout_masks():
    code = FractionalRepetitionCode(3, 1)
    masks = []
    for rank in range(3):
        torch.manual_seed(100 + rank)  # each rank's own stream differs before the step
        step = CodedStep(code, rank, seed=5, device=torch.device("cpu"))
        step.summed_step(_batch([0, 1, 2]), lambda x: masks.append(torch.nn.functional.dropout(x, 0.5)) or x.sum())
    assert all(torch.equal(masks[i], masks[i % 3]) for i in range(9))


class _Counting(torch.nn.Module):
    """A training forward that reads and moves its buffers (as spectral normalisation's power iteration
    does), before a BatchNorm whose running statistics move at every forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))
        self.linear = torch.nn.Linear(4, 3).double()
        self.norm = torch.nn.BatchNorm1d(3).double()

    def forward(self, x):
        self.seen.data += 1.0
        return self.norm(self.linear(x) * self.seen)


def _holder(code, rank):
    torch.manual_seed(0)
    model = _Counting()
    step = CodedStep(code, rank, seed=3, device=torch.device("cpu"))
    step.begin_step(list(model.buffers()))
    return model, step


def _data(partitions):
    """Each partition's batch, the same whichever rank holds it."""
    parts = [torch.randn(5, 4, generator=torch.Generator().manual_seed(p), dtype=torch.float64) for p in partitions]
    return PartitionBatch(batches=parts, partitions=list(partitions), epoch=0, index=0)


def _run(code, rank):
    """One step on ``rank``: each partition's output, and the buffers the step ends with."""
    model, step = _holder(code, rank)
    outputs = {}

    def forward(part):
        out = model(part)
        outputs[len(outputs)] = out.detach().clone()
        return out.square().mean()

    batch = _data(code.partitions(rank))
    if step.summed:
        loss = step.summed_step(batch, forward)
    else:
        loss = step.weighted_step(batch, forward, list(model.parameters()), no_sync=contextlib.nullcontext)
        step.add_side_gradients()
    loss.backward()  # the graphs still hold, after the buffers were reset between forwards
    by_partition = {p: outputs[i] for i, p in enumerate(batch.partitions)}
    return by_partition, {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("code", [FractionalRepetitionCode(6, 1), CyclicRepetitionCode(5, 1)], ids=["frc", "crc"])
def test_every_holder_computes_a_partition_from_the_buffers_the_step_began_with(code):
    # The cyclic code's ranks 1 and 2 both hold partitions 2 and 3, at different places in their order.
    first, second = (0, 1) if isinstance(code, FractionalRepetitionCode) else (1, 2)
    seen_first, _ = _run(code, first)
    seen_second, _ = _run(code, second)
    shared = seen_first.keys() & seen_second.keys()
    assert len(shared) >= 2
    for partition in shared:
        assert torch.equal(seen_first[partition], seen_second[partition]), partition


@pytest.mark.parametrize("code", [FractionalRepetitionCode(6, 1), CyclicRepetitionCode(5, 1)], ids=["frc", "crc"])
def test_the_step_keeps_the_buffers_of_the_ranks_own_partition_only(code):
    rank = 1
    _, ended = _run(code, rank)
    # What one forward on partition ``rank`` alone leaves, as DDP's rank ``rank`` would have them.
    model, step = _holder(code, rank)
    batch = _data(code.partitions(rank))
    own = batch.partitions.index(rank)
    one = PartitionBatch(batches=[batch.batches[own]], partitions=[rank], epoch=0, index=0)
    step.summed_step(one, lambda x: model(x).square().mean())
    assert ended["seen"] == 1.0 and ended["norm.num_batches_tracked"] == 1
    for name, value in model.named_buffers():
        torch.testing.assert_close(ended[name], value, rtol=0, atol=0)


def test_a_helper_recomputing_another_group_leaves_the_buffers_as_the_step_began():
    code = FractionalRepetitionCode(6, 1)
    model, step = _holder(code, 4)
    before = {name: b.clone() for name, b in model.named_buffers()}
    step.summed_step(_data(code.partitions(0)), lambda x: model(x).square().mean())  # holds none of 0, 1, 2
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name
