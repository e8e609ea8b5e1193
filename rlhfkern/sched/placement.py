"""Models -> Ray placement groups and bundles.

A pool is a set of devices: one per colocation group (its models share the same bundles and
time-share them), one per model outside any group. Rank r of a model lives on bundle r of its
pool. One bundle = one device (a Ray GPU: a real one, or a logical one from
`ray.init(num_gpus=N)` on a machine without GPUs) = one worker process (a Ray actor asking for
the bundle's whole GPU) that hosts the ranks of every pool model on that bundle: colocated models
take turns inside one process (as verl's hybrid engine), so a phase change costs no process
switch, and the policy -> rollout sync of a colocated pair is a copy inside that process.

`Placement.report()` (and `plan_text(cfg)`, what `rlhfkern plan` prints) shows the topology, the
phase schedule of one step and the memory estimate of `memory.estimate`; `check_memory` refuses a
plan whose estimate exceeds placement.device_memory_gib.
"""

import dataclasses
import math
import uuid

import torch

from .memory import check_memory, estimate, fmt_bytes

__all__ = ["Pool", "Slot", "Worker", "Placement", "plan_text", "check_memory"]


@dataclasses.dataclass(frozen=True)
class Pool:
    models: tuple  # model names sharing these devices
    devices: int   # bundles (devices) in the pool

    @property
    def name(self):
        return "+".join(self.models)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one rank of one model runs."""

    model: str
    rank: int
    pool: int        # index into Placement.pools
    bundle: int      # bundle index in that pool's placement group
    worker: int      # index into Placement.workers: the process it runs in


@dataclasses.dataclass(frozen=True)
class Worker:
    """One process (Ray actor) on one bundle, hosting rank `bundle` of each of `models`."""

    pool: int
    bundle: int
    models: tuple


class Placement:
    """The plan of where every rank runs (pure), and its placement groups once `create`d."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.pools = cfg.pools()
        self.slots = {}  # model -> [Slot per rank]
        self.workers = []
        for i, pool in enumerate(self.pools):
            for b in range(pool.devices):
                here = tuple(n for n in pool.models if b < cfg.model(n).world)
                for name in here:
                    self.slots.setdefault(name, []).append(Slot(name, b, i, b, len(self.workers)))
                self.workers.append(Worker(i, b, here))
        self.run_id = uuid.uuid4().hex[:8]  # placement group names are unique per Ray cluster
        self.groups = None     # Ray placement groups, one per pool
        self.nodes = None      # pool -> [node id per bundle]
        self.gpus = None       # pool -> [GPU id per bundle] (ray.get_gpu_ids() on it)

    def devices(self):
        return sum(p.devices for p in self.pools)

    def create(self, timeout_s=60, locate=True):
        """One Ray placement group per pool (PACK: a pool's bundles on as few nodes as possible);
        waits until all are placed. Ray must be initialised. `locate`: one tiny task per bundle
        reads its GPU id (Ray reserves a bundle's GPU when the group is placed)."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        self.groups = [placement_group([{"GPU": 1}] * p.devices, strategy="PACK", name=f"rlhfkern:{p.name}:{self.run_id}")
                       for p in self.pools]
        ray.get([g.ready() for g in self.groups], timeout=timeout_s)
        self.nodes = [[placement_group_table(g)["bundles_to_node_id"][b] for b in range(p.devices)]
                      for g, p in zip(self.groups, self.pools)]
        if locate:
            probe = ray.remote(num_cpus=0)(_gpu_ids)
            refs = [[probe.options(num_gpus=1e-4, scheduling_strategy=self._strategy(i, b)).remote()
                     for b in range(p.devices)] for i, p in enumerate(self.pools)]
            self.gpus = [[",".join(map(str, ids)) for ids in ray.get(r, timeout=timeout_s)] for r in refs]
        return self

    def _strategy(self, pool, bundle):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.groups[pool],
                                                placement_group_bundle_index=bundle)

    def where(self, model, rank):
        """(node id, GPU id) of a rank's bundle; '?' for what is not known yet."""
        slot = self.slots[model][rank]
        node = self.nodes[slot.pool][slot.bundle] if self.nodes else "?"
        gpu = self.gpus[slot.pool][slot.bundle] if self.gpus else "?"
        return node, gpu

    def worker_options(self, worker):
        """Ray .options(...) for worker `worker` (an index into self.workers): its bundle, the
        bundle's GPU."""
        w = self.workers[worker]
        return {"num_gpus": 1, "num_cpus": 0, "scheduling_strategy": self._strategy(w.pool, w.bundle)}

    def remove(self):
        if self.groups:
            from ray.util.placement_group import remove_placement_group

            for g in self.groups:
                remove_placement_group(g)
        self.groups = self.nodes = self.gpus = None

    def report(self, memory=None):
        """The plan as text: pools -> models -> ranks -> bundle/node/GPU, the phase schedule of one
        step (with offload/onload moves), and the peak memory per device and phase (`memory`:
        a memory.MemoryReport, estimated from the config when None)."""
        cfg, memory = self.cfg, memory or estimate(self.cfg)
        p = cfg.placement
        offload = ("on: colocated models leave the GPU between their phases" if memory.offloaded
                   else f"off ({'placement.offload: false' if not p.offload else memory.device + ' tensors stay put'})")
        lines = [f"placement: {self.devices()} of {p.nodes * p.devices_per_node} devices "
                 f"({p.nodes} node(s) x {p.devices_per_node}); "
                 f"tensors on {memory.device}; offload {offload}"]
        for i, pool in enumerate(self.pools):
            kind = "colocated: one process per device, models in turn" if len(pool.models) > 1 else "separate"
            lines.append(f"  pool {i} {pool.name}: {pool.devices} device(s), {kind}")
            width = max(map(len, pool.models))
            for name in pool.models:
                lines.append(f"    {name}: {_backend_text(cfg, name)}")
                for slot in self.slots[name]:
                    node, gpu = self.where(name, slot.rank)
                    lines.append(f"    {name:<{width}}  rank {slot.rank}  bundle {slot.bundle}  "
                                 f"node {node[:8]}  gpu {gpu}")
        lines += ["", f"step ({memory.seq} tokens per sequence; sequences per rank in brackets):"]
        lines += _schedule_lines(cfg, memory)
        lines += ["", *_memory_lines(memory)]
        lines += ["", "weight sync each step (policy -> rollout, rlhfkern.reshard; lower bound: the bytes a rank "
                  "must receive that its process does not hold):", "  " + _sync_layouts(cfg),
                  "  " + sync_plan(cfg).summary()]
        lines += self._pull_lines()
        return "\n".join(lines)

    def _pull_lines(self):
        """Colocated or into vLLM the engine does not run the plan's processes (loop._sync): each
        rollout replica's leader fetches the whole shards of the policy ranks feeding its
        replica that live in other workers, applies the plan in its process, and (vLLM tp > 1)
        hands vLLM's tp worker processes the replica's tp shards in one collective_rpc (one
        payload with every shard, broadcast to the workers). Those bytes, per leader."""
        cfg = self.cfg
        rc = cfg.model("rollout")
        if not (cfg.colocated("policy", "rollout") or rc.backend == "vllm"):
            return []
        plan = sync_plan(cfg)
        size = torch.empty((), dtype=plan.dtype).element_size()
        shard = lambda params: sum(math.prod(p.shape) for p in params.values()) * size  # noqa: E731
        worker = {n: [s.worker for s in self.slots[n]] for n in ("policy", "rollout")}
        handed = ", then hands the replica's shards to vLLM's tp workers" if rc.tp > 1 else ""
        lines = ["  as the engine moves them (colocated or vLLM: each replica's leader pulls the whole shards "
                 f"of the policy ranks in other workers{handed}):"]
        for lead in range(0, rc.world, rc.tp):
            replica = range(lead, lead + rc.tp)
            sources = sorted({t.src_rank for t in plan.transfers for r, _, _ in t.dsts if r in replica})
            remote = [s for s in sources if worker["policy"][s] != worker["rollout"][lead]]
            pulled = sum(shard(plan.src_params[s]) for s in remote)
            text = (f"  rollout rank {lead}" + (f" (leader of ranks {lead}-{lead + rc.tp - 1})" if rc.tp > 1 else "")
                    + f": pulls {pulled / 2**20:.2f} MiB from policy rank(s) {', '.join(map(str, remote)) or '-'}")
            if rc.tp > 1:
                sent = sum(shard(plan.dst_params[r]) for r in replica)
                text += f"; hands {sent / 2**20:.2f} MiB ({rc.tp} shards) to its {rc.tp} vLLM tp workers"
            lines.append(text)
        return lines


