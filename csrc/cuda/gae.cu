// CUDA GAE: a chunked scan, one thread block per row (formulas: rlhfkern/ops/gae.py).
//
// Both recurrences are affine maps applied backwards in time, x_t = a_t x_{t+1} + b_t:
//   nv_t = (1 - m_t) nv_{t+1} + m_t V_t
//   g_t  = (m_t gamma lam + 1 - m_t) g_{t+1} + m_t delta_t,  delta_t = r_t + gamma nv_{t+1} - V_t
// A block walks its row in chunks of THREADS*ITEMS elements from the end. Thread k holds ITEMS
// consecutive times (thread 0 the latest). Per chunk: (1) each thread composes its items' nv
// maps, a block scan gives each thread the nv entering its items; (2) each thread computes its
// deltas and composes its g maps, a second block scan gives the g entering its items; (3) each
// thread replays its items with verl's exact update order and writes adv and ret. The chunk's
// total maps give the carries into the next (earlier) chunk. Inputs are read once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"

namespace {

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename acc_t, typename T> __device__ __forceinline__ acc_t load_as(const T* p) {
  return static_cast<acc_t>(to_float(*p));
}
template <> __device__ __forceinline__ double load_as<double, double>(const double* p) { return *p; }
template <> __device__ __forceinline__ double load_as<double, int64_t>(const int64_t* p) {
  return static_cast<double>(*p);
}
template <> __device__ __forceinline__ float load_as<float, int64_t>(const int64_t* p) {
  return static_cast<float>(*p);
}
template <> __device__ __forceinline__ double load_as<double, int32_t>(const int32_t* p) {
  return static_cast<double>(*p);
}

// An affine map x -> a x + b; compose(first, then) applies `first`, then `then`.
template <typename acc_t> struct Affine { acc_t a, b; };
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> compose(Affine<acc_t> first, Affine<acc_t> then) {
  return {then.a * first.a, then.a * first.b + then.b};
}

// Exclusive block scan of affine maps in thread order; also returns the block total.
template <typename acc_t, int THREADS>
__device__ Affine<acc_t> block_exclusive_scan(Affine<acc_t> x, Affine<acc_t>* total) {
  constexpr int WARPS = THREADS / 32;
  __shared__ acc_t warp_a[WARPS], warp_b[WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Affine<acc_t> inc = x;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    Affine<acc_t> prev{__shfl_up_sync(0xffffffffu, inc.a, off), __shfl_up_sync(0xffffffffu, inc.b, off)};
    if (lane >= off) inc = compose(prev, inc);
  }
  if (lane == 31) { warp_a[warp] = inc.a; warp_b[warp] = inc.b; }
  __syncthreads();
  // prefix over earlier warps, computed redundantly per thread (WARPS is small)
  Affine<acc_t> before{acc_t(1), acc_t(0)};
  for (int w = 0; w < warp; ++w) before = compose(before, Affine<acc_t>{warp_a[w], warp_b[w]});
  Affine<acc_t> tot{acc_t(1), acc_t(0)};
  for (int w = 0; w < WARPS; ++w) tot = compose(tot, Affine<acc_t>{warp_a[w], warp_b[w]});
  *total = tot;
  Affine<acc_t> excl{__shfl_up_sync(0xffffffffu, inc.a, 1), __shfl_up_sync(0xffffffffu, inc.b, 1)};
  if (lane == 0) excl = Affine<acc_t>{acc_t(1), acc_t(0)};
  __syncthreads();  // warp_a/b are reused by the next scan
  return compose(before, excl);
}

template <typename val_t, typename mask_t, typename acc_t, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS)
gae_kernel(const val_t* __restrict__ r, const val_t* __restrict__ v, const mask_t* __restrict__ m,
           acc_t* __restrict__ adv, acc_t* __restrict__ ret, int64_t T, int64_t sr, int64_t sv,
           int64_t sm, acc_t gamma, acc_t gl) {
  constexpr int64_t CHUNK = int64_t(THREADS) * ITEMS;
  const int64_t row = blockIdx.x;
  r += row * sr;
  v += row * sv;
  m += row * sm;
  adv += row * T;
  ret += row * T;
  acc_t nv_carry = 0, g_carry = 0;
  for (int64_t end = T; end > 0; end -= CHUNK) {
    const int64_t first = end - 1 - int64_t(threadIdx.x) * ITEMS;  // this thread's latest time
    acc_t rr[ITEMS], vv[ITEMS], mm[ITEMS], dd[ITEMS];
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t t = first - j;
      const bool in = t >= 0;  // out of the row: m = 0 makes both maps the identity
      rr[j] = in ? load_as<acc_t>(r + t) : acc_t(0);
      vv[j] = in ? load_as<acc_t>(v + t) : acc_t(0);
      mm[j] = in ? load_as<acc_t>(m + t) : acc_t(0);
    }
    // (1) nv maps
    Affine<acc_t> f{acc_t(1), acc_t(0)};
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) f = compose(f, Affine<acc_t>{acc_t(1) - mm[j], mm[j] * vv[j]});
    Affine<acc_t> tot;
    Affine<acc_t> pre = block_exclusive_scan<acc_t, THREADS>(f, &tot);
    acc_t nv = pre.a * nv_carry + pre.b;
    nv_carry = tot.a * nv_carry + tot.b;
    // (2) deltas and g maps
    f = Affine<acc_t>{acc_t(1), acc_t(0)};
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      dd[j] = rr[j] + gamma * nv - vv[j];
      nv = vv[j] * mm[j] + (acc_t(1) - mm[j]) * nv;
      f = compose(f, Affine<acc_t>{mm[j] * gl + (acc_t(1) - mm[j]), mm[j] * dd[j]});
    }
    pre = block_exclusive_scan<acc_t, THREADS>(f, &tot);
    acc_t g = pre.a * g_carry + pre.b;
    g_carry = tot.a * g_carry + tot.b;
    // (3) replay with verl's update order, write
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t t = first - j;
      g = (dd[j] + gl * g) * mm[j] + (acc_t(1) - mm[j]) * g;
      if (t >= 0) {
        adv[t] = g;
        ret[t] = g + vv[j];
      }
    }
  }
}

