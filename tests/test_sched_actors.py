"""The hf backend's own decoding loop (KV cache, left-padded prompts, EOS handling) and its
sampler, against transformers' generate and the exact distribution. No Ray: a backend object in
this process."""

import random

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", extra="ray")

from rlhfkern.sched import tasks
from rlhfkern.sched.actors import HFBackend, from_wire, left_padded, response_mask_of, sample_tokens, to_wire
from rlhfkern.sched.config import default_config_path, load_config


def backend(*overrides):
    cfg = load_config(default_config_path(), list(overrides))
    return HFBackend(cfg, "rollout", 0, 1, "cpu", None)


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
