// Torch-free CPU core of decode_attention: the algorithm (decode_attention_cpu_kernel.inc) compiled once
// per ISA under `#pragma GCC target`, picked at run time by cpu_isa_active(). Memory-bound: one pass over
// a (sequence, kv-head)'s keys and values, chunk by chunk, serving all of its query heads from L1.
#include "decode/decode_attention_cpu_kernel.h"

#include <math.h>

#include <cstring>
#include <type_traits>

#include "common/cpu_lanes.h"
#include "common/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastvq {
namespace {

// decode_max folded over s[0, n) from s[0], as the CUDA kernel does: NaN exactly when s[0] is NaN.
inline float max_fold_sequential(const float* s, int64_t n) {
  float m = s[0];
  for (int64_t t = 1; t < n; ++t) m = decode_max(m, s[t]);
  return m;
}

}  // namespace

// ---- portable fallback: 16-lane arrays (fmaf per lane keeps the single rounding of an fma) ----------
namespace decode_scalar {

struct V : PortableLanes<16> {
  static F load_f16(const uint16_t* p) {
    return gen([&](int l) { return fp16_to_float(p[l]); });
  }
  static F load_bf16(const uint16_t* p) {
    return gen([&](int l) { return bf16_to_float(p[l]); });
  }
  static F sub(const F& a, const F& b) {
    return map2(a, b, [](float x, float y) { return x - y; });
  }
  static F mul(const F& a, const F& b) {
    return map2(a, b, [](float x, float y) { return x * y; });
  }
  static F pow2(const F& n) { return map(n, decode_pow2); }
  static F zero_below(const F& x, float c, const F& y) {  // x < c ? 0 : y
    return map2(x, y, [c](float xv, float yv) { return xv < c ? 0.f : yv; });
  }
  static F fma(const F& a, const F& b, const F& c) {
    return gen([&](int l) { return fmaf(a.v[l], b.v[l], c.v[l]); });
  }
  // (l, l + 8), (l, l + 4), (l, l + 2), (0, 1)
  static float sum_tree(const F& a) {
    float t[8];
    for (int i = 0; i < 8; ++i) t[i] = a.v[i] + a.v[i + 8];
    for (int i = 0; i < 4; ++i) t[i] = t[i] + t[i + 4];
    for (int i = 0; i < 2; ++i) t[i] = t[i] + t[i + 2];
    return t[0] + t[1];
  }
  static constexpr int kScoreRows = 16;
  static void reduce(const F* a, float* out) {
    for (int i = 0; i < kScoreRows; ++i) out[i] = sum_tree(a[i]);
  }
  static float max_fold(const float* s, int64_t n) { return max_fold_sequential(s, n); }
};

inline int64_t convert_fp16_contiguous(const uint16_t*, int64_t, float*) { return 0; }

#include "decode/decode_attention_cpu_kernel.inc"

}  // namespace decode_scalar

#if defined(FASTVQ_CPU_X86_PATHS)

// ---- AVX2 + FMA: a 16-lane vector is two ymm registers (lanes 0-7, 8-15) ----------------------------
namespace decode_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

struct V {
  struct F {
    __m256 lo, hi;
  };
  static F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static __m256 f16x8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m256 bf16x8(const uint16_t* p) {  // the top halves of float32s
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static F load_f16(const uint16_t* p) { return {f16x8(p), f16x8(p + 8)}; }
  static F load_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
  static F sub(F a, F b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  static F mul(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  // decode_pow2: n clamped to [-126, 127] (NaN -> -126), then the exponent bits
  static __m256 pow2x8(__m256 n) {
    const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-126.f);
    const __m256 t = _mm256_blendv_ps(hi, n, _mm256_cmp_ps(n, hi, _CMP_LE_OQ));   // n <= 127 ? n : 127
    const __m256 nc = _mm256_blendv_ps(lo, t, _mm256_cmp_ps(n, lo, _CMP_GE_OQ));  // n >= -126 ? t : -126
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(nc), _mm256_set1_epi32(127)), 23));
  }
  static F pow2(F n) { return {pow2x8(n.lo), pow2x8(n.hi)}; }
  static F zero_below(F x, float c, F y) {  // x < c ? 0 : y
    const __m256 cv = _mm256_set1_ps(c), z = _mm256_setzero_ps();
    return {_mm256_blendv_ps(y.lo, z, _mm256_cmp_ps(x.lo, cv, _CMP_LT_OQ)),
            _mm256_blendv_ps(y.hi, z, _mm256_cmp_ps(x.hi, cv, _CMP_LT_OQ))};
  }
  static float sum_tree(F a) {
    const __m256 t8 = _mm256_add_ps(a.lo, a.hi);                                           // (l, l + 8)
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));       // (l, l + 4)
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                                // (l, l + 2)
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));                                            // (0, 1)
    return _mm_cvtss_f32(t);
  }
  // 4 rows at a time: their 8 partial-sum registers, q's 2 and the loads fit the 16 ymm registers (16 rows
  // would spill every accumulator).
  static constexpr int kScoreRows = 4;
  // out[i] = sum_tree(a[i]) for 4 vectors: each level adds the same pairs as sum_tree, for 2 or 4 rows per
  // instruction.
  static void reduce(const F* a, float* out) {
    __m256 t[4];
    for (int i = 0; i < 4; ++i) t[i] = _mm256_add_ps(a[i].lo, a[i].hi);  // (l, l + 8)
    // (l, l + 4): rows 2i, 2i + 1 in the low and high 128-bit lanes
    const __m256 s01 = _mm256_add_ps(_mm256_permute2f128_ps(t[0], t[1], 0x20), _mm256_permute2f128_ps(t[0], t[1], 0x31));
    const __m256 s23 = _mm256_add_ps(_mm256_permute2f128_ps(t[2], t[3], 0x20), _mm256_permute2f128_ps(t[2], t[3], 0x31));
    // (l, l + 2): low lane [row 0: l = 0, 1 | row 2: l = 0, 1], high lane the same for rows 1, 3
    const __m256 v = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    // (0, 1): element 0 of each lane is row 0 (1) and element 1 row 2 (3)
    const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(v, v, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm_storeu_ps(out, _mm_unpacklo_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1)));
  }
  // decode_max folded from s[0]: the maximum of the non-NaN elements (any order: max is exact), NaN when
  // s[0] is NaN (the sign of a zero maximum may differ from the fold's; no result depends on it)
  static float max_fold(const float* s, int64_t n) {
    if (s[0] != s[0]) return s[0];
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) mx = _mm256_max_ps(_mm256_loadu_ps(s + t), mx);  // a NaN element keeps mx
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    for (; t < n; ++t) m = s[t] > m ? s[t] : m;
    return m;
  }
};

