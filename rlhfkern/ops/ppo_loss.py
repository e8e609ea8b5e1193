"""Policy-gradient family: PPO policy loss, value loss, KL penalties, the whole actor loss.

Semantics of verl 0.9.1 (`compute_policy_loss_vanilla`, `agg_loss`, `compute_value_loss`,
`kl_penalty`, `workers/utils/losses.py::ppo_loss`). Per token, with A the advantage:

    r     = exp(clamp(lp - old, -20, 20))
    L1    = -A r,   L2 = -A clamp(r, 1 - clip_low, 1 + clip_high),   M = max(L1, L2)
    L     = min(-A clip_c, M) if A < 0 else M          (dual-clip; clip_c=None: L = M)
    pg    = L * is_weight
    kl    = k1: lp - ref | abs: |lp - ref| | k2: (lp - ref)^2 / 2
            k3: clamp(e^x - x - 1, -10, 10) with x = clamp(ref - lp, -20, 20)
            "<kind>+": the value of <kind> with the gradient of k2 (straight-through)
    actor = pg - entropy_coeff * H + kl_coef * kl      (each aggregated like the policy loss)

Aggregation ("agg") of a token matrix X with mask m, n_b = sum_t m_bt, seq_b = [n_b > 0]:

    token-mean              sum m X / N * dp                 N = batch_num_tokens or sum m
    token-sum               sum m X * dp
    seq-mean-token-sum      sum_b seq_b sum_t m X / G * dp   G = global_batch_size or sum seq
    seq-mean-token-sum-norm the above / (loss_scale_factor or T)
    seq-mean-token-mean     sum_b seq_b (sum_t m X) / (n_b + 1e-8) / G * dp

Every mode is sum_bt w_b m_bt X_bt with a per-row weight w_b, so the fused kernels make one
pass forward (per-row sums of m*pg, m*H, m*kl and the metric counts) and one pass backward
(recomputing from the inputs): d lp = w_b m (g_pg is dpg/dlp + g_kl dkl/dlp), with PyTorch's
autograd rules at ties (max/min split the gradient in halves; clamp passes it at its bounds).
Metrics (local, as verl): pg_clipfrac = mean_m [L2 > L1], ppo_kl = mean_m (old - lp) clamped,
pg_clipfrac_lower = mean_m [M > -A clip_c and A < 0], with mean_m X = sum m X / (sum m + 1e-8).
Masked-out tokens never contribute, even when they hold nan/inf.
"""

import numbers

import torch

from .. import _dispatch
from ._common import acc_dtype, rows2d

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = {"kl": 0, "k1": 0, "abs": 1, "mse": 2, "k2": 2, "low_var_kl": 3, "k3": 3}
RATIO_CLAMP = 20.0
KL_CLAMP = 10.0
MEAN_EPS = 1e-8
# columns of the per-row partial sums of the fused forward
COLUMNS = ("count", "pg", "entropy", "kl", "clipped", "clipped_lower", "neg_log_ratio")


# ----------------------------------------------------------------------------- reference (spec)
def masked_sum_reference(x, mask, dim=None):
    on = mask != 0
    s = torch.where(on, x * mask, 0.0)
    return s.sum() if dim is None else s.sum(dim)


def masked_mean_reference(x, mask):
    return masked_sum_reference(x, mask) / (mask.sum() + MEAN_EPS)


def agg_loss_reference(loss_mat, mask, agg="token-mean", dp_size=1, batch_num_tokens=None,
                       global_batch_size=None, loss_scale_factor=None):
    """The aggregation table of this module's docstring, differentiable w.r.t. loss_mat."""
    _check_agg(agg, dp_size, batch_num_tokens, global_batch_size)
    m = mask.to(loss_mat.dtype)
    if agg in ("token-mean", "token-sum"):
        total = masked_sum_reference(loss_mat, m)
        if agg == "token-sum":
            return total * dp_size
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return total / n * dp_size
    n_b = m.sum(-1)
    seq = (n_b > 0).to(loss_mat.dtype)
    row = masked_sum_reference(loss_mat, m, dim=-1)
    if agg == "seq-mean-token-mean":
        row = row / (n_b + MEAN_EPS)
    g = seq.sum() if global_batch_size is None else global_batch_size
    loss = masked_sum_reference(row, seq) / g * dp_size
    if agg == "seq-mean-token-sum-norm":
        loss = loss / (loss_scale_factor if loss_scale_factor is not None else mask.shape[-1])
    return loss


