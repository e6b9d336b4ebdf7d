"""A multi-rank job for the distributed tests: runs a list of scenarios in one set of processes.

Usage: python digits_job.py OUT.json SCENARIO [SCENARIO ...]

Lightning's popen launcher starts ranks 1..P-1 by re-running this script, so every rank runs
the same scenarios in the same order, each a short fit on the digits data set. Rank 0 writes,
per scenario, a SHA-256 of the final parameters, the parameters themselves, validation
accuracy, the faulty counts, hook calls and any error every rank raised.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import warnings

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_draco  # noqa: F401  (registers "draco")
from lightning_draco import Adversary, DracoDecodeError, DracoStrategy, NonFiniteGradientError
from lightning_draco.aggregators import AGGREGATORS
from lightning_draco.attacks import call_attack, get_attack

WORLD = int(os.environ.get("DRACO_TEST_WORLD", "6"))
STEPS = int(os.environ.get("DRACO_TEST_STEPS", "30"))


class DigitsNet(L.LightningModule):
    def __init__(self, dropout: float = 0.2, lr: float = 0.05, scheduler: bool = False):
        super().__init__()
        layers = [nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.use_scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    return TensorDataset(x[:1500], y[:1500]), (x[1500:], y[1500:])


def param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        if t.is_floating_point():
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


SCENARIOS = {}


def scenario(name):
    def register(fn):
        SCENARIOS[name] = fn
        return fn

    return register


def draco(**kw):
    kw.setdefault("bucket_cap_mb", 0.0005)  # several buckets even for this small model
    kw.setdefault("start_method", "popen")
    return DracoStrategy(**kw)


ATTACKS = ["reverse", "constant", "gaussian", "sign_flip", "bit_flip", "nan", "inf", "collude", "alie", "ipm"]
for _attack in ATTACKS:
    SCENARIOS[f"frc_fixed_{_attack}"] = (lambda a: lambda: (dict(adversary=Adversary(ranks=[4], attack=a)), {}))(_attack)
    SCENARIOS[f"frc_random_{_attack}"] = (lambda a: lambda: (dict(adversary=Adversary(ranks="random", attack=a, seed=3)), {}))(_attack)
    SCENARIOS[f"none_{_attack}"] = (lambda a: lambda: (dict(code="none", adversary=Adversary(ranks=[4], attack=a)), {}))(_attack)
# Adaptive and data attacks (issue 13): with a fixed liar only, since a random liar in rank 0's
# group that mimics rank 0 sends its own honest vector.
ADAPTIVE = ["optimal_alie", "optimal_ipm", "mimic", "label_flip"]
for _attack in ADAPTIVE:
    SCENARIOS[f"frc_fixed_{_attack}"] = (lambda a: lambda: (dict(adversary=Adversary(ranks=[4], attack=a)), {}))(_attack)
SCENARIOS["pre_nnm_krum_reverse"] = lambda: (
    dict(code="none", aggregator="krum", pre_aggregators=["nnm"], adversary=Adversary(ranks=[4], attack="reverse")), {}
)
SCENARIOS["pre_bucketing_median_reverse"] = lambda: (
    dict(code="none", aggregator="median", pre_aggregators=[{"name": "bucketing", "bucket_size": 2}],
         adversary=Adversary(ranks=[4], attack="reverse")),
    {},
)
# Sharded decoding (no parameter server): every attack, the liar lying in both roles.
for _attack in ATTACKS + ADAPTIVE:
    SCENARIOS[f"sharded_fixed_{_attack}"] = (
        lambda a: lambda: (dict(decode="sharded", adversary=Adversary(ranks=[4], attack=a)), {})
    )(_attack)
for _role in ("gradient", "decoder"):
    SCENARIOS[f"sharded_{_role}_reverse"] = (
        lambda r: lambda: (dict(decode="sharded", adversary=Adversary(ranks=[4], attack="reverse", roles=[r])), {})
    )(_role)
SCENARIOS["sharded_clean"] = lambda: (dict(decode="sharded"), {})
SCENARIOS["sharded_overlap_clean"] = lambda: (dict(decode="sharded", overlap=True), {})
SCENARIOS["frc_overlap_reverse"] = lambda: (dict(overlap=True, adversary=Adversary(ranks=[4], attack="reverse")), {})
SCENARIOS["sharded_two_liars_raise"] = lambda: (dict(decode="sharded", adversary=Adversary(ranks=[1, 2], attack="gaussian")), {})
# Reactive redundancy (issue 14): groups of s+1 detect, disagreeing groups are recomputed and voted.
# One fit per way of choosing the liar covers every built-in attack: the attack changes with the step.
REACTIVE = dict(redundancy_mode="reactive")
GRADIENT_ATTACKS = ATTACKS + ["optimal_alie", "optimal_ipm", "mimic"]


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


SCENARIOS["reactive_clean"] = lambda: (dict(REACTIVE), {})
# mimic copies the lowest honest rank: a random liar in rank 0's group would send its own honest sum.
SCENARIOS["reactive_fixed_all"] = lambda: (
    dict(REACTIVE, adversary=Adversary(ranks=[4], attack=rotating(GRADIENT_ATTACKS))), {}
)
SCENARIOS["reactive_random_all"] = lambda: (
    dict(REACTIVE, adversary=Adversary(ranks="random", attack=rotating(ATTACKS), seed=3)), {}
)
# ... on the communication thread (overlap), which changes nothing.
SCENARIOS["reactive_fixed_label_flip"] = lambda: (
    dict(REACTIVE, overlap=True, adversary=Adversary(ranks=[4], attack="label_flip")), {}
)
# Without a parameter server: the liar lies in both roles (gradient, recomputed sums, decoded shards).
SCENARIOS["reactive_sharded_fixed_all"] = lambda: (
    dict(REACTIVE, decode="sharded", adversary=Adversary(ranks=[4], attack=rotating(GRADIENT_ATTACKS))), {}
)
SCENARIOS["reactive_sharded_random_all"] = lambda: (
    dict(REACTIVE, decode="sharded", adversary=Adversary(ranks="random", attack=rotating(ATTACKS), seed=3)), {}
)
# Two liars in group 1 ({2, 3}) send different lies: its three copies hold no majority.
SCENARIOS["reactive_two_liars_raise"] = lambda: (
    dict(REACTIVE, adversary=Adversary(ranks=[2, 3], attack="gaussian")), {}
)
# s = 2: groups of three, two helpers each; liars in both groups, so a liar also recomputes the other's sum.
SCENARIOS["reactive_s2_reverse"] = lambda: (dict(REACTIVE, num_adversaries=2, adversary=Adversary(ranks=[1, 3])), {})


def lie_before_step_3(honest, *, step):
    return honest.clone() if step >= 3 else -100 * honest


SCENARIOS["reactive_quarantine"] = lambda: (
    dict(REACTIVE, quarantine_after=1, adversary=Adversary(ranks=[5], attack=lie_before_step_3)), {}
)
SCENARIOS["frc_clean"] = lambda: ({}, {})
SCENARIOS["none_clean"] = lambda: (dict(code="none"), {})
SCENARIOS["frc_nodropout"] = lambda: ({}, dict(dropout=0.0))
SCENARIOS["ddp_nodropout"] = lambda: ("ddp", dict(dropout=0.0))
SCENARIOS["frc_ps3_clean"] = lambda: (dict(ps_rank=3), {})
SCENARIOS["frc_ps3_reverse"] = lambda: (dict(ps_rank=3, adversary=Adversary(ranks=[0], attack="reverse")), {})
SCENARIOS["frc_acc2_clean"] = lambda: ({}, dict(accumulate=2))
SCENARIOS["frc_acc2_reverse"] = lambda: (dict(adversary=Adversary(ranks=[4], attack="reverse")), dict(accumulate=2))
SCENARIOS["frc_bf16_clean"] = lambda: ({}, dict(precision="bf16-mixed"))
SCENARIOS["frc_bf16_reverse"] = lambda: (dict(adversary=Adversary(ranks=[4], attack="reverse")), dict(precision="bf16-mixed"))
SCENARIOS["frc_two_liars_raise"] = lambda: (dict(adversary=Adversary(ranks=[1, 2], attack="gaussian")), {})


def lie_on_even_steps(honest, *, step, generator):
    """Two such liars in one group defeat the vote on even steps only."""
    if step % 2:
        return honest.clone()
    return torch.randn(honest.shape, generator=generator)


SCENARIOS["frc_two_liars_skip"] = lambda: (
    dict(adversary=Adversary(ranks=[1, 2], attack=lie_on_even_steps), on_decode_failure="skip"),
    dict(scheduler=True),
)


class DivergingNet(DigitsNet):
    """From step 3 on, every replica computes a NaN loss: the model diverged, nobody lied."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 3 else loss


