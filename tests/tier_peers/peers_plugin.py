"""pytest plugin of the peers' tier (`make test-peers`, driven by run.py): one peer's released tests
run with rlhfkern's drop-ins installed by that peer's one-call patcher.

    RLHFKERN_PEER=verl|openrlhf|trl   the peer (one per pytest process: each ships a `tests` package)
    RLHFKERN_PEERS_OUT=path.json      where the per-test record goes
    RLHFKERN_PEERS_MODE=rlhfkern      the drop-ins installed (default)
                        broken        the broken stand-in: every drop-in's floating outputs become
                                      x*1.5+0.25, so a test that checks a reached function's values
                                      must fail
                        stock         the peer's own functions, counted the same way (no patch in
                                      force): the baseline, and the reach of the originals

At start-up `rlhfkern.compat.<peer>.patch()` installs the drop-ins (before any test module imports
the peer), then each installed drop-in, wherever the patcher put it, is wrapped in a counter (and
the perturbation in that mode): the record says, per test, which drop-ins it called (setup, call
and teardown). OpenRLHF's tests load OpenRLHF's files by path under private module names
(`_openrlhf_loss_test.loss`, ...) and copy functions into their own globals: the same drop-ins
replace the originals there too (every module loaded from the peer's files, found by file, before
each test), which is what the patcher does for the `openrlhf` package. Importing `openrlhf.models`
needs deepspeed, flash-attn, vLLM (CUDA builds): those missing are stand-in modules while the patcher
imports it, removed afterwards; deepspeed, which OpenRLHF's models/utils.py imports at its top for a
function no test calls, stays a stand-in for the run (manifest `stand_ins`; any use of it fails), as
OpenRLHF's own test_actor_entropy_temperature.py stubs it."""

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import manifest  # noqa: E402

SCALE, SHIFT = 1.5, 0.25


# ----------------------------------------------------------------------------- wrapping
def perturb(out):
    """x*1.5+0.25 on every floating tensor and Python float in an output (tuples, lists, dicts,
    dataclass-like outputs are walked); integers, booleans and other objects stay."""
    if isinstance(out, torch.Tensor):
        return out * SCALE + SHIFT if out.is_floating_point() else out
    if isinstance(out, float):
        return out * SCALE + SHIFT
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(perturb(x) for x in out))
    if isinstance(out, (tuple, list)):
        return type(out)(perturb(x) for x in out)
    if isinstance(out, dict):
        return type(out)({k: perturb(v) for k, v in out.items()})
    return out


def wrap(name, obj, hook):
    """A stand-in for `obj` (a function, an nn.Module class or an autograd.Function-like class with
    .apply) whose calls go through hook(name, obj, args, kwargs, call): `call()` runs obj and the hook
    returns what the caller gets (the tier counts, measures, perturbs there)."""
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        def forward(self, *args, **kwargs):
            return hook(name, None, args, kwargs, lambda: obj.forward(self, *args, **kwargs))

        return type(obj.__name__, (obj,), {"forward": forward, "__module__": obj.__module__,
                                           "__qualname__": obj.__qualname__, "__doc__": obj.__doc__,
                                           "_rlhfkern_tier_wrapped": obj})
    if isinstance(obj, type) and hasattr(obj, "apply"):
        def apply(cls, *args, **kwargs):
            return hook(name, None, args, kwargs, lambda: obj.apply(*args, **kwargs))

        return type(obj.__name__, (obj,), {"apply": classmethod(apply), "__module__": obj.__module__,
                                           "__qualname__": obj.__qualname__, "__doc__": obj.__doc__,
                                           "_rlhfkern_tier_wrapped": obj})
    if callable(obj):
        @functools.wraps(obj)
        def counted(*args, **kwargs):
            return hook(name, obj, args, kwargs, lambda: obj(*args, **kwargs))

        counted._rlhfkern_tier_wrapped = obj
        return counted
    raise TypeError(f"peers tier: cannot wrap {name} ({type(obj).__name__})")


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if isinstance(out, dict):
        return [t for x in out.values() for t in _tensors(x)]
    return []


