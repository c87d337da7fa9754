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
// Fixed-count loops over a tile thread's registers: unrolled on the GPU, so its arrays stay in
// registers (indexed at run time they would live in local memory, a stack frame in ptxas's report).
#if defined(__CUDA_ARCH__)
#define DPK_UNROLL _Pragma("unroll")
#else
#define DPK_UNROLL
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

// ----------------------------------------------------------------------------- secure-mode noise

// ChaCha20 (RFC 8439 2.3): the key (8 words) and nonce (3 words) of one (step, parameter) stream; element
// j of the stream uses the block with counter j. The same words as dpkernels/ops/reference/chacha.py.
struct ChaChaKey {
  uint32_t k[8];
  uint32_t n[3];
};

DPK_HD uint32_t rotl32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

DPK_HD void chacha_quarter(uint32_t& a, uint32_t& b, uint32_t& c, uint32_t& d) {
  a += b;
  d = rotl32(d ^ a, 16);
  c += d;
  b = rotl32(b ^ c, 12);
  a += b;
  d = rotl32(d ^ a, 8);
  c += d;
  b = rotl32(b ^ c, 7);
}

// The 16 output words of the block with counter `ctr`: 20 rounds (10 column + diagonal pairs), input added.
DPK_HD void chacha20_block(const ChaChaKey& key, uint32_t ctr, uint32_t out[16]) {
  uint32_t in[16] = {0x61707865u, 0x3320646Eu, 0x79622D32u, 0x6B206574u, key.k[0], key.k[1], key.k[2], key.k[3],
                     key.k[4],    key.k[5],    key.k[6],    key.k[7],    ctr,      key.n[0], key.n[1], key.n[2]};
  uint32_t x[16];
  for (int q = 0; q < 16; ++q) x[q] = in[q];
  for (int r = 0; r < 10; ++r) {
    chacha_quarter(x[0], x[4], x[8], x[12]);
    chacha_quarter(x[1], x[5], x[9], x[13]);
    chacha_quarter(x[2], x[6], x[10], x[14]);
    chacha_quarter(x[3], x[7], x[11], x[15]);
    chacha_quarter(x[0], x[5], x[10], x[15]);
    chacha_quarter(x[1], x[6], x[11], x[12]);
    chacha_quarter(x[2], x[7], x[8], x[13]);
    chacha_quarter(x[3], x[4], x[9], x[14]);
  }
  for (int q = 0; q < 16; ++q) out[q] = x[q] + in[q];
}

// (a + 1) 2^-53 with a the top 53 bits of hi:lo, a uniform on (0, 1], exact in double.
DPK_HD double uniform53(uint32_t lo, uint32_t hi) {
  const uint64_t a = (uint64_t(hi) << 21) | (lo >> 11);
  return double(a + 1) * 1.1102230246251565e-16;
}

// The secure Gaussian of element j: four Box-Muller normals from the block's first eight words, summed and
// halved, in double (the reference's construction and order of operations; see chacha.py for why).
DPK_HD double secure_randn(const ChaChaKey& key, uint64_t j) {
  uint32_t w[16];
  chacha20_block(key, uint32_t(j), w);
  const double r1 = ::sqrt(-2.0 * ::log(uniform53(w[0], w[1])));
  const double t1 = 6.283185307179586 * uniform53(w[2], w[3]);
  const double r2 = ::sqrt(-2.0 * ::log(uniform53(w[4], w[5])));
  const double t2 = 6.283185307179586 * uniform53(w[6], w[7]);
  return (((r1 * ::cos(t1) + r1 * ::sin(t1)) + r2 * ::cos(t2)) + r2 * ::sin(t2)) * 0.5;
}

