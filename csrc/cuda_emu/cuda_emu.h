// CUDA-on-CPU emulation layer: compile a CUDA kernel source with g++ and run it on the CPU, with CUDA's
// undefined behaviour (divergent barriers, bad warp collectives, deadlocks) turned into clear errors.
// The single include for kernel sources; see docs/cuda_emu.md.
//
// Under nvcc (__CUDACC__) this header only supplies two portability macros; under a host compiler it
// maps the CUDA kernel language onto the emulator:
//
//   FASTVQ_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, args...)
//       nvcc: kernel<<<grid, block, smem_bytes, stream>>>(args...)
//       g++:  runs the grid on the CPU; throws fastvq::emu::EmuError on an invalid launch or on CUDA
//             undefined behaviour found while running it. Wrap a kernel whose name contains a comma in
//             parentheses: FASTVQ_LAUNCH_KERNEL((my_kernel<float, 4>), grid, block, 0, stream, x, y).
//   FASTVQ_DYNAMIC_SHARED(T, name);
//       declares `T* const name` pointing at the block's dynamic shared memory (smem_bytes of the
//       launch), instead of `extern __shared__ T name[];`.
//   FASTVQ_CUDA_EMU
//       1 under the emulator, 0 under nvcc.
//
// Emulator rules for kernel code (details in docs/cuda_emu.md): launch only through
// FASTVQ_LAUNCH_KERNEL; __shared__ only in function (or namespace) scope; dynamic shared memory only
// through FASTVQ_DYNAMIC_SHARED; no inline PTX or tensor-core intrinsics; no communication between
// blocks except atomics whose result does not depend on block order; no spin-waiting on other threads.
#pragma once

// FASTVQ_EMU_DEPAREN((a<b, c>)) -> a<b, c>; FASTVQ_EMU_DEPAREN(a) -> a. Lets a template kernel whose
// arguments contain commas be passed to a macro in parentheses, and still be launched with <<<>>>.
#define FASTVQ_EMU_DEPAREN(X) FASTVQ_EMU_DEPAREN_ESC_(FASTVQ_EMU_DEPAREN_ISH_ X)
#define FASTVQ_EMU_DEPAREN_ISH_(...) FASTVQ_EMU_DEPAREN_ISH_ __VA_ARGS__
#define FASTVQ_EMU_DEPAREN_ESC_(...) FASTVQ_EMU_DEPAREN_ESC2_(__VA_ARGS__)
#define FASTVQ_EMU_DEPAREN_ESC2_(...) FASTVQ_EMU_DEPAREN_VAN_##__VA_ARGS__
#define FASTVQ_EMU_DEPAREN_VAN_FASTVQ_EMU_DEPAREN_ISH_

// __half and __nv_bfloat16 for kernels in both builds (under a host compiler: CUDA's host-side
// definitions, which compile with torch's __CUDA_NO_HALF_OPERATORS__ & co.).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)

#define FASTVQ_CUDA_EMU 0
// A differently named byte array per use: every extern __shared__ array starts at the dynamic shared
// memory, and distinct names avoid nvcc's "incompatible redeclaration" between kernels that use
// different element types.
#define FASTVQ_DYNAMIC_SHARED(T, name)                                       \
  extern __shared__ __align__(16) unsigned char fastvq_dynamic_smem_##name[]; \
  T* const name = reinterpret_cast<T*>(fastvq_dynamic_smem_##name)
#define FASTVQ_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
  FASTVQ_EMU_DEPAREN(kernel)<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)

#else  // the emulator

#define FASTVQ_CUDA_EMU 1

// CUDA's own host headers: dim3, uint3, float2/float4/int4/... and make_float2 & co. They also define
// __host__, __device__, __global__, __forceinline__, __align__ and __constant__ for a host compiler.
// (__noinline__ stays undefined: libstdc++ 12 spells __attribute__((__noinline__)), which a macro
// would break. Kernels use __attribute__((noinline)) where they need it.)
#include <vector_functions.h>
#include <vector_types.h>

#include "emu_config.h"
#include "emu_device.h"
#include "emu_runtime.h"

// The blocks of a launch run one at a time and launches are serialised, so a __shared__ variable can be
// a function-local static: one instance, shared by the threads of the running block. (Unlike the GPU,
// its contents carry over from one block to the next; dynamic shared memory is refilled instead.)
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// CUDA's `#pragma unroll` means nothing to a host compiler, which warns under -Wall (-Wunknown-pragmas).
// GCC >= 13 honours this for the rest of the translation unit; GCC 12 ignores diagnostic pragmas for
// preprocessor warnings (GCC bug 53431), so emulated sources are compiled with -Wno-unknown-pragmas.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 13
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

#define FASTVQ_DYNAMIC_SHARED(T, name) T* const name = ::fastvq::emu::detail::dynamic_shared<T>()
#define FASTVQ_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...)                                        \
  ::fastvq::emu::detail::make_launcher(::fastvq::emu::detail::LaunchSite{__FILE__, __LINE__, #kernel},             \
                                       FASTVQ_EMU_DEPAREN(kernel), (grid), (block), (smem_bytes), (stream))(__VA_ARGS__)

#endif
