// Per-token math of the policy-gradient family, shared by the CPU kernels and (host/device) the
// CUDA ones; no torch headers. Formulas and gradient rules: rlhfkern/ops/ppo_loss.py.
//
// Every function is a template over the lane type V: a scalar (float, double) or, on the CPU,
// a GCC vector of floats (vfloat4: SSE, vfloat8: AVX2), so that one text serves the scalar and
// the SIMD kernels.
// Per-lane choices are `cond ? a : b` on comparison results (bool for scalars, lane masks for
// vectors); flags that are the same for every token are plain `if`s.
#pragma once
#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define RLHFKERN_HD __host__ __device__ __forceinline__
#else
#define RLHFKERN_HD inline
#endif

namespace rlhfkern {

template <typename V>
struct Elem {
  using type = V;
};
#ifndef __CUDACC__
typedef float vfloat4 __attribute__((vector_size(16)));
typedef int32_t vint4 __attribute__((vector_size(16)));
typedef float vfloat8 __attribute__((vector_size(32)));
typedef int32_t vint8 __attribute__((vector_size(32)));
template <>
struct Elem<vfloat4> {
  using type = float;
};
template <>
struct Elem<vfloat8> {
  using type = float;
};
#endif
template <typename V>
using elem_t = typename Elem<V>::type;

template <typename V>
RLHFKERN_HD V splat(elem_t<V> x) {
  return V{} + x;
}

// 2^n for integral-valued n in [-126, 127]
RLHFKERN_HD float pow2i(float n) {
#ifdef __CUDA_ARCH__
  return exp2f(n);
#else
  return __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
#endif
}
#ifndef __CUDACC__
inline vfloat4 pow2i(vfloat4 n) { return reinterpret_cast<vfloat4>((__builtin_convertvector(n, vint4) + 127) << 23); }
inline vfloat8 pow2i(vfloat8 n) { return reinterpret_cast<vfloat8>((__builtin_convertvector(n, vint8) + 127) << 23); }
#endif

// exp for arguments in [-87, 88] (all callers clamp to [-20, 20]). float: a branch-free
// Cody-Waite reduction and Cephes' degree-6 polynomial (within 2 ulp of expf), the same in
// every lane type so that scalar tails and SIMD bodies agree; double: the library exp.
RLHFKERN_HD double exp_fast(double x) { return exp(x); }
template <typename V>
RLHFKERN_HD V exp_fast(V x) {
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * pow2i(n);
}

// exp for x <= 0 of any size: exp_fast on [-87, 0], exactly 0 below (where expf underflows),
// nan for nan. For softmax terms exp(z - max).
template <typename V>
RLHFKERN_HD V exp_nonpositive(V x) {
  using E = elem_t<V>;
  const V safe = x < E(-87) ? splat<V>(E(-87)) : x;
  const V e = exp_fast(safe);
  return x < E(-87) ? splat<V>(0) : e;
}

template <typename V>
RLHFKERN_HD V clamp_value(V x, elem_t<V> lo, elem_t<V> hi) {
  return x < lo ? splat<V>(lo) : (x > hi ? splat<V>(hi) : x);  // nan stays nan, as torch.clamp
}

// torch.clamp's backward passes the gradient on [lo, hi], bounds included
template <typename V>
RLHFKERN_HD V clamp_pass(V x, elem_t<V> lo, elem_t<V> hi) {
  return ((x >= lo) & (x <= hi)) ? splat<V>(1) : splat<V>(0);
}

template <typename acc_t>
struct TokenParams {
  acc_t lo, hi;      // 1 - clip_low, 1 + clip_high
  acc_t clip_c;      // dual-clip bound; used when dual
  bool dual;
  int kl_base;       // 0 k1, 1 abs, 2 k2, 3 k3
  bool kl_straight;  // "<kind>+": the value of the kind with the gradient of k2
};

// kl_code = base + 4 * straight-through; clip_c <= 0 disables dual-clip.
template <typename acc_t>
inline TokenParams<acc_t> make_token_params(double clip_low, double clip_high, double clip_c, int64_t kl_code) {
  return {static_cast<acc_t>(1.0 - clip_low), static_cast<acc_t>(1.0 + clip_high), static_cast<acc_t>(clip_c),
          clip_c > 0, static_cast<int>(kl_code & 3), (kl_code & 4) != 0};
}

template <typename V>
struct KlTerms {
  V kl, dkl;  // the KL estimate and its derivative w.r.t. lp (w.r.t. ref it is the negative)
};

template <typename V>
RLHFKERN_HD KlTerms<V> kl_terms(V lp, V ref, int base, bool straight) {
  using E = elem_t<V>;
  const V diff = lp - ref;
  KlTerms<V> k;
  switch (base) {
    case 0:
      k.kl = diff, k.dkl = splat<V>(1);
      break;
    case 1:
      k.kl = diff < E(0) ? -diff : diff;
      k.dkl = diff > E(0) ? splat<V>(1) : (diff < E(0) ? splat<V>(-1) : splat<V>(0));
      break;
    case 2:
      k.kl = E(0.5) * (diff * diff), k.dkl = diff;
      break;
    default: {
      const V x0 = ref - lp;
      const V x = clamp_value(x0, E(-20), E(20));
      const V r = exp_fast(x);
      const V v = r - x - E(1);
      k.kl = clamp_value(v, E(-10), E(10));
      k.dkl = -(clamp_pass(v, E(-10), E(10)) * (r - E(1)) * clamp_pass(x0, E(-20), E(20)));
    }
  }
  if (straight) k.dkl = diff;
  return k;
}

template <typename V>
struct ValueTerms {
  V loss, dloss, clipped;
};

// Clipped value loss of one token (verl compute_value_loss, before the 0.5 and the aggregation):
//   vc = max(min(v, old + clip), old - clip),  L = max((v - R)^2, (vc - R)^2)
// with d L / d v under PyTorch's tie rules (binary min/max split the gradient in halves).
template <typename V>
RLHFKERN_HD ValueTerms<V> value_terms(V v, V ret, V old, elem_t<V> clip) {
  using E = elem_t<V>;
  const V up = old + clip, down = old - clip;
  const V u = v > up ? up : v;
  const V du = v < up ? splat<V>(1) : (v > up ? splat<V>(0) : splat<V>(0.5));
  const V vc = u < down ? down : u;
  const V dvc = (u > down ? splat<V>(1) : (u < down ? splat<V>(0) : splat<V>(0.5))) * du;
  const V e1 = v - ret, e2 = vc - ret;
  const V l1 = e1 * e1, l2 = e2 * e2;
  const V d1 = E(2) * e1, d2 = E(2) * e2 * dvc;
  ValueTerms<V> out;
  out.loss = l2 > l1 ? l2 : l1;
  out.dloss = l1 > l2 ? d1 : (l2 > l1 ? d2 : E(0.5) * d1 + E(0.5) * d2);
  out.clipped = l2 > l1 ? splat<V>(1) : splat<V>(0);
  return out;
}

template <typename V>
struct TokenTerms {
  V pg, dpg;                               // is_w * L and its derivative w.r.t. log_prob
  V kl, dkl;                               // the KL estimate and its derivative w.r.t. log_prob
  V clipped, clipped_lower, neg_log_ratio;  // metric terms
};

template <typename V>
RLHFKERN_HD TokenTerms<V> token_terms(V lp, V old, V adv, V is_w, V ref, bool has_ref,
                                      const TokenParams<elem_t<V>>& p) {
  using E = elem_t<V>;
  TokenTerms<V> k;
  const V d = lp - old;
  const V nk = clamp_value(d, E(-20), E(20));
  const V ratio = exp_fast(nk);
  const V neg_a = -adv;
  const V l1 = neg_a * ratio;
  const V l2 = neg_a * clamp_value(ratio, p.lo, p.hi);
  const V dl2 = neg_a * clamp_pass(ratio, p.lo, p.hi);  // d l2 / d ratio
  // M = maximum(l1, l2): at a tie each side gets half the gradient
  const V m = l2 > l1 ? l2 : l1;
  const V dm = l1 > l2 ? neg_a : (l2 > l1 ? dl2 : E(0.5) * neg_a + E(0.5) * dl2);
  V loss = m, dloss = dm, lower = splat<V>(0);
  if (p.dual) {  // where(A < 0, minimum(l3, M), M)
    const V l3 = neg_a * p.clip_c;
    const auto neg = adv < E(0);
    lower = (neg & (m > l3)) ? splat<V>(1) : splat<V>(0);
    loss = (neg & (m > l3)) ? l3 : m;
    dloss = neg ? (m > l3 ? splat<V>(0) : (m < l3 ? dm : E(0.5) * dm)) : dm;
  }
  k.pg = loss * is_w;
  k.dpg = dloss * ratio * clamp_pass(d, E(-20), E(20)) * is_w;
  k.clipped = l2 > l1 ? splat<V>(1) : splat<V>(0);
  k.clipped_lower = lower;
  k.neg_log_ratio = -nk;
  if (has_ref) {
    const KlTerms<V> kl = kl_terms(lp, ref, p.kl_base, p.kl_straight);
    k.kl = kl.kl, k.dkl = kl.dkl;
  } else {
    k.kl = k.dkl = splat<V>(0);
  }
  return k;
}

}  // namespace rlhfkern
