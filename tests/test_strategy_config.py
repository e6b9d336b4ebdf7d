"""DracoStrategy refuses bad settings before any training, with one sentence naming the parameter."""

import copy
import logging
import multiprocessing
import pickle
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import lightning_draco
from lightning_draco import Adversary, DracoStrategy
from lightning_draco.aggregators import make_aggregator
from lightning_draco.report import FaultLedger
from lightning_draco.strategy import checkpoint as ckpt


def test_import_registers_the_name_once():
    assert "draco" in StrategyRegistry
    lightning_draco.DracoStrategy.register_strategies(StrategyRegistry)  # a second registration is harmless
    trainer = L.Trainer(accelerator="cpu", devices=3, strategy="draco", logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DracoStrategy)
    assert (strategy.config.code, strategy.num_adversaries, strategy.redundancy, strategy.ps_rank) == ("frc", 1, 3, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_adversaries=-1), r"num_adversaries must be an integer >= 0 \(got -1\)"),
        (dict(num_adversaries=1, redundancy=2), r"redundancy must be at least 2 \* num_adversaries \+ 1 = 3"),
        (dict(code="nope"), r"code must be one of crc, frc, none"),
        (dict(code="crc", num_adversaries=1, redundancy=5), r"code='crc' uses redundancy r = 2 \* num_adversaries \+ 1 = 3"),
        (dict(ps_rank=-2), r"ps_rank must be an integer >= 0"),
        (dict(adversary=Adversary(ranks=[0])), r"adversary ranks must not include ps_rank=0"),
        (dict(ps_rank=2, adversary=Adversary(ranks=[2])), r"must not include ps_rank=2"),
        (dict(on_decode_failure="ignore"), r"on_decode_failure must be one of raise, skip"),
        (dict(tolerance=-1.0), r"tolerance must be None or a number in \[0, 1\)"),
        (dict(code="none", redundancy=3), r"code='none' gives each worker one partition: redundancy must be 1"),
        (dict(ddp_comm_hook=print), r"ddp_comm_hook cannot be set on DracoStrategy"),
        (dict(max_faulty_steps=-1), r"max_faulty_steps must be None or an integer >= 0"),
        (dict(code="crc", aggregator="median"), r"code='crc' cannot be combined with an aggregator"),
        (dict(code="none", aggregator="average"), r"aggregator must be one of bulyan, centered_clipping"),
        (dict(code="none", aggregator="krum", aggregate_over="layer"), r"aggregate_over must be one of whole, bucket"),
        (dict(timeout=0), r"timeout must be a positive number of seconds or a timedelta \(got 0\)"),
        (dict(decode="sharded", tolerance=1e-3), r"decode='sharded' needs tolerance None or 0 \(got 0.001\)"),
        (dict(overlap=True, find_unused_parameters=True),
         r"overlap=True cannot be combined with find_unused_parameters=True: DDP all-reduces"),
    ],
)
def test_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DracoStrategy(**kwargs)


@pytest.mark.parametrize(
    "devices, kwargs, message",
    [
        (4, dict(num_adversaries=1), r"needs the redundancy r=3 to divide the number of workers \(4\)"),
        (2, dict(num_adversaries=1, redundancy=3), r"number of workers \(2\) must be at least the redundancy r=3"),
        (3, dict(ps_rank=3), r"ps_rank must be in \[0, 3\) for a world of 3 ranks \(got 3\)"),
        (3, dict(adversary=Adversary(ranks=[5])), r"adversary ranks must be in \[0, 3\)"),
        (3, dict(adversary=Adversary(ranks="random", count=3)), r"adversary count must be at most world_size - 1 = 2"),
        # Mimic's target: beyond the world, it failed the first step on the liar alone; a liar's own rank sent no lie.
        (6, dict(adversary=Adversary(ranks=[4], attack="mimic", target=6)),
         r"attack 'mimic': target must be a rank in \[0, 6\) for a world of 6 ranks \(got 6\)"),
        (6, dict(adversary=Adversary(ranks=[4], attack="mimic", target=4)),
         r"attack 'mimic': target must be an honest rank: rank 4 is one of the liars \[4\], and it would send its own"),
        (6, dict(adversary=Adversary(ranks="random", attack="mimic", target=9)), r"target must be a rank in \[0, 6\)"),
        (4, dict(code="crc", num_adversaries=2), r"code='crc' needs at least 2 \* num_adversaries \+ 1 = 5 workers"),
        (6, dict(code="none", aggregator="bulyan"), r"aggregator 'bulyan' needs n >= 4 \* num_byzantine \+ 3 \(got n=6"),
        (6, dict(code="frc", aggregator="median"), r"aggregator 'median' needs 2 \* num_byzantine < n \(got n=2"),
    ],
)
def test_refused_when_the_trainer_is_built(devices, kwargs, message):
    with pytest.raises(ValueError, match=message):
        L.Trainer(accelerator="cpu", devices=devices, strategy=DracoStrategy(**kwargs), logger=False)


