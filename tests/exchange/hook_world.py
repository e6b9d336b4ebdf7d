"""Runs the exchange hooks on hand-made buckets in a small gloo world: no DDP, no Lightning.

Started by tests/exchange/test_hooks.py as ``python hook_world.py <out-dir> <world-size>``, which
forks the other ranks (``tests/forked_ranks.py``); each rank writes what it saw to ``<out-dir>/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_draco import Adversary
from lightning_draco.aggregators import make_aggregator
from lightning_draco.aggregators.coded import AggregatedCode
from lightning_draco.codes import FractionalRepetitionCode, Uncoded
from lightning_draco.exchange import (
    ExchangeSetup,
    ExchangeState,
    WholeStepAssembly,
    adversarial,
    overlapped,
    ps_hook,
    reactive_ps_hook,
    reactive_sharded_hook,
    settle,
    sharded_hook,
    whole_step_hook,
)
from lightning_draco.strategy.coded_step import CodedStep, encoded

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from forked_ranks import fork_ranks, run_ranks  # noqa: E402


class Bucket:
    """What the hooks use of DDP's ``GradBucket``."""

    def __init__(self, buffer, index=0, last=True, parameters=()):
        self._buffer, self._index, self._last, self._parameters = buffer, index, last, list(parameters)

    def buffer(self):
        return self._buffer

    def set_buffer(self, buffer):
        self._buffer = buffer

    def index(self):
        return self._index

    def is_last(self):
        return self._last

    def parameters(self):
        return self._parameters


