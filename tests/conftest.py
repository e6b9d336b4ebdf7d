import os

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
