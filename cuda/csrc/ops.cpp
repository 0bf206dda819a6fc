// tokenprune's extension: tensor checks, the CPU build's loops over the per-element functions of kernels.h,
// and (compiled with -DTOKENPRUNE_WITH_CUDA) the hand-off of CUDA tensors to the launchers of kernels.cu.
// The PyTorch functions in tokenprune/ops.py are the reference each op here is tested against.
#include <ATen/OpMathType.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "convert_host.h"
#include "launch.h"

#ifdef TOKENPRUNE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tokenprune {
namespace {

// Parallel tasks on the CPU (at::parallel_for: OpenMP threads, the build passing -fopenmp as torch's own does). A
// parallel region costs a few microseconds, about what a whole sample's merge or copy takes at ViT-Ti/S widths at
// batch 1 (measured: splitting one such sample over two threads made weighted_merge 1.5-2x slower), so a loop
// forks only with work of this order per task.
constexpr int64_t kGrain = 2048;  // elements per task of a loop that does tens of operations per element
constexpr int64_t kGrainElementwise = 65536;  // elements per task of a loop of one or two operations per element
constexpr int64_t kGrainBytes = 131072;  // bytes per task of a copy
constexpr int64_t kMinSplitElements = 131072;  // one sample's tokens x channels per task, to split a sample

void check_floating(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kHalf ||
                  t.scalar_type() == torch::kBFloat16,
              "tokenprune: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_index(const torch::Tensor& index, const char* name, int64_t batch) {
  TORCH_CHECK(index.scalar_type() == torch::kLong, "tokenprune: ", name, " must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == batch, "tokenprune: ", name, " must be (", batch,
              ", k), got ", index.sizes());
}

// Indices are trusted on the device (a range check there would cost a host sync, and they come from
// topk/argsort); the CPU build checks them, which is how the tests see a wrong index named.
// A plain scan: two ATen reductions and their .item() cost more than the CPU gather itself at batch 1.
void check_range_on_cpu(const torch::Tensor& index, int64_t bound, const char* name) {
  if (!index.is_cpu() || index.numel() == 0) return;
  const auto flat = index.contiguous();
  const int64_t* p = flat.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(p, p + flat.numel());
  TORCH_CHECK(*lo >= 0 && *hi < bound, "tokenprune: ", name, " must lie in [0, ", bound, "), got [", *lo, ", ",
              *hi, "]");
}

Scalar scalar_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kHalf: return Scalar::f16;
    case torch::kBFloat16: return Scalar::bf16;
    default: return Scalar::f32;
  }
}

// Calls f with a value of the C++ type of x's dtype (float32, float16, bfloat16; check_floating first).
template <typename F>
void dispatch_floating(const torch::Tensor& x, F&& f) {
  switch (x.scalar_type()) {
    case torch::kHalf: f(c10::Half{}); break;
    case torch::kBFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;
  }
}

// Loops whose every lane is independent (no reduction across lanes), compiled twice on x86-64: for AVX2 (eight
// floats) and for the baseline (SSE2, four), the CPU choosing at load (GCC/Clang function multi-versioning,
// which needs the loader's ifuncs: Linux).
// Neither target has FMA, and the build passes -ffp-contract=off: a * b + c rounds twice, as ATen's does.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define TOKENPRUNE_WIDE __attribute__((target_clones("avx2", "default")))
#else
#define TOKENPRUNE_WIDE
#endif

// sum[c] += weight * row[c]
TOKENPRUNE_WIDE void add_scaled(float* __restrict__ sum, const float* __restrict__ row, float weight, int64_t n) {
  for (int64_t c = 0; c < n; ++c) sum[c] += weight * row[c];
}

// v[c] /= total
TOKENPRUNE_WIDE void divide(float* v, float total, int64_t n) {
  for (int64_t c = 0; c < n; ++c) v[c] /= total;
}

// out[c] = v[c] / total
TOKENPRUNE_WIDE void divide_into(float* __restrict__ out, const float* __restrict__ v, float total, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = v[c] / total;
}

// out[c] = row[c] * weight (a plain copy for weight 1: x * 1 is x)
TOKENPRUNE_WIDE void scale_row(float* __restrict__ out, const float* __restrict__ row, float weight, int64_t n) {
  if (weight == 1.0f) {
    std::memcpy(out, row, n * sizeof(float));
    return;
  }
  for (int64_t c = 0; c < n; ++c) out[c] = row[c] * weight;
}

// v[c] += row[c * stride] (add_row where the stride is 1)
TOKENPRUNE_WIDE void add_strided(float* __restrict__ v, const float* __restrict__ row, int64_t stride, int64_t n) {
  for (int64_t c = 0; c < n; ++c) v[c] += row[c * stride];
}

// v[c] += row[c]
TOKENPRUNE_WIDE void add_row(float* __restrict__ v, const float* __restrict__ row, int64_t n) {
  for (int64_t c = 0; c < n; ++c) v[c] += row[c];
}

// Each row's max over its n entries and where it is: the first of equal maxima, NaN first (as ATen's max).
void first_max(const float* row, int64_t n, float* best, int64_t* arg) {
  float value = -std::numeric_limits<float>::infinity();
  int64_t at = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = row[j];
    if (std::isnan(v)) {
      value = v;
      at = j;
      break;
    }
    if (v > value) {
      value = v;
      at = j;
    }
  }
  *best = value;
  *arg = at;
}

// Four floats at a time with GCC/Clang vector extensions (SSE on x86-64, NEON on Arm, whatever the build's flags):
// without fast-math (which would lose NaN) the compiler vectorises none of the reductions and blends below itself.
using Float4 = float __attribute__((vector_size(16)));
using Int4 = int32_t __attribute__((vector_size(16)));

inline Float4 load4(const float* p) {
  Float4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store4(float* p, Float4 v) { std::memcpy(p, &v, sizeof v); }

bool any_nan(const float* row, int64_t n) {
  Int4 seen = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const Float4 v = load4(row + j);
    seen |= v != v;
  }
  bool nan = seen[0] | seen[1] | seen[2] | seen[3];
  for (; j < n; ++j) nan |= std::isnan(row[j]);
  return nan;
}

// first_max for a row the caller knows holds no NaN: the same value and index (the max, then the first entry
// equal to it).
void first_max_no_nan(const float* row, int64_t n, float* best, int64_t* arg) {
  constexpr float kLow = -std::numeric_limits<float>::infinity();
  Float4 top = {kLow, kLow, kLow, kLow};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const Float4 v = load4(row + j);
    top = v > top ? v : top;
  }
  float value = kLow;
  for (int lane = 0; lane < 4; ++lane) value = top[lane] > value ? top[lane] : value;
  for (; j < n; ++j) value = row[j] > value ? row[j] : value;
  int64_t at = 0;  // value is one of the row's entries (-inf for an all -inf row: the first)
  while (at < n && row[at] != value) ++at;
  *best = value;
  *arg = at;
}