def policy_loss_matrix_reference(log_prob, old_log_prob, advantages, clip_low=0.2, clip_high=0.2, clip_c=3.0):
    """Per-token PPO loss L and the metric indicators (clipped, clipped_lower, neg_log_ratio)."""
    nk = torch.clamp(log_prob - old_log_prob, -RATIO_CLAMP, RATIO_CLAMP)
    ratio = torch.exp(nk)
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    m = torch.maximum(l1, l2)
    clipped = torch.gt(l2, l1)
    if clip_c is None:
        return m, clipped, torch.zeros_like(clipped), -nk
    l3 = -advantages * clip_c
    loss = torch.where(advantages < 0, torch.minimum(l3, m), m)
    return loss, clipped, torch.gt(m, l3) & (advantages < 0), -nk


def kl_penalty_reference(log_prob, ref_log_prob, kind="low_var_kl"):
    """Per-token KL estimate; differentiable w.r.t. both log-prob arguments."""
    base, straight = _parse_kl(kind)
    diff = log_prob - ref_log_prob
    if base == 0:
        value = diff
    elif base == 1:
        value = diff.abs()
    elif base == 2:
        value = 0.5 * diff.square()
    else:
        x = torch.clamp(ref_log_prob - log_prob, -RATIO_CLAMP, RATIO_CLAMP)
        value = torch.clamp(torch.exp(x) - x - 1, -KL_CLAMP, KL_CLAMP)
    if not straight:
        return value
    k2 = 0.5 * diff.square()
    return k2 - k2.detach() + value.detach()


def actor_loss_reference(log_prob, old_log_prob, advantages, mask, *, entropy=None, ref_log_prob=None,
                         entropy_coeff=0.0, kl_coef=0.0, kl_kind="low_var_kl", clip_low=0.2, clip_high=0.2,
                         clip_c=3.0, agg="token-mean", is_weights=None, dp_size=1, batch_num_tokens=None,
                         global_batch_size=None, loss_scale_factor=None):
    """The spec of `actor_loss` (and of `ppo_loss`: entropy and ref_log_prob None), by composition."""
    acc = acc_dtype(log_prob, old_log_prob, advantages, entropy, ref_log_prob, is_weights)
    lp, old, adv = log_prob.to(acc), old_log_prob.to(acc), advantages.to(acc)
    m = mask.to(acc)
    agg_args = dict(agg=agg, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                    global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    loss_mat, clipped, clipped_lower, neg_log_ratio = policy_loss_matrix_reference(lp, old, adv, clip_low, clip_high, clip_c)
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.to(acc)
    pg_loss = agg_loss_reference(loss_mat, m, **agg_args)
    zero = pg_loss.new_zeros(())
    entropy_loss = agg_loss_reference(entropy.to(acc), m, **agg_args) if entropy is not None else zero
    kl_loss = (agg_loss_reference(kl_penalty_reference(lp, ref_log_prob.to(acc), kl_kind), m, **agg_args)
               if ref_log_prob is not None else zero)
    loss = pg_loss - entropy_coeff * entropy_loss + kl_coef * kl_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "entropy_loss": entropy_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "pg_clipfrac": masked_mean_reference(clipped.to(acc), m),
        "ppo_kl": masked_mean_reference(neg_log_ratio.detach(), m),
        "pg_clipfrac_lower": masked_mean_reference(clipped_lower.to(acc), m),
    }
    return loss, metrics


