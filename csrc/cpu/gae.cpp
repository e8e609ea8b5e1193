// CPU kernels of the GAE family. Formulas: rlhfkern/ops/gae.py (the reference).
//
// gae: one pass per row, backwards in time, 8 rows interleaved, groups in parallel:
//   delta = r_t + gamma*nv - V_t;  g' = delta + gamma*lam*g
//   nv = m_t*V_t + (1-m_t)*nv;     g = m_t*g' + (1-m_t)*g;   adv_t = g, ret_t = g + V_t
// masked_whiten: per-row masked sums in double (fixed order: deterministic whatever the
// thread count), then (x - mean) * rsqrt(var_unbiased + 1e-8) (+ mean if !shift_mean).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "grain.h"

namespace rlhfkern {
namespace {

constexpr double kWhitenEps = 1e-8;

// R rows at once: the recurrence is a chain of dependent multiply-adds per row, so
// interleaving R independent rows keeps the core's pipelines full.
template <int R, typename val_t, typename mask_t, typename acc_t>
void gae_row_group(const val_t* r, const val_t* v, const mask_t* m, acc_t* adv, acc_t* ret,
                   int64_t b, int64_t T, int64_t sr, int64_t sv, int64_t sm, acc_t gamma, acc_t gl) {
  acc_t nv[R], g[R];
  for (int k = 0; k < R; ++k) nv[k] = g[k] = acc_t(0);
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) {
      const int64_t row = b + k;
      const acc_t vt = static_cast<acc_t>(v[row * sv + t]);
      const acc_t mt = static_cast<acc_t>(m[row * sm + t]);
      const acc_t delta = static_cast<acc_t>(r[row * sr + t]) + gamma * nv[k] - vt;
      const acc_t g_new = delta + gl * g[k];
      nv[k] = vt * mt + (acc_t(1) - mt) * nv[k];
      g[k] = g_new * mt + (acc_t(1) - mt) * g[k];
      adv[row * T + t] = g[k];
      ret[row * T + t] = g[k] + vt;
    }
  }
}

template <typename val_t, typename mask_t, typename acc_t>
void gae_rows(const val_t* r, const val_t* v, const mask_t* m, acc_t* adv, acc_t* ret, int64_t B,
              int64_t T, int64_t sr, int64_t sv, int64_t sm, acc_t gamma, acc_t lam) {
  constexpr int R = 8;
  const acc_t gl = gamma * lam;
  const int64_t groups = (B + R - 1) / R;
  at::parallel_for(0, groups, grain_for(R * T), [&](int64_t g0, int64_t g1) {
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t b = grp * R;
      if (b + R <= B) {
        gae_row_group<R>(r, v, m, adv, ret, b, T, sr, sv, sm, gamma, gl);
      } else {
        for (int64_t row = b; row < B; ++row)
          gae_row_group<1>(r, v, m, adv, ret, row, T, sr, sv, sm, gamma, gl);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs(rewards, values, mask, c10::DeviceType::CPU);
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto acc = acc_type(rewards.scalar_type());
  auto adv = at::empty({B, T}, rewards.options().dtype(acc));
  auto ret = at::empty({B, T}, rewards.options().dtype(acc));
  if (B == 0 || T == 0) return {adv, ret};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    using val_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(), "gae_cpu_mask", [&] {
      using mask_t = scalar_t;
      if (acc == at::kDouble) {
        gae_rows<val_t, mask_t, double>(rewards.data_ptr<val_t>(), values.data_ptr<val_t>(),
                                        mask.data_ptr<mask_t>(), adv.data_ptr<double>(),
                                        ret.data_ptr<double>(), B, T, rewards.stride(0),
                                        values.stride(0), mask.stride(0), gamma, lam);
      } else {
        gae_rows<val_t, mask_t, float>(rewards.data_ptr<val_t>(), values.data_ptr<val_t>(),
                                       mask.data_ptr<mask_t>(), adv.data_ptr<float>(),
                                       ret.data_ptr<float>(), B, T, rewards.stride(0),
                                       values.stride(0), mask.stride(0), static_cast<float>(gamma),
                                       static_cast<float>(lam));
      }
    });
  });
  return {adv, ret};
}

