"""Attacks and the adversary simulation, single-process."""

import math

import pytest
import torch

from lightning_draco import Adversary
from lightning_draco.attacks import ATTACKS, get_attack

BUILT_IN = ["reverse", "constant", "gaussian", "sign_flip", "bit_flip", "nan", "inf", "collude"]


def test_every_built_in_attack_is_registered():
    assert set(BUILT_IN) <= set(ATTACKS)


@pytest.mark.parametrize("name", BUILT_IN)
def test_attack_changes_the_vector_and_leaves_the_honest_one_alone(name):
    honest = torch.randn(257)
    before = honest.clone()
    adversary = Adversary(ranks=[1], attack=name, seed=5)
    sent = adversary.corrupt(honest, rank=1, step=3, bucket=0)
    assert torch.equal(honest, before)
    assert sent.shape == honest.shape and sent.dtype == honest.dtype
    assert not torch.equal(sent.view(torch.int32), honest.view(torch.int32))
    again = adversary.corrupt(honest, rank=1, step=3, bucket=0)
    assert torch.equal(sent.view(torch.int32), again.view(torch.int32)), "attacks are reproducible from the seed"


def test_attack_values():
    g = torch.tensor([1.0, -2.0])
    assert torch.equal(get_attack("reverse")(g), torch.tensor([-100.0, 200.0]))
    assert torch.equal(get_attack("constant")(g), torch.tensor([-100.0, -100.0]))
    assert torch.equal(get_attack("sign_flip")(g), -g)
    assert math.isnan(float(get_attack("nan")(g)[0])) and math.isinf(float(get_attack("inf")(g)[1]))


def test_bit_flip_changes_exactly_the_flipped_bits():
    honest = torch.randn(1000)
    sent = Adversary(ranks=[1], attack="bit_flip", num_flips=3).corrupt(honest, rank=1, step=0, bucket=0)
    xor = honest.view(torch.int32) ^ sent.view(torch.int32)
    flipped = sum(bin(int(v) & 0xFFFFFFFF).count("1") for v in xor[xor != 0])
    assert 1 <= flipped <= 3


def test_colluders_send_the_same_vector():
    honest = torch.randn(64)
    adversary = Adversary(ranks=[1, 2], attack="collude")
    a = adversary.corrupt(honest, rank=1, step=7, bucket=2)
    b = adversary.corrupt(honest, rank=2, step=7, bucket=2)
    assert torch.equal(a, b) and not torch.equal(a, honest)


def test_user_attack_gets_the_context_it_asks_for():
    seen = {}

    def my_attack(honest, *, step, rank):
        seen.update(step=step, rank=rank)
        return honest + 1

    sent = Adversary(ranks=[2], attack=my_attack).corrupt(torch.zeros(3), rank=2, step=9, bucket=1)
    assert torch.equal(sent, torch.ones(3)) and seen == {"step": 9, "rank": 2}


def test_random_ranks_are_fresh_reproducible_and_never_the_ps():
    adversary = Adversary(ranks="random", seed=11)
    picks = [adversary.faulty_ranks(step, 7, ps_rank=0, num_adversaries=2) for step in range(50)]
    assert all(len(p) == 2 and 0 not in p for p in picks)
    assert len(set(picks)) > 5
    assert picks == [adversary.faulty_ranks(step, 7, 0, 2) for step in range(50)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ranks="some"), 'adversary ranks must be a list of ranks or "random"'),
        (dict(ranks=[-1]), "adversary ranks must be non-negative integers"),
        (dict(ranks=[1, 1]), "adversary ranks must be distinct"),
        (dict(attack="melt"), "attack must be one of"),
    ],
)
def test_bad_adversaries_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adversary(**kwargs)


def test_attack_returning_wrong_shape_is_an_error():
    adversary = Adversary(ranks=[1], attack=lambda honest: honest[:1])
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        adversary.corrupt(torch.zeros(4), rank=1, step=0, bucket=0)
