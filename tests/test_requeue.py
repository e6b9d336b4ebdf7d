"""SLURM requeue: the handler only raises a flag; the PS's flag decides; the checkpoint comes first."""

import os
import signal
from types import SimpleNamespace

import pytest

from lightning_draco import requeue
from lightning_draco.requeue import SlurmRequeue


def test_the_signal_only_sets_a_flag_and_the_previous_handler_comes_back():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda *a: seen.append("previous"))
    try:
        callback = SlurmRequeue(signal.SIGUSR2, ps_rank=0)
        callback.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert callback.received and not callback.agreed and seen == []
        callback.uninstall()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == ["previous"]
    finally:
        signal.signal(signal.SIGUSR2, previous)


class _Trainer(SimpleNamespace):
    def save_checkpoint(self, path):
        self.events.append(("save", path))


def _next_hpc_path(folder):
    """Lightning's choice of the next requeue checkpoint: one past the highest ``hpc_ckpt_<n>`` in ``folder``."""
    numbers = [int(name[len("hpc_ckpt_"):-len(".ckpt")]) for name in os.listdir(folder)
               if name.startswith("hpc_ckpt_") and name.endswith(".ckpt")]
    return os.path.join(folder, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def _trainer(tmp_path, events, rank_zero=True, rank_zero_path=None):
    """A trainer as the requeue callback sees it; ``rank_zero_path``: the path rank 0 broadcasts (default:
    the one this rank finds itself)."""
    logger = SimpleNamespace(finalize=lambda status: events.append(("finalize", status)))
    connector = SimpleNamespace(hpc_save_path=_next_hpc_path)
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj if rank_zero_path is None else rank_zero_path)
    return _Trainer(events=events, loggers=[logger], default_root_dir=str(tmp_path), global_step=9,
                    is_global_zero=rank_zero, _checkpoint_connector=connector, strategy=strategy)


def test_nothing_happens_until_the_ps_flag_is_agreed(tmp_path):
    events = []
    callback = SlurmRequeue(signal.SIGUSR1, ps_rank=0)
    callback.received = True  # this rank got the signal, but the PS's broadcast has not said so
    callback.on_train_batch_end(_trainer(tmp_path, events), None, None, None, 0)
    assert events == []


@pytest.mark.parametrize("rank_zero", [True, False])
def test_an_agreed_requeue_saves_then_requeues_from_rank_zero_then_exits(tmp_path, monkeypatch, rank_zero):
    events = []
    monkeypatch.setattr(requeue, "_requeue", lambda: events.append(("requeue",)) or 0)  # scontrol's status
    monkeypatch.setattr(requeue.os, "_exit", lambda code: events.append(("exit", code)))
    callback = SlurmRequeue(signal.SIGUSR1, ps_rank=0)
    callback.agreed = True
    callback.on_train_batch_end(_trainer(tmp_path, events, rank_zero), None, None, None, 0)
    expected = [("finalize", "requeued"), ("save", str(tmp_path / "hpc_ckpt_1.ckpt"))]
    expected += [("requeue",)] if rank_zero else []
    assert events == expected + [("exit", 0)]


def test_a_ps_that_looks_after_rank_zero_wrote_saves_beside_rank_zeros_checkpoint(tmp_path, monkeypatch):
    """The PS on rank 3 writes its state (the secret) beside rank 0's checkpoint, as ``<checkpoint>.ps``.
    Rank 0 has already written hpc_ckpt_1.ckpt when the PS looks at the folder: the PS must still save
    under hpc_ckpt_1, else its sidecar is hpc_ckpt_2.ckpt.ps, which the resumed job never reads."""
    events = []
    monkeypatch.setattr(requeue.os, "_exit", lambda code: events.append(("exit", code)))
    rank_zeros = str(tmp_path / "hpc_ckpt_1.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"rank 0's checkpoint")
    callback = SlurmRequeue(signal.SIGUSR1, ps_rank=3)
    callback.agreed = True
    callback.on_train_batch_end(_trainer(tmp_path, events, rank_zero=False, rank_zero_path=rank_zeros),
                                None, None, None, 0)
    assert ("save", rank_zeros) in events


def test_a_job_that_could_not_be_requeued_ends_failed_not_completed(tmp_path, monkeypatch):
    """`scontrol requeue` refused (a job submitted with --no-requeue): the job stops unfinished, and rank 0's
    exit status makes SLURM report it FAILED rather than COMPLETED; the checkpoint is still written."""
    events = []
    monkeypatch.setattr(requeue, "_requeue", lambda: events.append(("requeue",)) or 1)
    monkeypatch.setattr(requeue.os, "_exit", lambda code: events.append(("exit", code)))
    callback = SlurmRequeue(signal.SIGUSR1, ps_rank=0)
    callback.agreed = True
    callback.on_train_batch_end(_trainer(tmp_path, events), None, None, None, 0)
    assert events[1:] == [("save", str(tmp_path / "hpc_ckpt_1.ckpt")), ("requeue",), ("exit", 1)]


def test_scontrol_is_called_on_the_array_task_when_there_is_one(monkeypatch):
    calls = []
    monkeypatch.setattr(requeue.subprocess, "run", lambda args, **kw: calls.append(args) or SimpleNamespace(returncode=0, stderr=""))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue._requeue() == 0 and calls[-1] == ["scontrol", "requeue", "77"]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    requeue._requeue()
    assert calls[-1] == ["scontrol", "requeue", "70_3"]
