// Per-sample squared norms of a Linear layer's weight and bias gradients.
//
//     weight: ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>        (method "ghost")
//                               = sum_{p,d} (sum_t g_tp a_td)^2   (method "inst")
//     bias:   ||sum_t g_t||^2                                      (bias.cpp)
//
// The Gram matrices and G_i^T A_i are batched matmuls in the accumulation dtype (ATen: MKL on the
// CPU, cuBLAS on CUDA, which beat a hand-written FMA loop on both; no TF32 unless torch's matmul
// precision allows it, as for the reference), over chunks of samples that bound the temporaries as the
// reference does. Then a plain sum of the elementwise products (squares) per sample.
#include <ATen/ops/bmm.h>

#include "dpk.h"

namespace dpk {

Tensor linear_weight_norms(const Tensor& a, const Tensor& g, c10::string_view method) {
  const bool ghost = method == "ghost";
  const auto acc = acc_type({a.scalar_type(), g.scalar_type()});
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  Tensor w = at::empty({B}, a.options().dtype(acc));
  const int64_t per = std::max<int64_t>(1, ghost ? T * T : p * d);
  const int64_t step = std::max<int64_t>(1, CHUNK_ELEMS / per);
  for (int64_t lo = 0; lo < B; lo += step) {
    const int64_t hi = std::min(B, lo + step);
    const Tensor ac = a.slice(0, lo, hi).to(acc), gc = g.slice(0, lo, hi).to(acc);
    if (ghost) {
      const Tensor ga = at::bmm(ac, ac.transpose(1, 2)), gg = at::bmm(gc, gc.transpose(1, 2));
      w.slice(0, lo, hi).copy_(ga.mul_(gg).sum({1, 2}));
    } else {
      w.slice(0, lo, hi).copy_(at::bmm(gc.transpose(1, 2), ac).square_().sum({1, 2}));
    }
  }
  return w;
}

std::tuple<Tensor, Tensor> linear_norms(const Tensor& a, const Tensor& g, bool bias, c10::string_view method) {
  const char* op = "linear_norms";
  TORCH_CHECK_VALUE(method == "ghost" || method == "inst", op, ": method must be 'ghost' or 'inst', got '",
                    std::string(method), "'");
  check_rows(op, &a, g);
  const auto acc = acc_type({a.scalar_type(), g.scalar_type()});
  Tensor w = linear_weight_norms(a, g, method);
  return {w, bias ? bias_norms(g) : absent(g, acc)};
}

void linear_norms_impls(torch::Library& m) { m.impl("cuda_linear_norms", &linear_norms); }

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def("cuda_linear_norms(Tensor a, Tensor g, bool bias, str method) -> (Tensor, Tensor)");
}
DPK_REGISTER(dpk::linear_norms_impls)
