"""Log-prob family: log-probabilities of chosen tokens and the entropy, from logits, memory-lean.

For a row of logits x (V entries) at temperature T, z = x / T:

    lse        = log sum_v exp(z_v)                   (online over vocabulary tiles)
    logprob_k  = z[label_k] - lse                     (label -100: 0; any other label outside [0, V): nan)
    H          = lse - E_p[z],  p = softmax(z)        (terms with z = -inf count 0)
    d x_v      = (sum_k g_k [v = label_k] - G p_v - g_H p_v (z_v - E_p[z])) / T,   G = sum over valid k

Outputs are float32 (float64 for float64 logits) whatever the logits dtype; no [N, V] float32
intermediate is ever made: the forward keeps (lse, E_p[z]) per row and the backward recomputes p
from the logits. With `inplace_backward=True` the gradient is written into the logits buffer
(its version counter is bumped, so a later use of the old values in autograd is caught).
Each row is reduced on its own in a fixed order: a token's results do not depend on the batch.
"""

import numbers

import torch

from .. import _dispatch
from ._common import acc_dtype, rows2d

IGNORE_INDEX = -100
OP_BACKENDS = ("torch", "cpu", "triton")


# ----------------------------------------------------------------------------- reference (spec)
def logprobs_reference(logits, labels, temperature=1.0, return_entropy=False):
    """The spec, by composition: labels [...] (one per position) or [..., K]."""
    squeeze = labels.dim() == logits.dim() - 1
    lab = labels.unsqueeze(-1) if squeeze else labels
    z = logits.to(acc_dtype(logits)) / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    V = z.shape[-1]
    valid = (lab >= 0) & (lab < V)
    picked = torch.gather(z, -1, torch.where(valid, lab, 0)) - lse
    nan = torch.full_like(picked, float("nan"))
    lp = torch.where(lab == IGNORE_INDEX, torch.zeros_like(picked), torch.where(valid, picked, nan))
    lp = lp.squeeze(-1) if squeeze else lp
    if not return_entropy:
        return lp
    p = torch.exp(z - lse)
    finite_z = torch.where(z == float("-inf"), torch.zeros_like(z), z)
    entropy = lse.squeeze(-1) - (p * finite_z).sum(-1)
    return lp, entropy


# ----------------------------------------------------------------------------- kernels
def _kernels(backend):
    if backend == "triton":
        from ..triton_kernels import logprob as k

        def bwd(g, ge, logits, labels, stats, t, g_sum):
            return k.logprobs_bwd_into(g, ge, logits, labels, stats, t, torch.empty_like(logits), g_sum)

        def bwd_(g, ge, logits, labels, stats, t, g_sum):
            k.logprobs_bwd_into(g, ge, logits, labels, stats, t, logits, g_sum)

        return k.logprobs_fwd, bwd, bwd_
    ops = torch.ops.rlhfkern
    return ops.logprobs_fwd, ops.logprobs_bwd, ops.logprobs_bwd_


