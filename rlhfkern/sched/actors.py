"""Model actors: one Ray actor per device hosting its model ranks, one interface for every backend.

`ModelWorker` is the Ray actor of one device (bundle): it holds one backend object per model
rank placed there (`HFBackend` for `backend: hf`; several when models are colocated) and
forwards the interface the loop calls, per model:

    generate(prompts, seed, greedy)      rollout: token ids in; right-padded responses, their
                                         mask and the sampled tokens' log-probs out
    logprobs(batch, with_entropy)        reference (and any causal LM)
    values(batch)                        value model
    scores(batch)                        reward models
    train_policy(batch, step, minibatch, epochs)   old log-probs, then PPO epochs over
                                         minibatches (rlhfkern.actor_loss)
    train_value(batch, step, minibatch, epochs)    the same for the value loss (rlhfkern.value_loss)
    train_sft(batch, step)               the sft stage's step (packed rows, response tokens)
    train_rm(batch, step) / rm_eval(batch)   the rm stage's pairwise step / held-out accuracy
    set_optimizer(stage) / freeze()      a fresh optimizer and LR schedule / no more training
    sync_state() / sync_load(...) / sync_run(...)    weights for the rollout (rlhfkern.reshard)
    offload() / onload()                 colocated models leave the GPU between their phases
    save(dir) / load(dir) / load_weights(dir) / memory_bytes()

`MegatronBackend` (`backend: megatron`, rlhfkern.sched.megatron) implements the same methods
for a trainer, a reference or a value model (no generation); a vLLM rollout will too; the loop never sees which
one runs. While measuring (ModelWorker.measure), each phase's peak memory is recorded. A batch is a dict of CPU tensors: input_ids [B, L] (left-padded
prompt of P tokens, then the response of R tokens right-padded), attention_mask [B, L],
response_mask [B, R], and per-token fields [B, R] (old_log_prob, ref_log_prob, advantages,
values, returns) as the phase needs them.
"""

import functools
import math
import os

import numpy as np
import torch
import torch.distributed as dist

import rlhfkern

from . import tasks

LOGITS_BUDGET_BYTES = 256 << 20  # above this, log-probs are fused with the LM head


class NonFiniteLoss(RuntimeError):
    pass


