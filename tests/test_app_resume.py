"""The app's run directories: a checkpoint is resumed only by the experiment that wrote it, a fit resumed at
its end reports where it started, and torchrun jobs without an id of their own do not share one directory.

Single process, no launch: each test takes a few seconds at most.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train  # noqa: E402


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def checkpoint_of(cfg, run_dir: Path) -> str:
    """A checkpoint as the app's fit leaves it: Lightning stores each callback's state under its state_key."""
    record = train.RunRecord(train.experiment(cfg))
    (run_dir / "checkpoints").mkdir(parents=True)
    path = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 4, "callbacks": {record.state_key: record.state_dict()}}, path)
    return str(path)


def test_a_run_directory_is_resumed_only_by_the_experiment_that_wrote_it(tmp_path):
    # Before: a run of aggregator=mean in a directory (hydra.run.dir, or torchrun's shared one) where a run of
    # aggregator=median had finished resumed median's final checkpoint, trained 0 steps, and reported median's
    # model (the same param_sha256 and accuracy) as mean's.
    median = compose_with("code=none", "aggregator=median", "trainer.devices=3", "attack.ranks=[2]")
    path = checkpoint_of(median, tmp_path)
    assert train.resume_path(median, tmp_path) == path
    # What may change on a resume: the budget, the loggers, the timeouts.
    longer = compose_with("code=none", "aggregator=median", "trainer.devices=3", "attack.ranks=[2]",
                          "trainer.max_steps=99", "loggers=[csv]", "timeout_s=60")
    assert train.resume_path(longer, tmp_path) == path
    for overrides, difference in [
        (["aggregator=mean"], "aggregator.name='median' there, 'mean' now"),
        (["aggregator=median", "attack=alie"], "attack.name='reverse' there, 'alie' now"),
        (["aggregator=median", "attack.ranks=[1]"], "attack.ranks=[2] there, [1] now"),
        (["aggregator=median", "seed=7"], "seed=1234 there, 7 now"),
    ]:
        cfg = compose_with("code=none", "trainer.devices=3", "attack.ranks=[2]", *overrides)
        with pytest.raises(ValueError, match="a checkpoint of another experiment") as refused:
            train.resume_path(cfg, tmp_path)
        assert difference in str(refused.value) and "resume=never" in str(refused.value)
        # Through the app: refused in one sentence before any process starts.
        with pytest.raises(SystemExit, match=r"^configuration error: resume=auto would continue"):
            train.fit(cfg, tmp_path)
    assert train.resume_path(compose_with("code=none", "aggregator=mean", "resume=never"), tmp_path) is None
    # Another world size is left to the library, which refuses it in its own sentence (tests/launch/test_app.py),
    # whatever else changed with it; the same world spelled otherwise (one rank on each of three nodes) is compared.
    for other_world in (["trainer.devices=6"], ["trainer.devices=3", "trainer.num_nodes=2"]):
        moved = compose_with("code=none", "aggregator=mean", "attack.ranks=[4]", *other_world)
        assert train.resume_path(moved, tmp_path) == path
    with pytest.raises(ValueError, match=r"aggregator.name='median' there, 'mean' now"):
        train.resume_path(compose_with("code=none", "aggregator=mean", "trainer.devices=1", "trainer.num_nodes=3",
                                       "attack.ranks=[2]"), tmp_path)
    # What to do about caught liars may change: a run stopped by max_faulty_steps goes on under a higher limit.
    policy = compose_with("code=none", "aggregator=median", "trainer.devices=3", "attack.ranks=[2]",
                          "code.max_faulty_steps=50", "code.on_decode_failure=skip")
    assert train.resume_path(policy, tmp_path) == path


def test_a_fit_resumed_at_its_end_started_where_it_ended(tmp_path):
    # Before: resumed_from_step was 0 (RunRecord.start_step's default: Lightning calls no on_train_start when
    # max_steps is already reached), so summary.json claimed a fresh run of all its steps.
    data = TensorDataset(torch.randn(32, 4), torch.randint(2, (32,)))
    model_for = lambda: train.Classifier(torch.nn.Linear(4, 2), 2)  # noqa: E731
    options = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    first = train.RunRecord()
    trainer = L.Trainer(callbacks=[first], **options)
    trainer.fit(model_for(), DataLoader(data, batch_size=4))
    assert train.started_at(first, trainer) == 0
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    again = train.RunRecord()
    trainer = L.Trainer(callbacks=[again], **options)
    trainer.fit(model_for(), DataLoader(data, batch_size=4), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 3 and train.started_at(again, trainer) == 3


def test_torchrun_jobs_without_an_id_do_not_share_a_run_directory(monkeypatch):
    # torchrun's default --rdzv-id is "none" with a static rendezvous (--master-addr/--master-port): every such
    # job got outputs/torchrun-none, and resume=auto continued the previous job's checkpoint there.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    assert train.draco_run_id() == "torchrun-none"
    problem = train.unshared_run_id(Path("outputs") / train.draco_run_id())
    assert problem and "--rdzv-id" in problem and "hydra.run.dir" in problem
    assert train.unshared_run_id(Path("/tmp/my-run")) is None  # hydra.run.dir given: the user's own directory
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-9")
    assert train.unshared_run_id(Path("outputs") / train.draco_run_id()) is None


def test_the_summary_times_the_training_apart_from_the_start_of_the_ranks(tmp_path):
    # Before: wall_seconds (and the report's "(N s)") was all a comparison of defences had, and it counts
    # starting every rank, the rendezvous and the sanity check: most of a short run, and noisy.
    data = TensorDataset(torch.randn(32, 4), torch.randint(2, (32,)))
    record = train.RunRecord()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(train.Classifier(torch.nn.Linear(4, 2), 2), DataLoader(data, batch_size=4))
    assert record.train_seconds > 0
    summary = {"faulty_counts": {}, "final_val_acc": 0.5, "world_size": 6, "skipped_steps": 0, "optimizer_steps": 3,
               "wall_seconds": 12.0, "train_seconds": 2.0}
    assert "after 3 steps (12.0 s, of which 2.0 s training)" in train.report(compose_with(), summary, Path("run"))


def test_the_report_says_nobody_was_caught_only_where_someone_could_be():
    summary = {"faulty_counts": {}, "final_val_acc": 0.5, "world_size": 6, "skipped_steps": 0, "optimizer_steps": 3,
               "wall_seconds": 12.0}
    assert "caught: nobody;" in train.report(compose_with(), summary, Path("run"))
    robust = train.report(compose_with("code=none", "aggregator=median"), summary, Path("run"))
    assert "caught: no one can be (code=none names no liar);" in robust
