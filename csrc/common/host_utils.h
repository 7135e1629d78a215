// Small ATen helpers shared by every op family's host code (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/huge_pages.h"

namespace fastvq {

// The floating dtypes fastvq ops accept.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The torch-free cores' name of a supported float dtype.
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "fastvq: unsupported dtype ", t);
  }
}

// Product of all sizes but the last `trailing` (the number of rows of a [..., trailing dims] tensor).
inline int64_t leading_numel(const at::Tensor& t, int64_t trailing) {
  int64_t n = 1;
  for (int64_t i = 0; i < t.dim() - trailing; ++i) n *= t.size(i);
  return n;
}

// A freshly allocated CPU output about to be written in full: large ones get huge pages (huge_pages.h).
inline const at::Tensor& advise_huge_pages(const at::Tensor& t) {
  if (t.is_cpu()) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace fastvq
