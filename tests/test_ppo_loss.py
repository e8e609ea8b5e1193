"""Policy-gradient family: the fused actor/policy loss, value loss and KL penalty of every
backend against the reference (forward, gradients, metrics), the reference against autograd
checks and verl 0.9.1 itself, the verl drop-ins, input validation, torch.compile."""

import math

import pytest
import torch

import rlhfkern
from rlhfkern.compat import verl as compat_verl
from rlhfkern.ops.ppo_loss import (AGG_MODES, KL_KINDS, OP_BACKENDS, actor_loss_reference, agg_loss_reference,
                                   kl_penalty_reference, value_loss_reference)

from conftest import (PEER_DTYPES, assert_like_peer, at_threads, compiled_backends, need, openrlhf_losses,
                      run_sse_build)

BACKENDS = compiled_backends(OP_BACKENDS)  # no CUDA kernel in this family: Triton serves GPUs


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    return request.param


KL_ALL = sorted(KL_KINDS) + [k + "+" for k in sorted(KL_KINDS)]


# ----------------------------------------------------------------------------- inputs
def batch(B=6, T=37, dtype=torch.float64, device="cpu", spread=0.3, mask_dtype=None):
    """log_prob, old_log_prob, advantages, mask (holes, an all-masked row, a one-token row),
    entropy, ref_log_prob, is_weights."""
    g = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    lp = g(B, T) * 0.5 - 1
    old = lp + g(B, T) * spread
    adv = g(B, T)
    m = (torch.rand(B, T) > 0.25).double()
    m[0] = 0
    if B > 1:
        m[1] = 0
        m[1, T // 2] = 1
    ent = torch.rand(B, T, dtype=torch.float64) * 3
    ref = lp + g(B, T) * 0.5
    isw = torch.rand(B, T, dtype=torch.float64) * 2
    m = m.to(mask_dtype) if mask_dtype is not None else m
    out = [x.to(dtype) for x in (lp, old, adv)] + [m] + [x.to(dtype) for x in (ent, ref, isw)]
    return [x.to(device) for x in out]


def close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol, atol=atol,
                               equal_nan=True)


def run_actor(fn, lp, old, adv, m, **kw):
    """(loss, metrics, d log_prob, d entropy) of one actor-loss implementation."""
    lp = lp.detach().clone().requires_grad_()
    ent = kw.pop("entropy", None)
    if ent is not None:
        ent = ent.detach().clone().requires_grad_()
    loss, metrics = fn(lp, old, adv, m, entropy=ent, **kw)
    grads = torch.autograd.grad(loss, [lp] + ([ent] if ent is not None else []))
    return loss, metrics, grads[0], (grads[1] if ent is not None else None)


