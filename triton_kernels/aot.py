"""Compile every Triton kernel of rlhfkern for real GPUs (sm_80, sm_90), without a GPU.

Triton's interpreter (how the tests run kernels on CPU) accepts kernels that a GPU compile
rejects, and says nothing of registers or spills. This module compiles each kernel to cubin for
every specialization our launchers can choose and fails on a compile error, on register spills,
on shared memory over the card's limit or on more than 1024 threads per block.

The specializations are captured, never listed by hand: the public ops (``rlhfkern.gae``, ...)
run on small CPU tensors with ``backend="triton"`` while every ``@triton.jit`` kernel of
rlhfkern.triton_kernels is replaced by a recorder; each launch gives a `Spec` (pointer dtypes,
constexprs, num_warps, num_stages). Two sets:

* full (`full_specs`): the product of every float dtype x every mask dtype x every block size the
  launchers pick (default options), and the product of every float dtype x every option
  combination (every constexpr branch) at the largest blocks with an int64 mask;
* quick (`quick_specs`): a greedy cover of the full set: every kernel, every constexpr value,
  every dtype of every argument, every block size; at the largest block every argument dtype
  and, per input dtype, every branch value (`features`).

A spec `covered` by the full set matches one of its specs in (dtypes, blocks, warps, stages) and
one in (branch constexprs, input dtype); tests/test_triton_aot.py checks random public-API calls
against that. Integer arguments compile unspecialised (i32) and pointers as 16-byte aligned.

CLI: ``python -m rlhfkern.triton_kernels.aot [--quick] [--arch 80,90] [--out FILE.md] [--append]``.
"""

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import io
import itertools
import os
import re
import sys
import tempfile
import time

KERNEL_MODULES = ("gae", "logprob", "ppo_loss")
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use
MAX_THREADS = 1024
DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}  # Triton's CUDA launch defaults
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclasses.dataclass(frozen=True, order=True)
class Spec:
    """One compiled variant: kernel ('module.name'), non-constexpr argument types, constexprs."""

    kernel: str
    signature: tuple  # ((name, triton type), ...) in argument order, constexprs excluded
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int
    maxnreg: int = 0  # the launch's register ceiling per thread (0: none, ptxas decides)

    def label(self):
        ptrs = ",".join(f"{n}={t[1:]}" for n, t in self.signature if t.startswith("*"))
        consts = ",".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in self.constexprs)
        regs = f" r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.kernel}[{ptrs}; {consts}; w{self.num_warps} s{self.num_stages}{regs}]"

    def blocks(self):
        return tuple((n, v) for n, v in self.constexprs if n.startswith("BLOCK"))

    def branches(self):
        return tuple((n, v) for n, v in self.constexprs if not n.startswith("BLOCK"))

    def layout_key(self):
        """What decides registers and shared memory: dtypes, blocks, warps, stages."""
        return (self.kernel, self.signature, self.blocks(), self.num_warps, self.num_stages, self.maxnreg)

    def branch_key(self):
        """Which code the kernel holds: its branch constexprs, with the main input's dtype."""
        first = next(t for _, t in self.signature if t.startswith("*"))
        return (self.kernel, first, self.branches())


# ----------------------------------------------------------------------------- capture
_TORCH_TO_TRITON = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8", "int16": "i16",
    "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1", "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5",
}


def _is_kernel(obj):
    from triton.runtime.jit import KernelInterface

    return isinstance(obj, KernelInterface) and hasattr(obj, "fn")


def kernel_modules():
    return [importlib.import_module(f"rlhfkern.triton_kernels.{m}") for m in KERNEL_MODULES]


def jit_functions():
    """{'module.name': jit function} of every @triton.jit defined in the kernel modules."""
    out = {}
    for mod in kernel_modules():
        for name, obj in vars(mod).items():
            if _is_kernel(obj) and obj.fn.__module__ == mod.__name__:
                out[f"{mod.__name__.rsplit('.', 1)[1]}.{name}"] = obj
    return out


def _arg_type(kernel, name, value):
    import torch

    if isinstance(value, torch.Tensor):
        t = _TORCH_TO_TRITON.get(str(value.dtype).removeprefix("torch."))
        if t is None:
            raise TypeError(f"{kernel}: argument {name} has dtype {value.dtype}, which this check cannot map")
        return "*" + t
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{kernel}: argument {name} is a {type(value).__name__}, which this check cannot map")


