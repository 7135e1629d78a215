// Lookup-free / binary quantization (MergeVQ LFQ, BSQ, UniWeTok): parameter structs and the per-row math
// every backend shares. The CPU host loops and the CUDA kernels call the same FASTVQ_HOST_DEVICE row
// functions below, one (row, group) at a time, so both compute the same operations in the same order.
//
// Codes and indices: bit = [z > 0]; the bit order says which dimension of a group is which bit of its index:
// msb (the default, as vector-quantize-pytorch, BSQ-ViT, Open-MAGVIT2, MergeVQ): dimension j of a g-bit group
// is bit g-1-j (dimension 0 is the most significant); lsb: dimension j is bit j. code_probs uses the same
// layout (entry c is the code whose index is c).
// Entropy (docs/ops/lfq.md): the softmax over codes c in {-1,+1}^g of logits 2<z,c>/tau factorises into
// independent bits with p_j = sigmoid(x_j), x_j = 4 z_j / tau. Per group:
//   sample entropy   = mean_n sum_j h(p_nj)
//   code_probs[c]    = mean_n prod_j p_nj(c_j): with the index's bits split into the low a bits (half A)
//                      and the high b bits (half B), code_probs viewed as [2^b, 2^a] is (1/N) P_B^T P_A
//                      where P_A[n, ca] = prod_{j in A} p_nj(ca_j): the row functions expand P_A / P_B rows,
//                      the host multiplies them (a BLAS GEMM). With row weights w_n (a mask), both means
//                      are weighted: sum_n w_n (...) / sum_n w_n, and a row of weight 0 is skipped.
// Torch-free.
#pragma once

#include <math.h>

#include <cstdint>

#include "common/macros.h"