def to_wire(x):
    """What crosses Ray between the loop and a worker: CPU tensors (in dicts and tuples) as numpy
    arrays, which Ray serialises about 3x faster than tensors; bf16 and CUDA tensors as they are."""
    if isinstance(x, dict):
        return {k: to_wire(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(to_wire(v) for v in x)
    if torch.is_tensor(x) and x.device.type == "cpu" and x.dtype != torch.bfloat16:
        return x.detach().numpy()
    return x


def from_wire(x):
    """The inverse of to_wire (Ray hands out read-only arrays: copied into tensors)."""
    if isinstance(x, dict):
        return {k: from_wire(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(from_wire(v) for v in x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    return x


def role_of(name):
    return "reward" if name.startswith("reward:") else name


def build_model(cfg, name, seed, device="meta"):
    """The torch module of model `name`: a causal LM (policy, rollout, reference), a token
    classifier with one label (value: one scalar per token), or a sequence classifier with one
    label (reward model: the last token's score). From a path: its weights; from hf_config: the
    weights torch's CPU generator draws after manual_seed(seed), then moved to `device`: the same
    in every process and on every device (drawn on a GPU they would differ from the CPU's)."""
    import transformers

    role = role_of(name)
    mc = cfg.model(name)
    dtype = getattr(torch, mc.dtype)
    auto = {"value": transformers.AutoModelForTokenClassification,
            "reward": transformers.AutoModelForSequenceClassification}.get(role, transformers.AutoModelForCausalLM)
    source = cfg.source(name)
    hf = source.hf()
    if role in ("value", "reward"):
        hf.num_labels = 1
    if source.path is not None and device != "meta":
        return auto.from_pretrained(source.path, config=hf, dtype=dtype).to(device)
    with torch.device("meta" if device == "meta" else "cpu"):
        torch.manual_seed(seed + (1 if role == "value" else 0))
        model = auto.from_config(hf, dtype=dtype)
    return model if device == "meta" else model.to(device)


def position_ids(attention_mask):
    """Positions counted over the real tokens (left padding gets position 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_padded(prompts):
    """Token-id lists -> (ids [B, P] left-padded with PAD, attention mask [B, P])."""
    P = max(map(len, prompts))
    ids = torch.tensor([[tasks.PAD] * (P - len(p)) + list(p) for p in prompts], dtype=torch.int64)
    am = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
    return ids, am


def right_padded(responses):
    """Token-id lists -> (ids [B, R] right-padded with PAD, their mask [B, R])."""
    R = max(map(len, responses))
    ids = torch.tensor([list(r) + [tasks.PAD] * (R - len(r)) for r in responses], dtype=torch.int64)
    mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses], dtype=torch.int64)
    return ids, mask


def sequence_batch(prompts, responses, response_mask=None):
    """The batch of prompt + response sequences every forward pass takes: the prompts (id lists)
    left-padded, then the responses (id lists, or a right-padded tensor with its mask)."""
    if response_mask is None:
        responses, response_mask = right_padded(responses)
    ids, am = left_padded(prompts)
    return {"input_ids": torch.cat([ids, responses], 1), "attention_mask": torch.cat([am, response_mask], 1),
            "response_mask": response_mask}


def packed(prompts, responses):
    """Sequences prompt + response (id lists) in one row, no padding: ids [1, T], position_ids
    [1, T] (from 0 in each sequence, from which transformers masks attention to within each
    sequence), labels [1, T - 1] (position t's label: token t + 1 when it is a response token,
    else -100)."""
    ids, pos, lab = [], [], []
    for p, r in zip(prompts, responses):
        ids += [*p, *r]
        pos += range(len(p) + len(r))
        lab += [-100] * len(p) + list(r)
    return torch.tensor([ids]), torch.tensor([pos]), torch.tensor([lab[1:]])


def lr_factor(opt, total_steps, step):
    """The learning-rate multiplier at optimizer step `step` (from 0) of `total_steps`: (step +
    1) / warmup_steps during the warmup, then 1 (constant) or a cosine / linear decay from 1 to
    min_lr_ratio at the last step."""
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - opt.warmup_steps) / max(1, total_steps - 1 - opt.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if opt.schedule == "cosine" else 1 - progress
    return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * decay


def sample_tokens(logits, temperature, top_p, generator=None):
    """One token per row from softmax(logits / temperature), restricted to the nucleus: the
    most likely tokens whose mass before them is < top_p (the smallest set reaching top_p; the
    top token always). temperature 0 = greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        p, order = probs.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def decode(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
    """A causal LM's answers to prompts (lists of token ids) -> (responses [B, max_new_tokens]
    padded with PAD, their mask, log_probs [B, max_new_tokens] fp32). Decoding with the model's
    KV cache: one prefill, then one token per row per step (`sample_tokens` at `temperature` and
    `top_p`; temperature 0 = greedy), rows that emitted EOS padded, stopping when every row has;
    seeded by `seed` (a generator of its own). log_probs: log softmax(logits / temperature) of
    each sampled token over the whole vocabulary (top-p does not change it), what the trainer's
    forward computes for the same weights; 0 after EOS and when greedy."""
    from transformers import DynamicCache

    eos, dev = model.config.eos_token_id, model.device
    ids, am = (t.to(dev) for t in left_padded(prompts))
    B = ids.shape[0]
    gen = torch.Generator(dev).manual_seed(seed)
    pos = position_ids(am)
    resp = torch.full((B, max_new_tokens), tasks.PAD, dtype=torch.int64, device=dev)
    lps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, logits_to_keep=1,
                past_key_values=DynamicCache(config=model.config))
    for t in range(max_new_tokens):
        logits = out.logits[:, -1]
        tok = sample_tokens(logits, temperature, top_p, gen).masked_fill(done, tasks.PAD)
        resp[:, t] = tok
        if temperature > 0:
            lp = torch.log_softmax(logits.float() / temperature, -1).gather(1, tok[:, None])[:, 0]
            lps[:, t] = lp.masked_fill(done, 0.0)
        done |= tok == eos
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok[:, None], attention_mask=am, position_ids=pos, use_cache=True,
                    past_key_values=out.past_key_values)
    resp = resp.cpu()
    return resp, response_mask_of(resp, eos), lps.cpu()


def response_mask_of(responses, eos_id):
    """1 for the response's tokens up to and including the first EOS (no EOS: all of them). A
    sampled PAD before the EOS is a real token; the padding after it is not."""
    is_eos = responses == eos_id
    return ((is_eos.cumsum(-1) - is_eos.long()) == 0).to(torch.int64)


def _accumulate(sums, metrics):
    """Appends one minibatch's 0-d tensors (one host sync per minibatch, after its update)."""
    for key, v in metrics.items():
        sums.setdefault(key, []).append(float(v.detach() if torch.is_tensor(v) else v))


def _means(sums):
    return {k: sum(v) / len(v) for k, v in sums.items()}


class HFBackend:
    """A transformers model on one rank: DDP over the model's dp group when it trains."""

    def __init__(self, cfg, name, rank, world, device, groups):
        self.cfg, self.name, self.role, self.rank, self.world = cfg, name, role_of(name), rank, world
        self.device = torch.device(device)
        self.group = groups.get(("model", name))  # the model's ranks (dp)
        self.model = build_model(cfg, name, cfg.train.seed, device=self.device)
        self.hf_config = self.model.config
        # the policy and value train in the RL stage; the reward model the rm stage trains, until frozen
        self.trainable = self.role in ("policy", "value") or ("rm" in cfg.stages and name == f"reward:{cfg.rm_reward()}")
        self.model.train(False)
        self.optimizer = self.scheduler = None
        if self.trainable:
            for m in self.model.modules():  # PPO wants the sampling distribution: no dropout noise
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            self.set_optimizer("rm" if self.role == "reward" else "rl")
            self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, process_group=self.group)
                        if world > 1 else self.model)
        else:
            self.freeze()
        self.offloaded = False

    def set_optimizer(self, stage):
        """A fresh AdamW and LR schedule with the `stage`'s settings (sft, rm: their sections; rl:
        the model's optimizer), sized to its optimizer steps."""
        c = self.cfg
        if stage == "sft":
            opt, total = c.sft.optimizer, c.sft.steps
        elif stage == "rm":
            opt, total = c.rm.optimizer, c.rm.steps
        else:
            opt = c.model(self.name).optimizer
            per_step = c.train.prompts_per_step * c.rollout.samples_per_prompt // c.train.minibatch_sequences
            total = c.train.steps * c.train.ppo_epochs * per_step
        self.opt_cfg = opt
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                           weight_decay=opt.weight_decay, fused=True)  # one kernel (CPU, CUDA)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(lr_factor, opt, total))
        return True

    def freeze(self):
        """No more training: no gradients, no optimizer (a reward model after the rm stage)."""
        self.model.requires_grad_(False)
        for p in self.model.parameters():
            p.grad = None
        self.optimizer = self.scheduler = None
        self.ddp = self.model
        self.trainable = False
        return True

    # ---------------------------------------------------------------------------- forward passes
    def _inputs(self, batch):
        """ids, attention mask, positions of a batch (forward passes outside generation run with
        use_cache=False: transformers would otherwise keep every layer's keys and values)."""
        ids = batch["input_ids"].to(self.device)
        am = batch["attention_mask"].to(self.device)
        return ids, am, position_ids(am)

    def _token_logprobs(self, module, batch, with_entropy):
        """Log-probs (and entropy) of the response tokens at the rollout temperature."""
        ids, am, pos = self._inputs(batch)
        R = batch["response_mask"].shape[1]
        labels = torch.where(batch["response_mask"].to(self.device).bool(), ids[:, -R:], -100)
        inputs = {"input_ids": ids, "attention_mask": am, "position_ids": pos, "use_cache": False}
        return self._labelled_logprobs(module, inputs, labels, with_entropy, self.cfg.rollout.temperature)

    def _labelled_logprobs(self, module, inputs, labels, with_entropy, temperature):
        """log p(token t | tokens < t) (and the entropy there) for the last K tokens of each row,
        labels [B, K] (-100: not wanted, 0 out): through rlhfkern.linear_logprobs (the [tokens,
        vocab] logits never exist) when those logits would exceed LOGITS_BUDGET_BYTES in fp32, else
        rlhfkern.logprobs on the logits (faster for a small vocabulary)."""
        K = labels.shape[1]
        head = self.model.get_output_embeddings()
        if labels.numel() * head.weight.shape[0] * 4 > LOGITS_BUDGET_BYTES and head.bias is None:
            hidden = module(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, -K - 1:-1]
            out = rlhfkern.linear_logprobs(hidden, head.weight, labels, temperature=temperature,
                                           return_entropy=with_entropy)
        else:
            logits = module(**inputs, logits_to_keep=K + 1).logits[:, :-1]
            out = rlhfkern.logprobs(logits.float(), labels, temperature=temperature, return_entropy=with_entropy)
        return out if with_entropy else (out, None)

    @torch.no_grad()
    def logprobs(self, batch, with_entropy=False):
        return self._no_grad_logprobs(batch, with_entropy)

    @torch.no_grad()
    def _no_grad_logprobs(self, batch, with_entropy=False):
        lp, ent = self._token_logprobs(self.model, batch, with_entropy)
        return lp.cpu(), (ent.cpu() if ent is not None else None)

    def _values(self, module, batch):
        ids, am, pos = self._inputs(batch)
        R = batch["response_mask"].shape[1]
        v = module(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits[..., 0]
        return v[:, -R - 1:-1].float()  # V(s_t) from the state before token t, as verl

    @torch.no_grad()
    def values(self, batch):
        return self._values(self.model, batch).cpu()

    def _scores(self, module, batch):
        """A reward model's score of each sequence: its scalar head at the last non-PAD token."""
        ids, am, pos = self._inputs(batch)
        return module(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits[:, 0].float()

    @torch.no_grad()
    def scores(self, batch):
        return self._scores(self.model, batch).cpu()

    def generate(self, prompts, seed, greedy=False):
        """`decode` with this model at the rollout's max_new_tokens, temperature and top-p (or
        greedy): (responses, their mask, the sampled tokens' log-probs)."""
        r = self.cfg.rollout
        return decode(self.model, prompts, r.max_new_tokens, 0.0 if greedy else r.temperature, r.top_p, seed)

    # ---------------------------------------------------------------------------- training
    def _minibatches(self, batch, minibatch, epochs):
        B = batch["input_ids"].shape[0]
        for epoch in range(epochs):
            for k, start in enumerate(range(0, B, minibatch)):
                yield epoch, k, {key: v[start:start + minibatch] if torch.is_tensor(v) and v.dim() > 0 else v
                                 for key, v in batch.items()}

    def _step(self, loss, step, epoch, k):
        """Backward and optimizer step, unless the loss is not finite on some dp rank (then every
        rank raises, nothing is applied)."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)  # (NCCL: on the GPU)
        if self.world > 1:
            dist.all_reduce(bad, group=self.group)
        if bad.item():
            raise NonFiniteLoss(f"step {step}: {self.name} loss is {loss.item()} (epoch {epoch}, minibatch {k}); "
                                f"the update was not applied")
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        norm = self._clip_grads(self.opt_cfg.grad_clip_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return norm

    def _backward(self, loss):
        loss.backward()

    def _clip_grads(self, clip):
        """The gradients' global L2 norm, and the gradients scaled down to `clip` if above (DDP has
        averaged them over dp already)."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)

    def _global_tokens(self, mb):
        return self._global_count(mb["response_mask"].sum())

    def _global_count(self, n):
        """A count summed over the dp ranks."""
        n = torch.as_tensor(n, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(n, group=self.group)
        return float(n)

    def train_sft(self, batch, step):
        """One optimizer step of supervised fine-tuning on this rank's sequences (batch: "prompts",
        "responses", id lists), packed into one row: loss = -sum log p(response tokens) / (their
        number over all dp ranks), at temperature 1."""
        ids, pos, labels = (t.to(self.device) for t in packed(batch["prompts"], batch["responses"]))
        inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}  # no cache: transformers masks per sequence
        lp, _ = self._labelled_logprobs(self.ddp, inputs, labels, False, 1.0)
        n = self._global_count((labels != -100).sum())
        loss = -lp.sum() / n * self.world  # DDP averages the ranks' gradients
        norm = self._step(loss, step, 0, 0)
        return {"sft/loss": loss.item(), "sft/grad_norm": norm.item(), "sft/lr": self.scheduler.get_last_lr()[0]}

    def _rm_pairs(self, module, batch):
        """The records' (batch: "query" ids, "responses" id lists, "scores") scores and their
        (better, worse) pairs, sequence indices [P, 2]."""
        prompts, responses, pairs = [], [], []
        for query, answers, scores in zip(batch["query"], batch["responses"], batch["scores"]):
            base = len(prompts)
            prompts += [query] * len(answers)
            responses += answers
            pairs += [(base + i, base + j) for i, si in enumerate(scores) for j, sj in enumerate(scores) if si > sj]
        s = self._scores(module, {k: v.to(self.device) for k, v in sequence_batch(prompts, responses).items()})
        pairs = torch.tensor(pairs, dtype=torch.int64, device=self.device).view(-1, 2)
        return s[pairs[:, 0]], s[pairs[:, 1]]

    def train_rm(self, batch, step):
        """One optimizer step of the reward model: the Bradley-Terry loss -log sigmoid(s_better -
        s_worse), averaged over every ranked pair of the step's records (all dp ranks)."""
        better, worse = self._rm_pairs(self.ddp, batch)
        loss = -torch.nn.functional.logsigmoid(better - worse).sum() / self._global_count(len(better)) * self.world
        norm = self._step(loss, step, 0, 0)
        return {"rm/loss": loss.item(), "rm/accuracy": float((better > worse).float().mean()),
                "rm/grad_norm": norm.item(), "rm/lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def rm_eval(self, batch):
        """Pairwise accuracy counts on held-out records: {"correct", "pairs"} (the loop divides)."""
        better, worse = self._rm_pairs(self.model, batch)
        return {"correct": float((better > worse).sum()), "pairs": float(len(better))}

    def train_policy(self, batch, step, minibatch, epochs):
        """PPO epochs over minibatches. The old log-probs (the policy before this update) are
        batch["old_log_prob"] when given (the loop passes the rollout's, when it sampled with
        these weights), else computed here: the first minibatch's by its own first forward (no
        update has happened yet), the others' by one no-grad pass before it.

        With batch["rollout_log_prob"] (the rollout's log-probs of its samples), the agreement of
        the trainer with the rollout: |trainer - rollout| over the response tokens whose
        pre-update log-probs the trainer computed (all, or the first minibatch's when it was
        given its old log-probs), mean and max over the dp ranks (rollout/logprob_diff_*)."""
        a = self.cfg.algorithm
        sums = {}
        old = batch.get("old_log_prob")
        fresh = torch.zeros(batch["response_mask"].shape, dtype=torch.bool)  # rows the trainer computed pre-update
        if old is None:
            old = torch.empty(batch["response_mask"].shape, dtype=torch.float32)
            fresh[:] = True
            if old.shape[0] > minibatch:
                rest = {key: v[minibatch:] for key, v in batch.items()}
                old[minibatch:] = self._no_grad_logprobs(rest)[0]
        agreement = {}
        for epoch, k, mb in self._minibatches(batch, minibatch, epochs):
            use_entropy = a.entropy_coeff != 0
            lp, ent = self._token_logprobs(self.ddp, mb, with_entropy=True)
            rows = slice(k * minibatch, (k + 1) * minibatch)
            if epoch == 0 and k == 0:
                if "old_log_prob" not in batch:
                    old[rows] = lp.detach().cpu()
                if "rollout_log_prob" in batch:
                    mine = old.clone()
                    mine[rows] = lp.detach().cpu()
                    fresh[rows] = True
                    agreement = self._agreement(mine, batch["rollout_log_prob"], batch["response_mask"].bool() & fresh)
            mask = mb["response_mask"].to(self.device)
            ref = mb["ref_log_prob"].to(self.device) if a.kl_coef > 0 else None
            loss, metrics = rlhfkern.actor_loss(
                lp, old[rows].to(self.device), mb["advantages"].to(self.device), mask,
                entropy=ent if use_entropy else None, entropy_coeff=a.entropy_coeff, ref_log_prob=ref,
                kl_coef=a.kl_coef, kl_kind=a.kl_kind, clip_low=a.clip_low, clip_high=a.clip_high, clip_c=a.clip_c,
                agg=a.loss_agg, dp_size=self.world, batch_num_tokens=self._global_tokens(mb),
                global_batch_size=minibatch * self.world)
            norm = self._step(loss, step, epoch, k)
            _accumulate(sums, {"loss": loss, "grad_norm": norm, **metrics,
                               "entropy": (ent.detach() * mask).sum() / mask.sum().clamp(min=1)})
        return ({f"actor/{k}": v for k, v in _means(sums).items()} | {"actor/lr": self.scheduler.get_last_lr()[0]}
                | agreement)

    def _agreement(self, trainer, rollout, where):
        """{rollout/logprob_diff_mean, _max}: |trainer - rollout| log-probs over `where`, all dp ranks."""
        diff = (trainer - rollout).abs()[where].to(self.device, torch.float64)
        stats = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64, device=self.device)])
        top = diff.max() if diff.numel() else torch.zeros((), dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(stats, group=self.group)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        return {"rollout/logprob_diff_mean": float(stats[0] / stats[1].clamp(min=1)), "rollout/logprob_diff_max": float(top)}

    def train_value(self, batch, step, minibatch, epochs):
        a = self.cfg.algorithm
        sums = {}
        for epoch, k, mb in self._minibatches(batch, minibatch, epochs):
            mask = mb["response_mask"].to(self.device)
            v = self._values(self.ddp, mb)
            loss, clipfrac = rlhfkern.value_loss(v, mb["returns"].to(self.device), mb["values"].to(self.device), mask,
                                                 clip=a.value_clip, agg=a.loss_agg, dp_size=self.world,
                                                 batch_num_tokens=self._global_tokens(mb),
                                                 global_batch_size=minibatch * self.world)
            norm = self._step(loss, step, epoch, k)
            _accumulate(sums, {"loss": loss, "clipfrac": clipfrac, "grad_norm": norm})
        return {f"critic/{k}": v for k, v in _means(sums).items()} | {"critic/lr": self.scheduler.get_last_lr()[0]}

    # ---------------------------------------------------------------------------- weights
    def named_tensors(self):
        """The HF-named parameters (the layout rlhfkern.reshard.HFLayout describes)."""
        return dict(self.model.named_parameters())

    def sync_targets(self):
        """{rollout rank: {name: tensor}}: where a colocated weight sync writes, in place."""
        return {self.rank: self.named_tensors()}

    def after_sync(self):
        return True

    def offload(self):
        """Weights, gradients and optimizer state to host memory (CUDA only; a no-op on CPU)."""
        if self.device.type == "cuda" and not self.offloaded:
            self._move("cpu")
        self.offloaded = True

    def onload(self):
        if self.device.type == "cuda" and self.offloaded:
            self._move(self.device)
        self.offloaded = False

    def _move(self, device):
        self.model.to(device)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        state[k] = v.to(device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save(self, path, optimizer=True):
        """The model as an HF folder at `path` and, with `optimizer`, the optimizer and LR-schedule
        state (optimizer.pt)."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        if optimizer and self.optimizer is not None:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(path, "optimizer.pt"))
        return True

    def load_weights(self, path, missing_ok=()):
        """The weights of the HF folder `path` (a saved model of the same architecture); names in
        `missing_ok` may be absent (keep their values: a value head's bias from a reward model
        without one)."""
        from safetensors.torch import load_file

        state = load_file(os.path.join(path, "model.safetensors"), device=str(self.device))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.hf_config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied - set(missing_ok):  # save_pretrained leaves out tied weights only
            raise ValueError(f"{path} does not hold {self.name}'s weights: missing "
                             f"{sorted(set(missing) - tied - set(missing_ok))}, unexpected {sorted(unexpected)}")
        return True

    def load(self, path):
        """A checkpoint's rank folder: the weights, then the optimizer and LR-schedule state."""
        self.load_weights(path)
        opt = os.path.join(path, "optimizer.pt")
        if self.optimizer is not None and os.path.exists(opt):
            state = torch.load(opt, map_location=self.device)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        return True

    def memory_bytes(self):
        """Bytes of the actual tensors: weights, gradients, optimizer state."""
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        opt = [v for s in (self.optimizer.state.values() if self.optimizer else ()) for v in s.values()
               if torch.is_tensor(v)]
        return {"weights": sum(p.nbytes for p in params), "gradients": sum(g.nbytes for g in grads),
                "optimizer": sum(t.nbytes for t in opt)}


def _no_grad_rows(token, module, args, output):
    """A forward hook on an embedding: no gradient reaches the rows of `token`'s positions."""
    if output.requires_grad:
        keep = (args[0] != token).unsqueeze(-1).to(output.dtype)
        output.register_hook(lambda grad: grad * keep)


class MegatronBackend(HFBackend):
    """A megatron-core GPTModel rank (rlhfkern.sched.megatron): tp x pp x dp ranks, tp fastest.
    The same interface as HFBackend for a trainer, a reference or a value model (no generation);
    the loss and optimizer code is HFBackend's, with the gradients averaged over dp by hand and
    their norm taken over the tp shards and pp stages; log-probs from the vocab-parallel logits;
    a value model's values from its scalar head (megatron.ValueHead, whole on every tp rank: its
    gradient the same on each, counted once in the norm as the norm weights are). Ranks of
    one dp replica get the same batch; all but its first rank return None for per-sequence
    results (the loop keeps one copy).

    Pipeline (pp > 1), one minibatch at a time: each stage receives the previous stage's hidden
    states [s, b, h] over the pp group (model.set_input_tensor), runs its layers and sends its
    output on; the last stage computes the log-probs and broadcasts them over the pp group, so
    every stage computes the same loss and metrics (HFBackend's train_policy and train_value
    unchanged; the values are broadcast as the log-probs are). The
    backward starts at the last stage's loss; each stage sends the gradient of its input to the
    previous one, which back-propagates it from its output."""

    def __init__(self, cfg, name, rank, world, device, groups):
        from ..reshard import MegatronLayout, ModelSpec
        from . import megatron

        mc = cfg.model(name)
        self.cfg, self.name, self.role, self.rank = cfg, name, role_of(name), rank
        self.device = torch.device(device)
        self.tp, self.tp_rank = mc.tp, rank % mc.tp
        self.pp, self.stage = mc.pp, rank % (mc.tp * mc.pp) // mc.tp
        self.first, self.last = self.stage == 0, self.stage == mc.pp - 1
        self.dtype = getattr(torch, mc.dtype)
        self._pipe = None  # (input, output) of this stage's last forward with gradients, for its backward
        self.tp_group, self.pp_group = groups[("model", name, "tp")], groups[("model", name, "pp")]
        self.world, self.group = mc.dp, groups[("model", name, "dp")]  # what the losses average over
        megatron.cpu_redirects(self.device)
        hf = build_model(cfg, name, cfg.train.seed, device="cpu")  # the weights an hf backend starts from
        self.hf_config = hf.config
        spec = ModelSpec.from_hf_config(hf.config, value_head=self.role == "value")
        self.layout = MegatronLayout(spec, mc.tp, mc.pp)
        self.model = megatron.build_gpt(hf.config, self.layout, self.tp_group, self.pp_group, self.dtype, self.stage)
        self._copy_in(self.layout.shard({k: v.detach() for k, v in hf.named_parameters()})[rank % self.layout.world])
        pad = hf.get_input_embeddings().padding_idx
        if pad is not None and self.first:  # as the HF model's nn.Embedding(padding_idx=pad): that row gets no gradient
            self.model.embedding.word_embeddings.register_forward_hook(functools.partial(_no_grad_rows, pad))
        self.model.to(self.device)
        self.model.train(False)
        self.trainable = self.role in ("policy", "value")
        self.optimizer = self.scheduler = None
        self.ddp = self.model
        if self.trainable:
            self.set_optimizer("rl")
        else:
            self.freeze()
        self.offloaded = False

    def _copy_in(self, shard):
        """This rank's tensors (megatron names) into the model; another model's are refused by name."""
        ours = dict(self.model.named_parameters())
        if shard.keys() != ours.keys() or any(shard[n].shape != p.shape for n, p in ours.items()):
            bad = sorted(n for n in shard.keys() ^ ours.keys()) or \
                sorted(n for n in ours if shard[n].shape != ours[n].shape)
            raise ValueError(f"not {self.name}'s rank {self.rank} weights ({self.layout}): they differ in {bad[:4]}")
        with torch.no_grad():
            for n, p in ours.items():
                p.copy_(shard[n])

    def _stage_forward(self, ids, am, pos):
        """This stage's part of the forward (causal attention over the tokens of attention mask
        `am`): the previous stage's output as its input (stage > 0), its own output sent to the
        next stage (stage < last); kept for the backward when gradients are on."""
        L = ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=self.device).triu(1)
        mask = (causal[None] | ~am.bool()[:, None, :])[:, None]  # True: not attended
        inp = None
        if not self.first:
            inp = torch.empty((ids.shape[1], ids.shape[0], self.layout.spec.hidden), dtype=self.dtype, device=self.device)
            dist.recv(inp, group=self.pp_group, group_src=self.stage - 1)
            inp.requires_grad_(torch.is_grad_enabled())
            self.model.set_input_tensor(inp)
        out = self.model(ids, pos, mask)
        if not self.last:
            dist.send(out.detach().contiguous(), group=self.pp_group, group_dst=self.stage + 1)
        self._pipe = (inp, out) if torch.is_grad_enabled() else None
        return out

    def _token_logprobs(self, module, batch, with_entropy):
        """Log-probs (and entropy) of the response tokens from this rank's vocabulary shard of the
        logits (megatron's output layer, padding columns masked), combined over tp; with pp > 1
        computed by the last stage and broadcast to the others (without their graph)."""
        ids, am, pos = self._inputs(batch)
        R = batch["response_mask"].shape[1]
        out = self._stage_forward(ids, am, pos)
        if not self.last:
            lp = torch.empty((ids.shape[0], R), dtype=torch.float32, device=self.device)
            ent = torch.empty_like(lp) if with_entropy else None
            for t in (lp, ent) if with_entropy else (lp,):
                dist.broadcast(t, group=self.pp_group, group_src=self.pp - 1)
            return lp, ent
        logits = out[:, -R - 1:-1]
        first = self.tp_rank * logits.shape[-1]
        padding = torch.arange(first, first + logits.shape[-1], device=self.device) >= self.layout.spec.vocab
        if padding.any():
            logits = logits.masked_fill(padding, float("-inf"))
        labels = torch.where(batch["response_mask"].to(self.device).bool(), ids[:, -R:], -100)
        out = rlhfkern.logprobs(logits.float(), labels, temperature=self.cfg.rollout.temperature,
                                return_entropy=with_entropy, tp_group=self.tp_group if self.tp > 1 else None)
        lp, ent = out if with_entropy else (out, None)
        if self.pp > 1:
            for t in (lp, ent) if with_entropy else (lp,):
                dist.broadcast(t.detach().contiguous(), group=self.pp_group, group_src=self.pp - 1)
        return lp, ent

    @torch.no_grad()
    def logprobs(self, batch, with_entropy=False):
        out = self._no_grad_logprobs(batch, with_entropy)  # every rank of the replica takes part
        return out if self.rank % self.layout.world == 0 else None

    def _values(self, module, batch):
        """A value model's V(s_t) [B, R] fp32 from its scalar head (the same on every tp rank, as
        HFBackend._values); with pp > 1 computed by the last stage and broadcast to the others
        (without their graph)."""
        ids, am, pos = self._inputs(batch)
        R = batch["response_mask"].shape[1]
        out = self._stage_forward(ids, am, pos)
        if not self.last:
            v = torch.empty((ids.shape[0], R), dtype=torch.float32, device=self.device)
            dist.broadcast(v, group=self.pp_group, group_src=self.pp - 1)
            return v
        v = out[..., 0][:, -R - 1:-1].float()
        if self.pp > 1:
            dist.broadcast(v.detach().contiguous(), group=self.pp_group, group_src=self.pp - 1)
        return v

    @torch.no_grad()
    def values(self, batch):
        v = self._values(self.model, batch).cpu()  # every rank of the replica takes part
        return v if self.rank % self.layout.world == 0 else None

    def _backward(self, loss):
        """The pipeline's backward: the last stage from its loss, the others from the gradient of
        their output the next stage sends; each stage past the first sends the gradient of its
        input back. (Every stage has the same loss, so HFBackend._step's finiteness check agrees.)"""
        inp, out = self._pipe
        self._pipe = None
        if self.last:
            loss.backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, group=self.pp_group, group_src=self.stage + 1)
            out.backward(grad)
        if not self.first:
            dist.send(inp.grad.contiguous(), group=self.pp_group, group_dst=self.stage - 1)

    def _tied_copy(self):
        """With tied embeddings and pp > 1, this stage's copy of the shared weight (first stage:
        the embedding, last: output_layer), or None (a middle stage; not tied; pp 1)."""
        if not self.layout.spec.tied or self.pp == 1:
            return None
        if self.first:
            return self.model.embedding.word_embeddings.weight
        return self.model.output_layer.weight if self.last else None

    def _clip_grads(self, clip):
        """Gradients averaged over dp, then the global norm over the whole model: the squares of
        tp-sharded tensors summed over the tp ranks and the pp stages, replicated ones (norm
        weights) counted once. Tied embeddings with pp > 1: the first and last stages' copies get
        the sum of their gradients (an all-reduce over the pp group, zeros from middle stages),
        counted once in the norm (the first stage's)."""
        tied = self._tied_copy()
        if self.layout.spec.tied and self.pp > 1:
            shard = (self.layout.padded_vocab // self.tp, self.layout.spec.hidden)
            g = tied.grad if tied is not None else torch.zeros(shard, dtype=self.dtype, device=self.device)
            dist.all_reduce(g, group=self.pp_group)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.world > 1:
            for p in params:
                dist.all_reduce(p.grad, group=self.group)
                p.grad /= self.world
        counted = [p for p in params if not (self.last and not self.first and p is tied)]
        sharded = sum((p.grad.float() ** 2).sum() for p in counted if getattr(p, "tensor_model_parallel", False))
        replicated = sum((p.grad.float() ** 2).sum() for p in counted if not getattr(p, "tensor_model_parallel", False))
        total = torch.as_tensor(sharded + (replicated if self.tp_rank == 0 else 0.0), dtype=torch.float32,
                                device=self.device)
        if self.tp > 1:
            dist.all_reduce(total, group=self.tp_group)
        if self.pp > 1:
            dist.all_reduce(total, group=self.pp_group)
        norm = total.sqrt()
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for p in params:
            p.grad.mul_(scale.to(p.grad.dtype))
        return norm

    def named_tensors(self):
        """Megatron-named parameters (the layout rlhfkern.reshard.MegatronLayout describes)."""
        return dict(self.model.named_parameters())

    def save(self, path, optimizer=True):
        """This rank's tensors in its own sharded layout (megatron.pt), and the optimizer state."""
        os.makedirs(path, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in self.model.named_parameters()}, os.path.join(path, "megatron.pt"))
        if optimizer and self.optimizer is not None:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(path, "optimizer.pt"))
        return True

    def load_weights(self, path, missing_ok=()):
        """A rank folder this backend saved (megatron.pt), or an HF folder (sharded here); HF
        names in `missing_ok` may be absent from it: the tensors they would fill keep their
        values (a value head's bias from a reward model without one)."""
        if os.path.exists(os.path.join(path, "megatron.pt")):
            self._copy_in(torch.load(os.path.join(path, "megatron.pt"), map_location=self.device))
            return True
        from safetensors.torch import load_file

        state = load_file(os.path.join(path, "model.safetensors"))
        if self.layout.spec.tied and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        shapes, r = self.layout.spec.hf_shapes(), self.rank % self.layout.world
        absent = {n for n in missing_ok if n in shapes and n not in state}
        like = next(iter(state.values()))
        state.update({n: torch.zeros(shapes[n], dtype=like.dtype) for n in absent})
        try:
            shard = self.layout.shard(state)[r]
        except KeyError as e:
            raise ValueError(f"{path} does not hold {self.name}'s weights: no {e}") from None
        ours = dict(self.model.named_parameters())
        for n, p in self.layout.params(r).items():
            if any(pc.hf in absent for pc in p.pieces):
                shard[n] = ours[n].detach()
        self._copy_in(shard)
        return True

    def generate(self, prompts, seed, greedy=False):
        raise NotImplementedError("backend megatron trains and scores; the rollout runs backend hf")


