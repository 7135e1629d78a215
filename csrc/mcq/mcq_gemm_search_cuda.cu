// CUDA kernels of mcq_search's GEMM path (d >= kMcqGemmMinD; mcq_cuda.cu dispatches here). An fp32 SIMT
// GEMM with shared-memory tiles and a fused running-best epilogue: no [N, K] matrix and no copy of the
// codebook (per-code data is O(K), split-K partials O(splits * N * G)):
//   mcq_gemm_prepare_kernel  one thread per code: bias (-||c||^2/2, 0, -inf) and the divisor of its entries
//   mcq_gemm_search_kernel   grid (row blocks of 128, G, code splits), 256 threads as 16 x 16. Per code tile
//                            of 64: d in chunks of 16 through shared memory (rows [16][128+4], codes
//                            [16][64+4], converted and normalised on load); each thread keeps 8 rows x 4 codes
//                            of objectives in registers (two float4 of rows and one of codes per dim), folds
//                            them into its rows' running best after the tile, and 16 lanes reduce a row's
//                            (value, code) pairs with the shared tie rule at the end.
//   mcq_gemm_finish_kernel   one thread per (row, group): merge the splits in order, the finite check and
//                            the exact l2 distance, as the CPU computes it.
// Every objective is mcq.h's fma chain in j order from the code's bias, so the results are the CPU's bits.
// fp32 on purpose: tensor cores (tf32 / bf16 mma) cannot run in the emulation build that tests this
// source, and they round the operands; docs/ops/mcq.md says what a tensor-core candidate pass + fp32
// re-rank would take. Plain CUDA C++ only (no inline PTX).
#include "common/cuda_compat.h"

#include <ATen/Dispatch.h>

#include "mcq/mcq_gemm_search_cuda.h"