def check_against_reference(backend, device, lp, old, adv, m, tol=1e-10, **kw):
    ours = run_actor(lambda *a, **k: rlhfkern.actor_loss(*a, backend=backend, **k), lp, old, adv, m, **kw)
    ref = run_actor(actor_loss_reference, *(x.cpu() for x in (lp, old, adv, m)),
                    **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    close(ours[0], ref[0], tol, tol)
    assert set(ours[1]) == set(ref[1])
    for name in ref[1]:
        close(ours[1][name], ref[1][name], tol, tol)
    close(ours[2], ref[2], tol, tol)
    if ref[3] is not None:
        close(ours[3], ref[3], tol, tol)
    return ours


# ----------------------------------------------------------------------------- the reference
def test_reference_gradcheck():
    lp, old, adv, m, ent, ref, isw = batch(3, 5)
    m[0, 0] = 1  # some tokens in every row

    def f(lp_, ent_):
        loss, _ = actor_loss_reference(lp_, old, adv, m, entropy=ent_, ref_log_prob=ref, entropy_coeff=0.1,
                                       kl_coef=0.2, kl_kind="k3", is_weights=isw, agg="seq-mean-token-mean")
        return loss

    assert torch.autograd.gradcheck(f, (lp.requires_grad_(), ent.requires_grad_()))
    for kind in sorted(KL_KINDS):
        assert torch.autograd.gradcheck(lambda a, b: kl_penalty_reference(a, b, kind).sum(),
                                        (lp.detach().requires_grad_(), ref.detach().requires_grad_()))
    for kind in sorted(KL_KINDS):  # "+": the value of the kind, the gradient of k2
        a = lp.detach().requires_grad_()
        out = kl_penalty_reference(a, ref, kind + "+")
        close(out, kl_penalty_reference(lp, ref, kind), 0, 0)
        close(torch.autograd.grad(out.sum(), a)[0], lp - ref, 1e-15, 1e-15)
    v, ret, oldv = (torch.randn(3, 5, dtype=torch.float64) for _ in range(3))
    assert torch.autograd.gradcheck(lambda x: value_loss_reference(x, ret, oldv, m, clip=0.2)[0], (v.requires_grad_(),))


def test_reference_matches_verl_policy_loss():
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    lp, old, adv, m, *_ = batch(8, 50, torch.float32, spread=1.0)
    for agg in AGG_MODES:
        theirs = core_algos.compute_policy_loss(old, lp, adv, m, cliprange=0.2, cliprange_high=0.28,
                                                clip_ratio_c=3.0, loss_agg_mode=agg)
        loss, metrics = actor_loss_reference(lp, old, adv, m, clip_low=0.2, clip_high=0.28, agg=agg)
        ours = (loss, metrics["pg_clipfrac"], metrics["ppo_kl"], metrics["pg_clipfrac_lower"])
        for a, b in zip(ours, theirs):
            close(a, b, 1e-6, 1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_reference_agg_matches_verl(agg):
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    x = torch.randn(5, 9)
    m = (torch.rand(5, 9) > 0.3).float()
    m[2] = 0
    for kw in [{}, dict(dp_size=4, batch_num_tokens=100, global_batch_size=20), dict(loss_scale_factor=7)]:
        close(agg_loss_reference(x, m, agg, **kw), core_algos.agg_loss(x, m, agg, **kw), 1e-6, 1e-6)


def test_reference_kl_and_value_match_verl():
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    lp, _, _, m, _, ref, _ = batch(4, 30, torch.float32)
    ref[0, :3] = lp[0, :3] + 40  # beyond the k3 clamps
    for kind in KL_ALL:
        a = lp.clone().requires_grad_()
        b = lp.clone().requires_grad_()
        ours, theirs = kl_penalty_reference(a, ref, kind), core_algos.kl_penalty(b, ref, kind)
        close(ours, theirs, 1e-6, 1e-6)
        close(torch.autograd.grad(ours.sum(), a)[0], torch.autograd.grad(theirs.sum(), b)[0], 1e-6, 1e-6)
    v, ret, oldv = (torch.randn(4, 30) for _ in range(3))
    for agg in AGG_MODES:
        ours = value_loss_reference(v, ret, oldv, m, clip=0.3, agg=agg)
        theirs = core_algos.compute_value_loss(v, ret, oldv, m, 0.3, agg)
        close(ours[0], theirs[0], 1e-6, 1e-6)
        close(ours[1], theirs[1], 1e-6, 1e-6)


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("agg", AGG_MODES)
def test_actor_loss_all_terms(backend_device, agg):
    backend, device = backend_device
    lp, old, adv, m, ent, ref, isw = batch(device=device)
    check_against_reference(backend, device, lp, old, adv, m, entropy=ent, ref_log_prob=ref, entropy_coeff=0.01,
                            kl_coef=0.05, kl_kind="low_var_kl", is_weights=isw, agg=agg, clip_low=0.2, clip_high=0.28)


@pytest.mark.parametrize("kind", KL_ALL)
def test_actor_loss_kl_kinds(backend_device, kind):
    backend, device = backend_device
    lp, old, adv, m, ent, ref, _ = batch(4, 29, device=device)
    check_against_reference(backend, device, lp, old, adv, m, ref_log_prob=ref, kl_coef=0.3, kl_kind=kind)


@pytest.mark.parametrize("clip_c", [None, 3.0, 1.5])
def test_policy_loss_dual_clip(backend_device, clip_c):
    backend, device = backend_device
    lp, old, adv, m, *_ = batch(5, 40, device=device, spread=1.5)  # many tokens beyond the clip range
    ours = check_against_reference(backend, device, lp, old, adv, m, clip_c=clip_c)
    lower = ours[1]["pg_clipfrac_lower"]
    assert (lower == 0) if clip_c is None else (lower > 0)


def test_policy_loss_huge_log_ratios_and_ties(backend_device):
    backend, device = backend_device
    lp, old, adv, m, *_ = batch(4, 12, device=device)
    m[:] = 1
    lp[0, :6] = torch.tensor([20.0, 25.0, -20.0, -30.0, 1e4, -1e4], dtype=lp.dtype)  # the +-20 clamp and past it
    old[0, :6] = 0.0
    adv[1, :4] = 0.0  # L1 == L2 == 0 for any ratio
    lp[2, :3], old[2, :3], adv[2, :3] = 0.75, 0.25, -1.0  # ratio = e^0.5: M == L3 when clip_c = e^0.5
    lp[3, :2], old[3, :2] = old[3, :2], old[3, :2]  # ratio exactly 1
    check_against_reference(backend, device, lp, old, adv, m, clip_c=math.exp(0.5))


def test_actor_loss_dp_and_global_counts(backend_device):
    backend, device = backend_device
    lp, old, adv, m, ent, ref, isw = batch(device=device)
    for agg in AGG_MODES:
        check_against_reference(backend, device, lp, old, adv, m, entropy=ent, entropy_coeff=0.1, agg=agg,
                                dp_size=4, batch_num_tokens=321, global_batch_size=17, loss_scale_factor=64)


def test_actor_loss_all_masked_is_nan_like_verl(backend_device):
    backend, device = backend_device
    lp, old, adv, m, *_ = batch(3, 9, device=device)
    m[:] = 0
    loss, metrics, grad, _ = run_actor(lambda *a, **k: rlhfkern.actor_loss(*a, backend=backend, **k), lp, old, adv, m)
    assert loss.isnan()  # 0 / 0 tokens, as verl
    assert metrics["pg_clipfrac"] == 0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_actor_loss_low_precision_inputs(backend_device, dtype):
    backend, device = backend_device
    lp, old, adv, m, ent, ref, isw = batch(5, 64, dtype, device, mask_dtype=torch.bool)
    ours = run_actor(lambda *a, **k: rlhfkern.actor_loss(*a, backend=backend, **k), lp, old, adv, m, entropy=ent,
                     ref_log_prob=ref, entropy_coeff=0.01, kl_coef=0.1, is_weights=isw)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype
    # the reference on the same values, upcast exactly
    up = [x.cpu().double() for x in (lp, old, adv, m, ent, ref, isw)]
    ref_out = run_actor(actor_loss_reference, *up[:4], entropy=up[4], ref_log_prob=up[5], entropy_coeff=0.01,
                        kl_coef=0.1, is_weights=up[6])
    close(ours[0], ref_out[0], 1e-5, 1e-5)
    close(ours[2].float(), ref_out[2], 1e-2 if dtype != torch.float32 else 1e-5, 1e-5)


def test_actor_loss_non_contiguous(backend_device):
    backend, device = backend_device
    lp, old, adv, m, ent, ref, isw = batch(6, 40, device=device)
    t = lambda x: x.t().contiguous().t()  # noqa: E731  column-major
    s = lambda x: torch.cat([x, x], 1)[:, ::2]  # noqa: E731  strided along T
    check_against_reference(backend, device, t(lp), s(old), t(adv), s(m), entropy=s(ent), ref_log_prob=t(ref),
                            is_weights=s(isw), entropy_coeff=0.1, kl_coef=0.1)


def test_ppo_loss_is_actor_loss_without_extra_terms(backend_device):
    backend, device = backend_device
    lp, old, adv, m, _, _, isw = batch(device=device)
    loss, metrics = rlhfkern.ppo_loss(lp, old, adv, m, is_weights=isw, agg="seq-mean-token-sum", backend=backend)
    ref_loss, ref_metrics = actor_loss_reference(lp.cpu(), old.cpu(), adv.cpu(), m.cpu(), is_weights=isw.cpu(),
                                                 agg="seq-mean-token-sum")
    assert set(metrics) == {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"}
    close(loss, ref_loss, 1e-10, 1e-10)
    for name in metrics:
        close(metrics[name], ref_metrics[name], 1e-10, 1e-10)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_loss(backend_device, agg):
    backend, device = backend_device
    v, ret, oldv = (torch.randn(6, 33, dtype=torch.float64) for _ in range(3))
    oldv[2, :4] = v[2, :4] - 0.5  # exactly at the lower clip bound: min/max ties
    oldv[3, :4] = v[3, :4] + 0.5
    ret[4, :4] = v[4, :4]  # zero error
    _, _, _, m, *_ = batch(6, 33)
    a = v.clone().to(device).requires_grad_()
    loss, clipfrac = rlhfkern.value_loss(a, ret.to(device), oldv.to(device), m.to(device), clip=0.5, agg=agg,
                                         backend=backend)
    b = v.clone().requires_grad_()
    e_loss, e_clipfrac = value_loss_reference(b, ret, oldv, m, clip=0.5, agg=agg)
    close(loss, e_loss, 1e-10, 1e-10)
    close(clipfrac, e_clipfrac, 1e-10, 1e-10)
    close(torch.autograd.grad(loss, a)[0], torch.autograd.grad(e_loss, b)[0], 1e-10, 1e-10)


@pytest.mark.parametrize("kind", KL_ALL)
def test_kl_penalty(backend_device, kind):
    backend, device = backend_device
    lp, _, _, _, _, ref, _ = batch(5, 31)
    ref[0, :4] = lp[0, :4] + torch.tensor([25.0, -25.0, 0.0, 1e-12], dtype=lp.dtype)  # clamps and a zero difference
    a, b = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = rlhfkern.kl_penalty(a.to(device), b.to(device), kind, backend=backend)
    c, d = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    expected = kl_penalty_reference(c, d, kind)
    close(out, expected, 1e-12, 1e-12)
    w = torch.randn_like(expected)
    ga = torch.autograd.grad((out.cpu() * w).sum(), [a, b])
    gb = torch.autograd.grad((expected * w).sum(), [c, d])
    close(ga[0], gb[0], 1e-12, 1e-12)
    close(ga[1], gb[1], 1e-12, 1e-12)


def test_custom_ops_pass_opcheck(backend_device):
    backend, device = backend_device
    lp, old, adv, m, ent, ref, isw = batch(3, 16, torch.float32, device)
    args = (lp.requires_grad_(), old, adv, m, isw, ent.requires_grad_(), ref, 0.2, 0.28, 3.0, 3, 0.01, 0.1,
            "token-mean", 1, None, None, None, backend)
    torch.library.opcheck(torch.ops.rlhfkern.actor_loss, args)
    torch.library.opcheck(torch.ops.rlhfkern.kl_penalty, (lp, ref.requires_grad_(), 7, backend))
    torch.library.opcheck(torch.ops.rlhfkern.value_loss,
                          (lp, old, adv, m, 0.2, "seq-mean-token-mean", 1, None, None, None, backend))


def test_torch_compile_fullgraph_forward_backward(backend_device):
    backend, device = backend_device
    torch._dynamo.reset()
    lp, old, adv, m, ent, ref, isw = batch(4, 24, torch.float32, device)

    def step(lp_, ent_):
        loss, metrics = rlhfkern.actor_loss(lp_, old, adv, m, entropy=ent_, ref_log_prob=ref, entropy_coeff=0.01,
                                            kl_coef=0.1, is_weights=isw, backend=backend)
        return loss, metrics["pg_clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, frac = compiled(a, b)
    loss.backward()
    c, d = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    e_loss, e_frac = step(c, d)
    e_loss.backward()
    close(loss, e_loss, 1e-6, 1e-6)
    close(frac, e_frac, 0, 0)
    close(a.grad, c.grad, 1e-6, 1e-6)
    close(b.grad, d.grad, 1e-6, 1e-6)


# ----------------------------------------------------------------------------- verl drop-ins
@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_policy_losses_match_verl(monkeypatch, backend_device):
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos
    need("verl", extra="test")
    from verl.workers.config import ActorConfig

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    lp, old, adv, m, ent, ref, isw = batch(8, 45, torch.float32, spread=1.0)
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    to = lambda x: x.to(device)  # noqa: E731
    for agg in AGG_MODES:
        for batch_info in ({}, dict(dp_size=2, batch_num_tokens=400, global_batch_size=16, loss_scale_factor=100)):
            config.global_batch_info.clear()
            config.global_batch_info.update(batch_info)
            a, b = lp.clone().requires_grad_(), to(lp).requires_grad_()
            theirs = core_algos.compute_policy_loss_vanilla(old, a, adv, m, agg, config, isw)
            ours = compat_verl.compute_policy_loss_vanilla(to(old), b, to(adv), to(m), agg, config, to(isw))
            close(ours[0], theirs[0], 1e-5, 1e-6)
            assert ours[1].keys() == theirs[1].keys()
            for k in theirs[1]:
                assert ours[1][k] == pytest.approx(theirs[1][k], rel=1e-5, abs=1e-6), k
            close(torch.autograd.grad(ours[0], b)[0], torch.autograd.grad(theirs[0], a)[0], 1e-5, 1e-7)
    theirs = core_algos.compute_policy_loss(old, lp, adv, m, 0.2, None, 0.3, 2.0, "token-mean")
    ours = compat_verl.compute_policy_loss(to(old), to(lp), to(adv), to(m), 0.2, None, 0.3, 2.0, "token-mean")
    for x, y in zip(ours, theirs):
        close(x, y, 1e-5, 1e-6)
    for kind in KL_ALL:
        close(compat_verl.kl_penalty(to(lp), to(ref), kind), core_algos.kl_penalty(lp, ref, kind), 1e-5, 1e-6)
    v, ret, oldv = (torch.randn(8, 45) for _ in range(3))
    theirs = core_algos.compute_value_loss(v, ret, oldv, m, 0.2, "seq-mean-token-mean", 2, None, 16)
    ours = compat_verl.compute_value_loss(to(v), to(ret), to(oldv), to(m), 0.2, "seq-mean-token-mean", 2, None, 16)
    close(ours[0], theirs[0], 1e-5, 1e-6)
    close(ours[1], theirs[1], 1e-5, 1e-6)
    close(compat_verl.agg_loss(v, m, "seq-mean-token-sum-norm"), core_algos.agg_loss(v, m, "seq-mean-token-sum-norm"),
          1e-6, 1e-6)
    with pytest.raises(NotImplementedError):
        compat_verl.kl_penalty(lp, ref, "full")


# the global-batch arguments verl's losses take (FSDP/Megatron data parallelism): none, dp with the
# global counts, and with a fixed seq-mean-token-sum-norm scale
VERL_GLOBAL = ({}, dict(dp_size=2, batch_num_tokens=400, global_batch_size=16),
               dict(dp_size=4, batch_num_tokens=150.0, global_batch_size=6, loss_scale_factor=100))


@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_agg_and_value_loss_every_mode_match_verl(monkeypatch, backend_device):
    """agg_loss and compute_value_loss against verl 0.9.1 on the same inputs, every aggregation mode
    with and without the global-batch arguments: the loss, the clip fraction and the gradient. verl's
    own CPU tests of these (loss aggregation, value-loss normalisation) mostly compare calls with one
    another and pass whatever the values (tests/tier_peers/REACH.md: 13 of them pass with outputs
    x*1.5+0.25); this pins the values."""
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    _, _, _, m, _, _, _ = batch(8, 45, torch.float32)
    loss_mat, v, ret, oldv = (torch.randn(8, 45) for _ in range(4))
    v = oldv + torch.randn(8, 45) * 0.3  # some clipped at 0.2, some not
    to = lambda x: x.to(device)  # noqa: E731
    for agg in AGG_MODES:
        for kw in VERL_GLOBAL:
            what = f"{agg} {kw}"
            a, b = loss_mat.clone().requires_grad_(), to(loss_mat).requires_grad_()
            theirs, ours = core_algos.agg_loss(a, m, agg, **kw), compat_verl.agg_loss(b, to(m), agg, **kw)
            close(ours, theirs, 1e-5, 1e-6)
            close(torch.autograd.grad(ours, b)[0], torch.autograd.grad(theirs, a)[0], 1e-5, 1e-8)
            for clip in (0.2, 0.05):
                a, b = v.clone().requires_grad_(), to(v).requires_grad_()
                theirs = core_algos.compute_value_loss(a, ret, oldv, m, clip, agg, **kw)
                ours = compat_verl.compute_value_loss(b, to(ret), to(oldv), to(m), clip, agg, **kw)
                assert 0 < theirs[1].item() < 1, f"{what}: the inputs should clip some tokens, not all"
                close(ours[0], theirs[0], 1e-5, 1e-6)
                close(ours[1], theirs[1], 1e-6, 1e-7)
                close(torch.autograd.grad(ours[0], b)[0], torch.autograd.grad(theirs[0], a)[0], 1e-5, 1e-8)


@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_kl_penalty_values_and_gradients_match_verl(monkeypatch, backend_device):
    """kl_penalty, every kind and its "+" straight-through variant (the base kind's value, k2's
    gradient), against verl 0.9.1: values, and gradients w.r.t. logprob, including log-ratios past
    low_var_kl's clamp. verl's own tests of the "+" variants compare kl_penalty with itself (k3+
    against k3, its gradient against k2's) and pass whatever the values."""
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    lp, _, _, _, _, ref, _ = batch(6, 33, torch.float32, spread=1.0)
    ref[0, :4] = lp[0, :4] + torch.tensor([30.0, -30.0, 12.0, -12.0])  # clamps of low_var_kl (+-10)
    w = torch.randn_like(lp)
    for kind in KL_ALL:
        a, b = lp.clone().requires_grad_(), lp.clone().to(device).requires_grad_()
        theirs, ours = core_algos.kl_penalty(a, ref, kind), compat_verl.kl_penalty(b, ref.to(device), kind)
        close(ours, theirs, 1e-5, 1e-6)
        grad = torch.autograd.grad((ours * w.to(device)).sum(), b)[0]
        close(grad, torch.autograd.grad((theirs * w).sum(), a)[0], 1e-5, 1e-6)
        if kind.endswith("+"):  # what the "+" means, on verl's own numbers: the base's value, k2's gradient
            a2 = lp.clone().requires_grad_()
            k2 = core_algos.kl_penalty(a2, ref, "k2")
            close(grad, torch.autograd.grad((k2 * w).sum(), a2)[0], 1e-5, 1e-6)
            close(ours, core_algos.kl_penalty(lp, ref, kind[:-1]), 1e-5, 1e-6)


@pytest.mark.parametrize("dtype", PEER_DTYPES, ids=str)
def test_compat_dtype_matches_verl_and_openrlhf(dtype):
    """The verl and OpenRLHF loss drop-ins return the peers' dtypes (the inputs' promoted with the
    mask's; seq-mean losses of half inputs float32; clip fractions float32) and, for fp16/bf16,
    are no farther from the peer on fp64 inputs than the peer's own (run with -s for every error).
    Measured max |error|, same-dtype mask, fp16 / bf16 (ours / the peer's): verl vanilla token-mean
    2.4e-6 / 5.1e-5, 3.0e-5 / 1.5e-4; seq-mean-token-mean 4.7e-9 / 7.1e-5, 9.1e-9 / 7.0e-5; value
    loss token-mean 4.1e-4 / 5.6e-4, 1.2e-4 / 7.7e-3; kl low_var_kl 2.4e-4 / 1.6e-3, 1.9e-3 /
    1.2e-2; OpenRLHF PolicyLoss 4.1e-8 / 4.0e-5, 3.1e-7 / 3.7e-4; ValueLoss(clip) 4.1e-4 / 5.6e-4,
    1.2e-4 / 7.7e-3. OpenRLHF's sample-level losses are nan in fp16 with an all-masked row (its
    1e-8 underflows: 0 / 0); ours are finite there."""
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    from rlhfkern.compat import openrlhf as compat_openrlhf

    loss_mod, _ = openrlhf_losses()
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    lp, old, adv, m, ent, ref, isw = batch(8, 45, torch.float64, spread=0.5)
    v, ret, oldv = (torch.randn(8, 45, dtype=torch.float64) for _ in range(3))
    wide = [lp, old, adv, ref, isw, v, ret, oldv]
    half = dtype in (torch.float16, torch.bfloat16)
    for mask in (m.to(dtype), m.float(), m.long()):
        def each(f, what):
            """f(module, tensors, mask) on the peer, ours, and the peer in fp64."""
            t = f(False, [x.to(dtype) for x in wide], mask)
            o = f(True, [x.to(dtype) for x in wide], mask)
            e = f(False, [x.to(dtype).double() for x in wide], mask.double())
            t, o, e = ((x,) if isinstance(x, torch.Tensor) else x for x in (t, o, e))
            for i, (oi, ti, ei) in enumerate(zip(o, t, e)):
                if isinstance(ti, torch.Tensor):
                    assert_like_peer(oi, ti, ei, f"{what}[{i}] {dtype} mask {mask.dtype}", by_error=half)
                else:
                    assert (oi is None) == (ti is None)

        verl = lambda ours: compat_verl if ours else core_algos  # noqa: E731
        for agg in AGG_MODES:
            each(lambda ours, x, mk: verl(ours).compute_policy_loss_vanilla(x[1], x[0], x[2], mk, agg, config)[0],
                 f"vanilla {agg}")
            each(lambda ours, x, mk: verl(ours).compute_value_loss(x[5], x[6], x[7], mk, 0.2, agg), f"value {agg}")
        each(lambda ours, x, mk: verl(ours).compute_policy_loss_vanilla(x[1], x[0], x[2], mk, "token-mean", config,
                                                                        x[4])[0], "vanilla is_weights")
        each(lambda ours, x, mk: verl(ours).compute_policy_loss(x[1], x[0], x[2], mk, 0.2, None, 0.3, 2.0),
             "compute_policy_loss")
        for kind in KL_ALL:
            if kind.rstrip("+") != "full":
                each(lambda ours, x, mk: verl(ours).kl_penalty(x[0], x[3], kind), f"kl {kind}")
        orl = lambda ours: compat_openrlhf if ours else loss_mod  # noqa: E731
        for kw in (dict(), dict(token_level_loss=False), dict(is_correction_level="token", is_correction_mode="clip")):
            each(lambda ours, x, mk: orl(ours).PolicyLoss(**kw)(x[0], x[1], x[2], mk, x[3]), f"PolicyLoss {kw}")
        for kw in (dict(), dict(clip_eps=0.2), dict(clip_eps=0.2, token_level_loss=False)):
            each(lambda ours, x, mk: orl(ours).ValueLoss(**kw)(x[5], x[7], x[6], mk), f"ValueLoss {kw}")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_input_names_the_argument(backend):
    lp, old, adv, m, ent, ref, isw = batch(3, 8)
    cases = [
        (dict(old_log_prob=old[:, :5]), "old_log_prob has shape"),
        (dict(advantages=adv[:2]), "advantages has shape"),
        (dict(mask=m[:, :7]), "mask has shape"),
        (dict(entropy=ent[:, :3]), "entropy has shape"),
        (dict(ref_log_prob=ref.to("meta")), "ref_log_prob is on meta"),
        (dict(is_weights=isw.long()), "is_weights must be a floating tensor"),
        (dict(log_prob=lp.long()), "log_prob must be a floating tensor"),
        (dict(agg="mean"), "unknown agg 'mean'"),
        (dict(kl_kind="k4", ref_log_prob=ref), "unknown kl kind 'k4'"),
        (dict(clip_c=1.0), "clip_c must be > 1.0"),
        (dict(clip_low=-0.1), "clip_low must be a non-negative number"),
        (dict(dp_size=2), "batch_num_tokens is required when dp_size > 1"),
        (dict(dp_size=2, agg="seq-mean-token-mean"), "global_batch_size is required when dp_size > 1"),
        (dict(dp_size=0), "dp_size must be a positive integer"),
    ]
    for override, message in cases:
        args = dict(log_prob=lp, old_log_prob=old, advantages=adv, mask=m) | override
        with pytest.raises(ValueError, match=message):
            rlhfkern.actor_loss(args.pop("log_prob"), args.pop("old_log_prob"), args.pop("advantages"),
                                args.pop("mask"), backend=backend, **args)
    with pytest.raises(ValueError, match="returns has shape"):
        rlhfkern.value_loss(lp, old[:, :3], adv, m, backend=backend)
    with pytest.raises(ValueError, match="clip must be a non-negative number"):
        rlhfkern.value_loss(lp, old, adv, m, clip=-1, backend=backend)
    with pytest.raises(ValueError, match="unknown kl kind"):
        rlhfkern.kl_penalty(lp, ref, "kl2", backend=backend)
    with pytest.raises(ValueError, match="not available for this op"):
        rlhfkern.actor_loss(lp, old, adv, m, backend="cuda")


def test_environment_backend_the_op_lacks_means_auto(monkeypatch):
    lp, old, adv, m, *_ = batch(3, 8)
    monkeypatch.setenv("RLHFKERN_BACKEND", "cuda")  # the loss family has no CUDA kernel
    loss, _ = rlhfkern.actor_loss(lp, old, adv, m)
    close(loss, actor_loss_reference(lp, old, adv, m)[0], 1e-12, 1e-12)


# ----------------------------------------------------------------------------- OpenRLHF drop-ins
OPENRLHF_POLICY_CASES = [
    dict(),
    dict(dual_clip=3.0, clip_eps_high=0.28),
    dict(token_level_loss=False),
    dict(is_correction_level="token", is_correction_mode="clip"),
    dict(is_correction_level="seq", is_correction_threshold=(0.5, 2.0)),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.3)),
]


@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("case", range(len(OPENRLHF_POLICY_CASES)))
def test_compat_openrlhf_policy_loss_matches_openrlhf(monkeypatch, backend_device, case):
    from rlhfkern.compat import openrlhf as compat_openrlhf

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    loss_mod, _ = openrlhf_losses()
    kw = OPENRLHF_POLICY_CASES[case]
    lp, old, adv, m, _, rollout, _ = batch(8, 40, torch.float32, spread=0.8)
    rollout = old + (rollout - lp) * 0.3
    for extra in ({}, dict(dp_size=2, batch_num_tokens=300.0, global_batch_size=12.0)):
        a, b = lp.clone().requires_grad_(), lp.clone().to(device).requires_grad_()
        theirs = loss_mod.PolicyLoss(**kw)(a, old, adv, m, rollout, **extra)
        ours = compat_openrlhf.PolicyLoss(**kw)(b, old.to(device), adv.to(device), m.to(device), rollout.to(device),
                                                **extra)
        for x, y in zip(ours, theirs):
            assert (x is None) == (y is None)
            if x is not None:
                close(x, y, 1e-5, 1e-6)
        close(torch.autograd.grad(ours[0], b)[0], torch.autograd.grad(theirs[0], a)[0], 1e-5, 1e-7)


@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_openrlhf_value_loss_and_kl_match_openrlhf(monkeypatch, backend_device):
    from rlhfkern.compat import openrlhf as compat_openrlhf

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    loss_mod, utils = openrlhf_losses()
    v, oldv, ret = (torch.randn(6, 30) for _ in range(3))
    _, _, _, m, _, _, _ = batch(6, 30, torch.float32)
    for kw in (dict(), dict(clip_eps=0.2), dict(clip_eps=0.2, token_level_loss=False)):
        for extra in ({}, dict(dp_size=4, batch_num_tokens=100.0, global_batch_size=10.0)):
            a, b = v.clone().requires_grad_(), v.clone().to(device).requires_grad_()
            theirs = loss_mod.ValueLoss(**kw)(a, oldv, ret, m, **extra)
            ours = compat_openrlhf.ValueLoss(**kw)(b, oldv.to(device), ret.to(device), m.to(device), **extra)
            close(ours, theirs, 1e-5, 1e-6)
            close(torch.autograd.grad(ours, b)[0], torch.autograd.grad(theirs, a)[0], 1e-5, 1e-7)
    lp, old, _, _, _, ref, _ = batch(4, 25, torch.float32)
    ref[0, :3] = lp[0, :3] + torch.tensor([30.0, -30.0, 0.0])
    for est in ("k1", "k2", "k3"):
        for unbiased in (False, True):
            a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
            theirs = utils.compute_approx_kl(a, ref, old, est, unbiased)
            ours = compat_openrlhf.compute_approx_kl(b, ref, old, est, unbiased)
            close(ours, theirs, 1e-6, 1e-6)
            w = torch.randn_like(ours)
            close(torch.autograd.grad((ours * w).sum(), b)[0], torch.autograd.grad((theirs * w).sum(), a)[0], 1e-6, 1e-6)


def test_compat_openrlhf_kl_and_icepop_edge_cases_match_openrlhf():
    """OpenRLHF 0.11.2 against the drop-ins where its own tests check no value (they pass with
    outputs x*1.5+0.25, tests/tier_peers/REACH.md): compute_approx_kl's unbiased gradient without
    old log-probs (weight 1) and with them (weight clipped), at log-ratios past its clamps; PolicyLoss
    with token-level IS correction (icepop) where a ratio overflows float32 (a rollout log-prob of
    -1000), and its data-parallel token-mean against the whole batch; values, metrics, gradients."""
    from rlhfkern.compat import openrlhf as compat_openrlhf

    loss_mod, utils = openrlhf_losses()
    lp, old, _, _, _, ref, _ = batch(4, 25, torch.float32)
    ref[0, :4] = lp[0, :4] + torch.tensor([30.0, -30.0, 11.0, -11.0])
    old[1, :2] = lp[1, :2] + torch.tensor([-20.0, 20.0])  # an importance weight past KL_IS_WEIGHT_CLIP
    w = torch.randn_like(lp)
    for est in ("k1", "k2", "k3"):
        for unbiased, log_probs_old in ((True, None), (True, old), (False, None)):
            a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
            theirs = utils.compute_approx_kl(a, ref, log_probs_old, est, unbiased)
            ours = compat_openrlhf.compute_approx_kl(b, ref, log_probs_old, est, unbiased)
            close(ours, theirs, 1e-6, 1e-6)
            close(torch.autograd.grad((ours * w).sum(), b)[0], torch.autograd.grad((theirs * w).sum(), a)[0], 1e-6, 1e-6)
    lp, old, adv, m, _, rollout, _ = batch(6, 20, torch.float32, spread=0.5)
    rollout[2, :3] = -1000.0  # exp(old - rollout) overflows float32
    rollout[3, 5] = 1000.0
    for kw in (dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=[0.5, 5.0]),
               dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=[0.5, 5.0]),
               dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=[0.5, 5.0])):
        a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        theirs = loss_mod.PolicyLoss(**kw)(a, old, adv, m, rollout)
        ours = compat_openrlhf.PolicyLoss(**kw)(b, old, adv, m, rollout)
        for i, (x, y) in enumerate(zip(ours, theirs)):
            assert (x is None) == (y is None), (kw, i)
            if x is not None:
                assert torch.isfinite(x).all(), (kw, i)
                close(x, y, 1e-5, 1e-6)
        g_ours, g_theirs = torch.autograd.grad(ours[0], b)[0], torch.autograd.grad(theirs[0], a)[0]
        assert torch.isfinite(g_ours).all(), kw
        close(g_ours, g_theirs, 1e-5, 1e-7)
    # data-parallel token-mean: rank shards with the global token count, and the whole batch, as OpenRLHF
    n = m.sum()
    for rows in (slice(0, 3), slice(3, 6), slice(0, 6)):
        kw = dict(dp_size=2, batch_num_tokens=n) if rows != slice(0, 6) else {}
        theirs = loss_mod.PolicyLoss()(lp[rows], old[rows], adv[rows], m[rows], **kw)
        ours = compat_openrlhf.PolicyLoss()(lp[rows], old[rows], adv[rows], m[rows], **kw)
        close(ours[0], theirs[0], 1e-5, 1e-6)


