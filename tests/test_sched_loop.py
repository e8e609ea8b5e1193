"""The engine's loop on Ray (logical GPUs, CPU tensors): determinism, colocated == separate,
bitwise weight sync, learning (GRPO and PPO raise the held-out metric), reward and loss errors."""

import json
import math
import time

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", "ray", extra="ray")

import sched_rewards
from rlhfkern.sched.config import default_config_path, load_config
from rlhfkern.sched.loop import Engine, RewardError, TrainingError

SHIPPED = default_config_path().rsplit("/", 1)[0]
GRPO = f"{SHIPPED}/grpo_reverse.yaml"  # the rl stage alone (default.yaml adds sft and rm before it)
TIMING = ("seconds", "tokens_per_second")
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]


def engine(tmp_path, name="grpo_reverse.yaml", *overrides):
    cfg = load_config(f"{SHIPPED}/{name}", [f"logging.run_dir={tmp_path}", *QUIET, *overrides])
    return Engine(cfg)


def run(tmp_path, name, steps, *overrides):
    e = engine(tmp_path, name, *overrides)
    try:
        summary = e.learn(steps)
        return summary, [{k: v for k, v in m.items() if k not in TIMING} for m in e.history]
    finally:
        e.shutdown()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# the separate topology: the rollout in a pool of its own, synced through the Resharder
SEPARATE = ["placement.colocate=[[policy,reference]]", "placement.devices_per_node=2"]
# the easier task of the same family: learnt within 100 steps
COPY = ["data.task=copy", "models.rewards={copy: {kind: rule, function: 'rlhfkern.sched.tasks:copy_reward'}}"]
SHORT = ["train.prompts_per_step=8", "rollout.samples_per_prompt=4", "train.minibatch_sequences=16",
         "data.eval_prompts=32", "train.eval_every_steps=0"]


def test_same_seed_same_metrics_and_colocated_equals_separate(ray_gpus, tmp_path):
    _, first = run(tmp_path / "a", "grpo_reverse.yaml", 3, *SHORT)
    _, again = run(tmp_path / "b", "grpo_reverse.yaml", 3, *SHORT)
    _, separate = run(tmp_path / "c", "grpo_reverse.yaml", 3, *SHORT, *SEPARATE)
    assert len(first) == 3 and first[0]["actor/loss"] != 0
    # the trainer agrees with the rollout's log-probs of its samples (fp32, right after a sync)
    assert all(0 <= m["rollout/logprob_diff_max"] < 1e-5 for m in first)
    assert first == again
    assert first == separate


@pytest.mark.parametrize("topology", ["colocated", "separate"])
def test_rollout_weights_equal_trainer_weights_after_each_sync(ray_gpus, tmp_path, topology):
    e = engine(tmp_path, "grpo_reverse.yaml", *SHORT, *(SEPARATE if topology == "separate" else []))
    try:
        e.start()
        before = e.weights("policy")
        assert_same_weights(before, e.weights("rollout"))
        assert_same_weights(before, e.weights("reference"))  # same seed, same initial weights
        for _ in range(2):
            e.learn(1)
            trained = e.weights("policy")
            assert_same_weights(trained, e.weights("rollout"))
            assert any(not torch.equal(trained[k], before[k]) for k in trained)  # it did train
            before = trained
        assert not all(torch.equal(trained[k], v) for k, v in e.weights("reference").items())
        assert_memory_estimate_matches_actors(e)
        e.save(str(tmp_path / "ckpt"))
        assert (tmp_path / "ckpt" / "policy" / "rank_0" / "model.safetensors").exists()
        assert (tmp_path / "ckpt" / "policy" / "rank_0" / "optimizer.pt").exists()
        assert json.loads((tmp_path / "ckpt" / "engine.json").read_text())["step"] == 2
        import ray

        ray.get(e.ranks["reference"][0].call("load", str(tmp_path / "ckpt" / "policy" / "rank_0")))
        assert_same_weights(trained, e.weights("reference"))  # the saved policy, loaded elsewhere
    finally:
        e.shutdown()


def assert_memory_estimate_matches_actors(e):
    """The plan's static numbers (weights, gradients, optimizer state) are the bytes of every
    actor's real tensors."""
    import ray

    from rlhfkern.sched.memory import model_memory

    for name, ranks in e.ranks.items():
        mm = model_memory(e.cfg, name)
        for r in ranks:
            real = ray.get(r.call("memory_bytes"))
            assert real == {"weights": mm.weights, "gradients": mm.gradients, "optimizer": mm.optimizer}, name


RM_COLOCATED = ["models.rewards={rm: {kind: model}, reverse: {kind: rule, function: 'rlhfkern.sched.tasks:reverse_reward'}}",
                "placement.colocate=[[policy, rollout, reference, 'reward:rm']]"]


