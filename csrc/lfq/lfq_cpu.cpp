// CPU host functions of the lfq ops: checks and allocation (lfq_host.h), and parallel loops over the
// shared per-(row, group) functions of lfq.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstring>

#include "lfq/lfq_host.h"

namespace fastvq {
namespace {

template <typename scalar_t, typename acc_t>
void entropy_rows_cpu(const LfqEntropyParams<acc_t>& p, bool backward) {
  const int64_t G = p.D / p.g, A = int64_t{1} << p.a, B = int64_t{1} << p.b;
  const int64_t S = int64_t{1} << (std::max(p.a, p.b) > 0 ? std::max(p.a, p.b) - 1 : 0);
  const scalar_t* z = static_cast<const scalar_t*>(p.z);
  const int64_t work = (backward ? p.g : 1) * (A + B);
  at::parallel_for(0, p.rows * G, std::max<int64_t>(1, 16384 / work), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / G, grp = i % G, n = p.row0 + r, slot = grp * p.rows + r;
      const scalar_t* zg = z + n * p.z_stride_n + grp * p.g * p.z_stride_d;
      const acc_t w = p.weight != nullptr ? p.weight[n] : acc_t(1);
      if (!backward) {
        lfq_entropy_forward_group<scalar_t, acc_t>(zg, p.z_stride_d, p.a, p.b, p.msb, p.scale, w, p.pa + slot * A,
                                                   p.pb + slot * B, p.h_rows ? p.h_rows + n * G + grp : nullptr);
      } else {
        lfq_entropy_backward_group<scalar_t, acc_t>(zg, p.z_stride_d, p.a, p.b, p.msb, p.scale, p.wa + slot * A,
                                                    p.wb + slot * B, *p.grad_h, w, p.scratch + slot * S,
                                                    p.grad_z + n * p.D + grp * p.g);
      }
    }
  });
}

// The +-1 codes of every byte value, 8 per byte (bit j -> entry j): unpacking copies 8 codes per index byte.
template <typename scalar_t>
const scalar_t* byte_codes_table() {
  static const std::array<scalar_t, 256 * 8> table = [] {
    std::array<scalar_t, 256 * 8> t{};
    for (int b = 0; b < 256; ++b) lfq_unpack_group<scalar_t>(b, 8, t.data() + b * 8);
    return t;
  }();
  return table.data();
}

// lfq_unpack_group's result, a byte of the index at a time.
template <typename scalar_t>
void unpack_group_bytes(int64_t index, int64_t g, scalar_t* codes) {
  const scalar_t* table = byte_codes_table<scalar_t>();
  int64_t j = 0;
  for (; j + 8 <= g; j += 8) std::memcpy(codes + j, table + ((index >> j) & 0xff) * 8, 8 * sizeof(scalar_t));
  if (j < g) lfq_unpack_group<scalar_t>(index >> j, g - j, codes + j);
}

// lfq_quantize_group's result (the lsb index), 8 dims at a time: their sign bits form a byte, whose codes come
// from the table.
template <typename scalar_t, typename Stride>
int64_t quantize_group_bytes(const scalar_t* z, Stride stride_d, int64_t g, scalar_t* codes) {
  using cmp_t = lfq_acc_t<scalar_t>;
  const scalar_t* table = byte_codes_table<scalar_t>();
  uint64_t index = 0;
  int64_t j = 0;
  for (; j + 8 <= g; j += 8) {
    unsigned byte = 0;
    for (int k = 0; k < 8; ++k) byte |= static_cast<unsigned>(static_cast<cmp_t>(z[(j + k) * stride_d]) > cmp_t(0)) << k;
    std::memcpy(codes + j, table + byte * 8, 8 * sizeof(scalar_t));
    index |= static_cast<uint64_t>(byte) << j;
  }
  if (j < g) {
    index |= static_cast<uint64_t>(lfq_quantize_group<scalar_t>(z + j * stride_d, stride_d, g - j, codes + j)) << j;
  }
  return static_cast<int64_t>(index);
}

}  // namespace

