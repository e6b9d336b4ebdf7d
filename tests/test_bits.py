"""Bitwise comparison of tensors (``same_bytes``): the repetition code's vote rests on it."""

import math

import pytest
import torch

from lightning_draco._bits import same_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32])
def test_same_bytes_is_bitwise_equality_of_the_integer_views(dtype):
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 1000, generator=gen) * 100).to(dtype)
    assert same_bytes(a[0], a[0].clone())
    assert same_bytes(a[:, :0], a[:, :0].clone())  # nothing to compare
    b = a[0].clone()
    b.view(torch.uint8)[-1] ^= 1  # the last byte alone
    assert not same_bytes(a[0], b)
    assert not same_bytes(a[0], a[1])
    if dtype.is_floating_point:
        zeros = torch.zeros(4, dtype=dtype)
        assert not same_bytes(zeros, -zeros), "+0.0 and -0.0 are different bits"
        nan = torch.full((4,), math.nan, dtype=dtype)
        assert same_bytes(nan, nan.clone()), "an identical NaN is the same value"
    # Non-contiguous views and different shapes: the integer views are compared as torch.equal does.
    assert same_bytes(a[:, 1], a.clone()[:, 1])
    assert not same_bytes(a[:, 1], a[:, 2])
    assert not same_bytes(a[0, :10], a[0, :11])
