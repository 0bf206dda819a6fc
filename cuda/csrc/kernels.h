// The per-element logic of tokenprune's kernels, written once and compiled twice: by the host compiler
// into the CPU build (cpu.cpp, tested against the PyTorch reference in tokenprune/ops.py) and by nvcc into
// the CUDA build (kernels.cu). Nothing here knows about threads: the CPU build calls these functions from
// loops, the CUDA build from one thread per element.
//
// The includer first declares, in namespace tokenprune, `float load(const T*)` and `void store(T*, float)`
// for every scalar type it instantiates (convert_host.h or kernels.cu): half and bfloat16 are different types
// on the host (c10::Half) and the device (__half), so the conversions are the one thing that differs.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TP_HD __host__ __device__ __forceinline__
#define TP_EXP expf
#else
#include <cmath>
#define TP_HD inline
#define TP_EXP std::exp
#endif

namespace tokenprune {

// ---- gather: the prefix tokens, then the kept patch tokens, in one pass ----------------------------------
// out (B, P + K, C) from x (B, N, C); keep (B, K) indexes the patch tokens x[:, P:]. `e` is a flat index
// into out. A copy, so it is exact in every dtype (the CUDA build copies bytes of the element's size).
// The token of sample b's row of x that output row j copies (the CPU build copies whole rows with it).
TP_HD int64_t gather_source(const int64_t* keep, int64_t b, int64_t j, int64_t K, int64_t P) {
  return j < P ? j : P + keep[b * K + (j - P)];
}

template <typename T>
TP_HD void gather_element(const T* x, const int64_t* keep, T* out, int64_t e, int64_t N, int64_t K,
                          int64_t C, int64_t P) {
  const int64_t c = e % C;
  const int64_t j = (e / C) % (P + K);
  const int64_t b = e / (C * (P + K));
  out[e] = x[(b * N + gather_source(keep, b, j, K, P)) * C + c];
}

// ---- weighted merge: out[b, s] = sum_{n in s} w[b, n] x[b, n] / sum_{n in s} w[b, n] -----------------------
// The members of slot s of sample b are members[b, offsets[b, s] : offsets[b, s + 1]] (token indices in
// ascending order: a stable sort of the destinations), so each output element is one deterministic sum,
// accumulated in fp32 whatever x's dtype, with no atomics. `e` is a flat index into out (B, S, C); the
// summed weights of the slot (the merged token's size) go to wsum (B, S) from the element with c == 0.
template <typename T>
TP_HD void merge_element(const T* x, const float* w, const int64_t* members, const int64_t* offsets, T* out,
                         float* wsum, int64_t e, int64_t N, int64_t S, int64_t C) {
  const int64_t c = e % C;
  const int64_t s = (e / C) % S;
  const int64_t b = e / (C * S);
  const int64_t* slot = offsets + b * (S + 1) + s;
  float acc = 0.f, total = 0.f;
  for (int64_t m = slot[0]; m < slot[1]; ++m) {
    const int64_t n = members[b * N + m];
    const float weight = w[b * N + n];
    acc += weight * load(x + (b * N + n) * C + c);
    total += weight;
  }
  store(out + e, acc / total);  // an empty slot gives 0/0 = NaN, as the reference's division does
  if (c == 0) wsum[b * S + s] = total;
}

// ---- attention each key receives, mean over heads and queries, from q and k ----------------------------
// Never forms a (B, H, Nq, Nk) map. Pass 1 (one call per query row r = (b, h, i)): the row's softmax
// maximum and denominator, online over the keys. Pass 2 (one call per key (b, j)): the key's column of
// probabilities, recomputed from q and k and the row statistics, summed over heads and queries.
// q (B, H, Nq, D) and k (B, H, Nk, D) are contiguous; bias, when given, is an fp32 tensor broadcast to
// (B, H, Nq, Nk) read through its strides `bs` (stride 0 on a broadcast dimension).
struct AttentionShape {
  int64_t B, H, Nq, Nk, D;
  float scale;
  const float* bias;  // may be null
  int64_t bs[4];
};

template <typename T>
TP_HD float attention_logit(const T* q, const T* k, const AttentionShape& a, int64_t b, int64_t h, int64_t i,
                            int64_t j) {
  const T* qi = q + ((b * a.H + h) * a.Nq + i) * a.D;
  const T* kj = k + ((b * a.H + h) * a.Nk + j) * a.D;
  float dot = 0.f;
  for (int64_t d = 0; d < a.D; ++d) dot += load(qi + d) * load(kj + d);
  float logit = dot * a.scale;
  if (a.bias) logit += a.bias[b * a.bs[0] + h * a.bs[1] + i * a.bs[2] + j * a.bs[3]];
  return logit;
}

template <typename T>
TP_HD void attention_row_stats(const T* q, const T* k, const AttentionShape& a, float* row_max, float* row_sum,
                               int64_t r) {
  const int64_t i = r % a.Nq, h = (r / a.Nq) % a.H, b = r / (a.Nq * a.H);
  float m = -INFINITY, z = 0.f;
  for (int64_t j = 0; j < a.Nk; ++j) {
    const float l = attention_logit(q, k, a, b, h, i, j);
    if (l == -INFINITY) continue;  // a masked key adds nothing (and -inf - -inf would be NaN)
    if (l > m) {  // online softmax: rescale the running sum to the new maximum
      // the new maximum's own term, exp(l - l): 1, but NaN for l = +inf, as in the reference's softmax (which
      // subtracts the row's maximum; inf - inf makes the whole row NaN, where a 1 here gave the other keys 0)
      z = z * TP_EXP(m - l) + (l < INFINITY ? 1.f : NAN);
      m = l;
    } else {
      z += TP_EXP(l - m);
    }
  }
  row_max[r] = m;
  row_sum[r] = z;
}

template <typename T>
TP_HD void attention_column(const T* q, const T* k, const AttentionShape& a, const float* row_max,
                            const float* row_sum, float* out, int64_t e) {
  const int64_t j = e % a.Nk, b = e / a.Nk;
  float total = 0.f;
  for (int64_t h = 0; h < a.H; ++h) {
    for (int64_t i = 0; i < a.Nq; ++i) {
      const int64_t r = (b * a.H + h) * a.Nq + i;
      total += TP_EXP(attention_logit(q, k, a, b, h, i, j) - row_max[r]) / row_sum[r];
    }
  }
  out[e] = total / static_cast<float>(a.H * a.Nq);
}

}  // namespace tokenprune
