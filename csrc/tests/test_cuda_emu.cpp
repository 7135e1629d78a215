// Self-tests of the CUDA-on-CPU emulator (csrc/cuda_emu/): correct kernels give exact results under
// every schedule in both modes; planted bugs are reported (or, for a missing barrier, give exactly the
// schedule-dependent wrong results they should); the process stays usable after every error. Crash-type
// checks (AddressSanitizer, stack overflow, watchdog, ThreadSanitizer) are in test_cuda_emu_crash.cpp.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tests/test_cuda_emu_kernels.cuh"

using fastvq::emu::Config;
using fastvq::emu::EmuError;
using fastvq::emu::Mode;
using fastvq::emu::Schedule;
using fastvq::emu::ScopedConfig;

static int g_failures = 0;
static std::string g_context;  // the configuration a check runs under, for failure messages

#define EXPECT(cond, ...)                                                                          \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      ++g_failures;                                                                                \
      std::fprintf(stderr, "%s:%d: FAILED %s [%s]: ", __FILE__, __LINE__, #cond, g_context.c_str()); \
      std::fprintf(stderr, __VA_ARGS__);                                                           \
      std::fprintf(stderr, "\n");                                                                  \
    }                                                                                              \
  } while (0)

static Config make_config(Mode mode, Schedule schedule, std::uint64_t seed = 0) {
  Config c;
  c.mode = mode;
  c.schedule = schedule;
  c.seed = seed;
  return c;
}

static std::string describe(const Config& c) {
  std::string s = std::string(fastvq::emu::to_string(c.mode)) + "/" + fastvq::emu::to_string(c.schedule);
  if (c.schedule == Schedule::kShuffled) s += "(seed " + std::to_string(c.seed) + ")";
  return s;
}

// Every schedule in fiber mode (two shuffle seeds), and three in threads mode (where the schedule only
// orders blocks: threads are truly concurrent).
static std::vector<Config> all_configs() {
  return {make_config(Mode::kFibers, Schedule::kForward),         make_config(Mode::kFibers, Schedule::kReverse),
          make_config(Mode::kFibers, Schedule::kShuffled, 1),     make_config(Mode::kFibers, Schedule::kShuffled, 2),
          make_config(Mode::kThreads, Schedule::kForward),        make_config(Mode::kThreads, Schedule::kReverse),
          make_config(Mode::kThreads, Schedule::kShuffled, 3)};
}

static void for_each_config(const char* test, const std::function<void()>& body) {
  for (const Config& c : all_configs()) {
    const ScopedConfig scoped(c);
    g_context = std::string(test) + ", " + describe(c);
    try {
      body();
    } catch (const EmuError& e) {
      EXPECT(false, "unexpected EmuError: %s", e.what());
    }
  }
  g_context.clear();
}

// Runs `launch`, which must throw an EmuError whose message contains every string of `needles`.
static void expect_error(const std::function<void()>& launch, const std::vector<std::string>& needles) {
  try {
    launch();
    EXPECT(false, "no EmuError");
  } catch (const EmuError& e) {
    const std::string what = e.what();
    for (const std::string& n : needles) {
      EXPECT(what.find(n) != std::string::npos, "'%s' not in:\n%s", n.c_str(), what.c_str());
    }
  }
}

static std::vector<int> random_ints(std::size_t n, int lo, int hi, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<int> v(n);
  for (int& x : v) x = dist(rng);
  return v;
}

// ---- correct kernels ----------------------------------------------------------------------------------

static void test_block_sum() {
  const int n = 5000;  // 20 blocks, the last one partial
  const std::vector<int> in = random_ints(n, -1000, 1000, 1);
  std::vector<int> want((n + 255) / 256, 0);
  for (int i = 0; i < n; ++i) want[i / 256] += in[i];
  for_each_config("block_sum", [&] {
    std::vector<int> out(want.size(), -1);
    emu_test::launch_block_sum(in.data(), n, out.data());
    EXPECT(out == want, "block sums differ");
  });
}

