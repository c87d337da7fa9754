// The device code of the compiled backend: every kernel is one of these functors, f(j) for j in
// [0, n), written once `__host__ __device__`. The CPU runs them with at::parallel_for (dpk.h's
// for_each), CUDA as a grid-stride kernel (kernels.cu), so the CPU build and its tests execute the
// very code the GPU runs, and the noise is the same stream on both.
//
// Light on purpose (c10's Half and BFloat16 only, no ATen): kernels.cu includes it alone, which keeps
// nvcc's time down.
//
// Accumulation order (what the certified norm bounds assume): every sum here is a plain sequential
// sum in acc_t (fp32, fp64 for fp64 inputs) of products of inputs converted to acc_t, in the order of
// its loop; no tree, no compensated or lower-precision step.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define DPK_HD __host__ __device__ __forceinline__
#else
#define DPK_HD inline
#endif

namespace dpk {

// The accumulation type of an input type: double for double, float for the rest.
template <class T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ----------------------------------------------------------------------------- noise

struct U4 {
  uint32_t v[4];
};

// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11): counter (c0..c3), key (k0, k1). The same rounds
// as Triton's tl.randint4x, so a tensor's noise is the Triton backend's up to the last bits of
// logf/cosf (tests compare them elementwise).
DPK_HD U4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return U4{{c0, c1, c2, c3}};
}

// A uniform float in [0, 1) from 32 random bits, as tl.rand: the bits as int32, negatives flipped.
DPK_HD float uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  if (i < 0) i = ~i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// A standard normal keyed by (seed, j): Philox on counter (j_lo, j_hi, 0, 0) with key (seed_lo,
// seed_hi), Box-Muller on the first two words (tl.randn). In float32 for every output dtype.
DPK_HD float randn(uint64_t seed, uint64_t j) {
  const U4 r = philox4x32_10(uint32_t(j), uint32_t(j >> 32), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
  float u1 = uint_to_uniform(r.v[0]);
  const float u2 = uint_to_uniform(r.v[1]);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float rad = sqrtf(-2.0f * logf(u1));
  return rad * cosf(th);
}

// The epilogue of output element j: scale * (v + prev[j] + noise_std * z_j) in acc_t (prev optional).
template <class acc_t>
struct Noise {
  const acc_t* prev;
  acc_t noise_std, scale;
  uint64_t seed;
  bool noise;
  DPK_HD acc_t operator()(acc_t v, int64_t j) const {
    if (prev) v += prev[j];
    if (noise) v += static_cast<acc_t>(randn(seed, static_cast<uint64_t>(j))) * noise_std;
    return v * scale;
  }
};

// The epilogue over a flat output: out[j] = epi(x[j], j), rounded once to out_t; x (acc_t) optional
// (nullptr: 0), may alias out.
template <class acc_t, class out_t>
struct Epilogue {
  const acc_t* x;
  out_t* out;
  Noise<acc_t> epi;
  DPK_HD void operator()(int64_t j) const { out[j] = static_cast<out_t>(epi(x ? x[j] : acc_t(0), j)); }
};

// The raw generator, for the tests: out[j, :] = philox4x32_10(ctr[j, :], key), uint32 words held in int64;
// and z[j] = randn(seed, j). Run on the CPU and on CUDA, they check that both draw the same numbers.
struct PhiloxBlocks {
  const int64_t* ctr;  // (N, 4)
  int64_t* out;        // (N, 4)
  uint32_t k0, k1;
  DPK_HD void operator()(int64_t j) const {
    const int64_t* c = ctr + 4 * j;
    const U4 r = philox4x32_10(uint32_t(c[0]), uint32_t(c[1]), uint32_t(c[2]), uint32_t(c[3]), k0, k1);
    for (int q = 0; q < 4; ++q) out[4 * j + q] = int64_t(r.v[q]);
  }
};

// ----------------------------------------------------------------------------- column sums (bias, affine)

// s[i, c] = sum_t (x[i, t, c] *) g[i, t, c], sequential over t; one j per (i, c). Strided (B, T, C) views.
template <class in_t, class acc_t>
struct ColSum {
  const in_t* x;  // optional multiplier (nullptr: 1)
  const in_t* g;
  acc_t* out;  // (B, C)
  int64_t T, C, xb, xt, xc, gb, gt, gc;
  DPK_HD void operator()(int64_t j) const {
    const int64_t i = j / C, c = j - i * C;
    const in_t* gp = g + i * gb + c * gc;
    acc_t s = 0;
    if (x) {
      const in_t* xp = x + i * xb + c * xc;
      for (int64_t t = 0; t < T; ++t) s += static_cast<acc_t>(xp[t * xt]) * static_cast<acc_t>(gp[t * gt]);
    } else {
      for (int64_t t = 0; t < T; ++t) s += static_cast<acc_t>(gp[t * gt]);
    }
    out[j] = s;
  }
};

// n[i] = sum_c s[i, c]^2 (or sum_c s[i, c] when !square), sequential over c; one j per sample.
template <class acc_t>
struct RowSum {
  const acc_t* s;  // (B, C)
  acc_t* out;
  int64_t C;
  bool square;
  DPK_HD void operator()(int64_t i) const {
    acc_t n = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = s[i * C + c];
      n += square ? v * v : v;
    }
    out[i] = n;
  }
};

