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


def _trainer(tmp_path, events, rank_zero=True):
    logger = SimpleNamespace(finalize=lambda status: events.append(("finalize", status)))
    connector = SimpleNamespace(hpc_save_path=lambda folder: os.path.join(folder, "hpc_ckpt_1.ckpt"))
    return _Trainer(events=events, loggers=[logger], default_root_dir=str(tmp_path), global_step=9,
                    is_global_zero=rank_zero, _checkpoint_connector=connector)


def test_nothing_happens_until_the_ps_flag_is_agreed(tmp_path):
    events = []
    callback = SlurmRequeue(signal.SIGUSR1, ps_rank=0)
    callback.received = True  # this rank got the signal, but the PS's broadcast has not said so
    callback.on_train_batch_end(_trainer(tmp_path, events), None, None, None, 0)
    assert events == []


@pytest.mark.parametrize("rank_zero", [True, False])
def test_an_agreed_requeue_saves_then_requeues_from_rank_zero_then_exits(tmp_path, monkeypatch, rank_zero):
    events = []
    monkeypatch.setattr(requeue, "_requeue", lambda: events.append(("requeue",)))
    monkeypatch.setattr(requeue.os, "_exit", lambda code: events.append(("exit", code)))
    callback = SlurmRequeue(signal.SIGUSR1, ps_rank=0)
    callback.agreed = True
    callback.on_train_batch_end(_trainer(tmp_path, events, rank_zero), None, None, None, 0)
    expected = [("finalize", "requeued"), ("save", str(tmp_path / "hpc_ckpt_1.ckpt"))]
    expected += [("requeue",)] if rank_zero else []
    assert events == expected + [("exit", 0)]


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
