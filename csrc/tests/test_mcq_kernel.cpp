// Native tests of the torch-free mcq cores (built by CMake, run by ctest): every ISA compiled in and
// supported here against a brute-force double-precision search, plus the non-finite rules.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "common/cpu_isa.h"
#include "mcq/mcq_search_cpu_kernel.h"

#include "tests/test_util.h"

using namespace fastvq;


struct Result {
  std::vector<int64_t> idx;
  std::vector<float> score;
};

static Result run(const std::vector<float>& z, const std::vector<float>& cb, int64_t N, int64_t G, int64_t K,
                  int64_t d, McqMetric metric, CpuIsa isa) {
  McqSearchParams p{};
  p.z = z.data();
  p.z_stride_n = G * d, p.z_stride_g = d, p.z_stride_d = 1;
  p.codebooks = cb.data();
  p.cb_stride_g = K * d, p.cb_stride_k = d, p.cb_stride_d = 1;
  p.dtype = DType::kFloat32;
  p.N = N, p.G = G, p.K = K, p.d = d;
  p.metric = metric;
  p.K_pad = (K + kMcqCpuKAlign - 1) / kMcqCpuKAlign * kMcqCpuKAlign;
  std::vector<float> prep(G * d * p.K_pad), bias(G * p.K_pad);
  p.cb_prep = prep.data(), p.bias_prep = bias.data();
  Result r;
  r.idx.assign(N * G, -7);
  r.score.assign(N * G, -7.f);
  p.indices = r.idx.data(), p.scores = r.score.data();
  for (int64_t g = 0; g < G; ++g) mcq_prepare_codebook_cpu(p, isa, g);
  const McqSearchCpuPlan pl = mcq_search_cpu_plan(p, isa);
  std::vector<float> scratch(pl.scratch_floats);
  for (int64_t t = 0; t < pl.num_tasks; ++t) mcq_search_cpu_task(p, isa, t, scratch.data());
  return r;
}

// Brute force in double. Returns best index, its distance, and the gap to the runner-up.
static void brute(const float* z, const float* cb, int64_t K, int64_t d, McqMetric metric, int64_t* best,
                  double* best_v, double* gap) {
  auto norm = [&](const float* x) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) s += double(x[j]) * x[j];
    return std::max(std::sqrt(s), 1e-6);
  };
  double v1 = -INFINITY, v2 = -INFINITY;
  int64_t k1 = 0;
  const double nz = norm(z);
  for (int64_t k = 0; k < K; ++k) {
    const float* c = cb + k * d;
    double v = 0;
    if (metric == McqMetric::kL2) {
      for (int64_t j = 0; j < d; ++j) v -= (double(z[j]) - c[j]) * (double(z[j]) - c[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) v += double(z[j]) * c[j];
      v /= nz * norm(c);
    }
    if (v > v1) {
      v2 = v1, v1 = v, k1 = k;
    } else if (v > v2) {
      v2 = v;
    }
  }
  *best = k1;
  *best_v = metric == McqMetric::kL2 ? -v1 : v1;
  *gap = v1 - v2;
}

static std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> v;
  for (CpuIsa i : {CpuIsa::kScalar, CpuIsa::kAVX2, CpuIsa::kAVX512})
    if (i <= cpu_isa_supported()) v.push_back(i);
  return v;
}

static void test_random(int64_t N, int64_t G, int64_t K, int64_t d, McqMetric metric, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> z(N * G * d), cb(G * K * d);
  for (auto& x : z) x = nd(rng);
  for (auto& x : cb) x = nd(rng);
  for (CpuIsa isa : isas()) {
    const Result r = run(z, cb, N, G, K, d, metric, isa);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        int64_t k;
        double v, gap;
        brute(&z[(n * G + g) * d], &cb[g * K * d], K, d, metric, &k, &v, &gap);
        const int64_t got = r.idx[n * G + g];
        EXPECT(got >= 0 && got < K, "index %lld out of range", (long long)got);
        const double scale = metric == McqMetric::kL2 ? 1e-4 * (1 + v) : 1e-5;
        if (gap > 10 * scale) {
          EXPECT(got == k, "isa=%s N=%lld G=%lld K=%lld d=%lld metric=%d n=%lld g=%lld: got %lld want %lld",
                 cpu_isa_name(isa), (long long)N, (long long)G, (long long)K, (long long)d, int(metric),
                 (long long)n, (long long)g, (long long)got, (long long)k);
        }
        EXPECT(std::fabs(r.score[n * G + g] - v) <= 10 * scale + gap, "score %f want %f", r.score[n * G + g], v);
      }
    }
  }
}

