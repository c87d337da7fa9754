// Conv1d/2d/3d norms and clipped sums: the Linear formulas on the unfolded input.
//
// Per group j and sample i a convolution is a Linear layer on A_ij = unfold(x_i) restricted to group j's
// input channels (T output positions x d = C_in/groups * prod(k)) with output gradient G_ij (T x p,
// p = C_out/groups), so
//
//     weight norm:  sum_j ||G_ij^T A_ij||_F^2   (linear_norms.cpp's ghost or inst per (i, j))
//     bias norm:    ||sum_t g_it||^2            (bias.cpp on g viewed as (B, T, C_out))
//     clipped sum:  the weight gradient of the conv with g's samples scaled by c_i (one
//                   convolution_backward in the accumulation dtype), then the epilogue functor.
//
// The unfold is materialised per chunk of samples (bounded as in the reference); an implicit-GEMM
// kernel that never writes it is future work.
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution_backward.h>

#include "dpk.h"

namespace dpk {

namespace {

std::vector<int64_t> ntuple(at::IntArrayRef v, int64_t n, const char* name) {
  if (v.size() == 1) return std::vector<int64_t>(n, v[0]);
  TORCH_CHECK_VALUE(static_cast<int64_t>(v.size()) == n, "conv: ", name, " must be an int or ", n, " ints for a ", n,
                    "-d convolution, got ", v);
  return v.vec();
}

// (B, C, *S) -> (B, T, C * prod(k)), columns ordered (c, k_1, ..., k_n) as a flattened conv weight.
Tensor unfold(Tensor x, const std::vector<int64_t>& k, const std::vector<int64_t>& s, const std::vector<int64_t>& pad,
              const std::vector<int64_t>& dil) {
  const int64_t n = x.dim() - 2;
  bool any_pad = false;
  std::vector<int64_t> pads;
  for (int64_t i = n - 1; i >= 0; --i) {
    pads.push_back(pad[i]);
    pads.push_back(pad[i]);
    any_pad = any_pad || pad[i] != 0;
  }
  if (any_pad) x = at::constant_pad_nd(x, pads, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t span = dil[i] * (k[i] - 1) + 1;
    TORCH_CHECK_VALUE(x.size(2 + i) >= span, "conv: spatial dim ", i, " has size ", x.size(2 + i),
                      " after padding, smaller than the dilated kernel (", span,
                      "); pad the input or use a smaller kernel/dilation");
    x = x.unfold(2 + i, span, s[i]);
    if (dil[i] > 1) x = x.slice(-1, 0, c10::nullopt, dil[i]);
  }
  std::vector<int64_t> order{0};
  for (int64_t i = 0; i < n; ++i) order.push_back(2 + i);
  order.push_back(1);
  for (int64_t i = 0; i < n; ++i) order.push_back(2 + n + i);
  const int64_t B = x.size(0), C = x.size(1);
  int64_t T = 1, K = 1;
  for (int64_t i = 0; i < n; ++i) {
    T *= x.size(2 + i);
    K *= k[i];
  }
  return x.permute(order).reshape({B, T, C * K});
}

}  // namespace

std::tuple<Tensor, Tensor> conv_norms(const Tensor& x, const Tensor& g, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, bool bias, c10::string_view method) {
  const char* op = "conv_norms";
  TORCH_CHECK_VALUE(method == "ghost" || method == "inst", op, ": method must be 'ghost' or 'inst', got '",
                    std::string(method), "'");
  TORCH_CHECK_VALUE(x.dim() >= 3 && x.dim() <= 5 && g.dim() == x.dim(), op,
                    ": x must be (B, C_in, *S) and g (B, C_out, *out) with 1 to 3 spatial dims, got ", x.sizes(),
                    " and ", g.sizes());
  check_float(op, "x", x);
  check_float(op, "g", g);
  check_same_device(op, "x", x, "g", g);
  const int64_t n = x.dim() - 2, B = x.size(0), C_in = x.size(1), C_out = g.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && C_in % groups == 0 && C_out % groups == 0, "conv: groups=", groups,
                    " must divide C_in=", C_in, " and C_out=", C_out);
  const auto k = ntuple(kernel_size, n, "kernel_size"), s = ntuple(stride, n, "stride"),
             pad = ntuple(padding, n, "padding"), dil = ntuple(dilation, n, "dilation");
  const auto acc = acc_type({x.scalar_type(), g.scalar_type()});
  int64_t T = 1, K = 1;
  for (int64_t i = 0; i < n; ++i) {
    T *= g.size(2 + i);
    K *= k[i];
  }
  Tensor w = at::empty({B}, x.options().dtype(acc));
  const int64_t step = std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(1, T * C_in * K));
  for (int64_t lo = 0; lo < B; lo += step) {
    const int64_t hi = std::min(B, lo + step), b = hi - lo;
    Tensor a = unfold(x.slice(0, lo, hi), k, s, pad, dil);
    TORCH_CHECK_VALUE(a.size(1) == T, "conv: output gradient of shape ", g.sizes(), " does not match the ",
                      a.size(1), " output positions of an input ", x.sizes(), " with kernel_size=", kernel_size,
                      ", stride=", stride, ", padding=", padding, ", dilation=", dilation);
    a = a.reshape({b, T, groups, -1}).transpose(1, 2).reshape({b * groups, T, -1});
    const Tensor gr = g.slice(0, lo, hi)
                          .reshape({b, groups, C_out / groups, T})
                          .transpose(2, 3)
                          .reshape({b * groups, T, C_out / groups});
    w.slice(0, lo, hi).copy_(linear_weight_norms(a, gr, method).view({b, groups}).sum(1));
  }
  Tensor bn = bias ? bias_norms(g.reshape({B, C_out, T}).transpose(1, 2)) : absent(x, acc);
  return {w, bn};
}