// z [..., D] -> (codes [..., D] in z's dtype, indices [...] or [..., D/g] int64)
std::tuple<at::Tensor, at::Tensor> lfq_quantize_cpu(const at::Tensor& z, int64_t group_bits,
                                                    std::string_view bit_order) {
  LfqQuantizeSetup st = lfq_quantize_setup(z, group_bits, bit_order);
  if (st.N == 0) return {st.codes, st.indices};
  const int64_t N = st.N, D = st.D, g = st.g, G = st.G;
  const bool msb = st.msb;
  const at::Tensor& z2 = st.z2;
  at::Tensor& codes = st.codes;
  at::Tensor& indices = st.indices;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_quantize_cpu", [&] {
    const scalar_t* zp = z2.data_ptr<scalar_t>();
    scalar_t* cp = codes.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    const int64_t sn = z2.stride(0), sd = z2.stride(1);
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / D), [&](int64_t b, int64_t e) {
      // A compile-time unit stride for contiguous rows lets the compiler vectorise the group loop.
      auto rows = [&](auto stride_d) {
        for (int64_t n = b; n < e; ++n) {
          for (int64_t grp = 0; grp < G; ++grp) {
            const int64_t lsb = quantize_group_bytes<scalar_t>(zp + n * sn + grp * g * stride_d, stride_d, g,
                                                               cp + n * D + grp * g);
            ip[n * G + grp] = lfq_order_index(lsb, g, msb);
          }
        }
      };
      if (sd == 1) {
        rows(std::integral_constant<int64_t, 1>{});
      } else {
        rows(sd);
      }
    });
  });
  return {st.codes, st.indices};
}

// indices [...] or [..., dim/g] int64 -> codes [..., dim] of +-1
at::Tensor lfq_codes_from_indices_cpu(const at::Tensor& indices, int64_t dim, int64_t group_bits,
                                      std::optional<at::ScalarType> dtype, std::string_view bit_order) {
  LfqUnpackSetup st = lfq_codes_from_indices_setup(indices, dim, group_bits, dtype, bit_order);
  if (st.N == 0) return st.codes;
  const int64_t N = st.N, g = st.g, G = st.G;
  const bool msb = st.msb;
  const at::Tensor& indices2 = st.indices2;
  at::Tensor& codes = st.codes;
  const int64_t* ip = indices2.data_ptr<int64_t>();
  const int64_t sn = indices2.stride(0), sg = indices2.stride(1);
  std::atomic<int64_t> first_bad{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "lfq_codes_from_indices_cpu", [&] {
    scalar_t* cp = codes.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / dim), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        for (int64_t grp = 0; grp < G; ++grp) {
          const int64_t index = ip[n * sn + grp * sg];
          if (!lfq_index_valid(index, g)) {
            int64_t cur = first_bad.load();
            while ((cur < 0 || n * G + grp < cur) && !first_bad.compare_exchange_weak(cur, n * G + grp)) {
            }
            continue;
          }
          unpack_group_bytes<scalar_t>(lfq_order_index(index, g, msb), g, cp + n * dim + grp * g);
        }
      }
    });
  });
  // The kernel found a bad index (and skipped its group); the shared check names the first one.
  if (first_bad.load() >= 0) lfq_check_indices(indices2, g, ValueCheck::kLoop);
  return codes;
}

// z [..., D], weight [...] or None -> (sample_entropy [], codebook_entropy [], code_probs [G, 2^g]); float64 for
// float64 z, else float32
std::tuple<at::Tensor, at::Tensor, at::Tensor> lfq_entropy_cpu(const at::Tensor& z, double temperature,
                                                               int64_t group_bits,
                                                               const std::optional<at::Tensor>& weight,
                                                               std::string_view bit_order) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  lfq_check_z("lfq_entropy", z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_entropy_cpu", [&] {
    using acc_t = lfq_acc_t<scalar_t>;
    out = lfq_entropy_forward_impl<acc_t>(z, temperature, group_bits, weight, bit_order,
                                          [](const LfqEntropyParams<acc_t>& p, bool bw) {
                                            entropy_rows_cpu<scalar_t, acc_t>(p, bw);
                                          });
  });
  return out;
}

at::Tensor lfq_entropy_backward_cpu(const std::optional<at::Tensor>& grad_sample,
                                    const std::optional<at::Tensor>& grad_codebook,
                                    const std::optional<at::Tensor>& grad_code_probs, const at::Tensor& z,
                                    const at::Tensor& code_probs, double temperature, int64_t group_bits,
                                    const std::optional<at::Tensor>& weight, std::string_view bit_order) {
  at::Tensor out;
  lfq_check_z("lfq_entropy_backward", z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lfq_entropy_backward_cpu", [&] {
    using acc_t = lfq_acc_t<scalar_t>;
    out = lfq_entropy_backward_impl<acc_t>(grad_sample, grad_codebook, grad_code_probs, z, code_probs, temperature,
                                           group_bits, weight, bit_order,
                                           [](const LfqEntropyParams<acc_t>& p, bool bw) {
                                             entropy_rows_cpu<scalar_t, acc_t>(p, bw);
                                           });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("lfq_quantize", &lfq_quantize_cpu);
  m.impl("lfq_codes_from_indices", &lfq_codes_from_indices_cpu);
  m.impl("lfq_entropy", &lfq_entropy_cpu);
  m.impl("lfq_entropy_backward", &lfq_entropy_backward_cpu);
}

}  // namespace fastvq
