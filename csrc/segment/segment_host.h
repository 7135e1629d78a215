// ATen-side pieces of segment_sum shared by the CPU and CUDA host functions: argument checks (one place,
// so both devices reject the same inputs with the same words), output allocation, the params struct, and
// the error for an index out of range.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "common/host_utils.h"
#include "segment/segment.h"

namespace fastvq {

struct SegmentShape {
  int64_t N, G, K, d;
  bool grouped;                // values [N, G, d] / index [N, G] (else [N, d] / [N])
  at::ScalarType acc_dtype;    // of sums, counts and the weight: float64 for float64 values, else float32
};

// values [N, d] + index [N], or values [N, G, d] + index [N, G]; weight of index's shape.
inline SegmentShape check_segment_sum_args(const at::Tensor& values, const at::Tensor& index, int64_t num_segments,
                                           const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(is_supported_float(values.scalar_type()),
              "segment_sum: values must be float32, float16, bfloat16 or float64, got ", values.scalar_type());
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "segment_sum: index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.device() == values.device(), "segment_sum: index must be on values' device ", values.device(),
              ", got ", index.device());
  TORCH_CHECK((values.dim() == 2 && index.dim() == 1) || (values.dim() == 3 && index.dim() == 2),
              "segment_sum: values [N, d] need index [N], values [N, G, d] need index [N, G]; got values shape ",
              values.sizes(), " and index shape ", index.sizes());
  const bool grouped = index.dim() == 2;
  TORCH_CHECK(index.sizes() == values.sizes().slice(0, index.dim()),
              "segment_sum: index must have values' leading shape ", values.sizes().slice(0, index.dim()),
              ", got index shape ", index.sizes());
  TORCH_CHECK(num_segments >= 0, "segment_sum: num_segments must be >= 0, got ", num_segments);
  const at::ScalarType acc = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.scalar_type() == acc, "segment_sum: weight must be ", acc, " (float64 for float64 values, else ",
                "float32), got ", w.scalar_type());
    TORCH_CHECK(w.device() == values.device(), "segment_sum: weight must be on values' device ", values.device(),
                ", got ", w.device());
    TORCH_CHECK(w.sizes() == index.sizes(), "segment_sum: weight must have index's shape ", index.sizes(),
                ", got ", w.sizes());
  }
  const int64_t N = values.size(0), G = grouped ? values.size(1) : 1, d = values.size(-1);
  TORCH_CHECK(G == 0 || num_segments <= std::numeric_limits<int64_t>::max() / G / std::max<int64_t>(d, 1),
              "segment_sum: num_segments * G * d overflows int64, got num_segments = ", num_segments);
  return {N, G, num_segments, d, grouped, acc};
}

// sums [K, d] / [G, K, d] and counts [K] / [G, K], uninitialised: the kernels write every segment (zeros for
// an empty one); zero_segment_sum_outputs fills them when no kernel runs.
inline std::pair<at::Tensor, at::Tensor> segment_sum_outputs(const at::Tensor& values, const SegmentShape& s) {
  const auto opts = values.options().dtype(s.acc_dtype);
  if (s.grouped) return {at::empty({s.G, s.K, s.d}, opts), at::empty({s.G, s.K}, opts)};
  return {at::empty({s.K, s.d}, opts), at::empty({s.K}, opts)};
}

// values3 [N, G, d], index2 / weight2 [N, G]: views of the inputs in the grouped form.
inline SegmentSumParams segment_sum_params(const at::Tensor& values3, const at::Tensor& index2,
                                           const std::optional<at::Tensor>& weight2, const SegmentShape& s,
                                           at::Tensor& sums, at::Tensor& counts) {
  SegmentSumParams p{};
  p.values = values3.data_ptr();
  p.v_stride_n = values3.stride(0), p.v_stride_g = values3.stride(1), p.v_stride_d = values3.stride(2);
  p.index = index2.data_ptr();
  p.index_int64 = index2.scalar_type() == at::kLong;
  p.i_stride_n = index2.stride(0), p.i_stride_g = index2.stride(1);
  if (weight2.has_value()) {
    p.weight = weight2->data_ptr();
    p.w_stride_n = weight2->stride(0), p.w_stride_g = weight2->stride(1);
  }
  p.N = s.N, p.G = s.G, p.K = s.K, p.d = s.d;
  p.sums = sums.data_ptr();
  p.counts = counts.data_ptr();
  return p;
}

// The grouped views [N, G, d] / [N, G] of the inputs (no copies: unsqueeze only).
inline at::Tensor segment_grouped(const at::Tensor& t, const SegmentShape& s) {
  if (s.grouped) return t;
  return t.unsqueeze(1);  // [N, d] -> [N, 1, d]; [N] -> [N, 1]
}

// Raises the error for the first out-of-range entry of index2 [N, G] (called only when one exists).
[[noreturn]] inline void segment_sum_index_error(const at::Tensor& index2, const SegmentShape& s) {
  const at::Tensor bad = index2.lt(-1).logical_or(index2.ge(s.K)).nonzero().cpu();  // [B, 2], row-major order
  TORCH_CHECK(bad.size(0) > 0, "segment_sum: internal error: no out-of-range index found");
  const int64_t n = bad[0][0].item<int64_t>(), g = bad[0][1].item<int64_t>();
  const int64_t v = index2[n][g].item<int64_t>();
  if (s.grouped) {
    TORCH_CHECK_INDEX(false, "segment_sum: index must be in [0, num_segments) = [0, ", s.K,
                      ") or -1 (skipped), got ", v, " at row ", n, ", group ", g);
  }
  TORCH_CHECK_INDEX(false, "segment_sum: index must be in [0, num_segments) = [0, ", s.K, ") or -1 (skipped), got ",
                    v, " at row ", n);
}

}  // namespace fastvq