# ----------------------------------------------------------------------------- CPU builds
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64, torch.uint8, torch.int32, torch.bfloat16])
def test_cpu_float32_every_mask_dtype(mask_dtype):
    """float32 inputs run the AVX2 build (float/bool/uint8/int64 masks, where the processor has
    it) or the SSE build (other masks): both against the reference, with a row tail (T % 8 != 0)."""
    lp, old, adv, m, ent, ref, isw = batch(6, 45, torch.float32, mask_dtype=mask_dtype)
    up = [x.double() for x in (lp, old, adv, m, ent, ref, isw)]
    kw = dict(entropy_coeff=0.01, kl_coef=0.1, clip_c=3.0, agg="seq-mean-token-mean")
    ours = run_actor(lambda *a, **k: rlhfkern.actor_loss(*a, backend="cpu", **k), lp, old, adv, m, entropy=ent,
                     ref_log_prob=ref, is_weights=isw, **kw)
    expected = run_actor(actor_loss_reference, *up[:4], entropy=up[4], ref_log_prob=up[5], is_weights=up[6], **kw)
    for a, b in zip(ours[:1] + ours[2:], expected[:1] + expected[2:]):
        close(a, b, 2e-5, 2e-6)
    for name in expected[1]:
        close(ours[1][name], expected[1][name], 2e-5, 2e-6)


