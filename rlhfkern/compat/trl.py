"""Drop-in replacements for TRL functions: `selective_log_softmax`, `entropy_from_logits`,
`selective_log_softmax_and_entropy`; `patch()` installs them into the installed TRL.

    from rlhfkern.compat.trl import selective_log_softmax, entropy_from_logits
    rlhfkern.compat.trl.patch()    # or: installed into TRL itself (undo handle returned)

Dtypes, as TRL's: the results have the logits' dtype (float16, bfloat16, float32, float64). The
kernels compute in float32 (float64 for float64 logits) and round the result once to the logits'
dtype, so a half-precision result is the correctly rounded float32 value. TRL's CPU fallback for
half-precision logits runs `log_softmax` in that dtype, and TRL's tests ask `torch.equal` with
it: our rounding differs from it in the last bit for about 20% of the log-probs (not bitwise
equal), and is the closer one to float64. Measured against float64 on [4, 32, V] logits (CPU,
torch.randn, scale 1 for V = 1024, 3 for V = 32000), largest absolute error, ours | TRL 1.16:
  log-probs  fp16: 3.7e-3 | 4.4e-3 (V 1024), 7.7e-3 | 8.0e-3 (V 32000)
             bf16: 3.1e-2 | 4.3e-2 (V 1024), 6.2e-2 | 6.4e-2 (V 32000)
  entropy    fp16: 1.9e-3 | 1.4e-2,  bf16: 1.6e-2 | 1.0e-1 (both V)
(tests/test_logprob.py::test_compat_trl_dtypes checks ours is never the farther from float64.)

TRL 1.15+ GRPOTrainer (also RLOO, SFT, DPO, KTO) computes its log-probs and entropy through
its own fused LM head, not through these functions: `add_fused_lm_head` (trl/trainer/utils.py)
patches the model's forward, which calls `trl.kernels.ChunkedLogProbFunction.apply(hidden, weight,
bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`. Our
`ChunkedLogProbFunction` routes that to `rlhfkern.linear_logprobs` (bias, logit scale, softcapping
and the extra outputs included), and patch() installs it where TRL has one.
"""

import importlib
import sys
import warnings

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
    [..., K]; positions where row_mask == 0 give 0 (and no gradient). In the logits' dtype."""
    logprobs = _lp.logprobs(logits, _skipping_masked_rows(index, temperature, row_mask), temperature=temperature)
    return logprobs.to(logits.dtype)


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
    """TRL selective_log_softmax_and_entropy (TRL 1.16, trl/trainer/utils.py): (log-probs at index,
    entropy) of softmax(logits / temperature) in one pass over the logits, both in the logits'
    dtype; rows where row_mask == 0 give 0 for both. index: [...] (one token per row)."""
    index = _skipping_masked_rows(index, temperature, row_mask)
    logprobs, entropy = _lp.logprobs(logits, index, temperature=temperature, return_entropy=True)
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    logprobs, entropy = logprobs.to(logits.dtype), entropy.to(logits.dtype)
    return logprobs, entropy if entropy_requires_grad else entropy.detach()


