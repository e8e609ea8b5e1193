"""Drop-in replacements for verl 0.9.1 functions: same signatures, same results.

    from rlhfkern.compat.verl import compute_gae_advantage_return, masked_whiten

Differences, all deliberate: outputs are float32 for bf16/fp16 inputs (verl computes in the
input dtype), and a bool response_mask is accepted (verl's `1 - mask` rejects it).
"""

import torch

from ..ops import gae as _gae


def _check_count(mask):
    # verl's masked_var checks the mask count (a host read there too) before dividing by n - 1
    n = mask.sum()
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")


def masked_whiten(values, mask, shift_mean=True):
    """verl.utils.torch_functional.masked_whiten: result in the dtype of `values`."""
    _check_count(mask)
    return _gae.masked_whiten(values, mask, shift_mean).to(values.dtype)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl.trainer.ppo.core_algos.compute_gae_advantage_return: (whitened advantages, returns)."""
    with torch.no_grad():
        _check_count(response_mask)
        return _gae.gae(token_level_rewards, values, response_mask, gamma, lam, whiten=True)
