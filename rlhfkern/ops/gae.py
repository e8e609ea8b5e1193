"""GAE family: generalized advantage estimation and masked whitening (verl 0.9.1 semantics).

For each row, backwards over t = T-1 .. 0, with nv = g = 0 after the last token:

    delta_t = r_t + gamma * nv - V_t
    g'      = delta_t + gamma * lam * g
    nv      = m_t * V_t + (1 - m_t) * nv        # masked tokens carry the next value
    g       = m_t * g'  + (1 - m_t) * g         # ... and the advantage (multi-turn observations)
    adv_t   = g,   ret_t = adv_t + V_t          # returns before whitening

masked_whiten over all masked positions (unbiased variance, eps = 1e-8):

    n = sum m,  mean = sum m x / (n + eps),  var = sum m (x - mean)^2 / (n + eps) * n / (n - 1)
    out = (x - mean) * rsqrt(var + eps)  (+ mean when shift_mean=False)

Entries where m == 0 never enter the statistics, even when they hold nan/inf. With fewer than
two masked elements the variance does not exist: the result is nan (no host sync to raise;
`rlhfkern.compat.verl` raises as verl does).

Accumulation and outputs are float32 for float32/bf16/fp16 inputs and float64 for float64.
"""

import numbers

import torch

from .. import _dispatch
from ._common import acc_dtype, rows2d

WHITEN_EPS = 1e-8
# "auto" on GPUs: the Triton scan before the CUDA kernel, which measured about 2x slower on an
# H200 (bench/results/NVIDIA_H200.md: 1024 x 8192 fp32, triton 85.6 us, cuda 167 us)
GPU_ORDER = ("triton", "cuda")


# ----------------------------------------------------------------------------- reference (spec)
def gae_reference(rewards, values, mask, gamma=1.0, lam=1.0):
    """The spec: the reverse loop above, in the accumulation dtype."""
    acc = acc_dtype(rewards.dtype, values.dtype)
    r, v, m = rewards.to(acc), values.to(acc), mask.to(acc)
    B, T = r.shape
    nv = torch.zeros(B, dtype=acc, device=r.device)
    g = torch.zeros(B, dtype=acc, device=r.device)
    adv = torch.empty(B, T, dtype=acc, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nv - v[:, t]
        g_new = delta + gamma * lam * g
        nv = v[:, t] * m[:, t] + (1 - m[:, t]) * nv
        g = g_new * m[:, t] + (1 - m[:, t]) * g
        adv[:, t] = g
    return adv, adv + v


def masked_whiten_reference(values, mask, shift_mean=True):
    """The spec of masked_whiten, statistics in float64."""
    acc = acc_dtype(values.dtype)
    x, m = values.double(), mask.double()
    on = m != 0
    n = m.sum()
    mean = torch.where(on, x * m, 0.0).sum() / (n + WHITEN_EPS)
    var = torch.where(on, (x - mean) ** 2 * m, 0.0).sum() / (n + WHITEN_EPS) * (n / (n - 1))
    var = torch.where(n > 1, var, float("nan"))
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out.to(acc)


# ----------------------------------------------------------------------------- triton custom ops
@torch.library.custom_op("rlhfkern::gae_triton", mutates_args=())
def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels import gae as kernels

    return kernels.gae(rewards, values, mask, gamma, lam, acc_dtype(rewards.dtype))


@torch.library.custom_op("rlhfkern::masked_whiten_triton", mutates_args=())
def _masked_whiten_triton(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    from ..triton_kernels import gae as kernels

    return kernels.masked_whiten(values, mask, shift_mean, acc_dtype(values.dtype), eps=WHITEN_EPS)


def _gae_fake(rewards, values, mask, gamma, lam):
    out = rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))
    return out, torch.empty_like(out)


def _masked_whiten_fake(values, mask, shift_mean):
    return values.new_empty(values.shape, dtype=acc_dtype(values.dtype))


