// CUDA kernels of segment_sum and their host launcher (segment.h has the contract).
//   0. host: index range check (one aminmax, one device->host copy), so a bad index is a clear error;
//   1. segment_keys_kernel   one thread per element: its segment key g * K + k (S for a skipped element), and
//                            the segment histogram (integer atomics: the counts do not depend on the order);
//   2. host: offsets = exclusive scan of the histogram (at::cumsum), order = the permutation of a stable
//      at::sort of the keys: each segment's elements in ascending element order;
//   3. segment_sum_kernel    one thread per (segment, column): adds the segment's elements one by one, in that
//                            order (the column-0 thread also sums the weights into counts).
// No float atomics: each output element is one sequential chain, so results are bit-identical to the CPU
// kernel's, for every launch shape and schedule. An index that escapes the host check (it cannot, unless
// the tensor changes under a racing stream) trips a device assert and is skipped: never an out-of-bounds
// access.
// Plain CUDA C++ only (no inline PTX): the emulation build executes this source on the CPU.
#include "common/cuda_compat.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "segment/segment_host.h"

namespace fastvq {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 16;  // grid-stride loops cover the rest

inline unsigned segment_blocks(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks)));
}

// keys [M] int32: the segment of element e = n * G + g, or S when skipped; hist [S] int32 += 1 per element.
template <typename index_t>
__global__ void __launch_bounds__(kThreads) segment_keys_kernel(const SegmentSumParams p, int32_t* keys, int32_t* hist) {
  const index_t* index = static_cast<const index_t*>(p.index);
  const int64_t M = p.N * p.G, S = p.G * p.K;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < M; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / p.G, g = e - n * p.G;
    const int64_t k = static_cast<int64_t>(index[n * p.i_stride_n + g * p.i_stride_g]);
    FASTVQ_KERNEL_ASSERT(k >= -1 && k < p.K && "segment_sum: index out of range [-1, num_segments)");
    const int64_t s = segment_of(k, g, p.K);
    keys[e] = static_cast<int32_t>(s >= 0 ? s : S);
    if (s >= 0) atomicAdd(hist + s, 1);
  }
}

// One thread per (segment s, column j) of [S, max(d, 1)].
template <typename scalar_t, typename acc_t, bool kWeighted>
__global__ void __launch_bounds__(kThreads) segment_sum_kernel(const SegmentSumParams p) {
  const scalar_t* values = static_cast<const scalar_t*>(p.values);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  acc_t* sums = static_cast<acc_t*>(p.sums);
  acc_t* counts = static_cast<acc_t*>(p.counts);
  const int64_t S = p.G * p.K, dd = p.d > 0 ? p.d : 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < S * dd; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = i / dd, j = i - s * dd, g = s / p.K;
    const int64_t begin = p.offsets[s], end = p.offsets[s + 1];
    const bool has_column = j < p.d;
    acc_t acc = acc_t(0), count = acc_t(0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = p.order[r] / p.G;  // element id -> row
      const acc_t w = kWeighted ? weight[n * p.w_stride_n + g * p.w_stride_g] : acc_t(1);
      if (kWeighted && j == 0) count = count + w;
      if (has_column) {
        const acc_t v = static_cast<acc_t>(values[n * p.v_stride_n + g * p.v_stride_g + j * p.v_stride_d]);
        acc = segment_add<kWeighted>(acc, v, w);
      }
    }
    if (has_column) sums[s * p.d + j] = acc;
    if (j == 0) counts[s] = kWeighted ? count : static_cast<acc_t>(end - begin);
  }
}

}  // namespace

// values [N, d] / [N, G, d], index [N] / [N, G] int64/int32, weight like index (accumulation dtype)
//   -> (sums [K, d] / [G, K, d], counts [K] / [G, K]) in the accumulation dtype
std::tuple<at::Tensor, at::Tensor> segment_sum_cuda(const at::Tensor& values, const at::Tensor& index,
                                                    int64_t num_segments, const std::optional<at::Tensor>& weight) {
  const SegmentShape s = check_segment_sum_args(values, index, num_segments, weight);
  FASTVQ_CUDA_DEVICE_GUARD(values.device());
  auto [sums, counts] = segment_sum_outputs(values, s);
  const int64_t M = s.N * s.G, S = s.G * s.K;
  TORCH_CHECK(M < (int64_t{1} << 31) && S < (int64_t{1} << 31) - 1,
              "segment_sum: on CUDA, N * G and G * num_segments must be < 2^31, got N * G = ", M,
              ", G * num_segments = ", S);
  const at::Tensor values3 = segment_grouped(values, s);
  const at::Tensor index2 = segment_grouped(index, s);
  std::optional<at::Tensor> weight2;
  if (weight.has_value()) weight2 = segment_grouped(*weight, s);

  if (M > 0) {  // the host-side range check: one small device->host copy
    const auto [lo, hi] = at::aminmax(index2);
    const at::Tensor range = at::stack({lo.to(at::kLong), hi.to(at::kLong)}).cpu();
    const int64_t* r = range.data_ptr<int64_t>();
    if (r[0] < -1 || r[1] >= s.K) segment_sum_index_error(index2, s);
  }
  if (S == 0) return {sums, counts};
  if (M == 0) {
    sums.zero_();
    counts.zero_();
    return {sums, counts};
  }

  SegmentSumParams p = segment_sum_params(values3, index2, weight2, s, sums, counts);
  const auto stream = FASTVQ_CUDA_STREAM();
  const auto iopts = values.options().dtype(at::kInt);
  at::Tensor keys = at::empty({M}, iopts);      // [M]
  at::Tensor hist = at::zeros({S}, iopts);      // [S]
  if (p.index_int64) {
    FASTVQ_LAUNCH_KERNEL(segment_keys_kernel<int64_t>, dim3(segment_blocks(M)), dim3(kThreads), 0, stream, p,
                         keys.data_ptr<int32_t>(), hist.data_ptr<int32_t>());
  } else {
    FASTVQ_LAUNCH_KERNEL(segment_keys_kernel<int32_t>, dim3(segment_blocks(M)), dim3(kThreads), 0, stream, p,
                         keys.data_ptr<int32_t>(), hist.data_ptr<int32_t>());
  }
  FASTVQ_CUDA_LAUNCH_CHECK();
  at::Tensor offsets = at::zeros({S + 1}, values.options().dtype(at::kLong));  // [S + 1]
  at::Tensor ends = offsets.narrow(0, 1, S);  // offsets[s + 1] = the end of segment s
  at::cumsum_out(ends, hist, 0, at::kLong);
  // A stable sort: equal keys keep ascending element order (the order the sums are taken in).
  const at::Tensor order = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false));  // [M]
  p.offsets = offsets.data_ptr<int64_t>();
  p.order = order.data_ptr<int64_t>();

  const int64_t items = S * std::max<int64_t>(s.d, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segment_sum_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (p.weight) {
      FASTVQ_LAUNCH_KERNEL((segment_sum_kernel<scalar_t, acc_t, true>), dim3(segment_blocks(items)), dim3(kThreads),
                           0, stream, p);
    } else {
      FASTVQ_LAUNCH_KERNEL((segment_sum_kernel<scalar_t, acc_t, false>), dim3(segment_blocks(items)),
                           dim3(kThreads), 0, stream, p);
    }
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
  return {sums, counts};
}

TORCH_LIBRARY_IMPL(FASTVQ_CUDA_LIBRARY, FASTVQ_CUDA_DISPATCH_KEY, m) { m.impl("segment_sum", &segment_sum_cuda); }

}  // namespace fastvq
