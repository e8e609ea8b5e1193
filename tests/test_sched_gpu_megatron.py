"""The megatron-core trainer backend on a CUDA device over NCCL (a world of one: tp 1; the tp 2
engine test runs over gloo on CPU in test_sched_megatron.py): its log-probs and one PPO step
against the hf backend's on the same GPU, and its weights unsharded through the reshard plan.
Needs a GPU and megatron-core (carried to the GPU machine in .gpu_bundle)."""

import random

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", extra="ray")
need("megatron.core", extra="megatron")

from rlhfkern.reshard import HFLayout, apply, plan_reshard
from rlhfkern.sched import tasks
from rlhfkern.sched.actors import HFBackend, MegatronBackend, build_model, sequence_batch
from rlhfkern.sched.config import default_config_path, load_config

GRPO = default_config_path().replace("default.yaml", "grpo_reverse.yaml")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def nccl(tmp_path):
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'nccl'}", rank=0, world_size=1)
    group = dist.new_group([0])
    yield {("model", "policy", kind): group for kind in ("tp", "pp", "dp")}
    dist.destroy_process_group()


def test_megatron_backend_on_cuda_equals_hf(nccl):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = HFBackend(load_config(GRPO, ["placement.device=cuda"]), "policy", 0, 1, "cuda:0", {})
    mg = MegatronBackend(load_config(GRPO, ["placement.device=cuda", "models.policy.backend=megatron"]),
                         "policy", 0, 1, "cuda:0", nccl)
    assert all(p.device.type == "cuda" for p in mg.named_tensors().values())
    on_cpu = build_model(hf.cfg, "policy", hf.cfg.train.seed, "cpu")  # a seed draws the same weights anywhere
    assert all(torch.equal(p.cpu(), hf.named_tensors()[n].cpu()) for n, p in on_cpu.named_parameters())
    prompts = tasks.DigitTask("reverse", 3, 3, 10, 0).train_prompts(16, random.Random(1))
    responses, mask, _ = hf.generate(prompts, seed=5)
    batch = sequence_batch(prompts, responses, mask)
    batch["advantages"] = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    batch["ref_log_prob"] = torch.full(mask.shape, -2.0)
    # each against plain torch on the HF model's logits (log_softmax, gather)
    ids = batch["input_ids"].cuda()
    R = mask.shape[1]
    with torch.no_grad():
        logits = hf.model(input_ids=ids, attention_mask=batch["attention_mask"].cuda()).logits[:, -R - 1:-1].float()
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, -R:, None])[..., 0].cpu() * mask
    torch.testing.assert_close(hf.logprobs(batch)[0] * mask, want, rtol=0, atol=1e-4, msg="hf backend")
    with torch.no_grad():
        mg_ids, am, pos = mg._inputs(batch)
        L = mg_ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)
        mg_logits = mg.model(mg_ids, pos, (causal[None] | ~am.bool()[:, None, :])[:, None])[:, -R - 1:-1, :logits.shape[-1]]
    torch.testing.assert_close(mg_logits.float(), logits, rtol=0, atol=1e-3, msg="megatron logits")
    torch.testing.assert_close(mg.logprobs(batch)[0] * mask, want, rtol=0, atol=1e-4, msg="megatron backend")
    metrics_hf, metrics_mg = hf.train_policy(batch, 1, 8, 1), mg.train_policy(batch, 1, 8, 1)
    for k in metrics_hf:
        assert metrics_mg[k] == pytest.approx(metrics_hf[k], rel=1e-3, abs=1e-4), k
    plan = plan_reshard(mg.layout, HFLayout(mg.layout.spec), dtype=torch.float32)
    after = apply(plan, {0: {n: t.detach().cpu() for n, t in mg.named_tensors().items()}})[0]
    for n, p in hf.named_tensors().items():
        torch.testing.assert_close(after[n], p.detach().cpu(), rtol=0, atol=1e-4, msg=n)
