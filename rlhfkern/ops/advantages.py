"""Outcome advantage estimators: GRPO, RLOO, REINFORCE++ and REINFORCE++-baseline (verl 0.9.1).

Rows b = 1..B are responses; `index[b]` is the group (prompt) of row b, an integer in [0, B).
With s_b = sum_t r_bt (the outcome score), n_g the size of group g, mean_g and std_g (unbiased)
its score statistics:

    GRPO          a_b = (s_b - mean_g) / (std_g + eps)   (norm_by_std=False: s_b - mean_g)
                  a group of one has mean 0 and std 1
    RLOO          a_b = n/(n-1) s_b - n/(n-1) mean_g      (n = n_g > 1; a group of one keeps s_b)
    RF++-baseline a_bt = whiten_m((s_b - mean_g) m_bt) m_bt      (a group of one: mean 0)
    RF++          ret_t = m_t (r_t + gamma g_{t+1}),  g_t = m_t ret'_t + (1 - m_t) g_{t+1}
                  (the discounted return skipping masked tokens: GAE with V = 0, lam = 1),
                  a = whiten_m(ret) m
and the token-level advantage is a_b * m_bt (GRPO, RLOO). Outputs are float32 (float64 for
float64 rewards).

Backends: "torch" is the reference (a readable loop over groups). The others compute the group
statistics with segment reductions over [B] (index_add, no Python loop, no host sync) and the
[B, T] work with one row sum and one masked broadcast; RF++ runs the GAE and whitening kernels
of the chosen backend.
"""

import numbers

import torch

from .. import _dispatch
from . import gae as _gae
from ._common import acc_dtype


# ----------------------------------------------------------------------------- reference (spec)
def _groups(index):
    groups = {}
    for b, g in enumerate(index.tolist()):
        groups.setdefault(g, []).append(b)
    return groups


def _group_scores_reference(scores, index, transform):
    """out[b] = transform(s_b, the scores of b's group), one group at a time."""
    out = scores.clone()
    for rows in _groups(index).values():
        members = scores[rows]
        for b in rows:
            out[b] = transform(scores[b], members)
    return out


def grpo_reference(token_level_rewards, mask, index, epsilon=1e-6, norm_by_std=True):
    scores = token_level_rewards.to(acc_dtype(token_level_rewards)).sum(-1)

    def transform(s, members):
        if len(members) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = members.mean(), members.std()
        return (s - mean) / (std + epsilon) if norm_by_std else s - mean

    return _group_scores_reference(scores, index, transform)[:, None] * mask.to(scores.dtype)


def rloo_reference(token_level_rewards, mask, index):
    scores = token_level_rewards.to(acc_dtype(token_level_rewards)).sum(-1)

    def transform(s, members):
        n = len(members)
        return s if n == 1 else s * n / (n - 1) - members.mean() * n / (n - 1)

    return _group_scores_reference(scores, index, transform)[:, None] * mask.to(scores.dtype)


def reinforce_pp_baseline_reference(token_level_rewards, mask, index):
    scores = token_level_rewards.to(acc_dtype(token_level_rewards)).sum(-1)
    centred = _group_scores_reference(scores, index, lambda s, members: s - (members.mean() if len(members) > 1 else 0))
    m = mask.to(scores.dtype)
    x = centred[:, None] * m
    return _gae.masked_whiten_reference(x, m) * m


def reinforce_pp_reference(token_level_rewards, mask, gamma=1.0):
    acc = acc_dtype(token_level_rewards)
    r, m = token_level_rewards.to(acc), mask.to(acc)
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        new = r[:, t] + gamma * running
        returns[:, t] = new * m[:, t]
        running = new * m[:, t] + running * (1 - m[:, t])
    return _gae.masked_whiten_reference(returns, m) * m, returns


# ----------------------------------------------------------------------------- segment kernels
def _group_stats(scores, index, with_std):
    """Per row: (n, mean, std) of its group, by segment sums over [B] (no host sync)."""
    B = scores.shape[0]
    count = scores.new_zeros(B).index_add_(0, index, torch.ones_like(scores))
    total = scores.new_zeros(B).index_add_(0, index, scores)
    n = count[index]
    mean = total[index] / n
    std = None
    if with_std:
        sq = scores.new_zeros(B).index_add_(0, index, (scores - mean) ** 2)
        std = torch.sqrt(sq[index] / (n - 1))
    return n, mean, std


def _scores(token_level_rewards):
    return token_level_rewards.to(acc_dtype(token_level_rewards)).sum(-1)


