// Torch-free CPU cores of bipartite_merge's matching step (steps 1-2 of merge.h) in float32: the
// normalisation of metric rows and the fused cosine + row argmax, per CPU ISA (picked at run time). The
// host code (merge_cpu.cpp) parallelises over calls; the float64 path lives there (plain loops).
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"

namespace fastvq {

// Columns of the transposed B side are padded to a multiple of this (zeros), a multiple of every ISA's tile.
constexpr int64_t kMergeCpuColAlign = 32;

// out[i * os_row + k * os_k] = in[i * in_row_stride + k] / max(||in[i]||, eps) for rows i in [0, n): merge.h step 1.
void merge_normalize_rows_cpu(CpuIsa isa, const float* in, int64_t in_row_stride, int64_t n, int64_t Cm, float* out, int64_t os_row,
                              int64_t os_k);

// For A rows i in [0, na) of a_hat ([na, Cm] contiguous): score[i] = max_j a_hat[i] . bt[:, j] over the nb
// columns of bt ([Cm, ldb], ldb a multiple of kMergeCpuColAlign), each dot the fma chain of merge_dot;
// best[i] = the first j reaching it; NaN scores count as -inf (best 0 when all are). scratch: 4 * ldb floats.
void merge_match_rows_cpu(CpuIsa isa, const float* a_hat, int64_t na, int64_t Cm, const float* bt, int64_t ldb,
                          int64_t nb, float* score, int64_t* best, float* scratch);

}  // namespace fastvq
