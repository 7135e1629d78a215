// Portability macros shared by every translation unit: torch-free C++ (CPU kernel cores, native tests),
// ATen host code and CUDA kernels. Nothing here includes a torch header.
#pragma once

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
