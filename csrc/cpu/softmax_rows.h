// Row loops of the log-prob family on the CPU, torch-free (formulas: rlhfkern/ops/logprob.py):
// an online softmax over vocabulary tiles, z = x / T,
//   m = max z,  s = sum exp(z - m),  a = sum exp(z - m) z   (terms with z = -inf count 0)
//   lse = m + log s,  E_p[z] = a / s,  H = lse - E_p[z],  logprob_k = z[label_k] - lse
// and the backward d x_v = (sum_k g_k [v = label_k] - G p_v - g_H p_v (z_v - E_p[z])) / T with
// p_v = exp(z_v - lse), G = sum_k g_k. Included, like actor_rows.h, by a baseline (SSE) and an
// AVX2 build; each row is independent and reduced in a fixed order: batch-invariant results.
// Rows of up to kSmallVocab logits take logprob_rows_small, W rows at a time (W = lanes), which
// does one lane transpose per W rows instead of W horizontal reductions; which path a row takes
// depends on n only, so results stay batch-invariant.

#include "lanes.h"

namespace rlhfkern {

constexpr int64_t kVocabTile = 2048;  // a tile's z stays in L1 between its max and its sums
constexpr int64_t kSmallVocab = 512;  // rows this short go W at a time (logprob_rows_small)

// z = x / T, skipping the division at T = 1 (where it is exact anyway)
template <typename V>
inline V scaled(V x, elem_t<V> temp) {
  return temp == elem_t<V>(1) ? x : x / temp;
}

// max of z over [t0, t1) and acc_max (a nan z is dropped here; the sums that follow carry it)
template <typename V, typename T>
inline elem_t<V> tile_max(const T* x, int64_t t0, int64_t t1, elem_t<V> temp, elem_t<V> acc_max) {
  using E = elem_t<V>;
  constexpr int W = lane_count<V>();
  V m = splat<V>(-INFINITY);
  int64_t t = t0;
  for (; t + W <= t1; t += W) {
    const V z = scaled<V>(load_lanes<V>(x + t), temp);
    m = z > m ? z : m;
  }
  E r = max_lanes(m) > acc_max ? max_lanes(m) : acc_max;
  for (; t < t1; ++t) {
    const E z = scaled<E>(static_cast<E>(x[t]), temp);
    r = z > r ? z : r;
  }
  return r;
}

// adds one vector's softmax terms exp(z - m) to s and exp(z - m) z to a (z = -inf adds 0 to both)
template <typename V>
inline void add_softmax_terms(V z, elem_t<V> m, V& s, V& a) {
  const V e = exp_nonpositive<V>(z - m);
  s += e;
  a += z == -INFINITY ? splat<V>(0) : e * z;
}

// adds sum exp(z - m) and sum exp(z - m) z over [t0, t1) to s and a
template <typename V, typename T>
inline void tile_sums(const T* x, int64_t t0, int64_t t1, elem_t<V> temp, elem_t<V> m, double& s, double& a) {
  using E = elem_t<V>;
  constexpr int W = lane_count<V>();
  V vs = splat<V>(0), va = splat<V>(0);
  int64_t t = t0;
  for (; t + W <= t1; t += W) add_softmax_terms<V>(scaled<V>(load_lanes<V>(x + t), temp), m, vs, va);
  s += sum_lanes(vs);
  a += sum_lanes(va);
  for (; t < t1; ++t) {
    const E z = scaled<E>(static_cast<E>(x[t]), temp);
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
  int64_t t = 0;
  for (; t + W <= n; t += W) {
    const V z = scaled<V>(load_lanes<V>(x + t), temp);
    const V p = exp_nonpositive<V>(z - lse);
    V dz = -(g_sum * p) - (z == -INFINITY ? splat<V>(0) : g_ent * p * (z - ez));
    const V idx = iota + E(t);
    for (int64_t j = 0; j < k; ++j) dz += idx == E(labels[j]) ? splat<V>(g_lp[j]) : splat<V>(0);
    const V d = scaled<V>(dz, temp);
    if constexpr (std::is_same_v<O, E>) {
      store_lanes<V>(out + t, d);
    } else {
      for (int j = 0; j < W; ++j) out[t + j] = static_cast<O>(reinterpret_cast<const E*>(&d)[j]);
    }
  }
  for (; t < n; ++t) {
    const E z = scaled<E>(static_cast<E>(x[t]), temp);
    const E p = exp_nonpositive<E>(z - lse);
    E dz = -(g_sum * p) - (z == -INFINITY ? E(0) : g_ent * p * (z - ez));
    for (int64_t j = 0; j < k; ++j) dz += t == labels[j] ? g_lp[j] : E(0);
    out[t] = static_cast<O>(scaled<E>(dz, temp));
  }
}

// One row forward: log-probs of k labels (ignore_index -100 gives 0; any other label outside
// [0, n) gives nan), entropy, and the (lse, E_p[z]) the backward needs.
template <typename V, typename T, typename A>
void logprob_row_outputs(const T* x, int64_t n, elem_t<V> temp, double lse, double ez, const int64_t* labels,
                         int64_t k, A* lp, A* ent, A* stats) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t l = labels[j];
    const double z = (l >= 0 && l < n) ? static_cast<double>(scaled<elem_t<V>>(static_cast<elem_t<V>>(x[l]), temp))
                                       : NAN;
    lp[j] = static_cast<A>(l == -100 ? 0.0 : z - lse);
  }
  if (ent) *ent = static_cast<A>(lse - ez);
  stats[0] = static_cast<A>(lse), stats[1] = static_cast<A>(ez);
}

