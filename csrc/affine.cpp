// The affine parameters of LayerNorm, RMSNorm and GroupNorm, y = xhat * w + b, rows (B, T, C):
//
//     affine_norms:        ||sum_t xhat_it g_it||^2 (weight), ||sum_t g_it||^2 (bias)
//     affine_clipped_sum:  scale * (prev + sum_i c_i sum_t xhat_it g_it + noise_std * z)   (C,), and the bias
//
// bias.cpp's two passes: per-sample column sums (ColSum with xhat as multiplier for the weight), then
// their squared norms or their clip-weighted sum with the epilogue.
#include "dpk.h"

namespace dpk {

std::tuple<Tensor, Tensor> affine_norms(const Tensor& xhat, const Tensor& g, bool weight, bool bias) {
  const char* op = "affine_norms";
  check_rows(op, &xhat, g, "xhat");
  TORCH_CHECK_VALUE(xhat.sizes() == g.sizes(), op, ": xhat and g must have one shape (B, T, C), got ", xhat.sizes(),
                    " and ", g.sizes());
  const auto acc = acc_type({xhat.scalar_type(), g.scalar_type()});
  Tensor w = weight ? row_sum(colsums(xhat, g, acc), true) : absent(g, acc);
  Tensor b = bias ? row_sum(colsums(std::nullopt, g, acc), true) : absent(g, acc);
  return {w, b};
}

std::tuple<Tensor, Tensor> affine_clipped_sum(const Tensor& xhat, const Tensor& g, const Tensor& c, bool weight,
                                              bool bias, double noise_std, double scale, int64_t seed_w,
                                              int64_t seed_b, const OptTensor& prev_w, const OptTensor& prev_b) {
  const char* op = "affine_clipped_sum";
  check_rows(op, &xhat, g, "xhat");
  TORCH_CHECK_VALUE(xhat.sizes() == g.sizes(), op, ": xhat and g must have one shape (B, T, C), got ", xhat.sizes(),
                    " and ", g.sizes());
  const auto acc = acc_type({xhat.scalar_type(), g.scalar_type()});
  const Tensor cc = clip_factors(op, c, g, acc);
  const auto pw = prev_acc(op, "prev_w", prev_w, {g.size(2)}, g.device(), acc);
  const auto pb = prev_acc(op, "prev_b", prev_b, {g.size(2)}, g.device(), acc);
  Tensor w = weight ? weighted_sum(colsums(xhat, g, acc), cc, pw, noise_std, scale, seed_w) : absent(g, acc);
  Tensor b = bias ? weighted_sum(colsums(std::nullopt, g, acc), cc, pb, noise_std, scale, seed_b) : absent(g, acc);
  return {w, b};
}

void affine_impls(torch::Library& m) {
  m.impl("cuda_affine_norms", &affine_norms);
  m.impl("cuda_affine_clipped_sum", &affine_clipped_sum);
}

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def("cuda_affine_norms(Tensor xhat, Tensor g, bool weight, bool bias) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_clipped_sum(Tensor xhat, Tensor g, Tensor c, bool weight, bool bias, float noise_std, float scale, "
      "int seed_w, int seed_b, Tensor? prev_w, Tensor? prev_b) -> (Tensor, Tensor)");
}
DPK_REGISTER(dpk::affine_impls)
