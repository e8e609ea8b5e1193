"""Weight-sync benchmarks: a ~0.9B-parameter Qwen2-shaped model (random bf16 weights), Megatron
tp 2 -> vLLM tp 4 and tp 4 -> tp 2, every rank its own process over gloo on this machine.
rlhfkern's planned resharding against what frameworks do today (every full tensor gathered and
sent to every inference rank, which slices its part), in the same run: time per sync, and the
bytes each destination receives against the least it must."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhfkern.reshard import MegatronLayout, ModelSpec, Resharder, VLLMLayout, plan_reshard

SPEC = ModelSpec(hidden=2048, heads=16, kv_heads=4, head_dim=128, ffn=5632, vocab=32000, layers=16, qkv_bias=True)
CASES = [(2, 4), (4, 2)]
BUCKET = 64 << 20


def _full_tensor_sync(plan, src_shards, dst_tensors, me):
    """The baseline: for every HF tensor, the source rank holding its first piece assembles it
    (its tp peers send their pieces: the all-gather) and sends it whole to every destination."""
    src, dst = plan.src, plan.dst
    shapes = SPEC.hf_shapes()
    for hf, shape in shapes.items():
        holders = [(r, n, pc) for r in range(src.world) for n, p in src.params(r).items() for pc in p.pieces if pc.hf == hf]
        root = holders[0][0]
        full = torch.empty(shape, dtype=plan.dtype) if me == root or me >= src.world else None
        for r, n, pc in holders:  # gather to the root
            if r == root and me == root:
                full.narrow(pc.axis, pc.start, pc.stop - pc.start).copy_(
                    src_shards[n].narrow(pc.axis, pc.offset, pc.stop - pc.start))
            elif me == r:
                dist.send(src_shards[n].narrow(pc.axis, pc.offset, pc.stop - pc.start).contiguous(), root)
            elif me == root:
                part = torch.empty_like(full.narrow(pc.axis, pc.start, pc.stop - pc.start))
                dist.recv(part, r)
                full.narrow(pc.axis, pc.start, pc.stop - pc.start).copy_(part)
        for d in range(dst.world):  # the whole tensor to every destination, which slices its part
            if me == root:
                dist.send(full, src.world + d)
            elif me == src.world + d:
                dist.recv(full, root)
                for n, p in dst.params(d).items():
                    for pc in p.pieces:
                        if pc.hf == hf:
                            dst_tensors[n].narrow(pc.axis, pc.offset, pc.stop - pc.start).copy_(
                                full.narrow(pc.axis, pc.start, pc.stop - pc.start))


def _worker(me, world, a, c, init_file, commands, done):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=me, world_size=world)
    torch.set_num_threads(1)
    src, dst = MegatronLayout(SPEC, a, 1), VLLMLayout(SPEC, c)
    plan = plan_reshard(src, dst, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(me)
    src_shards = ({n: torch.randn(p.shape, generator=g).to(torch.bfloat16) for n, p in src.params(me).items()}
                  if me < a else {})
    dst_tensors = ({n: torch.empty(p.shape, dtype=torch.bfloat16) for n, p in dst.params(me - a).items()}
                   if me >= a else {})
    resharder = Resharder(plan, bucket_bytes=BUCKET)
    while True:
        cmd = commands[me].get()
        if cmd == "stop":
            break
        if cmd == "reshard":
            resharder.run({me: src_shards} if me < a else {}, {me - a: dst_tensors} if me >= a else {})
        else:
            _full_tensor_sync(plan, src_shards, dst_tensors, me)
        dist.barrier()
        done.put(me)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"megatron-tp{p[0]}-to-vllm-tp{p[1]}")
def processes(request, tmp_path_factory):
    a, c = request.param
    ctx = mp.get_context("spawn")
    world = a + c
    commands = [ctx.SimpleQueue() for _ in range(world)]
    done = ctx.SimpleQueue()
    init = str(tmp_path_factory.mktemp("reshard") / "init")
    procs = [ctx.Process(target=_worker, args=(i, world, a, c, init, commands, done)) for i in range(world)]
    for p in procs:
        p.start()

    def run(cmd):
        for q in commands:
            q.put(cmd)
        for _ in range(world):
            done.get()

    yield (a, c), run
    for q in commands:
        q.put("stop")
    for p in procs:
        p.join(timeout=60)


@pytest.mark.parametrize("mode", ["full-tensor", "reshard"])
def bench_weight_sync(benchmark, processes, mode):
    (a, c), run = processes
    plan = plan_reshard(MegatronLayout(SPEC, a, 1), VLLMLayout(SPEC, c), dtype=torch.bfloat16)
    st = plan.stats()
    received = st["broadcast_bytes"] if mode == "full-tensor" else st["bytes_received"]
    per_dst = max(received.values())
    lower = max(st["lower_bound"].values())
    benchmark.group = f"weight sync ~0.9B bf16 megatron tp{a} -> vllm tp{c} (gloo, {a + c} processes)"
    label = ("full tensors to every rank (today's frameworks)" if mode == "full-tensor" else "rlhfkern planned reshard") + \
        f": {per_dst / 2**20:.0f} MiB per destination, lower bound {lower / 2**20:.0f} MiB"
    benchmark.extra_info.update(inner=1, label=label, role="baseline" if mode == "full-tensor" else "op")
    benchmark.pedantic(run, args=("baseline" if mode == "full-tensor" else "reshard",), rounds=2, iterations=1,
                       warmup_rounds=1)
