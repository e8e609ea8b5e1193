"""The RLHF loop, written once against the actor interface and rlhfkern's ops.

One step:  generate -> rewards -> reference and old log-probs -> values -> advantages ->
PPO epochs (policy, value) -> weight sync to the rollout -> metrics.

Before the RL steps, the pipeline's stages (`stages: [sft, rm, rl]`) run on the same actors:
sft trains the policy (train_sft), rm a model reward (train_rm); each stage's model is saved to
<checkpoint dir>/<stage> and loaded into the models it feeds (_use_stage).

    engine = rlhfkern.Engine("config.yaml")      # or an EngineConfig
    summary = engine.run()                       # the stages; starts Ray and the actors if needed
    summary = engine.learn(steps)                # RL steps alone

Rewards are outcome rewards: the weighted sum of the rule and model rewards is placed on the
last response token. The KL to the reference enters the actor loss (`algorithm.kl_coef`,
`kl_kind`), as verl's `use_kl_loss`. Advantages: ppo = GAE over the value model
(`rlhfkern.gae`, whitened when `whiten_advantages`), grpo / rloo / reinforce_pp = the
`rlhfkern` estimators. Old log-probs are recomputed by the policy trainer before its update.
The reference log-probs are started before the rewards are scored, so the driver scores while
the reference's worker computes. Batches cross Ray as numpy arrays (actors.to_wire).
"""

import collections
import contextlib
import json
import math
import os
import random
import shutil
import socket
import time

import ray
import torch

import rlhfkern

from . import tasks
from .data import TextCodec, read_jsonl, write_jsonl
from .actors import ModelWorker, NonFiniteLoss, from_wire, sequence_batch, to_wire
from .config import EngineConfig, load_callable, load_config
from .memory import check_memory, estimate, resolve_device
from .placement import Placement, sync_plan

PHASES = ("sft", "rm", "generate", "reward", "logprobs", "values", "advantages", "train", "sync", "eval")