def honest_gradient(rank: int, code, d: int) -> torch.Tensor:
    """Rank ``rank``'s coded vector from partition gradients every rank can draw."""
    grads = torch.randn(code.num_partitions, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return code.encode(grads)[rank].clone(), grads.sum(0) / code.num_workers


def low_bit_in_bucket_1(honest: torch.Tensor, *, bucket: int) -> torch.Tensor:
    """The lowest mantissa bit of one entry flipped, in the second bucket only: no tolerance would see it."""
    lie = honest.clone()
    if bucket == 1:
        lie.view(torch.int32)[0] ^= 1
    return lie


def reactive_runs(rank: int, world: int, device: str = "cpu") -> dict:
    """Reactive exchanges of two buckets (the second bucket's parameters laid out as two tensors):
    per run, each bucket's result, the pending groups, who was caught, the failure, the bytes.
    ``device``: where the buckets live (``cuda``: ranks sharing a GPU over gloo); results come back on the CPU."""
    from lightning_draco.codes.reactive import ReactiveRepetitionCode

    runs = {}
    for name, s, adversary in [
        ("clean", 1, None),
        ("liar", 1, Adversary(ranks=[4], attack="reverse")),
        ("low_bit", 1, Adversary(ranks=[3], attack=low_bit_in_bucket_1)),
        ("two_liars", 1, Adversary(ranks=[2, 3], attack="gaussian")),
        ("s2_clean", 2, None),
        ("s2_liars_also_recompute", 2, Adversary(ranks=[1, 3], attack="reverse")),
        ("sharded_clean", 1, None),
        ("sharded_liar", 1, Adversary(ranks=[4], attack="reverse")),
        ("sharded_gradient", 1, Adversary(ranks=[3], attack="reverse", roles=["gradient"])),
        ("sharded_decoder", 1, Adversary(ranks=[3], attack="gaussian", roles=["decoder"])),
        ("sharded_two_liars", 1, Adversary(ranks=[2, 3], attack="gaussian")),
        ("sharded_s2_liars_also_recompute", 2, Adversary(ranks=[1, 3], attack="reverse")),
    ]:
        code = ReactiveRepetitionCode(world, s, learn_floor=not name.startswith("sharded"))
        exchange = reactive_sharded_hook if name.startswith("sharded") else reactive_ps_hook
        grads = torch.randn(world, 23, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
        group_sums = code.encode(grads).to(device)  # row i: rank i's group's sum, computed as the coded step does
        state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
        state.begin_step(0)
        hook = exchange if adversary is None else adversarial(exchange, adversary)
        params = [torch.zeros(9, device=device), torch.zeros(4, 2, device=device), torch.zeros(6, device=device)]
        results = [
            hook(state, Bucket(group_sums[rank, :9].clone(), 0, False, params[:1])).value().clone(),
            hook(state, Bucket(group_sums[rank, 9:].clone(), 1, True, params[1:])).value().clone(),
        ]
        pending = {index: list(groups) for index, groups in state.outcome.pending.groups.items()}
        asked = []

        def recompute(group, buckets):
            asked.append((group, list(buckets)))
            value = group_sums[code.members(group)[0]]
            return {index: (value[:9] if index == 0 else value[9:]).clone() for index in buckets}

        corrected = settle(state, recompute)
        for index, mean in corrected.items():
            results[index] = mean
        step = state.outcome
        runs[name] = dict(
            result=torch.cat(results).cpu(),
            clean=(code.total([group_sums[g * code.redundancy] for g in range(code.num_groups)]) / world).cpu(),
            pending=pending, asked=asked, caught=sorted(step.caught), failure=str(step.failure or ""),
            sent=state.stats.sent, received=state.stats.received, outvoted=sorted(step.decoders_outvoted),
        )
    return runs


def main(out: str, world: int, rank: int) -> None:
    device = os.environ.get("HOOK_WORLD_DEVICE", "cpu")
    # On a GPU each rank may compile the fused vote (Triton) between collectives: a longer timeout there.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60 if device == "cpu" else 600))
    seen = {}
    if device != "cpu":  # the reactive runs alone, on that device
        seen["reactive"] = reactive_runs(rank, world, device)
        torch.save(seen, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
        return

    # 1. Per-bucket exchange, honest: every rank gets the exact mean; traffic as the formulas say.
    code = FractionalRepetitionCode(world, 1)
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
    state.begin_step(5)
    coded, mean = honest_gradient(rank, code, 10)
    result = ps_hook(state, Bucket(coded)).value()
    seen["honest"] = (result.clone(), mean, sorted(state.outcome.caught), state.outcome.buckets, state.stats.sent, state.stats.received)

    # 2. A liar through the adversarial wrapper: corrected, caught, on every rank.
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
    state.begin_step(0)
    hook = adversarial(ps_hook, Adversary(ranks=[world - 1], attack="reverse"))
    coded, mean = honest_gradient(rank, code, 10)
    seen["liar"] = (hook(state, Bucket(coded)).value().clone(), mean, sorted(state.outcome.caught))

    # 3. Two liars in a group of three: the decode fails on every rank, with the PS's words.
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
    state.begin_step(3)
    hook = adversarial(ps_hook, Adversary(ranks=[1, 2], attack="reverse"))
    coded, _ = honest_gradient(rank, code, 10)
    failed = hook(state, Bucket(coded)).value()
    seen["failure"] = (str(state.outcome.failure), state.outcome.failure.step, bool((failed == 0).all()))

    # 4. The coded step's last weight applied as the bucket leaves.
    coded_step = CodedStep(code, rank, seed=0, device=torch.device("cpu"))
    coded_step.scale = 4.0
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
    state.begin_step(0)
    coded, mean = honest_gradient(rank, code, 10)
    seen["encoded"] = (encoded(ps_hook, coded_step)(state, Bucket(coded / 4.0)).value().clone(), mean)

    # 5. Whole-step exchange: two buckets arriving in the reverse of the model's order, a median over the ranks.
    first, second = torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    rule = AggregatedCode(Uncoded(world, 0), make_aggregator("median", 1))
    state = ExchangeState(ExchangeSetup(rule, rank, ps_rank=0), WholeStepAssembly([first, second]))
    state.begin_step(0)
    vectors = torch.arange(world * 7, dtype=torch.float64).reshape(world, 7) * (1 + torch.arange(world)[:, None])
    later = whole_step_hook(state, Bucket(vectors[rank, 3:].clone(), 0, False, [second]))
    pending = later.done()
    earlier = whole_step_hook(state, Bucket(vectors[rank, :3].clone(), 1, True, [first]))
    seen["whole"] = (pending, torch.cat([earlier.value(), later.value()]), vectors.quantile(0.5, dim=0))

    # 6. Sharded decoding: bitwise the PS's result, bytes as the formulas say; liars in either role.
    d = 53  # not a multiple of P: shards of unequal length
    coded, _ = honest_gradient(rank, code, d)
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
    state.begin_step(0)
    reference = ps_hook(state, Bucket(coded.clone())).value().clone()
    runs = {}
    for name, adversary in [
        ("clean", None),
        ("both", Adversary(ranks=[4], attack="reverse")),
        ("gradient", Adversary(ranks=[4], attack="reverse", roles=["gradient"])),
        ("decoder", Adversary(ranks=[4], attack="gaussian", roles=["decoder"])),
        ("two", Adversary(ranks=[1, 2], attack="collude")),
        ("rank0", Adversary(ranks=[0], attack="reverse")),  # no PS: rank 0 is a worker and decoder like any other
    ]:
        state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
        state.begin_step(2)
        hook = sharded_hook if adversary is None else adversarial(sharded_hook, adversary)
        result = hook(state, Bucket(coded.clone())).value().clone()
        step = state.outcome
        runs[name] = (result, sorted(step.caught), sorted(step.decoders_outvoted), str(step.failure or ""),
                      state.stats.sent, state.stats.received)
    seen["sharded"] = (reference, runs)

    # 7. A liar that sends each decoder a different lie about the same shard (equivocation).
    real = dist.all_to_all_single

    def equivocating(output, input, output_split_sizes=None, input_split_sizes=None, group=None):
        if rank == 4:
            input = input.clone()
            start = 0
            for j, size in enumerate(input_split_sizes):
                input[start : start + size] += j + 1  # decoder j gets its own lie
                start += size
        return real(output, input, output_split_sizes, input_split_sizes, group=group)

    dist.all_to_all_single = equivocating
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
    state.begin_step(0)
    result = sharded_hook(state, Bucket(coded.clone())).value().clone()
    dist.all_to_all_single = real
    seen["equivocation"] = (result, sorted(state.outcome.caught))

    # 7b. A liar that reports itself clean and an honest rank caught, when the ranks agree on the step.
    from lightning_draco.exchange import collectives

    real_sum = collectives.all_reduce_sum

    def lying_report(state, flags):
        if rank == 4:
            flags[2 + 4] = flags[2 + world + 4] = 0
            flags[2 + 1] = flags[2 + world + 1] = 1
        real_sum(state, flags)

    collectives.all_reduce_sum = lying_report
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
    state.begin_step(0)
    adversarial(sharded_hook, Adversary(ranks=[4], attack="gaussian"))(state, Bucket(coded.clone()))
    collectives.all_reduce_sum = real_sum
    seen["lying_report"] = (sorted(state.outcome.caught), sorted(state.outcome.decoders_outvoted))

    # 8. The exchange on a communication thread: the same bytes, the future completed later.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as thread:
        state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
        state.begin_step(0)
        futures = [overlapped(sharded_hook, thread)(state, Bucket(coded.clone(), i, i == 2)) for i in range(3)]
        seen["overlapped"] = [f.wait().clone() for f in futures]

    # 9. Reactive redundancy: groups of s+1 detect in the hook; disagreeing groups settle after it.
    seen["reactive"] = reactive_runs(rank, world)

    torch.save(seen, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world = sys.argv[1], int(sys.argv[2])
    rank, children = fork_ranks(world)
    run_ranks(rank, children, lambda: main(out, world, rank))
