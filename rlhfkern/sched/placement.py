"""Models -> Ray placement groups and bundles.

A pool is a set of devices: one per colocation group (its models share the same bundles and
time-share them, each rank asking for 1/k of a GPU when k models share a bundle), one per model
outside any group. Rank r of a model lives on bundle r of its pool. One bundle = one device
(a Ray GPU: a real one, or a logical one from `ray.init(num_gpus=N)` on a machine without GPUs).
"""

import dataclasses


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
    gpu_fraction: float


class Placement:
    """The plan of where every rank runs (pure), and its placement groups once `create`d."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.pools = cfg.pools()
        self.slots = {}  # model -> [Slot per rank]
        for i, pool in enumerate(self.pools):
            for name in pool.models:
                share = sum(1 for n in pool.models)  # every member may sit on bundle 0
                self.slots[name] = [Slot(name, r, i, r, 1.0 / share) for r in range(cfg.model(name).world)]
        self.groups = None     # Ray placement groups, one per pool
        self.nodes = None      # pool -> [node id per bundle]

    def devices(self):
        return sum(p.devices for p in self.pools)

    def create(self, timeout_s=60):
        """One Ray placement group per pool (PACK: a pool's bundles on as few nodes as possible);
        waits until all are placed. Ray must be initialised."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        self.groups = [placement_group([{"GPU": 1}] * p.devices, strategy="PACK", name=f"rlhfkern:{p.name}")
                       for p in self.pools]
        ray.get([g.ready() for g in self.groups], timeout=timeout_s)
        self.nodes = [[placement_group_table(g)["bundles_to_node_id"][b] for b in range(p.devices)]
                      for g, p in zip(self.groups, self.pools)]
        return self

    def actor_options(self, model, rank):
        """Ray .options(...) for rank `rank` of `model`: its bundle, its share of the GPU."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        slot = self.slots[model][rank]
        return {"num_gpus": slot.gpu_fraction, "num_cpus": 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.groups[slot.pool], placement_group_bundle_index=slot.bundle)}

    def remove(self):
        if self.groups:
            from ray.util.placement_group import remove_placement_group

            for g in self.groups:
                remove_placement_group(g)
        self.groups = None