def _is_constexpr(param):
    import triton.language as tl

    return param.annotation is tl.constexpr or param.annotation in ("tl.constexpr", "constexpr")


def spec_of_launch(kernel, fn, args, kwargs):
    """The Spec of the launch fn[grid](*args, **kwargs) of kernel 'module.name'."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
    params = inspect.signature(fn.fn).parameters
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = [], []
    for name, value in bound.arguments.items():
        if _is_constexpr(params[name]):
            constexprs.append((name, value))
        else:
            signature.append((name, _arg_type(kernel, name, value)))
    return Spec(kernel, tuple(signature), tuple(constexprs), int(options.get("num_warps", DEFAULT_OPTIONS["num_warps"])),
                int(options.get("num_stages", DEFAULT_OPTIONS["num_stages"])), int(options.get("maxnreg") or 0))


class _Recorder:
    """Stands in for a kernel: a launch records its Spec and runs nothing."""

    def __init__(self, name, fn, found):
        self.name, self.fn, self.found = name, fn, found

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.found.add(spec_of_launch(self.name, self.fn, args, kwargs))

        return launch


@contextlib.contextmanager
def capture():
    """Within the block, kernel launches are recorded into the yielded set instead of run; the
    Triton backend is allowed on CPU tensors (nothing runs)."""
    found = set()
    mods = {m.__name__.rsplit(".", 1)[1]: m for m in kernel_modules()}
    saved = []
    old_env = os.environ.get("TRITON_INTERPRET")
    try:
        for key, fn in jit_functions().items():
            mod = mods[key.split(".")[0]]
            attr = key.split(".", 1)[1]
            saved.append((mod, attr, fn))
            setattr(mod, attr, _Recorder(key, fn, found))
        os.environ["TRITON_INTERPRET"] = "1"  # read by rlhfkern._dispatch at each call
        yield found
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


# ----------------------------------------------------------------------------- the public-API grid
def float_dtypes():
    import torch

    return (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def mask_dtypes():
    """The mask dtypes the tests exercise (bool, integer and floating masks of every width in use)."""
    import torch

    return (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16)


def kl_kinds():
    """Every kl_kind the ops accept: each base kind, and each with '+' (straight-through)."""
    from rlhfkern.ops.ppo_loss import KL_KINDS

    return sorted(KL_KINDS) + [k + "+" for k in sorted(KL_KINDS)]


def lengths(max_len=8192):
    """Row lengths 1, 2, 4, ... max_len: every power-of-two block size a launcher can pick."""
    return [2**k for k in range(max_len.bit_length())]


def _mask(B, T, dtype):
    import torch

    return (torch.arange(T).expand(B, T) % 3 != 0).to(dtype)


def run_gae(dtype, mask_dtype, T, whiten=False, shift_mean=True, B=2, values_dtype=None):
    import torch

    import rlhfkern

    r = torch.randn(B, T).to(dtype)
    v = torch.randn(B, T).to(values_dtype or dtype)
    m = _mask(B, T, mask_dtype)
    rlhfkern.gae(r, v, m, 0.99, 0.95, whiten=whiten, backend="triton")
    rlhfkern.masked_whiten(r, m, shift_mean, backend="triton")


def run_logprobs(dtype, T, entropy=False, inplace=False, K=None, linear=False, p2=False, N=3):
    import torch

    import rlhfkern

    V = T
    labels = torch.randint(0, V, (N,) if K is None else (N, K))
    if linear:
        h = torch.randn(N, 8).to(dtype).requires_grad_()
        w = torch.randn(V, 8).to(dtype).requires_grad_()
        out = rlhfkern.linear_logprobs(h, w, labels, temperature=0.7, return_entropy=entropy, return_sum_p2=p2,
                                       backend="triton")
    else:
        x = torch.randn(N, V).to(dtype).requires_grad_()
        out = rlhfkern.logprobs(x.clone() if inplace else x, labels, temperature=0.7, return_entropy=entropy,
                                inplace_backward=inplace, backend="triton")
    out = out if isinstance(out, tuple) else (out,)
    sum(o.sum() for o in out).backward()


def run_actor(dtype, mask_dtype, T, entropy=False, ref=False, kl_kind="low_var_kl", clip_c=3.0, is_weights=False,
              B=2, old_dtype=None):
    import torch

    import rlhfkern

    lp = torch.randn(B, T).to(dtype).requires_grad_()
    mk = lambda: torch.randn(B, T).to(dtype)  # noqa: E731
    ent = mk().requires_grad_() if entropy else None
    loss, _ = rlhfkern.actor_loss(lp, torch.randn(B, T).to(old_dtype or dtype), mk(), _mask(B, T, mask_dtype),
                                  entropy=ent, ref_log_prob=mk() if ref else None, entropy_coeff=0.01,
                                  kl_coef=0.1 if ref else 0.0, kl_kind=kl_kind, clip_c=clip_c,
                                  is_weights=mk() if is_weights else None, backend="triton")
    loss.backward()


def run_value(dtype, mask_dtype, T, B=2):
    import torch

    import rlhfkern

    v = torch.randn(B, T).to(dtype).requires_grad_()
    loss, _ = rlhfkern.value_loss(v, torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype),
                                  _mask(B, T, mask_dtype), backend="triton")
    loss.backward()


def run_kl(dtype, T, kind="low_var_kl", B=2):
    import torch

    import rlhfkern

    rlhfkern.kl_penalty(torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype), kind, backend="triton")


def grid_calls():
    """The public-API calls whose launches make the full set (closures, no arguments)."""
    import functools

    import torch

    calls = []
    top = lengths()[-1]
    for dtype in float_dtypes():
        # every block size, every mask dtype, default options
        for T in lengths():
            for md in mask_dtypes():
                calls += [functools.partial(run_gae, dtype, md, T), functools.partial(run_actor, dtype, md, T),
                          functools.partial(run_value, dtype, md, T)]
            calls += [functools.partial(run_logprobs, dtype, T), functools.partial(run_kl, dtype, T)]
        # every option combination at the largest blocks, int64 mask
        md = torch.int64
        for whiten, shift in itertools.product((False, True), (False, True)):
            calls.append(functools.partial(run_gae, dtype, md, top, whiten=whiten, shift_mean=shift))
        for entropy, inplace, K in itertools.product((False, True), (False, True), (None, 3)):
            calls.append(functools.partial(run_logprobs, dtype, top, entropy=entropy, inplace=inplace, K=K))
        for entropy, p2 in itertools.product((False, True), (False, True)):
            calls.append(functools.partial(run_logprobs, dtype, top, entropy=entropy, linear=True, p2=p2))
        for entropy, ref, kind, clip_c, isw in itertools.product((False, True), (False, True), kl_kinds(),
                                                                 (None, 3.0), (False, True)):
            calls.append(functools.partial(run_actor, dtype, md, top, entropy=entropy, ref=ref, kl_kind=kind,
                                           clip_c=clip_c, is_weights=isw))
        for kind in kl_kinds():
            calls.append(functools.partial(run_kl, dtype, top, kind))
    return calls


def full_specs():
    """The full set: every launch of `grid_calls`, sorted."""
    with capture() as found:
        for call in grid_calls():
            call()
    return sorted(found)


def features(spec, max_block):
    """What the quick set must show at least once: the kernel, each constexpr value, each
    argument's dtype, the warps; at the kernel's largest block each argument's dtype and, for
    each input dtype, each branch value."""
    out = {(spec.kernel,), (spec.kernel, "warps", spec.num_warps)}
    out |= {(spec.kernel, "const", n, v) for n, v in spec.constexprs}
    out |= {(spec.kernel, "arg", n, t) for n, t in spec.signature if t.startswith("*")}
    if spec.blocks() == max_block[spec.kernel]:  # the most registers per thread: every dtype there too
        first = spec.branch_key()[1]
        out |= {(spec.kernel, "top", n, t) for n, t in spec.signature if t.startswith("*")}
        out |= {(spec.kernel, "top", first, n, v) for n, v in spec.branches()}
    return out


def quick_specs(full=None):
    """A small subset of the full set with every feature of it, and for each branch value the
    widest-dtype spec at the largest block (greedy set cover, deterministic: ties go to the spec
    with the larger blocks and wider dtypes, then to sort order)."""
    full = full_specs() if full is None else full
    max_block = {}
    for s in full:
        max_block[s.kernel] = max(max_block.get(s.kernel, ()), s.blocks())
    feats = {s: features(s, max_block) for s in full}
    width = lambda s: sum(int(re.sub(r"\D", "", t) or 1) for _, t in s.signature if t.startswith("*"))  # noqa: E731
    widest = {}  # at the largest block, per branch value: the spec with the widest dtypes
    for s in full:
        if s.blocks() == max_block[s.kernel]:
            for n, v in s.branches():
                key = (s.kernel, "widest", n, v)
                widest[key] = max(widest.get(key, s), s, key=lambda x: (width(x), x))
    for key, s in widest.items():
        feats[s].add(key)
    todo = set().union(*feats.values())
    chosen = []
    while todo:
        best = max(full, key=lambda s: (len(feats[s] & todo), s.blocks(), width(s), s))
        chosen.append(best)
        todo -= feats[best]
    return sorted(chosen)


def covered(spec, full):
    """None if `spec` is covered by the full set (see the module docstring), else why not."""
    if spec.layout_key() not in {s.layout_key() for s in full}:
        return f"{spec.label()}: no spec of the set has its dtypes, blocks and warps"
    if spec.branch_key() not in {s.branch_key() for s in full}:
        return f"{spec.label()}: no spec of the set has its constexpr branches with input {spec.branch_key()[1]}"
    return None


# ----------------------------------------------------------------------------- compile and check
@dataclasses.dataclass
class Result:
    spec: Spec
    arch: int
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str = ""


_PTXAS = {"registers": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}


def _compile(spec, arch):
    import triton
    from triton.backends.compiler import GPUTarget

    fn = jit_functions()[spec.kernel]
    names = [n for n, _ in spec.signature]
    sig = dict(spec.signature)
    sig.update({n: "constexpr" for n, _ in spec.constexprs})
    sig = {n: sig[n] for n in fn.arg_names}  # argument order
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v output is printed
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                    **({"maxnreg": spec.maxnreg} if spec.maxnreg else {})})
    return k, log.getvalue()


def check(spec, arch):
    """Compile `spec` for sm_<arch>; the Result carries its resources and the error, if any."""
    res = Result(spec, arch)
    t0 = time.perf_counter()
    threads = spec.num_warps * 32
    if threads > MAX_THREADS:
        res.error = f"{threads} threads per block (num_warps={spec.num_warps}) > {MAX_THREADS}"
        return res
    try:
        k, log = _compile(spec, arch)
    except Exception as e:  # noqa: BLE001  any compiler failure is the finding
        msg = " ".join(str(e).split())
        res.error = f"compile error: {type(e).__name__}: {msg[:600]}"
        return res
    finally:
        res.seconds = time.perf_counter() - t0
    section = log[log.find(f"'{k.metadata.name}'"):] if f"'{k.metadata.name}'" in log else log
    for field, pattern in _PTXAS.items():
        m = re.search(pattern, section)
        if m:
            setattr(res, field, int(m.group(1)))
    res.shared = int(k.metadata.shared)
    errors = []
    if res.registers < 0:
        errors.append("no ptxas log (TRITON_DUMP_PTXAS_LOG) to read registers and spills from")
    if res.spill_stores or res.spill_loads:
        errors.append(f"register spills: {res.spill_stores} B stores, {res.spill_loads} B loads "
                      f"({res.registers} registers)")
    if res.shared > SHARED_LIMIT[arch]:
        errors.append(f"shared memory {res.shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B")
    res.error = "; ".join(errors)
    return res


def _worker_init(cache_dir):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences 3.9's warning
    import warnings

    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")


def _check_job(job):
    return check(*job)


def run_checks(specs, arches, jobs=None, progress=None):
    """Compile every spec for every arch in `jobs` spawned processes (a fresh Triton cache)."""
    import concurrent.futures
    import multiprocessing

    work = [(s, a) for s in specs for a in arches]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="rlhfkern-aot-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                                    initargs=(cache,)) as pool:
            for i, res in enumerate(pool.map(_check_job, work, chunksize=4)):
                results.append(res)
                if progress:
                    progress(i + 1, len(work), res)
    return results


# ----------------------------------------------------------------------------- report
def table(results):
    """Markdown: one row per specialization, a column group per target."""
    arches = sorted({r.arch for r in results})
    by_spec = {}
    for r in results:
        by_spec.setdefault(r.spec, {})[r.arch] = r
    head = "| kernel | specialization | warps | " + " | ".join(
        f"sm_{a} regs | sm_{a} spill st/ld B | sm_{a} smem B" for a in arches) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(arches))]
    for spec in sorted(by_spec):
        label = spec.label()
        cells = []
        for a in arches:
            r = by_spec[spec].get(a)
            if r is None or r.registers < 0:
                cells += ["error" if r else "-", "-", "-"]
            else:
                cells += [str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared)]
        lines.append(f"| {spec.kernel} | `{label[len(spec.kernel) + 1:-1]}` | {spec.num_warps} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results):
    """Markdown: per kernel and target, the number of specializations and the worst resources."""
    rows = {}
    for r in results:
        key = (r.spec.kernel, r.arch)
        n, regs, spill, smem, err = rows.get(key, (0, 0, 0, 0, 0))
        rows[key] = (n + 1, max(regs, r.registers), spill + r.spill_stores + r.spill_loads, max(smem, r.shared),
                     err + bool(r.error))
    lines = ["| kernel | target | specializations | max regs | spill B (all) | max smem B | errors |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, arch), (n, regs, spill, smem, err) in sorted(rows.items()):
        lines.append(f"| {kernel} | sm_{arch} | {n} | {regs} | {spill} | {smem} | {err} |")
    return "\n".join(lines)


def report(results, command, seconds, which):
    import triton

    errors = [r for r in results if r.error]
    head = [f"## Triton {triton.__version__}: {which} set, {len({r.spec for r in results})} specializations x "
            f"{len({r.arch for r in results})} targets",
            "",
            f"- command: `{command}`",
            f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; python "
            f"{sys.version.split()[0]}; {os.cpu_count()} CPU cores, no GPU; {seconds:.0f} s",
            f"- result: {'FAILED, ' + str(len(errors)) + ' errors' if errors else 'passed'} (compile errors, "
            f"spills, shared memory over sm_80 {SHARED_LIMIT[80]} B / sm_90 {SHARED_LIMIT[90]} B, "
            f"> {MAX_THREADS} threads)",
            ""]
    if errors:
        head += ["### Errors", ""] + [f"- sm_{r.arch} {r.spec.label()}: {r.error}" for r in errors] + [""]
    return "\n".join(head + ["### Per kernel", "", summary(results), "", "### Per specialization", "",
                             table(results), ""])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rlhfkern.triton_kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick covering subset (CI) instead of the full set")
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--out", help="write the markdown report to this file")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU cores)")
    p.add_argument("--kernel", default="", help="only the kernels whose name contains this")
    a = p.parse_args(argv)
    arches = [int(x) for x in a.arch.split(",") if x]
    for arch in arches:
        if arch not in SHARED_LIMIT:
            p.error(f"unknown arch {arch}: this check knows {sorted(SHARED_LIMIT)}")
    import triton

    t0 = time.perf_counter()
    full = full_specs()
    specs = [s for s in (quick_specs(full) if a.quick else full) if a.kernel in s.kernel]
    which = "quick" if a.quick else "full"
    print(f"triton {triton.__version__}: {which} set, {len(specs)} specializations x {len(arches)} targets "
          f"(captured in {time.perf_counter() - t0:.1f} s)", flush=True)

    def progress(i, n, res):
        if res.error:
            print(f"  FAIL sm_{res.arch} {res.spec.label()}: {res.error}", flush=True)
        if i % 100 == 0 or i == n:
            print(f"  {i}/{n} compiled ({time.perf_counter() - t0:.0f} s)", flush=True)

    results = run_checks(specs, arches, a.jobs, progress)
    seconds = time.perf_counter() - t0
    command = "python -m rlhfkern.triton_kernels.aot " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, command.strip(), seconds, which)
    if a.out:
        with open(a.out, "a" if a.append else "w") as f:
            f.write(text + "\n")
    errors = [r for r in results if r.error]
    print(f"{len(results)} compiles, {len(errors)} errors, {seconds:.0f} s", flush=True)
    return 1 if errors else 0


def _ensure_package():
    """Run as a file from a source tree (PYTHONPATH=<repo>, no install): register this folder as
    rlhfkern.triton_kernels, which setup.py maps it to (a top-level `triton_kernels` is triton's)."""
    import importlib.util

    try:
        importlib.import_module("rlhfkern.triton_kernels")
    except ImportError:
        here = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.spec_from_file_location("rlhfkern.triton_kernels", os.path.join(here, "__init__.py"),
                                                      submodule_search_locations=[here])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


if __name__ in ("__main__", "__mp_main__"):  # __mp_main__: a spawned compile process
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run as a file: this folder must not shadow packages (triton's triton_kernels)
    _ensure_package()

if __name__ == "__main__":
    # through the package's module, so that the spawned compile processes unpickle its classes
    from rlhfkern.triton_kernels import aot

    sys.exit(aot.main())
