"""The coded step without a Trainer: one forward per partition, the encoding weights applied exactly."""

import contextlib

import pytest
import torch
import torch.utils.checkpoint

from lightning_draco.codes import CyclicRepetitionCode, FractionalRepetitionCode
from lightning_draco.data import PartitionBatch
from lightning_draco.strategy.coded_step import CodedStep, UnsupportedStepError, uses_reentrant_checkpoint


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


@pytest.mark.parametrize("p", [10, 15])
def test_a_float16_coded_gradient_near_the_top_of_the_range_does_not_overflow_on_the_way(p):
    """Horner's rule rescales the running sum by ``w_before / w_next``: in the partitions' own order those reach 2.9
    (P = 10) and 1.96 (P = 15), and a float16 gradient with entries of 3e4 (of 65504) overflowed on one rank
    alone, honest, whose row the cyclic code then took for a lie. In increasing |w| no rescaling exceeds 1."""
    code = CyclicRepetitionCode(p, 1)
    for rank in range(p):
        step = CodedStep(code, rank, seed=3, device=torch.device("cpu"))
        weight = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
        batch = PartitionBatch(batches=list(range(len(step.weights))), partitions=code.partitions(rank), epoch=0,
                               index=0)
        # Partition j's gradient: 3e4 / (1 + j) in every entry, the largest a finite row still holds here.
        forward = lambda j: (weight * (3e4 / (1 + j))).sum()  # noqa: E731
        loss = step.weighted_step(batch, forward, [weight], no_sync=contextlib.nullcontext)
        step.add_side_gradients()
        loss.backward()
        assert bool(torch.isfinite(weight.grad).all()), f"rank {rank}: the coded gradient overflowed on the way"
        sent = (weight.grad.float() * step.scale)
        expected = sum(w * 3e4 / (1 + j) for j, w in enumerate(step.weights))
        torch.testing.assert_close(sent, torch.full_like(sent, expected), rtol=5e-3, atol=0.0)


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


def test_reentrant_checkpoints_are_found_in_the_graph_and_nothing_else_is():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4, requires_grad=True)
    checkpoint = torch.utils.checkpoint
    assert uses_reentrant_checkpoint(checkpoint.checkpoint(net, x, use_reentrant=True).sum())
    assert uses_reentrant_checkpoint(checkpoint.checkpoint_sequential(net, 2, x, use_reentrant=True).sum() + net(x).sum())
    assert not uses_reentrant_checkpoint(checkpoint.checkpoint(net, x, use_reentrant=False).sum())
    assert not uses_reentrant_checkpoint(net(x).sum())


def _norm_model(momentum):
    torch.manual_seed(0)
    if momentum == "instance":  # InstanceNorm tracking running statistics moves them too
        norm = torch.nn.InstanceNorm1d(1, track_running_stats=True)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Unflatten(1, (1, 3)), norm, torch.nn.Flatten(),
                                   torch.nn.Linear(3, 1)).double()
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3, momentum=momentum), torch.nn.Linear(3, 1)).double()


@pytest.mark.parametrize("momentum", [0.1, None, "instance"])
@pytest.mark.parametrize("code, rank", [(FractionalRepetitionCode(6, 1), 4), (CyclicRepetitionCode(5, 1), 2)])
def test_batchnorm_running_statistics_move_once_per_step_with_the_ranks_own_partition(code, rank, momentum):
    """As under DDP, where rank i's forward sees partition i alone: the running statistics are those of
    one forward on partition ``rank``, the batch count moves by one, and the coded gradient is the same
    bits as when every forward updates them (a holder that updates and one that does not agree)."""
    batch = _batch(code.partitions(rank))
    own = batch.partitions.index(rank)
    at = 2 if momentum == "instance" else 1  # the norm layer's index in the model
    sent = {}
    for keep in (True, False):
        model = _norm_model(momentum)
        model.train()
        step = CodedStep(code, rank, seed=3, device=torch.device("cpu"), module=model if keep else None)
        forward = lambda x: model(x).square().mean()  # noqa: E731
        model.zero_grad()
        if step.summed:
            loss = step.summed_step(batch, forward)
        else:
            loss = step.weighted_step(batch, forward, list(model.parameters()), no_sync=contextlib.nullcontext)
            step.add_side_gradients()
        loss.backward()
        sent[keep] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if keep:
            moved = model[at]
    assert torch.equal(sent[True], sent[False])
    alone = _norm_model(momentum).train()
    alone(batch.batches[own])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(moved, name), getattr(alone[at], name)), name
    assert not torch.equal(moved.running_mean, _norm_model(momentum)[at].running_mean), "they did move once"
    assert moved.momentum == (0.1 if momentum == "instance" else momentum)