static void test_segment_shuffles() {
  const int n = 256;  // 2 blocks of 128
  const std::vector<int> in = random_ints(n, -50, 50, 2);
  for (int width : {32, 16, 8, 4, 2, 1}) {
    // References from the CUDA documentation's definitions, lane by lane.
    std::vector<int> want_xor(n), want_idx(n), want_up(n), down(in);
    for (int i = 0; i < n; ++i) {
      const int seg0 = i - i % width;
      want_xor[i] = std::accumulate(in.begin() + seg0, in.begin() + seg0 + width, 0);
      want_idx[i] = in[seg0 + 35 % width];
      want_up[i] = std::accumulate(in.begin() + seg0, in.begin() + i + 1, 0);
    }
    for (int off = width / 2; off > 0; off >>= 1) {  // out-of-segment sources read the lane itself
      std::vector<int> next(down);
      for (int i = 0; i < n; ++i) next[i] = down[i] + (i % width + off < width ? down[i + off] : down[i]);
      down = next;
    }
    for_each_config(("segment_shuffles width " + std::to_string(width)).c_str(), [&] {
      std::vector<int> xo(n), dn(n), ix(n), up(n);
      emu_test::launch_segment_shuffles(in.data(), n, width, xo.data(), dn.data(), ix.data(), up.data());
      EXPECT(xo == want_xor, "__shfl_xor_sync segment sums differ");
      EXPECT(dn == down, "__shfl_down_sync reduction differs");
      EXPECT(ix == want_idx, "__shfl_sync source modulo width differs");
      EXPECT(up == want_up, "__shfl_up_sync scan differs");
    });
  }
}

static void test_votes() {
  const int n = 192;  // 2 blocks of 96 threads: 3 warps each
  std::vector<int> in = random_ints(n, -3, 3, 3);
  for (int i = 64; i < 96; ++i) in[i] = 1;  // block 0's last warp: all true
  for (int i = 96; i < 192; ++i) in[i] = i % 2 ? 2 : 0;
  for_each_config("votes", [&] {
    std::vector<unsigned> out(5 * n, 7);
    emu_test::launch_votes(in.data(), n, out.data());
    for (int i = 0; i < n; ++i) {
      const int w0 = i - i % 32, b0 = i - i % 96;
      unsigned ballot = 0, count = 0;
      for (int l = 0; l < 32; ++l) ballot |= in[w0 + l] > 0 ? 1u << l : 0u;
      for (int k = 0; k < 96; ++k) count += in[b0 + k] > 0;
      EXPECT(out[5 * i] == ballot, "ballot of thread %d: %08x, want %08x", i, out[5 * i], ballot);
      EXPECT(out[5 * i + 1] == (ballot != 0), "any of thread %d", i);
      EXPECT(out[5 * i + 2] == (ballot == 0xffffffffu), "all of thread %d", i);
      EXPECT(out[5 * i + 3] == count, "__syncthreads_count of thread %d: %u, want %u", i, out[5 * i + 3], count);
      const unsigned and_or = (count == 96 ? 1u : 0u) | (count > 0 ? 2u : 0u);
      EXPECT(out[5 * i + 4] == and_or, "__syncthreads_and/or of thread %d", i);
    }
  });
}

static void test_warp_intrinsics() {
  const int n = 128;
  const std::vector<int> in = random_ints(n, -100, 100, 4);
  for_each_config("warp_intrinsics", [&] {
    std::vector<int> out(4 * n);
    emu_test::launch_warp_intrinsics(in.data(), n, out.data());
    for (int i = 0; i < n; ++i) {
      const int w0 = i - i % 32;
      unsigned match = 0;
      int sum = 0, mn = in[w0], mx = in[w0];
      for (int l = 0; l < 32; ++l) {
        match |= (in[w0 + l] & 3) == (in[i] & 3) ? 1u << l : 0u;
        sum += in[w0 + l];
        mn = std::min(mn, in[w0 + l]);
        mx = std::max(mx, in[w0 + l]);
      }
      EXPECT(static_cast<unsigned>(out[4 * i]) == match, "__match_any_sync of thread %d", i);
      EXPECT(out[4 * i + 1] == sum && out[4 * i + 2] == mn && out[4 * i + 3] == mx, "__reduce_*_sync of thread %d", i);
    }
  });
}