namespace fastvq {
namespace {

constexpr int kBM = 128;     // rows per block
constexpr int kBN = 64;      // codes per tile (also the K padding)
constexpr int kBK = 16;      // dims per shared-memory chunk
constexpr int kPad = 4;      // shared rows padded by 4 floats: fewer bank conflicts, float4 alignment kept
constexpr int kThreads = 256;  // 16 (codes) x 16 (rows)
constexpr int kTargetBlocks = 1024;  // split K until about this many blocks (several per SM on a big GPU)
constexpr int kMaxSplits = 1024;

template <typename scalar_t>
__global__ void __launch_bounds__(256) mcq_gemm_prepare_kernel(const McqGemmCudaParams q) {
  const McqSearchParams& p = q.p;
  const int64_t g = blockIdx.y;
  const int64_t k = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (k >= q.K_pad) return;
  float* bias = q.bias + g * q.K_pad;
  float* cden = q.cden + g * q.K_pad;
  if (k >= p.K) {
    bias[k] = mcq_neg_inf();
    cden[k] = 0.f;
    return;
  }
  const scalar_t* cb = static_cast<const scalar_t*>(p.codebooks);
  const int64_t base = g * p.cb_stride_g + k * p.cb_stride_k;
  float sum_sq = 0.f;
  bool finite = true;
  for (int64_t j = 0; j < p.d; ++j) {
    const float v = static_cast<float>(cb[base + j * p.cb_stride_d]);
    finite = finite && mcq_isfinite(v);
    sum_sq = mcq_fma(v, v, sum_sq);
  }
  bias[k] = mcq_code_bias(p.metric, sum_sq, finite);
  cden[k] = !finite ? 0.f : (p.metric == McqMetric::kCosine ? mcq_cosine_denominator(sum_sq) : 1.f);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mcq_gemm_search_kernel(const McqGemmCudaParams q) {
  __shared__ __align__(16) float z_s[kBK][kBM + kPad];  // [dims, rows] of the chunk, fp32 (normalised)
  __shared__ __align__(16) float c_s[kBK][kBN + kPad];  // [dims, codes] of the chunk
  __shared__ float rden_s[kBM];                         // cosine: max(||z||, eps); l2: 1

  const McqSearchParams& p = q.p;
  const scalar_t* z = static_cast<const scalar_t*>(p.z);
  const scalar_t* cb = static_cast<const scalar_t*>(p.codebooks);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t g = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t split = blockIdx.z;
  const int64_t t_begin = q.tiles * split / q.splits, t_end = q.tiles * (split + 1) / q.splits;
  const int64_t d = p.d;
  const bool cosine = p.metric == McqMetric::kCosine;
  const float* bias = q.bias + g * q.K_pad;
  const float* cden = q.cden + g * q.K_pad;

  // One thread per row: the norm as the same fma chain as the CPU (visible after the first barrier).
  if (tid < kBM) {
    const int64_t n = row0 + tid;
    float den = 1.f;
    if (cosine && n < p.N) {
      const int64_t base = n * p.z_stride_n + g * p.z_stride_g;
      float sum_sq = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        const float v = static_cast<float>(z[base + j * p.z_stride_d]);
        sum_sq = mcq_fma(v, v, sum_sq);
      }
      den = mcq_cosine_denominator(sum_sq);
    }
    rden_s[tid] = den;
  }

  // Thread rows: ty*4 + i and 64 + ty*4 + i (i < 4); thread codes: tx*4 + c (c < 4) of each tile.
  float best_v[8];
  int best_k[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    best_v[r] = mcq_neg_inf();
    best_k[r] = 0x7fffffff;
  }

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t k0 = t * kBN;
    float acc[8][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float b = bias[k0 + tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 8; ++r) acc[r][c] = b;
    }
    for (int64_t d0 = 0; d0 < d; d0 += kBK) {
      const int dc = static_cast<int>(d - d0 < kBK ? d - d0 : kBK);
      __syncthreads();  // the previous chunk's readers are done (and rden_s is visible)
      // 16 consecutive threads read 16 consecutive dims of one row / code: coalesced for unit d-stride.
      // Not unrolled: the IEEE division's slow path is a call, and unrolled loads around it spill.
#pragma unroll 1
      for (int i = tid; i < kBM * kBK; i += kThreads) {
        const int r = i / kBK, j = i % kBK;
        const int64_t n = row0 + r;
        float v = 0.f;
        if (j < dc && n < p.N) {
          v = static_cast<float>(z[n * p.z_stride_n + g * p.z_stride_g + (d0 + j) * p.z_stride_d]);
          if (cosine) v = v / rden_s[r];
        }
        z_s[j][r] = v;
      }
#pragma unroll 1
      for (int i = tid; i < kBN * kBK; i += kThreads) {
        const int c = i / kBK, j = i % kBK;
        const int64_t k = k0 + c;
        float v = 0.f;
        if (j < dc && k < p.K) {
          const float den = cden[k];
          if (den != 0.f) {
            v = static_cast<float>(cb[g * p.cb_stride_g + k * p.cb_stride_k + (d0 + j) * p.cb_stride_d]);
            if (cosine) v = v / den;
          }
        }
        c_s[j][c] = v;
      }
      __syncthreads();
      // Only the dc real dims: the fma chain is exactly the CPU's (no padding terms).
      for (int j = 0; j < dc; ++j) {
        const float4 a0 = *reinterpret_cast<const float4*>(&z_s[j][ty * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&z_s[j][64 + ty * 4]);
        const float4 b4 = *reinterpret_cast<const float4*>(&c_s[j][tx * 4]);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int r = 0; r < 8; ++r) {
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = mcq_fma(a[r], b[c], acc[r][c]);
        }
      }
    }
    // A thread sees its codes in increasing k: a strict > keeps the smallest k among equals; NaN never wins.
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int k = static_cast<int>(k0) + tx * 4 + c;
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        if (acc[r][c] > best_v[r]) {
          best_v[r] = acc[r][c];
          best_k[r] = k;
        }
      }
    }
  }

  // The 16 threads of a row (lanes tx of one half-warp) reduce with the shared tie rule; every one of them
  // ends with the result, and thread tx == r writes row r of its 8.
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    float v = best_v[r];
    int k = best_k[r];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int ok = __shfl_xor_sync(0xffffffffu, k, off);
      if (mcq_better(ov, ok, v, k)) {
        v = ov;
        k = ok;
      }
    }
    const int64_t n = row0 + (r < 4 ? ty * 4 + r : 64 + ty * 4 + r - 4);
    if (tx == r && n < p.N) {
      const int64_t out = split * p.N * p.G + n * p.G + g;
      q.part_v[out] = v;
      q.part_k[out] = k;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256) mcq_gemm_finish_kernel(const McqGemmCudaParams q) {
  const McqSearchParams& p = q.p;
  const int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x;
  const int64_t NG = p.N * p.G;
  if (i >= NG) return;
  const int64_t n = i / p.G, g = i % p.G;
  float v = mcq_neg_inf();
  int k = 0x7fffffff;
  for (int s = 0; s < q.splits; ++s) {  // disjoint code ranges: merge with the tie rule
    if (mcq_better(q.part_v[s * NG + i], q.part_k[s * NG + i], v, k)) {
      v = q.part_v[s * NG + i];
      k = q.part_k[s * NG + i];
    }
  }
  const scalar_t* z = static_cast<const scalar_t*>(p.z);
  const scalar_t* cb = static_cast<const scalar_t*>(p.codebooks);
  const int64_t zbase = n * p.z_stride_n + g * p.z_stride_g;
  const int64_t cbase = g * p.cb_stride_g + int64_t(k < p.K ? k : 0) * p.cb_stride_k;
  const bool l2 = p.metric == McqMetric::kL2;
  bool finite = true;
  float s = 0.f;
  for (int64_t j = 0; j < p.d; ++j) {
    const float zv = static_cast<float>(z[zbase + j * p.z_stride_d]);
    finite = finite && mcq_isfinite(zv);
    if (l2) {  // the exact distance, as every backend computes it
      const float diff = zv - static_cast<float>(cb[cbase + j * p.cb_stride_d]);
      s = mcq_fma(diff, diff, s);
    }
  }
  if (!finite || !(v > mcq_neg_inf())) {  // non-finite row, or no finite code
    p.indices[i] = 0;
    p.scores[i] = mcq_nan();
  } else {
    p.indices[i] = k;
    p.scores[i] = l2 ? s : v;
  }
}

}  // namespace