torch.library.register_fake("rlhfkern::gae_triton", _gae_fake)
torch.library.register_fake("rlhfkern::masked_whiten_triton", _masked_whiten_fake)
if _dispatch.extension() is not None:  # schemas of rlhfkern._C (csrc/registration.cpp)
    torch.library.register_fake("rlhfkern::gae", _gae_fake)
    torch.library.register_fake("rlhfkern::masked_whiten", _masked_whiten_fake)


# ----------------------------------------------------------------------------- validation
def _check_float(x, name):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (float32/bfloat16/float16/float64), got {x.dtype}")


def _check_mask(mask, like, like_name):
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise ValueError(f"mask must be a bool, integer or floating tensor, got {mask.dtype}")
    _check_same(mask, "mask", like, like_name)


def _check_same(x, name, like, like_name):
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like_name} has shape {tuple(like.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def _check_unit(x, name):
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = float(x)  # a host read if x lives on a GPU: pass Python floats to avoid it
    if not isinstance(x, numbers.Real) or not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    return float(x)


# ----------------------------------------------------------------------------- public ops
def gae(rewards, values, mask, gamma=1.0, lam=1.0, *, whiten=False, backend=None):
    """GAE advantages and returns, verl `compute_gae_advantage_return` semantics.

    rewards, values: [B, T] floating; mask: [B, T] bool/int/float (1 = response token).
    Returns (advantages, returns), float32 (float64 for float64 inputs). With `whiten=True`
    the advantages are whitened over the masked positions (as verl does); returns never are.
    Formulas: this module's docstring.
    """
    _check_float(rewards, "rewards")
    _check_float(values, "values")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D [B, T], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] == 0:
        raise ValueError("rewards has T = 0 (an empty response dimension)")
    _check_same(values, "values", rewards, "rewards")
    _check_mask(mask, rewards, "rewards")
    gamma = _check_unit(gamma, "gamma")
    lam = _check_unit(lam, "lam")
    if rewards.dtype != values.dtype:
        common = torch.promote_types(rewards.dtype, values.dtype)
        rewards, values = rewards.to(common), values.to(common)

    which = _dispatch.resolve(backend, rewards.device, gpu_order=GPU_ORDER)
    if which == "torch":
        adv, ret = gae_reference(rewards, values, mask, gamma, lam)
    else:
        T = rewards.shape[1]
        rewards, values, mask = rows2d(rewards, T), rows2d(values, T), rows2d(mask, T)
        op = torch.ops.rlhfkern.gae_triton if which == "triton" else torch.ops.rlhfkern.gae
        adv, ret = op(rewards, values, mask, gamma, lam)
    if whiten:
        adv = masked_whiten(adv, mask, backend=which)
    return adv, ret


def masked_whiten(values, mask, shift_mean=True, *, backend=None):
    """Whiten `values` with the mean and unbiased variance over the positions where mask != 0.

    Any shape (mask the same shape). Output float32 (float64 for float64 input). Fewer than two
    masked elements give nan. Formula: this module's docstring.
    """
    _check_float(values, "values")
    if values.dim() == 0 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty tensor with at least 1 dim, got shape {tuple(values.shape)}")
    _check_mask(mask, values, "values")
    which = _dispatch.resolve(backend, values.device, gpu_order=GPU_ORDER)
    if which == "torch":
        return masked_whiten_reference(values, mask, shift_mean)
    if which == "cuda":
        # no CUDA kernel of its own: Triton's when it runs here, else the torch composition
        if _dispatch.why_unavailable("triton", "cuda") is not None:
            return masked_whiten_reference(values, mask, shift_mean)
        which = "triton"
    shape = values.shape
    x, m = rows2d(values, shape[-1]), rows2d(mask, shape[-1])
    op = torch.ops.rlhfkern.masked_whiten_triton if which == "triton" else torch.ops.rlhfkern.masked_whiten
    return op(x, m, bool(shift_mean)).reshape(shape)
