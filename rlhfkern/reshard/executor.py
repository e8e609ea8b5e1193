"""Running a plan over torch.distributed: each destination receives exactly its shard, in buckets.

Every process builds the same plan and calls `Resharder(plan).run(src_tensors, dst_tensors)`
with the parameters it holds (source rank r is process r of the group; destination rank i is
process i when colocated, else src.world + i). Messages between a pair of processes are packed
into buckets of at most `bucket_bytes` (a segment longer than a bucket is split along its axis,
never refused); buckets go in rounds where each process sends at most one and receives at most
one, so no process holds more than two buckets of extra memory. Bytes already on the receiving
process are copied, never sent; padding is zero-filled at the destination.
"""

import collections
import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class _Segment:
    src_name: str
    dst_name: str
    axis: int
    src_offset: int
    dst_offset: int
    length: int
    per_index: int


def _compiled(tensor):
    """The C++ pack/unpack of rlhfkern._C serves CPU tensors; on GPUs torch.cat's batched copy
    packs and torch._foreach_copy_ (one multi-tensor launch) unpacks."""
    from .. import _dispatch

    return tensor.device.type == "cpu" and _dispatch.extension() is not None


def _check_buffer(segments, buffer):
    if buffer.dim() != 1 or buffer.numel() != sum(s.numel() for s in segments):
        raise ValueError(f"the buffer must be flat with one element per segment element, got {tuple(buffer.shape)}")


def pack(segments, out):
    """The segments' elements, one after the other, into the flat `out` (one call per bucket)."""
    _check_buffer(segments, out)
    if _compiled(out):
        torch.ops.rlhfkern.pack_segments(segments, out)
    else:
        torch.cat([s.reshape(-1) for s in segments], out=out)


def unpack(buffer, segments):
    """The inverse of `pack`: writes into the segments (views of the live tensors) in place."""
    _check_buffer(segments, buffer)
    if _compiled(buffer):
        torch.ops.rlhfkern.unpack_segments(buffer, segments)
    else:
        parts = buffer.split([s.numel() for s in segments])
        torch._foreach_copy_(list(segments), [p.view(s.shape) for p, s in zip(parts, segments)])


def checksum(buffer):
    """A position-weighted sum of the buffer's raw bits (int64, wrapping): any changed, lost or
    swapped element changes it (barring a 2^-64 coincidence)."""
    words = buffer.view(torch.uint8 if buffer.element_size() == 1 else
                        {2: torch.int16, 4: torch.int32, 8: torch.int64}[buffer.element_size()]).to(torch.int64)
    weights = torch.arange(1, words.numel() + 1, dtype=torch.int64, device=words.device) * 0x9E3779B1
    return torch.stack([(words * weights).sum(), words.sum()])