def test_cpu_sse_build_matches_the_reference_too():
    """The baseline (SSE) build of the float32 row loops (run_sse_build)."""
    run_sse_build(
        "import torch, rlhfkern\n"
        "from rlhfkern.ops.ppo_loss import actor_loss_reference\n"
        "torch.manual_seed(0)\n"
        "B, T = 5, 43\n"
        "lp = (torch.randn(B, T) * 0.5 - 1).requires_grad_(); old = lp.detach() + torch.randn(B, T) * 0.5\n"
        "adv = torch.randn(B, T); ref = lp.detach() + torch.randn(B, T); m = torch.rand(B, T) > 0.3\n"
        "kw = dict(ref_log_prob=ref, kl_coef=0.1, kl_kind='k3')\n"
        "a, _ = rlhfkern.actor_loss(lp, old, adv, m, backend='cpu', **kw); ga, = torch.autograd.grad(a, lp)\n"
        "b, _ = actor_loss_reference(lp.double(), old.double(), adv.double(), m.double(), ref_log_prob=ref.double(),"
        " kl_coef=0.1, kl_kind='k3'); gb, = torch.autograd.grad(b, lp)\n"
        "torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6)\n"
        "torch.testing.assert_close(ga.double(), gb.double(), rtol=2e-5, atol=2e-6)\n"
        "print('ok')\n"
    )


