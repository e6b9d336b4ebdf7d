"""A three-rank job for how DracoStrategy behaves inside Lightning: stages, hooks, data checks, failures.

Usage: python lightning_job.py OUT.jsonl SCENARIO [SCENARIO ...]

Unlike ``digits_job.py``, which forks its ranks, this job starts as users' scripts do: Lightning's
popen launcher re-runs it for ranks 1 and 2. Every rank runs the scenarios in order (FRC, s=1,
r=3, P=3: every rank holds every partition; the PS is rank 0), and rank 0 appends what each
scenario recorded, with what every rank saw, to OUT.jsonl. ``LIGHTNING_JOB_WORLD=4`` runs it on four
ranks instead, for the ``reactive_*`` scenarios (reactive mode needs groups of s+1 = 2 and P >= 2s+1).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sys
import warnings

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_draco  # noqa: F401  (registers the names)
from lightning_draco import Adversary, DracoDecodeError, DracoStrategy

WORLD = int(os.environ.get("LIGHTNING_JOB_WORLD", "3"))
STEPS = 4


class Net(L.LightningModule):
    def __init__(self, unused: bool = False, rank_dependent: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        if unused:
            self.spare = nn.Linear(4, 2)  # never used in the loss
        self.rank_dependent = rank_dependent
        self.hook_batches: list = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.rank_dependent:  # what non-determinism across replicas looks like to the vote
            loss = loss + 1e-3 * self.global_rank * self.net[0].weight.sum()
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        x, y = batch  # a plain (x, y) batch, as without DRACO
        whole = self.trainer.strategy.partition_batch
        self.hook_batches.append(
            {"x": list(x.shape), "y": list(y.shape), "whole": type(whole).__name__, "partitions": whole.partitions,
             "first_is_hooks": bool(torch.equal(whole.batches[0][0], x))}
        )

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UnderDDP(Net):
    """A ``Net`` that also runs under plain DDP, which has no ``partition_batch`` to record."""

    def on_train_batch_start(self, batch, batch_idx):
        pass


def plain_ddp(**kw) -> L.pytorch.strategies.DDPStrategy:
    return L.pytorch.strategies.DDPStrategy(start_method="popen", **kw)


class SeeBatches(L.Callback):
    def __init__(self):
        self.seen: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({"type": type(batch).__name__, "x": list(batch[0].shape)})


def data(seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 4, generator=gen)
    return TensorDataset(x, (x.sum(1) > 0).long())


def param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def trainer_for(strategy, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=list(callbacks),
    )


def draco(**kw) -> DracoStrategy:
    kw.setdefault("start_method", "popen")
    return DracoStrategy(**kw)


@contextlib.contextmanager
def recorded(out: dict):
    """Run the block; an exception it raises is written to ``out["error"]`` (the tests read type and message)."""
    try:
        yield
    except DracoDecodeError as err:
        out["error"] = {"type": "DracoDecodeError", "step": err.step, "suspects": err.suspects, "message": str(err)}
    except Exception as err:  # noqa: BLE001 - the test reads type and message
        out["error"] = {"type": type(err).__name__, "message": str(err)}


def fit(out: dict, trainer: L.Trainer, model: Net, dataset: TensorDataset) -> None:
    with recorded(out):
        trainer.fit(model, DataLoader(dataset, batch_size=8, shuffle=True))


def stages() -> dict:
    """fit under a liar on rank 2, then validate, test and predict on the same Trainer."""
    callback = SeeBatches()
    trainer = trainer_for(draco(adversary=Adversary(ranks=[2], attack="reverse")), [callback])
    model = Net()
    out: dict = {}
    fit(out, trainer, model, data())
    strategy = trainer.strategy
    counts = {"fit": dict(strategy.faulty_counts)}
    traffic = {"fit": [strategy.hook_calls, strategy.exchange_bytes]}
    loader = DataLoader(data(1), batch_size=8)
    for stage, run in (("validate", trainer.validate), ("test", trainer.test), ("predict", trainer.predict)):
        run(model, loader, **({} if stage == "predict" else {"verbose": False}))
        counts[stage] = dict(strategy.faulty_counts)
        traffic[stage] = [strategy.hook_calls, strategy.exchange_bytes]
    out["counts"] = {stage: {str(k): v for k, v in c.items()} for stage, c in counts.items()}
    out["traffic"] = traffic
    out["module_hooks"] = model.hook_batches
    out["callback_hooks"] = callback.seen
    out["after_fit_partition_batch"] = trainer.strategy.partition_batch is not None
    out["global_step"] = trainer.global_step
    return out


def ps_outvoted(mode: str) -> dict:
    """Two colluders (more than s=1) in the PS's group send one identical wrong vector: they win the vote."""
    trainer = trainer_for(draco(adversary=Adversary(ranks=[1, 2], attack="collude"), on_decode_failure=mode))
    model = Net()
    before = param_digest(model)
    out: dict = {}
    fit(out, trainer, model, data())
    out.update(
        faulty_counts={str(k): v for k, v in trainer.strategy.faulty_counts.items()},
        skipped=trainer.strategy.skipped_steps,
        global_step=trainer.global_step,
        unchanged=param_digest(model) == before,
    )
    return out