def _backend_text(cfg, name):
    """'backend vllm, tp 2, pp 1, dp 1: ...' of model `name`, the backend's ranks in words."""
    mc = cfg.model(name)
    what = {"hf": "transformers, torch DDP over dp",
            "megatron": "megatron-core GPTModel, tp x pp shards (rlhfkern.reshard.MegatronLayout)",
            "vllm": f"one vLLM engine per dp replica on its first rank, {mc.tp} tp worker(s) "
                    f"(rlhfkern.reshard.VLLMLayout)"}[mc.backend]
    return f"backend {mc.backend}, tp {mc.tp}, pp {mc.pp}, dp {mc.dp}: {what}"


def _sync_layouts(cfg):
    """The two sides of the weight sync: 'policy megatron tp 2 x dp 1 -> rollout vllm tp 2 x dp 1 ...'."""
    from ..reshard import MegatronLayout, ModelSpec, VLLMLayout

    spec = ModelSpec.from_hf_config(cfg.hf_config("policy"))
    sides = []
    for name in ("policy", "rollout"):
        mc = cfg.model(name)
        text = f"{name} {mc.backend} tp {mc.tp}" + (f" pp {mc.pp}" if mc.pp > 1 else "") + f" x dp {mc.dp}"
        if mc.backend in ("megatron", "vllm"):
            layout = MegatronLayout(spec, mc.tp, mc.pp) if mc.backend == "megatron" else VLLMLayout(spec, mc.tp)
            text += f" (vocabulary {spec.vocab} padded to {layout.padded_vocab})"
        sides.append(text)
    colocated = "colocated" if cfg.colocated("policy", "rollout") else "separate devices"
    return f"{sides[0]} -> {sides[1]}, {colocated}; {cfg.models.policy.dtype}"


