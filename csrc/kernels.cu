// The CUDA side of dpk::for_each: one grid-stride kernel per functor of kernels.h, instantiated here
// for the types the host code uses (a missing one is an undefined symbol when the library loads).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels.h"

namespace dpk {

template <class F>
__global__ void __launch_bounds__(256) each_kernel(F f, int64_t n) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) f(j);
}

template <class F>
void launch_cuda(const F& f, int64_t n, int device) {
  if (n <= 0) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20);
  each_kernel<F><<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream(device)>>>(f, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A block-synchronous tile functor (kernels.h, ClippedGemm): one block per tile b, barriers between phases.
// Two blocks an SM as ptxas's occupancy target (up to 128 registers a thread): at its default target
// it squeezed the fp16 Linear tiles into 64 registers with a spill.
template <class F>
__global__ void __launch_bounds__(F::THREADS, 2) tile_kernel(F f) {
  __shared__ typename F::Smem sm;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  typename F::Regs r;
  f.zero(r);
  const int64_t steps = f.steps(b);
  for (int64_t k = 0; k < steps; ++k) {
    f.load(sm, r, b, k, tid);
    __syncthreads();
    f.mma(sm, r, b, k, tid);
    __syncthreads();
  }
  f.store(sm, r, b, tid);
  __syncthreads();
  f.flush(sm, b, tid);
}

template <class F>
void launch_tiles_cuda(const F& f, int64_t blocks, int device) {
  if (blocks <= 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "dpkernels cuda backend: ", blocks, " tiles exceed the grid");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  tile_kernel<F><<<static_cast<unsigned>(blocks), F::THREADS, 0, c10::cuda::getCurrentCUDAStream(device)>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int cuda_sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

#define DPK_INST_TILES(...) template void launch_tiles_cuda<__VA_ARGS__>(const __VA_ARGS__&, int64_t, int);
DPK_INST_TILES(ClippedGemm<float, LinearOperands<c10::Half, float>>)
DPK_INST_TILES(ClippedGemm<float, LinearOperands<c10::BFloat16, float>>)
DPK_INST_TILES(ClippedGemm<float, LinearOperands<float, float>>)
DPK_INST_TILES(ClippedGemm<double, LinearOperands<double, double>>)
DPK_INST_TILES(ClippedGemm<float, ConvOperands<c10::Half, float>>)
DPK_INST_TILES(ClippedGemm<float, ConvOperands<c10::BFloat16, float>>)
DPK_INST_TILES(ClippedGemm<float, ConvOperands<float, float>>)
DPK_INST_TILES(ClippedGemm<double, ConvOperands<double, double>>)
DPK_INST_TILES(GhostNormTiles<float, ConvOperands<c10::Half, float>>)
DPK_INST_TILES(GhostNormTiles<float, ConvOperands<c10::BFloat16, float>>)
DPK_INST_TILES(GhostNormTiles<float, ConvOperands<float, float>>)
DPK_INST_TILES(GhostNormTiles<double, ConvOperands<double, double>>)
DPK_INST_TILES(InstNormTiles<float, ConvOperands<c10::Half, float>>)
DPK_INST_TILES(InstNormTiles<float, ConvOperands<c10::BFloat16, float>>)
DPK_INST_TILES(InstNormTiles<float, ConvOperands<float, float>>)
DPK_INST_TILES(InstNormTiles<double, ConvOperands<double, double>>)

#define DPK_INST(...) template void launch_cuda<__VA_ARGS__>(const __VA_ARGS__&, int64_t, int);
#define DPK_INST_IN(F)                 \
  DPK_INST(F<c10::Half, float>)        \
  DPK_INST(F<c10::BFloat16, float>)    \
  DPK_INST(F<float, float>)            \
  DPK_INST(F<double, double>)

DPK_INST(Epilogue<float, c10::Half>)
DPK_INST(Epilogue<float, c10::BFloat16>)
DPK_INST(Epilogue<float, float>)
DPK_INST(Epilogue<double, double>)
DPK_INST(PhiloxBlocks)
DPK_INST(SecureNoise<c10::Half>)
DPK_INST(SecureNoise<c10::BFloat16>)
DPK_INST(SecureNoise<float>)
DPK_INST(SecureNoise<double>)
DPK_INST(ChaChaBlocks)
DPK_INST_IN(ColSum)
DPK_INST(RowSum<float>)
DPK_INST(RowSum<double>)
DPK_INST(WeightedSum<float>)
DPK_INST(WeightedSum<double>)
DPK_INST(SplitFinish<float>)
DPK_INST(SplitFinish<double>)
DPK_INST(SplitSquares<float>)
DPK_INST(SplitSquares<double>)
DPK_INST_IN(EmbNormPart)
DPK_INST_IN(EmbScatter)
DPK_INST_IN(EmbCross)

}  // namespace dpk