@pytest.mark.parametrize("ps_rank", [0, 3])
def test_without_a_parameter_server_any_rank_may_lie_the_ps_rank_included(ps_rank):
    """decode='sharded' trusts no rank: ps_rank can be named, and counted in a random draw, where the PS
    modes refuse it (``test_refused_at_construction``, ``test_refused_when_the_trainer_is_built``)."""
    named = DracoStrategy(decode="sharded", ps_rank=ps_rank, adversary=Adversary(ranks=[ps_rank]))
    assert named.config.adversary_warnings() == []
    L.Trainer(accelerator="cpu", devices=6, strategy=named, logger=False)
    assert named.adversary.ranks == (ps_rank,)
    everyone = DracoStrategy(decode="sharded", ps_rank=ps_rank, adversary=Adversary(ranks="random", count=6))
    L.Trainer(accelerator="cpu", devices=6, strategy=everyone, logger=False)  # with a warning: 6 > s
    with pytest.raises(ValueError, match=re.escape("adversary count must be at most world_size = 6 (got 7).")):
        L.Trainer(accelerator="cpu", devices=6, logger=False,
                  strategy=DracoStrategy(decode="sharded", adversary=Adversary(ranks="random", count=7)))
    with pytest.raises(ValueError, match=re.escape(f"adversary ranks must not include ps_rank={ps_rank}: the parameter"
                                                   " server is trusted.")):
        DracoStrategy(decode="ps", ps_rank=ps_rank, adversary=Adversary(ranks=[ps_rank]))
    with pytest.raises(ValueError, match=re.escape("adversary count must be at most world_size - 1 = 5")):
        L.Trainer(accelerator="cpu", devices=6, logger=False,
                  strategy=DracoStrategy(ps_rank=ps_rank, adversary=Adversary(ranks="random", count=6)))


def test_a_wire_dtype_the_code_cannot_decode_is_refused_when_the_trainer_is_built():
    with pytest.raises(ValueError, match=r"code='crc' with P=64, s=2 is too ill-conditioned for bfloat16 gradients"):
        L.Trainer(accelerator="cpu", devices=64, precision="bf16-true", strategy=DracoStrategy(code="crc", num_adversaries=2),
                  logger=False)
    # The same precision where the code decodes accurately is accepted.
    L.Trainer(accelerator="cpu", devices=7, precision="bf16-true", strategy=DracoStrategy(code="crc", num_adversaries=1),
              logger=False)


def test_more_simulated_adversaries_than_s_is_allowed_with_a_warning():
    strategy = DracoStrategy(num_adversaries=1, adversary=Adversary(ranks=[1, 2]))
    assert any("exceed num_adversaries=1" in w for w in strategy.config.adversary_warnings())