@torch.library.custom_op("rlhfkern::logprobs", mutates_args=())
def _logprobs_op(logits: torch.Tensor, labels: torch.Tensor, temperature: float, entropy: bool,
                 inplace_backward: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs [N, K], entropy [N] or [0], stats [N, 2] = (lse, E_p[z]))."""
    return _kernels(backend)[0](logits, labels, temperature, entropy)


@_logprobs_op.register_fake
def _(logits, labels, temperature, entropy, inplace_backward, backend):
    acc = acc_dtype(logits)
    N = logits.shape[0]
    return (logits.new_empty(labels.shape, dtype=acc), logits.new_empty((N if entropy else 0,), dtype=acc),
            logits.new_empty((N, 2), dtype=acc))


@torch.library.custom_op("rlhfkern::logprobs_backward", mutates_args=())
def _logprobs_backward_op(grad_lp: torch.Tensor, grad_ent: torch.Tensor | None, logits: torch.Tensor,
                          labels: torch.Tensor, stats: torch.Tensor, temperature: float, g_sum: torch.Tensor | None,
                          backend: str) -> torch.Tensor:
    return _kernels(backend)[1](grad_lp, grad_ent, logits, labels, stats, temperature, g_sum)


@_logprobs_backward_op.register_fake
def _(grad_lp, grad_ent, logits, labels, stats, temperature, g_sum, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("rlhfkern::logprobs_backward_", mutates_args=("logits",))
def _logprobs_backward_inplace_op(grad_lp: torch.Tensor, grad_ent: torch.Tensor | None, logits: torch.Tensor,
                                  labels: torch.Tensor, stats: torch.Tensor, temperature: float,
                                  g_sum: torch.Tensor | None, backend: str) -> None:
    """d logits written over the logits."""
    _kernels(backend)[2](grad_lp, grad_ent, logits, labels, stats, temperature, g_sum)


@_logprobs_backward_inplace_op.register_fake
def _(grad_lp, grad_ent, logits, labels, stats, temperature, g_sum, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, entropy, inplace_backward, backend = inputs
    ctx.save_for_backward(logits, labels, output[2])
    ctx.args = (temperature, inplace_backward, backend)
    ctx.direct = False


def _backward(ctx, grad_lp, grad_ent, grad_stats=None):
    logits, labels, stats = ctx.saved_tensors
    temperature, inplace_backward, backend = ctx.args
    acc = stats.dtype
    grad_lp = torch.zeros(labels.shape, dtype=acc, device=logits.device) if grad_lp is None else grad_lp.to(acc)
    grad_ent = None if grad_ent is None or grad_ent.numel() == 0 else grad_ent.to(acc)
    if inplace_backward:  # the dispatcher bumps the version of the mutated logits
        _logprobs_backward_inplace_op(grad_lp, grad_ent, logits, labels, stats, temperature, None, backend)
        return logits, None, None, None, None, None
    if ctx.direct:
        grad = _kernels(backend)[1](grad_lp, grad_ent, logits, labels, stats, temperature, None)
    else:
        grad = _logprobs_backward_op(grad_lp, grad_ent, logits, labels, stats, temperature, None, backend)
    return grad, None, None, None, None, None


torch.library.register_autograd("rlhfkern::logprobs", _backward, setup_context=_setup_context)


class _DirectLogprobs(torch.autograd.Function):
    """rlhfkern::logprobs in eager mode: the same kernels, context and backward (_backward), called
    directly rather than through the custom op's Python dispatch, which costs about 0.2 ms a
    forward + backward: as long as the kernels themselves at [4096, 40]. torch.compile traces
    the custom op instead (logprobs)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, entropy, inplace_backward, backend):
        out = _kernels(backend)[0](logits, labels, temperature, entropy)
        _setup_context(ctx, (logits, labels, temperature, entropy, inplace_backward, backend), out)
        ctx.direct = True
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        return _backward(ctx, grad_lp, grad_ent)


