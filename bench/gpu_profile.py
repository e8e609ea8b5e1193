"""Where the GPU time goes, for the benchmark rows that miss their targets (bench/results/<card>.md):
per op call, the host wall time (one call, synchronised), the pipelined time (20 calls, one
sync: what the benchmarks report), and the summed device time of its kernels (torch.profiler),
with the largest kernels; then sweeps of the Triton block shapes that set memory-bound speed
(log-prob forward/backward, GAE), each against a copy of the same bytes; then the token tile of
linear_logprobs. One GPU call, about a minute after the build:

    python bench/gpu_profile.py --out bench/results/<card>-profile.md

`--small` runs the same code at toy sizes (a CPU with TRITON_INTERPRET=1 checks the script).
"""

import argparse
import statistics
import sys
import time

import torch

import rlhfkern
from rlhfkern.ops import logprob as lp_ops

LINES = []


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def host_ms(fn, device, reps=5):
    """Median wall time of one call, synchronised before and after."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pipelined_ms(fn, device, inner=20):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / inner


def device_ms(fn, device, reps=10):
    """Median device time of one call by CUDA events (host time where there is no GPU)."""
    if device != "cuda":
        return host_ms(fn, device, reps)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kernel_profile(fn, device, calls=3):
    """(summed device time of the kernels per call in ms, [(name, ms per call)] largest first)."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return float("nan"), []
    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync(device)
        per_name = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / calls
    except Exception as e:  # the profiler is an aid: the timings above stand without it
        return float("nan"), [(f"profiler failed: {type(e).__name__}: {e}", float("nan"))]
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])
    return sum(per_name.values()), ranked


