// secure_noise: scale * (prev + noise_std * z), z the secure-mode Gaussian of kernels.h (ChaCha20 keyed per
// (step, parameter), four Box-Muller draws in double), computed in double and rounded once to the output
// dtype; the engine runs it after the clipped sum in secure mode (dpkernels/secure.py).
#include <ATen/ops/empty_like.h>

#include "dpk.h"

namespace dpk {

inline ChaChaKey chacha_key(const char* op, at::IntArrayRef key, at::IntArrayRef nonce) {
  TORCH_CHECK_VALUE(key.size() == 8 && nonce.size() == 3, op, ": key must be 8 words and nonce 3, got ", key.size(),
                    " and ", nonce.size());
  ChaChaKey k{};
  for (int q = 0; q < 8; ++q) {
    TORCH_CHECK_VALUE(key[q] >= 0 && key[q] <= 0xFFFFFFFFll, op, ": key words must be in [0, 2**32)");
    k.k[q] = uint32_t(key[q]);
  }
  for (int q = 0; q < 3; ++q) {
    TORCH_CHECK_VALUE(nonce[q] >= 0 && nonce[q] <= 0xFFFFFFFFll, op, ": nonce words must be in [0, 2**32)");
    k.n[q] = uint32_t(nonce[q]);
  }
  return k;
}

// `like` carries the output's device and dtype: the dispatcher routes on it (prev may be absent).
Tensor secure_noise(const Tensor& like, const OptTensor& prev, at::IntArrayRef shape, double noise_std, double scale,
                    at::IntArrayRef key, at::IntArrayRef nonce) {
  check_float("secure_noise", "dtype", like);
  const ChaChaKey k = chacha_key("secure_noise", key, nonce);
  const auto pv = prev_acc("secure_noise", "prev", prev, shape, like.device(), at::kDouble);
  Tensor out = at::empty(shape, like.options());
  TORCH_CHECK_VALUE(out.numel() <= (int64_t(1) << 32), "secure_noise: ", out.numel(),
                    " elements exceed the 2**32 a stream numbers");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dpk_secure_noise", [&] {
    SecureNoise<scalar_t> f{pv ? pv->data_ptr<double>() : nullptr, out.data_ptr<scalar_t>(), noise_std, scale, k};
    for_each(out, out.numel(), f, 1024);
  });
  return out;
}

// For the tests: the ChaCha20 blocks of int64 counters (N,) under (key, nonce): (N, 16) uint32 words in int64.
Tensor chacha20(const Tensor& ctr, at::IntArrayRef key, at::IntArrayRef nonce) {
  TORCH_CHECK_VALUE(ctr.dim() == 1 && ctr.scalar_type() == at::kLong, "chacha20: ctr must be an (N,) int64 tensor, got ",
                    ctr.sizes(), " ", ctr.scalar_type());
  const ChaChaKey k = chacha_key("chacha20", key, nonce);
  const Tensor c = ctr.contiguous();
  Tensor out = at::empty({c.size(0), 16}, c.options());
  ChaChaBlocks f{c.data_ptr<int64_t>(), out.data_ptr<int64_t>(), k};
  for_each(c, c.size(0), f);
  return out;
}

void secure_noise_impls(torch::Library& m) {
  m.impl("cuda_secure_noise", &secure_noise);
  m.impl("cuda_chacha20", &chacha20);
}

}  // namespace dpk

TORCH_LIBRARY_FRAGMENT(dpkernels, m) {
  m.def("cuda_chacha20(Tensor ctr, int[] key, int[] nonce) -> Tensor");
  m.def(
      "cuda_secure_noise(Tensor like, Tensor? prev, int[] shape, float noise_std, float scale, int[] key, int[] nonce) "
      "-> Tensor");
}
DPK_REGISTER(dpk::secure_noise_impls)
