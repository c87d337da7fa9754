// The host code every op family shares: input checks, the accumulation dtype, the one launch point
// (`for_each`: at::parallel_for on the CPU, kernels.cu's grid-stride kernel on CUDA, over the same
// functor of kernels.h), the epilogue
//
//     out = scale * (x + prev + noise_std * z),   z_j = randn(seed, j)   (kernels.h)
//
// and the registration macro. Each op family's source (csrc/<family>.cpp) holds its host code and
// registers it for the CPU, and for CUDA in a build with kernels.cu (DPK_WITH_CUDA): one host code for
// both devices, only the loop over the functor differs.
#pragma once

// Tensor methods and the per-op headers only (no ATen/ATen.h): halves the compile time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace dpk {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Per-chunk budget (elements) of a temporary over a chunk of samples, as the reference's.
constexpr int64_t CHUNK_ELEMS = int64_t(1) << 26;
constexpr uint64_t SEED_MASK = (uint64_t(1) << 63) - 1;  // seeds are 63-bit, as everywhere in dpkernels

// f(j) for j in [0, n) on `like`'s device: CPU threads in chunks of `grain`, or a CUDA kernel.
template <class F>
void for_each(const Tensor& like, int64_t n, const F& f, int64_t grain = 2048) {
  if (n <= 0) return;
  if (like.is_cuda()) {
#ifdef DPK_WITH_CUDA
    launch_cuda(f, n, like.device().index());
#else
    TORCH_CHECK(false, "dpkernels cuda backend: this build has no CUDA kernels (built without nvcc); rebuild with "
                       "nvcc on the PATH (python -m dpkernels.ops.cuda.build) or use another backend");
#endif
  } else {
    at::parallel_for(0, n, std::max<int64_t>(grain, 1), [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) f(j);
    });
  }
}

// A block-synchronous tile functor (kernels.h: ClippedGemm, GhostNormTiles, InstNormTiles) over `blocks`
// blocks on `like`'s device: a CUDA kernel with a barrier between phases, or on the CPU the same phases
// thread after thread (each phase of every thread before the next phase: what the barriers guarantee),
// blocks in parallel.
template <class F>
void for_each_tile(const Tensor& like, int64_t blocks, const F& f) {
  if (blocks <= 0) return;
  if (like.is_cuda()) {
#ifdef DPK_WITH_CUDA
    launch_tiles_cuda(f, blocks, like.device().index());
#else
    TORCH_CHECK(false, "dpkernels cuda backend: this build has no CUDA kernels (built without nvcc); rebuild with "
                       "nvcc on the PATH (python -m dpkernels.ops.cuda.build) or use another backend");
#endif
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    auto sm = std::make_unique<typename F::Smem>();
    std::vector<typename F::Regs> regs(F::THREADS);
    for (int64_t b = lo; b < hi; ++b) {
      for (auto& r : regs) f.zero(r);
      const int64_t steps = f.steps(b);
      for (int64_t k = 0; k < steps; ++k) {
        for (int tid = 0; tid < F::THREADS; ++tid) f.load(*sm, regs[tid], b, k, tid);
        for (int tid = 0; tid < F::THREADS; ++tid) f.mma(*sm, regs[tid], b, k, tid);
      }
      for (int tid = 0; tid < F::THREADS; ++tid) f.store(*sm, regs[tid], b, tid);
      for (int tid = 0; tid < F::THREADS; ++tid) f.flush(*sm, b, tid);
    }
  });
}

// Threads per CPU chunk so that a chunk does about 2^14 inner steps of `work` each.
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(work, 1)); }

// ----------------------------------------------------------------------------- dtypes and checks

// float64 if any input is float64, else float32: half inputs accumulate in fp32 (as the reference).
inline at::ScalarType acc_type(std::initializer_list<at::ScalarType> ts) {
  for (auto t : ts)
    if (t == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline void check_float(const char* op, const char* name, const Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_same_device(const char* op, const char* name, const Tensor& t, const char* ref_name,
                              const Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " on ",
                    ref.device(), "; move both to one device");
}

// a: (B, T, d), g: (B, T, p), float, on one device.
inline void check_rows(const char* op, const Tensor* a, const Tensor& g, const char* a_name = "a") {
  TORCH_CHECK_VALUE(g.dim() == 3, op, ": g must be (B, T, p), got shape ", g.sizes(),
                    "; reshape with batch_rows first");
  check_float(op, "g", g);
  if (a) {
    TORCH_CHECK_VALUE(a->dim() == 3 && a->size(0) == g.size(0) && a->size(1) == g.size(1), op, ": ", a_name,
                      " must be (B, T, d) with the (B, T) of g (", g.size(0), ", ", g.size(1), "), got shape ",
                      a->sizes());
    check_float(op, a_name, *a);
    check_same_device(op, a_name, *a, "g", g);
  }
}

// c: (B,) clip factors on ref's device, returned in the accumulation dtype, contiguous.
inline Tensor clip_factors(const char* op, const Tensor& c, const Tensor& ref, at::ScalarType acc) {
  TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == ref.size(0), op,
                    ": c must hold one clip factor per sample, shape (", ref.size(0), ",), got ", c.sizes());
  check_same_device(op, "c", c, "g", ref);
  return c.to(acc).contiguous();
}

// prev in the output's accumulation dtype (contiguous), after checking its shape and device.
inline OptTensor prev_acc(const char* op, const char* name, const OptTensor& prev, at::IntArrayRef shape,
                          const at::Device& device, at::ScalarType acc) {
  if (!prev.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(prev->sizes() == shape, op, ": ", name, " must have the output's shape ", shape, ", got ",
                    prev->sizes());
  TORCH_CHECK_VALUE(prev->device() == device, op, ": ", name, " is on ", prev->device(), " but the inputs on ", device,
                    "; move it to their device");
  return prev->to(acc).contiguous();
}

// An output not asked for: (0,), as an op returns tensors always.
inline Tensor absent(const Tensor& like, at::ScalarType acc) { return at::empty({0}, like.options().dtype(acc)); }

template <class acc_t>
Noise<acc_t> noise_of(const OptTensor& prev, double noise_std, double scale, int64_t seed) {
  return Noise<acc_t>{prev ? prev->data_ptr<acc_t>() : nullptr, static_cast<acc_t>(noise_std),
                      static_cast<acc_t>(scale), static_cast<uint64_t>(seed) & SEED_MASK, noise_std != 0.0};
}

// `out` (contiguous) = scale * (x + prev + noise_std * z), x and prev (optional) in out's accumulation dtype.
inline void finish(const Tensor& out, const OptTensor& x, const OptTensor& prev, double noise_std, double scale,
                   int64_t seed) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && (!x || x->is_contiguous()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dpk_finish", [&] {
    using acc_t = acc_of<scalar_t>;
    Epilogue<acc_t, scalar_t> f{x ? x->data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>(),
                                noise_of<acc_t>(prev, noise_std, scale, seed)};
    for_each(out, out.numel(), f, 4096);
  });
}