def rank_dependent() -> dict:
    out: dict = {}
    fit(out, trainer_for(draco()), Net(rank_dependent=True), data())
    return out


def inconsistent_data() -> dict:
    out: dict = {}
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    trainer = trainer_for(draco())
    fit(out, trainer, Net(), data(seed=rank))  # each process draws its own data set
    # Raised by every rank together: if this fit launched the ranks, an unagreed failure would end them.
    out["agreed"] = trainer.strategy._agreed_failure is not None
    return out


def unused(name: str) -> dict:
    trainer = trainer_for(name)
    out: dict = {}
    fit(out, trainer, Net(unused=True), data())
    out["global_step"] = trainer.global_step
    return out


class CheckpointedNet(Net):
    """The network under reentrant activation checkpointing: each segment's backward runs a backward of its own."""

    def __init__(self, on_rank: int | None = None):
        super().__init__()
        self.on_rank = on_rank  # None: on every rank

    def forward(self, x):
        if self.on_rank not in (None, self.global_rank):
            return self.net(x)
        return torch.utils.checkpoint.checkpoint(self.net, x.requires_grad_(), use_reentrant=True)


def reentrant(code: str, on_rank: int | None = None) -> dict:
    model = CheckpointedNet(on_rank)
    before = param_digest(model)
    out: dict = {}
    fit(out, trainer_for(draco(code=code)), model, data())
    out["unchanged"] = param_digest(model) == before
    return out


class BranchNet(UnderDDP):
    """A head that only batches whose first label is 1 reach (as an expert no token was routed to)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.used: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.used.append(bool(y[0] == 1))
        if self.used[-1]:
            out = out + self.head(x)
        return nn.functional.cross_entropy(out, y)


def branch(strategy_name: str) -> dict:
    """A data-dependent branch under find_unused_parameters: plain DDP, DRACO, DRACO with a liar on rank 1."""
    if strategy_name == "ddp":
        strategy = plain_ddp(find_unused_parameters=True)
    else:
        adversary = Adversary(ranks=[1], attack="reverse") if strategy_name == "liar" else None
        strategy = draco(find_unused_parameters=True, adversary=adversary)
    model = BranchNet()
    trainer = trainer_for(strategy)
    out: dict = {}
    fit(out, trainer, model, data())
    out.update(global_step=trainer.global_step, sha=param_digest(model), used=model.used,
               params=[p.detach().double().flatten().tolist() for p in model.parameters()],
               faulty_counts={str(k): v for k, v in getattr(trainer.strategy, "faulty_counts", {}).items()})
    return out


class BatchNormNet(UnderDDP):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def averaged(strategy_name: str, **options) -> dict:
    """Lightning's StochasticWeightAveraging, whose last epoch recomputes BatchNorm statistics without a backward."""
    if strategy_name == "ddp":
        strategy = plain_ddp()
    else:
        strategy = draco(**options)
    model = BatchNormNet()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=3, limit_train_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[L.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)],
    )
    out: dict = {}
    fit(out, trainer, model, data())
    out.update(global_step=trainer.global_step, params=[p.detach().double().flatten().tolist() for p in model.parameters()],
               steps_decoded=getattr(trainer.strategy, "ledger", None) and trainer.strategy.ledger.steps,
               faulty_counts={str(k): v for k, v in getattr(trainer.strategy, "faulty_counts", {}).items()})
    return out