@pytest.mark.parametrize("config,overrides,phases", [
    ("grpo_reverse.yaml", RM_COLOCATED, {"generate", "reward", "logprobs", "train"}),
    ("grpo_reverse.yaml", SHORT + SEPARATE, {"generate", "logprobs", "train"}),
    ("ppo_separate.yaml", [], {"generate", "logprobs", "values", "train"}),
], ids=["colocated-with-reward-model", "separate-short", "ppo-separate"])
def test_memory_estimate_is_within_15_percent_of_the_measured_peaks(ray_gpus, tmp_path, config, overrides, phases):
    """placement.measure_memory: every worker records each phase's peak (the models' tensors plus
    the peak of what the phase's calls allocate, from the profiler's allocation record); the
    plan's estimate of each device and phase is within 15% of it, and the run's summary holds the
    comparison."""
    e = engine(tmp_path, config, *overrides, "placement.measure_memory=true")
    try:
        summary = e.learn(2)
    finally:
        e.shutdown()
    rows = summary["memory"]
    assert {phase for _, phase, *_ in rows} == phases
    for device, phase, kept, offloaded, est, measured in rows:
        assert offloaded == [] and kept  # CPU tensors: nothing leaves the device
        assert abs(est - measured) <= 0.15 * measured, (device, phase, est, measured)


def test_the_memory_report_says_what_each_phase_keeps_and_offloads():
    """With offload on CUDA, a colocated phase keeps only its own models' state on the device;
    the comparison table names them and the offloaded ones."""
    from rlhfkern.sched.memory import compare, comparison_lines, estimate

    cfg = load_config(f"{SHIPPED}/default.yaml", ["placement.device=cuda"])
    report = estimate(cfg, "cuda")
    rows = compare(report, {(0, 0): {"generate": 1 << 20, "reward": 1 << 20, "train": 1 << 20}})
    by_phase = {phase: (kept, off) for _, phase, kept, off, _, _ in rows}
    assert by_phase["generate"] == (["rollout"], ["policy", "reference", "reward:rm"])
    assert by_phase["reward"] == (["reward:rm"], ["policy", "reference", "rollout"])
    assert by_phase["train"] == (["policy"], ["reference", "reward:rm", "rollout"])
    text = "\n".join(comparison_lines(rows))
    assert "policy, reference, reward:rm" in text and "1.00 MiB" in text


def test_off_policy_overlap_runs_with_one_step_stale_rollout(ray_gpus, tmp_path):
    summary, history = run(tmp_path, "grpo_reverse.yaml", 3, *SHORT, *SEPARATE, "rollout.off_policy_steps=1")
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(math.isfinite(m["actor/loss"]) for m in history)
    # step 1 samples the initial policy; each later batch was generated while the step before trained
    assert [m["rollout/policy_lag"] for m in history] == [0, 1, 1]
    # the trainer sees the stale samples' log-probs move: the agreement metric shows the lag
    assert history[0]["rollout/logprob_diff_max"] < 1e-5 < history[1]["rollout/logprob_diff_max"]
    _, on_policy = run(tmp_path / "on", "grpo_reverse.yaml", 3, *SHORT, *SEPARATE)
    assert [m["rollout/policy_lag"] for m in on_policy] == [0, 0, 0]
    assert history[0] == on_policy[0]  # the same first step


