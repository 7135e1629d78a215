// Torch-free CPU cores of mcq_search (see mcq.h for the algorithm). The host code (mcq_cpu.cpp) and the
// native tests call these; they parallelise over tasks themselves.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "mcq/mcq.h"

namespace fastvq {

// K is padded to a multiple of this on the CPU (a multiple of every ISA's code tile).
constexpr int64_t kMcqCpuKAlign = 64;

struct McqSearchCpuPlan {
  int64_t rows_per_task;   // rows of one task (one row block x one group)
  int64_t num_tasks;       // ceil(N / rows_per_task) * G, independent of each other
  int64_t scratch_floats;  // per-thread scratch a task needs (floats, 64-byte aligned use is not required)
};

McqSearchCpuPlan mcq_search_cpu_plan(const McqSearchParams& p, CpuIsa isa);

// Step 1, one call per group g in [0, G): fills p.cb_prep and p.bias_prep for codebook g.
void mcq_prepare_codebook_cpu(const McqSearchParams& p, CpuIsa isa, int64_t g);

// Step 2, one call per task in [0, plan.num_tasks): writes p.indices / p.scores for its rows and group.
void mcq_search_cpu_task(const McqSearchParams& p, CpuIsa isa, int64_t task, float* scratch);

// Gather: out[n, g, :] = codebooks[g, indices[n, g], :] for rows [n_begin, n_end), zeros where the index is
// -1 (a masked row). Returns -1 when every index is in [0, K) or -1, else the flat position n * G + g of the
// first bad one (nothing is read there).
int64_t mcq_gather_cpu_rows(const McqGatherParams& p, DType dtype, int64_t n_begin, int64_t n_end);

}  // namespace fastvq
