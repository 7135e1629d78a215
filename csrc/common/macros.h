// Portability macros shared by every translation unit: torch-free C++ (CPU kernel cores, native tests),
// ATen host code and CUDA kernels. Nothing here includes a torch header.
#pragma once

// fastvq promises bit-identical results across backends and CPU vector paths for the ops of
// docs/conventions.md, which rests on IEEE arithmetic with no reassociation, no contraction behind the
// kernel's back and no flushed denormals. A fast-math build breaks all three silently, so it does not build.
// __FAST_MATH__: g++/clang -ffast-math (-Ofast), also nvcc's host pass under -Xcompiler -ffast-math.
// __USE_FAST_MATH__: defined by some nvcc versions under --use_fast_math (nvcc 13.0 defines no macro for it,
// verified; setup.py refuses --use_fast_math in the flags it passes and in NVCC_APPEND_FLAGS/PREPEND_FLAGS).
#if defined(__FAST_MATH__) || defined(__USE_FAST_MATH__)
#error "fastvq must not be compiled with fast-math (-ffast-math, -Ofast, --use_fast_math): its kernels promise IEEE results bit-identical across backends (docs/conventions.md)"
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTVQ_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTVQ_DEVICE __device__ __forceinline__
#else
#define FASTVQ_HOST_DEVICE inline
#define FASTVQ_DEVICE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTVQ_RESTRICT __restrict__
#define FASTVQ_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTVQ_RESTRICT
#define FASTVQ_ALWAYS_INLINE inline
#endif

#define FASTVQ_STRINGIFY_(x) #x
#define FASTVQ_STRINGIFY(x) FASTVQ_STRINGIFY_(x)
