"""The Hydra config tree composes for every option of every group, and each piece builds what it names."""

from __future__ import annotations

import inspect
import pickle
import re
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train  # noqa: E402  (registers the run-directory resolver)

from lightning_draco import DracoStrategy  # noqa: E402


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def compose_with(*overrides: str, hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def test_the_groups_offer_what_the_documentation_lists():
    assert options("code") == ["crc", "frc", "none"]
    assert options("model") == ["cnn", "mlp", "resnet18"]
    assert options("data") == ["cifar10", "digits", "synthetic"]
    assert options("trainer") == ["cpu", "gpu"]
    assert set(options("attack")) >= {"none", "reverse", "constant", "gaussian", "sign_flip", "bit_flip", "nan_gradient",
                                      "inf_gradient", "collude", "alie", "ipm"}
    assert set(options("aggregator")) >= {"none", "mean", "median", "trimmed_mean", "geometric_median", "krum",
                                          "multi_krum", "bulyan", "centered_clipping", "mda", "monna", "meamed"}


@pytest.mark.parametrize("code", options("code"))
def test_every_code_builds_its_strategy(code):
    cfg = compose_with(f"code={code}", "attack=none")
    strategy = train.build_strategy(cfg)
    assert isinstance(strategy, DracoStrategy) and strategy.config.code == code
    assert strategy.num_adversaries == cfg.code.num_adversaries
    strategy.config.build_code(6)


def test_pre_aggregators_come_from_the_aggregator_group():
    cfg = compose_with("code=none", "aggregator=krum", "aggregator.pre=[nnm,{name:clipping,threshold:5.0}]")
    strategy = train.build_strategy(cfg)
    assert strategy.aggregator.name == "nnm+clipping+krum" and strategy.aggregator.pre[1].threshold == 5.0
    strategy.config.build_code(6)
    cfg = compose_with("code=frc", "code.num_adversaries=1", "aggregator=median", "aggregator.pre=[bucketing]")
    with pytest.raises(ValueError, match=r"after the pre-aggregators \(bucketing\)"):
        train.build_strategy(cfg).config.build_code(9)
    assert train.build_strategy(compose_with("aggregator=median")).aggregator.name == "median"


@pytest.mark.parametrize("attack", options("attack"))
def test_every_attack_builds_its_adversary(attack):
    cfg = compose_with(f"attack={attack}")
    strategy = train.build_strategy(cfg)
    if attack == "none":
        assert strategy.adversary is None
    else:
        assert strategy.adversary.attack_name == cfg.attack.name and strategy.adversary.ranks == (4,)
        assert attack.startswith(cfg.attack.name)
        # The liars and the noise follow the run's seed: a study over seeds varies them, one seed's defences share them.
        assert strategy.adversary.seed == cfg.seed == 1234
        assert train.build_strategy(compose_with(f"attack={attack}", "seed=7")).adversary.seed == 7
    strategy.config.build_code(6)


@pytest.mark.parametrize("aggregator", ["trimmed_mean", "meamed", "median", "krum"])
def test_a_robust_rule_over_plain_averaging_tolerates_the_default_liar_as_the_library_does(aggregator):
    # With f = 0, trimmed mean and meamed are the plain mean: a comparison of defences would report them broken.
    strategy = train.build_strategy(compose_with("code=none", f"aggregator={aggregator}"))
    library = DracoStrategy(code="none", aggregator=aggregator)
    assert strategy.aggregator.num_byzantine == library.aggregator.num_byzantine == len(strategy.adversary.ranks) == 1
    assert not [w for w in strategy._adversary_warnings if "exceed" in w]


@pytest.mark.parametrize("aggregator", options("aggregator"))
def test_every_aggregator_builds_its_rule_with_f_from_the_code(aggregator):
    cfg = compose_with("code=none", "code.num_adversaries=1", f"aggregator={aggregator}")
    assert cfg.aggregator.num_byzantine == 1, "f follows code.num_adversaries"
    strategy = train.build_strategy(cfg)
    if aggregator == "none":
        assert strategy.aggregator is None
        return
    assert strategy.aggregator is not None
    if aggregator == "bulyan":  # needs n >= 4f + 3 = 7
        with pytest.raises(ValueError, match=r"needs n >= 4 \* num_byzantine \+ 3"):
            strategy.config.build_code(6)
    else:
        strategy.config.build_code(6)


def _fake_cifar(folder: Path) -> Path:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(range(4))}
        (batches / name).write_bytes(pickle.dumps(batch))
    return folder


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_every_model_trains_on_every_data_set(model, data, tmp_path):
    overrides = [f"model={model}", f"data={data}"]
    if data == "cifar10":
        overrides.append(f"data.root={_fake_cifar(tmp_path)}")
    if data == "synthetic":
        overrides += ["data.train_size=8", "data.val_size=4"]
    if model == "resnet18":
        overrides.append("model.width=4")
    cfg = compose_with(*overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    net = instantiate(cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    x, y = next(iter(torch.utils.data.DataLoader(datamodule.train, batch_size=4)))
    assert tuple(x.shape[1:]) == tuple(datamodule.input_shape)
    logits = net(x)
    assert logits.shape == (4, datamodule.num_classes)
    torch.nn.functional.cross_entropy(logits, y).backward()


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_every_offline_model_and_data_set_learns_at_the_defaults(model, data):
    """Each shipped model on each data set that needs no download, at the configs' defaults (learning
    rate, momentum, data), beats chance (0.1) by far within a few steps. One process stands in for the
    six-rank default: a batch of ``trainer.devices x data.batch_size`` samples, what DRACO's step
    averages without a liar. (Before the synthetic data had spatial structure, cnn x synthetic
    stayed at 0.10.)"""
    overrides = [f"model={model}", f"data={data}"]
    if data == "synthetic":
        overrides += ["data.train_size=960", "data.val_size=256"]  # 5 steps an epoch: a few seconds
    cfg = compose_with(*overrides)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data, batch_size=cfg.data.batch_size * cfg.trainer.devices)
    net = instantiate(cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    classifier = train.Classifier(net, datamodule.num_classes, **cfg.optimizer)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(classifier, datamodule)
    assert trainer.callback_metrics["val_acc"] > 0.5


def test_resnet18_is_the_standard_network():
    net = train.instantiate(compose_with("model=resnet18").model, input_shape=(3, 32, 32), num_classes=10)
    assert 11_100_000 < sum(p.numel() for p in net.parameters()) < 11_200_000


def test_cifar10_without_the_files_says_where_it_looked(tmp_path):
    cfg = compose_with("data=cifar10", f"data.root={tmp_path}")
    with pytest.raises(InstantiationException, match=r"has no CIFAR-10 \(missing data_batch_1"):
        instantiate(cfg.data)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_keys_are_trainer_arguments(trainer):
    cfg = compose_with(f"trainer={trainer}")
    assert set(cfg.trainer) <= set(inspect.signature(L.Trainer).parameters)


def gpu_check_overrides(code: str, accelerator: str, attack: str) -> list[str]:
    """The overrides scripts/gpu_check.sh passes the app for one of its runs, read from the script."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    words = re.search(r"local args=\((.*?)\)\n", script, re.DOTALL).group(1).split()
    plain = re.search(r"local codeargs=\((.*?)\)", script).group(1)
    reactive = re.search(r'\[ "\$code" = reactive \] && codeargs=\((.*?)\)', script).group(1)
    codeargs = (reactive if code == "reactive" else plain.replace("$code", code)).split()
    values = {"$attack": attack, "$ACCELERATOR": accelerator, "$STEPS": "3", "$precision": "bf16-mixed", "$tf32": "true",
              '"$RUNS/$id"': "/tmp/gpu-check-run"}
    overrides = []
    for word in words[1:]:  # after examples/train.py
        if word == '"${codeargs[@]}"':
            overrides += codeargs
            continue
        for name, value in values.items():
            word = word.replace(name, value)
        assert "$" not in word, f"gpu_check.sh passes {word!r}: give the test a value for it"
        overrides.append(word)
    return overrides


@pytest.mark.parametrize("attack", ["reverse", "none"])
@pytest.mark.parametrize("accelerator", ["gpu", "cpu"])  # the script's GPU runs, and its dry run on the CPU
@pytest.mark.parametrize("code", ["crc", "reactive", "frc"])
def test_the_gpu_check_script_runs_compose_and_build_their_strategies(code, accelerator, attack):
    """scripts/gpu_check.sh runs only on a lent GPU: a key it sets that the config lacks (or ``+key`` for one
    it has) would fail every run there. Its overrides must compose and build here."""
    cfg = compose_with(*gpu_check_overrides(code, accelerator, attack), hydra_config=True)
    assert cfg.trainer.max_steps == 3 and cfg.trainer.num_nodes == 6 and cfg.trainer.precision == "bf16-mixed"
    strategy = train.build_strategy(cfg)
    assert isinstance(strategy, DracoStrategy)
    assert strategy.config.redundancy_mode == ("reactive" if code == "reactive" else "full")


def test_the_submitit_launcher_follows_the_trainer_shape():
    cfg = compose_with("hydra/launcher=draco_slurm", "trainer.devices=3", "trainer.num_nodes=2", hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.cpus_per_task) == (2, 3, 1)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "6", "SLURM_JOB_NAME": "draco"}, "slurm-4242"),
        ({"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "80"}, "slurm-77_3"),
        ({"TORCHELASTIC_RUN_ID": "job-9"}, "torchrun-job-9"),
    ],
)
def test_the_run_directory_is_named_after_the_job(monkeypatch, env, expected):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert train.draco_run_id() == expected


def test_resume_takes_the_newest_checkpoint_of_the_run(tmp_path):
    import os

    cfg = compose_with()
    assert train.resume_path(cfg, tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"")
    hpc.write_bytes(b"")
    os.utime(last, (1, 1))
    assert train.resume_path(cfg, tmp_path) == str(hpc)
    os.utime(hpc, (0, 0))
    assert train.resume_path(cfg, tmp_path) == str(last)
    assert train.resume_path(compose_with("resume=never"), tmp_path) is None


def test_decode_mode_and_overlap_come_from_the_command_line():
    strategy = train.build_strategy(compose_with("decode=sharded", "overlap=true"))
    assert strategy.config.decode == "sharded" and strategy.config.overlap is True
    with pytest.raises(ValueError, match=r"code='crc' cannot decode sharded"):
        train.build_strategy(compose_with("code=crc", "decode=sharded"))


# Settings the app refuses, and a piece of its one-line message: each breaks a rule of the library
# or of the app, checked before any process starts (``tests/launch/test_app.py`` runs the app itself
# on one setting per layer).
REFUSED_IN_COMPOSITION = [
    (["attack=revers"], "Could not find 'attack/revers'"),
    (["aggregator=krumm"], "Could not find 'aggregator/krumm'"),
    (["code.num_adversary=2"], "Could not override 'code.num_adversary'"),
]
REFUSED_AT_FIT = [
    (["code.num_adversaries=-1"], "num_adversaries must be an integer >= 0 (got -1)"),
    (["code.num_adversaries=2", "code.redundancy=3"], "redundancy must be at least 2 * num_adversaries + 1 = 5"),
    (["code=crc", "code.num_adversaries=3"], "code='crc' needs at least 2 * num_adversaries + 1 = 7 workers"),
    (["code.ps_rank=6"], "ps_rank must be in [0, 6) for a world of 6 ranks (got 6)"),
    (["attack.ranks=[0]"], "adversary ranks must not include ps_rank=0"),
    (["code=none", "code.num_adversaries=1", "aggregator=bulyan"], "aggregator 'bulyan' needs n >= 4 * num_byzantine + 3"),
    (["timeout_s=0"], "timeout must be a positive number of seconds"),
    (["code=crc", "code.num_adversaries=2", "trainer.devices=64", "trainer.precision=bf16-true"],
     "code='crc' with P=64, s=2 is too ill-conditioned for bfloat16 gradients"),
    (["data=cifar10", "data.root=/nonexistent"], "data.root='/nonexistent' has no CIFAR-10"),
    (["attack=gaussian", "+attack.options.sgima=3"], "attack 'gaussian' has no option 'sgima': its options are sigma"),
    (["attack=bit_flip", "+attack.options.num_flips=0"], "attack 'bit_flip': num_flips must be an integer >= 1 (got 0)"),
    (["+aggregator.options.tau=10"], "aggregator.options (tau) need a rule: set aggregator=<name> (there is none)"),
    (["attack=mimic", "+attack.options.target=6"], "attack 'mimic': target must be a rank in [0, 6) for a world of 6"),
    # Known once the model is: refused by the launcher, before the processes start (float64 would pass).
    (["code=crc", "code.num_adversaries=2", "trainer.devices=8"],
     "code='crc' with P=8, s=2 is too ill-conditioned for float32 gradients: a lie kept under the rounding floor"
     " could move the decoded sum by 1.9e-05 of its norm, more than the 1e-05 allowed; use fewer adversaries,"
     " float64 gradients, or code='frc'"),
]


@pytest.mark.parametrize("overrides, message", REFUSED_IN_COMPOSITION,
                         ids=[" ".join(o) for o, _ in REFUSED_IN_COMPOSITION])
def test_an_unknown_option_is_refused_when_the_config_is_composed(overrides, message):
    with pytest.raises(Exception, match=re.escape(message)):
        compose_with(*overrides)


@pytest.mark.parametrize("overrides, message", REFUSED_AT_FIT, ids=[" ".join(o) for o, _ in REFUSED_AT_FIT])
def test_a_setting_that_breaks_a_rule_ends_the_run_with_the_rule_before_training(tmp_path, overrides, message):
    with pytest.raises(SystemExit) as ended:
        train.fit(compose_with(*overrides), tmp_path)
    assert str(ended.value).startswith("configuration error: ") and message in str(ended.value)
    assert not list(tmp_path.iterdir()), "nothing written before the refusal"


def test_label_flipping_flips_within_the_data_sets_classes():
    cfg = compose_with("attack=label_flip", "data=synthetic", "data.num_classes=3")
    data = instantiate(cfg.data)
    assert train.build_strategy(cfg, num_classes=data.num_classes).adversary.options == {"num_classes": 3}
    # Set explicitly, it is kept.
    cfg = compose_with("attack=label_flip", "attack.options.num_classes=5")
    assert train.build_strategy(cfg, num_classes=10).adversary.options == {"num_classes": 5}


def test_the_report_names_the_rule_and_the_f_it_tolerates():
    summary = {"faulty_counts": {}, "final_val_acc": 0.5, "world_size": 6, "skipped_steps": 0, "optimizer_steps": 3,
               "wall_seconds": 1.0}
    krum = train.report(compose_with("code=none", "aggregator=krum", "aggregator.pre=[nnm]"), summary, Path("run"))
    assert "DRACO code=none, aggregator nnm + krum (f=1, over the whole step) on 6 ranks" in krum
    assert "DRACO code=frc s=1 on 6 ranks" in train.report(compose_with(), summary, Path("run"))


def test_the_report_names_each_caught_ranks_host_and_keeps_a_node_that_lied_before_a_requeue():
    summary = {
        "faulty_counts": {"4": 3}, "final_val_acc": 0.5, "world_size": 6, "skipped_steps": 0, "optimizer_steps": 9,
        "wall_seconds": 1.0, "quarantined": [4],
        "caught": [{"rank": 4, "host": "node-b", "times_caught": 3, "first_at_step": 6, "before_resume": False},
                   {"rank": 4, "host": "node-a", "times_caught": 5, "first_at_step": 0, "before_resume": True}],
    }
    text = train.report(compose_with(), summary, Path("run"))
    assert ("caught: rank 4 on host node-b at 3 steps, rank 4 on host node-a before a resume at 5 steps;"
            " skipped steps: 0; quarantined: ranks [4]") in text
