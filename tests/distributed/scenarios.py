"""The scenarios of the digits job (``digits_job.py``), as data: one short fit on digits each.

A scenario says everything its fit needs (world size, steps, strategy, liars, network, precision),
so a job can run any subset of them in any order, and a test names the ones it reads. The names
are only keys: nothing reads meaning out of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lightning_draco.attacks import call_attack, get_attack


ATTACKS = ["reverse", "constant", "gaussian", "sign_flip", "bit_flip", "nan", "inf", "collude", "alie", "ipm"]
# Adaptive and data attacks: with a fixed liar only, since a random liar in rank 0's group that
# mimics rank 0 sends its own honest vector.
ADAPTIVE = ["optimal_alie", "optimal_ipm", "mimic", "label_flip"]
# Every attack a fixed liar can make with its gradient (label flipping changes its data instead).
GRADIENT_ATTACKS = ATTACKS + ["optimal_alie", "optimal_ipm", "mimic"]
#: Steps of a DRACO fit: enough for a liar that rotates through the attacks to make each once (at one
#: step each, so in reactive mode against one of the two helpers that take turns). Its tests compare
#: models bit for bit. Runs that must cross an epoch (16 steps) set their own: RESUMED, and the
#: precision job's 24.
STEPS = len(GRADIENT_ATTACKS)
#: Steps of a plain-averaging fit, with or without a robust rule: its tests read validation accuracy.
TRAINED = 30
#: Steps of a resumed fit: stopped after half of them, inside the first epoch (16 steps on six ranks), it
#: resumes across the epoch's end, where the data loader moves on to the next epoch's order.
RESUMED = 20


@dataclass(frozen=True)
class Scenario:
    world: int = 6
    steps: int = STEPS
    #: ``DracoStrategy`` keyword arguments, besides the adversary (the job adds small buckets).
    strategy: dict[str, Any] = field(default_factory=dict)
    #: ``Adversary`` keyword arguments; None: no adversary.
    liars: Optional[dict[str, Any]] = None
    #: instead of a ``DracoStrategy``: "ddp" (plain ``DDPStrategy``) or "draco" (the registered name).
    by_name: Optional[str] = None
    #: the module: "plain" (examples/models.py's Classifier), "scheduled" (with a per-step StepLR,
    #: gamma 0.5), "diverging" (NaN loss from step 3), "manual" (manual optimization), "kernel_noise"
    #: (every rank's gradients off by its own factor, as with non-deterministic kernels), "gathering"
    #: (``self.all_gather`` inside ``training_step``).
    module: str = "plain"
    dropout: float = 0.2
    precision: str = "32-true"
    accumulate: int = 1
    #: ``GradientAccumulationScheduler(scheduling=...)``: accumulation a callback sets after setup.
    accumulation_schedule: Optional[dict[int, int]] = None
    csv_logger: bool = False
    #: fit uninterrupted, fit again stopped after half the steps, resume that from its last checkpoint.
    resume: bool = False


def lie_on_even_steps(honest, *, step, generator):
    """Two such liars in one group defeat the vote on even steps only."""
    if step % 2:
        return honest.clone()
    return torch.randn(honest.shape, generator=generator)


RULES = ["median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "centered_clipping"]
CYCLIC_ATTACKS = ["reverse", "nan", "gaussian", "collude"]
#: (P, s) of the cyclic-code jobs: the smallest world P = 2s+1 at s = 3, and an even P (the shortened code).
#: s = 1 at six ranks is trained by the precision job and the app tests.
CYCLIC = [(6, 2), (7, 3)]

RANK_4 = lambda attack="reverse": dict(ranks=[4], attack=attack)  # noqa: E731

SCENARIOS: dict[str, Scenario] = {
    "frc_clean": Scenario(),
    "none_clean": Scenario(steps=TRAINED, strategy=dict(code="none")),
    "frc_nodropout": Scenario(dropout=0.0),
    "ddp_nodropout": Scenario(by_name="ddp", dropout=0.0),
    "by_name": Scenario(by_name="draco"),
    "frc_ps3_clean": Scenario(strategy=dict(ps_rank=3)),
    "frc_ps3_reverse": Scenario(strategy=dict(ps_rank=3), liars=dict(ranks=[0], attack="reverse")),
}
for _attack in ATTACKS:
    SCENARIOS[f"frc_fixed_{_attack}"] = Scenario(liars=RANK_4(_attack))
    SCENARIOS[f"none_{_attack}"] = Scenario(steps=TRAINED, strategy=dict(code="none"), liars=RANK_4(_attack))
for _attack in ADAPTIVE:
    SCENARIOS[f"frc_fixed_{_attack}"] = Scenario(liars=RANK_4(_attack))


def rotating(names):
    """An attack that is ``names[step % len(names)]`` at each step (it asks for every context keyword)."""
    attacks = [get_attack(n) for n in names]

    def attack(honest, *, rank, step, bucket, generator, shared_generator, honest_mean, honest_std, honest_vectors,
               liars, defence):
        context = dict(rank=rank, step=step, bucket=bucket, generator=generator, shared_generator=shared_generator,
                       honest_mean=honest_mean, honest_std=honest_std, honest_vectors=honest_vectors, liars=liars,
                       defence=defence)
        return call_attack(attacks[step % len(attacks)], honest, {}, context)

    return attack


def lie_before_step_3(honest, *, step):
    return honest.clone() if step >= 3 else -100 * honest


# One fit covers every built-in attack where the attack changes with the step (``rotating``): a random
# liar under each attack, and sharded decoding with the liar lying in both roles (gradient and decoded
# shards) or in one.
SCENARIOS["frc_random_all"] = Scenario(liars=dict(ranks="random", attack=rotating(ATTACKS), seed=3))
SHARDED = dict(decode="sharded")
SCENARIOS.update({
    "sharded_fixed_all": Scenario(strategy=SHARDED, liars=dict(ranks=[4], attack=rotating(GRADIENT_ATTACKS))),
    "sharded_fixed_label_flip": Scenario(strategy=SHARDED, liars=RANK_4("label_flip")),
})
for _role in ("gradient", "decoder"):
    SCENARIOS[f"sharded_{_role}_reverse"] = Scenario(strategy=SHARDED,
                                                     liars=dict(ranks=[4], attack="reverse", roles=[_role]))
SCENARIOS.update({
    "sharded_clean": Scenario(strategy=SHARDED),
    "sharded_overlap_clean": Scenario(strategy=dict(decode="sharded", overlap=True)),
    "frc_overlap_reverse": Scenario(strategy=dict(overlap=True), liars=RANK_4()),
    "sharded_two_liars_raise": Scenario(strategy=SHARDED, liars=dict(ranks=[1, 2], attack="gaussian")),
})
# Nine ranks: a shard's decoders are no longer a whole group, and a decoder receives less than the PS.
SCENARIOS.update({
    "frc9_clean": Scenario(world=9, steps=8),
    "sharded9_clean": Scenario(world=9, steps=8, strategy=SHARDED),
    "sharded9_fixed_reverse": Scenario(world=9, steps=8, strategy=SHARDED, liars=RANK_4()),
    "sharded9_decoder_reverse": Scenario(world=9, steps=8, strategy=SHARDED,
                                         liars=dict(ranks=[4], attack="reverse", roles=["decoder"])),
    "sharded9_fixed_alie": Scenario(world=9, steps=8, strategy=SHARDED, liars=RANK_4("alie")),
    # No parameter server, so rank 0 (ps_rank) is a worker like any other, and may lie.
    "sharded9_rank0_reverse": Scenario(world=9, steps=8, strategy=SHARDED, liars=dict(ranks=[0], attack="reverse")),
})

# Reactive redundancy: groups of s+1 detect, disagreeing groups are recomputed and voted.
REACTIVE = dict(redundancy_mode="reactive")

SCENARIOS.update({
    "reactive_clean": Scenario(strategy=REACTIVE),
    # mimic copies the lowest honest rank: a random liar in rank 0's group would send its own honest sum.
    "reactive_fixed_all": Scenario(strategy=REACTIVE, liars=dict(ranks=[4], attack=rotating(GRADIENT_ATTACKS))),
    "reactive_random_all": Scenario(strategy=REACTIVE, liars=dict(ranks="random", attack=rotating(ATTACKS), seed=3)),
    # ... on the communication thread (overlap), which changes nothing.
    "reactive_fixed_label_flip": Scenario(strategy=dict(REACTIVE, overlap=True), liars=RANK_4("label_flip")),
    # Without a parameter server: the liar lies in every role (gradient, recomputed sums, decoded shards).
    "reactive_sharded_fixed_all": Scenario(strategy=dict(REACTIVE, decode="sharded"),
                                           liars=dict(ranks=[4], attack=rotating(GRADIENT_ATTACKS))),
    "reactive_sharded_random_all": Scenario(strategy=dict(REACTIVE, decode="sharded"),
                                            liars=dict(ranks="random", attack=rotating(ATTACKS), seed=3)),
    # Two liars in group 1 ({2, 3}) send different lies: its three copies hold no majority.
    "reactive_two_liars_raise": Scenario(strategy=REACTIVE, liars=dict(ranks=[2, 3], attack="gaussian")),
    # s = 2: groups of three, two helpers each; liars in both groups, so a liar also recomputes the other's sum.
    "reactive_s2_reverse": Scenario(strategy=dict(REACTIVE, num_adversaries=2), liars=dict(ranks=[1, 3])),
    # Accumulation, which reactive mode refuses, turned on by a callback after setup's check.
    "reactive_accumulation_scheduled": Scenario(strategy=REACTIVE, liars=RANK_4("reverse"),
                                                accumulation_schedule={0: 2}),
    # A collective inside training_step: warned about in full mode, refused where helpers recompute.
    "frc_gathering": Scenario(steps=2, module="gathering", liars=RANK_4()),
    "reactive_gathering": Scenario(steps=2, module="gathering", strategy=REACTIVE, liars=RANK_4()),
    "reactive_quarantine": Scenario(strategy=dict(REACTIVE, quarantine_after=1),
                                    liars=dict(ranks=[5], attack=lie_before_step_3)),
    # Resumed mid-epoch with the PS on rank 3: the quarantine (from the saved ledger) holds on.
    "resume_reactive_ps3": Scenario(strategy=dict(REACTIVE, quarantine_after=1, ps_rank=3),
                                    liars=dict(ranks=[5], attack=lie_before_step_3), resume=True, steps=RESUMED),
})
SCENARIOS.update({
    "frc_two_liars_raise": Scenario(liars=dict(ranks=[1, 2], attack="gaussian")),
    "frc_two_liars_skip": Scenario(strategy=dict(on_decode_failure="skip"),
                                   liars=dict(ranks=[1, 2], attack=lie_on_even_steps), module="scheduled"),
    "manual_optimization": Scenario(module="manual"),
    "frc_threshold_logged": Scenario(strategy=dict(max_faulty_steps=5), liars=dict(ranks=[5], attack="sign_flip"),
                                     csv_logger=True),
    "frc_diverge_raise": Scenario(liars=dict(ranks=[4]), module="diverging"),
    "frc_diverge_skip": Scenario(strategy=dict(on_decode_failure="skip"), liars=dict(ranks=[4]), module="diverging"),
    # Resume: random liars with the PS on rank 0, a fixed one (rank ps + 2) with the PS on rank 3.
    "resume_ps0": Scenario(strategy=dict(code="crc", num_adversaries=1, ps_rank=0),
                           liars=dict(ranks="random", seed=5), resume=True, steps=RESUMED),
    "resume_ps3": Scenario(strategy=dict(code="crc", num_adversaries=1, ps_rank=3),
                           liars=dict(ranks=[5], seed=5), resume=True, steps=RESUMED),
    # Centred clipping: the one aggregation rule with state (its anchor).
    "resume_clip_ps3": Scenario(strategy=dict(code="none", aggregator="centered_clipping", num_adversaries=1,
                                              aggregator_options={"tau": 0.5}, ps_rank=3),
                                liars=dict(ranks=[5], seed=5), resume=True, steps=RESUMED),
})


def aggregated(rule: str, attack: Optional[str], over: str = "whole") -> Scenario:
    """Plain averaging's exchange (code "none") with a robust rule; the liar on rank 4."""
    options = {"tau": 1.0} if rule == "centered_clipping" else {}
    return Scenario(steps=TRAINED, liars=RANK_4(attack) if attack else None,
                    strategy=dict(code="none", aggregator=rule, aggregator_options=options, aggregate_over=over))