def copy_ms(nbytes, device):
    """A device copy of nbytes / 2 bytes: nbytes read + written."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return device_ms(lambda: dst.copy_(src), device)


def profile_row(name, fn, device, nbytes=None):
    try:
        fn()  # warm-up: compiles, allocator, cuBLAS heuristics
        fn()
        h, p = host_ms(fn, device), pipelined_ms(fn, device)
        k, ranked = kernel_profile(fn, device)
        floor = f"{copy_ms(nbytes, device):.3f}" if nbytes else ""
    except Exception as e:  # one failing row must not cost the others
        say(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | | | | | |")
        return
    top = "; ".join(f"{n[:60]} {t:.3f}" for n, t in ranked[:3])
    say(f"| {name} | {h:.3f} | {p:.3f} | {k:.3f} | {len(ranked)} | {floor} | {top} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="toy sizes (a CPU check of the script)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small
    g = torch.Generator(device).manual_seed(0)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    say(f"# Where the time goes: {name}")
    say()
    say(f"torch {torch.__version__}; times in ms. host: one call, synchronised; pipelined: 20 calls, one sync "
        "(the benchmarks' figure); kernels: summed device time of the call's kernels (torch.profiler); "
        "copy: device copy of the bytes the op must move (read + written).")
    say()
    say("| call | host | pipelined | kernels | kernel launches | copy | largest kernels (ms per call) |")
    say("|---|---:|---:|---:|---:|---:|---|")

    # --- actor loss fwd + bwd, 8M tokens (1M tokens --small: 4 x 300)
    B, T = (4, 300) if small else (1024, 8192)
    lp = (torch.randn(B, T, generator=g, device=device) * 0.5 - 1).requires_grad_()
    old = lp.detach() + torch.randn(B, T, generator=g, device=device) * 0.1
    adv = torch.randn(B, T, generator=g, device=device)
    m = (torch.rand(B, T, generator=g, device=device) > 0.2).float()
    ent = (torch.rand(B, T, generator=g, device=device) * 3).requires_grad_()
    ref = lp.detach() + torch.randn(B, T, generator=g, device=device) * 0.1
    isw = torch.rand(B, T, generator=g, device=device) + 0.5

    def actor(backend):
        def step():
            lp.grad = ent.grad = None
            loss, _ = rlhfkern.actor_loss(lp, old, adv, m, entropy=ent, ref_log_prob=ref, entropy_coeff=0.01,
                                          kl_coef=0.1, kl_kind="low_var_kl", is_weights=isw, backend=backend)
            loss.backward()
        return step

    tokens = f"{B * T / 2**20:.2g}M tokens"
    for backend in ("triton", "torch"):
        profile_row(f"actor loss fwd+bwd {tokens} fp32 {backend}", actor(backend), device, B * T * 4 * 16)
    from rlhfkern.triton_kernels import ppo_loss as ppo_k

    if device == "cuda" or small:
        fwd = lambda: ppo_k.actor_loss_fwd(lp.detach(), old, adv, m, isw, ent.detach(), ref, 0.2, 0.2, 3.0, 3)  # noqa: E731
        profile_row(f"actor loss: the forward kernel alone, {tokens}", fwd, device, B * T * 4 * 7)
        coeffs = torch.ones(3, device=device)
        w = torch.full((B,), 1.0 / (B * T), device=device)
        bwd = lambda: ppo_k.actor_loss_bwd(coeffs, w, lp.detach(), old, adv, m, isw, ref, 0.2, 0.2, 3.0, 3, True)  # noqa: E731
        profile_row(f"actor loss: the backward kernel alone, {tokens}", bwd, device, B * T * 4 * 8)
    del lp, old, adv, m, ent, ref, isw

    # --- GAE
    for B, T in ([(4, 300)] if small else [(256, 4096), (1024, 8192), (4096, 8192)]):
        r = torch.randn(B, T, generator=g, device=device)
        v = torch.randn(B, T, generator=g, device=device)
        mk = (torch.rand(B, T, generator=g, device=device) > 0.1).float()
        for backend in [b for b in ("cuda", "triton") if b in rlhfkern.backends()] or ["cpu"]:
            profile_row(f"gae {B}x{T} fp32 {backend}", lambda: rlhfkern.gae(r, v, mk, 0.99, 0.95, backend=backend),
                        device, B * T * 4 * 5)

    # --- log-probs, bf16 [16384, 151936]
    N, V = (8, 5000) if small else (16384, 151936)
    dt = torch.float32 if small else torch.bfloat16
    x = torch.empty(N, V, dtype=dt, device=device).normal_(0, 2, generator=g)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    esize = x.element_size()
    profile_row(f"logprobs fwd {N}x{V} {x.dtype} triton",
                lambda: rlhfkern.logprobs(x, labels, backend="triton"), device, N * V * esize)

    def fwd_bwd():
        leaf = x.detach().requires_grad_()
        rlhfkern.logprobs(leaf.view_as(leaf), labels, backend="triton").sum().backward()
    profile_row(f"logprobs fwd+bwd {N}x{V} {x.dtype} triton", fwd_bwd, device, 3 * N * V * esize)
    say()

    # --- sweeps
    if device == "cuda" or small:
        import triton

        from rlhfkern.triton_kernels import gae as gae_k
        from rlhfkern.triton_kernels import logprob as lp_k
        from rlhfkern.triton_kernels._common import split_float

        floor = copy_ms(N * V * esize, device)
        say(f"Log-prob forward kernel, {N}x{V} {x.dtype}: ms by BLOCK_V x num_warps "
            f"(copy of the logits' bytes: {floor:.3f} ms; the default is BLOCK_V=4096, 4 warps)")
        say()
        warps = (4, 8, 16)
        say("| BLOCK_V | " + " | ".join(f"{w} warps" for w in warps) + " |")
        say("|---:|" + "---:|" * len(warps))
        lp_out = torch.empty((N, 1), dtype=torch.float32, device=device)
        stats = torch.empty((N, 2), dtype=torch.float32, device=device)
        lab2 = labels[:, None].contiguous()
        for bv in ((512, 1024) if small else (2048, 4096, 8192, 16384)):
            cells = []
            for nw in warps:
                def launch():
                    lp_k._logprob_fwd_kernel[(N,)](x, lab2, lp_out, lp_out, stats, V, 1, x.stride(0),
                                                   *split_float(1.0), HAS_ENT=False, BLOCK_V=bv, num_warps=nw)
                try:
                    launch()
                    t = device_ms(launch, device)
                    cells.append(f"{t:.3f} ({100 * floor / t:.0f}%)")
                except Exception as e:  # a config that does not compile or launch
                    cells.append(f"{type(e).__name__}")
            say(f"| {bv} | " + " | ".join(cells) + " |")
        say()
        floor = copy_ms(2 * N * V * esize, device)
        say(f"Log-prob backward kernel (d logits, out of place), {N}x{V} {x.dtype}: ms by BLOCK_V x num_warps "
            f"(copy of logits read + d logits written: {floor:.3f} ms; the default is 4096, 4 warps)")
        say()
        say("| BLOCK_V | " + " | ".join(f"{w} warps" for w in warps) + " |")
        say("|---:|" + "---:|" * len(warps))
        out = torch.empty_like(x)
        g_lp = torch.randn(N, 1, generator=g, device=device)
        g_sum = g_lp[:, 0].contiguous()
        for bv in ((512, 1024) if small else (1024, 2048, 4096, 8192)):
            cells = []
            for nw in warps:
                def launch():
                    lp_k._logprob_bwd_kernel[(N, triton.cdiv(V, bv))](
                        x, out, lab2, g_lp, g_sum, g_sum, stats, V, 1, x.stride(0), out.stride(0), *split_float(1.0),
                        HAS_ENT=False, BLOCK_V=bv, num_warps=nw)
                try:
                    launch()
                    t = device_ms(launch, device)
                    cells.append(f"{t:.3f} ({100 * floor / t:.0f}%)")
                except Exception as e:
                    cells.append(f"{type(e).__name__}")
            say(f"| {bv} | " + " | ".join(cells) + " |")
        say()
        del x, out
        for B, T in ([(4, 300)] if small else [(1024, 8192), (4096, 8192)]):
            r = torch.randn(B, T, generator=g, device=device)
            v = torch.randn(B, T, generator=g, device=device)
            mk = (torch.rand(B, T, generator=g, device=device) > 0.1).float()
            floor = copy_ms(B * T * 4 * 5, device)
            cells = []
            for bt in (256, 512, 1024, 2048, 4096):
                try:
                    gae_k.gae(r, v, mk, 0.99, 0.95, torch.float32, block_t=bt)
                    t = device_ms(lambda: gae_k.gae(r, v, mk, 0.99, 0.95, torch.float32, block_t=bt), device)
                    cells.append(f"{bt}: {t:.3f} ({100 * floor / t:.0f}%)")
                except Exception as e:
                    cells.append(f"{bt}: {type(e).__name__}")
            if "cuda" in rlhfkern.backends():
                t = device_ms(lambda: torch.ops.rlhfkern.gae(r, v, mk, 0.99, 0.95), device)
                cells.append(f"CUDA kernel: {t:.3f} ({100 * floor / t:.0f}%)")
            say(f"GAE {B}x{T} fp32, device ms by Triton BLOCK_T (default 1024) (% of copy, {floor:.3f} ms): "
                + ", ".join(cells))
            say()

    # --- linear_logprobs: the token tile
    for n, H, dt in ([(130, 64, torch.float32)] if small else [(4096, 1024, torch.float32), (16384, 4096, torch.bfloat16)]):
        V = 9000 if small else 151936
        hidden = torch.randn(n, H, generator=g, device=device).to(dt).requires_grad_()
        weight = (torch.randn(V, H, generator=g, device=device) * 0.02).to(dt).requires_grad_()
        lab = torch.randint(0, V, (n,), generator=g, device=device)

        def materialised():
            hidden.grad = weight.grad = None
            torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, lab[:, None]).sum().backward()

        def ours():
            hidden.grad = weight.grad = None
            rlhfkern.linear_logprobs(hidden, weight, lab, backend="triton").sum().backward()

        materialised()
        cells = [f"materialised {host_ms(materialised, device, 2):.1f}"]
        saved = lp_ops.TOKEN_TILE, lp_ops.VOCAB_TILE
        tiles = [(128, 8192), (1024, 8192), (4096, 8192), (4096, 32768)]
        if n >= 16384:
            tiles = tiles[1:]  # the 128-token tile: 2.2 s a call there (bench/results)
        try:
            for tt, vt in tiles:
                lp_ops.TOKEN_TILE, lp_ops.VOCAB_TILE = tt, vt
                ours()
                cells.append(f"tiles {tt}x{vt} {host_ms(ours, device, 2):.1f}")
        except Exception as e:
            cells.append(f"failed: {type(e).__name__}: {str(e)[:200]}")
        finally:
            lp_ops.TOKEN_TILE, lp_ops.VOCAB_TILE = saved
        say(f"linear_logprobs fwd+bwd N={n} H={H} V={V} {dt}, host ms per call by (token tile x vocab tile; "
            "the default is 128 x 8192): " + ", ".join(cells))
        say()
        del hidden, weight
        if device == "cuda":
            torch.cuda.empty_cache()

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    sys.exit(main())
