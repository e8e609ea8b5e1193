"""Triton kernels of the GAE family (installed as ``rlhfkern.triton_kernels.gae``).

GAE is two coupled first-order linear recurrences run backwards in time (verl semantics):

    nv_t = m_t * V_t + (1 - m_t) * nv_{t+1}                 nv_T = 0   (last real value)
    g_t  = m_t * (delta_t + gamma*lam*g_{t+1}) + (1 - m_t) * g_{t+1},  g_T = 0
    delta_t = r_t + gamma * nv_{t+1} - V_t
    adv_t = g_t,  ret_t = g_t + V_t

Each has the form x_t = a_t * x_{t+1} + b_t, an associative scan over (a, b) pairs. One
program owns a row and walks it in chunks of BLOCK_T from the end to the start; inside a
chunk both recurrences are parallel scans (the chunk is loaded time-reversed so that a
forward scan runs backwards in time), and the last state of a chunk is the carry into the
next one. The value recurrence is needed *shifted* (delta_t reads nv_{t+1}), so its scan
runs over the elements at t+1: nvnext_t = (1 - m_{t+1}) nvnext_{t+1} + m_{t+1} V_{t+1}.

Whitening (verl ``masked_whiten``) is three small kernels: per-row masked sums, per-row
masked squared deviations from the mean, then the elementwise (x - mean) * rsqrt(var + eps).
Statistics stay on the device: no host sync.
"""

import triton
import triton.language as tl

from ._common import join_float, split_float


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    # (x -> a_l x + b_l) followed by (x -> a_r x + b_r)
    return a_right * a_left, a_right * b_left + b_right


@triton.jit
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr,
    T, stride_r, stride_v, stride_m,
    gamma_hi, gamma_mid, gamma_lo, gl_hi, gl_mid, gl_lo,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r_row = r_ptr + row * stride_r
    v_row = v_ptr + row * stride_v
    m_row = m_ptr + row * stride_m
    adv_row = adv_ptr + row * T
    ret_row = ret_ptr + row * T
    acc_dtype = adv_ptr.dtype.element_ty
    gamma = join_float(gamma_hi, gamma_mid, gamma_lo, acc_dtype)
    gamma_lam = join_float(gl_hi, gl_mid, gl_lo, acc_dtype)

    i = tl.arange(0, BLOCK_T)
    last = i == BLOCK_T - 1
    nv_carry = tl.zeros((), acc_dtype)  # nv_{t+1} for the chunk's latest t
    g_carry = tl.zeros((), acc_dtype)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in range(0, n_chunks):
        # i = 0 is the latest time of the chunk
        t = T - 1 - c * BLOCK_T - i
        inb = t >= 0
        nxt = (t + 1 < T) & inb
        r = tl.load(r_row + t, mask=inb, other=0.0).to(acc_dtype)
        v = tl.load(v_row + t, mask=inb, other=0.0).to(acc_dtype)
        m = tl.load(m_row + t, mask=inb, other=0).to(acc_dtype)
        v1 = tl.load(v_row + t + 1, mask=nxt, other=0.0).to(acc_dtype)
        m1 = tl.load(m_row + t + 1, mask=nxt, other=0).to(acc_dtype)

        # nvnext_t = (1 - m_{t+1}) * nvnext_{t+1} + m_{t+1} * V_{t+1}
        a_nv, b_nv = tl.associative_scan((1.0 - m1, m1 * v1), 0, _affine_combine)
        nv_next = a_nv * nv_carry + b_nv
        delta = r + gamma * nv_next - v

        # g_t = (m_t*gamma*lam + 1 - m_t) * g_{t+1} + m_t * delta_t; identity outside the row
        a_g = tl.where(inb, m * gamma_lam + (1.0 - m), 1.0)
        b_g = tl.where(inb, m * delta, 0.0)
        a_g, b_g = tl.associative_scan((a_g, b_g), 0, _affine_combine)
        g = a_g * g_carry + b_g

        tl.store(adv_row + t, g, mask=inb)
        tl.store(ret_row + t, g + v, mask=inb)
        # carries into the next (earlier) chunk: values at the chunk's earliest time
        # nv_{t0} = m_{t0} V_{t0} + (1 - m_{t0}) nv_{t0+1}
        nv_carry = tl.sum(tl.where(last, m * v + (1.0 - m) * nv_next, 0.0), 0)
        g_carry = tl.sum(tl.where(last, g, 0.0), 0)


