import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The suite's cases are drawn from a seed fixed per test (derandomize), so a failure in CI reproduces on any
# machine with the same command and cannot come and go between runs of one commit. The search for new
# failures is the fuzz profile's job: fresh random cases, many more of them (``make fuzz``).
settings.register_profile(
    "default", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
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


# Seconds the longest modules took in a three-worker run on two cores (``--durations=0``, summed by module).
# They start first, longest first, so that none of them starts last and runs alone at the end.
LONGEST = {
    "test_app.py": 480, "test_slurm.py": 440, "test_torchrun.py": 370, "test_training.py": 270,
    "test_frc_fused.py": 185, "test_hooks.py": 100, "test_lightning.py": 140, "test_precision.py": 95,
    "test_cyclic.py": 80, "test_app_config.py": 75, "test_crc.py": 70, "test_kernels_compile.py": 60,
    "test_cli.py": 60, "test_sharded.py": 40,
}


def _order(item) -> tuple[int, int]:
    """The longest modules first; then the launch tests, the multi-rank modules and the single-process ones."""
    kind = 0 if item.get_closest_marker("launch") else 1 if item.get_closest_marker("distributed") else 2
    return -LONGEST.get(item.path.name, 0), kind


def pytest_collection_modifyitems(config, items):
    """``make test`` runs three workers (``-n 3 --dist loadfile --no-loadscope-reorder``), which take whole
    modules (a module's tests share its multi-rank job or compiled kernels) in the order collected: the
    longest start first, and the single-process modules fill in beside them."""
    items.sort(key=_order)


@pytest.fixture
def no_process_group_left():
    """For tests that fit on one rank in the test's own process: Lightning leaves the process group it made, and
    the launcher's variables (MASTER_PORT, LOCAL_RANK, ...) in the environment; a later test in the same worker
    would find them (and take them for a launch that did not end, or hand them to the processes it starts)."""
    environment = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