def test_data_parallel_trainer_equals_one_rank(ray_gpus, tmp_path):
    """dp=2 (DDP over gloo, the loss normalised by the global token count) takes the same first
    step as dp=1; every trainer and rollout rank holds the same weights after each sync."""
    # one minibatch per step: a global minibatch is the union of the ranks' k-th local ones (as
    # in verl), so with several its composition depends on dp
    dp2 = ["models.policy.dp=2", "models.rollout.dp=2", "models.reference.dp=2", "placement.devices_per_node=2",
           "train.minibatch_sequences=32"]
    e = engine(tmp_path, "grpo_reverse.yaml", *SHORT, *dp2)
    try:
        e.learn(2)
        ranks = [e.weights("policy", 0), e.weights("policy", 1), e.weights("rollout", 0), e.weights("rollout", 1)]
        for other in ranks[1:]:
            assert_same_weights(ranks[0], other)
        two = e.history
    finally:
        e.shutdown()
    # the same two rollout ranks (so the same samples), one trainer rank
    _, one = run(tmp_path / "one", "grpo_reverse.yaml", 1, *SHORT, "models.rollout.dp=2", "placement.devices_per_node=2",
                 "train.minibatch_sequences=32")
    for key in ("reward", "actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/grad_norm"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("algorithm", ["rloo", "reinforce_pp"])
def test_other_estimators_run(ray_gpus, tmp_path, algorithm):
    _, history = run(tmp_path, "grpo_reverse.yaml", 2, *SHORT, f"algorithm.name={algorithm}")
    assert all(math.isfinite(m["actor/loss"]) and m["actor/grad_norm"] > 0 for m in history)


def test_grpo_raises_the_held_out_metric(ray_gpus, tmp_path):
    # the copy task at lr 1e-3 (the default run's 3e-4 is for its 1000 steps): clear progress in 100
    cfg = load_config(f"{SHIPPED}/grpo_reverse.yaml", [f"logging.run_dir={tmp_path}", "logging.progress=false",
                                                  "train.eval_every_steps=50", "models.policy.optimizer.lr=1.0e-3",
                                                  *COPY])
    e = Engine(cfg)
    try:
        summary = e.learn(100)
    finally:
        e.shutdown()
    assert summary["eval_start"] == 0.0
    assert summary["eval_end"] >= 0.2, summary
    assert e.history[-1]["reward"] > e.history[0]["reward"] + 0.3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 101 and json.loads(lines[-1])["eval/exact"] == summary["eval_end"]
    start, end = json.loads(lines[0]), json.loads(lines[-1])  # the held-out reward and length are logged too
    assert end["eval/reward"] > start["eval/reward"] and end["eval/reward"] >= end["eval/exact"]
    assert 1 <= end["eval/response_tokens"] <= 6
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_ppo_raises_the_held_out_metric(ray_gpus, tmp_path):
    e = engine(tmp_path, "ppo_separate.yaml", "train.eval_every_steps=0")
    try:
        summary = e.learn(120)
        assert_memory_estimate_matches_actors(e)  # the value model's too
    finally:
        e.shutdown()
    assert summary["eval_end"] >= summary["eval_start"] + 0.2, summary
    assert all(math.isfinite(m["critic/loss"]) for m in e.history)


def test_rule_reward_errors_name_the_function_and_the_batch(ray_gpus, tmp_path):
    """A rule reward and a reward model (a sequence classifier in a pool of its own), weighted."""
    rewards = ("models.rewards={flaky: {kind: rule, function: 'sched_rewards:flaky_reward'}, "
               "rm: {kind: model, weight: 0.5, normalize: true, model: {hf_config: {model_type: llama, vocab_size: 14, hidden_size: 32, "
               "intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, pad_token_id: 0}}}}")
    e = engine(tmp_path, "grpo_reverse.yaml", *SHORT, rewards, "placement.devices_per_node=2")
    try:
        sched_rewards.MODE["kind"] = "raise"
        with pytest.raises(RewardError, match=r"'flaky' \(sched_rewards:flaky_reward\) at step 1, batch of 32 "
                                              r"sequences raised KeyError"):
            e.learn(1)
        sched_rewards.MODE["kind"] = "short"
        e.history.clear()
        with pytest.raises(RewardError, match=r"sched_rewards:flaky_reward.*returned 31 values for 32 sequences"):
            e.learn(1)
        sched_rewards.MODE["kind"] = "ok"
        e.learn(1)
        m = e.history[-1]
        assert m["reward/rm"] != 0
        # the model's reward is whitened before its weight: it adds 0 to the mean, its raw mean is logged
        assert m["reward"] == pytest.approx(m["reward/flaky"], abs=1e-5)
    finally:
        sched_rewards.MODE["kind"] = "ok"
        e.shutdown()


def test_shape_reward():
    from rlhfkern.sched.loop import shape_reward

    r = torch.tensor([0.0, 1.0, 2.0, 10.0])
    assert torch.equal(shape_reward(r, False, None), r)
    w = shape_reward(r, True, None)
    assert w.mean().abs() < 1e-6 and (w.std(correction=0) - 1).abs() < 1e-5
    assert torch.equal(shape_reward(r, False, 1.5), torch.tensor([0.0, 1.0, 1.5, 1.5]))
    assert shape_reward(r, True, 1.0).abs().max() == 1.0
    assert torch.equal(shape_reward(torch.full((3,), 2.0), True, None), torch.zeros(3))  # no spread: all 0


def test_nan_loss_stops_the_run_with_its_step(ray_gpus, tmp_path):
    e = engine(tmp_path, "grpo_reverse.yaml", *SHORT, "models.policy.optimizer.lr=1.0e+30",
               "models.policy.optimizer.grad_clip_norm=null")
    try:
        with pytest.raises(TrainingError, match=r"step \d+: policy loss is nan .*the update was not applied"):
            e.learn(5)
        assert len(e.history) < 5  # the failing step left no metrics behind
    finally:
        e.shutdown()


def test_resume_equals_an_uninterrupted_run(ray_gpus, tmp_path):
    """6 steps with a checkpoint every 2 (the 2 newest kept) vs a fresh engine resumed from the
    step-4 checkpoint for the last 2: the same metrics bitwise, the same final weights; a
    half-written checkpoint (step_N.partial) is never taken; another layout is refused."""
    from rlhfkern.sched.loop import checkpoints

    ckpt = tmp_path / "ckpt"
    keep = [f"checkpoint.dir={ckpt}", "checkpoint.every_steps=2", "checkpoint.keep=2"]
    e = engine(tmp_path / "a", "grpo_reverse.yaml", *SHORT, *keep)
    try:
        e.learn(6)
        full = [{k: v for k, v in m.items() if k not in TIMING} for m in e.history]
        final = e.weights("policy")
    finally:
        e.shutdown()
    assert [p.rsplit("/", 1)[1] for p in checkpoints(str(ckpt))] == ["step_4", "step_6"]  # step_2 pruned
    (ckpt / "step_8.partial").mkdir()  # a save cut short: not a checkpoint
    assert checkpoints(str(ckpt))[-1].endswith("step_6")

    r = engine(tmp_path / "b", "grpo_reverse.yaml", *SHORT)
    try:
        import ray

        r.start()
        moved = ray.get(r.workers[0].rng_state.remote())
        moved["torch"] = torch.Generator().manual_seed(99).get_state()  # this worker's RNGs elsewhere
        ray.get(r.workers[0].set_rng_state.remote(moved))
        r.resume(str(ckpt / "step_4"))
        assert r.step == 4
        saved = torch.load(ckpt / "step_4" / "rng.pt", weights_only=False)
        assert torch.equal(ray.get(r.workers[0].rng_state.remote())["torch"], saved[0]["torch"])
        assert_same_weights(r.weights("policy"), r.weights("rollout"))
        r.learn(2)
        resumed = [{k: v for k, v in m.items() if k not in TIMING} for m in r.history]
        assert resumed == full[4:]
        assert_same_weights(r.weights("policy"), final)
    finally:
        r.shutdown()

    other = engine(tmp_path / "c", "grpo_reverse.yaml", *SHORT, "models.policy.dp=2", "placement.devices_per_node=2")
    try:
        with pytest.raises(ValueError, match="layout"):
            other.resume(str(ckpt / "step_4"))
    finally:
        other.shutdown()


def test_cli_resume_continues_to_train_steps(ray_gpus, tmp_path, capsys):
    from rlhfkern.sched import cli

    args = [f"logging.run_dir={tmp_path}", *QUIET, *SHORT, "checkpoint.every_steps=2"]
    assert cli.main("train", GRPO, [*args, "train.steps=2"], resume=True) == 2  # nothing to resume
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main("train", GRPO, [*args, "train.steps=2"]) == 0
    assert cli.main("train", GRPO, [*args, "train.steps=3"], resume=True) == 0
    assert "resuming from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "reward" in json.loads(line)]
    assert steps == [1, 2, 3]  # the resumed run appended step 3


def test_a_killed_worker_costs_the_step_in_progress(ray_gpus, tmp_path):
    """The worker process is SIGKILLed during step 3 (the reward's 4th call: the first is the
    held-out evaluation at the start; checkpoints every step): the engine
    restarts the workers, resumes from step 2's checkpoint, runs step 3 again and goes on; the
    metrics equal an uninterrupted run's, and the log says what happened."""
    import ray

    _, clean = run(tmp_path / "clean", "grpo_reverse.yaml", 4, *SHORT, *COPY)
    kill = ["models.rewards={copy: {kind: rule, function: 'sched_rewards:killing_reward'}}",
            "checkpoint.every_steps=1", "data.task=copy"]
    e = engine(tmp_path / "killed", "grpo_reverse.yaml", *SHORT, *kill)
    try:
        e.start()
        sched_rewards.KILL.update(at_call=4, calls=0, pid=ray.get(e.workers[0].info.remote())["pid"])
        t0 = time.perf_counter()
        e.learn(4)
        assert time.perf_counter() - t0 < 120
        assert [{k: v for k, v in m.items() if k not in TIMING} for m in e.history] == clean
        assert ray.get(e.workers[0].info.remote())["pid"] != sched_rewards.KILL["pid"]  # a new process
    finally:
        sched_rewards.KILL.update(pid=None)
        e.shutdown()
    events = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
              if "event" in line]
    assert len(events) == 1 and events[0]["step"] == 3
    assert "a worker died" in events[0]["event"] and "step_2" in events[0]["event"]
