"""Outcome advantage estimators: every backend against the reference loop, the reference against
verl 0.9.1's own functions, the verl drop-ins, input validation."""

import numpy as np
import pytest
import torch

import rlhfkern
from rlhfkern.compat import verl as compat_verl
from rlhfkern.ops.advantages import (grpo_reference, reinforce_pp_baseline_reference, reinforce_pp_reference,
                                     rloo_reference)

from conftest import PEER_DTYPES, assert_like_peer, compiled_backends, need

UIDS = np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p3", "p3", "p1", "p4", "p0", "p2"], dtype=object)


def inputs(dtype=torch.float32, device="cpu"):
    B, T = len(UIDS), 23
    r = torch.zeros(B, T, dtype=torch.float64)
    m = (torch.rand(B, T) > 0.3).double()
    m[3, 15:] = 0
    m[5, :4] = 0  # a leading masked span
    lengths = m.cumsum(-1).argmax(-1)
    r[torch.arange(B), lengths] = torch.randn(B, dtype=torch.float64)  # outcome reward on the last token
    r[0, 2] = 0.5  # and a second reward in one row (scores sum all tokens)
    _, ids = np.unique(UIDS, return_inverse=True)
    return r.to(dtype).to(device), m.to(device), torch.as_tensor(ids, device=device)


def close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- reference vs verl
def test_reference_matches_verl():
    from types import SimpleNamespace

    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    r, m, ids = inputs()
    for norm in (True, False):
        expected, _ = core_algos.compute_grpo_outcome_advantage(r.clone(), m, UIDS, norm_adv_by_std_in_grpo=norm)
        close(grpo_reference(r, m, ids, norm_by_std=norm), expected, 1e-6, 1e-6)
    close(rloo_reference(r, m, ids), core_algos.compute_rloo_outcome_advantage(r.clone(), m, UIDS)[0], 1e-6, 1e-6)
    close(reinforce_pp_baseline_reference(r, m, ids),
          core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(r.clone(), m, UIDS)[0], 1e-6, 1e-6)
    dense = torch.randn_like(r)  # REINFORCE++ discounts token-level rewards
    adv, ret = core_algos.compute_reinforce_plus_plus_outcome_advantage(dense, m, config=SimpleNamespace(gamma=0.9))
    ours = reinforce_pp_reference(dense, m, 0.9)
    close(ours[0], adv, 1e-6, 1e-6)
    close(ours[1], ret, 1e-6, 1e-6)


def test_grpo_reference_by_hand():
    r = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 1.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1])
    a = grpo_reference(r, m, ids, epsilon=0.0)
    s = torch.tensor([1.0, 3.0], dtype=torch.float64)
    expected0 = (s - 2.0) / s.std()
    close(a, torch.tensor([[expected0[0], 0.0], [expected0[1], expected0[1]], [6.0, 6.0]], dtype=torch.float64),
          1e-15, 1e-15)  # a group of one keeps its score (mean 0, std 1)


# ----------------------------------------------------------------------------- backends
def test_backends_match_reference(backend_device):
    backend, device = backend_device
    r, m, ids = inputs(torch.float64, device)
    rc, mc, idc = r.cpu(), m.cpu(), ids.cpu()
    for norm in (True, False):
        close(rlhfkern.grpo_advantage(r, m, ids, norm_by_std=norm, epsilon=1e-6, backend=backend),
              grpo_reference(rc, mc, idc, 1e-6, norm), 1e-12, 1e-12)
    close(rlhfkern.rloo_advantage(r, m, ids, backend=backend), rloo_reference(rc, mc, idc), 1e-12, 1e-12)
    close(rlhfkern.reinforce_pp_baseline_advantage(r, m, ids, backend=backend),
          reinforce_pp_baseline_reference(rc, mc, idc), 1e-10, 1e-10)
    dense = torch.randn_like(r)
    for gamma in (1.0, 0.9):
        adv, ret = rlhfkern.reinforce_pp_advantage(dense, m, gamma, backend=backend)
        e_adv, e_ret = reinforce_pp_reference(dense.cpu(), mc, gamma)
        close(adv, e_adv, 1e-10, 1e-10)
        close(ret, e_ret, 1e-10, 1e-10)


