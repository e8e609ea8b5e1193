"""Placement on Ray's logical GPUs (every rank lands where the plan says), the memory estimate
against real tensors, the memory check and the plan's text. One Ray instance for the module."""

import copy
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", "ray", extra="ray")

from rlhfkern.sched.config import ConfigError, parse_config
from rlhfkern.sched.memory import check_memory, estimate, model_memory, transient
from rlhfkern.sched.placement import Placement, plan_text

LLAMA = {"model_type": "llama", "vocab_size": 14, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
         "tie_word_embeddings": False}
RULE = {"copy": {"kind": "rule", "function": "rlhfkern.sched.tasks:copy_reward"}}
OPT = {"lr": 1e-3}

# ppo: policy + reference colocated on 2 devices (dp=2), rollout and value on one each
MIXED = {"models": {"policy": {"model": {"hf_config": LLAMA}, "optimizer": OPT, "dp": 2},
                    "rollout": {}, "reference": {"dp": 2}, "value": {"optimizer": OPT, "dtype": "bfloat16"},
                    "rewards": RULE},
         "placement": {"colocate": [["policy", "reference"]], "devices_per_node": 4},
         "algorithm": {"name": "ppo"}, "train": {"prompts_per_step": 4, "minibatch_sequences": 16}}
# grpo: policy (dp=2) + rollout (1 rank) colocated on 2 devices, a reward model apart on 2
SPLIT = {"models": {"policy": {"model": {"hf_config": LLAMA}, "optimizer": OPT, "dp": 2}, "rollout": {},
                    "rewards": {**RULE, "rm": {"kind": "model", "model": {"hf_config": LLAMA}, "dp": 2}}},
         "placement": {"colocate": [["policy", "rollout"]], "devices_per_node": 4},
         "train": {"prompts_per_step": 4, "minibatch_sequences": 16}}


def config(base, **placement):
    data = copy.deepcopy(base)
    data["placement"].update(placement)
    return parse_config(data)


@pytest.fixture(scope="module")
def ray_cluster(ray_gpus):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    return ray


def _where():
    import ray

    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "pg": ctx.get_placement_group_id(),
            "gpu": ",".join(map(str, ray.get_gpu_ids())), "resources": ctx.get_assigned_resources()}


@pytest.mark.parametrize("base", [MIXED, SPLIT], ids=["mixed", "split"])
def test_every_rank_lands_where_the_plan_says(ray_cluster, base):
    ray = ray_cluster
    cfg = config(base)
    plan = Placement(cfg)
    assert "gpu ?" in plan.report()  # before create: node and GPU unknown
    plan.create()
    Where = ray.remote(type("Where", (), {"where": lambda self: _where()}))
    try:
        actors = [Where.options(**plan.worker_options(i)).remote() for i in range(len(plan.workers))]
        at = ray.get([a.where.remote() for a in actors])
        seen = {(m, s.rank): at[s.worker] for m, slots in plan.slots.items() for s in slots}
        for (model, rank), got in seen.items():
            slot = plan.slots[model][rank]
            node, gpu = plan.where(model, rank)
            assert got["pg"] == plan.groups[slot.pool].id.hex(), (model, rank)
            assert (got["node"], got["gpu"]) == (node, gpu), (model, rank)
            assert got["resources"] == pytest.approx({"GPU": 1.0}), (model, rank)
            assert model in plan.workers[slot.worker].models and plan.workers[slot.worker].bundle == rank
        # a bundle is one GPU and one worker: colocated ranks on it share both, every other bundle has its own
        by_bundle = {}
        for (model, rank), got in seen.items():
            slot = plan.slots[model][rank]
            by_bundle.setdefault((slot.pool, slot.bundle), set()).add((got["gpu"], slot.worker))
        assert all(len(gpus) == 1 for gpus in by_bundle.values()), by_bundle
        assert len({g for gpus in by_bundle.values() for g in gpus}) == len(by_bundle) == plan.devices() == len(actors)
        colocated = [s for s in plan.pools if len(s.models) > 1][0].models
        pool = plan.slots[colocated[0]][0].pool
        assert len({seen[(m, 0)]["gpu"] for m in colocated}) == 1
        assert len({plan.slots[m][0].worker for m in colocated}) == 1  # one process, models in turn
        assert all(plan.slots[m][0].pool != pool for m in plan.slots if m not in colocated)
        text = plan.report()
        assert "?" not in text.split("step")[0]
        for (model, rank), got in seen.items():
            assert re.search(rf"{re.escape(model)}\s+rank {rank}\s+bundle \d+\s+node {got['node'][:8]}\s+gpu "
                             rf"{got['gpu']}\b", text), (model, rank)
        for a in actors:
            ray.kill(a)
    finally:
        plan.remove()