# ----------------------------------------------------------------------------- vocab-parallel
class _VocabParallelLogprobs(torch.autograd.Function):
    """Rank r of the group holds the vocabulary shard [r Vs, (r + 1) Vs) of every row. Each rank
    reduces its shard with the kernels (lse_r, E_r[z], its labels' logits); then two collectives
    make the row's: an all-reduce MAX of lse_r, and one all-reduce SUM of the packed
    (exp(lse_r - M), exp(lse_r - M) E_r[z], label logits). The backward needs no collective: each
    rank writes the gradient of its own shard, with the row's statistics."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, inplace_backward, backend, group):
        import torch.distributed as dist

        shard = logits.shape[1]
        local = labels - dist.get_rank(group) * shard
        owned = (local >= 0) & (local < shard)
        local = torch.where(owned, local, IGNORE_INDEX)
        _, _, stats = _kernels(backend)[0](logits, local, temperature, False)
        lse_r, ez_r = stats[:, 0], stats[:, 1]
        m = lse_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        mass = torch.where(lse_r == float("-inf"), 0.0, torch.exp(lse_r - m))  # this shard's share of the row
        picked = torch.gather(logits, 1, torch.where(owned, local, 0)).to(stats.dtype) / temperature
        packed = torch.cat([mass[:, None], torch.where(mass == 0, 0.0, mass * ez_r)[:, None],
                            torch.where(owned, picked, 0.0)], 1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        lse = m + torch.log(packed[:, 0])
        ez = packed[:, 1] / packed[:, 0]
        valid = (labels >= 0) & (labels < shard * dist.get_world_size(group))
        nan = torch.full_like(picked, float("nan"))
        lp = torch.where(labels == IGNORE_INDEX, 0.0, torch.where(valid, packed[:, 2:] - lse[:, None], nan))
        ctx.save_for_backward(logits, local, torch.stack([lse, ez], 1), valid)
        ctx.args = (temperature, inplace_backward, backend)
        return lp, lse - ez

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, local, stats, valid = ctx.saved_tensors
        temperature, inplace_backward, backend = ctx.args
        grad_lp = torch.zeros_like(stats[:, :1].expand(local.shape)) if grad_lp is None else grad_lp.to(stats.dtype)
        g_sum = (grad_lp * valid).sum(1)  # the whole row's, not only this shard's labels
        grad_ent = None if grad_ent is None else grad_ent.to(stats.dtype)
        if inplace_backward:
            _logprobs_backward_inplace_op(grad_lp, grad_ent, logits, local, stats, temperature, g_sum, backend)
            grad = logits
        else:
            grad = _logprobs_backward_op(grad_lp, grad_ent, logits, local, stats, temperature, g_sum, backend)
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------- public op
def _check(logits, labels, temperature, world=1):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor [..., V], got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[:-1], logits.shape[-1] * world, logits.device, "logits")
    _check_temperature(temperature)


def _check_labels(labels, lead, vocab, device, against):
    """labels [*lead] or [*lead, K], integer, on `device`; ids in [0, vocab) or -100."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if not (labels.shape == lead or (labels.dim() == len(lead) + 1 and labels.shape[:-1] == lead)):
        raise ValueError(f"labels has shape {tuple(labels.shape)}: expected {tuple(lead)} or {tuple(lead)} + (K,) "
                         f"for {against}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {against} is on {device}")
    # a label outside [0, V) other than -100: a ValueError for CPU tensors in eager mode (a free
    # check there), nan elsewhere (checking a GPU tensor would be a host sync)
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(labels)
        if lo >= 0 and hi < vocab:  # one pass in the common case
            return
        bad = ((labels < 0) | (labels >= vocab)) & (labels != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"labels must lie in [0, {vocab}) or be {IGNORE_INDEX} (ignored), "
                             f"got {labels[bad].flatten()[0].item()}")


def _check_temperature(temperature):
    if not isinstance(temperature, numbers.Real) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def logprobs(logits, labels, *, temperature=1.0, return_entropy=False, inplace_backward=False, tp_group=None,
             backend=None):
    """Log-probabilities of `labels` under softmax(logits / temperature), and the entropy.

    logits [..., V] float32/bf16/fp16/float64; labels [...] or [..., K] integer (label -100 is
    ignored: log-prob 0, no gradient; another label outside [0, V) raises for CPU tensors and
    gives nan on GPUs). Returns float32 log-probs shaped like labels, and the
    entropy [...] when `return_entropy`. Differentiable w.r.t. logits; `inplace_backward=True`
    writes the gradient into the logits buffer. With `tp_group` (a torch.distributed group),
    logits hold this rank's contiguous vocabulary shard (rank r: ids [r Vs, (r + 1) Vs)), labels
    are global ids, and the results equal the unsharded ones on every rank (two all-reduces).
    Formulas: this module's docstring.
    """
    world = 1
    if tp_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(tp_group)
    _check(logits, labels, temperature, world)
    which = _dispatch.resolve(backend, logits.device, OP_BACKENDS)
    if tp_group is not None and which == "torch":
        which = "cpu" if logits.device.type == "cpu" else "triton"  # the shard reduction needs a kernel
    if which == "torch":
        return logprobs_reference(logits, labels, temperature, return_entropy)
    V = logits.shape[-1]
    x = rows2d(logits, V)
    lab = labels.reshape(x.shape[0], -1).to(torch.int64).contiguous()
    if tp_group is not None:
        lp, ent = _VocabParallelLogprobs.apply(x, lab, float(temperature), bool(inplace_backward), which, tp_group)
    else:
        op = _logprobs_op if torch.compiler.is_compiling() else _DirectLogprobs.apply
        lp, ent = op(x, lab, float(temperature), bool(return_entropy), bool(inplace_backward), which)[:2]
    lp = lp.reshape(labels.shape)  # [...] or [..., K], as the labels
    if not return_entropy:
        return lp
    return lp, ent.reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------- fused with the LM head
