// The CUDA build: one thread per element over the per-element functions of kernels.h. Only CUDA's own
// headers here (no torch), so each architecture compiles in seconds; ops.cpp checks the tensors.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tokenprune {
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
}  // namespace tokenprune

#include "launch.h"

namespace tokenprune {
namespace {

constexpr int kThreads = 256;

// A 16-byte element (complex128, which keep_tokens sends here as it sends any dtype): two 8-byte words, so that
// 8-byte alignment, all that a complex128 tensor promises, suffices.
struct Bytes16 {
  uint64_t lo, hi;
};

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
__global__ void gather_kernel(const T* x, const int64_t* keep, T* out, int64_t total, int64_t N, int64_t K,
                              int64_t C, int64_t P) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(blockDim.x) * gridDim.x)
    gather_element(x, keep, out, e, N, K, C, P);
}

template <typename T>
__global__ void merge_kernel(const T* x, const float* w, const int64_t* members, const int64_t* offsets, T* out,
                             float* wsum, int64_t total, int64_t N, int64_t S, int64_t C) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(blockDim.x) * gridDim.x)
    merge_element(x, w, members, offsets, out, wsum, e, N, S, C);
}

template <typename T>
__global__ void row_stats_kernel(const T* q, const T* k, AttentionShape a, float* row_max, float* row_sum,
                                 int64_t rows) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(blockDim.x) * gridDim.x)
    attention_row_stats(q, k, a, row_max, row_sum, r);
}

template <typename T>
__global__ void column_kernel(const T* q, const T* k, AttentionShape a, const float* row_max, const float* row_sum,
                              float* out, int64_t columns) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < columns; e += int64_t(blockDim.x) * gridDim.x)
    attention_column(q, k, a, row_max, row_sum, out, e);
}

// Grid-stride loops: cap the grid, the loop covers the rest.
unsigned grid_for(int64_t n) { return static_cast<unsigned>(blocks_for(n) < 65535 ? blocks_for(n) : 65535); }

template <typename T>
const char* merge_as(const void* x, const float* w, const int64_t* members, const int64_t* offsets, void* out,
                     float* wsum, int64_t B, int64_t N, int64_t S, int64_t C, cudaStream_t s) {
  const int64_t total = B * S * C;
  if (total == 0) return nullptr;
  merge_kernel<T><<<grid_for(total), kThreads, 0, s>>>(static_cast<const T*>(x), w, members, offsets,
                                                       static_cast<T*>(out), wsum, total, N, S, C);
  return last_error();
}

template <typename T>
const char* attention_as(const void* q, const void* k, const AttentionShape& a, float* row_max, float* row_sum,
                         float* out, cudaStream_t s) {
  const int64_t rows = a.B * a.H * a.Nq, columns = a.B * a.Nk;
  if (rows == 0 || columns == 0) return nullptr;
  row_stats_kernel<T><<<grid_for(rows), kThreads, 0, s>>>(static_cast<const T*>(q), static_cast<const T*>(k), a,
                                                          row_max, row_sum, rows);
  column_kernel<T><<<grid_for(columns), kThreads, 0, s>>>(static_cast<const T*>(q), static_cast<const T*>(k), a,
                                                          row_max, row_sum, out, columns);
  return last_error();
}

}  // namespace

const char* launch_gather(const void* x, const int64_t* keep, void* out, int64_t B, int64_t N, int64_t K, int64_t C,
                          int64_t P, int elem_size, void* stream) {
  const int64_t total = B * (P + K) * C;
  if (total == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  // A gather copies elements, so only their size matters: one instantiation per width.
#define TP_GATHER(T)                                                                                            \
  gather_kernel<T><<<grid_for(total), kThreads, 0, s>>>(static_cast<const T*>(x), keep, static_cast<T*>(out), \
                                                        total, N, K, C, P)
  switch (elem_size) {
    case 1: TP_GATHER(uint8_t); break;
    case 2: TP_GATHER(uint16_t); break;
    case 4: TP_GATHER(uint32_t); break;
    case 8: TP_GATHER(uint64_t); break;
    case 16: TP_GATHER(Bytes16); break;
    default: return "gather: unsupported element size";
  }
#undef TP_GATHER
  return last_error();
}

const char* launch_merge(const void* x, const float* w, const int64_t* members, const int64_t* offsets, void* out,
                         float* wsum, int64_t B, int64_t N, int64_t S, int64_t C, Scalar dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Scalar::f16: return merge_as<__half>(x, w, members, offsets, out, wsum, B, N, S, C, s);
    case Scalar::bf16: return merge_as<__nv_bfloat16>(x, w, members, offsets, out, wsum, B, N, S, C, s);
    default: return merge_as<float>(x, w, members, offsets, out, wsum, B, N, S, C, s);
  }
}

const char* launch_received_attention(const void* q, const void* k, const AttentionShape& a, float* row_max,
                                      float* row_sum, float* out, Scalar dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Scalar::f16: return attention_as<__half>(q, k, a, row_max, row_sum, out, s);
    case Scalar::bf16: return attention_as<__nv_bfloat16>(q, k, a, row_max, row_sum, out, s);
    default: return attention_as<float>(q, k, a, row_max, row_sum, out, s);
  }
}

}  // namespace tokenprune
