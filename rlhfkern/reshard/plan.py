"""Resharding plans: which source bytes go to which destination, computed, not communicated.

`plan_reshard(src_layout, dst_layout)` covers every element of every destination shard with
exactly one source region: where several source ranks hold the same bytes (replicas), the one
that has sent least so far is chosen (colocated: the same process first, for free). A transfer
moves a contiguous range along the tensors' split axis (the other axis whole) from one source
parameter to one or more destinations that need exactly those bytes (multicast). Padding rows are
zero-filled at the destination, never sent.
"""

import collections
import dataclasses

import torch


@dataclasses.dataclass
class Transfer:
    src_rank: int
    src_name: str
    axis: int
    src_offset: int
    length: int
    hf: str
    hf_start: int
    per_index: int  # elements per index along the axis (the other axis whole)
    dsts: list      # of (dst_rank, dst_name, dst_offset)

    @property
    def elements(self):
        return self.length * self.per_index


def _per_index(shape, axis):
    n = 1
    for i, d in enumerate(shape):
        if i != axis:
            n *= d
    return n


class Plan:
    def __init__(self, src, dst, colocated, transfers, dtype, dst_params=None):
        self.src, self.dst, self.colocated, self.transfers, self.dtype = src, dst, colocated, transfers, dtype
        self.dst_params = dst_params or {r: dst.params(r) for r in range(dst.world)}
        self.src_params = {r: src.params(r) for r in range(src.world)}

    def prepare_destinations(self, dst_tensors, dtype=None):
        """Checks destination tensors {dst_rank: {name: tensor}} against the plan's shapes (and
        `dtype` when given) and zero-fills those with padding; the plan's transfers overwrite
        every real element afterwards."""
        for r, params in dst_tensors.items():
            for name, p in self.dst_params[r].items():
                t = params[name]
                if t.shape != torch.Size(p.shape) or (dtype is not None and t.dtype != dtype):
                    raise ValueError(f"destination rank {r} {name} is {tuple(t.shape)} {t.dtype}, "
                                     f"expected {p.shape}" + (f" {dtype}" if dtype is not None else ""))
                axis = p.pieces[0].axis if p.pieces else 0
                if sum(pc.stop - pc.start for pc in p.pieces) < p.shape[axis]:
                    t.zero_()

    def src_process(self, rank):
        return rank

    def dst_process(self, rank):
        return rank if self.colocated else self.src.world + rank

    def verify(self):
        """Every destination element covered exactly once by a transfer (padding never), every
        source read in bounds and from the same HF elements the destination expects."""
        shapes = self.src.spec.hf_shapes()
        cover = {(r, n): torch.zeros(p.shape[p.pieces[0].axis if p.pieces else 0], dtype=torch.int64)
                 for r, ps in self.dst_params.items() for n, p in ps.items()}
        for t in self.transfers:
            sp = self.src_params[t.src_rank][t.src_name]
            if t.src_offset < 0 or t.src_offset + t.length > sp.shape[t.axis]:
                raise AssertionError(f"read out of bounds: {t}")
            whole = len(sp.pieces) == 1 and sp.pieces[0].hf == t.hf and tuple(sp.shape) == tuple(shapes[t.hf])
            if not (whole and t.src_offset == t.hf_start) and not any(
                    pc.hf == t.hf and pc.axis == t.axis and pc.start <= t.hf_start
                    and t.hf_start + t.length <= pc.stop and pc.offset + t.hf_start - pc.start == t.src_offset
                    for pc in sp.pieces):
                raise AssertionError(f"source region is not {t.hf}[{t.hf_start}:+{t.length}]: {t}")
            for r, n, off in t.dsts:
                dp = self.dst_params[r][n]
                if not any(pc.hf == t.hf and pc.axis == t.axis and pc.start <= t.hf_start
                           and t.hf_start + t.length <= pc.stop and pc.offset + t.hf_start - pc.start == off
                           for pc in dp.pieces):
                    raise AssertionError(f"destination region is not {t.hf}[{t.hf_start}:+{t.length}]: {t}")
                cover[(r, n)][off:off + t.length] += 1
        for (r, n), c in cover.items():
            want = torch.zeros_like(c)
            for pc in self.dst_params[r][n].pieces:
                want[pc.offset:pc.offset + pc.stop - pc.start] = 1
            if not torch.equal(c, want):
                raise AssertionError(f"rank {r} {n}: coverage {c.tolist()} instead of {want.tolist()}")
        return True

    def stats(self):
        """{bytes_received, lower_bound, broadcast_bytes}: each {dst_rank: int}."""
        size = torch.empty((), dtype=self.dtype).element_size()
        shapes = self.dst.spec.hf_shapes()
        received = collections.Counter()
        for t in self.transfers:
            for r, _, _ in t.dsts:
                if self.src_process(t.src_rank) != self.dst_process(r):
                    received[r] += t.elements * size
        lower, broadcast = {}, {}
        for r, params in self.dst_params.items():
            here = self._held_by_process(self.dst_process(r))
            need, tensors = 0, set()
            for p in params.values():
                for pc in p.pieces:
                    per = _per_index(shapes[pc.hf], pc.axis)
                    need += (pc.stop - pc.start - _overlap(here.get((pc.hf, pc.axis), []), pc.start, pc.stop)) * per * size
                    tensors.add(pc.hf)
            lower[r] = need
            broadcast[r] = sum(_numel(shapes[h]) for h in tensors) * size
        return {"bytes_received": {r: received[r] for r in self.dst_params}, "lower_bound": lower,
                "broadcast_bytes": broadcast}

    def _held_by_process(self, process):
        """{(hf, axis): [(start, stop)]} of the source pieces living on `process`; a whole tensor
        (an HF layout's) holds every cut along every axis, as the planner uses it."""
        held = collections.defaultdict(list)
        shapes = self.src.spec.hf_shapes()
        for r, params in self.src_params.items():
            if self.src_process(r) == process:
                for p in params.values():
                    for pc in p.pieces:
                        held[(pc.hf, pc.axis)].append((pc.start, pc.stop))
                        if len(p.pieces) == 1 and tuple(p.shape) == tuple(shapes[pc.hf]):
                            for axis, size in enumerate(p.shape):
                                held[(pc.hf, axis)].append((0, size))
        return held

    def summary(self):
        st = self.stats()
        lines = [f"{type(self.src).__name__}(world {self.src.world}) -> {type(self.dst).__name__}(world {self.dst.world})"
                 f"{', colocated' if self.colocated else ''}: {len(self.transfers)} transfers"]
        for r in sorted(st["bytes_received"]):
            b, lb, bc = st["bytes_received"][r], st["lower_bound"][r], st["broadcast_bytes"][r]
            lines.append(f"  dst rank {r}: receives {b / 2**20:.2f} MiB (lower bound {lb / 2**20:.2f} MiB), "
                         f"a full-tensor broadcast sends {bc / 2**20:.2f} MiB" + (f" ({bc / b:.1f}x)" if b else ""))
        return "\n".join(lines)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _overlap(intervals, start, stop):
    """Elements of [start, stop) covered by the union of intervals."""
    covered, cur = 0, start
    for a, b in sorted(intervals):
        a, b = max(a, cur), min(b, stop)
        if b > a:
            covered += b - a
            cur = b
    return covered


