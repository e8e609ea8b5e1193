"""rlhfkern: fused kernels, resharding weight sync and a thin scheduler for RLHF training.

The public API is flat: ``rlhfkern.gae(...)``, ``rlhfkern.masked_whiten(...)``. Every op takes
``backend=None | "auto" | "torch" | "cpu" | "triton" | "cuda"`` ($RLHFKERN_BACKEND sets the
default); ``rlhfkern.backends()`` lists those usable here, ``python -m rlhfkern info`` says more.
"""

from ._dispatch import backends
from .ops.advantages import grpo_advantage, reinforce_pp_advantage, reinforce_pp_baseline_advantage, rloo_advantage
from .ops.gae import gae, masked_whiten
from .ops.logprob import linear_logprobs, logprobs
from .ops.ppo_loss import actor_loss, kl_penalty, ppo_loss, value_loss

__version__ = "0.1.0"


def __getattr__(name):
    """rlhfkern.Engine: the RLHF engine (imported on first use: it pulls Ray, pydantic, transformers)."""
    if name == "Engine":
        from .sched.loop import Engine

        return Engine
    raise AttributeError(f"module 'rlhfkern' has no attribute {name!r}")

__all__ = [
    "Engine", "actor_loss", "backends", "gae", "grpo_advantage", "kl_penalty", "linear_logprobs", "logprobs", "masked_whiten", "ppo_loss",
    "reinforce_pp_advantage", "reinforce_pp_baseline_advantage", "rloo_advantage", "value_loss", "__version__",
]
