"""Log-prob family: every backend against the float64 reference (log-probs, entropy, gradients),
adversarial logits and vocabularies, K candidates, temperature, the in-place backward, batch
invariance, the verl / OpenRLHF / TRL drop-ins against those libraries, validation, compile."""

import pytest
import torch

import rlhfkern
from rlhfkern.compat import openrlhf as compat_openrlhf
from rlhfkern.compat import trl as compat_trl
from rlhfkern.compat import verl as compat_verl
from rlhfkern.ops.logprob import OP_BACKENDS, logprobs_reference

from conftest import (HAVE_TRITON, at_threads, backend_pairs, compiled_backends, gloo_process, need, openrlhf_losses,
                      run_processes, run_sse_build)

BACKENDS = compiled_backends(OP_BACKENDS)  # no CUDA kernel in this family: Triton serves GPUs


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    return request.param


VOCABS = [1, 7, 32000, 50257, 151936]


def rows_for(V, backend, device):
    """Few rows for the large vocabularies in the Triton interpreter (its cost is per element)."""
    return 2 if (backend == "triton" and device == "cpu" and V > 1000) else 5


def make(N, V, dtype=torch.float32, device="cpu", K=None, scale=3.0):
    x = (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype)
    shape = (N,) if K is None else (N, K)
    labels = torch.randint(0, V, shape)
    return x.to(device), labels.to(device)


def close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol,
                               atol=atol, equal_nan=True)


def run(fn, x, labels, g_lp, g_ent, **kw):
    """(log-probs, entropy, d logits) of one implementation for upstream gradients g_lp, g_ent."""
    x = x.detach().clone().requires_grad_()
    lp, ent = fn(x, labels, return_entropy=True, **kw)
    loss = (lp * g_lp.to(lp)).sum() + (ent * g_ent.to(ent)).sum()
    return lp, ent, torch.autograd.grad(loss, x)[0]


def check(backend, device, x, labels, temperature=1.0, tol=1e-5, grad_tol=1e-5):
    g_lp = torch.randn(labels.shape, dtype=torch.float64)
    g_ent = torch.randn(x.shape[:-1], dtype=torch.float64)
    ours = run(lambda *a, **k: rlhfkern.logprobs(*a, backend=backend, **k), x, labels, g_lp.to(device), g_ent.to(device),
               temperature=temperature)
    ref = run(lambda *a, **k: logprobs_reference(*a, temperature, k["return_entropy"]), x.cpu().double(), labels.cpu(),
              g_lp, g_ent)
    assert ours[0].dtype == ours[1].dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert ours[0].shape == labels.shape and ours[2].dtype == x.dtype
    close(ours[0], ref[0], tol, tol)
    close(ours[1], ref[1], tol, tol)
    close(ours[2], ref[2], grad_tol, grad_tol)
    return ours


# ----------------------------------------------------------------------------- reference
def test_reference_against_log_softmax_and_autograd():
    x, labels = make(4, 11, torch.float64, K=3)
    labels[0, 1] = -100
    lp, ent = logprobs_reference(x, labels, 0.5, True)
    ls = (x / 0.5).log_softmax(-1)
    expected = ls.gather(-1, labels.clamp(min=0))
    expected[0, 1] = 0
    close(lp, expected, 1e-14, 1e-14)
    close(ent, -(ls.exp() * ls).sum(-1), 1e-12, 1e-12)
    assert torch.autograd.gradcheck(lambda t: torch.cat([v.flatten() for v in logprobs_reference(t, labels, 0.7, True)]),
                                    (x.clone().requires_grad_(),))


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("V", VOCABS)
def test_vocab_sizes(backend_device, V):
    backend, device = backend_device
    x, labels = make(rows_for(V, backend, device), V, device=device)
    check(backend, device, x, labels)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_k_candidates_and_temperature(backend_device, temperature):
    backend, device = backend_device
    x, labels = make(6, 333, device=device, K=4)
    labels[0, 2] = labels[0, 1]  # a repeated candidate
    labels[1, 0] = -100  # ignored: log-prob 0, no gradient
    ours = check(backend, device, x, labels, temperature)
    assert ours[0][1, 0] == 0


def test_float64_tight(backend_device):
    backend, device = backend_device
    x, labels = make(4, 1000, torch.float64, device, K=2)
    check(backend, device, x, labels, 0.9, tol=1e-12, grad_tol=1e-12)


# the CPU kernels reduce rows of up to 512 logits several at a time (csrc/cpu/softmax_rows.h,
# logprob_rows_small), longer ones one at a time: the tests below cover both
SMALL_V = 37  # not a multiple of any lane count


