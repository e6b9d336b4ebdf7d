import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "fuzz", max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter: tests/test_frc_fused.py and
# tests/test_crc.py check the codes' Triton kernels that way. The switch is read when Triton is imported,
# so it is set here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class _Launches:
    """Wraps a Triton kernel (``kernel[grid](...)``) and records the ``UNROLL`` of each launch."""

    def __init__(self, kernel):
        self.kernel, self.unrolled = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.unrolled.append(kwargs["UNROLL"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def unroll_launches(monkeypatch):
    """``{"frc": [...], "crc": [...]}``: whether each launch of the codes' Triton passes was unrolled over
    its rows (the launchers choose by ``UNROLLED_ROWS``)."""
    from lightning_draco.codes import crc_triton, frc_triton

    if frc_triton.triton is None:
        pytest.skip("Triton is not installed")
    seen = {"frc": _Launches(frc_triton._compare_and_sum), "crc": _Launches(crc_triton._certify)}
    monkeypatch.setattr(frc_triton, "_compare_and_sum", seen["frc"])
    monkeypatch.setattr(crc_triton, "_certify", seen["crc"])
    return {name: spy.unrolled for name, spy in seen.items()}


def _order(item) -> int:
    """The launch tests first, then the multi-rank modules, then the single-process ones."""
    return 0 if item.get_closest_marker("launch") else 1 if item.get_closest_marker("distributed") else 2


def pytest_collection_modifyitems(config, items):
    """``make test`` runs three workers (``-n 3 --dist loadfile --no-loadscope-reorder``), which take whole
    modules (a module's tests share its multi-rank job or compiled kernels) in the order collected: the
    longest start first, and the single-process modules fill in beside them."""
    items.sort(key=_order)