def test_two_parameters_that_autograd_hands_one_gradient_each_get_the_weighted_sum():
    """``f(a + b)``: autograd returns one tensor as both gradients; the cyclic code's side buffer, which
    scales and adds in place, must not scale it twice nor make ``a.grad is b.grad``."""
    code, rank = CyclicRepetitionCode(5, 1), 2
    a, b = (torch.nn.Parameter(torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)))
            for i in range(2))
    forward = lambda x: (x @ (a + b)).square().mean()  # noqa: E731
    step = CodedStep(code, rank, seed=3, device=torch.device("cpu"))
    batch = _batch(code.partitions(rank))
    loss = step.weighted_step(batch, forward, [a, b], no_sync=contextlib.nullcontext)
    step.add_side_gradients()
    loss.backward()
    assert a.grad is not b.grad
    expected = 0
    for j, w in enumerate(step.weights):
        if w:
            expected = expected + w * torch.autograd.grad(forward(batch.batches[j]), a)[0]
    torch.testing.assert_close(a.grad * step.scale, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


@pytest.mark.parametrize("code, rank", [(FractionalRepetitionCode(3, 1), 0), (CyclicRepetitionCode(5, 1), 2)])
def test_a_parameter_reached_only_through_a_sum_trains(code, rank):
    """``loss + 0 * p.sum()`` (a common way to give an unused parameter a gradient) makes autograd hand
    back an expanded gradient, every element one memory location; the weighted step must not write into it."""
    model = _model()
    spare = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    params = list(model.parameters()) + [spare]
    step = CodedStep(code, rank, seed=3, device=torch.device("cpu"))
    forward = lambda x: model(x).square().mean() + 0.0 * spare.sum()  # noqa: E731
    batch = _batch(code.partitions(rank))
    if step.summed:
        loss = step.summed_step(batch, forward)
    else:
        loss = step.weighted_step(batch, forward, params, no_sync=contextlib.nullcontext)
        step.add_side_gradients()
    loss.backward()
    assert torch.equal(spare.grad, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("code, rank", [(FractionalRepetitionCode(3, 1), 0), (CyclicRepetitionCode(5, 1), 2)])
def test_the_output_is_the_first_partitions_whose_batch_the_hooks_get(code, rank):
    """``on_train_batch_end(outputs, batch)`` receives the first partition's batch: the rest of the output
    (predictions for a training metric) must come from that partition's forward, not the last one's. The
    loss's value stays the mean partition loss, its gradient the coded one."""
    model = _model()
    step = CodedStep(code, rank, seed=3, device=torch.device("cpu"))
    batch = _batch(code.partitions(rank))

    def forward(x):
        loss = model(x).square().mean()
        return {"loss": loss, "inputs": x, "value": loss.detach()}

    if step.summed:
        output = step.summed_step(batch, forward)
    else:
        output = step.weighted_step(batch, forward, list(model.parameters()), no_sync=contextlib.nullcontext)
    assert output["inputs"] is batch.batches[0]
    alone = CodedStep(code, rank, seed=3, device=torch.device("cpu"))  # each partition's loss under its seeds
    values = [alone.summed_step(PartitionBatch([x], [p], 0, 0), lambda x: model(x).square().mean()).detach()
              for x, p in zip(batch.batches, batch.partitions)]
    torch.testing.assert_close(output["loss"].detach(), torch.stack(values).mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output["value"], values[0], rtol=1e-12, atol=1e-12)


def test_a_collective_inside_training_step_is_warned_about_once_and_refused_where_helpers_recompute():
    """Inside a partition's forward a collective meets other partitions' calls on other ranks and is
    never decoded: a warning, once per collective. Where other ranks recompute partitions (reactive
    mode) a helper's call would wait for ranks that never join it: refused, naming the collective."""
    model = _model()
    step = CodedStep(FractionalRepetitionCode(3, 1), 0, seed=0, device=torch.device("cpu"))
    called = []

    def forward(x):
        step.collective("all_gather")
        called.append(step.running)
        return model(x).square().mean()

    step.collective("reduce")  # between forwards (Lightning syncing logged values): nothing to say
    with pytest.warns(UserWarning, match=r"training_step calls the strategy's all_gather .* not decoded") as seen:
        step.summed_step(_batch([0, 1, 2]), forward)
        step.summed_step(_batch([0, 1, 2]), forward)
    assert len(seen) == 1 and called == [0, 1, 2] * 2 and step.running is None
    step.recomputed = True
    with pytest.raises(UnsupportedStepError, match=r"called the strategy's all_gather \(in partition 0's forward\)"
                       r".*redundancy_mode='reactive' cannot run"):
        step.summed_step(_batch([0, 1, 2]), forward)
    assert step.running is None


def test_lightning_syncing_a_value_logged_as_it_is_is_not_taken_for_the_steps_collective():
    """``self.log`` of a value the partitions' logging cannot combine (a NumPy number, options by position) goes
    to Lightning at once, which with ``sync_dist=True`` reduces it across the ranks there: Lightning's
    collective, not the step's, so reactive mode must not refuse it."""
    import numpy

    from lightning_draco.partition_logging import combined_over_partitions

    step = CodedStep(FractionalRepetitionCode(3, 1), 0, seed=0, device=torch.device("cpu"))
    step.recomputed = True
    model = _model()

    class Module:
        logged = []

        def log(self, name, value, *args, **kwargs):  # what Lightning's does with sync_dist=True, on step
            step.collective("reduce")
            self.logged.append((name, float(value)))

    module = Module()

    def forward(x):
        module.log("scale", numpy.float32(2.0), sync_dist=True)
        return model(x).square().mean()

    with combined_over_partitions(module, step.outside_forward):
        step.summed_step(_batch([0, 1, 2]), forward)
    assert module.logged == [("scale", 2.0)] * 3
