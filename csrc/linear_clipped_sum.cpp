// Clipped, summed, noised Linear gradients.
//
//     W = scale * (prev_w + sum_i c_i G_i^T A_i + noise_std * z_w) = scale * (prev_w + G'^T A + noise_std * z_w)
//     b = scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)                          (bias.cpp)
//
// with G'[(i, t), :] = c_i g_it: the clip factors folded into G's rows (one scaled copy in the
// accumulation dtype), one matmul over the B*T reduction (ATen: MKL / cuBLAS), then the epilogue
// functor in place over W, written once.
#include <ATen/ops/mm.h>

#include "dpk.h"

namespace dpk {

std::tuple<Tensor, Tensor> linear_clipped_sum(const Tensor& a, const Tensor& g, const Tensor& c, bool bias,
                                              double noise_std, double scale, int64_t seed_w, int64_t seed_b,
                                              const OptTensor& prev_w, const OptTensor& prev_b) {
  const char* op = "linear_clipped_sum";
  check_rows(op, &a, g);
  const auto acc = acc_type({a.scalar_type(), g.scalar_type()});
  const int64_t p = g.size(2), d = a.size(2);
  const Tensor cc = clip_factors(op, c, g, acc);
  const auto pw = prev_acc(op, "prev_w", prev_w, {p, d}, g.device(), acc);
  prev_acc(op, "prev_b", prev_b, {p}, g.device(), acc);  // checked here to name prev_b in the error
  const Tensor gs = g.to(acc).mul(cc.view({-1, 1, 1}));
  Tensor w = at::mm(gs.reshape({-1, p}).t(), a.to(acc).reshape({-1, d})).contiguous();
  finish(w, w, pw, noise_std, scale, seed_w);
  Tensor b = bias ? bias_clipped_sum(g, c, noise_std, scale, seed_b, prev_b) : absent(g, acc);
  return {w, b};
}

void linear_clipped_sum_impls(torch::Library& m) { m.impl("cuda_linear_clipped_sum", &linear_clipped_sum); }

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def(
      "cuda_linear_clipped_sum(Tensor a, Tensor g, Tensor c, bool bias, float noise_std, float scale, int seed_w, "
      "int seed_b, Tensor? prev_w, Tensor? prev_b) -> (Tensor, Tensor)");
}
DPK_REGISTER(dpk::linear_clipped_sum_impls)
