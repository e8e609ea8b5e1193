// Bucket pack/unpack of the resharding executor (rlhfkern/reshard/executor.py): one call per
// bucket copies every segment (a view of a source or destination tensor, any strides) to or from
// one flat buffer, segments in parallel above a grain of work (grain.h), each contiguous run of
// the last dimension with memcpy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "grain.h"

namespace rlhfkern {
namespace {

// copies a 1-D or 2-D view to/from `flat` (contiguous, the view's elements in row-major order)
void copy_view(const at::Tensor& view, char* flat, bool to_flat) {
  const int64_t item = view.element_size();
  char* base = static_cast<char*>(view.data_ptr());
  if (view.dim() == 1 || (view.dim() == 2 && view.stride(1) == 1)) {
    const int64_t rows = view.dim() == 1 ? 1 : view.size(0);
    const int64_t cols = view.dim() == 1 ? view.size(0) : view.size(1);
    const int64_t row_stride = view.dim() == 1 ? 0 : view.stride(0);
    if (view.dim() == 1) TORCH_CHECK(view.stride(0) == 1 || view.size(0) <= 1, "1-D segments must be contiguous");
    for (int64_t r = 0; r < rows; ++r) {
      char* v = base + r * row_stride * item;
      char* f = flat + r * cols * item;
      to_flat ? std::memcpy(f, v, cols * item) : std::memcpy(v, f, cols * item);
    }
    return;
  }
  TORCH_CHECK(false, "segments must be 1-D, or 2-D with a unit stride along the last dimension");
}

void check_segments(const std::vector<at::Tensor>& segs, const at::Tensor& flat) {
  int64_t total = 0;
  for (const auto& s : segs) {
    TORCH_CHECK(s.device().is_cpu() && flat.device().is_cpu(), "pack/unpack: CPU tensors");
    TORCH_CHECK(s.scalar_type() == flat.scalar_type(), "segments and buffer must share one dtype");
    total += s.numel();
  }
  TORCH_CHECK(flat.is_contiguous() && flat.numel() == total, "the buffer must be contiguous with one element per segment element");
}

template <bool kToFlat>
void run(const std::vector<at::Tensor>& segs, const at::Tensor& flat) {
  check_segments(segs, flat);
  std::vector<int64_t> start(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) start[i + 1] = start[i] + segs[i].numel();
  char* f = static_cast<char*>(flat.data_ptr());
  const int64_t item = flat.element_size();
  // segments differ in size: the grain is taken from the mean, so a bucket of less than two
  // tasks' worth of elements is copied serially on the calling thread
  const int64_t n = static_cast<int64_t>(segs.size());
  const int64_t mean = n > 0 ? start[n] / n : 0;
  at::parallel_for(0, n, grain_for(mean), [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) copy_view(segs[i], f + start[i] * item, kToFlat);
  });
}

void pack_segments_cpu(at::TensorList segments, const at::Tensor& out) {
  run<true>(segments.vec(), out);
}

void unpack_segments_cpu(const at::Tensor& buffer, at::TensorList segments) {
  run<false>(segments.vec(), buffer);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhfkern, CPU, m) {
  m.impl("pack_segments", &pack_segments_cpu);
  m.impl("unpack_segments", &unpack_segments_cpu);
}

}  // namespace rlhfkern
