"""TRL's GRPOTrainer as users run it (stock) against the same trainer after
`rlhfkern.compat.trl.patch()` (patched), on the same tiny Llama, weights, data and seed, at a
vocabulary of 40 and of 32000, in the same run: seconds per RL step, peak memory and the largest
difference of the metrics the trainer logs.

The model: the engine's tiny run (rlhfkern/sched/configs/grpo_reverse.yaml: Llama, hidden 64, 2
layers, 4 heads, untied LM head) with vocab_size 40 or 32000, built from the config with the
config's seed (rlhfkern.sched.actors.build_model) and saved once; both variants load it (weight
digests checked). The run: bench/trl_baseline.py's GRPO (the engine's batch: 32 prompts of the
reverse task x 8 samples, at most 6 new tokens, temperature 1, 2 optimizer steps of 128 sequences
per RL step, beta 0.001 so a reference model too, fp32 on the CPU, the config's torch threads), a
tokenizer with one word per id (bench/trl_baseline.py's, filled up to the vocabulary), logging
every optimizer step, and a dense rule reward (the fraction of even token ids in the response,
`even_reward`: every group has non-zero advantages at any vocabulary, so the policy gradient
runs through the log-probs from the first step).

How it is measured: each variant runs in a process of its own (bench/trl_baseline.py's gated
protocol), held before its first step; a round runs one RL step of each, back to back, stock
first in even rounds and patched first in odd ones. 1 warm-up round, then 20 timed rounds at
vocabulary 40 and 6 at 32000 (RLHFKERN_BENCH_ROUNDS=n: n for both); seconds per step = median
over the timed rounds (wall time of the exchange with the child). RLHFKERN_BENCH_THREADS sets the
torch threads per process (default: the config's, 2); RLHFKERN_BENCH_LOAD=n loads the machine
with n processes spinning Python loops for the whole run (as bench_cpu_grain.py's loaded rows);
the environment (e.g. OMP_WAIT_POLICY) passes to both children and is named in the results.

Peak memory: the child's peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs
once the trainer, both models and the optimizer are built) minus its resident memory then, over
the warm-up and timed steps (AdamW's state, allocated in the first step, counts alike in both;
torch has no CPU allocator statistics outside its profiler). Metrics: every numeric entry of
the trainer's log history (loss, entropy, kl, reward, reward_std, grad_norm, clip ratios,
lengths; timings excluded), step by step, the largest |patched - stock|.

Whether the patch reached the log-probs: the child counts the calls of TRL's own kernel
(trl.kernels.chunked_logprob.ChunkedLogProbFunction.forward), of whatever
`trl.trainer.utils._ChunkedLogProbFunction` (the name GRPOTrainer's fused LM head calls) is, and
of rlhfkern.linear_logprobs; the table's "log-probs by" column says which ran. With TRL >= 1.15
a patch that leaves TRL's kernel in place is reported as such, not hidden.

    python -m pytest bench/bench_trl.py --bench-md bench/results/trl-grpo-cpu-2core.md

(`python bench/bench_trl.py SPEC.json` is the child.)
"""

import gc
import json
import os
import random
import statistics
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import trl_baseline  # noqa: E402

CONFIG = os.path.join(ROOT, "rlhfkern", "sched", "configs", "grpo_reverse.yaml")
VOCABS = [40, 32000]
WARMUP = 1
ROUNDS = {40: 20, 32000: 6}  # timed rounds per vocabulary (RLHFKERN_BENCH_ROUNDS: the same for both)
THREADS = os.environ.get("RLHFKERN_BENCH_THREADS")  # torch threads per process; default: the config's (2)
LOAD = int(os.environ.get("RLHFKERN_BENCH_LOAD", "0"))  # busy processes beside the run
VARIANTS = ("stock", "patched")
TIMING_KEYS = ("time", "runtime", "per_second", "flos")  # logged keys that are not the run's metrics