@pytest.mark.parametrize("adversary, drawn", [
    (Adversary(ranks="random"), "ranks='random' draws count=0 ranks per step (count defaults to num_adversaries)"),
    (Adversary(ranks=[]), "ranks=[] names no rank"),
])
def test_a_simulated_adversary_that_lies_nowhere_is_warned_of(adversary, drawn):
    """A comparison of defences run with num_adversaries=0 (plain averaging, say) must not face no liar unnoticed."""
    warnings = DracoStrategy(code="none", num_adversaries=0, adversary=adversary).config.adversary_warnings()
    assert f"the simulated adversary lies nowhere: {drawn}. Set ranks, or count," in " ".join(warnings)
    counted = DracoStrategy(code="none", num_adversaries=0, adversary=Adversary(ranks="random", count=1))
    assert not [w for w in counted.config.adversary_warnings() if "lies nowhere" in w]


def test_a_count_of_liars_with_fixed_ranks_is_refused():
    with pytest.raises(ValueError, match=re.escape("adversary count applies to ranks='random' (got ranks=[1], count=2)")):
        Adversary(ranks=[1], count=2)


def test_more_simulated_adversaries_than_the_rule_tolerates_is_warned_of():
    strategy = DracoStrategy(code="none", num_adversaries=2, aggregator="median", aggregator_options={"num_byzantine": 1},
                             adversary=Adversary(ranks=[1, 2]))
    assert strategy.config.adversary_warnings() == [
        "2 simulated adversaries exceed aggregator 'median''s num_byzantine=1: the rule is set to tolerate fewer"
        " liars than the run has."
    ]
    matched = DracoStrategy(code="none", num_adversaries=2, aggregator="median", adversary=Adversary(ranks=[1, 2]))
    assert matched.config.adversary_warnings() == []
    # After the repetition code's vote (DETOX) the rule sees group results: f = 0 is no mistake there.
    detox = DracoStrategy(code="frc", aggregator="median", aggregator_options={"num_byzantine": 0},
                          adversary=Adversary(ranks=[1]))
    assert detox.config.adversary_warnings() == []


@pytest.mark.parametrize("aggregator", [None, "built"])
def test_aggregator_options_without_a_rule_by_name_are_refused(aggregator):
    rule = make_aggregator("centered_clipping", 1) if aggregator else None
    with pytest.raises(ValueError, match=re.escape(
            f"aggregator_options apply to an aggregator given by name (got aggregator={rule!r}): name the rule")):
        DracoStrategy(code="none", aggregator=rule, aggregator_options={"tau": 10.0})


def test_zero_adversaries_is_valid():
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=DracoStrategy(num_adversaries=0), logger=False)
    assert trainer.strategy.redundancy == 1


@pytest.mark.parametrize(
    "changed, message",
    [
        (dict(world_size=4), r"the checkpoint was written with world_size=4 but this run has world_size=6"),
        (dict(code="frc"), r"written with code='frc' but this run has code='crc'"),
        (dict(num_adversaries=2), r"written with num_adversaries=2 but this run has num_adversaries=1"),
    ],
)
def test_resume_under_another_world_or_code_is_refused(changed, message):
    trainer = L.Trainer(accelerator="cpu", devices=6, strategy=DracoStrategy(code="crc"), logger=False)
    saved = {"world_size": 6, "code": "crc", "num_adversaries": 1, "redundancy": 3, **changed}
    with pytest.raises(ValueError, match=message):
        trainer.strategy.check_resumable(saved)
    trainer.strategy.check_resumable({"world_size": 6, "code": "crc", "num_adversaries": 1, "redundancy": 3})


# -- the configuration, checked once ------------------------------------------------------------
def test_the_config_builds_the_code_with_its_options_and_the_rule_on_top():
    from lightning_draco.aggregators.coded import AggregatedCode
    from lightning_draco.strategy import DracoConfig

    config = DracoConfig.from_arguments(code="frc", num_adversaries=1, tolerance=1e-3)
    code = config.build_code(6)
    assert code.tolerance == 1e-3 and code.num_workers == 6 and config.redundancy == 3
    detox = DracoConfig.from_arguments(code="frc", aggregator="median").build_code(9)
    assert isinstance(detox, AggregatedCode) and detox.aggregator.name == "median"
    with pytest.raises(ValueError, match=r"ps_rank must be in \[0, 6\)"):
        DracoConfig.from_arguments(ps_rank=7).build_code(6)
    # Under DETOX the rule's n is the number of group sums, which its own sentence does not say.
    with pytest.raises(ValueError, match=r"needs 2 \* num_byzantine < n \(got n=2, num_byzantine=1\)\. With code='frc'"
                       r" the rule runs over the 2 group sums \(n = P / r = 6 / 3: DETOX\), not over the 6 ranks"):
        DracoConfig.from_arguments(code="frc", aggregator="median").build_code(6)
    with pytest.raises(ValueError, match=r"needs 2 \* num_byzantine < n \(got n=2, num_byzantine=1\)\.$"):
        DracoConfig.from_arguments(code="none", aggregator="median").build_code(2)


