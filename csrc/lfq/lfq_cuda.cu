// CUDA kernels of the lfq ops and their host launchers. Each thread handles one (row, group) with the
// same per-row functions as the CPU (lfq.h); the entropy's GEMMs and reductions are ATen calls in the
// shared orchestration (lfq_host.h). Memory-bound quantize/unpack read z once and write codes once.
// Plain CUDA C++ only (no inline PTX): the emulation build executes this source on the CPU.
#include "common/cuda_compat.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "lfq/lfq_host.h"

namespace fastvq {
namespace {

constexpr int kThreads = 256;

inline unsigned lfq_blocks(int64_t work) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 64))); }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lfq_quantize_kernel(const LfqQuantizeParams p) {
  const scalar_t* z = static_cast<const scalar_t*>(p.z);
  scalar_t* codes = static_cast<scalar_t*>(p.codes);
  const int64_t G = p.D / p.g;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < p.N; n += int64_t(gridDim.x) * blockDim.x) {
    for (int64_t grp = 0; grp < G; ++grp) {
      const int64_t lsb = lfq_quantize_group<scalar_t>(z + n * p.z_stride_n + grp * p.g * p.z_stride_d, p.z_stride_d,
                                                       p.g, codes + n * p.D + grp * p.g);
      p.indices[n * G + grp] = lfq_order_index(lsb, p.g, p.msb);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lfq_unpack_kernel(const LfqUnpackParams p) {
  scalar_t* codes = static_cast<scalar_t*>(p.codes);
  const int64_t G = p.D / p.g;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < p.N; n += int64_t(gridDim.x) * blockDim.x) {
    for (int64_t grp = 0; grp < G; ++grp) {
      const int64_t index = p.indices[n * p.indices_stride_n + grp * p.indices_stride_g];
      // Checked on the host; an index out of range anyway gives its group's codes for its low g bits (every
      // write stays in the group), and the assert (diagnosis only) trips.
      FASTVQ_KERNEL_ASSERT(lfq_index_valid(index, p.g) && "lfq_codes_from_indices: index out of range [0, 2^g)");
      lfq_unpack_group<scalar_t>(lfq_order_index(index, p.g, p.msb), p.g, codes + n * p.D + grp * p.g);
    }
  }
}

// Forward: P_A / P_B rows and the row's binary-entropy sum, one (row, group) per thread.
template <typename scalar_t, typename acc_t>
// (No __launch_bounds__ on the entropy kernels: with it, ptxas 13.0 spills a few bytes at 40 registers.)
__global__ void lfq_entropy_forward_kernel(const LfqEntropyParams<acc_t> p) {
  const int64_t G = p.D / p.g, A = int64_t{1} << p.a, B = int64_t{1} << p.b;
  const scalar_t* z = static_cast<const scalar_t*>(p.z);
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < p.rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = p.row0 + r;
    const acc_t w = p.weight != nullptr ? p.weight[n] : acc_t(1);
    for (int64_t grp = 0; grp < G; ++grp) {
      const int64_t slot = grp * p.rows + r;
      lfq_entropy_forward_group<scalar_t, acc_t>(z + n * p.z_stride_n + grp * p.g * p.z_stride_d, p.z_stride_d, p.a,
                                                 p.b, p.msb, p.scale, w, p.pa + slot * A, p.pb + slot * B,
                                                 p.h_rows != nullptr ? p.h_rows + n * G + grp : nullptr);
    }
  }
}

// Backward: dL/dz of one (row, group) per thread from dL/dP_A and dL/dP_B.
template <typename scalar_t, typename acc_t>
__global__ void lfq_entropy_backward_kernel(const LfqEntropyParams<acc_t> p) {
  const int64_t G = p.D / p.g, A = int64_t{1} << p.a, B = int64_t{1} << p.b;
  const int64_t S = int64_t{1} << (p.a > p.b ? (p.a > 0 ? p.a - 1 : 0) : (p.b > 0 ? p.b - 1 : 0));
  const scalar_t* z = static_cast<const scalar_t*>(p.z);
  const acc_t grad_h = *p.grad_h;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < p.rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = p.row0 + r;
    const acc_t w = p.weight != nullptr ? p.weight[n] : acc_t(1);
    for (int64_t grp = 0; grp < G; ++grp) {
      const int64_t slot = grp * p.rows + r;
      lfq_entropy_backward_group<scalar_t, acc_t>(z + n * p.z_stride_n + grp * p.g * p.z_stride_d, p.z_stride_d, p.a,
                                                  p.b, p.msb, p.scale, p.wa + slot * A, p.wb + slot * B, grad_h, w,
                                                  p.scratch + slot * S, p.grad_z + n * p.D + grp * p.g);
    }
  }
}

template <typename scalar_t, typename acc_t>
void entropy_rows_cuda(const LfqEntropyParams<acc_t>& p, bool backward) {
  const auto stream = FASTVQ_CUDA_STREAM();
  const dim3 grid(lfq_blocks(p.rows));
  if (backward) {
    FASTVQ_LAUNCH_KERNEL((lfq_entropy_backward_kernel<scalar_t, acc_t>), grid, dim3(kThreads), 0, stream, p);
  } else {
    FASTVQ_LAUNCH_KERNEL((lfq_entropy_forward_kernel<scalar_t, acc_t>), grid, dim3(kThreads), 0, stream, p);
  }
  FASTVQ_CUDA_LAUNCH_CHECK();
}

}  // namespace