def test_actor_loss_mixed_dtypes(backend_device):
    backend, device = backend_device
    lp, old, adv, m, ent, ref, isw = batch(4, 33, torch.float32, device)
    lp16 = lp.to(torch.bfloat16)
    a = lp16.clone().requires_grad_()
    loss, _ = rlhfkern.actor_loss(a, old, adv, m, ref_log_prob=ref, kl_coef=0.1, is_weights=isw.double(),
                                  backend=backend)
    grad, = torch.autograd.grad(loss, a)
    assert loss.dtype == torch.float64 and grad.dtype == torch.bfloat16  # promoted, cast back for autograd
    b = lp16.double().cpu().requires_grad_()
    e_loss, _ = actor_loss_reference(b, old.cpu().double(), adv.cpu().double(), m.cpu(), ref_log_prob=ref.cpu().double(),
                                     kl_coef=0.1, is_weights=isw.cpu().double())
    close(loss, e_loss, 1e-10, 1e-10)
    close(grad.double(), torch.autograd.grad(e_loss, b)[0].to(torch.bfloat16).double(), 1e-2, 1e-6)


@pytest.mark.skipif("cpu" not in rlhfkern.backends(), reason="the CPU backend is not built")
def test_cpu_bitwise_across_thread_counts():
    """Actor and value loss on the CPU backend: one thread and two give the same bits (loss,
    metrics, gradients) for a shape split into several tasks (4 of 8 rows at T = 4096)."""
    torch.manual_seed(0)
    lp, old, adv, m, ent, ref, isw = batch(32, 4096, dtype=torch.float32)

    def run():
        loss, metrics, g_lp, g_ent = run_actor(
            lambda *a, **k: rlhfkern.actor_loss(*a, backend="cpu", **k), lp, old, adv, m, entropy=ent,
            ref_log_prob=ref, entropy_coeff=0.01, kl_coef=0.05, is_weights=isw)
        v = lp.detach().clone().requires_grad_()
        vloss, clipfrac = rlhfkern.value_loss(v, adv, old, m, clip=0.2, backend="cpu")
        (g_v,) = torch.autograd.grad(vloss, [v])
        return [loss, g_lp, g_ent, vloss, clipfrac, g_v] + [metrics[k] for k in sorted(metrics)]

    for a, b in zip(at_threads(1, run), at_threads(2, run)):
        assert torch.equal(a, b)
