"""Log-prob benchmarks at N=4096 tokens, V=151936 (Qwen's vocabulary), fp32, and on a GPU also
N=16384 in bf16 (the size of a real micro-batch): time and peak memory of rlhfkern.logprobs
against what users run today, in the same run: `log_softmax(logits.float()).gather(...)` (verl's
naive path) and a chunked torch version (rows in chunks of 256, as verl's logprobs_from_logits_v2
/ OpenRLHF do). Peak memory is what one call adds beyond the logits (and, with backward, beyond
the logits' gradient buffer). On a GPU a "copy" row per group times copying the bytes the op must
move: the logits read once (forward), or read twice and d logits written once (forward +
backward)."""

import pytest
import torch

import rlhfkern
from bench_gae import DEVICES, compiled, copy_floor
from conftest import peak_extra_bytes

V = 151936
CONFIGS = {"cpu": [(4096, torch.float32)], "cuda": [(4096, torch.float32), (16384, torch.bfloat16)]}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
CHUNK = 256
_BUFFERS = {}


def buffer(device, shape, dtype):
    """One large input buffer alive at a time, reused across cases (refilled by each case)."""
    key = (device, shape, dtype)
    if key not in _BUFFERS:
        _BUFFERS.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return _BUFFERS[key]


def fill_logits(device, n, dtype, requires_grad):
    """Logits ~ N(0, 2^2) generated on the device, and labels; an inplace_backward case writes its
    gradient into the buffer, so every case refills it."""
    g = torch.Generator(device).manual_seed(0)
    leaf = buffer(device, (n, V), dtype).requires_grad_(False)
    leaf.grad = None
    leaf.normal_(0.0, 2.0, generator=g)
    labels = torch.randint(0, V, (n,), generator=g, device=device)
    return leaf.requires_grad_(requires_grad), labels


def group_name(mode, n, dtype, device):
    return f"logprobs {mode} N={n} V={V} {DTYPE_NAMES[dtype]} {device}"


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


CASES = [(d, cfg, mode, impl) for d in DEVICES for cfg in CONFIGS[d] for mode in ("fwd", "fwd+bwd")
         for impl in impls(d) if not (mode == "fwd" and impl[0].endswith("-inplace"))]


def case_id(x):
    if isinstance(x, tuple):
        return f"{x[0]}x{DTYPE_NAMES[x[1]]}" if isinstance(x[0], int) else x[0]
    return x


@pytest.mark.parametrize("device,config,mode,impl", CASES, ids=case_id)
def bench_logprobs(benchmark, device, config, mode, impl):
    name, label, fn, role = impl
    n, dtype = config
    leaf, labels = fill_logits(device, n, dtype, mode == "fwd+bwd")
    benchmark.group = group_name(mode, n, dtype, device)

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
    peak = peak_extra_bytes(call, device) - grad_bytes
    benchmark.extra_info.update(inner=1, label=label, role=role, peak_bytes=max(peak, 0))
    benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=0)


COPY_CASES = [(cfg, mode) for cfg in CONFIGS["cuda"] for mode in ("fwd", "fwd+bwd")] if "cuda" in DEVICES else []


@pytest.mark.parametrize("config,mode", COPY_CASES, ids=case_id)
def bench_logprobs_copy_floor(benchmark, config, mode):
    n, dtype = config
    _BUFFERS.clear()
    logits_bytes = n * V * torch.finfo(dtype).bits // 8
    copy_floor(benchmark, logits_bytes * (1 if mode == "fwd" else 3), group_name(mode, n, dtype, "cuda"))


# ----------------------------------------------------------------------------- fused with the LM head
# (N, H, dtype); the CPU runs each [N, H] x [H, V] matmul in seconds
LINEAR_CONFIGS = {"cpu": [(512, 1024, torch.float32)],
                  "cuda": [(4096, 1024, torch.float32), (16384, 4096, torch.bfloat16)]}


def materialised(hidden, weight, labels):
    return naive(hidden @ weight.T, labels)


LINEAR_CASES = [(d, cfg, impl) for d in DEVICES for cfg in LINEAR_CONFIGS[d] for impl in
                [("materialised", "hidden @ weight.T + log_softmax + gather", materialised, "baseline")]
                + [(b, f"rlhfkern.linear_logprobs {b}",
                    (lambda b: lambda h, w, l: rlhfkern.linear_logprobs(h, w, l, backend=b))(b), "op")
                   for b in compiled(d, "logprob")]]


def linear_id(x):
    if isinstance(x, tuple):
        return f"{x[0]}x{x[1]}x{DTYPE_NAMES[x[2]]}" if isinstance(x[0], int) else x[0]
    return x


@pytest.mark.parametrize("device,config,impl", LINEAR_CASES, ids=linear_id)
def bench_linear_logprobs(benchmark, device, config, impl):
    name, label, fn, role = impl
    n, H, dtype = config
    _BUFFERS.clear()
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, H, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g, device=device)
    benchmark.group = f"linear logprobs fwd+bwd N={n} H={H} V={V} {DTYPE_NAMES[dtype]} {device}"

    def call():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    if device == "cuda":
        call()  # warm-up: Triton compiles, cuBLAS picks its kernels
    peak = peak_extra_bytes(call, device) - grad_bytes  # also the CPU's warm-up
    logits_bytes = n * V * 4
    benchmark.extra_info.update(inner=1, label=f"{label} (peak / [N, V] fp32: {max(peak, 0) / logits_bytes:.3f})",
                                role=role, peak_bytes=max(peak, 0))
    benchmark.pedantic(call, rounds=1 if device == "cpu" else 2, iterations=1, warmup_rounds=0)
