// Native tests of the torch-free decode_attention core (built by CMake, run by ctest, also under ASan +
// UBSan): every ISA compiled in and supported here against a double-precision softmax attention, all ISAs
// bit-identical to each other (also over the whole range of decode_exp), decode_exp against exp, empty and
// fully masked rows, and decode_step (the token's own row and the append) against attention over the
// written row.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "decode/decode_attention_cpu_kernel.h"

#include "tests/test_util.h"

using namespace fastvq;


struct Problem {
  int64_t B, Hq, Hkv, L, D;
  std::vector<float> q, k, v, bias;  // contiguous [B, Hq, D], [B, Hkv, L, D] x 2, [B, L]
  std::vector<int64_t> lengths;
};

// decode_step's token rows ([B, Hkv, D] each) and keep flags; the caches it appends to (copies of pr's).
struct Step {
  std::vector<float> k_new, v_new, k_cache, v_cache;
  std::vector<char> keep;  // bool
};

static std::vector<float> run(const Problem& pr, bool with_bias, CpuIsa isa, Step* step = nullptr) {
  DecodeAttentionParams p{};
  p.q = pr.q.data(), p.q_stride_b = pr.Hq * pr.D, p.q_stride_h = pr.D, p.q_stride_d = 1;
  p.k = pr.k.data(), p.k_stride_b = pr.Hkv * pr.L * pr.D, p.k_stride_h = pr.L * pr.D, p.k_stride_l = pr.D;
  p.k_stride_d = 1;
  p.v = pr.v.data(), p.v_stride_b = p.k_stride_b, p.v_stride_h = p.k_stride_h, p.v_stride_l = pr.D;
  p.v_stride_d = 1;
  p.lengths = pr.lengths.data(), p.lengths_stride = 1, p.lengths_type = DecodeIndex::kInt64;
  if (with_bias) p.bias = pr.bias.data(), p.bias_stride_b = pr.L, p.bias_stride_l = 1;
  p.bias_dtype = static_cast<int32_t>(DType::kFloat32), p.dtype = static_cast<int32_t>(DType::kFloat32);
  std::vector<float> out(pr.B * pr.Hq * pr.D, -7.f);
  p.out = out.data();
  p.B = pr.B, p.Hq = pr.Hq, p.Hkv = pr.Hkv, p.G = pr.Hq / pr.Hkv, p.Lmax = pr.L, p.D = pr.D;
  p.Dp = (pr.D + kDecodeLanes - 1) / kDecodeLanes * kDecodeLanes;
  p.scale = 1.f / std::sqrt(static_cast<float>(pr.D));
  if (step != nullptr) {
    step->k_cache = pr.k, step->v_cache = pr.v;
    p.k = step->k_cache.data(), p.v = step->v_cache.data();
    p.k_new = step->k_new.data(), p.kn_stride_b = pr.Hkv * pr.D, p.kn_stride_h = pr.D, p.kn_stride_d = 1;
    p.v_new = step->v_new.data(), p.vn_stride_b = pr.Hkv * pr.D, p.vn_stride_h = pr.D, p.vn_stride_d = 1;
    p.keep = reinterpret_cast<const bool*>(step->keep.data()), p.keep_stride = 1;
  }
  std::vector<float> scratch(decode_attention_cpu_scratch_floats(p));
  for (int64_t t = 0; t < pr.B * pr.Hkv; ++t) decode_attention_cpu_task(p, isa, t, scratch.data());
  return out;
}

