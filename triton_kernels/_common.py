"""Helpers shared by the Triton kernels of every family."""

import numpy as np
import torch
import triton
import triton.language as tl


def acc_dtype(x):
    """Accumulation/output dtype of a kernel on tensor x: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def split_float(x):
    """x as three fp32 parts with hi + mid + lo == x exactly: Triton passes Python floats as fp32,
    so a float64 kernel takes its constants in parts and joins them with `join_float`."""
    x = float(x)
    if not np.isfinite(x):
        return x, 0.0, 0.0
    hi = float(np.float32(x))
    mid = float(np.float32(x - hi))
    return hi, mid, float(np.float32(x - hi - mid))


@triton.jit
def join_float(hi, mid, lo, dtype: tl.constexpr):
    return tl.cast(hi, dtype) + tl.cast(mid, dtype) + tl.cast(lo, dtype)