static void test_block_scan_partial_warps() {
  for (int threads : {80, 256, 33, 1}) {  // 80: warps of 32, 32, 16 lanes; 33: a 1-lane last warp
    const int blocks = 3, n = blocks * threads;
    const std::vector<int> in = random_ints(n, -9, 9, 5 + threads);
    std::vector<int> want(n), want_wsum(n);
    for (int i = 0; i < n; ++i) {
      const int b0 = i - i % threads, w0 = b0 + (i - b0) / 32 * 32, w1 = std::min(w0 + 32, b0 + threads);
      want[i] = std::accumulate(in.begin() + b0, in.begin() + i + 1, 0);
      want_wsum[i] = std::accumulate(in.begin() + w0, in.begin() + w1, 0);
    }
    for_each_config(("block_scan " + std::to_string(threads) + " threads").c_str(), [&] {
      std::vector<int> out(n), wsum(n);
      emu_test::launch_block_scan(in.data(), blocks, threads, out.data(), wsum.data());
      EXPECT(out == want, "block scan differs");
      EXPECT(wsum == want_wsum, "__reduce_add_sync over the existing lanes differs");
    });
  }
}

static void test_half_warp_syncwarp() {
  const int n = 512;
  const std::vector<int> in = random_ints(n, 0, 1000, 6);
  std::vector<int> want(n);
  for (int i = 0; i < n; ++i) want[i] = in[i ^ 1];
  for_each_config("half_warp_exchange", [&] {
    std::vector<int> out(n);
    emu_test::launch_half_warp_exchange(in.data(), n, out.data());
    EXPECT(out == want, "exchange through shared memory after __syncwarp differs");
  });
}

static void test_atomics() {
  const int blocks = 24, threads = 96, total = blocks * threads;
  for_each_config("atomics", [&] {
    std::vector<int> ic(11, 0);
    std::vector<unsigned> uc(11, 0);
    ic[4] = 1 << 30;
    uc[10] = ~0u;
    unsigned long long ull = 0;
    float f = 0;
    double d = 0;
    emu_test::launch_atomics(blocks, threads, ic.data(), uc.data(), &ull, &f, &d);
    int isum = 0, imax = 0, imin = 1 << 30;
    unsigned umax = 0, ior = 0, iand = ~0u;
    unsigned long long usum = 0;
    for (int g = 0; g < total; ++g) {
      isum += g % 7 - 3;
      imax = std::max(imax, g * 37 % 1001);
      imin = std::min(imin, 5000 - g * 37 % 1001);
      umax = std::max(umax, static_cast<unsigned>(g) * 2654435761u);
      ior |= 1u << (g % 32);
      iand &= ~(1u << (g % 31));
      usum += static_cast<unsigned long long>(g) << 20;
    }
    EXPECT(ic[0] == isum, "atomicAdd(int): %d, want %d", ic[0], isum);
    EXPECT(uc[1] == static_cast<unsigned>(total), "atomicAdd(unsigned): %u", uc[1]);
    EXPECT(ic[2] == total, "atomicCAS increments: %d, want %d", ic[2], total);
    EXPECT(ic[3] == imax && ic[4] == imin && uc[5] == umax, "atomicMax/atomicMin");
    EXPECT(uc[6] == static_cast<unsigned>(total % 10), "atomicInc wraps: %u, want %d", uc[6], total % 10);
    EXPECT(ic[7] >= 0 && ic[7] < total, "atomicExch leaves some thread's id: %d", ic[7]);
    EXPECT(ic[8] == -2 * total, "atomicSub: %d", ic[8]);
    EXPECT(uc[9] == ior && uc[10] == iand, "atomicOr/atomicAnd");
    EXPECT(ull == usum, "atomicAdd(unsigned long long)");
    EXPECT(f == 0.5f * total && d == 0.25 * total, "atomicAdd(float) %g, (double) %g", f, d);
  });
}

