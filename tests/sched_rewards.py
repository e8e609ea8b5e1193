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