def test_tolerance_on_a_code_that_takes_none_is_refused():
    from lightning_draco.codes import make_code

    with pytest.raises(ValueError, match=r"tolerance has no effect with code='none'"):
        DracoStrategy(code="none", num_adversaries=0, tolerance=1e-3)
    with pytest.raises(ValueError, match=r"code='none' has no option tolerance \(its options: none\)"):
        make_code("none", 3, 0, tolerance=1e-3)


def test_an_unknown_decode_mode_is_named():
    with pytest.raises(ValueError, match=r"decode must be one of ps"):
        DracoStrategy(decode="everywhere")


def test_a_renamed_private_lightning_name_fails_at_import_naming_it():
    from lightning_draco import _compat

    class Renamed:
        pass

    with pytest.raises(ImportError, match=r"Renamed._register_ddp_hooks \(DRACO registers its comm hook"):
        _compat._require(Renamed, "_register_ddp_hooks", "DRACO registers its comm hook by overriding it")


# -- processes ------------------------------------------------------------------------------------
def test_an_error_on_one_rank_ends_the_launched_ranks_but_an_agreed_one_does_not(monkeypatch):
    from lightning_draco import _compat

    killed = []
    monkeypatch.setattr(_compat, "kill_launched_processes", lambda launcher: killed.append(launcher))
    strategy = DracoStrategy()
    strategy.on_exception(ValueError("a user's own error, on this rank alone"))
    assert len(killed) == 1, "a ValueError is not agreed just because of its type"
    agreed = strategy._agreed(ValueError("raised by every rank together"))
    strategy.on_exception(agreed)
    assert len(killed) == 1


def test_a_fit_ended_by_a_failed_decode_still_prints_who_was_caught_before_it(caplog):
    from lightning_draco import DracoDecodeError

    strategy = DracoStrategy()
    strategy.ledger = FaultLedger(["node-a", "node-b", "node-c"])
    for step in range(3):
        strategy.ledger.record(step, {2}, skipped=False)
    with caplog.at_level(logging.INFO):
        strategy.on_exception(strategy._agreed(DracoDecodeError("more than s ranks lied", [])))
    assert "   2  node-c" in caplog.text and "The fit stopped with the error below." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        strategy.on_exception(strategy._agreed(ValueError("a refused setting")))
    assert "DRACO report" not in caplog.text


def test_a_rank_that_stops_says_why_in_one_line_before_it_ends_the_ranks_it_launched(monkeypatch, caplog):
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_draco import CollectiveFailedError, _compat

    logged_when_killed = []
    monkeypatch.setattr(_compat, "kill_launched_processes", lambda launcher: logged_when_killed.append(
        [r.getMessage() for r in caplog.records]))
    environment = LightningEnvironment()
    environment.set_world_size(3)
    environment.set_global_rank(2)
    strategy = DracoStrategy(cluster_environment=environment)
    with caplog.at_level("ERROR"):
        strategy.on_exception(RuntimeError("[pair.cc:537] Timed out waiting 10000ms for recv\nthe rest of the story"))
        assert logged_when_killed == [["rank 2 stopped: RuntimeError: [pair.cc:537] Timed out waiting 10000ms for recv"]]
        caplog.clear()
        # The exchange logged its own failure where it happened; an agreed failure every rank raises.
        strategy.on_exception(CollectiveFailedError("rank 2: the gradient exchange's gather got no answer"))
        strategy.on_exception(strategy._agreed(ValueError("raised by every rank together")))
        assert not caplog.records
    with caplog.at_level("ERROR"):
        strategy.on_exception(KeyboardInterrupt())
    assert [r.getMessage() for r in caplog.records] == ["rank 2 stopped: KeyboardInterrupt"]
    caplog.clear()
    # One process alone has nobody to tell.
    with caplog.at_level("ERROR"):
        DracoStrategy().on_exception(ValueError("a user's own error"))
    assert not caplog.records


