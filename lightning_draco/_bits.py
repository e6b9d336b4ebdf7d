"""Integer views of floating-point tensors: bitwise comparison (a NaN equals an identical NaN) and bit flips."""

import torch

_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The integer dtype of the same width as ``tensor``'s elements, for ``tensor.view(...)``."""
    return _SAME_WIDTH[tensor.element_size()]
