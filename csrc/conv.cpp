// Conv1d/2d/3d norms and clipped sums: the Linear formulas on the unfolded input.
//
// Per group j and sample i a convolution is a Linear layer on A_ij = unfold(x_i) restricted to group j's
// input channels (T output positions x d = C_in/groups * prod(k)) with output gradient G_ij (T x p,
// p = C_out/groups), so
//
//     weight norm:  sum_j ||G_ij^T A_ij||_F^2   (linear_norms.cpp's ghost or inst per (i, j))
//     bias norm:    ||sum_t g_it||^2            (bias.cpp on g viewed as (B, T, C_out))
//     clipped sum:  W_j = sum_{i, t} c_i g_ijt^T A_ijt per group, then the epilogue.
//
// Neither unfolds on CUDA. Each op has two paths (its `path` argument: 0 automatic, 1 tiles, 2 aten):
//  - tiles (CUDA's): the implicit GEMM of kernels.h over ConvOperands, which gathers each tile of the
//    unfold from x as it loads it (o * stride - padding + k * dilation, 0 outside x). The norms:
//    GhostNormTiles (tiles of A A^T and G G^T, multiplied and summed in registers) or InstNormTiles
//    (tiles of G^T A squared and summed in registers, split over t when the tiles are few); block
//    partials then per-(sample, group) and per-sample sums in order. The clipped sum: ClippedGemm, c_i
//    folded into g's rows, the epilogue in registers, W written once (as the Linear clipped sum's tiles).
//  - aten (the CPU's): the norms on the unfold materialised per chunk of samples (bounded as in the
//    reference) by linear_norms.cpp's batched matmuls (MKL); the clipped sum by one
//    convolution_backward of the c_i-scaled g in the accumulation dtype (oneDNN), then the epilogue.
// The CPU tests run both paths, so CI executes the tiles' device code (phase by phase, kernels.h).
// Non-zero padding modes are applied by the caller (dpkernels/nn/conv.py): x arrives padded, with the
// symmetric zero padding left to the op.
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

// The implicit-GEMM operands (kernels.h ConvOperands) of x (B, C_in, *S) and g (B, C_out, *out), both
// in_t, for kernel sizes k: strides as they are (any layout), unused spatial dims of size 1, stride 0.
template <class in_t, class acc_t>
ConvOperands<in_t, acc_t> conv_operands(const Tensor& x, const Tensor& g, at::IntArrayRef k,
                                        const std::vector<int64_t>& s, const std::vector<int64_t>& pad,
                                        const std::vector<int64_t>& dil, int64_t groups) {
  const int n = static_cast<int>(x.dim() - 2);
  int64_t O = 1;
  for (int q = 0; q < n; ++q) O *= g.size(2 + q);
  ConvOperands<in_t, acc_t> ops{};
  ops.x = x.data_ptr<in_t>();
  ops.g = g.data_ptr<in_t>();
  ops.n = n;
  ops.O = Divisor::of(O);
  ops.cin_g = x.size(1) / groups;
  ops.cout_g = g.size(1) / groups;
  ops.sxb = x.stride(0);
  ops.sxc = x.stride(1);
  ops.sgb = g.stride(0);
  ops.sgc = g.stride(1);
  for (int q = 0; q < 3; ++q) {  // unused dims: size 1, stride 0, so a fixed trip count reads nothing wrong
    const bool used = q < n;
    ops.out[q] = Divisor::of(used ? g.size(2 + q) : 1);
    ops.in[q] = used ? x.size(2 + q) : 1;
    ops.k[q] = Divisor::of(used ? k[q] : 1);
    ops.stride[q] = used ? s[q] : 1;
    ops.pad[q] = used ? pad[q] : 0;
    ops.dil[q] = used ? dil[q] : 1;
    ops.sx[q] = used ? x.stride(2 + q) : 0;
    ops.sg[q] = used ? g.stride(2 + q) : 0;
  }
  return ops;
}

// The output positions T = prod(out) of g after checking that g's spatial sizes are those of a conv of x
// with kernel k, stride s, padding pad and dilation dil (x padded at least as large as the dilated kernel).
int64_t check_out_sizes(const char* op, const Tensor& x, const Tensor& g, at::IntArrayRef k,
                        const std::vector<int64_t>& s, const std::vector<int64_t>& pad,
                        const std::vector<int64_t>& dil) {
  const int64_t n = x.dim() - 2;
  int64_t T = 1;
  for (int64_t q = 0; q < n; ++q) {
    const int64_t span = dil[q] * (k[q] - 1) + 1, padded = x.size(2 + q) + 2 * pad[q];
    TORCH_CHECK_VALUE(padded >= span, op, ": spatial dim ", q, " has size ", padded,
                      " after padding, smaller than the dilated kernel (", span,
                      "); pad the input or use a smaller kernel/dilation");
    const int64_t want = (padded - span) / s[q] + 1;
    TORCH_CHECK_VALUE(g.size(2 + q) == want, op, ": output gradient of shape ", g.sizes(),
                      " does not match an input ", x.sizes(), " with kernel_size=", k,
                      ", stride=", at::IntArrayRef(s), ", padding=", at::IntArrayRef(pad),
                      ", dilation=", at::IntArrayRef(dil));
    T *= want;
  }
  return T;
}