class Resharder:
    def __init__(self, plan, *, bucket_bytes=64 << 20, group=None, checksums=False):
        """checksums: every bucket travels with a checksum of its bytes, recomputed on arrival; a
        mismatch raises (corruption in transit) before anything is written."""
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.plan, self.bucket_bytes, self.group, self.checksums = plan, int(bucket_bytes), group, checksums
        self.itemsize = torch.empty((), dtype=plan.dtype).element_size()
        self.local, self.rounds = self._schedule()
        self.peak_buffer_bytes = 0  # the most bucket memory one run held at once, on this process

    def _schedule(self):
        """(local copies {process: [(src_rank, dst_rank, segment)]}, rounds of bucket messages)."""
        plan = self.plan
        pairs = collections.defaultdict(list)  # (sender, receiver) -> [(src_rank, dst_rank, segment)]
        local = collections.defaultdict(list)
        for t in plan.transfers:
            for r, name, off in t.dsts:
                seg = _Segment(t.src_name, name, t.axis, t.src_offset, off, t.length, t.per_index)
                sender, receiver = plan.src_process(t.src_rank), plan.dst_process(r)
                (local[sender] if sender == receiver else pairs[(sender, receiver)]).append((t.src_rank, r, seg))
        per_bucket = max(1, self.bucket_bytes // self.itemsize)
        messages = []  # (sender, receiver, [(src_rank, dst_rank, segment)])
        for (sender, receiver), segs in sorted(pairs.items()):
            bucket, used = [], 0
            for src_rank, dst_rank, seg in segs:
                step = max(1, per_bucket // seg.per_index)  # indices per piece: a long segment is split
                for start in range(0, seg.length, step):
                    n = min(step, seg.length - start)
                    if bucket and used + n * seg.per_index > per_bucket:
                        messages.append((sender, receiver, bucket))
                        bucket, used = [], 0
                    bucket.append((src_rank, dst_rank, dataclasses.replace(
                        seg, src_offset=seg.src_offset + start, dst_offset=seg.dst_offset + start, length=n)))
                    used += n * seg.per_index
            if bucket:
                messages.append((sender, receiver, bucket))
        rounds = []  # greedy matching: a process sends at most one and receives at most one per round
        pending = messages
        while pending:
            senders, receivers, this, rest = set(), set(), [], []
            for m in pending:
                if m[0] in senders or m[1] in receivers:
                    rest.append(m)
                else:
                    senders.add(m[0]), receivers.add(m[1]), this.append(m)
            rounds.append(this)
            pending = rest
        return local, rounds

    def _process(self):
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def _peer(self, process):
        """The global rank of a process of the group (P2POp takes global ranks)."""
        return process if self.group is None else dist.get_global_rank(self.group, process)

    @staticmethod
    def _view(tensor, seg, offset):
        return tensor.narrow(seg.axis, offset, seg.length)

    def run(self, src_tensors=None, dst_tensors=None):
        """src_tensors {src_rank: {name: tensor}} and dst_tensors {dst_rank: {name: tensor}} held by
        this process (dst tensors are written in place: pass the live inference parameters)."""
        src_tensors, dst_tensors = src_tensors or {}, dst_tensors or {}
        me = self._process()
        for r, params in src_tensors.items():
            for name, t in params.items():
                if t.dtype != self.plan.dtype:
                    raise ValueError(f"source rank {r} {name} is {t.dtype}, the plan moves {self.plan.dtype}")
        self.plan.prepare_destinations(dst_tensors, self.plan.dtype)
        for src_rank, dst_rank, seg in self.local.get(me, []):
            self._view(dst_tensors[dst_rank][seg.dst_name], seg, seg.dst_offset).copy_(
                self._view(src_tensors[src_rank][seg.src_name], seg, seg.src_offset))
        like = next(iter(next(iter({**src_tensors, **dst_tensors}.values())).values()), None)
        device = like.device if like is not None else torch.device("cpu")
        for messages in self.rounds:
            ops, received, held = [], None, 0
            for sender, receiver, bucket in messages:
                n = sum(seg.length * seg.per_index for _, _, seg in bucket)
                if sender == me:
                    buf = torch.empty(n, dtype=self.plan.dtype, device=device)
                    pack([self._view(src_tensors[s][seg.src_name], seg, seg.src_offset) for s, _, seg in bucket], buf)
                    ops.append(dist.P2POp(dist.isend, buf, self._peer(receiver), group=self.group))
                    if self.checksums:
                        ops.append(dist.P2POp(dist.isend, checksum(buf), self._peer(receiver), group=self.group))
                    held += buf.numel() * self.itemsize
                if receiver == me:
                    buf = torch.empty(n, dtype=self.plan.dtype, device=device)
                    ops.append(dist.P2POp(dist.irecv, buf, self._peer(sender), group=self.group))
                    expected = torch.empty(2, dtype=torch.int64, device=device) if self.checksums else None
                    if self.checksums:
                        ops.append(dist.P2POp(dist.irecv, expected, self._peer(sender), group=self.group))
                    received = (sender, buf, bucket, expected)
                    held += n * self.itemsize
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)
            for request in dist.batch_isend_irecv(ops) if ops else []:  # grouped: safe with NCCL too
                request.wait()
            if received is not None:
                sender, buf, bucket, expected = received
                if expected is not None and not torch.equal(checksum(buf), expected):
                    raise RuntimeError(f"a bucket from process {sender} arrived corrupted (checksum mismatch)")
                unpack(buf, [self._view(dst_tensors[d][seg.dst_name], seg, seg.dst_offset) for _, d, seg in bucket])
        return dst_tensors
