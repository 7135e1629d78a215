// Small ATen helpers shared by every op family's host code (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
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

// ---- value checks shared by the CPU and CUDA host code ------------------------------------------------
// A value check (an index range, sizes > 0, lengths <= capacity) is written once per op as a loop over a
// CPU tensor that raises the op's message for the first bad entry in row-major order. The CPU host code runs
// it in place. The CUDA host code must not let a bad value reach a kernel (a device-side assert poisons the
// CUDA context), so it first reduces on the device (one aminmax, one copy of two numbers to the host) and
// runs the same loop on a host copy only when the reduction finds a bad value: both backends raise the same
// exception with the same words.
enum class ValueCheck {
  kLoop,       // the CPU backend: read the values in place
  kReduction,  // CUDA host code: a device reduction first, the loop on a host copy only on failure
  kNone,       // skipped (the emulation build's unchecked mode, which tests the kernels' own guards)
};

// Every entry of the integer tensor t (any device, any shape) lies in [lo, hi]; true when t is empty.
inline bool all_within(const at::Tensor& t, int64_t lo, int64_t hi) {
  if (t.numel() == 0) return true;
  const auto [mn, mx] = at::aminmax(t);
  const at::Tensor both = at::stack({mn, mx}).to(at::kCPU, at::kLong);
  const int64_t* v = both.const_data_ptr<int64_t>();
  return v[0] >= lo && v[1] <= hi;
}

// Every entry of the floating tensor t (any device) is > 0 (NaN is not); true when t is empty.
inline bool all_positive(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  return t.min().item<double>() > 0;  // min propagates NaN
}

// Entry `flat` (row-major) of a 1-D or 2-D int64 / int32 CPU tensor.
inline int64_t int_at(const at::Tensor& t, int64_t flat) {
  const int64_t C = t.dim() == 2 ? t.size(1) : t.numel();
  const int64_t off = t.dim() == 2 ? (flat / C) * t.stride(0) + (flat % C) * t.stride(1) : flat * t.stride(0);
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[off] : t.const_data_ptr<int32_t>()[off];
}

// Row-major position of the first entry of a 1-D or 2-D int64 / int32 CPU tensor outside [lo, hi], or -1.
inline int64_t first_outside(const at::Tensor& t, int64_t lo, int64_t hi) {
  TORCH_INTERNAL_ASSERT(t.is_cpu() && (t.dim() == 1 || t.dim() == 2));
  const int64_t R = t.dim() == 2 ? t.size(0) : 1, C = t.dim() == 2 ? t.size(1) : t.size(0);
  const int64_t s0 = t.dim() == 2 ? t.stride(0) : 0, s1 = t.stride(t.dim() - 1);
  auto scan = [&](const auto* p) -> int64_t {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t v = p[r * s0 + c * s1];
        if (v < lo || v > hi) return r * C + c;
      }
    }
    return -1;
  };
  return t.scalar_type() == at::kLong ? scan(t.const_data_ptr<int64_t>()) : scan(t.const_data_ptr<int32_t>());
}

// Runs `loop(host_tensor)`, an op's check that raises its message for the first bad entry, as `how` says:
// on t itself (kLoop), on a host copy of t only when `reduction_ok(t)` is false (kReduction), or not at all.
template <typename ReductionOk, typename Loop>
void check_values(ValueCheck how, const at::Tensor& t, ReductionOk&& reduction_ok, Loop&& loop) {
  if (how == ValueCheck::kNone) return;
  if (how == ValueCheck::kLoop) {
    loop(t);
    return;
  }
  if (reduction_ok(t)) return;
  loop(t.cpu());
  TORCH_INTERNAL_ASSERT(false, "a device reduction found a bad value that the host check did not");
}

}  // namespace fastvq
