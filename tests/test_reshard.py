"""Resharding: layouts against the real model classes (transformers for HF names and shapes,
megatron-core 0.16.1 GPTModel for Megatron's), shard/unshard round trips, and plans that verify,
move exactly the lower bound and give the destination layout's own shards."""

import pytest
import torch

from rlhfkern.reshard import HFLayout, MegatronLayout, ModelSpec, VLLMLayout, apply, plan_reshard

from conftest import gloo_process, need, run_processes

need("transformers", extra="megatron")


def configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64)
    return {
        "llama-gqa": LlamaConfig(num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, **small),
        "llama-mqa-tied": LlamaConfig(num_attention_heads=4, num_key_value_heads=1, vocab_size=999,
                                      tie_word_embeddings=True, **small),
        "qwen2-bias": Qwen2Config(num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                  tie_word_embeddings=False, **small),
        "qwen3-qknorm": Qwen3Config(num_attention_heads=8, num_key_value_heads=4, head_dim=16, vocab_size=515,
                                    tie_word_embeddings=False, **small),
    }


def hf_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module", params=list(configs()))
def model(request):
    config = configs()[request.param]
    m = hf_model(config)
    # named_parameters: a tied lm_head is the embedding, listed once (as HF checkpoints store it)
    return ModelSpec.from_hf_config(config), {k: v.detach() for k, v in m.named_parameters()}


def test_spec_matches_the_hf_model(model):
    spec, sd = model
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec.hf_shapes()


def megatron_fits(spec, tp):
    """What megatron-core 0.16.1 accepts: tp | heads, and tp | KV heads or KV heads | tp."""
    return spec.heads % tp == 0 and (spec.kv_heads % tp == 0 or tp % spec.kv_heads == 0)


def layouts_for(spec):
    """The layouts this model admits (Megatron: megatron_fits; vLLM tp | heads)."""
    out = [HFLayout(spec), MegatronLayout(spec, 1, 2), VLLMLayout(spec, 1)]
    out += [MegatronLayout(spec, tp, 1) for tp in (2, 4, 8) if megatron_fits(spec, tp)]
    out += [VLLMLayout(spec, tp) for tp in (2, 4, 8) if spec.heads % tp == 0]
    return out


def test_shard_unshard_round_trip(model):
    spec, sd = model
    for layout in layouts_for(spec):
        shards = layout.shard(sd)
        assert sorted(shards) == list(range(layout.world))
        back = layout.unshard(shards)
        assert back.keys() == sd.keys()
        for k in sd:
            assert torch.equal(back[k], sd[k]), (layout, k)


def test_vllm_padding_and_replication(model):
    spec, sd = model
    tp = 2 * spec.kv_heads  # every KV head on two ranks (all the configs here have heads >= 2 x KV heads)
    shards = VLLMLayout(spec, tp).shard(sd)
    hd, q = spec.head_dim, spec.heads // tp * spec.head_dim
    for r in range(tp):
        qkv = shards[r]["model.layers.0.self_attn.qkv_proj.weight"]
        head = r // 2
        assert torch.equal(qkv[q:q + hd], sd["model.layers.0.self_attn.k_proj.weight"][head * hd:(head + 1) * hd])
    emb = torch.cat([shards[r]["model.embed_tokens.weight"] for r in range(tp)])
    assert emb.shape[0] % 64 == 0 and torch.equal(emb[:spec.vocab], sd["model.embed_tokens.weight"])
    assert not emb[spec.vocab:].any()  # padding rows are zero


def test_megatron_qkv_rows_are_the_grouped_matrix_cut_in_tp(model):
    """linear_qkv on rank r is the r-th of tp equal row blocks of [q heads of g; k_g; v_g] over the
    groups g, also when tp exceeds the KV heads (a block then may end inside a head)."""
    spec, sd = model
    nq, hd = spec.heads // spec.kv_heads, spec.head_dim
    for tp in (1, 2, 4, 8):
        if not megatron_fits(spec, tp):
            continue
        shards = MegatronLayout(spec, tp, 1).shard(sd)
        for kind in ["weight", "bias"] if spec.qkv_bias else ["weight"]:
            w = {x: sd[f"model.layers.1.self_attn.{x}_proj.{kind}"] for x in "qkv"}
            grouped = torch.cat([torch.cat([w["q"][g * nq * hd:(g + 1) * nq * hd], w["k"][g * hd:(g + 1) * hd],
                                            w["v"][g * hd:(g + 1) * hd]]) for g in range(spec.kv_heads)])
            for r, block in enumerate(grouped.chunk(tp)):
                assert torch.equal(shards[r][f"decoder.layers.1.self_attention.linear_qkv.{kind}"], block), (tp, r)


