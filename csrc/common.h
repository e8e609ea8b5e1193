// Helpers shared by the torch-facing C++ of every backend (cpu/*.cpp, cuda/bindings.cpp).
#pragma once
#include <ATen/ATen.h>

namespace rlhfkern {

// Accumulation and output dtype of an op on inputs of dtype t: float64 for float64, else float32.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// x is a [B, T] row-major tensor (unit stride along T) shaped and placed like `like`.
inline void check_rows(const at::Tensor& x, const char* name, const at::Tensor& like, c10::DeviceType device) {
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [B, T], got ", x.dim(), " dims");
  TORCH_CHECK(x.sizes() == like.sizes(), name, " has shape ", x.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(x.device().type() == device && x.device() == like.device(), name, " is on ", x.device(),
              ", expected ", like.device(), " (", device, ")");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, " must have unit stride along T");
}

// rewards, values, mask of GAE: [B, T] rows on `device`, rewards and values of one dtype.
inline void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                             c10::DeviceType device) {
  check_rows(rewards, "rewards", rewards, device);
  check_rows(values, "values", rewards, device);
  check_rows(mask, "mask", rewards, device);
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "values must have the dtype of rewards");
}

}  // namespace rlhfkern