def head_transform(logits, bias=None, logit_scale=1.0, softcap=None):
    """The LM head's output transform, before the temperature:
        y = softcap * tanh(logit_scale * (logits + bias) / softcap)     (the tanh only with softcap)
    Gemma 2/3's final_logit_softcapping, the logit scale of Cohere, Granite, Falcon-H1 and MiniCPM."""
    y = logits if bias is None else logits + bias.to(logits.dtype)
    if logit_scale != 1.0:
        y = y * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y


def linear_logprobs_reference(hidden, weight, labels, temperature=1.0, return_entropy=False, return_sum_p2=False, *,
                              bias=None, logit_scale=1.0, softcap=None, return_mean_logit=False, return_is_top1=False):
    """The spec of linear_logprobs: materialised logits y = head_transform(hidden @ weight^T), then
    `logprobs`; sum_p2 = sum_v p_v^2, mean_logit = mean_v y_v / T, is_top1 = (label == argmax_v y_v,
    the first maximum) for a valid label."""
    acc = acc_dtype(hidden)
    y = head_transform(hidden.to(acc) @ weight.to(acc).T, None if bias is None else bias.to(acc), logit_scale, softcap)
    lp, ent = logprobs_reference(y, labels, temperature, True)
    z = y / temperature
    out = [lp] + ([ent] if return_entropy else [])
    if return_sum_p2:
        out.append((torch.softmax(z, -1) ** 2).sum(-1))
    if return_mean_logit:
        out.append(z.mean(-1))
    if return_is_top1:
        top = z.argmax(-1)
        top = top if labels.dim() == top.dim() else top.unsqueeze(-1)
        out.append((labels == top) & (labels >= 0) & (labels < weight.shape[0]))
    return out[0] if len(out) == 1 else tuple(out)


def _merge(m, s, a, s2, lse_c, ez_c, s2_c):
    """Adds a block with log-sum-exp lse_c, mean E[z] ez_c and sum of squared probabilities s2_c
    to running (m, s, a, s2): s = sum exp(lse_c - m), a = sum exp(lse_c - m) ez_c, s2 likewise
    with exp(2 (lse_c - m))."""
    m_new = torch.maximum(m, lse_c)
    old = torch.where(m == float("-inf"), 0.0, torch.exp(m - m_new))
    new = torch.where(lse_c == float("-inf"), 0.0, torch.exp(lse_c - m_new))
    s = s * old + new
    a = a * old + torch.where(new == 0, 0.0, new * ez_c)
    s2 = s2 * old * old + new * new * s2_c if s2 is not None else None
    return m_new, s, a, s2


TOKEN_TILE = 128  # rows of every logits matmul (the last one zero-padded)
VOCAB_TILE = 8192  # columns of every logits block
BLOCK_ELEMENTS = TOKEN_TILE * VOCAB_TILE  # a block is the most token tiles that fit: [k TOKEN_TILE, <= VOCAB_TILE]
CPU_BLOCK_TILES = 4  # on the CPU a block holds at least 4 token tiles (16 MB of fp32 logits at V >= 8192)