def _schedule_lines(cfg, memory):
    phases = list(memory.schedule)
    rules = [n for n, r in cfg.models.rewards.items() if r.kind == "rule"]
    lines = []
    for k, phase in enumerate(("generate", "reward", "logprobs", "values", "train", "sync")):
        running = memory.schedule.get(phase, [])
        what = ", ".join(f"{n} [{memory.batch[phase][n]}]" for n in running)
        if phase == "sync":
            what = "policy -> rollout weights"
        if phase == "reward" and rules:
            what = ", ".join(filter(None, [what, "rules " + ", ".join(rules) + " (host)"]))
        if not what:
            continue
        moves = ""
        if phase in memory.schedule and memory.offloaded:
            i = phases.index(phase)
            prev, nxt = set(memory.schedule[phases[i - 1]]), set(memory.schedule[phases[(i + 1) % len(phases)]])
            on = [n for n in running if n in memory.offloaded and n not in prev]
            off = [n for n in running if n in memory.offloaded and n not in nxt]
            moves = "".join([f"; onload {', '.join(on)}" if on else "",
                             f"; offload after: {', '.join(off)}" if off else ""])
        lines.append(f"  {phase:<9} {what}{moves}")
    if cfg.rollout.off_policy_steps and not any(len(p.models) > 1 for p in cfg.pools()):
        lines.append("  (off_policy_steps 1: the next batch is generated while this one trains)")
    return lines


def _memory_lines(memory):
    phases = list(memory.schedule)
    top_dev, top_phase, top = memory.peak()
    head = ["device", *phases, "biggest at the device's peak"]
    rows = []
    for d in memory.devices:
        cells = [fmt_bytes(d.total(ph)) + ("*" if d is top_dev and ph == top_phase else "") for ph in phases]
        phase, _ = d.peak()
        (model, part), size = d.biggest(phase)
        rows.append([d.name, *cells, f"{phase}: {model} {part} {fmt_bytes(size)}"])
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    fmt = lambda r: "  " + "  ".join(x.ljust(w) if c in (0, len(r) - 1) else x.rjust(w)
                                      for c, (x, w) in enumerate(zip(r, widths))).rstrip()
    limit = memory.device_memory
    verdict = "fits" if top <= limit else "DOES NOT FIT"
    parts = sorted(top_dev.phases[top_phase].items(), key=lambda kv: -kv[1])
    terms = [f"{m} {c} {fmt_bytes(b)}" for (m, c), b in parts[:3]]
    if parts[3:]:
        terms.append(f"{len(parts) - 3} more {fmt_bytes(sum(b for _, b in parts[3:]))}")
    return [f"estimated peak memory per device and phase (* = the max; device memory {fmt_bytes(limit)}):",
            fmt(head), *map(fmt, rows),
            f"{verdict}: max {fmt_bytes(top)} on {top_dev.name} in {top_phase} = " + " + ".join(terms)]


def sync_plan(cfg):
    """The rlhfkern.reshard plan of every policy -> rollout weight sync: from the trainer's layout
    (HF, or megatron's tp x pp shards; dp replicas) to the rollout's (HF, or vLLM's tp shards; its
    dp replicas),
    computed once; colocated when the two share a colocation group."""
    import torch

    from ..reshard import HFLayout, MegatronLayout, ModelSpec, ReplicatedLayout, VLLMLayout, plan_reshard

    spec = ModelSpec.from_hf_config(cfg.hf_config("policy"))
    p, r = cfg.models.policy, cfg.model("rollout")
    src = MegatronLayout(spec, p.tp, p.pp) if p.backend == "megatron" else HFLayout(spec)
    dst = VLLMLayout(spec, r.tp) if r.backend == "vllm" else HFLayout(spec)
    return plan_reshard(ReplicatedLayout(src, p.dp), ReplicatedLayout(dst, r.dp),
                        colocated=cfg.colocated("policy", "rollout"), dtype=getattr(torch, p.dtype))


def plan_text(cfg, memory=None):
    """What `rlhfkern plan` prints: the plan of `cfg` without Ray (node and GPU: '?'). Call
    check_memory(memory.estimate(cfg)) to refuse a plan that does not fit."""
    return Placement(cfg).report(memory)


def _gpu_ids():
    import ray

    return ray.get_gpu_ids()