// top = max(top, row) entry by entry over n entries, arg = idx where row is strictly larger (rows without NaN).
void running_max_no_nan(const float* row, float* top, int32_t* arg, int64_t n, int32_t idx) {
  const Int4 index = {idx, idx, idx, idx};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const Float4 v = load4(row + j), t = load4(top + j);
    Int4 a;
    std::memcpy(&a, arg + j, sizeof a);
    const Int4 larger = v > t;
    store4(top + j, larger ? v : t);
    a = larger ? index : a;
    std::memcpy(arg + j, &a, sizeof a);
  }
  for (; j < n; ++j) {
    if (row[j] > top[j]) {
      top[j] = row[j];
      arg[j] = idx;
    }
  }
}

// A row of pair scores (n entries) of an A token: its first `masked` entries (pairs that touch a prefix token) set
// to -inf, then its best entry and where it is, as ATen's max finds them (the first of equal maxima, NaN first).
// Returns whether the row holds a NaN.
bool masked_row_max(float* row, int64_t n, int64_t masked, float* best, int64_t* arg) {
  std::fill(row, row + masked, -std::numeric_limits<float>::infinity());
  const bool nan = any_nan(row, n);
  (nan ? first_max : first_max_no_nan)(row, n, best, arg);
  return nan;
}

// The n entries of v ranked by descending value into `rank` (std::sort; v without NaN). It stands for the
// reference's argsort, which may order equal values either way, only where its caller reads no order among
// equal values: true when the value at each ranked position in [lo, hi] is strictly above the next one's.
// The caller then falls back to ATen's argsort (a call of some 15 us against 1-2 for this at 100 tokens).
bool rank_descending(const float* v, int64_t n, int64_t* rank, int64_t lo, int64_t hi) {
  std::iota(rank, rank + n, int64_t{0});
  std::sort(rank, rank + n, [v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  for (int64_t i = std::max<int64_t>(lo, 0); i <= hi && i + 1 < n; ++i)
    if (!(v[rank[i]] > v[rank[i + 1]])) return false;
  return true;
}

// Each sample's values (B, n) ranked by descending value, as the references' ATen argsort ranks them: by
// rank_descending where the ranked positions the caller reads, [lo, hi + 1], hold no tie in any sample (nor a NaN
// anywhere: `has_nan` per sample), else by that argsort itself, whose order among equal values is its own.
torch::Tensor rank_rows(const torch::Tensor& values, const std::vector<char>& has_nan, int64_t lo, int64_t hi) {
  const int64_t B = values.size(0), n = values.size(1);
  auto ranked = torch::empty({B, n}, values.options().dtype(torch::kLong));
  const float* vp = values.data_ptr<float>();
  int64_t* rp = ranked.data_ptr<int64_t>();
  std::vector<char> untied(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) untied[b] = !has_nan[b] && rank_descending(vp + b * n, n, rp + b * n, lo, hi);
  });
  const bool exact = std::all_of(untied.begin(), untied.end(), [](char u) { return u != 0; });
  return exact ? ranked : values.argsort(-1, /*descending=*/true).contiguous();
}

#ifdef TOKENPRUNE_WITH_CUDA
void* stream_of(const torch::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
void check_launch(const char* error) { TORCH_CHECK(error == nullptr, "tokenprune CUDA kernel: ", error); }
#endif

void require_cuda_build(const torch::Tensor& t) {
#ifndef TOKENPRUNE_WITH_CUDA
  TORCH_CHECK(t.is_cpu(), "tokenprune: this is the CPU build of the extension; it got a ", t.device(),
              " tensor (build the CUDA one: tokenprune build-ext --cuda)");
#else
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "tokenprune: the extension takes CPU or CUDA tensors, got ", t.device());
#endif
}

}  // namespace

// x (B, N, C) -> (B, P + K, C): the P prefix tokens, then the patch tokens x[:, P:] at keep (B, K).
torch::Tensor gather_kept(torch::Tensor x, torch::Tensor keep, int64_t num_prefix) {
  TORCH_CHECK(x.dim() == 3, "tokenprune: x must be (batch, tokens, channels), got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), P = num_prefix;
  TORCH_CHECK(0 <= P && P <= N, "tokenprune: num_prefix must lie in [0, ", N, "], got ", P);
  check_index(keep, "keep", B);
  TORCH_CHECK(keep.device() == x.device(), "tokenprune: keep is on ", keep.device(), ", x on ", x.device());
  require_cuda_build(x);
  check_range_on_cpu(keep, N - P, "keep");
  x = x.contiguous();
  keep = keep.contiguous();
  const int64_t K = keep.size(1);
  auto out = torch::empty({B, P + K, C}, x.options());
  if (out.numel() == 0) return out;
#ifdef TOKENPRUNE_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(launch_gather(x.data_ptr(), keep.data_ptr<int64_t>(), out.data_ptr(), B, N, K, C, P,
                               static_cast<int>(x.element_size()), stream_of(x)));
    return out;
  }
#endif
  // Whole rows: a copy per token (the per-element loop the CUDA build runs was 4x slower than ATen's
  // indexing at batch 1 and 8x at batch 32; this one is faster than ATen at every batch measured).
  const int64_t row = C * static_cast<int64_t>(x.element_size());
  const auto* xp = static_cast<const char*>(x.data_ptr());
  const auto* kp = keep.data_ptr<int64_t>();
  auto* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * (P + K), std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const int64_t b = r / (P + K), src = gather_source(kp, b, r % (P + K), K, P);
                       std::memcpy(op + r * row, xp + (b * N + src) * row, row);
                     }
                   });
  return out;
}

// Indices (B, k) of the k highest-ranked entries of each row of scores (B, n), in ascending index order:
// by value (largest or smallest first), NaN above every number (as torch.sort), ties to the lower index (a
// stable sort). The reference: argsort(descending=largest, stable=True)[:, :k].sort(). CPU only: a partial
// selection and a sort of k indices per row, one call for the PyTorch path's three.
torch::Tensor top_k_ascending(torch::Tensor scores, int64_t k, bool largest) {
  TORCH_CHECK(scores.dim() == 2, "tokenprune: scores must be (batch, n), got ", scores.sizes());
  TORCH_CHECK(scores.is_cpu(), "tokenprune: top_k_ascending is a CPU kernel, got a ", scores.device(), " tensor");
  const int64_t B = scores.size(0), n = scores.size(1);
  TORCH_CHECK(0 <= k && k <= n, "tokenprune: k must lie in [0, ", n, "], got ", k);
  scores = scores.contiguous();
  auto out = torch::empty({B, k}, scores.options().dtype(torch::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, scores.scalar_type(), "top_k_ascending", [&] {
    using value_t = at::opmath_type<scalar_t>;
    const auto* sp = scores.data_ptr<scalar_t>();
    auto* op = out.data_ptr<int64_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, kGrain / n), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(n);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = sp + b * n;
        const auto ranks_before = [&](int64_t i, int64_t j) {  // a strict weak order, NaN included
          const value_t u = row[i], v = row[j];
          const bool u_nan = std::isnan(u), v_nan = std::isnan(v);
          if (u_nan != v_nan) return largest ? u_nan : v_nan;
          if (!u_nan && u != v) return largest ? u > v : u < v;
          return i < j;
        };
        std::iota(order.begin(), order.end(), int64_t{0});
        if (k < n) std::nth_element(order.begin(), order.begin() + k, order.end(), ranks_before);
        std::sort(order.begin(), order.begin() + k);
        std::copy(order.begin(), order.begin() + k, op + b * k);
      }
    });
  });
  return out;
}

