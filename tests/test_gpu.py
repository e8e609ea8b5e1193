"""GPU checks at the sizes where GPU code paths differ: every GPU backend of each family (Triton;
CUDA where the family has a kernel) against the torch reference computed in float64 on the same
inputs, on CUDA tensors, with bf16 inputs and the backward; and no host sync inside the ops
(DESIGN.md: "No hidden host syncs"). Skipped without CUDA: the per-family tests
(test_<family>.py) run every backend, on CUDA tensors too, at small shapes; these add long rows
(several chunks or blocks per row), the full 151936-entry vocabulary and bf16 LM-head matmuls.

Errors are ||ours - ref|| / ||ref|| (METHOD.md): fp32 arithmetic lands far under 1e-5 here;
bf16 outputs (gradients w.r.t. bf16 inputs) carry bf16 rounding, ~4e-3.
"""

import contextlib

import pytest
import torch

import rlhfkern
from rlhfkern.ops import advantages as adv_ops
from rlhfkern.ops import gae as gae_ops
from rlhfkern.ops import logprob as lp_ops
from rlhfkern.ops import ppo_loss as pl_ops

DEVICE = "cuda"
GAE_BACKENDS = ["triton", "cuda"]  # the GAE family (GAE, whitening, advantages) has CUDA kernels
GPU_KINDS = ("triton", "cuda")
LOSS_BACKENDS = [b for b in pl_ops.OP_BACKENDS if b in GPU_KINDS]  # no CUDA kernel: Triton serves GPUs
LOGPROB_BACKENDS = [b for b in lp_ops.OP_BACKENDS if b in GPU_KINDS]
# sizes (module constants so that the same checks can be driven at small sizes)
GAE_SHAPE = (64, 8192)  # CUDA chunks of 2048, Triton chunks of 1024: several per row
VOCAB_ROWS, VOCAB = 48, 151936
LINEAR = (300, 1024, 151936)  # N (not a multiple of the 128-token tile), H, V
LOSS_SHAPE = (32, 5000)  # 5 blocks of 1024 tokens per row
ADV_SHAPE, GROUP = (1024, 512), 8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the per-family tests cover the CPU")

BF16_TOL = 1e-2


def rel_err(actual, expected):
    a = actual.detach().to(expected.device, torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite entries"
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def check(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.2e} (tolerance {tol:.0e})"


def tol_for(dtype):
    return BF16_TOL if dtype == torch.bfloat16 else 1e-5


@contextlib.contextmanager
def no_host_sync():
    """Any synchronising CUDA call inside raises (torch.cuda.set_sync_debug_mode)."""
    if torch.device(DEVICE).type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def gen(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)


def ragged_mask(B, T, g, holes=0.1):
    """Responses of different lengths with holes inside (multi-turn observation tokens)."""
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g, device=DEVICE)
    keep = torch.rand(B, T, generator=g, device=DEVICE) > holes
    return (torch.arange(T, device=DEVICE)[None] < lengths) & keep


