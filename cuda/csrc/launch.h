// The CUDA build's launchers, in plain C++ types so that kernels.cu needs no torch headers (it then
// compiles in seconds per architecture). binding.cpp checks the tensors and calls these.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace tokenprune {
enum class Scalar { f32, f16, bf16 };

// Each returns nullptr, or the CUDA error's message.
const char* launch_gather(const void* x, const int64_t* keep, void* out, int64_t B, int64_t N, int64_t K,
                          int64_t C, int64_t P, int elem_size, void* stream);
const char* launch_merge(const void* x, const float* w, const int64_t* members, const int64_t* offsets, void* out,
                         float* wsum, int64_t B, int64_t N, int64_t S, int64_t C, Scalar dtype, void* stream);
const char* launch_received_attention(const void* q, const void* k, const AttentionShape& shape, float* row_max,
                                      float* row_sum, float* out, Scalar dtype, void* stream);
}  // namespace tokenprune