def _real_state(model, dtype, scalar_head):
    """Bytes of the weights, gradients and AdamW state of `model` after one optimizer step."""
    torch.manual_seed(0)
    ids = torch.randint(3, 14, (2, 5))
    if scalar_head:
        out = model.head(model(input_ids=ids).last_hidden_state).float().sum()
    else:
        out = model(input_ids=ids).logits.float().logsumexp(-1).sum()
    out.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    params = list(model.parameters())
    assert {p.dtype for p in params} == {dtype}
    return {"params": sum(p.numel() for p in params), "weights": sum(p.nbytes for p in params),
            "gradients": sum(p.grad.nbytes for p in params),
            "optimizer": sum(t.nbytes for s in opt.state.values() for t in s.values())}


@pytest.mark.parametrize("dtype,tied", [("float32", False), ("bfloat16", True)])
def test_memory_estimate_equals_real_tensors(dtype, tied):
    from transformers import AutoModel, AutoModelForCausalLM

    data = copy.deepcopy(MIXED)
    data["models"]["policy"]["model"]["hf_config"]["tie_word_embeddings"] = tied
    data["models"]["policy"]["dtype"] = data["models"]["value"]["dtype"] = dtype
    cfg = parse_config(data)
    report = estimate(cfg, device="cpu")
    torch_dtype = getattr(torch, dtype)
    hf = cfg.hf_config("policy")

    policy = AutoModelForCausalLM.from_config(hf, dtype=torch_dtype)
    value = AutoModel.from_config(hf, dtype=torch_dtype)
    value.head = torch.nn.Linear(hf.hidden_size, 1, dtype=torch_dtype)
    for name, model, scalar in (("policy", policy, False), ("value", value, True)):
        real = _real_state(model, torch_dtype, scalar)
        est = model_memory(cfg, name)
        assert est == report.models[name]
        assert {k: getattr(est, k) for k in real} == real, name
        # a trainer's state is resident on its device in every phase (CPU tensors: no offload)
        device = next(d for d in report.devices if name in d.models)
        for parts in device.phases.values():
            assert {c: parts[(name, c)] for c in ("weights", "gradients", "optimizer")} == \
                {c: real[c] for c in ("weights", "gradients", "optimizer")}
    frozen = model_memory(cfg, "reference")  # the policy's architecture in its own dtype (float32)
    assert (frozen.params, frozen.weights, frozen.gradients, frozen.optimizer) == \
        (model_memory(cfg, "policy").params, 4 * frozen.params, 0, 0)


def test_offload_rule_and_transient_formulas():
    cfg = config(MIXED)
    on_gpu, on_cpu = estimate(cfg, device="cuda"), estimate(cfg, device="cpu")
    pool0 = [d for d in on_gpu.devices if d.pool == 0][0]
    assert set(on_gpu.offloaded) == {"policy", "reference"} and on_cpu.offloaded == ()
    assert pool0.total("generate") == 0  # colocated + offload: nothing outside their phases
    assert pool0.phases["train"].keys() >= {("policy", "weights"), ("policy", "optimizer")}
    assert ("reference", "weights") not in pool0.phases["train"]
    assert ("policy", "optimizer") in [d for d in on_cpu.devices if d.pool == 0][0].phases["generate"]
    # rollout on its own device: weights always; generate's batch is the held-out evaluation's 200
    # prompts (more than 4 x 8 sequences); generate's peak is the larger of the prefill (the
    # prompt's KV cache, 2*L*kv*hd*p*b*e, and a prompt-long layer's working set) and the last
    # decoding step (the cache at s tokens, plus one layer's keys copied as it grows): here the
    # prefill (L=2 layers, kv=2 heads, hd=8, e=4, p=5, s=13)
    m, s, p, b = on_cpu.models["rollout"], on_cpu.seq, cfg.data.max_digits + 2, 200
    assert s == p + cfg.rollout.max_new_tokens and on_cpu.batch["generate"]["rollout"] == b
    rollout = [d for d in on_cpu.devices if d.models == ("rollout",)][0]
    per_token = 2 * 2 * 2 * 8 * b * 4
    assert rollout.phases["generate"][("rollout", "kv_cache")] == per_token * p
    decode = transient(m, "generate", b, s, 1)  # a one-token prompt: the last decoding step is the peak
    assert decode["kv_cache"] == per_token * s + per_token * s // 4
    assert rollout.phases["train"] == {("rollout", "weights"): m.weights}
    # train activations, e = 2 bytes (bfloat16 value), b = minibatch / dp = 16, h = 32, f = 64
    v = on_cpu.models["value"]
    acts = int(16 * s * 2 * (2 * (8.4 * 32 + 5.0 * 64) + 6.5 * 32))
    assert [d for d in on_cpu.devices if d.models == ("value",)][0].phases["train"][("value", "activations")] == acts
    assert v.itemsize == 2


