"""``DracoStrategy``: DDP whose all-reduce is replaced by DRACO's coded exchange and decode."""

from __future__ import annotations

import inspect
import itertools
import os
import signal
import socket
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_draco._seeding import seeded_rng
from lightning_draco.adversary import Adversary
from lightning_draco.aggregators import Aggregator, make_aggregator, with_pre_aggregators
from lightning_draco.batch_view import BatchHookView
from lightning_draco.codes import Code, DracoDecodeError, NonFiniteGradientError, code_class
from lightning_draco.codes.aggregated import AggregatedCode
from lightning_draco.consistency import check_first_batch, explain_decode_failure
from lightning_draco.data import DracoDataLoader, PartitionBatch, partition_seed, transfer_seed
from lightning_draco.hook import DracoHookState, draco_hook
from lightning_draco.partition_logging import mean_over_partitions
from lightning_draco.report import FaultLedger
from lightning_draco.requeue import SlurmRequeue

__all__ = ["DracoStrategy", "IncompatibleCheckpointError"]

_FAILURE_MODES = ("raise", "skip")
_AGGREGATE_OVER = ("whole", "bucket")
_CHECKPOINT_KEY = "draco"
_OWN_HOOK_ARGS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
_UNUSED_PARAMETERS_ERROR = "Expected to have finished reduction in the prior iteration"
_UNUSED_PARAMETERS_MESSAGE = (
    "It looks like your LightningModule has parameters that were not used in producing the loss returned by"
    " training_step. If this is intentional, enable DDP's detection of unused parameters under DRACO:"
    " strategy='draco_find_unused_parameters_true', or DracoStrategy(find_unused_parameters=True)."
)


class IncompatibleCheckpointError(ValueError):
    """A checkpoint written under another world size, code, ``s`` or ``r``: its partitions mean other data."""


