// CUDA kernels of the mcq ops and their host launchers.
//
// mcq_search runs the same two steps as the CPU kernel (see mcq.h), with the same fp32 arithmetic, so
// both devices return bit-identical indices and scores:
//   mcq_prepare_kernel  one thread per code: convert, normalise (cosine), transpose to [G, d, K_pad],
//                       bias = -||c||^2/2 (l2) or 0 (cosine), -inf for non-finite codes and padding.
//   mcq_search_kernel   grid (row blocks, G; 65535 groups per launch). A block owns 64 rows of one group: 8 warps x 8 rows.
//                       Code tiles of 128 go through shared memory in d-chunks of 32; each lane scores
//                       4 codes (lane + 32 c) of the tile for all 8 rows of its warp, keeps a running
//                       best per row, and the warp reduces (value, index) pairs with the shared tie rule.
// Plain CUDA C++ only (no inline PTX): the emulation build executes this source on the CPU.
#include "common/cuda_compat.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "mcq/mcq_gemm_search_cuda.h"
#include "mcq/mcq_host.h"

namespace fastvq {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 8;
constexpr int kBlockRows = kWarps * kRowsPerWarp;  // 64 rows per block
constexpr int kCodesPerLane = 4;
constexpr int kTileK = 32 * kCodesPerLane;  // 128 codes per shared-memory tile (also the K padding)
constexpr int kDChunk = 32;                 // dimensions per shared-memory chunk (a multiple of 4)
constexpr int kPrepThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kPrepThreads) mcq_prepare_kernel(const McqSearchParams p) {
  const int64_t g = blockIdx.y;
  const int64_t k = int64_t(blockIdx.x) * kPrepThreads + threadIdx.x;
  if (k >= p.K_pad) return;
  const scalar_t* cb = static_cast<const scalar_t*>(p.codebooks);
  float* cbt = p.cb_prep + g * p.d * p.K_pad + k;  // column k of [d, K_pad]
  float* bias = p.bias_prep + g * p.K_pad;
  if (k >= p.K) {
    bias[k] = mcq_neg_inf();
    for (int64_t j = 0; j < p.d; ++j) cbt[j * p.K_pad] = 0.f;
    return;
  }
  const int64_t base = g * p.cb_stride_g + k * p.cb_stride_k;
  float sum_sq = 0.f;
  bool finite = true;
  for (int64_t j = 0; j < p.d; ++j) {
    const float v = static_cast<float>(cb[base + j * p.cb_stride_d]);
    finite = finite && mcq_isfinite(v);
    sum_sq = mcq_fma(v, v, sum_sq);
  }
  bias[k] = mcq_code_bias(p.metric, sum_sq, finite);
  const float den = p.metric == McqMetric::kCosine ? mcq_cosine_denominator(sum_sq) : 1.f;
  for (int64_t j = 0; j < p.d; ++j) {
    const float v = static_cast<float>(cb[base + j * p.cb_stride_d]);
    cbt[j * p.K_pad] = finite ? v / den : 0.f;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mcq_search_kernel(const McqSearchParams p) {
  __shared__ __align__(16) float z_s[kBlockRows][kDChunk];  // the block's rows, one d-chunk, fp32
  __shared__ __align__(16) float cb_s[kDChunk][kTileK];     // one code tile, one d-chunk
  __shared__ float den_s[kBlockRows];                       // cosine: max(||z||, eps); l2: 1
  __shared__ int ok_s[kBlockRows];                          // 1 = row exists and is finite

  const scalar_t* z = static_cast<const scalar_t*>(p.z);
  const int64_t g = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kBlockRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t d = p.d, K_pad = p.K_pad;
  const float* cbt = p.cb_prep + g * d * K_pad;
  const float* bias = p.bias_prep + g * K_pad;

  // One thread per row: sum of squares as the same fma chain as the CPU, and finiteness.
  if (tid < kBlockRows) {
    const int64_t n = row0 + tid;
    float sum_sq = 0.f;
    bool finite = true;
    if (n < p.N) {
      const int64_t base = n * p.z_stride_n + g * p.z_stride_g;
      for (int64_t j = 0; j < d; ++j) {
        const float v = static_cast<float>(z[base + j * p.z_stride_d]);
        finite = finite && mcq_isfinite(v);
        sum_sq = mcq_fma(v, v, sum_sq);
      }
    }
    den_s[tid] = p.metric == McqMetric::kCosine ? mcq_cosine_denominator(sum_sq) : 1.f;
    ok_s[tid] = (n < p.N && finite) ? 1 : 0;
  }
  __syncthreads();  // den_s / ok_s are read by every warp (with d == 0 no chunk barrier below would run)

  float best_v[kRowsPerWarp];
  int best_k[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    best_v[r] = mcq_neg_inf();
    best_k[r] = 0x7fffffff;
  }

  const bool z_resident = d <= kDChunk;  // then z_s is loaded once, on the first tile
  for (int64_t k0 = 0; k0 < K_pad; k0 += kTileK) {
    float acc[kRowsPerWarp][kCodesPerLane];
#pragma unroll
    for (int c = 0; c < kCodesPerLane; ++c) {
      const float b = bias[k0 + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r][c] = b;
    }
    for (int64_t d0 = 0; d0 < d; d0 += kDChunk) {
      const int dc = static_cast<int>(d - d0 < kDChunk ? d - d0 : kDChunk);
      __syncthreads();  // the previous chunk's readers are done
      if (!z_resident || k0 == 0) {
        for (int i = tid; i < kBlockRows * kDChunk; i += kThreads) {
          const int r = i / kDChunk, j = i % kDChunk;
          const int64_t n = row0 + r;
          float v = 0.f;
          if (j < dc && n < p.N) {
            v = static_cast<float>(z[n * p.z_stride_n + g * p.z_stride_g + (d0 + j) * p.z_stride_d]) / den_s[r];
          }
          z_s[r][j] = v;
        }
      }
      for (int i = tid; i < kDChunk * kTileK; i += kThreads) {
        const int j = i / kTileK, c = i % kTileK;
        cb_s[j][c] = j < dc ? cbt[(d0 + j) * K_pad + k0 + c] : 0.f;
      }
      __syncthreads();
      // Steps of 4 dimensions (one float4 of z per row); the zero padding past dc adds exact zeros.
      for (int j = 0; j < dc; j += 4) {
        float cv[4][kCodesPerLane];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
          for (int c = 0; c < kCodesPerLane; ++c) cv[jj][c] = cb_s[j + jj][lane + 32 * c];
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float4 zv = *reinterpret_cast<const float4*>(&z_s[warp * kRowsPerWarp + r][j]);
#pragma unroll
          for (int c = 0; c < kCodesPerLane; ++c) {
            float a = acc[r][c];
            a = mcq_fma(zv.x, cv[0][c], a);
            a = mcq_fma(zv.y, cv[1][c], a);
            a = mcq_fma(zv.z, cv[2][c], a);
            a = mcq_fma(zv.w, cv[3][c], a);
            acc[r][c] = a;
          }
        }
      }
    }
    // A lane sees its codes in increasing k, so a strict > keeps the smallest k among equals;
    // NaN objectives never compare greater.
#pragma unroll
    for (int c = 0; c < kCodesPerLane; ++c) {
      const int k = static_cast<int>(k0) + lane + 32 * c;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (acc[r][c] > best_v[r]) {
          best_v[r] = acc[r][c];
          best_k[r] = k;
        }
      }
    }
  }

  // Warp argmax per row (butterfly, so every lane ends with the row's result); lane r writes row r.
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    float v = best_v[r];
    int k = best_k[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int ok = __shfl_xor_sync(0xffffffffu, k, off);
      if (mcq_better(ov, ok, v, k)) {
        v = ov;
        k = ok;
      }
    }
    const int row = warp * kRowsPerWarp + r;
    const int64_t n = row0 + row;
    if (lane == r && n < p.N) {
      const int64_t out = n * p.G + g;
      if (!ok_s[row] || !(v > mcq_neg_inf())) {  // non-finite row, or no eligible code
        p.indices[out] = 0;
        p.scores[out] = mcq_nan();
      } else {
        p.indices[out] = k;
        if (p.metric == McqMetric::kL2) {  // exact distance, as the CPU computes it
          const int64_t base = n * p.z_stride_n + g * p.z_stride_g;
          float s = 0.f;
          for (int64_t j = 0; j < d; ++j) {
            const float diff = static_cast<float>(z[base + j * p.z_stride_d]) - cbt[j * K_pad + k];
            s = mcq_fma(diff, diff, s);
          }
          p.scores[out] = s;
        } else {
          p.scores[out] = v;
        }
      }
    }
  }
}

