"""Values logged in training_step are combined over a rank's partitions, once per name and step."""

import pytest
import torch

from lightning_draco.partition_logging import combined_over_partitions, unchanged_metrics


class Module:
    def __init__(self):
        self.logged = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value, kwargs))


class Metric:
    """Stands for a torchmetrics Metric: it keeps its own state, so every call must reach log."""


def test_each_name_is_logged_once_with_the_partitions_mean():
    module = Module()
    with combined_over_partitions(module):
        for loss, acc in [(1.0, 0.5), (2.0, 0.25), (4.5, 0.75)]:
            module.log("train_loss", torch.tensor(loss, requires_grad=True) * 1, prog_bar=True, batch_size=16)
            module.log("acc", acc)
        assert module.logged == []  # nothing reaches Lightning while the partitions run
    names = [name for name, _, _ in module.logged]
    assert names == ["train_loss", "acc"]
    loss = module.logged[0]
    assert float(loss[1]) == 2.5 and not loss[1].requires_grad
    assert loss[2] == {"prog_bar": True, "batch_size": 16}
    assert float(module.logged[1][1]) == 0.5


PARTITIONS = [1.5, 4.0, -2.0, 0.5]  # one rank's four partitions' values of one name


def logged_over_partitions(**kwargs):
    """What one rank logs for ``self.log("x", value, **kwargs)`` run once per partition."""
    module = Module()
    with combined_over_partitions(module):
        for value in PARTITIONS:
            module.log("x", torch.tensor(value), sync_dist=True, **kwargs)
    [(name, value, options)] = module.logged
    assert name == "x" and options == {"sync_dist": True, **kwargs}  # Lightning still sees the user's reduce_fx
    return float(value)


@pytest.mark.parametrize("reduce_fx", ["max", "MAX", "Max", torch.max, max])
def test_a_max_is_the_largest_partitions_value(reduce_fx):
    assert logged_over_partitions(reduce_fx=reduce_fx) == 4.0


@pytest.mark.parametrize("reduce_fx", ["min", "Min", torch.min, min])
def test_a_min_is_the_smallest_partitions_value(reduce_fx):
    assert logged_over_partitions(reduce_fx=reduce_fx) == -2.0


@pytest.mark.parametrize("reduce_fx", [None, "mean", "avg", "Mean", torch.mean, "sum", torch.sum, sum])
def test_a_mean_or_a_sum_is_the_partitions_mean(reduce_fx):
    """A sum too: each partition is held by r ranks, so DDP's sum over ranks of the per-rank means is
    the sum over partitions (summing here would log r times DDP's value)."""
    kwargs = {} if reduce_fx is None else {"reduce_fx": reduce_fx}
    assert logged_over_partitions(**kwargs) == sum(PARTITIONS) / len(PARTITIONS)


@pytest.mark.parametrize("code, world, s", [("frc", 6, 1), ("crc", 6, 1), ("crc", 7, 3), ("none", 4, 0)])
@pytest.mark.parametrize("reduce_fx", ["max", "min", "mean", "sum"])
def test_synced_across_ranks_the_value_is_what_ddp_logs(code, world, s, reduce_fx):
    """DDP's rank i logs partition i's value; with sync_dist Lightning reduces the ranks' values with
    reduce_fx. Each DRACO rank logs its combination of the partitions it holds, reduced the same way."""
    from lightning_draco.codes import make_code

    held = [make_code(code, world, s, None).partitions(rank) for rank in range(world)]
    value = torch.randn(world, generator=torch.Generator().manual_seed(world))  # partition p's value
    across_ranks = {"max": torch.max, "min": torch.min, "mean": torch.mean, "sum": torch.sum}[reduce_fx]
    per_rank = []
    for partitions in held:
        module = Module()
        with combined_over_partitions(module):
            for p in partitions:
                module.log("x", value[p], sync_dist=True, reduce_fx=reduce_fx)
        per_rank.append(module.logged[0][1])
    draco, ddp = across_ranks(torch.stack(per_rank)), across_ranks(value)
    assert torch.allclose(draco, ddp, atol=1e-6), (draco, ddp)


def test_metrics_pass_straight_through_and_the_module_is_restored():
    module = Module()
    metric = Metric()
    with combined_over_partitions(module):
        module.log("metric", metric)
        module.log("metric", metric)
    assert [value for _, value, _ in module.logged] == [metric, metric]
    assert "log" not in module.__dict__
    module.log("after", 1.0)
    assert module.logged[-1][0] == "after"


def holding(**metrics) -> torch.nn.Module:
    """A module holding ``metrics`` as submodules, as a LightningModule holds its metrics."""
    module = torch.nn.Module()
    for name, metric in metrics.items():
        module.add_module(name, metric)
    return module


def test_a_replayed_step_leaves_every_torchmetrics_state_as_it_was():
    """Reactive mode runs another group's training step on a helper: its metrics must not count it."""
    torchmetrics = pytest.importorskip("torchmetrics")
    net = holding(accuracy=torchmetrics.classification.MulticlassAccuracy(num_classes=3),
                  scores=torchmetrics.CatMetric())  # a list state
    net.accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    net.scores.update(torch.tensor([1.0, 2.0]))
    before = (float(net.accuracy.compute()), net.accuracy.update_count, net.scores.compute().tolist())
    with unchanged_metrics(net):
        net.accuracy(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 1]))
        net.scores.update(torch.tensor([9.0]))
        assert float(net.accuracy.compute()) != before[0]
    assert (float(net.accuracy.compute()), net.accuracy.update_count, net.scores.compute().tolist()) == before
    net.accuracy(torch.tensor([0]), torch.tensor([0]))  # and it goes on counting afterwards
    assert net.accuracy.update_count == before[1] + 1


def test_a_replayed_step_leaves_wrappers_and_the_last_forward_value_as_they_were():
    torchmetrics = pytest.importorskip("torchmetrics")
    net = holding(accuracy=torchmetrics.classification.MulticlassAccuracy(num_classes=3),
                  extremes=torchmetrics.wrappers.MinMaxMetric(torchmetrics.SumMetric()),
                  window=torchmetrics.wrappers.Running(torchmetrics.SumMetric(), window=2))
    logged = float(net.accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])))
    for value in (1.0, 2.0):
        net.extremes(torch.tensor(value))
        net.window(torch.tensor(value))
    before = (float(net.accuracy._forward_cache), {k: float(v) for k, v in net.extremes.compute().items()},
              float(net.window.compute()))
    with unchanged_metrics(net):
        net.accuracy(torch.tensor([0, 0]), torch.tensor([1, 1]))
        net.extremes(torch.tensor(100.0))
        net.window(torch.tensor(50.0))
    after = (float(net.accuracy._forward_cache), {k: float(v) for k, v in net.extremes.compute().items()},
             float(net.window.compute()))
    assert after == before and before[0] == logged
    net.window(torch.tensor(4.0))  # the window slides on from where it was: 2 + 4
    assert float(net.window.compute()) == 6.0