for _rule in RULES:
    SCENARIOS[f"agg_{_rule}_reverse"] = aggregated(_rule, "reverse")
SCENARIOS.update({
    "agg_krum_reverse_bucket": aggregated("krum", "reverse", over="bucket"),
    "agg_median_clean": aggregated("median", None),
    "agg_median_alie": aggregated("median", "alie"),
    "agg_median_optimal_alie": aggregated("median", "optimal_alie"),
    "agg_median_label_flip": aggregated("median", "label_flip"),
    # DETOX: FRC's vote inside each group of three, then the median of the two group sums.
    "detox_reverse": Scenario(strategy=dict(code="frc", aggregator="median", aggregator_options={"num_byzantine": 0}),
                              liars=RANK_4()),
    "pre_nnm_krum_reverse": Scenario(steps=TRAINED, liars=RANK_4(),
                                     strategy=dict(code="none", aggregator="krum", pre_aggregators=["nnm"])),
    "pre_bucketing_median_reverse": Scenario(
        steps=TRAINED, liars=RANK_4(),
        strategy=dict(code="none", aggregator="median", pre_aggregators=[{"name": "bucketing", "bucket_size": 2}]),
    ),
})


def cyclic(world: int, s: int, attack: Optional[str], steps: int, **options: Any) -> Scenario:
    """The cyclic code with ``s`` adversaries on the last ``s`` ranks (None: no adversary), a fixed secret."""
    liars = dict(ranks=list(range(world - s, world)), attack=attack) if attack else None
    return Scenario(world=world, steps=steps, strategy=dict(code="crc", num_adversaries=s, projection_secret=11),
                    liars=liars, **options)