class LoggingNet(UnderDDP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, sync_dist=True)
        return loss


class SeeLogged(L.Callback):
    def __init__(self):
        self.values: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["train_loss"]))


class HookNeverRegistered(DracoStrategy):
    """What a Lightning that stopped calling ``_register_ddp_hooks`` would do: DDP keeps its all-reduce."""

    def _register_ddp_hooks(self) -> None:
        pass


def hook_not_registered() -> dict:
    model = Net()
    before = param_digest(model)
    out: dict = {}
    fit(out, trainer_for(HookNeverRegistered(start_method="popen")), model, data())
    out["unchanged"] = param_digest(model) == before
    return out


def logged(strategy_name: str) -> dict:
    """``self.log(..., sync_dist=True)`` per step under DRACO and under plain DDP, same data and model."""
    seen = SeeLogged()
    strategy = draco() if strategy_name == "draco" else plain_ddp()
    out: dict = {}
    fit(out, trainer_for(strategy, [seen]), LoggingNet(), data())
    out["values"] = seen.values
    return out


class StepsAfterItsClosure(Net):
    """Runs the optimizer closure itself, then steps without it: legal in PyTorch, and under DDP."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()
        optimizer.step()


def closure_before_step() -> dict:
    model = StepsAfterItsClosure()
    before = param_digest(model)
    out: dict = {}
    fit(out, trainer_for(draco(adversary=Adversary(ranks=[2], attack="reverse"))), model, data())
    out["unchanged"] = param_digest(model) == before
    return out


def two_training_loaders() -> dict:
    model = Net()
    before = param_digest(model)
    out: dict = {}
    loaders = {"a": DataLoader(data(), batch_size=8), "b": DataLoader(data(1), batch_size=8)}
    with recorded(out):
        trainer_for(draco()).fit(model, loaders)
    out["unchanged"] = param_digest(model) == before
    return out


class SaveAtValidation(L.Callback):
    """A checkpoint at the end of every validation, as ModelCheckpoint(monitor=...) writes one."""

    def __init__(self, folder: str):
        self.folder, self.paths = folder, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.paths.append(os.path.join(self.folder, f"validation{len(self.paths)}.ckpt"))
            trainer.save_checkpoint(self.paths[-1])


def mid_step_trainer(strategy, callbacks=()) -> L.Trainer:
    """Three micro-batches per step, four batches per epoch, validation every two: inside a step."""
    return L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=2, accumulate_grad_batches=3,
        val_check_interval=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
    )


def resumed_inside_a_step() -> dict:
    """Resume from a checkpoint taken between the micro-batches of a step; then validate another code's
    run from it (validation reads the weights only)."""
    liar = Adversary(ranks=[1], attack="reverse")
    loader = lambda: DataLoader(data(), batch_size=8, shuffle=True)  # noqa: E731
    saver = SaveAtValidation(os.path.join(os.getcwd(), "resumed_inside_a_step"))
    L.seed_everything(7, verbose=False)
    uninterrupted = Net()
    trainer = mid_step_trainer(draco(adversary=liar), [saver])
    trainer.fit(uninterrupted, loader(), DataLoader(data(1), batch_size=8))
    out: dict = {"saved_at": [], "steps": [trainer.global_step], "same_model": [], "faulty_counts": []}
    # Validations after batch 2 of each epoch are inside a step: epoch 0's, and epoch 1's (before its first step).
    for path in (saver.paths[0], saver.paths[2]):
        fit_loop = torch.load(path, weights_only=False)["loops"]["fit_loop"]
        out["saved_at"].append({"batches": fit_loop["epoch_loop.batch_progress"]["current"]["processed"],
                                "loader": fit_loop["state_dict"]["combined_loader"]})
        L.seed_everything(7, verbose=False)
        resumed = Net()
        again = mid_step_trainer(draco(adversary=liar))
        again.fit(resumed, loader(), DataLoader(data(1), batch_size=8), ckpt_path=path)
        out["steps"].append(again.global_step)
        out.setdefault("stepped", [trainer.fit_loop.epoch_loop._batches_that_stepped]).append(
            again.fit_loop.epoch_loop._batches_that_stepped)
        out["same_model"].append(param_digest(resumed) == param_digest(uninterrupted))
        out["faulty_counts"].append({str(k): v for k, v in again.strategy.faulty_counts.items()})
    other = mid_step_trainer(draco(code="crc"))
    with recorded(out):
        other.validate(Net(), DataLoader(data(1), batch_size=8), ckpt_path=saver.paths[0], verbose=False)
        out["validated"] = True
    return out


def float16_scaled(strategy_name: str) -> dict:
    """precision="16-mixed" (on the CPU: the plugin with a GradScaler) starting at a scale that overflows."""
    if strategy_name == "ddp":
        strategy = plain_ddp()
    else:
        strategy = draco(code=strategy_name, adversary=Adversary(ranks=[2], attack="reverse"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**19, growth_interval=1000)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[L.pytorch.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    model = UnderDDP()
    out: dict = {}
    fit(out, trainer, model, data())
    out.update(global_step=trainer.global_step, scale=float(scaler.get_scale()),
               params=[p.detach().double().flatten().tolist() for p in model.parameters()],
               faulty_counts={str(k): v for k, v in getattr(trainer.strategy, "faulty_counts", {}).items()})
    return out


def accumulated_poisoning(liars: bool) -> dict:
    """Random liars poisoning their batches, two micro-batches per step: each step's drawn liar lies in both."""
    adversary = Adversary(ranks="random", count=1, attack="label_flip", num_classes=2, seed=5) if liars else None
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=draco(adversary=adversary), max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        accumulate_grad_batches=2,
    )
    model = Net()
    out: dict = {}
    fit(out, trainer, model, data())
    planned = [sorted(adversary.lying_ranks(step, WORLD, 0, 1)) for step in range(STEPS)] if liars else []
    out.update(global_step=trainer.global_step, sha=param_digest(model), planned=planned,
               faulty_counts={str(k): v for k, v in trainer.strategy.faulty_counts.items()})
    return out


