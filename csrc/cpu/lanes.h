// SIMD lane helpers of the CPU row loops (actor_rows.h, softmax_rows.h), torch-free: a lane type
// V is a scalar or a GCC float vector (token_math.h). Included inside the includer's namespace
// in avx2.cpp, like the row headers.
#pragma once

namespace rlhfkern {

template <typename V>
constexpr int lane_count() {
  return static_cast<int>(sizeof(V) / sizeof(elem_t<V>));
}

// lane_count<V>() consecutive values of p, converted to V's element type
template <typename V, typename T>
inline V load_lanes(const T* p) {
  if constexpr (lane_count<V>() == 1) {
    return static_cast<V>(*p);
  } else if constexpr (std::is_same_v<T, float>) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
    float tmp[lane_count<V>()];
    for (int j = 0; j < lane_count<V>(); ++j) tmp[j] = static_cast<float>(p[j]);
    V v;
    std::memcpy(&v, tmp, sizeof v);
    return v;
  }
}

template <typename V>
inline void store_lanes(elem_t<V>* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename V>
inline double sum_lanes(V v) {  // in double, in a fixed order: deterministic
  if constexpr (lane_count<V>() == 1) {
    return v;
  } else {
    double s = 0;
    for (int j = 0; j < lane_count<V>(); ++j) s += v[j];
    return s;
  }
}

template <typename V>
inline elem_t<V> max_lanes(V v) {
  if constexpr (lane_count<V>() == 1) {
    return v;
  } else {
    elem_t<V> m = v[0];
    for (int j = 1; j < lane_count<V>(); ++j) m = v[j] > m ? v[j] : m;
    return m;
  }
}

}  // namespace rlhfkern
