"""Config errors: every wrong key, type, value or topology gives a message naming its key path,
raised before any actor (or placement group) exists. The shipped configs load and plan."""

import copy
import glob
import os

import pytest
from conftest import need  # noqa: E402

need("pydantic", "yaml", "transformers", "ray", extra="ray")

import yaml

from rlhfkern.sched import cli
from rlhfkern.sched.config import ConfigError, default_config_path, load_config, parse_config
from rlhfkern.sched.loop import Engine

SHIPPED = sorted(glob.glob(os.path.join(os.path.dirname(default_config_path()), "*.yaml")))


GRPO = default_config_path().replace("default.yaml", "grpo_reverse.yaml")  # the rl stage alone


def default():
    with open(GRPO) as f:
        return yaml.safe_load(f)


def with_(data, path, value):
    data = copy.deepcopy(data)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


DELETE = object()
VALUE = {"optimizer": {"lr": 1e-3}}

CASES = [  # (key path, value, the error's key path, a piece of its message)
    ("models.policy.tpp", 2, "models.policy.tpp", "Extra inputs are not permitted"),
    ("train.steps", "ten", "train.steps", "valid integer"),
    ("train.steps", 0, "train.steps", "greater than 0"),
    ("algorithm.clip_c", 0.5, "algorithm.clip_c", "greater than 1"),
    ("algorithm.name", "dpo", "algorithm.name", "'ppo', 'grpo', 'rloo' or 'reinforce_pp'"),
    ("algorithm.gamma", 1.5, "algorithm.gamma", "less than or equal to 1"),
    ("rollout.top_p", 0, "rollout.top_p", "greater than 0"),
    ("models.policy.dtype", "float8", "models.policy.dtype", "'float32', 'bfloat16' or 'float16'"),
    ("models.policy.model", {"hf_config": {"hidden_size": 8}}, "models.policy.model", "needs a model_type"),
    ("models.policy.model", {"path": "/nonexistent/model"}, "models.policy.model", "cannot load the model config"),
    ("models.rewards.reverse.function", "rlhfkern.sched.tasks:no_such", "models.rewards.reverse.function",
     "has no callable 'no_such'"),
    ("models.rewards.reverse.function", "no_such_module:f", "models.rewards.reverse.function", "cannot import"),
    ("models.rewards.reverse.kind", "model", "models.rewards.reverse", "a model reward takes no function"),
    ("stages", ["rl", "sft"], "stages", "ordered subset"),
    ("stages", ["sft", "sft"], "stages", "ordered subset"),
    ("stages", [], "stages", "ordered subset"),
    ("stages", ["sft", "ppo"], "stages[1]", "'sft', 'rm' or 'rl'"),
    ("stages", ["rm", "rl"], "rm.reward", "models.rewards has none"),
    ("sft.wrong_fraction", 1.5, "sft.wrong_fraction", "less than or equal to 1"),
    ("rm.eval_fraction", 1.0, "rm.eval_fraction", "less than 1"),
    ("models.policy.optimizer.schedule", "step", "models.policy.optimizer.schedule", "'constant', 'cosine' or"),
    ("models.rewards", {}, "models.rewards", "at least 1 item"),
    ("models.policy.optimizer", DELETE, "models.policy.optimizer", "a trainer needs an optimizer"),
    ("models.reference.optimizer", {"lr": 1e-3}, "models.reference.optimizer", "not trained"),
    ("algorithm.name", "ppo", "models.value", "needs a value model"),
    ("models.value", VALUE, "models.value", "uses no value model"),
    ("models.reference", None, "algorithm.kl_coef", "needs models.reference"),
    ("rollout.samples_per_prompt", 1, "rollout.samples_per_prompt", "needs >= 2"),
    ("train.minibatch_sequences", 100, "train.minibatch_sequences", "must divide the batch"),
    ("rollout.max_new_tokens", 3, "rollout.max_new_tokens", "longest answer is 4 tokens"),
    ("rollout.off_policy_steps", 1, "rollout.off_policy_steps", "outside the policy's colocation group"),
    # topology
    ("models.policy.devices", 2, "models.policy.devices", "tp*pp*dp = 1*1*1 = 1 != devices 2"),
    ("models.policy.tp", 3, "models.policy.tp", "tp=3 does not divide the 4 attention heads"),
    ("models.policy.pp", 2, "models.policy.pp", "backend hf runs tp=1, pp=1"),
    ("models.policy.dp", 3, "models.policy.dp", "dp=3 must divide the batch of 256"),
    ("placement.colocate", [["policy", "critic"]], "placement.colocate[0][1]", "'critic' is not a model"),
    ("placement.colocate", [["policy"], ["policy", "rollout"]], "placement.colocate[1][0]", "already in group 0"),
    ("placement.colocate", [], "placement", "the models need 3 devices, placement.nodes * devices_per_node = 1"),
    ("placement.device_memory_gib", 1e-6, "placement.device_memory_gib", "needs"),
]