std::tuple<Tensor, Tensor> conv_clipped_sum(const Tensor& x, const Tensor& g, const Tensor& c,
                                            at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                            bool bias, double noise_std, double scale, int64_t seed_w,
                                            int64_t seed_b, const OptTensor& prev_w, const OptTensor& prev_b) {
  const char* op = "conv_clipped_sum";
  TORCH_CHECK_VALUE(x.dim() >= 3 && x.dim() <= 5 && g.dim() == x.dim(), op,
                    ": x must be (B, C_in, *S) and g (B, C_out, *out) with 1 to 3 spatial dims, got ", x.sizes(),
                    " and ", g.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(weight_shape.size()) == x.dim() && weight_shape[0] == g.size(1), op,
                    ": weight_shape must be (C_out, C_in/groups, *k) with C_out = ", g.size(1), ", got ",
                    weight_shape);
  check_float(op, "x", x);
  check_float(op, "g", g);
  check_same_device(op, "x", x, "g", g);
  const int64_t n = x.dim() - 2, B = x.size(0), C_out = g.size(1);
  const auto acc = acc_type({x.scalar_type(), g.scalar_type()});
  const Tensor cc = clip_factors(op, c, g, acc);
  const auto pw = prev_acc(op, "prev_w", prev_w, weight_shape, g.device(), acc);
  prev_acc(op, "prev_b", prev_b, {C_out}, g.device(), acc);  // checked here to name prev_b in the error
  std::vector<int64_t> cshape(x.dim(), 1);
  cshape[0] = B;
  const Tensor gs = g.to(acc).mul(cc.view(cshape));
  const Tensor weight = at::empty(weight_shape, x.options().dtype(acc));  // only its shape is read
  auto grads = at::convolution_backward(gs, x.to(acc), weight, c10::nullopt, ntuple(stride, n, "stride"),
                                        ntuple(padding, n, "padding"), ntuple(dilation, n, "dilation"), false,
                                        std::vector<int64_t>(n, 0), groups, {false, true, false});
  Tensor w = std::get<1>(grads).contiguous();
  finish(w, w, pw, noise_std, scale, seed_w);
  int64_t T = 1;
  for (int64_t i = 0; i < n; ++i) T *= g.size(2 + i);
  Tensor b = bias ? bias_clipped_sum(g.reshape({B, C_out, T}).transpose(1, 2), c, noise_std, scale, seed_b, prev_b)
                  : absent(x, acc);
  return {w, b};
}

void conv_impls(torch::Library& m) {
  m.impl("cuda_conv_norms", &conv_norms);
  m.impl("cuda_conv_clipped_sum", &conv_clipped_sum);
}

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def(
      "cuda_conv_norms(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool bias, str method) -> (Tensor, Tensor)");
  m.def(
      "cuda_conv_clipped_sum(Tensor x, Tensor g, Tensor c, int[] weight_shape, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool bias, float noise_std, float scale, int seed_w, int seed_b, Tensor? prev_w, "
      "Tensor? prev_b) -> (Tensor, Tensor)");
}
DPK_REGISTER(dpk::conv_impls)
