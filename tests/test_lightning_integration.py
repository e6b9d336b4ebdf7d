"""Single-process checks of how DracoStrategy fits into Lightning: names, messages, hooks, verdicts, data digests."""

from types import SimpleNamespace

import lightning as L
import numpy
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.model_helpers import is_overridden

import lightning_draco  # noqa: F401  (registers the names)
from lightning_draco import DracoDecodeError, DracoStrategy, FractionalRepetitionCode
from lightning_draco.batch_view import BatchHookView
from lightning_draco.consistency import (
    InconsistentDataError,
    batch_digest,
    compare_digests,
    explain_decode_failure,
)
from lightning_draco.data import PartitionBatch
from lightning_draco.exchange.verdict import check_verdict


# -- names and messages -------------------------------------------------------------------
def test_find_unused_parameters_name_is_registered_and_sets_the_flag():
    assert "draco_find_unused_parameters_true" in StrategyRegistry
    trainer = L.Trainer(accelerator="cpu", devices=3, strategy="draco_find_unused_parameters_true", logger=False)
    assert isinstance(trainer.strategy, DracoStrategy)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is True
    plain = L.Trainer(accelerator="cpu", devices=3, strategy="draco", logger=False)
    assert plain.strategy._ddp_kwargs.get("find_unused_parameters", False) is False


def test_the_class_path_string_names_the_strategy():
    trainer = L.Trainer(accelerator="cpu", devices=3, strategy="lightning_draco.DracoStrategy", logger=False)
    assert isinstance(trainer.strategy, DracoStrategy)


def test_unused_parameters_error_points_at_the_draco_name():
    error = RuntimeError(
        "Expected to have finished reduction in the prior iteration before starting a new one. This error"
        " indicates that your module has parameters that were not used in producing loss."
    )
    DracoStrategy().on_exception(error)
    assert "strategy='draco_find_unused_parameters_true'" in str(error)
    assert "ddp_find_unused_parameters_true" not in str(error)
    other = RuntimeError("something else")
    DracoStrategy().on_exception(other)
    assert str(other) == "something else"


@pytest.mark.parametrize("name", ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"])
def test_inherited_hook_arguments_are_accepted_at_their_default_and_refused_with_a_value(name):
    DracoStrategy(**{name: None})  # what LightningCLI passes
    with pytest.raises(ValueError, match=f"{name} cannot be set on DracoStrategy"):
        DracoStrategy(**{name: 1})


# -- the PS refuses verdicts that need more than s liars ------------------------------------
CODE = FractionalRepetitionCode(6, 1)


def test_a_verdict_blaming_the_ps_is_a_decode_failure_naming_those_that_outvoted_it():
    with pytest.raises(DracoDecodeError, match=r"names the parameter server \(rank 0\)") as caught:
        check_verdict(CODE, [0], trusted=0)
    assert caught.value.suspects == [1, 2]
    with pytest.raises(DracoDecodeError) as caught:
        check_verdict(CODE, [4], trusted=4)
    assert caught.value.suspects == [3, 5]


def test_a_verdict_naming_more_than_s_ranks_is_a_decode_failure():
    with pytest.raises(DracoDecodeError, match=r"names 2 ranks \[1, 4\] as faulty, more than s=1") as caught:
        check_verdict(CODE, [1, 4], trusted=0)
    assert caught.value.suspects == [1, 2, 3, 4, 5]  # their groups, without the trusted PS


def test_a_verdict_within_s_passes():
    check_verdict(CODE, [4], trusted=0)
    check_verdict(CODE, [], trusted=0)


def test_the_real_vote_outvoting_the_ps_is_caught():
    code = FractionalRepetitionCode(3, 1)
    honest, wrong = torch.ones(8), -torch.ones(8)
    result = code.decode(torch.stack([honest, wrong, wrong]))
    assert result.faulty == [0], "two colluders out of three win the vote: the premise of the check"
    with pytest.raises(DracoDecodeError):
        check_verdict(code, result.faulty, trusted=0)


# -- digests of the first batch ---------------------------------------------------------------
def test_digest_follows_the_data():
    x = torch.arange(12.0).reshape(3, 4)
    assert batch_digest((x, torch.tensor([1, 2, 3]))) == batch_digest((x.clone(), torch.tensor([1, 2, 3])))
    different = [
        (x + 1, torch.tensor([1, 2, 3])),
        (x.double(), torch.tensor([1, 2, 3])),
        (x.reshape(4, 3), torch.tensor([1, 2, 3])),
        (x, torch.tensor([1, 2, 4])),
        {"x": x, "y": torch.tensor([1, 2, 3])},
    ]
    digests = {batch_digest((x, torch.tensor([1, 2, 3])))} | {batch_digest(b) for b in different}
    assert len(digests) == 1 + len(different)
    assert batch_digest(x.t()) == batch_digest(x.t().contiguous())  # the values, not the memory layout
    assert batch_digest(numpy.arange(4)) != batch_digest(numpy.arange(1, 5))
    assert batch_digest([object(), "a"]) == batch_digest([object(), "a"])  # no memory addresses
    one, two = torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0], dtype=torch.bfloat16)
    assert batch_digest(one) != batch_digest(two)


