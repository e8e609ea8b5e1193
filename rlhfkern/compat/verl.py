"""Drop-in replacements for verl 0.9.1 functions: same signatures, same results.

    from rlhfkern.compat.verl import compute_gae_advantage_return, compute_policy_loss_vanilla
    rlhfkern.compat.verl.patch()    # or: installed into verl itself (undo handle returned)

Outputs have the dtype verl's have for the same inputs (torch's promotion of the inputs with the
mask: a float32 mask widens fp16/bf16, an integer or bool one does not; seq-mean losses of half
inputs and the clip fractions float32, as verl's): computed in float32 (float64 for float64) and
rounded once, so fp16/bf16 results are closer to an fp64 computation than verl's, which computes in
the input dtype. logprobs_from_logits stays float32, as verl's flash-attn (GPU) path.

Differences, all deliberate: a bool response_mask is accepted (verl's `1 - mask` rejects it); masked-out tokens
never reach a loss, also in the seq-mean modes (verl's `loss * mask` there turns a nan/inf log-prob
of a padding token into a nan loss); a torch.Tensor `index` groups rows by value (verl's dict keys
would be the tensor elements' identities, never equal).
"""

import sys

import numpy as np
import torch

from ..ops import advantages as _adv
from ..ops import gae as _gae
from ..ops import logprob as _lp
from ..ops import ppo_loss as _pl


def _dtype(*xs):
    """The dtype torch's type promotion gives verl's arithmetic on these tensors (or dtypes; None
    skipped): an integer or bool mask leaves a float dtype as it is, a float32 mask widens fp16."""
    d = None
    for x in xs:
        if x is not None:
            t = x.dtype if isinstance(x, torch.Tensor) else x
            d = t if d is None else torch.promote_types(d, t)
    return d


def _mean_dtype(dtype, mask):
    """verl_F.masked_mean(x, mask) = (x * mask).sum() / (mask.sum() + 1e-8): an integer or bool
    mask's count + 1e-8 is float32, which widens a half x."""
    return _dtype(dtype, mask, mask if mask.is_floating_point() else torch.float32)


def _agg_dtype(dtype, mask, mode, batch_num_tokens=None, global_batch_size=None):
    """verl agg_loss's result dtype for a loss matrix of `dtype`: the seq-mean modes divide by a
    float32 sequence mask (float32 for half losses); the count it divides by, given as a tensor,
    joins the promotion."""
    d = _dtype(dtype, mask)
    count = batch_num_tokens if mode == "token-mean" else None
    if mode.startswith("seq-mean"):
        d, count = torch.promote_types(d, torch.float32), global_batch_size
    return _dtype(d, count) if isinstance(count, torch.Tensor) else d


def _check_count(mask):
    # verl's masked_var checks the mask count (a host read there too) before dividing by n - 1
    n = mask.sum()
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")


# ----------------------------------------------------------------------------- GAE family
def masked_whiten(values, mask, shift_mean=True):
    """verl.utils.torch_functional.masked_whiten: result in the dtype of `values`."""
    _check_count(mask)
    return _gae.masked_whiten(values, mask, shift_mean).to(values.dtype)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl.trainer.ppo.core_algos.compute_gae_advantage_return: (whitened advantages, returns)."""
    with torch.no_grad():
        _check_count(response_mask)
        dtype = _dtype(token_level_rewards, values, response_mask)
        adv, ret = _gae.gae(token_level_rewards, values, response_mask, gamma, lam, whiten=True)
        return adv.to(dtype), ret.to(dtype)


# ----------------------------------------------------------------------------- policy / value loss
def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    """verl agg_loss (differentiable w.r.t. loss_mat)."""
    return _pl.agg_loss_reference(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                                  loss_scale_factor)


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    """The deprecated positional form: (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower) tensors."""
    low = cliprange_low if cliprange_low is not None else cliprange
    high = cliprange_high if cliprange_high is not None else cliprange
    loss, m = _pl.ppo_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=low, clip_high=high,
                           clip_c=clip_ratio_c, agg=loss_agg_mode)
    frac = _mean_dtype(torch.float32, response_mask)  # verl: masked_mean of a .float() indicator
    return (loss.to(_agg_dtype(_dtype(old_log_prob, log_prob, advantages), response_mask, loss_agg_mode)),
            m["pg_clipfrac"].to(frac), m["ppo_kl"].to(_mean_dtype(_dtype(old_log_prob, log_prob), response_mask)),
            m["pg_clipfrac_lower"].to(frac))


def _field(config, name, default=None):
    if hasattr(config, "get"):
        try:
            return config.get(name, default)
        except TypeError:
            pass
    return getattr(config, name, default)


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl compute_policy_loss_vanilla: (pg_loss, {"actor/pg_clipfrac": float, ...}).

    `config`: verl's ActorConfig or any object (or dict) with its fields clip_ratio,
    clip_ratio_low, clip_ratio_high, clip_ratio_c and global_batch_info.
    """
    if config is None:
        raise ValueError("config is required (verl's ActorConfig or an object with the same fields)")
    clip = _field(config, "clip_ratio")
    low = _field(config, "clip_ratio_low")
    high = _field(config, "clip_ratio_high")
    batch = dict(_field(config, "global_batch_info", None) or {})
    loss, m = _pl.ppo_loss(log_prob, old_log_prob, advantages, response_mask,
                           clip_low=low if low is not None else clip, clip_high=high if high is not None else clip,
                           clip_c=_field(config, "clip_ratio_c", 3.0), agg=loss_agg_mode, is_weights=rollout_is_weights,
                           dp_size=batch.get("dp_size", 1), batch_num_tokens=batch.get("batch_num_tokens"),
                           global_batch_size=batch.get("global_batch_size"),
                           loss_scale_factor=batch.get("loss_scale_factor"))
    metrics = {  # verl reads them back to the host, so does the drop-in
        "actor/pg_clipfrac": m["pg_clipfrac"].item(),
        "actor/ppo_kl": m["ppo_kl"].item(),
        "actor/pg_clipfrac_lower": m["pg_clipfrac_lower"].item(),
    }
    dtype = _agg_dtype(_dtype(old_log_prob, log_prob, advantages, rollout_is_weights), response_mask, loss_agg_mode,
                       batch.get("batch_num_tokens"), batch.get("global_batch_size"))
    return loss.to(dtype), metrics


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean", dp_size=1,
                       batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl compute_value_loss: (vf_loss, vf_clipfrac)."""
    loss, frac = _pl.value_loss(vpreds, returns, values, response_mask, clip=cliprange_value, agg=loss_agg_mode,
                                dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                                global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    return (loss.to(_agg_dtype(_dtype(vpreds, returns, values), response_mask, loss_agg_mode, batch_num_tokens,
                               global_batch_size)),
            frac.to(_mean_dtype(torch.float32, response_mask)))


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl kl_penalty (with the "+" straight-through variants)."""
    if kl_penalty.rstrip("+") == "full":
        raise NotImplementedError
    return _pl.kl_penalty(logprob, ref_logprob, kl_penalty).to(_dtype(logprob, ref_logprob))


