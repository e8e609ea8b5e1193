"""Installing drop-ins into a framework: `patch(package, targets)`.

A framework's function lives in its defining module, but also wherever a module did
`from x import f` (a second reference) and in registries (verl's POLICY_LOSS_REGISTRY and
ADV_ESTIMATOR_REGISTRY hold the function objects). Replacing only the defining attribute leaves
those calling the original. So, for each target, the original object is taken from its defining
module and every reference to that very object is replaced: module attributes of every imported
module of the package, and values of the module-level dicts of those modules. Modules imported
later bind the replacement, since they import it from the patched defining module.

The returned `Patch` restores exactly what was replaced (`undo()`, or use it as a context
manager).
"""

import importlib
import importlib.util
import sys


class Patch:
    """What one patch() replaced; `undo()` puts the originals back."""

    def __init__(self, package):
        self.package = package
        self._undo = []      # (kind, holder, key, original)
        self.replaced = []   # "module.attr" / "module.DICT[key]" strings, for reports and tests
        self.missing = []    # "module.name" of optional targets this version of the package lacks
        self.originals = []  # the framework's functions this patch looked for

    def _set(self, kind, holder, key, value, original, where):
        self._undo.append((kind, holder, key, original))
        if kind == "attr":
            setattr(holder, key, value)
        else:
            holder[key] = value
        self.replaced.append(where)

    def undo(self):
        for kind, holder, key, original in reversed(self._undo):
            if kind == "attr":
                setattr(holder, key, original)
            else:
                holder[key] = original
        self._undo, self.replaced = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()

    def __repr__(self):
        return f"Patch({self.package}: {len(self.replaced)} references replaced)"


def _import(module_name, package):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"rlhfkern.compat.{package}.patch(): cannot import {module_name} ({e}); "
                          f"is {package} installed with its own dependencies?") from e


def _importable(module_name):
    try:
        return importlib.util.find_spec(module_name) is not None
    except ImportError:  # a parent package is missing
        return False


def patch(package, targets, drop_ins, optional=()):
    """targets: {defining module: (names...)}; drop_ins: the module holding the replacements under
    the same names (read now). Replaces every reference, in the imported modules of `package`, to
    each original object; returns the Patch (undo handle). A name in `optional` that its module
    lacks, or whose module does not exist (an older version of the package), is skipped and listed
    in the handle's `missing`."""
    originals = {}  # id(original) -> (original, replacement)
    missing = []
    for module_name, names in targets.items():
        if all(name in optional for name in names) and not _importable(module_name):
            missing += [f"{module_name}.{name}" for name in names]  # a module an older version lacks
            continue
        module = _import(module_name, package)
        for name in names:
            replacement = getattr(drop_ins, name)
            if not hasattr(module, name) and name in optional:
                missing.append(f"{module_name}.{name}")
                continue
            if not hasattr(module, name):
                raise AttributeError(f"rlhfkern.compat.{package}.patch(): {module_name} has no {name!r}: "
                                     f"not the {package} version these drop-ins follow")
            original = getattr(module, name)
            if original is not replacement:  # already patched: nothing to do for it
                originals[id(original)] = (original, replacement)
    handle = Patch(package)
    handle.missing = missing
    handle.originals = [original for original, _ in originals.values()]
    prefix = package + "."
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == package or module_name.startswith(prefix)):
            continue
        for attr, value in list(vars(module).items()):
            hit = originals.get(id(value))
            if hit is not None and hit[0] is value:
                handle._set("attr", module, attr, hit[1], value, f"{module_name}.{attr}")
            elif isinstance(value, dict) and not attr.startswith("__"):
                for key, entry in list(value.items()):
                    hit = originals.get(id(entry))
                    if hit is not None and hit[0] is entry:
                        handle._set("item", value, key, hit[1], entry, f"{module_name}.{attr}[{key!r}]")
    return handle