@triton.jit
def _masked_row_sums_kernel(
    x_ptr, m_ptr, mean_ptr, out_ptr,
    T, stride_x, stride_m,
    CENTERED: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[row] = (sum_t m*y, sum_t m) with y = x (CENTERED=False) or (x - mean)^2."""
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = out_ptr.dtype.element_ty
    mean = 0.0
    if CENTERED:
        mean = tl.load(mean_ptr).to(acc_dtype)
    s = tl.zeros((BLOCK_T,), acc_dtype)
    w = tl.zeros((BLOCK_T,), acc_dtype)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        inb = t < T
        x = tl.load(x_ptr + row * stride_x + t, mask=inb, other=0.0).to(acc_dtype)
        m = tl.load(m_ptr + row * stride_m + t, mask=inb, other=0).to(acc_dtype)
        y = x
        if CENTERED:
            y = (x - mean) * (x - mean)
        # masked-out entries never contribute, even when x is nan/inf there
        s += tl.where(m != 0, y * m, 0.0)
        w += m
    tl.store(out_ptr + row * 2, tl.sum(s, 0))
    tl.store(out_ptr + row * 2 + 1, tl.sum(w, 0))


@triton.jit
def _whiten_apply_kernel(
    x_ptr, mean_ptr, rstd_ptr, out_ptr,
    T, stride_x, shift_mean: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    acc_dtype = out_ptr.dtype.element_ty
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = t < T
    x = tl.load(x_ptr + row * stride_x + t, mask=inb, other=0.0).to(acc_dtype)
    mean = tl.load(mean_ptr).to(acc_dtype)
    rstd = tl.load(rstd_ptr).to(acc_dtype)
    y = (x - mean) * rstd
    if not shift_mean:
        y += mean
    tl.store(out_ptr + row * T + t, y, mask=inb)


def _block_t(T, cap):
    return max(16, min(cap, triton.next_power_of_2(T)))


def gae(rewards, values, mask, gamma, lam, out_dtype, block_t=1024):
    """Launch the GAE kernel; inputs are [B, T] with a unit stride along T."""
    import torch

    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    BLOCK_T = _block_t(T, block_t)
    _gae_kernel[(B,)](
        rewards, values, mask, adv, ret,
        T, rewards.stride(0), values.stride(0), mask.stride(0),
        *split_float(gamma), *split_float(float(gamma) * float(lam)),
        BLOCK_T=BLOCK_T, num_warps=4 if BLOCK_T <= 1024 else 8,
    )
    return adv, ret


def masked_whiten(values, mask, shift_mean, out_dtype, eps=1e-8, block_t=4096):
    """verl masked_whiten, statistics in float64 on the device: no host sync."""
    import torch

    B, T = values.shape
    dev = values.device
    BLOCK_T = _block_t(T, block_t)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    partial = torch.empty((B, 2), dtype=acc, device=dev)
    # 4096 fp64 sums with an int64 mask spilled on sm_90 with 4 warps, fp16 with 8 (aot.py)
    warps = 8 if BLOCK_T >= 4096 and acc == torch.float64 else 4
    dummy = torch.zeros((), dtype=acc, device=dev)
    _masked_row_sums_kernel[(B,)](values, mask, dummy, partial, T, values.stride(0), mask.stride(0),
                                  CENTERED=False, BLOCK_T=BLOCK_T, num_warps=warps)
    sums = partial.double().sum(0)
    count = sums[1]
    mean = sums[0] / (count + eps)
    _masked_row_sums_kernel[(B,)](values, mask, mean.to(acc), partial, T, values.stride(0),
                                  mask.stride(0), CENTERED=True, BLOCK_T=BLOCK_T, num_warps=warps)
    var = partial[:, 0].double().sum() / (count + eps) * (count / (count - 1))
    # fewer than two masked elements: the unbiased variance does not exist -> nan
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    rstd = torch.rsqrt(var + eps)
    out = torch.empty((B, T), dtype=out_dtype, device=dev)
    grid = (B, triton.cdiv(T, BLOCK_T))
    _whiten_apply_kernel[grid](values, mean, rstd, out, T, values.stride(0),
                               shift_mean=bool(shift_mean), BLOCK_T=BLOCK_T)
    return out
