"""The pipeline's stages on Ray (logical GPUs, CPU tensors): sft -> rm -> rl on generated data
(SFT loss falls, the reward model ranks held-out pairs above chance, RL beats SFT on the held-out
metric), resume across stages, several rewards combined with weights, bad data files."""

import json

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", "ray", extra="ray")

from rlhfkern.sched.config import default_config_path, load_config
from rlhfkern.sched.data import DataError
from rlhfkern.sched.loop import Engine

DEFAULT = default_config_path()  # the whole pipeline
GRPO = DEFAULT.replace("default.yaml", "grpo_reverse.yaml")  # the rl stage alone
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]
TIMING = ("seconds", "tokens_per_second")
SHORT = ["train.prompts_per_step=8", "rollout.samples_per_prompt=4", "train.minibatch_sequences=16",
         "data.eval_prompts=32", "train.eval_every_steps=0"]


def engine(path, tmp_path, *overrides):
    return Engine(load_config(path, [f"logging.run_dir={tmp_path}", *QUIET, *overrides]))


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def test_the_pipeline_sft_then_rm_then_rl(ray_gpus, tmp_path):
    """The shipped pipeline, shortened: the SFT loss falls, the reward model ranks held-out pairs
    better than chance (and than before its training), RL against it alone beats the SFT model on
    the held-out exact match; the reference holds the SFT model; each stage's saved model serves
    `rlhfkern generate`."""
    from rlhfkern.sched import cli

    e = engine(DEFAULT, tmp_path, "sft.steps=200", "rm.steps=300", "train.steps=50")
    try:
        summary = e.run()
        sft = str(tmp_path / "checkpoints" / "sft")
        ref = e.weights("reference")
        from safetensors.torch import load_file

        saved = load_file(f"{sft}/model.safetensors")
        assert saved.keys() == ref.keys() and all(torch.equal(ref[k], saved[k]) for k in saved)
    finally:
        e.shutdown()
    log = lines(tmp_path)
    sft_loss = [m["sft/loss"] for m in log if m.get("stage") == "sft"]
    assert len(sft_loss) == 20 and sft_loss[-1] < 0.5 * sft_loss[0]
    st = summary["stages"]
    assert st["rm"]["rm/eval_accuracy"] > max(0.8, st["rm"]["rm/eval_accuracy_start"])
    assert summary["eval_start"] == st["sft"]["eval/exact"]  # RL starts from the SFT model
    assert summary["eval_end"] > st["sft"]["eval/exact"] + 0.2
    assert (tmp_path / "data" / "sft.jsonl").exists() and (tmp_path / "data" / "rm.jsonl").exists()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1 2 3 ="}\n')
    assert cli.generate(sft, str(tmp_path / "prompts.jsonl"), str(tmp_path / "out.jsonl"), max_new_tokens=6) == 0
    answer = json.loads((tmp_path / "out.jsonl").read_text())["response"]
    assert answer in ("3 2 1 </s>", "1 2 3 </s>")  # the SFT model answers one of the two ways it was shown


STAGES = ["stages=[sft, rm, rl]", "sft.steps=20", "rm.steps=20", "sft.records=200", "rm.records=100",
          "models.rewards={rm: {kind: model, normalize: true}, reverse: {kind: rule, weight: 0.5, "
          "function: 'rlhfkern.sched.tasks:reverse_reward'}}",
          "placement.colocate=[[policy, rollout, reference, 'reward:rm']]",
          "models.policy.optimizer.schedule=cosine", "models.policy.optimizer.warmup_steps=4"]


def test_resume_across_stages_equals_an_uninterrupted_run(ray_gpus, tmp_path):
    """sft -> rm -> 4 RL steps (cosine LR schedule with warmup, checkpoints every 2) vs (a) a
    fresh engine resumed from the step-2 checkpoint and (b) a run of the sft and rm stages only,
    then the pipeline resumed after them (the stages' saved models taken, not retrained): the same
    RL metrics bitwise and the same final weights."""
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=2", "train.steps=4"]
    e = engine(GRPO, tmp_path / "a", *SHORT, *STAGES, *ckpt)
    try:
        e.run()
        full, final = untimed(e.history), e.weights("policy")
    finally:
        e.shutdown()
    lr = [m["actor/lr"] for m in full]  # after each step (2 optimizer steps): warmup over 4, then the cosine decay
    assert lr[0] < lr[1] and lr[1] > lr[2] > lr[3]
    r = engine(GRPO, tmp_path / "b", *SHORT, *STAGES, *ckpt)
    try:
        r.start()
        r.resume(str(tmp_path / "ckpt" / "step_2"))
        r.learn(2)
        assert untimed(r.history) == full[2:]
        assert all(torch.equal(final[k], v) for k, v in r.weights("policy").items())
    finally:
        r.shutdown()

    stages_only = [f"checkpoint.dir={tmp_path / 'ckpt2'}", "train.steps=4"]
    s = engine(GRPO, tmp_path / "c", *SHORT, *STAGES, "stages=[sft, rm]", *stages_only)
    try:
        summary = s.run()
        assert "eval_end" not in summary and set(summary["stages"]) == {"sft", "rm"}
    finally:
        s.shutdown()
    d = engine(GRPO, tmp_path / "c", *SHORT, *STAGES, *stages_only)
    try:
        d.run(resume=True)
        assert untimed(d.history) == full
    finally:
        d.shutdown()
    events = [m["event"] for m in lines(tmp_path / "c") if "event" in m]
    assert any(x.startswith("sft: taken from") for x in events) and any(x.startswith("rm: taken from") for x in events)
    assert not [m for m in lines(tmp_path / "c")[-10:] if m.get("stage") == "sft"]  # not trained again