def _vllm_rollout(*args):
    from .vllm import VLLMRollout  # vllm is imported only where a vllm rollout runs

    return VLLMRollout(*args)


BACKENDS = {"hf": HFBackend, "megatron": MegatronBackend, "vllm": _vllm_rollout}


# the backend methods of a step's phases, whose peak memory the workers measure on request
PHASE_OF = {"generate": "generate", "scores": "reward", "logprobs": "logprobs", "values": "values",
            "train_policy": "train", "train_value": "train"}


def _allocation_events(events):
    for e in events:
        if e.tag == torch._C._profiler._EventType.Allocation:
            yield e
        yield from _allocation_events(e.children)


def measure_peak(fn, device):
    """(fn()'s result, the peak of the bytes allocated during it less those freed): on CUDA the
    allocator's peak less its bytes at the start; on CPU from the profiler's record of every
    allocation and free (torch.profiler with profile_memory; a free of a tensor from before the
    call counts negative)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(_allocation_events(prof.profiler.kineto_results.experimental_event_tree()),
                    key=lambda e: e.start_time_ns)
    live = top = 0
    for e in events:
        live += e.extra_fields.alloc_size  # negative for a free
        top = max(top, live)
    return out, top


class ModelWorker:
    """The Ray actor (process) of one bundle: rank `rank` of each model in `models` (the models
    of one colocation group time-share it; a separate model has a worker per rank). Created by
    the engine with ray.remote(...); every call names the model it is for."""

    def __init__(self, cfg, models, rank, device, threads):
        import transformers

        if device == "cpu":
            torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()  # no bar per saved model in the run's output
        self.cfg, self.models, self.rank, self.device = cfg, tuple(models), rank, device
        self.backends = {}
        self.groups = {}
        self.peaks = None  # phase -> measured peak bytes on this device, while measuring

    def info(self):
        import ray

        ctx = ray.get_runtime_context()
        return {"models": self.models, "rank": self.rank, "node": ctx.get_node_id(), "gpus": ray.get_gpu_ids(),
                "pid": os.getpid(), "placement_group": ctx.get_placement_group_id()}

    def init_groups(self, init_method, world_rank, world_size, groups, replica_gpus=None):
        """Joins the engine's process world (gloo, one rank per worker) and creates every subgroup
        in `groups` (the same ordered list of (key, [world ranks], backend) on every process),
        then builds each model's backend with its model's group. `replica_gpus` {model: [GPU
        ids]}: the GPUs of a vLLM replica led from here (the backend finds them under
        ("gpus", model) among its groups)."""
        dist.init_process_group("gloo", init_method=init_method, rank=world_rank, world_size=world_size)
        for key, ranks, backend in groups:
            g = dist.new_group(ranks, backend=backend)
            if world_rank in ranks:
                self.groups[key] = g
        for name, ids in (replica_gpus or {}).items():
            self.groups[("gpus", name)] = ids
        device = self.device
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        for name in self.models:
            mc = self.cfg.model(name)
            self.backends[name] = BACKENDS[mc.backend](self.cfg, name, self.rank, mc.world, device, self.groups)
        return True

    def rng_state(self):
        """Every RNG of this process (Python, NumPy, torch CPU and CUDA), for a checkpoint."""
        import random

        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def set_rng_state(self, state):
        import random

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])
        return True

    def call(self, model, method, *args, **kwargs):
        """A backend method of `model` by name (generate, logprobs, values, scores, train_policy, ...);
        arguments and result as `to_wire` sends them. While measuring, a phase's method records
        the device's peak: the state of every model here (weights, gradients, optimizer) plus
        the peak of what the call allocates."""
        fn = getattr(self.backends[model], method)
        args = list(map(from_wire, args))
        if self.peaks is None or method not in PHASE_OF:
            return to_wire(fn(*args, **kwargs))
        device = self.backends[model].device
        if device.type == "cuda":  # everything on the device
            static = torch.cuda.memory_allocated(device)
        else:  # the models' tensors (on CPU nothing is offloaded)
            static = sum(sum(b.memory_bytes().values()) for b in self.backends.values())
        out, peak = measure_peak(lambda: fn(*args, **kwargs), device)
        phase = PHASE_OF[method]
        self.peaks[phase] = max(self.peaks.get(phase, 0), static + peak)
        return to_wire(out)

    def measure(self, on=True):
        """Starts (from nothing) or stops recording each phase's peak memory."""
        self.peaks = {} if on else None
        return True

    def measured_peaks(self):
        """phase -> the peak bytes recorded since measuring started (None: not measuring)."""
        return None if self.peaks is None else dict(self.peaks)

    # ---------------------------------------------------------------------------- weight sync
    def set_sync_plan(self, plan):
        """The rlhfkern.reshard plan of every policy -> rollout sync (computed once), and its
        Resharder over the trainer+rollout group when the pools are separate."""
        from ..reshard import Resharder

        self.sync_plan = plan
        self.resharder = Resharder(plan, group=self.groups["sync"]) if "sync" in self.groups else None
        return True

    def sync_state(self):
        """This worker's policy rank's weights for a colocated rollout rank in another worker
        (host tensors through Ray's object store: shared memory on the node)."""
        return {k: v.detach().to("cpu", copy=self.backends["policy"].device.type != "cpu") for k, v in
                self.backends["policy"].named_tensors().items()}

    def sync_load(self, src_ranks, *src_shards):
        """Colocated: the plan's transfers into this worker's rollout rank, copied in this process
        from the weights of the policy ranks `src_ranks`: a shard given as None is the policy rank
        in this process (its tensors, read where they are), else the weights Ray resolved from
        another worker's sync_state."""
        from ..reshard import apply

        here, rollout = self.backends.get("policy"), self.backends["rollout"]
        shards = {s: here.named_tensors() if t is None else t for s, t in zip(src_ranks, src_shards)}
        with torch.no_grad():
            apply(self.sync_plan, shards, out=rollout.sync_targets())
        return rollout.after_sync()

    def sync_run(self, role):
        """Separate pools: this process's part of the Resharder over the trainer+rollout group
        (role "src": its policy rank sends; "dst": its rollout rank receives)."""
        mine = {self.rank: self.backends["policy" if role == "src" else "rollout"].named_tensors()}
        with torch.no_grad():
            self.resharder.run(mine if role == "src" else None, mine if role == "dst" else None)
        return True

    def weights(self, model):
        """Every parameter of `model` as host tensors (tests compare trainer and rollout bitwise)."""
        return {k: v.detach().cpu().clone() for k, v in self.backends[model].named_tensors().items()}

    def shutdown(self):
        for b in self.backends.values():
            if hasattr(b, "shutdown"):
                b.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()
        return True
