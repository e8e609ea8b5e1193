// The CPU row loops (actor_rows.h, softmax_rows.h) compiled for AVX2 + FMA (8 floats a lane), in
// a namespace of their own so that nothing compiled here is shared with the baseline build.
// System headers come first, outside the target region.
#include <math.h>
#include <stdint.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "avx2.h"

bool rlhfkern_simd::avx2_in_use() {
  static const bool use = [] {
    const char* force = std::getenv("RLHFKERN_CPU_SIMD");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !(force && std::string(force) == "sse");
  }();
  return use;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace rlhfkern_avx2 {
#include "../token_math.h"
#include "actor_rows.h"
#include "softmax_rows.h"
}  // namespace rlhfkern_avx2

namespace rlhfkern_simd {
namespace {

namespace k = rlhfkern_avx2::rlhfkern;

template <typename mask_t>
k::Row<float, mask_t> row(const RowPtrs& r) {
  return {r.lp, r.old, r.adv, r.isw, r.ent, r.ref, static_cast<const mask_t*>(r.mask)};
}

k::TokenParams<float> params(const Params& p) { return {p.lo, p.hi, p.clip_c, p.dual, p.kl_base, p.kl_straight}; }

}  // namespace

void actor_fwd_row_avx2(const RowPtrs& r, int mask_kind, int64_t T, const Params& p, float* out7) {
  switch (mask_kind) {
    case kMaskF32: return k::actor_fwd_row<k::vfloat8>(row<float>(r), T, params(p), out7);
    case kMaskU8: return k::actor_fwd_row<k::vfloat8>(row<uint8_t>(r), T, params(p), out7);
    default: return k::actor_fwd_row<k::vfloat8>(row<int64_t>(r), T, params(p), out7);
  }
}

void actor_bwd_row_avx2(const RowPtrs& r, int mask_kind, int64_t T, const Params& p, const float* c, float wb,
                        float* grad, float* grad_ent) {
  switch (mask_kind) {
    case kMaskF32: return k::actor_bwd_row<k::vfloat8>(row<float>(r), T, params(p), c, wb, grad, grad_ent);
    case kMaskU8: return k::actor_bwd_row<k::vfloat8>(row<uint8_t>(r), T, params(p), c, wb, grad, grad_ent);
    default: return k::actor_bwd_row<k::vfloat8>(row<int64_t>(r), T, params(p), c, wb, grad, grad_ent);
  }
}

void logprob_row_avx2(const float* x, int64_t n, float temp, const int64_t* labels, int64_t k, float* lp, float* ent,
                      float* stats) {
  k::logprob_row<k::vfloat8>(x, n, temp, labels, k, lp, ent, stats);
}

void logprob_rows_small_avx2(const float* x, int64_t sx, int64_t n, float temp, const int64_t* labels, int64_t k,
                             float* lp, float* ent, float* stats, int64_t r0, int64_t r1) {
  k::logprob_rows_small<k::vfloat8>(x, sx, n, temp, labels, k, lp, ent, stats, r0, r1);
}

void logprob_row_backward_avx2(const float* x, float* out, int64_t n, float temp, float lse, float ez, float g_sum,
                               float g_ent, const int64_t* labels, const float* g_lp, int64_t k) {
  k::softmax_row_backward<k::vfloat8>(x, out, n, temp, lse, ez, g_sum, g_ent, labels, g_lp, k);
}

}  // namespace rlhfkern_simd

#pragma GCC pop_options