def test_a_collective_failure_on_the_communication_thread_reaches_lightning_as_itself():
    from lightning.pytorch.plugins.precision import Precision

    from lightning_draco import CollectiveFailedError

    failure = CollectiveFailedError("rank 1: the gradient exchange's gather got no answer within the collective timeout")
    failure.__cause__ = RuntimeError("Timed out waiting 10000ms for recv operation to complete")
    strategy = DracoStrategy()
    strategy._coded_step = type("NoSideGradients", (), {"add_side_gradients": lambda self: None})()
    strategy._exchange = type("Exchange", (), {"failed": None})()

    class FailedBackward(Precision):
        def pre_backward(self, tensor, module):
            return tensor

        def backward(self, *args, **kwargs):
            # What DDP raises when a hook's future was failed on another thread.
            raise RuntimeError(f"Unable to cast {failure} to Tensor")

    strategy.precision_plugin = FailedBackward()
    with pytest.raises(RuntimeError, match="^Unable to cast"):  # no failure recorded: DDP's error as it is
        strategy.backward(None, None)
    strategy._exchange.failed = failure
    with pytest.raises(CollectiveFailedError) as raised:
        strategy.backward(None, None)
    assert raised.value is failure and isinstance(raised.value.__cause__, RuntimeError)


def test_the_rendezvous_gets_its_own_timeout_and_collectives_the_short_one(monkeypatch):
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from lightning_draco import _compat
    from lightning_draco.strategy import strategy as module

    seen = {}
    monkeypatch.setattr(DDPStrategy, "setup_distributed", lambda self: seen.setdefault("startup", self._timeout))
    monkeypatch.setattr(module._compat, "set_process_group_timeout", lambda timeout: seen.setdefault("collective", timeout))
    assert _compat is module._compat
    DracoStrategy(timeout=10).setup_distributed()
    assert seen == {"startup": timedelta(minutes=5), "collective": timedelta(seconds=10)}
    seen.clear()
    strategy = DracoStrategy(timeout=10, startup_timeout=42)
    strategy.setup_distributed()
    assert seen == {"startup": timedelta(seconds=42), "collective": timedelta(seconds=10)}
    assert strategy._timeout == timedelta(seconds=10)
    seen.clear()
    # A rendezvous limit alone: the group is made with it, then gets torch's collective default back.
    strategy = DracoStrategy(startup_timeout=7)
    strategy.setup_distributed()
    assert seen == {"startup": timedelta(seconds=7), "collective": timedelta(minutes=30)}
    assert strategy._timeout == timedelta(minutes=30)


@pytest.mark.parametrize("start_method", ["spawn", "fork", "forkserver", "popen"])
def test_spawned_and_forked_ranks_carry_their_results_to_the_main_process(start_method):
    # Each fit under fork runs in tests/distributed/test_lightning.py; spawn differs only in how ranks start.
    trainer = L.Trainer(accelerator="cpu", devices=3, strategy=DracoStrategy(start_method=start_method), logger=False)
    carrying = type(trainer.strategy.launcher).__name__ == "ResultCarryingLauncher"
    assert carrying == (start_method != "popen")


def test_results_loaded_from_another_process_are_what_the_strategy_reports():
    ranks = DracoStrategy(redundancy_mode="reactive")
    ranks.ledger = FaultLedger(["a", "b", "c", "d"])
    ranks.ledger.record(0, {3}, skipped=False)
    ranks.ledger.record(1, {1, 3}, skipped=True)
    ranks.quarantined = {3}
    main = DracoStrategy(redundancy_mode="reactive")
    main.load_results(pickle.loads(pickle.dumps(ranks.results())))
    assert main.faulty_counts == {1: 1, 3: 2} and main.skipped_steps == 1 and main.quarantined == {3}
    assert main.ledger.first_caught == {3: 0, 1: 1} and main.hook_calls == 0 and main.escalations == 0


