"""The megatron-core trainer backend (`backend: megatron`): a GPTModel per rank, tensor, pipeline
and data parallel over the engine's own process groups.

The model is megatron-core 0.16.1's GPTModel (local layer spec: RMSNorm, SwiGLU, rotary, grouped
query attention) built from the model's HF config with the names and shapes of
`rlhfkern.reshard.MegatronLayout`, and given its weights through `MegatronLayout.shard` of the
HF weights (so a megatron trainer starts from exactly the weights an hf trainer would). Its
process groups are the engine's (passed in a ProcessGroupCollection, not megatron's global
parallel_state), so a megatron model is one model among the engine's others. Ranks: tp fastest,
then pp, then dp (MegatronLayout's numbering inside a replica, ReplicatedLayout's across them).

The policy's log-probs and entropy come from the vocab-parallel output layer: each tp rank's
logits cover its vocabulary shard (padding columns masked), and `rlhfkern.logprobs(...,
tp_group=...)` combines them with two all-reduces; the [tokens, vocab] logits are never
gathered.

A value model (MegatronLayout of a ModelSpec with value_head) is the same GPTModel with its
output layer replaced by `ValueHead`, HF's token-classifier `score` (Linear(hidden, 1) with a
bias): whole on every tp rank, applied to the final norm's output (replicated over tp), so its
values, and its gradients, are the same on every tp rank.

Pipeline stages (pp > 1) hold the layers MegatronLayout gives them (stage 0 the embedding, the
last the final norm and output layer) and run an explicit pipeline over the pp group (no
megatron schedules, which need its global parallel_state): see MegatronBackend.
"""

import contextlib

import torch


def cpu_redirects(device):
    """What megatron-core needs in a process before its first forward. Its one process-global
    buffer (attention's scratch); the CUDA RNG tracker's fork for dropout made a no-op (dropout
    is 0 in PPO training, and the tracker would need megatron's global parallel state seeded);
    and on a machine without CUDA (tensors on the CPU) torch.cuda.current_device(), answered
    with the CPU. Everything else runs as megatron wrote it."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    megatron_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    if device.type == "cpu":
        torch.cuda.current_device = lambda: "cpu"


def rank_groups(tp, pp, dp):
    """The model-rank lists of the tp, pp and dp groups of a tp x pp x dp model."""
    rank = lambda d, p, t: (d * pp + p) * tp + t  # noqa: E731
    return {"tp": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
            "pp": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
            "dp": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)]}


def build_gpt(hf_config, layout, tp_group, pp_group, dtype, stage=0):
    """megatron-core's GPTModel for one rank of `layout` (a MegatronLayout), pipeline stage
    `stage` (megatron numbers its layers from the stage's pp-group rank: they must agree), on the CPU."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    if pp_group.rank() != stage or pp_group.size() != layout.pp:
        raise ValueError(f"stage {stage} of {layout.pp} is rank {pp_group.rank()} of {pp_group.size()} in its pp group")
    spec = layout.spec
    tc = TransformerConfig(num_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
                           num_query_groups=spec.kv_heads, ffn_hidden_size=spec.ffn, kv_channels=spec.head_dim,
                           use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True,
                           activation_func=F.silu, add_bias_linear=False, add_qkv_bias=spec.qkv_bias,
                           qk_layernorm=spec.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
                           layernorm_epsilon=hf_config.rms_norm_eps, tensor_model_parallel_size=layout.tp,
                           pipeline_model_parallel_size=layout.pp, pipeline_dtype=dtype, params_dtype=dtype,
                           bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    # no context parallelism (a group of this rank alone); embd None: with pp > 1 and tied
    # embeddings megatron would all-reduce the last stage's copy on CUDA at build time, where
    # MegatronBackend copies the weights in and keeps the two copies' gradients equal itself
    groups = ProcessGroupCollection(tp=tp_group, pp=pp_group, cp=_OneRank(), embd=None, pos_embd=tp_group,
                                    tp_cp=tp_group, mp=tp_group)
    theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta") or getattr(hf_config, "rope_theta", 10000)
    model = GPTModel(tc, get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=spec.qk_norm),
                     vocab_size=layout.padded_vocab, max_sequence_length=hf_config.max_position_embeddings,
                     share_embeddings_and_output_weights=spec.tied, position_embedding_type="rope",
                     rotary_base=int(theta), pre_process=stage == 0, post_process=stage == layout.pp - 1,
                     pg_collection=groups)
    if spec.value_head and model.post_process:
        model.output_layer = ValueHead(spec.hidden, dtype)
    if spec.kv_heads < layout.tp:
        for layer in model.decoder.layers:
            layer.self_attention.register_forward_pre_hook(_own_tp_group)
            layer.self_attention.register_forward_hook(_own_tp_group_done, always_call=True)
    return model


class ValueHead(torch.nn.Module):
    """A value model's head in GPTModel's output-layer slot (called as megatron calls its output
    layer): Linear(hidden, 1) with a bias, not tensor-parallel (its weights whole on every tp
    rank). [s, b, h] -> ([s, b, 1], None). Weights zero until copied in."""

    def __init__(self, hidden, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        return torch.nn.functional.linear(hidden, self.weight, self.bias), None


class _OneRank:
    """A process group of this rank alone as megatron asks it (size, rank): context parallelism off."""

    def size(self):
        return 1

    def rank(self):
        return 0


def _own_tp_group(attention, args):
    """With tp past the KV heads megatron-core 0.16.1's attention all-gathers each rank's part of
    the qkv group, and takes its tp rank, from parallel_state's globals instead of its own
    pg_collection (a gather over group None here, where the engine's groups are not megatron's
    globals): for the module's forward those two names in megatron's attention module answer
    with the module's tp group (the backward's reduce-scatter keeps the group it was given)."""
    from megatron.core.transformer import attention as megatron_attention

    tp = attention.pg_collection.tp
    names = ("all_gather_last_dim_from_tensor_parallel_region", "get_tensor_model_parallel_rank")
    attention._rlhfkern_saved = {n: getattr(megatron_attention, n) for n in names}
    gather = attention._rlhfkern_saved[names[0]]
    megatron_attention.all_gather_last_dim_from_tensor_parallel_region = lambda t, group=None: gather(t, group or tp)
    megatron_attention.get_tensor_model_parallel_rank = tp.rank


def _own_tp_group_done(attention, args, output):
    from megatron.core.transformer import attention as megatron_attention

    for n, f in attention.__dict__.pop("_rlhfkern_saved", {}).items():
        setattr(megatron_attention, n, f)