def test_two_reward_models_and_a_rule_combine_with_their_weights(ray_gpus, tmp_path):
    """Two reward models (one colocated with the policy, one in a pool of its own, of another
    size) and a rule reward: each one's mean is logged, the run's reward is their weighted sum."""
    small = {"model_type": "llama", "vocab_size": 14, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
             "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    rewards = ("models.rewards={near: {kind: model, weight: 0.5}, far: {kind: model, weight: -2.0, model: {hf_config: "
               + json.dumps(small) + "}}, rule: {kind: rule, weight: 3.0, function: 'rlhfkern.sched.tasks:reverse_reward'}}")
    e = engine(GRPO, tmp_path, *SHORT, rewards, "placement.colocate=[[policy, rollout, reference, 'reward:near']]",
               "placement.devices_per_node=2")
    try:
        e.learn(2)
        assert {w.models for w in e.placement.workers} >= {("reward:far",)}
    finally:
        e.shutdown()
    for m in e.history:
        parts = {n: m[f"reward/{n}"] for n in ("near", "far", "rule")}
        assert parts["near"] != parts["far"]
        assert m["reward"] == pytest.approx(0.5 * parts["near"] - 2.0 * parts["far"] + 3.0 * parts["rule"], rel=1e-5)


@pytest.mark.parametrize("stage,line,problem", [
    ("sft", '{"query": "1 2 3 =", "response": ""}', "key 'response': empty string"),
    ("sft", '{"query": "1 2 3 ="}', "missing key 'response'"),
    ("rm", '{"query": "1 2 =", "response": ["2 1", "1 2"], "score": [1.0]}', "1 scores for 2 responses"),
    ("rm", '{"query": "1 2 =", "response": ["2 1", "1 2"], "score": [1.0, 0.0]', "not valid JSON"),
])
def test_a_bad_data_file_stops_before_training(tmp_path, stage, line, problem):
    """A malformed record of a stage's file stops the engine's construction (nothing started)
    with the file, the line and what is wrong."""
    good = {"sft": '{"query": "1 2 3 =", "response": "3 2 1"}',
            "rm": '{"query": "1 2 =", "response": ["2 1", "1 2"], "score": [1.0, 0.5]}'}[stage]
    path = tmp_path / f"{stage}.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=f"{path}:3: .*{problem}"):
        engine(DEFAULT, tmp_path, f"{stage}.data={path}")


def test_rl_prompts_come_from_the_prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "1 2 3 ="}\n{"prompt": "<s> 4 5 6 ="}\n')
    e = engine(GRPO, tmp_path, f"data.prompts={path}", "train.prompts_per_step=16")
    prompts = e._prompts()
    assert len(prompts) == 16 * e.cfg.rollout.samples_per_prompt
    assert {tuple(p) for p in prompts} == {(1, 5, 6, 7, 3), (1, 8, 9, 10, 3)}


def test_a_killed_worker_after_the_stages_resumes_rl_on_the_stages_models(ray_gpus, tmp_path):
    """sft -> rm -> rl with no RL checkpoint: the worker is SIGKILLed during RL step 2; the engine
    restarts the workers, loads the stages' saved models again (SFT into the policy and the
    reference, the reward model) and redoes RL from its start: the metrics equal an uninterrupted
    run's."""
    import ray
    import sched_rewards

    rewards = ("models.rewards={rm: {kind: model, normalize: true}, "
               "kill: {kind: rule, weight: 0.5, function: 'sched_rewards:killing_reward'}}")
    common = [*SHORT, *STAGES, rewards, "data.task=copy", "train.steps=3"]
    clean = engine(GRPO, tmp_path / "clean", *common)
    try:
        clean.run()
        expect = untimed(clean.history)
    finally:
        clean.shutdown()
    e = engine(GRPO, tmp_path / "killed", *common)
    try:
        e.start()
        # the rule's calls: the evaluation after sft, the one before RL, then one per RL step
        sched_rewards.KILL.update(at_call=4, calls=0, pid=ray.get(e.workers[0].info.remote())["pid"])
        e.run()
        assert untimed(e.history) == expect
    finally:
        sched_rewards.KILL.update(pid=None)
        e.shutdown()
    events = [m["event"] for m in lines(tmp_path / "killed") if "event" in m and "worker died" in m["event"]]
    assert len(events) == 1 and "resumed from the initial state" in events[0]