class UnfrozenLater(Net):
    """Its first layer starts frozen and is unfrozen at the second epoch, after DDP wrapped the model."""

    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.net[0].requires_grad_(True)


def unfrozen_later() -> dict:
    model = UnfrozenLater()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=draco(), max_epochs=2, limit_train_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    out: dict = {}
    fit(out, trainer, model, data())
    out["global_step"] = trainer.global_step
    return out


class SecondOrder(Net):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def re_evaluating_optimizer() -> dict:
    model = SecondOrder()
    before = param_digest(model)
    out: dict = {}
    fit(out, trainer_for(draco()), model, data())
    out["unchanged"] = param_digest(model) == before
    return out


def asynchronous_checkpoints() -> dict:
    """Lightning's AsyncCheckpointIO writes on a thread: the checkpoint exists only once that write ends."""
    folder = os.path.join(os.getcwd(), "asynchronous_checkpoints")
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=draco(ps_rank=1), max_steps=STEPS, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[saver],
        plugins=[L.pytorch.plugins.io.AsyncCheckpointIO()],
    )
    out: dict = {}
    fit(out, trainer, Net(), data())
    dist.barrier()
    out["files"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    out["steps_saved"] = [torch.load(os.path.join(folder, f), weights_only=False)["global_step"]
                          for f in out["files"] if f.endswith(".ckpt")]
    return out


# -- data assignment across loaders and stages ----------------------------------------------------------------------


class Indexed(UnderDDP):
    """Batches ``(x, y, index)``; records the indices each step's partitions trained on."""

    def __init__(self, loader):
        super().__init__()
        self.loader, self.seen = loader, []

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def on_train_batch_start(self, batch, batch_idx):
        whole = self.trainer.strategy.partition_batch
        self.seen.append([self.current_epoch, [part[2].tolist() for part in whole.batches]])

    def train_dataloader(self):
        return self.loader(self)


def indexed(n: int = 24, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return TensorDataset(x, (x.sum(1) > 0).long(), torch.arange(n))


def epochs_trainer(strategy, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=kw.pop("max_epochs", 2), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, **kw,
    )


def reloaded_inconsistent() -> dict:
    """reload_dataloaders_every_n_epochs=1; from the second epoch rank 1 builds its data set differently."""
    def loader(model):
        odd = model.current_epoch == 1 and model.global_rank == 1
        return DataLoader(indexed(seed=99 if odd else 0), batch_size=4, shuffle=True)

    model = Indexed(loader)
    trainer = epochs_trainer(draco(), reload_dataloaders_every_n_epochs=1)
    out: dict = {}
    with recorded(out):
        trainer.fit(model)
    out.update(global_step=trainer.global_step, faulty_counts={str(k): v for k, v in trainer.strategy.faulty_counts.items()})
    return out


def persistent_workers_after_fit() -> dict:
    """Loader workers with persistent_workers=True: DDP's are shut down when fit ends (Lightning's teardown),
    while the Trainer is still held (validate, test, a look at its state)."""
    import multiprocessing

    model = Indexed(lambda m: DataLoader(indexed(), batch_size=4, shuffle=True, num_workers=1, persistent_workers=True))
    trainer = epochs_trainer(draco(), max_epochs=1)
    out: dict = {}
    with recorded(out):
        trainer.fit(model)
    gc.collect()
    out.update(global_step=trainer.global_step, workers_alive=len(multiprocessing.active_children()))
    return out


class AugmentedBeforeTransfer(Net):
    """Random augmentation in ``on_before_batch_transfer``, written for a plain ``(x, y)`` batch, each rank
    with an augmentation stream of its own (as DDP users seed it)."""

    def __init__(self):
        super().__init__()
        self.before_transfer: list = []

    def on_train_epoch_start(self):
        torch.manual_seed(100 + self.global_rank)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        if self.trainer.training:
            self.before_transfer.append([type(batch).__name__, list(x.shape)])
        return x + 0.1 * torch.randn_like(x), y


def augmented_before_transfer(liar: bool, code: str = "frc") -> dict:
    adversary = Adversary(ranks=[2], attack="reverse") if liar else None
    model = AugmentedBeforeTransfer()
    out: dict = {}
    trainer = trainer_for(draco(code=code, adversary=adversary))
    fit(out, trainer, model, data())
    out.update(global_step=trainer.global_step, sha=param_digest(model), before_transfer=model.before_transfer,
               params=[p.detach().double().flatten().tolist() for p in model.parameters()],
               faulty_counts={str(k): v for k, v in trainer.strategy.faulty_counts.items()})
    return out


class HalvedAfterBackward(L.Callback):
    """Records the gradient's norm after the backward, then halves the gradient (a user's own clipping there)."""

    def __init__(self):
        self.norms: list = []

    def on_after_backward(self, trainer, pl_module):
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))
        for grad in grads:
            grad.mul_(0.5)