template <typename V, typename T, typename A>
void logprob_row(const T* x, int64_t n, elem_t<V> temp, const int64_t* labels, int64_t k, A* lp, A* ent, A* stats) {
  double lse, ez;
  softmax_row_stats<V>(x, n, temp, &lse, &ez);
  logprob_row_outputs<V>(x, n, temp, lse, ez, labels, k, lp, ent, stats);
}

// lanes [t, t + W) of z, the ones at or past n -inf (they add 0 to every softmax sum)
template <typename V, typename T>
inline V load_z_padded(const T* x, int64_t t, int64_t n, elem_t<V> temp) {
  constexpr int W = lane_count<V>();
  if (t + W <= n) return scaled<V>(load_lanes<V>(x + t), temp);
  elem_t<V> tmp[W];
  for (int j = 0; j < W; ++j) tmp[j] = t + j < n ? static_cast<elem_t<V>>(x[t + j]) : -INFINITY;
  V v;
  std::memcpy(&v, tmp, sizeof v);
  return scaled<V>(v, temp);
}

// lane-wise operations for transpose_reduce (types, not lambdas: a lambda does not take the
// AVX2 target of avx2.cpp's pragma region)
struct LaneMax {
  template <typename V>
  V operator()(V a, V b) const {
    return a > b ? a : b;  // a nan in a is dropped, as in tile_max
  }
};
struct LaneAdd {
  template <typename V>
  V operator()(V a, V b) const {
    return a + b;
  }
};

// W vectors (W = lanes) -> one whose lane j reduces the lanes of acc[j] with op, by a fixed tree
// of shuffles (pairs of lanes, then pairs of pairs, ...): one transpose for W rows
template <typename V, typename Op>
inline V transpose_reduce(V* acc, Op op) {
  constexpr int W = lane_count<V>();
  static_assert(W == 4 || W == 8, "transpose_reduce: 4 or 8 lanes");
  if constexpr (W == 8) {
    using I = vint8;
    V c[4], d[2];
    for (int i = 0; i < 4; ++i)  // lanes (2q, 2q + 1) of rows 2i, 2i + 1, summed in pairs
      c[i] = op(__builtin_shuffle(acc[2 * i], acc[2 * i + 1], I{0, 8, 2, 10, 4, 12, 6, 14}),
                __builtin_shuffle(acc[2 * i], acc[2 * i + 1], I{1, 9, 3, 11, 5, 13, 7, 15}));
    for (int i = 0; i < 2; ++i)  // rows 4i .. 4i + 3, lanes (0-3) and (4-7) of each
      d[i] = op(__builtin_shuffle(c[2 * i], c[2 * i + 1], I{0, 1, 8, 9, 4, 5, 12, 13}),
                __builtin_shuffle(c[2 * i], c[2 * i + 1], I{2, 3, 10, 11, 6, 7, 14, 15}));
    return op(__builtin_shuffle(d[0], d[1], I{0, 1, 2, 3, 8, 9, 10, 11}),
              __builtin_shuffle(d[0], d[1], I{4, 5, 6, 7, 12, 13, 14, 15}));
  } else {
    using I = vint4;
    V c[2];
    for (int i = 0; i < 2; ++i)
      c[i] = op(__builtin_shuffle(acc[2 * i], acc[2 * i + 1], I{0, 4, 2, 6}),
                __builtin_shuffle(acc[2 * i], acc[2 * i + 1], I{1, 5, 3, 7}));
    return op(__builtin_shuffle(c[0], c[1], I{0, 1, 4, 5}), __builtin_shuffle(c[0], c[1], I{2, 3, 6, 7}));
  }
}

// The forward of rows [r0, r1) of n <= kSmallVocab logits each (row r at x + r * sx), W rows at
// a time: each row's max and sums are kept as W lanes, and one transpose_reduce per quantity
// finishes W rows (a short last group repeats its last row in the spare lanes). The same
// formulas as logprob_row; for vector lane types only.
template <typename V, typename T, typename A>
void logprob_rows_small(const T* x, int64_t sx, int64_t n, elem_t<V> temp, const int64_t* labels, int64_t k, A* lp,
                        A* ent, A* stats, int64_t r0, int64_t r1) {
  constexpr int W = lane_count<V>();
  for (int64_t g = r0; g < r1; g += W) {
    const T* row[W];
    for (int j = 0; j < W; ++j) row[j] = x + (g + j < r1 ? g + j : r1 - 1) * sx;
    V acc[W], acc_a[W];
    for (int j = 0; j < W; ++j) {
      V m = splat<V>(-INFINITY);
      for (int64_t t = 0; t < n; t += W) m = LaneMax{}(load_z_padded<V>(row[j], t, n, temp), m);
      acc[j] = m;
    }
    const V m = transpose_reduce(acc, LaneMax{});
    const V m_safe = m == -INFINITY ? splat<V>(0) : m;  // an all -inf row sums nothing, as in softmax_row_stats
    for (int j = 0; j < W; ++j) {
      V s = splat<V>(0), a = splat<V>(0);
      for (int64_t t = 0; t < n; t += W) add_softmax_terms<V>(load_z_padded<V>(row[j], t, n, temp), m_safe[j], s, a);
      acc[j] = s, acc_a[j] = a;
    }
    const V s = transpose_reduce(acc, LaneAdd{}), a = transpose_reduce(acc_a, LaneAdd{});
    for (int j = 0; j < W && g + j < r1; ++j) {
      const int64_t r = g + j;
      const double lse = static_cast<double>(m[j]) + std::log(static_cast<double>(s[j]));
      logprob_row_outputs<V>(row[j], n, temp, lse, static_cast<double>(a[j]) / static_cast<double>(s[j]),
                             labels + r * k, k, lp + r * k, ent ? ent + r : nullptr, stats + 2 * r);
    }
  }
}

}  // namespace rlhfkern
