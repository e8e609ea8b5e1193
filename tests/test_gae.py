"""GAE family: every backend against the reference, the reference against an independent loop,
the verl drop-in against verl 0.9.1 itself, input validation, torch.compile tracing."""

import math

import pytest
import torch

import rlhfkern
from rlhfkern import _dispatch
from rlhfkern.compat import verl as compat_verl
from rlhfkern.ops.gae import gae_reference, masked_whiten_reference

from conftest import HAVE_TRITON, PEER_DTYPES, assert_like_peer, at_threads, compiled_backends, need


# ----------------------------------------------------------------------------- inputs
def adversarial_mask(B, T, dtype=torch.float32, p_hole=0.3):
    """Row 0 all masked out, row 1 a leading masked span, row 2 a trailing one, row 3 a single
    token, the rest random holes (kept only for the rows that exist)."""
    m = (torch.rand(B, T) > p_hole).float()
    if B > 0:
        m[0] = 0
    if B > 1:
        m[1, : T // 3] = 0
    if B > 2:
        m[2, T - T // 3:] = 0
    if B > 3:
        m[3] = 0
        m[3, T // 2] = 1
    if B == 1:
        m[0] = (torch.rand(T) > p_hole).float()
        m[0, 0] = 1
    return m.to(dtype)


def inputs(B, T, dtype=torch.float32, mask_dtype=torch.float32, device="cpu"):
    r = torch.randn(B, T, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, dtype=torch.float64).to(dtype)
    m = adversarial_mask(B, T, mask_dtype)
    return r.to(device), v.to(device), m.to(device)


def scalar_gae(r, v, m, gamma, lam):
    """Independent check of the reference: plain Python floats, one element at a time."""
    B, T = len(r), len(r[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        nv = g = 0.0
        for t in range(T - 1, -1, -1):
            if m[b][t] == 1.0:
                g = r[b][t] + gamma * nv - v[b][t] + gamma * lam * g
                nv = v[b][t]
            elif m[b][t] != 0.0:  # fractional mask: the blend
                g = m[b][t] * (r[b][t] + gamma * nv - v[b][t] + gamma * lam * g) + (1 - m[b][t]) * g
                nv = m[b][t] * v[b][t] + (1 - m[b][t]) * nv
            adv[b][t] = g
    return adv


def close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=rtol, atol=atol,
                               equal_nan=True)


# ----------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0)])
def test_reference_against_scalar_loop(gamma, lam):
    r, v, m = inputs(6, 23, torch.float64)
    m[5] = torch.rand(23, dtype=torch.float64) * (torch.rand(23) > 0.3)  # fractional weights too
    adv, ret = gae_reference(r, v, m, gamma, lam)
    expected = torch.tensor(scalar_gae(r.tolist(), v.tolist(), m.tolist(), gamma, lam), dtype=torch.float64)
    close(adv, expected, 1e-12, 1e-12)
    close(ret, expected + v, 1e-12, 1e-12)


def test_reference_semantics_by_hand():
    # one row: tokens 0, 2 are response tokens, token 1 an observation token (mask 0)
    r = torch.tensor([[1.0, 100.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 100.0, 0.25]], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    adv, ret = gae_reference(r, v, m, gamma, lam)
    a2 = 2.0 - 0.25                              # last token: nv = 0
    a1 = a2                                      # observation token carries the advantage
    a0 = 1.0 + gamma * 0.25 - 0.5 + gamma * lam * a2  # skips token 1's value and reward
    close(adv, torch.tensor([[a0, a1, a2]], dtype=torch.float64), 1e-15, 1e-15)
    close(ret, torch.tensor([[a0 + 0.5, a1 + 100.0, a2 + 0.25]], dtype=torch.float64), 1e-15, 1e-15)


def test_reference_whiten_matches_definition():
    x = torch.randn(4, 9, dtype=torch.float64)
    m = adversarial_mask(4, 9, torch.float64)
    sel = x[m != 0]
    expected = (x - sel.mean()) / torch.sqrt(sel.var(unbiased=True) + 1e-8)
    close(masked_whiten_reference(x, m), expected, 1e-7, 1e-9)  # (n + 1e-8) in verl's mean
    close(masked_whiten_reference(x, m, shift_mean=False), expected + sel.mean(), 1e-7, 1e-9)


# ----------------------------------------------------------------------------- backends
SHAPES = [(1, 1), (1, 17), (5, 1), (7, 33), (4, 1000), (3, 2049)]


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_backend_float64(backend_device, B, T, gamma, lam):
    backend, device = backend_device
    r, v, m = inputs(B, T, torch.float64, torch.float64, device)
    adv, ret = rlhfkern.gae(r, v, m, gamma, lam, backend=backend)
    e_adv, e_ret = gae_reference(r.cpu(), v.cpu(), m.cpu(), gamma, lam)
    assert adv.dtype == ret.dtype == torch.float64 and adv.device.type == device
    close(adv, e_adv, 1e-10, 1e-10)
    close(ret, e_ret, 1e-10, 1e-10)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.uint8, torch.bfloat16])
def test_backend_float32_mask_dtypes(backend_device, mask_dtype):
    backend, device = backend_device
    r, v, m = inputs(6, 300, torch.float32, mask_dtype, device)
    adv, ret = rlhfkern.gae(r, v, m, 0.99, 0.95, backend=backend)
    e_adv, e_ret = gae_reference(r.cpu().double(), v.cpu().double(), m.cpu().double(), 0.99, 0.95)
    assert adv.dtype == ret.dtype == torch.float32
    close(adv, e_adv, 1e-5, 1e-5)
    close(ret, e_ret, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_half_inputs_give_float32(backend_device, dtype):
    backend, device = backend_device
    r, v, m = inputs(5, 257, dtype, torch.bool, device)
    adv, ret = rlhfkern.gae(r, v, m, 0.99, 0.95, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32
    # the same half inputs, upcast exactly: the only rounding left is fp32 accumulation
    e_adv, e_ret = gae_reference(r.cpu().double(), v.cpu().double(), m.cpu().double(), 0.99, 0.95)
    close(adv, e_adv, 1e-5, 1e-5)
    close(ret, e_ret, 1e-5, 1e-5)


def test_backend_fractional_mask(backend_device):
    backend, device = backend_device
    r, v, _ = inputs(4, 100, torch.float64)
    m = torch.rand(4, 100, dtype=torch.float64) * (torch.rand(4, 100) > 0.2)
    adv, ret = rlhfkern.gae(r.to(device), v.to(device), m.to(device), 0.9, 0.9, backend=backend)
    e_adv, e_ret = gae_reference(r, v, m, 0.9, 0.9)
    close(adv, e_adv, 1e-10, 1e-10)
    close(ret, e_ret, 1e-10, 1e-10)


def test_backend_long_sequence(backend_device):
    backend, device = backend_device
    B = 2 if backend == "triton" and device == "cpu" else 16  # the interpreter is slow
    r, v, m = inputs(B, 8192, torch.float32, torch.bool, device)
    adv, ret = rlhfkern.gae(r, v, m, 1.0, 1.0, backend=backend)
    e_adv, e_ret = gae_reference(r.cpu().double(), v.cpu().double(), m.cpu().double(), 1.0, 1.0)
    scale = e_adv.abs().max().item()  # sums of ~8k N(0, 1) terms: fp32 error grows with it
    close(adv, e_adv, 1e-5, 1e-5 * scale)
    close(ret, e_ret, 1e-5, 1e-5 * scale)


def test_backend_non_contiguous(backend_device):
    backend, device = backend_device
    r, v, m = inputs(6, 64, torch.float64, torch.float64)
    cases = {
        "transposed": (r.t().contiguous().t(), v.t().contiguous().t(), m.t().contiguous().t()),
        "strided": (torch.cat([r, r], 1)[:, ::2], torch.cat([v, v], 1)[:, ::2], torch.cat([m, m], 1)[:, ::2]),
        "row slice": (torch.cat([r, v], 1)[:, 64:], torch.cat([v, r], 1)[:, :64], torch.cat([m, m], 1)[:, 3:67]),
    }
    for name, (rr, vv, mm) in cases.items():
        assert not (rr.is_contiguous() and vv.is_contiguous() and mm.is_contiguous()), name
        adv, ret = rlhfkern.gae(rr.to(device) if device == "cpu" else rr.to(device),
                                vv if device == "cpu" else vv.to(device),
                                mm if device == "cpu" else mm.to(device), 0.95, 0.9, backend=backend)
        e_adv, e_ret = gae_reference(rr.contiguous(), vv.contiguous(), mm.contiguous(), 0.95, 0.9)
        close(adv, e_adv, 1e-10, 1e-10)
        close(ret, e_ret, 1e-10, 1e-10)


def test_backend_mixed_dtypes_promote(backend_device):
    backend, device = backend_device
    r, v, m = inputs(3, 50, torch.float32, torch.int64, device)
    adv, ret = rlhfkern.gae(r, v.to(torch.bfloat16), m, 0.99, 0.95, backend=backend)
    e_adv, e_ret = gae_reference(r.cpu().double(), v.cpu().to(torch.bfloat16).double(), m.cpu().double(), 0.99, 0.95)
    close(adv, e_adv, 1e-5, 1e-5)
    close(ret, e_ret, 1e-5, 1e-5)


def test_backend_does_not_write_inputs(backend_device):
    backend, device = backend_device
    r, v, m = inputs(4, 40, torch.float32, torch.float32, device)
    copies = [x.clone() for x in (r, v, m)]
    rlhfkern.gae(r, v, m, 0.9, 0.9, whiten=True, backend=backend)
    for x, c in zip((r, v, m), copies):
        assert torch.equal(x, c)


# ----------------------------------------------------------------------------- whitening
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masked_whiten_backend(backend_device, shift_mean, dtype):
    backend, device = backend_device
    x = (torch.randn(7, 333, dtype=torch.float64) * 3 + 5).to(dtype)
    m = adversarial_mask(7, 333, torch.bool)
    x[~m] = float("nan")  # masked-out entries never enter the statistics
    out = rlhfkern.masked_whiten(x.to(device), m.to(device), shift_mean, backend=backend)
    expected = masked_whiten_reference(x.double(), m, shift_mean)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    close(out[m], expected[m], tol, tol)
    assert out[~m].isnan().all()


@pytest.mark.parametrize("shape", [(50,), (3, 4, 21), (1, 2)])
def test_masked_whiten_shapes(backend_device, shape):
    backend, device = backend_device
    x = torch.randn(shape, dtype=torch.float64)
    m = torch.rand(shape) > 0.3
    m.view(-1)[:2] = True
    out = rlhfkern.masked_whiten(x.to(device), m.to(device), backend=backend)
    assert out.shape == x.shape
    close(out, masked_whiten_reference(x, m), 1e-10, 1e-10)


@pytest.mark.parametrize("count", [0, 1])
def test_masked_whiten_too_few_elements_is_nan(backend_device, count):
    backend, device = backend_device
    x = torch.randn(3, 10)
    m = torch.zeros(3, 10)
    m[1, :count] = 1
    out = rlhfkern.masked_whiten(x.to(device), m.to(device), backend=backend)
    assert out.isnan().all()


def test_gae_whiten_backend(backend_device):
    backend, device = backend_device
    r, v, m = inputs(8, 129, torch.float32, torch.bool, device)
    adv, ret = rlhfkern.gae(r, v, m, 0.99, 0.95, whiten=True, backend=backend)
    e_adv, e_ret = gae_reference(r.cpu().double(), v.cpu().double(), m.cpu().double(), 0.99, 0.95)
    close(adv, masked_whiten_reference(e_adv, m.cpu()), 1e-5, 1e-5)
    close(ret, e_ret, 1e-5, 1e-5)  # returns are never whitened


# ----------------------------------------------------------------------------- verl drop-in
def verl_core_algos():
    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    return core_algos


@pytest.mark.parametrize("B,T,gamma,lam", [(16, 200, 1.0, 1.0), (9, 77, 0.99, 0.95), (4, 1, 0.9, 0.9), (2, 513, 0.5, 0.0)])
@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + compiled_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_gae_matches_verl(monkeypatch, backend_device, B, T, gamma, lam):
    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    r, v, m = inputs(B, T, torch.float32, torch.float32)
    if B == 4:
        m[:] = 1  # T = 1: need at least two masked tokens overall
    expected_adv, expected_ret = verl_core_algos().compute_gae_advantage_return(r, v, m, gamma, lam)
    adv, ret = compat_verl.compute_gae_advantage_return(r.to(device), v.to(device), m.to(device), gamma, lam)
    assert adv.dtype == expected_adv.dtype and adv.shape == expected_adv.shape
    torch.testing.assert_close(adv.cpu(), expected_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.cpu(), expected_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + compiled_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_gae_multi_turn_matches_verl(monkeypatch, backend_device):
    """Multi-turn rows as verl's own test builds them (observation tokens masked out between turns,
    wild values at the masked positions, rewards inside the turns), several gamma/lambda: advantages
    and returns against verl 0.9.1 on the same inputs. verl's test only checks that two runs differing
    at masked positions agree, which holds whatever the values (tests/tier_peers/REACH.md)."""
    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0],
                         [1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1],
                         [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]], dtype=torch.float32)
    rewards = torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.1, 0.0, 0.0, 0.1, 1.0, 0.0, 0.0],
                            [0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, -1.0],
                            [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.randn(3, 11) * 3
    values[mask == 0] = torch.empty(int((mask == 0).sum())).uniform_(-100, 100)  # never read by a correct GAE
    for gamma, lam in ((1.0, 1.0), (0.9, 0.95), (0.37, 0.61)):
        expected = verl_core_algos().compute_gae_advantage_return(rewards, values, mask, gamma, lam)
        ours = compat_verl.compute_gae_advantage_return(rewards.to(device), values.to(device), mask.to(device), gamma, lam)
        for o, e in zip(ours, expected):
            torch.testing.assert_close(o.cpu(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", PEER_DTYPES, ids=str)
def test_compat_verl_gae_dtype_matches_verl(dtype):
    """verl computes GAE in the inputs' (promoted) dtype; the drop-in computes in fp32 (fp64) and
    returns that dtype. Measured max |error| against verl on the inputs widened to fp64 (9x77,
    randn rewards and values; same-dtype mask): fp16: ours 9.6e-4 / verl's 2.9e-3 (advantages),
    2.0e-3 / 7.9e-3 (returns); bf16: 7.1e-3 / 2.7e-2, 1.5e-2 / 7.8e-2; a float32 mask (float32
    results): ours 4e-7 / verl's 3e-4 (fp16), 7e-7 / 1.5e-3 (bf16)."""
    core = verl_core_algos()
    r, v, m = inputs(9, 77, torch.float64, torch.float64)
    r, v = r.to(dtype), v.to(dtype)
    for mask in (m.to(dtype), m.float(), m.long()):  # a float32 mask widens half inputs, an integer one does not
        theirs = core.compute_gae_advantage_return(r, v, mask, 0.99, 0.95)
        ours = compat_verl.compute_gae_advantage_return(r, v, mask, 0.99, 0.95)
        exact = core.compute_gae_advantage_return(r.double(), v.double(), mask.double(), 0.99, 0.95)
        for name, o, t, e in zip(("advantages", "returns"), ours, theirs, exact):
            # verl's whitening of fp64 values with a float32/int mask rounds its counts in float32 (1.7e-8)
            assert_like_peer(o, t, e, f"{name} {dtype} mask {mask.dtype}", by_error=mask.dtype != dtype)


def test_compat_verl_masked_whiten_matches_verl():
    need("verl", extra="test")
    import verl.utils.torch_functional as verl_F

    x = torch.randn(5, 40) * 2 + 1
    m = adversarial_mask(5, 40, torch.int64)
    for shift in (True, False):
        torch.testing.assert_close(compat_verl.masked_whiten(x, m, shift), verl_F.masked_whiten(x, m, shift),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [0, 1])
def test_compat_verl_raises_like_verl(count):
    need("verl", extra="test")
    import verl.utils.torch_functional as verl_F

    r, v = torch.randn(3, 5), torch.randn(3, 5)
    m = torch.zeros(3, 5)
    m[2, :count] = 1
    with pytest.raises(ValueError) as theirs:
        verl_core_algos().compute_gae_advantage_return(r, v, m, 1.0, 1.0)
    with pytest.raises(ValueError) as ours:
        compat_verl.compute_gae_advantage_return(r, v, m, 1.0, 1.0)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match=str(theirs.value)):
        verl_F.masked_whiten(r, m)
    with pytest.raises(ValueError, match=str(theirs.value)):
        compat_verl.masked_whiten(r, m)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_input_names_the_argument(backend):
    r, v, m = inputs(3, 8)
    bad = [
        (dict(rewards=r[:, :5]), "values has shape"),
        (dict(values=v[:2]), "values has shape"),
        (dict(mask=m[:, :7]), "mask has shape"),
        (dict(rewards=r[:, :0], values=v[:, :0], mask=m[:, :0]), "T = 0"),
        (dict(rewards=r.long()), "rewards must be a floating tensor"),
        (dict(values=v.long()), "values must be a floating tensor"),
        (dict(rewards=r[0], values=v[0], mask=m[0]), "rewards must be 2-D"),
        (dict(values=v.to("meta")), "values is on meta"),
        (dict(mask=m.to("meta")), "mask is on meta"),
        (dict(mask=[[1.0] * 8] * 3), "mask must be a torch.Tensor"),
        (dict(gamma=1.5), "gamma must be a number in \\[0, 1\\]"),
        (dict(gamma=-0.1), "gamma must be a number in \\[0, 1\\]"),
        (dict(lam=float("nan")), "lam must be a number in \\[0, 1\\]"),
        (dict(lam="0.9"), "lam must be a number in \\[0, 1\\]"),
    ]
    for override, message in bad:
        args = dict(rewards=r, values=v, mask=m, gamma=0.9, lam=0.9) | override
        with pytest.raises(ValueError, match=message):
            rlhfkern.gae(**args, backend=backend)


def test_masked_whiten_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask has shape"):
        rlhfkern.masked_whiten(x, torch.ones(3, 5))
    with pytest.raises(ValueError, match="values must be a floating tensor"):
        rlhfkern.masked_whiten(x.long(), torch.ones(3, 4))
    with pytest.raises(ValueError, match="values must be a non-empty tensor"):
        rlhfkern.masked_whiten(torch.tensor(1.0), torch.tensor(1.0))


def test_backend_choice_errors_and_env(monkeypatch):
    r, v, m = inputs(2, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        rlhfkern.gae(r, v, m, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' is not available: .*CUDA tensors"):
            rlhfkern.gae(r, v, m, backend="cuda")
    monkeypatch.setenv("RLHFKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="got 'nonsense'"):
        rlhfkern.gae(r, v, m)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = "TRITON_INTERPRET=1" if HAVE_TRITON else r"triton is not installed \(pip install 'rlhfkern\[triton\]'\)"
    with pytest.raises(ValueError, match=reason):
        _dispatch.resolve("triton", "cpu")


def test_backend_choice_env_and_auto(monkeypatch):
    monkeypatch.delenv("RLHFKERN_BACKEND", raising=False)
    assert _dispatch.resolve(None, "cpu") == "cpu"  # the extension is built
    assert _dispatch.resolve("auto", "cpu") == "cpu"
    monkeypatch.setenv("RLHFKERN_BACKEND", "torch")
    assert _dispatch.resolve(None, "cpu") == "torch"
    assert _dispatch.resolve("cpu", "cpu") == "cpu"  # the keyword wins over the environment


def test_backends_lists_what_runs_here():
    usable = rlhfkern.backends()
    assert usable[:2] == ["torch", "cpu"]
    assert ("triton" in usable) == (HAVE_TRITON and (_dispatch.triton_interpreted() or torch.cuda.is_available()))
    assert ("cuda" in usable) == (torch.cuda.is_available() and _dispatch.build_info()["cuda"])


# ----------------------------------------------------------------------------- custom ops, compile
def test_custom_ops_pass_opcheck(backend_device):
    backend, device = backend_device
    r, v, m = inputs(3, 40, torch.float32, torch.bool, device)
    gae_op = torch.ops.rlhfkern.gae_triton if backend == "triton" else torch.ops.rlhfkern.gae
    torch.library.opcheck(gae_op, (r, v, m, 0.9, 0.8))
    if backend != "cuda":
        wh_op = torch.ops.rlhfkern.masked_whiten_triton if backend == "triton" else torch.ops.rlhfkern.masked_whiten
        torch.library.opcheck(wh_op, (r, m, True))


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    torch._dynamo.reset()

    def step(r, v, m):
        adv, ret = rlhfkern.gae(r, v, m, 0.99, 0.95, whiten=True, backend=backend)
        return adv * 2, ret

    r, v, m = inputs(4, 64, torch.float32, torch.bool, device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    adv, ret = compiled(r, v, m)
    e_adv, e_ret = step(r, v, m)
    close(adv, e_adv, 0, 0)
    close(ret, e_ret, 0, 0)


def test_info_command_reports_build():
    text = __import__("rlhfkern.__main__", fromlist=["info"]).info()
    assert "rlhfkern._C loaded" in text
    assert "built        cpu=True" in text
    assert math.isfinite(float(rlhfkern.__version__.split(".")[0]))


@pytest.mark.skipif("cpu" not in rlhfkern.backends(), reason="the CPU backend is not built")
def test_cpu_bitwise_across_thread_counts():
    """GAE and masked_whiten on the CPU backend: one thread and two give the same bits for a shape
    split into several tasks (8 row groups of the GAE kernel, 8 tasks of the whitening rows)."""
    torch.manual_seed(0)
    B, T = 64, 4096
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = torch.rand(B, T) > 0.2
    run = lambda: (*rlhfkern.gae(r, v, m, 0.99, 0.95, backend="cpu"),  # noqa: E731
                   rlhfkern.masked_whiten(v, m, backend="cpu"))
    for a, b in zip(at_threads(1, run), at_threads(2, run)):
        assert torch.equal(a, b)