static void test_dynamic_shared() {
  const int blocks = 5, threads = 200;
  std::vector<float> in(blocks * threads);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i) * 0.25f;
  for_each_config("dynamic_shared", [&] {
    std::vector<float> out(in.size(), -1.f);
    emu_test::launch_reverse(in.data(), out.data(), blocks, threads);
    bool ok = true;
    for (int b = 0; b < blocks; ++b) {
      for (int t = 0; t < threads; ++t) ok = ok && out[b * threads + t] == in[b * threads + threads - 1 - t];
    }
    EXPECT(ok, "reversal through dynamic shared memory differs");
    std::vector<int> fill(3 * 64, 0);
    emu_test::launch_dynamic_fill(fill.data(), 3, 64);
    EXPECT(std::all_of(fill.begin(), fill.end(), [](int v) { return v == -1; }),
           "every block must start with dynamic shared memory filled with 0xff bytes");
  });
}

static void test_template_kernel() {
  const int n = 300;
  std::vector<float> xf(n);
  std::vector<double> xd(n);
  for (int i = 0; i < n; ++i) xf[i] = static_cast<float>(i), xd[i] = i * 0.5;
  for_each_config("template_kernel", [&] {
    std::vector<float> yf(n, 0.f);
    std::vector<double> yd(n, 0.0);
    emu_test::launch_axpb_float(xf.data(), yf.data(), 2.f, n);
    emu_test::launch_axpb_double(xd.data(), yd.data(), 3.0, n);
    bool ok = true;
    for (int i = 0; i < n; ++i) ok = ok && yf[i] == 2.f * xf[i] + 4.f && yd[i] == 3.0 * xd[i] - 7.0;
    EXPECT(ok, "axpb_kernel<float, 4> / <double, -7> results differ");
  });
}

static void test_3d_grid() {
  const unsigned gx = 3, gy = 2, gz = 2, bx = 4, by = 3, bz = 5, nt = bx * by * bz, nslots = gx * gy * gz * nt;
  for_each_config("3d_grid", [&] {
    std::vector<unsigned> out(4 * nslots, ~0u), writes(nslots, 0);
    emu_test::launch_coords(out.data(), writes.data());
    bool ok = true;
    for (unsigned z = 0; z < gz; ++z)
      for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x)
          for (unsigned tz = 0; tz < bz; ++tz)
            for (unsigned ty = 0; ty < by; ++ty)
              for (unsigned tx = 0; tx < bx; ++tx) {
                const unsigned slot = ((z * gy + y) * gx + x) * nt + (tz * by + ty) * bx + tx;
                ok = ok && writes[slot] == 1 && out[4 * slot] == (x | y << 8 | z << 16) &&
                     out[4 * slot + 1] == (tx | ty << 8 | tz << 16) && out[4 * slot + 2] == (bx | by << 8 | bz << 16) &&
                     out[4 * slot + 3] == (gx | gy << 8 | gz << 16);
              }
    EXPECT(ok, "3-D blockIdx/threadIdx/blockDim/gridDim differ");
  });
}

static void test_wide_shuffles() {
  for_each_config("wide_shuffles", [&] {
    std::vector<double> d(128);
    std::vector<long long> ll(128);
    std::vector<unsigned long long> ull(128);
    std::vector<float> h(128);
    emu_test::launch_wide_shuffles(d.data(), ll.data(), ull.data(), h.data());
    bool ok = true;
    double dsum = 0;
    for (int l = 0; l < 32; ++l) dsum += 0.5 * l + 1e10;
    for (int i = 0; i < 128; ++i) {
      const int lane = i % 32;
      const unsigned long long src = static_cast<unsigned long long>(lane < 31 ? lane + 1 : lane);
      ok = ok && d[i] == dsum && ll[i] == ((5ll << 40) | 5) && ull[i] == ((src << 33) | 1u) && h[i] == 31 - lane;
    }
    EXPECT(ok, "8-byte / __half shuffles differ");
  });
}