def _widen(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double()
    if isinstance(x, (tuple, list)):
        return type(x)(_widen(v) for v in x)
    return x


def fp64_errors(ours, peer_fn, args, kwargs):
    """Largest |x - fp64| of ours and of the peer's function on the same inputs, fp64 being the
    peer's function on the inputs widened to float64; per floating output:
    (dtype, error of ours, error of the peer's, one unit in the last place at the largest |fp64|)."""
    theirs = peer_fn(*args, **kwargs)
    exact = peer_fn(*_widen(args), **{k: _widen(v) for k, v in kwargs.items()})
    rows = []
    for o, t, e in zip(_tensors(ours), _tensors(theirs), _tensors(exact)):
        if not o.is_floating_point():
            continue
        dtype = o.dtype
        o, t, e = (x.detach().double() for x in (o, t, e))
        rows.append((str(dtype).replace("torch.", ""), (o - e).abs().max().item(), (t - e).abs().max().item(),
                     torch.finfo(dtype).eps * max(1.0, e.abs().max().item())))
    return rows


def xfail_applies(entry, item):
    """A manifest xfail entry: {"match": regex on the test id, "dtypes": dtype names the test's
    parameters must include (optional), "reason": ..., "strict": ...}."""
    if not re.search(entry["match"], item.nodeid):
        return False
    if "dtypes" in entry:
        params = getattr(getattr(item, "callspec", None), "params", {})
        return any(str(v).replace("torch.", "") in entry["dtypes"] for v in params.values()
                   if isinstance(v, torch.dtype))
    return True


# ----------------------------------------------------------------------------- stand-in modules
class _StandIn(types.ModuleType):
    """A module that cannot be imported here (a CUDA build): any attribute is a dummy class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


class _Absent:
    """What a run-wide stand-in module gives for any name: importable, fails when used."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"peers tier: {self._name} is a stand-in ({self._name.split('.')[0]} is not installed here)")

    def __mro_entries__(self, bases):  # `class X(deepspeed.Y)` at import time
        return (object,)


class _StrictStandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names, strict=False):
        self.names = set(names)
        self.strict = strict

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return (_StrictStandIn if self.strict else _StandIn)(spec.name)

    def exec_module(self, module):
        pass


def _installed(name):
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin not in (None, "namespace")


def _with_stand_ins(names, fn):
    missing = [n for n in names if not _installed(n)]
    finder = _StandInFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        return fn(), missing
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if name.split(".")[0] in set(missing):
                del sys.modules[name]