static std::vector<double> reference(const Problem& pr, bool with_bias) {
  std::vector<double> out(pr.B * pr.Hq * pr.D, 0.0);
  const int64_t G = pr.Hq / pr.Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(pr.D));
  for (int64_t b = 0; b < pr.B; ++b) {
    for (int64_t h = 0; h < pr.Hq; ++h) {
      const int64_t n = pr.lengths[b], kv = (b * pr.Hkv + h / G) * pr.L * pr.D;
      std::vector<double> s(n);
      double m = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        double dot = 0;
        for (int64_t d = 0; d < pr.D; ++d) dot += double(pr.q[(b * pr.Hq + h) * pr.D + d]) * pr.k[kv + t * pr.D + d];
        s[t] = dot * scale + (with_bias ? pr.bias[b * pr.L + t] : 0.0);
        m = std::max(m, s[t]);
      }
      if (n == 0 || m == -INFINITY) continue;
      double l = 0;
      for (int64_t t = 0; t < n; ++t) l += (s[t] = std::exp(s[t] - m));
      for (int64_t d = 0; d < pr.D; ++d) {
        double acc = 0;
        for (int64_t t = 0; t < n; ++t) acc += s[t] * pr.v[kv + t * pr.D + d];
        out[(b * pr.Hq + h) * pr.D + d] = acc / l;
      }
    }
  }
  return out;
}

static Problem make(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t D, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd;
  Problem p{B, Hq, Hkv, L, D, {}, {}, {}, {}, {}};
  for (auto* vec : {&p.q, &p.k, &p.v}) vec->resize(vec == &p.q ? B * Hq * D : B * Hkv * L * D);
  for (auto* vec : {&p.q, &p.k, &p.v}) for (float& x : *vec) x = nd(gen);
  p.bias.resize(B * L);
  for (float& x : p.bias) x = nd(gen);
  for (int64_t b = 0; b < B; ++b) p.lengths.push_back(b == 0 ? L : (b == 1 ? 0 : static_cast<int64_t>(gen() % (L + 1))));
  return p;
}