// out[j] = scale * (prev[j] + noise_std * z_j) in double, rounded once to out_t (prev: double, optional).
template <class out_t>
struct SecureNoise {
  const double* prev;
  out_t* out;
  double noise_std, scale;
  ChaChaKey key;
  DPK_HD void operator()(int64_t j) const {
    double v = noise_std * secure_randn(key, static_cast<uint64_t>(j));
    if (prev) v = prev[j] + v;
    out[j] = static_cast<out_t>(v * scale);
  }
};

// The raw blocks, for the tests: out[j, :] = chacha20_block(key, ctr[j]), uint32 words held in int64.
struct ChaChaBlocks {
  const int64_t* ctr;
  int64_t* out;
  ChaChaKey key;
  DPK_HD void operator()(int64_t j) const {
    uint32_t w[16];
    chacha20_block(key, uint32_t(ctr[j]), w);
    for (int q = 0; q < 16; ++q) out[16 * j + q] = int64_t(w[q]);
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

// out[c] = epi(sum_i clip_i s[i, c], c), sequential over i; one j per column. A sample with clip_i = 0
// adds exactly 0 (skipped, not multiplied: its s may be inf or NaN, and 0 * inf is NaN).
template <class acc_t>
struct WeightedSum {
  const acc_t* s;  // (B, C)
  const acc_t* clip;
  acc_t* out;
  int64_t B, C;
  Noise<acc_t> epi;
  DPK_HD void operator()(int64_t c) const {
    acc_t v = 0;
    for (int64_t i = 0; i < B; ++i)
      if (clip[i] != acc_t(0)) v += clip[i] * s[i * C + c];
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
// n = perm[k] the flat (i, t) position, i = n / T; one j per (k, d), only run starts write. Rows of
// samples with clip_i = 0 are skipped (they add exactly 0, even inf or NaN ones).
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
      const acc_t ci = clip[n / T];
      if (ci != acc_t(0)) s += ci * static_cast<acc_t>(g[n * D + d]);
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

// ----------------------------------------------------------------------------- Linear clipped sum (tiles)

// Block-synchronous kernels. A tile functor describes one thread block's work in phases separated by
// barriers: zero(regs); per step k of steps(b): load(smem, regs, b, k, tid) for every thread, barrier,
// mma(smem, regs, b, k, tid), barrier; then store(smem, regs, b, tid), barrier, flush(smem, b, tid)
// (a block reduction through shared memory; empty for the clipped sums). kernels.cu runs a block per b
// with THREADS threads and __syncthreads() as the barrier; the CPU (dpk.h's for_each_tile) runs the
// same phases thread after thread. So the CPU build runs the GPU's device code, barrier for barrier.

// a / d for 0 <= a < 2^52 and 0 < d by a multiplication with d's reciprocal and a +-1 correction: no
// 64-bit integer division, which is a called subroutine on the GPU (its call spilled registers in the
// tile loader) and slow.
struct Divisor {
  int64_t d;
  double inv;
  static Divisor of(int64_t d) { return Divisor{d, 1.0 / static_cast<double>(d > 0 ? d : 1)}; }
  DPK_HD int64_t div(int64_t a) const {
    int64_t q = static_cast<int64_t>(static_cast<double>(a) * inv);
    if (q * d > a) --q;
    if ((q + 1) * d <= a) ++q;
    return q;
  }
};

// The operands of a clipped sum as a matrix product W = sum_k c_{i(k)} g_k^T a_k: `row(k, grp, r)` finds
// row k of the reduction (for group grp) and returns its sample i, `g_at(r, p)` and `a_at(r, d)` read
// its entries in acc_t.

// Linear: row k = (i, t) of (B, T, *) strided views.
template <class in_t, class acc_t>
struct LinearOperands {
  const in_t* a;  // (B, T, D)
  const in_t* g;  // (B, T, P)
  Divisor T;
  int64_t sab, sat, sad, sgb, sgt, sgp;
  struct Row {
    const in_t* g;
    const in_t* a;
  };
  DPK_HD int64_t row(int64_t k, int64_t, Row& r) const {
    const int64_t i = T.div(k), t = k - i * T.d;
    r.g = g + i * sgb + t * sgt;
    r.a = a + i * sab + t * sat;
    return i;
  }
  DPK_HD acc_t g_at(const Row& r, int64_t p) const { return static_cast<acc_t>(r.g[p * sgp]); }
  DPK_HD acc_t a_at(const Row& r, int64_t d) const { return static_cast<acc_t>(r.a[d * sad]); }
};

// Conv1d/2d/3d, implicit GEMM: row k = (i, o), o an output position; group grp's columns d = (ci, k_1..k_n)
// of its flattened weight read x at o * stride - padding + k * dilation (0 outside x), so the unfold
// is gathered tile by tile and never written.
template <class in_t, class acc_t>
struct ConvOperands {
  const in_t* x;  // (B, C_in, *S) strided
  const in_t* g;  // (B, C_out, *out) strided
  int n;          // spatial dims, 1 to 3
  Divisor O;                 // output positions per sample
  int64_t cin_g, cout_g;     // channels per group
  Divisor out[3], k[3];      // output and kernel sizes
  int64_t in[3], stride[3], pad[3], dil[3];
  int64_t sxb, sxc, sx[3], sgb, sgc, sg[3];
  struct Row {
    const in_t* g;
    const in_t* x;
    int64_t base[3];  // o * stride - padding per spatial dim
  };
  DPK_HD int64_t row(int64_t kk, int64_t grp, Row& r) const {
    const int64_t i = O.div(kk);
    int64_t o = kk - i * O.d, goff = i * sgb + grp * cout_g * sgc;
    DPK_UNROLL
    for (int q = 2; q >= 0; --q) {  // a fixed trip count: unrolled, the arrays stay in registers
      if (q >= n) continue;
      const int64_t o_next = out[q].div(o), oq = o - o_next * out[q].d;
      o = o_next;
      goff += oq * sg[q];
      r.base[q] = oq * stride[q] - pad[q];
    }
    r.g = g + goff;
    r.x = x + i * sxb + grp * cin_g * sxc;
    return i;
  }
  DPK_HD acc_t g_at(const Row& r, int64_t p) const { return static_cast<acc_t>(r.g[p * sgc]); }
  DPK_HD acc_t a_at(const Row& r, int64_t d) const {
    int64_t off = 0;
    DPK_UNROLL
    for (int q = 2; q >= 0; --q) {
      if (q >= n) continue;
      const int64_t d_next = k[q].div(d), kq = d - d_next * k[q].d;
      d = d_next;
      const int64_t pos = r.base[q] + kq * dil[q];
      if (pos < 0 || pos >= in[q]) return acc_t(0);
      off += pos * sx[q];
    }
    return static_cast<acc_t>(r.x[d * sxc + off]);  // d is now the channel within the group
  }
};

// The shared pieces of the (64 x 64 outputs, 16-row step, 256 threads of 4 x 4) GEMM tiles: the
// ClippedGemm and the instantiation norm tiles.
//
// load: thread (kk = tid / 16, lane = tid % 16) brings row k of the reduction (for group grp; ok: k
// is in range) into row kk of the G and A tiles, columns p0 + lane + 16 q and d0 + lane + 16 q,
// G's entries scaled by clip[i(k)] (clip nullptr: by nothing), 0 outside (P, D) or past the rows, and
// both G's and A's row 0 when clip[i(k)] is 0: that sample adds exactly 0, even with inf or NaN entries.
template <int BK, int BP, int BD, class acc_t, class Ops>
DPK_HD void gemm_load(const Ops& ops, acc_t (*sg)[BP + 16], acc_t (*sa)[BD + 16], int64_t k, bool ok, int64_t grp,
                      const acc_t* clip, int64_t p0, int64_t d0, int64_t P, int64_t D, int tid) {
  const int kk = tid / 16, lane = tid % 16;
  typename Ops::Row r{};
  acc_t ci = acc_t(0);
  if (ok) {
    const int64_t i = ops.row(k, grp, r);
    ci = clip ? clip[i] : acc_t(1);
    ok = ci != acc_t(0);
  }
  DPK_UNROLL
  for (int q = 0; q < BP / 16; ++q) {
    const int64_t p = p0 + lane + 16 * q;
    acc_t v = acc_t(0);
    if (ok && p < P) v = clip ? ci * ops.g_at(r, p) : ops.g_at(r, p);
    sg[kk][lane + 16 * q] = v;
  }
  DPK_UNROLL
  for (int q = 0; q < BD / 16; ++q) {
    const int64_t d = d0 + lane + 16 * q;
    sa[kk][lane + 16 * q] = ok && d < D ? ops.a_at(r, d) : acc_t(0);
  }
}

// mma: thread (ty = tid / 16, tx = tid % 16) adds the BK rows' products to its outputs
// v[x][y] (p = p0 + ty + 16 x, d = d0 + tx + 16 y), row after row: a sequential sum over k.
template <int BK, int BP, int BD, class acc_t>
DPK_HD void gemm_mma(const acc_t (*sg)[BP + 16], const acc_t (*sa)[BD + 16], acc_t (&v)[BP / 16][BD / 16], int tid) {
  const int ty = tid / 16, tx = tid % 16;
  DPK_UNROLL
  for (int kk = 0; kk < BK; ++kk) {
    acc_t gv[BP / 16], av[BD / 16];
    DPK_UNROLL
    for (int x = 0; x < BP / 16; ++x) gv[x] = sg[kk][ty + 16 * x];
    DPK_UNROLL
    for (int y = 0; y < BD / 16; ++y) av[y] = sa[kk][tx + 16 * y];
    DPK_UNROLL
    for (int x = 0; x < BP / 16; ++x) {
      DPK_UNROLL
      for (int y = 0; y < BD / 16; ++y) v[x][y] += gv[x] * av[y];
    }
  }
}

// W = sum_k c_{i(k)} g_k^T a_k over the rows k of the reduction (Linear: the B*T rows (i, t); Conv: the
// B*O (sample, output position) rows, per group): one (BP x BD) tile of group grp's (P, D) block of W per
// thread block, over the rows [k_lo, k_hi) of one split. The clip factor is folded into G's rows as the
// tile is loaded (c_i g_kp rounded once to acc_t, as the reference's g.to(acc) * c), every operand
// is converted to acc_t before the product (fp32 products of 16-bit inputs: c_i g_kp cannot leave
// fp16's range because it never is fp16), and each output is a sequential fp32 (fp64) sum over k
// in increasing order. Unsplit, the epilogue scale * (v + prev + noise_std * z) is applied in
// registers and W written once; split, the raw partial sums go to a (S, groups * P, D) workspace that
// SplitFinish sums in a fixed order before the same epilogue (deterministic). W is (groups * P, D)
// row-major: a conv weight (C_out, C_in / groups * prod(k)) as it is laid out.
//
// 256 threads, a 16 x 16 grid, each owning 4 x 4 outputs strided by 16 (p = p0 + ty + 16 r,
// d = d0 + tx + 16 s: a warp reads 16 consecutive words of a shared row, no bank conflicts, and
// stores 16 consecutive columns). A load step brings BK rows of G and A: thread (kk = tid / 16)
// loads row k0 + kk, so one row lookup k -> (i, t) per thread and step.
template <class acc_t, class Ops>
struct ClippedGemm {
  static constexpr int BP = 64, BD = 64, BK = 16, THREADS = 256, TP = 4, TD = 4;
  struct Smem {  // rows padded by 16 words: the two half-warps of a load step write disjoint banks
    acc_t g[BK][BP + 16];
    acc_t a[BK][BD + 16];
  };
  struct Regs {
    acc_t v[TP][TD];
  };
  Ops ops;
  const acc_t* clip;  // (B,)
  acc_t* out;         // (groups * P, D), or (S, groups * P, D) partial sums when split
  Noise<acc_t> epi;   // unused when split
  int64_t P, D, K, k_per, tiles_d, tiles, groups;  // K rows; k_per rows per split, a multiple of BK
  bool split;

  DPK_HD void zero(Regs& r) const {
    DPK_UNROLL
    for (int x = 0; x < TP; ++x) {
      DPK_UNROLL
      for (int y = 0; y < TD; ++y) r.v[x][y] = 0;
    }
  }
  // block b = (split, group, tile) = (b / (groups tiles), b / tiles % groups, b % tiles)
  DPK_HD int64_t k_lo(int64_t b) const { return (b / (tiles * groups)) * k_per; }
  DPK_HD int64_t k_hi(int64_t b) const { return k_lo(b) + k_per < K ? k_lo(b) + k_per : K; }
  DPK_HD int64_t steps(int64_t b) const { return (k_hi(b) - k_lo(b) + BK - 1) / BK; }
  DPK_HD int64_t group(int64_t b) const { return (b / tiles) % groups; }
  DPK_HD void origin(int64_t b, int64_t& p0, int64_t& d0) const {
    const int64_t tile = b % tiles;
    p0 = (tile / tiles_d) * BP;
    d0 = (tile % tiles_d) * BD;
  }
  DPK_HD void load(Smem& sm, Regs&, int64_t b, int64_t step, int tid) const {
    int64_t p0, d0;
    origin(b, p0, d0);
    const int64_t k = k_lo(b) + step * BK + tid / 16;
    gemm_load<BK, BP, BD, acc_t>(ops, sm.g, sm.a, k, k < k_hi(b), group(b), clip, p0, d0, P, D, tid);
  }
  DPK_HD void mma(const Smem& sm, Regs& r, int64_t, int64_t, int tid) const { gemm_mma<BK, BP, BD>(sm.g, sm.a, r.v, tid); }
  DPK_HD void store(Smem&, const Regs& r, int64_t b, int tid) const {
    int64_t p0, d0;
    origin(b, p0, d0);
    const int ty = tid / 16, tx = tid % 16;
    acc_t* o = split ? out + (b / (tiles * groups)) * groups * P * D : out;
    const int64_t row0 = group(b) * P;
    DPK_UNROLL
    for (int x = 0; x < TP; ++x) {
      const int64_t p = p0 + ty + 16 * x;
      if (p >= P) continue;
      DPK_UNROLL
      for (int y = 0; y < TD; ++y) {
        const int64_t d = d0 + tx + 16 * y;
        if (d >= D) continue;
        const int64_t j = (row0 + p) * D + d;
        o[j] = split ? r.v[x][y] : epi(r.v[x][y], j);
      }
    }
  }
  DPK_HD void flush(const Smem&, int64_t, int) const {}
};

// out[j] = epi(sum_s ws[s, j], j), the splits summed in order; one j per output element.
template <class acc_t>
struct SplitFinish {
  const acc_t* ws;  // (S, n)
  acc_t* out;       // (n,)
  int64_t S, n;
  Noise<acc_t> epi;
  DPK_HD void operator()(int64_t j) const {
    acc_t v = 0;
    for (int64_t s = 0; s < S; ++s) v += ws[s * n + j];
    out[j] = epi(v, j);
  }
};

// ----------------------------------------------------------------------------- per-sample norm tiles (Conv)

// The per-sample weight norm of a Conv layer, sum_j ||G_ij^T A_ij||_F^2 over groups j (A_ij the
// unfold of sample i's group-j channels, T x D, D = C_in / groups * prod(k); G_ij its output gradient,
// T x P), by tiles that gather A from x as they load it (Ops = ConvOperands, row k = i T + t): the
// unfold is never written. Each block writes one partial sum to a workspace; RowSum then adds a (sample,
// group)'s partials in order, and a sample's groups in order (dpk.h). Every sum is a plain sum in
// acc_t of products of inputs converted to acc_t: the Gram and dot products sequentially over their
// reduction (d, p or t), a thread's 16 terms sequentially, the block's 256 thread sums sequentially
// (thread 0), the blocks' partials sequentially. Terms outside the matrices are exact zeros (adding
// them rounds nothing), so a term passes through at most (number of terms - 1) rounded additions, the
// chain length of a sequential sum, whatever the grouping.

// Ghost norm: ||G_ij^T A_ij||^2 = sum_{t,s} (A A^T)_ts (G G^T)_ts. One block per (sample, group,
// (ta, tb) pair of 64-row tiles with ta <= tb): it forms the (ta, tb) tiles of A A^T (over d, D / 16
// steps, A's rows gathered from x) and of G G^T (over p, P / 16 steps) in registers (4 x 4 of each per
// thread), then sum_{t,s} of their product, doubled off the diagonal (the Grams are symmetric, and
// their (s, t) entries are the same rounded sums of the same products: the doubling, exact, adds the
// mirror tile exactly). T x T is never stored anywhere; registers hold one tile of each Gram.
template <class acc_t, class Ops>
struct GhostNormTiles {
  static constexpr int BT = 64, BK = 16, THREADS = 256, TT = 4;
  struct Smem {
    acc_t u[BK][BT];  // step's columns of rows ta (A or G), [column][row]: a warp writes 32 rows of one column
    acc_t v[BK][BT];  // and of rows tb
    acc_t red[THREADS];
  };
  struct Regs {
    acc_t a[TT][TT];  // (A A^T)[t0 + ty + 16 x, s0 + tx + 16 y]
    acc_t g[TT][TT];  // (G G^T)[...]
  };
  Ops ops;
  acc_t* out;  // (B * groups * pairs,) one partial per block
  int64_t T, P, D, groups, nt, pairs, steps_a, steps_g;  // nt = ceil(T / BT) tiles, pairs = nt (nt + 1) / 2

  DPK_HD void zero(Regs& r) const {
    DPK_UNROLL
    for (int x = 0; x < TT; ++x) {
      DPK_UNROLL
      for (int y = 0; y < TT; ++y) r.a[x][y] = r.g[x][y] = acc_t(0);
    }
  }
  DPK_HD int64_t steps(int64_t) const { return steps_a + steps_g; }
  // block b = (sample, group, pair); pair = tb (tb + 1) / 2 + ta, ta <= tb
  DPK_HD void where(int64_t b, int64_t& i, int64_t& grp, int64_t& t0, int64_t& s0) const {
    const int64_t pair = b % pairs, ig = b / pairs;
    i = ig / groups;
    grp = ig - i * groups;
    int64_t tb = static_cast<int64_t>((::sqrt(8.0 * static_cast<double>(pair) + 1.0) - 1.0) * 0.5);
    while (tb * (tb + 1) / 2 > pair) --tb;
    while ((tb + 1) * (tb + 2) / 2 <= pair) ++tb;
    t0 = (pair - tb * (tb + 1) / 2) * BT;
    s0 = tb * BT;
  }
  // Thread tid loads row (tid % 64) of both tiles, columns 4 (tid / 64) .. + 3 of the step's 16: A's
  // columns d (steps [0, steps_a)), then G's columns p.
  DPK_HD void load(Smem& sm, Regs&, int64_t b, int64_t step, int tid) const {
    int64_t i, grp, t0, s0;
    where(b, i, grp, t0, s0);
    const int row = tid % BT, c0 = 4 * (tid / BT);
    const bool gram_a = step < steps_a;
    const int64_t col0 = (gram_a ? step : step - steps_a) * BK + c0, ncol = gram_a ? D : P;
    const int64_t t = t0 + row, s = s0 + row;
    typename Ops::Row rt{}, rs{};
    if (t < T) ops.row(i * T + t, grp, rt);
    if (s < T) ops.row(i * T + s, grp, rs);
    DPK_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int64_t c = col0 + e;
      acc_t ut = acc_t(0), vs = acc_t(0);
      if (c < ncol) {
        if (t < T) ut = gram_a ? ops.a_at(rt, c) : ops.g_at(rt, c);
        if (s < T) vs = gram_a ? ops.a_at(rs, c) : ops.g_at(rs, c);
      }
      sm.u[c0 + e][row] = ut;
      sm.v[c0 + e][row] = vs;
    }
  }
  DPK_HD static void outer(const Smem& sm, acc_t (&v)[TT][TT], int tid) {
    const int ty = tid / 16, tx = tid % 16;
    DPK_UNROLL
    for (int kk = 0; kk < BK; ++kk) {
      acc_t uv[TT], vv[TT];
      DPK_UNROLL
      for (int x = 0; x < TT; ++x) uv[x] = sm.u[kk][ty + 16 * x];
      DPK_UNROLL
      for (int y = 0; y < TT; ++y) vv[y] = sm.v[kk][tx + 16 * y];
      DPK_UNROLL
      for (int x = 0; x < TT; ++x) {
        DPK_UNROLL
        for (int y = 0; y < TT; ++y) v[x][y] += uv[x] * vv[y];
      }
    }
  }
  DPK_HD void mma(const Smem& sm, Regs& r, int64_t, int64_t step, int tid) const {
    if (step < steps_a)
      outer(sm, r.a, tid);
    else
      outer(sm, r.g, tid);
  }
  DPK_HD void store(Smem& sm, const Regs& r, int64_t, int tid) const {
    acc_t part = acc_t(0);
    DPK_UNROLL
    for (int x = 0; x < TT; ++x) {
      DPK_UNROLL
      for (int y = 0; y < TT; ++y) part += r.a[x][y] * r.g[x][y];
    }
    sm.red[tid] = part;
  }
  DPK_HD void flush(const Smem& sm, int64_t b, int tid) const {
    if (tid != 0) return;
    acc_t s = acc_t(0);
    for (int q = 0; q < THREADS; ++q) s += sm.red[q];
    int64_t i, grp, t0, s0;
    where(b, i, grp, t0, s0);
    out[b] = t0 == s0 ? s : acc_t(2) * s;
  }
};

// Instantiation: ||G_ij^T A_ij||^2 = sum_{p,d} (sum_t g_tp a_td)^2. One block per (split, sample, group,
// 64 x 64 tile of G^T A): the GEMM tiles of the clipped sum (gemm_load without clip factors, gemm_mma)
// over the rows t of the split; unsplit, the sum of the tile's squares (a block partial, to `out`
// (B * groups * tiles,)); split (when the tiles are too few to fill the GPU), the raw tile of G^T A to a
// (S, B * groups * P, D) workspace, squared after its splits are summed in order (SplitSquares).
template <class acc_t, class Ops>
struct InstNormTiles {
  static constexpr int BP = 64, BD = 64, BK = 16, THREADS = 256, TP = 4, TD = 4;
  struct Smem {  // as ClippedGemm's
    acc_t g[BK][BP + 16];
    acc_t a[BK][BD + 16];
    acc_t red[THREADS];
  };
  struct Regs {
    acc_t v[TP][TD];
  };
  Ops ops;
  acc_t* out;
  int64_t B, T, P, D, groups, t_per, tiles_d, tiles;  // t_per rows per split, a multiple of BK
  bool split;

  DPK_HD void zero(Regs& r) const {
    DPK_UNROLL
    for (int x = 0; x < TP; ++x) {
      DPK_UNROLL
      for (int y = 0; y < TD; ++y) r.v[x][y] = acc_t(0);
    }
  }
  // block b = (split, sample, group, tile); ig = sample * groups + group
  DPK_HD int64_t ig(int64_t b) const { return (b / tiles) % (B * groups); }
  DPK_HD int64_t t_lo(int64_t b) const { return (b / (tiles * B * groups)) * t_per; }
  DPK_HD int64_t t_hi(int64_t b) const { return t_lo(b) + t_per < T ? t_lo(b) + t_per : T; }
  DPK_HD int64_t steps(int64_t b) const { return (t_hi(b) - t_lo(b) + BK - 1) / BK; }
  DPK_HD void origin(int64_t b, int64_t& p0, int64_t& d0) const {
    const int64_t tile = b % tiles;
    p0 = (tile / tiles_d) * BP;
    d0 = (tile % tiles_d) * BD;
  }
  DPK_HD void load(Smem& sm, Regs&, int64_t b, int64_t step, int tid) const {
    int64_t p0, d0;
    origin(b, p0, d0);
    const int64_t n = ig(b), i = n / groups, t = t_lo(b) + step * BK + tid / 16;
    gemm_load<BK, BP, BD, acc_t>(ops, sm.g, sm.a, i * T + t, t < t_hi(b), n - i * groups,
                                 static_cast<const acc_t*>(nullptr), p0, d0, P, D, tid);
  }
  DPK_HD void mma(const Smem& sm, Regs& r, int64_t, int64_t, int tid) const {
    gemm_mma<BK, BP, BD>(sm.g, sm.a, r.v, tid);
  }
  DPK_HD void store(Smem& sm, const Regs& r, int64_t b, int tid) const {
    if (split) {
      int64_t p0, d0;
      origin(b, p0, d0);
      const int ty = tid / 16, tx = tid % 16;
      acc_t* o = out + (b / (tiles * B * groups)) * B * groups * P * D + ig(b) * P * D;
      DPK_UNROLL
      for (int x = 0; x < TP; ++x) {
        const int64_t p = p0 + ty + 16 * x;
        DPK_UNROLL
        for (int y = 0; y < TD; ++y) {
          const int64_t d = d0 + tx + 16 * y;
          if (p < P && d < D) o[p * D + d] = r.v[x][y];
        }
      }
      return;
    }
    acc_t part = acc_t(0);
    DPK_UNROLL
    for (int x = 0; x < TP; ++x) {
      DPK_UNROLL
      for (int y = 0; y < TD; ++y) part += r.v[x][y] * r.v[x][y];
    }
    sm.red[tid] = part;
  }
  DPK_HD void flush(const Smem& sm, int64_t b, int tid) const {
    if (split || tid != 0) return;
    acc_t s = acc_t(0);
    for (int q = 0; q < THREADS; ++q) s += sm.red[q];
    out[b] = s;
  }
};

// out[row] = sum_d (sum_s ws[s, row, d])^2: the splits of a row of G^T A summed in order, then its
// squares in order; one j per row (B * groups * P rows of D).
template <class acc_t>
struct SplitSquares {
  const acc_t* ws;  // (S, rows * D)
  acc_t* out;       // (rows,)
  int64_t S, D, n;  // n = rows * D
  DPK_HD void operator()(int64_t row) const {
    acc_t tot = acc_t(0);
    for (int64_t d = 0; d < D; ++d) {
      acc_t v = acc_t(0);
      for (int64_t s = 0; s < S; ++s) v += ws[s * n + row * D + d];
      tot += v * v;
    }
    out[row] = tot;
  }
};

// ----------------------------------------------------------------------------- launch

// Defined in kernels.cu for every functor type it instantiates: f(j) for j in [0, n) on the current
// CUDA stream of `device`.
template <class F>
void launch_cuda(const F& f, int64_t n, int device);
// And for every tile functor: `blocks` blocks of F::THREADS threads (see ClippedGemm, GhostNormTiles).
template <class F>
void launch_tiles_cuda(const F& f, int64_t blocks, int device);
// The number of streaming multiprocessors of `device` (to size split-K).
int cuda_sm_count(int device);

}  // namespace dpk