# ----------------------------------------------------------------------------- the tier
class PeersTier:
    def __init__(self, peer, out, mode):
        self.peer, self.out, self.mode = peer, out, mode
        self.broken = mode == "broken"
        self.spec = manifest.PEERS[peer]
        self.compat = importlib.import_module(f"rlhfkern.compat.{peer}")
        self.current = "<collection>"
        self.reached = {}   # nodeid -> {drop-in name: calls}
        self.outcomes = {}  # nodeid -> passed / failed / skipped / xfailed / xpassed / error
        self.wrappers = {}  # id(wrapped) -> its wrapper (one per object: `is` holds across modules)
        self.notes = []
        self.originals = {}  # id(original peer object) -> (original, drop-in name) for the private copies
        self.peer_originals = {}  # drop-in name -> the peer's function it replaced (the patched package's)
        self.fp64 = {}  # nodeid -> [[name, dtype, error of ours, error of the peer's, ulp], ...]

    def hook(self, name, target, args, kwargs, call):
        calls = self.reached.setdefault(self.current, {})
        calls[name] = calls.get(name, 0) + 1
        out = call()
        measure = self.spec.get("fp64_check")
        if (self.mode == "rlhfkern" and measure and target is not None and name in self.peer_originals
                and re.search(measure, self.current)):
            rows = fp64_errors(out, self.peer_originals[name], args, kwargs)
            self.fp64.setdefault(self.current, []).extend([name, *row] for row in rows)
        return perturb(out) if self.broken else out

    def wrapper(self, name, original):
        """What goes where the peer had `original`: rlhfkern's drop-in `name` (counted, perturbed when
        broken), or in the stock mode the peer's original itself, counted (the same reach, no patch)."""
        target = original if self.mode == "stock" else getattr(self.compat, name)
        if id(target) not in self.wrappers:
            self.wrappers[id(target)] = (target, wrap(name, target, self.hook))
        return self.wrappers[id(target)][1]

    def names(self):
        return [n for names in self.compat.TARGETS.values() for n in names]

    def install(self):
        """The peer's one-call patcher, then a wrapper wherever it installed a drop-in."""
        def patch():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handle = self.compat.patch()
            self.notes += [f"patch() warned: {w.message}" for w in caught]
            return handle

        if self.peer == "openrlhf":
            handle, missing = _with_stand_ins(("deepspeed", "flash_attn", "vllm", "ring_flash_attn", "bitsandbytes"),
                                              lambda: (importlib.import_module("openrlhf.models"), patch())[1])
            if missing:
                self.notes.append(f"stand-in modules while patch() imported openrlhf.models: {', '.join(missing)}")
        else:
            handle = patch()
        by_id = {id(getattr(self.compat, n)): n for n in self.names()}
        for kind, holder, key, original in handle._undo:
            value = getattr(holder, key) if kind == "attr" else holder[key]
            name = by_id.get(id(value))
            if name is None:
                raise RuntimeError(f"peers tier: {key} holds {value!r}, not a drop-in of rlhfkern.compat.{self.peer}")
            self.peer_originals.setdefault(name, original)
            if kind == "attr":
                setattr(holder, key, self.wrapper(name, original))
            else:
                holder[key] = self.wrapper(name, original)
        # modules missing here that the peer's test files import at their top (OpenRLHF's models/utils.py
        # imports deepspeed for functions the tests never call): stand-ins for the whole run, whose names
        # fail when used
        stand_ins = [n for n in self.spec.get("stand_ins", ()) if not _installed(n)]
        if stand_ins:
            sys.meta_path.append(_StandInFinder(stand_ins, strict=True))
            self.notes.append(f"stand-in modules for the whole run (fail when used): {', '.join(stand_ins)}")
        self.replaced = list(handle.replaced)
        self.missing = list(handle.missing)
        if not self.replaced:
            raise RuntimeError(f"peers tier: rlhfkern.compat.{self.peer}.patch() replaced nothing")

    def stand_in_absent_names(self, args):
        """Tests of another version than the installed peer (TRL's repository tests, when the tag's are
        out of reach) may import names the installed version lacks: each becomes an _Absent in its
        module, so that the file imports; a test that uses one fails naming it. Read from the files
        pytest was given and the helper modules beside them (testing_utils.py, conftest.py)."""
        import ast

        tests = Path(self.rootdir) / "tests"
        files = [Path(self.rootdir) / a for a in args if a.endswith(".py")] + \
                [f for f in tests.glob("*.py") if not f.name.startswith("test_")]
        added = []
        for path in sorted(set(f for f in files if f.exists())):
            try:
                tree = ast.parse(path.read_text())
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] == self.peer):
                    continue
                try:
                    module = importlib.import_module(node.module)
                except ImportError:
                    continue
                for alias in node.names:
                    if alias.name != "*" and not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
                            continue
                        except ImportError:
                            pass
                        setattr(module, alias.name, _Absent(f"{node.module}.{alias.name}"))
                        added.append(f"{node.module}.{alias.name}")
        if added:
            self.notes.append(f"names the tests import that the installed {self.peer} lacks (stand-ins that fail when "
                              f"used): {', '.join(sorted(set(added)))}")

    # OpenRLHF's tests: private copies of OpenRLHF's files
    def peer_files(self):
        return [Path(p).resolve() for p in self.spec.get("source_dirs", ())]

    def patch_private_copies(self):
        roots = [(r, r.name) for r in self.peer_files()]
        if not roots:
            return
        tests_root = Path(self.rootdir).resolve()
        modules = []
        for mod_name, module in list(sys.modules.items()):
            f = getattr(module, "__file__", None)
            if not f:
                continue
            path = Path(f).resolve()
            for root, package in roots:
                if path.is_relative_to(root):
                    rel = path.relative_to(root.parent).with_suffix("")
                    canonical = ".".join(rel.parts)
                    modules.append(module)
                    for name in self.compat.TARGETS.get(canonical, ()):
                        original = vars(module).get(name)
                        if original is not None and not hasattr(original, "_rlhfkern_tier_wrapped"):
                            self.originals[id(original)] = (original, name)
            if path.is_relative_to(tests_root) or mod_name.startswith("_"):
                modules.append(module)
        for module in modules:
            for attr, value in list(vars(module).items()):
                hit = self.originals.get(id(value))
                if hit is not None and hit[0] is value:
                    setattr(module, attr, self.wrapper(hit[1], value))
                elif isinstance(value, dict) and not attr.startswith("__"):
                    for key, entry in list(value.items()):
                        hit = self.originals.get(id(entry))
                        if hit is not None and hit[0] is entry:
                            value[key] = self.wrapper(hit[1], entry)

    # pytest hooks
    def pytest_configure(self, config):
        self.rootdir = str(config.rootpath)
        self.install()
        if self.spec.get("absent_names"):
            self.stand_in_absent_names(config.args)

    def pytest_collection_modifyitems(self, session, config, items):
        self.patch_private_copies()
        gpu_only = self.spec.get("gpu_only", {})
        xfail = self.spec.get("xfail", [])
        keep, dropped = [], []
        select = self.spec.get("select")
        for item in items:
            nodeid = item.nodeid
            reason = next((r for pattern, r in gpu_only.items() if re.search(pattern, nodeid)), None)
            if reason is not None and not torch.cuda.is_available():
                dropped.append(item)
                self.outcomes[nodeid] = "deselected (GPU only: " + reason + ")"
                continue
            if select is not None and not re.search(select, nodeid):
                dropped.append(item)
                continue
            why = next((x for x in xfail if xfail_applies(x, item)), None)
            if why is not None and self.mode != "stock":
                item.add_marker(pytest.mark.xfail(reason=why["reason"], strict=why.get("strict", True)))
            keep.append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        yield
        self.current = "<between tests>"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        self.patch_private_copies()  # modules a fixture loaded
        yield

    def pytest_runtest_logreport(self, report):
        if report.when == "setup" and report.skipped:
            self.outcomes[report.nodeid] = "skipped: " + str(report.longrepr[-1] if isinstance(report.longrepr, tuple)
                                                            else report.longrepr)
        elif report.when == "setup" and report.failed:
            self.outcomes[report.nodeid] = "error"
        elif report.when == "call":
            if hasattr(report, "wasxfail"):
                self.outcomes[report.nodeid] = "xfailed" if report.skipped else "xpassed"
            elif report.skipped:
                self.outcomes[report.nodeid] = "skipped: " + str(report.longrepr[-1])
            else:
                self.outcomes[report.nodeid] = report.outcome
        elif report.when == "teardown" and report.failed:
            self.outcomes[report.nodeid] = "error"

    def pytest_collectreport(self, report):
        if report.failed:
            self.outcomes[report.nodeid or "<collection>"] = "collection error: " + str(report.longrepr)[-600:]

    def pytest_sessionfinish(self, session, exitstatus):
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps({
            "peer": self.peer, "mode": self.mode, "exitstatus": int(exitstatus),
            "replaced": self.replaced, "missing": self.missing, "notes": self.notes,
            "outcomes": self.outcomes, "reached": self.reached, "fp64": self.fp64,
        }, indent=1, sort_keys=True) + "\n")


def pytest_configure(config):
    peer = os.environ["RLHFKERN_PEER"]
    mode = os.environ.get("RLHFKERN_PEERS_MODE", "rlhfkern")
    if mode not in ("rlhfkern", "broken", "stock"):
        raise pytest.UsageError(f"RLHFKERN_PEERS_MODE={mode!r}: rlhfkern, broken or stock")
    tier = PeersTier(peer, os.environ["RLHFKERN_PEERS_OUT"], mode)
    config.pluginmanager.register(tier, "rlhfkern_peers_tier")  # its pytest_configure runs at once (historic)
