// Per-token math of the policy-gradient family, shared by the CPU kernels and (host/device) the
// CUDA ones; no torch headers. Formulas and gradient rules: rlhfkern/ops/ppo_loss.py.
#pragma once
#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define RLHFKERN_HD __host__ __device__ __forceinline__
#else
#define RLHFKERN_HD inline
#endif

namespace rlhfkern {

template <typename acc_t>
struct TokenParams {
  acc_t lo, hi;    // 1 - clip_low, 1 + clip_high
  acc_t clip_c;    // dual-clip bound; used when dual
  bool dual;
  int kl_base;     // 0 k1, 1 abs, 2 k2, 3 k3
  bool kl_straight;  // "<kind>+": value of kind, gradient of k2
};

// kl_code = base + 4 * straight-through; clip_c <= 0 disables dual-clip.
template <typename acc_t>
inline TokenParams<acc_t> make_token_params(double clip_low, double clip_high, double clip_c, int64_t kl_code) {
  return {static_cast<acc_t>(1.0 - clip_low), static_cast<acc_t>(1.0 + clip_high), static_cast<acc_t>(clip_c),
          clip_c > 0, static_cast<int>(kl_code & 3), (kl_code & 4) != 0};
}

template <typename acc_t>
struct TokenTerms {
  acc_t pg, dpg;          // is_w * L and its derivative w.r.t. log_prob
  acc_t kl, dkl;          // the KL estimate and its derivative w.r.t. log_prob
  acc_t clipped, clipped_lower, neg_log_ratio;  // metric terms
};

template <typename acc_t>
RLHFKERN_HD acc_t clamp_value(acc_t x, acc_t lo, acc_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);  // nan stays nan, as torch.clamp
}

// torch.clamp's backward passes the gradient on [lo, hi], bounds included
template <typename acc_t>
RLHFKERN_HD acc_t clamp_pass(acc_t x, acc_t lo, acc_t hi) {
  return (x >= lo && x <= hi) ? acc_t(1) : acc_t(0);
}

// The KL estimate of (lp, ref) and its derivative w.r.t. lp (w.r.t. ref it is the negative).
template <typename acc_t>
RLHFKERN_HD void kl_terms(acc_t lp, acc_t ref, int base, bool straight, acc_t* kl, acc_t* dkl) {
  const acc_t diff = lp - ref;
  switch (base) {
    case 0:
      *kl = diff, *dkl = 1;
      break;
    case 1:
      *kl = fabs(diff), *dkl = diff > 0 ? acc_t(1) : (diff < 0 ? acc_t(-1) : acc_t(0));
      break;
    case 2:
      *kl = acc_t(0.5) * (diff * diff), *dkl = diff;
      break;
    default: {
      const acc_t x0 = ref - lp;
      const acc_t x = clamp_value(x0, acc_t(-20), acc_t(20));
      const acc_t r = exp(x);
      const acc_t v = r - x - acc_t(1);
      *kl = clamp_value(v, acc_t(-10), acc_t(10));
      *dkl = -(clamp_pass(v, acc_t(-10), acc_t(10)) * (r - acc_t(1)) * clamp_pass(x0, acc_t(-20), acc_t(20)));
    }
  }
  if (straight) *dkl = diff;
}

// Clipped value loss of one token (verl compute_value_loss, before the 0.5 and the aggregation):
//   vc = max(min(v, old + clip), old - clip),  L = max((v - R)^2, (vc - R)^2)
// with d L / d v under PyTorch's tie rules (binary min/max split the gradient in halves).
template <typename acc_t>
RLHFKERN_HD void value_terms(acc_t v, acc_t ret, acc_t old, acc_t clip, acc_t* loss, acc_t* dloss, acc_t* clipped) {
  const acc_t up = old + clip, down = old - clip;
  const acc_t u = v < up ? v : (v > up ? up : v);
  const acc_t du = v < up ? acc_t(1) : (v > up ? acc_t(0) : acc_t(0.5));
  const acc_t vc = u > down ? u : (u < down ? down : u);
  const acc_t dvc = (u > down ? acc_t(1) : (u < down ? acc_t(0) : acc_t(0.5))) * du;
  const acc_t e1 = v - ret, e2 = vc - ret;
  const acc_t l1 = e1 * e1, l2 = e2 * e2;
  const acc_t d1 = acc_t(2) * e1, d2 = acc_t(2) * e2 * dvc;
  if (l1 > l2) {
    *loss = l1, *dloss = d1;
  } else if (l2 > l1) {
    *loss = l2, *dloss = d2;
  } else {
    *loss = l1, *dloss = acc_t(0.5) * d1 + acc_t(0.5) * d2;
  }
  *clipped = l2 > l1 ? acc_t(1) : acc_t(0);
}

template <typename acc_t>
RLHFKERN_HD TokenTerms<acc_t> token_terms(acc_t lp, acc_t old, acc_t adv, acc_t is_w, acc_t ref, bool has_ref,
                                          const TokenParams<acc_t>& p) {
  TokenTerms<acc_t> k;
  const acc_t d = lp - old;
  const acc_t nk = clamp_value(d, acc_t(-20), acc_t(20));
  const acc_t ratio = exp(nk);
  const acc_t neg_a = -adv;
  const acc_t l1 = neg_a * ratio;
  const acc_t l2 = neg_a * clamp_value(ratio, p.lo, p.hi);
  const acc_t dl2 = neg_a * clamp_pass(ratio, p.lo, p.hi);  // d l2 / d ratio
  // M = maximum(l1, l2); at a tie each side gets half the gradient
  acc_t m, dm;
  if (l1 > l2) {
    m = l1, dm = neg_a;
  } else if (l2 > l1) {
    m = l2, dm = dl2;
  } else {
    m = l1, dm = acc_t(0.5) * neg_a + acc_t(0.5) * dl2;
  }
  acc_t loss = m, dloss = dm, lower = 0;
  if (p.dual) {
    const acc_t l3 = neg_a * p.clip_c;
    lower = (m > l3 && adv < 0) ? acc_t(1) : acc_t(0);
    if (adv < 0) {  // minimum(l3, M)
      if (m > l3) {
        loss = l3, dloss = 0;
      } else if (!(m < l3)) {
        dloss = acc_t(0.5) * dm;
      }
    }
  }
  k.pg = loss * is_w;
  k.dpg = dloss * ratio * clamp_pass(d, acc_t(-20), acc_t(20)) * is_w;
  k.clipped = l2 > l1 ? acc_t(1) : acc_t(0);
  k.clipped_lower = lower;
  k.neg_log_ratio = -nk;
  k.kl = k.dkl = 0;
  if (has_ref) kl_terms(lp, ref, p.kl_base, p.kl_straight, &k.kl, &k.dkl);
  return k;
}

}  // namespace rlhfkern