def value_loss_reference(vpreds, returns, old_values, mask, *, clip=0.5, agg="token-mean", dp_size=1,
                         batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl compute_value_loss: 0.5 agg(max((v - R)^2, (clip_by_value(v, V-c, V+c) - R)^2))."""
    acc = acc_dtype(vpreds, returns, old_values)
    v, ret, old = vpreds.to(acc), returns.to(acc), old_values.to(acc)
    m = mask.to(acc)
    clipped_v = torch.max(torch.min(v, old + clip), old - clip)
    l1 = (v - ret) ** 2
    l2 = (clipped_v - ret) ** 2
    loss = 0.5 * agg_loss_reference(torch.max(l1, l2), m, agg, dp_size, batch_num_tokens, global_batch_size,
                                    loss_scale_factor)
    return loss, masked_mean_reference(torch.gt(l2, l1).to(acc), m)


# ----------------------------------------------------------------------------- validation
def _parse_kl(kind):
    if not isinstance(kind, str):
        raise ValueError(f"kl kind must be a string, got {kind!r}")
    straight = kind.endswith("+")
    base = kind[:-1] if straight else kind
    if base not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kind!r}: expected one of {sorted(KL_KINDS)} (optionally with '+')")
    return KL_KINDS[base], straight and KL_KINDS[base] != 2


def _check_agg(agg, dp_size, batch_num_tokens, global_batch_size):
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}: expected one of {AGG_MODES}")
    if not isinstance(dp_size, numbers.Integral) or dp_size < 1:
        raise ValueError(f"dp_size must be a positive integer, got {dp_size!r}")
    if dp_size > 1 and agg == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and agg.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")


def _check_tensor(x, name, like, like_name, floating=True):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.is_complex():
        raise ValueError(f"{name} must be a real tensor, got {x.dtype}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like_name} has shape {tuple(like.shape)}")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def _number(x, name):
    if x is None:
        return None
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()  # a host read: pass Python numbers to avoid it
    if not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a number, got {x!r}")
    return float(x)


def _check_clips(clip_low, clip_high, clip_c):
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not isinstance(value, numbers.Real) or not 0 <= value:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if clip_c is not None and (not isinstance(clip_c, numbers.Real) or not clip_c > 1.0):
        raise ValueError(f"clip_c must be > 1.0 (dual-clip PPO) or None, got {clip_c!r}")


def _check_token_inputs(log_prob, others, mask):
    _check_tensor(log_prob, "log_prob", None, None)
    if log_prob.dim() < 1 or log_prob.numel() == 0:
        raise ValueError(f"log_prob must be a non-empty [B, T] tensor, got shape {tuple(log_prob.shape)}")
    for name, x in others.items():
        if x is not None:
            _check_tensor(x, name, log_prob, "log_prob")
    _check_tensor(mask, "mask", log_prob, "log_prob", floating=False)


# ----------------------------------------------------------------------------- fused custom ops
def _row_weights(partials, agg, T, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    """w_b of the docstring from the per-row mask counts (device tensors, no host sync)."""
    n_b = partials[:, 0]
    if agg == "token-sum":
        return torch.full_like(n_b, float(dp_size))
    if agg == "token-mean":
        n = n_b.sum() if batch_num_tokens is None else batch_num_tokens
        return torch.ones_like(n_b) * (dp_size / n)
    seq = (n_b > 0).to(n_b.dtype)
    g = seq.sum() if global_batch_size is None else global_batch_size
    w = seq * (dp_size / g)
    if agg == "seq-mean-token-mean":
        w = w / (n_b + MEAN_EPS)
    if agg == "seq-mean-token-sum-norm":
        w = w / (loss_scale_factor if loss_scale_factor is not None else T)
    return w


OP_BACKENDS = ("torch", "cpu", "triton")  # no CUDA kernel: Triton serves GPUs


def _kernel(name, backend):
    """The kernel `name` (actor_loss_fwd, value_loss_bwd, ...) of a compiled backend."""
    if backend == "triton":
        from ..triton_kernels import ppo_loss as kernels

        return getattr(kernels, name)
    return getattr(torch.ops.rlhfkern, name)


@torch.library.custom_op("rlhfkern::actor_loss", mutates_args=())
def _actor_loss_op(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, is_weights: torch.Tensor | None, entropy: torch.Tensor | None,
                   ref_log_prob: torch.Tensor | None, clip_low: float, clip_high: float, clip_c: float,
                   kl_code: int, entropy_coeff: float, kl_coef: float, agg: str, dp_size: int,
                   batch_num_tokens: float | None, global_batch_size: float | None,
                   loss_scale_factor: float | None, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (losses [4] = total, pg, entropy, kl; metrics [3] = clipfrac, clipfrac_lower,
    ppo_kl; row weights w_b [B])."""
    partials = _kernel("actor_loss_fwd", backend)(log_prob, old_log_prob, advantages, mask, is_weights, entropy,
                                                  ref_log_prob, clip_low, clip_high, clip_c, kl_code)
    w = _row_weights(partials, agg, log_prob.shape[-1], dp_size, batch_num_tokens, global_batch_size,
                     loss_scale_factor)
    parts = (w[:, None] * partials[:, 1:4]).sum(0)  # pg, entropy, kl
    total = parts[0] - entropy_coeff * parts[1] + kl_coef * parts[2]
    count = partials[:, 0].sum() + MEAN_EPS
    metrics = partials[:, 4:7].sum(0) / count
    return torch.cat([total[None], parts]), metrics, w


@_actor_loss_op.register_fake
def _(log_prob, old_log_prob, advantages, mask, is_weights, entropy, ref_log_prob, clip_low, clip_high,
      clip_c, kl_code, entropy_coeff, kl_coef, agg, dp_size, batch_num_tokens, global_batch_size,
      loss_scale_factor, backend):
    acc = acc_dtype(log_prob)
    return (log_prob.new_empty(4, dtype=acc), log_prob.new_empty(3, dtype=acc),
            log_prob.new_empty(log_prob.shape[0], dtype=acc))


@torch.library.custom_op("rlhfkern::actor_loss_backward", mutates_args=())
def _actor_loss_backward_op(grad_losses: torch.Tensor, w: torch.Tensor, log_prob: torch.Tensor,
                            old_log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                            is_weights: torch.Tensor | None, ref_log_prob: torch.Tensor | None,
                            clip_low: float, clip_high: float, clip_c: float, kl_code: int,
                            entropy_coeff: float, kl_coef: float, entropy_grad: bool,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d log_prob, d entropy) from the gradients of (total, pg, entropy, kl); d entropy is empty
    unless entropy_grad."""
    g_total, g_pg, g_ent, g_kl = grad_losses.unbind(0)
    coeffs = torch.stack([g_total + g_pg, kl_coef * g_total + g_kl, g_ent - entropy_coeff * g_total]).to(w.dtype)
    return _kernel("actor_loss_bwd", backend)(coeffs, w, log_prob, old_log_prob, advantages, mask, is_weights,
                                              ref_log_prob, clip_low, clip_high, clip_c, kl_code, entropy_grad)


@_actor_loss_backward_op.register_fake
def _(grad_losses, w, log_prob, old_log_prob, advantages, mask, is_weights, ref_log_prob, clip_low,
      clip_high, clip_c, kl_code, entropy_coeff, kl_coef, entropy_grad, backend):
    acc = acc_dtype(log_prob)
    return (log_prob.new_empty(log_prob.shape, dtype=acc),
            log_prob.new_empty(log_prob.shape if entropy_grad else (0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    (log_prob, old_log_prob, advantages, mask, is_weights, entropy, ref_log_prob, clip_low, clip_high,
     clip_c, kl_code, entropy_coeff, kl_coef, agg, dp_size, batch_num_tokens, global_batch_size,
     loss_scale_factor, backend) = inputs
    ctx.save_for_backward(log_prob, old_log_prob, advantages, mask, is_weights, ref_log_prob, output[2])
    ctx.entropy_dtype = entropy.dtype if entropy is not None else None
    ctx.args = (clip_low, clip_high, clip_c, kl_code, entropy_coeff, kl_coef, entropy is not None, backend)


def _backward(ctx, grad_losses, grad_metrics, grad_w):
    log_prob, old_log_prob, advantages, mask, is_weights, ref_log_prob, w = ctx.saved_tensors
    if grad_losses is None:
        return (None,) * 19
    grad_lp, grad_ent = _actor_loss_backward_op(grad_losses, w, log_prob, old_log_prob, advantages, mask,
                                                is_weights, ref_log_prob, *ctx.args)
    grad_lp = grad_lp.to(log_prob.dtype)
    grad_ent = grad_ent.to(ctx.entropy_dtype) if ctx.entropy_dtype is not None else None
    return (grad_lp, None, None, None, None, grad_ent) + (None,) * 13


torch.library.register_autograd("rlhfkern::actor_loss", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public ops
def actor_loss(log_prob, old_log_prob, advantages, mask, *, entropy=None, ref_log_prob=None, entropy_coeff=0.0,
               kl_coef=0.0, kl_kind="low_var_kl", clip_low=0.2, clip_high=0.2, clip_c=3.0, agg="token-mean",
               is_weights=None, dp_size=1, batch_num_tokens=None, global_batch_size=None,
               loss_scale_factor=None, backend=None):
    """The whole actor loss of verl's ppo_loss in one fused forward and one fused backward.

    loss = agg(pg) - entropy_coeff * agg(entropy) + kl_coef * agg(kl(log_prob, ref_log_prob)).
    Tensors are [B, T]; mask bool/int/float. Returns (loss, metrics), metrics a dict of 0-d
    tensors (pg_loss, entropy_loss, kl_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower): no host
    sync. Differentiable w.r.t. log_prob and entropy. Formulas: this module's docstring.
    """
    _check_token_inputs(log_prob, dict(old_log_prob=old_log_prob, advantages=advantages, entropy=entropy,
                                       ref_log_prob=ref_log_prob, is_weights=is_weights), mask)
    _check_agg(agg, dp_size, batch_num_tokens, global_batch_size)
    _check_clips(clip_low, clip_high, clip_c)
    kl_code = _parse_kl(kl_kind)
    batch_num_tokens = _number(batch_num_tokens, "batch_num_tokens")
    global_batch_size = _number(global_batch_size, "global_batch_size")
    loss_scale_factor = _number(loss_scale_factor, "loss_scale_factor")
    entropy_coeff = _number(entropy_coeff, "entropy_coeff")
    kl_coef = _number(kl_coef, "kl_coef")
    which = _dispatch.resolve(backend, log_prob.device, OP_BACKENDS)
    if which == "torch":
        return actor_loss_reference(
            log_prob, old_log_prob, advantages, mask, entropy=entropy, ref_log_prob=ref_log_prob,
            entropy_coeff=entropy_coeff, kl_coef=kl_coef, kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_high,
            clip_c=clip_c, agg=agg, is_weights=is_weights, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    shape = log_prob.shape
    common = _common_dtype(log_prob, old_log_prob, advantages, is_weights, entropy, ref_log_prob)
    rows = lambda x: None if x is None else rows2d(x.to(common), shape[-1])  # noqa: E731  autograd sees the cast
    losses, metric_values, _ = _actor_loss_op(
        rows(log_prob), rows(old_log_prob), rows(advantages), rows2d(mask, shape[-1]), rows(is_weights), rows(entropy),
        rows(ref_log_prob), float(clip_low), float(clip_high), float(clip_c) if clip_c is not None else 0.0,
        kl_code[0] + 4 * int(kl_code[1]), entropy_coeff, kl_coef, agg, int(dp_size), batch_num_tokens,
        global_batch_size, loss_scale_factor, which)
    metrics = {"pg_loss": losses[1].detach(), "entropy_loss": losses[2].detach(), "kl_loss": losses[3].detach(),
               "pg_clipfrac": metric_values[0], "ppo_kl": metric_values[2], "pg_clipfrac_lower": metric_values[1]}
    return losses[0], metrics


def ppo_loss(log_prob, old_log_prob, advantages, mask, *, clip_low=0.2, clip_high=0.2, clip_c=3.0,
             agg="token-mean", is_weights=None, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None, backend=None):
    """PPO clipped policy loss (verl compute_policy_loss_vanilla + agg_loss), fused.

    Returns (loss, metrics) with metrics pg_clipfrac, ppo_kl, pg_clipfrac_lower (0-d tensors).
    """
    loss, metrics = actor_loss(log_prob, old_log_prob, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                               clip_c=clip_c, agg=agg, is_weights=is_weights, dp_size=dp_size,
                               batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                               loss_scale_factor=loss_scale_factor, backend=backend)
    return loss, {k: metrics[k] for k in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")}


# ----------------------------------------------------------------------------- value loss
@torch.library.custom_op("rlhfkern::value_loss", mutates_args=())
def _value_loss_op(vpreds: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor,
                   clip: float, agg: str, dp_size: int, batch_num_tokens: float | None,
                   global_batch_size: float | None, loss_scale_factor: float | None,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ([loss, clipfrac], row weights w_b [B])."""
    partials = _kernel("value_loss_fwd", backend)(vpreds, returns, old_values, mask, clip)
    w = _row_weights(partials, agg, vpreds.shape[-1], dp_size, batch_num_tokens, global_batch_size,
                     loss_scale_factor)
    loss = 0.5 * (w * partials[:, 1]).sum()
    clipfrac = partials[:, 2].sum() / (partials[:, 0].sum() + MEAN_EPS)
    return torch.stack([loss, clipfrac]), w


@_value_loss_op.register_fake
def _(vpreds, returns, old_values, mask, clip, agg, dp_size, batch_num_tokens, global_batch_size,
      loss_scale_factor, backend):
    acc = acc_dtype(vpreds)
    return vpreds.new_empty(2, dtype=acc), vpreds.new_empty(vpreds.shape[0], dtype=acc)


@torch.library.custom_op("rlhfkern::value_loss_backward", mutates_args=())
def _value_loss_backward_op(grad_loss: torch.Tensor, w: torch.Tensor, vpreds: torch.Tensor,
                            returns: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor, clip: float,
                            backend: str) -> torch.Tensor:
    coeff = (0.5 * grad_loss).reshape(1).to(w.dtype)
    return _kernel("value_loss_bwd", backend)(coeff, w, vpreds, returns, old_values, mask, clip)


@_value_loss_backward_op.register_fake
def _(grad_loss, w, vpreds, returns, old_values, mask, clip, backend):
    return vpreds.new_empty(vpreds.shape, dtype=acc_dtype(vpreds))


def _value_setup_context(ctx, inputs, output):
    vpreds, returns, old_values, mask, clip, *_, backend = inputs
    ctx.save_for_backward(vpreds, returns, old_values, mask, output[1])
    ctx.args = (clip, backend)


def _value_backward(ctx, grad_out, grad_w):
    vpreds, returns, old_values, mask, w = ctx.saved_tensors
    grad = _value_loss_backward_op(grad_out[0], w, vpreds, returns, old_values, mask, *ctx.args)
    return (grad.to(vpreds.dtype),) + (None,) * 10


torch.library.register_autograd("rlhfkern::value_loss", _value_backward, setup_context=_value_setup_context)


def value_loss(vpreds, returns, old_values, mask, *, clip=0.5, agg="token-mean", dp_size=1, batch_num_tokens=None,
               global_batch_size=None, loss_scale_factor=None, backend=None):
    """Clipped value loss (verl compute_value_loss), fused: returns (loss, clipfrac), 0-d tensors.

    loss = 0.5 agg(max((v - R)^2, (clip_by_value(v, V - clip, V + clip) - R)^2)), differentiable
    w.r.t. vpreds; clipfrac = mean over the mask of [clipped error > unclipped error].
    """
    _check_token_inputs(vpreds, dict(returns=returns, old_values=old_values), mask)
    _check_agg(agg, dp_size, batch_num_tokens, global_batch_size)
    if not isinstance(clip, numbers.Real) or not clip >= 0:
        raise ValueError(f"clip must be a non-negative number, got {clip!r}")
    batch_num_tokens = _number(batch_num_tokens, "batch_num_tokens")
    global_batch_size = _number(global_batch_size, "global_batch_size")
    loss_scale_factor = _number(loss_scale_factor, "loss_scale_factor")
    which = _dispatch.resolve(backend, vpreds.device, OP_BACKENDS)
    if which == "torch":
        return value_loss_reference(vpreds, returns, old_values, mask, clip=clip, agg=agg, dp_size=dp_size,
                                    batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                                    loss_scale_factor=loss_scale_factor)
    common = _common_dtype(vpreds, returns, old_values)
    shape = vpreds.shape
    out, _ = _value_loss_op(rows2d(vpreds.to(common), shape[-1]), rows2d(returns.to(common), shape[-1]),
                            rows2d(old_values.to(common), shape[-1]), rows2d(mask, shape[-1]), float(clip), agg,
                            int(dp_size), batch_num_tokens, global_batch_size, loss_scale_factor, which)
    return out[0], out[1].detach()


# ----------------------------------------------------------------------------- KL penalty
@torch.library.custom_op("rlhfkern::kl_penalty", mutates_args=())
def _kl_penalty_op(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_code: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, d kl / d log_prob), computed in one pass."""
    return _kernel("kl_penalty_fwd", backend)(log_prob, ref_log_prob, kl_code)


@_kl_penalty_op.register_fake
def _(log_prob, ref_log_prob, kl_code, backend):
    acc = acc_dtype(log_prob)
    return log_prob.new_empty(log_prob.shape, dtype=acc), log_prob.new_empty(log_prob.shape, dtype=acc)


def _kl_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.mark_non_differentiable(output[1])


def _kl_backward(ctx, grad_kl, grad_dkl):
    (dkl,) = ctx.saved_tensors
    g = grad_kl * dkl
    return g.to(ctx.dtypes[0]), (-g).to(ctx.dtypes[1]), None, None


torch.library.register_autograd("rlhfkern::kl_penalty", _kl_backward, setup_context=_kl_setup_context)


def kl_penalty(log_prob, ref_log_prob, kind="low_var_kl", *, backend=None):
    """Per-token KL estimate (verl kl_penalty): kinds k1/kl, abs, k2/mse, k3/low_var_kl, each
    with an optional "+" (value of the kind, gradient of k2). Output float32 (float64 for
    float64 inputs), differentiable w.r.t. both arguments. Formulas: this module's docstring."""
    _check_tensor(log_prob, "log_prob", None, None)
    _check_tensor(ref_log_prob, "ref_log_prob", log_prob, "log_prob")
    base, straight = _parse_kl(kind)
    which = _dispatch.resolve(backend, log_prob.device, OP_BACKENDS)
    if which == "torch" or log_prob.numel() == 0:
        acc = acc_dtype(log_prob, ref_log_prob)
        return kl_penalty_reference(log_prob.to(acc), ref_log_prob.to(acc), kind)
    common = _common_dtype(log_prob, ref_log_prob)
    shape = log_prob.shape
    flat = (lambda x: rows2d(x.to(common), shape[-1])) if log_prob.dim() > 0 else (lambda x: x.to(common).reshape(1, 1))
    kl, _ = _kl_penalty_op(flat(log_prob), flat(ref_log_prob), base + 4 * int(straight), which)
    return kl.reshape(shape)


def _common_dtype(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype
