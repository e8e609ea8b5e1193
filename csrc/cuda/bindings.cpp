// Torch wrappers of the CUDA launchers (csrc/cuda/launch.h), registered for the CUDA key.
// Built only when torch has CUDA and nvcc is found (setup.py defines RLHFKERN_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.h"

namespace rlhfkern {
namespace {

int dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return RLHFKERN_F32;
    case at::kDouble: return RLHFKERN_F64;
    case at::kHalf: return RLHFKERN_F16;
    case at::kBFloat16: return RLHFKERN_BF16;
    case at::kBool:
    case at::kByte: return RLHFKERN_U8;
    case at::kInt: return RLHFKERN_I32;
    case at::kLong: return RLHFKERN_I64;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", x.scalar_type());
  }
}

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed with CUDA error ", err);
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs(rewards, values, mask, c10::DeviceType::CUDA);
  const at::cuda::CUDAGuard guard(rewards.device());
  const auto acc = acc_type(rewards.scalar_type());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto adv = at::empty({B, T}, rewards.options().dtype(acc));
  auto ret = at::empty({B, T}, rewards.options().dtype(acc));
  check_cuda(rlhfkern_gae_cuda(rewards.data_ptr(), values.data_ptr(), mask.data_ptr(), adv.data_ptr(),
                               ret.data_ptr(), B, T, rewards.stride(0), values.stride(0), mask.stride(0),
                               dtype_code(rewards, "rewards"), dtype_code(mask, "mask"),
                               dtype_code(adv, "out"), gamma, lam,
                               at::cuda::getCurrentCUDAStream().stream()),
             "rlhfkern_gae_cuda");
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhfkern, CUDA, m) { m.impl("gae", &gae_cuda); }

}  // namespace rlhfkern
