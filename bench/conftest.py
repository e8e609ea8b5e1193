"""Benchmark harness: after the pytest-benchmark run, print one table per group with each
backend's time per call, its speed-up over the group's baseline (what users run today) and,
where a group has a "copy" row, the ratio to copying the op's bytes once.
`--bench-md PATH` also writes the table as Markdown (bench/results/<card>.md)."""

import os
import platform
import subprocess
import sys

import torch

if "triton" not in sys.modules:  # Triton timings need a GPU; without one it interprets
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


def pytest_addoption(parser):
    parser.addoption("--bench-md", default=None, help="also write the results table to this Markdown file")


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_bytes(fn, device="cpu"):
    """Peak memory that one call of fn adds: on CUDA, the caching allocator's peak over what was
    allocated before; on the CPU, the process's resident memory (Linux: VmHWM is reset to the
    current VmRSS through /proc/self/clear_refs, then read back after the call)."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def per_call(bench):
    """Median seconds for one call of the op (a benchmarked function may run `inner` calls)."""
    return bench.stats.median / bench.extra_info.get("inner", 1)


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def commit():
    if os.environ.get("RLHFKERN_COMMIT"):  # a copy of the tree without .git (bench/gpu_check.sh)
        return os.environ["RLHFKERN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_table(benchmarks):
    groups = {}
    for b in benchmarks:
        groups.setdefault(b.group, []).append(b)
    lines = ["| group | backend | time per call | vs baseline | vs copy | of copy bandwidth | bytes / time | peak memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for group, rows in groups.items():
        base = next((per_call(b) for b in rows if b.extra_info.get("role") == "baseline"), None)
        copy_row = next((b for b in rows if b.extra_info.get("role") == "copy"), None)
        copy = per_call(copy_row) if copy_row else None
        nbytes = copy_row.extra_info.get("nbytes") if copy_row else None
        for b in sorted(rows, key=per_call, reverse=True):
            t = per_call(b)
            speedup = f"{base / t:.1f}x" if base and b.extra_info.get("role") not in ("baseline", "copy") else ""
            vs_copy = f"{t / copy:.2f}" if copy and b.extra_info.get("role") != "copy" else ""
            share = f"{100 * copy / t:.0f}%" if copy and b.extra_info.get("role") != "copy" else ""
            rate = f"{nbytes / t / 1e9:.0f} GB/s" if nbytes else ""
            label = b.extra_info.get("label", b.name)
            peak = b.extra_info.get("peak_bytes")
            peak = f"{peak / 2**20:.0f} MiB" if peak is not None else ""
            lines.append(f"| {group} | {label} | {format_time(t)} | {speedup} | {vs_copy} | {share} | {rate} | {peak} |")
    return "\n".join(lines)


def rates_table(benchmarks):
    """A second table for groups with rates (e.g. tokens/s): rows are benchmarks whose extra_info has
    "rates" ({name: per second}; time per call from pytest-benchmark), or the dicts listed in a
    benchmark's extra_info["rows"] (several systems timed inside one benchmark: each with label,
    role, seconds, rates). Columns: time per call, each rate, ratios (a row's "ratios" ({column:
    value}) where rows carry them, else the first rate's ratio to every baseline row of the group),
    the per-call amounts ("per_step"), a row's own text "columns" ({name: text}) and "notes"
    ({name: text}); a benchmark's
    extra_info["group_notes"] ({name: text}) follow the group's table."""
    groups, group_notes = {}, {}
    for b in benchmarks:
        rows = b.extra_info.get("rows") or ([{**b.extra_info, "label": b.extra_info.get("label", b.name),
                                              "seconds": per_call(b)}] if b.extra_info.get("rates") else [])
        groups.setdefault(b.group, []).extend(rows)
        group_notes.setdefault(b.group, {}).update(b.extra_info.get("group_notes", {}))
    out = []
    for group, rows in groups.items():
        if not rows:
            continue
        rate_names = list(rows[0]["rates"])
        first = rate_names[0]
        given = any("ratios" in r for r in rows)
        baselines = [r for r in rows if r.get("role") == "baseline"]
        ratios = [r.get("ratios", {}) if given else
                  {f"{first} vs {c['label']}": r["rates"][first] / c["rates"][first] for c in baselines if c is not r}
                  for r in rows]
        ratio_names = list(dict.fromkeys(k for rr in ratios for k in rr))
        amounts = list(rows[0].get("per_step", {}))
        columns = list(dict.fromkeys(k for r in rows for k in r.get("columns", {})))
        head = (["group", "backend", "time per call"] + rate_names + ratio_names
                + [f"{a} per call" for a in amounts] + columns + ["notes"])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 3) + "---|"]
        for r, rr in zip(rows, ratios):
            cells = [group, r["label"], format_time(r["seconds"])] + [f"{r['rates'][n]:.0f}" for n in rate_names]
            cells += [f"{rr[n]:.2f}x" if n in rr else "" for n in ratio_names]
            cells += [f"{r['per_step'][a]:.0f}" for a in amounts]
            cells += [r.get("columns", {}).get(c, "") for c in columns]
            cells.append("; ".join(f"{k}: {v}" for k, v in r.get("notes", {}).items()))
            out.append("| " + " | ".join(cells) + " |")
        out += [""] + [f"{k}: {v}" for k, v in group_notes[group].items()] + [""]
    return "\n".join(out).strip()


def format_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b]
    if not benchmarks:
        return
    header = (f"machine: {machine()}\ncommit: {commit()}\ncommand: python -m pytest {' '.join(config.invocation_params.args)}\n"
              f"torch {torch.__version__}, "
              f"python {platform.python_version()}\n"
              "vs baseline: baseline time / this time; vs copy: this time / time to copy the op's bytes once; "
              "of copy bandwidth: copy time / this time; bytes / time: the bytes the op must move (the copy row's, "
              "read + written) over this time; "
              "peak memory: what one call adds beyond its inputs (and, for backward, their gradient buffers)")
    table = results_table(benchmarks)
    rates = rates_table(benchmarks)
    if rates:
        table += "\n\n" + rates
    terminalreporter.write_sep("=", "rlhfkern benchmark table")
    terminalreporter.write_line(header)
    terminalreporter.write_line(table)
    path = config.getoption("--bench-md")
    if path:
        with open(path, "w") as f:
            f.write(f"# rlhfkern benchmarks\n\n```\n{header}\n```\n\n{table}\n")