// One thread per output element of [N, G, d]; index -1 (a masked row) gives zeros. The host has checked the
// indices; were one out of range anyway, its row is filled with NaN (never an out-of-bounds read) and the
// assert (diagnosis only) trips.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(256) mcq_gather_kernel(const McqGatherParams p) {
  const scalar_t* cb = static_cast<const scalar_t*>(p.codebooks);
  const index_t* idx = static_cast<const index_t*>(p.indices);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  const int64_t total = p.N * p.G * p.d;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % p.d, ng = i / p.d, g = ng % p.G, n = ng / p.G;
    const int64_t k = static_cast<int64_t>(idx[n * p.idx_stride_n + g * p.idx_stride_g]);
    const bool in_range = k >= 0 && k < p.K;
    FASTVQ_KERNEL_ASSERT((in_range || k == -1) && "mcq_gather: index out of range [0, K) and not -1");
    out[i] = in_range ? cb[g * p.cb_stride_g + k * p.cb_stride_k + j * p.cb_stride_d]
                      : static_cast<scalar_t>(k == -1 ? 0.0f : mcq_nan());
  }
}

}  // namespace

// z [..., G, d], codebooks [G, K, d] -> (indices [..., G] int64, scores [..., G] float32)
std::tuple<at::Tensor, at::Tensor> mcq_search_cuda(const at::Tensor& z, const at::Tensor& codebooks,
                                                   std::string_view metric) {
  const McqMetric m = parse_mcq_metric(metric);
  const McqShape s = check_mcq_search_args(z, codebooks);
  FASTVQ_CUDA_DEVICE_GUARD(z.device());
  auto [indices, scores] = mcq_search_outputs(z);
  if (s.N == 0 || s.G == 0) return {indices, scores};

  const at::Tensor z3 = z.reshape({s.N, s.G, s.d});
  McqSearchParams p = mcq_search_params(z3, codebooks, s, m, indices, scores);
  if (s.d >= kMcqGemmMinD) {  // GEMM-shaped: mcq_gemm_search_cuda.cu (same bits, no codebook copy)
    mcq_gemm_search_cuda(z3, p);
    return {indices, scores};
  }
  p.K_pad = round_up(s.K, kTileK);
  at::Tensor cb_prep = at::empty({s.G, s.d, p.K_pad}, z.options().dtype(at::kFloat));  // [G, d, K_pad]
  at::Tensor bias_prep = at::empty({s.G, p.K_pad}, z.options().dtype(at::kFloat));     // [G, K_pad]
  p.cb_prep = cb_prep.data_ptr<float>();
  p.bias_prep = bias_prep.data_ptr<float>();

  const auto stream = FASTVQ_CUDA_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mcq_search_cuda", [&] {
    // Groups go on grid.y (at most 65535): more groups take more launches, each on params whose group-indexed
    // pointers start at its first group g0 (the output row stride stays p.G).
    for (int64_t g0 = 0; g0 < s.G; g0 += 65535) {
      McqSearchParams q = p;
      q.z = static_cast<const scalar_t*>(p.z) + g0 * p.z_stride_g;
      q.codebooks = static_cast<const scalar_t*>(p.codebooks) + g0 * p.cb_stride_g;
      q.cb_prep = p.cb_prep + g0 * p.d * p.K_pad;
      q.bias_prep = p.bias_prep + g0 * p.K_pad;
      q.indices = p.indices + g0;
      q.scores = p.scores + g0;
      const unsigned gy = static_cast<unsigned>(std::min<int64_t>(s.G - g0, 65535));
      const dim3 prep_grid(static_cast<unsigned>((p.K_pad + kPrepThreads - 1) / kPrepThreads), gy);
      FASTVQ_LAUNCH_KERNEL(mcq_prepare_kernel<scalar_t>, prep_grid, dim3(kPrepThreads), 0, stream, q);
      FASTVQ_CUDA_LAUNCH_CHECK();
      const dim3 grid(static_cast<unsigned>((s.N + kBlockRows - 1) / kBlockRows), gy);
      FASTVQ_LAUNCH_KERNEL(mcq_search_kernel<scalar_t>, grid, dim3(kThreads), 0, stream, q);
      FASTVQ_CUDA_LAUNCH_CHECK();
    }
  });
  return {indices, scores};
}