inline int64_t convert_fp16_contiguous(const uint16_t* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  return j;
}

#include "decode/decode_attention_cpu_kernel.inc"

#pragma GCC pop_options
}  // namespace decode_avx2

// ---- AVX-512: one zmm register ------------------------------------------------------------------------
namespace decode_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma,f16c")
// GCC 12 warns about the deliberately undefined pass-through operand inside _mm512_cvtph_ps.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

struct V {
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load_bf16(const uint16_t* p) {  // the top halves of float32s
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // decode_pow2: n clamped to [-126, 127] (NaN -> -126), then the exponent bits
  static F pow2(F n) {
    const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-126.f);
    const __m512 t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, hi, _CMP_LE_OQ), hi, n);   // n <= 127 ? n : 127
    const __m512 nc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, lo, _CMP_GE_OQ), lo, t);  // n >= -126 ? t : -126
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(nc), _mm512_set1_epi32(127)), 23));
  }
  static F zero_below(F x, float c, F y) {  // x < c ? 0 : y
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(c), _CMP_LT_OQ), y, _mm512_setzero_ps());
  }
  static float sum_tree(F a) {
    const __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));  // (l, l + 8)
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));           // (l, l + 4)
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                                    // (l, l + 2)
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));                                                // (0, 1)
    return _mm_cvtss_f32(t);
  }
  static constexpr int kScoreRows = 16;
  // out[i] = sum_tree(a[i]) for 16 vectors: each level adds the same pairs as sum_tree, two, four, eight
  // and sixteen rows per instruction; the last level leaves row k + 4j in element 4k + j.
  static void reduce(const F* a, float* out) {
    __m512 s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; ++i) {  // (l, l + 8): rows 2i, 2i + 1 in the low and high halves
      s8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int i = 0; i < 4; ++i) {  // (l, l + 4): rows 4i .. 4i + 3 in the four 128-bit lanes
      s4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    for (int i = 0; i < 2; ++i) {  // (l, l + 2): lane k holds rows 8i + k (elements 0, 1) and 8i + 4 + k (2, 3)
      s2[i] = _mm512_add_ps(_mm512_shuffle_ps(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_ps(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    // (0, 1): element 4k + j is row k + 4j
    const __m512 s1 = _mm512_add_ps(_mm512_shuffle_ps(s2[0], s2[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(s2[0], s2[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, s1));
  }
  // decode_max folded from s[0]: the maximum of the non-NaN elements (any order: max is exact), NaN when
  // s[0] is NaN (the sign of a zero maximum may differ from the fold's; no result depends on it)
  static float max_fold(const float* s, int64_t n) {
    if (s[0] != s[0]) return s[0];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 valid = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1u);
      const __m512 x = _mm512_maskz_loadu_ps(valid, s + t);
      mx = _mm512_mask_max_ps(mx, _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q) & valid, mx, x);
    }
    return _mm512_reduce_max_ps(mx);
  }
};

inline int64_t convert_fp16_contiguous(const uint16_t* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
  }
  return j;
}

#include "decode/decode_attention_cpu_kernel.inc"

#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace decode_avx512
#endif


int64_t decode_attention_cpu_scratch_floats(const DecodeAttentionParams& p) { return decode_scalar::scratch_floats(p); }

void decode_attention_cpu_task(const DecodeAttentionParams& p, CpuIsa isa, int64_t task, float* scratch) {
  FASTVQ_CPU_ISA_SWITCH(isa, decode, ns::attend_task(p, task, scratch));
}

}  // namespace fastvq