def test_backends_fractional_mask_and_bf16(backend_device):
    backend, device = backend_device
    r, m, ids = inputs(torch.bfloat16, device)
    frac = m * torch.rand_like(m)
    adv, ret = rlhfkern.reinforce_pp_advantage(r, frac, 0.95, backend=backend)
    assert adv.dtype == torch.float32
    e_adv, e_ret = reinforce_pp_reference(r.cpu().double(), frac.cpu(), 0.95)
    close(ret, e_ret, 1e-5, 1e-5)
    close(adv, e_adv, 1e-4, 1e-4)
    close(rlhfkern.grpo_advantage(r, m, ids, backend=backend), grpo_reference(r.cpu().double(), m.cpu(), ids.cpu()),
          1e-5, 1e-5)


def test_every_row_its_own_group(backend_device):
    backend, device = backend_device
    r, m, _ = inputs(torch.float64, device)
    ids = torch.arange(r.shape[0], device=device)
    close(rlhfkern.grpo_advantage(r, m, ids, epsilon=0.0, backend=backend), r.sum(-1, keepdim=True) * m, 0, 0)
    close(rlhfkern.rloo_advantage(r, m, ids, backend=backend), r.sum(-1, keepdim=True) * m, 0, 0)


# ----------------------------------------------------------------------------- verl drop-ins
@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + compiled_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_matches_verl(monkeypatch, backend_device):
    from types import SimpleNamespace

    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    r, m, _ = inputs()
    for name in ("compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
                 "compute_reinforce_plus_plus_baseline_outcome_advantage"):
        theirs = getattr(core_algos, name)(r.clone(), m, UIDS)
        ours = getattr(compat_verl, name)(r.to(device), m.to(device), UIDS)
        close(ours[0], theirs[0], 1e-5, 1e-6)
        close(ours[1], theirs[1], 1e-5, 1e-6)
    ours = compat_verl.compute_grpo_outcome_advantage(r.to(device), m.to(device), list(UIDS), 1e-3, False)
    close(ours[0], core_algos.compute_grpo_outcome_advantage(r.clone(), m, UIDS, 1e-3, False)[0], 1e-5, 1e-6)
    cfg = SimpleNamespace(gamma=0.97)
    dense = torch.randn_like(r)
    theirs = core_algos.compute_reinforce_plus_plus_outcome_advantage(dense, m, config=cfg)
    ours = compat_verl.compute_reinforce_plus_plus_outcome_advantage(dense.to(device), m.to(device), config=cfg)
    close(ours[0], theirs[0], 1e-5, 1e-6)
    close(ours[1], theirs[1], 1e-5, 1e-6)