def reactive(liar: bool, precision: str = "32-true", module: type = Net, callbacks=()) -> dict:
    """Reactive mode (four ranks: groups {0, 1} and {2, 3}); a liar on rank 2 makes every step recompute its
    group on a helper, from the batches loaded again by index."""
    adversary = Adversary(ranks=[2], attack="reverse") if liar else None
    model = module()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=draco(redundancy_mode="reactive", adversary=adversary),
        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, precision=precision, callbacks=list(callbacks),
    )
    out: dict = {}
    fit(out, trainer, model, data())
    out.update(global_step=trainer.global_step, sha=param_digest(model), escalations=trainer.strategy.escalations,
               faulty_counts={str(k): v for k, v in trainer.strategy.faulty_counts.items()})
    return out


def reactive_after_backward(liar: bool) -> dict:
    callback = HalvedAfterBackward()
    return {**reactive(liar, callbacks=[callback]), "norms": callback.norms}


SCENARIOS = {
    "before_transfer_clean": lambda: augmented_before_transfer(False),
    "before_transfer_liar": lambda: augmented_before_transfer(True),
    "before_transfer_crc_clean": lambda: augmented_before_transfer(False, "crc"),
    "before_transfer_crc_liar": lambda: augmented_before_transfer(True, "crc"),
    "reactive_64_clean": lambda: reactive(False, "64-true"),
    "reactive_64_liar": lambda: reactive(True, "64-true"),
    "reactive_before_transfer_clean": lambda: reactive(False, module=AugmentedBeforeTransfer),
    "reactive_before_transfer_liar": lambda: reactive(True, module=AugmentedBeforeTransfer),
    "reactive_after_backward_clean": lambda: reactive_after_backward(False),
    "reactive_after_backward_liar": lambda: reactive_after_backward(True),
    "reactive_averaged_ddp": lambda: averaged("ddp"),
    "reactive_averaged_liar": lambda: averaged("draco", redundancy_mode="reactive",
                                               adversary=Adversary(ranks=[2], attack="reverse")),
    "float16_ddp": lambda: float16_scaled("ddp"),
    "float16_frc": lambda: float16_scaled("frc"),
    "float16_crc": lambda: float16_scaled("crc"),
    "accumulated_clean": lambda: accumulated_poisoning(False),
    "accumulated_poisoning": lambda: accumulated_poisoning(True),
    "unfrozen_later": unfrozen_later,
    "re_evaluating_optimizer": re_evaluating_optimizer,
    "asynchronous_checkpoints": asynchronous_checkpoints,
    "logged_draco": lambda: logged("draco"),
    "logged_ddp": lambda: logged("ddp"),
    "stages": stages,
    "ps_outvoted_raise": lambda: ps_outvoted("raise"),
    "ps_outvoted_skip": lambda: ps_outvoted("skip"),
    "rank_dependent": rank_dependent,
    "inconsistent_data": inconsistent_data,
    "unused_true": lambda: unused("draco_find_unused_parameters_true"),
    "hook_not_registered": hook_not_registered,
    "unused_default": lambda: unused("draco"),
    "reentrant_frc": lambda: reentrant("frc"),
    "reentrant_crc": lambda: reentrant("crc"),
    "reentrant_rank_1": lambda: reentrant("crc", on_rank=1),
    "branch_ddp": lambda: branch("ddp"),
    "branch_draco": lambda: branch("draco"),
    "branch_liar": lambda: branch("liar"),
    "averaged_ddp": lambda: averaged("ddp"),
    "averaged_draco": lambda: averaged("draco"),
    "closure_before_step": closure_before_step,
    "two_training_loaders": two_training_loaders,
    "resumed_inside_a_step": resumed_inside_a_step,
    "persistent_workers_after_fit": persistent_workers_after_fit,
    "reloaded_inconsistent": reloaded_inconsistent,
}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    path, names = sys.argv[1], sys.argv[2:]
    for name in names:
        L.seed_everything(7, verbose=False)
        out = {"name": name, **SCENARIOS[name]()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {k: out.get(k) for k in ("error", "faulty_counts", "skipped", "counts")})
        out["ranks"] = gathered
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            with open(path, "a") as f:
                f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