// The weighted mean of the tokens of x (B, N, C) that share a slot of dest (B, N) in [0, n_out), weights
// w (B, N) (sizes: summed in fp32 whatever x's dtype). Returns (mean (B, n_out, C) in x's dtype,
// summed weights (B, n_out) in fp32).
std::tuple<torch::Tensor, torch::Tensor> weighted_merge(torch::Tensor x, torch::Tensor w, torch::Tensor dest,
                                                         int64_t n_out) {
  TORCH_CHECK(x.dim() == 3, "tokenprune: x must be (batch, tokens, channels), got ", x.sizes());
  check_floating(x, "x");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), S = n_out;
  TORCH_CHECK(S >= 0, "tokenprune: n_out must be >= 0, got ", S);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == B && w.size(1) == N, "tokenprune: weights must be (", B, ", ", N,
              "), got ", w.sizes());
  check_index(dest, "dest", B);
  TORCH_CHECK(dest.size(1) == N, "tokenprune: dest must be (", B, ", ", N, "), got ", dest.sizes());
  TORCH_CHECK(w.device() == x.device() && dest.device() == x.device(),
              "tokenprune: x, weights and dest must be on one device");
  require_cuda_build(x);
  check_range_on_cpu(dest, S, "dest");
  x = x.contiguous();
  w = w.to(torch::kFloat).contiguous();
  auto out = torch::empty({B, S, C}, x.options());
  auto wsum = torch::zeros({B, S}, w.options());
  if (B * S == 0) return {out, wsum};
  if (C == 0) return {out, wsum.scatter_add_(1, dest, w)};  // no channel element to carry the sums
#ifdef TOKENPRUNE_WITH_CUDA
  if (x.is_cuda()) {
    // Each slot's members in ascending token order: a stable sort of the destinations, and where each
    // slot's run starts. Built with ATen ops on x's device (no host sync).
    const auto members = std::get<1>(dest.sort(std::optional<bool>(true), /*dim=*/1, /*descending=*/false)).contiguous();
    auto offsets = torch::zeros({B, S + 1}, dest.options());
    offsets.narrow(1, 1, S).scatter_add_(1, dest, torch::ones_like(dest));
    offsets = offsets.cumsum(1).contiguous();
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(launch_merge(x.data_ptr(), w.data_ptr<float>(), members.data_ptr<int64_t>(),
                              offsets.data_ptr<int64_t>(), out.data_ptr(), wsum.data_ptr<float>(), B, N, S, C,
                              scalar_of(x), stream_of(x)));
    return {out, wsum};
  }
#endif
  // Whole rows, in token order: each slot adds its members' weight x row as they come (the per-element loop the
  // CUDA build runs, each element walking its slot's members, was 3-10x slower than the PyTorch ops on CPU).
  // The same sums in the same order as merge_element's and the reference's index_add: bit-identical. Tasks are
  // (sample, block of channels), so one sample large enough to pay for a parallel region still spreads over the
  // threads; float32 sums go straight into the output, which is then divided in place.
  const auto dc = dest.contiguous();
  // channels per task: whole rows when the samples alone fill the threads or a sample is too little work to split,
  // else each thread a block of them
  const int64_t threads = at::get_num_threads();
  const int64_t split = B >= threads ? 1 : std::clamp<int64_t>(N * C / kMinSplitElements, 1, threads);
  const int64_t channels_per_task = split == 1 ? C : std::min(C, ((C + split - 1) / split + 15) / 16 * 16);
  const int64_t blocks = (C + channels_per_task - 1) / channels_per_task;
  const int64_t grain = std::max<int64_t>(1, kGrain * 16 / std::max<int64_t>(N * channels_per_task, 1));
  dispatch_floating(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* wp = w.data_ptr<float>();
    const auto* dp = dc.data_ptr<int64_t>();
    auto* op = out.data_ptr<scalar_t>();
    auto* sp = wsum.data_ptr<float>();
    at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> total(S), scratch(kFloat ? 0 : S * channels_per_task);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, c0 = (task % blocks) * channels_per_task;
        const int64_t width = std::min(channels_per_task, C - c0);
        // the sums (S, width) with row stride `stride`: the output's own rows for float32
        float* acc = kFloat ? reinterpret_cast<float*>(op) + b * S * C + c0 : scratch.data();
        const int64_t stride = kFloat ? C : width;
        for (int64_t slot = 0; slot < S; ++slot) std::fill(acc + slot * stride, acc + slot * stride + width, 0.0f);
        std::fill(total.begin(), total.end(), 0.0f);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t slot = dp[b * N + n];
          const float weight = wp[b * N + n];
          const scalar_t* row = xp + (b * N + n) * C + c0;
          float* sum = acc + slot * stride;
          if constexpr (kFloat) {
            add_scaled(sum, row, weight, width);
          } else {
            for (int64_t c = 0; c < width; ++c) sum[c] += weight * static_cast<float>(row[c]);
          }
          total[slot] += weight;
        }
        for (int64_t slot = 0; slot < S; ++slot) {  // an empty slot gives 0/0 = NaN, as the reference's division
          scalar_t* dst = op + (b * S + slot) * C + c0;
          if constexpr (kFloat) {
            divide(dst, total[slot], width);  // the sums are the output's rows
          } else {
            const float* sum = acc + slot * stride;
            for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(sum[c] / total[slot]);
          }
        }
        if (c0 == 0) std::copy(total.begin(), total.end(), sp + b * S);
      }
    });
  });
  return {out, wsum};
}

// The attention each key receives, averaged over heads and queries, (B, Nk) in fp32, from q (B, H, Nq, D)
// and k (B, H, Nk, D), without a (B, H, Nq, Nk) map; bias (broadcastable to that shape) is added to the
// logits.
torch::Tensor received_attention(torch::Tensor q, torch::Tensor k, double scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "tokenprune: q and k must be (batch, heads, tokens, dim), got ",
              q.sizes(), " and ", k.sizes());
  check_floating(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "tokenprune: q and k must share a dtype");
  TORCH_CHECK(k.device() == q.device(), "tokenprune: q and k must be on one device");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "tokenprune: q ", q.sizes(), " and k ", k.sizes(), " disagree on batch, heads or dim");
  require_cuda_build(q);
  AttentionShape a{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), static_cast<float>(scale), nullptr, {0, 0, 0, 0}};
  q = q.contiguous();
  k = k.contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == q.device(), "tokenprune: the bias must be on q's device");
    b = bias->to(torch::kFloat).expand({a.B, a.H, a.Nq, a.Nk});  // strides 0 where broadcast: no copy
    a.bias = b.data_ptr<float>();
    for (int d = 0; d < 4; ++d) a.bs[d] = b.stride(d);
  }
  const auto f32 = q.options().dtype(torch::kFloat);
  auto row_max = torch::empty({a.B * a.H * a.Nq}, f32), row_sum = torch::empty({a.B * a.H * a.Nq}, f32);
  auto out = torch::zeros({a.B, a.Nk}, f32);
  if (out.numel() == 0) return out;
  // a mean over no head or no query: 0 / 0, as the reference's division (the CUDA launcher skips empty grids)
  if (a.H * a.Nq == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());
