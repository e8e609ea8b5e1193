"""Helpers shared by the Triton kernels of every family."""

import numpy as np
import triton
import triton.language as tl


def split_float(x):
    """x as an fp32 pair (hi, lo) with hi + lo == x to ~48 bits: Triton passes Python floats as
    fp32, so a float64 kernel takes its constants in two parts and joins them with `join_float`."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


@triton.jit
def join_float(hi, lo, dtype: tl.constexpr):
    return tl.cast(hi, dtype) + tl.cast(lo, dtype)
