"""Engine benchmark: seconds per RL step and tokens per second (generated and trained) of the
engine's tiny default run (rlhfkern/sched/configs/grpo_reverse.yaml: GRPO, a tiny Llama made from a
config, a digit task, 32 prompts x 8 samples, at most 6 new tokens), colocated (the default:
policy, rollout and reference time-share one device) and separate (the rollout on a device of its
own), against TRL's GRPOTrainer (trl 1.16, this venv) and PPOTrainer (trl.experimental.ppo of
trl 1.12, its own venv: PPO left trl in 1.13), in the same run. The same comparison is made with
1 torch thread per process (engine: placement.threads_per_actor=1) beside the default 2: on 2
cores, 2-thread processes that take turns (3 colocated actors) or share the machine with other
jobs lose much time in OpenMP's busy-waiting; 1-thread rows are the steadier pair.

The same work everywhere:
- the same initial policy weights (rlhfkern.sched.actors.build_model, saved once; every system's
  weight digest is checked against it), for PPO the value model of the engine's PPO config
  (build_model: a token classifier with one label);
- the same rule reward (the config's, e.g. rlhfkern.sched.tasks.reverse_reward) on token ids:
  TRL gets text prompts through a 14-symbol WordLevel tokenizer and maps back to ids; PPO gets a
  reward module that computes the rule from the ids trl's get_reward passes (trl_baseline.py);
- the same batch and lengths: 256 sequences per step (32 prompts x 8 samples), at most 6 new
  tokens, temperature 1, top-p 1, fp32 on the CPU, the same torch threads per process (the
  engine's placement.threads_per_actor: 2, or 1); 1 PPO epoch over minibatches of 128 sequences (2 AdamW steps per
  batch); reference log-probs (the engine's kl_coef 0.001 as GRPO's beta and PPO's kl_coef); old
  log-probs recomputed (GRPO: steps_per_generation 2 makes trl compute them too); no evaluation;
  each system's default logging.

How it is timed: every system runs in a process of its own (each engine in its own Ray driver, a
job of this process's Ray cluster: bench/engine_runner.py; TRL: bench/trl_baseline.py), held
between rounds and released one round per ``go``. A benchmark round runs 4 consecutive RL steps
(RLHFKERN_BENCH_STEPS_PER_ROUND) of every system, one system after another, in an order that
rotates each round, so that whatever else the (shared) machine is doing falls on all of them
alike, while each system runs as in a real run (consecutive steps, not one step after the
others' idle time); pytest-benchmark times the round, perf_counter each system's part of it.
2 warm-up rounds, then 10 timed (RLHFKERN_BENCH_ROUNDS); RLHFKERN_BENCH_SYSTEMS="engine
colocated,TRL GRPO" (names of SYSTEMS, comma-separated) runs only those. Per system: median over rounds of its
seconds per step (its part / steps), tokens per step (response tokens up to and including EOS:
the engine's `tokens_generated`, TRL's completion mask, PPO's response up to the first PAD as
trl truncates it; trained = that x PPO epochs) over that median, the ratio of generated
tokens/s to TRL GRPO's and TRL PPO's at the same threads per process, and for the engine its
seconds per phase per step (`engine.phase_seconds`, mean over the timed steps).

The PPO row needs a venv with trl 1.12: $RLHFKERN_TRL112_PYTHON, or .venv-trl112 at the repository
root, created here on first use (torch and transformers pinned to this venv's; about 2 minutes
with a warm pip cache). Run:
    python -m pytest bench/bench_engine.py --bench-md bench/results/engine-cpu-2core.md"""

import os
import random
import shutil
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("ray")
pytest.importorskip("trl")
pytest.importorskip("psutil")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import trl_baseline  # noqa: E402

CONFIG = os.path.join(ROOT, "rlhfkern", "sched", "configs", "grpo_reverse.yaml")
TASKS_PY = os.path.join(ROOT, "rlhfkern", "sched", "tasks.py")
WARMUP, ROUNDS = 2, int(os.environ.get("RLHFKERN_BENCH_ROUNDS", "10"))
STEPS_PER_ROUND = int(os.environ.get("RLHFKERN_BENCH_STEPS_PER_ROUND", "4"))
GROUP = "RL step, tiny default run (rlhfkern/sched/configs/grpo_reverse.yaml), CPU"
SEPARATE = ["placement.colocate=[[policy,reference]]", "placement.devices_per_node=2"]
TRL112_PYTHON = os.environ.get("RLHFKERN_TRL112_PYTHON", os.path.join(ROOT, ".venv-trl112", "bin", "python"))
START_TIMEOUT_S, STEP_TIMEOUT_S = 300, 300

