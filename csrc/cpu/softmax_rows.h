// Row loops of the log-prob family on the CPU, torch-free (formulas: rlhfkern/ops/logprob.py):
// an online softmax over vocabulary tiles, z = x / T,
//   m = max z,  s = sum exp(z - m),  a = sum exp(z - m) z   (terms with z = -inf count 0)
//   lse = m + log s,  E_p[z] = a / s,  H = lse - E_p[z],  logprob_k = z[label_k] - lse
// and the backward d x_v = (sum_k g_k [v = label_k] - G p_v - g_H p_v (z_v - E_p[z])) / T with
// p_v = exp(z_v - lse), G = sum_k g_k. Included, like actor_rows.h, by a baseline (SSE) and an
// AVX2 build; each row is independent and reduced in a fixed order: batch-invariant results.

#include "lanes.h"

namespace rlhfkern {

constexpr int64_t kVocabTile = 2048;  // a tile's z stays in L1 between its max and its sums

// max of z over [t0, t1) and acc_max (a nan z is dropped here; the sums that follow carry it)
template <typename V, typename T>
inline elem_t<V> tile_max(const T* x, int64_t t0, int64_t t1, elem_t<V> temp, elem_t<V> acc_max) {
  using E = elem_t<V>;
  constexpr int W = lane_count<V>();
  V m = splat<V>(-INFINITY);
  int64_t t = t0;
  for (; t + W <= t1; t += W) {
    const V z = load_lanes<V>(x + t) / temp;
    m = z > m ? z : m;
  }
  E r = max_lanes(m) > acc_max ? max_lanes(m) : acc_max;
  for (; t < t1; ++t) {
    const E z = static_cast<E>(x[t]) / temp;
    r = z > r ? z : r;
  }
  return r;
}

// adds sum exp(z - m) and sum exp(z - m) z over [t0, t1) to s and a
template <typename V, typename T>
inline void tile_sums(const T* x, int64_t t0, int64_t t1, elem_t<V> temp, elem_t<V> m, double& s, double& a) {
  using E = elem_t<V>;
  constexpr int W = lane_count<V>();
  V vs = splat<V>(0), va = splat<V>(0);
  int64_t t = t0;
  for (; t + W <= t1; t += W) {
    const V z = load_lanes<V>(x + t) / temp;
    const V e = exp_nonpositive<V>(z - m);
    vs += e;
    va += z == -INFINITY ? splat<V>(0) : e * z;
  }
  s += sum_lanes(vs);
  a += sum_lanes(va);
  for (; t < t1; ++t) {
    const E z = static_cast<E>(x[t]) / temp;
    const E e = exp_nonpositive<E>(z - m);
    s += e;
    a += z == -INFINITY ? E(0) : e * z;
  }
}

// (lse, E_p[z]) of one row of n logits
template <typename V, typename T>
void softmax_row_stats(const T* x, int64_t n, elem_t<V> temp, double* lse, double* ez) {
  using E = elem_t<V>;
  E m = -INFINITY;
  double s = 0, a = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kVocabTile) {
    const int64_t t1 = t0 + kVocabTile < n ? t0 + kVocabTile : n;
    const E m_new = tile_max<V>(x, t0, t1, temp, m);
    if (m_new != m && m != -INFINITY) {  // rescale what was summed against the old max
      const double scale = std::exp(static_cast<double>(m) - static_cast<double>(m_new));
      s *= scale, a *= scale;
    }
    m = m_new;
    if (m == -INFINITY) continue;  // nothing but -inf so far
    tile_sums<V>(x, t0, t1, temp, m, s, a);
  }
  *lse = static_cast<double>(m) + std::log(s);  // an all -inf row: -inf + log 0, then nan log-probs
  *ez = a / s;
}

// d x over one row: out may alias x (in-place backward)
template <typename V, typename T, typename O>
void softmax_row_backward(const T* x, O* out, int64_t n, elem_t<V> temp, elem_t<V> lse, elem_t<V> ez, elem_t<V> g_sum,
                          elem_t<V> g_ent, const int64_t* labels, const elem_t<V>* g_lp, int64_t k) {
  using E = elem_t<V>;
  constexpr int W = lane_count<V>();
  V iota;
  for (int j = 0; j < W; ++j) reinterpret_cast<E*>(&iota)[j] = E(j);
  const E inv_t = E(1) / temp;
  int64_t t = 0;
  for (; t + W <= n; t += W) {
    const V z = load_lanes<V>(x + t) / temp;
    const V p = exp_nonpositive<V>(z - lse);
    V dz = -(g_sum * p) - (z == -INFINITY ? splat<V>(0) : g_ent * p * (z - ez));
    const V idx = iota + E(t);
    for (int64_t j = 0; j < k; ++j) dz += idx == E(labels[j]) ? splat<V>(g_lp[j]) : splat<V>(0);
    const V d = dz * inv_t;
    for (int j = 0; j < W; ++j) out[t + j] = static_cast<O>(reinterpret_cast<const E*>(&d)[j]);
  }
  for (; t < n; ++t) {
    const E z = static_cast<E>(x[t]) / temp;
    const E p = exp_nonpositive<E>(z - lse);
    E dz = -(g_sum * p) - (z == -INFINITY ? E(0) : g_ent * p * (z - ez));
    for (int64_t j = 0; j < k; ++j) dz += t == labels[j] ? g_lp[j] : E(0);
    out[t] = static_cast<O>(dz * inv_t);
  }
}

// One row forward: log-probs of k labels (ignore_index -100 gives 0; any other label outside
// [0, n) gives nan), entropy, and the (lse, E_p[z]) the backward needs.
template <typename V, typename T, typename A>
void logprob_row(const T* x, int64_t n, elem_t<V> temp, const int64_t* labels, int64_t k, A* lp, A* ent, A* stats) {
  double lse, ez;
  softmax_row_stats<V>(x, n, temp, &lse, &ez);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t l = labels[j];
    const double z = (l >= 0 && l < n) ? static_cast<double>(static_cast<elem_t<V>>(x[l]) / temp) : NAN;
    lp[j] = static_cast<A>(l == -100 ? 0.0 : z - lse);
  }
  if (ent) *ent = static_cast<A>(lse - ez);
  stats[0] = static_cast<A>(lse), stats[1] = static_cast<A>(ez);
}

}  // namespace rlhfkern
