"""Outcome advantage benchmarks: GRPO and RLOO by segment reductions against verl 0.9.1's own
functions (a Python loop over the batch), in the same run: 4096 responses in groups of 8, 1024
tokens each, fp32."""

import numpy as np
import pytest
import torch

from bench_gae import DEVICES, HAS_VERL, NO_VERL, compiled
from rlhfkern.compat import verl as compat_verl

B, T, GROUP = 4096, 1024, 8
CASES = [(name, d, b) for name in ("grpo", "rloo") for d in DEVICES for b in ["verl"] + compiled(d, "advantages")]
FUNCTIONS = {"grpo": "compute_grpo_outcome_advantage", "rloo": "compute_rloo_outcome_advantage"}


@pytest.mark.parametrize("name,device,backend", CASES)
def bench_outcome_advantage(benchmark, monkeypatch, name, device, backend):
    g = torch.Generator().manual_seed(0)
    rewards = torch.zeros(B, T)
    rewards[:, -1] = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    uids = np.array([f"prompt-{i // GROUP}" for i in range(B)], dtype=object)
    rewards, mask = rewards.to(device), mask.to(device)
    benchmark.group = f"{name} advantages {B}x{T} fp32 {device}"
    if backend == "verl" and HAS_VERL:
        from verl.trainer.ppo import core_algos

        fn, label, role = getattr(core_algos, FUNCTIONS[name]), "verl 0.9.1 (Python loop)", "baseline"
    elif backend == "verl":
        monkeypatch.setenv("RLHFKERN_BACKEND", "torch")
        fn, label, role = getattr(compat_verl, FUNCTIONS[name]), "Python loop over groups" + NO_VERL, "baseline"
    else:
        monkeypatch.setenv("RLHFKERN_BACKEND", backend)
        fn, label, role = getattr(compat_verl, FUNCTIONS[name]), f"rlhfkern.compat.verl ({backend})", "op"

    def call():
        out = fn(rewards, mask, uids)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(inner=1, label=label, role=role)
    benchmark.pedantic(call, rounds=3 if backend == "verl" else 10, iterations=1, warmup_rounds=1)
