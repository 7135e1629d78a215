// ATen-side pieces of the mcq ops shared by the CPU and CUDA host functions: argument checks (one
// place, so both devices reject the same inputs with the same words), output allocation, and filling
// the torch-free params structs from tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string_view>

#include "common/host_utils.h"
#include "mcq/mcq.h"

namespace fastvq {

inline McqMetric parse_mcq_metric(std::string_view metric) {
  if (metric == "l2") return McqMetric::kL2;
  if (metric == "cosine") return McqMetric::kCosine;
  TORCH_CHECK(false, "mcq_search: metric must be \"l2\" or \"cosine\", got \"", std::string(metric), "\"");
}

struct McqShape {
  int64_t N, G, K, d;
};

// z [..., G, d], codebooks [G, K, d].
inline McqShape check_mcq_search_args(const at::Tensor& z, const at::Tensor& codebooks) {
  TORCH_CHECK(z.dim() >= 2, "mcq_search: z must be [..., G, d] (at least 2 dims), got shape ", z.sizes());
  TORCH_CHECK(codebooks.dim() == 3, "mcq_search: codebooks must be [G, K, d], got shape ", codebooks.sizes());
  TORCH_CHECK(is_supported_float(z.scalar_type()),
              "mcq_search: z must be float32, float16, bfloat16 or float64, got ", z.scalar_type());
  TORCH_CHECK(codebooks.scalar_type() == z.scalar_type(), "mcq_search: codebooks must have z's dtype ",
              z.scalar_type(), ", got ", codebooks.scalar_type());
  TORCH_CHECK(codebooks.device() == z.device(), "mcq_search: codebooks must be on z's device ", z.device(),
              ", got ", codebooks.device());
  const int64_t G = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  TORCH_CHECK(z.size(-2) == G, "mcq_search: z must be [..., G, d] with G == codebooks.size(0) == ", G,
              ", got z shape ", z.sizes());
  TORCH_CHECK(z.size(-1) == d, "mcq_search: z must be [..., G, d] with d == codebooks.size(2) == ", d,
              ", got z shape ", z.sizes());
  TORCH_CHECK(K >= 1, "mcq_search: codebooks must hold at least one code (K >= 1), got shape ",
              codebooks.sizes());
  TORCH_CHECK(K < (int64_t{1} << 31) - 1024, "mcq_search: codebooks must have K < 2^31 codes, got ", K);
  return {leading_numel(z, 2), G, K, d};
}

// indices [..., G] int64 and scores [..., G] float32, on z's device.
inline std::pair<at::Tensor, at::Tensor> mcq_search_outputs(const at::Tensor& z) {
  auto shape = z.sizes().vec();
  shape.pop_back();
  return {at::empty(shape, z.options().dtype(at::kLong)), at::empty(shape, z.options().dtype(at::kFloat))};
}

// Fills everything but the prepared-codebook fields. z3 is z viewed as [N, G, d].
inline McqSearchParams mcq_search_params(const at::Tensor& z3, const at::Tensor& codebooks, const McqShape& s,
                                         McqMetric metric, at::Tensor& indices, at::Tensor& scores) {
  McqSearchParams p{};
  p.z = z3.data_ptr();
  p.z_stride_n = z3.stride(0), p.z_stride_g = z3.stride(1), p.z_stride_d = z3.stride(2);
  p.codebooks = codebooks.data_ptr();
  p.cb_stride_g = codebooks.stride(0), p.cb_stride_k = codebooks.stride(1), p.cb_stride_d = codebooks.stride(2);
  p.dtype = to_dtype(z3.scalar_type());
  p.N = s.N, p.G = s.G, p.K = s.K, p.d = s.d;
  p.metric = metric;
  p.indices = indices.data_ptr<int64_t>();
  p.scores = scores.data_ptr<float>();
  return p;
}

// indices [..., G] int32/int64, codebooks [G, K, d] -> out [..., G, d].
inline McqShape check_mcq_gather_args(const at::Tensor& indices, const at::Tensor& codebooks) {
  TORCH_CHECK(codebooks.dim() == 3, "mcq_gather: codebooks must be [G, K, d], got shape ", codebooks.sizes());
  TORCH_CHECK(is_supported_float(codebooks.scalar_type()),
              "mcq_gather: codebooks must be float32, float16, bfloat16 or float64, got ", codebooks.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "mcq_gather: indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.dim() >= 1, "mcq_gather: indices must be [..., G] (at least 1 dim), got a scalar");
  TORCH_CHECK(indices.device() == codebooks.device(), "mcq_gather: indices must be on codebooks' device ",
              codebooks.device(), ", got ", indices.device());
  const int64_t G = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  TORCH_CHECK(indices.size(-1) == G, "mcq_gather: indices must be [..., G] with G == codebooks.size(0) == ", G,
              ", got indices shape ", indices.sizes());
  return {leading_numel(indices, 1), G, K, d};
}

// Every index of idx2 [N, G] (int64 / int32) must be in [0, K) or -1 (a masked row, gathered as zeros): an
// IndexError naming the first one that is not.
inline void mcq_gather_check_indices(const at::Tensor& idx2, int64_t K, ValueCheck how) {
  check_values(
      how, idx2, [&](const at::Tensor& t) { return all_within(t, -1, K - 1); },
      [&](const at::Tensor& t) {
        const int64_t bad = first_outside(t, -1, K - 1);
        if (bad < 0) return;
        const int64_t G = t.size(1);
        TORCH_CHECK_INDEX(false, "mcq_gather: indices must be in [0, K) = [0, ", K, ") or -1 (a masked row), got ",
                          int_at(t, bad), " at row ", bad / G, ", group ", bad % G);
      });
}

inline at::Tensor mcq_gather_output(const at::Tensor& indices, const at::Tensor& codebooks) {
  auto shape = indices.sizes().vec();
  shape.push_back(codebooks.size(2));
  return at::empty(shape, codebooks.options());
}

inline McqGatherParams mcq_gather_params(const at::Tensor& idx2, const at::Tensor& codebooks, const McqShape& s,
                                         at::Tensor& out) {
  McqGatherParams p{};
  p.indices = idx2.data_ptr();
  p.indices_int64 = idx2.scalar_type() == at::kLong;
  p.idx_stride_n = idx2.stride(0), p.idx_stride_g = idx2.stride(1);
  p.codebooks = codebooks.data_ptr();
  p.cb_stride_g = codebooks.stride(0), p.cb_stride_k = codebooks.stride(1), p.cb_stride_d = codebooks.stride(2);
  p.out = out.data_ptr();
  p.N = s.N, p.G = s.G, p.K = s.K, p.d = s.d;
  return p;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace fastvq