// W (weight_shape, contiguous, acc) = scale * (prev + sum_i c_i dW_i + noise_std * z) by implicit-GEMM tiles.
Tensor conv_weight_tiles(const Tensor& x, const Tensor& g, const Tensor& cc, const OptTensor& pw,
                         at::IntArrayRef weight_shape, const std::vector<int64_t>& s, const std::vector<int64_t>& pad,
                         const std::vector<int64_t>& dil, int64_t groups, double noise_std, double scale,
                         int64_t seed, at::ScalarType acc, int64_t splits) {
  const int n = static_cast<int>(x.dim() - 2);
  const int64_t B = x.size(0), C_in = x.size(1), C_out = g.size(1);
  Tensor w = at::empty(weight_shape, x.options().dtype(acc));
  const int64_t O = check_out_sizes("conv_clipped_sum", x, g, weight_shape.slice(2), s, pad, dil);
  int64_t K = 1;
  for (int q = 0; q < n; ++q) K *= weight_shape[2 + q];
  const bool mixed = x.scalar_type() != g.scalar_type();
  const Tensor xi = mixed ? x.to(acc) : x, gi = mixed ? g.to(acc) : g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gi.scalar_type(), "dpk_conv_clipped_gemm", [&] {
    using acc_t = acc_of<scalar_t>;
    TORCH_INTERNAL_ASSERT(w.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    const auto ops = conv_operands<scalar_t, acc_t>(xi, gi, weight_shape.slice(2), s, pad, dil, groups);
    clipped_gemm<acc_t>(w, ops, cc, pw, noise_std, scale, seed, C_out / groups, C_in / groups * K, B * O, groups,
                        splits);
  });
  return w;
}

