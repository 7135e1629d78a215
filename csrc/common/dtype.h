// Storage dtypes as seen by torch-free kernel cores, and exact scalar conversions to fp32.
// Host code maps at::ScalarType onto DType once; the cores never include ATen.
#pragma once

#include <cstdint>
#include <cstring>

#include "macros.h"

namespace fastvq {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "?";
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN payload kept).
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);  // +-0
    // subnormal: renormalise
    exp = 127 - 15 + 1;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    man &= 0x3ffu;
    return bits_to_float(sign | (exp << 23) | (man << 13));
  }
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

// bfloat16 is the top half of a binary32: exact.
inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Element `i` of an array of dtype `t`, converted to fp32 (float64 is rounded to nearest).
inline float load_as_float(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(base)[i]);
  }
  return 0.f;
}

}  // namespace fastvq
