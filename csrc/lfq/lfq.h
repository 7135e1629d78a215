// Lookup-free / binary quantization (MergeVQ LFQ, BSQ, UniWeTok): parameter structs and the per-row math
// every backend shares. The CPU host loops and the CUDA kernels call the same FASTVQ_HOST_DEVICE row
// functions below, one (row, group) at a time, so both compute the same operations in the same order.
//
// Codes and ids: bit j of a group <-> dimension j of the group (little-endian); bit = [z > 0].
// Entropy (docs/ops/lfq.md): the softmax over codes c in {-1,+1}^g of logits 2<z,c>/tau factorises into
// independent bits with p_j = sigmoid(x_j), x_j = 4 z_j / tau. Per group:
//   sample entropy   = mean_n sum_j h(p_nj)
//   code_probs[c]    = mean_n prod_j p_nj(c_j): with the group's bits split into halves A (a bits) and
//                      B (b bits), code_probs viewed as [2^b, 2^a] is (1/N) P_B^T P_A where
//                      P_A[n, ca] = prod_{j in A} p_nj(ca_j): the row functions expand P_A / P_B rows,
//                      the host multiplies them (a BLAS GEMM).
// Torch-free.
#pragma once

#include <math.h>

#include <cstdint>

#include "common/macros.h"