// indices [..., G] int64/int32, codebooks [G, K, d] -> [..., G, d]
at::Tensor mcq_gather_cuda(const at::Tensor& indices, const at::Tensor& codebooks) {
  const McqShape s = check_mcq_gather_args(indices, codebooks);
  FASTVQ_CUDA_DEVICE_GUARD(codebooks.device());
  at::Tensor out = mcq_gather_output(indices, codebooks);
  if (s.N * s.G > 0) mcq_gather_check_indices(indices.reshape({s.N, s.G}), s.K, cuda_value_check());
  if (out.numel() == 0) return out;
  const at::Tensor idx2 = indices.reshape({s.N, s.G});
  const McqGatherParams p = mcq_gather_params(idx2, codebooks, s, out);
  const auto stream = FASTVQ_CUDA_STREAM();
  const int64_t total = out.numel();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535 * 16));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebooks.scalar_type(), "mcq_gather_cuda", [&] {
    if (p.indices_int64) {
      FASTVQ_LAUNCH_KERNEL((mcq_gather_kernel<scalar_t, int64_t>), dim3(blocks), dim3(256), 0, stream, p);
    } else {
      FASTVQ_LAUNCH_KERNEL((mcq_gather_kernel<scalar_t, int32_t>), dim3(blocks), dim3(256), 0, stream, p);
    }
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(FASTVQ_CUDA_LIBRARY, FASTVQ_CUDA_DISPATCH_KEY, m) {
  m.impl("mcq_search", &mcq_search_cuda);
  m.impl("mcq_gather", &mcq_gather_cuda);
}

}  // namespace fastvq