// Emulator-only: a shuffle of any 8-byte trivially copyable type (CUDA has no float2 overload).
__global__ void float2_shuffle_kernel(float2* out) {
  const float2 v = make_float2(static_cast<float>(threadIdx.x), -static_cast<float>(threadIdx.x));
  out[threadIdx.x] = __shfl_sync(0xffffffffu, v, (threadIdx.x + 1) % 32);
}

static void test_float2_shuffle() {
  for_each_config("float2_shuffle", [&] {
    std::vector<float2> out(32);
    FASTVQ_LAUNCH_KERNEL(float2_shuffle_kernel, 1, 32, 0, 0, out.data());
    bool ok = true;
    for (int l = 0; l < 32; ++l) ok = ok && out[l].x == (l + 1) % 32 && out[l].y == -((l + 1) % 32);
    EXPECT(ok, "float2 shuffle differs");
  });
}

// Emulator-only: a kernel without parameters, and half-precision atomics.
static unsigned g_no_args_count = 0;
__global__ void no_args_kernel() { atomicAdd(&g_no_args_count, 1u); }
__global__ void half_atomics_kernel(__half* h, __nv_bfloat16* b) {
  atomicAdd(h, __float2half(0.5f));
  atomicAdd(b, __float2bfloat16(1.0f));
}

static void test_no_args_and_half_atomics() {
  for_each_config("no_args_and_half_atomics", [&] {
    g_no_args_count = 0;
    FASTVQ_LAUNCH_KERNEL(no_args_kernel, 3, 40, 0, 0);
    EXPECT(g_no_args_count == 120, "kernel without parameters ran %u times", g_no_args_count);
    __half h = __float2half(0.f);
    __nv_bfloat16 b = __float2bfloat16(0.f);
    FASTVQ_LAUNCH_KERNEL(half_atomics_kernel, 2, 64, 0, 0, &h, &b);
    EXPECT(__half2float(h) == 64.f && __bfloat162float(b) == 128.f, "atomicAdd(__half) %g, (__nv_bfloat16) %g",
           __half2float(h), __bfloat162float(b));
  });
}

// ---- planted bugs ---------------------------------------------------------------------------------

static int g_salt = 0;  // fresh values per launch: stale __shared__ contents from earlier launches never match

// Sum computed by the missing-barrier kernel under one configuration, and the right sum.
static std::pair<int, int> run_missing_barrier(const Config& c) {
  const ScopedConfig scoped(c);
  std::vector<int> in(256);
  ++g_salt;
  for (int i = 0; i < 256; ++i) in[i] = g_salt * 1000 + i;
  int out = 0;
  emu_test::launch_missing_barrier(in.data(), &out);
  return {out, std::accumulate(in.begin(), in.end(), 0)};
}

static void test_missing_barrier() {
  // Fiber mode only: in threads mode the result is a data race (ThreadSanitizer's job, see
  // test_cuda_emu_crash.cpp).
  g_context = "missing_barrier";
  auto r = run_missing_barrier(make_config(Mode::kFibers, Schedule::kForward));
  EXPECT(r.first != r.second, "forward order must expose the missing barrier (got the right sum %d)", r.first);
  r = run_missing_barrier(make_config(Mode::kFibers, Schedule::kReverse));
  EXPECT(r.first == r.second, "reverse order runs thread 0 last and must hide the bug: %d, want %d", r.first, r.second);
  for (std::uint64_t seed : {1, 2, 3}) {
    r = run_missing_barrier(make_config(Mode::kFibers, Schedule::kShuffled, seed));
    EXPECT(r.first != r.second, "shuffled order (seed %d) must expose the missing barrier", static_cast<int>(seed));
    const auto again = run_missing_barrier(make_config(Mode::kFibers, Schedule::kShuffled, seed));
    EXPECT(again.first - again.second == r.first - r.second, "a shuffled schedule must be reproducible from its seed");
  }
  // The same for a missing __syncwarp between lanes of one warp.
  std::vector<int> in(32), out(32);
  for (int i = 0; i < 32; ++i) in[i] = 100 + i;
  auto exchange_ok = [&](const Config& c) {
    const ScopedConfig scoped(c);
    for (int i = 0; i < 32; ++i) in[i] += 1000;
    emu_test::launch_missing_syncwarp(in.data(), out.data());
    bool ok = true;
    for (int i = 0; i < 32; ++i) ok = ok && out[i] == in[i ^ 1];
    return ok;
  };
  for (const Config& c : {make_config(Mode::kFibers, Schedule::kForward),
                          make_config(Mode::kFibers, Schedule::kReverse),
                          make_config(Mode::kFibers, Schedule::kShuffled, 1)}) {
    EXPECT(!exchange_ok(c), "%s order must expose the missing __syncwarp", describe(c).c_str());
  }
  g_context.clear();
}

