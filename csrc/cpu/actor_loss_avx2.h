// The AVX2 + FMA build of the actor-loss row loops (actor_loss_avx2.cpp), called by
// csrc/cpu/ppo_loss.cpp when the processor has both; torch-free, plain types only (the two
// builds keep their templates in different namespaces).
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

bool avx2_available();
void actor_fwd_row_avx2(const RowPtrs& r, int mask_kind, int64_t T, const Params& p, float* out7);
void actor_bwd_row_avx2(const RowPtrs& r, int mask_kind, int64_t T, const Params& p, const float* c, float wb,
                        float* grad, float* grad_ent);

}  // namespace rlhfkern_simd