namespace fastvq {

struct LfqQuantizeParams {
  const void* z;  // [N, D] element strides
  int64_t z_stride_n, z_stride_d;
  void* codes;       // [N, D] contiguous, z's dtype
  int64_t* indices;  // [N, G] contiguous
  int64_t N, D, g;   // G = D / g groups of g bits
  bool msb;          // bit order
};

struct LfqUnpackParams {
  const int64_t* indices;  // [N, G] element strides
  int64_t indices_stride_n, indices_stride_g;
  void* codes;  // [N, D] contiguous, the requested dtype
  int64_t N, D, g;
  bool msb;
};

template <typename acc_t>
struct LfqEntropyParams {
  const void* z;  // [N, D] element strides
  int64_t z_stride_n, z_stride_d;
  int64_t N, D, g, a, b;  // groups of g = a + b bits, split into halves A (low a bits) and B
  bool msb;               // bit order of code_probs
  acc_t scale;            // 4 / temperature
  const acc_t* weight;    // [N] row weights (may be null: all 1)
  int64_t row0, rows;     // the chunk of rows this launch covers
  acc_t* pa;              // [G, rows, 2^a] expansion of the A half (written)
  acc_t* pb;              // [G, rows, 2^b]
  acc_t* h_rows;          // [N, G] sum of the group's binary entropies per row (written; may be null)
  // backward
  const acc_t* wa;      // [G, rows, 2^a] dL/dP_A
  const acc_t* wb;      // [G, rows, 2^b] dL/dP_B
  const acc_t* grad_h;  // 0-dim: dL/d(h of one bit of a row of weight 1) = grad_sample / (sum_n w_n * G)
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

// The low g bits of v in reverse order (1 <= g <= 64): turns an lsb index into an msb one and back.
FASTVQ_HOST_DEVICE uint64_t lfq_reverse_bits(uint64_t v, int64_t g) {
  v = ((v >> 1) & 0x5555555555555555ull) | ((v & 0x5555555555555555ull) << 1);
  v = ((v >> 2) & 0x3333333333333333ull) | ((v & 0x3333333333333333ull) << 2);
  v = ((v >> 4) & 0x0F0F0F0F0F0F0F0Full) | ((v & 0x0F0F0F0F0F0F0F0Full) << 4);
  v = ((v >> 8) & 0x00FF00FF00FF00FFull) | ((v & 0x00FF00FF00FF00FFull) << 8);
  v = ((v >> 16) & 0x0000FFFF0000FFFFull) | ((v & 0x0000FFFF0000FFFFull) << 16);
  v = (v >> 32) | (v << 32);
  return v >> (64 - g);
}

// codes[j] = +1 / -1 and the group's lsb index (bit j = dim j), for the g dims starting at z (stride stride_d).
template <typename scalar_t>
FASTVQ_HOST_DEVICE int64_t lfq_quantize_group(const scalar_t* z, int64_t stride_d, int64_t g, scalar_t* codes) {
  uint64_t index = 0;
  for (int64_t j = 0; j < g; ++j) {
    // Compared in the input's own precision (float64 stays float64: a tiny positive double is still > 0).
    const bool bit = static_cast<lfq_acc_t<scalar_t>>(z[j * stride_d]) > lfq_acc_t<scalar_t>(0);  // NaN, 0 -> 0
    index |= static_cast<uint64_t>(bit) << j;
    codes[j] = static_cast<scalar_t>(bit ? 1.f : -1.f);
  }
  return static_cast<int64_t>(index);
}

// codes of an lsb index (bit j -> dim j).
template <typename scalar_t>
FASTVQ_HOST_DEVICE void lfq_unpack_group(int64_t index, int64_t g, scalar_t* codes) {
  for (int64_t j = 0; j < g; ++j) codes[j] = static_cast<scalar_t>(((index >> j) & 1) ? 1.f : -1.f);
}

// An index in the requested bit order from / to the lsb order the row functions use.
FASTVQ_HOST_DEVICE int64_t lfq_order_index(int64_t lsb_or_msb, int64_t g, bool msb) {
  return msb ? static_cast<int64_t>(lfq_reverse_bits(static_cast<uint64_t>(lsb_or_msb), g)) : lsb_or_msb;
}

FASTVQ_HOST_DEVICE bool lfq_index_valid(int64_t index, int64_t g) {
  return index >= 0 && (g >= 63 || (index >> g) == 0);
}

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

// Forward of one (row, group) of weight w: P_A and P_B rows (P_A scaled by w), and w times the sum of the
// group's binary entropies. lsb: half A is dims [0, a) (bit i <-> dim i), half B dims [a, g). msb: bit i of the
// index is dim g-1-i, so each half is expanded walking the dims backwards: A from dim g-1, B from dim b-1.
// A row of weight 0 writes zeros and reads nothing (it may hold NaN).
template <typename scalar_t, typename acc_t>
FASTVQ_HOST_DEVICE void lfq_entropy_forward_group(const scalar_t* z, int64_t stride_d, int64_t a, int64_t b, bool msb,
                                                  acc_t scale, acc_t w, acc_t* pa, acc_t* pb, acc_t* h_sum) {
  if (w == acc_t(0)) {
    for (int64_t c = 0; c < (int64_t{1} << a); ++c) pa[c] = acc_t(0);
    for (int64_t c = 0; c < (int64_t{1} << b); ++c) pb[c] = acc_t(0);
    if (h_sum != nullptr) *h_sum = acc_t(0);
    return;
  }
  if (msb) {
    lfq_expand<scalar_t, acc_t>(z + (a + b - 1) * stride_d, -stride_d, a, scale, pa);
    lfq_expand<scalar_t, acc_t>(z + (b - 1) * stride_d, -stride_d, b, scale, pb);
  } else {
    lfq_expand<scalar_t, acc_t>(z, stride_d, a, scale, pa);
    lfq_expand<scalar_t, acc_t>(z + a * stride_d, stride_d, b, scale, pb);
  }
  if (w != acc_t(1)) {
    for (int64_t c = 0; c < (int64_t{1} << a); ++c) pa[c] *= w;
  }
  if (h_sum != nullptr) {
    acc_t h = acc_t(0);
    for (int64_t j = 0; j < a + b; ++j) h += lfq_binary_entropy(lfq_logit<scalar_t, acc_t>(z, stride_d, j, scale));
    *h_sum = w * h;
  }
}

// Backward of one half (m bits at z, w = dL/dP over its 2^m entries): for each bit j,
//   dL/dp_j = sum over the other bits' codes r of (w[r with bit j = 1] - w[r with bit j = 0]) * E_j[r]
// with E_j the expansion over the other m - 1 bits (in scratch, 2^(m-1) entries); then
//   dL/dz_j = row_w * scale * p_j (1 - p_j) * (dL/dp_j - grad_h * x_j)      (h'(x) = -x p (1 - p))
// where dL/dp_j is computed from the unweighted P rows, and the row's weight row_w scales both terms.
// grad_z[j * grad_stride] is dim j's gradient.
template <typename scalar_t, typename acc_t>
FASTVQ_HOST_DEVICE void lfq_entropy_backward_half(const scalar_t* z, int64_t stride_d, int64_t m, acc_t scale,
                                                  const acc_t* w, acc_t grad_h, acc_t row_w, acc_t* scratch,
                                                  acc_t* grad_z, int64_t grad_stride) {
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
    grad_z[j * grad_stride] = row_w * (scale * lfq_sigmoid(x) * lfq_sigmoid(-x) * (d - grad_h * x));
  }
}

// Backward of one (row, group) of weight row_w: both halves, in the forward's bit order. wa / wb are dL/dP_A and
// dL/dP_B of the unweighted rows; a row of weight 0 gets a zero gradient and reads nothing.
template <typename scalar_t, typename acc_t>
FASTVQ_HOST_DEVICE void lfq_entropy_backward_group(const scalar_t* z, int64_t stride_d, int64_t a, int64_t b, bool msb,
                                                   acc_t scale, const acc_t* wa, const acc_t* wb, acc_t grad_h,
                                                   acc_t row_w, acc_t* scratch, acc_t* grad_z) {
  if (row_w == acc_t(0)) {
    for (int64_t j = 0; j < a + b; ++j) grad_z[j] = acc_t(0);
    return;
  }
  if (msb) {
    lfq_entropy_backward_half<scalar_t, acc_t>(z + (a + b - 1) * stride_d, -stride_d, a, scale, wa, grad_h, row_w,
                                               scratch, grad_z + (a + b - 1), -1);
    lfq_entropy_backward_half<scalar_t, acc_t>(z + (b - 1) * stride_d, -stride_d, b, scale, wb, grad_h, row_w, scratch,
                                               grad_z + (b - 1), -1);
  } else {
    lfq_entropy_backward_half<scalar_t, acc_t>(z, stride_d, a, scale, wa, grad_h, row_w, scratch, grad_z, 1);
    lfq_entropy_backward_half<scalar_t, acc_t>(z + a * stride_d, stride_d, b, scale, wb, grad_h, row_w, scratch,
                                               grad_z + a, 1);
  }
}

}  // namespace fastvq