# ----------------------------------------------------------------------------- GAE family
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_and_whiten_long_rows(backend, dtype):
    B, T = GAE_SHAPE
    g = gen(1)
    r, v, m = randn(B, T, g=g, dtype=dtype), randn(B, T, g=g, dtype=dtype), ragged_mask(B, T, g)
    adv, ret = rlhfkern.gae(r, v, m, 0.99, 0.95, backend=backend)
    e_adv, e_ret = gae_ops.gae_reference(r.double(), v.double(), m.double(), 0.99, 0.95)
    assert adv.dtype == ret.dtype == torch.float32 and adv.device.type == torch.device(DEVICE).type
    check(adv, e_adv, 1e-5, "advantages")
    check(ret, e_ret, 1e-5, "returns")
    white = rlhfkern.masked_whiten(adv, m, backend=backend)
    check(white, gae_ops.masked_whiten_reference(e_adv, m.double()), 1e-5, "whitened advantages")
    again, _ = rlhfkern.gae(r, v, m, 0.99, 0.95, backend=backend)
    assert torch.equal(adv, again), "two runs on the same inputs differ"


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_backends_agree(backend):
    """CUDA and Triton kernels against each other (both fp32 accumulation, different scan orders)."""
    B, T = GAE_SHAPE
    g = gen(2)
    r, v, m = randn(B, T, g=g), randn(B, T, g=g), ragged_mask(B, T, g)
    other = "triton" if backend == "cuda" else "cuda"
    if other not in GAE_BACKENDS:
        pytest.skip("one GPU backend only")
    ours = rlhfkern.gae(r, v, m, 1.0, 1.0, backend=backend)
    theirs = rlhfkern.gae(r, v, m, 1.0, 1.0, backend=other)
    for a, b in zip(ours, theirs):
        check(a, b.double(), 1e-5, f"{backend} vs {other}")


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_outcome_advantages(backend):
    B, T = ADV_SHAPE
    g = gen(3)
    m = ragged_mask(B, T, g, holes=0.0).float()
    rewards = torch.zeros(B, T, device=DEVICE)
    last = (m.sum(1).long() - 1).clamp_min(0)
    rewards[torch.arange(B, device=DEVICE), last] = randn(B, g=g)
    index = torch.arange(B, device=DEVICE) // GROUP
    rc, mc, ic = rewards.cpu().double(), m.cpu().double(), index.cpu()
    check(rlhfkern.grpo_advantage(rewards, m, index, backend=backend), adv_ops.grpo_reference(rc, mc, ic), 1e-5, "grpo")
    check(rlhfkern.rloo_advantage(rewards, m, index, backend=backend), adv_ops.rloo_reference(rc, mc, ic), 1e-5, "rloo")
    check(rlhfkern.reinforce_pp_baseline_advantage(rewards, m, index, backend=backend),
          adv_ops.reinforce_pp_baseline_reference(rc, mc, ic), 1e-5, "reinforce++-baseline")
    adv, ret = rlhfkern.reinforce_pp_advantage(rewards, m, 0.99, backend=backend)
    e_adv, e_ret = adv_ops.reinforce_pp_reference(rc, mc, 0.99)
    check(adv, e_adv, 1e-5, "reinforce++ advantages")
    check(ret, e_ret, 1e-5, "reinforce++ returns")


# ----------------------------------------------------------------------------- log-probs
def _logprob_run(fn, x, labels, g_lp, g_ent, **kw):
    x = x.detach().clone().requires_grad_()
    lp, ent = fn(x, labels, return_entropy=True, **kw)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp, ent, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_logprobs_full_vocabulary(backend, dtype):
    N, V = VOCAB_ROWS, VOCAB
    g = gen(4)
    x = randn(N, V, g=g, dtype=dtype, scale=3.0)
    labels = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    labels[3] = lp_ops.IGNORE_INDEX
    g_lp, g_ent = randn(N, g=g), randn(N, g=g)
    lp, ent, grad = _logprob_run(lambda *a, **k: rlhfkern.logprobs(*a, backend=backend, **k), x, labels, g_lp, g_ent,
                                 temperature=0.9)
    e_lp, e_ent, e_grad = _logprob_run(lambda t, lab, **k: lp_ops.logprobs_reference(t, lab, 0.9, True), x.double(),
                                       labels, g_lp.double(), g_ent.double())
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    check(lp, e_lp, 1e-5, "log-probs")
    check(ent, e_ent, 1e-5, "entropy")
    check(grad, e_grad, tol_for(dtype), "d logits")
    # the gradient written into the logits buffer: the same kernel, the same bits
    grads = []
    for inplace in (False, True):
        leaf = x.detach().clone().requires_grad_()
        logits = leaf * 1  # a non-leaf buffer, as a model's output
        lp2 = rlhfkern.logprobs(logits, labels, temperature=0.9, inplace_backward=inplace, backend=backend)
        (lp2 * g_lp).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1]), "inplace_backward differs from the out-of-place backward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_linear_logprobs_lm_head(backend, dtype):
    N, H, V = LINEAR
    g = gen(5)
    h, w = randn(N, H, g=g, dtype=dtype), randn(V, H, g=g, dtype=dtype, scale=0.05)
    labels = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    g_lp, g_ent = randn(N, g=g), randn(N, g=g)

    def run(fn, h, w, g_lp, g_ent):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        lp, ent = fn(h, w)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp, ent, h.grad, w.grad

    ours = run(lambda a, b: rlhfkern.linear_logprobs(a, b, labels, return_entropy=True, backend=backend), h, w, g_lp, g_ent)
    ref = run(lambda a, b: lp_ops.linear_logprobs_reference(a, b, labels, 1.0, True), h.double(), w.double(),
              g_lp.double(), g_ent.double())
    # bf16: the logits tiles are bf16 matmul outputs (as materialised bf16 logits are)
    tol = 1e-3 if dtype == torch.bfloat16 else 1e-5
    for name, a, e in zip(("log-probs", "entropy"), ours[:2], ref[:2]):
        check(a, e, tol, name)
    check(ours[2], ref[2], tol_for(dtype) * 2, "d hidden")
    check(ours[3], ref[3], tol_for(dtype) * 2, "d weight")