class _Tiny(L.LightningModule):
    def __init__(self, automatic: bool = True):
        super().__init__()
        self.automatic_optimization = automatic
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SparseEmbedding(_Tiny):
    def __init__(self):
        super().__init__()
        self.words = torch.nn.Embedding(10, 4, sparse=True)


class _SyncedNorm(_Tiny):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.SyncBatchNorm(2)


PREFLIGHT = [
    (8, dict(code="crc", num_adversaries=2), {}, _Tiny(),
     "code='crc' with P=8, s=2 is too ill-conditioned for float32 gradients"),
    (4, dict(redundancy_mode="reactive"), dict(accumulate_grad_batches=2), _Tiny(),
     "redundancy_mode='reactive' supports accumulate_grad_batches=1 only (got 2)"),
    (3, {}, {}, _Tiny(automatic=False), "DracoStrategy supports automatic optimization only"),
    (3, {}, {}, _SparseEmbedding(), "DracoStrategy codes dense gradients; 'words' makes sparse ones (sparse=True)"),
    (3, dict(code="crc", static_graph=True), {}, _Tiny(),
     "static_graph=True needs each step's gradient from one backward through DDP; code='crc' weights"),
    (3, {}, dict(sync_batchnorm=True), _Tiny(),
     "DracoStrategy cannot train with sync_batchnorm=True: SyncBatchNorm averages batch statistics over the ranks"),
    (3, {}, {}, _SyncedNorm(), "DracoStrategy cannot train with SyncBatchNorm layers ('norm'): SyncBatchNorm averages"),
]


@pytest.mark.parametrize("devices, strategy, trainer, module, message", PREFLIGHT,
                         ids=["crc_float32", "reactive_accumulate", "manual", "sparse", "static_graph", "sync_batchnorm",
                              "sync_batchnorm_layer"])
@pytest.mark.parametrize("start_method", ["popen", "spawn"])
def test_a_fit_every_rank_would_refuse_is_refused_before_any_process_starts(
        devices, strategy, trainer, module, message, start_method, tmp_path):
    fit = L.Trainer(accelerator="cpu", devices=devices, strategy=DracoStrategy(start_method=start_method, **strategy),
                    logger=False, enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path,
                    **trainer)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)
    with pytest.raises(ValueError, match=re.escape(message)):
        fit.fit(module, data)
    assert not torch.distributed.is_initialized() and not multiprocessing.active_children()
    assert not fit.strategy.launcher.procs, "the launcher started no rank"


def test_a_float64_model_passes_where_float32_is_refused():
    strategy = DracoStrategy(code="crc", num_adversaries=2)
    L.Trainer(accelerator="cpu", devices=8, strategy=strategy, logger=False)
    strategy.code.check_wire_dtype(torch.float64)
    with pytest.raises(ValueError, match="use fewer adversaries, float64 gradients, or code='frc'"):
        strategy.code.check_wire_dtype(torch.float32)


class _BuiltInSetup(_Tiny):
    def configure_model(self):
        self.double()  # what setup will see: float64 parameters


def _checked(trainer, module, launching):
    trainer.strategy._lightning_module = module
    trainer.state.fn = "fit"
    trainer.strategy.refuse_unsupported_fit(trainer, launching=launching)


