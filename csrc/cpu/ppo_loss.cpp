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

// SIMD lanes: float accumulation runs kWidth tokens at a time as a GCC vector (token_math.h), the
// row's tail and double accumulation one token at a time; the same template serves both.
template <typename acc_t>
struct Lanes {
  using type = acc_t;
  static constexpr int width = 1;
};
constexpr int kWidth = sizeof(vfloat) / sizeof(float);
template <>
struct Lanes<float> {
  using type = vfloat;
  static constexpr int width = kWidth;
};

template <typename V, typename T>
inline V load_lanes(const T* p) {
  if constexpr (std::is_same_v<V, vfloat> && std::is_same_v<T, float>) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<V, vfloat>) {
    float tmp[kWidth];
    for (int j = 0; j < kWidth; ++j) tmp[j] = static_cast<float>(p[j]);
    V v;
    std::memcpy(&v, tmp, sizeof v);
    return v;
  } else {
    return static_cast<V>(*p);
  }
}

template <typename V>
inline void store_lanes(elem_t<V>* p, V v) {
  if constexpr (std::is_same_v<V, vfloat>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    *p = v;
  }
}

template <typename V>
inline elem_t<V> sum_lanes(V v) {  // a fixed order: deterministic
  if constexpr (std::is_same_v<V, vfloat>) {
    float s = 0;
    for (int j = 0; j < kWidth; ++j) s += v[j];
    return s;
  } else {
    return v;
  }
}

// One row's inputs, already offset to the row. Absent optional inputs are never read.
template <typename val_t, typename mask_t>
struct Row {
  const val_t *lp, *old, *adv, *isw, *ent, *ref;
  const mask_t* m;
};

template <typename val_t, typename mask_t>
Row<val_t, mask_t> row_of(const Inputs& in, int64_t b) {
  auto at = [b](const at::Tensor& x) -> const val_t* {
    return x.defined() ? x.data_ptr<val_t>() + b * x.stride(0) : nullptr;
  };
  return {at(in.lp), at(in.old), at(in.adv), at(in.isw), at(in.ent), at(in.ref),
          in.mask.data_ptr<mask_t>() + b * in.mask.stride(0)};
}

template <typename V, typename val_t, typename mask_t>
inline TokenTerms<V> terms_at(const Row<val_t, mask_t>& r, int64_t t, const TokenParams<elem_t<V>>& p) {
  const V l = load_lanes<V>(r.lp + t);
  return token_terms<V>(l, load_lanes<V>(r.old + t), load_lanes<V>(r.adv + t),
                        r.isw ? load_lanes<V>(r.isw + t) : splat<V>(1), r.ref ? load_lanes<V>(r.ref + t) : l,
                        r.ref != nullptr, p);
}

// sums[c] += the column c terms of tokens [t0, t1), in steps of V's width
template <typename V, typename val_t, typename mask_t>
void actor_fwd_span(const Row<val_t, mask_t>& r, int64_t t0, int64_t t1, const TokenParams<elem_t<V>>& p, V* sums) {
  constexpr int W = std::is_same_v<V, vfloat> ? kWidth : 1;
  const V zero = splat<V>(0);
  for (int64_t t = t0; t + W <= t1; t += W) {
    const V mt = load_lanes<V>(r.m + t);
    const auto on = mt != elem_t<V>(0);  // masked-out tokens never contribute, even nan/inf
    const TokenTerms<V> k = terms_at<V>(r, t, p);
    sums[0] += mt;
    sums[1] += on ? mt * k.pg : zero;
    if (r.ent) sums[2] += on ? mt * load_lanes<V>(r.ent + t) : zero;
    sums[3] += on ? mt * k.kl : zero;
    sums[4] += on ? mt * k.clipped : zero;
    sums[5] += on ? mt * k.clipped_lower : zero;
    sums[6] += on ? mt * k.neg_log_ratio : zero;
  }
}

// d log_prob (and d entropy when grad_ent) of tokens [t0, t1); c = (c_pg, c_kl, c_ent)
template <typename V, typename val_t, typename mask_t>
void actor_bwd_span(const Row<val_t, mask_t>& r, int64_t t0, int64_t t1, const TokenParams<elem_t<V>>& p,
                    const elem_t<V>* c, elem_t<V> wb, elem_t<V>* grad, elem_t<V>* grad_ent) {
  constexpr int W = std::is_same_v<V, vfloat> ? kWidth : 1;
  const V zero = splat<V>(0);
  for (int64_t t = t0; t + W <= t1; t += W) {
    const V mt = load_lanes<V>(r.m + t);
    const auto on = mt != elem_t<V>(0);
    const TokenTerms<V> k = terms_at<V>(r, t, p);
    const V wm = wb * mt;
    store_lanes<V>(grad + t, on ? wm * (c[0] * k.dpg + c[1] * k.dkl) : zero);  // dkl is 0 without a reference
    if (grad_ent) store_lanes<V>(grad_ent + t, on ? wm * c[2] : zero);
  }
}

template <typename val_t, typename mask_t, typename acc_t>
void actor_fwd_impl(const Inputs& in, const TokenParams<acc_t>& p, acc_t* out) {
  using V = typename Lanes<acc_t>::type;
  const int64_t B = in.lp.size(0), T = in.lp.size(1);
  const int64_t body = T - T % Lanes<acc_t>::width;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto r = row_of<val_t, mask_t>(in, b);
      V wide[kColumns] = {};
      acc_t tail[kColumns] = {};
      actor_fwd_span<V>(r, 0, body, p, wide);
      actor_fwd_span<acc_t>(r, body, T, p, tail);
      for (int c = 0; c < kColumns; ++c) out[b * kColumns + c] = sum_lanes(wide[c]) + tail[c];
    }
  });
}

template <typename val_t, typename mask_t, typename acc_t>
void actor_bwd_impl(const Inputs& in, const TokenParams<acc_t>& p, const acc_t* c, const acc_t* w, acc_t* grad,
                    acc_t* grad_ent) {
  using V = typename Lanes<acc_t>::type;
  const int64_t B = in.lp.size(0), T = in.lp.size(1);
  const int64_t body = T - T % Lanes<acc_t>::width;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto r = row_of<val_t, mask_t>(in, b);
      acc_t* ge = grad_ent ? grad_ent + b * T : nullptr;
      actor_bwd_span<V>(r, 0, body, p, c, w[b], grad + b * T, ge);
      actor_bwd_span<acc_t>(r, body, T, p, c, w[b], grad + b * T, ge);
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
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
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
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
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
