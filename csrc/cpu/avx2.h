// The AVX2 + FMA build of the CPU row loops (avx2.cpp: actor_rows.h, softmax_rows.h), called
// by csrc/cpu/ppo_loss.cpp and csrc/cpu/logprob.cpp when the processor has both; torch-free,
// plain types only (the two builds keep their templates in different namespaces).
#pragma once
#include <stdint.h>

namespace rlhfkern_simd {

struct RowPtrs {
  const float *lp, *old, *adv, *isw, *ent, *ref;  // absent optional inputs: null
  const void* mask;
};

enum MaskKind { kMaskF32 = 0, kMaskU8 = 1, kMaskI64 = 2 };  // bool masks are read as uint8

struct Params {
  float lo, hi, clip_c;
  bool dual;
  int kl_base;
  bool kl_straight;
};

// The processor has AVX2 and FMA, and RLHFKERN_CPU_SIMD=sse (read once) does not force the
// baseline build.
bool avx2_in_use();

void actor_fwd_row_avx2(const RowPtrs& r, int mask_kind, int64_t T, const Params& p, float* out7);
void actor_bwd_row_avx2(const RowPtrs& r, int mask_kind, int64_t T, const Params& p, const float* c, float wb,
                        float* grad, float* grad_ent);

void logprob_row_avx2(const float* x, int64_t n, float temp, const int64_t* labels, int64_t k, float* lp, float* ent,
                      float* stats);
void logprob_rows_small_avx2(const float* x, int64_t sx, int64_t n, float temp, const int64_t* labels, int64_t k,
                             float* lp, float* ent, float* stats, int64_t r0, int64_t r1);
void logprob_row_backward_avx2(const float* x, float* out, int64_t n, float temp, float lse, float ez, float g_sum,
                               float g_ent, const int64_t* labels, const float* g_lp, int64_t k);

}  // namespace rlhfkern_simd
