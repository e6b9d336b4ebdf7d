"""The repetition code under find_unused_parameters: every partition's forward inside one call of DDP's forward."""

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lightning_draco import DracoStrategy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: only there does DDP's forward move its inputs"))]


class _TwoHeads(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_prepares_the_backward_from_every_partition_run_in_its_one_forward(device, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        module = _TwoHeads().to(device)
        strategy = DracoStrategy(find_unused_parameters=True)
        strategy._lightning_module = module
        # On a GPU rank Lightning gives DDP device_ids, and DDP then moves (and indexes) its inputs.
        ids = [torch.device(device).index or 0] if device == "cuda" else None
        strategy.model = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
        exchanged = []

        def hook(state, bucket):
            exchanged.append(bucket.buffer().numel())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        strategy.model.register_comm_hook(None, hook)
        x = torch.ones(2, 4, device=device)

        def partitions():
            assert module.forward.__func__ is L.LightningModule.forward, "training_step may call self(x)"
            # Head 0 only in the first partition, head 1 only in the last: DDP must see both graphs, or it
            # takes one head for unused and then finds it ready twice.
            return module.heads[0](module.body(x)).sum() + module.heads[1](module.body(x)).sum()

        strategy._in_one_ddp_forward(partitions).backward()
        assert sum(exchanged) == sum(p.numel() for p in module.parameters()), "DDP's hook got every gradient"
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())
        assert module.forward.__func__ is L.LightningModule.forward, "the module's own forward is back"
    finally:
        dist.destroy_process_group()