# ----------------------------------------------------------------------------- losses
def _loss_inputs(dtype, seed):
    B, T = LOSS_SHAPE
    g = gen(seed)
    lp = randn(B, T, g=g, scale=0.5) - 1
    old = lp + randn(B, T, g=g, scale=0.3)
    ref = lp + randn(B, T, g=g, scale=0.3)
    adv = randn(B, T, g=g)
    ent = torch.rand(B, T, generator=g, device=DEVICE) * 3
    isw = torch.rand(B, T, generator=g, device=DEVICE) + 0.5
    m = ragged_mask(B, T, g)
    return [x.to(dtype) for x in (lp, old, adv)] + [m] + [x.to(dtype) for x in (ent, ref, isw)]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_actor_loss_multi_block_rows(backend, dtype, agg):
    lp, old, adv, m, ent, ref, isw = _loss_inputs(dtype, 6)

    def run(fn, lp, ent, *rest, **kw):
        lp, ent = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
        loss, metrics = fn(lp, *rest, entropy=ent, **kw)
        loss.backward()
        return loss, metrics, lp.grad, ent.grad

    kw = dict(entropy_coeff=0.01, kl_coef=0.1, kl_kind="low_var_kl", clip_c=3.0, agg=agg)
    ours = run(lambda *a, **k: rlhfkern.actor_loss(*a, backend=backend, **k), lp, ent, old, adv, m,
               ref_log_prob=ref, is_weights=isw, **kw)
    e = run(pl_ops.actor_loss_reference, lp.double(), ent.double(), old.double(), adv.double(), m,
            ref_log_prob=ref.double(), is_weights=isw.double(), **kw)
    check(ours[0], e[0], 1e-5, "loss")
    assert set(ours[1]) == set(e[1])
    for name in e[1]:  # fractions of tokens: one clip decision at a rounding boundary moves them ~1e-5
        check(ours[1][name], e[1][name], 1e-4, name)
    check(ours[2], e[2], tol_for(dtype), "d log_prob")
    check(ours[3], e[3], tol_for(dtype), "d entropy")
    again = run(lambda *a, **k: rlhfkern.actor_loss(*a, backend=backend, **k), lp, ent, old, adv, m,
                ref_log_prob=ref, is_weights=isw, **kw)
    assert torch.equal(ours[0], again[0]) and torch.equal(ours[2], again[2]), "two runs on the same inputs differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_value_loss_and_kl_multi_block_rows(backend, dtype):
    lp, old, adv, m, _, ref, _ = _loss_inputs(dtype, 7)
    v, ret, old_v = lp, adv, old  # any three [B, T] tensors

    def run(fn, v, *rest, **kw):
        v = v.detach().clone().requires_grad_()
        loss, clipfrac = fn(v, *rest, **kw)
        loss.backward()
        return loss, clipfrac, v.grad

    ours = run(lambda *a, **k: rlhfkern.value_loss(*a, backend=backend, **k), v, ret, old_v, m, clip=0.2)
    e = run(pl_ops.value_loss_reference, v.double(), ret.double(), old_v.double(), m, clip=0.2)
    check(ours[0], e[0], 1e-5, "value loss")
    check(ours[1], e[1], 1e-5, "value clipfrac")
    check(ours[2], e[2], tol_for(dtype), "d vpreds")
    for kind in ("kl", "abs", "mse", "low_var_kl", "low_var_kl+"):
        a = lp.detach().clone().requires_grad_()
        kl = rlhfkern.kl_penalty(a, ref, kind, backend=backend)
        kl.sum().backward()
        b = lp.detach().double().requires_grad_()
        e_kl = pl_ops.kl_penalty_reference(b, ref.double(), kind)
        e_kl.sum().backward()
        check(kl, e_kl, 1e-5, f"kl {kind}")
        check(a.grad, b.grad, tol_for(dtype), f"d kl {kind}")