class RewardError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    pass


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _split(x, parts):
    """Contiguous shards of a batch (a tensor, list or dict of them) along dim 0, as equal as
    the length allows (training batches divide evenly: config.check)."""
    if isinstance(x, dict):
        shards = {k: _split(v, parts) for k, v in x.items()}
        return [{k: shards[k][i] for k in x} for i in range(parts)]
    bounds = [len(x) * i // parts for i in range(parts + 1)]  # sizes differ by at most one
    return [x[a:b] for a, b in zip(bounds, bounds[1:])]


def leaders(model_cfg):
    """The rank of each tp replica's leader (its first rank) of a model: the rank that generates
    and that pulls the replica's synced weights."""
    return range(0, model_cfg.world, model_cfg.tp)


def _cat(parts):
    return torch.cat(parts) if torch.is_tensor(parts[0]) else [x for p in parts for x in p]


def init_ray(num_devices, temp_dir=None):
    """Ray for the engine: the running one, else a local one with `num_devices` logical GPUs
    when torch sees none (so placement groups behave as on a cluster)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {}
    if not torch.cuda.is_available():
        kwargs["num_gpus"] = num_devices
    ray.init(include_dashboard=False, log_to_driver=True, _temp_dir=temp_dir, configure_logging=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}}, **kwargs)


class Rank:
    """One rank of one model: the worker (Ray actor) that hosts it, and the model's name there."""

    def __init__(self, worker, model):
        self.worker, self.model = worker, model

    def call(self, method, *args):
        """The backend's `method` on this rank: a Ray future (of its result as `to_wire` sends it)."""
        return self.worker.call.remote(self.model, method, *map(to_wire, args))


def shape_reward(values, normalize, clip):
    """One reward's values [B] as they enter the weighted sum: whitened over the batch
    ((r - mean) / (std + 1e-6), population std) when `normalize`, then clipped to [-clip, clip]."""
    if normalize:
        values = (values - values.mean()) / (values.std(correction=0) + 1e-6)
    if clip is not None:
        values = values.clamp(-clip, clip)
    return values


def checkpoints(root):
    """The complete checkpoints (step_<N> folders with their engine.json) under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(d[5:]), os.path.join(root, d)) for d in os.listdir(root)
             if d.startswith("step_") and d[5:].isdigit() and os.path.exists(os.path.join(root, d, "engine.json"))]
    return [p for _, p in sorted(found)]


class Engine:
    def __init__(self, config, overrides=()):
        self.cfg = config if isinstance(config, EngineConfig) else load_config(config, overrides)
        c = self.cfg
        self.task = tasks.DigitTask(c.data.task, c.data.min_digits, c.data.max_digits, c.data.eval_prompts,
                                    c.data.seed)
        self.rewards = {n: (r, load_callable(r.function) if r.kind == "rule" else None)
                        for n, r in c.models.rewards.items()}
        self.placement = Placement(c)
        self.device = resolve_device(c)
        self.workers = None  # one Ray actor per placement worker (Placement.workers)
        self.ranks = None    # model -> [Rank per rank]
        self._initial_state()
        # On-policy, the rollout's log-probs of its samples are the old log-probs PPO needs, when
        # it computes them as the trainer would (the same backend and dtype, hence the same
        # numbers up to rounding): the trainer then skips its no-grad pass over the batch.
        rollout, policy = c.model("rollout"), c.models.policy
        self.old_log_prob_from_rollout = rollout.backend == policy.backend == "hf" and rollout.dtype == policy.dtype
        self.history = []
        self.phase_seconds = {p: 0.0 for p in PHASES}
        self.stage_outputs = {}  # finished stage -> its model's folder (what feeds the next stages)
        self.stage_metrics = {}  # finished stage -> its closing metrics
        self.eos_id = c.hf_config("policy").eos_token_id
        self.data = self._read_data()  # every file checked before anything trains

    # ------------------------------------------------------------------------------ data
    def codec(self):
        """Text <-> ids for the data files: the policy folder's tokenizer, else the digit symbols."""
        hf = self.cfg.hf_config("policy")
        return TextCodec(self.cfg.source("policy").path, hf.vocab_size, self.eos_id)

    def _read_data(self):
        """The stages' records as token ids: sft [(prompt, response)], rm (train, held-out)
        [(query, [responses], [scores])], rl prompts (data.prompts) or None. A stage without a file
        gets one generated from the task (in <run_dir>/data/, read back like any file)."""
        c, out = self.cfg, {"rl": None}
        if "sft" in c.stages or "rm" in c.stages or c.data.prompts:
            codec = self.codec()
        for stage in ("sft", "rm"):
            if stage not in c.stages:
                continue
            sc = getattr(c, stage)
            path = sc.data
            if path is None:
                rng = random.Random(c.data.seed * 1000 + (1 if stage == "sft" else 2))
                made = (tasks.sft_records(self.task, sc.records, sc.wrong_fraction, rng) if stage == "sft"
                        else tasks.rm_records(self.task, sc.records, rng))
                path = os.path.join(c.logging.run_dir, "data", f"{stage}.jsonl")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_jsonl(path, made)
            records = read_jsonl(path, stage)
            if stage == "sft":
                out["sft"] = [(codec.prompt(r.query), codec.response(r.response)) for r in records]
            else:
                coded = [(codec.prompt(r.query), [codec.response(x) for x in r.response], list(r.score))
                         for r in records]
                held = max(1, round(len(coded) * c.rm.eval_fraction))
                if held >= len(coded):
                    raise ValueError(f"{path}: {len(coded)} record(s) leave none to train on after holding out "
                                     f"rm.eval_fraction={c.rm.eval_fraction}")
                out["rm"] = (coded[:-held], coded[-held:])
        if c.data.prompts:
            out["rl"] = [codec.prompt(r.prompt) for r in read_jsonl(c.data.prompts, "rl")]
        return out

    def _initial_state(self):
        """The run's state before step 1 (the seed decides it): at construction, and after a lost
        worker when no checkpoint exists."""
        self.step = 0
        self.rollout_version = 0  # the policy step whose weights the rollout holds (last sync)
        self.rng = random.Random(self.cfg.train.seed)  # draws the training prompts

    # ------------------------------------------------------------------------------ start-up
    def start(self):
        """Ray, the placement groups, one worker per bundle, their process groups, first sync."""
        memory = estimate(self.cfg, self.device)
        check_memory(memory)
        init_ray(self.placement.devices())
        present = int(ray.cluster_resources().get("GPU", 0))
        self.cfg.check(available_devices=present)
        self.placement.create()
        if self.cfg.logging.progress:
            print(self.placement.report(memory), flush=True)
        cls = ray.remote(ModelWorker)
        threads = self.cfg.placement.threads_per_actor
        pl = self.placement
        self.workers = [cls.options(**pl.worker_options(i)).remote(self.cfg, w.models, w.bundle, self.device, threads)
                        for i, w in enumerate(pl.workers)]
        self.ranks = {name: [Rank(self.workers[s.worker], name) for s in pl.slots[name]] for name in self.cfg.model_names()}
        nccl = "nccl" if self.device == "cuda" else "gloo"
        groups = [(("model", n), [s.worker for s in pl.slots[n]], nccl)
                  for n in self.cfg.model_names() if self.cfg.model(n).world > 1]
        for n in self.cfg.model_names():  # megatron: its tp, pp and dp groups (every one, in the same order)
            mc = self.cfg.model(n)
            if mc.backend == "megatron":
                from .megatron import rank_groups

                workers = [s.worker for s in pl.slots[n]]
                groups += [(("model", n, kind), [workers[r] for r in ranks], nccl)
                           for kind, lists in rank_groups(mc.tp, mc.pp, mc.dp).items() for ranks in lists]
        # colocated, or into a vLLM engine (whose tp workers vLLM runs): each rollout replica's
        # leader pulls the policy's weights; else the Resharder over the trainer+rollout group
        rc = self.cfg.model("rollout")
        self.pull_sync = self.cfg.colocated("policy", "rollout") or rc.backend == "vllm"
        if not self.pull_sync:  # trainer ranks, then rollout ranks (the Resharder's order)
            groups.append(("sync", [s.worker for s in pl.slots["policy"] + pl.slots["rollout"]], nccl))
        init = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        replica_gpus = self._replica_gpus()
        ray.get([w.init_groups.remote(init, i, len(self.workers), groups, replica_gpus.get(i, {}))
                 for i, w in enumerate(self.workers)])
        plan = sync_plan(self.cfg)
        plan_ref = ray.put(plan)
        sync_workers = {s.worker for n in ("policy", "rollout") for s in pl.slots[n]}
        ray.get([self.workers[i].set_sync_plan.remote(plan_ref) for i in sorted(sync_workers)])
        # the trainer ranks feeding each replica leader (its rank and, for vLLM, the replica's tp ranks)
        self.sync_sources = {i: sorted({t.src_rank for t in plan.transfers for r, _, _ in t.dsts if r // rc.tp == i // rc.tp})
                             for i in leaders(rc)}
        if self.cfg.placement.measure_memory:
            ray.get([w.measure.remote(True) for w in self.workers])
        self._sync(self.step)
        return self

    def _replica_gpus(self):
        """worker -> {model: the GPU ids of its rank's tp replica} for the models whose engine runs
        its own tp workers (backend vllm: they must see the replica's GPUs)."""
        out, pl = {}, self.placement
        for n in self.cfg.model_names():
            mc = self.cfg.model(n)
            if mc.backend != "vllm" or pl.gpus is None:
                continue
            slots = pl.slots[n]
            for r in leaders(mc):
                ids = [pl.gpus[s.pool][s.bundle] for s in slots[r:r + mc.tp]]
                out.setdefault(slots[r].worker, {})[n] = ids
        return out

    def memory_comparison(self):
        """The estimate of every device's phases against the peaks its worker measured since the
        start (placement.measure_memory): memory.compare's rows."""
        from .memory import compare

        peaks = ray.get([w.measured_peaks.remote() for w in self.workers])
        measured = {(w.pool, w.bundle): p or {} for w, p in zip(self.placement.workers, peaks)}
        return compare(estimate(self.cfg, self.device), measured)

    def shutdown(self):
        if self.workers:
            ray.get([w.shutdown.remote() for w in self.workers])
            for w in self.workers:
                ray.kill(w)
        self.placement.remove()
        self.workers = self.ranks = None

    # ------------------------------------------------------------------------------ helpers
    def _ranks(self, name):
        return self.ranks[name]

    def _scatter(self, name, method, batch, *args):
        """Calls `method` on every rank of `name` with its dp replica's shard of `batch` (the tp x
        pp ranks of a replica take the same one); futures."""
        ranks, mc = self._ranks(name), self.cfg.model(name)
        shards = _split(batch, mc.dp)
        return [r.call(method, shards[i // (mc.tp * mc.pp)], *args) for i, r in enumerate(ranks)]

    def _gather(self, futures):
        """The ranks' results as one: tensors/lists concatenated (tuples element-wise), metric
        dicts averaged; a rank's None (a megatron tp rank past the first) is left out. A non-finite
        loss on a rank becomes a TrainingError naming the step."""
        try:
            done, pending = {}, list(futures)
            while pending:  # in completion order: a rank that failed stops the wait at once (its
                ready, pending = ray.wait(pending, num_returns=1)  # peers may wait on it forever)
                done[ready[0]] = ray.get(ready[0])
            out = [from_wire(done[f]) for f in futures if done[f] is not None]
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), NonFiniteLoss):
                raise TrainingError(str(e.cause)) from None
            raise
        if isinstance(out[0], dict):
            return {k: sum(o[k] for o in out) / len(out) for k in out[0]}
        if isinstance(out[0], tuple):
            return tuple(_cat([o[i] for o in out]) if out[0][i] is not None else None for i in range(len(out[0])))
        return _cat(out)

    def _in_turn(self, calls):
        """Runs the calls [(model, method, batch, *args)] of one phase and returns their gathered
        results in order: models of one colocation group one after another (they time-share
        their devices), models of different pools at the same time."""
        pool_of = {n: i for i, p in enumerate(self.placement.pools) for n in p.models}
        queues = collections.defaultdict(list)
        for i, call in enumerate(calls):
            queues[pool_of[call[0]]].append((i, call))
        results = [None] * len(calls)
        for k in range(max(map(len, queues.values()), default=0)):
            wave = [(q[k][0], self._scatter(*q[k][1])) for q in queues.values() if k < len(q)]
            for i, futures in wave:
                results[i] = self._gather(futures)
        return results

    @contextlib.contextmanager
    def _phase(self, name, models=()):
        """Times a phase; with offload on CUDA, when models run in it, the colocated models that
        do not leave the device and those that do come back (host-only phases move nothing)."""
        calls = []
        if models and self.device == "cuda" and self.cfg.placement.offload:
            grouped = {n for g in self.cfg.placement.colocate for n in g}
            for n in grouped:
                calls += [r.call("onload" if n in models else "offload") for r in self._ranks(n)]
            ray.get(calls)
        t0 = time.perf_counter()
        yield
        self.phase_seconds[name] += time.perf_counter() - t0

    def _generate(self, prompts, seed, greedy=False):
        """Futures of (responses, mask, log-probs) per rollout rank; seeds differ per rank, not per
        topology."""
        ranks = [self._ranks("rollout")[i] for i in leaders(self.cfg.model("rollout"))]
        futures = [r.call("generate", shard, seed * 1000003 + i, greedy)
                   for i, (r, shard) in enumerate(zip(ranks, _split(prompts, len(ranks))))]
        return futures, self.rollout_version

    def _prompts(self):
        c = self.cfg
        if self.data["rl"] is not None:
            prompts = [self.rng.choice(self.data["rl"]) for _ in range(c.train.prompts_per_step)]
        else:
            prompts = self.task.train_prompts(c.train.prompts_per_step, self.rng)
        G = c.rollout.samples_per_prompt
        return [p for p in prompts for _ in range(G)]

    def evaluate(self):
        """Exact-match accuracy of greedy answers on the held-out prompts. Also sets
        `eval_metrics`: that accuracy, the mean reward of those answers (every configured
        reward, weighted) and their mean length in tokens."""
        prompts = self.task.eval_set
        with self._phase("eval", {"rollout"}):
            responses, mask, _ = self._gather(self._generate(prompts, 0, greedy=True)[0])
            scores, _ = self._rewards(prompts, responses, mask, self._make_batch(prompts, responses, mask))
        hits = [tasks.exact(self.cfg.data.task, p, r[:int(m.sum())].tolist()) for p, r, m in zip(prompts, responses, mask)]
        self.eval_metrics = {"eval/exact": sum(hits) / len(hits), "eval/reward": float(scores.mean()),
                             "eval/response_tokens": float(mask.sum(1).float().mean())}
        return self.eval_metrics["eval/exact"]

    def _rewards(self, prompts, responses, mask, batch):
        """Per-sequence reward: sum of weight * each reward; checked for length and finiteness."""
        total = torch.zeros(len(prompts), dtype=torch.float32)
        parts = {}
        resp_lists = [r[:int(m.sum())].tolist() for r, m in zip(responses, mask)]
        for name, (rc, fn) in self.rewards.items():
            where = f"reward {name!r} ({rc.function or 'model'}) at step {self.step + 1}, batch of {len(prompts)} sequences"
            if fn is not None:
                try:
                    out = fn(prompts, resp_lists)
                except Exception as e:
                    raise RewardError(f"{where} raised {type(e).__name__}: {e}") from e
                try:
                    out = torch.as_tensor(list(out), dtype=torch.float32)
                except Exception as e:
                    raise RewardError(f"{where} returned {type(out).__name__}, expected a list of floats") from e
            else:
                out = self._gather(self._scatter(f"reward:{name}", "scores", batch))
            if out.shape != (len(prompts),):
                raise RewardError(f"{where} returned {out.numel()} values for {len(prompts)} sequences")
            if not torch.isfinite(out).all():
                raise RewardError(f"{where} returned a non-finite value")
            parts[name] = out  # logged as it came
            total += rc.weight * shape_reward(out, rc.normalize, rc.clip)
        penalty = self.cfg.algorithm.missing_eos_penalty
        if penalty:
            total -= penalty * (~((responses == self.eos_id) & mask.bool()).any(1)).float()
        return total, parts

    def _advantages(self, batch, scores):
        a, mask = self.cfg.algorithm, batch["response_mask"]
        last = (mask.sum(1) - 1).clamp(min=0)
        rewards = torch.zeros(mask.shape, dtype=torch.float32)
        rewards[torch.arange(len(scores)), last] = scores
        index = batch["index"]
        if a.name == "ppo":
            adv, ret = rlhfkern.gae(rewards, batch["values"], mask, a.gamma, a.lam, whiten=a.whiten_advantages)
            batch["returns"] = ret
        elif a.name == "grpo":
            adv = rlhfkern.grpo_advantage(rewards, mask, index, norm_by_std=a.norm_adv_by_std)
        elif a.name == "rloo":
            adv = rlhfkern.rloo_advantage(rewards, mask, index)
        else:
            adv, _ = rlhfkern.reinforce_pp_advantage(rewards, mask, a.gamma)
        batch["advantages"] = adv

    def _sync(self, version):
        """Policy trainer -> rollout weights (rlhfkern.reshard plan). Colocated, or into vLLM: every
        rollout replica's leader writes its replica's shards in its process from the trainer
        ranks the plan names (the one in the same worker directly, others through Ray's object
        store: shared memory on the node). Separate hf rollout: the Resharder over the
        trainer+rollout process group."""
        trainers, rollouts = self._ranks("policy"), self._ranks("rollout")
        with self._phase("sync", {"policy", "rollout"}):
            if self.pull_sync:
                worker = {n: [s.worker for s in self.placement.slots[n]] for n in ("policy", "rollout")}
                remote = {(i, s) for i, src in self.sync_sources.items() for s in src
                          if worker["policy"][s] != worker["rollout"][i]}
                states = {s: trainers[s].worker.sync_state.remote() for s in sorted({s for _, s in remote})}
                ray.get([rollouts[i].worker.sync_load.remote(src, *[states[s] if (i, s) in remote else None for s in src])
                         for i, src in self.sync_sources.items()])
            else:
                ray.get([r.worker.sync_run.remote("src") for r in trainers]
                        + [r.worker.sync_run.remote("dst") for r in rollouts])
        self.rollout_version = version

    # ------------------------------------------------------------------------------ one step
    def _make_batch(self, prompts, responses, mask):
        G = self.cfg.rollout.samples_per_prompt
        return {**sequence_batch(prompts, responses, mask), "index": torch.arange(len(prompts)) // G}

    def train_step(self, prompts, pending=None):
        """One step on `prompts`; returns its metrics. `pending`: the batch already being
        generated (futures and the policy version the rollout had; off-policy), else it is
        generated now. rollout/policy_lag = updates the sampling policy is behind the policy
        being trained (0 on-policy)."""
        c, a = self.cfg, self.cfg.algorithm
        t_step = time.perf_counter()
        with self._phase("generate", {"rollout"}):
            futures, version = pending or self._generate(prompts, self._seed())
            responses, mask, rollout_log_prob = self._gather(futures)
        batch = self._make_batch(prompts, responses, mask)
        if c.models.reference is not None:
            with self._phase("logprobs", {"reference"}):  # started here, it runs while rewards are computed
                ref_futures = self._scatter("reference", "logprobs", batch, False)
        with self._phase("reward", {n for n in c.model_names() if n.startswith("reward:")}):
            scores, parts = self._rewards(prompts, responses, mask, batch)
        if c.models.reference is not None:
            with self._phase("logprobs"):
                batch["ref_log_prob"], _ = self._gather(ref_futures)
        if a.name == "ppo":
            with self._phase("values", {"value"}):
                batch["values"] = self._gather(self._scatter("value", "values", batch))
        with self._phase("advantages"):
            self._advantages(batch, scores)
        if self.old_log_prob_from_rollout and version == self.step:  # sampled with the weights about to train
            batch["old_log_prob"] = rollout_log_prob  # (else the trainer computes them in its train call)
        batch["rollout_log_prob"] = rollout_log_prob  # the trainer reports how far its own are from them
        metrics = {}
        with self._phase("train", {"policy", "value"}):
            trainers = [n for n in ("policy", "value") if getattr(c.models, n) is not None]
            for result in self._in_turn([(n, f"train_{n}", batch, self.step + 1,
                                          c.train.minibatch_sequences // c.model(n).dp, c.train.ppo_epochs)
                                         for n in trainers]):
                metrics.update(result)
        self._sync(self.step + 1)
        tokens = int(mask.sum())
        seconds = time.perf_counter() - t_step
        metrics.update({"step": self.step + 1, "reward": float(scores.mean()),
                        **{f"reward/{n}": float(v.mean()) for n, v in parts.items()},
                        "rollout/policy_lag": self.step - version, "response_tokens": tokens / len(prompts), "tokens_generated": tokens,
                        "tokens_trained": tokens * c.train.ppo_epochs, "seconds": seconds,
                        "tokens_per_second": tokens / seconds})
        return metrics

    # ------------------------------------------------------------------------------ the pipeline
    def run(self, resume=False):
        """The configured stages in order (sft -> rm -> rl), each stage's model feeding the next
        (the SFT model becomes the policy and the reference, the reward model scores the rollouts
        and starts the value model); the held-out metric after each. With `resume`, the newest RL
        checkpoint (else the finished stages' saved models) is taken up and only what is left
        runs. Returns the summary (learn()'s, with "stages")."""
        from .report import RunLog

        c = self.cfg
        if self.workers is None:
            self.start()
        latest = self.latest_checkpoint() if resume else None
        if latest:
            self.resume(latest)
        todo = max(c.train.steps - self.step, 0) if "rl" in c.stages else 0
        log = RunLog(c, todo, append=resume)
        try:
            for stage in c.stages:
                path = os.path.join(c.checkpoint_dir(), stage)
                if stage == "rl":
                    return self.learn(todo, log) if todo else {"stages": self.stage_metrics}
                if stage in self.stage_outputs:
                    continue  # taken up with the RL checkpoint
                if resume and os.path.exists(os.path.join(path, "stage.json")):
                    with open(os.path.join(path, "stage.json")) as f:
                        self.stage_metrics[stage] = json.load(f)["metrics"]
                    self._use_stage(stage, path)
                    log.event(0, f"{stage}: taken from {path}")
                    continue
                getattr(self, f"_{stage}_stage")(log)
            summary = {"stages": self.stage_metrics}
            log.finish(summary)
            return summary
        finally:
            log.close()

    def _stage_steps(self, stage, model, records, make_batch, log):
        """`stage`'s optimizer steps on `model` (sft, rm): each a batch of records drawn at
        random (with a generator of its own), split over the model's ranks; returns the last
        step's metrics."""
        sc = getattr(self.cfg, stage)
        size = sc.batch_sequences if stage == "sft" else sc.batch_records
        rng = random.Random(self.cfg.train.seed * 7919 + (1 if stage == "sft" else 2))
        ranks = self._ranks(model)
        if sc.init:
            from .cli import model_folder

            ray.get([r.call("load_weights", model_folder(sc.init)) for r in ranks])
        ray.get([r.call("set_optimizer", stage) for r in ranks])
        metrics = {}
        for k in range(1, sc.steps + 1):
            picked = [records[i] for i in rng.sample(range(len(records)), min(size, len(records)))]
            with self._phase(stage, {model}):
                metrics = self._gather(self._scatter(model, f"train_{stage}", make_batch(picked), k))
            if k % 10 == 0 or k == sc.steps:
                log.stage(stage, k, sc.steps, metrics)
        return metrics

    def _sft_stage(self, log):
        """Supervised fine-tuning of the policy; then it (and the reference) hold the SFT model."""
        metrics = self._stage_steps("sft", "policy", self.data["sft"],
                                    lambda rs: {"prompts": [p for p, _ in rs], "responses": [r for _, r in rs]}, log)
        ray.get([r.call("set_optimizer", "rl") for r in self._ranks("policy")])  # RL starts afresh
        self._sync(self.step)
        self.evaluate()  # (its reward is left out: a reward model may not be trained yet)
        self._finish_stage("sft", "policy", {**metrics, "eval/exact": self.eval_metrics["eval/exact"],
                                             "eval/response_tokens": self.eval_metrics["eval/response_tokens"]}, log)

    def _rm_stage(self, log):
        """Pairwise training of the reward model; its accuracy on the held-out records before and after."""
        name = f"reward:{self.cfg.rm_reward()}"
        train, held = self.data["rm"]
        before = self._rm_accuracy(name, held)
        metrics = self._stage_steps("rm", name, train, _rm_batch, log)
        metrics.update({"rm/eval_accuracy_start": before, "rm/eval_accuracy": self._rm_accuracy(name, held)})
        self._finish_stage("rm", name, metrics, log)

    def _rm_accuracy(self, name, records):
        counts = self._gather(self._scatter(name, "rm_eval", _rm_batch(records)))
        return counts["correct"] / counts["pairs"] if counts["pairs"] else float("nan")

    def _finish_stage(self, stage, model, metrics, log):
        """Saves the stage's model (rank 0, an HF folder: <checkpoint dir>/<stage>, written
        atomically, with stage.json) and hands it to the models it feeds."""
        path = os.path.join(os.path.abspath(self.cfg.checkpoint_dir()), stage)
        partial = path + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        ray.get(self._ranks(model)[0].call("save", partial, False))
        with open(os.path.join(partial, "stage.json"), "w") as f:
            json.dump({"stage": stage, "model": model, "metrics": metrics}, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
        self.stage_metrics[stage] = metrics
        self._use_stage(stage, path)
        log.event(0, f"{stage} done: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f"; saved to {path}")

    def _use_stage(self, stage, path):
        """A finished stage's model into the models it feeds: sft -> the policy and the reference
        (when it has no source of its own), then the rollout (sync); rm -> its reward model (frozen)
        and, with rm.init_value, the value model (its head's bias, absent in a reward model, kept)."""
        c = self.cfg
        if stage == "sft":
            targets = [("policy", ())]
            if c.models.reference is not None and c.models.reference.model is None:
                targets.append(("reference", ()))
        else:
            targets = [(f"reward:{c.rm_reward()}", ())]
            if c.models.value is not None and c.rm.init_value:
                targets.append(("value", ("score.bias",)))
        ray.get([r.call("load_weights", path, missing_ok) for name, missing_ok in targets for r in self._ranks(name)])
        if stage == "rm":
            ray.get([r.call("freeze") for r in self._ranks(targets[0][0])])
        self.stage_outputs[stage] = path
        if stage == "sft":
            self._sync(self.step)

    # ------------------------------------------------------------------------------ the loop
    def learn(self, steps=None, log=None):
        """Runs `train.steps` steps (or `steps`) of RL, evaluating every `train.eval_every_steps`;
        writes the run folder (into `log`, a RunLog, when given); returns the summary (metric at
        the start and the end, time per phase, the stages before)."""
        from .report import RunLog

        c = self.cfg
        if self.workers is None:
            self.start()
        steps = c.train.steps if steps is None else steps
        end = self.step + steps  # learn() may be called again: it continues from self.step
        own_log = log is None
        if own_log:
            log = RunLog(c, steps, append=self.step > 0)
        try:
            log.start_steps()
            start_metric = self.evaluate()
            log.eval(self.step, self.eval_metrics)
            t0 = time.perf_counter()
            off = c.rollout.off_policy_steps  # config.check: only with the rollout in a pool of its own
            prompts, pending = self._prompts(), None
            while self.step < end:
                ahead = off and self.step + 1 < end
                try:
                    if ahead:  # the next batch is generated with the current rollout weights, while this trains
                        next_prompts = self._prompts()
                        next_pending = self._generate(next_prompts, self._seed(1))
                    metrics = self.train_step(prompts, pending)
                    self.step += 1
                    if self.step == end or (c.train.eval_every_steps and self.step % c.train.eval_every_steps == 0):
                        self.evaluate()
                        metrics.update(self.eval_metrics)
                except ray.exceptions.RayActorError as e:  # a worker process died (killed, OOM)
                    self._recover(e, log)
                    prompts, pending = self._prompts(), None
                    continue
                self._check_finite(metrics)
                self.history.append(metrics)
                log.step(metrics)
                if c.checkpoint.every_steps and (self.step % c.checkpoint.every_steps == 0 or self.step == end):
                    self._checkpoint()  # every N steps and at the end
                if self.step < end:
                    prompts, pending = (next_prompts, next_pending) if ahead else (self._prompts(), None)
            summary = {"eval_start": start_metric, "eval_end": self.history[-1]["eval/exact"],
                       "steps": steps, "seconds": time.perf_counter() - t0,
                       "phase_seconds": dict(self.phase_seconds), "stages": self.stage_metrics}
            if c.placement.measure_memory:
                summary["memory"] = self.memory_comparison()
            log.finish(summary)
            return summary
        finally:
            if own_log:
                log.close()

    def _recover(self, error, log):
        """After a worker died: every worker is replaced (the survivors may wait on the dead one
        in a collective), the run resumes from the newest checkpoint, else from its initial state
        (which the seed makes the same), and the steps since are run again (one with a checkpoint
        every step)."""
        failed, latest = self.step + 1, self.latest_checkpoint()
        for w in self.workers or ():
            ray.kill(w, no_restart=True)
        self.workers = self.ranks = None
        self.placement.remove()
        self._initial_state()
        self.start()
        if latest:
            self.resume(latest)
        else:  # RL from its start: the earlier stages' models again
            for stage, path in list(self.stage_outputs.items()):
                self._use_stage(stage, path)
        self.history = [m for m in self.history if m["step"] <= self.step]
        log.event(failed, f"step {failed}: a worker died ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                          f"workers restarted, resumed from {latest or 'the initial state'} "
                          f"(step {self.step}), {failed - 1 - self.step} step(s) to redo besides step {failed}")

    def _seed(self, ahead=0):
        return self.cfg.train.seed * 7919 + self.step + ahead + 1

    def _check_finite(self, metrics):
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise TrainingError(f"step {metrics['step']}: metric {k} is {v}")

    def _trainers(self):
        return [n for n in ("policy", "value") if getattr(self.cfg.models, n) is not None]

    def _layout(self):
        """What a checkpoint must match to be loaded: the worker count, each trainer's parallel
        shape and dtype."""
        return {"workers": len(self.placement.workers),
                **{n: {"backend": self.cfg.model(n).backend, "tp": self.cfg.model(n).tp, "pp": self.cfg.model(n).pp,
                       "dp": self.cfg.model(n).dp, "dtype": self.cfg.model(n).dtype} for n in self._trainers()}}

    def save(self, path):
        """A checkpoint at `path`: each trainer rank's model and optimizer under
        path/<model>/rank_<r>, every worker's RNGs (rng.pt: Python, NumPy, torch CPU and CUDA)
        and engine.json (the step, the prompt sampler's RNG, the layout). Written into
        path.partial, then renamed: a crash during a save leaves no half checkpoint at `path`
        (nor touches an older one). A resumed run repeats an uninterrupted one bitwise (on CPU)."""
        path = os.path.abspath(path)
        partial = path + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        ray.get([rank.call("save", os.path.join(partial, name, f"rank_{r}"))
                 for name in self._trainers() for r, rank in enumerate(self._ranks(name))])
        torch.save(ray.get([w.rng_state.remote() for w in self.workers]), os.path.join(partial, "rng.pt"))
        with open(os.path.join(partial, "engine.json"), "w") as f:
            json.dump({"step": self.step, "rng": list(self.rng.getstate()[1]), "layout": self._layout(),
                       "stages": self.stage_outputs, "stage_metrics": self.stage_metrics}, f)
        if os.path.exists(path):  # the same step saved again: the old one goes only once the new is whole
            shutil.rmtree(path)
        os.replace(partial, path)
        return path

    def latest_checkpoint(self):
        """The newest complete checkpoint under checkpoint_dir(), or None."""
        found = checkpoints(self.cfg.checkpoint_dir())
        return found[-1] if found else None

    def _checkpoint(self):
        """The periodic checkpoint: <checkpoint.dir>/step_<N>, then all but the newest `keep` pruned."""
        root = self.cfg.checkpoint_dir()
        self.save(os.path.join(root, f"step_{self.step}"))
        if self.cfg.checkpoint.keep:
            for old in checkpoints(root)[:-self.cfg.checkpoint.keep]:
                shutil.rmtree(old)

    def resume(self, path):
        """Continues from the checkpoint at `path` (a step_<N> folder): trainer weights and
        optimizer state, every worker's RNGs, step, prompt RNG; then the rollout is synced. A checkpoint of another
        layout or other models is refused, naming the difference."""
        if self.workers is None:
            self.start()
        with open(os.path.join(path, "engine.json")) as f:
            state = json.load(f)
        if state["layout"] != self._layout():
            raise ValueError(f"checkpoint {path} has the layout {state['layout']}, this config {self._layout()}")
        for stage, folder in state.get("stages", {}).items():  # the earlier stages' models, then the trainers
            self._use_stage(stage, folder)
        self.stage_metrics = state.get("stage_metrics", {})
        ray.get([rank.call("load", os.path.join(path, name, f"rank_{r}"))
                 for name in self._trainers() for r, rank in enumerate(self._ranks(name))])
        rngs = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
        ray.get([w.set_rng_state.remote(r) for w, r in zip(self.workers, rngs)])
        self.step = state["step"]
        self.rng.setstate((3, tuple(state["rng"]), None))
        self._sync(self.step)
        return self

    def weights(self, name, rank=0):
        r = self._ranks(name)[rank]
        return ray.get(r.worker.weights.remote(name))


def _rm_batch(records):
    """RM records [(query, [responses], [scores])] -> the wire batch of train_rm / rm_eval."""
    return {"query": [q for q, _, _ in records], "responses": [r for _, r, _ in records],
            "scores": [s for _, _, s in records]}
