"""The hf backend's own decoding loop (KV cache, left-padded prompts, EOS handling) and its
sampler, against transformers' generate and the exact distribution. No Ray: a backend object in
this process."""

import random

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", extra="ray")

from rlhfkern.sched import tasks
from rlhfkern.sched.actors import (HFBackend, from_wire, left_padded, lr_factor, packed, response_mask_of, sample_tokens,
                                   sequence_batch, to_wire)
from rlhfkern.sched.config import default_config_path, load_config

GRPO = default_config_path().replace("default.yaml", "grpo_reverse.yaml")  # the rl stage alone


def backend(*overrides):
    cfg = load_config(GRPO, list(overrides))
    return HFBackend(cfg, "rollout", 0, 1, "cpu", {})


def prompts_of_mixed_lengths(n=24):
    task = tasks.DigitTask("copy", 1, 5, 10, 0)
    return task.train_prompts(n, random.Random(3))


def test_left_padded():
    ids, am = left_padded([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [tasks.PAD, tasks.PAD, 8]]
    assert am.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("eos_bias", [0.0, 6.0], ids=["few-eos", "early-eos"])
def test_greedy_decoding_equals_transformers_generate(eos_bias):
    """Same tokens as HF generate (greedy) on prompts of mixed lengths; after the first EOS a
    row holds PAD. With a bias on the EOS logit most rows stop early (the loop may end early)."""
    b = backend("rollout.max_new_tokens=7")
    with torch.no_grad():
        b.model.lm_head.weight.mul_(8.0)  # a peaked (non-uniform) distribution
        b.model.lm_head.weight[tasks.EOS] += eos_bias * b.model.lm_head.weight[tasks.EOS].sign()
    prompts = prompts_of_mixed_lengths()
    resp, mask, lps = b.generate(prompts, seed=0, greedy=True)
    assert not lps.any()  # greedy: no log-probs
    ids, am = left_padded(prompts)
    ref = b.model.generate(input_ids=ids, attention_mask=am, max_new_tokens=7, do_sample=False,
                           pad_token_id=tasks.PAD, eos_token_id=tasks.EOS)[:, ids.shape[1]:]
    expect = torch.full_like(resp, tasks.PAD)
    expect[:, :ref.shape[1]] = ref
    assert torch.equal(resp, expect)
    assert torch.equal(mask, response_mask_of(expect, tasks.EOS))
    if eos_bias:
        assert (resp == tasks.EOS).any(1).float().mean() > 0.5


def test_sampling_is_seeded():
    b = backend("rollout.temperature=0.7")
    prompts = prompts_of_mixed_lengths(8)
    first = b.generate(prompts, seed=11)[0]
    assert torch.equal(first, b.generate(prompts, seed=11)[0])
    assert not torch.equal(first, b.generate(prompts, seed=12)[0])


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_rollout_log_probs_equal_the_trainers(temperature, top_p):
    """The log-probs the rollout returns for its samples are those the trainer computes for the
    same weights (the loop uses them as PPO's old log-probs on-policy): full-vocabulary log
    softmax at the temperature, top-p or not; 0 after EOS."""
    b = backend(f"rollout.temperature={temperature}", f"rollout.top_p={top_p}", "rollout.max_new_tokens=7")
    with torch.no_grad():
        b.model.lm_head.weight[tasks.EOS] += 0.5  # some rows end early
    prompts = prompts_of_mixed_lengths()
    resp, mask, lps = b.generate(prompts, seed=5)
    assert (mask.sum(1) < 7).any()
    ids, am = left_padded(prompts)
    batch = {"input_ids": torch.cat([ids, resp], 1), "attention_mask": torch.cat([am, mask], 1), "response_mask": mask}
    expect, _ = b.logprobs(batch)
    torch.testing.assert_close(lps * mask, expect * mask, rtol=1e-5, atol=1e-5)
    assert (lps[mask == 0] == 0).all()
    assert (lps[mask == 1] < 0).all()


@pytest.mark.parametrize("top_p", [1.0, 0.75, 0.3, 1e-6])
def test_sample_tokens_matches_the_nucleus_distribution(top_p):
    """Empirical frequencies over 200k draws equal softmax(logits / T) restricted to the nucleus
    (the most likely tokens until their mass reaches top_p) and renormalised."""
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 3.0, 0.0])
    T = 1.3
    p = torch.softmax(logits.double() / T, -1)
    order = p.argsort(descending=True)
    before = torch.cumsum(p[order], 0) - p[order]
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[before < top_p]] = True
    want = torch.where(keep, p, 0.0)
    want /= want.sum()
    n = 200_000
    got = sample_tokens(logits.expand(n, -1), T, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(got, minlength=6).double() / n
    assert (freq[~keep] == 0).all()
    assert torch.allclose(freq, want, atol=4e-3), (freq, want)
    assert sample_tokens(logits[None], 0, top_p).item() == 4  # greedy


def test_wire_round_trip():
    """What the loop sends a worker comes back as equal tensors (dtypes kept; bf16 as is);
    prompts (lists) and scalars are untouched."""
    x = {"ids": torch.arange(12).view(3, 4)[:, ::2], "lp": torch.randn(3, 2), "bf": torch.ones(2, dtype=torch.bfloat16),
         "pair": (torch.zeros(2, dtype=torch.int32), None), "prompts": [[1, 2], [3]], "step": 5}
    wire = to_wire(x)
    assert not torch.is_tensor(wire["ids"]) and torch.is_tensor(wire["bf"])
    back = from_wire(wire)
    for k in ("ids", "lp", "bf"):
        assert back[k].dtype == x[k].dtype and torch.equal(back[k], x[k])
    assert torch.equal(back["pair"][0], x["pair"][0]) and back["pair"][1] is None
    assert back["prompts"] == x["prompts"] and back["step"] == 5
    back["lp"] += 1  # writable, not a view of the sender's buffer


def test_task_text_round_trip():
    ids = tasks.encode("1 2 3 =")
    assert ids == [tasks.BOS, tasks.DIGIT0 + 1, tasks.DIGIT0 + 2, tasks.DIGIT0 + 3, tasks.SEP]
    assert tasks.encode("<s> 1 =") == [tasks.BOS, tasks.DIGIT0 + 1, tasks.SEP]
    assert tasks.decode([tasks.DIGIT0 + 3, tasks.PAD, tasks.EOS, tasks.DIGIT0]) == "3 </s>"
    with pytest.raises(ValueError, match="'x' is not a symbol"):
        tasks.encode("1 x =")


def test_generate_command_answers_a_prompts_file(tmp_path, capsys):
    """`rlhfkern generate` on a saved model: one line per prompt, the greedy answers of the
    backend's own decoding; a bad prompts file stops before the model loads."""
    import json

    from rlhfkern.__main__ import main

    b = backend("rollout.max_new_tokens=5")
    b.save(str(tmp_path / "step_3" / "policy" / "rank_0"))
    prompts = ["1 2 3 =", "<s> 9 =", "4 4 4 4 4 ="]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main(["generate", "--checkpoint", str(tmp_path / "step_3"), "--prompts", str(tmp_path / "p.jsonl"),
                 "--max-new-tokens", "5", "--out", str(tmp_path / "out.jsonl")]) == 0
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in got] == prompts
    resp, mask, _ = b.generate([tasks.encode(p) for p in prompts], seed=0, greedy=True)
    assert [g["response"] for g in got] == [tasks.decode(r[:int(m.sum())].tolist()) for r, m in zip(resp, mask)]
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1 ="}\n{"promt": "2 ="}\n')
    assert main(["generate", "--checkpoint", str(tmp_path / "step_3"), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: missing key 'prompt'" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "no model there" in capsys.readouterr().err


def trainer(role="policy", *overrides):
    cfg = load_config(GRPO, [*overrides])
    return HFBackend(cfg, role, 0, 1, "cpu", {})


def test_packed_rows_give_the_padded_batch_log_probs():
    """SFT packs a rank's sequences into one row (position ids from 0 in each, no cache): every
    response token's log-prob equals the one from the usual left/right-padded batch, so no
    sequence sees another."""
    b = trainer()
    prompts = prompts_of_mixed_lengths(7)
    responses = [tasks.target_tokens("reverse", p) for p in prompts]
    ids, pos, labels = packed(prompts, responses)
    assert ids.shape == (1, sum(len(p) + len(r) for p, r in zip(prompts, responses)))
    assert (labels != -100).sum() == sum(map(len, responses))
    lp, _ = b._labelled_logprobs(b.model, {"input_ids": ids, "position_ids": pos, "use_cache": False}, labels,
                                 False, 1.0)
    batch = sequence_batch(prompts, responses)
    expect, _ = b.logprobs(batch)
    torch.testing.assert_close(lp[labels != -100], expect[batch["response_mask"].bool()], rtol=1e-5, atol=1e-6)


def test_sft_loss_is_the_mean_response_token_nll():
    b = trainer("policy", "sft.optimizer.lr=0.01")
    b.set_optimizer("sft")
    prompts = prompts_of_mixed_lengths(6)
    responses = [tasks.target_tokens("reverse", p) for p in prompts]
    batch = sequence_batch(prompts, responses)
    lp, _ = b.logprobs(batch)
    nll = -(lp * batch["response_mask"]).sum() / batch["response_mask"].sum()
    first = b.train_sft({"prompts": prompts, "responses": responses}, 1)
    assert first["sft/loss"] == pytest.approx(float(nll), rel=1e-5) and first["sft/lr"] == 0.01
    for step in range(2, 30):
        last = b.train_sft({"prompts": prompts, "responses": responses}, step)
    assert last["sft/loss"] < 0.5 * first["sft/loss"]


def test_rm_loss_is_bradley_terry_over_every_ranked_pair():
    cfg_over = ["stages=[rm, rl]", "models.rewards={rm: {kind: model}}", "rm.optimizer.lr=0.01",
                "placement.devices_per_node=2"]
    b = trainer("reward:rm", *cfg_over)
    assert b.trainable and b.optimizer is not None
    prompts = [[tasks.BOS, *(tasks.DIGIT0 + d for d in digits), tasks.SEP] for digits in ((1, 2), (3, 4, 5), (6, 7, 8, 9), (0, 2))]
    answers = [[tasks.target_tokens("reverse", p), tasks.target_tokens("copy", p), [tasks.EOS]] for p in prompts]
    scores = [[1.0, 0.5, 0.0], [1.0, 1.0, 0.0], [0.2, 0.9, 0.9], [0.0, 0.0, 1.0]]
    batch = {"query": prompts, "responses": answers, "scores": scores}
    s = b.scores(sequence_batch([p for p in prompts for _ in range(3)], [a for group in answers for a in group]))
    s = s.view(4, 3)
    pairs = [(r, i, j) for r in range(4) for i in range(3) for j in range(3) if scores[r][i] > scores[r][j]]
    assert len(pairs) == 3 + 2 + 2 + 2  # ties give no pair
    expect = sum(-torch.nn.functional.logsigmoid(s[r, i] - s[r, j]) for r, i, j in pairs) / len(pairs)
    out = b.train_rm(batch, 1)
    assert out["rm/loss"] == pytest.approx(float(expect), rel=1e-5)
    assert out["rm/accuracy"] == pytest.approx(sum(float(s[r, i] > s[r, j]) for r, i, j in pairs) / len(pairs))
    for step in range(2, 40):
        b.train_rm(batch, step)
    assert b.rm_eval(batch) == {"correct": len(pairs), "pairs": len(pairs)}
    b.freeze()
    assert b.optimizer is None and not any(p.requires_grad for p in b.model.parameters())


def test_lr_schedules():
    from rlhfkern.sched.config import OptimizerConfig

    f = lambda step, **kw: lr_factor(OptimizerConfig(**kw), 10, step)  # noqa: E731
    assert [f(k) for k in (0, 5, 9, 20)] == [1.0] * 4
    assert [f(k, warmup_steps=4) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [f(k, schedule="cosine", warmup_steps=1, min_lr_ratio=0.1) for k in range(11)]
    assert cos[0] == 1.0 and cos[1] == 1.0 and cos[9] == pytest.approx(0.1) and cos[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[1:], cos[2:]))
    assert f(5, schedule="linear") == pytest.approx(1 - 5 / 9)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    """Weights of another shape, or of another kind of model, are refused naming the tensors."""
    small = trainer("policy", "models.policy.model.hf_config.hidden_size=32")
    small.save(str(tmp_path / "small"))
    b = trainer()
    with pytest.raises(RuntimeError, match="size mismatch for model.embed_tokens.weight"):
        b.load_weights(str(tmp_path / "small"))
    value = trainer("value", "algorithm.name=ppo", "models.value={optimizer: {lr: 0.001}}", "placement.devices_per_node=2")
    value.save(str(tmp_path / "value"))
    with pytest.raises(ValueError, match=r"does not hold policy's weights: missing \['lm_head.weight'\], "
                                         r"unexpected \['score.bias', 'score.weight'\]"):
        b.load_weights(str(tmp_path / "value"))
