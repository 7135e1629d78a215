// Native tests of the torch-free merge matching core (built by CMake, run by ctest, also under ASan +
// UBSan): every ISA compiled in and supported here gives the same bits as the shared scalar chain of
// merge.h (merge_inv_norm / merge_dot, what the CUDA kernel runs), agrees with a double-precision brute
// force where the best/second-best gap is clear, and follows the tie and NaN rules.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/cpu_isa.h"
#include "merge/merge.h"
#include "merge/merge_cpu_kernel.h"

#include "tests/test_util.h"

using namespace fastvq;


struct Match {
  std::vector<float> score;
  std::vector<int64_t> best;
};

// One image: metric [T, Cm] -> the match of every A row through the per-ISA core.
static Match run_isa(const std::vector<float>& m, int64_t T, int64_t Cm, CpuIsa isa) {
  const int64_t nA = (T + 1) / 2, nB = T / 2;
  const int64_t ldb = std::max<int64_t>(kMergeCpuColAlign, (nB + kMergeCpuColAlign - 1) / kMergeCpuColAlign * kMergeCpuColAlign);
  std::vector<float> a_hat(nA * Cm), bt(Cm * ldb, 0.f), scratch(4 * ldb);
  merge_normalize_rows_cpu(isa, m.data(), 2 * Cm, nA, Cm, a_hat.data(), Cm, 1);
  merge_normalize_rows_cpu(isa, m.data() + Cm, 2 * Cm, nB, Cm, bt.data(), 1, ldb);
  Match r;
  r.score.assign(nA, -7.f);
  r.best.assign(nA, -7);
  merge_match_rows_cpu(isa, a_hat.data(), nA, Cm, bt.data(), ldb, nB, r.score.data(), r.best.data(), scratch.data());
  return r;
}

// The scalar chain of merge.h (the CUDA kernel's arithmetic).
static Match run_scalar(const std::vector<float>& m, int64_t T, int64_t Cm) {
  const int64_t nA = (T + 1) / 2, nB = T / 2;
  std::vector<float> hat(T * Cm);
  for (int64_t t = 0; t < T; ++t) {
    const float inv = merge_inv_norm<float, float>(m.data() + t * Cm, Cm, 1);
    for (int64_t k = 0; k < Cm; ++k) hat[t * Cm + k] = merge_mul(m[t * Cm + k], inv);
  }
  Match r;
  for (int64_t i = 0; i < nA; ++i) {
    float s = -std::numeric_limits<float>::infinity();
    int64_t arg = 0;
    for (int64_t j = 0; j < nB; ++j) {
      const float v = merge_dot(hat.data() + 2 * i * Cm, hat.data() + (2 * j + 1) * Cm, Cm);
      if (v > s) s = v, arg = j;
    }
    r.score.push_back(s);
    r.best.push_back(arg);
  }
  return r;
}

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

static void check_shape(int64_t T, int64_t Cm, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> m(T * Cm);
  for (auto& v : m) v = nd(rng);
  const Match ref = run_scalar(m, T, Cm);
  const int64_t nA = (T + 1) / 2, nB = T / 2;
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAVX2, CpuIsa::kAVX512}) {
    if (static_cast<int>(isa) > static_cast<int>(cpu_isa_supported())) continue;
    const Match got = run_isa(m, T, Cm, isa);
    for (int64_t i = 0; i < nA; ++i) {
      EXPECT(got.best[i] == ref.best[i] && same_bits(got.score[i], ref.score[i]),
             "%s T=%lld Cm=%lld row %lld: best %lld score %.9g, scalar chain %lld %.9g", cpu_isa_name(isa),
             (long long)T, (long long)Cm, (long long)i, (long long)got.best[i], got.score[i], (long long)ref.best[i],
             ref.score[i]);
    }
  }
  // double-precision brute force, where the best is clear of the runner-up
  for (int64_t i = 0; i < nA && nB > 0; ++i) {
    double best = -2, second = -2;
    int64_t arg = 0;
    for (int64_t j = 0; j < nB; ++j) {
      double d = 0, na = 0, nb = 0;
      for (int64_t k = 0; k < Cm; ++k) {
        const double a = m[2 * i * Cm + k], b = m[(2 * j + 1) * Cm + k];
        d += a * b, na += a * a, nb += b * b;
      }
      const double c = d / (std::max(std::sqrt(na), 1e-6) * std::max(std::sqrt(nb), 1e-6));
      if (c > best) second = best, best = c, arg = j;
      else if (c > second) second = c;
    }
    if (best - second > 1e-4) {
      EXPECT(ref.best[i] == arg, "T=%lld Cm=%lld row %lld: %lld, brute force %lld", (long long)T, (long long)Cm,
             (long long)i, (long long)ref.best[i], (long long)arg);
    }
    EXPECT(std::fabs(ref.score[i] - best) < 1e-5, "row %lld score %.9g vs %.9g", (long long)i, ref.score[i], best);
  }
}

static void check_ties_and_nan() {
  const int64_t T = 70, Cm = 9;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> m(T * Cm);
  for (auto& v : m) v = nd(rng);
  for (int64_t k = 0; k < Cm; ++k) {  // B tokens 3, 20, 30 are copies of A row 0
    m[(2 * 20 + 1) * Cm + k] = m[(2 * 3 + 1) * Cm + k] = m[(2 * 30 + 1) * Cm + k] = m[k];
  }
  m[(2 * 10) * Cm + 4] = std::numeric_limits<float>::quiet_NaN();  // A row 10: one NaN
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAVX2, CpuIsa::kAVX512}) {
    if (static_cast<int>(isa) > static_cast<int>(cpu_isa_supported())) continue;
    const Match got = run_isa(m, T, Cm, isa);
    EXPECT(got.best[0] == 3, "%s: tie -> the first of the copies, got %lld", cpu_isa_name(isa), (long long)got.best[0]);
    EXPECT(got.score[10] == -std::numeric_limits<float>::infinity() && got.best[10] == 0,
           "%s: a NaN row scores -inf with partner 0, got %g / %lld", cpu_isa_name(isa), got.score[10],
           (long long)got.best[10]);
  }
}

int main() {
  std::mt19937 rng(1234);
  // T: 1 (no B), 2, odd, B around one 32-column tile, rows around the 4-row micro-kernel; Cm around vectors
  for (int64_t T : {1, 2, 3, 9, 63, 64, 65, 66, 130, 197})
    for (int64_t Cm : {1, 3, 8, 16, 17, 64}) check_shape(T, Cm, rng);
  check_ties_and_nan();
  if (g_failures) {
    std::fprintf(stderr, "test_merge_kernel: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_merge_kernel: ok\n");
  return 0;
}
