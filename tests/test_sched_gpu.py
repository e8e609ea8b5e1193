"""The hf backend of the engine's actors on a CUDA device: generation, log-probs, a PPO step, a
value step, offload/onload (weights, gradients and optimizer state leave the GPU and come back)
and the colocated weight sync. Ray is not used here (the GPU machine has no Ray; placement and
the loop are tested on Ray's logical GPUs in test_sched_loop.py). Needs a GPU."""

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", extra="ray")

from rlhfkern.reshard import HFLayout, ModelSpec, ReplicatedLayout, apply, plan_reshard
from rlhfkern.sched.actors import HFBackend
from rlhfkern.sched.config import default_config_path, load_config

GRPO = default_config_path().replace("default.yaml", "grpo_reverse.yaml")  # the rl stage alone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cfg(*overrides):
    return load_config(GRPO, ["placement.device=cuda", *overrides])


def batch_from(rollout, prompts):
    resp, mask, _ = rollout.generate(prompts, seed=1)
    ids = torch.tensor(prompts)
    return {"input_ids": torch.cat([ids, resp], 1),
            "attention_mask": torch.cat([torch.ones_like(ids), mask], 1), "response_mask": mask}


def test_hf_backend_on_cuda_generates_trains_offloads_and_syncs():
    c = cfg()
    policy = HFBackend(c, "policy", 0, 1, "cuda:0", {})
    rollout = HFBackend(c, "rollout", 0, 1, "cuda:0", {})
    prompts = [[1, 4 + d, 5, 6, 3] for d in range(8)] * 4
    batch = batch_from(rollout, prompts)
    assert batch["response_mask"].sum() > 0
    for k, v in policy.named_tensors().items():  # the same seed, the same initial weights
        assert torch.equal(v, rollout.named_tensors()[k]), k
    lp, ent = policy.logprobs(batch, with_entropy=True)
    ref, _ = rollout.logprobs(batch)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)  # cuBLAS may pick other kernels
    assert torch.all(lp <= 0) and torch.all(ent >= 0)
    B, R = batch["response_mask"].shape
    batch.update(old_log_prob=lp, ref_log_prob=lp, advantages=torch.randn(B, R))
    before = {k: v.detach().clone() for k, v in policy.named_tensors().items()}
    metrics = policy.train_policy(batch, 1, 16, 1)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(before[k], v) for k, v in policy.named_tensors().items())

    used = torch.cuda.memory_allocated()
    policy.offload()
    assert all(p.device.type == "cpu" for p in policy.model.parameters())
    assert all(v.device.type == "cpu" for s in policy.optimizer.state.values() for v in s.values() if v.dim() > 0)
    assert torch.cuda.memory_allocated() < used - sum(p.nbytes for p in policy.model.parameters())
    policy.onload()
    assert all(p.device.type == "cuda" for p in policy.model.parameters())
    policy.train_policy(batch, 2, 16, 1)  # the optimizer state is usable where it came back

    spec = ModelSpec.from_hf_config(c.hf_config("policy"))
    plan = plan_reshard(ReplicatedLayout(HFLayout(spec), 1), ReplicatedLayout(HFLayout(spec), 1), colocated=True,
                        dtype=torch.float32)
    with torch.no_grad():
        apply(plan, {0: policy.named_tensors()}, out={0: rollout.named_tensors()})
    for k, v in policy.named_tensors().items():
        assert torch.equal(v, rollout.named_tensors()[k]), k


def test_value_backend_on_cuda_trains():
    c = cfg("algorithm.name=ppo", "models.value={optimizer: {lr: 1.0e-3}}", "placement.colocate=[[policy,rollout,reference,value]]")
    value = HFBackend(c, "value", 0, 1, "cuda:0", {})
    rollout = HFBackend(c, "rollout", 0, 1, "cuda:0", {})
    batch = batch_from(rollout, [[1, 5, 6, 7, 3]] * 16)
    v = value.values(batch)
    assert v.shape == batch["response_mask"].shape and torch.isfinite(v).all()
    batch.update(values=v, returns=v + 1.0)
    first = value.train_value(batch, 1, 8, 1)["critic/loss"]
    for step in range(2, 30):
        last = value.train_value(batch, step, 8, 1)["critic/loss"]
    assert last < first