SCENARIOS["frc_diverge_raise"] = lambda: (dict(adversary=Adversary(ranks=[4])), dict(diverge=True))
SCENARIOS["frc_diverge_skip"] = lambda: (dict(adversary=Adversary(ranks=[4]), on_decode_failure="skip"), dict(diverge=True))


class ManualNet(DigitsNet):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


SCENARIOS["manual_optimization"] = lambda: ({}, dict(manual=True))
SCENARIOS["frc_clean_sched"] = lambda: ({}, dict(scheduler=True))
SCENARIOS["by_name"] = lambda: ("draco", {})
SCENARIOS["frc_threshold_logged"] = lambda: (
    dict(adversary=Adversary(ranks=[5], attack="sign_flip"), max_faulty_steps=5),
    dict(csv_logger=True),
)


def aggregator_scenario(name: str):
    """``agg_<rule>_<attack>[_bucket]``: code "none" with a robust rule; ``detox_<attack>``: FRC + median."""
    over = "bucket" if name.endswith("_bucket") else "whole"
    name = name.removesuffix("_bucket")
    if name.startswith("detox_"):
        attack = name.split("_", 1)[1]
        kw = dict(code="frc", aggregator="median", aggregator_options={"num_byzantine": 0})
    else:
        rule = max((r for r in AGGREGATORS if name[4:].startswith(r + "_")), key=len)
        attack = name[4 + len(rule) + 1 :]
        options = {"tau": 1.0} if rule == "centered_clipping" else {}
        kw = dict(code="none", aggregator=rule, aggregator_options=options, aggregate_over=over)
    if attack != "clean":
        kw["adversary"] = Adversary(ranks=[4], attack=attack)
    return kw, {}