def cyclic_name(world: int, s: int, attack: Optional[str]) -> str:
    return f"crc_P{world}_s{s}_{attack or 'clean'}"


for _world, _s in CYCLIC:
    for _attack in [None, *CYCLIC_ATTACKS]:
        SCENARIOS[cyclic_name(_world, _s, _attack)] = cyclic(_world, _s, _attack, steps=12)

# Both codes under bf16-mixed autocast, and under gradient accumulation: six ranks, 24 steps.
BF16, ACC2 = dict(precision="bf16-mixed"), dict(accumulate=2)
SCENARIOS.update({
    "crc1_clean_bf16": cyclic(6, 1, None, steps=24, **BF16),
    "crc1_reverse_bf16": cyclic(6, 1, "reverse", steps=24, **BF16),
    "crc1_sparse_bf16": cyclic(6, 1, "sparse", steps=24, **BF16),
    "crc1_clean_noise": cyclic(6, 1, None, steps=12, module="kernel_noise"),
    "crc1_reverse_noise": cyclic(6, 1, "reverse", steps=12, module="kernel_noise"),
    "frc_bf16_clean": Scenario(steps=24, **BF16),
    "frc_bf16_reverse": Scenario(steps=24, liars=RANK_4(), **BF16),
    "crc1_clean_acc2": cyclic(6, 1, None, steps=24, **ACC2),
    "crc1_reverse_acc2": cyclic(6, 1, "reverse", steps=24, **ACC2),
    "frc_acc2_clean": Scenario(steps=24, **ACC2),
    "frc_acc2_reverse": Scenario(steps=24, liars=RANK_4(), **ACC2),
    "reactive_bf16_clean": Scenario(steps=24, strategy=REACTIVE, **BF16),
    "reactive_bf16_all": Scenario(steps=24, strategy=REACTIVE, liars=dict(ranks=[4], attack=rotating(GRADIENT_ATTACKS)),
                                  **BF16),
})
