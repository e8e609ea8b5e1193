"""The estimated peak memory of every device in every phase of one training step.

`estimate(cfg)` -> MemoryReport: for each pool and each of its devices (bundles), for each phase,
the bytes on that device by (model, component). Nothing runs; the models are built on the meta
device, so parameter counts and dtypes are exact.

Phases of a step, in order, and the models each runs (rule rewards run on the host):
  generate  rollout                    reward  reward models
  logprobs  reference                  values  value (ppo)
  train     policy (its old log-probs first, then the update), value
  sync      policy -> rollout weights

Static state of a model (exact): weights = its parameters (buffers such as rotary tables are not
counted); trainers (policy, value) add gradients (one per parameter, in its dtype) and torch
AdamW state (exp_avg and exp_avg_sq in the parameter's dtype, plus a float32 `step` scalar per
parameter tensor: 2 * weights + 4 * tensors). The modules are the actors' own (actors.build_model:
a causal LM for policy, rollout and reference, a one-label token classifier for the value model,
a one-label sequence classifier for reward models).

A megatron model counts its rank-0 shards (rlhfkern.reshard.MegatronLayout: tp slices, the
vocabulary padded). A vLLM rollout (backend vllm, rlhfkern.sched.vllm) counts, per rank:
  weights         its rank-0 shard in vLLM's layout (rlhfkern.reshard.VLLMLayout(spec, tp): fused
                  qkv/gate_up, tp slices, the vocabulary padded), exact
  packed_weights  CPU tensors only: vLLM's CPU backend pre-packs every 2-D weight (the linears, and
                  the embedding and LM head through its embedding method) for its GEMM kernels,
                  and the weight sync keeps the unpacked parameter beside it (vllm.WeightSync):
                  counted as one more copy of those weights' bytes (the packed format's own size,
                  e.g. fp32 for small bf16 GEMMs on the sgl path, is not modelled)
  kv_cache        the cache the engine preallocates at start, vllm.kv_cache_bytes (a step's
                  sequences of the replica at max_model_len, in whole KV blocks, this rank's KV
                  heads), resident like the weights: with offload on CUDA (colocated) vLLM's
                  sleep frees both weights and cache outside the rollout's phases
  sync_buffers    CPU tensors only, tp > 1, the replica's first rank: the replica's tp shards the
                  sync plan fills in shared memory (/dev/shm) for vLLM's workers to copy (on CUDA
                  they are host memory; a tp-1 engine outside the worker's process has them too,
                  not counted)
  generate        activations: the hf formula's inference working set below with this rank's
                  heads and ffn (heads / tp, f / tp); logits as hf's; no transient KV cache
These vLLM numbers are estimates, not measured: vLLM's workers (tp > 1) are processes of their own
that measure_memory does not see, and vLLM's own buffers (sampler, scheduler, the CUDA graphs
enforce_eager leaves off) are not counted.

Residency rule: a model in a colocation group, with placement.offload on CUDA, holds nothing on
the device outside its phases and its whole state during them; every other model (not colocated,
offload off, or CPU tensors) keeps its weights, gradients and optimizer state resident all step.
The models of one phase may run at the same time, so their transient memory adds up.

Transient memory, from the batch shapes (b sequences per rank of s tokens, t = b * s; e = bytes
per element of the model's dtype; L layers, h hidden, a heads, f = intermediate size, V vocab):
  s = longest prompt (data.max_digits + 2) + rollout.max_new_tokens (prefill: the prompt only)
  b = prompts_per_step * samples_per_prompt / dp, train.minibatch_sequences / dp in train, and
      at least data.eval_prompts / dp in generate and reward (the held-out evaluation's batch)
  kv_cache     2 * L * kv_heads * head_dim * s * b * e (generate; at the prefill s = the prompt,
               at the last step s plus one layer's keys copied while the cache grows)
  activations  train: t * e * (L * (8.4 h + 5 f) + 6.5 h): what autograd keeps for a
               transformers Llama-family decoder (RMSNorm, rotary, SwiGLU MLP, SDPA attention,
               which keeps no [s, s] scores) with use_cache off, and the gradients in flight at
               the start of the backward; the constants are fitted to the profiler's live bytes
               on CPU over hidden sizes 64-128, intermediate 128-512, 2-4 layers, 11-17 tokens
               (Korthikanti et al.'s 34 s b h per layer is for GPT's LayerNorm/GELU/dropout)
               inference: one layer's working set, (4*t*h + 2*t*head_dim + max(2*b*a*s*s_kv,
               3*t*f)) * e (residual stream, normed input, output, rotary tables; attention scores
               + probabilities, or the MLP's gate/up/product); generate: the larger of the
               prefill (with the prompt's cache) and the last decoding step
  logits       causal LMs, over the t_r = b * max_new_tokens response tokens: train 2 * t_r * V * 4
               (float32 logits and their gradient); inference t_r * V * (e + 4) (the lm_head
               output and its float32 copy; e = 4: t_r * V * 4); generate: one position per
               sequence. Above actors.LOGITS_BUDGET_BYTES of fp32 logits the actor fuses the LM
               head (rlhfkern.linear_logprobs): one fp32 block of logits (2 in train; 128 x
               8192 on a GPU, 512 x 8192 on the CPU at V >= 8192)
Not counted: the CUDA context, allocator fragmentation, DDP's gradient buckets.
"""