def test_check_memory_refuses_a_plan_that_does_not_fit():
    cfg = config(MIXED, device_memory_gib=0.0005)  # 512 KiB
    report = estimate(cfg)
    with pytest.raises(ConfigError) as e:
        check_memory(report)
    keys = {k for k, _ in e.value.problems}
    assert keys == {"placement.device_memory_gib"}
    assert re.search(r"device pool0/bundle0 phase train needs 950\.6 KiB > 524\.3 KiB", str(e.value))
    assert "DOES NOT FIT" in plan_text(cfg, report)
    assert check_memory(estimate(config(MIXED))) is not None  # 80 GiB: fits


def test_plan_text_names_every_model_rank_and_phase():
    for base in (MIXED, SPLIT):
        cfg = config(base)
        text = plan_text(cfg)
        for name in cfg.model_names():
            for rank in range(cfg.model(name).world):
                assert re.search(rf"^\s+{re.escape(name)}\s+rank {rank}\s+bundle {rank}\s+node \?\s+gpu \?$",
                                 text, re.M), (name, rank)
        for phase in estimate(cfg).schedule:
            assert re.search(rf"^\s+{phase}\s", text, re.M), phase
        assert "rules copy (host)" in text and re.search(r"B\*", text) and "fits: max" in text
        assert re.search(r"weight sync each step .*\n  policy hf tp 1 x dp [12] -> rollout hf tp 1 x dp 1, [a-z ]+; float32\n.*transfers\n  dst rank 0: receives [0-9.]+ MiB \(lower bound", text)


# grpo_reverse (policy, rollout, reference colocated) with a vLLM rollout: head_dim 32 (2 heads)
GRPO = "rlhfkern/sched/configs/grpo_reverse.yaml"
VLLM = ["models.policy.model.hf_config.num_attention_heads=2", "models.policy.model.hf_config.num_key_value_heads=2",
        "models.rollout.backend=vllm"]


def _vllm_cfg(*overrides):
    from rlhfkern.sched.config import load_config

    return load_config(GRPO, VLLM + list(overrides))


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_rollout_memory_is_its_vllm_shard(tp):
    """A vLLM rollout's weights are its rank-0 shard in vLLM's layout (tp slices, the vocabulary
    padded), exactly; on CPU the 2-D weights once more (packed) and, tp > 1, the replica's tp
    shards on its leader; the KV cache vllm.kv_cache_bytes preallocates, resident (offloaded
    with the weights on CUDA), in the generate phase and never as a transient."""
    from transformers import AutoModelForCausalLM

    from rlhfkern.reshard import ModelSpec, VLLMLayout
    from rlhfkern.sched.vllm import kv_cache_bytes

    # kv_cache_bytes is pure: importing rlhfkern.sched.vllm imports no vllm (a fresh interpreter)
    probe = "import sys, rlhfkern.sched.vllm; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    cfg = _vllm_cfg(f"models.rollout.tp={tp}", f"placement.devices_per_node={tp}")
    hf = cfg.hf_config("rollout")
    sd = {k: v.detach() for k, v in AutoModelForCausalLM.from_config(hf).named_parameters()}
    shards = VLLMLayout(ModelSpec.from_hf_config(hf), tp).shard(sd)
    assert len({sum(t.nbytes for t in s.values()) for s in shards.values()}) == 1  # every rank's the same size
    m = model_memory(cfg, "rollout")
    assert (m.backend, m.tp) == ("vllm", tp)
    assert m.weights == sum(t.nbytes for t in shards[0].values())
    assert (m.params, m.tensors) == (sum(t.numel() for t in shards[0].values()), len(shards[0]))
    assert m.matrix_weights == sum(t.nbytes for t in shards[0].values() if t.dim() == 2)
    assert m.kv_cache == kv_cache_bytes(cfg, "rollout") > 0 and m.gradients == m.optimizer == 0
    if tp > 1:
        assert m.weights < model_memory(cfg, "policy").weights
    assert "kv_cache" not in transient(m, "generate", 8, 11, 5)  # preallocated, not grown

    cpu, gpu = estimate(cfg, device="cpu"), estimate(cfg, device="cuda")
    assert gpu.offloaded == ("policy", "rollout", "reference")
    for rank in range(tp):
        on_cpu = [d for d in cpu.devices if d.bundle == rank][0].phases
        on_gpu = [d for d in gpu.devices if d.bundle == rank][0].phases
        want = {"weights": m.weights, "kv_cache": m.kv_cache, "packed_weights": m.matrix_weights}
        if tp > 1 and rank == 0:
            want["sync_buffers"] = tp * m.weights
        for phase in cpu.schedule:  # CPU: resident in every phase
            assert {c: on_cpu[phase][("rollout", c)] for c in want} == want, (rank, phase)
        gen = {c: v for (n, c), v in on_gpu["generate"].items() if n == "rollout"}
        assert gen["weights"] == m.weights and gen["kv_cache"] == m.kv_cache
        assert "packed_weights" not in gen and "sync_buffers" not in gen and gen["activations"] > 0
        assert not [k for k in on_gpu["train"] if k[0] == "rollout"]  # asleep while the policy trains


