// CPU kernels of the log-prob family (formulas: rlhfkern/ops/logprob.py, row loops:
// softmax_rows.h). OpenMP over rows, serial below a grain of work (grain.h), vocabulary tiles
// inside a row; float logits run the AVX2 build of the row loops when the processor has it
// (csrc/cpu/avx2.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "../common.h"
#include "../token_math.h"
#include "avx2.h"
#include "grain.h"
#include "softmax_rows.h"

namespace rlhfkern {
namespace {

void check_logprob_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "logits must be a 2-D CPU tensor [N, V]");
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, "logits must have unit stride along V");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous() && labels.device().is_cpu(),
              "labels must be a contiguous int64 CPU tensor [N, K]");
}

template <typename acc_t>
using SoftmaxLane = std::conditional_t<std::is_same_v<acc_t, float>, vfloat4, acc_t>;

// rows [r0, r1) of the forward; float logits take the AVX2 build when it is in use
template <typename T, typename A>
void fwd_rows(const T* x, int64_t sx, int64_t V, A temp, const int64_t* lab, int64_t K, A* lp, A* ent, A* st,
              int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<A, float>) {  // short rows: a lane group at a time (logprob_rows_small)
    if (V <= kSmallVocab) {
      if constexpr (std::is_same_v<T, float>) {
        if (rlhfkern_simd::avx2_in_use()) {
          rlhfkern_simd::logprob_rows_small_avx2(x, sx, V, temp, lab, K, lp, ent, st, r0, r1);
          return;
        }
      }
      logprob_rows_small<vfloat4>(x, sx, V, temp, lab, K, lp, ent, st, r0, r1);
      return;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    A* e = ent ? ent + r : nullptr;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
      if (rlhfkern_simd::avx2_in_use()) {
        rlhfkern_simd::logprob_row_avx2(x + r * sx, V, temp, lab + r * K, K, lp + r * K, e, st + 2 * r);
        continue;
      }
    }
    logprob_row<SoftmaxLane<A>>(x + r * sx, V, temp, lab + r * K, K, lp + r * K, e, st + 2 * r);
  }
}

template <typename T, typename A>
void bwd_rows(const T* x, int64_t sx, T* o, int64_t so, int64_t V, A temp, const int64_t* lab, int64_t K, const A* g,
              const A* ge, const A* st, const A* gs, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* l = lab + r * K;
    A g_sum = 0;  // ignored (-100) and out-of-range labels carry no gradient
    for (int64_t j = 0; j < K; ++j) g_sum += (l[j] >= 0 && l[j] < V) ? g[r * K + j] : A(0);
    if (gs) g_sum = gs[r];
    const A g_ent = ge ? ge[r] : A(0);
    if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
      if (rlhfkern_simd::avx2_in_use()) {
        rlhfkern_simd::logprob_row_backward_avx2(x + r * sx, o + r * so, V, temp, st[2 * r], st[2 * r + 1], g_sum,
                                                 g_ent, l, g + r * K, K);
        continue;
      }
    }
    softmax_row_backward<SoftmaxLane<A>>(x + r * sx, o + r * so, V, temp, st[2 * r], st[2 * r + 1], g_sum, g_ent, l,
                                         g + r * K, K);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                double temperature, bool entropy) {
  check_logprob_inputs(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1), K = labels.size(1);
  const auto acc = acc_type(logits.scalar_type());
  auto opts = logits.options().dtype(acc);
  auto lp = at::empty({N, K}, opts);
  auto ent = at::empty({entropy ? N : 0}, opts);
  auto stats = at::empty({N, 2}, opts);
  const int64_t* lab = labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "logprobs_fwd_cpu_acc", [&] {
      using A = scalar_t;
      const T* x = logits.data_ptr<T>();
      A *plp = lp.data_ptr<A>(), *pst = stats.data_ptr<A>(), *pent = entropy ? ent.data_ptr<A>() : nullptr;
      const int64_t sx = logits.stride(0);
      at::parallel_for(0, N, grain_for(V + K, kRowGrainWork), [&](int64_t r0, int64_t r1) {
        fwd_rows<T, A>(x, sx, V, A(temperature), lab, K, plp, pent, pst, r0, r1);
      });
    });
  });
  return {lp, ent, stats};
}

// d logits into out (a new buffer, or the logits themselves for the in-place backward)
void logprobs_bwd_into(const at::Tensor& grad_lp, const c10::optional<at::Tensor>& grad_ent, const at::Tensor& logits,
                       const at::Tensor& labels, const at::Tensor& stats, double temperature,
                       const c10::optional<at::Tensor>& g_sum, at::Tensor& out) {
  check_logprob_inputs(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1), K = labels.size(1);
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK(grad_lp.sizes() == labels.sizes() && grad_lp.scalar_type() == acc, "grad_lp must be [N, K] of the acc dtype");
  TORCH_CHECK(stats.size(0) == N && stats.size(1) == 2 && stats.scalar_type() == acc, "stats must be [N, 2]");
  const bool has_ent = grad_ent.has_value() && grad_ent->defined() && grad_ent->numel() > 0;
  const auto g = grad_lp.contiguous();
  const auto st = stats.contiguous();
  const auto ge = has_ent ? grad_ent->contiguous() : at::Tensor();
  const bool has_gs = g_sum.has_value() && g_sum->defined();
  TORCH_CHECK(!has_gs || (g_sum->numel() == N && g_sum->scalar_type() == acc), "g_sum must hold N values of the acc dtype");
  const auto gs = has_gs ? g_sum->contiguous() : at::Tensor();
  const int64_t* lab = labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "logprobs_bwd_cpu_acc", [&] {
      using A = scalar_t;
      const T* x = logits.data_ptr<T>();
      T* o = out.data_ptr<T>();
      const A *pg = g.data_ptr<A>(), *ps = st.data_ptr<A>(), *pe = has_ent ? ge.data_ptr<A>() : nullptr;
      const int64_t sx = logits.stride(0), so = out.stride(0);
      at::parallel_for(0, N, grain_for(V + K, kRowGrainWork), [&](int64_t r0, int64_t r1) {
        bwd_rows<T, A>(x, sx, o, so, V, A(temperature), lab, K, pg, pe, ps, has_gs ? gs.data_ptr<A>() : nullptr, r0, r1);
      });
    });
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_lp, const c10::optional<at::Tensor>& grad_ent,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                            double temperature, const c10::optional<at::Tensor>& g_sum) {
  auto out = at::empty(logits.sizes(), logits.options());
  logprobs_bwd_into(grad_lp, grad_ent, logits, labels, stats, temperature, g_sum, out);
  return out;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& grad_lp, const c10::optional<at::Tensor>& grad_ent,
                              at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                              double temperature, const c10::optional<at::Tensor>& g_sum) {
  logprobs_bwd_into(grad_lp, grad_ent, logits, labels, stats, temperature, g_sum, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhfkern, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cpu);
}

}  // namespace rlhfkern