@pytest.mark.parametrize("key,value,path,message", CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_each_error_names_its_key_path(key, value, path, message):
    data = with_(default(), key, value)
    with pytest.raises(ConfigError) as info:
        cfg = parse_config(data)
        from rlhfkern.sched.memory import check_memory, estimate

        check_memory(estimate(cfg))
    problems = dict(info.value.problems)
    assert path in problems, info.value
    assert message in problems[path], info.value
    assert f"{path}: " in str(info.value)


def test_several_errors_are_reported_together():
    data = with_(with_(default(), "train.steps", -1), "rollout.temperature", "hot")
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert {"train.steps", "rollout.temperature"} <= set(dict(info.value.problems))


def test_overrides_and_yaml_errors_name_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.ppo_epochs: Input should be greater than 0"):
        load_config(default_config_path(), ["train.ppo_epochs=0"])
    with pytest.raises(ConfigError, match="an override is key.path=value"):
        load_config(default_config_path(), ["train.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="<root>: expected a mapping"):
        load_config(str(bad))


def test_more_devices_than_ray_has_starts_no_actor(ray_gpus, tmp_path):
    """Ray has 8 logical GPUs: a config asking for 9 is refused by Engine.start before any
    placement group or actor exists."""
    import ray
    from ray.util.placement_group import placement_group_table

    data = with_(default(), "placement.devices_per_node", 16)
    data = with_(data, "models.policy.dp", 8)
    data = with_(data, "placement.colocate", [["policy", "reference"]])  # 8 + rollout 1 = 9 devices
    data = with_(data, "logging.run_dir", str(tmp_path))
    engine = Engine(parse_config(data))
    before = ray.available_resources().get("GPU")
    with pytest.raises(ConfigError, match=r"placement: the models need 9 devices, 8 are present"):
        engine.start()
    assert engine.workers is None
    assert not [g for g in placement_group_table().values() if g["name"].startswith("rlhfkern:")
                and g["state"] != "REMOVED"]
    assert ray.available_resources().get("GPU") == before


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_load_and_plan(path, capsys):
    assert cli.main("plan", path) == 0
    out = capsys.readouterr().out
    assert "estimated peak memory" in out and "fits" in out


def test_cli_takes_overrides_without_a_config(capsys):
    from rlhfkern.__main__ import main

    assert main(["plan", "train.prompts_per_step=4", "train.minibatch_sequences=32", "data.eval_prompts=16"]) == 0
    assert "generate  rollout [32]" in capsys.readouterr().out  # 4 prompts x 8 samples, the default config
    assert main(["plan", default_config_path(), "train.steps=0"]) == 2
    assert "train.steps: Input should be greater than 0" in capsys.readouterr().err


def test_plan_refuses_a_config_that_does_not_fit(capsys):
    assert cli.main("plan", default_config_path(), ["placement.device_memory_gib=0.000001"]) == 2
    assert "placement.device_memory_gib" in capsys.readouterr().err


def vllm_config(**hf):
    """grpo_reverse with a vLLM rollout; its model has head_dim 32 (2 heads of hidden 64), which
    vLLM's CPU attention needs, unless `hf` changes it."""
    data = with_(default(), "models.rollout.backend", "vllm")
    data = with_(data, "placement.devices_per_node", 4)
    for k, v in {"num_attention_heads": 2, "num_key_value_heads": 2, **hf}.items():
        data = with_(data, f"models.policy.model.hf_config.{k}", v)
    return data


VLLM_CASES = [  # (changes to vllm_config's data, hf_config changes, the error's key path, a piece of its message)
    ({"models.reference.backend": "vllm"}, {}, "models.reference.backend", "backend vllm runs the rollout only"),
    ({"models.policy.backend": "vllm"}, {}, "models.policy.backend", "backend vllm runs the rollout only"),
    ({"models.rollout.pp": 2}, {}, "models.rollout.pp", "backend vllm runs pp=1"),
    ({"models.rollout.tp": 4}, {}, "models.rollout.tp", "vLLM tp=4 must divide heads and ffn"),  # 2 heads
    ({"models.rollout.tp": 2}, {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3},
     "models.rollout.tp", "divide or be a multiple of KV heads"),  # 3 KV heads
    ({"models.rollout.tp": 2}, {"intermediate_size": 129}, "models.rollout.tp", "vLLM tp=2 must divide heads and ffn"),
    ({"placement.device": "cpu"}, {"num_attention_heads": 4}, "models.rollout.backend",
     "vLLM on CPU needs head_dim >= 32 (this model's is 16"),
]


@pytest.mark.parametrize("changes,hf,path,message", VLLM_CASES, ids=[f"{c[2]}:{c[3]}"[:60] for c in VLLM_CASES])
def test_vllm_refusals_name_their_key(changes, hf, path, message):
    data = vllm_config(**hf)
    for k, v in changes.items():
        data = with_(data, k, v)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert any(k == path and message in m for k, m in info.value.problems), info.value


def test_vllm_tp2_rollout_is_accepted(capsys):
    data = with_(vllm_config(), "models.rollout.tp", 2)
    cfg = parse_config(data)  # colocated with policy and reference on 2 devices
    assert (cfg.model("rollout").backend, cfg.model("rollout").tp, cfg.model("rollout").world) == ("vllm", 2, 2)
    assert [p.devices for p in cfg.pools()] == [2]
    assert parse_config(with_(vllm_config(num_attention_heads=4), "placement.device", "cuda"))  # head_dim 16 on GPUs
    assert cli.main("plan", GRPO, ["models.rollout.backend=vllm", "models.rollout.tp=2",
                                   "placement.devices_per_node=2", "placement.device=cpu",
                                   "models.policy.model.hf_config.num_attention_heads=2",
                                   "models.policy.model.hf_config.num_key_value_heads=2"]) == 0
    out = capsys.readouterr().out
    assert "rollout: backend vllm, tp 2, pp 1, dp 1" in out and "rollout kv_cache" in out