#ifdef TOKENPRUNE_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    check_launch(launch_received_attention(q.data_ptr(), k.data_ptr(), a, row_max.data_ptr<float>(),
                                           row_sum.data_ptr<float>(), out.data_ptr<float>(), scalar_of(q),
                                           stream_of(q)));
    return out;
  }
#endif
  dispatch_floating(q, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* qp = q.data_ptr<scalar_t>();
    const auto* kp = k.data_ptr<scalar_t>();
    auto* mx = row_max.data_ptr<float>();
    auto* sm = row_sum.data_ptr<float>();
    auto* op = out.data_ptr<float>();
    at::parallel_for(0, a.B * a.H * a.Nq, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) attention_row_stats(qp, kp, a, mx, sm, r);
    });
    at::parallel_for(0, a.B * a.Nk, 16, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) attention_column(qp, kp, a, mx, sm, op, e);
    });
  });
  return out;
}

namespace {

// ToMe's metric: the keys k (B, H, N, D) averaged over heads, (B, N, D) float32, bit for bit what the reference's
// k.mean(1, dtype=float32) gives, in a loop where ATen's order is known, else by that mean itself (a call of 20-25
// us at ViT-Ti/S widths, against 2-3 for the loop). ATen's mean sums, then divides by H. Its cascade sum adds the
// heads one after the other from 0 when H <= 3 (whatever the layout), and for H < 16 when each head's D values are
// contiguous, the heads adjacent (stride D: the view of a qkv projection) and D a multiple of 64 (four vectors
// of 16 floats: every column goes through its multi-row loop); elsewhere it may add them in another order.
// Contiguous (B, N, D), as ATen's mean is laid out whatever the keys' layout, so the norms that follow match too.
torch::Tensor head_mean(const torch::Tensor& k) {
  TORCH_CHECK(k.dim() == 4, "tokenprune: k must be (batch, heads, tokens, dim), got ", k.sizes());
  check_floating(k, "k");
  TORCH_CHECK(k.is_cpu(), "tokenprune: head_mean takes CPU tensors, got ", k.device());
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), D = k.size(3);
  const bool in_order = H <= 3 || (H < 16 && D % 64 == 0 && k.stride(3) == 1 && k.stride(1) == D);
  if (k.scalar_type() != torch::kFloat || H == 0 || !in_order) return k.mean({1}, /*keepdim=*/false, torch::kFloat);
  auto metric = torch::empty({B, N, D}, k.options());
  const float* kp = k.data_ptr<float>();
  float* mp = metric.data_ptr<float>();
  const int64_t sb = k.stride(0), sh = k.stride(1), sn = k.stride(2), sd = k.stride(3);
  const float heads = static_cast<float>(H);
  at::parallel_for(0, B * N, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, H * D)), [&](int64_t begin,
                                                                                              int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* in = kp + (row / N) * sb + (row % N) * sn;
      float* out = mp + row * D;
      std::fill(out, out + D, 0.0f);  // sums from 0, as ATen's (so a -0 key sums to +0)
      for (int64_t h = 0; h < H; ++h) {
        if (sd == 1) {
          add_row(out, in + h * sh, D);
        } else {
          add_strided(out, in + h * sh, sd, D);
        }
      }
      divide(out, heads, D);
    }
  });
  return metric;
}

// v / norm, (B, N, D) float32 by (B, N, 1): the references' division of features by their norms, in a loop (one ATen
// call fewer, some 5-15 us at batch 1)
torch::Tensor divide_rows(const torch::Tensor& values, const torch::Tensor& norm) {
  const auto v = values.contiguous(), n = norm.contiguous();  // no copies for the callers' own tensors
  auto out = torch::empty_like(v);
  const int64_t rows = v.size(0) * v.size(1), D = v.size(2);
  const float* vp = v.data_ptr<float>();
  const float* np = n.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElementwise / std::max<int64_t>(1, D)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t row = begin; row < end; ++row) divide_into(op + row * D, vp + row * D, np[row], D);
                   });
  return out;
}

}  // namespace

