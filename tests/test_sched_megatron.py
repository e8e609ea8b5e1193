"""The megatron-core trainer backend (backend: megatron) against the hf one: the same log-probs
and the same PPO step (weights unsharded through the reshard plan), in one process (gloo, tp 1)
and in the engine on Ray (tp 2, pp 2, tp 2 x pp 2; policy and reference), its sharded
checkpoints resuming bitwise, and the configs it refuses; the value model on megatron (its
scalar head in the output layer's place) against the hf one, in one process and in a PPO run."""

import os
import random

import pytest
import torch

from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", "ray", extra="ray")
need("megatron.core", extra="megatron")

from rlhfkern.reshard import HFLayout, apply, plan_reshard
from rlhfkern.sched import tasks
from rlhfkern.sched.actors import HFBackend, MegatronBackend, sequence_batch
from rlhfkern.sched.config import ConfigError, default_config_path, load_config
from rlhfkern.sched.loop import Engine

GRPO = default_config_path().replace("default.yaml", "grpo_reverse.yaml")
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]
SHORT = ["train.prompts_per_step=8", "rollout.samples_per_prompt=4", "train.minibatch_sequences=16",
         "data.eval_prompts=32", "train.eval_every_steps=0"]
TIMING = ("seconds", "tokens_per_second")
TP2 = ["models.policy.backend=megatron", "models.policy.tp=2", "models.reference.backend=megatron",
       "models.reference.tp=2", "placement.devices_per_node=2", "placement.colocate=[[policy, reference, rollout]]"]
PP2 = ["models.policy.backend=megatron", "models.policy.pp=2", "models.reference.backend=megatron",
       "models.reference.pp=2", "placement.devices_per_node=2", "placement.colocate=[[policy, reference, rollout]]"]
TP2PP2 = [*TP2, "models.policy.pp=2", "models.reference.pp=2", "placement.devices_per_node=4"]


@pytest.fixture
def gloo(monkeypatch, tmp_path):
    """This process as a gloo world of one (the engine's workers are gloo worlds too), undone
    afterwards with megatron's CPU redirects (megatron.cpu_redirects patches torch.cuda)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import random as megatron_random

    monkeypatch.setattr(torch.cuda, "current_device", torch.cuda.current_device)  # restored at teardown
    tracker = megatron_random.get_cuda_rng_tracker()
    monkeypatch.setattr(tracker, "fork", tracker.fork)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'gloo'}", rank=0, world_size=1)
    group = dist.new_group([0])
    yield {("model", name, kind): group for name in ("policy", "value") for kind in ("tp", "pp", "dp")}
    dist.destroy_process_group()


def unsharded(backend):
    """A megatron backend's weights in the HF layout (through the reshard plan)."""
    plan = plan_reshard(backend.layout, HFLayout(backend.layout.spec), dtype=torch.float32)
    shapes = backend.layout.spec.hf_shapes()
    out = {0: {n: torch.zeros(s) for n, s in shapes.items()}}
    apply(plan, {0: {n: t.detach() for n, t in backend.named_tensors().items()}}, out=out)
    return out[0]


def assert_same_step(hf, mg, metrics_hf, metrics_mg):
    """The same metrics (fp32) and the same weights after a step; the megatron ones unsharded."""
    assert metrics_hf.keys() == metrics_mg.keys()
    for k in metrics_hf:
        assert metrics_mg[k] == pytest.approx(metrics_hf[k], rel=1e-5, abs=1e-6), k
    after = unsharded(mg)
    for n, p in hf.named_tensors().items():
        torch.testing.assert_close(after[n], p.detach(), rtol=0, atol=1e-5, msg=n)
    return after


def test_megatron_step_equals_the_hf_step(gloo):
    """Sampled responses (PAD inside some of them, right padding), two minibatches, gradient
    clipping on: the same log-probs before the step, the same metrics and weights after it."""
    hf = HFBackend(load_config(GRPO, []), "policy", 0, 1, "cpu", {})
    mg = MegatronBackend(load_config(GRPO, ["models.policy.backend=megatron"]), "policy", 0, 1, "cpu", gloo)
    assert all(torch.equal(unsharded(mg)[n], p) for n, p in hf.named_tensors().items())
    prompts = tasks.DigitTask("reverse", 3, 3, 10, 0).train_prompts(16, random.Random(1))
    responses, mask, _ = hf.generate(prompts, seed=5)
    assert (mask.sum(1) < mask.shape[1]).any() and (responses[mask.bool()] == tasks.PAD).any()
    batch = sequence_batch(prompts, responses, mask)
    batch["advantages"] = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    batch["ref_log_prob"] = torch.full(mask.shape, -2.0)
    before_hf, before_mg = hf.logprobs(batch)[0], mg.logprobs(batch)[0]
    torch.testing.assert_close(before_mg, before_hf, rtol=0, atol=1e-5)
    metrics_hf, metrics_mg = hf.train_policy(batch, 1, 8, 1), mg.train_policy(batch, 1, 8, 1)
    after = assert_same_step(hf, mg, metrics_hf, metrics_mg)


