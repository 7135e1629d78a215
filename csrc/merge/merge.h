// Token merging (ToMe bipartite soft matching, MergeVQ): the params of the ops and the scalar arithmetic
// shared by the CPU and CUDA kernels, so both compute every score, size and weighted sum with the same
// IEEE operations in the same order (bit-identical results). Torch-free. docs/ops/merge.md.
//
// bipartite_merge on one image of T tokens:
//   A = even positions (nA = ceil(T/2)), B = odd positions (nB = floor(T/2)); a = 2i, b = 2j + 1.
//   1. normalise:  m_hat = m * (1 / max(||m||, 1e-6)), ||m||^2 as an fma chain over channels in order
//   2. match:      score(i, j) = fma chain of m_hat_a . m_hat_b over channels in order;
//                  best[i] = argmax_j (first j on ties), score[i] = that value, NaN -> -inf
//   3. select:     the r mergeable i with the highest (score, then smaller i) merge into best[i]
//   4. slots:      unmerged A tokens in ascending order (slots 0 .. nA - r - 1), then B tokens (nA - r + j)
//   5. merge:      slot of B token j: S = s_b, acc = x_b * s_b; for each merged i into j, ascending:
//                  S = S + s_a, acc = acc + x_a * s_a; out = acc / S (copied unchanged when nothing merged)
#pragma once

#include <cstdint>

#include "common/macros.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace fastvq {

// eps of the cosine (F.normalize's default is 1e-12; 1e-6 as mcq_search's cosine: a zero row scores 0).
constexpr double kMergeNormEps = 1e-6;

// ---- scalar arithmetic: explicit rounding so no compiler contracts a*b+c into an fma on either side ----
template <typename T>
FASTVQ_HOST_DEVICE T merge_fma(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  if constexpr (sizeof(T) == 4) return __builtin_fmaf(a, b, c);
  else return __builtin_fma(a, b, c);
#endif
}

FASTVQ_HOST_DEVICE float merge_mul(float a, float b) {
#if defined(__CUDA_ARCH__) || FASTVQ_CUDA_EMU
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTVQ_HOST_DEVICE double merge_mul(double a, double b) {
#if defined(__CUDA_ARCH__) || FASTVQ_CUDA_EMU
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTVQ_HOST_DEVICE float merge_add(float a, float b) {
#if defined(__CUDA_ARCH__) || FASTVQ_CUDA_EMU
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTVQ_HOST_DEVICE double merge_add(double a, double b) {
#if defined(__CUDA_ARCH__) || FASTVQ_CUDA_EMU
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTVQ_HOST_DEVICE float merge_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTVQ_HOST_DEVICE double merge_div(double a, double b) { return a / b; }  // IEEE division on both sides

FASTVQ_HOST_DEVICE float merge_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
FASTVQ_HOST_DEVICE double merge_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

template <typename T>
FASTVQ_HOST_DEVICE T merge_neg_inf() {
  return -static_cast<T>(INFINITY);
}

// A quiet NaN: what a guarded kernel writes for an element whose index was out of range.
template <typename T>
FASTVQ_HOST_DEVICE T merge_nan() {
  return static_cast<T>(NAN);
}

// 1 / max(||row||, eps) with ||row||^2 as an fma chain in channel order. Inputs convert exactly to T
// (T is float for half/bfloat16/float metrics and double for a double metric).
template <typename scalar_t, typename T>
FASTVQ_HOST_DEVICE T merge_inv_norm(const scalar_t* row, int64_t Cm, int64_t stride) {
  T ss = T(0);
  for (int64_t k = 0; k < Cm; ++k) {
    const T v = static_cast<T>(row[k * stride]);
    ss = merge_fma(v, v, ss);
  }
  const T norm = merge_sqrt(ss);
  const T eps = static_cast<T>(kMergeNormEps);
  return merge_div(T(1), norm > eps ? norm : eps);  // a NaN row gives NaN products later
}

// Sequential fma chain a . b over Cm contiguous channels (the CPU's vector path computes the same chain
// per lane).
template <typename T>
FASTVQ_HOST_DEVICE T merge_dot(const T* a, const T* b, int64_t Cm) {
  T s = T(0);
  for (int64_t k = 0; k < Cm; ++k) s = merge_fma(a[k], b[k], s);
  return s;
}

// NaN scores rank below everything (as -inf).
template <typename T>
FASTVQ_HOST_DEVICE T merge_clean_score(T s) {
  return s == s ? s : merge_neg_inf<T>();
}

// The total order of step 3: higher score first, then smaller index.
template <typename T>
FASTVQ_HOST_DEVICE bool merge_ranks_before(T score_i, int64_t i, T score_j, int64_t j) {
  return score_i > score_j || (score_i == score_j && i < j);
}

// Number of A tokens that may merge: all but token 0 under protect_first, none when B is empty.
FASTVQ_HOST_DEVICE int64_t merge_mergeable(int64_t T, bool protect_first) {
  const int64_t nA = (T + 1) / 2, nB = T / 2;
  if (nB == 0) return 0;
  return protect_first ? nA - 1 : nA;
}

// The backward weight of token t: d merged[assign[t]] / d x[t] = s_t / S_slot.
template <typename T>
FASTVQ_HOST_DEVICE T merge_grad_weight(T s_t, T s_slot) {
  return merge_div(s_t, s_slot);
}

// ---- params --------------------------------------------------------------------------------------------

// Tensors of bipartite_merge; element strides. `acc_t` (the merge precision) is double for double x, else
// float; `score_t` is double for a double metric, else float.
struct MergeParams {
  int64_t B = 0, T = 0, C = 0, Cm = 0, nA = 0, nB = 0, r = 0;
  bool protect_first = false;
  const void* x = nullptr;       // [B, T, C] x dtype
  int64_t x_sb = 0, x_st = 0, x_sc = 0;
  const void* metric = nullptr;  // [B, T, Cm] metric dtype
  int64_t m_sb = 0, m_st = 0, m_sc = 0;
  const void* sizes = nullptr;   // [B, T] acc_t, contiguous
  void* merged = nullptr;        // [B, T - r, C] x dtype, contiguous
  void* merged_sizes = nullptr;  // [B, T - r] acc_t, contiguous
  int64_t* assign = nullptr;     // [B, T] output slot of every token
  // scratch
  void* score = nullptr;         // [B, nA] score_t: best cosine of each A token (NaN -> -inf)
  int64_t* best = nullptr;       // [B, nA] its B partner j
  int64_t* unm_src = nullptr;    // [B, nA] token of each unmerged slot (first nA - r used)
  int64_t* seg_off = nullptr;    // [B, nB + 1] merged A tokens of B token j: seg_items[seg_off[j] .. seg_off[j+1])
  int64_t* seg_items = nullptr;  // [B, nA] A token indices i, ascending within a segment
};

// unmerge / unmerge_backward / compose_source: gathers and a segmented sum over a source map.
struct UnmergeParams {
  int64_t B = 0, T = 0, T0 = 0, C = 0;
  const void* merged = nullptr;  // forward: [B, T, C] (strided); backward: grad [B, T0, C] (strided)
  int64_t in_sb = 0, in_st = 0, in_sc = 0;
  const int64_t* source = nullptr;  // [B, T0]
  int64_t src_sb = 0, src_st = 0;
  void* out = nullptr;           // forward: [B, T0, C]; backward: [B, T, C]; contiguous
  int64_t* seg_off = nullptr;    // backward scratch [B, T + 1]
  int64_t* seg_items = nullptr;  // backward scratch [B, T0]: positions p, ascending within a segment
};

}  // namespace fastvq