// Rows of a clipped sum's reduction per split (a multiple of BK) for `tiles` output tiles: one split
// unless the tiles leave `units` (2 x SMs; CPU threads) idle, then enough to fill them, each of at
// least 16 load steps; `splits` > 0 forces their number (tests).
inline int64_t rows_per_split(int64_t tiles, int64_t K, int64_t units, int64_t splits, int64_t BK) {
  const int64_t steps = std::max<int64_t>(1, (K + BK - 1) / BK);
  int64_t S = splits;
  if (S <= 0) S = tiles < units ? std::min((units + tiles - 1) / tiles, std::max<int64_t>(1, steps / 16)) : 1;
  S = std::min(S, steps);
  return (steps + S - 1) / S * BK;
}

// w (contiguous (groups * P, D), acc_t) = scale * (prev + sum_k c_i(k) g_k^T a_k + noise_std * z) by
// ClippedGemm tiles over `ops` (kernels.h), split-K through a workspace when the tiles are too few.
template <class acc_t, class Ops>
void clipped_gemm(const Tensor& w, const Ops& ops, const Tensor& cc, const OptTensor& pw, double noise_std,
                  double scale, int64_t seed, int64_t P, int64_t D, int64_t K, int64_t groups, int64_t splits) {
  using G = ClippedGemm<acc_t, Ops>;
  if (P == 0 || D == 0 || groups == 0) return;
  const int64_t tiles_d = (D + G::BD - 1) / G::BD, tiles = (P + G::BP - 1) / G::BP * tiles_d;
  int64_t units = at::get_num_threads();
#ifdef DPK_WITH_CUDA
  if (w.is_cuda()) units = 2 * cuda_sm_count(w.device().index());
#endif
  const int64_t k_per = rows_per_split(tiles * groups, K, units, splits, G::BK);
  const int64_t S = std::max<int64_t>(1, (K + k_per - 1) / k_per);
  const Tensor ws = S > 1 ? at::empty({S, groups * P, D}, w.options()) : w;
  const auto epi = noise_of<acc_t>(pw, noise_std, scale, seed);
  const G f{ops, cc.data_ptr<acc_t>(), ws.data_ptr<acc_t>(), epi, P, D, K, k_per, tiles_d, tiles, groups, S > 1};
  for_each_tile(w, S * groups * tiles, f);
  if (S > 1) {
    SplitFinish<acc_t> fin{ws.data_ptr<acc_t>(), w.data_ptr<acc_t>(), S, groups * P * D, epi};
    for_each(w, groups * P * D, fin, grain_for(S));
  }
}

// ----------------------------------------------------------------------------- across families

// Per-sample column sums s[i, c] = sum_t (x[i, t, c] *) g[i, t, c] of (B, T, C) views: (B, C) in acc.
Tensor colsums(const OptTensor& x, const Tensor& g, at::ScalarType acc);
// n[i] = sum_c s[i, c]^2, or sum_c s[i, c] when !square: (B,), sequential over c.
Tensor row_sum(const Tensor& s, bool square);
// scale * (prev + sum_i c_i s[i, :] + noise_std * z): (C,).
Tensor weighted_sum(const Tensor& s, const Tensor& c, const OptTensor& prev, double noise_std, double scale,
                    int64_t seed);
Tensor bias_norms(const Tensor& g);
Tensor bias_clipped_sum(const Tensor& g, const Tensor& c, double noise_std, double scale, int64_t seed,
                        const OptTensor& prev);
// The weight part of linear_norms on (B, T, d), (B, T, p) rows (no checks).
Tensor linear_weight_norms(const Tensor& a, const Tensor& g, c10::string_view method);

}  // namespace dpk

// Registration of an op family's host functions (`void impls(torch::Library& m)` in the family's
// anonymous namespace): for the CPU always, for CUDA in a build with kernels.cu.
#ifdef DPK_WITH_CUDA
#define DPK_REGISTER(impls)                             \
  TORCH_LIBRARY_IMPL(dpkernels, CPU, m) { impls(m); } \
  TORCH_LIBRARY_IMPL(dpkernels, CUDA, m) { impls(m); }
#else
#define DPK_REGISTER(impls) \
  TORCH_LIBRARY_IMPL(dpkernels, CPU, m) { impls(m); }
#endif
