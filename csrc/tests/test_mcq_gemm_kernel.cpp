// Native tests of the torch-free GEMM path of mcq_search (built by CMake, run by ctest): on every ISA
// compiled in and supported here, the GEMM core must return the same bits as the small-d core (both
// compute the same fma chain per (row, code)), the float64 nearest code where the gap is clear, and follow
// the tie and non-finite rules -- across d blocks (d > KC), code blocks (K > NC), slices (small N) and
// tile remainders.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "common/cpu_isa.h"
#include "mcq/mcq_gemm_search_cpu_kernel.h"
#include "mcq/mcq_search_cpu_kernel.h"

#include "tests/test_util.h"

using namespace fastvq;

struct Result {
  std::vector<int64_t> idx;
  std::vector<float> score;
};

static McqSearchParams params(const std::vector<float>& z, const std::vector<float>& cb, int64_t N, int64_t G,
                              int64_t K, int64_t d, McqMetric metric, Result& r) {
  McqSearchParams p{};
  p.z = z.data();
  p.z_stride_n = G * d, p.z_stride_g = d, p.z_stride_d = 1;
  p.codebooks = cb.data();
  p.cb_stride_g = K * d, p.cb_stride_k = d, p.cb_stride_d = 1;
  p.dtype = DType::kFloat32;
  p.N = N, p.G = G, p.K = K, p.d = d;
  p.metric = metric;
  r.idx.assign(N * G, -7);
  r.score.assign(N * G, -7.f);
  p.indices = r.idx.data(), p.scores = r.score.data();
  return p;
}

// The GEMM core, with `threads` pretend threads (which changes the slicing) and a serial parallel_for
// that visits the chunks in reverse, so no result may depend on the order of tasks.
static Result run_gemm(const std::vector<float>& z, const std::vector<float>& cb, int64_t N, int64_t G, int64_t K,
                       int64_t d, McqMetric metric, CpuIsa isa, int threads) {
  Result r;
  McqSearchParams p = params(z, cb, N, G, K, d, metric, r);
  mcq_gemm_search_cpu_run(p, isa, threads, [](int64_t n, int64_t grain, auto&& fn) {
    for (int64_t e = n; e > 0;) {
      const int64_t b = e > grain ? e - grain : 0;
      fn(b, e);
      e = b;
    }
  });
  return r;
}

// The small-d core on the same input (the bitwise oracle).
static Result run_small(const std::vector<float>& z, const std::vector<float>& cb, int64_t N, int64_t G, int64_t K,
                        int64_t d, McqMetric metric, CpuIsa isa) {
  Result r;
  McqSearchParams p = params(z, cb, N, G, K, d, metric, r);
  p.K_pad = (K + kMcqCpuKAlign - 1) / kMcqCpuKAlign * kMcqCpuKAlign;
  std::vector<float> prep(G * d * p.K_pad), bias(G * p.K_pad);
  p.cb_prep = prep.data(), p.bias_prep = bias.data();
  for (int64_t g = 0; g < G; ++g) mcq_prepare_codebook_cpu(p, isa, g);
  const McqSearchCpuPlan pl = mcq_search_cpu_plan(p, isa);
  std::vector<float> scratch(pl.scratch_floats);
  for (int64_t t = 0; t < pl.num_tasks; ++t) mcq_search_cpu_task(p, isa, t, scratch.data());
  return r;
}

static std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> v;
  for (CpuIsa i : {CpuIsa::kScalar, CpuIsa::kAVX2, CpuIsa::kAVX512})
    if (i <= cpu_isa_supported()) v.push_back(i);
  return v;
}

static bool same(const Result& a, const Result& b) {
  if (a.idx != b.idx) return false;
  for (size_t i = 0; i < a.score.size(); ++i) {
    const bool nan_a = std::isnan(a.score[i]), nan_b = std::isnan(b.score[i]);
    if (nan_a != nan_b || (!nan_a && a.score[i] != b.score[i])) return false;
  }
  return true;
}

// float64 nearest code and its gap to the runner-up (objective units: distance for l2, cosine).
static void brute(const float* z, const float* cb, int64_t K, int64_t d, McqMetric metric, int64_t* best,
                  double* gap) {
  auto norm = [&](const float* x) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) s += double(x[j]) * x[j];
    return std::max(std::sqrt(s), 1e-6);
  };
  double v1 = -INFINITY, v2 = -INFINITY;
  int64_t k1 = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float* c = cb + k * d;
    double v = 0;
    if (metric == McqMetric::kL2) {
      for (int64_t j = 0; j < d; ++j) v -= (double(z[j]) - c[j]) * (double(z[j]) - c[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) v += double(z[j]) * c[j];
      v /= norm(z) * norm(c);
    }
    if (v > v1) {
      v2 = v1, v1 = v, k1 = k;
    } else if (v > v2) {
      v2 = v;
    }
  }
  *best = k1;
  *gap = v1 - v2;
}