// ToMe's whole step in one call, for CPU tensors: the bipartite soft matching of the head-mean keys k
// (B, H, N, D) and the size-weighted merge of x (B, N, C) with sizes (B, N, 1) fp32 (None: every size 1).
// Returns (merged x (B, n_out, C) in x's dtype, merged sizes (B, n_out, 1) fp32). At batch 1 the reference's
// thirty-odd small ops cost more than a transformer block saves by losing the merged tokens; here they are one.
// The reference is ops.bipartite_soft_matching + ops.merge_mean, and the outputs are bit-identical to it: the
// scores come from the same ATen ops (or loops that round as they do: head_mean, divide_rows), and each destination
// adds its sources in their rank order, as the reference's index_add does, before the same division.
std::tuple<torch::Tensor, torch::Tensor> bipartite_merge(torch::Tensor k, torch::Tensor x,
                                                          c10::optional<torch::Tensor> size, int64_t r,
                                                          int64_t num_prefix) {
  TORCH_CHECK(x.dim() == 3, "tokenprune: x must be (batch, tokens, channels), got ", x.sizes());
  check_floating(x, "x");
  TORCH_CHECK(x.is_cpu() && k.is_cpu(), "tokenprune: bipartite_merge takes CPU tensors, got ", x.device());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), P = num_prefix;
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(2) == N, "tokenprune: k must be (", B, ", heads, ", N,
              ", dim), got ", k.sizes());
  check_floating(k, "k");  // any of them, whatever x's (autocast): the head mean is float32, as the reference's
  TORCH_CHECK(0 <= P && P <= N, "tokenprune: num_prefix must lie in [0, ", N, "], got ", P);
  TORCH_CHECK(0 < r && r <= (N - P) / 2, "tokenprune: r must lie in [1, ", (N - P) / 2, "], got ", r);
  torch::Tensor s;
  if (size.has_value() && size->defined()) {
    TORCH_CHECK(size->scalar_type() == torch::kFloat && size->dim() == 3 && size->size(0) == B &&
                    size->size(1) == N && size->size(2) == 1,
                "tokenprune: size must be float32 (", B, ", ", N, ", 1), got ", size->scalar_type(), " ",
                size->sizes());
    s = size->contiguous();
  }
  const int64_t in_a = (P + 1) / 2, in_b = P / 2, n_a = (N + 1) / 2, n_b = N / 2;
  const int64_t n_unmerged = n_a - in_a - r, n_out = P + n_unmerged + n_b - in_b;
  // the matching, op for op the reference's (so that near-ties rank alike)
  const auto metric = head_mean(k);
  const auto unit = divide_rows(metric, at::linalg_vector_norm(metric, 2, {-1}, /*keepdim=*/true));
  // at::matmul's batched product is this bmm on these very views
  const auto scores = at::bmm(unit.slice(1, 0, N, 2), unit.slice(1, 1, N, 2).transpose(-1, -2)).contiguous();
  // pairs that touch a prefix token never merge; each A token's best B token: the first of equal maxima, NaN first,
  // as ATen's max (loops: three ATen calls cost more than these at batch 1)
  auto best = torch::empty({B, n_a}, scores.options());
  auto best_dst = torch::empty({B, n_a}, scores.options().dtype(torch::kLong));
  std::vector<char> has_nan(B, 0);
  {
    float* wp = scores.data_ptr<float>();
    float* bp = best.data_ptr<float>();
    int64_t* dp = best_dst.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < n_a; ++i) {
          has_nan[b] |= masked_row_max(wp + (b * n_a + i) * n_b, n_b, i < in_a ? n_b : in_b, bp + b * n_a + i,
                                       dp + b * n_a + i);
        }
      }
    });
  }
  // A tokens, best match first: the first r are the sources, added in this order (read up to position r)
  const auto order = rank_rows(best, has_nan, 0, r - 1);
  const auto xf = x.to(torch::kFloat).contiguous();
  auto merged = torch::empty({B, n_out, C}, xf.options());
  auto merged_size = torch::empty({B, n_out, 1}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* dst_p = best_dst.data_ptr<int64_t>();
  float* mp = merged.data_ptr<float>();
  float* msp = merged_size.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slot(N), kept;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* rank = order_p + b * n_a;  // A tokens, best match first: the first r are sources
      // output slots, the reference's order: prefix, unmerged A (position order), non-prefix B
      std::fill(slot.begin(), slot.end(), -1);
      for (int64_t t = 0; t < P; ++t) slot[t] = t;
      kept.assign(rank + r, rank + n_a);
      std::sort(kept.begin(), kept.end());  // prefix A tokens (scored -inf) come first; they keep their slots
      for (int64_t i = in_a; i < n_a - r; ++i) slot[2 * kept[i]] = P + i - in_a;
      for (int64_t j = in_b; j < n_b; ++j) slot[2 * j + 1] = P + n_unmerged + j - in_b;
      const float* xb = xp + b * N * C;
      float* mb = mp + b * n_out * C;
      float* msb = msp + b * n_out;
      for (int64_t t = 0; t < N; ++t) {  // every token but the sources starts its slot with size * x
        if (slot[t] < 0) continue;
        const float w = sp ? sp[b * N + t] : 1.0f;
        scale_row(mb + slot[t] * C, xb + t * C, w, C);
        msb[slot[t]] = w;
      }
      for (int64_t i = 0; i < r; ++i) {  // sources, in rank order, add into their destinations
        const int64_t t = 2 * rank[i], dest = slot[2 * dst_p[b * n_a + rank[i]] + 1];
        const float w = sp ? sp[b * N + t] : 1.0f;
        add_scaled(mb + dest * C, xb + t * C, w, C);
        msb[dest] += w;
      }
      // x * 1 / 1 is x: a slot of total size 1 (one token of size 1, most of them in early blocks) is left as
      // copied, which saves the division (what this loop is bound by)
      for (int64_t j = 0; j < n_out; ++j)
        if (msb[j] != 1.0f) divide(mb + j * C, msb[j], C);
    }
  });
  return {merged.to(x.scalar_type()), merged_size};
}