def _block_rows(shard, device):
    """Rows of a logits block: as many token tiles as fit BLOCK_ELEMENTS at this vocabulary width
    (1 tile at V >= 8192 on a GPU, 4 on the CPU; 204 at V = 40): few calls, and on the CPU few
    parallel regions, each of which can stall on a loaded machine. A function of the vocabulary
    and device only, never of the batch."""
    tiles = max(1, BLOCK_ELEMENTS // (TOKEN_TILE * min(shard, VOCAB_TILE)))
    return TOKEN_TILE * (max(tiles, CPU_BLOCK_TILES) if device.type == "cpu" else tiles)


def logits_block_elements(vocab, device):
    """Logits one linear_logprobs block holds (its largest transient, float32 at most), for a
    vocabulary (shard) of `vocab` on `device` ("cpu"/"cuda" or a torch.device)."""
    return _block_rows(vocab, torch.device(device)) * min(vocab, VOCAB_TILE)


def _tiles(x, rows):
    """x[rows] as [tiles, TOKEN_TILE, width], the last tile zero-padded."""
    n = rows.stop - rows.start
    tiles = -(-n // TOKEN_TILE)
    t = x[rows]
    if n < tiles * TOKEN_TILE:
        t = torch.cat([t, t.new_zeros(tiles * TOKEN_TILE - n, x.shape[1])])
    return t.view(tiles, TOKEN_TILE, x.shape[1])


def _block_logits(hidden, rows, w):
    """hidden[rows] @ w^T as one [TOKEN_TILE, H] x [H, <= VOCAB_TILE] matmul per token tile (the last
    zero-padded): the same matmul shape for every tile makes a token's logits independent of the
    batch around it. On the CPU one batched matmul over the block's tiles (one parallel region);
    on a GPU one matmul per tile."""
    n = rows.stop - rows.start
    h = _tiles(hidden, rows)
    if hidden.device.type == "cpu":
        return torch.matmul(h, w.T).view(-1, w.shape[0])[:n]
    out = torch.empty(h.shape[0] * TOKEN_TILE, w.shape[0], dtype=hidden.dtype, device=hidden.device)
    for t in range(h.shape[0]):
        torch.mm(h[t], w.T, out=out[t * TOKEN_TILE:(t + 1) * TOKEN_TILE])
    return out[:n]


def _transformed(bias, logit_scale, softcap):
    return bias is not None or logit_scale != 1.0 or softcap is not None


def _block_y(hidden, rows, w, bias, v0, logit_scale, softcap, acc):
    """A block's y: its logits (hidden's dtype), through head_transform in the accumulation dtype
    when the head has a bias, a scale or softcapping."""
    y = _block_logits(hidden, rows, w)
    if not _transformed(bias, logit_scale, softcap):
        return y
    return head_transform(y.to(acc), None if bias is None else bias[v0:v0 + VOCAB_TILE], logit_scale, softcap)


class _LinearLogprobs(torch.autograd.Function):
    """Log-probs of y = head_transform(hidden @ weight^T) without the [N, V] logits: the logits exist
    one [token tiles, vocabulary tile] block at a time, reduced by the log-prob kernels into per-row
    (lse, E[z]) merged across blocks (and ranks: one all-reduce MAX, one all-reduce SUM); the
    backward recomputes each block (or, when the whole logits were one block, uses the forward's)
    and feeds its d logits to two matmuls per token tile.
    `want` = (sum_p2, mean_logit, is_top1): the optional outputs computed (empty tensors otherwise)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, logit_scale, softcap, want, backend, group):
        want_p2, want_mean, want_top1 = want
        fwd = _kernels(backend)[0]
        N, shard = hidden.shape[0], weight.shape[0]
        acc = acc_dtype(hidden)
        offset = 0 if group is None else torch.distributed.get_rank(group) * shard
        world = 1 if group is None else torch.distributed.get_world_size(group)
        m = torch.full((N,), float("-inf"), dtype=acc, device=hidden.device)
        s, a = torch.zeros_like(m), torch.zeros_like(m)
        s2 = torch.zeros_like(m) if want_p2 else None
        y_sum = torch.zeros_like(m) if want_mean else None
        y_max = torch.full_like(m, float("-inf")) if want_top1 else None  # the row's largest y
        before = torch.full(labels.shape, float("-inf"), dtype=acc, device=hidden.device) if want_top1 else None
        picked = torch.zeros(labels.shape, dtype=acc, device=hidden.device)
        step = _block_rows(shard, hidden.device)
        one_tile = shard <= VOCAB_TILE  # each row block is merged once, from the empty state: a copy
        # one unsharded vocabulary tile: the kernel's own log-probs and entropy are the results
        # (for every batch size alike: batch-invariant), with none of the merging's small ops
        direct = one_tile and group is None
        if direct:
            lp_d, ent_d = torch.empty(labels.shape, dtype=acc, device=hidden.device), torch.empty_like(m)
        for n0 in range(0, N, step):
            rows = slice(n0, min(n0 + step, N))
            for v0 in range(0, shard, VOCAB_TILE):
                w = weight[v0:v0 + VOCAB_TILE]
                y = _block_y(hidden, rows, w, bias, v0, logit_scale, softcap, acc)
                if direct:
                    lp_d[rows], ent_d[rows], st = fwd(y, labels[rows], temperature, True)
                if not direct or want_top1:  # the label's y / T
                    local = labels[rows] - offset - v0
                    owned = (local >= 0) & (local < w.shape[0])
                    local = torch.where(owned, local, IGNORE_INDEX)
                    if not direct:
                        _, _, st = fwd(y, local, temperature, False)
                    picked[rows] += torch.where(owned, torch.gather(y, 1, torch.where(owned, local, 0)).to(acc)
                                                / temperature, 0.0)
                s2_c = None
                if want_p2:
                    s2_c = (torch.exp(y.to(acc) / temperature - st[:, :1]) ** 2).sum(-1)
                if one_tile:  # what _merge gives from (-inf, 0, 0, 0), bit for bit, in fewer ops
                    m[rows], s[rows], a[rows] = st[:, 0], 1.0, st[:, 1]
                    s2_rows = s2_c
                else:
                    m[rows], s[rows], a[rows], s2_rows = _merge(m[rows], s[rows], a[rows],
                                                                s2[rows] if want_p2 else None, st[:, 0], st[:, 1], s2_c)
                if want_p2:
                    s2[rows] = s2_rows
                if want_mean:
                    y_sum[rows] += y.sum(-1, dtype=acc)
                if want_top1:  # the first maximum: a label ties only with the y's before it
                    y_max[rows] = torch.maximum(y_max[rows], y.amax(-1).to(acc))
                    earlier = torch.arange(w.shape[0], device=y.device) < labels[rows, :, None] - offset - v0
                    before[rows] = torch.maximum(before[rows], y[:, None, :].masked_fill(~earlier, float("-inf"))
                                                 .amax(-1).to(acc))
        if group is not None:
            import torch.distributed as dist

            top = m.clone() if not want_top1 else torch.cat([m[:, None], y_max[:, None], before], 1)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            if want_top1:
                top, y_max, before = top[:, 0].contiguous(), top[:, 1], top[:, 2:]
            r = torch.where(m == float("-inf"), 0.0, torch.exp(m - top))
            parts = [s * r, a * r] + ([s2 * r * r] if want_p2 else []) + ([y_sum] if want_mean else [])
            packed = torch.cat([torch.stack(parts, 1), picked], 1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            m, s, a = top, packed[:, 0], packed[:, 1]
            s2 = packed[:, 2] if want_p2 else None
            y_sum = packed[:, len(parts) - 1] if want_mean else None
            picked = packed[:, len(parts):]
        lse = m + torch.log(s)
        ez = a / s
        empty = torch.zeros(0, dtype=acc, device=hidden.device)
        sum_p2 = s2 / (s * s) if want_p2 else empty
        vocab = shard * world
        mean_logit = y_sum / (vocab * temperature) if want_mean else empty
        valid = (labels >= 0) & (labels < vocab)
        is_top1 = (valid & (picked >= (y_max / temperature)[:, None]) & (picked > before / temperature)
                   if want_top1 else torch.zeros(0, dtype=torch.bool, device=hidden.device))
        if direct:
            lp, entropy = lp_d, ent_d
        else:
            nan = torch.full_like(picked, float("nan"))
            lp = torch.where(labels == IGNORE_INDEX, 0.0, torch.where(valid, picked - lse[:, None], nan))
            entropy = lse - ez
        kept = y if N <= step and one_tile else None  # the whole logits were one block: kept, not recomputed
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ez, sum_p2, valid, kept)
        ctx.args = (temperature, logit_scale, softcap, want, backend, group, offset, vocab)
        ctx.mark_non_differentiable(is_top1)
        return lp, entropy, sum_p2, mean_logit, is_top1

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, grad_p2, grad_mean, _grad_top1):
        hidden, weight, bias, labels, lse, ez, sum_p2, valid, kept = ctx.saved_tensors
        temperature, logit_scale, softcap, (want_p2, want_mean, _), backend, group, offset, vocab = ctx.args
        bwd = _kernels(backend)[1]
        acc = lse.dtype
        transformed = _transformed(bias, logit_scale, softcap)
        N, shard = hidden.shape[0], weight.shape[0]
        grad_lp = torch.zeros(labels.shape, dtype=acc, device=hidden.device) if grad_lp is None else grad_lp.to(acc)
        g_sum = (grad_lp * valid).sum(1)  # the whole row's
        stats = torch.stack([lse, ez], 1)
        cpu = hidden.device.type == "cpu"
        once = cpu and shard <= VOCAB_TILE  # each row's d hidden is written once, not summed over tiles
        grad_hidden = (torch.empty if once else torch.zeros)(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.empty_like(weight)
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None else None
        step = _block_rows(shard, hidden.device)
        for v0 in range(0, shard, VOCAB_TILE):
            w = weight[v0:v0 + VOCAB_TILE]
            grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
            for n0 in range(0, N, step):
                rows = slice(n0, min(n0 + step, N))
                y = kept if kept is not None else _block_y(hidden, rows, w, bias, v0, logit_scale, softcap, acc)
                local = labels[rows] - offset - v0
                local = torch.where((local >= 0) & (local < w.shape[0]), local, IGNORE_INDEX)
                d = bwd(grad_lp[rows].contiguous(), None if grad_ent is None else grad_ent[rows].to(acc).contiguous(),
                        y, local, stats[rows].contiguous(), temperature, g_sum[rows].contiguous())
                if want_p2 and grad_p2 is not None:  # d sum p^2 / dz = 2 p (p - sum p^2)
                    p = torch.exp(y.to(acc) / temperature - lse[rows, None])
                    d = d + (grad_p2[rows, None].to(acc) * 2 * p * (p - sum_p2[rows, None]) / temperature).to(d.dtype)
                if want_mean and grad_mean is not None:  # d mean / dy_v = 1 / (V T)
                    d = d + (grad_mean[rows, None].to(acc) / (vocab * temperature)).to(d.dtype)
                if transformed:  # back through y = c tanh(s (l + b) / c): dy/dl = s (1 - (y / c)^2)
                    if softcap is not None:
                        d = d * (1 - (y / softcap) ** 2)
                    if logit_scale != 1.0:
                        d = d * logit_scale
                    if grad_bias is not None:
                        grad_bias[v0:v0 + VOCAB_TILE] += d.sum(0, dtype=acc)
                    d = d.to(hidden.dtype)
                if cpu:  # two matmuls a block; d hidden per token tile (batch-invariant)
                    n = rows.stop - rows.start
                    d_hidden = torch.matmul(_tiles(d, slice(0, n)), w).view(-1, w.shape[1])[:n].to(acc)
                    if once:
                        grad_hidden[rows] = d_hidden
                    else:
                        grad_hidden[rows] += d_hidden
                    grad_w.addmm_(d.T.to(acc), hidden[rows].to(acc))
                    continue
                for t0 in range(0, rows.stop - rows.start, TOKEN_TILE):
                    tile = slice(rows.start + t0, min(rows.start + t0 + TOKEN_TILE, rows.stop))
                    d_t = d[t0:t0 + TOKEN_TILE]
                    if d_t.dtype == acc:  # accumulate in place: no block-sized temporaries
                        grad_hidden[tile].addmm_(d_t, w)
                        grad_w.addmm_(d_t.T, hidden[tile])
                    else:
                        grad_hidden[tile] += (d_t @ w).to(acc)
                        grad_w += (d_t.T @ hidden[tile]).to(acc)
            grad_weight[v0:v0 + VOCAB_TILE] = grad_w.to(weight.dtype)
        if group is not None:
            torch.distributed.all_reduce(grad_hidden, op=torch.distributed.ReduceOp.SUM, group=group)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden.to(hidden.dtype), grad_weight, grad_bias, None, None, None, None, None, None, None


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                    return_entropy=False, return_sum_p2=False, return_mean_logit=False, return_is_top1=False,
                    chunk_size=None, tp_group=None, backend=None):
    """Log-probs of labels under softmax(y / temperature), y = head_transform(hidden @ weight^T)
    (+ bias, * logit_scale, softcap * tanh(. / softcap): see head_transform), never materialising the
    [N, V] logits. hidden [..., H], weight [V, H] and bias [V] (this rank's contiguous vocabulary
    shard with `tp_group`; grad hidden is then all-reduced), labels [...] or [..., K].
    Differentiable w.r.t. hidden, weight and bias. Optional per-token outputs, in this order:
    the entropy, sum_v p_v^2, the mean of y / T over the vocabulary, and is_top1 (bool, per label:
    the label is the first argmax of y; no gradient). Returns lp, or (lp, *the ones asked for).

    The logits exist one block of token tiles (TOKEN_TILE = 128 rows each, as many as fit 128 x
    8192 entries: 1 at V >= 8192 on a GPU, at least 4 on the CPU) x VOCAB_TILE (8192) entries at a
    time (when all of them fit one block, e.g. [4096, 40], the forward keeps that block for the
    backward rather than recomputing it); every logits matmul has the one shape [128, H] x
    [H, <= 8192] (on the CPU batched over the block's tiles), so a token's results and d hidden
    are bitwise the same whatever the batch, its position in it and `chunk_size` (accepted for
    verl/Liger/TRL-style call sites; it changes nothing, the tiles bound the memory).
    """
    if not torch.is_tensor(hidden) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(f"hidden must be a floating tensor [..., H], got {getattr(hidden, 'dtype', type(hidden))}")
    if not torch.is_tensor(weight) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (hidden's last dim), "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, {hidden.device})")
    if bias is not None and (not torch.is_tensor(bias) or bias.shape != weight.shape[:1] or bias.dtype != weight.dtype
                             or bias.device != weight.device):
        raise ValueError(f"bias must be [{weight.shape[0]}] (weight's rows), {weight.dtype}, on {weight.device}; got "
                         f"{tuple(getattr(bias, 'shape', ()))}, {getattr(bias, 'dtype', type(bias))}, "
                         f"{getattr(bias, 'device', '')}")
    if not isinstance(logit_scale, numbers.Real) or not abs(logit_scale) < float("inf"):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    _check_labels(labels, hidden.shape[:-1], weight.shape[0] * world, hidden.device, "hidden")
    _check_temperature(temperature)
    head = dict(bias=bias, logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap))
    which = _dispatch.resolve(backend, hidden.device, OP_BACKENDS)
    if which == "torch" and tp_group is None:
        return linear_logprobs_reference(hidden, weight, labels, temperature, return_entropy, return_sum_p2, **head,
                                         return_mean_logit=return_mean_logit, return_is_top1=return_is_top1)
    if which == "torch":
        which = "cpu" if hidden.device.type == "cpu" else "triton"  # the shard reduction needs a kernel
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(h.shape[0], -1).to(torch.int64).contiguous()
    want = (bool(return_sum_p2), bool(return_mean_logit), bool(return_is_top1))
    lp, ent, p2, mean, top1 = _LinearLogprobs.apply(h, weight, bias, lab, float(temperature), head["logit_scale"],
                                                    head["softcap"], want, which, tp_group)
    lead = hidden.shape[:-1]
    out = [lp.reshape(labels.shape)] + ([ent.reshape(lead)] if return_entropy else [])
    out += [x.reshape(lead) for x, asked in ((p2, return_sum_p2), (mean, return_mean_logit)) if asked]
    if return_is_top1:
        out.append(top1.reshape(labels.shape))
    return out[0] if len(out) == 1 else tuple(out)
