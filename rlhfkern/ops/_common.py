"""Helpers every op family's glue shares."""

import torch


def acc_dtype(*xs):
    """Accumulation and output dtype for inputs (tensors or dtypes; None ignored): float64 when
    any is float64, else float32 (DESIGN.md: accumulate in fp32 whatever the input dtype)."""
    dtypes = [x.dtype if isinstance(x, torch.Tensor) else x for x in xs if x is not None]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def rows2d(x, width):
    """x as [rows, width] with a unit stride along width (what the kernels read), copying only
    when it must."""
    x = x.reshape(-1, width)
    return x if width <= 1 or x.stride(-1) == 1 else x.contiguous()
