"""SLURM auto-requeue at a step boundary, decided by the PS.

Lightning's own handler saves the checkpoint from inside the signal handler. Under DRACO that
handler can run on one rank between two buckets' collectives while another rank is still in its
exchange, so the checkpoint's barrier meets a gather, and the job hangs. Here the handler only
records the signal:

1. SIGUSR1 (``SLURMEnvironment.requeue_signal``) sets a flag on each rank that receives it.
2. After every optimizer step the PS broadcasts its flag: every rank acts at the same step, and
   no worker can trigger (or veto) a requeue.
3. At the end of that batch (where Lightning's step checkpoints are taken, so resume is exact)
   every rank saves ``hpc_ckpt_<n>.ckpt`` into ``default_root_dir`` (``n`` as rank 0 found it), rank 0 runs
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
        # Rank 0 writes the checkpoint, and names it from the files it sees; a PS on another rank writes its
        # state beside it (``<checkpoint>.ps``) and must use the same name, though rank 0's file may already
        # be there when it looks (the next number, a sidecar the resumed PS never finds).
        path = trainer.strategy.broadcast(hpc_save_path(trainer), src=0)
        rank_zero_info(f"DRACO: SLURM asked to stop; saving {path} at step {trainer.global_step} and requeueing.")
        for logger in trainer.loggers:
            logger.finalize("requeued")
        trainer.save_checkpoint(path)  # returns on every rank once the file is complete
        # Not requeued (a job submitted with --no-requeue, a cluster with JobRequeue=0): the job stops here
        # unfinished, so rank 0 exits with an error, which SLURM reports as FAILED, not COMPLETED.
        not_requeued = trainer.is_global_zero and _requeue() != 0
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave now, at a clean point: a requeued job's processes are killed by SLURM anyway.
        os._exit(1 if not_requeued else 0)


def _requeue() -> Optional[int]:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        rank_zero_warn(
            f"DRACO: `scontrol requeue {job}` failed ({done.returncode}): {done.stderr.strip()}. The job stops"
            " unfinished, with exit status 1; its hpc_ckpt checkpoint is saved in the run directory (a job submitted"
            " again resumes from it when given that directory: hydra.run.dir=...)."
        )
    return done.returncode