# ----------------------------------------------------------------------------- validation
def _check(token_level_rewards, mask, index=None):
    _gae._check_float(token_level_rewards, "token_level_rewards")
    if token_level_rewards.dim() != 2 or token_level_rewards.shape[1] == 0:
        raise ValueError(f"token_level_rewards must be [B, T] with T > 0, got shape {tuple(token_level_rewards.shape)}")
    _gae._check_mask(mask, token_level_rewards, "token_level_rewards")
    if index is None:
        return None
    if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer tensor of group ids, got {getattr(index, 'dtype', type(index))}")
    if index.shape != token_level_rewards.shape[:1]:
        raise ValueError(f"index has shape {tuple(index.shape)}, expected ({token_level_rewards.shape[0]},)")
    if index.device != token_level_rewards.device:
        raise ValueError(f"index is on {index.device} but token_level_rewards is on {token_level_rewards.device}")
    if index.device.type == "cpu" and index.numel() and (index.min() < 0 or index.max() >= index.numel()):
        raise ValueError(f"index values must lie in [0, B) = [0, {index.numel()}) (group ids)")
    return index.long()


# ----------------------------------------------------------------------------- public ops
def grpo_advantage(token_level_rewards, mask, index, *, epsilon=1e-6, norm_by_std=True, backend=None):
    """GRPO outcome advantages [B, T] (= returns in verl). Formula: this module's docstring."""
    index = _check(token_level_rewards, mask, index)
    if not isinstance(epsilon, numbers.Real) or epsilon < 0:
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
    if _dispatch.resolve(backend, token_level_rewards.device) == "torch":
        return grpo_reference(token_level_rewards, mask, index, epsilon, norm_by_std)
    s = _scores(token_level_rewards)
    n, mean, std = _group_stats(s, index, norm_by_std)
    single = n <= 1
    a = s - torch.where(single, 0.0, mean)
    if norm_by_std:
        a = a / (torch.where(single, 1.0, std) + epsilon)
    return a[:, None] * mask.to(s.dtype)


def rloo_advantage(token_level_rewards, mask, index, *, backend=None):
    """RLOO outcome advantages [B, T]. Formula: this module's docstring."""
    index = _check(token_level_rewards, mask, index)
    if _dispatch.resolve(backend, token_level_rewards.device) == "torch":
        return rloo_reference(token_level_rewards, mask, index)
    s = _scores(token_level_rewards)
    n, mean, _ = _group_stats(s, index, False)
    k = n / (n - 1)
    a = torch.where(n > 1, s * k - mean * k, s)
    return a[:, None] * mask.to(s.dtype)


def reinforce_pp_baseline_advantage(token_level_rewards, mask, index, *, backend=None):
    """REINFORCE++-baseline advantages [B, T]: group-centred scores, whitened over the mask."""
    index = _check(token_level_rewards, mask, index)
    which = _dispatch.resolve(backend, token_level_rewards.device, gpu_order=_gae.GPU_ORDER)
    if which == "torch":
        return reinforce_pp_baseline_reference(token_level_rewards, mask, index)
    s = _scores(token_level_rewards)
    n, mean, _ = _group_stats(s, index, False)
    m = mask.to(s.dtype)
    x = torch.where(n > 1, s - mean, s)[:, None] * m
    return _gae.masked_whiten(x, mask, backend=which) * m


def reinforce_pp_advantage(token_level_rewards, mask, gamma=1.0, *, backend=None):
    """REINFORCE++ (advantages, returns) [B, T]: discounted returns skipping masked tokens,
    whitened over the mask. Runs the GAE kernel with V = 0 and lam = 1."""
    _check(token_level_rewards, mask)
    gamma = _gae._check_unit(gamma, "gamma")
    which = _dispatch.resolve(backend, token_level_rewards.device, gpu_order=_gae.GPU_ORDER)
    if which == "torch":
        return reinforce_pp_reference(token_level_rewards, mask, gamma)
    r = token_level_rewards.to(acc_dtype(token_level_rewards))
    m = mask.to(r.dtype)
    carried, _ = _gae.gae(r, torch.zeros_like(r), mask, gamma, 1.0, backend=which)  # g_t, carried over holes
    following = torch.nn.functional.pad(carried[:, 1:], (0, 1))  # g_{t+1}, 0 after the end
    returns = m * (r + gamma * following)
    return _gae.masked_whiten(returns, mask, backend=which) * m, returns
