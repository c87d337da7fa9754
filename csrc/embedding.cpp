// Embedding ops: per-sample norms exact for repeated tokens, the clipped scatter with dense noise over
// the whole table, and the tied-head cross term.
//
//     embedding_norms:        ||dW_i||^2 = sum_v || sum_{t: x_it = v} g_it ||^2
//     embedding_clipped_sum:  scale * (prev + sum_i c_i dW_i + noise_std * z)     (V, D), z dense
//     embedding_linear_cross: <dE_i, dH_i> = sum_{t,s} g_h[i, s, x_t] (a_s . g_e,t)
//
// Tokens equal to padding_idx are excluded (skipped, not multiplied by 0: a non-finite gradient at a
// padding position stays out). Repeated ids are grouped by sorting them (ATen's stable sort), so every
// sum runs over a run of equal ids in a fixed order: no atomics, deterministic. The noise covers every
// row of the table, the padding row included (see the reference's docstring for why).
#include <ATen/ops/sort.h>

#include "dpk.h"

namespace dpk {

namespace {

int64_t pad_of(const std::optional<int64_t>& padding_idx, int64_t V) {
  if (!padding_idx) return -1;
  return *padding_idx < 0 ? *padding_idx + V : *padding_idx;  // torch's convention: negative counts from the end
}

void check_ids(const char* op, const Tensor& ids, const Tensor& g) {
  TORCH_CHECK_VALUE(ids.dim() == 2, op, ": ids must be (B, T), got shape ", ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                   ": ids must be int64 or int32, got ", ids.scalar_type());
  check_float(op, "g", g);
  TORCH_CHECK_VALUE(g.numel() == ids.numel() * (g.dim() ? g.size(-1) : 0) && g.dim() >= 2, op,
                    ": g must hold one row per id, (B, T, D) for ids of shape ", ids.sizes(), ", got ", g.sizes());
  check_same_device(op, "ids", ids, "g", g);
}

// Every id in [0, V): an id outside would write outside the table (one host sync).
void check_range(const char* op, const Tensor& ids, int64_t V) {
  if (ids.numel() == 0) return;
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < V, op, ": ids must lie in [0, num_embeddings = ", V, "), got ids in [", lo,
                    ", ", hi, "]");
}

}  // namespace

Tensor embedding_norms(const Tensor& ids, const Tensor& g, int64_t num_embeddings,
                       std::optional<int64_t> padding_idx) {
  const char* op = "embedding_norms";
  check_ids(op, ids, g);
  const auto acc = acc_type({g.scalar_type()});
  const int64_t B = ids.size(0), T = ids.size(1), D = g.size(-1);
  if (B * T == 0 || D == 0) return at::zeros({B}, g.options().dtype(acc));
  const auto sorted = at::sort(ids.to(at::kLong), /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const Tensor sid = std::get<0>(sorted).contiguous(), perm = std::get<1>(sorted).contiguous();
  const Tensor gc = g.reshape({B, T, D}).contiguous();
  Tensor part = at::empty({B, D}, g.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dpk_embedding_norms", [&] {
    using acc_t = acc_of<scalar_t>;
    EmbNormPart<scalar_t, acc_t> f{sid.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), gc.data_ptr<scalar_t>(),
                                   part.data_ptr<acc_t>(), T, D, pad_of(padding_idx, num_embeddings)};
    for_each(g, B * D, f, grain_for(T));
  });
  return row_sum(part, false);
}

