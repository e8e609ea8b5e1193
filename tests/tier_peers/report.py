"""The peers' tier: its judgement (the gates) and its report (REACH.md), from the records the plugin
wrote for each peer and mode (stock, rlhfkern, broken)."""

import collections
import importlib
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import manifest  # noqa: E402


def _passed(outcome):
    return outcome in ("passed", "xpassed")


def _gpu_skip(outcome):
    if outcome is None:
        return False
    return outcome.startswith("deselected (GPU") or (outcome.startswith("skipped")
                                                      and re.search(r"accelerator|CUDA|cuda|GPU", outcome) is not None)


def _tests(record):
    return {t: o for t, o in record["outcomes"].items() if "::" in t}


def _our_test_exists(ref):
    path, _, name = ref.partition("::")
    file = ROOT / path
    return file.exists() and re.search(rf"^def {re.escape(name)}\(", file.read_text(), re.M) is not None


def judge(peer, runs):
    """(analysis, failures) of one peer's three runs."""
    spec = manifest.PEERS[peer]
    stock, ours, broken = runs["stock"], runs["rlhfkern"], runs["broken"]
    failures = []
    for mode, record in runs.items():
        for t, o in record["outcomes"].items():
            if o.startswith("collection error"):
                failures.append(f"{peer} ({mode}): {t}: {o}")
        if not _tests(record):
            failures.append(f"{peer} ({mode}): no test ran (pytest exit {record['returncode']})")
    tests = _tests(ours)
    peer_fails = {}
    for t, o in _tests(stock).items():
        if not (_passed(o) or o.startswith("skipped") or o.startswith("deselected")):
            why = next((w for p, w in spec.get("peer_fails", {}).items() if re.search(p, t)), None)
            if why is None:
                failures.append(f"{peer}: {t} fails with {peer}'s own functions ({o}): the fetched tests do not "
                                "match the installed version? (list it under peer_fails with the reason)")
            peer_fails[t] = why or o
    reaching, invariant, unexpected_invariant = {}, {}, []
    for t, o in tests.items():
        if t in peer_fails or _gpu_skip(o) or o.startswith("skipped"):
            continue
        if not (_passed(o) or o == "xfailed"):
            failures.append(f"{peer}: {t} passes with {peer}'s own functions, fails with rlhfkern's ({o})")
        reached = ours["reached"].get(t, {})
        if not reached:
            continue
        reaching[t] = reached
        b = broken["outcomes"].get(t)
        listed = next((w for p, w in spec["invariant"].items() if re.search(p, t)), None)
        if _passed(o) and _passed(b):
            if listed is None:
                unexpected_invariant.append(t)
                failures.append(f"{peer}: {t} reaches {sorted(reached)} and still passes with the broken stand-in: "
                                "it checks no value (list it under `invariant`, with our test of its values under "
                                "`ours`)")
            invariant[t] = listed
        elif listed is not None and _passed(o):
            failures.append(f"{peer}: {t} is listed as invariant-only but fails with the broken stand-in ({b}): "
                            "remove it from `invariant`")
    # files: each must reach what it is expected to
    by_file = collections.defaultdict(set)
    for t, reached in reaching.items():
        by_file[t.split("::")[0]].update(reached)
    present = {t.split("::")[0] for t in tests}
    for file, names in spec["reach"].items():
        if file not in present:
            continue  # not in the fetched version: listed in the report
        missing = sorted(set(names) - by_file[file])
        if missing:
            failures.append(f"{peer}: {file} reached none of {missing} (the patch is not in force where its "
                            "tests call?)")
    # half-precision expected failures: ours no farther from float64 than the peer's
    fp64 = ours.get("fp64", {})
    for t, o in tests.items():
        if o in ("xfailed", "xpassed"):
            rows = fp64.get(t)
            if not rows:
                failures.append(f"{peer}: {t} is an expected failure without a float64 measurement")
            for name, dtype, e_ours, e_peer, ulp in rows or ():
                if e_ours > e_peer + ulp:
                    failures.append(f"{peer}: {t}: {name} {dtype} is farther from float64 than {peer}'s: "
                                    f"{e_ours:.3g} > {e_peer:.3g} (+ 1 ulp {ulp:.2g})")
    # our own value tests, named in the manifest, exist
    for name, refs in spec.get("ours", {}).items():
        for ref in refs:
            if not _our_test_exists(ref):
                failures.append(f"{peer}: manifest names {ref} for {name}: no such test")
    compat = importlib.import_module(f"rlhfkern.compat.{peer}")
    names = [n for ns in compat.TARGETS.values() for n in ns]
    return dict(tests=tests, reaching=reaching, invariant=invariant, peer_fails=peer_fails, by_file=by_file,
                present=present, names=names, fp64=fp64), failures