// Zero-TPrune's S-stage at a pruning layer, in one call, for CPU tensors: the patch tokens (B, n - remove), ascending,
// left after dropping the `remove` most redundant ones. From probs (B, H, N, N) float32, rows summing to 1, and the
// keys k (B, H, N, D): one weighted-PageRank round from the start vector (uniform, token `emphasize` weighted
// sqrt(N); -1: none) ranks the patch tokens by their heads' scores, each rescaled to mean 1 and aggregated by
// root-mean-square (`rms`) or mean; the less important half are candidates, each scored by its cosine similarity
// (head-mean keys) to the most similar token of the more important half; the `remove` most similar candidates go.
// The reference is zero_tprune.s_stage_keep in PyTorch (some twenty small ops, 0.3-0.4 ms of a 0.5 ms block at batch
// 1 on the testbed). The two products run in ATen; the rest are loops. Same ties (importance: the lower index
// first; similarity: the less important candidate first); the sums are ordered differently, so a ranking can
// differ where two scores agree to float rounding.
torch::Tensor similarity_prune(torch::Tensor probs, torch::Tensor k, int64_t num_prefix, int64_t remove,
                               int64_t emphasize, bool rms) {
  TORCH_CHECK(probs.dim() == 4 && probs.size(2) == probs.size(3), "tokenprune: probs must be (batch, heads, tokens, "
              "tokens), got ", probs.sizes());
  TORCH_CHECK(probs.scalar_type() == torch::kFloat, "tokenprune: probs must be float32, got ", probs.scalar_type());
  const int64_t B = probs.size(0), H = probs.size(1), N = probs.size(2), P = num_prefix, n = N - P;
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(2) == N, "tokenprune: k must be (", B, ", ",
              H, ", ", N, ", dim), got ", k.sizes());
  check_floating(k, "k");
  TORCH_CHECK(probs.is_cpu() && k.is_cpu(), "tokenprune: similarity_prune takes CPU tensors, got ", probs.device());
  TORCH_CHECK(0 <= P && P <= N, "tokenprune: num_prefix must lie in [0, ", N, "], got ", P);
  TORCH_CHECK(0 <= remove && remove <= n / 2, "tokenprune: remove must lie in [0, ", n / 2, "], got ", remove);
  TORCH_CHECK(-1 <= emphasize && emphasize < N, "tokenprune: emphasize must lie in [-1, ", N, "), got ", emphasize);
  TORCH_CHECK(H > 0, "tokenprune: probs has no head");
  const int64_t D = k.size(3), n_cand = n / 2, n_anchor = n - n_cand;
  auto kept = torch::empty({B, n - remove}, probs.options().dtype(torch::kLong));
  if (kept.numel() == 0) return kept;
  // the I'-stage round, s0 A for every sample and head (the scale of s0 does not matter: each head is rescaled)
  auto start = torch::ones({N}, probs.options());
  if (emphasize >= 0) start.data_ptr<float>()[emphasize] = std::sqrt(static_cast<float>(N));
  const auto votes = at::matmul(start, probs.contiguous()).contiguous();  // (B, H, N)
  auto candidates = torch::empty({B, n_cand}, kept.options());
  auto cand_unit = torch::empty({B, n_cand, D}, probs.options());
  auto anchor_unit = torch::empty({B, n_anchor, D}, probs.options());
  const auto kc = k.contiguous();
  dispatch_floating(kc, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    const float* vp = votes.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> importance(n), metric(D);
      std::vector<int64_t> order(n);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(importance.begin(), importance.end(), 0.0f);
        for (int64_t h = 0; h < H; ++h) {  // each head's scores rescaled to mean 1, then squared (rms) or not
          const float* s = vp + (b * H + h) * N + P;
          float sum = 0.0f;
          for (int64_t j = 0; j < n; ++j) sum += s[j];
          const float mean = sum / static_cast<float>(n);
          for (int64_t j = 0; j < n; ++j) {
            const float scaled = s[j] / mean;
            importance[j] += rms ? scaled * scaled : scaled;
          }
        }  // the mean over heads and the root are monotone: the order is the same without them
        std::iota(order.begin(), order.end(), int64_t{0});
        std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {  // NaN last, as torch.sort
          const float u = importance[i], v = importance[j];
          return std::isnan(u) ? false : std::isnan(v) ? true : u < v;
        });
        std::copy(order.begin(), order.begin() + n_cand, candidates.data_ptr<int64_t>() + b * n_cand);
        for (int64_t i = 0; i < n; ++i) {  // the head-mean key of token order[i], as a unit vector
          std::fill(metric.begin(), metric.end(), 0.0f);
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* row = kp + ((b * H + h) * N + P + order[i]) * D;
            for (int64_t d = 0; d < D; ++d) metric[d] += static_cast<float>(row[d]);
          }
          float norm = 0.0f;
          for (int64_t d = 0; d < D; ++d) norm += metric[d] * metric[d];
          norm = std::sqrt(norm);
          float* out = i < n_cand ? cand_unit.data_ptr<float>() + (b * n_cand + i) * D
                                  : anchor_unit.data_ptr<float>() + (b * n_anchor + i - n_cand) * D;
          for (int64_t d = 0; d < D; ++d) out[d] = metric[d] / norm;
        }
      }
    });
  });
  const auto similarity = at::bmm(cand_unit, anchor_unit.transpose(1, 2)).contiguous();  // (B, n_cand, n_anchor)
  const float* simp = similarity.data_ptr<float>();
  const int64_t* cp = candidates.data_ptr<int64_t>();
  int64_t* kp_out = kept.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> redundancy(n_cand);
    std::vector<int64_t> rank(n_cand);
    std::vector<char> dropped(n);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t c = 0; c < n_cand; ++c) {  // the best anchor's similarity (NaN wins, as amax)
        int64_t anchor;  // unused: only the value counts
        first_max(simp + (b * n_cand + c) * n_anchor, n_anchor, &redundancy[c], &anchor);
      }
      std::iota(rank.begin(), rank.end(), int64_t{0});
      std::nth_element(rank.begin(), rank.begin() + remove, rank.end(), [&](int64_t i, int64_t j) {
        const float u = redundancy[i], v = redundancy[j];  // most similar first, NaN first, ties: lower i
        if (std::isnan(u) != std::isnan(v)) return std::isnan(u);
        if (!std::isnan(u) && u != v) return u > v;
        return i < j;
      });
      std::fill(dropped.begin(), dropped.end(), 0);
      for (int64_t i = 0; i < remove; ++i) dropped[cp[b * n_cand + rank[i]]] = 1;
      int64_t* out = kp_out + b * (n - remove);
      for (int64_t j = 0; j < n; ++j)
        if (!dropped[j]) *out++ = j;
    }
  });
  return kept;
}

namespace {

// log(v^-1 / max over the sequence of v^-1) / tau per token, (B, N): MCTF's informativeness and size terms, op for
// op the reference's (the reciprocal, the max and the division correctly rounded in loops; the log in ATen).
torch::Tensor log_relative_inverse(const torch::Tensor& v, double tau) {
  const int64_t B = v.size(0), N = v.size(1);
  auto out = torch::empty({B, N}, v.options());
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < N; ++t) {
      op[b * N + t] = 1.0f / vp[b * N + t];
      top = (std::isnan(op[b * N + t]) || op[b * N + t] > top) ? op[b * N + t] : top;
    }
    for (int64_t t = 0; t < N; ++t) op[b * N + t] /= top;
  }
  out.log_();
  const float t = static_cast<float>(tau);
  for (int64_t e = 0; e < B * N; ++e) op[e] /= t;
  return out;
}

}  // namespace

// softmax(scale * q k^T + bias) over the keys into out (B, H, N, Nk), for CPU float32 tensors: q (B, H, N, D) and
// k (B, H, Nk, D) as they lie (a qkv projection's views), bias None or one row per sample (B or 1, 1, 1, Nk): the
// log-size bias of proportional attention. The reference is ops.attention_probabilities in PyTorch: the product
// (beta 0), the bias added, the softmax, each over the whole map, which at batch 32 is some tens of MB and leaves the
// cache between them, and where ATen's baddbmm copies a broadcast bias into the map before the product (MCTF's
// merging blocks at DeiT-S batch 32: 2.3-2.8 ms a block; docs/performance.md, session 29). Here each sample is done
// while its map is in cache, with the same ATen calls on it and the bias added in a loop (a float sum is the same
// whoever computes it), so the map is the reference's bit for bit; a task per sample, its ATen calls on one thread.
torch::Tensor attention_probabilities(torch::Tensor q, torch::Tensor k, c10::optional<torch::Tensor> bias,
                                      double scale, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(3) == k.size(3),
              "tokenprune: q and k must be (batch, heads, tokens, head_dim) alike, got ", q.sizes(), " and ",
              k.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Nk = k.size(2);
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && out.is_cpu(), "tokenprune: attention_probabilities takes CPU tensors");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
                  out.scalar_type() == torch::kFloat,
              "tokenprune: attention_probabilities takes float32 q, k and out, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(out.sizes() == torch::IntArrayRef({B, H, N, Nk}) && out.is_contiguous(),
              "tokenprune: out must be a contiguous (", B, ", ", H, ", ", N, ", ", Nk, "), got ", out.sizes());
  torch::Tensor rows;  // the bias, one row of Nk per sample
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.is_cpu() && b.scalar_type() == torch::kFloat && b.dim() == 4 && b.size(1) == 1 &&
                    b.size(2) == 1 && b.size(3) == Nk && (b.size(0) == B || b.size(0) == 1),
                "tokenprune: bias must be float32 (", B, " or 1, 1, 1, ", Nk, "), got ", b.sizes(), " ",
                b.scalar_type());
    rows = b.reshape({b.size(0), Nk}).expand({B, Nk}).contiguous();
  }
  if (out.numel() == 0) return out;
  const auto samples = [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      auto map = out[b];
      at::baddbmm_out(map, map, q[b], k[b].transpose(-2, -1), /*beta=*/0, /*alpha=*/scale);
      if (rows.defined()) {
        const float* bias_row = rows.data_ptr<float>() + b * Nk;
        float* logits = map.data_ptr<float>();
        for (int64_t r = 0; r < H * N; ++r) add_row(logits + r * Nk, bias_row, Nk);
      }
      at::_softmax_out(map, map, -1, /*half_to_float=*/false);
    }
  };
  // A Python dispatch mode (a FLOP counter) or a Python tensor subclass: the ATen calls run Python, which needs the
  // GIL this thread holds, so a task on another thread would wait for it forever: every sample on this thread.
  const bool python = c10::impl::TorchDispatchModeTLS::any_modes_set() ||
                      q.key_set().has(c10::DispatchKey::Python) || k.key_set().has(c10::DispatchKey::Python) ||
                      out.key_set().has(c10::DispatchKey::Python);
  if (python) {
    samples(0, B);
    return out;
  }
  const at::ThreadLocalState caller;  // inference mode, grad mode: the tasks' ATen calls run as the caller's would
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard as_caller(caller);
    samples(begin, end);
  });
  return out;
}

