// Grain sizes of the CPU kernels' at::parallel_for: how many items (rows, row groups, segments)
// one task takes, from the work per item, so that a task holds at least kGrainWork elements of
// work. at::parallel_for runs [begin, end) serially on the calling thread, without entering an
// OpenMP parallel region, when end - begin <= grain; otherwise it splits the range into
// min(threads, ceil(items / grain)) tasks. With grain 1 every call with two or more rows entered a
// parallel region: a few microseconds on a quiet machine, but on a loaded one the region's
// closing barrier waits for a worker thread the scheduler has not run yet (milliseconds per
// region), which made the tile loops (linear_logprobs: one call per 128-row tile) and small
// vocabularies (V = 40) far slower than eager torch. PyTorch's own elementwise kernels use
// at::internal::GRAIN_SIZE = 32768 elements per task; we use the same. The kernels reduce each
// row in a fixed order whatever the split: results are bitwise the same for any grain or thread
// count.
#pragma once

#include <algorithm>
#include <cstdint>

namespace rlhfkern {

constexpr int64_t kGrainWork = 32768;  // elements of work per task, as at::internal::GRAIN_SIZE

// items per task when each item costs `work_per_item` elements (>= 1 item)
inline int64_t grain_for(int64_t work_per_item) {
  const int64_t w = std::max<int64_t>(work_per_item, 1);
  return std::max<int64_t>(1, (kGrainWork + w - 1) / w);
}

}  // namespace rlhfkern