// The per-sample weight norms (B,) by the implicit-GEMM norm tiles (kernels.h GhostNormTiles,
// InstNormTiles), the unfold gathered from x as the tiles load: block partials to a workspace, summed
// per (sample, group) then per sample by RowSum (both in order). Chunks of samples bound the
// workspace by CHUNK_ELEMS, as the reference bounds its temporaries.
Tensor conv_norm_tiles(const Tensor& x, const Tensor& g, const std::vector<int64_t>& k, const std::vector<int64_t>& s,
                       const std::vector<int64_t>& pad, const std::vector<int64_t>& dil, int64_t groups, int64_t T,
                       bool ghost, at::ScalarType acc, int64_t splits) {
  const int64_t B = x.size(0), P = g.size(1) / groups;
  int64_t D = x.size(1) / groups;
  for (auto v : k) D *= v;
  Tensor w = at::zeros({B}, x.options().dtype(acc));
  if (B == 0 || T == 0 || P == 0 || D == 0) return w;  // an empty sum: 0
  const bool mixed = x.scalar_type() != g.scalar_type();
  const Tensor xi = mixed ? x.to(acc) : x, gi = mixed ? g.to(acc) : g;
  int64_t units = at::get_num_threads();
#ifdef DPK_WITH_CUDA
  if (x.is_cuda()) units = 2 * cuda_sm_count(x.device().index());
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gi.scalar_type(), "dpk_conv_norm_tiles", [&] {
    using acc_t = acc_of<scalar_t>;
    // per (sample, group): `per` block partials; then the (B, groups) sums; then w
    const auto finish_rows = [&](const Tensor& part, int64_t b, int64_t per, const Tensor& out) {
      Tensor pg = at::empty({b * groups}, out.options());
      for_each(out, b * groups, RowSum<acc_t>{part.data_ptr<acc_t>(), pg.data_ptr<acc_t>(), per, false}, grain_for(per));
      for_each(out, b, RowSum<acc_t>{pg.data_ptr<acc_t>(), out.data_ptr<acc_t>(), groups, false}, grain_for(groups));
    };
    if (ghost) {
      using F = GhostNormTiles<acc_t, ConvOperands<scalar_t, acc_t>>;
      const int64_t nt = (T + F::BT - 1) / F::BT, pairs = nt * (nt + 1) / 2;
      const int64_t step = std::max<int64_t>(1, CHUNK_ELEMS / (groups * pairs));
      for (int64_t lo = 0; lo < B; lo += step) {
        const int64_t hi = std::min(B, lo + step), b = hi - lo;
        const Tensor xc = xi.slice(0, lo, hi), gc = gi.slice(0, lo, hi);
        Tensor part = at::empty({b * groups * pairs}, w.options());
        const F f{conv_operands<scalar_t, acc_t>(xc, gc, k, s, pad, dil, groups), part.data_ptr<acc_t>(), T, P, D, groups,
                  nt, pairs, (D + F::BK - 1) / F::BK, (P + F::BK - 1) / F::BK};
        for_each_tile(w, b * groups * pairs, f);
        finish_rows(part, b, pairs, w.slice(0, lo, hi));
      }
    } else {
      using F = InstNormTiles<acc_t, ConvOperands<scalar_t, acc_t>>;
      const int64_t tiles_d = (D + F::BD - 1) / F::BD, tiles = (P + F::BP - 1) / F::BP * tiles_d;
      // split over t only when a chunk's blocks leave units idle: then the workspace holds G^T A itself
      const int64_t unsplit_step = std::max<int64_t>(1, CHUNK_ELEMS / (groups * tiles));
      const int64_t t_per0 = rows_per_split(std::min(B, unsplit_step) * groups * tiles, T, units, splits, F::BK);
      const int64_t S0 = (T + t_per0 - 1) / t_per0;
      const int64_t step = S0 > 1 ? std::max<int64_t>(1, CHUNK_ELEMS / (S0 * groups * P * D)) : unsplit_step;
      for (int64_t lo = 0; lo < B; lo += step) {
        const int64_t hi = std::min(B, lo + step), b = hi - lo;
        const int64_t t_per = rows_per_split(b * groups * tiles, T, units, splits, F::BK);
        const int64_t S = (T + t_per - 1) / t_per;
        const Tensor xc = xi.slice(0, lo, hi), gc = gi.slice(0, lo, hi);
        Tensor part = at::empty({S > 1 ? S * b * groups * P * D : b * groups * tiles}, w.options());
        const F f{conv_operands<scalar_t, acc_t>(xc, gc, k, s, pad, dil, groups), part.data_ptr<acc_t>(), b, T, P, D,
                  groups, t_per, tiles_d, tiles, S > 1};
        for_each_tile(w, S * b * groups * tiles, f);
        const Tensor wc = w.slice(0, lo, hi);
        if (S > 1) {
          Tensor rows = at::empty({b * groups * P}, w.options());
          for_each(w, b * groups * P,
                   SplitSquares<acc_t>{part.data_ptr<acc_t>(), rows.data_ptr<acc_t>(), S, D, b * groups * P * D},
                   grain_for(S * D));
          finish_rows(rows, b, P, wc);
        } else {
          finish_rows(part, b, tiles, wc);
        }
      }
    }
  });
  return w;
}

// The per-sample weight norms (B,) through ATen: the unfold materialised per chunk of samples (at most
// CHUNK_ELEMS elements), then linear_norms' batched matmuls per (sample, group).
Tensor conv_norm_aten(const Tensor& x, const Tensor& g, const std::vector<int64_t>& k, const std::vector<int64_t>& s,
                      const std::vector<int64_t>& pad, const std::vector<int64_t>& dil, int64_t groups, int64_t T,
                      c10::string_view method, at::ScalarType acc) {
  const int64_t B = x.size(0), C_in = x.size(1), C_out = g.size(1);
  int64_t K = 1;
  for (auto v : k) K *= v;
  Tensor w = at::empty({B}, x.options().dtype(acc));
  const int64_t step = std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(1, T * C_in * K));
  for (int64_t lo = 0; lo < B; lo += step) {
    const int64_t hi = std::min(B, lo + step), b = hi - lo;
    Tensor a = unfold(x.slice(0, lo, hi), k, s, pad, dil);
    a = a.reshape({b, T, groups, -1}).transpose(1, 2).reshape({b * groups, T, -1});
    const Tensor gr = g.slice(0, lo, hi)
                          .reshape({b, groups, C_out / groups, T})
                          .transpose(2, 3)
                          .reshape({b * groups, T, C_out / groups});
    w.slice(0, lo, hi).copy_(linear_weight_norms(a, gr, method).view({b, groups}).sum(1));
  }
  return w;
}

}  // namespace

