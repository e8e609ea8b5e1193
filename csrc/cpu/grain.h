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

// The row reductions over the vocabulary (log-probs, entropy: logprob.cpp) take 8x that: a
// [4096, 40] call (160k logits, about 0.1 ms on one core) then runs on the calling thread, where
// with 32768 it entered a parallel region of 5 tasks each way, which on a loaded machine could
// cost milliseconds (a worker descheduled at the closing barrier). Large vocabularies are
// unaffected: a row of V >= 262144 logits is a task of its own either way, and [N, 152k] is split
// 2 rows a task.
constexpr int64_t kRowGrainWork = 8 * kGrainWork;

// items per task when each item costs `work_per_item` elements (>= 1 item), for `grain_work`
// elements of work a task
inline int64_t grain_for(int64_t work_per_item, int64_t grain_work = kGrainWork) {
  const int64_t w = std::max<int64_t>(work_per_item, 1);
  return std::max<int64_t>(1, (grain_work + w - 1) / w);
}

}  // namespace rlhfkern