int main() {
  std::vector<CpuIsa> isas{CpuIsa::kScalar};
  if (cpu_isa_supported() >= CpuIsa::kAVX2) isas.push_back(CpuIsa::kAVX2);
  if (cpu_isa_supported() >= CpuIsa::kAVX512) isas.push_back(CpuIsa::kAVX512);

  // decode_exp: ~1 ulp over the softmax's range, exact at 0, zero below the float range and at -inf
  float worst = 0.f;
  for (float x = -87.f; x <= 0.f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, static_cast<float>(std::fabs(decode_exp(x) - want) / want));
  }
  EXPECT(worst < 3e-7f, "decode_exp relative error %g", worst);
  EXPECT(decode_exp(0.f) == 1.f && decode_exp(-100.f) == 0.f && decode_exp(-INFINITY) == 0.f, "decode_exp edges");
  EXPECT(std::isnan(decode_exp(NAN)), "decode_exp(NaN)");

  const int64_t shapes[][5] = {{4, 4, 2, 70, 64}, {3, 8, 1, 33, 80}, {3, 2, 2, 5, 7}, {2, 4, 4, 100, 128}, {3, 2, 1, 1, 1}};
  for (const auto& s : shapes) {
    const Problem pr = make(s[0], s[1], s[2], s[3], s[4], static_cast<unsigned>(s[3] * 31 + s[4]));
    for (bool with_bias : {false, true}) {
      const std::vector<double> want = reference(pr, with_bias);
      const std::vector<float> first = run(pr, with_bias, isas[0]);
      for (CpuIsa isa : isas) {
        const std::vector<float> got = run(pr, with_bias, isa);
        double err = 0;
        for (size_t i = 0; i < got.size(); ++i) err = std::max(err, std::fabs(got[i] - want[i]));
        EXPECT(err < 5e-6, "%s B=%lld L=%lld D=%lld bias=%d: max error %g", cpu_isa_name(isa), (long long)s[0],
               (long long)s[3], (long long)s[4], int(with_bias), err);
        EXPECT(std::memcmp(got.data(), first.data(), got.size() * sizeof(float)) == 0, "%s differs from %s",
               cpu_isa_name(isa), cpu_isa_name(isas[0]));
      }
    }
  }
  // every logit -inf: zeros
  Problem pr = make(2, 2, 1, 40, 16, 7);
  for (float& x : pr.bias) x = -INFINITY;
  for (CpuIsa isa : isas) {
    for (float x : run(pr, true, isa)) EXPECT(x == 0.f, "%s: fully masked row gives %g", cpu_isa_name(isa), x);
  }
  // logits across the whole range of decode_exp (below -87.33, -inf, large): every ISA's vector exp and the
  // batched score trees agree bit for bit
  pr = make(3, 8, 2, 70, 64, 11);
  for (size_t i = 0; i < pr.bias.size(); ++i) pr.bias[i] = (i % 7 == 3) ? -INFINITY : -110.f + 0.83f * float(i % 140);
  for (float& x : pr.q) x *= 20.f;
  {
    const std::vector<float> first = run(pr, true, isas[0]);
    for (CpuIsa isa : isas) {
      EXPECT(std::memcmp(run(pr, true, isa).data(), first.data(), first.size() * sizeof(float)) == 0,
             "%s differs from %s over the exp range", cpu_isa_name(isa), cpu_isa_name(isas[0]));
    }
  }
  // decode_step: attention over the cache and the token's own row (as row lengths[b]) equals plain attention
  // over the cache with that row written, bit for bit; kept rows are appended, others leave the cache alone
  for (const auto& s : shapes) {
    Problem base = make(s[0], s[1], s[2], s[3], s[4], static_cast<unsigned>(s[3] * 17 + s[4]));
    for (int64_t& n : base.lengths) n = std::min<int64_t>(n, s[3] - 1);  // a free row for every token
    Step step;
    std::mt19937 gen(5);
    std::normal_distribution<float> nd;
    step.k_new.resize(s[0] * s[2] * s[4]), step.v_new.resize(s[0] * s[2] * s[4]);
    for (float& x : step.k_new) x = nd(gen);
    for (float& x : step.v_new) x = nd(gen);
    for (int64_t b = 0; b < s[0]; ++b) step.keep.push_back(static_cast<char>(b % 2 == 0));
    Problem written = base;  // the token's row written, one more row attended
    for (int64_t b = 0; b < s[0]; ++b) {
      for (int64_t h = 0; h < s[2]; ++h) {
        const int64_t row = ((b * s[2] + h) * s[3] + base.lengths[b]) * s[4], src = (b * s[2] + h) * s[4];
        std::copy(step.k_new.begin() + src, step.k_new.begin() + src + s[4], written.k.begin() + row);
        std::copy(step.v_new.begin() + src, step.v_new.begin() + src + s[4], written.v.begin() + row);
      }
      written.lengths[b] += 1;
    }
    for (bool with_bias : {false, true}) {
      const std::vector<float> want = run(written, with_bias, isas[0]);
      for (CpuIsa isa : isas) {
        const std::vector<float> got = run(base, with_bias, isa, &step);
        EXPECT(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
               "%s decode_step B=%lld L=%lld D=%lld bias=%d differs from attention over the written row",
               cpu_isa_name(isa), (long long)s[0], (long long)s[3], (long long)s[4], int(with_bias));
        for (int64_t b = 0; b < s[0]; ++b) {
          const size_t lo = b * s[2] * s[3] * s[4], hi = lo + s[2] * s[3] * s[4];
          const Problem& expect = step.keep[b] ? written : base;
          EXPECT(std::equal(step.k_cache.begin() + lo, step.k_cache.begin() + hi, expect.k.begin() + lo) &&
                     std::equal(step.v_cache.begin() + lo, step.v_cache.begin() + hi, expect.v.begin() + lo),
                 "%s decode_step: sequence %lld's cache after the step", cpu_isa_name(isa), (long long)b);
        }
      }
    }
  }
  if (g_failures == 0) std::printf("test_decode_kernel: ok (%zu ISAs)\n", isas.size());
  return g_failures == 0 ? 0 : 1;
}
