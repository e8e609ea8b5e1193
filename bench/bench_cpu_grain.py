"""CPU log-probs at small and large vocabularies, on a quiet and on a loaded machine, in one run:
selective log-softmax + entropy, forward and backward (the shape TRL's GRPO uses: rows =
batch x sequence), rlhfkern's CPU backend against eager torch as TRL computes it
(`selective_log_softmax`: log_softmax + gather; `entropy_from_logits`: -(p log p).sum from the same
log_softmax). "loaded" rows run while two other processes spin Python loops (two busy cores'
worth of competition, started by a fixture and stopped after the loaded rows), "quiet" rows
without them (the machine's other load is whatever else runs on it: read the load average in the
header of the results). Rows x threads: torch's default thread count and one thread.

A second group times `rlhfkern.linear_logprobs` (hidden @ weight^T in 128-row matmuls, reduced
one block of them at a time: at V=40 one block holds 204 tiles, so one kernel call a direction for
4096 rows) at V=40 against the materialised eager version and against TRL 1.16's fused LM head
(`trl.kernels.ChunkedLogProbFunction`, its CPU torch path: what GRPOTrainer runs there).

    python -m pytest bench/bench_cpu_grain.py --bench-md bench/results/cpu-grain.md
"""

import os
import subprocess
import sys

import pytest
import torch

import rlhfkern

# (rows, V): TRL's GRPO batch x sequence at a toy vocabulary, a 32k vocabulary, Qwen's at fewer rows
SHAPES = [(4096, 40), (4096, 32000), (512, 151936)]
THREADS = [torch.get_num_threads(), 1] if torch.get_num_threads() > 1 else [1]
LINEAR = (4096, 64, 40)  # rows, hidden, V


@pytest.fixture(scope="module", params=["quiet", "loaded"])
def load(request):
    """None, or two subprocesses spinning Python loops for as long as the loaded rows run."""
    procs = []
    if request.param == "loaded":
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield request.param
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture(params=THREADS, ids=lambda t: f"{t}thr")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def eager(logits, labels):
    """TRL: selective_log_softmax (log_softmax + gather) and entropy_from_logits."""
    logps = torch.log_softmax(logits, -1)
    lp = logps.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(logps.exp() * logps).sum(-1)
    return lp, ent


def ours(logits, labels):
    lp, ent = rlhfkern.logprobs(logits, labels, return_entropy=True, backend="cpu")
    return lp, ent


IMPLS = [("eager", "eager torch (TRL: log_softmax + gather, entropy)", eager, "baseline"),
         ("cpu", "rlhfkern cpu", ours, "op")]


def label(base, load, threads):
    return f"{base} [{threads} thr, {load}, load avg {os.getloadavg()[0]:.1f}]"


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i[0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xV{s[1]}")
def bench_logprobs_entropy(benchmark, load, threads, shape, impl):
    name, text, fn, role = impl
    n, v = shape
    g = torch.Generator().manual_seed(0)
    leaf = (torch.randn(n, v, generator=g) * 2).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    benchmark.group = f"logprobs+entropy fwd+bwd N={n} V={v} fp32 cpu, {threads} threads, {load}"

    def call():
        leaf.grad = None
        lp, ent = fn(leaf.view_as(leaf), labels)
        (lp.sum() + 0.01 * ent.sum()).backward()

    benchmark.extra_info.update(inner=1, label=label(text, load, threads), role=role)
    rounds = 50 if n * v <= 4096 * 40 else 3  # sub-millisecond calls on a noisy VM: many rounds
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def materialised(hidden, weight, labels):
    return eager(hidden @ weight.T, labels)


def fused(hidden, weight, labels):
    return rlhfkern.linear_logprobs(hidden, weight, labels, return_entropy=True, backend="cpu")


def trl_fused_head(hidden, weight, labels):
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("entropy",))[:2]


@pytest.mark.parametrize("impl", [("eager", "eager torch (hidden @ weight.T, log_softmax + gather, entropy)",
                                   materialised, "baseline"),
                                  ("trl", "TRL 1.16 ChunkedLogProbFunction (CPU torch path)", trl_fused_head, "peer"),
                                  ("cpu", "rlhfkern.linear_logprobs cpu", fused, "op")],
                         ids=lambda i: i[0])
def bench_linear_logprobs_small_vocab(benchmark, load, threads, impl):
    name, text, fn, role = impl
    n, h, v = LINEAR
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    benchmark.group = f"linear logprobs+entropy fwd+bwd N={n} H={h} V={v} fp32 cpu, {threads} threads, {load}"

    def call():
        hidden.grad = weight.grad = None
        lp, ent = fn(hidden, weight, labels)
        (lp.sum() + 0.01 * ent.sum()).backward()

    benchmark.extra_info.update(inner=1, label=label(text, load, threads), role=role)
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=1)