# ----------------------------------------------------------------------------- no host syncs
def _gae_family(backend, guard):
    B, T = 8, 3000
    g = gen(8)
    r, v, m = randn(B, T, g=g), randn(B, T, g=g), ragged_mask(B, T, g)
    index = torch.arange(B, device=DEVICE) // 4
    with guard():
        rlhfkern.gae(r, v, m, 0.99, 0.95, whiten=True, backend=backend)
        rlhfkern.grpo_advantage(r, m, index, backend=backend)
        rlhfkern.reinforce_pp_advantage(r, m, 0.99, backend=backend)


def _loss_family(backend, guard):
    lp, old, adv, m, ent, ref, isw = _loss_inputs(torch.float32, 9)
    lp.requires_grad_()
    ent.requires_grad_()
    with guard():
        loss, _ = rlhfkern.actor_loss(lp, old, adv, m, entropy=ent, ref_log_prob=ref, entropy_coeff=0.01, kl_coef=0.1,
                                      is_weights=isw, backend=backend)
        loss.backward()
        rlhfkern.value_loss(lp, adv, old, m, backend=backend)
        rlhfkern.kl_penalty(lp, ref, "low_var_kl", backend=backend)


def _logprob_family(backend, guard):
    g = gen(10)
    x = randn(16, 50000, g=g).requires_grad_()
    labels = torch.randint(0, 50000, (16,), generator=g, device=DEVICE)
    with guard():
        lp, ent = rlhfkern.logprobs(x, labels, return_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()


SYNC_CASES = ([("gae-family", b, _gae_family) for b in GAE_BACKENDS]
              + [("losses", b, _loss_family) for b in LOSS_BACKENDS]
              + [("logprobs", b, _logprob_family) for b in LOGPROB_BACKENDS])


@pytest.mark.parametrize("family,backend,fn", SYNC_CASES, ids=[f"{f}-{b}" for f, b, _ in SYNC_CASES])
def test_no_host_sync(family, backend, fn):
    fn(backend, contextlib.nullcontext)  # warm-up: Triton compiles and loads its kernels
    fn(backend, no_host_sync)


# ----------------------------------------------------------------------------- verl drop-ins on CUDA
@contextlib.contextmanager
def verl_kernels():
    """verl 0.9.1's torch_functional (logprobs_from_logits, entropy_from_logits) and
    kernel.linear_cross_entropy modules. `import verl` needs its whole stack (Ray, tensordict,
    TransferQueue, ...), which the lent GPU image lacks; `make gpu-bundle` carries verl's own wheel,
    and these two files are then loaded under bare `verl` / `verl.utils` packages (verl's package
    __init__ not run), with empty stand-ins for tensordict and transformers where missing (imported by
    torch_functional.py for functions not used here). Removed from sys.modules on exit (verl's
    kernels import their siblings at call time: the calls stay inside)."""
    import importlib
    import importlib.util
    import os
    import sys
    import types

    try:
        import verl.utils.torch_functional as verl_F
        from verl.utils.kernel import linear_cross_entropy as verl_lce
        yield verl_F, verl_lce
        return
    except ImportError:
        for name in [n for n in sys.modules if n == "verl" or n.startswith("verl.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("verl")
    if spec is None or spec.origin is None:
        pytest.skip("verl is not installed (make gpu-bundle carries its wheel to the GPU machine)")
    root = os.path.dirname(spec.origin)
    added = []
    for name, path in (("verl", root), ("verl.utils", os.path.join(root, "utils"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    for name in ("tensordict", "transformers"):
        if importlib.util.find_spec(name) is None:
            stand_in = types.ModuleType(name)
            stand_in.TensorDict = stand_in.PreTrainedTokenizer = type("StandIn", (), {})
            sys.modules[name] = stand_in
            added.append(name)
    try:
        yield (importlib.import_module("verl.utils.torch_functional"),
               importlib.import_module("verl.utils.kernel.linear_cross_entropy"))
    finally:  # verl's modules and the stand-ins only (what they imported, torch and triton, stays)
        for name in [n for n in sys.modules if n == "verl" or n.startswith("verl.")] + added:
            del sys.modules[name]


def _verl_parity(device, linear_ce=True):
    """compat.verl's logprobs_from_logits / entropy_from_logits / linear_cross_entropy against verl's
    own on `device` (the rlhfkern kernels on one side, verl's code on the other: flash-attn's
    cross-entropy when installed, else torch, and verl's Triton linear-cross-entropy kernel), fp32 and
    bf16: values and gradients; each no farther from a float64 reference than verl's (plus the
    tolerance: on CUDA verl's fp32 matmuls may run in TF32)."""
    from rlhfkern.compat import verl as compat_verl

    def both(fn_ours, fn_theirs, fn_exact, inputs, grads):
        out = []
        for fn, xs in ((fn_ours, inputs), (fn_theirs, inputs), (fn_exact, [x.double() for x in inputs])):
            xs = [x.detach().clone().requires_grad_() for x in xs]
            ys = fn(*xs)
            ys = ys if isinstance(ys, tuple) else (ys,)
            sum(((y.double() * g.double()).sum() for y, g in zip(ys, grads)), torch.zeros((), device=device,
                                                                                         dtype=torch.float64)).backward()
            out.append(list(ys) + [x.grad for x in xs])
        return out

    def judge(ours, theirs, exact, what, tol):
        for i, (o, t, e) in enumerate(zip(ours, theirs, exact)):
            assert o.shape == t.shape, f"{what}[{i}]: shape {tuple(o.shape)} != verl's {tuple(t.shape)}"
            e_ours, e_theirs = rel_err(o, e), rel_err(t, e)
            assert e_ours <= e_theirs + tol, (f"{what}[{i}]: ours {e_ours:.2e} from float64, verl's {e_theirs:.2e} "
                                              f"(tolerance {tol:.0e})")
            assert rel_err(o, t.double()) < max(10 * tol, 2 * e_theirs), f"{what}[{i}]: ours and verl's differ"

    with verl_kernels() as (verl_F, verl_lce):
        g = torch.Generator(device).manual_seed(11)
        for dtype in (torch.float32, torch.bfloat16):
            tol = tol_for(dtype)
            N, V = 48, 32000
            x = (torch.randn(N, V, generator=g, device=device) * 3).to(dtype)
            labels = torch.randint(0, V, (N,), generator=g, device=device)
            g_lp = torch.randn(N, generator=g, device=device)
            res = both(lambda t: compat_verl.logprobs_from_logits(t * 1, labels, inplace_backward=False),
                       lambda t: verl_F.logprobs_from_logits(t * 1, labels, inplace_backward=False),
                       lambda t: torch.log_softmax(t, -1).gather(-1, labels[:, None])[:, 0], [x], [g_lp])
            judge(*res, f"logprobs_from_logits {dtype}", tol)
            res = both(compat_verl.entropy_from_logits, verl_F.entropy_from_logits,
                       lambda t: -(torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1), [x], [g_lp])
            judge(*res, f"entropy_from_logits {dtype}", tol)
            assert res[0][0].dtype == res[1][0].dtype, "entropy_from_logits: dtype"
            if not linear_ce:
                continue
            N, H, V = LINEAR
            h = torch.randn(N, H, generator=g, device=device).to(dtype)
            w = (torch.randn(V, H, generator=g, device=device) * 0.05).to(dtype)
            labels = torch.randint(0, V, (N,), generator=g, device=device)
            g_lp, g_ent = torch.randn(N, generator=g, device=device), torch.randn(N, generator=g, device=device)
            res = both(lambda a, b: compat_verl.linear_cross_entropy(a, b, labels, 0.8),
                       lambda a, b: verl_lce.linear_cross_entropy(a, b, labels, 0.8),
                       lambda a, b: lp_ops.linear_logprobs_reference(a, b, labels, 0.8, True), [h, w], [g_lp, g_ent])
            judge(*res, f"linear_cross_entropy {dtype}", 2 * tol if dtype == torch.bfloat16 else 1e-3)


def test_compat_verl_logprobs_entropy_linear_ce_match_verl_on_cuda():
    """verl's tests of these three functions need CUDA (verl's linear_cross_entropy is a CUDA Triton
    kernel), so no CPU peer test reaches them (tests/tier_peers/REACH.md): here, on the GPU, against
    verl 0.9.1's own functions. Skipped without CUDA (the CPU parity of the first two is
    test_logprob.py::test_compat_verl_matches_verl)."""
    _verl_parity(DEVICE)
