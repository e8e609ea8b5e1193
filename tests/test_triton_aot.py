"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) over the quick covering set, with no
register spill, shared memory within the card's limit and at most 1024 threads per block; the
specializations come from our launchers, and random public-API calls land inside the full set."""

import dataclasses
import importlib.util
import os
import random
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install 'rlhfkern[triton]'): nothing to compile")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def aot():
    from rlhfkern.triton_kernels import aot

    return aot


@pytest.fixture(scope="module")
def full(aot):
    return aot.full_specs()


def test_every_kernel_is_in_the_full_set(aot, full):
    kernels = {name for name, fn in aot.jit_functions().items() if name.endswith("_kernel")}
    assert kernels, "no @triton.jit *_kernel found in rlhfkern.triton_kernels"
    assert kernels == {s.kernel for s in full}, "launched kernels differ from the *_kernel functions"


def test_full_set_has_every_dtype_block_and_branch(aot, full):
    import torch

    assert {t for s in full for n, t in s.signature if n == "m_ptr"} >= {
        "*" + aot._TORCH_TO_TRITON[str(d).removeprefix("torch.")] for d in aot.mask_dtypes()}
    blocks = {}
    for s in full:
        blocks.setdefault(s.kernel, set()).update(v for _, v in s.blocks())
    assert blocks["gae._masked_row_sums_kernel"] == {2**k for k in range(4, 13)}  # 16 .. 4096
    assert blocks["ppo_loss._actor_kernel"] == {2**k for k in range(4, 11)}  # 16 .. 1024
    actor = [s for s in full if s.kernel == "ppo_loss._actor_kernel"]
    assert {dict(s.constexprs)["KL_BASE"] for s in actor} == {0, 1, 2, 3}
    assert {(dict(s.constexprs)["BACKWARD"], dict(s.constexprs)["ENTROPY_GRAD"]) for s in actor} == {
        (False, False), (True, False), (True, True)}
    assert torch.float64 in aot.float_dtypes()


def test_random_api_calls_are_covered(aot, full):
    """Calls the full set was not built from (random lengths, mixed dtypes, other shapes): every
    launch they make must be covered, else the set has drifted from the launchers."""
    import torch

    rng = random.Random(0)
    fd, md = aot.float_dtypes(), aot.mask_dtypes()
    coin = lambda: rng.random() < 0.5  # noqa: E731
    with aot.capture() as found:
        for _ in range(60):
            T = rng.randint(1, 9000)
            d, d2, m = rng.choice(fd), rng.choice(fd), rng.choice(md)
            aot.run_gae(d, m, T, whiten=coin(), shift_mean=coin(), B=rng.randint(1, 3), values_dtype=d2)
            aot.run_actor(d, m, T, entropy=coin(), ref=coin(), kl_kind=rng.choice(aot.kl_kinds()),
                          clip_c=rng.choice([None, 2.5]), is_weights=coin(), old_dtype=d2)
            aot.run_value(d, m, T)
            aot.run_kl(d, T, rng.choice(aot.kl_kinds()))
            aot.run_logprobs(d, min(T, 5000), entropy=coin(), inplace=coin(), K=rng.choice([None, 2]),
                             linear=rng.random() < 0.3, p2=coin())
        import rlhfkern  # a 3-D whiten (rows of the last dim)

        rlhfkern.masked_whiten(torch.randn(2, 3, 700), torch.ones(2, 3, 700, dtype=torch.bool), backend="triton")
    assert len(found) > 50
    missing = [why for why in (aot.covered(s, full) for s in sorted(found)) if why]
    assert not missing, "launchers chose specializations the full set misses:\n" + "\n".join(missing[:20])
    # and the check can fail: warps or a branch the set never launched
    some = sorted(found)[0]
    assert aot.covered(dataclasses.replace(some, num_warps=2), full) is not None
    assert aot.covered(dataclasses.replace(some, constexprs=some.constexprs + (("NEW", 1),)), full) is not None


def test_quick_set_covers_every_feature(aot, full):
    quick = aot.quick_specs(full)
    assert set(quick) <= set(full)
    assert len(quick) < len(full) / 4
    assert {s.kernel for s in quick} == {s.kernel for s in full}
    for kernel in {s.kernel for s in full}:
        for key in ("constexprs", "signature"):
            want = {p for s in full if s.kernel == kernel for p in getattr(s, key)}
            have = {p for s in quick if s.kernel == kernel for p in getattr(s, key)}
            assert have == want, f"{kernel}: quick set misses {sorted(want - have, key=str)[:5]}"


def test_check_reports_spills_and_shared_memory(aot, full):
    """The checker itself: a spilling specialization and an oversized block are errors."""
    spec = next(s for s in full if s.kernel == "gae._masked_row_sums_kernel"
                and dict(s.constexprs)["BLOCK_T"] == 4096 and dict(s.signature)["x_ptr"] == "*fp64")
    # one warp for 4096 fp64 elements: far more than 255 registers per thread
    heavy = aot.Spec(spec.kernel, spec.signature, spec.constexprs, 1, spec.num_stages)
    res = _in_subprocess(aot, heavy, 80)
    assert "register spills" in res.error and res.spill_stores > 0, res
    too_wide = aot.Spec(spec.kernel, spec.signature, spec.constexprs, 64, spec.num_stages)
    assert "threads per block" in aot.check(too_wide, 90).error
    assert aot.SHARED_LIMIT == {80: 166912, 90: 232448}


def _in_subprocess(aot, spec, arch):
    """check() needs Triton's compiler, not its interpreter (set for the other tests): run it in a
    spawned process as the CLI does."""
    return aot.run_checks([spec], [arch], jobs=1)[0]


def test_quick_set_compiles_for_sm80_and_sm90(tmp_path):
    """`python -m rlhfkern.triton_kernels.aot --quick`: every kernel, both targets; fails on any
    compile error, spill, shared memory over the limit or block over 1024 threads."""
    out = tmp_path / "aot.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "rlhfkern.triton_kernels.aot", "--quick", "--arch", "80,90",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert "result: passed" in text
    for kernel in ("_gae_kernel", "_masked_row_sums_kernel", "_whiten_apply_kernel", "_logprob_fwd_kernel",
                   "_logprob_bwd_kernel", "_actor_kernel", "_value_kernel", "_kl_kernel"):
        for arch in (80, 90):
            assert f"{kernel} | sm_{arch} |" in text, f"{kernel} sm_{arch} missing from the report"