def cyclic_scenario(name: str):
    """``crc<s>_<attack>[_bf16]``: the cyclic code with s adversaries on the last s ranks (``clean``: none);
    ``_bf16``: under ``precision="bf16-mixed"``."""
    head, attack = name.split("_", 1)
    model_kw = {}
    if attack.endswith("_bf16"):
        attack, model_kw["precision"] = attack.removesuffix("_bf16"), "bf16-mixed"
    if attack.endswith("_acc2"):
        attack, model_kw["accumulate"] = attack.removesuffix("_acc2"), 2
    s = int(head[3:])
    kw = dict(code="crc", num_adversaries=s, projection_secret=11)
    if attack != "clean":
        kw["adversary"] = Adversary(ranks=list(range(WORLD - s, WORLD)), attack=attack)
    return kw, model_kw


def resume(name: str) -> dict:
    """``resume_ps<r>``: an uninterrupted cyclic-code fit, then one stopped mid-epoch that a fresh
    strategy resumes from its last checkpoint (random liars on ps0, a fixed one on ps3; dropout).
    ``resume_clip_ps<r>``: the same with centred clipping, a rule with state, instead of a code."""
    ps = int(name.rsplit("ps", 1)[1])
    if name.startswith("resume_clip"):
        rule = dict(code="none", aggregator="centered_clipping", aggregator_options={"tau": 0.5})
    else:
        rule = dict(code="crc")
    folder = os.path.join(os.getcwd(), name)
    liars = "random" if ps == 0 else [(ps + 2) % WORLD]
    secrets, digests = [], []
    for attempt, steps in enumerate((STEPS, STEPS // 2, STEPS)):
        L.seed_everything(1234, verbose=False)
        strategy = draco(num_adversaries=1, ps_rank=ps, adversary=Adversary(ranks=liars, seed=5), **rule)
        trainer = L.Trainer(
            accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=steps, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=attempt > 0,
            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1)]
            if attempt else [],
        )
        model = DigitsNet()
        trainer.fit(model, DataLoader(digits()[0], batch_size=16, shuffle=True),
                    ckpt_path=os.path.join(folder, "last.ckpt") if attempt == 2 else None)
        digests.append(param_digest(model))
        if attempt:
            # Only for the test: every rank learns the PS's secret after each fit.
            # The second strategy drew a fresh secret from OS entropy; loading the checkpoint restores the first.
            secrets.append(strategy._exchange.setup.secret if strategy.is_ps else None)
    carrier = [secrets]
    dist.broadcast_object_list(carrier, src=ps)
    ckpt = torch.load(os.path.join(folder, "last.ckpt"), weights_only=False)
    return {
        "name": name,
        "secrets": carrier[0],
        "in_checkpoint": "projection_secret" in ckpt["draco"],
        "sidecar": os.path.exists(os.path.join(folder, "last.ckpt.ps")),
        "ledger": ckpt["draco"]["ledger"],
        "world_size": ckpt["draco"]["world_size"],
        "global_step": trainer.global_step,
        "faulty_counts": {str(k): v for k, v in strategy.faulty_counts.items()},
        "sha_uninterrupted": digests[0],
        "sha_resumed": digests[2],
        "steps_per_epoch": len(trainer.train_dataloader),
    }