class DracoStrategy(DDPStrategy):
    """Byzantine-resilient data-parallel training: DDP with DRACO's coded gradients.

    Each of the ``P`` ranks computes the gradients of the partitions its code assigns (one
    forward per partition, one backward), sends one coded vector per bucket to the parameter
    server (PS), and gets back the exact mean of the ``P`` partition gradients, whatever up to
    ``num_adversaries`` ranks sent.

    Args:
        code: ``"frc"`` (fractional repetition, needs ``redundancy | P``), ``"crc"`` (cyclic
            repetition, any ``P >= 2s + 1``), ``"none"`` (plain averaging through the same
            exchange: the baseline), or any registered code.
        num_adversaries: ``s``, the number of Byzantine ranks to tolerate. 0 means no redundancy.
        redundancy: ``r``, partitions per rank; at least and by default ``2s + 1``.
        ps_rank: the trusted rank that decodes (also a worker).
        adversary: simulated Byzantine ranks (``Adversary`` or a dict of its arguments).
        tolerance: how far honest replicas of a partition's gradient may differ, relative to their
            norm, beyond rounding (non-deterministic kernels). ``None``: each code's default
            (repetition: 1e-5, used only when no value is sent bit for bit by s+1 members;
            cyclic: the wire dtype's rounding alone).
        on_decode_failure: ``"raise"`` a ``DracoDecodeError`` on every rank, or ``"skip"`` the
            optimizer and scheduler step on every rank, count it and go on.
        max_faulty_steps: stop the run once a rank has been caught at more steps than this.
        seed: seeds per-partition randomness (dropout, augmentation, data-loader workers);
            defaults to ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
        projection_secret: the PS's secret for codes that project what they receive; drawn from
            OS entropy when ``None``. Fix it only for reproducible tests.
        check_finite: treat a decoded gradient with NaN/Inf as a failed step (the honest ranks
            agree on it: the model diverged). Default: on, except for ``code="none"`` without an
            aggregator, which behaves as plain DDP does.
        broadcast_buffers: copy the PS's buffers (e.g. BatchNorm running statistics) to every
            rank once per optimizer step, after it.
        aggregator: a robust rule (``"median"``, ``"trimmed_mean"``, ``"geometric_median"``,
            ``"krum"``, ``"multi_krum"``, ``"bulyan"``, ``"centered_clipping"``, ``"mean"``, or an
            ``Aggregator``) applied by the PS: over the P received vectors with ``code="none"``,
            over the verified group sums with ``code="frc"`` (DETOX). Its ``num_byzantine`` is
            ``num_adversaries`` unless ``aggregator_options`` says otherwise.
        aggregator_options: keyword options of the rule (``tau=``, ``m=``, ``num_byzantine=`` ...).
        pre_aggregators: applied in order before the rule (``"nnm"``, ``"bucketing"``, ``"arc"``,
            ``{"name": "clipping", "threshold": C}``, or ``PreAggregator`` instances), also over
            DETOX's group sums; they tolerate the rule's ``num_byzantine``.
        aggregate_over: ``"whole"`` (default): the rule sees each step's whole flattened
            gradient; the PS then holds ``P x`` the model's gradient. ``"bucket"``: the rule runs
            per DDP bucket (what the 2018 baseline did per layer), holding one bucket.
        timeout: the process-group timeout (a ``timedelta`` or seconds): a rank that stops
            answering makes every collective waiting on it fail after this long, never hang.
            Default: torch's (30 minutes).
        **kwargs: passed to ``DDPStrategy`` (``bucket_cap_mb``, ``start_method``,
            ``process_group_backend``, ...). DDP's own comm-hook arguments are refused.
    """

    strategy_name = "draco"

    def __init__(
        self,
        code: str = "frc",
        num_adversaries: int = 1,
        redundancy: Optional[int] = None,
        ps_rank: int = 0,
        adversary: Union[Adversary, dict, None] = None,
        tolerance: Optional[float] = None,
        on_decode_failure: str = "raise",
        max_faulty_steps: Optional[int] = None,
        seed: Optional[int] = None,
        projection_secret: Optional[int] = None,
        check_finite: Optional[bool] = None,
        broadcast_buffers: bool = True,
        aggregator: Union[str, Aggregator, None] = None,
        aggregator_options: Optional[dict] = None,
        aggregate_over: str = "whole",
        timeout: Union[timedelta, float, None] = None,
        pre_aggregators: Optional[list] = None,
        **kwargs: Any,
    ) -> None:
        for name in _OWN_HOOK_ARGS:
            # LightningCLI passes every inherited argument, these with their default None: only a value is refused.
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} cannot be set on DracoStrategy: its communication is DRACO's own hook.")
        self._code_cls = code_class(code)
        if redundancy is None:
            redundancy = self._code_cls.default_redundancy(num_adversaries) if isinstance(num_adversaries, int) else 1
        self._code_cls.check(num_adversaries, redundancy)
        if not isinstance(ps_rank, int) or isinstance(ps_rank, bool) or ps_rank < 0:
            raise ValueError(f"ps_rank must be an integer >= 0 (got {ps_rank!r}).")
        if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
            raise ValueError(f"tolerance must be None or a number in [0, 1) (got {tolerance!r}).")
        if on_decode_failure not in _FAILURE_MODES:
            raise ValueError(f"on_decode_failure must be one of {', '.join(_FAILURE_MODES)} (got {on_decode_failure!r}).")
        if max_faulty_steps is not None and (not isinstance(max_faulty_steps, int) or max_faulty_steps < 0):
            raise ValueError(f"max_faulty_steps must be None or an integer >= 0 (got {max_faulty_steps!r}).")
        if aggregate_over not in _AGGREGATE_OVER:
            raise ValueError(f"aggregate_over must be one of {', '.join(_AGGREGATE_OVER)} (got {aggregate_over!r}).")
        if isinstance(aggregator, str):
            options = dict(aggregator_options or {})
            aggregator = make_aggregator(aggregator, options.pop("num_byzantine", num_adversaries), **options)
        if pre_aggregators:
            if not isinstance(aggregator, Aggregator):
                raise ValueError(f"pre_aggregators need an aggregator to feed (got aggregator={aggregator!r}).")
            aggregator = with_pre_aggregators(aggregator, pre_aggregators)
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise ValueError(f"aggregator must be a rule's name, an Aggregator or None (got {aggregator!r}).")
        if aggregator is not None and not self._code_cls.supports_aggregation:
            raise ValueError(
                f"code={code!r} cannot be combined with an aggregator: use code='none' (robust aggregation) or"
                " code='frc' (DETOX: a vote inside groups, then the rule across groups)."
            )
        if isinstance(adversary, dict):
            adversary = Adversary(**adversary)
        if adversary is not None and not isinstance(adversary, Adversary):
            raise ValueError(f"adversary must be an Adversary, a dict of its arguments or None (got {adversary!r}).")
        self._adversary_warnings = adversary.check(None, ps_rank, num_adversaries) if adversary else []

        if timeout is not None:
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
                timeout = timedelta(seconds=timeout)
            if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
                raise ValueError(f"timeout must be a positive number of seconds or a timedelta (got {timeout!r}).")
            kwargs["timeout"] = timeout
        kwargs["broadcast_buffers"] = False  # DDP's per-forward broadcast from rank 0; ours is per step, from the PS
        super().__init__(**kwargs)
        self.code_name = code
        self.num_adversaries = num_adversaries
        self.redundancy = redundancy
        self.ps_rank = ps_rank
        self.adversary = adversary
        self.tolerance = None if tolerance is None else float(tolerance)
        self.on_decode_failure = on_decode_failure
        self.max_faulty_steps = max_faulty_steps
        self.seed = seed
        self.projection_secret = projection_secret
        self.check_finite = check_finite if check_finite is not None else (code != "none" or aggregator is not None)
        self.sync_buffers = broadcast_buffers
        self.aggregator = aggregator
        self.aggregate_over = aggregate_over

        self.code: Optional[Code] = None
        self._hook_state: Optional[DracoHookState] = None
        self.ledger = FaultLedger([])
        self._skip_current_step = False
        self._train_loader: Optional[DracoDataLoader] = None
        self._last_batch: Optional[PartitionBatch] = None
        self._requeue: Optional[SlurmRequeue] = None
        self._scheduler_guard: Optional[Callable] = None
        # The weighted partitions' gradients, added to ``.grad`` just before the last backward.
        self._pending_grads: Optional[tuple[list[Tensor], list[Optional[Tensor]]]] = None
        #: This rank's ``PartitionBatch`` for the current training step (the batches of all its
        #: partitions); the batch hooks receive only its first partition's batch.
        self.partition_batch: Optional[PartitionBatch] = None
        self._batch_hooks = BatchHookView()
        self._check_data = False

    # -- configuration --------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        # The world size (and the precision) are known once the Trainer is built: refuse them
        # before any process starts.
        world_size = self.num_nodes * self.num_processes
        self._check_world(world_size)
        dtype = getattr(self.precision_plugin, "_desired_input_dtype", None)  # "bf16-true", "16-true"
        if dtype is not None:
            self._make_code(world_size).check_wire_dtype(dtype)

    def _check_world(self, world_size: int) -> None:
        self._code_cls.check(self.num_adversaries, self.redundancy, world_size)
        if self.ps_rank >= world_size:
            raise ValueError(f"ps_rank must be in [0, {world_size}) for a world of {world_size} ranks (got {self.ps_rank}).")
        if self.adversary is not None:
            self.adversary.check(world_size, self.ps_rank, self.num_adversaries)
        if self.aggregator is not None:
            self.aggregator.check(world_size // self.redundancy)

    def _make_code(self, world_size: int) -> Code:
        options = {}
        if self.tolerance is not None and "tolerance" in inspect.signature(self._code_cls).parameters:
            options["tolerance"] = self.tolerance
        code = self._code_cls(world_size, self.num_adversaries, self.redundancy, **options)
        return code if self.aggregator is None else AggregatedCode(code, self.aggregator)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        world_size, rank = self.world_size, self.global_rank
        self._check_world(world_size)
        for message in self._adversary_warnings:
            rank_zero_warn(message)
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            rank_zero_warn(
                "torchrun restarts with the agent's shared store can reconnect to the failed attempt's addresses and"
                " fail; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so each attempt gets a fresh store."
            )
        self.code = self._make_code(world_size)
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        secret = self.projection_secret
        if secret is None:
            secret = int.from_bytes(os.urandom(8), "little") >> 1 if rank == self.ps_rank else 0
        self._hook_state = DracoHookState(
            self.code,
            rank,
            self.ps_rank,
            adversary=self.adversary,
            check_finite=self.check_finite,
            secret=secret,
            # Rules such as Krum or the geometric median are defined on whole gradients.
            whole_step=self.aggregator is not None and self.aggregate_over == "whole",
        )
        environment = self.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
            # Replaces Lightning's handler, which checkpoints from inside the signal (see requeue.py).
            self._requeue = SlurmRequeue(environment.requeue_signal, self.ps_rank)
            self._requeue.install()
        hostnames: list[Any] = [None] * world_size
        dist.all_gather_object(hostnames, socket.gethostname())
        if len(self.ledger.hostnames) == world_size:
            # validate/test/predict after fit on the same Trainer: keep who was caught during fit.
            self.ledger.hostnames = hostnames
        else:
            self.ledger = FaultLedger(hostnames, self.max_faulty_steps)

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        if trainer.state.fn == "fit" and not trainer.lightning_module.automatic_optimization:
            raise ValueError(
                "DracoStrategy supports automatic optimization only: set automatic_optimization = True"
                " in your LightningModule (manual optimizer steps bypass the decode-failure handling)."
            )
        super().setup(trainer)
        if trainer.state.fn == "fit":
            trained = [p for p in trainer.lightning_module.parameters() if p.requires_grad]
            dtypes = sorted({p.dtype for p in trained}, key=str)
            for dtype in dtypes:
                self.code.check_wire_dtype(dtype)
            if self._hook_state.whole_step:
                if len(dtypes) > 1:
                    raise ValueError(
                        "aggregate_over='whole' needs every trained parameter in one dtype (got"
                        f" {', '.join(map(str, dtypes))}); use aggregate_over='bucket'."
                    )
                self._hook_state.total_numel = sum(p.numel() for p in trained)
                offsets = itertools.accumulate((p.numel() for p in trained), initial=0)
                self._hook_state.layout = {p.data_ptr(): offset for p, offset in zip(trained, offsets)}
            self._guard_schedulers(trainer.lightning_module)
            if self._requeue is not None and self._requeue not in trainer.callbacks:
                trainer.callbacks.append(self._requeue)
            self._batch_hooks.install(trainer)
            self._check_data = True

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        # DDP copied rank 0's state; the PS is the only authority on the initial model.
        module = self.model.module
        self._broadcast_from_ps(list(module.parameters()) + list(module.buffers()))

    @override
    def _register_ddp_hooks(self) -> None:
        # DDPStrategy registers hooks on CUDA only; DRACO needs its hook on every device.
        self.model.register_comm_hook(self._hook_state, draco_hook)

    # -- data -----------------------------------------------------------------------------
    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or not isinstance(dataloader, DataLoader):
            return dataloader
        self._train_loader = DracoDataLoader(dataloader, self.code.partitions(self.global_rank), self.world_size, self.seed)
        return self._train_loader

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        if not isinstance(batch, PartitionBatch):
            return super().batch_to_device(batch, device, dataloader_idx)
        if self._check_data:
            # Once per fit, before the first step: holders of a partition must have loaded the same data.
            self._check_data = False
            check_first_batch(batch, self.world_size)
        moved = []
        for partition, part in zip(batch.partitions, batch.batches):
            with seeded_rng(transfer_seed(self.seed, batch.epoch, batch.index, partition), self.root_device):
                moved.append(super().batch_to_device(part, device, dataloader_idx))
        self.partition_batch = batch._replace(batches=moved)
        return self.partition_batch

    # -- the step -------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.pop("batch")
        if not isinstance(batch, PartitionBatch):
            return super().training_step(*args, **kwargs)
        self._last_batch = batch
        weights = self.code.coefficients(self.global_rank)
        with mean_over_partitions(self.lightning_module):
            if all(weight == 1.0 for weight in weights):
                return self._summed_step(batch, args[1:], kwargs)
            return self._weighted_step(batch, weights, args[1:], kwargs)

    def _partition_forward(self, batch: PartitionBatch, index: int, args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        """The user's training step on one partition, under that partition's seeds; its output and loss."""
        partition, part = batch.partitions[index], batch.batches[index]
        if self.adversary is not None and self.adversary.acts_on_batch and self.global_rank in self._hook_state.liars:
            part = self.adversary.poison(part, rank=self.global_rank, step=self._hook_state.step)
        with seeded_rng(partition_seed(self.seed, batch.epoch, batch.index, partition), self.root_device):
            output = super().training_step(part, *args, **kwargs)
        loss = _loss_of(output)
        if loss is None:
            raise ValueError(
                "DracoStrategy needs training_step to return a loss (a tensor, or a dict with 'loss') for every"
                f" partition; it returned {output!r} for partition {partition}."
            )
        return output, loss

    def _summed_step(self, batch: PartitionBatch, args: tuple, kwargs: dict) -> Any:
        """Weights all 1 (the repetition code): one forward per partition, one backward of the summed losses.

        Every holder of the group runs the same graphs in the same order, so the replicas of the
        coded gradient are bitwise equal, whatever the precision.
        """
        coded: Optional[Tensor] = None
        losses = []
        output: Any = None
        for index in range(len(batch.partitions)):
            output, loss = self._partition_forward(batch, index, args, kwargs)
            coded = loss if coded is None else coded + loss
            losses.append(loss.detach())
        self._hook_state.scale = 1.0
        # The value is the mean partition loss (what the progress bar shows); the gradient is the coded one.
        mean = torch.stack(losses).mean()
        return _with_loss(output, coded + (mean - coded).detach())

    def _weighted_step(self, batch: PartitionBatch, weights: list[float], args: tuple, kwargs: dict) -> Any:
        """Rank i's coded gradient ``sum_j W[i, j] g_j`` with every ``g_j`` computed as its other holders do.

        A weight inside the backward (``sum_j W[i, j] loss_j``) would scale the upstream gradient
        inside reduced-precision kernels (bf16 autocast, TF32), so each holder's copy of ``g_j`` would
        round differently. Instead each partition gets its own unweighted backward, and the weights
        are applied afterwards, in the parameters' dtype (Horner's rule, dividing by ``w_last``):

        1. Partitions ``0 .. k-1`` (non-zero weights only) run forward under ``no_sync`` and backward
           with ``torch.autograd.grad`` into a side buffer ``S``: before adding ``g_k``, ``S`` is
           multiplied by ``w_{k-1} / w_k``; at the end by ``w_{k-1} / w_last``.
        2. The last partition's forward is synced; Lightning's closure zeroes the gradients (when it
           would), then ``backward`` adds ``S`` to ``.grad`` and runs the last backward, which fires
           the hook: ``.grad`` holds ``sum_j w_j g_j / w_last`` (plus earlier micro-batches' share).
        3. The hook multiplies the bucket by ``w_last`` before it leaves.

        Every backward sees Lightning's loss normalisation (gradient accumulation) and scaling.
        The partitions' graphs live one at a time, not all at once.
        """
        held = [(index, weight) for index, weight in enumerate(weights) if weight != 0.0]
        trainer = self.lightning_module.trainer
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        scaler = getattr(self.precision_plugin, "scaler", None)
        normalize = max(int(trainer.accumulate_grad_batches), 1)
        last_weight = held[-1][1]
        side: Optional[list[Optional[Tensor]]] = None
        losses = []
        previous = last_weight
        output: Any = None
        loss: Optional[Tensor] = None
        for position, (index, weight) in enumerate(held):
            if side is not None:
                _scale_grads(side, previous / weight)
            previous = weight
            if position == len(held) - 1:
                output, loss = self._partition_forward(batch, index, args, kwargs)
            else:
                with self.model.no_sync():
                    output, loss = self._partition_forward(batch, index, args, kwargs)
                inner = loss / normalize if normalize > 1 else loss
                grads = torch.autograd.grad(scaler.scale(inner) if scaler is not None else inner, params, allow_unused=True)
                side = list(grads) if side is None else [_add(s, g) for s, g in zip(side, grads)]
            losses.append(loss.detach())
        self._pending_grads = None if side is None else (params, side)
        self._hook_state.scale = last_weight
        mean = torch.stack(losses).mean()
        return _with_loss(output, loss + (mean - loss).detach())

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        pending, self._pending_grads = self._pending_grads, None
        if pending is not None:  # the weighted partitions' share, after Lightning zeroed the gradients
            for param, share in zip(*pending):
                if share is not None:
                    param.grad = share if param.grad is None else param.grad.add_(share)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the closure (forwards, backward, coded exchange), then step only if the decode succeeded."""
        trainer = self.lightning_module.trainer
        state = self._hook_state
        step = trainer.global_step
        state.begin_step(step)
        result = closure()
        error: Optional[Exception] = state.failure
        if isinstance(error, DracoDecodeError):
            error = explain_decode_failure(error)
        if error is None and state.nonfinite:
            error = NonFiniteGradientError(
                f"DRACO step {step}: the honest ranks agree on a gradient with NaN or Inf in it; no rank lied, the"
                " model has diverged (lower the learning rate, clip gradients or check the loss)."
            )
        self._skip_current_step = error is not None
        self._record(trainer, step, state.caught, skipped=error is not None and self.on_decode_failure == "skip")
        if error is not None and self.on_decode_failure == "raise":
            raise error
        if error is not None:
            rank_zero_warn(f"{error} The optimizer and scheduler step are skipped (on_decode_failure='skip').")
            output = result
        else:
            output = super().optimizer_step(optimizer, lambda: result, model, **kwargs)
        if self.sync_buffers:
            # Each rank ran its own partitions' forwards; the PS's running statistics are the model's.
            self._broadcast_from_ps(list(self.model.module.buffers()))
        if self._train_loader is not None and self._last_batch is not None:
            self._train_loader.note_trained(self._last_batch)
        if self._requeue is not None:
            self._requeue.agree(self.root_device)
        return output

    def _record(self, trainer: "pl.Trainer", step: int, caught: set[int], skipped: bool) -> None:
        for message in self.ledger.record(step, caught, skipped):
            rank_zero_warn(message)
        if self.global_rank == 0 and (caught or skipped or step % max(trainer.log_every_n_steps, 1) == 0):
            for logger in trainer.loggers:
                logger.log_metrics(self.ledger.metrics(caught), step=step)
        over = self.ledger.over_threshold()
        if over and not trainer.should_stop:
            rank_zero_warn(
                f"DRACO: ranks {over} were caught at more than max_faulty_steps={self.max_faulty_steps} steps;"
                " stopping the run."
            )
            trainer.should_stop = True

    @property
    def faulty_counts(self) -> dict[int, int]:
        """Rank -> number of steps at which the PS caught it sending a faulty gradient."""
        return self.ledger.counts()

    @property
    def skipped_steps(self) -> int:
        return self.ledger.skipped_steps

    @property
    def exchange_seconds(self) -> dict[str, float]:
        """Seconds this rank spent in the exchange's collectives and, on the PS, decoding (since setup)."""
        return dict(self._hook_state.seconds) if self._hook_state is not None else {"communication": 0.0, "decode": 0.0}

    @property
    def hook_calls(self) -> int:
        """Buckets exchanged through the DRACO hook on this rank so far."""
        return self._hook_state.calls if self._hook_state is not None else 0

    # -- schedulers -----------------------------------------------------------------------
    def _guard_schedulers(self, module: "pl.LightningModule") -> None:
        """A skipped step must not move per-step LR schedulers either."""
        original = module.lr_scheduler_step

        def lr_scheduler_step(scheduler: Any, metric: Any = None) -> None:
            if self._skip_current_step and self._steps_per_batch(scheduler):
                return
            original(scheduler, metric)

        module.lr_scheduler_step = lr_scheduler_step
        self._scheduler_guard = lr_scheduler_step

    def _steps_per_batch(self, scheduler: Any) -> bool:
        return any(c.scheduler is scheduler and c.interval == "step" for c in self.lr_scheduler_configs)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        rank_zero_info(self.ledger.summary())

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if self._scheduler_guard is not None and module is not None:
            if module.__dict__.get("lr_scheduler_step") is self._scheduler_guard:
                del module.__dict__["lr_scheduler_step"]
            self._scheduler_guard = None
        self._batch_hooks.uninstall()
        self.partition_batch = None
        self._check_data = False
        if self._requeue is not None:
            self._requeue.uninstall()
            if module is not None and module._trainer is not None and self._requeue in module.trainer.callbacks:
                module.trainer.callbacks.remove(self._requeue)
            self._requeue = None
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Before DDP's own rewording, which names strategy='ddp_find_unused_parameters_true'.
        exception.args = tuple(
            _UNUSED_PARAMETERS_MESSAGE if isinstance(arg, str) and _UNUSED_PARAMETERS_ERROR in arg else arg
            for arg in exception.args
        )
        super().on_exception(exception)
        if isinstance(exception, (DracoDecodeError, NonFiniteGradientError, ValueError)):
            return  # raised by every rank together: the others are not waiting for this one
        # Anything else (a lost or stalled peer, a crash on this rank alone) leaves the other ranks
        # blocked in a collective until the timeout, or for ever if one is stopped: end the ranks this
        # process started, as torchrun and srun do with theirs.
        if isinstance(self.launcher, _SubprocessScriptLauncher):
            self.launcher.kill(signal.SIGKILL)

    # -- checkpoints ----------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Add DRACO's state, write atomically; the PS's own state goes only where no worker reads it.

        The PS's state is its projection secret, the decoder's state (the cyclic code's first set
        to certify) and the state of a stateful aggregator (centred clipping's anchor). With the PS on rank 0 (the default) it is in the checkpoint that rank 0
        writes. Otherwise the PS writes it to ``<checkpoint>.ps`` itself: rank 0 is a worker and
        must not learn the secret.
        """
        checkpoint[_CHECKPOINT_KEY] = {**self._resume_conditions(), "ledger": self.ledger.state_dict()}
        if self._hook_state is not None and self._hook_state.is_ps:
            ps_state = {
                "projection_secret": self._hook_state.secret,
                "aggregator": self.aggregator.state_dict() if self.aggregator is not None else {},
                "decoder": self.code.state_dict(),
            }
            if self.global_rank == 0:
                checkpoint[_CHECKPOINT_KEY].update(ps_state)
            else:
                sidecar = _ps_sidecar(filepath)
                # Rank 0 creates the checkpoint's folder when it writes; the PS may get here first.
                os.makedirs(os.path.dirname(sidecar) or ".", exist_ok=True)
                _write_then_rename(sidecar, lambda path: torch.save(ps_state, path))
        if not self.is_global_zero or "://" in os.fspath(filepath):
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        _write_then_rename(filepath, lambda path: super(DracoStrategy, self).save_checkpoint(checkpoint, path, storage_options))

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is None:
            return checkpoint
        self.check_resumable(state)
        self.ledger.load_state_dict(state["ledger"])
        if self._hook_state is not None and self._hook_state.is_ps:
            ps_state = state
            sidecar = _ps_sidecar(checkpoint_path)
            if "projection_secret" not in state and os.path.exists(sidecar):
                ps_state = torch.load(sidecar, weights_only=True)
            secret = ps_state.get("projection_secret")
            if secret is not None and self.projection_secret is None:
                self._hook_state.secret = int(secret)
            if self.aggregator is not None and ps_state.get("aggregator"):
                self.aggregator.load_state_dict(ps_state["aggregator"])
            self.code.load_state_dict(ps_state.get("decoder") or {})
        return checkpoint

    def check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written under another world size or code: its partitions mean other data."""
        for key, value in self._resume_conditions().items():
            if state.get(key) != value:
                raise IncompatibleCheckpointError(
                    f"the checkpoint was written with {key}={state.get(key)!r} but this run has {key}={value!r};"
                    " DRACO resumes only under the same world size, code, num_adversaries and redundancy."
                )

    def _resume_conditions(self) -> dict[str, Any]:
        """What a checkpoint records and a resume must match: the partitions mean the same data."""
        return {"world_size": self.world_size, "code": self.code_name, "num_adversaries": self.num_adversaries,
                "redundancy": self.redundancy}

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self._hook_state is not None and self._hook_state.is_ps and self.global_rank != 0:
            sidecar = _ps_sidecar(filepath)
            if os.path.exists(sidecar):
                os.remove(sidecar)

    # -- helpers --------------------------------------------------------------------------
    def _broadcast_from_ps(self, tensors: Iterable[Tensor]) -> None:
        groups: dict[tuple, list[Tensor]] = defaultdict(list)
        for tensor in tensors:
            groups[(tensor.dtype, tensor.device)].append(tensor.data)
        for same in groups.values():
            flat = _flatten_dense_tensors(same)
            dist.broadcast(flat, src=self.ps_rank)
            for tensor, value in zip(same, _unflatten_dense_tensors(flat, same)):
                tensor.copy_(value)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = (
            (cls.strategy_name, "DRACO: Byzantine-resilient DDP (repetition code, s=1, r=3)", {}),
            (
                f"{cls.strategy_name}_find_unused_parameters_true",
                "DRACO: Byzantine-resilient DDP (repetition code, s=1, r=3) with `find_unused_parameters=True`",
                {"find_unused_parameters": True},
            ),
            # LightningCLI's --trainer.strategy=lightning_draco.DracoStrategy with no init_args reaches the
            # Trainer as that string, which Lightning lowercases and looks up here.
            ("lightning_draco.dracostrategy", "DRACO: the class path, as LightningCLI passes it without init_args", {}),
        )
        for name, description, options in entries:
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **options)


def _write_then_rename(path: Any, write: Callable[[str], None]) -> None:
    """``write`` to ``<path>.partial``, then rename: a rank killed while saving leaves the previous file whole."""
    partial = os.fspath(path) + ".partial"
    write(partial)
    os.replace(partial, path)


def _ps_sidecar(checkpoint_path: Any) -> str:
    return os.fspath(checkpoint_path) + ".ps"


def _scale_grads(grads: list[Optional[Tensor]], factor: float) -> None:
    """Multiply every gradient by ``factor`` in place (None stays None: it means zero)."""
    present = [g for g in grads if g is not None]
    if factor != 1.0 and present:
        torch._foreach_mul_(present, factor)


def _add(total: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    if term is None:
        return total
    return term if total is None else total.add_(term)


def _loss_of(output: Any) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None


def _with_loss(output: Any, loss: Tensor) -> Any:
    if isinstance(output, dict):
        return {**output, "loss": loss}
    return loss
