"""Actor-loss benchmarks: forward + backward of the whole actor loss (PPO clip with dual-clip,
IS weights, entropy bonus, k3 KL penalty, token-mean) per backend, against the eager composition
verl 0.9.1 users run today (compute_policy_loss_vanilla + agg_loss + kl_penalty, autograd), in the
same run, at 1M and 8M tokens, fp32."""

import pytest
import torch

import rlhfkern
from bench_gae import GPU_INNER, compiled

SHAPES = [(256, 4096), (1024, 8192)]  # 1M and 8M tokens
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
    from verl.workers.config import ActorConfig

    B, T = shape
    lp, old, adv, m, ent, ref, isw = make_inputs(B, T, device)
    benchmark.group = f"actor loss fwd+bwd {B * T / 2**20:.0f}M tokens fp32 {device}"
    if backend == "verl":
        config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
        step, label, role = (lambda: verl_step(lp, old, adv, m, ent, ref, isw, config)), "verl 0.9.1 eager", "baseline"
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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy floor is a GPU figure")
def bench_actor_loss_copy_floor(benchmark, shape):
    """Bytes a fused forward + backward must move: 7 inputs read twice, d log_prob and d entropy written."""
    B, T = shape
    nbytes = B * T * 4 * (2 * 7 + 2)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    benchmark.group = f"actor loss fwd+bwd {B * T / 2**20:.0f}M tokens fp32 cuda"

    def call():
        for _ in range(GPU_INNER):
            dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.extra_info.update(inner=GPU_INNER, label="copy of the same bytes", role="copy")
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