@pytest.mark.parametrize("V", [3001, SMALL_V])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits(backend_device, dtype, V):
    backend, device = backend_device
    x, labels = make(11, V, dtype, device)
    # the reference sees the same half values, upcast exactly: what is left is float32 rounding
    check(backend, device, x, labels, tol=2e-5, grad_tol=1e-2)


@pytest.mark.parametrize("V", [4099, SMALL_V])  # not a multiple of any tile
def test_adversarial_logits(backend_device, V):
    backend, device = backend_device
    x, labels = make(6, V, device=device)
    x[0, : V // 2] = float("-inf")  # masked-out vocabulary
    labels[0] = V - 1
    x[1] *= 1e4  # huge logits: most probabilities underflow to exactly 0
    x[2, 17] = 1e30
    labels[2] = 17
    x[3, :] = float("-inf")
    x[3, 5] = 2.0  # one finite entry: log-prob 0, entropy 0
    labels[3] = 5
    x[4, :] = float("-inf")  # nothing finite: nan, as log_softmax gives
    x[5, labels[5]] = float("-inf")  # the label itself impossible: -inf
    ours = check(backend, device, x, labels)
    assert ours[0][3] == 0 and ours[1][3] == 0
    assert ours[0][4].isnan() and ours[0][5] == float("-inf")


def test_non_contiguous_and_3d(backend_device):
    backend, device = backend_device
    x, labels = make(3 * 4, 70, device=device)
    x3 = torch.cat([x, x], -1)[:, ::2].reshape(3, 4, 70)  # strided along V
    check(backend, device, x3, labels.reshape(3, 4))
    for V in (SMALL_V, 700):  # rows further apart than V (a narrowed view: read in place)
        wide, labels = make(10, 2 * V, device=device)
        labels = labels % V
        check(backend, device, wide[:, :V], labels)


def test_inplace_backward(backend_device):
    backend, device = backend_device
    x, labels = make(5, 900, device=device)
    expected = run(lambda *a, **k: rlhfkern.logprobs(*a, backend=backend, **k), x, labels,
                   torch.ones(5, device=device), torch.zeros(5, device=device))[2]
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf buffer, as a model's output
    other = (logits ** 2).sum()  # an op that saved the logits for its own backward
    version = logits._version
    lp = rlhfkern.logprobs(logits, labels, inplace_backward=True, backend=backend)
    lp.sum().backward(retain_graph=True)
    assert logits._version > version  # the write into the logits is visible to autograd
    close(leaf.grad, expected, 0, 0)
    close(logits, expected, 0, 0)  # the gradient lives in the logits buffer now
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


@pytest.mark.parametrize("V", [2500, 40])
def test_batch_invariance(backend_device, V):
    """A token's log-prob and entropy are bitwise the same whatever else is in the batch (at V = 40
    the CPU reduces 8 rows at a time: 9 rows are a full group and a short one)."""
    backend, device = backend_device
    x, labels = make(9, V, device=device)
    lp, ent = rlhfkern.logprobs(x, labels, return_entropy=True, backend=backend)
    order = torch.tensor([4, 8, 0, 3])
    lp_sub, ent_sub = rlhfkern.logprobs(x[order], labels[order], return_entropy=True, backend=backend)
    assert torch.equal(lp_sub, lp[order]) and torch.equal(ent_sub, ent[order])
    one_lp, one_ent = rlhfkern.logprobs(x[7:8], labels[7:8], return_entropy=True, backend=backend)
    assert torch.equal(one_lp, lp[7:8]) and torch.equal(one_ent, ent[7:8])


def test_custom_ops_pass_opcheck(backend_device):
    backend, device = backend_device
    x, labels = make(3, 50, device=device, K=2)
    torch.library.opcheck(torch.ops.rlhfkern.logprobs, (x.requires_grad_(), labels, 0.8, True, False, backend))


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    torch._dynamo.reset()
    x, labels = make(4, 64, device=device)

    def f(t):
        lp, ent = rlhfkern.logprobs(t, labels, return_entropy=True, temperature=0.9, backend=backend)
        return lp.sum() + ent.mean()

    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
    out.backward()
    f(b).backward()
    close(a.grad, b.grad, 1e-6, 1e-7)


# ----------------------------------------------------------------------------- drop-ins
DROPIN = [("torch", "cpu")] + BACKENDS


@pytest.mark.parametrize("backend_device", DROPIN, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_matches_verl(monkeypatch, backend_device):
    need("verl", extra="test")
    import verl.utils.torch_functional as verl_F

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    x, labels = make(2 * 3, 500)
    x, labels = x.reshape(2, 3, 500), labels.reshape(2, 3)
    a, b = x.clone().requires_grad_(), x.clone().to(device).requires_grad_()
    theirs = verl_F.logprobs_from_logits(a, labels)
    ours = compat_verl.logprobs_from_logits(b * 1, labels.to(device), inplace_backward=False)
    close(ours, theirs, 1e-5, 1e-6)
    close(torch.autograd.grad(ours.sum(), b)[0], torch.autograd.grad(theirs.sum(), a)[0], 1e-5, 1e-7)
    a, b = x.clone().requires_grad_(), x.clone().to(device).requires_grad_()
    theirs, ours = verl_F.entropy_from_logits(a), compat_verl.entropy_from_logits(b)
    close(ours, theirs, 1e-5, 1e-5)
    close(torch.autograd.grad(ours.sum(), b)[0], torch.autograd.grad(theirs.sum(), a)[0], 1e-5, 1e-6)


@pytest.mark.parametrize("backend_device", DROPIN, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_openrlhf_and_trl_match(monkeypatch, backend_device):
    need("trl", extra="test")
    from trl.trainer import utils as trl_utils

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    _, openrlhf_utils = openrlhf_losses()
    x, labels = make(4, 300)
    for temperature in (1.0, 0.7):
        ours = compat_openrlhf.log_probs_from_logits(x.to(device), labels.to(device), temperature)
        theirs = openrlhf_utils.log_probs_from_logits(x.clone(), labels, temperature)
        close(ours, theirs, 1e-5, 1e-6)
    index = torch.randint(0, 300, (4, 3))
    row_mask = torch.ones(4, 3)
    row_mask[1, 2] = 0
    for kw in (dict(), dict(temperature=0.8, row_mask=row_mask)):
        ours = compat_trl.selective_log_softmax(x.to(device), index.to(device),
                                                **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()})
        close(ours, trl_utils.selective_log_softmax(x, index, **kw), 1e-5, 1e-6)
    close(compat_trl.entropy_from_logits(x.to(device)), trl_utils.entropy_from_logits(x), 1e-5, 1e-5)
    rows = torch.randint(0, 300, (4,))
    mask = torch.tensor([1, 0, 1, 1])
    for kw in (dict(), dict(temperature=0.8, row_mask=mask), dict(entropy_requires_grad=False)):
        dev_kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
        lp, ent = compat_trl.selective_log_softmax_and_entropy(x.to(device), rows.to(device), **dev_kw)
        want_lp, want_ent = trl_utils.selective_log_softmax_and_entropy(x, rows, **kw)
        close(lp, want_lp, 1e-5, 1e-6)
        close(ent, want_ent, 1e-5, 1e-5)


HALF_AND_FULL = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("backend_device", DROPIN, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_trl_dtypes(monkeypatch, backend_device):
    """TRL's dtype contract: each drop-in returns the logits' dtype, as TRL 1.16 does (its tests
    assert it). Values: ours (float32 inside, rounded once) is never farther from float64 than
    TRL's own function; ours and TRL's agree within the sum of the two measured errors (largest seen:
    fp16 log-probs 8e-3, bf16 6.4e-2, bf16 entropy 1.0e-1, all TRL's: see rlhfkern/compat/trl.py)."""
    need("trl", extra="test")
    from trl.trainer import utils as trl_utils

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    interpreted = backend == "triton" and device == "cpu"
    shapes = [(2, 8, 1024)] if interpreted else [(4, 32, 1024), (2, 16, 32000)]
    gen = torch.Generator().manual_seed(0)
    for B, T, V in shapes:
        x64 = torch.randn(B, T, V, dtype=torch.float64, generator=gen) * (1.0 if V < 2000 else 3.0)
        ids = torch.randint(0, V, (B, T), generator=gen)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, -2:] = 0
        for dtype in HALF_AND_FULL:
            x = x64.to(dtype)
            ref_lp = torch.gather(x.double().log_softmax(-1), -1, ids[..., None])[..., 0]
            ref_ent = -(x.double().softmax(-1) * x.double().log_softmax(-1)).sum(-1)
            xd, idsd, maskd = x.to(device), ids.to(device), mask.to(device)
            both = compat_trl.selective_log_softmax_and_entropy(xd, idsd)
            pairs = [  # (ours, TRL's, float64 reference)
                (compat_trl.selective_log_softmax(xd, idsd), trl_utils.selective_log_softmax(x, ids), ref_lp),
                (compat_trl.entropy_from_logits(xd), trl_utils.entropy_from_logits(x), ref_ent),
                (both[0], trl_utils.selective_log_softmax_and_entropy(x, ids)[0], ref_lp),
                (both[1], trl_utils.selective_log_softmax_and_entropy(x, ids)[1], ref_ent),
                (compat_trl.selective_log_softmax(xd, idsd, row_mask=maskd),
                 trl_utils.selective_log_softmax(x, ids, row_mask=mask), ref_lp * mask),
            ]
            floor = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, 0.0)
            for i, (ours, theirs, ref) in enumerate(pairs):
                assert ours.dtype == theirs.dtype == dtype, (i, dtype, ours.dtype, theirs.dtype)
                assert ours.device.type == torch.device(device).type
                err_ours = (ours.cpu().double() - ref).abs().max().item()
                err_trl = (theirs.double() - ref).abs().max().item()
                assert err_ours <= max(err_trl, floor), (i, dtype, V, err_ours, err_trl)
                close(ours, theirs, 0, err_ours + err_trl + floor)


def test_compat_verl_openrlhf_dtypes():
    """Output dtypes of the log-prob drop-ins equal the installed peers' (verl without flash-attn
    here: its logprobs_from_logits returns float32 on its GPU flash-attn path, ours always does)."""
    need("verl", extra="test")
    import verl.utils.torch_functional as verl_F

    _, openrlhf_utils = openrlhf_losses()
    x64 = torch.randn(2, 3, 200, dtype=torch.float64) * 3
    labels = torch.randint(0, 200, (2, 3))
    for dtype in HALF_AND_FULL:
        x = x64.to(dtype)
        assert compat_verl.entropy_from_logits(x).dtype == verl_F.entropy_from_logits(x).dtype == dtype
        ours = compat_openrlhf.log_probs_from_logits(x, labels, 0.7)
        assert ours.dtype == openrlhf_utils.log_probs_from_logits(x.clone(), labels, 0.7).dtype == dtype
        assert compat_verl.logprobs_from_logits(x, labels).dtype == (torch.float64 if dtype == torch.float64
                                                                     else torch.float32)


def _fused_head_run(fn, h, w, b, targets, grads):
    """TRL's fused-head call: the 5 outputs and the gradients (hidden, weight, bias) of
    sum(log_probs * g0 + entropy * g1)."""
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    outs = fn(*leaves, targets)
    loss = (outs[0] * grads[0]).sum() + (outs[1] * grads[1]).sum()
    return outs, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("head", [dict(), dict(final_logit_softcapping=5.0, logit_scale=0.8)],
                         ids=["plain", "softcap-scale"])
def test_compat_trl_fused_head_equals_trl(head):
    """compat.trl.ChunkedLogProbFunction (on linear_logprobs) against TRL 1.16's own
    trl.kernels.ChunkedLogProbFunction on the same inputs: the five outputs, their dtypes, and the
    gradients w.r.t. hidden, weight and bias; float32, bfloat16, and float32 under bf16 autocast."""
    need("trl", extra="test")
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as TRLHead

    gen = torch.Generator().manual_seed(3)
    N, H, V = 70, 16, 300
    h, w, b = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) * 0.5, torch.randn(V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[:5] = (h @ w.T + b)[:5].argmax(-1)  # some top-1 targets
    grads = (torch.randn(N, generator=gen), torch.randn(N, generator=gen))
    outputs = compat_trl.FUSED_HEAD_OUTPUTS
    for dtype, autocast in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        hd, wd, bd = h.to(dtype), w.to(dtype), b.to(dtype)
        runs = []
        for fn in (compat_trl.ChunkedLogProbFunction.apply, TRLHead.apply):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                runs.append(_fused_head_run(  # positional, as TRL calls it (autograd's apply takes no keywords)
                    lambda a, c, d, t: fn(a, c, d, t, 0.7, 128, head.get("final_logit_softcapping"),
                                          head.get("logit_scale", 1.0), outputs), hd, wd, bd, targets, grads))
        (ours, our_grads), (theirs, their_grads) = runs
        tol = 1e-5 if dtype == torch.float32 and not autocast else 2e-2
        for name, x, y in zip(("log_probs",) + outputs, ours, theirs):
            assert x.dtype == y.dtype and x.shape == y.shape, (name, dtype, autocast)
            if name == "is_top1":
                assert torch.equal(x, y) and x[:5].all() and not x.all()
            else:
                assert x.requires_grad == y.requires_grad, name
                close(x, y, tol, tol)
        for x, y in zip(our_grads, their_grads):
            assert x.dtype == y.dtype
            close(x, y, tol, tol * 10)


def test_compat_trl_fused_head_in_a_model():
    """TRL's add_fused_lm_head on a tiny Llama: with compat.trl.patch() the model's fused forward
    (what GRPOTrainer calls) runs our function, and gives TRL's log-probs, entropy and loss."""
    need("trl", "transformers", extra="test")
    import warnings

    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 500, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.loss + out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), out.loss.detach(), model.lm_head.weight.grad.clone()

    stock = run()
    calls = []
    real = compat_trl.ChunkedLogProbFunction.apply

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TRL 1.16's GRPOTrainer is reached: no warning
        handle = compat_trl.patch()
    try:
        assert trl_utils._ChunkedLogProbFunction is compat_trl.ChunkedLogProbFunction
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compat_trl.ChunkedLogProbFunction, "apply", staticmethod(counting))
            patched = run()
    finally:
        handle.undo()
    assert calls == [1]
    assert trl_utils._ChunkedLogProbFunction is compat_trl._TRL_FUSED_HEAD
    for x, y in zip(patched, stock):
        close(x, y, 1e-5, 1e-5)