CASES = [(1, 1, 2), (2, 1, 4), (4, 1, 2), (2, 2, 2), (2, 1, 8), (4, 1, 4), (8, 1, 2)]


def fits(spec, a, c):
    return megatron_fits(spec, a) and spec.heads % c == 0 and (spec.kv_heads % c == 0 or c % spec.kv_heads == 0)


PLAN_CASES = [(name, a, b, c) for name, cfg in configs().items() for a, b, c in CASES
              if fits(ModelSpec.from_hf_config(cfg), a, c)]


@pytest.mark.parametrize("name,tp,pp", [("qwen2-bias", 2, 1), ("llama-gqa", 2, 2), ("qwen3-qknorm", 1, 1),
                                        ("llama-mqa-tied", 4, 1), ("qwen2-bias", 4, 2), ("llama-gqa", 8, 1)])
def test_plan_megatron_to_hf(name, tp, pp):
    """Megatron shards back into whole HF tensors (the engine's megatron trainer -> hf rollout
    sync): row-parallel tensors (o_proj, down_proj, split along their inputs) and the rest; tp up
    to 4x the KV heads (linear_qkv blocks ending inside heads)."""
    config = configs()[name]
    spec = ModelSpec.from_hf_config(config)
    sd = {k: v.detach() for k, v in hf_model(config).named_parameters()}
    src, dst = MegatronLayout(spec, tp, pp), HFLayout(spec)
    plan = plan_reshard(src, dst, dtype=sd["model.norm.weight"].dtype)
    assert plan.verify()
    out = apply(plan, src.shard(sd))
    assert out[0].keys() == dst.params(0).keys()
    for n, t in out[0].items():
        assert torch.equal(t, sd[n] if n in sd else sd["model.embed_tokens.weight"]), n


@pytest.mark.parametrize("name,a,b,c", PLAN_CASES)
def test_plan_megatron_to_vllm(name, a, b, c):
    config = configs()[name]
    spec = ModelSpec.from_hf_config(config)
    sd = {k: v.detach() for k, v in hf_model(config).named_parameters()}
    src, dst = MegatronLayout(spec, a, b), VLLMLayout(spec, c)
    plan = plan_reshard(src, dst, dtype=sd["model.norm.weight"].dtype)
    assert plan.verify()
    st = plan.stats()
    assert st["bytes_received"] == st["lower_bound"]  # exactly its shard, nothing more
    assert all(st["broadcast_bytes"][r] > st["lower_bound"][r] for r in st["lower_bound"])
    out = apply(plan, src.shard(sd))
    expected = dst.shard(sd)
    for r in expected:
        assert out[r].keys() == expected[r].keys()
        for n in expected[r]:
            assert torch.equal(out[r][n], expected[r][n]), (r, n)


def test_plan_colocated_moves_less(model):
    spec, sd = model
    src, dst = MegatronLayout(spec, 1, 2), VLLMLayout(spec, 2)
    plan = plan_reshard(src, dst, colocated=True)
    assert plan.verify()
    st = plan.stats()
    assert st["bytes_received"] == st["lower_bound"]
    apart = plan_reshard(src, dst).stats()
    assert all(st["bytes_received"][r] < apart["bytes_received"][r] for r in st["bytes_received"])
    out = apply(plan, src.shard(sd))
    expected = dst.shard(sd)
    assert all(torch.equal(out[r][n], expected[r][n]) for r in expected for n in expected[r])


@pytest.mark.parametrize("tp,dp,colocated", [(2, 1, False), (2, 1, True), (4, 1, False), (4, 1, True),
                                               (2, 2, False), (4, 2, True)])