std::tuple<Tensor, Tensor> conv_norms(const Tensor& x, const Tensor& g, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, bool bias, c10::string_view method, int64_t path,
                                      int64_t splits) {
  const char* op = "conv_norms";
  TORCH_CHECK_VALUE(method == "ghost" || method == "inst", op, ": method must be 'ghost' or 'inst', got '",
                    std::string(method), "'");
  TORCH_CHECK_VALUE(path >= 0 && path <= 2, op, ": path must be 0 (automatic), 1 (tiles) or 2 (aten), got ", path);
  TORCH_CHECK_VALUE(splits >= 0, op, ": splits must be >= 0 (0: automatic), got ", splits);
  TORCH_CHECK_VALUE(x.dim() >= 3 && x.dim() <= 5 && g.dim() == x.dim(), op,
                    ": x must be (B, C_in, *S) and g (B, C_out, *out) with 1 to 3 spatial dims, got ", x.sizes(),
                    " and ", g.sizes());
  check_float(op, "x", x);
  check_float(op, "g", g);
  check_same_device(op, "x", x, "g", g);
  const int64_t n = x.dim() - 2, B = x.size(0), C_in = x.size(1), C_out = g.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && C_in % groups == 0 && C_out % groups == 0, "conv: groups=", groups,
                    " must divide C_in=", C_in, " and C_out=", C_out);
  TORCH_CHECK_VALUE(g.size(0) == B, op, ": g must have x's batch size ", B, ", got ", g.sizes());
  const auto k = ntuple(kernel_size, n, "kernel_size"), s = ntuple(stride, n, "stride"),
             pad = ntuple(padding, n, "padding"), dil = ntuple(dilation, n, "dilation");
  const int64_t T = check_out_sizes(op, x, g, k, s, pad, dil);
  const auto acc = acc_type({x.scalar_type(), g.scalar_type()});
  // tiles on CUDA (the unfold never written), ATen's matmuls on the CPU (MKL beats the tiles run
  // thread by thread there); `path` forces either on either device (the tests run the tiles on the CPU)
  const bool tiles = path == 1 || (path == 0 && x.is_cuda());
  Tensor w = tiles ? conv_norm_tiles(x, g, k, s, pad, dil, groups, T, method == "ghost", acc, splits)
                   : conv_norm_aten(x, g, k, s, pad, dil, groups, T, method, acc);
  Tensor bn = bias ? bias_norms(g.reshape({B, C_out, T}).transpose(1, 2)) : absent(x, acc);
  return {w, bn};
}

std::tuple<Tensor, Tensor> conv_clipped_sum(const Tensor& x, const Tensor& g, const Tensor& c,
                                            at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                            bool bias, double noise_std, double scale, int64_t seed_w,
                                            int64_t seed_b, const OptTensor& prev_w, const OptTensor& prev_b,
                                            int64_t path, int64_t splits) {
  const char* op = "conv_clipped_sum";
  TORCH_CHECK_VALUE(path >= 0 && path <= 2, op, ": path must be 0 (automatic), 1 (tiles) or 2 (aten), got ", path);
  TORCH_CHECK_VALUE(splits >= 0, op, ": splits must be >= 0 (0: automatic), got ", splits);
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
  TORCH_CHECK_VALUE(groups >= 1 && x.size(1) % groups == 0 && C_out % groups == 0, "conv: groups=", groups,
                    " must divide C_in=", x.size(1), " and C_out=", C_out);
  const auto acc = acc_type({x.scalar_type(), g.scalar_type()});
  const Tensor cc = clip_factors(op, c, g, acc);
  const auto pw = prev_acc(op, "prev_w", prev_w, weight_shape, g.device(), acc);
  prev_acc(op, "prev_b", prev_b, {C_out}, g.device(), acc);  // checked here to name prev_b in the error
  const auto s = ntuple(stride, n, "stride"), pad = ntuple(padding, n, "padding"), dil = ntuple(dilation, n, "dilation");
  Tensor w;
  if (path == 1 || (path == 0 && g.is_cuda())) {
    w = conv_weight_tiles(x, g, cc, pw, weight_shape, s, pad, dil, groups, noise_std, scale, seed_w, acc, splits);
  } else {
    std::vector<int64_t> cshape(x.dim(), 1);
    cshape[0] = B;
    // a sample with c_i = 0 adds exactly 0: its x and g set to 0 (a select: 0 * inf is NaN)
    const Tensor drop = cc.view(cshape).eq(0);
    const Tensor gs = g.to(acc).mul(cc.view(cshape)).masked_fill_(drop, 0);
    const Tensor weight = at::empty(weight_shape, x.options().dtype(acc));  // only its shape is read
    auto grads = at::convolution_backward(gs, x.to(acc).masked_fill(drop, 0), weight, c10::nullopt, s, pad, dil, false,
                                          std::vector<int64_t>(n, 0), groups, {false, true, false});
    w = std::get<1>(grads).contiguous();
    finish(w, w, pw, noise_std, scale, seed_w);
  }
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
      "int groups, bool bias, str method, int path=0, int splits=0) -> (Tensor, Tensor)");
  m.def(
      "cuda_conv_clipped_sum(Tensor x, Tensor g, Tensor c, int[] weight_shape, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool bias, float noise_std, float scale, int seed_w, int seed_b, Tensor? prev_w, "
      "Tensor? prev_b, int path=0, int splits=0) -> (Tensor, Tensor)");
}
DPK_REGISTER(dpk::conv_impls)
