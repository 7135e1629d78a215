// Torch-free CPU core of mcq_search's GEMM path (d >= kMcqGemmMinD): nearest-code search as a blocked,
// packed fp32 GEMM whose epilogue keeps a running best per row, so the [N, K] objective matrix never
// exists. docs/ops/mcq.md ("GEMM path") has the algorithm, the exactness contract and the roofline.
//
// It computes exactly the objective of mcq.h, v[n, k] = b[k] + sum_j z[n, j] * c_k[j] as an fma chain in
// j order starting from b[k] (the d-blocked accumulator is stored and reloaded in fp32, which is exact),
// with the same tie rule (equal objectives -> the smaller k): the GEMM path returns the same bits as the
// small-d core and as the CUDA kernels on the vector ISAs.
//
// Data flow per group g:
//   pack rows    z[:, g, :] -> zpack [row_panels, d, MR] fp32 (cosine: normalised), row_ok [row_panels * MR]
//   per code block of NC codes (the only codebook copy, O(NC * d)):
//     pack codes c[g, block] -> cpack [NC / NR, d, NR] fp32 (cosine: normalised; non-finite / padding: 0)
//                               + bias [NC] (-||c||^2 / 2, 0, or -inf)
//     tasks        (row task of MC rows) x (slice of the block's code panels): for each d block of KC
//                  dims, for each code panel, for each row panel: one MR x NR micro-kernel; after the last
//                  d block its epilogue folds the NR objectives into the per-row running best.
//   finish       merge the slices' partial bests (tie rule), the exact l2 distance of the winner.
// Extra memory: zpack (N * d), cpack (NC * d), S partial bests of N entries, and one C tile of
// MC x NC floats per thread when d > KC: O(N * d + tile), independent of K.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/cpu_isa.h"
#include "mcq/mcq_gemm_search.h"

namespace fastvq {

struct McqGemmCpuPlan {
  int64_t MR, NR;        // micro-tile: rows (vector lanes x vectors) x codes (broadcasts)
  int64_t KC;            // dims per d block (== d when d is small enough: one pass, no C tile)
  int64_t MC;            // rows per row task (a multiple of MR)
  int64_t NCP;           // code panels (of NR codes) per packed code block
  int64_t row_panels;    // ceil(N / MR)
  int64_t row_tasks;     // ceil(row_panels * MR / MC)
  int64_t slices;        // S: the code panels of a block are split into S slices (1 unless N is small)
  int64_t ctile_floats;  // per-thread C tile when d > KC (MC * NCP * NR), else 0
};

// threads: how many threads the caller's parallel loop may use (it decides the slicing for small N).
McqGemmCpuPlan mcq_gemm_cpu_plan(const McqSearchParams& p, CpuIsa isa, int threads);

// Packs rows [panel_begin * MR, panel_end * MR) of group g into zpack [row_panels, d, MR] and row_ok.
void mcq_gemm_pack_rows(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, int64_t g,
                        int64_t panel_begin, int64_t panel_end, float* zpack, float* row_ok);

// Packs code panels [panel_begin, panel_end) of the block starting at code0 into cpack [NCP, d, NR] and
// bias [NCP * NR] (codes >= K are padding: 0 and -inf).
void mcq_gemm_pack_codes(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, int64_t g, int64_t code0,
                         int64_t panel_begin, int64_t panel_end, float* cpack, float* bias);

// One task t in [0, row_tasks * slices) of the block at code0 with block_panels (<= NCP) code panels.
// best_v / best_k: [slices, row_panels * MR] running best objective / code index (int32).
void mcq_gemm_search_task(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, const float* zpack,
                          const float* cpack, const float* bias, int64_t code0, int64_t block_panels, int64_t task,
                          float* best_v, int32_t* best_k, float* ctile);

// Rows [n_begin, n_end) of group g: merge the slices, write indices / scores.
void mcq_gemm_finish_rows(const McqSearchParams& p, CpuIsa isa, const McqGemmCpuPlan& pl, int64_t g,
                          int64_t n_begin, int64_t n_end, const float* zpack, const float* row_ok,
                          const float* best_v, const int32_t* best_k);

// The whole search. `parallel_for(n, grain, fn)` must call fn(begin, end) over a partition of [0, n),
// possibly concurrently (the ATen host passes at::parallel_for, the native tests a serial loop).
template <typename ParallelFor>
void mcq_gemm_search_cpu_run(const McqSearchParams& p, CpuIsa isa, int threads, ParallelFor&& parallel_for) {
  const McqGemmCpuPlan pl = mcq_gemm_cpu_plan(p, isa, threads);
  const int64_t rows_pad = pl.row_panels * pl.MR;
  std::vector<float> zpack(static_cast<size_t>(rows_pad * p.d)), row_ok(static_cast<size_t>(rows_pad));
  std::vector<float> cpack(static_cast<size_t>(pl.NCP * pl.NR * p.d)), bias(static_cast<size_t>(pl.NCP * pl.NR));
  std::vector<float> best_v(static_cast<size_t>(pl.slices * rows_pad));
  std::vector<int32_t> best_k(static_cast<size_t>(pl.slices * rows_pad));
  const int64_t d1 = std::max<int64_t>(p.d, 1);
  const int64_t code_blocks = (p.K + pl.NCP * pl.NR - 1) / (pl.NCP * pl.NR);
  const int64_t tasks = pl.row_tasks * pl.slices;
  for (int64_t g = 0; g < p.G; ++g) {
    parallel_for(pl.row_panels, std::max<int64_t>(1, 16384 / (pl.MR * d1)), [&](int64_t b, int64_t e) {
      mcq_gemm_pack_rows(p, isa, pl, g, b, e, zpack.data(), row_ok.data());
    });
    std::fill(best_v.begin(), best_v.end(), mcq_neg_inf());
    std::fill(best_k.begin(), best_k.end(), 0);
    for (int64_t blk = 0; blk < code_blocks; ++blk) {
      const int64_t code0 = blk * pl.NCP * pl.NR;
      const int64_t block_panels = std::min(pl.NCP, (p.K - code0 + pl.NR - 1) / pl.NR);
      parallel_for(block_panels, std::max<int64_t>(1, 16384 / (pl.NR * d1)), [&](int64_t b, int64_t e) {
        mcq_gemm_pack_codes(p, isa, pl, g, code0, b, e, cpack.data(), bias.data());
      });
      parallel_for(tasks, 1, [&](int64_t b, int64_t e) {
        std::vector<float> ctile(static_cast<size_t>(pl.ctile_floats));
        for (int64_t t = b; t < e; ++t) {
          mcq_gemm_search_task(p, isa, pl, zpack.data(), cpack.data(), bias.data(), code0, block_panels, t,
                               best_v.data(), best_k.data(), ctile.data());
        }
      });
    }
    parallel_for(p.N, std::max<int64_t>(1, 16384 / d1), [&](int64_t b, int64_t e) {
      mcq_gemm_finish_rows(p, isa, pl, g, b, e, zpack.data(), row_ok.data(), best_v.data(), best_k.data());
    });
  }
}

}  // namespace fastvq