void mcq_gemm_search_cuda(const at::Tensor& z, McqSearchParams p) {
  McqGemmCudaParams q{};
  q.p = p;
  q.K_pad = round_up(p.K, kBN);
  q.tiles = q.K_pad / kBN;
  const int64_t row_blocks = (p.N + kBM - 1) / kBM;
  int64_t splits = (kTargetBlocks + row_blocks * p.G - 1) / (row_blocks * p.G);
  splits = std::min<int64_t>({splits, q.tiles, kMaxSplits});
  q.splits = static_cast<int32_t>(std::max<int64_t>(splits, 1));
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor bias = at::empty({p.G, q.K_pad}, f32);                                     // [G, K_pad]
  at::Tensor cden = at::empty({p.G, q.K_pad}, f32);                                     // [G, K_pad]
  at::Tensor part_v = at::empty({q.splits, p.N * p.G}, f32);                            // [splits, N * G]
  at::Tensor part_k = at::empty({q.splits, p.N * p.G}, z.options().dtype(at::kInt));  // [splits, N * G]
  q.bias = bias.data_ptr<float>();
  q.cden = cden.data_ptr<float>();
  q.part_v = part_v.data_ptr<float>();
  q.part_k = part_k.data_ptr<int32_t>();

  const auto stream = FASTVQ_CUDA_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mcq_gemm_search_cuda", [&] {
    const dim3 prep_grid(static_cast<unsigned>((q.K_pad + 255) / 256), static_cast<unsigned>(p.G));
    FASTVQ_LAUNCH_KERNEL(mcq_gemm_prepare_kernel<scalar_t>, prep_grid, dim3(256), 0, stream, q);
    FASTVQ_CUDA_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(p.G), static_cast<unsigned>(q.splits));
    FASTVQ_LAUNCH_KERNEL(mcq_gemm_search_kernel<scalar_t>, grid, dim3(kThreads), 0, stream, q);
    FASTVQ_CUDA_LAUNCH_CHECK();
    const dim3 fin_grid(static_cast<unsigned>((p.N * p.G + 255) / 256));
    FASTVQ_LAUNCH_KERNEL(mcq_gemm_finish_kernel<scalar_t>, fin_grid, dim3(256), 0, stream, q);
    FASTVQ_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace fastvq
