// add_noise: scale * (prev + noise_std * z), the update of a parameter no sample touched this step.
// The epilogue functor alone over the flat output (dpk.h's finish), in fp32 (fp64 for a float64 dtype),
// rounded once to the output dtype; z_j = randn(seed, j) as in every clipped sum's epilogue.
#include <ATen/ops/empty_like.h>

#include "dpk.h"

namespace dpk {

// `like` carries the output's device and dtype: the dispatcher routes on it (prev may be absent).
Tensor add_noise(const Tensor& like, const OptTensor& prev, at::IntArrayRef shape, double noise_std, double scale,
                 int64_t seed) {
  check_float("add_noise", "dtype", like);
  const auto pv = prev_acc("add_noise", "prev", prev, shape, like.device(), acc_type({like.scalar_type()}));
  Tensor out = at::empty(shape, like.options());
  finish(out, std::nullopt, pv, noise_std, scale, seed);
  return out;
}

// For the tests: Philox4x32-10 of (N, 4) counters (uint32 values in int64) under the key (k0, k1).
Tensor philox(const Tensor& ctr, int64_t k0, int64_t k1) {
  TORCH_CHECK_VALUE(ctr.dim() == 2 && ctr.size(1) == 4 && ctr.scalar_type() == at::kLong,
                    "philox: ctr must be an (N, 4) int64 tensor, got ", ctr.sizes(), " ", ctr.scalar_type());
  const Tensor c = ctr.contiguous();
  Tensor out = at::empty_like(c);
  PhiloxBlocks f{c.data_ptr<int64_t>(), out.data_ptr<int64_t>(), uint32_t(k0), uint32_t(k1)};
  for_each(c, c.size(0), f);
  return out;
}

void add_noise_impls(torch::Library& m) {
  m.impl("cuda_add_noise", &add_noise);
  m.impl("cuda_philox", &philox);
}

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def("cuda_philox(Tensor ctr, int k0, int k1) -> Tensor");
  m.def("cuda_add_noise(Tensor like, Tensor? prev, int[] shape, float noise_std, float scale, int seed) -> Tensor");
}
DPK_REGISTER(dpk::add_noise_impls)
