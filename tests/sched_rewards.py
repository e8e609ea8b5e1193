"""Rule rewards for the engine tests (importable as `sched_rewards:<fn>`: pytest puts tests/ on
sys.path). MODE switches the misbehaving one."""

from rlhfkern.sched.tasks import copy_reward

MODE = {"kind": "ok"}


def flaky_reward(prompts, responses):
    if MODE["kind"] == "raise":
        raise KeyError("no such digit")
    if MODE["kind"] == "short":
        return copy_reward(prompts, responses)[:-1]
    return copy_reward(prompts, responses)


KILL = {"at_call": 0, "calls": 0, "pid": None}


def killing_reward(prompts, responses):
    """copy_reward, that on its KILL["at_call"]-th call first kills the process KILL["pid"] (a
    worker of the engine under test) with SIGKILL, as an OOM killer would."""
    import os
    import signal

    KILL["calls"] += 1
    if KILL["calls"] == KILL["at_call"] and KILL["pid"]:
        os.kill(KILL["pid"], signal.SIGKILL)
    return copy_reward(prompts, responses)
