"""Buffers a training forward moves and reads (spectral normalisation, an EMA normaliser, QAT observers):
every holder of a partition computes its gradient from the same buffers, whatever it ran before, and a
rank keeps what its own partition's forward left, as DDP's rank would."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from lightning_draco.codes import CyclicRepetitionCode, FractionalRepetitionCode
from lightning_draco.codes.reactive import ReactiveRepetitionCode
from lightning_draco.data import PartitionBatch
from lightning_draco.strategy.coded_step import CodedStep, UnsupportedStepError
from lightning_draco.strategy.escalation import Escalation

SEED = 3


class EMANorm(nn.Module):
    """Standardises by an EMA of the batch mean, kept in a buffer it updates before reading."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(3, 1)
        self.register_buffer("mu", torch.zeros(4))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mu.mul_(0.5).add_(0.5 * x.mean(0))
        return self.l2(torch.tanh(self.l1(x - self.mu)))


class SavedScale(nn.Module):
    """Multiplies by a buffer (saved for the backward), then replaces the buffer by a data-moved one."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(3, 1)
        self.register_buffer("s", torch.ones(3))

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        out = self.l2(h * self.s)
        if self.training:
            self.s = 0.5 * self.s + 0.5 * h.detach().abs().mean(0)
        return out


def _model(kind):
    torch.manual_seed(0)
    if kind == "sn":
        model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 1))
    elif kind == "ema":
        model = EMANorm()
    elif kind == "saved":
        model = SavedScale()
    else:  # eager quantization-aware training: observers resize their buffers at the first forward
        import torch.ao.quantization as tq

        model = nn.Sequential(tq.QuantStub(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1), tq.DeQuantStub())
        model.qconfig = tq.get_default_qat_qconfig("fbgemm")
        return tq.prepare_qat(model.train()).train()
    return model.double().train()


def _dtype(kind):
    return torch.float32 if kind == "qat" else torch.float64


def _batch(partitions, kind, index=0):
    gen = torch.Generator().manual_seed(1 + index)
    return PartitionBatch(
        batches=[torch.randn(5, 4, generator=gen, dtype=_dtype(kind)) for _ in partitions],
        partitions=list(partitions), epoch=0, index=index,
    )


def _loss(model):
    return lambda x: model(x).square().mean()


def _alone(model, batch, position):
    """Partition ``position``'s gradient on ``model`` as DDP's rank of that partition computes it (its
    forward alone, under its seeds), and the model after that forward."""
    model.zero_grad()
    one = PartitionBatch([batch.batches[position]], [batch.partitions[position]], batch.epoch, batch.index)
    CodedStep(FractionalRepetitionCode(1, 0), 0, SEED, torch.device("cpu")).summed_step(one, _loss(model)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), model


def _sent(step, model, batch):
    """The coded gradient rank ``step.rank`` sends for ``batch`` (times its last weight, as ``encoded`` applies)."""
    model.zero_grad()
    if step.summed:
        loss = step.summed_step(batch, _loss(model))
    else:
        loss = step.weighted_step(batch, _loss(model), list(model.parameters()), no_sync=contextlib.nullcontext)
        step.add_side_gradients()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]) * step.scale


def _assert_buffers_equal(model, expected):
    for (name, mine), (_, theirs) in zip(model.named_buffers(), expected.named_buffers()):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs), name


def _tolerance(kind):
    return dict(rtol=1e-5, atol=1e-6) if kind == "qat" else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max")
@pytest.mark.parametrize("kind", ["sn", "ema", "saved", "qat"])
@pytest.mark.parametrize("code, rank", [(FractionalRepetitionCode(6, 1), 4), (CyclicRepetitionCode(5, 1), 2)])
def test_every_partition_computes_from_the_steps_buffers_and_the_rank_keeps_its_own(code, rank, kind):
    """Under the cyclic code each rank runs its partitions in another order, so a partition computed from
    buffers an earlier forward moved differs between its holders (honest ranks outvote the PS)."""
    start = _model(kind)
    model = copy.deepcopy(start)
    step = CodedStep(code, rank, SEED, torch.device("cpu"), module=model)
    batch = _batch(code.partitions(rank), kind)
    sent = _sent(step, model, batch)
    expected = sum(w * _alone(copy.deepcopy(start), batch, j)[0] for j, w in enumerate(step.weights) if w)
    torch.testing.assert_close(sent, expected, **_tolerance(kind))
    # The buffers are what one forward on the rank's own partition leaves, as DDP's rank ``rank`` has them.
    _, ddp_rank = _alone(copy.deepcopy(start), batch, batch.partitions.index(rank))
    _assert_buffers_equal(model, ddp_rank)
    assert any(not torch.equal(a, b) for a, b in zip(model.buffers(), start.buffers())), "the buffers moved"


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max")
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("kind", ["ema", "qat"])
def test_micro_batches_carry_each_partitions_buffers_until_the_ps_copies_its_own(kind, broadcast):
    """Between the PS's copies (gradient accumulation, or ``broadcast_buffers=False``) partition j starts
    from what its forward left before, as DDP's rank j's buffers are: the same on every holder of j."""
    code, rank = CyclicRepetitionCode(5, 1), 2
    start = _model(kind)
    model = copy.deepcopy(start)
    # Without a trainer to read it from, the PS's buffers are taken to be copied after each step.
    options = {} if broadcast else {"broadcast_buffers": False}
    step = CodedStep(code, rank, SEED, torch.device("cpu"), module=model, **options)
    partitions = code.partitions(rank)
    ranks = {j: copy.deepcopy(start) for j in partitions}  # DDP's rank j, one per partition held
    for index in range(3):
        if index == 2 and broadcast:  # an optimizer step, after which the PS's buffers reach every rank
            step.buffers_copied()  # (here this rank's own)
            ranks = {j: copy.deepcopy(ranks[rank]) for j in partitions}
        batch = _batch(partitions, kind, index)
        sent = _sent(step, model, batch)
        expected = 0
        for position, (j, w) in enumerate(zip(partitions, step.weights)):
            gradient, ranks[j] = _alone(ranks[j], batch, position)
            expected = expected + w * gradient
        torch.testing.assert_close(sent, expected, **_tolerance(kind))
        _assert_buffers_equal(model, ranks[rank])


@pytest.mark.parametrize("kind", ["sn", "ema"])
def test_a_helper_recomputes_a_group_from_the_steps_buffers_and_keeps_its_own(kind):
    """Reactive mode: a helper recomputes another group's partitions after its own step's forwards."""
    code = ReactiveRepetitionCode(6, 1)
    rank, group = 0, [p for p in range(6) if p not in code.partitions(0)][:2]
    start = _model(kind)
    model = copy.deepcopy(start)
    step = CodedStep(code, rank, SEED, torch.device("cpu"), module=model)
    escalation = Escalation(code, step)
    _sent(step, model, _batch(code.partitions(rank), kind))
    own = copy.deepcopy(model)
    batch = _batch(group, kind, index=0)
    params = list(model.parameters())
    grads = escalation._group_gradient(batch, _loss(model), model, params, lambda loss: loss)
    recomputed = torch.cat([grads[id(p)].flatten() for p in params])
    expected = sum(_alone(copy.deepcopy(start), batch, j)[0] for j in range(len(group)))
    torch.testing.assert_close(recomputed, expected, rtol=1e-12, atol=1e-12)
    _assert_buffers_equal(model, own)


def test_reactive_without_the_ps_buffers_refuses_a_forward_that_moves_other_buffers():
    code = ReactiveRepetitionCode(6, 1)
    model = _model("ema")
    step = CodedStep(code, 0, SEED, torch.device("cpu"), module=model, broadcast_buffers=False)
    Escalation(code, step)
    with pytest.raises(UnsupportedStepError, match=r"broadcast_buffers=False.*\['mu'\]"):
        _sent(step, model, _batch(code.partitions(0), "ema"))
    # BatchNorm's running statistics are never read by a training forward: nothing to refuse.
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double().train()
    step = CodedStep(code, 0, SEED, torch.device("cpu"), module=bn, broadcast_buffers=False)
    Escalation(code, step)
    _sent(step, bn, _batch(code.partitions(0), "ema"))
