// Deterministic segmented sums (segment_sum): the params struct and the per-element arithmetic every
// backend shares. docs/ops/segment.md
//
// The problem, flattened: M = N * G elements e = n * G + g, each a d-vector values[n, g, :] with a segment
// index[n, g] in [0, K) (or -1: skipped) and an optional weight[n, g]. Segment (g, k) is s = g * K + k of
// S = G * K; the single-group form is G = 1.
//
// The summation order is part of the contract, and it is the same on every backend and thread count:
//   sums[s, j]  = ((0 + w_e0 * v_e0[j]) + w_e1 * v_e1[j]) + ...   over the segment's elements in ascending e
//   counts[s]   = ((0 + w_e0) + w_e1) + ...                         (weighted), or the element count (exact
//                                                                    integer, then rounded once to the float)
// in the accumulation type (fp32 for fp32/fp16/bf16 values, fp64 for fp64), each product and each sum
// rounded on its own (no fma; without a weight there is no product). The CPU finds each segment's elements
// with a stable counting sort, the CUDA kernels with a stable sort, and both then add them one by one in
// that order, so their results are bit-identical, and independent of threads, blocks and schedules.
// Torch-free: included by the ATen host code and the CUDA kernels.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace fastvq {

struct SegmentSumParams {
  const void* values;  // [N, G, d], any element strides
  int64_t v_stride_n, v_stride_g, v_stride_d;
  const void* index;  // [N, G] int64 or int32, any element strides
  bool index_int64;
  int64_t i_stride_n, i_stride_g;
  const void* weight;  // [N, G] in the accumulation type, any element strides; nullptr: every weight is 1
  int64_t w_stride_n, w_stride_g;
  int64_t N, G, K, d;

  // The stable order of the elements by segment, written by the sort step: segment s (of group g = s / K)
  // owns order[offsets[s] : offsets[s + 1]], its elements in ascending order, stored as row ids n (CPU) or as
  // element ids e = n * G + g (CUDA, the permutation of a stable at::sort of the segment keys).
  const int64_t* order;    // [M_valid]
  const int64_t* offsets;  // [S + 1]

  // Outputs, contiguous, in the accumulation type.
  void* sums;    // [G, K, d] == [S, d]
  void* counts;  // [G, K]    == [S]
};

// The segment of element (n, g) with index value k: g * K + k, or -1 when k is -1 (skipped) or, for an
// index that escaped the host's range check, out of range (the kernels treat it as skipped and assert).
FASTVQ_HOST_DEVICE int64_t segment_of(int64_t k, int64_t g, int64_t K) {
  return (k >= 0 && k < K) ? g * K + k : -1;
}

// One step of a segment's sum: acc + w * v (two roundings), or acc + v without a weight.
template <bool kWeighted, typename acc_t>
FASTVQ_HOST_DEVICE acc_t segment_add(acc_t acc, acc_t v, acc_t w) {
  if constexpr (kWeighted) {
    return acc + w * v;
  } else {
    return acc + v;
  }
}

}  // namespace fastvq
