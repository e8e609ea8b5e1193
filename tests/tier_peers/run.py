"""The peers' tier: `make test-peers` (python tests/tier_peers/run.py).

Fetches the peers' released tests (fetch.py), runs each peer's (manifest.py) in its own pytest
process with rlhfkern's drop-ins installed by the peer's one-call patcher (peers_plugin.py), twice:
as shipped, then with the broken stand-in (every drop-in's outputs x*1.5+0.25). Writes the reach
table to tests/tier_peers/REACH.md and fails when
  - a peer test fails (strict expected failures aside, each with its reason in the manifest),
  - a file expected to reach a drop-in reached none of those it should,
  - under perturbation, a reaching test passes that is not a known invariant-only test (or a known
    one fails: the table is stale).
`--discover` runs every CPU test file of each peer instead (no gates): how the manifest was made."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fetch  # noqa: E402
import manifest  # noqa: E402

RESULTS = fetch.CACHE / "results"


def run_peer(peer, mode, paths, extra=()):
    root = fetch.CACHE / peer
    paths = [p for p in paths if (root / p).exists()]  # a file the fetched version lacks: listed in the report
    ini = root / "pytest.ini"  # the peer's folder is its own rootdir: its `tests` package, no config of ours
    ini.write_text("[pytest]\n")
    out = RESULTS / f"{peer}.{mode}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, RLHFKERN_PEER=peer, RLHFKERN_PEERS_OUT=str(out), RLHFKERN_PEERS_MODE=mode,
               PYTHONPATH=os.pathsep.join([str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "pytest", *paths, "-p", "peers_plugin", "-c", str(ini), "--rootdir", str(root),
           "-p", "no:cacheprovider", "-q", *(("--tb=no", "-rN") if mode == "broken" else ("-rfEs", "--tb=short")),
           *extra]
    started = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env)
    seconds = time.time() - started
    if not out.exists():
        raise SystemExit(f"test-peers: {peer} ({mode}) wrote no record "
                         f"(pytest exit {proc.returncode})")
    record = json.loads(out.read_text())
    record["seconds"] = round(seconds, 1)
    record["returncode"] = proc.returncode
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="verl,openrlhf,trl")
    ap.add_argument("--discover", action="store_true", help="every CPU test file of each peer; no gates, no report")
    ap.add_argument("--modes", default="stock,rlhfkern,broken")
    ap.add_argument("--report", default=str(HERE / "REACH.md"))
    ap.add_argument("--from-results", action="store_true", help="judge and report the last runs' records again")
    args = ap.parse_args()
    peers = args.peers.split(",")
    started = time.time()
    sources = fetch.fetch_all(peers)
    fetch_s = time.time() - started
    runs = {}
    for peer in peers:
        spec = manifest.PEERS[peer]
        paths = spec["discover"] if args.discover else spec["paths"]
        if args.from_results:
            runs[peer] = {mode: json.loads((RESULTS / f"{peer}.{mode}.json").read_text())
                          for mode in args.modes.split(",")}
        else:
            runs[peer] = {mode: run_peer(peer, mode, paths) for mode in args.modes.split(",")}
    if args.discover or args.modes != "stock,rlhfkern,broken":
        print(json.dumps({p: {m: [r["seconds"], r["returncode"]] for m, r in rs.items()} for p, rs in runs.items()}))
        return 0
    import report

    analyses, failures = {}, []
    for peer in peers:
        analyses[peer], f = report.judge(peer, runs[peer])
        failures += f
    timing = RESULTS / "timing.json"  # the runs' own, for --from-results
    if args.from_results and timing.exists():
        fetch_s, total = json.loads(timing.read_text())
    else:
        total = time.time() - started
        timing.write_text(json.dumps([fetch_s, total]))
    report.write(args.report, sources, runs, analyses, failures, fetch_s, total)
    print(f"test-peers: report written to {args.report} ({time.time() - started:.0f} s)")
    if failures:
        print("test-peers: FAILED\n  " + "\n  ".join(failures))
        return 1
    print("test-peers: passed (" + ", ".join(f"{p}: {len(a['reaching'])} reaching tests"
                                             for p, a in analyses.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