def entropy_from_logits(logits, chunk_size=128):
    """TRL entropy_from_logits, in the logits' dtype (chunk_size is accepted and not needed: no
    [N, V] intermediate)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _lp.logprobs(logits, labels, return_entropy=True)[1].to(logits.dtype)


FUSED_HEAD_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's OPTIONAL_OUTPUTS
_TRL_FUSED_HEAD = None  # TRL's own ChunkedLogProbFunction, kept by patch() for what we do not cover


class ChunkedLogProbFunction:
    """TRL >= 1.15's fused LM-head log-prob function (trl/kernels/chunked_logprob.py), on
    rlhfkern.linear_logprobs: `apply(hidden [N, H], weight [V, H], bias [V] or None, targets [N],
    temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)` returns
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), float32 (is_top1 bool), None for
    an output not in `outputs`; the last three carry no gradient. Like TRL's, it computes in the
    autocast dtype when autocast is on (else hidden's dtype). Under DeepSpeed ZeRO-3 (whose
    backward must re-gather a partitioned head) and on devices without our kernels, it calls TRL's
    own function."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=FUSED_HEAD_OUTPUTS):
        unknown = set(outputs) - set(FUSED_HEAD_OUTPUTS) - {"log_probs"}
        if unknown:
            raise ValueError(f"outputs: unknown {sorted(unknown)}; TRL's fused head knows {FUSED_HEAD_OUTPUTS}")
        if _TRL_FUSED_HEAD is not None and (hidden.device.type not in ("cpu", "cuda") or _zero3()):
            return _TRL_FUSED_HEAD.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                         final_logit_softcapping, logit_scale, outputs)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            results = _lp.linear_logprobs(
                hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
                temperature=temperature, logit_scale=logit_scale, softcap=final_logit_softcapping,
                return_entropy="entropy" in outputs, return_sum_p2="log_sum_sq_probs" in outputs,
                return_mean_logit="mean_logits" in outputs, return_is_top1="is_top1" in outputs, chunk_size=chunk_size)
        results = list(results) if isinstance(results, tuple) else [results]
        log_probs = results.pop(0).float()
        entropy = results.pop(0).float() if "entropy" in outputs else None
        log_sum_sq = torch.log(results.pop(0).detach()).float() if "log_sum_sq_probs" in outputs else None
        mean_logits = results.pop(0).detach().float() if "mean_logits" in outputs else None
        is_top1 = results.pop(0) if "is_top1" in outputs else None
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def _zero3():
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


# Where each drop-in replaces TRL's (its defining module).
TARGETS = {"trl.trainer.utils": ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"),
           "trl.kernels.chunked_logprob": ("ChunkedLogProbFunction",)}
OPTIONAL = ("selective_log_softmax_and_entropy", "ChunkedLogProbFunction")  # not in TRL before 1.15


def _trl_version():
    try:
        import trl
        return getattr(trl, "__version__", "(unknown version)")
    except ImportError:
        return "(not importable)"


def _grpo_trainer():
    """trl.trainer.grpo_trainer, or None where it does not import (e.g. a missing optional dependency)."""
    try:
        return importlib.import_module("trl.trainer.grpo_trainer")
    except Exception:  # noqa: BLE001 - any failure of TRL's own import means: cannot tell
        return None


def patch():
    """Installs these drop-ins into the installed TRL: every module holding one of them (TRL <= 1.14's
    GRPOTrainer, the experimental trainers' `from ...trainer.utils import selective_log_softmax`),
    and, in TRL >= 1.15, our ChunkedLogProbFunction for TRL's fused LM head (what GRPOTrainer and
    the other trainers call for their log-probs and entropy). Warns, naming the TRL version, when it
    replaces nothing, and when GRPOTrainer calls none of what it replaced. Returns the undo handle."""
    global _TRL_FUSED_HEAD
    from . import _patch

    grpo = _grpo_trainer()  # imported first, so that its references are among those replaced
    handle = _patch.patch("trl", TARGETS, sys.modules[__name__], optional=OPTIONAL)
    _TRL_FUSED_HEAD = next((o for o in handle.originals if getattr(o, "__name__", "") == "ChunkedLogProbFunction"),
                           _TRL_FUSED_HEAD)
    version = _trl_version()
    utils = sys.modules["trl.trainer.utils"]
    head_replaced = any(where.endswith("ChunkedLogProbFunction") for where in handle.replaced)
    if grpo is not None:  # GRPOTrainer is affected iff it held one of the originals or uses the fused head
        grpo_unaffected = not head_replaced and \
            not any(where.startswith("trl.trainer.grpo_trainer.") for where in handle.replaced)
    else:  # not importable here; importing it later binds the replacements
        grpo_unaffected = hasattr(utils, "add_fused_lm_head") and not head_replaced
    if not handle.replaced:
        warnings.warn(f"rlhfkern.compat.trl.patch() replaced nothing in TRL {version}: no imported TRL module "
                      "holds selective_log_softmax / entropy_from_logits / ChunkedLogProbFunction (already patched?)",
                      stacklevel=2)
    elif grpo_unaffected:
        warnings.warn(f"rlhfkern.compat.trl.patch(): TRL {version}'s GRPOTrainer calls none of the functions "
                      f"replaced, so it keeps TRL's kernels. Replaced: {', '.join(handle.replaced)}", stacklevel=2)
    return handle