Tensor embedding_clipped_sum(const Tensor& ids, const Tensor& g, const Tensor& c, int64_t num_embeddings,
                             std::optional<int64_t> padding_idx, double noise_std, double scale, int64_t seed,
                             const OptTensor& prev) {
  const char* op = "embedding_clipped_sum";
  check_ids(op, ids, g);
  TORCH_CHECK_VALUE(num_embeddings >= 0, op, ": num_embeddings must be >= 0, got ", num_embeddings);
  check_range(op, ids, num_embeddings);
  const auto acc = acc_type({g.scalar_type()});
  const int64_t B = ids.size(0), T = ids.size(1), D = g.size(-1), N = B * T;
  const Tensor cc = clip_factors(op, c, ids, acc);
  const auto pv = prev_acc(op, "prev", prev, {num_embeddings, D}, g.device(), acc);
  Tensor total = at::zeros({num_embeddings, D}, g.options().dtype(acc));
  if (N > 0 && D > 0) {
    const auto sorted = at::sort(ids.reshape({N}).to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const Tensor sid = std::get<0>(sorted).contiguous(), perm = std::get<1>(sorted).contiguous();
    const Tensor gc = g.reshape({N, D}).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dpk_embedding_clipped_sum", [&] {
      using acc_t = acc_of<scalar_t>;
      EmbScatter<scalar_t, acc_t> f{sid.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), gc.data_ptr<scalar_t>(),
                                    cc.data_ptr<acc_t>(),    total.data_ptr<acc_t>(), N,
                                    T,                       D,                       pad_of(padding_idx, num_embeddings)};
      for_each(g, N * D, f, grain_for(16));
    });
  }
  finish(total, total, pv, noise_std, scale, seed);
  return total;
}

Tensor embedding_linear_cross(const Tensor& ids, const Tensor& g_e, const Tensor& a, const Tensor& g_h,
                              std::optional<int64_t> padding_idx) {
  const char* op = "embedding_linear_cross";
  check_ids(op, ids, g_e);
  check_float(op, "a", a);
  check_float(op, "g_h", g_h);
  const int64_t B = ids.size(0), Te = ids.size(1), D = g_e.size(-1);
  TORCH_CHECK_VALUE(a.dim() == 3 && a.size(0) == B && a.size(2) == D, op, ": a must be (B, Th, D) = (", B,
                    ", Th, ", D, "), got ", a.sizes());
  TORCH_CHECK_VALUE(g_h.dim() == 3 && g_h.size(0) == B && g_h.size(1) == a.size(1), op,
                    ": g_h must be (B, Th, V) with the (B, Th) of a, got ", g_h.sizes());
  check_same_device(op, "a", a, "g_e", g_e);
  check_same_device(op, "g_h", g_h, "g_e", g_e);
  const int64_t Th = a.size(1), V = g_h.size(2);
  check_range(op, ids, V);
  const auto acc = acc_type({g_e.scalar_type(), a.scalar_type(), g_h.scalar_type()});
  if (B * Te == 0 || Th == 0) return at::zeros({B}, g_e.options().dtype(acc));
  const auto in = c10::promoteTypes(c10::promoteTypes(g_e.scalar_type(), a.scalar_type()), g_h.scalar_type());
  const Tensor idc = ids.to(at::kLong).contiguous();
  const Tensor ge = g_e.reshape({B, Te, D}).to(in).contiguous(), ac = a.to(in).contiguous(),
               gh = g_h.to(in).contiguous();
  Tensor q = at::empty({B, Te}, g_e.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in, "dpk_embedding_linear_cross", [&] {
    using acc_t = acc_of<scalar_t>;
    EmbCross<scalar_t, acc_t> f{idc.data_ptr<int64_t>(), ge.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(),
                                gh.data_ptr<scalar_t>(), q.data_ptr<acc_t>(),     Te,
                                Th,                      D,                       V,
                                pad_of(padding_idx, V)};
    for_each(g_e, B * Te, f, grain_for(Th * D));
  });
  return row_sum(q, false);
}

void embedding_impls(torch::Library& m) {
  m.impl("cuda_embedding_norms", &embedding_norms);
  m.impl("cuda_embedding_clipped_sum", &embedding_clipped_sum);
  m.impl("cuda_embedding_linear_cross", &embedding_linear_cross);
}

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def("cuda_embedding_norms(Tensor ids, Tensor g, int num_embeddings, int? padding_idx) -> Tensor");
  m.def(
      "cuda_embedding_clipped_sum(Tensor ids, Tensor g, Tensor c, int num_embeddings, int? padding_idx, "
      "float noise_std, float scale, int seed, Tensor? prev) -> Tensor");
  m.def("cuda_embedding_linear_cross(Tensor ids, Tensor g_e, Tensor a, Tensor g_h, int? padding_idx) -> Tensor");
}
DPK_REGISTER(dpk::embedding_impls)