PPO = ["algorithm.name=ppo", "placement.devices_per_node=2",
       "models.value={optimizer: {lr: 1.0e-3, grad_clip_norm: 1.0}}"]


def test_megatron_value_equals_the_hf_value(gloo, tmp_path):
    """The value model on megatron (tp 1): the hf value model's weights (its `score` head as
    megatron's output layer), the same values, and after a value step on two minibatches with
    clipping the same metrics and weights; its own checkpoint reloads; an HF folder without the
    head's bias (a reward model's) loads with that bias kept."""
    from safetensors.torch import load_file, save_file

    hf = HFBackend(load_config(GRPO, PPO), "value", 0, 1, "cpu", {})
    mg = MegatronBackend(load_config(GRPO, [*PPO, "models.value.backend=megatron"]), "value", 0, 1, "cpu", gloo)
    assert mg.layout.spec.value_head and {"output_layer.weight", "output_layer.bias"} <= set(mg.named_tensors())
    assert mg.named_tensors()["output_layer.weight"].shape == (1, 64)
    start = unsharded(mg)
    assert start.keys() == hf.named_tensors().keys()
    assert all(torch.equal(start[n], p) for n, p in hf.named_tensors().items())
    prompts = tasks.DigitTask("reverse", 3, 3, 10, 0).train_prompts(16, random.Random(1))
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(3, 14, (16, 6), generator=g)
    mask = (torch.arange(6) < torch.randint(1, 7, (16, 1), generator=g)).long()
    batch = sequence_batch(prompts, responses.masked_fill(mask == 0, tasks.PAD), mask)
    v_hf, v_mg = hf.values(batch), mg.values(batch)
    # at the response's tokens: past its end the states are padding tokens', whose rotary positions
    # differ (megatron numbers every slot, the hf forward gives right padding the last real
    # position; the same relative positions for the real tokens): values no loss or advantage reads
    torch.testing.assert_close(v_mg[mask.bool()], v_hf[mask.bool()], rtol=0, atol=1e-5)
    batch["values"] = v_hf
    batch["returns"] = v_hf + torch.randn(mask.shape, generator=g)
    metrics_hf, metrics_mg = hf.train_value(batch, 1, 8, 1), mg.train_value(batch, 1, 8, 1)
    after = assert_same_step(hf, mg, metrics_hf, metrics_mg)
    assert not torch.equal(after["score.bias"], start["score.bias"])
    mg.save(str(tmp_path / "mg"))  # its own sharded layout (megatron.pt, optimizer.pt)
    again = MegatronBackend(load_config(GRPO, [*PPO, "models.value.backend=megatron"]), "value", 0, 1, "cpu", gloo)
    again.load(str(tmp_path / "mg"))
    assert all(torch.equal(again.named_tensors()[n], t) for n, t in mg.named_tensors().items())
    assert again.optimizer.state_dict()["state"].keys() == mg.optimizer.state_dict()["state"].keys()
    hf.save(tmp_path / "rm")  # an HF folder without score.bias, as a reward model's
    state = load_file(tmp_path / "rm" / "model.safetensors")
    bias = state.pop("score.bias")
    save_file(state, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    mg.load_weights(str(tmp_path / "rm"), ("score.bias",))
    loaded = unsharded(mg)
    assert all(torch.equal(loaded[n], t) for n, t in state.items())
    assert torch.equal(loaded["score.bias"], after["score.bias"]) and not torch.equal(bias, after["score.bias"])


def engine(tmp_path, *overrides):
    return Engine(load_config(GRPO, [f"logging.run_dir={tmp_path}", *QUIET, *SHORT, *overrides]))


def first_step(e):
    """Step 0's policy log-probs of a generated batch, then one step: (log-probs, metrics, rollout weights)."""
    e.start()
    prompts = e._prompts()
    responses, mask, _ = e._gather(e._generate(prompts, 3)[0])
    lp, _ = e._gather(e._scatter("policy", "logprobs", e._make_batch(prompts, responses, mask), False))
    e.old_log_prob_from_rollout = False  # both trainers compute them (hf would take the rollout's)
    e.learn(1)
    return lp, {k: v for k, v in e.history[-1].items() if k not in TIMING}, e.weights("rollout")


KV1 = ["models.policy.model.hf_config.num_key_value_heads=1"]
TIED = ["models.policy.model.hf_config.tie_word_embeddings=true"]


@pytest.mark.parametrize("layout,model", [(TP2, []), (TP2, KV1), (PP2, []), (PP2, TIED), (TP2PP2, [])],
                         ids=["tp2-mha", "tp2-kv1", "pp2", "pp2-tied", "tp2-pp2"])
def test_megatron_in_the_engine_equals_hf(ray_gpus, tmp_path, layout, model):
    """Policy and reference on megatron tp 2, pp 2 or both (the rollout hf, synced through the
    plan from megatron's layout): step 0's log-probs and the first step's metrics and weights
    equal an hf run's. kv1: one KV head, tp past it (each rank holds part of megatron's one qkv
    group). pp: one layer per stage, the hidden states and their gradients sent between stages;
    tied: the last stage's copy of the embedding gets the same update as the first stage's."""
    hf = engine(tmp_path / "hf", *model)
    try:
        lp_hf, m_hf, w_hf = first_step(hf)
    finally:
        hf.shutdown()
    mg = engine(tmp_path / "mg", *layout, *model)
    try:
        lp_mg, m_mg, w_mg = first_step(mg)
        import ray

        from rlhfkern.sched.memory import model_memory

        for name in ("policy", "reference"):  # the plan counts a tp rank's shards exactly (pp: stage 0's)
            mm = model_memory(mg.cfg, name)
            tp = mg.cfg.model(name).tp
            assert [ray.get(r.call("memory_bytes")) for r in mg.ranks[name][:tp]] == \
                [{"weights": mm.weights, "gradients": mm.gradients, "optimizer": mm.optimizer}] * tp, name
        names = [set(ray.get(r.call("named_tensors"))) for r in mg.ranks["policy"]]
        assert len(names) == mg.cfg.models.policy.world
        assert "embedding.word_embeddings.weight" in names[0] and "output_layer.weight" in names[-1]
        if mg.cfg.models.policy.pp > 1:  # the stages hold their own parts
            assert "output_layer.weight" not in names[0] and "embedding.word_embeddings.weight" not in names[-1]
            if model == TIED:
                first, last = (ray.get(mg.ranks["policy"][i].call("named_tensors")) for i in (0, -1))
                assert (first["embedding.word_embeddings.weight"] == last["output_layer.weight"]).all()  # numpy
    finally:
        mg.shutdown()
    torch.testing.assert_close(lp_mg, lp_hf, rtol=0, atol=1e-5)
    # the trainer's log-probs of the rollout's samples, right after a sync (fp32): the same
    assert m_mg["rollout/logprob_diff_max"] < 1e-5 and m_hf["rollout/logprob_diff_max"] < 1e-5
    assert m_mg.keys() == m_hf.keys()
    for k, v in m_hf.items():
        assert m_mg[k] == pytest.approx(v, rel=1e-4, abs=1e-6 if not k.startswith("rollout/logprob_diff") else 1e-5), k
    for n, t in w_hf.items():
        torch.testing.assert_close(w_mg[n], t, rtol=0, atol=1e-5, msg=n)


def ppo_first_step(e):
    """Step 0's values of a generated batch, then one PPO step: (values, response mask, metrics,
    the value model's weights in the HF layout)."""
    import ray

    from rlhfkern.reshard import MegatronLayout, ModelSpec

    e.start()
    prompts = e._prompts()
    responses, mask, _ = e._gather(e._generate(prompts, 3)[0])
    values = e._gather(e._scatter("value", "values", e._make_batch(prompts, responses, mask)))
    e.learn(1)
    metrics = {k: v for k, v in e.history[-1].items() if k not in TIMING}
    mc = e.cfg.model("value")
    if mc.backend == "hf":
        return values, mask, metrics, e.weights("value")
    layout = MegatronLayout(ModelSpec.from_hf_config(e.cfg.hf_config("value"), value_head=True), mc.tp, mc.pp)
    shards = {r: {n: torch.from_numpy(t) for n, t in ray.get(e.ranks["value"][r].call("named_tensors")).items()}
              for r in range(layout.world)}
    return values, mask, metrics, layout.unshard(shards)


@pytest.mark.parametrize("layout", [["models.value.tp=2"], ["models.value.pp=2"]], ids=["tp2", "pp2"])
def test_megatron_value_in_the_engine_equals_hf(ray_gpus, tmp_path, layout):
    """PPO with the value model on megatron tp 2 or pp 2 (policy, reference and rollout hf,
    colocated): step 0's values, the first step's metrics (critic/* among them) and the value
    model's weights after it equal an hf value model's; the plan counts its (rank 0's) shards
    exactly; the head lives on the last stage, whole on every tp rank."""
    import ray

    from rlhfkern.sched.memory import model_memory

    ppo = [*PPO, "placement.devices_per_node=3"]
    hf = engine(tmp_path / "hf", *ppo)
    try:
        v_hf, mask, m_hf, w_hf = ppo_first_step(hf)
    finally:
        hf.shutdown()
    mg = engine(tmp_path / "mg", *ppo, "models.value.backend=megatron", *layout)
    try:
        v_mg, mask_mg, m_mg, w_mg = ppo_first_step(mg)
        mm = model_memory(mg.cfg, "value")
        assert ray.get(mg.ranks["value"][0].call("memory_bytes")) == \
            {"weights": mm.weights, "gradients": mm.gradients, "optimizer": mm.optimizer}
        names = [ray.get(r.call("named_tensors")) for r in mg.ranks["value"]]
        heads = [n["output_layer.weight"] for n in names if "output_layer.weight" in n]
        assert len(heads) == mg.cfg.models.value.tp and heads[0].shape == (1, 64)
        assert all((h == heads[0]).all() for h in heads)  # whole on every tp rank, kept equal
    finally:
        mg.shutdown()
    assert torch.equal(mask_mg, mask)
    torch.testing.assert_close(v_mg[mask.bool()], v_hf[mask.bool()], rtol=0, atol=1e-5)
    assert {"critic/loss", "critic/clipfrac", "critic/grad_norm", "critic/lr"} <= m_hf.keys() == m_mg.keys()
    for k, v in m_hf.items():
        assert m_mg[k] == pytest.approx(v, rel=1e-4, abs=1e-6 if not k.startswith("rollout/logprob_diff") else 1e-5), k
    assert w_mg.keys() == w_hf.keys()
    for n, t in w_hf.items():
        torch.testing.assert_close(w_mg[n], t, rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("layout", [TP2, PP2], ids=["tp2", "pp2"])
def test_megatron_checkpoints_resume_bitwise(ray_gpus, tmp_path, layout):
    """Each tp (or pp) rank saves its own shard (megatron.pt, optimizer.pt); a fresh engine
    resumed from step 1 repeats step 2 bitwise."""
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=1"]
    e = engine(tmp_path / "a", *layout, *ckpt)
    try:
        e.learn(2)
        full = [{k: v for k, v in m.items() if k not in TIMING} for m in e.history]
        final = e.weights("rollout")
    finally:
        e.shutdown()
    assert sorted(os.listdir(tmp_path / "ckpt" / "step_1" / "policy")) == ["rank_0", "rank_1"]
    assert sorted(os.listdir(tmp_path / "ckpt" / "step_1" / "policy" / "rank_1")) == ["megatron.pt", "optimizer.pt"]
    r = engine(tmp_path / "b", *layout)
    try:
        r.resume(str(tmp_path / "ckpt" / "step_1"))
        r.learn(1)
        assert [{k: v for k, v in m.items() if k not in TIMING} for m in r.history] == full[1:]
        assert all(torch.equal(t, final[n]) for n, t in r.weights("rollout").items())
    finally:
        r.shutdown()
    hf = engine(tmp_path / "c", "placement.devices_per_node=2")
    try:
        with pytest.raises(ValueError, match="'backend': 'megatron'"):
            hf.resume(str(tmp_path / "ckpt" / "step_1"))
    finally:
        hf.shutdown()


@pytest.mark.parametrize("override,key,message", [
    ("models.rollout.backend=megatron", "models.rollout.backend", "runs the policy trainer, the reference and the value"),
    ("models.policy.pp=3", "models.policy.pp", "pp=3 must divide the layers (2)"),
    ("models.policy.tp=3", "models.policy.tp", "does not divide the 4 attention heads"),
    (["models.policy.model.hf_config.num_attention_heads=12", "models.policy.model.hf_config.hidden_size=96",
      "models.policy.model.hf_config.num_key_value_heads=4", "models.policy.tp=6", "placement.devices_per_node=6"],
     "models.policy.tp", "tp=6 must divide the KV heads (4) or be a multiple of them"),
])
def test_megatron_configs_it_refuses(override, key, message):
    """Refused before any actor starts, megatron-core's own rules among them (tp past the KV heads
    is not refused: the kv1 test above)."""
    overrides = override if isinstance(override, list) else [override]
    with pytest.raises(ConfigError) as e:
        load_config(GRPO, ["models.policy.backend=megatron", "placement.devices_per_node=4", *overrides])
    assert any(k == key and message in m for k, m in e.value.problems), e.value.problems
    with pytest.raises(ConfigError, match="the sft and rm stages run on backend hf"):
        load_config(default_config_path(), ["models.policy.backend=megatron"])
