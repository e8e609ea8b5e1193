"""rlhfkern.compat.<framework>.patch(): the installed verl 0.9.1, OpenRLHF 0.11.2 and TRL 1.16
call rlhfkern's drop-ins afterwards, from every module that holds the function (not only the
defining one) and from verl's registries; undo() restores every reference."""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from conftest import need


def holders(package, objects):
    """'module.attr' / 'module.DICT[key]' of every reference, in the imported modules of
    `package`, to one of `objects`."""
    ids = {id(o) for o in objects}
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in ids:
                found.append(f"{name}.{attr}")
            elif isinstance(value, dict) and not attr.startswith("__"):
                found += [f"{name}.{attr}[{k!r}]" for k, v in list(value.items()) if id(v) in ids]
    return sorted(found)


@pytest.fixture
def spied(monkeypatch):
    """spy(compat, name): wraps compat.<name> in a call counter before patch() reads it."""
    counts = {}

    def spy(compat, name):
        real = getattr(compat, name)

        def counting(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(compat, name, counting)
        return counting

    return spy, counts


def assert_patched_and_undone(compat, package, importers):
    """patch(): no module of `package` keeps an original; each drop-in is where the original was
    (defining module, importers, registries); `importers`: (module, name) pairs that imported a
    function by name. Returns (handle, originals, references before) for the caller's checks and
    undo(); undoes at once if a check here fails."""
    originals = {}
    for module_name, names in compat.TARGETS.items():
        module = importlib.import_module(module_name)
        originals.update({n: getattr(module, n) for n in names})
    before = holders(package, originals.values())
    assert any(not w.startswith(tuple(compat.TARGETS)) for w in before), "no importer to test"
    handle = compat.patch()
    try:
        assert holders(package, originals.values()) == []
        assert sorted(handle.replaced) == before
        for module_name, names in compat.TARGETS.items():
            for n in names:
                assert getattr(sys.modules[module_name], n) is getattr(compat, n), (module_name, n)
        for module, name in importers:
            assert getattr(module, name) is getattr(compat, name), (module.__name__, name)
    except BaseException:
        handle.undo()
        raise
    return handle, originals, before


def test_verl_patch(spied):
    need("verl", extra="test")
    import verl.trainer.ppo.core_algos as core
    import verl.utils.torch_functional as verl_F
    import verl.workers.rollout.naive.naive_rollout as naive_rollout  # `from ... import logprobs_from_logits`
    import verl.workers.utils.losses as losses  # `from core_algos import agg_loss, compute_value_loss, ...`

    from rlhfkern.compat import verl as compat

    spy, counts = spied
    spy(compat, "entropy_from_logits")
    spy(compat, "agg_loss")
    handle, originals, before = assert_patched_and_undone(
        compat, "verl", [(losses, "agg_loss"), (losses, "compute_value_loss"), (losses, "kl_penalty"),
                         (naive_rollout, "logprobs_from_logits")])
    try:
        # the registries verl's workers read
        assert core.get_policy_loss_fn("vanilla") is compat.compute_policy_loss_vanilla
        for name in ("gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
            assert core.get_adv_estimator_fn(name).__module__ == "rlhfkern.compat.verl", name
        assert any("POLICY_LOSS_REGISTRY" in w for w in handle.replaced)
        # verl's own code calls ours: compute_entropy_loss -> verl_F.entropy_from_logits, agg_loss
        logits, mask = torch.randn(3, 5, 11, dtype=torch.float64), torch.ones(3, 5)
        loss = core.compute_entropy_loss(logits, mask)
        assert counts == {"entropy_from_logits": 1, "agg_loss": 1}
        want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        assert torch.allclose(loss.double(), want, rtol=1e-5)
    finally:
        handle.undo()
    assert holders("verl", originals.values()) == before
    assert verl_F.entropy_from_logits is originals["entropy_from_logits"]
    assert core.get_policy_loss_fn("vanilla") is originals["compute_policy_loss_vanilla"]


def test_trl_patch(spied):
    need("trl", extra="test")
    import trl.experimental.sdpo.loss_utils as sdpo  # `from ...trainer.utils import selective_log_softmax`

    from rlhfkern.compat import trl as compat

    import trl.kernels.chunked_logprob as trl_head
    import trl.trainer.utils as trl_utils

    spy, counts = spied
    spy(compat, "selective_log_softmax")
    head = trl_head.ChunkedLogProbFunction
    assert "trl.trainer.utils._ChunkedLogProbFunction" in holders("trl", [head])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TRL 1.16's GRPOTrainer reaches the fused head: no warning
        handle, originals, before = assert_patched_and_undone(compat, "trl", [(sdpo, "selective_log_softmax")])
    try:
        student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
        ids = torch.randint(0, 9, (2, 4))
        sdpo.compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0)
        assert counts["selective_log_softmax"] == 2  # student and teacher, through TRL's own code
        # TRL >= 1.15's fused LM head: the reference GRPOTrainer's fused forward reads holds ours
        assert trl_utils._ChunkedLogProbFunction is compat.ChunkedLogProbFunction
    finally:
        handle.undo()
    assert holders("trl", originals.values()) == before
    assert trl_utils._ChunkedLogProbFunction is head
    assert sdpo.selective_log_softmax is originals["selective_log_softmax"]


def test_trl_patch_never_silently_does_nothing(monkeypatch):
    """patch() warns, naming the TRL version, when it replaces nothing (here: already patched), and
    when GRPOTrainer calls nothing it replaced (a fused head it cannot reach, stood in by hiding
    trl.kernels.chunked_logprob); a GRPOTrainer that calls selective_log_softmax (TRL <= 1.14,
    stood in by a module holding TRL's function) is patched without a warning; a TRL without
    selective_log_softmax_and_entropy (before 1.15) is patched for the other two."""
    need("trl", extra="test")
    import trl
    import trl.trainer.utils as trl_utils

    from rlhfkern.compat import trl as compat

    first = compat.patch()
    try:
        with pytest.warns(UserWarning, match=rf"replaced nothing in TRL {trl.__version__}"):
            second = compat.patch()
        assert second.replaced == []
    finally:
        first.undo()
    no_head = {**compat.TARGETS, "trl.kernels.no_such_module": ("ChunkedLogProbFunction",)}
    del no_head["trl.kernels.chunked_logprob"]
    with monkeypatch.context() as mp:
        mp.setattr(compat, "TARGETS", no_head)
        with pytest.warns(UserWarning, match=rf"TRL {trl.__version__}'s GRPOTrainer calls none of the functions"):
            compat.patch().undo()
    monkeypatch.setattr(compat, "TARGETS", no_head)  # TRL <= 1.14: no fused head

    older = types.ModuleType("trl.trainer.grpo_trainer")  # `from .utils import selective_log_softmax, ...`
    older.selective_log_softmax = trl_utils.selective_log_softmax
    older.entropy_from_logits = trl_utils.entropy_from_logits
    monkeypatch.setitem(sys.modules, older.__name__, older)
    monkeypatch.setattr(compat, "_grpo_trainer", lambda: older)
    monkeypatch.delattr(trl_utils, "selective_log_softmax_and_entropy")
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        handle = compat.patch()
    try:
        assert not [w for w in seen if "rlhfkern" in str(w.message)], [str(w.message) for w in seen]
        assert older.selective_log_softmax is compat.selective_log_softmax
        assert older.entropy_from_logits is compat.entropy_from_logits
        assert handle.missing == ["trl.trainer.utils.selective_log_softmax_and_entropy",
                                  "trl.kernels.no_such_module.ChunkedLogProbFunction"]
    finally:
        handle.undo()
    assert older.selective_log_softmax is trl_utils.selective_log_softmax


class _StandIn(types.ModuleType):
    """A stand-in for a package that cannot be installed here: any attribute is a dummy class,
    any submodule imports."""

    __path__ = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


@pytest.fixture
def openrlhf_importable():
    """OpenRLHF's package imports deepspeed, flash-attn, vLLM (CUDA builds, not installable on this
    machine): those that are missing are stand-ins while the test runs (a mock of what cannot run
    here; the OpenRLHF modules themselves are the real 0.11.2 files). Removed afterwards, with every
    module imported through them."""
    pytest.importorskip("openrlhf", reason="openrlhf is not installed (pip install --no-deps openrlhf==0.11.2)")
    def installed(name):  # a namespace package (a folder of that name on sys.path) is not the package
        spec = importlib.util.find_spec(name)
        return spec is not None and spec.origin not in (None, "namespace")

    missing = [n for n in ("deepspeed", "flash_attn", "vllm", "ring_flash_attn", "bitsandbytes")
               if not installed(n)]
    saved = {n: sys.modules.pop(n) for n in missing if n in sys.modules}
    finder = _StandInFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if name.split(".")[0] in set(missing) | {"openrlhf"}:
                del sys.modules[name]
        sys.modules.update(saved)


def test_openrlhf_patch(openrlhf_importable):
    import openrlhf.models
    import openrlhf.models.actor as actor  # `from .utils import log_probs_from_logits`
    import openrlhf.trainer.ppo_utils.experience_maker as experience_maker
    import openrlhf.trainer.ray.ppo_actor as ppo_actor  # `from openrlhf.models import PolicyLoss`

    from rlhfkern.compat import openrlhf as compat

    handle, originals, before = assert_patched_and_undone(
        compat, "openrlhf", [(openrlhf.models, "PolicyLoss"), (openrlhf.models, "ValueLoss"),
                             (actor, "log_probs_from_logits"), (ppo_actor, "PolicyLoss"),
                             (ppo_actor, "compute_approx_kl"), (experience_maker, "compute_approx_kl")])
    try:
        loss = ppo_actor.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2)  # what OpenRLHF's actor builds
        assert isinstance(loss, compat.PolicyLoss)
    finally:
        handle.undo()
    assert holders("openrlhf", originals.values()) == before
    assert ppo_actor.PolicyLoss is originals["PolicyLoss"]