import dataclasses
import math

import torch

PHASES = ("generate", "reward", "logprobs", "values", "train", "sync")
STATE = ("weights", "gradients", "optimizer")
ENGINE_STATE = ("packed_weights", "kv_cache", "sync_buffers")  # a vLLM rollout's, resident like its weights
TRAINERS = ("policy", "value")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """One model's exact static numbers (per rank: hf replicates the model on every dp rank)
    and the shape numbers the transient formulas use."""

    name: str
    dtype: str
    params: int         # parameter elements
    tensors: int        # parameter tensors
    weights: int        # bytes
    gradients: int      # bytes (trainers)
    optimizer: int      # bytes (trainers: AdamW exp_avg, exp_avg_sq, step)
    causal_lm: bool     # False: backbone + scalar head (value, reward models)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    backend: str = "hf"
    tp: int = 1
    matrix_weights: int = 0  # bytes of the rank-0 shard's 2-D weights (vLLM on CPU packs them again)
    kv_cache: int = 0        # bytes: the KV cache a vLLM rollout preallocates per rank (vllm.kv_cache_bytes)

    @property
    def itemsize(self):
        return torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()

    @property
    def state(self):
        return self.weights + self.gradients + self.optimizer


@dataclasses.dataclass
class DeviceMemory:
    """One device (bundle `bundle` of pool `pool`): phase -> {(model, component): bytes}."""

    pool: int
    pool_name: str
    bundle: int
    models: tuple       # models with a rank on this device
    phases: dict

    @property
    def name(self):
        return f"pool{self.pool}/bundle{self.bundle}"

    def total(self, phase):
        return sum(self.phases[phase].values())

    def biggest(self, phase):
        """((model, component), bytes) of the largest entry of `phase`."""
        return max(self.phases[phase].items(), key=lambda kv: kv[1], default=((None, None), 0))

    def peak(self):
        """(phase, bytes) of this device's largest phase."""
        return max(((p, self.total(p)) for p in self.phases), key=lambda pb: pb[1])


@dataclasses.dataclass
class MemoryReport:
    models: dict        # name -> ModelMemory
    devices: list       # DeviceMemory per pool and bundle
    schedule: dict      # phase -> models that run in it (phases with device work only)
    offloaded: tuple    # models that leave the device between their phases
    device: str         # "cuda" or "cpu": the tensors' device the rule assumed
    device_memory: int  # bytes of one device (placement.device_memory_gib)
    seq: int            # tokens per sequence (s)
    batch: dict         # phase -> sequences per rank, by model: {phase: {model: b}}

    def peak(self):
        """(DeviceMemory, phase, bytes) of the largest estimate."""
        return max(((d, *d.peak()) for d in self.devices), key=lambda x: x[2])


def _dtype(name):
    return getattr(torch, name)


