// Host-side fp32 load/store for the scalar types the CPU build instantiates (see kernels.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace tokenprune {
inline float load(const float* p) { return *p; }
inline float load(const c10::Half* p) { return static_cast<float>(*p); }
inline float load(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void store(float* p, float v) { *p = v; }
inline void store(c10::Half* p, float v) { *p = c10::Half(v); }
inline void store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }
}  // namespace tokenprune