static void test_block_order_dependency() {
  const int blocks = 16;
  for (Mode mode : {Mode::kFibers, Mode::kThreads}) {
    for (const Config& c : {make_config(mode, Schedule::kForward), make_config(mode, Schedule::kReverse),
                            make_config(mode, Schedule::kShuffled, 1), make_config(mode, Schedule::kShuffled, 2)}) {
      const ScopedConfig scoped(c);
      g_context = "block_order_dependency, " + describe(c);
      std::vector<int> out(blocks, 0), want(blocks);
      std::iota(want.begin(), want.end(), 1);
      emu_test::launch_chain(out.data(), blocks);
      if (c.schedule == Schedule::kForward) {
        EXPECT(out == want, "forward block order runs block b after block b-1");
      } else {
        EXPECT(out != want, "reverse/shuffled block order must expose the dependency between blocks");
      }
    }
  }
  // Every block runs exactly once in a shuffled order (a permutation), also for awkward grid sizes.
  for (unsigned n : {1u, 2u, 3u, 17u, 1000u}) {
    const fastvq::emu::detail::BlockOrder order(Schedule::kShuffled, 42, n);
    std::vector<int> seen(n, 0);
    for (unsigned k = 0; k < n; ++k) ++seen[order(k)];
    EXPECT(std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; }),
           "shuffled block order of %u blocks is not a permutation", n);
  }
  g_context.clear();
}

static std::vector<int> g_out(1024);

static void test_planted_errors() {
  for (const Config& c : all_configs()) {
    const ScopedConfig scoped(c);
    g_context = "planted_errors, " + describe(c);
    int* out = g_out.data();
    expect_error([&] { emu_test::launch_divergent_barrier(out); },
                 {"divergent barrier", "__syncthreads()", "test_cuda_emu_kernels.cuh:", "divergent_barrier_kernel",
                  "must reach the same __syncthreads() call"});
    expect_error([&] { emu_test::launch_barrier_in_branch(out); },
                 {"every thread of a block must reach every __syncthreads()", "barrier_in_branch_kernel",
                  "threads of block ("});
    expect_error([&] { emu_test::launch_syncwarp_deadlock(out); },
                 {"deadlock: in warp", "wait in __syncwarp(mask 0xffffffff)", "in __syncthreads() at"});
    expect_error([&] { emu_test::launch_lane_not_in_mask(out); },
                 {"__shfl_sync(mask 0x0000ffff)", "is not in its own mask"});
    expect_error([&] { emu_test::launch_source_not_in_mask(out); }, {"reads lane 20, which is not in the mask"});
    expect_error([&] { emu_test::launch_source_exited(out); }, {"__shfl_down_sync", "reads lane", "which has exited"});
    expect_error([&] { emu_test::launch_collective_sites(out); },
                 {"divergent warp collective (same collective at different call sites)",
                  "__shfl_sync(mask 0xffffffff)"});
    expect_error([&] { emu_test::launch_mask_mismatch(out); },
                 {"mismatched warp collectives", "lane 3 in __shfl_xor_sync(mask 0x000000ff)"});
    expect_error([&] { emu_test::launch_bad_width(out); }, {"width 12", "must be a power of two in [1, 32]"});
    expect_error([&] { emu_test::launch_trap(out); }, {"__trap() at test_cuda_emu_kernels.cuh:", "in thread 7"});
    // The process is still usable: a correct kernel right after the errors.
    std::vector<int> in(256, 1), sums(1, 0);
    emu_test::launch_block_sum(in.data(), 256, sums.data());
    EXPECT(sums[0] == 256, "a launch after errors must work: %d", sums[0]);
  }
  g_context.clear();
}

