"""Resharding weight sync: move weights from the training layout (Megatron-core TP/PP) to the
inference layout (vLLM TP) so that each destination receives exactly its shard.

    spec = ModelSpec.from_hf_config(config)
    plan = plan_reshard(MegatronLayout(spec, tp=2, pp=1), VLLMLayout(spec, tp=4))
    plan.verify(); plan.stats()
    vllm_shards = apply(plan, megatron_shards)        # in one process (offline conversion)
    Resharder(plan, bucket_bytes=64 << 20).run(my_src_shards, my_live_dst_params)   # every process
"""

from .executor import Resharder
from .layouts import HFLayout, MegatronLayout, ModelSpec, Piece, ReplicatedLayout, VLLMLayout
from .plan import Plan, apply, plan_reshard

__all__ = [
    "HFLayout", "MegatronLayout", "ModelSpec", "Piece", "Plan", "ReplicatedLayout", "Resharder", "VLLMLayout", "apply", "plan_reshard",
]
