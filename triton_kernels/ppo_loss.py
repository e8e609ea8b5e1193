"""Triton kernels of the policy-gradient family (installed as ``rlhfkern.triton_kernels.ppo_loss``).

Formulas and gradient rules: rlhfkern/ops/ppo_loss.py; the per-token math mirrors
csrc/token_math.h. A program owns BLOCK_T tokens of one row: the forward writes that block's
sums (count, m*pg, m*H, m*kl, m*clipped, m*clipped_lower, m*neg_log_ratio) and the rows' totals
are summed by torch afterwards (a fixed order: deterministic); the backward recomputes the
per-token terms from the inputs and writes d log_prob.
"""

import triton
import triton.language as tl

from ._common import acc_dtype, join_float, split_float

N_COLUMNS = 7


@triton.jit
def _clamp(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _passes(x, lo, hi):
    # torch.clamp's backward passes the gradient on [lo, hi], bounds included
    return tl.where((x >= lo) & (x <= hi), 1.0, 0.0)


@triton.jit
def _kl_terms(lp, ref, KL_BASE: tl.constexpr, KL_STRAIGHT: tl.constexpr):
    """The KL estimate and its derivative w.r.t. lp (w.r.t. ref it is the negative)."""
    diff = lp - ref
    if KL_BASE == 0:
        kl = diff
        dkl = tl.full(diff.shape, 1.0, diff.dtype)
    elif KL_BASE == 1:
        kl = tl.abs(diff)
        dkl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KL_BASE == 2:
        kl = 0.5 * (diff * diff)
        dkl = diff
    else:
        x0 = ref - lp
        x = _clamp(x0, -20.0, 20.0)
        r = tl.exp(x)
        v = r - x - 1.0
        kl = _clamp(v, -10.0, 10.0)
        dkl = -(_passes(v, -10.0, 10.0) * (r - 1.0) * _passes(x0, -20.0, 20.0))
    if KL_STRAIGHT:
        dkl = diff
    return kl, dkl


@triton.jit
def _value_terms(v, ret, old, clip):
    """Clipped value loss of a token (before 0.5 and aggregation) and d/dv, PyTorch's tie rules."""
    up = old + clip
    down = old - clip
    u = tl.where(v > up, up, v)
    du = tl.where(v < up, 1.0, tl.where(v > up, 0.0, 0.5))
    vc = tl.where(u < down, down, u)
    dvc = tl.where(u > down, 1.0, tl.where(u < down, 0.0, 0.5)) * du
    e1 = v - ret
    e2 = vc - ret
    l1 = e1 * e1
    l2 = e2 * e2
    d1 = 2.0 * e1
    d2 = 2.0 * e2 * dvc
    loss = tl.where(l2 > l1, l2, l1)
    dloss = tl.where(l1 > l2, d1, tl.where(l2 > l1, d2, 0.5 * d1 + 0.5 * d2))
    return loss, dloss, tl.where(l2 > l1, 1.0, 0.0)


@triton.jit
def _token_terms(lp, old, adv, is_w, ref, lo, hi, clip_c,
                 DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_BASE: tl.constexpr, KL_STRAIGHT: tl.constexpr):
    d = lp - old
    nk = _clamp(d, -20.0, 20.0)
    ratio = tl.exp(nk)
    neg_a = -adv
    l1 = neg_a * ratio
    l2 = neg_a * _clamp(ratio, lo, hi)
    dl2 = neg_a * _passes(ratio, lo, hi)
    m = tl.where(l1 >= l2, l1, l2)
    dm = tl.where(l1 > l2, neg_a, tl.where(l2 > l1, dl2, 0.5 * neg_a + 0.5 * dl2))
    loss = m
    dloss = dm
    lower = tl.zeros_like(m)
    if DUAL:
        l3 = neg_a * clip_c
        neg = adv < 0
        lower = tl.where((m > l3) & neg, 1.0, 0.0)
        loss = tl.where(neg & (m > l3), l3, m)
        dloss = tl.where(neg & (m > l3), 0.0, tl.where(neg & (m == l3), 0.5 * dm, dm))
    pg = loss * is_w
    dpg = dloss * ratio * _passes(d, -20.0, 20.0) * is_w
    clipped = tl.where(l2 > l1, 1.0, 0.0)
    kl = tl.zeros_like(m)
    dkl = tl.zeros_like(m)
    if HAS_REF:
        kl, dkl = _kl_terms(lp, ref, KL_BASE, KL_STRAIGHT)
    return pg, dpg, kl, dkl, clipped, lower, -nk


@triton.jit
def _load_row(ptr, row, stride, t, inb, acc_dtype):
    return tl.load(ptr + row * stride + t, mask=inb, other=0.0).to(acc_dtype)


@triton.jit
def _actor_block_terms(
    lp_ptr, old_ptr, adv_ptr, m_ptr, isw_ptr, ref_ptr, row, t, inb, acc: tl.constexpr,
    s_lp, s_old, s_adv, s_m, s_isw, s_ref,
    lo_hi, lo_mid, lo_lo, hi_hi, hi_mid, hi_lo, c_hi, c_mid, c_lo,
    DUAL: tl.constexpr, HAS_ISW: tl.constexpr, HAS_REF: tl.constexpr,
    KL_BASE: tl.constexpr, KL_STRAIGHT: tl.constexpr,
):
    """The mask and the per-token terms of one block of a row (shared by forward and backward)."""
    mt = tl.load(m_ptr + row * s_m + t, mask=inb, other=0).to(acc)
    lp = _load_row(lp_ptr, row, s_lp, t, inb, acc)
    old = _load_row(old_ptr, row, s_old, t, inb, acc)
    adv = _load_row(adv_ptr, row, s_adv, t, inb, acc)
    is_w = tl.full(t.shape, 1.0, acc)
    if HAS_ISW:
        is_w = _load_row(isw_ptr, row, s_isw, t, inb, acc)
    ref = lp
    if HAS_REF:
        ref = _load_row(ref_ptr, row, s_ref, t, inb, acc)
    lo = join_float(lo_hi, lo_mid, lo_lo, acc)
    hi = join_float(hi_hi, hi_mid, hi_lo, acc)
    clip_c = join_float(c_hi, c_mid, c_lo, acc)
    pg, dpg, kl, dkl, clipped, lower, nlr = _token_terms(lp, old, adv, is_w, ref, lo, hi, clip_c,
                                                          DUAL, HAS_REF, KL_BASE, KL_STRAIGHT)
    return mt, pg, dpg, kl, dkl, clipped, lower, nlr


@triton.jit
def _actor_kernel(
    lp_ptr, old_ptr, adv_ptr, m_ptr, isw_ptr, ent_ptr, ref_ptr, out_ptr, coef_ptr, w_ptr, grad_ptr, grad_ent_ptr,
    T, s_lp, s_old, s_adv, s_m, s_isw, s_ent, s_ref,
    lo_hi, lo_mid, lo_lo, hi_hi, hi_mid, hi_lo, c_hi, c_mid, c_lo,
    DUAL: tl.constexpr, HAS_ISW: tl.constexpr, HAS_ENT: tl.constexpr, HAS_REF: tl.constexpr,
    KL_BASE: tl.constexpr, KL_STRAIGHT: tl.constexpr, BACKWARD: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Forward: the block's 7 column sums into out. Backward: d log_prob (and d entropy)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    acc = out_ptr.dtype.element_ty
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = t < T
    mt, pg, dpg, kl, dkl, clipped, lower, nlr = _actor_block_terms(
        lp_ptr, old_ptr, adv_ptr, m_ptr, isw_ptr, ref_ptr, row, t, inb, acc, s_lp, s_old, s_adv, s_m, s_isw, s_ref,
        lo_hi, lo_mid, lo_lo, hi_hi, hi_mid, hi_lo, c_hi, c_mid, c_lo, DUAL, HAS_ISW, HAS_REF, KL_BASE, KL_STRAIGHT)
    on = mt != 0  # masked-out tokens never contribute, even nan/inf
    if BACKWARD:
        wm = tl.load(w_ptr + row).to(acc) * mt
        g = tl.load(coef_ptr).to(acc) * dpg
        if HAS_REF:
            g += tl.load(coef_ptr + 1).to(acc) * dkl
        tl.store(grad_ptr + row * T + t, tl.where(on, wm * g, 0.0), mask=inb)
        if ENTROPY_GRAD:
            tl.store(grad_ent_ptr + row * T + t, tl.where(on, wm * tl.load(coef_ptr + 2).to(acc), 0.0), mask=inb)
    else:
        base = out_ptr + (row * tl.num_programs(1) + blk) * 7
        tl.store(base + 0, tl.sum(mt, 0))
        tl.store(base + 1, tl.sum(tl.where(on, mt * pg, 0.0), 0))
        ent_sum = tl.zeros((), acc)
        if HAS_ENT:
            ent = _load_row(ent_ptr, row, s_ent, t, inb, acc)
            ent_sum = tl.sum(tl.where(on, mt * ent, 0.0), 0)
        tl.store(base + 2, ent_sum)
        tl.store(base + 3, tl.sum(tl.where(on, mt * kl, 0.0), 0))
        tl.store(base + 4, tl.sum(tl.where(on, mt * clipped, 0.0), 0))
        tl.store(base + 5, tl.sum(tl.where(on, mt * lower, 0.0), 0))
        tl.store(base + 6, tl.sum(tl.where(on, mt * nlr, 0.0), 0))


@triton.jit
def _value_kernel(
    v_ptr, r_ptr, o_ptr, m_ptr, out_ptr, w_ptr, coef_ptr, grad_ptr,
    T, s_v, s_r, s_o, s_m, clip_hi, clip_mid, clip_lo,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Forward: block sums (count, m*L, m*clipped) into out; backward: d vpreds into grad."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    acc = out_ptr.dtype.element_ty
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = t < T
    mt = tl.load(m_ptr + row * s_m + t, mask=inb, other=0).to(acc)
    on = mt != 0
    v = _load_row(v_ptr, row, s_v, t, inb, acc)
    r = _load_row(r_ptr, row, s_r, t, inb, acc)
    o = _load_row(o_ptr, row, s_o, t, inb, acc)
    loss, dloss, clipped = _value_terms(v, r, o, join_float(clip_hi, clip_mid, clip_lo, acc))
    if BACKWARD:
        c = tl.load(coef_ptr).to(acc) * tl.load(w_ptr + row).to(acc)
        tl.store(grad_ptr + row * T + t, tl.where(on, c * mt * dloss, 0.0), mask=inb)
    else:
        base = out_ptr + (row * tl.num_programs(1) + blk) * 3
        tl.store(base + 0, tl.sum(mt, 0))
        tl.store(base + 1, tl.sum(tl.where(on, mt * loss, 0.0), 0))
        tl.store(base + 2, tl.sum(tl.where(on, mt * clipped, 0.0), 0))


@triton.jit
def _kl_kernel(lp_ptr, ref_ptr, kl_ptr, dkl_ptr, T, s_lp, s_ref,
               KL_BASE: tl.constexpr, KL_STRAIGHT: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = t < T
    acc = kl_ptr.dtype.element_ty
    kl, dkl = _kl_terms(_load_row(lp_ptr, row, s_lp, t, inb, acc), _load_row(ref_ptr, row, s_ref, t, inb, acc),
                        KL_BASE, KL_STRAIGHT)
    tl.store(kl_ptr + row * T + t, kl, mask=inb)
    tl.store(dkl_ptr + row * T + t, dkl, mask=inb)


def _block(T, cap=1024):
    return max(16, min(cap, triton.next_power_of_2(T)))


def _actor_launch_shape(T, acc, backward):
    """(BLOCK_T, launch options) of the actor kernel, chosen with aot.py so that no
    specialization spills registers with the oldest (3.6) or the newest Triton we support: 8
    warps from 512 tokens up; float64 forward blocks of at most 512 tokens; and an explicit
    register ceiling at the hardware's 255, which stops Triton 3.6's ptxas (CUDA 12.8) from
    capping the float64 and float16 block sums near 48-80 registers to raise occupancy and
    spilling to get there (without it, 9-13 such specializations spilled 4-20 B at 4 or 8 warps)."""
    import torch

    BLOCK_T = _block(T, 512 if acc == torch.float64 and not backward else 1024)
    return BLOCK_T, {"num_warps": 8 if BLOCK_T >= 512 else 4, "maxnreg": 255}


def _params(clip_low, clip_high, clip_c, kl_code):
    return dict(DUAL=clip_c > 0, KL_BASE=kl_code & 3, KL_STRAIGHT=bool(kl_code & 4)), (
        *split_float(1.0 - clip_low), *split_float(1.0 + clip_high), *split_float(clip_c))


def _stride(x):
    return x.stride(0) if x is not None else 0


def _launch_actor(lp, old, adv, mask, is_weights, entropy, ref, clip_low, clip_high, clip_c, kl_code, *, out,
                  coeffs=None, w=None, grad=None, grad_ent=None):
    B, T = lp.shape
    backward = grad is not None
    BLOCK_T, options = _actor_launch_shape(T, out.dtype, backward)
    flags, consts = _params(clip_low, clip_high, clip_c, kl_code)
    if ref is None:  # no KL term: one specialization whatever kl_kind says
        flags.update(KL_BASE=0, KL_STRAIGHT=False)
    # an absent argument: any valid pointer, of the dtype it has when present (one specialization)
    some = lambda x: x if x is not None else lp  # noqa: E731  inputs: lp's dtype
    spare = lambda x: x if x is not None else out  # noqa: E731  coefficients and outputs: the acc dtype
    _actor_kernel[(B, triton.cdiv(T, BLOCK_T))](
        lp, old, adv, mask, some(is_weights), some(entropy), some(ref), out, spare(coeffs), spare(w), spare(grad),
        spare(grad_ent), T, lp.stride(0), old.stride(0), adv.stride(0), mask.stride(0), _stride(is_weights),
        _stride(entropy), _stride(ref), *consts,
        HAS_ISW=is_weights is not None, HAS_ENT=entropy is not None, HAS_REF=ref is not None, BACKWARD=backward,
        ENTROPY_GRAD=grad_ent is not None, BLOCK_T=BLOCK_T, **flags, **options,
    )


def actor_loss_fwd(lp, old, adv, mask, is_weights, entropy, ref, clip_low, clip_high, clip_c, kl_code):
    """Per-row partial sums [B, 7] (columns of rlhfkern.ops.ppo_loss.COLUMNS)."""
    import torch

    B, T = lp.shape
    acc = acc_dtype(lp)
    out = torch.empty((B, triton.cdiv(T, _actor_launch_shape(T, acc, False)[0]), N_COLUMNS), dtype=acc, device=lp.device)
    _launch_actor(lp, old, adv, mask, is_weights, entropy, ref, clip_low, clip_high, clip_c, kl_code, out=out)
    return out.sum(1)


def actor_loss_bwd(coeffs, w, lp, old, adv, mask, is_weights, ref, clip_low, clip_high, clip_c, kl_code, entropy_grad):
    """(d log_prob, d entropy) [B, T] for the gradient coefficients (c_pg, c_kl, c_ent) and the row
    weights w; d entropy is empty unless entropy_grad."""
    import torch

    acc = acc_dtype(lp)
    grad = torch.empty(lp.shape, dtype=acc, device=lp.device)
    grad_ent = torch.empty(lp.shape if entropy_grad else (0,), dtype=acc, device=lp.device)
    _launch_actor(lp, old, adv, mask, is_weights, None, ref, clip_low, clip_high, clip_c, kl_code, out=grad,
                  coeffs=coeffs.to(acc).contiguous(), w=w.contiguous(), grad=grad,
                  grad_ent=grad_ent if entropy_grad else None)
    return grad, grad_ent


def value_loss_fwd(v, ret, old, mask, clip):
    """Per-row (count, sum m*L, sum m*clipped) [B, 3]."""
    import torch

    B, T = v.shape
    BLOCK_T = _block(T)
    n_blk = triton.cdiv(T, BLOCK_T)
    out = torch.empty((B, n_blk, 3), dtype=acc_dtype(v), device=v.device)
    _value_kernel[(B, n_blk)](v, ret, old, mask, out, out, out, out, T, v.stride(0), ret.stride(0),
                              old.stride(0), mask.stride(0), *split_float(clip), BACKWARD=False, BLOCK_T=BLOCK_T)
    return out.sum(1)


def value_loss_bwd(coeff, w, v, ret, old, mask, clip):
    """d vpreds [B, T] = coeff * w_b * m * dL/dv."""
    import torch

    B, T = v.shape
    BLOCK_T = _block(T)
    grad = torch.empty((B, T), dtype=acc_dtype(v), device=v.device)
    _value_kernel[(B, triton.cdiv(T, BLOCK_T))](
        v, ret, old, mask, grad, w.contiguous(), coeff.to(grad.dtype).contiguous(), grad, T, v.stride(0),
        ret.stride(0), old.stride(0), mask.stride(0), *split_float(clip), BACKWARD=True, BLOCK_T=BLOCK_T)
    return grad


def kl_penalty_fwd(lp, ref, kl_code):
    """(kl, d kl / d lp), [B, T] each."""
    import torch

    B, T = lp.shape
    BLOCK_T = _block(T)
    kl = torch.empty((B, T), dtype=acc_dtype(lp), device=lp.device)
    dkl = torch.empty_like(kl)
    _kl_kernel[(B, triton.cdiv(T, BLOCK_T))](lp, ref, kl, dkl, T, lp.stride(0), ref.stride(0),
                                             KL_BASE=kl_code & 3, KL_STRAIGHT=bool(kl_code & 4), BLOCK_T=BLOCK_T)
    return kl, dkl