# ----------------------------------------------------------------------------- outcome advantages
def _group_ids(index, device):
    """verl's `index` (an array of uids, or a tensor) as group ids 0..G-1."""
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    _, ids = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(ids.reshape(-1), dtype=torch.long, device=device)


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    with torch.no_grad():
        adv = _adv.grpo_advantage(token_level_rewards, response_mask, _group_ids(index, token_level_rewards.device),
                                  epsilon=epsilon, norm_by_std=norm_adv_by_std_in_grpo)
    adv = adv.to(_dtype(token_level_rewards, response_mask))
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    with torch.no_grad():
        adv = _adv.rloo_advantage(token_level_rewards, response_mask, _group_ids(index, token_level_rewards.device))
    adv = adv.to(_dtype(token_level_rewards, response_mask))
    return adv, adv


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                                           config=None, **kwargs):
    with torch.no_grad():
        _check_count(response_mask)
        adv = _adv.reinforce_pp_baseline_advantage(token_level_rewards, response_mask,
                                                   _group_ids(index, token_level_rewards.device))
    adv = adv.to(_dtype(token_level_rewards, response_mask))
    return adv, adv


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    if config is None:
        raise ValueError("config is required (an AlgoConfig or any object with a `gamma` field)")
    with torch.no_grad():
        _check_count(response_mask)
        adv, ret = _adv.reinforce_pp_advantage(token_level_rewards, response_mask, _field(config, "gamma"))
    # verl: the returns are written into zeros_like(rewards), the advantages are whitened * mask
    return adv.to(_dtype(token_level_rewards, response_mask)), ret.to(token_level_rewards.dtype)


# ----------------------------------------------------------------------------- log-probs
def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl logprobs_from_logits: log-probs of labels, float32 (float64 for float64 logits) as
    verl's flash-attn path returns on GPUs (verl's torch fallback, without flash-attn, returns the
    logits' dtype); the backward writes into the logits when inplace_backward (as verl's
    flash-attn path does)."""
    return _lp.logprobs(logits, labels, inplace_backward=inplace_backward)


def entropy_from_logits(logits):
    """verl entropy_from_logits: H = logsumexp(z) - sum softmax(z) z, in the logits' dtype as
    verl's (computed in float32, rounded once)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _lp.logprobs(logits, labels, return_entropy=True)[1].to(logits.dtype)


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl.utils.kernel.linear_cross_entropy: (log-probs, entropy) of the flattened tokens for the
    LM head `weight` [V, H] (this rank's vocabulary shard with dist_process_group), without the
    [N, V] logits. Runs on any device (verl's kernel needs a GPU); reduction "none" only."""
    if reduction != "none":
        raise ValueError(f"reduction={reduction!r} is not provided by rlhfkern's drop-in (only 'none')")
    return _lp.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                               temperature=temperature, return_entropy=True, tp_group=dist_process_group)


# Where each drop-in replaces verl's function (its defining module).
TARGETS = {
    "verl.utils.torch_functional": ("masked_whiten", "logprobs_from_logits", "entropy_from_logits"),
    "verl.trainer.ppo.core_algos": (
        "compute_gae_advantage_return", "agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla",
        "compute_value_loss", "kl_penalty", "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
        "compute_reinforce_plus_plus_baseline_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage"),
    "verl.utils.kernel.linear_cross_entropy": ("linear_cross_entropy",),
}


def patch():
    """Installs these drop-ins into the installed verl: every module that holds one of the
    functions above (`from ... import` included) and verl's policy-loss and advantage-estimator
    registries now call rlhfkern's. Returns the undo handle (rlhfkern.compat._patch.Patch)."""
    from . import _patch

    return _patch.patch("verl", TARGETS, sys.modules[__name__])
