"""Every private name of Lightning and torch the project touches, in one place.

Each is checked when the package is imported: if a release renames one, importing
``lightning_draco`` fails with a message naming it, instead of DRACO silently not running (an
unregistered comm hook would leave DDP's plain all-reduce in place, unprotected).
"""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import lightning
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.data import _update_dataloader
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.distributed_c10d import _set_pg_timeout

__all__ = [
    "desired_input_dtype",
    "flatten_dense_tensors",
    "guard_lr_scheduler_step",
    "hpc_save_path",
    "kill_launched_processes",
    "set_process_group_timeout",
    "skips_backward",
    "unflatten_dense_tensors",
    "update_dataloader",
    "wrapped_sampler",
]


def _require(owner: type, name: str, why: str) -> None:
    if not hasattr(owner, name):
        raise ImportError(
            f"lightning_draco needs {owner.__module__}.{owner.__qualname__}.{name} ({why}), which Lightning"
            f" {lightning.__version__} / torch {torch.__version__} does not have: install the versions"
            " pyproject.toml admits."
        )


# DracoStrategy overrides these; a renamed one would never be called.
_require(DDPStrategy, "_register_ddp_hooks", "DRACO registers its comm hook by overriding it")
_require(DDPStrategy, "_configure_launcher", "DRACO checks the world size there, before any process starts")
_require(_SubprocessScriptLauncher, "kill", "a rank that fails alone ends the ranks it launched")
for _hook in ("get_extra_results", "update_main_process_results"):
    _require(_MultiProcessingLauncher, _hook, "spawned or forked ranks hand DRACO's results to the main process")
_require(_CheckpointConnector, "hpc_save_path", "the SLURM requeue names its checkpoint with it")
_require(LightningModule, "_on_before_batch_transfer", "DRACO runs on_before_batch_transfer once per partition")
_require(_FitLoop, "_skip_backward", "reactive mode lets an epoch without backward (StochasticWeightAveraging's) raise"
         " accumulate_grad_batches")

if not hasattr(DistributedSamplerWrapper([0], num_replicas=1, rank=0).dataset, "_sampler"):
    raise ImportError(
        f"lightning_draco needs the user's sampler at DistributedSamplerWrapper(...).dataset._sampler (it draws the"
        f" sampler once per epoch for every partition, and the wrapper's set_epoch reads it there), which Lightning {lightning.__version__} does not have: install"
        " the versions pyproject.toml admits."
    )

update_dataloader = _update_dataloader
flatten_dense_tensors = _flatten_dense_tensors
unflatten_dense_tensors = _unflatten_dense_tensors


def desired_input_dtype(precision_plugin: Any) -> Optional[torch.dtype]:
    """The dtype a ``*-true`` half precision casts the model to ("bf16-true", "16-true"), else ``None``."""
    if isinstance(precision_plugin, HalfPrecision):
        return precision_plugin._desired_input_dtype  # an AttributeError here means it was renamed
    return None


def kill_launched_processes(launcher: Any, grace: float = 2.0) -> None:
    """End the ranks this process started, as torchrun and srun do with theirs (no-op for other launchers).

    They get ``grace`` seconds to end on their own first: a rank that failed at the same moment (its own
    collective timeout) then says why in its one line instead of being killed before it prints it.
    """
    if isinstance(launcher, _SubprocessScriptLauncher):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(proc.poll() is None for proc in launcher.procs):
            time.sleep(0.05)
        launcher.kill(signal.SIGKILL)


def skips_backward(trainer: Any) -> bool:
    """Whether the fit loop runs its training steps without a backward (StochasticWeightAveraging's last epoch,
    which recomputes BatchNorm statistics, sets it with an ``accumulate_grad_batches`` of the epoch's length)."""
    return bool(trainer.fit_loop._skip_backward)


def hpc_save_path(trainer: Any) -> str:
    """Where Lightning writes (and, under SLURM, resumes from) the next ``hpc_ckpt_<n>.ckpt``."""
    return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)


def set_process_group_timeout(timeout: timedelta, group: Optional[dist.ProcessGroup] = None) -> None:
    """Change a process group's collective timeout after it was created (the rendezvous had its own)."""
    _set_pg_timeout(timeout, group)


def guard_lr_scheduler_step(module: Any, skip: Callable[[Any], bool]) -> Callable[[], None]:
    """Make ``module.lr_scheduler_step(scheduler, metric)`` do nothing while ``skip(scheduler)``.

    Lightning offers no strategy hook around the scheduler step, so the module's own method is
    shadowed on the instance. Returns the function that removes the shadow.
    """
    original = module.lr_scheduler_step

    def lr_scheduler_step(scheduler: Any, metric: Any = None) -> None:
        if not skip(scheduler):
            original(scheduler, metric)

    module.lr_scheduler_step = lr_scheduler_step

    def remove() -> None:
        if module.__dict__.get("lr_scheduler_step") is lr_scheduler_step:
            del module.__dict__["lr_scheduler_step"]

    return remove


def wrapped_sampler(sampler: Any) -> Optional[Any]:
    """The user's own sampler that Lightning wrapped for distributed training (None for any other sampler).

    Lightning's wrapper draws it again each time the wrapper is iterated, under whatever RNG state
    that process has then.
    """
    return sampler.dataset._sampler if isinstance(sampler, DistributedSamplerWrapper) else None
