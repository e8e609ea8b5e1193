// Row loops of the fused actor loss on the CPU, torch-free: csrc/cpu/ppo_loss.cpp includes them
// for its SSE build (V = vfloat4) and csrc/cpu/avx2.cpp for its AVX2 + FMA build
// (V = vfloat8, chosen at run time when the processor has them). A row runs its tokens in
// blocks of V's width, its tail one token at a time with the same templates (token_math.h).
// Include inside the namespace of the includer, after token_math.h, <cstring> and <type_traits>.

#include "lanes.h"

namespace rlhfkern {

// One row's inputs, already offset to the row. Absent optional inputs are null and never read.
template <typename val_t, typename mask_t>
struct Row {
  const val_t *lp, *old, *adv, *isw, *ent, *ref;
  const mask_t* m;
};

template <typename V, typename val_t, typename mask_t>
inline TokenTerms<V> terms_at(const Row<val_t, mask_t>& r, int64_t t, const TokenParams<elem_t<V>>& p) {
  const V l = load_lanes<V>(r.lp + t);
  return token_terms<V>(l, load_lanes<V>(r.old + t), load_lanes<V>(r.adv + t),
                        r.isw ? load_lanes<V>(r.isw + t) : splat<V>(1), r.ref ? load_lanes<V>(r.ref + t) : l,
                        r.ref != nullptr, p);
}

// sums[c] += the column-c terms (rlhfkern/ops/ppo_loss.py COLUMNS) of tokens [t0, t1)
template <typename V, typename val_t, typename mask_t>
void actor_fwd_span(const Row<val_t, mask_t>& r, int64_t t0, int64_t t1, const TokenParams<elem_t<V>>& p, V* sums) {
  constexpr int W = lane_count<V>();
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
  constexpr int W = lane_count<V>();
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

// A whole row: the 7 column sums into out
template <typename V, typename val_t, typename mask_t>
void actor_fwd_row(const Row<val_t, mask_t>& r, int64_t T, const TokenParams<elem_t<V>>& p, elem_t<V>* out) {
  using S = elem_t<V>;
  const int64_t body = T - T % lane_count<V>();
  V wide[7] = {};
  S tail[7] = {};
  actor_fwd_span<V>(r, 0, body, p, wide);
  actor_fwd_span<S>(r, body, T, p, tail);
  for (int c = 0; c < 7; ++c) out[c] = static_cast<S>(sum_lanes(wide[c]) + tail[c]);
}

template <typename V, typename val_t, typename mask_t>
void actor_bwd_row(const Row<val_t, mask_t>& r, int64_t T, const TokenParams<elem_t<V>>& p, const elem_t<V>* c,
                   elem_t<V> wb, elem_t<V>* grad, elem_t<V>* grad_ent) {
  using S = elem_t<V>;
  const int64_t body = T - T % lane_count<V>();
  actor_bwd_span<V>(r, 0, body, p, c, wb, grad, grad_ent);
  actor_bwd_span<S>(r, body, T, p, c, wb, grad, grad_ent);
}

}  // namespace rlhfkern
