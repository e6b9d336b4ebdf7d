"""Scoped RNG seeding (``seeded_rng``): what replicas of a partition rely on to draw the same masks."""

import random
import traceback

import numpy
import pytest
import torch

from lightning_draco._seeding import derive_seed, seeded_rng


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), float(numpy.random.rand())


def test_the_block_draws_from_the_seed_whatever_came_before():
    torch.manual_seed(1)
    with seeded_rng(123):
        first = draws()
    torch.rand(7), random.random(), numpy.random.rand()  # the process's streams move on
    with seeded_rng(123):
        again = draws()
    assert first == again
    assert first[0] == torch.rand(4, generator=torch.Generator().manual_seed(123)).tolist()


def test_the_process_streams_continue_as_if_the_block_had_not_run():
    def around(block) -> tuple:
        torch.manual_seed(7), random.seed(7), numpy.random.seed(7)
        before = draws()
        block()
        return before, draws()

    def seeded():
        with seeded_rng(99):
            draws()

    assert around(seeded) == around(lambda: None)


def test_seeding_a_block_formats_no_stack_trace(monkeypatch):
    # torch.manual_seed queues a seed for every accelerator not yet initialised, with the caller's
    # formatted stack: milliseconds under Lightning, several times per partition per step.
    def refuse(*args, **kwargs):
        raise AssertionError("seeded_rng formatted a stack trace")

    monkeypatch.setattr(traceback, "format_stack", refuse)
    with seeded_rng(derive_seed(1, 2, 3)):
        torch.rand(1)
    with seeded_rng(5, torch.device("cpu")):
        torch.rand(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")
def test_on_cuda_the_device_draws_from_the_seed_and_is_restored():
    device = torch.device("cuda", 0)
    torch.cuda.manual_seed(3)
    state = torch.cuda.get_rng_state(device)
    with seeded_rng(11, device):
        inside = torch.rand(4, device=device)
    with seeded_rng(11, device):
        again = torch.rand(4, device=device)
    assert torch.equal(inside, again)
    assert torch.equal(torch.cuda.get_rng_state(device), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")
def test_on_cuda_a_block_without_a_device_seeds_and_restores_the_current_device():
    torch.cuda.init()
    state = torch.cuda.get_rng_state()
    with seeded_rng(11):
        inside = torch.rand(4, device="cuda")
    with seeded_rng(11):
        again = torch.rand(4, device="cuda")
    assert torch.equal(inside, again) and torch.equal(torch.cuda.get_rng_state(), state)