# name: (label, kind, engine overrides or TRL trainer, torch threads per process: None = the config's, 2)
SYSTEMS = {
    "engine colocated": ("rlhfkern engine, colocated (default config: policy+rollout+reference share 1 device)",
                         "engine", [], None),
    "engine separate": ("rlhfkern engine, separate (policy+reference on 1 device, rollout on another)", "engine",
                        SEPARATE, None),
    "engine colocated 1 thread": ("rlhfkern engine, colocated, placement.threads_per_actor=1", "engine",
                                  ["placement.threads_per_actor=1"], 1),
    "TRL GRPO": ("TRL {trl} GRPOTrainer", "trl", "grpo", None),
    "TRL GRPO 1 thread": ("TRL {trl} GRPOTrainer, 1 torch thread", "trl", "grpo", 1),
    "TRL PPO": ("TRL {trl} PPOTrainer (trl.experimental.ppo)", "trl", "ppo", None),
    "TRL PPO 1 thread": ("TRL {trl} PPOTrainer (trl.experimental.ppo), 1 torch thread", "trl", "ppo", 1),
}
BASELINES = ("TRL GRPO", "TRL PPO")  # each row's tokens/s over these, at the same torch threads per process


def ensure_trl112():
    """The python of a venv with trl 1.12.0 (PPOTrainer), created on first use: torch pinned to this
    venv's (so pip takes no CUDA build) and transformers too (both TRL rows run the same model code)."""
    if os.path.exists(TRL112_PYTHON):
        return TRL112_PYTHON
    import torch
    import transformers

    venv = os.path.dirname(os.path.dirname(TRL112_PYTHON))
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    with open(os.path.join(venv, ".gitignore"), "w") as f:
        f.write("*\n")
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", f"torch=={torch.__version__.split('+')[0]}",
                    "trl==1.12.0", f"transformers=={transformers.__version__}"], check=True)
    return TRL112_PYTHON


