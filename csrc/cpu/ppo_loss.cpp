// CPU kernels of the policy-gradient family (formulas: rlhfkern/ops/ppo_loss.py).
//
// actor_loss_fwd: one pass over [B, T]; per row the sums over tokens with mask m != 0 of
//   count = m, pg = m*L*is_w, entropy = m*H, kl = m*kl, clipped = m*[L2 > L1],
//   clipped_lower = m*[M > L3 and A < 0], neg_log_ratio = m*(old - lp) clamped  -> [B, 7].
// actor_loss_bwd: one pass recomputing from the inputs:
//   d lp = w_b m (c_pg is_w dL/dlp + c_kl dkl/dlp), with PyTorch's rules at ties;  d H = w_b m c_ent.
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
#include "actor_rows.h"
#include "grain.h"

namespace rlhfkern {
namespace {

constexpr int kColumns = 7;

struct Inputs {
  at::Tensor lp, old, adv, mask, isw, ent, ref;
};

void check_inputs(const Inputs& in) {
  const auto dev = c10::DeviceType::CPU;
  check_rows(in.lp, "log_prob", in.lp, dev);
  check_rows(in.old, "old_log_prob", in.lp, dev);
  check_rows(in.adv, "advantages", in.lp, dev);
  check_rows(in.mask, "mask", in.lp, dev);
  const char* names[3] = {"is_weights", "entropy", "ref_log_prob"};
  const at::Tensor* opt[3] = {&in.isw, &in.ent, &in.ref};
  for (int i = 0; i < 3; ++i) {
    if (!opt[i]->defined()) continue;
    check_rows(*opt[i], names[i], in.lp, dev);
    TORCH_CHECK(opt[i]->scalar_type() == in.lp.scalar_type(), names[i], " must have the dtype of log_prob");
  }
  TORCH_CHECK(in.old.scalar_type() == in.lp.scalar_type() && in.adv.scalar_type() == in.lp.scalar_type(),
              "log_prob, old_log_prob and advantages must share one dtype");
}

template <typename val_t, typename mask_t>
Row<val_t, mask_t> row_of(const Inputs& in, int64_t b) {
  auto at = [b](const at::Tensor& x) -> const val_t* {
    return x.defined() ? x.data_ptr<val_t>() + b * x.stride(0) : nullptr;
  };
  return {at(in.lp), at(in.old), at(in.adv), at(in.isw), at(in.ent), at(in.ref),
          in.mask.data_ptr<mask_t>() + b * in.mask.stride(0)};
}

// The AVX2 + FMA build serves float inputs with float, bool/uint8 or int64 masks when the
// processor has it; everything else runs the baseline (SSE) build of the same row loops.
template <typename val_t, typename mask_t>
int avx2_mask_kind() {
  if (!rlhfkern_simd::avx2_in_use() || !std::is_same_v<val_t, float>) return -1;
  if (std::is_same_v<mask_t, float>) return rlhfkern_simd::kMaskF32;
  if (std::is_same_v<mask_t, bool> || std::is_same_v<mask_t, uint8_t>) return rlhfkern_simd::kMaskU8;
  if (std::is_same_v<mask_t, int64_t>) return rlhfkern_simd::kMaskI64;
  return -1;
}

template <typename val_t, typename mask_t>
rlhfkern_simd::RowPtrs simd_row(const Row<val_t, mask_t>& r) {
  auto f = [](const val_t* x) { return reinterpret_cast<const float*>(x); };  // val_t is float when used
  return {f(r.lp), f(r.old), f(r.adv), f(r.isw), f(r.ent), f(r.ref), r.m};
}

template <typename acc_t>
rlhfkern_simd::Params simd_params(const TokenParams<acc_t>& p) {
  return {float(p.lo), float(p.hi), float(p.clip_c), p.dual, p.kl_base, p.kl_straight};
}

// Lane type of the baseline build: 4 floats (SSE2 is in every x86-64), or scalar for double
template <typename acc_t>
using Lane = std::conditional_t<std::is_same_v<acc_t, float>, vfloat4, acc_t>;

template <typename val_t, typename mask_t, typename acc_t>
void actor_fwd_impl(const Inputs& in, const TokenParams<acc_t>& p, acc_t* out) {
  const int64_t B = in.lp.size(0), T = in.lp.size(1);
  const int kind = avx2_mask_kind<val_t, mask_t>();
  at::parallel_for(0, B, grain_for(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto r = row_of<val_t, mask_t>(in, b);
      if constexpr (std::is_same_v<acc_t, float>) {
        if (kind >= 0) {
          rlhfkern_simd::actor_fwd_row_avx2(simd_row(r), kind, T, simd_params(p), out + b * kColumns);
          continue;
        }
      }
      actor_fwd_row<Lane<acc_t>>(r, T, p, out + b * kColumns);
    }
  });
}

template <typename val_t, typename mask_t, typename acc_t>
void actor_bwd_impl(const Inputs& in, const TokenParams<acc_t>& p, const acc_t* c, const acc_t* w, acc_t* grad,
                    acc_t* grad_ent) {
  const int64_t B = in.lp.size(0), T = in.lp.size(1);
  const int kind = avx2_mask_kind<val_t, mask_t>();
  at::parallel_for(0, B, grain_for(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto r = row_of<val_t, mask_t>(in, b);
      acc_t* ge = grad_ent ? grad_ent + b * T : nullptr;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (kind >= 0) {
          rlhfkern_simd::actor_bwd_row_avx2(simd_row(r), kind, T, simd_params(p), c, w[b], grad + b * T, ge);
          continue;
        }
      }
      actor_bwd_row<Lane<acc_t>>(r, T, p, c, w[b], grad + b * T, ge);
    }
  });
}