// MCTF's matching at one merging block, in one call, for CPU tensors: each token's slot (B, N) and the number of
// slots, from the block's input x (B, N, C), the attention each token receives (B, N) and the token sizes (B, N).
// The reference is mctf.pair_scores + mctf.bidirectional_assignment in PyTorch (some fifty small ops, about a
// third of a merging block at batch 1 on deit_tiny), and the slots are bit-identical to it: the scores take the
// reference's steps in its order, with its ATen calls where rounding could differ (the norms, the cosine product,
// the logarithms), each row's best is the first of equal maxima (NaN first) as ATen's max, and the two
// rankings are the reference's argsort calls (so that tied scores, a flat background's, order alike).
std::tuple<torch::Tensor, int64_t> mctf_plan(torch::Tensor x, torch::Tensor received, torch::Tensor size,
                                             std::vector<double> tau, std::vector<bool> criteria,
                                             int64_t num_prefix, int64_t remove, bool bidirectional) {
  TORCH_CHECK(x.dim() == 3, "tokenprune: x must be (batch, tokens, channels), got ", x.sizes());
  check_floating(x, "x");
  const int64_t B = x.size(0), N = x.size(1), P = num_prefix;
  TORCH_CHECK(received.dim() == 2 && received.size(0) == B && received.size(1) == N &&
                  received.scalar_type() == torch::kFloat && size.dim() == 2 && size.size(0) == B &&
                  size.size(1) == N && size.scalar_type() == torch::kFloat,
              "tokenprune: received and size must be float32 (", B, ", ", N, "), got ", received.sizes(), " ",
              received.scalar_type(), " and ", size.sizes(), " ", size.scalar_type());
  TORCH_CHECK(x.is_cpu() && received.is_cpu() && size.is_cpu(), "tokenprune: mctf_plan takes CPU tensors");
  TORCH_CHECK(tau.size() == 3 && criteria.size() == 3, "tokenprune: tau and criteria take three entries each");
  TORCH_CHECK(0 <= P && P <= N, "tokenprune: num_prefix must lie in [0, ", N, "], got ", P);
  const int64_t in_a = (P + 1) / 2, in_b = P / 2, n_a = (N + 1) / 2, n_b = N / 2;
  const int64_t r1 = bidirectional ? remove / 2 : remove, r2 = remove - r1;
  TORCH_CHECK(remove >= 0 && r1 < n_a - in_a + (bidirectional ? 0 : 1) && r2 <= n_b - in_b && n_b > in_b,
              "tokenprune: cannot fuse ", remove, " of ", N - P, " patch tokens (", n_a - in_a, " in A, ",
              n_b - in_b, " in B)");
  const bool use_sim = criteria[0], use_info = criteria[1], use_size = criteria[2];
  const auto xf = x.to(torch::kFloat).contiguous();
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  // the pair scores log W (B, |A|, |B|), the reference's steps in its order
  torch::Tensor log_w;
  if (use_sim) {
    const auto unit = divide_rows(xf, at::linalg_vector_norm(xf, 2, {-1}, /*keepdim=*/true));
    // at::matmul's batched product is this bmm on these very views (its wrapper's reshapes cost a few us)
    log_w = at::bmm(unit.slice(1, 0, N, 2), unit.slice(1, 1, N, 2).transpose(-1, -2)).contiguous();
    float* wp = log_w.data_ptr<float>();
    at::parallel_for(0, log_w.numel(), kGrainElementwise, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) wp[e] = std::max((wp[e] + 1.0f) / 2.0f, 1e-12f);  // NaN stays
    });
    log_w.log_();  // divided by tau_sim in the row loop below
  } else {
    log_w = torch::zeros({B, n_a, n_b}, xf.options());
  }
  const auto info = use_info ? log_relative_inverse(received.contiguous(), tau[1]) : torch::Tensor();
  const auto small = use_size ? log_relative_inverse(size.contiguous(), tau[2]) : torch::Tensor();
  const float t_sim = static_cast<float>(tau[0]);
  auto best = torch::empty({B, n_a}, xf.options());
  std::vector<int64_t> best_b(B * n_a);
  std::vector<char> has_nan(B, 0);  // a NaN score (NaN or infinite features) takes the scalar scans below
  {
    float* wp = log_w.data_ptr<float>();
    float* bp = best.data_ptr<float>();
    const float* ip = use_info ? info.data_ptr<float>() : nullptr;
    const float* sp = use_size ? small.data_ptr<float>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> info_b(n_b), size_b(n_b);  // the B tokens' terms, contiguous: the row loop vectorises
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < n_b; ++j) {
          if (ip) info_b[j] = ip[b * N + 2 * j + 1];
          if (sp) size_b[j] = sp[b * N + 2 * j + 1];
        }
        bool nan = false;
        for (int64_t i = 0; i < n_a; ++i) {
          float* row = wp + (b * n_a + i) * n_b;
          // the reference's steps in its order: log_w / tau_sim, then (log_w + a_i) + b_j per criterion
          if (use_sim)
            for (int64_t j = 0; j < n_b; ++j) row[j] /= t_sim;
          if (ip) {
            const float a = ip[b * N + 2 * i];
            for (int64_t j = 0; j < n_b; ++j) row[j] = (row[j] + a) + info_b[j];
          }
          if (sp) {
            const float a = sp[b * N + 2 * i];
            for (int64_t j = 0; j < n_b; ++j) row[j] = (row[j] + a) + size_b[j];
          }
          // pairs that touch a prefix token never merge
          nan |= masked_row_max(row, n_b, i < in_a ? n_b : in_b, bp + b * n_a + i, &best_b[b * n_a + i]);
        }
        has_nan[b] = nan;
      }
    });
  }
  // A tokens, best match first: only which r1 of them come first is read
  const auto order = rank_rows(best, has_nan, r1 - 1, r1 - 1);
  const int64_t n_kept_a = n_a - in_a - r1;
  auto best2 = torch::empty({B, n_b}, xf.options());
  std::vector<int64_t> kept_a(B * (n_a - r1)), best_a(B * n_b);
  {
    const int64_t* op = order.data_ptr<int64_t>();
    const float* wp = log_w.data_ptr<float>();
    float* b2 = best2.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> arg32(n_b);
      for (int64_t b = begin; b < end; ++b) {
        int64_t* kept = kept_a.data() + b * (n_a - r1);
        std::copy(op + b * n_a + r1, op + (b + 1) * n_a, kept);
        std::sort(kept, kept + n_a - r1);  // prefix A tokens (scored -inf) come first
        if (!bidirectional) continue;
        // each B token's best remaining A token, in kept order: row by row, the first of equal maxima, NaN first
        float* top = b2 + b * n_b;
        int64_t* arg = best_a.data() + b * n_b;
        std::fill(top, top + n_b, kMinusInf);
        std::fill(arg, arg + n_b, int64_t{0});
        if (!has_nan[b]) {  // four entries at a time
          std::fill(arg32.begin(), arg32.end(), 0);
          for (int64_t idx = 0; idx < n_a - r1; ++idx)
            running_max_no_nan(wp + (b * n_a + kept[idx]) * n_b, top, arg32.data(), n_b, static_cast<int32_t>(idx));
          std::copy(arg32.begin(), arg32.end(), arg);
          continue;
        }
        for (int64_t idx = 0; idx < n_a - r1; ++idx) {
          const float* row = wp + (b * n_a + kept[idx]) * n_b;
          for (int64_t j = 0; j < n_b; ++j) {
            if (std::isnan(top[j])) continue;
            if (std::isnan(row[j]) || row[j] > top[j]) {
              top[j] = row[j];
              arg[j] = idx;
            }
          }
        }
      }
    });
  }
  torch::Tensor order2;
  // B tokens: which r2 come first, and the order of the rest up to the prefix B tokens (-inf, last)
  if (bidirectional) order2 = rank_rows(best2, has_nan, r2 - 1, n_b - in_b - 1);
  auto dest = torch::empty({B, N}, xf.options().dtype(torch::kLong));
  {
    const int64_t* op = order.data_ptr<int64_t>();
    const int64_t* o2 = bidirectional ? order2.data_ptr<int64_t>() : nullptr;
    int64_t* dp = dest.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> slot_a(n_a), slot_b(n_b);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* kept = kept_a.data() + b * (n_a - r1);
        for (int64_t i = 0; i < in_a; ++i) slot_a[i] = 2 * i;  // prefix tokens keep their positions
        for (int64_t j = 0; j < in_b; ++j) slot_b[j] = 2 * j + 1;
        for (int64_t idx = in_a; idx < n_a - r1; ++idx) slot_a[kept[idx]] = P + idx - in_a;
        if (bidirectional) {  // the remaining B tokens by descending score (prefix B tokens, at -inf, come last)
          for (int64_t idx = r2; idx < n_b - in_b; ++idx) slot_b[o2[b * n_b + idx]] = P + n_kept_a + idx - r2;
          for (int64_t idx = 0; idx < r2; ++idx) {  // a B source lands on its A token's slot
            const int64_t j = o2[b * n_b + idx];
            slot_b[j] = P - in_a + best_a[b * n_b + j];
          }
        } else {
          for (int64_t j = in_b; j < n_b; ++j) slot_b[j] = P + n_kept_a + j - in_b;
        }
        for (int64_t idx = 0; idx < r1; ++idx) {  // A sources follow their B token
          const int64_t i = op[b * n_a + idx];
          slot_a[i] = slot_b[best_b[b * n_a + i]];
        }
        for (int64_t i = 0; i < n_a; ++i) dp[b * N + 2 * i] = slot_a[i];
        for (int64_t j = 0; j < n_b; ++j) dp[b * N + 2 * j + 1] = slot_b[j];
      }
    });
  }
  return {dest, n_a + n_b - remove};
}

}  // namespace tokenprune

