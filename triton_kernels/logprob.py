"""Triton kernels of the log-prob family (installed as ``rlhfkern.triton_kernels.logprob``).

Formulas: rlhfkern/ops/logprob.py. The forward runs one program per row, an online softmax over
vocabulary tiles of BLOCK_V (masked to -inf past V): m, s = sum exp(z - m), a = sum exp(z - m) z,
rescaled whenever the running max grows; it never holds more than one tile of the row. The
backward is elementwise over (row, tile) and may write into the logits themselves.
"""

import triton
import triton.language as tl

from ._common import acc_dtype, join_float, split_float


@triton.jit
def _logprob_fwd_kernel(
    x_ptr, lab_ptr, lp_ptr, ent_ptr, st_ptr,
    V, K, stride_x, t_hi, t_mid, t_lo,
    HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = lp_ptr.dtype.element_ty
    temp = join_float(t_hi, t_mid, t_lo, acc)
    x_row = x_ptr + row * stride_x
    m = tl.full((), float("-inf"), acc)
    s = tl.zeros((), acc)
    a = tl.zeros((), acc)
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(acc) / temp
        m_new = tl.maximum(m, tl.max(z, 0))
        scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
        e = tl.where(z == float("-inf"), 0.0, tl.exp(z - m_new))
        s = s * scale + tl.sum(e, 0)
        a = a * scale + tl.sum(tl.where(z == float("-inf"), 0.0, e * z), 0)
        m = m_new
    lse = m + tl.log(s)
    ez = a / s
    tl.store(st_ptr + row * 2, lse)
    tl.store(st_ptr + row * 2 + 1, ez)
    if HAS_ENT:
        tl.store(ent_ptr + row, lse - ez)
    for k in range(0, K):
        label = tl.load(lab_ptr + row * K + k)
        valid = (label >= 0) & (label < V)
        zl = tl.load(x_row + tl.where(valid, label, 0)).to(acc) / temp
        lp = tl.where(label == -100, 0.0, tl.where(valid, zl - lse, float("nan")))
        tl.store(lp_ptr + row * K + k, lp)


@triton.jit
def _logprob_bwd_kernel(
    x_ptr, out_ptr, lab_ptr, g_ptr, gsum_ptr, gent_ptr, st_ptr,
    V, K, stride_x, stride_out, t_hi, t_mid, t_lo,
    HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = v < V
    acc = g_ptr.dtype.element_ty
    temp = join_float(t_hi, t_mid, t_lo, acc)
    z = tl.load(x_ptr + row * stride_x + v, mask=inb, other=0.0).to(acc) / temp
    lse = tl.load(st_ptr + row * 2)
    p = tl.exp(z - lse)  # 0 for z = -inf; nan for a row with nothing finite (lse = -inf), as torch
    dz = -tl.load(gsum_ptr + row) * p
    if HAS_ENT:
        ez = tl.load(st_ptr + row * 2 + 1)
        dz -= tl.where(z == float("-inf"), 0.0, tl.load(gent_ptr + row) * p * (z - ez))
    for k in range(0, K):
        label = tl.load(lab_ptr + row * K + k)
        dz += tl.where(v == label, tl.load(g_ptr + row * K + k), 0.0)
    tl.store(out_ptr + row * stride_out + v, (dz / temp).to(out_ptr.dtype.element_ty), mask=inb)


def logprobs_fwd(logits, labels, temperature, entropy, block_v=4096):
    """(log-probs [N, K], entropy [N] or [0], stats [N, 2] = (lse, E_p[z]))."""
    import torch

    N, V = logits.shape
    K = labels.shape[1]
    acc = acc_dtype(logits)
    lp = torch.empty((N, K), dtype=acc, device=logits.device)
    ent = torch.empty((N if entropy else 0,), dtype=acc, device=logits.device)
    stats = torch.empty((N, 2), dtype=acc, device=logits.device)
    BLOCK_V = max(16, min(block_v, triton.next_power_of_2(V)))
    _logprob_fwd_kernel[(N,)](logits, labels, lp, ent if entropy else lp, stats, V, K, logits.stride(0),
                              *split_float(temperature), HAS_ENT=bool(entropy), BLOCK_V=BLOCK_V)
    return lp, ent, stats


def logprobs_bwd_into(grad_lp, grad_ent, logits, labels, stats, temperature, out, g_sum=None, block_v=4096):
    """d logits into `out` (which may be the logits themselves); g_sum: each row's label-gradient
    sum when the logits are a vocabulary shard, else from the labels that fall in [0, V)."""
    N, V = logits.shape
    K = labels.shape[1]
    if g_sum is None:
        valid = (labels >= 0) & (labels < V)  # ignored (-100) and out-of-range labels carry no gradient
        g_sum = (grad_lp * valid).sum(1)
    g_sum = g_sum.to(grad_lp.dtype).contiguous()
    has_ent = grad_ent is not None and grad_ent.numel() > 0
    BLOCK_V = max(16, min(block_v, triton.next_power_of_2(V)))
    _logprob_bwd_kernel[(N, triton.cdiv(V, BLOCK_V))](
        logits, out, labels, grad_lp.contiguous(), g_sum, grad_ent.contiguous() if has_ent else g_sum, stats,
        V, K, logits.stride(0), out.stride(0), *split_float(temperature), HAS_ENT=has_ent, BLOCK_V=BLOCK_V)
    return out