// z [..., D] -> (codes [..., D] in z's dtype, indices [...] or [..., D/g] int64)
std::tuple<at::Tensor, at::Tensor> lfq_quantize_cuda(const at::Tensor& z, int64_t group_bits,
                                                     std::string_view bit_order) {
  FASTVQ_CUDA_DEVICE_GUARD(z.device());
  LfqQuantizeSetup st = lfq_quantize_setup(z, group_bits, bit_order);
  if (st.N == 0) return {st.codes, st.indices};
  const int64_t N = st.N, D = st.D, g = st.g;
  const at::Tensor& z2 = st.z2;
  at::Tensor& codes = st.codes;
  at::Tensor& indices = st.indices;
  LfqQuantizeParams p{};
  p.z = z2.data_ptr(), p.z_stride_n = z2.stride(0), p.z_stride_d = z2.stride(1);
  p.codes = codes.data_ptr(), p.indices = indices.data_ptr<int64_t>();
  p.N = N, p.D = D, p.g = g, p.msb = st.msb;
  const auto stream = FASTVQ_CUDA_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_quantize_cuda", [&] {
    FASTVQ_LAUNCH_KERNEL(lfq_quantize_kernel<scalar_t>, dim3(lfq_blocks(N)), dim3(kThreads), 0, stream, p);
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
  return {st.codes, st.indices};
}

// indices [...] or [..., dim/g] int64 -> codes [..., dim] of +-1
at::Tensor lfq_codes_from_indices_cuda(const at::Tensor& indices, int64_t dim, int64_t group_bits,
                                       std::optional<at::ScalarType> dtype, std::string_view bit_order) {
  FASTVQ_CUDA_DEVICE_GUARD(indices.device());
  LfqUnpackSetup st = lfq_codes_from_indices_setup(indices, dim, group_bits, dtype, bit_order);
  if (st.N == 0) return st.codes;
  const int64_t N = st.N, g = st.g;
  const at::Tensor& indices2 = st.indices2;
  lfq_check_indices(indices2, g, cuda_value_check());
  at::Tensor& codes = st.codes;
  LfqUnpackParams p{};
  p.indices = indices2.data_ptr<int64_t>();
  p.indices_stride_n = indices2.stride(0), p.indices_stride_g = indices2.stride(1);
  p.codes = codes.data_ptr(), p.N = N, p.D = dim, p.g = g, p.msb = st.msb;
  const auto stream = FASTVQ_CUDA_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "lfq_codes_from_indices_cuda", [&] {
    FASTVQ_LAUNCH_KERNEL(lfq_unpack_kernel<scalar_t>, dim3(lfq_blocks(N)), dim3(kThreads), 0, stream, p);
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
  return codes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lfq_entropy_cuda(const at::Tensor& z, double temperature,
                                                                int64_t group_bits,
                                                                const std::optional<at::Tensor>& weight,
                                                                std::string_view bit_order) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  lfq_check_z("lfq_entropy", z);
  FASTVQ_CUDA_DEVICE_GUARD(z.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_entropy_cuda", [&] {
    using acc_t = lfq_acc_t<scalar_t>;
    out = lfq_entropy_forward_impl<acc_t>(z, temperature, group_bits, weight, bit_order,
                                          entropy_rows_cuda<scalar_t, acc_t>);
  });
  return out;
}

at::Tensor lfq_entropy_backward_cuda(const std::optional<at::Tensor>& grad_sample,
                                     const std::optional<at::Tensor>& grad_codebook,
                                     const std::optional<at::Tensor>& grad_code_probs, const at::Tensor& z,
                                     const at::Tensor& code_probs, double temperature, int64_t group_bits,
                                     const std::optional<at::Tensor>& weight, std::string_view bit_order) {
  at::Tensor out;
  lfq_check_z("lfq_entropy_backward", z);
  FASTVQ_CUDA_DEVICE_GUARD(z.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_entropy_backward_cuda", [&] {
    using acc_t = lfq_acc_t<scalar_t>;
    out = lfq_entropy_backward_impl<acc_t>(grad_sample, grad_codebook, grad_code_probs, z, code_probs, temperature,
                                           group_bits, weight, bit_order, entropy_rows_cuda<scalar_t, acc_t>);
  });
  return out;
}

TORCH_LIBRARY_IMPL(FASTVQ_CUDA_LIBRARY, FASTVQ_CUDA_DISPATCH_KEY, m) {
  m.impl("lfq_quantize", &lfq_quantize_cuda);
  m.impl("lfq_codes_from_indices", &lfq_codes_from_indices_cuda);
  m.impl("lfq_entropy", &lfq_entropy_cuda);
  m.impl("lfq_entropy_backward", &lfq_entropy_backward_cuda);
}

}  // namespace fastvq