#ifndef TOKENPRUNE_WITH_CUDA
// The CPU kernels of the ops a graph compiled for CPU calls (extension.COMPILED, where their schemas and fake
// functions are defined), registered with the dispatcher here rather than with torch.library in Python: the
// graph's wrapper then reaches the C++ kernel without a Python function in between, about 4.5 us a call less
// (a third of a merge at batch 1 on the testbed, called through torch.ops). The CPU build only: a process may
// load both builds.
TORCH_LIBRARY_IMPL(tokenprune, CPU, m) {
  m.impl("weighted_merge", &tokenprune::weighted_merge);
  m.impl("bipartite_merge", &tokenprune::bipartite_merge);
  m.impl("similarity_prune", &tokenprune::similarity_prune);
  m.impl("mctf_plan", [](const torch::Tensor& x, const torch::Tensor& received, const torch::Tensor& size,
                         c10::ArrayRef<double> tau, std::array<bool, 3> criteria, int64_t num_prefix,
                         int64_t remove, bool bidirectional) {
    const std::vector<bool> chosen(criteria.begin(), criteria.end());
    return std::get<0>(tokenprune::mctf_plan(x, received, size, tau.vec(), chosen, num_prefix, remove, bidirectional));
  });
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tokenprune's token gather, weighted merge and received-attention kernels";
#ifdef TOKENPRUNE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("gather_kept", &tokenprune::gather_kept, "prefix + kept patch tokens", py::arg("x"), py::arg("keep"),
        py::arg("num_prefix"));
  m.def("weighted_merge", &tokenprune::weighted_merge, "weighted mean per destination slot, fp32 sums",
        py::arg("x"), py::arg("weight"), py::arg("dest"), py::arg("n_out"));
  m.def("received_attention", &tokenprune::received_attention, "attention each key receives", py::arg("q"),
        py::arg("k"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("top_k_ascending", &tokenprune::top_k_ascending, "each row's top-k indices, ascending (CPU)",
        py::arg("scores"), py::arg("k"), py::arg("largest"));
  m.def("bipartite_merge", &tokenprune::bipartite_merge, "ToMe's matching and size-weighted merge (CPU)",
        py::arg("k"), py::arg("x"), py::arg("size"), py::arg("r"), py::arg("num_prefix"));
  m.def("head_mean", &tokenprune::head_mean, "ToMe's metric, bipartite_merge's head mean: ATen's mean bit for bit (CPU)",
        py::arg("k"));
  m.def("attention_probabilities", &tokenprune::attention_probabilities,
        "softmax(scale * q k^T + bias) into out, sample by sample (CPU, float32)", py::arg("q"), py::arg("k"),
        py::arg("bias"), py::arg("scale"), py::arg("out"));
  m.def("mctf_plan", &tokenprune::mctf_plan, "MCTF's pair scores and bidirectional matching: slots (CPU)",
        py::arg("x"), py::arg("received"), py::arg("size"), py::arg("tau"), py::arg("criteria"),
        py::arg("num_prefix"), py::arg("remove"), py::arg("bidirectional"));
  m.def("similarity_prune", &tokenprune::similarity_prune, "Zero-TPrune's I'- and S-stage: the kept patch tokens (CPU)",
        py::arg("probs"), py::arg("k"), py::arg("num_prefix"), py::arg("remove"), py::arg("emphasize"),
        py::arg("rms"));
}
