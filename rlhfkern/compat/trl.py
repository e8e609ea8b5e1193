"""Drop-in replacements for TRL functions: `selective_log_softmax`, `entropy_from_logits`.

    from rlhfkern.compat.trl import selective_log_softmax, entropy_from_logits

Results are float32 whatever the logits dtype (TRL keeps bf16 logits in bf16).
"""

import torch

from ..ops import logprob as _lp


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL selective_log_softmax: log_softmax(logits / temperature) gathered at index [...] or
    [..., K]; positions where row_mask == 0 give 0 (and no gradient)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if row_mask is not None:
        index = torch.where(row_mask == 0, torch.full_like(index, _lp.IGNORE_INDEX), index)
    return _lp.logprobs(logits, index, temperature=temperature)


def entropy_from_logits(logits, chunk_size=128):
    """TRL entropy_from_logits (chunk_size is accepted and not needed: no [N, V] intermediate)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _lp.logprobs(logits, labels, return_entropy=True)[1]
