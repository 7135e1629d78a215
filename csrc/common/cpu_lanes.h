// The portable fallback of the per-ISA kernels' vector types: N float lanes as a plain array, with the
// operations every family's scalar path shares (load, store, set1, zero, max_keep) and per-lane helpers
// (map, map2, gen) for the rest. Each family derives its own type and adds its arithmetic, which differs
// on purpose (mcq: a * b + c in two roundings; merge, decode: fmaf, one rounding, to match their CUDA
// kernels bit for bit). Torch-free.
#pragma once

namespace fastvq {

template <int N>
struct PortableLanes {
  static constexpr int L = N;
  struct F {
    float v[N];
  };
  // r[l] = f(l)
  template <typename Fn>
  static F gen(Fn&& f) {
    F r;
    for (int l = 0; l < N; ++l) r.v[l] = f(l);
    return r;
  }
  template <typename Fn>
  static F map(const F& a, Fn&& f) {
    return gen([&](int l) { return f(a.v[l]); });
  }
  template <typename Fn>
  static F map2(const F& a, const F& b, Fn&& f) {
    return gen([&](int l) { return f(a.v[l], b.v[l]); });
  }
  static F load(const float* p) {
    return gen([&](int l) { return p[l]; });
  }
  static void store(float* p, const F& a) {
    for (int l = 0; l < N; ++l) p[l] = a.v[l];
  }
  static F set1(float x) {
    return gen([&](int) { return x; });
  }
  static F zero() { return set1(0.f); }
  // a where a > b, else b: a NaN `a` never replaces b.
  static F max_keep(const F& a, const F& b) {
    return map2(a, b, [](float x, float y) { return x > y ? x : y; });
  }
};

}  // namespace fastvq
