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


def _backward(ctx, grad_lp, grad_ent, grad_stats):
    logits, labels, stats = ctx.saved_tensors
    temperature, inplace_backward, backend = ctx.args
    acc = stats.dtype
    grad_lp = torch.zeros(labels.shape, dtype=acc, device=logits.device) if grad_lp is None else grad_lp.to(acc)
    grad_ent = None if grad_ent is None or grad_ent.numel() == 0 else grad_ent.to(acc)
    if inplace_backward:  # the dispatcher bumps the version of the mutated logits
        _logprobs_backward_inplace_op(grad_lp, grad_ent, logits, labels, stats, temperature, None, backend)
        return logits, None, None, None, None, None
    grad = _logprobs_backward_op(grad_lp, grad_ent, logits, labels, stats, temperature, None, backend)
    return grad, None, None, None, None, None


torch.library.register_autograd("rlhfkern::logprobs", _backward, setup_context=_setup_context)


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
        lp, ent, _ = _logprobs_op(x, lab, float(temperature), bool(return_entropy), bool(inplace_backward), which)
    lp = lp.reshape(labels.shape)  # [...] or [..., K], as the labels
    if not return_entropy:
        return lp
    return lp, ent.reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------- fused with the LM head
def linear_logprobs_reference(hidden, weight, labels, temperature=1.0, return_entropy=False, return_sum_p2=False):
    """The spec of linear_logprobs: materialised logits = hidden @ weight^T, then `logprobs`."""
    acc = acc_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).T
    lp, ent = logprobs_reference(logits, labels, temperature, True)
    out = [lp] + ([ent] if return_entropy else [])
    if return_sum_p2:
        out.append((torch.softmax(logits / temperature, -1) ** 2).sum(-1))
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


TOKEN_TILE = 128  # rows of every logits block matmul (the last one zero-padded)
VOCAB_TILE = 8192  # columns of every logits block


def _tile_logits(hidden, rows, w):
    """hidden[rows] @ w^T computed as a full TOKEN_TILE-row matmul: the same matmul shape for
    every tile makes a token's logits independent of the batch around it (bitwise)."""
    h = hidden[rows]
    if h.shape[0] < TOKEN_TILE:
        h = torch.cat([h, h.new_zeros(TOKEN_TILE - h.shape[0], h.shape[1])])
    return (h @ w.T)[: rows.stop - rows.start]


