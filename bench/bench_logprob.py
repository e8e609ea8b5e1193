"""Log-prob benchmarks at N=4096 tokens, V=151936 (Qwen's vocabulary), fp32: time and peak
memory of rlhfkern.logprobs against what users run today, in the same run:
`log_softmax(logits.float()).gather(...)` (verl's naive path) and a chunked torch version (rows
in chunks of 256, as verl's logprobs_from_logits_v2 / OpenRLHF do). Peak memory is what one call
adds beyond the logits (and, with backward, beyond the logits' gradient buffer)."""

import pytest
import torch

import rlhfkern
from bench_gae import compiled
from conftest import peak_extra_bytes

N, V = 4096, 151936
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CHUNK = 256


def naive(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)


def chunked(logits, labels):
    return torch.cat([naive(x, l) for x, l in zip(logits.split(CHUNK), labels.split(CHUNK))])


def ours(backend, inplace=False):
    return lambda logits, labels: rlhfkern.logprobs(logits, labels, backend=backend, inplace_backward=inplace)


def impls(device):
    out = [("naive", "log_softmax + gather (naive)", naive, "baseline"), ("chunked", "chunked torch", chunked, "op")]
    for b in compiled(device, "logprob"):
        out += [(b, f"rlhfkern {b}", ours(b), "op"), (b + "-inplace", f"rlhfkern {b}, inplace_backward", ours(b, True), "op")]
    return out


CASES = [(d, mode, impl) for d in DEVICES for mode in ("fwd", "fwd+bwd") for impl in impls(d)
         if not (mode == "fwd" and impl[0].endswith("-inplace"))]


@pytest.mark.parametrize("device,mode,impl", CASES, ids=lambda x: x[0] if isinstance(x, tuple) else x)
def bench_logprobs(benchmark, device, mode, impl):
    name, label, fn, role = impl
    g = torch.Generator().manual_seed(0)
    leaf = (torch.randn(N, V, generator=g) * 2).to(device).requires_grad_(mode == "fwd+bwd")
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    benchmark.group = f"logprobs {mode} N={N} V={V} fp32 {device}"

    def call():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(leaf, labels)
        else:
            leaf.grad = None
            logits = leaf.view_as(leaf)  # a non-leaf over the same buffer, as a model's output is
            fn(logits, labels).sum().backward()
            out = None
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    call()  # warm-up
    leaf.grad = None  # the measured call allocates the gradient buffer anew; it does not count
    grad_bytes = leaf.numel() * leaf.element_size() if mode == "fwd+bwd" and not name.endswith("-inplace") else 0
    peak = peak_extra_bytes(call) - grad_bytes if device == "cpu" else None
    benchmark.extra_info.update(inner=1, label=label, role=role, peak_bytes=max(peak, 0) if peak is not None else None)
    benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=0)


# ----------------------------------------------------------------------------- fused with the LM head
H = 1024
N_LINEAR = {"cpu": 512, "cuda": 4096}  # the CPU runs each [N, H] x [H, V] matmul in seconds


def materialised(hidden, weight, labels):
    return naive(hidden @ weight.T, labels)


LINEAR_CASES = [(d, impl) for d in DEVICES for impl in
                [("materialised", "hidden @ weight.T + log_softmax + gather", materialised, "baseline")]
                + [(b, f"rlhfkern.linear_logprobs {b}",
                    (lambda b: lambda h, w, l: rlhfkern.linear_logprobs(h, w, l, backend=b))(b), "op")
                   for b in compiled(d, "logprob")]]


@pytest.mark.parametrize("device,impl", LINEAR_CASES, ids=lambda x: x[0] if isinstance(x, tuple) else x)
def bench_linear_logprobs(benchmark, device, impl):
    name, label, fn, role = impl
    n = N_LINEAR[device]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).to(device).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g).to(device)
    benchmark.group = f"linear logprobs fwd+bwd N={n} H={H} V={V} fp32 {device}"

    def call():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    grad_bytes = (hidden.numel() + weight.numel()) * 4
    peak = peak_extra_bytes(call) - grad_bytes if device == "cpu" else None
    logits_bytes = n * V * 4
    benchmark.extra_info.update(inner=1, label=f"{label} (peak / [N, V] fp32: {max(peak, 0) / logits_bytes:.3f})"
                                if peak is not None else label, role=role,
                                peak_bytes=max(peak, 0) if peak is not None else None)
    benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