def run(name: str) -> dict:
    if name.startswith("resume"):
        return resume(name)
    if name.startswith("crc"):
        strategy_kw, model_kw = cyclic_scenario(name)
    elif name.startswith(("agg_", "detox_")):
        strategy_kw, model_kw = aggregator_scenario(name)
    else:
        strategy_kw, model_kw = SCENARIOS[name]()
    L.seed_everything(1234, verbose=False)
    if isinstance(strategy_kw, str):
        strategy = strategy_kw if strategy_kw != "ddp" else L.pytorch.strategies.DDPStrategy(start_method="popen")
    else:
        strategy = draco(**strategy_kw)
    logger = False
    if model_kw.pop("csv_logger", False):
        logger = CSVLogger(os.getcwd(), name=name, version=0)
    precision = model_kw.pop("precision", "32-true")
    accumulate = model_kw.pop("accumulate", 1)
    if model_kw.pop("manual", False):
        model = ManualNet()
    elif model_kw.pop("diverge", False):
        model = DivergingNet(**model_kw)
    else:
        model = DigitsNet(**model_kw)
    train, (vx, vy) = digits()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        precision=precision,
        accumulate_grad_batches=accumulate,
        max_steps=STEPS,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    out = {"name": name}
    try:
        trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True))
    except DracoDecodeError as err:
        out["error"] = {"type": "DracoDecodeError", "step": err.step, "bucket": err.bucket, "suspects": err.suspects,
                        "message": str(err)}
    except (ValueError, NonFiniteGradientError) as err:
        out["error"] = {"type": type(err).__name__, "message": str(err)}
    strategy = trainer.strategy
    model.eval()
    with torch.no_grad():
        acc = float((model(vx).argmax(1) == vy).float().mean())
    out.update(
        sha=param_digest(model),
        params=[p.detach().double().flatten().tolist() for p in model.parameters()],
        finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        accuracy=acc,
        global_step=trainer.global_step,
        lr=[g["lr"] for g in trainer.optimizers[0].param_groups] if trainer.optimizers else None,
    )
    if isinstance(strategy, DracoStrategy):
        out.update(
            faulty_counts={str(k): v for k, v in strategy.faulty_counts.items()},
            skipped=strategy.skipped_steps,
            hook_calls=strategy.hook_calls,
            steps_decoded=strategy.ledger.steps,
            exchange_bytes=strategy.exchange_bytes,
            numel=sum(p.numel() for p in model.parameters() if p.requires_grad),
            escalations=strategy.escalation_stats,
            quarantined=sorted(strategy.quarantined),
        )
    if logger and trainer.global_rank == 0:
        with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        out["logged"] = {
            "columns": sorted(rows[0].keys()) if rows else [],
            "caught": [float(r["draco/caught"]) for r in rows if r.get("draco/caught")],
            "rank_5": [float(r["draco/times_caught/rank_5"]) for r in rows if r.get("draco/times_caught/rank_5")],
        }
    # Every rank reports what it saw, so tests can check that all ranks agree.
    gathered = [None] * dist.get_world_size()
    keys = ("error", "sha", "hook_calls", "skipped", "faulty_counts", "exchange_bytes", "escalations")
    dist.all_gather_object(gathered, {k: out.get(k) for k in keys})
    out["ranks"] = gathered
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    path, names = sys.argv[1], sys.argv[2:]
    results = {name: run(name) for name in names}
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with open(path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
