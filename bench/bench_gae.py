"""GAE benchmarks: each backend that runs here against the loop users run today (verl/OpenRLHF
style: a Python loop over reversed time with torch ops, i.e. our "torch" reference, and verl
0.9.1's own compute_gae_advantage_return for the whitened variant), in the same run.

Groups per shape and device; on a GPU a "copy" row times copying the op's bytes (inputs read,
outputs written) once, the floor a memory-bound kernel can approach. Without verl installed (the
GPU image), the verl rows are our torch reference (the same Python loop over time).

RLHFKERN_BENCH_DEVICES=cuda (or cpu) limits every bench file to those devices."""

import importlib.util
import os

import pytest
import torch

import rlhfkern
from rlhfkern import _dispatch
from rlhfkern.compat import verl as compat_verl

SHAPES = {"cpu": [(64, 1024), (256, 4096)], "cuda": [(64, 1024), (256, 4096), (1024, 8192)]}
DEVICES = [d for d in os.environ.get("RLHFKERN_BENCH_DEVICES", "cpu,cuda").split(",")
           if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
GPU_INNER = 20  # launches per timed call on the GPU: one sync per call would dominate
HAS_VERL = importlib.util.find_spec("verl") is not None
NO_VERL = " (verl not installed: rlhfkern's torch reference, the same loop)"


def compiled(device, op="gae"):
    """The compiled backends of `op` worth timing on `device` (the Triton interpreter is not)."""
    names = ["cpu"] if device == "cpu" else ["triton"] + (["cuda"] if op in ("gae", "advantages") else [])  # CUDA kernels
    return [b for b in names if _dispatch.why_unavailable(b, device) is None
            and not (b == "triton" and _dispatch.triton_interpreted())]


def make_inputs(B, T, device):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, T, generator=g).to(device)
    v = torch.randn(B, T, generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B, 1), generator=g)
    m = (torch.arange(T)[None] < lengths).float().to(device)
    return r, v, m


def timed(benchmark, fn, device, slow, label, role):
    inner = 1 if device == "cpu" or slow else GPU_INNER

    def call():
        for _ in range(inner):
            out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(inner=inner, label=label, role=role)
    benchmark.pedantic(call, rounds=3 if slow else 15, iterations=1, warmup_rounds=1)


def copy_floor(benchmark, nbytes, group):
    """A "copy" row: one device-to-device copy of nbytes / 2 bytes, i.e. nbytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    benchmark.group = group
    benchmark.extra_info.update(nbytes=nbytes)
    timed(benchmark, lambda: dst.copy_(src), "cuda", False, f"copy of the same bytes ({nbytes / 2**20:.0f} MiB "
          "read + written)", "copy")


CASES = [(s, d, b) for d in DEVICES for s in SHAPES[d] for b in ["loop"] + compiled(d)]


@pytest.mark.parametrize("shape,device,backend", CASES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
def bench_gae(benchmark, shape, device, backend):
    B, T = shape
    r, v, m = make_inputs(B, T, device)
    benchmark.group = f"gae {B}x{T} fp32 {device}"
    which = "torch" if backend == "loop" else backend
    label = "verl-style loop (torch)" if backend == "loop" else backend
    timed(benchmark, lambda: rlhfkern.gae(r, v, m, 0.99, 0.95, backend=which), device, backend == "loop",
          label, "baseline" if backend == "loop" else "op")


@pytest.mark.parametrize("shape", SHAPES["cuda"], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.skipif("cuda" not in DEVICES, reason="the copy floor is a GPU figure")
def bench_gae_copy_floor(benchmark, shape):
    B, T = shape
    # rewards, values, mask (fp32) read; advantages, returns written
    copy_floor(benchmark, B * T * 4 * (3 + 2), f"gae {B}x{T} fp32 cuda")


WHITEN_CASES = [(s, d, b) for d in DEVICES for s in SHAPES[d] for b in ["verl"] + compiled(d)]


@pytest.mark.parametrize("shape,device,backend", WHITEN_CASES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
def bench_verl_gae_whitened(benchmark, monkeypatch, shape, device, backend):
    """The drop-in: verl's compute_gae_advantage_return (whitened) against ours."""
    B, T = shape
    r, v, m = make_inputs(B, T, device)
    benchmark.group = f"verl compute_gae_advantage_return {B}x{T} fp32 {device}"
    if backend == "verl" and HAS_VERL:
        from verl.trainer.ppo.core_algos import compute_gae_advantage_return as fn

        label, role = "verl 0.9.1", "baseline"
    elif backend == "verl":
        monkeypatch.setenv("RLHFKERN_BACKEND", "torch")
        fn, label, role = compat_verl.compute_gae_advantage_return, "verl-style loop" + NO_VERL, "baseline"
    else:
        monkeypatch.setenv("RLHFKERN_BACKEND", backend)
        fn, label, role = compat_verl.compute_gae_advantage_return, f"rlhfkern.compat.verl ({backend})", "op"
    timed(benchmark, lambda: fn(r, v, m, 0.99, 0.95), device, backend == "verl", label, role)