def _sync_stats(cfg):
    from rlhfkern.reshard import MegatronLayout, ModelSpec, ReplicatedLayout, VLLMLayout, plan_reshard

    spec = ModelSpec.from_hf_config(cfg.hf_config("policy"))
    return plan_reshard(ReplicatedLayout(MegatronLayout(spec, 2), 1), ReplicatedLayout(VLLMLayout(spec, 2), 1),
                        colocated=cfg.colocated("policy", "rollout"), dtype=torch.float32).stats()


@pytest.mark.parametrize("colocated", [False, True], ids=["separate", "colocated"])
def test_plan_text_megatron_tp2_to_vllm_tp2(colocated):
    """rlhfkern plan with a megatron tp 2 policy and a vLLM tp 2 rollout: backends and tp in the
    placement, the sync's bytes per destination rank as plan_reshard's stats give them (never
    under the lower bound), and what the replica's leader pulls and hands to vLLM's workers."""
    from rlhfkern.reshard import MegatronLayout, ModelSpec, VLLMLayout

    mg = ["models.policy.backend=megatron", "models.policy.tp=2", "models.reference.backend=megatron",
          "models.reference.tp=2", "models.rollout.tp=2", "placement.device=cpu"]
    where = ["placement.devices_per_node=2"] if colocated else \
        ["placement.devices_per_node=4", "placement.colocate=[[policy,reference]]"]
    cfg = _vllm_cfg(*mg, *where)
    assert [p.devices for p in cfg.pools()] == ([2] if colocated else [2, 2])
    text = plan_text(cfg)
    assert re.search(r"^    rollout: backend vllm, tp 2, pp 1, dp 1: one vLLM engine per dp replica", text, re.M)
    assert re.search(r"^    policy: backend megatron, tp 2, pp 1, dp 1", text, re.M)
    for rank in range(2):
        assert re.search(rf"^\s+rollout\s+rank {rank}\s+bundle {rank}\s+node \?\s+gpu \?$", text, re.M)
    spec = ModelSpec.from_hf_config(cfg.hf_config("policy"))
    assert (f"policy megatron tp 2 x dp 1 (vocabulary 14 padded to {MegatronLayout(spec, 2).padded_vocab}) -> "
            f"rollout vllm tp 2 x dp 1 (vocabulary 14 padded to {VLLMLayout(spec, 2).padded_vocab}), "
            f"{'colocated' if colocated else 'separate devices'}; float32") in text
    st = _sync_stats(cfg)
    for r in range(2):
        b, lb = st["bytes_received"][r], st["lower_bound"][r]
        assert b >= lb and (b == 0) == colocated  # colocated, the tp slices of both sides agree
        assert f"  dst rank {r}: receives {b / 2**20:.2f} MiB (lower bound {lb / 2**20:.2f} MiB)" in text
    # the engine's own moves: the leader (rank 0) pulls the policy shards not in its worker
    size = lambda layout, r: sum(math.prod(p.shape) for p in layout.params(r).values()) * 4  # noqa: E731
    mgl, vl = MegatronLayout(spec, 2), VLLMLayout(spec, 2)
    pulled = size(mgl, 1) if colocated else size(mgl, 0) + size(mgl, 1)
    assert (f"rollout rank 0 (leader of ranks 0-1): pulls {pulled / 2**20:.2f} MiB from policy rank(s) "
            f"{'1' if colocated else '0, 1'}; hands {(size(vl, 0) + size(vl, 1)) / 2**20:.2f} MiB (2 shards) "
            "to its 2 vLLM tp workers") in text
    assert "rollout rank 1" not in text
    if not colocated:  # the rollout's own devices: its KV cache is the biggest part
        assert re.search(r"^  pool1/bundle0 .* generate: rollout kv_cache ", text, re.M)
