// The CUDA emulator linked into two translation units, compiled as the torch extension build compiles
// them: -std=c++20 with __CUDA_NO_HALF_OPERATORS__, __CUDA_NO_HALF_CONVERSIONS__,
// __CUDA_NO_BFLOAT16_CONVERSIONS__ and __CUDA_NO_HALF2_OPERATORS__ (CMakeLists.txt builds this file a
// second time with FASTVQ_EMU_SECOND_TU defined and links both). The assembly context switch, the
// inline (thread_local) variables and the statics of inline functions must each be one per program.
#include <cstdio>
#include <vector>

#include "cuda_emu/cuda_emu.h"

namespace multi_tu {

// An inline device function with barriers and __shared__ memory, called by kernels of both units.
inline __device__ int block_total(int v) {
  __shared__ int s[128];
  s[threadIdx.x] = v;
  __syncthreads();
  int t = 0;
  for (unsigned i = 0; i < blockDim.x; ++i) t += s[i];
  __syncthreads();
  return t;
}

inline const void* threadidx_address() { return &threadIdx; }

}  // namespace multi_tu

#if defined(FASTVQ_EMU_SECOND_TU)

namespace {
__global__ void second_kernel(float* out) {
  const __half h = __float2half(static_cast<float>(threadIdx.x) + 0.5f);
  const __nv_bfloat16 b = __float2bfloat16(2.0f);
  out[blockIdx.x * blockDim.x + threadIdx.x] =
      static_cast<float>(multi_tu::block_total(1)) + __half2float(h) * __bfloat162float(b);
}
}  // namespace

void second_tu_launch(float* out) { FASTVQ_LAUNCH_KERNEL(second_kernel, 2, 128, 0, 0, out); }
const void* second_tu_threadidx() { return &threadIdx; }
const void* second_tu_block_total() { return reinterpret_cast<const void*>(&multi_tu::block_total); }

#else

void second_tu_launch(float* out);
const void* second_tu_threadidx();
const void* second_tu_block_total();

namespace {
__global__ void first_kernel(int* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = multi_tu::block_total(static_cast<int>(threadIdx.x));
}
}  // namespace

int main() {
  int failures = 0;
  for (const fastvq::emu::Mode mode : {fastvq::emu::Mode::kFibers, fastvq::emu::Mode::kThreads}) {
    fastvq::emu::Config c;
    c.mode = mode;
    c.schedule = fastvq::emu::Schedule::kShuffled;
    c.seed = 5;
    const fastvq::emu::ScopedConfig scoped(c);
    std::vector<int> a(256, -1);
    std::vector<float> b(256, -1.f);
    FASTVQ_LAUNCH_KERNEL(first_kernel, 2, 128, 0, 0, a.data());
    second_tu_launch(b.data());
    for (int i = 0; i < 256; ++i) {
      const int want_a = 127 * 128 / 2;
      const float want_b = 128.f + (static_cast<float>(i % 128) + 0.5f) * 2.f;
      if (a[i] != want_a || b[i] != want_b) {
        ++failures;
        std::fprintf(stderr, "FAILED %s, thread %d: first unit %d (want %d), second unit %g (want %g)\n",
                     fastvq::emu::to_string(mode), i, a[i], want_a, b[i], want_b);
        break;
      }
    }
  }
  if (second_tu_threadidx() != multi_tu::threadidx_address()) {
    ++failures;
    std::fprintf(stderr, "FAILED: threadIdx is not one variable across translation units\n");
  }
  if (second_tu_block_total() != reinterpret_cast<const void*>(&multi_tu::block_total)) {
    ++failures;
    std::fprintf(stderr, "FAILED: an inline device function is not one function across translation units\n");
  }
  std::printf("test_cuda_emu_multi_tu (C++%ld): %s\n", __cplusplus / 100 % 100,
              failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}

#endif