// Destructors of a failed block's threads run (fiber stacks are unwound, not abandoned).
static int g_live_guards = 0;
struct Guard {
  Guard() { __atomic_add_fetch(&g_live_guards, 1, __ATOMIC_RELAXED); }
  ~Guard() { __atomic_sub_fetch(&g_live_guards, 1, __ATOMIC_RELAXED); }
  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;
};
__global__ void unwinding_kernel(int* out) {
  const Guard guard;
  __shared__ int s[64];
  s[threadIdx.x] = 1;
  __syncthreads();
  if (threadIdx.x % 32 < 16) __syncwarp();  // deadlock with the barrier below
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

static void test_unwinding() {
  for (Mode mode : {Mode::kFibers, Mode::kThreads}) {
    const ScopedConfig scoped(make_config(mode, Schedule::kShuffled, 9));
    g_context = std::string("unwinding, ") + fastvq::emu::to_string(mode);
    expect_error([&] { FASTVQ_LAUNCH_KERNEL(unwinding_kernel, 3, 64, 0, 0, g_out.data()); }, {"deadlock"});
    EXPECT(g_live_guards == 0, "%d kernel-thread objects were not destroyed", g_live_guards);
  }
  g_context.clear();
}

__global__ void launching_kernel(int* out) { FASTVQ_LAUNCH_KERNEL(emu_test::chain_kernel, 1, 32, 0, 0, out); }

static void test_misuse() {
  g_context = "misuse";
  int* out = g_out.data();
  expect_error([&] { FASTVQ_LAUNCH_KERNEL(emu_test::chain_kernel, 1, 2048, 0, 0, out); },
               {"invalid launch configuration of emu_test::chain_kernel", "2048"});
  expect_error([&] { FASTVQ_LAUNCH_KERNEL(emu_test::chain_kernel, dim3(1, 1, 65), dim3(1, 1, 65), 0, 0, out); },
               {"invalid launch configuration", "exceeds (1024, 1024, 64)"});
  expect_error([&] { FASTVQ_LAUNCH_KERNEL(emu_test::chain_kernel, 0, 32, 0, 0, out); },
               {"grid (0,1,1) has a zero dimension"});
  expect_error([&] { FASTVQ_LAUNCH_KERNEL(emu_test::chain_kernel, 1, 32, 1 << 20, 0, out); },
               {"bytes of dynamic shared memory"});
  expect_error([&] { __syncthreads(); }, {"__syncthreads() called outside an emulated kernel thread"});
  expect_error([&] { FASTVQ_LAUNCH_KERNEL(launching_kernel, 1, 2, 0, 0, out); },
               {"dynamic parallelism is not supported"});
  g_context.clear();
}

static void test_env_config() {
  g_context = "env_config";
  std::string err;
  setenv("FASTVQ_EMU_SCHEDULE", "shuffled", 1);
  setenv("FASTVQ_EMU_SEED", "77", 1);
  setenv("FASTVQ_EMU_MODE", "threads", 1);
  setenv("FASTVQ_EMU_STACK_KB", "128", 1);
  setenv("FASTVQ_EMU_WATCHDOG_S", "2.5", 1);
  Config c = fastvq::emu::detail::config_from_env(&err);
  EXPECT(err.empty() && c.schedule == Schedule::kShuffled && c.seed == 77 && c.mode == Mode::kThreads &&
             c.stack_bytes == 128 * 1024 && c.watchdog_s == 2.5,
         "environment not parsed: %s", err.c_str());
  setenv("FASTVQ_EMU_SCHEDULE", "backwards", 1);
  c = fastvq::emu::detail::config_from_env(&err);
  EXPECT(err == "fastvq::emu: FASTVQ_EMU_SCHEDULE must be forward, reverse or shuffled, got 'backwards'", "%s",
         err.c_str());
  setenv("FASTVQ_EMU_SCHEDULE", "reverse", 1);
  setenv("FASTVQ_EMU_STACK_KB", "4", 1);
  c = fastvq::emu::detail::config_from_env(&err);
  EXPECT(err.find("FASTVQ_EMU_STACK_KB must be an integer in [16, 1048576], got '4'") != std::string::npos, "%s",
         err.c_str());
  for (const char* v :
       {"FASTVQ_EMU_SCHEDULE", "FASTVQ_EMU_SEED", "FASTVQ_EMU_MODE", "FASTVQ_EMU_STACK_KB", "FASTVQ_EMU_WATCHDOG_S"}) {
    unsetenv(v);
  }
  Config bad;
  bad.stack_bytes = 1024;
  expect_error([&] { fastvq::emu::set_config(bad); }, {"stack_bytes must be in [16 KiB, 1 GiB]"});
  {
    Config relaxed;
    relaxed.strict_shfl_source = false;
    const ScopedConfig scoped(relaxed);
    std::vector<int> out(64, 0);
    emu_test::launch_source_not_in_mask(out.data());  // reads of inactive lanes return all-ones bits
    EXPECT(out[0] == -1 && out[15] == -1, "non-strict shuffle source must read all-ones: %d", out[0]);
  }
  g_context.clear();
}

// ---- timing ---------------------------------------------------------------------------------------

__global__ void barrier_loop_kernel(int* out, int rounds) {
  __shared__ int s[256];
  int v = static_cast<int>(threadIdx.x);
  for (int r = 0; r < rounds; ++r) {
    s[threadIdx.x] = v;
    __syncthreads();
    v += s[(threadIdx.x + 1) % blockDim.x];
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

__global__ void shuffle_loop_kernel(int* out, int rounds) {
  int v = static_cast<int>(threadIdx.x);
  for (int r = 0; r < rounds; ++r) v += __shfl_xor_sync(0xffffffffu, v, 1 << (r % 5));
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

static void report_timing() {
  const int threads = 256, rounds = 4;  // 8 barriers per block
  std::vector<int> out(64 * threads);
  for (Mode mode : {Mode::kFibers, Mode::kThreads}) {
    const ScopedConfig scoped(make_config(mode, Schedule::kForward));
    const int blocks = mode == Mode::kFibers ? 64 : 4;
    using Clock = std::chrono::steady_clock;
    FASTVQ_LAUNCH_KERNEL(barrier_loop_kernel, 1, threads, 0, 0, out.data(), rounds);  // warm up stacks/threads
    Clock::time_point t0 = Clock::now();
    FASTVQ_LAUNCH_KERNEL(barrier_loop_kernel, blocks, threads, 0, 0, out.data(), rounds);
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / blocks;
    t0 = Clock::now();
    FASTVQ_LAUNCH_KERNEL(shuffle_loop_kernel, blocks, threads, 0, 0, out.data(), 20);
    const double shfl_ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / blocks / threads / 20;
    std::printf("  %-7s: block of %d threads with %d barriers: %.0f us (%.0f ns per thread per barrier); "
                "%.0f ns per thread per __shfl_xor_sync\n",
                fastvq::emu::to_string(mode), threads, 2 * rounds, us, us * 1000 / threads / (2 * rounds), shfl_ns);
  }
}

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  test_block_sum();
  test_segment_shuffles();
  test_votes();
  test_warp_intrinsics();
  test_block_scan_partial_warps();
  test_half_warp_syncwarp();
  test_atomics();
  test_dynamic_shared();
  test_template_kernel();
  test_3d_grid();
  test_wide_shuffles();
  test_float2_shuffle();
  test_no_args_and_half_atomics();
  test_missing_barrier();
  test_block_order_dependency();
  test_planted_errors();
  test_unwinding();
  test_misuse();
  test_env_config();
  report_timing();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (g_failures) {
    std::fprintf(stderr, "test_cuda_emu: %d check(s) FAILED (%.1f s)\n", g_failures, s);
    return 1;
  }
  std::printf("test_cuda_emu: all checks passed (%.1f s)\n", s);
  return 0;
}
