"""Test set-up. Triton runs in its interpreter on a machine without a GPU: TRITON_INTERPRET must
be set before triton is first imported, so it is set here, before any test module loads."""

import math
import os
import sys

import torch

# on a GPU Triton compiles: never force the interpreter there. (A worker forked from
# run_processes' forkserver inherits TRITON_INTERPRET=1 and triton with it.)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    assert sys.modules.get("triton") is None, "triton was imported before tests/conftest.py could configure it"
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

GPU = torch.cuda.is_available()


def need(*modules, extra):
    """Skips the caller (a test, or a whole test module when called at its top) unless every one
    of `modules` imports: they come with `pip install 'rlhfkern[<extra>]'`."""
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not installed (pip install 'rlhfkern[{extra}]')")


HAVE_TRITON = importlib.util.find_spec("triton") is not None

# tests/tier_vllm runs in its own venvs with vLLM (`make test-vllm`): vLLM pins another torch.
# (Not named tests/vllm: with tests/ on sys.path that folder would pass for the vllm package.)
collect_ignore = [] if os.environ.get("RLHFKERN_TEST_VLLM") == "1" else ["tier_vllm"]


def backend_pairs(op_backends=("cpu", "triton", "cuda")):
    """(backend, device) pairs every compiled backend is tested on. No GPU here: the C++ CPU
    kernels and Triton through its interpreter; with a GPU: C++ CPU, Triton and CUDA on the GPU.
    `op_backends`: the backends the family has (a family without a CUDA kernel: its module's
    OP_BACKENDS). A backend that should run but cannot fails its tests (it is not skipped)."""
    pairs = [("cpu", "cpu")]
    if GPU:
        pairs += [("triton", "cuda"), ("cuda", "cuda")]
    else:
        pairs += [("triton", "cpu")]
    return [p for p in pairs if p[0] in op_backends]


def compiled_backends(op_backends=("cpu", "triton", "cuda")):
    """backend_pairs as pytest parameters: the Triton ones skip, with the reason, when triton (an
    extra) is not installed."""
    no_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install 'rlhfkern[triton]')")
    return [pytest.param(p, marks=no_triton) if p[0] == "triton" else p for p in backend_pairs(op_backends)]


@pytest.fixture(params=compiled_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def openrlhf_losses():
    """OpenRLHF 0.11.2's own models/loss.py and models/utils.py. The package `openrlhf.models`
    imports model code that needs deepspeed and flash-attn (CUDA builds, not installable here), so
    these two files are loaded on their own; `deepspeed`, imported by utils.py for functions the
    tests never call, is an empty stand-in while they load when it is not installed (removed after:
    a module without a spec left in sys.modules breaks importlib.util.find_spec("deepspeed"),
    which accelerate calls from transformers' save_pretrained)."""
    import importlib
    import os
    import sys
    import types

    openrlhf = pytest.importorskip("openrlhf", reason="openrlhf is not installed (pip install --no-deps "
                                   "openrlhf==0.11.2: its own dependencies need CUDA builds)")

    stand_in = "deepspeed" not in sys.modules and importlib.util.find_spec("deepspeed") is None
    if stand_in:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        package = types.ModuleType("openrlhf_models_under_test")
        package.__path__ = [os.path.join(os.path.dirname(openrlhf.__file__), "models")]
        sys.modules.setdefault(package.__name__, package)
        loss = importlib.import_module(package.__name__ + ".loss")
        utils = importlib.import_module(package.__name__ + ".utils")
    finally:
        if stand_in:
            del sys.modules["deepspeed"]
    return loss, utils


@contextlib.contextmanager
def gloo_process(rank, world, init_file, failures):
    """One rank of a gloo group in a spawned test worker; an error is reported to the parent
    through `failures` (see run_processes), which fails the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    except Exception as e:
        failures.put(f"rank {rank}: {type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


# What every worker imports, imported once in the forkserver that forks them: a spawned worker
# spent seconds importing torch, transformers and megatron-core again, for every rank of every test.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "rlhfkern", "transformers", "megatron.core"]


def run_processes(worker, world, tmp_path, *args):
    """Runs worker(rank, world, init_file, failures, *args) in `world` processes (forked from a
    forkserver holding FORKSERVER_PRELOAD) and fails with every rank's reported error."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in FORKSERVER_PRELOAD if importlib.util.find_spec(m.split(".")[0])])
    failures = ctx.SimpleQueue()
    mp.start_processes(worker, args=(world, str(tmp_path / "init"), failures) + args, nprocs=world,
                       start_method="forkserver")
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, errors


@pytest.fixture(scope="session")
def ray_gpus(tmp_path_factory):
    """One local Ray for the whole test session with 8 logical GPUs (a machine without GPUs: the
    placement groups and fractional GPU requests behave as on a cluster). Yields the GPU count."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rlhfkern[ray]')")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, _temp_dir=temp, configure_logging=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield 8
    ray.shutdown()


HALF = (torch.float16, torch.bfloat16)
PEER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def assert_like_peer(ours, theirs, exact, what="", by_error=False, rtol=1e-5, atol=1e-6, fp64_tol=1e-9):
    """A drop-in's output against the installed peer's for the same inputs: the same dtype and
    shape; fp16/bf16 results, or any result with `by_error` (fp16/bf16 inputs the peer computes
    partly in half precision, or a peer rounding in float32 for a float32 mask), no farther from
    `exact` (the peer on the inputs widened to fp64) than the peer's own, within one unit in the
    last place (of the result's dtype) of the largest |exact|; other results close to the peer's
    (fp64: to fp64_tol)."""
    assert ours.dtype == theirs.dtype, f"{what}: {ours.dtype} != peer's {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: {tuple(ours.shape)} != peer's {tuple(theirs.shape)}"
    o, t, e = (x.detach().cpu().double() for x in (ours, theirs, exact))
    if by_error or ours.dtype in HALF:
        err_ours, err_theirs = (o - e).abs().max().item(), (t - e).abs().max().item()
        print(f"fp64 error {what}: ours {err_ours:.2g}, the peer's {err_theirs:.2g}")  # shown with -s
        if math.isnan(err_theirs):  # the peer's nan (OpenRLHF's fp16 1e-8 underflows: 0 / 0) is no target
            assert not math.isnan(err_ours), f"{what}: nan"
            return
        slack = torch.finfo(ours.dtype).eps * max(1.0, e.abs().max().item())
        assert err_ours <= err_theirs + slack, f"{what}: |ours - fp64| {err_ours:.3g} > peer's {err_theirs:.3g}"
    elif ours.dtype == torch.float64:
        torch.testing.assert_close(o, t, rtol=fp64_tol, atol=fp64_tol, equal_nan=True, msg=what)
    else:
        torch.testing.assert_close(o, t, rtol=rtol, atol=atol, equal_nan=True, msg=what)


def at_threads(n, fn):
    """fn() with torch's CPU thread count set to n (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def run_sse_build(script):
    """Runs `script` in a fresh Python with RLHFKERN_CPU_SIMD=sse, which forces the baseline (SSE)
    build of the CPU row loops (the choice is made when the extension loads); the script must
    print "ok" and exit 0."""
    import subprocess

    env = dict(os.environ, RLHFKERN_CPU_SIMD="sse")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
