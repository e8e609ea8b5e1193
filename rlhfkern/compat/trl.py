"""Drop-in replacements for TRL functions: `selective_log_softmax`, `entropy_from_logits`,
`selective_log_softmax_and_entropy`; `patch()` installs them into the installed TRL.

    from rlhfkern.compat.trl import selective_log_softmax, entropy_from_logits
    rlhfkern.compat.trl.patch()    # or: installed into TRL itself (undo handle returned)

Results are float32 whatever the logits dtype (TRL keeps bf16 logits in bf16).
"""

import sys

import torch

from ..ops import logprob as _lp


def _skipping_masked_rows(index, temperature, row_mask):
    """TRL's argument checks; index with the rows where row_mask == 0 set to IGNORE_INDEX (0, no gradient)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if row_mask is None:
        return index
    return torch.where(row_mask == 0, torch.full_like(index, _lp.IGNORE_INDEX), index)


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL selective_log_softmax: log_softmax(logits / temperature) gathered at index [...] or
    [..., K]; positions where row_mask == 0 give 0 (and no gradient)."""
    return _lp.logprobs(logits, _skipping_masked_rows(index, temperature, row_mask), temperature=temperature)


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
    """TRL selective_log_softmax_and_entropy: (log-probs at index, entropy) of
    softmax(logits / temperature) in one pass over the logits; rows where row_mask == 0 give 0
    for both. index: [...] (one token per row)."""
    index = _skipping_masked_rows(index, temperature, row_mask)
    logprobs, entropy = _lp.logprobs(logits, index, temperature=temperature, return_entropy=True)
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return logprobs, entropy if entropy_requires_grad else entropy.detach()


def entropy_from_logits(logits, chunk_size=128):
    """TRL entropy_from_logits (chunk_size is accepted and not needed: no [N, V] intermediate)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _lp.logprobs(logits, labels, return_entropy=True)[1]


# Where each drop-in replaces TRL's (its defining module).
TARGETS = {"trl.trainer.utils": ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")}


def patch():
    """Installs these drop-ins into the installed TRL (every module holding one of them, e.g. the
    experimental trainers' `from ...trainer.utils import selective_log_softmax`). TRL 1.16's
    GRPOTrainer computes its log-probs with its own fused LM head and is not affected. Returns the
    undo handle."""
    from . import _patch

    return _patch.patch("trl", TARGETS, sys.modules[__name__])
