// Clipped, summed, noised Linear gradients.
//
//     W = scale * (prev_w + sum_i c_i G_i^T A_i + noise_std * z_w) = scale * (prev_w + G'^T A + noise_std * z_w)
//     b = scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)                          (bias.cpp)
//
// with G'[(i, t), :] = c_i g_it: the clip factors folded into G's rows. Two paths to W (`path`):
//
//   tiles (CUDA's): ClippedGemm (kernels.h), c_i folded in as each tile of G is loaded, fp32 (fp64)
//     FMAs, the epilogue in registers: W written once. When the output has fewer tiles than twice
//     the SMs (the CPU: its threads), the B*T reduction is split over a (S, P, D) workspace that
//     SplitFinish sums in a fixed order before the same epilogue (deterministic).
//   aten (the CPU's): per chunk of samples one scaled copy of G in the accumulation dtype and an
//     addmm into W (MKL), then the epilogue functor in place over W.
//
// Both paths: a sample with c_i = 0 adds exactly 0, its rows of G and A read as 0 (0 * inf is NaN).
//
// Why a hand-tiled kernel rather than cuBLAS into a workspace plus an epilogue kernel: cuBLAS cannot
// scale the reduction's rows, so it needs a scaled copy of G (in fp32: a 16-bit c_i g_it loses bits,
// and leaves fp16's range for c_i > 1 or c_i << 1) and, for 16-bit inputs, an fp32 copy of A, then a
// second pass over W. The tiles read each input once in its own dtype and write W once, and their
// device code is what the CPU build runs in CI. The price: SIMT FMAs, not tensor cores (a wgmma
// mainloop is the lever left); bench/gpu_cuda.sh measures both paths on a GPU. On the CPU, MKL's
// SGEMM beats the tile functor run thread by thread (bench/cuda_cpu.py), so `aten` is its default.
#include "dpk.h"

namespace dpk {

namespace {

enum Path : int64_t { AUTO = 0, TILES = 1, ATEN = 2 };

Tensor weight_tiles(const Tensor& a, const Tensor& g, const Tensor& cc, const OptTensor& pw, double noise_std,
                    double scale, int64_t seed, at::ScalarType acc, int64_t splits) {
  const int64_t B = g.size(0), T = g.size(1), P = g.size(2), D = a.size(2);
  Tensor w = at::empty({P, D}, g.options().dtype(acc));
  // one input dtype for the functor: mixed inputs (rare) both in the accumulation dtype
  const bool mixed = a.scalar_type() != g.scalar_type();
  const Tensor ai = mixed ? a.to(acc) : a, gi = mixed ? g.to(acc) : g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gi.scalar_type(), "dpk_clipped_gemm", [&] {
    using acc_t = acc_of<scalar_t>;
    TORCH_INTERNAL_ASSERT(w.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    const LinearOperands<scalar_t, acc_t> ops{ai.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(), Divisor::of(T),
                                              ai.stride(0),            ai.stride(1),            ai.stride(2),
                                              gi.stride(0),            gi.stride(1),            gi.stride(2)};
    clipped_gemm<acc_t>(w, ops, cc, pw, noise_std, scale, seed, P, D, B * T, 1, splits);
  });
  return w;
}

Tensor weight_aten(const Tensor& a, const Tensor& g, const Tensor& cc, const OptTensor& pw, double noise_std,
                   double scale, int64_t seed, at::ScalarType acc) {
  const int64_t B = g.size(0), T = g.size(1), P = g.size(2), D = a.size(2);
  Tensor w = at::zeros({P, D}, g.options().dtype(acc));
  if (P == 0 || D == 0) return w;
  // chunks of samples bound the scaled copy of G (and A's copy in acc) as the reference's temporaries
  const int64_t step = std::max<int64_t>(1, CHUNK_ELEMS / std::max<int64_t>(1, T * std::max(P, D)));
  for (int64_t lo = 0; lo < B; lo += step) {
    const int64_t hi = std::min(B, lo + step);
    // a sample with c_i = 0 adds exactly 0: its rows of G and A set to 0 (a select: 0 * inf is NaN)
    const Tensor ci = cc.slice(0, lo, hi).view({-1, 1, 1}), drop = ci.eq(0);
    const Tensor gs = g.slice(0, lo, hi).to(acc).mul(ci).masked_fill_(drop, 0);
    const Tensor as = a.slice(0, lo, hi).to(acc).masked_fill(drop, 0);
    w.addmm_(gs.reshape({-1, P}).t(), as.reshape({-1, D}));
  }
  finish(w, w, pw, noise_std, scale, seed);
  return w;
}

}  // namespace

std::tuple<Tensor, Tensor> linear_clipped_sum(const Tensor& a, const Tensor& g, const Tensor& c, bool bias,
                                              double noise_std, double scale, int64_t seed_w, int64_t seed_b,
                                              const OptTensor& prev_w, const OptTensor& prev_b, int64_t path,
                                              int64_t splits) {
  const char* op = "linear_clipped_sum";
  check_rows(op, &a, g);
  TORCH_CHECK_VALUE(path >= AUTO && path <= ATEN, op, ": path must be 0 (automatic), 1 (tiles) or 2 (aten), got ",
                    path);
  TORCH_CHECK_VALUE(splits >= 0, op, ": splits must be >= 0 (0: automatic), got ", splits);
  const auto acc = acc_type({a.scalar_type(), g.scalar_type()});
  const int64_t p = g.size(2), d = a.size(2);
  const Tensor cc = clip_factors(op, c, g, acc);
  const auto pw = prev_acc(op, "prev_w", prev_w, {p, d}, g.device(), acc);
  prev_acc(op, "prev_b", prev_b, {p}, g.device(), acc);  // checked here to name prev_b in the error
  const bool tiles = path == TILES || (path == AUTO && g.is_cuda());
  Tensor w = tiles ? weight_tiles(a, g, cc, pw, noise_std, scale, seed_w, acc, splits)
                   : weight_aten(a, g, cc, pw, noise_std, scale, seed_w, acc);
  Tensor b = bias ? bias_clipped_sum(g, c, noise_std, scale, seed_b, prev_b) : absent(g, acc);
  return {w, b};
}

void linear_clipped_sum_impls(torch::Library& m) { m.impl("cuda_linear_clipped_sum", &linear_clipped_sum); }

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  // path: 0 automatic (tiles on CUDA, aten on the CPU), 1 tiles, 2 aten; splits: 0 automatic, else forced
  m.def(
      "cuda_linear_clipped_sum(Tensor a, Tensor g, Tensor c, bool bias, float noise_std, float scale, int seed_w, "
      "int seed_b, Tensor? prev_w, Tensor? prev_b, int path=0, int splits=0) -> (Tensor, Tensor)");
}
DPK_REGISTER(dpk::linear_clipped_sum_impls)
