// Multi-codebook quantization (UniTok MCQ): parameter structs and the scalar math every backend shares.
//
// mcq_search finds, for every row n and group g, the code k of codebook g nearest to z[n, g, :].
// Every backend runs the same two steps on the same fp32 arithmetic, so results agree bit for bit
// between the CPU kernel, the CUDA kernel and the CUDA kernel's emulation on the CPU:
//   1. prepare: per code, convert to fp32, (cosine) normalise, transpose to [G, d, K_pad] and compute
//      the code's bias b[k] = -||c_k||^2 / 2 (l2) or 0 (cosine); -inf for non-finite codes and padding.
//   2. search: per row, maximise the objective  v[k] = b[k] + sum_j z[j] * c_k[j]  (an fma chain in
//      j order starting from b[k]); ties -> the smallest k. argmax v == argmin ||z - c_k||^2 for l2.
// Torch-free: included by the CPU cores, the native tests, the ATen host code and the CUDA kernels.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace fastvq {

enum class McqMetric : int32_t { kL2 = 0, kCosine = 1 };

// Same epsilon as F.normalize's default, applied as x / max(||x||, eps).
constexpr float kMcqCosineEps = 1e-6f;

struct McqSearchParams {
  // Inputs. Strides are in elements and may be anything (including 0 and negative).
  const void* z;  // [N, G, d]
  int64_t z_stride_n, z_stride_g, z_stride_d;
  const void* codebooks;  // [G, K, d]
  int64_t cb_stride_g, cb_stride_k, cb_stride_d;
  DType dtype;  // of z and codebooks (host backends read it; CUDA kernels are templated instead)
  int64_t N, G, K, d;
  McqMetric metric;

  // Prepared codebook, written by the prepare step and read by the search step.
  float* cb_prep;    // [G, d, K_pad] fp32; cosine: rows of unit norm; 0 for non-finite codes and padding
  float* bias_prep;  // [G, K_pad]    l2: -||c||^2 / 2; cosine: 0; non-finite codes and padding: -inf
  int64_t K_pad;     // K rounded up to the backend's code tile

  // Outputs, contiguous.
  int64_t* indices;  // [N, G]
  float* scores;     // [N, G] l2: ||z - c||^2 (recomputed exactly); cosine: the maximal cosine
};

struct McqGatherParams {
  const void* indices;  // [N, G] int32 or int64 in [0, K) or -1 (a masked row: zeros), element strides below
  bool indices_int64;
  int64_t idx_stride_n, idx_stride_g;
  const void* codebooks;  // [G, K, d]
  int64_t cb_stride_g, cb_stride_k, cb_stride_d;
  void* out;  // [N, G, d] contiguous, same dtype as codebooks
  int64_t N, G, K, d;
};

// ---- scalar math shared by every backend --------------------------------------------------------

FASTVQ_HOST_DEVICE float mcq_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

FASTVQ_HOST_DEVICE float mcq_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);  // IEEE round-to-nearest (nvcc's default -prec-sqrt=true)
#else
  return __builtin_sqrtf(x);
#endif
}

FASTVQ_HOST_DEVICE bool mcq_isfinite(float x) { return x - x == 0.f; }  // false for +-inf and NaN

FASTVQ_HOST_DEVICE float mcq_neg_inf() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(static_cast<int>(0xff800000u));
#else
  return -__builtin_huge_valf();
#endif
}

FASTVQ_HOST_DEVICE float mcq_nan() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  return __builtin_nanf("");
#endif
}

// max(||x||, eps) from the running sum of squares s (accumulated as s = fma(x_j, x_j, s) in j order).
FASTVQ_HOST_DEVICE float mcq_cosine_denominator(float sum_sq) {
  const float n = mcq_sqrt(sum_sq);
  return n > kMcqCosineEps ? n : kMcqCosineEps;
}

// Bias of a prepared code from its fp32 sum of squares.
FASTVQ_HOST_DEVICE float mcq_code_bias(McqMetric metric, float sum_sq, bool finite) {
  if (!finite) return mcq_neg_inf();
  return metric == McqMetric::kL2 ? -0.5f * sum_sq : 0.f;
}

// The tie rule of every reduction: a larger objective wins; equal objectives -> the smaller index.
FASTVQ_HOST_DEVICE bool mcq_better(float va, int64_t ka, float vb, int64_t kb) {
  return va > vb || (va == vb && ka < kb);
}

}  // namespace fastvq