def test_the_dtype_is_judged_as_the_model_will_train():
    crc = dict(code="crc", num_adversaries=2)  # refused for float32 gradients at P = 8, accepted for float64
    # "64-true" trains float64 gradients whatever dtype the module was made in.
    double = L.Trainer(accelerator="cpu", devices=8, precision="64-true", strategy=DracoStrategy(**crc), logger=False)
    _checked(double, _Tiny(), launching=True)
    _checked(double, _Tiny(), launching=False)
    # A module that may still build or convert its parameters is judged in setup, not at launch.
    single = L.Trainer(accelerator="cpu", devices=8, strategy=DracoStrategy(**crc), logger=False)
    _checked(single, _BuiltInSetup(), launching=True)
    with pytest.raises(ValueError, match="too ill-conditioned for float32 gradients"):
        _checked(single, _BuiltInSetup(), launching=False)  # had configure_model not run
    with pytest.raises(ValueError, match="too ill-conditioned for float32 gradients"):
        _checked(single, _Tiny(), launching=True)


class _FrozenSparseEmbedding(_Tiny):
    def __init__(self):
        super().__init__()
        self.words = torch.nn.Embedding(10, 4, sparse=True).requires_grad_(False)


def test_what_the_preflight_refuses_elsewhere_passes_where_it_trains():
    # The repetition code takes every rank's gradient in one backward: a static graph records it.
    frc = L.Trainer(accelerator="cpu", devices=3, strategy=DracoStrategy(static_graph=True), logger=False)
    _checked(frc, _Tiny(), launching=True)
    # A frozen sparse embedding makes no gradient at all.
    _checked(frc, _FrozenSparseEmbedding(), launching=False)


def _taken_at(processed: int, completed: int, loader_epoch: int, steps_trained: int, epoch: int = 0) -> dict:
    """The parts of a Lightning checkpoint that say where in the epoch it was taken."""
    counts = lambda: {"ready": processed, "started": processed, "processed": processed, "completed": completed}  # noqa: E731
    return {"loops": {"fit_loop": {
        "state_dict": {"combined_loader": [{"epoch": loader_epoch, "steps_trained": steps_trained}]},
        "epoch_progress": {"current": {"ready": epoch + 1, "started": epoch + 1, "processed": epoch,
                                       "completed": epoch}},
        "epoch_loop.batch_progress": {"current": counts(), "total": counts(), "is_last_batch": False},
        "epoch_loop.state_dict": {"_batches_that_stepped": 7},
    }}}


@pytest.mark.parametrize("epoch", [0, 3])
def test_a_checkpoint_inside_a_step_counts_its_batches_from_the_steps_start(epoch):
    # A validation after batch 5 of an epoch whose steps take 3 batches: the loader stands at batch 3.
    checkpoint = _taken_at(processed=5, completed=5, loader_epoch=epoch, steps_trained=3, epoch=epoch)
    ckpt.rewind_to_step_start(checkpoint)
    fit_loop = checkpoint["loops"]["fit_loop"]
    progress = fit_loop["epoch_loop.batch_progress"]
    # As Lightning writes one at the end of batch 3 (the last of the step before): that batch not yet
    # completed, its step counted, which its restart counts once more.
    assert progress["current"] == progress["total"] == {"ready": 3, "started": 3, "processed": 3, "completed": 2}
    assert fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] == 6


@pytest.mark.parametrize("taken", [
    # After a step's last batch (ModelCheckpoint(every_n_train_steps)): completed lags by the batch at hand.
    dict(processed=6, completed=5, loader_epoch=0, steps_trained=6),
    # At the end of an epoch, and a loader position from another epoch than the one under way.
    dict(processed=8, completed=8, loader_epoch=0, steps_trained=8),
    dict(processed=5, completed=5, loader_epoch=1, steps_trained=3),
])
def test_a_checkpoint_at_a_steps_end_keeps_lightnings_count(taken):
    checkpoint = _taken_at(**taken)
    before = copy.deepcopy(checkpoint)
    ckpt.rewind_to_step_start(checkpoint)
    assert checkpoint == before


def test_a_checkpoint_inside_an_epoch_is_told_from_one_at_its_end():
    assert ckpt.inside_an_epoch(_taken_at(processed=5, completed=4, loader_epoch=0, steps_trained=5))
    at_end = _taken_at(processed=8, completed=8, loader_epoch=0, steps_trained=8)
    at_end["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] = True
    assert not ckpt.inside_an_epoch(at_end)
    assert not ckpt.inside_an_epoch({"state_dict": {}})