def even_reward(prompts, responses):
    """Per sample, the fraction of the response's token ids that are even (0 for an empty one)."""
    return [sum(1 for t in r if t % 2 == 0) / len(r) if len(r) else 0.0 for r in responses]


# ---------------------------------------------------------------- the child (one variant's process)

def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class _Counted:
    """Stands for a callable or an autograd Function (`apply`), counting calls."""

    def __init__(self, target):
        self.target, self.calls = target, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.target(*args, **kwargs)

    def apply(self, *args, **kwargs):
        self.calls += 1
        return self.target.apply(*args, **kwargs)

    def __getattr__(self, name):  # everything else is the target's
        return getattr(self.target, name)


def install_counters(patched):
    """Patches TRL (when asked), then counts the calls of TRL's kernel, of the fused head's function
    and of rlhfkern.linear_logprobs. Returns a function that reports them."""
    import warnings

    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as utils

    original = kernel.ChunkedLogProbFunction
    warned = []
    if patched:
        import rlhfkern.compat.trl as compat

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compat.patch()
        warned = [str(w.message) for w in caught]
        for w in caught:
            print(f"patch() warned: {w.message}", file=sys.stderr)
    installed = getattr(utils, "_ChunkedLogProbFunction", None)
    trl_forward = _Counted(original.forward)
    original.forward = staticmethod(trl_forward)  # apply() looks forward up on the class at each call
    head = None
    if installed is not None:
        head = _Counted(installed)
        utils._ChunkedLogProbFunction = head
    ours = None
    if patched:
        import rlhfkern
        import rlhfkern.compat.trl as compat
        import rlhfkern.ops.logprob as lp

        fn = lp.linear_logprobs
        ours = _Counted(fn)
        for mod in (rlhfkern, lp, compat):
            if getattr(mod, "linear_logprobs", None) is fn:
                setattr(mod, "linear_logprobs", ours)

    def report():
        name = None if installed is None else f"{installed.__module__}.{installed.__qualname__}"
        return {"head": name, "head_is_trl": installed is original, "head_calls": head.calls if head else 0,
                "trl_kernel_calls": trl_forward.calls, "rlhfkern_linear_logprobs_calls": ours.calls if ours else None,
                "patch_warnings": warned}

    return report


def memory_probe():
    """A callback that resets the peak resident memory when training begins (after the trainer,
    both models and the optimizer are built, and after the gate's first go) and reports the peak
    since then above the resident memory then."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        base_kib = None

        def on_train_begin(self, args, state, control, **kwargs):
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base_kib = _status_kib("VmRSS")

        def report(self):
            peak = _status_kib("VmHWM") - self.base_kib
            return {"rss_base_mib": self.base_kib / 1024, "peak_extra_mib": peak / 1024}

    return Probe()


def child(spec_path):
    with open(spec_path) as f:
        s = json.load(f)
    channel = trl_baseline.Channel()
    import torch

    torch.set_num_threads(s["threads"])
    counters = install_counters(s["variant"] == "patched")
    probe = memory_probe()
    rewards = types.SimpleNamespace(even_reward=even_reward)
    trainer = trl_baseline.run_grpo(s, channel, rewards, trl_baseline.Counter(), callbacks=[probe])
    channel.send("END", {**counters(), **probe.report(), "log_history": trainer.state.log_history})


# ---------------------------------------------------------------- the benchmark

def metric_differences(stock, patched):
    """{key: max |patched - stock|} over the log entries both have, step by step (numeric keys, no timings)."""
    diffs = {}
    for a, b in zip(stock, patched):
        for k, x in a.items():
            y = b.get(k)
            if any(t in k for t in TIMING_KEYS) or isinstance(x, bool) or not isinstance(x, (int, float)) \
                    or not isinstance(y, (int, float)):
                continue
            diffs[k] = max(diffs.get(k, 0.0), abs(y - x))
    return diffs


def fmt_diff(diffs):
    if not diffs:
        return "(none logged)"
    k = max(diffs, key=diffs.get)
    return f"{diffs[k]:.2g} ({k})" if diffs[k] else "0 (every metric equal)"


def list_diffs(diffs):
    """The non-zero differences, largest first, then how many metrics were equal."""
    big = [f"{k} {d:.2g}" for k, d in sorted(diffs.items(), key=lambda kv: -kv[1]) if d]
    equal = sorted(k for k, d in diffs.items() if not d)
    return ", ".join(big + ([f"equal: {', '.join(equal)}"] if equal else [])) or "(none logged)"


def head_text(end):
    if end["trl_kernel_calls"] and not end["rlhfkern_linear_logprobs_calls"]:
        return f"TRL's ChunkedLogProbFunction ({end['trl_kernel_calls']} calls)"
    where = end["head"] if not end["head_is_trl"] else "TRL's name, rlhfkern inside"
    return (f"{where} ({end['head_calls']} calls; rlhfkern.linear_logprobs {end['rlhfkern_linear_logprobs_calls']}, "
            f"TRL's kernel {end['trl_kernel_calls']})")


@pytest.fixture(scope="module")
def load():
    """RLHFKERN_BENCH_LOAD processes spinning Python loops while the module runs."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(LOAD)]
    yield LOAD
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def task():
    from rlhfkern.sched import tasks
    from rlhfkern.sched.config import load_config

    cfg = load_config(CONFIG)
    return cfg, tasks.DigitTask(cfg.data.task, cfg.data.min_digits, cfg.data.max_digits, cfg.data.eval_prompts,
                                cfg.data.seed)