def _cell(outcome):
    if outcome is None:
        return "-"
    if outcome.startswith("skipped"):
        return "skipped"
    return outcome


def _calls(reached):
    return ", ".join(f"{n} ({c})" for n, c in sorted(reached.items()))


def _git(*args):
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def _cpu():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write(path, sources, runs, analyses, failures, fetch_seconds, total_seconds):
    import os

    import torch

    L = []
    w = L.append
    w("# The peers' own tests with rlhfkern patched in (`make test-peers`)")
    w("")
    w(f"Written by `tests/tier_peers/run.py` ({time.strftime('%Y-%m-%d')}, "
      f"rlhfkern {_git('rev-parse', '--short', 'HEAD')}"
      f"{' + uncommitted changes' if _git('status', '--porcelain', '--untracked-files=no') else ''}, "
      f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}); do not edit by hand. Each peer's released "
      "tests run three times in a pytest process of their own: **stock** (the peer's functions, each wrapped in "
      "a call counter: the baseline), **rlhfkern** (after `rlhfkern.compat.<peer>.patch()`, each installed "
      "drop-in wrapped in the same counter) and **broken** (the drop-ins' floating outputs x*1.5+0.25: a test "
      "that checks a value it reaches must fail). A test *reaches* a function when the counter saw a call "
      "during its setup, call or teardown.")
    w("")
    w("**Result: " + ("PASS**" if not failures else f"FAIL** ({len(failures)} problems, listed at the end)"))
    w("")
    w("## Sources")
    w("")
    w("| peer | installed | tests from | version of the tests | sha256 |")
    w("|---|---|---|---|---|")
    for peer, s in sources.items():
        installed = _installed_version(peer)
        w(f"| {peer} | {installed} | {s['source']} | {s['version']} | {(s.get('sha256') or '-')[:16]} |")
    for peer, s in sources.items():
        for t in s.get("tried", []):
            w(f"- {peer}, tried: {t}")
        if s["version"] != _installed_version(peer):
            w(f"- {peer}: the tests are of {s['version']}, the installed {peer} is {_installed_version(peer)} "
              f"(wanted: {s.get('wanted', '?')}; the nearest available here). Names those tests import that the "
              "installed version lacks are stand-ins that fail when used; tests that fail with the peer's own "
              "functions are listed below and not judged.")
    w("")
    w("## Cost")
    w("")
    first = sum(s.get("fetch_seconds", 0) for s in sources.values())
    w(f"Download and unpack (first time, cache empty): {first:.0f} s; this run's fetch {fetch_seconds:.1f} s "
      f"({'cached' if fetch_seconds < first / 2 else 'fresh'}). Test runs, seconds (stock / rlhfkern / broken):")
    w("")
    for peer, r in runs.items():
        w(f"- {peer}: " + " / ".join(f"{r[m]['seconds']:.0f}" for m in ("stock", "rlhfkern", "broken")))
    w(f"- whole tier: {total_seconds:.0f} s")
    w("")
    w("## Per replaced function")
    w("")
    w("Peer tests reaching it under rlhfkern (and passing), of those how many fail with the broken stand-in, "
      "how many still pass (they check no value of it), and our own tests of its values against the installed peer.")
    w("")
    w("| peer | function | peer tests reaching it | fail when broken | pass when broken | expected failures "
      "(half precision, checked against float64) | our value tests |")
    w("|---|---|---|---|---|---|---|")
    for peer, a in analyses.items():
        spec = manifest.PEERS[peer]
        ours = runs[peer]["rlhfkern"]["outcomes"]
        broken = runs[peer]["broken"]["outcomes"]
        for name in a["names"]:
            ts = [t for t, r in a["reaching"].items() if name in r]
            judged = [t for t in ts if _passed(ours.get(t))]
            inv = [t for t in judged if t in a["invariant"]]
            ours_refs = "<br>".join(f"`{r.split('::')[0].split('/')[-1]}::{r.split('::')[1]}`"
                                    for r in spec.get("ours", {}).get(name, [])) or "-"
            if ts:
                w(f"| {peer} | `{name}` | {len(ts)} | {sum(not _passed(broken.get(t)) for t in judged)} | {len(inv)} "
                  f"| {len(ts) - len(judged)} | {ours_refs} |")
            else:
                why = spec.get("unreached", {}).get(name, "no reason recorded")
                w(f"| {peer} | `{name}` | 0 ({why}) | - | - | - | {ours_refs} |")
    w("")
    w("## Every peer test that reaches a replaced function")
    w("")
    for peer, a in analyses.items():
        spec = manifest.PEERS[peer]
        stock, ours, broken = (runs[peer][m]["outcomes"] for m in ("stock", "rlhfkern", "broken"))
        w(f"### {peer}")
        w("")
        w("| test | reaches (calls, rlhfkern) | stock | rlhfkern | broken |")
        w("|---|---|---|---|---|")
        for t, reached in a["reaching"].items():
            note = " (checks no value)" if t in a["invariant"] else ""
            w(f"| `{t}` | {_calls(reached)} | {_cell(stock.get(t))} | {_cell(ours.get(t))} "
              f"| {_cell(broken.get(t))}{note} |")
        w("")
        others = collections.Counter(t.split("::")[0] for t, o in a["tests"].items()
                                     if t not in a["reaching"] and t not in a["peer_fails"] and not _gpu_skip(o))
        if others:
            w("Tests of the same files that reach no replaced function (run, passing in every mode unless listed "
              "above): " + ", ".join(f"{f} {n}" for f, n in sorted(others.items())) + ".")
            w("")
        absent = [f for f in spec["reach"] if f not in a["present"]] + \
                 [p for p in spec["paths"] if not any(t.startswith(p) for t in a["tests"])]
        if absent:
            w("Not in the fetched tests: " + ", ".join(sorted(set(absent))) + ".")
            w("")
        gpu = collections.Counter(t.split("[")[0] for t, o in a["tests"].items() if _gpu_skip(o))
        if gpu:
            w(f"GPU only (skipped here by the peer's own marker, or deselected), {sum(gpu.values())}: " +
              ", ".join(f"`{t}` ({n})" for t, n in gpu.items()) + ".")
            w("")
        if a["peer_fails"]:
            w("Fail with the peer's own functions too (not judged):")
            w("")
            for t, why in a["peer_fails"].items():
                w(f"- `{t}`: {why}")
            w("")
        half = {t: rows for t, rows in a["fp64"].items() if any(r[1] in ("float16", "bfloat16") for r in rows)}
        if half:
            w("Expected failures (half precision): " + "; ".join(
                x["reason"] for x in spec.get("xfail", []) if x.get("dtypes")) + ". Largest |x - float64| "
              "per case, ours / the peer's, and one unit in the last place at the largest |float64|:")
            w("")
            w("| test | function | dtype | rlhfkern | ours | peer's | ulp |")
            w("|---|---|---|---|---|---|---|")
            for t, rows in half.items():
                for name, dtype, e_o, e_p, ulp in rows:
                    if dtype in ("float16", "bfloat16"):
                        w(f"| `{t.split('::', 1)[1]}` | {name} | {dtype} | {_cell(ours.get(t))} | {e_o:.2g} "
                          f"| {e_p:.2g} | {ulp:.2g} |")
            w("")
    w("## Notes")
    w("")
    for peer, r in runs.items():
        for n in dict.fromkeys(r["rlhfkern"]["notes"]):
            w(f"- {peer}: {n}")
        w(f"- {peer}: patch() replaced {len(r['rlhfkern']['replaced'])} references"
          + (f"; optional targets absent in this version: {', '.join(r['rlhfkern']['missing'])}"
             if r["rlhfkern"]["missing"] else ""))
    w("")
    if failures:
        w("## Problems")
        w("")
        for f in failures:
            w(f"- {f}")
        w("")
    Path(path).write_text("\n".join(L))


def _installed_version(peer):
    from importlib.metadata import version

    try:
        return version(peer)
    except Exception:
        return "not installed"
