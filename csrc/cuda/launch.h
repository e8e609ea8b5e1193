// Plain C launch interface of rlhfkern's CUDA kernels: no torch headers, so that plain nvcc
// compile-checks them anywhere (CMakeLists.txt) and csrc/cuda/bindings.cpp binds them to torch.
// Every launcher returns a cudaError_t as int (0 = success) and runs on the given stream.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types a kernel reads, by code.
enum rlhfkern_dtype {
  RLHFKERN_F32 = 0,
  RLHFKERN_F64 = 1,
  RLHFKERN_F16 = 2,
  RLHFKERN_BF16 = 3,
  RLHFKERN_U8 = 4,  // also bool
  RLHFKERN_I32 = 5,
  RLHFKERN_I64 = 6,
};

// GAE (verl semantics) over [B, T] rows with unit stride along T; rows start every stride_*
// elements. rewards and values share val_dtype; outputs adv/ret are contiguous [B, T] of
// out_dtype (F32 or F64, which is also the accumulation type).
int rlhfkern_gae_cuda(const void* rewards, const void* values, const void* mask, void* adv,
                      void* ret, int64_t B, int64_t T, int64_t stride_rewards,
                      int64_t stride_values, int64_t stride_mask, int val_dtype, int mask_dtype,
                      int out_dtype, double gamma, double lam, void* stream);

#ifdef __cplusplus
}
#endif