constexpr int kThreads = 256;
constexpr int kItems = 8;

template <typename val_t, typename mask_t, typename acc_t>
int launch(const void* r, const void* v, const void* m, void* adv, void* ret, int64_t B, int64_t T,
           int64_t sr, int64_t sv, int64_t sm, double gamma, double lam, cudaStream_t stream) {
  if (B == 0 || T == 0) return 0;
  gae_kernel<val_t, mask_t, acc_t, kThreads, kItems><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      static_cast<const val_t*>(r), static_cast<const val_t*>(v), static_cast<const mask_t*>(m),
      static_cast<acc_t*>(adv), static_cast<acc_t*>(ret), T, sr, sv, sm, static_cast<acc_t>(gamma),
      static_cast<acc_t>(gamma * lam));
  return static_cast<int>(cudaGetLastError());
}

template <typename val_t, typename acc_t>
int dispatch_mask(int mask_dtype, const void* r, const void* v, const void* m, void* adv, void* ret,
                  int64_t B, int64_t T, int64_t sr, int64_t sv, int64_t sm, double gamma, double lam,
                  cudaStream_t s) {
  switch (mask_dtype) {
    case RLHFKERN_F32: return launch<val_t, float, acc_t>(r, v, m, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_F64: return launch<val_t, double, acc_t>(r, v, m, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_F16: return launch<val_t, __half, acc_t>(r, v, m, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_BF16: return launch<val_t, __nv_bfloat16, acc_t>(r, v, m, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_U8: return launch<val_t, uint8_t, acc_t>(r, v, m, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_I32: return launch<val_t, int32_t, acc_t>(r, v, m, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_I64: return launch<val_t, int64_t, acc_t>(r, v, m, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

extern "C" int rlhfkern_gae_cuda(const void* rewards, const void* values, const void* mask, void* adv,
                                 void* ret, int64_t B, int64_t T, int64_t stride_rewards,
                                 int64_t stride_values, int64_t stride_mask, int val_dtype,
                                 int mask_dtype, int out_dtype, double gamma, double lam, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t sr = stride_rewards, sv = stride_values, sm = stride_mask;
  if (out_dtype == RLHFKERN_F64) {
    if (val_dtype != RLHFKERN_F64) return static_cast<int>(cudaErrorInvalidValue);
    return dispatch_mask<double, double>(mask_dtype, rewards, values, mask, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
  }
  if (out_dtype != RLHFKERN_F32) return static_cast<int>(cudaErrorInvalidValue);
  switch (val_dtype) {
    case RLHFKERN_F32: return dispatch_mask<float, float>(mask_dtype, rewards, values, mask, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_F16: return dispatch_mask<__half, float>(mask_dtype, rewards, values, mask, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
    case RLHFKERN_BF16: return dispatch_mask<__nv_bfloat16, float>(mask_dtype, rewards, values, mask, adv, ret, B, T, sr, sv, sm, gamma, lam, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}
