// The GEMM path of mcq_search (d >= kMcqGemmMinD), shared by its CPU core and its CUDA kernels: the
// dispatch threshold and the CUDA kernels' params struct. Torch-free. The path computes mcq.h's objective
// (an fma chain in j order from the code's bias) and tie rule, so it returns the same bits as the small-d
// kernels. docs/ops/mcq.md ("GEMM path") has the algorithm, the exactness contract and the roofline.
#pragma once

#include <cstdint>

#include "mcq/mcq.h"

namespace fastvq {

// mcq_search takes the GEMM path from this many dimensions on (below, the small-d kernels are faster:
// their whole row and code tile live in registers).
constexpr int64_t kMcqGemmMinD = 32;

// CUDA: per-code data computed once (O(K)), and the split-K partial results (O(splits * N * G)).
struct McqGemmCudaParams {
  McqSearchParams p;  // inputs, shapes, metric, outputs (its cb_prep / bias_prep are unused)
  float* bias;        // [G, K_pad] -||c||^2 / 2 (l2), 0 (cosine), -inf (non-finite code, padding)
  float* cden;        // [G, K_pad] what a code's entries are divided by: cosine max(||c||, eps), l2 1;
                      //            0 marks a non-finite code or padding (its entries read as 0)
  float* part_v;      // [splits, N * G] best objective of each split's code range
  int32_t* part_k;    // [splits, N * G] its code
  int64_t K_pad;      // K rounded up to the code tile
  int64_t tiles;      // K_pad / code tile
  int32_t splits;     // code-range splits (grid.z): enough blocks for the GPU when N is small
};

}  // namespace fastvq