namespace fastvq {

struct LfqQuantizeParams {
  const void* z;  // [N, D] element strides
  int64_t z_stride_n, z_stride_d;
  void* codes;   // [N, D] contiguous, z's dtype
  int64_t* ids;  // [N, G] contiguous
  int64_t N, D, g;  // G = D / g groups of g bits
};

struct LfqUnpackParams {
  const int64_t* ids;  // [N, G] element strides
  int64_t ids_stride_n, ids_stride_g;
  void* codes;  // [N, D] contiguous, the requested dtype
  int64_t N, D, g;
};

template <typename acc_t>
struct LfqEntropyParams {
  const void* z;  // [N, D] element strides
  int64_t z_stride_n, z_stride_d;
  int64_t N, D, g, a, b;  // groups of g = a + b bits, split into halves A (low a bits) and B
  acc_t scale;            // 4 / temperature
  int64_t row0, rows;     // the chunk of rows this launch covers
  acc_t* pa;              // [G, rows, 2^a] expansion of the A half (written)
  acc_t* pb;              // [G, rows, 2^b]
  acc_t* h_rows;          // [N, G] sum of the group's binary entropies per row (written; may be null)
  // backward
  const acc_t* wa;      // [G, rows, 2^a] dL/dP_A
  const acc_t* wb;      // [G, rows, 2^b] dL/dP_B
  const acc_t* grad_h;  // 0-dim: dL/d(h of one bit of one row) = grad_sample / (N * G)
  acc_t* scratch;       // [G, rows, 2^(max(a, b) - 1)]
  acc_t* grad_z;        // [N, D] contiguous
};

// ---- scalar math ----------------------------------------------------------------------------------

FASTVQ_HOST_DEVICE float lfq_exp(float x) { return expf(x); }
FASTVQ_HOST_DEVICE double lfq_exp(double x) { return exp(x); }
FASTVQ_HOST_DEVICE float lfq_log1p(float x) { return log1pf(x); }
FASTVQ_HOST_DEVICE double lfq_log1p(double x) { return log1p(x); }

// sigmoid(x), accurate for both signs (never 1 - tiny cancellation)
template <typename acc_t>
FASTVQ_HOST_DEVICE acc_t lfq_sigmoid(acc_t x) {
  const acc_t e = lfq_exp(x >= acc_t(0) ? -x : x);
  return x >= acc_t(0) ? acc_t(1) / (acc_t(1) + e) : e / (acc_t(1) + e);
}

// softplus(x) = log(1 + e^x)
template <typename acc_t>
FASTVQ_HOST_DEVICE acc_t lfq_softplus(acc_t x) {
  return (x > acc_t(0) ? x : acc_t(0)) + lfq_log1p(lfq_exp(x >= acc_t(0) ? -x : x));
}

// Binary entropy of p = sigmoid(x), from the logit: -p log p - (1-p) log(1-p) = p sp(-x) + (1-p) sp(x).
template <typename acc_t>
FASTVQ_HOST_DEVICE acc_t lfq_binary_entropy(acc_t x) {
  return lfq_sigmoid(x) * lfq_softplus(-x) + lfq_sigmoid(-x) * lfq_softplus(x);
}

template <typename scalar_t, typename acc_t>
FASTVQ_HOST_DEVICE acc_t lfq_logit(const scalar_t* z, int64_t stride_d, int64_t j, acc_t scale) {
  return scale * static_cast<acc_t>(z[j * stride_d]);
}

// ---- quantize / unpack: one (row, group) -----------------------------------------------------------

// The type lfq computes in for a storage type: double for double input, float otherwise (exact for half
// and bfloat16). Sign tests and the entropy's arithmetic both use it.
template <typename scalar_t>
struct LfqAcc {
  using type = float;
};
template <>
struct LfqAcc<double> {
  using type = double;
};
template <typename scalar_t>
using lfq_acc_t = typename LfqAcc<scalar_t>::type;

// codes[j] = +1 / -1 and the group's id, for the g dims starting at z (stride stride_d).
template <typename scalar_t>
FASTVQ_HOST_DEVICE int64_t lfq_quantize_group(const scalar_t* z, int64_t stride_d, int64_t g, scalar_t* codes) {
  uint64_t id = 0;
  for (int64_t j = 0; j < g; ++j) {
    // Compared in the input's own precision (float64 stays float64: a tiny positive double is still > 0).
    const bool bit = static_cast<lfq_acc_t<scalar_t>>(z[j * stride_d]) > lfq_acc_t<scalar_t>(0);  // NaN, 0 -> 0
    id |= static_cast<uint64_t>(bit) << j;
    codes[j] = static_cast<scalar_t>(bit ? 1.f : -1.f);
  }
  return static_cast<int64_t>(id);
}

template <typename scalar_t>
FASTVQ_HOST_DEVICE void lfq_unpack_group(int64_t id, int64_t g, scalar_t* codes) {
  for (int64_t j = 0; j < g; ++j) codes[j] = static_cast<scalar_t>(((id >> j) & 1) ? 1.f : -1.f);
}

FASTVQ_HOST_DEVICE bool lfq_id_valid(int64_t id, int64_t g) { return id >= 0 && (g >= 63 || (id >> g) == 0); }

// ---- entropy: one (row, group) ---------------------------------------------------------------------

// One doubling step of an expansion: out[0, half) holds the product over the bits so far; multiply in a
// new top bit with logit x, giving out[0, 2 half).
template <typename acc_t>
FASTVQ_HOST_DEVICE void lfq_expand_bit(acc_t* out, int64_t half, acc_t x) {
  const acc_t p1 = lfq_sigmoid(x), p0 = lfq_sigmoid(-x);
  for (int64_t c = 0; c < half; ++c) {
    out[c + half] = out[c] * p1;
    out[c] *= p0;
  }
}

// out[c] = prod_{i < m} p_i(c_i) for c in [0, 2^m), p_i from the logits of dims [0, m) at z: in-place
// doubling, m multiplies per entry overall.
template <typename scalar_t, typename acc_t>
FASTVQ_HOST_DEVICE void lfq_expand(const scalar_t* z, int64_t stride_d, int64_t m, acc_t scale, acc_t* out) {
  out[0] = acc_t(1);
  for (int64_t i = 0; i < m; ++i) lfq_expand_bit(out, int64_t{1} << i, lfq_logit<scalar_t, acc_t>(z, stride_d, i, scale));
}

// Forward of one (row, group): P_A and P_B rows, and the sum of the group's binary entropies.
template <typename scalar_t, typename acc_t>
FASTVQ_HOST_DEVICE void lfq_entropy_forward_group(const scalar_t* z, int64_t stride_d, int64_t a, int64_t b,
                                                  acc_t scale, acc_t* pa, acc_t* pb, acc_t* h_sum) {
  lfq_expand<scalar_t, acc_t>(z, stride_d, a, scale, pa);
  lfq_expand<scalar_t, acc_t>(z + a * stride_d, stride_d, b, scale, pb);
  if (h_sum != nullptr) {
    acc_t h = acc_t(0);
    for (int64_t j = 0; j < a + b; ++j) h += lfq_binary_entropy(lfq_logit<scalar_t, acc_t>(z, stride_d, j, scale));
    *h_sum = h;
  }
}

// Backward of one half (m bits at z, w = dL/dP over its 2^m entries): for each bit j,
//   dL/dp_j = sum over the other bits' codes r of (w[r with bit j = 1] - w[r with bit j = 0]) * E_j[r]
// with E_j the expansion over the other m - 1 bits (in scratch, 2^(m-1) entries); then
//   dL/dz_j = scale * p_j (1 - p_j) * (dL/dp_j - grad_h * x_j)      (h'(x) = -x p (1 - p))
template <typename scalar_t, typename acc_t>
FASTVQ_HOST_DEVICE void lfq_entropy_backward_half(const scalar_t* z, int64_t stride_d, int64_t m, acc_t scale,
                                                  const acc_t* w, acc_t grad_h, acc_t* scratch, acc_t* grad_z) {
  for (int64_t j = 0; j < m; ++j) {
    scratch[0] = acc_t(1);
    for (int64_t i = 0, k = 0; i < m; ++i) {
      if (i != j) lfq_expand_bit(scratch, int64_t{1} << k++, lfq_logit<scalar_t, acc_t>(z, stride_d, i, scale));
    }
    const int64_t low_mask = (int64_t{1} << j) - 1;
    acc_t d = acc_t(0);
    for (int64_t r = 0; r < (int64_t{1} << (m - 1)); ++r) {
      const int64_t c0 = (r & low_mask) | ((r >> j) << (j + 1));  // insert a 0 bit at position j
      d += (w[c0 | (int64_t{1} << j)] - w[c0]) * scratch[r];
    }
    const acc_t x = lfq_logit<scalar_t, acc_t>(z, stride_d, j, scale);
    grad_z[j] = scale * lfq_sigmoid(x) * lfq_sigmoid(-x) * (d - grad_h * x);
  }
}

}  // namespace fastvq