@pytest.mark.parametrize("backend_device", [("torch", "cpu")] + compiled_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def test_compat_verl_multi_turn_and_trajectories_match_verl(monkeypatch, backend_device):
    """The inputs of verl's own multi-turn REINFORCE++ and multi-trajectory GRPO tests, which compare
    two calls with each other (they pass whatever the values, tests/tier_peers/REACH.md), here against
    verl 0.9.1's functions: REINFORCE++ with observation spans (mask 0 between assistant tokens) and
    trailing padding; GRPO over one group with an integer mask, rewards of 100-200 and an all-masked
    row, and its split into trajectories (the uids verl's multi-trajectory helper makes)."""
    from types import SimpleNamespace

    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    backend, device = backend_device
    monkeypatch.setenv("RLHFKERN_BACKEND", backend)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
                         [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, -1.0, 0.0, 0.0, 0.0],
                            [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 2.0]])
    for gamma in (1.0, 0.9):
        cfg = SimpleNamespace(gamma=gamma)
        theirs = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
        ours = compat_verl.compute_reinforce_plus_plus_outcome_advantage(rewards.to(device), mask.to(device), config=cfg)
        for o, t in zip(ours, theirs):
            close(o, t, 1e-5, 1e-6)
    rewards = torch.tensor([[100, 0, 0, 0], [1, 2, 3, 4], [200, 200, 0, 0], [150, 0, 0, 150], [4, 5, 6, 7],
                            [8, 9, 10, 11]], dtype=torch.float32)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0]])
    for uids in (np.array(["prompt_a"] * 6, dtype=object),
                 np.array(["prompt_a_0", "prompt_a_0", "prompt_a_2", "prompt_a_2", "prompt_a_3", "prompt_a_4"],
                          dtype=object)):
        for norm in (True, False):
            theirs = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, uids, norm_adv_by_std_in_grpo=norm)
            ours = compat_verl.compute_grpo_outcome_advantage(rewards.to(device), mask.to(device), uids,
                                                              norm_adv_by_std_in_grpo=norm)
            for o, t in zip(ours, theirs):
                assert o.dtype == t.dtype, (o.dtype, t.dtype)
                close(o, t, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", PEER_DTYPES, ids=str)
def test_compat_verl_dtype_matches_verl(dtype):
    """The verl drop-ins return verl's dtype (the rewards' promoted with the mask's; reinforce++'s
    returns: the rewards') and, for fp16/bf16, are no farther from verl on fp64 inputs than verl's
    own. Measured max |error| against verl on the inputs widened to fp64, same-dtype mask (the -s
    output has all): fp16: grpo ours 3.6e-4 / verl's 9.0e-4, rloo 4.1e-4 / 5.7e-4, reinforce++
    baseline 3.7e-4 / 1.3e-3, reinforce++ 8.1e-4 / 3.2e-3 (returns 3.8e-3 / 9.3e-3); bf16: 1.7e-3 /
    6.1e-3, 7.8e-3 / 7.8e-3, 2.5e-3 / 5.7e-3, 7.5e-3 / 2.9e-2 (2.9e-2 / 1.0e-1)."""
    from types import SimpleNamespace

    need("verl", extra="test")
    from verl.trainer.ppo import core_algos

    r, m, _ = inputs(torch.float64)
    dense = torch.randn_like(r)
    cfg = SimpleNamespace(gamma=0.97)
    for mask in (m.to(dtype), m.float(), m.long()):
        calls = [(name, lambda mod, rw, mk, name=name: getattr(mod, name)(rw.clone(), mk, UIDS), r)
                 for name in ("compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
                              "compute_reinforce_plus_plus_baseline_outcome_advantage")]
        calls.append(("compute_reinforce_plus_plus_outcome_advantage",
                      lambda mod, rw, mk: mod.compute_reinforce_plus_plus_outcome_advantage(rw, mk, config=cfg), dense))
        for name, call, rewards in calls:
            rw = rewards.to(dtype)
            theirs, ours = call(core_algos, rw, mask), call(compat_verl, rw, mask)
            exact = call(core_algos, rw.double(), mask.double())
            for i in range(2):
                # fp64: verl's grpo divides a one-sample group by float32 (1.0 + epsilon), verl's whitening
                # with a float32/int mask rounds its counts in float32: both 2e-8 to 6e-8 off
                assert_like_peer(ours[i], theirs[i], exact[i], f"{name}[{i}] {dtype} mask {mask.dtype}",
                                 by_error=mask.dtype != dtype and dtype != torch.float64, fp64_tol=1e-7)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    r, m, ids = inputs()
    with pytest.raises(ValueError, match="index has shape"):
        rlhfkern.grpo_advantage(r, m, ids[:5])
    with pytest.raises(ValueError, match="index must be an integer tensor"):
        rlhfkern.rloo_advantage(r, m, ids.float())
    with pytest.raises(ValueError, match=r"index values must lie in \[0, B\)"):
        rlhfkern.grpo_advantage(r, m, ids + 100)
    with pytest.raises(ValueError, match="mask has shape"):
        rlhfkern.grpo_advantage(r, m[:, :3], ids)
    with pytest.raises(ValueError, match="token_level_rewards must be a floating tensor"):
        rlhfkern.reinforce_pp_baseline_advantage(r.long(), m, ids)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        rlhfkern.reinforce_pp_advantage(r, m, 1.5)
    with pytest.raises(ValueError, match="epsilon must be a non-negative number"):
        rlhfkern.grpo_advantage(r, m, ids, epsilon=-1.0)
