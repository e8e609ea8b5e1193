"""Drop-in replacements for OpenRLHF 0.11 loss pieces: `PolicyLoss`, `ValueLoss`,
`compute_approx_kl`, `log_probs_from_logits`, with OpenRLHF's own semantics (its clamps, its two
aggregation modes).

    from rlhfkern.compat.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl, log_probs_from_logits
    rlhfkern.compat.openrlhf.patch()    # or: installed into OpenRLHF itself (undo handle returned)

PolicyLoss (policy_loss_type="ppo", with or without the train/rollout IS correction) and
ValueLoss run the fused kernels: OpenRLHF's token-level loss is our "token-mean", its
sample-level loss our "seq-mean-token-mean". Differences, all deliberate: masked-out tokens never
reach a loss (OpenRLHF's `loss * mask` turns a nan/inf there into a nan loss); at exact ties of
the value clip (|v - old| == clip_eps) the gradient is split in halves as torch.max/min do rather
than passed whole as torch.clamp does. policy_loss_type="gspo" is not provided: it raises. log_probs_from_logits leaves the logits as
they are (OpenRLHF divides them by the temperature in place) and returns the logits' dtype, as
OpenRLHF's. PolicyLoss's loss and ValueLoss return OpenRLHF's dtype (the inputs' promoted with the
mask's; the sample-level loss of half inputs float32; the clip ratio float32), computed in float32
(float64 for float64) and rounded once; OpenRLHF's fp16 sample-level loss is nan with an
all-masked row (its 1e-8 underflows to 0: 0 / 0), ours is not.
"""

import sys

import torch
from torch import nn

from ..ops import logprob as _lp
from ..ops import ppo_loss as _pl

KL_IS_WEIGHT_CLIP = 10.0  # OpenRLHF's bound on pi/pi_old in the unbiased KL gradient


def _masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def _loss_dtype(dtype, mask, token_level_loss, batch_num_tokens, global_batch_size):
    """OpenRLHF aggregate_loss's result dtype for a loss matrix of `dtype` (torch's promotion: an
    integer or bool mask leaves it, a float32 one widens fp16/bf16); the sample-level loss divides
    by float32 token counts and sequence mask (float32 for half losses); a tensor count joins."""
    d = torch.promote_types(dtype, mask.dtype)
    count = batch_num_tokens if token_level_loss else global_batch_size
    if not token_level_loss:
        d = torch.promote_types(d, torch.float32)
    return torch.promote_types(d, count.dtype) if isinstance(count, torch.Tensor) else d


def _agg(token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF aggregate_loss -> our agg arguments (dp_size counts only with a global count)."""
    if token_level_loss:
        return dict(agg="token-mean", dp_size=dp_size if batch_num_tokens is not None else 1,
                    batch_num_tokens=batch_num_tokens)
    return dict(agg="seq-mean-token-mean", dp_size=dp_size if global_batch_size is not None else 1,
                global_batch_size=global_batch_size)


class PolicyLoss(nn.Module):
    """OpenRLHF PolicyLoss: forward returns (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)."""

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                 policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                 is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0)):
        super().__init__()
        if policy_loss_type != "ppo":
            raise ValueError(f"policy_loss_type={policy_loss_type!r} is not provided by rlhfkern's drop-in (only 'ppo')")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.token_level_loss = token_level_loss
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating, self.is_correction_threshold = is_correction_gating, is_correction_threshold

    def _is_correction(self, old_log_probs, rollout_log_probs, action_mask):
        """Per-token IS coefficient (a detached weight on the loss) and the two IS metrics."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        log_ratio = (old_log_probs - rollout_log_probs).detach()  # log(pi_train / pi_rollout)
        token_is = log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = _masked_mean(log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        coef = coef.expand_as(old_log_probs)
        filter_ratio = filtered.float().mean() if seq_level else _masked_mean(filtered.float(), action_mask)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
        return coef, vllm_kl, filter_ratio

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        mask = action_mask if action_mask is not None else torch.ones_like(log_probs)
        coef = vllm_kl = filter_ratio = None
        if self.is_correction_level != "off":
            coef, vllm_kl, filter_ratio = self._is_correction(old_log_probs, rollout_log_probs, mask)
        loss, metrics = _pl.ppo_loss(log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low,
                                     clip_high=self.clip_eps_high, clip_c=self.dual_clip, is_weights=coef,
                                     **_agg(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size))
        ppo_kl = _masked_mean(-(log_probs - old_log_probs).detach(), mask)  # OpenRLHF: the raw log-ratio
        dtype = torch.promote_types(torch.promote_types(log_probs.dtype, old_log_probs.dtype), advantages.dtype)
        if coef is not None:
            dtype = torch.promote_types(dtype, coef.dtype)
        loss = loss.to(_loss_dtype(dtype, mask, self.token_level_loss, batch_num_tokens, global_batch_size))
        clip_ratio = metrics["pg_clipfrac"].to(torch.promote_types(torch.float32, mask.dtype))  # OpenRLHF: of a .float()
        return loss, clip_ratio, ppo_kl, vllm_kl, filter_ratio


class ValueLoss(nn.Module):
    """OpenRLHF ValueLoss: 0.5 * aggregate(max((v_clipped - R)^2, (v - R)^2)), or (v - R)^2."""

    def __init__(self, clip_eps=None, token_level_loss=True):
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                global_batch_size=None):
        mask = action_mask if action_mask is not None else torch.ones_like(values)
        clip = self.clip_eps if self.clip_eps is not None else float("inf")  # no clip: vc = v, max = (v - R)^2
        loss, _ = _pl.value_loss(values, returns, old_values, mask, clip=clip,
                                 **_agg(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size))
        dtype = torch.promote_types(values.dtype, returns.dtype)  # OpenRLHF without clip: (values - returns)^2
        if self.clip_eps is not None:
            dtype = torch.promote_types(dtype, old_values.dtype)
        return loss.to(_loss_dtype(dtype, mask, self.token_level_loss, batch_num_tokens, global_batch_size))


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
    """OpenRLHF compute_approx_kl (Schulman's k1/k2/k3 with OpenRLHF's clamps), float32."""
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k1":
        value = log_ratio
    elif kl_estimator == "k2":
        value = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        clamped = log_ratio.clamp(min=-10)  # past -10 k3 is beyond the cap anyway: no overflowing exp
        value = (-clamped).exp() - 1 + clamped
    else:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    value = value.clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    w = 1.0
    if log_probs_old is not None:
        w = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * (log_ratio**2 / 2.0)  # its gradient: w * k1 * grad log pi, the reverse-KL gradient
    return value.detach() + surrogate - surrogate.detach()


def log_probs_from_logits(logits, labels, temperature=1.0):
    """OpenRLHF log_probs_from_logits: log-probs of labels under softmax(logits / temperature), in
    the logits' dtype as OpenRLHF's (computed in float32, rounded once; OpenRLHF's flash-attn path
    returns float32 for float64 logits, this float64)."""
    return _lp.logprobs(logits, labels, temperature=temperature).to(logits.dtype)


# Where each drop-in replaces OpenRLHF's (its defining module; openrlhf.models re-exports the losses).
TARGETS = {
    "openrlhf.models.loss": ("PolicyLoss", "ValueLoss"),
    "openrlhf.models.utils": ("compute_approx_kl", "log_probs_from_logits"),
}


def patch():
    """Installs these drop-ins into the installed OpenRLHF (every module holding one of them,
    `from openrlhf.models import PolicyLoss` included). Returns the undo handle."""
    from . import _patch

    return _patch.patch("openrlhf", TARGETS, sys.modules[__name__])
