// Bias ops, and the per-sample column sums they share with the affine, Linear and Conv ops.
//
//     bias_norms:        n_i = sum_p (sum_t g_itp)^2
//     bias_clipped_sum:  scale * (prev + sum_i c_i sum_t g_it + noise_std * z)
//
// Two passes (kernels.h): s[i, p] = sum_t g_itp (ColSum, one thread per (i, p)), then n_i = sum_p s_ip^2
// (RowSum, one per sample) or out_p = sum_i c_i s_ip with the epilogue (WeightedSum, one per p).
// Plain sequential sums in fp32 (fp64 for fp64 inputs) in a fixed order: deterministic.
#include "dpk.h"

namespace dpk {

Tensor colsums(const OptTensor& x, const Tensor& g, at::ScalarType acc) {
  const int64_t B = g.size(0), T = g.size(1), C = g.size(2);
  const auto in = x ? c10::promoteTypes(x->scalar_type(), g.scalar_type()) : g.scalar_type();
  const Tensor gi = g.to(in);
  const Tensor xi = x ? x->to(in) : Tensor();
  Tensor out = at::empty({B, C}, g.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in, "dpk_colsums", [&] {
    using acc_t = acc_of<scalar_t>;
    TORCH_INTERNAL_ASSERT(out.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    ColSum<scalar_t, acc_t> f{x ? xi.data_ptr<scalar_t>() : nullptr,
                              gi.data_ptr<scalar_t>(),
                              out.data_ptr<acc_t>(),
                              T,
                              C,
                              x ? xi.stride(0) : 0,
                              x ? xi.stride(1) : 0,
                              x ? xi.stride(2) : 0,
                              gi.stride(0),
                              gi.stride(1),
                              gi.stride(2)};
    for_each(g, B * C, f, grain_for(T));
  });
  return out;
}

Tensor row_sum(const Tensor& s, bool square) {
  const int64_t B = s.size(0), C = s.size(1);
  Tensor out = at::empty({B}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "dpk_row_sum", [&] {
    RowSum<scalar_t> f{s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), C, square};
    for_each(s, B, f, grain_for(C));
  });
  return out;
}

Tensor weighted_sum(const Tensor& s, const Tensor& c, const OptTensor& prev, double noise_std, double scale,
                    int64_t seed) {
  const int64_t B = s.size(0), C = s.size(1);
  Tensor out = at::empty({C}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "dpk_weighted_sum", [&] {
    WeightedSum<scalar_t> f{s.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, C,
                            noise_of<scalar_t>(prev, noise_std, scale, seed)};
    for_each(s, C, f, grain_for(B));
  });
  return out;
}

Tensor bias_norms(const Tensor& g) {
  check_rows("bias_norms", nullptr, g);
  return row_sum(colsums(std::nullopt, g, acc_type({g.scalar_type()})), true);
}

Tensor bias_clipped_sum(const Tensor& g, const Tensor& c, double noise_std, double scale, int64_t seed,
                        const OptTensor& prev) {
  const char* op = "bias_clipped_sum";
  check_rows(op, nullptr, g);
  const auto acc = acc_type({g.scalar_type()});
  const Tensor cc = clip_factors(op, c, g, acc);
  const auto pv = prev_acc(op, "prev", prev, {g.size(2)}, g.device(), acc);
  return weighted_sum(colsums(std::nullopt, g, acc), cc, pv, noise_std, scale, seed);
}

void bias_impls(torch::Library& m) {
  m.impl("cuda_bias_norms", &bias_norms);
  m.impl("cuda_bias_clipped_sum", &bias_clipped_sum);
}

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def("cuda_bias_norms(Tensor g) -> Tensor");
  m.def("cuda_bias_clipped_sum(Tensor g, Tensor c, float noise_std, float scale, int seed, Tensor? prev) -> Tensor");
}
DPK_REGISTER(dpk::bias_impls)