// out[c] = epi(sum_i clip_i s[i, c], c), sequential over i; one j per column.
template <class acc_t>
struct WeightedSum {
  const acc_t* s;  // (B, C)
  const acc_t* clip;
  acc_t* out;
  int64_t B, C;
  Noise<acc_t> epi;
  DPK_HD void operator()(int64_t c) const {
    acc_t v = 0;
    for (int64_t i = 0; i < B; ++i) v += clip[i] * s[i * C + c];
    out[c] = epi(v, c);
  }
};

// ----------------------------------------------------------------------------- embedding

// Per (i, d): sum over the distinct ids v of sample i of (sum_{t: x_it = v} g_itd)^2, walking the
// sample's ids in sorted order (runs of equal ids are adjacent), padding tokens skipped; sequential.
template <class in_t, class acc_t>
struct EmbNormPart {
  const int64_t* sorted;  // (B, T) ids sorted per sample
  const int64_t* perm;    // (B, T) their positions t
  const in_t* g;          // (B, T, D) contiguous
  acc_t* out;             // (B, D)
  int64_t T, D, pad;      // pad < 0: none
  DPK_HD void operator()(int64_t j) const {
    const int64_t i = j / D, d = j - i * D;
    acc_t total = 0, run = 0;
    int64_t cur = -1;
    for (int64_t k = 0; k < T; ++k) {
      const int64_t v = sorted[i * T + k];
      if (v == pad) continue;
      if (v != cur) {
        total += run * run;
        run = 0;
        cur = v;
      }
      run += static_cast<acc_t>(g[(i * T + perm[i * T + k]) * D + d]);
    }
    out[j] = total + run * run;
  }
};

// total[v, d] = sum over the run of rows k with id v (ids sorted over the whole batch) of clip_i g[n, d],
// n = perm[k] the flat (i, t) position, i = n / T; one j per (k, d), only run starts write.
template <class in_t, class acc_t>
struct EmbScatter {
  const int64_t* sorted;  // (N,) flat ids, sorted
  const int64_t* perm;    // (N,)
  const in_t* g;          // (N, D) contiguous
  const acc_t* clip;      // (B,)
  acc_t* total;           // (V, D), zero where no run writes
  int64_t N, T, D, pad;
  DPK_HD void operator()(int64_t j) const {
    const int64_t k = j / D, d = j - k * D;
    const int64_t v = sorted[k];
    if (v == pad || (k > 0 && sorted[k - 1] == v)) return;
    acc_t s = 0;
    for (int64_t q = k; q < N && sorted[q] == v; ++q) {
      const int64_t n = perm[q];
      s += clip[n / T] * static_cast<acc_t>(g[n * D + d]);
    }
    total[v * D + d] = s;
  }
};

// q[i, t] = sum_s g_h[i, s, x_it] * (a_is . g_e,it), sequential over s and over the dot's D; 0 for
// padding tokens. One j per (i, t).
template <class in_t, class acc_t>
struct EmbCross {
  const int64_t* ids;  // (B, Te)
  const in_t* ge;      // (B, Te, D) contiguous
  const in_t* a;       // (B, Th, D) contiguous
  const in_t* gh;      // (B, Th, V) contiguous
  acc_t* out;          // (B, Te)
  int64_t Te, Th, D, V, pad;
  DPK_HD void operator()(int64_t j) const {
    const int64_t i = j / Te;
    const int64_t v = ids[j];
    if (v == pad) {
      out[j] = 0;
      return;
    }
    const in_t* e = ge + j * D;
    acc_t q = 0;
    for (int64_t s = 0; s < Th; ++s) {
      const in_t* as = a + (i * Th + s) * D;
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(as[d]) * static_cast<acc_t>(e[d]);
      q += static_cast<acc_t>(gh[(i * Th + s) * V + v]) * dot;
    }
    out[j] = q;
  }
};

// ----------------------------------------------------------------------------- launch

// Defined in kernels.cu for every functor type it instantiates: f(j) for j in [0, n) on the current
// CUDA stream of `device`.
template <class F>
void launch_cuda(const F& f, int64_t n, int device);

}  // namespace dpk
