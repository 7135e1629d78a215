// Host entry of mcq_search's GEMM path on CUDA (mcq_gemm_search_cuda.cu), called by mcq_search_cuda
// (mcq_cuda.cu) after its checks and output allocation when d >= kMcqGemmMinD.
#pragma once

#include <ATen/core/Tensor.h>

#include "mcq/mcq_gemm_search.h"
#include "mcq/mcq_host.h"

namespace fastvq {

// z: the [N, G, d] view p was filled from (it names the dtype and device); writes p.indices / p.scores.
void mcq_gemm_search_cuda(const at::Tensor& z, McqSearchParams p);

}  // namespace fastvq