class System(trl_baseline.Child):
    """One system in its own process, one RL step per step()."""

    def row(self, epochs):
        """The table row of the timed rounds, per step (a round's time and tokens / its steps)."""
        label, kind, _, _ = SYSTEMS[self.name]
        K = STEPS_PER_ROUND
        steps, seconds = self.steps[-ROUNDS:], [t / K for t in self.seconds[-ROUNDS:]]
        median = statistics.median(seconds)
        gen = sum(s["tokens_generated"] for s in steps) / ROUNDS / K
        trained = sum(s.get("tokens_trained", s["tokens_generated"] * epochs) for s in steps) / ROUNDS / K
        q = statistics.quantiles(seconds, n=4)
        notes = {"seconds per step": f"median {median:.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}, min {min(seconds):.3f}",
                 "CPU seconds per step (its processes)": f"{(self.cpu[-1] - self.cpu[-ROUNDS - 1]) / ROUNDS / K:.3f}"}
        if kind == "engine":
            first, last = self.steps[-ROUNDS - 1]["phases"], steps[-1]["phases"]
            notes["engine phases (s/step, mean)"] = ", ".join(f"{p} {(last[p] - first[p]) / ROUNDS / K:.3f}"
                                                              for p in last if last[p] - first[p] > 0)
            own = [t for s in steps for t in s["step_seconds"]]
            notes["engine's own step seconds (median)"] = f"{statistics.median(own):.3f}"
        else:
            notes["versions"] = (f"trl {self.info['trl']}, transformers {self.info['transformers']}, "
                                 f"torch {self.info['torch']}, {self.info['threads']} threads")
        return {"label": label.format(**self.info), "role": "baseline" if kind == "trl" else "op", "seconds": median,
                "rates": {"generated tok/s": gen / median, "trained tok/s": trained / median},
                "per_step": {"tokens generated": gen, "tokens trained": trained}, "notes": notes}


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    """Ray (logical GPUs for every engine at once), the initial models saved, every system started
    (in parallel) and held before its first step."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from rlhfkern.sched import tasks
    from rlhfkern.sched.actors import build_model
    from rlhfkern.sched.config import load_config

    work = tmp_path_factory.mktemp("engine_bench")
    cfg = load_config(CONFIG)
    policy = build_model(cfg, "policy", cfg.train.seed, device="cpu")
    policy.save_pretrained(work / "policy")
    ppo_cfg = load_config(CONFIG, ["algorithm.name=ppo", "models.value={optimizer: {lr: 1.0e-3}}",
                                   "placement.colocate=[[policy,rollout,reference,value]]"])
    build_model(ppo_cfg, "value", cfg.train.seed, device="cpu").save_pretrained(work / "value")
    digest = trl_baseline.weight_digest(policy.named_parameters())
    task = tasks.DigitTask(cfg.data.task, cfg.data.min_digits, cfg.data.max_digits, cfg.data.eval_prompts,
                           cfg.data.seed)
    steps = WARMUP + ROUNDS
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    (rule,) = [rc for rc in cfg.models.rewards.values() if rc.kind == "rule"]  # the task's rule reward
    trl_spec = {"model_dir": str(work / "policy"), "value_dir": str(work / "value"), "tasks_py": TASKS_PY,
                "reward": rule.function.split(":")[1],
                "prompts": task.train_prompts(t.prompts_per_step * steps * STEPS_PER_ROUND, random.Random(1)),
                "prompts_per_step": t.prompts_per_step, "samples": r.samples_per_prompt,
                "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
                "lr": cfg.models.policy.optimizer.lr, "grad_clip": cfg.models.policy.optimizer.grad_clip_norm,
                "kl_coef": a.kl_coef, "clip_low": a.clip_low, "clip_high": a.clip_high,
                "minibatch": t.minibatch_sequences, "ppo_epochs": t.ppo_epochs, "steps": steps,
                "steps_per_round": STEPS_PER_ROUND, "seed": t.seed,
                "threads": cfg.placement.threads_per_actor}
    ray_dir = f"/tmp/rkb{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, _temp_dir=ray_dir, configure_logging=False,
             log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    started, skipped = [], {}
    try:
        chosen = [n.strip() for n in os.environ.get("RLHFKERN_BENCH_SYSTEMS", ",".join(SYSTEMS)).split(",")]
        for name, (_, kind, arg, threads) in SYSTEMS.items():
            if name not in chosen:
                continue
            if kind == "engine":
                spec = {"address": address, "config": CONFIG, "steps": steps, "steps_per_round": STEPS_PER_ROUND,
                        "overrides": [f"logging.run_dir={work / name.replace(' ', '_')}", "logging.plot=false",
                                      "train.eval_every_steps=0", *arg]}
                started.append(System(name, spec, sys.executable, "engine_runner.py", work))
                continue
            try:
                python = sys.executable if arg == "grpo" else ensure_trl112()
            except (OSError, subprocess.CalledProcessError) as e:
                skipped[name] = f"no trl 1.12 venv: {e}"
                continue
            spec = {**trl_spec, "trainer": arg, "work_dir": str(work / name.replace(" ", "_")),
                    "threads": threads or trl_spec["threads"]}
            started.append(System(name, spec, python, "trl_baseline.py", work))
        for s in started:
            s.ready()
            assert s.info["digest"] == digest, f"{s.name} starts from other weights ({s.info['digest']} != {digest})"
        yield started, skipped, cfg
    finally:
        finished = all(len(s.steps) == steps for s in started)
        for s in started:
            s.close(finished)
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def bench_rl_step(benchmark, systems):
    started, skipped, cfg = systems
    rounds = iter(range(WARMUP + ROUNDS))

    def one_round():
        k = next(rounds)
        for s in started[k % len(started):] + started[:k % len(started)]:
            s.step()

    load_before = os.getloadavg()[0]
    benchmark.group = GROUP
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    notes = {"timing": f"{WARMUP} warm-up + {ROUNDS} timed rounds; a round runs {STEPS_PER_ROUND} consecutive "
                       "steps of every system, one system after another in an order that rotates each round; "
                       f"time per call = median over rounds of a system's seconds / {STEPS_PER_ROUND}",
             "machine load average (1 min), before -> after": f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}",
             **{f"skipped {k}": v for k, v in skipped.items()}}
    rows = {s.name: s.row(cfg.train.ppo_epochs) for s in started}
    for name, row in rows.items():
        threads = SYSTEMS[name][3]
        row["ratios"] = {}
        for base in BASELINES:
            paired = base if threads is None else f"{base} {threads} thread"
            if paired in rows and paired != name:
                row["ratios"][f"generated tok/s vs {base}"] = (
                    row["rates"]["generated tok/s"] / rows[paired]["rates"]["generated tok/s"])
    notes["ratios"] = ("generated tokens/s of the row over that of the TRL row with the same torch threads per "
                       f"process ({cfg.placement.threads_per_actor} = the engine's placement.threads_per_actor, or 1)")
    benchmark.extra_info.update(label=f"one round: {STEPS_PER_ROUND} steps of each of {len(started)} systems, in turn",
                                rows=list(rows.values()), group_notes=notes)