def test_digest_follows_the_fields_of_a_dataclass_batch():
    """A collate_fn of the user's own may return a dataclass: it was digested by its type alone, so holders
    that loaded different data passed the check and the honest one was named as a liar at every step."""
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        y: torch.Tensor

    x = torch.arange(6.0)
    assert batch_digest(Batch(x, x.long())) == batch_digest(Batch(x.clone(), x.long()))
    assert batch_digest(Batch(x, x.long())) != batch_digest(Batch(x + 1, x.long()))
    assert batch_digest(Batch(x, x.long())) != batch_digest((x, x.long()))

    @dataclasses.dataclass
    class WithHandle:
        x: torch.Tensor
        handle: object = dataclasses.field(default=None, compare=False)  # per process: no part of the data

    assert batch_digest(WithHandle(x, handle=object())) == batch_digest(WithHandle(x.clone(), handle=1))


def test_holders_that_agree_pass_and_the_first_mismatch_names_partition_and_ranks():
    compare_digests([{0: "a", 1: "b"}, {1: "b", 2: "c"}, {2: "c", 0: "a"}])
    with pytest.raises(InconsistentDataError) as caught:
        compare_digests([{0: "a", 1: "b"}, {1: "b", 2: "c"}, {2: "x", 0: "a"}])
    message = str(caught.value)
    assert "partition 2 (rank [1] loaded one batch, rank [2] loaded another)" in message
    assert "partition 0" not in message and "partition 1" not in message
    assert "seed_everything" in message and "seed the split" in message
    expected = r"partition 0 \(ranks \[0, 2\] loaded one batch, rank \[1\] loaded another\)"
    with pytest.raises(InconsistentDataError, match=expected):
        compare_digests([{0: "a"}, {0: "z"}, {0: "a"}])


# -- the hint on failed votes ----------------------------------------------------------------
def _decode_error(code, rows):
    with pytest.raises(DracoDecodeError) as caught:
        code.decode(torch.stack(rows))
    return caught.value.at(7, 2)


@pytest.mark.parametrize("tolerance", [0.0, 1e-5])
def test_a_group_where_no_s_plus_1_members_agree_gets_the_data_hint(tolerance):
    rows = [torch.full((4,), float(i)) for i in range(3)]
    error = _decode_error(FractionalRepetitionCode(3, 1, tolerance=tolerance), rows)
    hinted = explain_decode_failure(error)
    assert str(hinted).startswith(str(error))
    assert ("either more than s of them lied, or, where no liar is expected, that looks like inconsistent data or"
            " non-determinism") in str(hinted)
    assert (hinted.step, hinted.bucket, hinted.suspects) == (7, 2, error.suspects)
    assert explain_decode_failure(hinted) is hinted


def test_two_agreeing_classes_get_no_hint():
    rows = [torch.zeros(4), torch.zeros(4), torch.ones(4), torch.ones(4), torch.full((4,), 2.0)]
    error = _decode_error(FractionalRepetitionCode(5, 1, redundancy=5), rows)
    assert "different values" in str(error)
    assert explain_decode_failure(error) is error


# -- batch hooks -------------------------------------------------------------------------------
class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_start(self, batch, batch_idx):
        x, y = batch
        self.seen.append(("start", x, y))


class _Callback(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch)


def test_hooks_get_the_first_partitions_batch_while_installed():
    module, callback = _Module(), _Callback()
    trainer = SimpleNamespace(lightning_module=module, callbacks=[callback])
    first, second = (torch.zeros(2), torch.ones(2)), (torch.ones(2), torch.zeros(2))
    batch = PartitionBatch([first, second], [3, 4], 0, 0)
    view = BatchHookView()
    view.install(trainer)
    assert is_overridden("on_train_batch_start", module) and not is_overridden("on_train_batch_end", module)
    module.on_train_batch_start(batch, 0)
    callback.on_train_batch_end(None, module, None, batch=batch, batch_idx=0)
    assert module.seen == [("start", *first)] and callback.seen == [first]
    view.uninstall()
    assert "on_train_batch_start" not in vars(module) and "on_train_batch_end" not in vars(callback)
    with pytest.raises(ValueError):
        module.on_train_batch_start(batch, 0)  # unwrapped: four fields do not unpack into two


class _DataModule(L.LightningDataModule):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x + 1, y


def test_on_before_batch_transfer_lets_the_partition_batch_through_for_the_strategy_to_run_per_partition():
    module, data = _Module(), _DataModule()
    view = BatchHookView()
    view.install(SimpleNamespace(lightning_module=module, callbacks=[], datamodule=data))
    batch = PartitionBatch([(torch.zeros(2), torch.ones(2))], [0], 0, 0)
    # Lightning's hook selector still finds the datamodule's override, not the module's default.
    assert is_overridden("on_before_batch_transfer", data) and not is_overridden("on_before_batch_transfer", module)
    assert data.on_before_batch_transfer(batch, 0) is batch and module.on_before_batch_transfer(batch, 0) is batch
    x, y = data.on_before_batch_transfer(batch.batches[0], 0)  # what the strategy passes: one partition's batch
    assert torch.equal(x, torch.ones(2)) and torch.equal(y, torch.ones(2))
    view.uninstall()
    assert "on_before_batch_transfer" not in vars(data) and "on_before_batch_transfer" not in vars(module)


def test_uninstall_restores_a_hook_set_on_the_instance():
    module = _Module()
    own = lambda batch, batch_idx: ("own", batch)  # noqa: E731
    module.on_train_batch_start = own
    view = BatchHookView()
    view.install(SimpleNamespace(lightning_module=module, callbacks=[]))
    assert module.on_train_batch_start(PartitionBatch(["b"], [0], 0, 0), 0) == ("own", "b")
    view.uninstall()
    assert module.on_train_batch_start is own