def _along_sources(piece, index, shapes):
    """A destination piece that is a whole tensor (an HF layout's), re-cut along the axis its
    sources are split on when they are split on another one (megatron's row-parallel o_proj and
    down_proj, axis 1, into a whole HF tensor, described along axis 0): the same elements."""
    shape = shapes[piece.hf]
    whole = piece.start == 0 and piece.stop == shape[piece.axis] and piece.offset == 0
    if index.get((piece.hf, piece.axis)) or not whole:
        return piece
    for axis, size in enumerate(shape):
        if index.get((piece.hf, axis)):
            return dataclasses.replace(piece, axis=axis, start=0, stop=size)
    return piece


def plan_reshard(src_layout, dst_layout, *, colocated=False, dtype=torch.bfloat16):
    """The plan moving src_layout's shards into dst_layout's (pure computation). Processes: source
    rank r is process r; destination rank i is process src.world + i, or process i when
    colocated (processes past the source world then hold a destination rank only)."""
    if src_layout.spec != dst_layout.spec:
        raise ValueError("source and destination layouts describe different models")
    shapes = src_layout.spec.hf_shapes()
    index = collections.defaultdict(list)  # (hf, axis) -> [(src_rank, name, piece)]
    for r in range(src_layout.world):
        for name, p in src_layout.params(r).items():
            for pc in p.pieces:
                index[(pc.hf, pc.axis)].append((r, name, pc))
                if len(p.pieces) == 1 and tuple(p.shape) == tuple(shapes[pc.hf]):  # a whole tensor (HF's) serves
                    for axis, size in enumerate(p.shape):                    # a cut along any axis
                        if axis != pc.axis:
                            index[(pc.hf, axis)].append((r, name, dataclasses.replace(pc, axis=axis, start=0, stop=size)))
    sent = collections.Counter()  # elements sent per source rank
    groups = {}  # (src_rank, name, src_offset, length) -> Transfer
    dst_params = {r: {name: dataclasses.replace(p, pieces=[_along_sources(pc, index, shapes) for pc in p.pieces])
                      for name, p in dst_layout.params(r).items()} for r in range(dst_layout.world)}
    for dr, params in dst_params.items():
        for dname, dp in params.items():
            for dpc in dp.pieces:
                cands = [(r, n, pc) for r, n, pc in index[(dpc.hf, dpc.axis)] if pc.start < dpc.stop and dpc.start < pc.stop]
                cuts = sorted({dpc.start, dpc.stop} | {max(pc.start, dpc.start) for _, _, pc in cands}
                              | {min(pc.stop, dpc.stop) for _, _, pc in cands})
                per = _per_index(shapes[dpc.hf], dpc.axis)
                segments = []  # (src_rank, name, src_piece, a, b), merged when contiguous
                for a, b in zip(cuts, cuts[1:]):
                    cover = [(r, n, pc) for r, n, pc in cands if pc.start <= a and b <= pc.stop]
                    if not cover:
                        raise ValueError(f"{dpc.hf}[{a}:{b}] is not held by any source rank")
                    local = [c for c in cover if colocated and c[0] == dr]
                    r, n, pc = local[0] if local else min(cover, key=lambda c: (sent[c[0]], c[0]))
                    if not local:
                        sent[r] += (b - a) * per
                    if segments and segments[-1][:3] == (r, n, pc) and segments[-1][4] == a:
                        segments[-1] = (r, n, pc, segments[-1][3], b)
                    else:
                        segments.append((r, n, pc, a, b))
                for r, n, pc, a, b in segments:
                    key = (r, n, pc.offset + a - pc.start, b - a)
                    if key not in groups:
                        groups[key] = Transfer(r, n, dpc.axis, key[2], b - a, dpc.hf, a, per, [])
                    groups[key].dsts.append((dr, dname, dpc.offset + a - dpc.start))
    return Plan(src_layout, dst_layout, colocated, list(groups.values()), dtype, dst_params)


def apply(plan, src_shards, out=None):
    """Runs a plan in one process: {rank: {name: tensor}} of the source layout -> the destination's.
    With `out` ({dst_rank: {name: tensor}}, e.g. a live model's parameters), only those
    destination ranks are written, in place (padding zeroed); src_shards then needs only the
    source ranks that feed them."""
    like = next(iter(next(iter(src_shards.values())).values()))
    if out is None:
        out = {r: {n: torch.zeros(p.shape, dtype=like.dtype, device=like.device) for n, p in ps.items()}
               for r, ps in plan.dst_params.items()}
    else:
        plan.prepare_destinations(out)
    for t in plan.transfers:
        dsts = [(r, n, off) for r, n, off in t.dsts if r in out]
        if not dsts:
            continue
        piece = src_shards[t.src_rank][t.src_name].narrow(t.axis, t.src_offset, t.length)
        for r, n, off in dsts:
            out[r][n].narrow(t.axis, off, t.length).copy_(piece)
    return out