def test_plan_hf_to_vllm_tp(model, tp, dp, colocated):
    """The engine's hf trainer -> vLLM rollout sync (placement.sync_plan): whole HF tensors into
    vLLM's tp shards, o_proj and down_proj cut along axis 1 from a source described along axis 0
    (refused before 208fd4e: a whole source tensor now serves a cut along any axis); dp replicas
    on both sides. The result is VLLMLayout's own shards bitwise; each rank receives its lower
    bound (colocated: nothing on the ranks beside a trainer replica) and never less."""
    from rlhfkern.reshard import ReplicatedLayout

    spec, sd = model
    src, dst = ReplicatedLayout(HFLayout(spec), dp), ReplicatedLayout(VLLMLayout(spec, tp), dp)
    plan = plan_reshard(src, dst, colocated=colocated, dtype=sd["model.norm.weight"].dtype)
    assert plan.verify()
    assert any(t.axis == 1 and t.src_name.endswith(("o_proj.weight", "down_proj.weight")) for t in plan.transfers)
    st = plan.stats()
    assert st["bytes_received"] == st["lower_bound"]
    if colocated:  # dst ranks < dp share a process with a whole HF replica
        assert all(st["bytes_received"][r] == 0 for r in range(dp))
        assert all(st["bytes_received"][r] > 0 for r in range(dp, tp * dp))
    out = apply(plan, src.shard(sd))
    expected, inner = dst.shard(sd), VLLMLayout(spec, tp).shard(sd)
    assert sorted(out) == sorted(expected) == list(range(tp * dp))
    for r in expected:
        assert out[r].keys() == expected[r].keys() == inner[r % tp].keys()
        for n in expected[r]:
            assert torch.equal(out[r][n], expected[r][n]) and torch.equal(out[r][n], inner[r % tp][n]), (r, n)
    back = VLLMLayout(spec, tp).unshard({r: out[r] for r in range(tp)})  # and back to the HF tensors
    assert all(torch.equal(back[n], sd[n]) for n in sd)


def test_plan_back_and_between_vllm_sizes(model):
    spec, sd = model
    for src, dst in [(VLLMLayout(spec, 1), MegatronLayout(spec, 1, 2)), (VLLMLayout(spec, 1), VLLMLayout(spec, 4))]:
        plan = plan_reshard(src, dst)
        assert plan.verify()
        out = apply(plan, src.shard(sd))
        expected = dst.shard(sd)
        assert all(torch.equal(out[r][n], expected[r][n]) for r in expected for n in expected[r])


def test_bad_layouts_are_refused(model):
    """What megatron-core refuses (TransformerConfig: tp | heads, and KV heads a multiple or a
    divisor of tp; its parallel linears: tp | the linear_qkv rows and the ffn); tp past the KV
    heads is not refused."""
    import dataclasses

    spec, _ = model
    with pytest.raises(ValueError, match="must divide the attention heads"):
        MegatronLayout(spec, spec.heads + 1, 1)
    with pytest.raises(ValueError, match=r"must divide the KV heads \(4\) or be a multiple of them"):
        MegatronLayout(dataclasses.replace(spec, heads=12, kv_heads=4), 6, 1)
    with pytest.raises(ValueError, match="must divide the linear_qkv rows"):
        MegatronLayout(dataclasses.replace(spec, heads=4, kv_heads=1, head_dim=1), 4, 1)
    with pytest.raises(ValueError, match="must divide the ffn"):
        MegatronLayout(dataclasses.replace(spec, ffn=spec.ffn + 1), 2, 1)
    assert MegatronLayout(spec, 2 * spec.kv_heads, 1).world == 2 * spec.kv_heads
    with pytest.raises(ValueError, match="must divide the layers"):
        MegatronLayout(spec, 1, 3)
    with pytest.raises(ValueError, match="different models"):
        plan_reshard(MegatronLayout(spec, 1, 1), VLLMLayout(ModelSpec(**{**spec.__dict__, "layers": 4}), 1))