// out[b] = sum_t [m != 0] * m * f(x), n[b] = sum_t m; f(x) = x or (x - center)^2.
template <typename val_t, typename mask_t>
void masked_row_sums(const val_t* x, const mask_t* m, int64_t B, int64_t T, int64_t sx, int64_t sm,
                     bool centered, double center, std::vector<double>& s, std::vector<double>& n) {
  constexpr int L = 8;  // independent partial sums: no add-latency chain, vectorisable
  at::parallel_for(0, B, grain_for(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const val_t* xb = x + b * sx;
      const mask_t* mb = m + b * sm;
      double sl[L] = {}, nl[L] = {};
      auto add = [&](int k, int64_t t) {
        const double mt = static_cast<double>(mb[t]);
        double y = static_cast<double>(xb[t]);
        if (centered) y = (y - center) * (y - center);
        sl[k] += mt != 0 ? y * mt : 0.0;  // masked-out entries never contribute, even nan/inf
        nl[k] += mt;
      };
      int64_t t = 0;
      for (; t + L <= T; t += L)
        for (int k = 0; k < L; ++k) add(k, t + k);
      for (int k = 0; t < T; ++t, ++k) add(k, t);
      double sb = 0, nb = 0;
      for (int k = 0; k < L; ++k) sb += sl[k], nb += nl[k];
      s[b] = sb;
      n[b] = nb;
    }
  });
}

at::Tensor masked_whiten_cpu(const at::Tensor& values, const at::Tensor& mask, bool shift_mean) {
  check_rows(values, "values", values, c10::DeviceType::CPU);
  check_rows(mask, "mask", values, c10::DeviceType::CPU);
  const int64_t B = values.size(0), T = values.size(1);
  const auto acc = acc_type(values.scalar_type());
  auto out = at::empty({B, T}, values.options().dtype(acc));
  if (B == 0 || T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "masked_whiten_cpu", [&] {
    using val_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(), "masked_whiten_cpu_mask", [&] {
      using mask_t = scalar_t;
      const val_t* x = values.data_ptr<val_t>();
      const mask_t* m = mask.data_ptr<mask_t>();
      const int64_t sx = values.stride(0), sm = mask.stride(0);
      std::vector<double> s(B), n(B);
      masked_row_sums(x, m, B, T, sx, sm, false, 0.0, s, n);
      double sum = 0, count = 0;
      for (int64_t b = 0; b < B; ++b) sum += s[b], count += n[b];
      const double mean = sum / (count + kWhitenEps);
      masked_row_sums(x, m, B, T, sx, sm, true, mean, s, n);
      double sq = 0;
      for (int64_t b = 0; b < B; ++b) sq += s[b];
      // unbiased variance; fewer than two masked elements -> nan (verl raises there)
      const double var = count > 1 ? sq / (count + kWhitenEps) * (count / (count - 1))
                                   : std::numeric_limits<double>::quiet_NaN();
      const double rstd = 1.0 / std::sqrt(var + kWhitenEps);
      const double add = shift_mean ? 0.0 : mean;
      AT_DISPATCH_FLOATING_TYPES(acc, "masked_whiten_cpu_out", [&] {
        scalar_t* o = out.data_ptr<scalar_t>();
        const scalar_t mean_a = static_cast<scalar_t>(mean), rstd_a = static_cast<scalar_t>(rstd),
                       add_a = static_cast<scalar_t>(add);
        at::parallel_for(0, B, grain_for(T), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t t = 0; t < T; ++t)
              o[b * T + t] = (static_cast<scalar_t>(x[b * sx + t]) - mean_a) * rstd_a + add_a;
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhfkern, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
}

}  // namespace rlhfkern