static void test_random(int64_t N, int64_t G, int64_t K, int64_t d, McqMetric metric, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> z(N * G * d), cb(G * K * d);
  for (auto& x : z) x = nd(rng);
  for (auto& x : cb) x = nd(rng);
  for (CpuIsa isa : isas()) {
    const Result small = run_small(z, cb, N, G, K, d, metric, isa);
    for (int threads : {1, 2, 7}) {
      const Result r = run_gemm(z, cb, N, G, K, d, metric, isa, threads);
      EXPECT(same(r, small), "isa=%s N=%lld G=%lld K=%lld d=%lld metric=%d threads=%d: GEMM core != small-d core",
             cpu_isa_name(isa), (long long)N, (long long)G, (long long)K, (long long)d, int(metric), threads);
    }
    const Result r = run_gemm(z, cb, N, G, K, d, metric, isa, 2);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        int64_t k;
        double gap;
        brute(&z[(n * G + g) * d], &cb[g * K * d], K, d, metric, &k, &gap);
        const double eps = metric == McqMetric::kL2 ? 1e-5 * 4 * d : 1e-6 * d;  // loose version of the contract
        if (gap > eps) {
          EXPECT(r.idx[n * G + g] == k, "isa=%s N=%lld K=%lld d=%lld n=%lld: got %lld want %lld", cpu_isa_name(isa),
                 (long long)N, (long long)K, (long long)d, (long long)n, (long long)r.idx[n * G + g], (long long)k);
        }
      }
    }
  }
}

static void test_ties_and_nonfinite(int64_t d) {
  const int64_t N = 5, G = 1, K = 3000;  // K spans two 2048-code blocks
  std::vector<float> cb(K * d, 5.f), z(N * d, 0.f);
  // exact copies of the nearest code in both blocks and both halves of a micro-tile
  for (int64_t k : {10, 11, 2047, 2048, 2999})
    for (int64_t j = 0; j < d; ++j) cb[k * d + j] = 1.f;
  cb[3 * d + 1] = std::numeric_limits<float>::quiet_NaN();
  cb[4 * d + 2] = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < d; ++j) z[0 * d + j] = 1.f;
  z[1 * d + 0] = std::numeric_limits<float>::quiet_NaN();
  z[2 * d + d - 1] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < d; ++j) z[3 * d + j] = 1.f;
  for (CpuIsa isa : isas()) {
    for (McqMetric m : {McqMetric::kL2, McqMetric::kCosine}) {
      for (int threads : {1, 8}) {
        const Result r = run_gemm(z, cb, N, G, K, d, m, isa, threads);
        EXPECT(same(r, run_small(z, cb, N, G, K, d, m, isa)), "isa=%s d=%lld: GEMM != small-d", cpu_isa_name(isa),
               (long long)d);
        if (m == McqMetric::kL2) {
          EXPECT(r.idx[0] == 10 && r.score[0] == 0.f, "isa=%s d=%lld tie: got %lld %f", cpu_isa_name(isa),
                 (long long)d, (long long)r.idx[0], r.score[0]);
          EXPECT(r.idx[4] == 10, "zero row: got %lld", (long long)r.idx[4]);
        } else {
          EXPECT(r.idx[0] == 0, "cosine tie: got %lld", (long long)r.idx[0]);  // every finite code is parallel
          EXPECT(r.idx[4] == 0 && r.score[4] == 0.f, "zero row cosine");
        }
        EXPECT(r.idx[1] == 0 && std::isnan(r.score[1]), "NaN row");
        EXPECT(r.idx[2] == 0 && std::isnan(r.score[2]), "inf row");
        EXPECT(r.idx[3] == r.idx[0], "repeat row");
      }
    }
  }
  std::vector<float> bad(K * d, std::numeric_limits<float>::quiet_NaN());
  for (CpuIsa isa : isas()) {
    const Result r = run_gemm(z, bad, N, G, K, d, McqMetric::kL2, isa, 2);
    for (int64_t n = 0; n < N; ++n) EXPECT(r.idx[n] == 0 && std::isnan(r.score[n]), "all-NaN codebook");
  }
}

static void test_plan() {
  McqSearchParams p{};
  p.G = 1;
  for (CpuIsa isa : isas()) {
    for (int64_t d : {32, 256, 384, 385, 1536, 4096}) {
      for (int64_t N : {0, 1, 17, 100000}) {
        for (int64_t K : {1, 7, 1 << 20}) {
          p.N = N, p.K = K, p.d = d;
          const McqGemmCpuPlan pl = mcq_gemm_cpu_plan(p, isa, 2);
          EXPECT(pl.MC % pl.MR == 0 && pl.MC >= pl.MR, "MC");
          EXPECT(pl.KC >= 1 && pl.KC <= d && (pl.KC == d || pl.ctile_floats > 0), "KC %lld", (long long)pl.KC);
          EXPECT(pl.row_panels * pl.MR >= N && pl.slices >= 1 && pl.slices <= pl.NCP, "slices");
          EXPECT(pl.NCP * pl.NR <= 2048 + pl.NR, "code block independent of K");
          // extra memory independent of K
          EXPECT(pl.ctile_floats <= pl.MC * 2048, "C tile");
        }
      }
    }
  }
}

int main() {
  std::printf("cpu isa supported: %s\n", cpu_isa_name(cpu_isa_supported()));
  test_plan();
  for (McqMetric m : {McqMetric::kL2, McqMetric::kCosine}) {
    test_random(1, 1, 1, 32, m, 1);
    test_random(0, 1, 5, 32, m, 1);
    test_random(17, 1, 7, 32, m, 2);
    test_random(33, 3, 65, 33, m, 3);
    test_random(130, 2, 257, 64, m, 4);
    test_random(40, 1, 2100, 100, m, 5);   // two code blocks
    test_random(70, 1, 300, 385, m, 6);    // two d blocks (C tile)
    test_random(9, 2, 500, 1536, m, 7);    // six d blocks
    test_random(3, 1, 61, 4096, m, 8);
    test_random(2, 1, 5000, 48, m, 9);     // slices over codes at small N
  }
  test_ties_and_nonfinite(32);
  test_ties_and_nonfinite(600);
  if (g_failures) {
    std::printf("%d failed\n", g_failures);
    return 1;
  }
  std::printf("all mcq GEMM kernel tests passed\n");
  return 0;
}
