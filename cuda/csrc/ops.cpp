// tokenprune's extension: tensor checks, the CPU build's loops over the per-element functions of kernels.h,
// and (compiled with -DTOKENPRUNE_WITH_CUDA) the hand-off of CUDA tensors to the launchers of kernels.cu.
// The PyTorch functions in tokenprune/ops.py are the reference each op here is tested against.
#include <torch/extension.h>

#include "convert_host.h"
#include "launch.h"

#ifdef TOKENPRUNE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tokenprune {
namespace {

constexpr int64_t kGrain = 2048;  // elements per parallel task on the CPU

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
void check_range_on_cpu(const torch::Tensor& index, int64_t bound, const char* name) {
  if (!index.is_cpu() || index.numel() == 0) return;
  const auto lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < bound, "tokenprune: ", name, " must lie in [0, ", bound, "), got [", lo, ", ", hi,
              "]");
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
  AT_DISPATCH_ALL_TYPES_AND3(torch::kHalf, torch::kBFloat16, torch::kBool, x.scalar_type(), "gather_kept", [&] {
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* kp = keep.data_ptr<int64_t>();
    auto* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) gather_element(xp, kp, op, e, N, K, C, P);
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
  // Each slot's members in ascending token order: a stable sort of the destinations, and where each
  // slot's run starts. Built with ATen ops on x's device (no host sync).
  const auto members = std::get<1>(dest.sort(std::optional<bool>(true), /*dim=*/1, /*descending=*/false)).contiguous();
  auto offsets = torch::zeros({B, S + 1}, dest.options());
  offsets.narrow(1, 1, S).scatter_add_(1, dest, torch::ones_like(dest));
  offsets = offsets.cumsum(1).contiguous();
  auto out = torch::empty({B, S, C}, x.options());
  auto wsum = torch::zeros({B, S}, w.options());
  if (B * S == 0) return {out, wsum};
  if (C == 0) return {out, wsum.scatter_add_(1, dest, w)};  // no channel element to carry the sums
#ifdef TOKENPRUNE_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(launch_merge(x.data_ptr(), w.data_ptr<float>(), members.data_ptr<int64_t>(),
                              offsets.data_ptr<int64_t>(), out.data_ptr(), wsum.data_ptr<float>(), B, N, S, C,
                              scalar_of(x), stream_of(x)));
    return {out, wsum};
  }
#endif
  dispatch_floating(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* wp = w.data_ptr<float>();
    const auto* mp = members.data_ptr<int64_t>();
    const auto* offp = offsets.data_ptr<int64_t>();
    auto* op = out.data_ptr<scalar_t>();
    auto* sp = wsum.data_ptr<float>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) merge_element(xp, wp, mp, offp, op, sp, e, N, S, C);
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
  if (out.numel() == 0 || a.Nq == 0) return out;
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

}  // namespace tokenprune

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
}
