"""The engine side of bench/bench_engine.py: one rlhfkern Engine in a Ray driver process of its own
(a job of the bench's Ray cluster, so that several engines, each with its own placement groups,
live at once), run one RL step per ``go``.

    python bench/engine_runner.py SPEC.json
    (SPEC: Ray address, config path, overrides, rounds as "steps", steps_per_round)

Same protocol as trl_baseline.py. The loop is the engine's own `Engine.learn(steps)`, held once
per round of `steps_per_round` steps (one ``go`` each) at whichever comes first after the round's
last train_step: the loop's dispatch of a batch's generation (off-policy: ahead of its
train_step) or the next train_step, so no work of a round starts before its ``go`` and no hold
falls inside the engine's phase timers; and after the last train_step, until ``end``, so that
the final evaluation does not run beside other systems' steps. A round's ``STEP`` (its tokens
summed) is sent at the next hold, so the loop's own per-step work (logging, the next prompts) is
inside the round. ``READY`` is sent at the first hold, after the start-up and the first
evaluation.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trl_baseline import Channel, weight_digest  # noqa: E402


def main():
    with open(sys.argv[1]) as f:
        s = json.load(f)
    channel = Channel()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(address=s["address"], log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                       **s.get("env", {})}})
    from rlhfkern.sched.loop import Engine

    engine = Engine(s["config"], s["overrides"])
    engine.start()
    digest = weight_digest(engine.weights("policy").items())
    pids = [os.getpid()] + [ray.get(w.info.remote())["pid"] for w in engine.workers]
    per_round, total = s["steps_per_round"], s["steps"] * s["steps_per_round"]
    state = {"trained": 0, "held": 0, "pending": None}
    generate, train_step = engine._generate, engine.train_step

    def add_step(metrics):
        p = state["pending"] or {"tokens_generated": 0, "tokens_trained": 0, "seconds": 0.0, "step_seconds": []}
        state["pending"] = {"tokens_generated": p["tokens_generated"] + metrics["tokens_generated"],
                            "tokens_trained": p["tokens_trained"] + metrics["tokens_trained"],
                            "seconds": p["seconds"] + metrics["seconds"], "reward": metrics["reward"],
                            "step_seconds": p["step_seconds"] + [metrics["seconds"]],
                            "phases": dict(engine.phase_seconds)}

    def hold():
        """One hold per round, at whichever comes first after its last train_step: the dispatch
        of a batch's generation from the loop (off-policy: ahead of its train_step) or train_step."""
        if state["held"] * per_round <= state["trained"]:
            if state["held"] == 0:
                channel.send("READY", {"digest": digest, "pids": pids})
            else:
                channel.send("STEP", state["pending"])
                state["pending"] = None
            channel.wait_go()
            state["held"] += 1

    def held_generate(prompts, seed, greedy=False):
        if not greedy:
            hold()
        return generate(prompts, seed, greedy)

    def held_train_step(*args, **kwargs):
        hold()
        metrics = train_step(*args, **kwargs)
        state["trained"] += 1
        add_step(metrics)
        if state["trained"] == total:
            channel.send("STEP", state["pending"])
            channel.wait_go("end")
        return metrics

    engine._generate, engine.train_step = held_generate, held_train_step
    try:
        engine.learn(total)
    finally:
        engine.shutdown()
    channel.send("END")


if __name__ == "__main__":
    main()