class _LinearLogprobs(torch.autograd.Function):
    """Log-probs of hidden @ weight^T without the [N, V] logits: the logits exist one
    [token chunk, vocabulary chunk] block at a time, reduced by the log-prob kernels into per-row
    (lse, E[z]) merged across blocks (and ranks: one all-reduce MAX, one all-reduce SUM); the
    backward recomputes each block and feeds its d logits to two matmuls."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, want_p2, backend, group):
        fwd = _kernels(backend)[0]
        N, shard = hidden.shape[0], weight.shape[0]
        acc = acc_dtype(hidden)
        offset = 0 if group is None else torch.distributed.get_rank(group) * shard
        world = 1 if group is None else torch.distributed.get_world_size(group)
        m = torch.full((N,), float("-inf"), dtype=acc, device=hidden.device)
        s, a = torch.zeros_like(m), torch.zeros_like(m)
        s2 = torch.zeros_like(m) if want_p2 else None
        picked = torch.zeros(labels.shape, dtype=acc, device=hidden.device)
        for n0 in range(0, N, TOKEN_TILE):
            rows = slice(n0, min(n0 + TOKEN_TILE, N))
            for v0 in range(0, shard, VOCAB_TILE):
                w = weight[v0:v0 + VOCAB_TILE]
                logits = _tile_logits(hidden, rows, w)
                local = labels[rows] - offset - v0
                owned = (local >= 0) & (local < w.shape[0])
                local = torch.where(owned, local, IGNORE_INDEX)
                _, _, st = fwd(logits, local, temperature, False)
                picked[rows] += torch.where(owned, torch.gather(logits, 1, torch.where(owned, local, 0)).to(acc)
                                            / temperature, 0.0)
                s2_c = None
                if want_p2:
                    s2_c = (torch.exp(logits.to(acc) / temperature - st[:, :1]) ** 2).sum(-1)
                m[rows], s[rows], a[rows], s2_rows = _merge(m[rows], s[rows], a[rows],
                                                            s2[rows] if want_p2 else None, st[:, 0], st[:, 1], s2_c)
                if want_p2:
                    s2[rows] = s2_rows
        if group is not None:
            import torch.distributed as dist

            top = m.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            r = torch.where(m == float("-inf"), 0.0, torch.exp(m - top))
            parts = [s * r, a * r] + ([s2 * r * r] if want_p2 else [])
            packed = torch.cat([torch.stack(parts, 1), picked], 1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            m, s, a = top, packed[:, 0], packed[:, 1]
            s2 = packed[:, 2] if want_p2 else None
            picked = packed[:, len(parts):]
        lse = m + torch.log(s)
        ez = a / s
        sum_p2 = s2 / (s * s) if want_p2 else torch.zeros(0, dtype=acc, device=hidden.device)
        valid = (labels >= 0) & (labels < shard * world)
        nan = torch.full_like(picked, float("nan"))
        lp = torch.where(labels == IGNORE_INDEX, 0.0, torch.where(valid, picked - lse[:, None], nan))
        ctx.save_for_backward(hidden, weight, labels, lse, ez, sum_p2, valid)
        ctx.args = (temperature, want_p2, backend, group, offset)
        return lp, lse - ez, sum_p2

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, grad_p2):
        hidden, weight, labels, lse, ez, sum_p2, valid = ctx.saved_tensors
        temperature, want_p2, backend, group, offset = ctx.args
        bwd = _kernels(backend)[1]
        acc = lse.dtype
        N, shard = hidden.shape[0], weight.shape[0]
        grad_lp = torch.zeros(labels.shape, dtype=acc, device=hidden.device) if grad_lp is None else grad_lp.to(acc)
        g_sum = (grad_lp * valid).sum(1)  # the whole row's
        stats = torch.stack([lse, ez], 1)
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.empty_like(weight)
        for v0 in range(0, shard, VOCAB_TILE):
            w = weight[v0:v0 + VOCAB_TILE]
            grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
            for n0 in range(0, N, TOKEN_TILE):
                rows = slice(n0, min(n0 + TOKEN_TILE, N))
                logits = _tile_logits(hidden, rows, w)
                local = labels[rows] - offset - v0
                local = torch.where((local >= 0) & (local < w.shape[0]), local, IGNORE_INDEX)
                d = bwd(grad_lp[rows].contiguous(), None if grad_ent is None else grad_ent[rows].to(acc).contiguous(),
                        logits, local, stats[rows].contiguous(), temperature, g_sum[rows].contiguous())
                if want_p2 and grad_p2 is not None:  # d sum p^2 / dz = 2 p (p - sum p^2)
                    p = torch.exp(logits.to(acc) / temperature - lse[rows, None])
                    d = d + (grad_p2[rows, None].to(acc) * 2 * p * (p - sum_p2[rows, None]) / temperature).to(d.dtype)
                if d.dtype == acc:  # accumulate in place: no block-sized temporaries
                    grad_hidden[rows].addmm_(d, w)
                    grad_w.addmm_(d.T, hidden[rows])
                else:
                    grad_hidden[rows] += (d @ w).to(acc)
                    grad_w += (d.T @ hidden[rows]).to(acc)
            grad_weight[v0:v0 + VOCAB_TILE] = grad_w.to(weight.dtype)
        if group is not None:
            torch.distributed.all_reduce(grad_hidden, op=torch.distributed.ReduceOp.SUM, group=group)
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None


def linear_logprobs(hidden, weight, labels, *, temperature=1.0, return_entropy=False, return_sum_p2=False,
                    chunk_size=None, tp_group=None, backend=None):
    """Log-probs of labels under softmax(hidden @ weight^T / temperature), never materialising the
    [N, V] logits, and optionally the entropy and sum_v p_v^2 per token. hidden [..., H], weight
    [V, H] (this rank's contiguous vocabulary shard with `tp_group`; grad hidden is then
    all-reduced), labels [...] or [..., K]. Differentiable w.r.t. hidden and weight.
    Returns lp, or (lp, [entropy], [sum_p2]).

    The logits exist one block of TOKEN_TILE (128) tokens x VOCAB_TILE (8192) entries at a time;
    these tiles are fixed so that a token's results are bitwise the same whatever the batch, its
    position in it and `chunk_size` (accepted for verl/Liger-style call sites; it changes
    nothing, the tiles bound the memory).
    """
    if not torch.is_tensor(hidden) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(f"hidden must be a floating tensor [..., H], got {getattr(hidden, 'dtype', type(hidden))}")
    if not torch.is_tensor(weight) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (hidden's last dim), "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, {hidden.device})")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    _check_labels(labels, hidden.shape[:-1], weight.shape[0] * world, hidden.device, "hidden")
    _check_temperature(temperature)
    which = _dispatch.resolve(backend, hidden.device, OP_BACKENDS)
    if which == "torch" and tp_group is None:
        return linear_logprobs_reference(hidden, weight, labels, temperature, return_entropy, return_sum_p2)
    if which == "torch":
        which = "cpu" if hidden.device.type == "cpu" else "triton"  # the shard reduction needs a kernel
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(h.shape[0], -1).to(torch.int64).contiguous()
    lp, ent, p2 = _LinearLogprobs.apply(h, weight, lab, float(temperature), bool(return_sum_p2), which, tp_group)
    lp = lp.reshape(labels.shape)
    out = [lp] + ([ent.reshape(hidden.shape[:-1])] if return_entropy else [])
    if return_sum_p2:
        out.append(p2.reshape(hidden.shape[:-1]))
    return out[0] if len(out) == 1 else tuple(out)