_MODELS = {}


def _model_memory(cfg, name, causal_lm, trainable):
    """Counted on the very module the actor builds (actors.build_model), on the meta device; a
    megatron model's from its rank-0 shards (rlhfkern.reshard.MegatronLayout), a vLLM rollout's
    from its rank-0 shard in vLLM's layout (rlhfkern.reshard.VLLMLayout)."""
    from .actors import build_model

    mc = cfg.model(name)
    dtype = mc.dtype
    key = (name, cfg.source(name).model_dump_json(), dtype, mc.backend, mc.tp, mc.pp)
    if key in _MODELS:
        return _MODELS[key]
    model = build_model(cfg, name, 0, device="meta")
    hf = model.config
    params = list(model.parameters())  # shared (tied) parameters once
    sizes = [p.numel() for p in params]
    matrices = sum(p.numel() for p in params if p.dim() == 2)
    if mc.backend in ("megatron", "vllm"):  # rank 0's shards (tp slices, padded vocabulary)
        from ..reshard import MegatronLayout, ModelSpec, VLLMLayout

        spec = ModelSpec.from_hf_config(hf, value_head=not causal_lm)  # (megatron runs no reward model)
        layout = MegatronLayout(spec, mc.tp, mc.pp) if mc.backend == "megatron" else VLLMLayout(spec, mc.tp)
        shapes = [p.shape for p in layout.params(0).values()]
        sizes = [math.prod(s) for s in shapes]
        matrices = sum(math.prod(s) for s in shapes if len(s) == 2)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    weights = sum(sizes) * itemsize
    heads = hf.num_attention_heads
    _MODELS[key] = ModelMemory(
        name=name, dtype=dtype, params=sum(sizes), tensors=len(sizes),
        weights=weights, gradients=weights if trainable else 0,
        optimizer=2 * weights + 4 * len(sizes) if trainable else 0, causal_lm=causal_lm,
        layers=hf.num_hidden_layers, hidden=hf.hidden_size, heads=heads,
        kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        intermediate=getattr(hf, "intermediate_size", None) or 4 * hf.hidden_size,
        vocab=hf.vocab_size, backend=mc.backend, tp=mc.tp, matrix_weights=matrices * itemsize)
    return _MODELS[key]


def model_memory(cfg, name):
    """The exact static numbers of model `name` (policy, rollout, reference, value, reward:<n>);
    a vLLM rollout's with its KV cache (vllm.kv_cache_bytes: a pure function, vllm not imported)."""
    from .actors import role_of

    causal_lm = role_of(name) not in ("value", "reward")
    m = _model_memory(cfg, name, causal_lm, name in TRAINERS)
    if m.backend == "vllm":
        from .vllm import kv_cache_bytes

        m = dataclasses.replace(m, kv_cache=kv_cache_bytes(cfg, name))
    return m


def engine_state(m, device, rank):
    """{component: bytes} a vLLM rollout's rank `rank` holds besides its weights (see the module
    docstring): the KV cache; on CPU the packed copies, and the first rank of a tp > 1 replica the
    sync buffers of the replica's tp shards. {} for other backends."""
    if m.backend != "vllm":
        return {}
    parts = {"kv_cache": m.kv_cache}
    if device == "cpu":
        parts["packed_weights"] = m.matrix_weights
        if m.tp > 1 and rank % m.tp == 0:
            parts["sync_buffers"] = m.tp * m.weights  # VLLMLayout's tp shards are all of one size
    return {c: v for c, v in parts.items() if v}


def _working_set(m, b, s, s_kv):
    """Inference activations: one layer's working set for b sequences of s new tokens that attend
    to s_kv tokens: the residual stream, its input, the normed input and the output (4 t h), the
    rotary tables (2 t head_dim), and the larger of the attention scores and probabilities and
    the MLP's gate/up/product (3 t f)."""
    t = b * s
    return (4 * t * m.hidden + 2 * t * m.head_dim
            + max(2 * b * m.heads * s * s_kv, 3 * t * m.intermediate)) * m.itemsize


