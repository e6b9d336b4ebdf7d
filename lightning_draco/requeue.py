"""SLURM auto-requeue at a step boundary, decided by the PS.

Lightning's own handler saves the checkpoint from inside the signal handler. Under DRACO that
handler can run on one rank between two buckets' collectives while another rank is still in its
exchange, so the checkpoint's barrier meets a gather, and the job hangs. Here the handler only
records the signal:

1. SIGUSR1 (``SLURMEnvironment.requeue_signal``) sets a flag on each rank that receives it.
2. After every optimizer step the PS broadcasts its flag: every rank acts at the same step, and
   no worker can trigger (or veto) a requeue.
3. At the end of that batch (where Lightning's step checkpoints are taken, so resume is exact)
   every rank writes ``hpc_ckpt_<n>.ckpt`` into ``default_root_dir``, rank 0 runs
   ``scontrol requeue``, and the processes exit. The requeued job finds the checkpoint (Lightning
   resumes from the newest ``hpc_ckpt`` when ``ckpt_path`` is None under SLURM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_draco._compat import hpc_save_path

__all__ = ["SlurmRequeue"]


class SlurmRequeue(Callback):
    """Installed by ``DracoStrategy`` under SLURM when ``SLURMEnvironment.auto_requeue`` is on."""

    def __init__(self, signum: int, ps_rank: int):
        self.signum = signum
        self.ps_rank = ps_rank
        self.received = False
        self.agreed = False
        self._previous: Any = None

    def install(self) -> None:
        """Register the flag-only handler (before Lightning's, which then stands aside)."""
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True

    def agree(self, device: torch.device) -> None:
        """After an optimizer step: adopt the PS's flag (one byte broadcast)."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.uint8, device=device)
        dist.broadcast(flag, src=self.ps_rank)
        self.agreed = bool(flag.item())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.agreed:
            return
        path = hpc_save_path(trainer)
        rank_zero_info(f"DRACO: SLURM asked to stop; saving {path} at step {trainer.global_step} and requeueing.")
        for logger in trainer.loggers:
            logger.finalize("requeued")
        trainer.save_checkpoint(path)  # returns on every rank once the file is complete
        if trainer.is_global_zero:
            _requeue()
        sys.stdout.flush()
        sys.stderr.flush()
        # The job is requeued: SLURM will kill these processes; leave now, at a clean point.
        os._exit(0)


def _requeue() -> Optional[int]:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        rank_zero_warn(f"DRACO: `scontrol requeue {job}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.returncode