static void test_ties_and_nonfinite() {
  const int64_t N = 5, G = 1, K = 70, d = 3;  // K crosses a 64-code tile
  std::vector<float> cb(K * d, 5.f), z(N * d, 0.f);
  // codes 10 and 66 tie exactly at the minimum distance from z = (1, 1, 1); code 3 is NaN (never wins).
  for (int64_t j = 0; j < d; ++j) cb[10 * d + j] = cb[66 * d + j] = 1.f;
  cb[3 * d + 1] = std::numeric_limits<float>::quiet_NaN();
  cb[4 * d + 2] = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < d; ++j) z[0 * d + j] = 1.f;
  z[1 * d + 0] = std::numeric_limits<float>::quiet_NaN();  // NaN row -> index 0, score NaN
  z[2 * d + 2] = -std::numeric_limits<float>::infinity();  // inf row -> index 0, score NaN
  for (int64_t j = 0; j < d; ++j) z[3 * d + j] = 1.f;  // same as row 0
  // row 4 = zeros: every code at distance 75 except 10 and 66 (3) -> 10
  for (CpuIsa isa : isas()) {
    for (McqMetric m : {McqMetric::kL2, McqMetric::kCosine}) {
      const Result r = run(z, cb, N, G, K, d, m, isa);
      if (m == McqMetric::kL2) {
        EXPECT(r.idx[0] == 10, "isa=%s tie: got %lld", cpu_isa_name(isa), (long long)r.idx[0]);
        EXPECT(r.score[0] == 0.f, "score %f", r.score[0]);
        EXPECT(r.idx[4] == 10, "zero row: got %lld", (long long)r.idx[4]);
      } else {
        // every finite code is parallel to (1,1,1): cosine 1 for all -> the first finite one, 0
        EXPECT(r.idx[0] == 0, "isa=%s cosine tie: got %lld", cpu_isa_name(isa), (long long)r.idx[0]);
        // zero row: all cosines 0 -> 0
        EXPECT(r.idx[4] == 0 && r.score[4] == 0.f, "zero row cosine: %lld %f", (long long)r.idx[4], r.score[4]);
      }
      EXPECT(r.idx[1] == 0 && std::isnan(r.score[1]), "NaN row: %lld %f", (long long)r.idx[1], r.score[1]);
      EXPECT(r.idx[2] == 0 && std::isnan(r.score[2]), "inf row: %lld %f", (long long)r.idx[2], r.score[2]);
      EXPECT(r.idx[3] == r.idx[0], "repeat row");
    }
  }
  // all codes non-finite -> index 0, score NaN
  std::vector<float> bad(K * d, std::numeric_limits<float>::quiet_NaN());
  for (CpuIsa isa : isas()) {
    const Result r = run(z, bad, N, G, K, d, McqMetric::kL2, isa);
    for (int64_t n = 0; n < N; ++n) EXPECT(r.idx[n] == 0 && std::isnan(r.score[n]), "all-NaN codebook");
  }
}

int main() {
  std::printf("cpu isa supported: %s\n", cpu_isa_name(cpu_isa_supported()));
  for (McqMetric m : {McqMetric::kL2, McqMetric::kCosine}) {
    test_random(1, 1, 1, 1, m, 1);
    test_random(7, 3, 17, 5, m, 2);
    test_random(65, 2, 63, 8, m, 3);
    test_random(130, 8, 257, 8, m, 4);
    test_random(33, 2, 129, 33, m, 5);
    test_random(5, 1, 4097, 64, m, 6);
    test_random(3, 1, 40, 300, m, 7);  // d larger than the L1 chunk heuristic's sweet spot
  }
  test_ties_and_nonfinite();
  if (g_failures) {
    std::printf("%d failed\n", g_failures);
    return 1;
  }
  std::printf("all mcq kernel tests passed\n");
  return 0;
}