def test_compat_trl_one_pass_equals_the_two_calls():
    """selective_log_softmax_and_entropy == (selective_log_softmax, entropy_from_logits), bitwise,
    with temperature, row_mask and entropy_requires_grad=False; gradients too."""
    gen = torch.Generator().manual_seed(1)
    for dtype in HALF_AND_FULL:
        x = (torch.randn(3, 5, 300, generator=gen) * 2).to(dtype)
        ids = torch.randint(0, 300, (3, 5), generator=gen)
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[1, 3:] = 0
        for kw in (dict(), dict(temperature=0.7), dict(temperature=1.3, row_mask=mask)):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            lp, ent = compat_trl.selective_log_softmax_and_entropy(a, ids, **kw)
            want_lp = compat_trl.selective_log_softmax(b, ids, **kw)
            # TRL divides the logits by the temperature in their dtype; the drop-in scales in float32
            # inside, so the entropy is compared to the scaled logits' one computed in float64
            temperature = kw.get("temperature", 1.0)
            want_ent = compat_trl.entropy_from_logits(b if temperature == 1.0 else b.double() / temperature)
            if "row_mask" in kw:
                want_ent = want_ent.masked_fill(mask == 0, 0.0)
            assert lp.dtype == ent.dtype == dtype
            assert torch.equal(lp, want_lp), (dtype, kw)
            if temperature == 1.0:
                assert torch.equal(ent, want_ent), (dtype, kw)
            else:  # within one rounding of the dtype (float32: the float32 kernel's own error)
                rtol, atol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}.get(
                    dtype, (torch.finfo(dtype).eps, 1e-6))
                close(ent, want_ent, rtol, atol)
            ga = torch.autograd.grad((lp.float().sum() + ent.float().sum()), a)[0]
            gb = torch.autograd.grad((want_lp.float().sum() + want_ent.float().sum()), b)[0]
            # one pass rounds the summed gradient once, the two calls each theirs: within 2 roundings
            half = dtype in (torch.float16, torch.bfloat16)
            close(ga, gb, 2 * torch.finfo(dtype).eps if half else 1e-5, 1e-3 if half else 1e-5)
        _, ent = compat_trl.selective_log_softmax_and_entropy(x.clone().requires_grad_(), ids,
                                                              entropy_requires_grad=False)
        assert not ent.requires_grad


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x, labels = make(3, 10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) or be -100"):
        rlhfkern.logprobs(x, torch.tensor([1, 10, 2]), backend="cpu")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        rlhfkern.logprobs(x, torch.tensor([1, -5, 2]), backend="cpu")
    with pytest.raises(ValueError, match="labels has shape"):
        rlhfkern.logprobs(x, labels[:2])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        rlhfkern.logprobs(x, labels.float())
    with pytest.raises(ValueError, match="logits must be a floating tensor"):
        rlhfkern.logprobs(x.long(), labels)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        rlhfkern.logprobs(x, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels is on meta"):
        rlhfkern.logprobs(x, labels.to("meta"))


# ----------------------------------------------------------------------------- vocab-parallel
def _tp_main(rank, world, init_file, failures, check):
    """One rank of a gloo group: runs the module-level function `check(rank, world, backends)`."""
    with gloo_process(rank, world, init_file, failures):
        globals()[check](rank, world, [b for b, d in backend_pairs() if d == "cpu" and (b != "triton" or HAVE_TRITON)])  # gloo: CPU tensors


def run_tp(tmp_path, world, check):
    run_processes(_tp_main, world, tmp_path, check)


def _tp_check_logprobs(rank, world, backends):
    """This rank's vocabulary shard of shared logits, against the unsharded reference."""
    import torch.distributed as dist

    torch.manual_seed(0)
    N, shard, K = 5, 37, 2
    full = torch.randn(N, shard * world, dtype=torch.float64) * 3
    full[0, : shard * world // 2] = float("-inf")  # shards with nothing finite in a row
    labels = torch.randint(0, shard * world, (N, K))
    labels[1, 1] = -100
    g_lp, g_ent = torch.randn(N, K, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    x = full.clone().requires_grad_()
    e_lp, e_ent = logprobs_reference(x, labels, 0.8, True)
    e_grad, = torch.autograd.grad((e_lp * g_lp).sum() + (e_ent * g_ent).sum(), x)
    mine = slice(rank * shard, (rank + 1) * shard)
    for backend in backends:
        for inplace in (False, True):
            part = full[:, mine].float().clone().requires_grad_()
            logits = part * 1
            lp, ent = rlhfkern.logprobs(logits, labels, temperature=0.8, return_entropy=True,
                                       inplace_backward=inplace, tp_group=dist.group.WORLD, backend=backend)
            grad, = torch.autograd.grad((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum(), part)
            close(lp, e_lp, 1e-5, 1e-5)
            close(ent, e_ent, 1e-5, 1e-5)
            close(grad, e_grad[:, mine], 1e-5, 1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_unsharded(tmp_path, world):
    run_tp(tmp_path, world, "_tp_check_logprobs")


# ----------------------------------------------------------------------------- fused with the LM head
from rlhfkern.ops.logprob import head_transform, linear_logprobs_reference  # noqa: E402


def run_linear(fn, h, w, labels, grads):
    a, b = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lp, ent, p2 = fn(a, b, labels)
    loss = (lp * grads[0].to(lp)).sum() + (ent * grads[1].to(ent)).sum() + (p2 * grads[2].to(p2)).sum()
    return (lp, ent, p2) + torch.autograd.grad(loss, [a, b])


@pytest.mark.parametrize("V,H,K", [(7, 5, None), (20001, 33, None), (9000, 17, 3)])
def test_linear_logprobs_against_reference(backend_device, V, H, K):
    backend, device = backend_device
    N = 21
    h = torch.randn(N, H)
    w = torch.randn(V, H) * 0.3
    labels = torch.randint(0, V, (N,) if K is None else (N, K))
    labels.view(-1)[2] = -100
    grads = (torch.randn(labels.shape, dtype=torch.float64), torch.randn(N, dtype=torch.float64),
             torch.randn(N, dtype=torch.float64))
    ours = run_linear(lambda a, b, l: rlhfkern.linear_logprobs(
        a, b, l, temperature=0.8, return_entropy=True, return_sum_p2=True, chunk_size=8, backend=backend),
        h.to(device), w.to(device), labels.to(device), [g.to(device) for g in grads])
    ref = run_linear(lambda a, b, l: linear_logprobs_reference(a, b, l, 0.8, True, True), h.double(), w.double(),
                     labels, grads)
    for x, y in zip(ours, ref):
        close(x, y, 2e-5, 2e-5)


@pytest.mark.parametrize("V", [9000, 40])
def test_linear_logprobs_batch_invariance(backend_device, V):
    """A token's log-prob, entropy and d hidden are bitwise the same whatever the batch around it,
    its position in it, and chunk_size (every logits matmul has one fixed shape; at V = 40 a block
    holds many token tiles)."""
    backend, device = backend_device
    h, w = torch.randn(300, 64).to(device), (torch.randn(V, 64) * 0.3).to(device)
    labels = torch.randint(0, V, (300,)).to(device)

    def run(rows, **kw):
        leaf = h[rows].clone().requires_grad_()
        lp, ent = rlhfkern.linear_logprobs(leaf, w, labels[rows], return_entropy=True, backend=backend, **kw)
        (lp.sum() + ent.sum()).backward()
        return lp, ent, leaf.grad

    full = run(slice(None))
    interpreted = backend == "triton" and device == "cpu"  # its cost is per element: one chunk_size there
    for chunk in (7,) if interpreted else (1, 7, 1000):
        assert all(torch.equal(a, b) for a, b in zip(run(slice(None), chunk_size=chunk), full))
    order = torch.tensor([250, 3, 131, 129, 7]).to(device)
    assert all(torch.equal(a, b[order]) for a, b in zip(run(order), full))


HEADS = [dict(), dict(softcap=3.0), dict(bias=True, logit_scale=1.7, softcap=2.5)]


def run_head(fn, h, w, b, labels, grads):
    """(lp, entropy, sum_p2, mean_logit, is_top1, d hidden, d weight[, d bias]) of fn(h, w, b, labels)."""
    leaves = [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    outs = fn(*leaves[:2], leaves[2] if b is not None else None, labels)
    loss = sum((o * g.to(o)).sum() for o, g in zip(outs[:4], grads))
    return tuple(outs) + torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("head", HEADS, ids=lambda d: "-".join(d) or "plain")
@pytest.mark.parametrize("V,K", [(40, None), (9000, 2)])
def test_linear_logprobs_head_transform(backend_device, head, V, K):
    """Bias, logit scale, softcapping and the extra outputs (mean logit, is-top-1) against the
    float64 spec, gradients w.r.t. hidden, weight and bias included; over several token tiles
    (N = 300) and, at V = 40, one block of them."""
    backend, device = backend_device
    N, H = (300 if V < 1000 else 140), 24  # several token tiles (a CPU block: 4 tiles at V = 9000)
    h, w = torch.randn(N, H), torch.randn(V, H) * 0.4
    b = torch.randn(V) if head.get("bias") else None
    labels = torch.randint(0, V, (N,) if K is None else (N, K))
    labels.view(-1)[[2, 77]] = -100
    h[1] = h[0]  # tokens 0 and 1 have vocabulary rows 3 and 5 tied at their top: is_top1 is the first's
    w[3] = w[5] = h[0] * 0.5
    if b is not None:
        b[5] = b[3]
    labels[0], labels[1] = 3, 5
    kw = dict(logit_scale=head.get("logit_scale", 1.0), softcap=head.get("softcap"))
    argmax = head_transform(h.double() @ w.double().T, None if b is None else b.double(), **kw).argmax(-1)
    labels[10:40] = argmax[10:40] if K is None else argmax[10:40, None]  # some labels are the top-1
    grads = [torch.randn(labels.shape, dtype=torch.float64)] + [torch.randn(N, dtype=torch.float64) for _ in range(3)]
    ours = run_head(lambda a, c, d, l: rlhfkern.linear_logprobs(
        a, c, l, bias=d, temperature=0.8, return_entropy=True, return_sum_p2=True, return_mean_logit=True,
        return_is_top1=True, backend=backend, **kw), h.to(device), w.to(device), None if b is None else b.to(device),
        labels.to(device), [g.to(device) for g in grads])
    ref = run_head(lambda a, c, d, l: linear_logprobs_reference(
        a, c, l, 0.8, True, True, bias=d, return_mean_logit=True, return_is_top1=True, **kw),
        h.double(), w.double(), None if b is None else b.double(), labels, grads)
    # is_top1 is exact where the label's logit is clear of every other (softcapping saturates
    # the largest logits into near-ties that float32 cannot order)
    z = head_transform(h.double() @ w.double().T, None if b is None else b.double(), **kw)
    lab = labels.reshape(N, -1)
    others = z[:, None, :].expand(N, lab.shape[1], V).scatter(-1, lab.clamp(min=0)[..., None], float("-inf"))
    clear = ((z.gather(1, lab.clamp(min=0)) - others.amax(-1)).abs() > 1e-4).reshape(labels.shape)
    clear[:2] = True  # the exact tie of tokens 0 and 1: the first maximum wins
    assert ours[4].dtype == torch.bool and torch.equal(ours[4].cpu()[clear], ref[4][clear])
    assert ref[4][clear].any() and not ref[4][clear].all() and clear.float().mean() > 0.7
    for x, y in zip(ours[:4], ref[:4]):
        close(x, y, 3e-5, 3e-5)
    for x, y in zip(ours[5:], ref[5:]):  # gradients: sums over 9000 fp32 terms, the tied rows' logits large
        close(x, y, 1e-4, 1e-4)


def test_linear_logprobs_head_reference_gradcheck():
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 2])

    def f(h, w, b):
        return torch.cat([x.flatten() for x in linear_logprobs_reference(
            h, w, labels, 0.7, True, True, bias=b, logit_scale=1.3, softcap=2.0, return_mean_logit=True)])

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_linear_logprobs_bad_input():
    h, w, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="weight must be"):
        rlhfkern.linear_logprobs(h, w[:, :3], labels)
    with pytest.raises(ValueError, match="must match hidden"):
        rlhfkern.linear_logprobs(h, w.double(), labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        rlhfkern.linear_logprobs(h, w, labels + 10, backend="cpu")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        rlhfkern.linear_logprobs(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"bias must be \[10\]"):
        rlhfkern.linear_logprobs(h, w, labels, bias=torch.zeros(9))
    with pytest.raises(ValueError, match="bias must be"):
        rlhfkern.linear_logprobs(h, w, labels, bias=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="softcap must be None or a positive"):
        rlhfkern.linear_logprobs(h, w, labels, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite number"):
        rlhfkern.linear_logprobs(h, w, labels, logit_scale=float("nan"))


def test_compat_verl_linear_cross_entropy(backend_device):
    backend, device = backend_device
    h, w = torch.randn(2, 5, 16), torch.randn(500, 16) * 0.5
    labels = torch.randint(0, 500, (2, 5))
    lp, ent = compat_verl.linear_cross_entropy(h.to(device), w.to(device), labels.to(device), 0.9)
    e_lp, e_ent = linear_logprobs_reference(h.reshape(10, 16).double(), w.double(), labels.reshape(10), 0.9, True)
    assert lp.shape == (10,)
    close(lp, e_lp, 1e-5, 1e-5)
    close(ent, e_ent, 1e-5, 1e-5)


def _tp_check_linear(rank, world, backends):
    import torch.distributed as dist

    torch.manual_seed(0)
    N, H, shard = 9, 12, 50
    h = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(shard * world, H, dtype=torch.float64) * 0.4
    b = torch.randn(shard * world, dtype=torch.float64)
    labels = torch.randint(0, shard * world, (N,))
    head = dict(logit_scale=1.3, softcap=4.0)
    labels[:3] = head_transform(h @ w.T, b, **head).argmax(-1)[:3]  # some top-1 labels
    g = [torch.randn(N, dtype=torch.float64) for _ in range(4)]
    ref = run_head(lambda a, c, d, l: linear_logprobs_reference(a, c, l, 0.7, True, True, bias=d, return_mean_logit=True,
                                                                return_is_top1=True, **head), h, w, b, labels, g)
    mine = slice(rank * shard, (rank + 1) * shard)
    for backend in backends:
        ours = run_head(lambda a, c, d, l: rlhfkern.linear_logprobs(
            a, c, l, bias=d, temperature=0.7, return_entropy=True, return_sum_p2=True, return_mean_logit=True,
            return_is_top1=True, tp_group=dist.group.WORLD, backend=backend, **head), h.float(), w[mine].float(),
            b[mine].float(), labels, g)
        assert torch.equal(ours[4], ref[4]) and ref[4][:3].all()
        for x, y in zip(ours[:4] + ours[5:6], ref[:4] + ref[5:6]):  # per-token outputs, grad hidden (all-reduced)
            close(x, y, 2e-5, 2e-5)
        close(ours[6], ref[6][mine], 2e-5, 2e-5)  # grads of this rank's weight and bias shards
        close(ours[7], ref[7][mine], 2e-5, 2e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_linear_logprobs_vocab_parallel(tmp_path, world):
    run_tp(tmp_path, world, "_tp_check_linear")


@pytest.mark.skipif("cpu" not in rlhfkern.backends(), reason="the CPU backend is not built")
def test_cpu_sse_build_matches_the_reference_too():
    """The baseline (SSE, 4 lanes) build of the float32 row loops (run_sse_build) at a small
    vocabulary (rows 4 at a time) and a large one; bf16 logits take this build on every processor."""
    run_sse_build(
        "import torch, rlhfkern\n"
        "from rlhfkern.ops.logprob import logprobs_reference\n"
        "torch.manual_seed(0)\n"
        "for V in (37, 3001):\n"
        "    x = (torch.randn(7, V) * 3).requires_grad_(); labels = torch.randint(0, V, (7,)); x.data[2, :] = -float('inf')\n"
        "    x.data[2, 1] = 0.5; labels[2] = 1\n"
        "    lp, ent = rlhfkern.logprobs(x, labels, return_entropy=True, temperature=0.7, backend='cpu')\n"
        "    g, = torch.autograd.grad(lp.sum() + 0.3 * ent.sum(), x)\n"
        "    xd = x.detach().double().requires_grad_()\n"
        "    rlp, rent = logprobs_reference(xd, labels, 0.7, True)\n"
        "    rg, = torch.autograd.grad(rlp.sum() + 0.3 * rent.sum(), xd)\n"
        "    for a, b in ((lp, rlp), (ent, rent), (g, rg)):\n"
        "        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )


@pytest.mark.skipif("cpu" not in rlhfkern.backends(), reason="the CPU backend is not built")
@pytest.mark.parametrize("N,V", [(256, 4096), (16384, 40)])  # 4 and 3 tasks of the kernels' grain (csrc/cpu/grain.h)
def test_cpu_bitwise_across_thread_counts(N, V):
    """The CPU kernels reduce each row in a fixed order: one thread and two give the same bits
    (log-probs, entropy, d logits, plain and in-place backward) for shapes split into several tasks."""
    torch.manual_seed(0)
    x, labels = make(N, V)

    def run(inplace):
        leaf = x.clone().requires_grad_()
        lp, ent = rlhfkern.logprobs(leaf.view_as(leaf), labels, return_entropy=True, backend="cpu",
                                    inplace_backward=inplace)
        (lp.sum() + 0.3 * ent.sum()).backward()
        return lp.detach(), ent.detach(), leaf.grad

    for inplace in (False, True):
        one, two = at_threads(1, lambda: run(inplace)), at_threads(2, lambda: run(inplace))
        for a, b in zip(one, two):
            assert torch.equal(a, b)