@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
def bench_grpo_step(benchmark, tmp_path, task, load, vocab):
    pytest.importorskip("trl")
    pytest.importorskip("psutil")
    from rlhfkern.sched.actors import build_model
    from rlhfkern.sched.config import load_config

    base, digit_task = task
    cfg = load_config(CONFIG, [f"models.policy.model.hf_config.vocab_size={vocab}"])
    policy = build_model(cfg, "policy", cfg.train.seed, device="cpu")
    policy.save_pretrained(tmp_path / "policy")
    digest = trl_baseline.weight_digest(policy.named_parameters())
    del policy
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    rounds_timed = int(os.environ.get("RLHFKERN_BENCH_ROUNDS", ROUNDS.get(vocab, 6)))
    steps = WARMUP + rounds_timed
    spec = {"model_dir": str(tmp_path / "policy"), "vocab": vocab, "reward": "even_reward",
            "prompts": digit_task.train_prompts(t.prompts_per_step * steps, random.Random(1)),
            "prompts_per_step": t.prompts_per_step, "samples": r.samples_per_prompt,
            "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "lr": cfg.models.policy.optimizer.lr, "grad_clip": cfg.models.policy.optimizer.grad_clip_norm,
            "kl_coef": a.kl_coef, "clip_low": a.clip_low, "clip_high": a.clip_high,
            "minibatch": t.minibatch_sequences, "ppo_epochs": t.ppo_epochs, "steps": steps, "steps_per_round": 1,
            "seed": t.seed, "threads": int(THREADS or cfg.placement.threads_per_actor), "logging_steps": 1}
    children = {v: trl_baseline.Child(f"{v} V{vocab}", {**spec, "variant": v, "work_dir": str(tmp_path / v)},
                                      sys.executable, "bench_trl.py", tmp_path) for v in VARIANTS}
    ends = {}
    try:
        for c in children.values():
            c.ready()
            assert c.info["digest"] == digest, f"{c.name} starts from other weights"
        rounds = iter(range(steps))

        def one_round():
            k = next(rounds)
            for v in (VARIANTS if k % 2 == 0 else VARIANTS[::-1]):
                children[v].step()

        load_before = os.getloadavg()
        benchmark.group = (f"TRL GRPO step, tiny Llama (hidden 64, 2 layers), vocab {vocab}, CPU"
                           + (f", loaded by {load} busy processes" if load else ""))
        benchmark.pedantic(one_round, rounds=rounds_timed, warmup_rounds=WARMUP, iterations=1)
        load_after = os.getloadavg()
    finally:
        finished = all(len(c.steps) == steps for c in children.values())
        for v, c in children.items():
            ends[v] = c.close(finished)
    sequences = t.prompts_per_step * r.samples_per_prompt
    seconds = {v: statistics.median(c.seconds[-rounds_timed:]) for v, c in children.items()}
    diffs = metric_differences(ends["stock"]["log_history"], ends["patched"]["log_history"])
    rewards = {v: [st["reward"] for st in c.steps] for v, c in children.items()}
    same = [x == y for x, y in zip(rewards["stock"], rewards["patched"])]
    rows = []
    for v, c in children.items():
        e = ends[v]
        q = statistics.quantiles(c.seconds[-rounds_timed:], n=4) if rounds_timed > 1 else [seconds[v]] * 3
        notes = {"seconds per step": f"median {seconds[v]:.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}, "
                                     f"min {min(c.seconds[-rounds_timed:]):.3f}",
                 "CPU seconds per step": f"{(c.cpu[-1] - c.cpu[-rounds_timed - 1]) / rounds_timed:.3f}",
                 "resident memory before the steps": f"{e['rss_base_mib']:.0f} MiB"}
        if e["patch_warnings"]:
            notes["patch() warned"] = " / ".join(w[:200] + ("..." if len(w) > 200 else "") for w in e["patch_warnings"])
        row = {"label": f"TRL {c.info['trl']} GRPOTrainer, "
                        + ("stock" if v == "stock" else "rlhfkern.compat.trl.patch()"),
               "role": "baseline" if v == "stock" else "op", "seconds": seconds[v],
               "rates": {"sequences/s": sequences / seconds[v]},
               "ratios": {} if v == "stock" else {"speed-up vs stock": seconds["stock"] / seconds[v],
                                                  "peak memory vs stock": e["peak_extra_mib"]
                                                  / max(ends["stock"]["peak_extra_mib"], 1e-9)},
               "columns": {"peak memory": f"{e['peak_extra_mib']:.0f} MiB",
                           "max metric diff vs stock": "" if v == "stock" else fmt_diff(diffs),
                           "log-probs by": head_text(e)},
               "notes": notes}
        rows.append(row)
    reached = ends["patched"]["trl_kernel_calls"] == 0 and ends["stock"]["trl_kernel_calls"] > 0
    group_notes = {
        "timing": f"{WARMUP} warm-up + {rounds_timed} timed rounds; a round = one RL step of each variant (2 optimizer "
                  f"steps of {t.minibatch_sequences} sequences, {sequences} sequences generated), back to back, the "
                  "order alternating; time per call = median over rounds of a variant's step",
        "peak memory": "peak resident memory (VmHWM) of the variant's process over its steps minus its resident "
                       "memory once the trainer was built (both models, optimizer)",
        "patch reached the fused LM head": ("yes: TRL's ChunkedLogProbFunction never ran in the patched process"
                                            if reached else "NO: TRL's own kernel computed the patched run's "
                                            "log-probs (stock == patched)"),
        "same samples": (f"the mean reward of every step equal in both runs ({len(same)} steps)" if all(same) else
                         f"mean rewards equal for the first {same.index(False)} of {len(same)} steps"),
        "metric differences (max |patched - stock| over the logged steps)": list_diffs(diffs),
        "machine load average (1, 5, 15 min), before -> after": " -> ".join(
            ", ".join(f"{x:.1f}" for x in la) for la in (load_before, load_after)),
        "versions": f"trl {children['stock'].info['trl']}, transformers {children['stock'].info['transformers']}, "
                    f"torch {children['stock'].info['torch']}, {children['stock'].info['threads']} threads, "
                    f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}",
    }
    benchmark.extra_info.update(label="one round: a step of each variant", rows=rows, group_notes=group_notes)


if __name__ == "__main__":
    child(sys.argv[1])