TRAIN_PER_LAYER = (8.4, 5.0)  # activations autograd keeps per layer and token, in units of h and f
TRAIN_OUTSIDE_LAYERS = 6.5    # ... and outside the layers (embedding, final norm, gradients in flight), units of h


def _inference_logits(m, tokens):
    e = m.itemsize
    return tokens * m.vocab * (e + 4 if e != 4 else 4) if m.causal_lm else 0


def _logprob_logits(m, tokens, train, device):
    """Logits of the log-prob pass over `tokens` response tokens, as the actor computes them:
    materialised (train: float32 logits and their gradient) up to LOGITS_BUDGET_BYTES, else
    fused with the LM head (rlhfkern.linear_logprobs: one fp32 block of logits on `device`, and
    its gradient block in train)."""
    from ..ops.logprob import logits_block_elements
    from .actors import LOGITS_BUDGET_BYTES

    if not m.causal_lm:
        return 0
    if tokens * m.vocab * 4 > LOGITS_BUDGET_BYTES:
        return (2 if train else 1) * logits_block_elements(m.vocab, device) * 4
    return 2 * tokens * m.vocab * 4 if train else _inference_logits(m, tokens)


def transient(m, phase, b, s, prompt, device="cuda"):
    """{component: bytes} of model `m` running `phase` on b sequences of s tokens (prompt long), its
    tensors on `device` ("cuda"/"cpu")."""
    e = m.itemsize
    if phase == "generate" and m.backend == "vllm":  # the cache is preallocated (engine_state)
        m = dataclasses.replace(m, heads=max(1, m.heads // m.tp), intermediate=m.intermediate // m.tp)
        parts = [{"activations": _working_set(m, b, prompt, prompt), "logits": _inference_logits(m, b)},
                 {"activations": _working_set(m, b, 1, s), "logits": _inference_logits(m, b)}]
        return max(parts, key=lambda p: sum(p.values()))
    if phase == "generate":  # the larger of the prefill and the last decoding step
        kv = 2 * m.layers * m.kv_heads * m.head_dim * b * e  # per cached token
        prefill = {"activations": _working_set(m, b, prompt, prompt), "kv_cache": kv * prompt,
                   "logits": _inference_logits(m, b)}
        # the cache grown to s tokens, and one layer's keys (or values) copied as it grows
        decode = {"activations": _working_set(m, b, 1, s), "kv_cache": kv * s + kv * s // (2 * m.layers),
                  "logits": _inference_logits(m, b)}
        return max(prefill, decode, key=lambda parts: sum(parts.values()))
    if phase in ("reward", "logprobs", "values"):
        return {"activations": _working_set(m, b, s, s), "logits": _logprob_logits(m, b * (s - prompt), False, device)}
    if phase == "train":
        c_h, c_f = TRAIN_PER_LAYER
        acts = int(b * s * e * (m.layers * (c_h * m.hidden + c_f * m.intermediate) + TRAIN_OUTSIDE_LAYERS * m.hidden))
        return {"activations": acts, "logits": _logprob_logits(m, b * (s - prompt), True, device)}
    return {}  # sync: weights only


def schedule(cfg):
    """phase -> the models that run in it on a device (phases without any are left out)."""
    names = cfg.model_names()
    rewards = [n for n in names if n.startswith("reward:")]
    out = {"generate": ["rollout"], "reward": rewards,
           "logprobs": [n for n in ("reference",) if n in names],
           "values": [n for n in ("value",) if n in names],
           "train": [n for n in TRAINERS if n in names], "sync": ["policy", "rollout"]}
    return {p: out[p] for p in PHASES if out[p]}


def resolve_device(cfg):
    """The tensors' device: placement.device, with auto -> cuda when torch sees a GPU."""
    d = cfg.placement.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d


def estimate(cfg, device=None):
    """The MemoryReport of `cfg` (see the module docstring for every rule and formula);
    `device` ("cuda"/"cpu") overrides placement.device."""
    device = device or resolve_device(cfg)
    models = {n: model_memory(cfg, n) for n in cfg.model_names()}
    phases = schedule(cfg)
    pools = cfg.pools()
    offloaded = tuple(n for p in pools if len(p.models) > 1 for n in p.models) \
        if cfg.placement.offload and device == "cuda" else ()
    prompt = cfg.data.max_digits + 2
    seq = prompt + cfg.rollout.max_new_tokens
    sequences = cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt
    # the held-out evaluation generates and scores its prompts in one batch too
    per_phase = {"train": cfg.train.minibatch_sequences, "generate": max(sequences, cfg.data.eval_prompts),
                 "reward": max(sequences, cfg.data.eval_prompts)}
    batch = {p: {n: per_phase.get(p, sequences) // cfg.model(n).dp for n in ms} for p, ms in phases.items()}
    devices = []
    for i, pool in enumerate(pools):
        for bundle in range(pool.devices):
            here = tuple(n for n in pool.models if bundle < cfg.model(n).world)
            table = {}
            for phase, running in phases.items():
                parts = {}
                for n in here:
                    m = models[n]
                    if n in running or n not in offloaded:
                        parts.update({(n, c): getattr(m, c) for c in STATE if getattr(m, c)})
                        parts.update({(n, c): v for c, v in engine_state(m, device, bundle).items()})
                    if n in running:
                        extra = transient(m, phase, batch[phase][n], seq, prompt, device)
                        parts.update({(n, c): v for c, v in extra.items() if v})
                table[phase] = parts
            devices.append(DeviceMemory(i, pool.name, bundle, here, table))
    return MemoryReport(models, devices, phases, offloaded, device,
                        int(cfg.placement.device_memory_gib * GIB), seq, batch)


def fmt_bytes(n):
    """GiB with 3 decimals from 0.1 GiB; MiB, KiB (2 and 1 decimals) or bytes below."""
    if n >= GIB // 10:
        return f"{n / GIB:.3f} GiB"
    if n >= 2 ** 20:
        return f"{n / 2 ** 20:.2f} MiB"
    if n >= 2 ** 10:
        return f"{n / 2 ** 10:.1f} KiB"
    return f"{n} B"


def check_memory(report):
    """Raise ConfigError on placement.device_memory_gib, one line per device whose estimate
    exceeds it (at its largest phase)."""
    from .config import ConfigError

    limit = report.device_memory
    problems = []
    for d in report.devices:
        phase, need = d.peak()
        if need > limit:
            (model, part), size = d.biggest(phase)
            problems.append(("placement.device_memory_gib",
                             f"device {d.name} phase {phase} needs {fmt_bytes(need)} > {fmt_bytes(limit)} "
                             f"(biggest: {model} {part} {fmt_bytes(size)})"))
    if problems:
        raise ConfigError(problems)
    return report


def compare(report, measured):
    """Estimate against measurement, per device and phase: `measured` maps (pool, bundle) to the
    worker's {phase: peak bytes}. Rows (device, phase, kept, offloaded, estimate, measured):
    kept = the models whose state stays on the device in that phase, offloaded = the device's
    other models (placement.offload on CUDA)."""
    rows = []
    for d in report.devices:
        peaks = measured.get((d.pool, d.bundle), {})
        for phase in report.schedule:
            if phase not in peaks:
                continue
            kept = sorted({m for (m, c) in d.phases[phase] if c in STATE + ENGINE_STATE})
            rows.append((d.name, phase, kept, sorted(set(d.models) - set(kept)), d.total(phase), peaks[phase]))
    return rows


def comparison_lines(rows):
    """The table `compare` gives, as text."""
    head = ["device", "phase", "kept on the device", "offloaded", "estimate", "measured", "est/meas"]
    body = [[dev, phase, ", ".join(kept) or "-", ", ".join(off) or "-", fmt_bytes(est), fmt_bytes(meas),
             f"{est / meas:.2f}" if meas else "-"] for dev, phase, kept, off, est, meas in rows]
    widths = [max(len(r[c]) for r in [head] + body) for c in range(len(head))]
    fmt = lambda r: "  " + "  ".join(x.ljust(w) if c < 4 else x.rjust(w) for c, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return ["memory per device and phase, estimated vs measured peak:", fmt(head), *map(fmt, body)]
