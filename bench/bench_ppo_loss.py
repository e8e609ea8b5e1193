"""Actor-loss benchmarks: forward + backward of the whole actor loss (PPO clip with dual-clip,
IS weights, entropy bonus, k3 KL penalty, token-mean) per backend, against the eager composition
verl 0.9.1 users run today (compute_policy_loss_vanilla + agg_loss + kl_penalty, autograd), in the
same run, at 1M and 8M tokens, fp32. Without verl installed (the GPU image) the baseline is
rlhfkern's torch reference, the same eager composition."""

import pytest
import torch

import rlhfkern
from bench_gae import DEVICES, GPU_INNER, HAS_VERL, compiled, copy_floor

SHAPES = [(256, 4096), (1024, 8192)]  # 1M and 8M tokens


def make_inputs(B, T, device):
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(B, T, generator=g) * 0.5 - 1).to(device).requires_grad_()
    old = (lp.detach() + torch.randn(B, T, generator=g).to(device) * 0.1)
    adv = torch.randn(B, T, generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B, 1), generator=g)
    m = (torch.arange(T)[None] < lengths).float().to(device)
    ent = (torch.rand(B, T, generator=g) * 3).to(device).requires_grad_()
    ref = lp.detach() + torch.randn(B, T, generator=g).to(device) * 0.1
    isw = (torch.rand(B, T, generator=g) + 0.5).to(device)
    return lp, old, adv, m, ent, ref, isw


def verl_step(lp, old, adv, m, ent, ref, isw, config):
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty

    pg_loss, _ = compute_policy_loss_vanilla(old, lp, adv, m, "token-mean", config, isw)
    loss = pg_loss - 0.01 * agg_loss(ent, m, "token-mean") + 0.1 * agg_loss(kl_penalty(lp, ref, "low_var_kl"), m,
                                                                            "token-mean")
    loss.backward()
    return loss


def rlhfkern_step(lp, old, adv, m, ent, ref, isw, backend):
    loss, _ = rlhfkern.actor_loss(lp, old, adv, m, entropy=ent, ref_log_prob=ref, entropy_coeff=0.01, kl_coef=0.1,
                                  kl_kind="low_var_kl", is_weights=isw, backend=backend)
    loss.backward()
    return loss


CASES = [(s, d, b) for d in DEVICES for s in SHAPES for b in ["verl"] + compiled(d, "actor_loss")]


@pytest.mark.parametrize("shape,device,backend", CASES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
def bench_actor_loss_fwd_bwd(benchmark, shape, device, backend):
    B, T = shape
    lp, old, adv, m, ent, ref, isw = make_inputs(B, T, device)
    benchmark.group = f"actor loss fwd+bwd {B * T / 2**20:.0f}M tokens fp32 {device}"
    if backend == "verl" and HAS_VERL:
        from verl.workers.config import ActorConfig

        config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
        step, label, role = (lambda: verl_step(lp, old, adv, m, ent, ref, isw, config)), "verl 0.9.1 eager", "baseline"
    elif backend == "verl":
        step = lambda: rlhfkern_step(lp, old, adv, m, ent, ref, isw, "torch")  # noqa: E731
        label, role = "eager torch reference (verl's composition; verl not installed)", "baseline"
    else:
        step, label, role = (lambda: rlhfkern_step(lp, old, adv, m, ent, ref, isw, backend)), backend, "op"
    inner = GPU_INNER if device == "cuda" else 1

    def call():
        for _ in range(inner):
            lp.grad = ent.grad = None
            step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(inner=inner, label=label, role=role)
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.skipif("cuda" not in DEVICES, reason="the copy floor is a GPU figure")
def bench_actor_loss_copy_floor(benchmark, shape):
    """Bytes a fused forward + backward must move: 7 inputs read twice, d log_prob and d entropy written."""
    B, T = shape
    copy_floor(benchmark, B * T * 4 * (2 * 7 + 2), f"actor loss fwd+bwd {B * T / 2**20:.0f}M tokens fp32 cuda")