template <typename F>
void dispatch_types(const Inputs& in, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.lp.scalar_type(), "actor_loss_cpu", [&] {
    using val_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, in.mask.scalar_type(), "actor_loss_cpu_mask", [&] {
      using mask_t = scalar_t;
      if (in.lp.scalar_type() == at::kDouble) {
        f(val_t{}, mask_t{}, double{});
      } else {
        f(val_t{}, mask_t{}, float{});
      }
    });
  });
}

at::Tensor actor_loss_fwd_cpu(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                              const at::Tensor& mask, const c10::optional<at::Tensor>& isw,
                              const c10::optional<at::Tensor>& ent, const c10::optional<at::Tensor>& ref,
                              double clip_low, double clip_high, double clip_c, int64_t kl_code) {
  Inputs in{lp, old, adv, mask, isw.value_or(at::Tensor()), ent.value_or(at::Tensor()), ref.value_or(at::Tensor())};
  check_inputs(in);
  auto out = at::zeros({lp.size(0), kColumns}, lp.options().dtype(acc_type(lp.scalar_type())));
  if (lp.numel() == 0) return out;
  dispatch_types(in, [&](auto v, auto mk, auto a) {
    using val_t = decltype(v);
    using mask_t = decltype(mk);
    using acc_t = decltype(a);
    const auto p = make_token_params<acc_t>(clip_low, clip_high, clip_c, kl_code);
    actor_fwd_impl<val_t, mask_t, acc_t>(in, p, out.data_ptr<acc_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> actor_loss_bwd_cpu(
    const at::Tensor& coeffs, const at::Tensor& w, const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
    const at::Tensor& mask, const c10::optional<at::Tensor>& isw, const c10::optional<at::Tensor>& ref,
    double clip_low, double clip_high, double clip_c, int64_t kl_code, bool entropy_grad) {
  Inputs in{lp, old, adv, mask, isw.value_or(at::Tensor()), at::Tensor(), ref.value_or(at::Tensor())};
  check_inputs(in);
  const auto acc = acc_type(lp.scalar_type());
  TORCH_CHECK(coeffs.numel() == 3 && coeffs.scalar_type() == acc && coeffs.device().is_cpu(),
              "coeffs must be 3 CPU values (c_pg, c_kl, c_ent) of the accumulation dtype");
  TORCH_CHECK(w.numel() == lp.size(0) && w.scalar_type() == acc && w.is_contiguous() && w.device().is_cpu(),
              "w must hold one CPU weight per row of the accumulation dtype");
  auto grad = at::empty(lp.sizes(), lp.options().dtype(acc));
  auto grad_ent = entropy_grad ? at::empty(lp.sizes(), lp.options().dtype(acc)) : at::empty({0}, lp.options().dtype(acc));
  if (lp.numel() == 0) return {grad, grad_ent};
  dispatch_types(in, [&](auto v, auto mk, auto a) {
    using val_t = decltype(v);
    using mask_t = decltype(mk);
    using acc_t = decltype(a);
    const auto p = make_token_params<acc_t>(clip_low, clip_high, clip_c, kl_code);
    const auto c = coeffs.contiguous();
    actor_bwd_impl<val_t, mask_t, acc_t>(in, p, c.data_ptr<acc_t>(), w.data_ptr<acc_t>(), grad.data_ptr<acc_t>(),
                                         entropy_grad ? grad_ent.data_ptr<acc_t>() : nullptr);
  });
  return {grad, grad_ent};
}

// ---- value loss: per-row (count, m*L, m*clipped) forward; d vpreds = c w_b m dL/dv backward
template <typename val_t, typename mask_t, typename acc_t>
void value_impl(const at::Tensor& v, const at::Tensor& ret, const at::Tensor& old, const at::Tensor& mask,
                acc_t clip, acc_t* partial, const acc_t* w, acc_t coeff, acc_t* grad) {
  const int64_t B = v.size(0), T = v.size(1);
  const val_t *pv = v.data_ptr<val_t>(), *pr = ret.data_ptr<val_t>(), *po = old.data_ptr<val_t>();
  const mask_t* pm = mask.data_ptr<mask_t>();
  const int64_t sv = v.stride(0), sr = ret.stride(0), so = old.stride(0), sm = mask.stride(0);
  at::parallel_for(0, B, grain_for(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t count = 0, sum = 0, clipped = 0;
      for (int64_t t = 0; t < T; ++t) {
        const acc_t mt = static_cast<acc_t>(pm[b * sm + t]);
        if (mt == acc_t(0)) {
          if (grad) grad[b * T + t] = acc_t(0);
          continue;
        }
        const ValueTerms<acc_t> k = value_terms<acc_t>(static_cast<acc_t>(pv[b * sv + t]), static_cast<acc_t>(pr[b * sr + t]),
                                                       static_cast<acc_t>(po[b * so + t]), clip);
        if (grad) {
          grad[b * T + t] = coeff * w[b] * mt * k.dloss;
        } else {
          count += mt, sum += mt * k.loss, clipped += mt * k.clipped;
        }
      }
      if (partial) partial[b * 3] = count, partial[b * 3 + 1] = sum, partial[b * 3 + 2] = clipped;
    }
  });
}

void check_value_inputs(const at::Tensor& v, const at::Tensor& ret, const at::Tensor& old, const at::Tensor& mask) {
  const auto dev = c10::DeviceType::CPU;
  check_rows(v, "vpreds", v, dev);
  check_rows(ret, "returns", v, dev);
  check_rows(old, "old_values", v, dev);
  check_rows(mask, "mask", v, dev);
  TORCH_CHECK(ret.scalar_type() == v.scalar_type() && old.scalar_type() == v.scalar_type(),
              "vpreds, returns and old_values must share one dtype");
}

template <typename F>
void dispatch_value_types(const at::Tensor& v, const at::Tensor& mask, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "value_loss_cpu", [&] {
    using val_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(), "value_loss_cpu_mask", [&] {
      using mask_t = scalar_t;
      if (v.scalar_type() == at::kDouble) {
        f(val_t{}, mask_t{}, double{});
      } else {
        f(val_t{}, mask_t{}, float{});
      }
    });
  });
}

at::Tensor value_loss_fwd_cpu(const at::Tensor& v, const at::Tensor& ret, const at::Tensor& old,
                              const at::Tensor& mask, double clip) {
  check_value_inputs(v, ret, old, mask);
  auto out = at::zeros({v.size(0), 3}, v.options().dtype(acc_type(v.scalar_type())));
  if (v.numel() == 0) return out;
  dispatch_value_types(v, mask, [&](auto vt, auto mk, auto a) {
    using acc_t = decltype(a);
    value_impl<decltype(vt), decltype(mk), acc_t>(v, ret, old, mask, static_cast<acc_t>(clip),
                                                   out.data_ptr<acc_t>(), nullptr, acc_t(0), nullptr);
  });
  return out;
}

at::Tensor value_loss_bwd_cpu(const at::Tensor& coeff, const at::Tensor& w, const at::Tensor& v,
                              const at::Tensor& ret, const at::Tensor& old, const at::Tensor& mask, double clip) {
  check_value_inputs(v, ret, old, mask);
  const auto acc = acc_type(v.scalar_type());
  TORCH_CHECK(coeff.numel() == 1 && coeff.device().is_cpu(), "coeff must be one CPU value");
  TORCH_CHECK(w.numel() == v.size(0) && w.scalar_type() == acc && w.is_contiguous() && w.device().is_cpu(),
              "w must hold one CPU weight per row of the accumulation dtype");
  auto grad = at::empty(v.sizes(), v.options().dtype(acc));
  if (v.numel() == 0) return grad;
  dispatch_value_types(v, mask, [&](auto vt, auto mk, auto a) {
    using acc_t = decltype(a);
    value_impl<decltype(vt), decltype(mk), acc_t>(v, ret, old, mask, static_cast<acc_t>(clip), nullptr,
                                                   w.data_ptr<acc_t>(), coeff.item<acc_t>(), grad.data_ptr<acc_t>());
  });
  return grad;
}

// ---- KL penalty, elementwise over [B, T] rows: (kl, d kl / d log_prob)
std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(const at::Tensor& lp, const at::Tensor& ref, int64_t kl_code) {
  check_rows(lp, "log_prob", lp, c10::DeviceType::CPU);
  check_rows(ref, "ref_log_prob", lp, c10::DeviceType::CPU);
  TORCH_CHECK(ref.scalar_type() == lp.scalar_type(), "ref_log_prob must have the dtype of log_prob");
  const auto acc = acc_type(lp.scalar_type());
  auto kl = at::empty(lp.sizes(), lp.options().dtype(acc));
  auto dkl = at::empty(lp.sizes(), lp.options().dtype(acc));
  const int64_t B = lp.size(0), T = lp.size(1);
  if (lp.numel() == 0) return {kl, dkl};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "kl_penalty_cpu", [&] {
    using val_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "kl_penalty_cpu_acc", [&] {
      using acc_t = scalar_t;
      const val_t *pl = lp.data_ptr<val_t>(), *pr = ref.data_ptr<val_t>();
      acc_t *pk = kl.data_ptr<acc_t>(), *pd = dkl.data_ptr<acc_t>();
      const int64_t sl = lp.stride(0), sr = ref.stride(0);
      const int base = static_cast<int>(kl_code & 3);
      const bool straight = (kl_code & 4) != 0;
      at::parallel_for(0, B, grain_for(T), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t t = 0; t < T; ++t) {
            const KlTerms<acc_t> k = kl_terms<acc_t>(static_cast<acc_t>(pl[b * sl + t]),
                                                     static_cast<acc_t>(pr[b * sr + t]), base, straight);
            pk[b * T + t] = k.kl, pd[b * T + t] = k.dkl;
          }
      });
    });
  });
  return {kl, dkl};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhfkern, CPU, m) {
  m.impl("actor_loss_fwd", &actor_loss_fwd_cpu);
  m.impl("actor_loss_bwd", &actor_loss_bwd_cpu);
  m.impl("value_loss_fwd", &value_loss_fwd_cpu);
  m.impl("value_loss_bwd", &value_loss_bwd_cpu);
  m.impl("kl_penalty_fwd", &kl_penalty_cpu);
}

}  // namespace rlhfkern