# ----------------------------------------------------------------------------- megatron-core itself
def _megatron_model(spec, layout, tp, pp, rms_eps=1e-6):
    """megatron-core 0.16.1 GPTModel, local spec, built on the CPU for this rank."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tc = TransformerConfig(num_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
                           num_query_groups=spec.kv_heads, ffn_hidden_size=spec.ffn, kv_channels=spec.head_dim,
                           use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True,
                           activation_func=F.silu, add_bias_linear=False, add_qkv_bias=spec.qkv_bias,
                           qk_layernorm=spec.qk_norm, pipeline_model_parallel_size=pp, tensor_model_parallel_size=tp,
                           pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                           layernorm_epsilon=rms_eps)
    return GPTModel(tc, get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=spec.qk_norm),
                    vocab_size=layout.padded_vocab, max_sequence_length=64,
                    share_embeddings_and_output_weights=spec.tied, position_embedding_type="rope",
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())


def _megatron_worker(rank, world, init_file, failures, tp, pp, config_name, forward):
    """One rank of a gloo group: megatron-core's GPTModel against the layout (names and shapes),
    and with `forward`, HF weights sharded by the layout give the HF logits through megatron's
    own forward. (Tied embeddings with pp > 1 are not built here: megatron syncs them on CUDA.)"""
    import contextlib
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    with gloo_process(rank, world, init_file, failures):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        config = configs()[config_name]
        spec = ModelSpec.from_hf_config(config)
        layout = MegatronLayout(spec, tp, pp)
        model = _megatron_model(spec, layout, tp, pp, config.rms_norm_eps)
        theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
        ours = {n: tuple(p.shape) for n, p in layout.params(rank).items()}
        if theirs != ours:
            failures.put(f"rank {rank}: megatron-core {sorted(theirs.items())} != layout {sorted(ours.items())}")
        elif forward:
            # megatron's forward asks for the CUDA device and forks a CUDA RNG for dropout: on this
            # CPU-only machine the device is the CPU and the fork a no-op (dropout is 0)
            torch.cuda.current_device = lambda: "cpu"
            megatron_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
            sd = {k: v.detach() for k, v in hf_model(config).named_parameters()}
            shards = layout.shard(sd)[rank]
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(shards[n])
            ids = INPUT % spec.vocab
            T = ids.shape[1]
            model.eval()
            with torch.no_grad():
                logits = model(ids, torch.arange(T)[None], torch.triu(torch.ones(1, 1, T, T, dtype=torch.bool), 1))
                parts = [torch.empty_like(logits) for _ in range(tp)]
                dist.all_gather(parts, logits.contiguous())
                logits = torch.cat(parts, -1)[..., : spec.vocab]
            torch.testing.assert_close(logits, _hf_logits(config, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config_name,tp,pp,forward", [
    ("qwen2-bias", 1, 1, True), ("qwen2-bias", 2, 1, True), ("qwen3-qknorm", 2, 1, True), ("llama-mqa-tied", 1, 1, True),
    ("llama-gqa", 2, 2, False),  # names and shapes per pipeline stage (a pipelined forward needs megatron's schedules)
    # tp past the KV heads: rank 1 of 2 holds q head 3, k and v; at tp 4 the blocks end inside heads
    ("llama-mqa-tied", 2, 1, True), ("llama-mqa-tied", 4, 1, True), ("qwen2-bias", 4, 1, True),
])
def test_megatron_layout_equals_megatron_core(tmp_path, config_name, tp, pp, forward):
    need("megatron.core", extra="megatron")
    run_processes(_megatron_worker, tp * pp, tmp_path, tp, pp, config_name, forward)


# ----------------------------------------------------------------------------- executor, real processes
def _executor_worker(process, world, init_file, failures, name, a, b, c, bucket_bytes, colocated):
    from rlhfkern.reshard import Resharder

    with gloo_process(process, world, init_file, failures):
        config = configs()[name]
        spec = ModelSpec.from_hf_config(config)
        sd = {k: v.detach() for k, v in hf_model(config).named_parameters()}  # the same weights everywhere
        src, dst = MegatronLayout(spec, a, b), VLLMLayout(spec, c)
        plan = plan_reshard(src, dst, colocated=colocated, dtype=torch.float32)
        mine_src = {process: src.shard(sd)[process]} if process < src.world else {}
        dst_rank = process if colocated else process - src.world
        expected = dst.shard(sd)
        mine_dst = {}
        if 0 <= dst_rank < dst.world:  # live parameters with garbage in them, written in place
            mine_dst = {dst_rank: {n: torch.full_like(t, float("nan")) for n, t in expected[dst_rank].items()}}
        live = {r: dict(p) for r, p in mine_dst.items()}
        resharder = Resharder(plan, bucket_bytes=bucket_bytes, checksums=(a, c) == (2, 4))
        resharder.run(mine_src, mine_dst)
        for r, params in mine_dst.items():
            for n, t in params.items():
                assert t is live[r][n]  # in place
                assert torch.equal(t, expected[r][n]), (r, n)
        assert resharder.peak_buffer_bytes <= 2 * max(bucket_bytes, spec.hidden * 4), resharder.peak_buffer_bytes


@pytest.mark.parametrize("name,a,b,c,bucket_bytes,colocated", [
    ("qwen2-bias", 1, 1, 2, 1 << 20, False),
    ("llama-gqa", 2, 1, 4, 4096, False),  # buckets far smaller than the largest tensor
    ("qwen2-bias", 2, 2, 2, 20000, False),
    ("qwen3-qknorm", 4, 1, 2, 1 << 16, True),  # colocated: destination i shares source i's process
    ("llama-gqa", 1, 1, 4, 1 << 14, True),  # colocated, more destinations than sources: KV replicated
    ("llama-gqa", 2, 1, 8, 1 << 15, False),  # 10 processes
    ("llama-mqa-tied", 4, 1, 4, 4096, True),  # megatron tp 4 over 1 KV head (blocks inside heads), vLLM replicas
    ("qwen2-bias", 4, 1, 2, 1 << 14, False),  # megatron tp 4 over 2 KV heads, with the qkv bias
])
def test_executor_megatron_to_vllm(tmp_path, name, a, b, c, bucket_bytes, colocated):
    world = max(a * b, c) if colocated else a * b + c
    run_processes(_executor_worker, world, tmp_path, name, a, b, c, bucket_bytes, colocated)


def test_reshard_command_prints_the_plan(tmp_path):
    import subprocess
    import sys

    configs()["qwen2-bias"].save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-m", "rlhfkern", "reshard", "--hf-config", str(tmp_path),
                           "--src", "megatron:tp=2,pp=1", "--dst", "vllm:tp=4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("MegatronLayout(world 2) -> VLLMLayout(world 4)")
    assert len(lines) == 5 and all("lower bound" in line for line in lines[1:])
    bad = subprocess.run([sys.executable, "-m", "rlhfkern", "reshard", "--hf-config", str(tmp_path),
                          "--src", "megatron:tp=3", "--dst", "vllm:tp=4"], capture_output=True, text=True)
    assert bad.returncode != 0 and "must divide" in bad.stderr


# ----------------------------------------------------------------------------- truth: a forward over the vLLM layout
def vllm_layout_forward(config, spec, shards, rank, tp, input_ids, all_reduce, all_gather):
    """A tensor-parallel forward written against the vLLM layout (fused qkv and gate_up,
    column/row parallel, vocab-parallel embedding and head): correct shards give the HF logits."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    w = shards[rank]
    hd, eps = spec.head_dim, config.rms_norm_eps
    rows = w["model.embed_tokens.weight"].shape[0]
    lo = rank * rows
    ids = input_ids[0]
    local = (ids >= lo) & (ids < lo + rows)
    x = torch.where(local[:, None], w["model.embed_tokens.weight"][(ids - lo).clamp(0, rows - 1)], 0.0)
    x = all_reduce(x)[None]  # [1, T, H]
    T = x.shape[1]
    cos, sin = AutoModelForCausalLM.from_config(config).model.rotary_emb(x, torch.arange(T)[None])

    def norm(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    nq = spec.heads // tp
    nkv = (w["model.layers.0.self_attn.qkv_proj.weight"].shape[0] // hd - nq) // 2  # this rank's KV heads
    k0 = rank * spec.kv_heads // tp if tp <= spec.kv_heads else rank // (tp // spec.kv_heads)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attn.qkv_proj.weight"].T
        if spec.qkv_bias:
            qkv = qkv + w[p + "self_attn.qkv_proj.bias"]
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], -1)
        q, k, v = (t.view(1, T, -1, hd).transpose(1, 2) for t in (q, k, v))
        if spec.qk_norm:
            q, k = norm(q, w[p + "self_attn.q_norm.weight"]), norm(k, w[p + "self_attn.k_norm.weight"])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = spec.heads // spec.kv_heads  # query heads per KV head
        kv_of_q = (rank * nq + torch.arange(nq)) // group - k0  # this rank's KV head of each local query head
        attn = F.scaled_dot_product_attention(q, k[:, kv_of_q], v[:, kv_of_q], is_causal=True)
        attn = attn.transpose(1, 2).reshape(1, T, nq * hd)
        x = x + all_reduce(attn @ w[p + "self_attn.o_proj.weight"].T)
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.gate_up_proj.weight"].T).chunk(2, -1)
        x = x + all_reduce((F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T)
    x = norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight" if spec.tied else "lm_head.weight"]
    return all_gather(x @ head.T)[..., : spec.vocab]


def _hf_logits(config, input_ids):
    with torch.no_grad():
        return hf_model(config)(input_ids).logits


INPUT = torch.tensor([[5, 99, 3, 512, 0, 998, 77, 41, 7]])


@pytest.mark.parametrize("name", list(configs()))
def test_vllm_layout_tp1_forward_gives_hf_logits(name):
    config = configs()[name]
    spec = ModelSpec.from_hf_config(config)
    sd = {k: v.detach() for k, v in hf_model(config).named_parameters()}
    ids = INPUT % spec.vocab
    with torch.no_grad():
        logits = vllm_layout_forward(config, spec, VLLMLayout(spec, 1).shard(sd), 0, 1, ids, lambda t: t, lambda t: t)
    torch.testing.assert_close(logits, _hf_logits(config, ids), rtol=1e-4, atol=1e-4)


def _vllm_forward_worker(rank, world, init_file, failures, name):
    import torch.distributed as dist

    with gloo_process(rank, world, init_file, failures):
        config = configs()[name]
        spec = ModelSpec.from_hf_config(config)
        sd = {k: v.detach() for k, v in hf_model(config).named_parameters()}
        ids = INPUT % spec.vocab
        # the shards arrive through the planner and executor from a Megatron layout: end to end
        shards = apply(plan_reshard(MegatronLayout(spec, 1, 1), VLLMLayout(spec, world)),
                       MegatronLayout(spec, 1, 1).shard(sd))

        def all_reduce(t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        def all_gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts, -1)

        with torch.no_grad():
            logits = vllm_layout_forward(config, spec, shards, rank, world, ids, all_reduce, all_gather)
        torch.testing.assert_close(logits, _hf_logits(config, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,tp", [("llama-gqa", 2), ("llama-gqa", 4), ("llama-mqa-tied", 4), ("qwen2-bias", 2)])
def test_vllm_layout_tp_forward_gives_hf_logits(tmp_path, name, tp):
    """tp 4 with 2 (and 1) KV heads: every KV head replicated on several ranks."""
    run_processes(_vllm_forward_worker, tp, tmp_path, name)


@pytest.mark.parametrize("compiled", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pack_unpack_segments(monkeypatch, dtype, compiled):
    """The executor's bucket copy (C++ on the CPU; the torch path GPUs take, forced here): row
    ranges, column ranges and 1-D segments of live tensors, into one flat buffer and back, in place."""
    from rlhfkern.reshard import executor
    from rlhfkern.reshard.executor import pack, unpack

    if not compiled:
        monkeypatch.setattr(executor, "_compiled", lambda t: False)

    a, b, c = (torch.randn(s).to(dtype) for s in ((7, 5), (4, 9), (11,)))
    segments = [a.narrow(0, 2, 3), b.narrow(1, 3, 4), c.narrow(0, 1, 6), a.narrow(1, 0, 1)]
    out = torch.empty(sum(s.numel() for s in segments), dtype=dtype)
    pack(segments, out)
    assert torch.equal(out, torch.cat([s.reshape(-1) for s in segments]))
    targets = [torch.zeros(7, 5, dtype=dtype), torch.zeros(4, 9, dtype=dtype), torch.zeros(11, dtype=dtype)]
    views = [targets[0].narrow(0, 2, 3), targets[1].narrow(1, 3, 4), targets[2].narrow(0, 1, 6), targets[0].narrow(1, 0, 1)]
    unpack(out, views)
    for v, s in zip(views, segments):
        assert torch.equal(v, s)
    assert targets[0][0, 1:].eq(0).all() and targets[1][:, :3].eq(0).all()  # nothing else written
    with pytest.raises(ValueError, match="one element per segment element"):
        pack(segments, out[:-1])
    with pytest.raises(ValueError, match="one element per segment element"):
        unpack(out[1:], views)


def test_checksum_catches_changed_lost_and_swapped_elements():
    from rlhfkern.reshard.executor import checksum

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(1000).to(dtype)
        ref = checksum(x)
        changed, swapped = x.clone(), x.clone()
        changed[500] = -changed[500]
        swapped[[3, 7]] = swapped[[7, 3]]
        assert torch.equal(checksum(x.clone()), ref)
        assert not torch.equal(checksum(changed), ref)
        assert not torch.equal(checksum(swapped), ref)
        assert not torch.equal(checksum(torch.cat([x[:-1], x[:1] * 0])), ref)
