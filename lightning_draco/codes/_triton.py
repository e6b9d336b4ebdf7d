"""What the codes' Triton kernels share: the optional import, where a kernel can run, and how a code's
``kernel=`` option is checked.

Triton ships with CUDA builds of torch; elsewhere (or without it) the codes run their torch passes.
With ``TRITON_INTERPRET=1`` set before Triton is imported, kernels run on CPU tensors in Triton's
interpreter instead: that is how the tests check them without a GPU (tests/conftest.py sets it there).
"""

import contextlib
from typing import Optional

import torch

#: The oldest Triton the kernels are tested with; older ones are treated as missing.
MIN_TRITON = (3, 6)

try:
    import triton

    #: The installed Triton's version (None where it is missing).
    FOUND: Optional[str] = triton.__version__
    if tuple(int(part) for part in FOUND.split(".")[:2]) < MIN_TRITON:
        triton = None
except ImportError:  # optional: the torch passes serve where Triton is missing
    triton, FOUND = None, None

__all__ = ["FOUND", "MIN_TRITON", "available", "check_kernel", "launching_on", "triton"]


def check_kernel(kernel: str, choices: tuple[str, ...]) -> None:
    """A code's ``kernel`` option: one of ``choices``, and "triton" only where a recent Triton is installed."""
    if kernel not in choices:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, choices))} (got {kernel!r}).")
    if kernel == "triton" and triton is None:
        found = f"found {FOUND}" if FOUND else "none is installed"
        raise ValueError(f"kernel='triton' needs Triton {'.'.join(map(str, MIN_TRITON))} or newer ({found}; CUDA"
                         " builds of torch ship it); or kernel='auto'.")


def available(device: torch.device) -> bool:
    """Whether a kernel can run on ``device``: compiled on CUDA, or in the interpreter on the CPU."""
    if triton is None:
        return False
    interpreted = bool(triton.knobs.runtime.interpret)
    return torch.device(device).type == ("cpu" if interpreted else "cuda")


def launching_on(device: torch.device):
    """The context a kernel on ``device``'s tensors launches in: Triton launches on the current CUDA device,
    which need not be the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
