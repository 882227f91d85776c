// SiluMul on the GPU: Y[r, j] = silu(X[r, j]) * X[r, N + j] for X [rows, 2N] fp16, Y [rows, N] fp16 (an MLP's gate and
// up projections computed as one MatMulInt4 of 2N rows, ops.cc). Computed in float, rounded once to fp16; one
// thread per output pair when N is even (two halves a load and a store), else per output. Launched on `stream`
// alone: nothing allocated, nothing synchronised, so it is captured into a CUDA graph with the rest.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

__global__ void __launch_bounds__(kThreads)
    silu_mul_pairs(const __half2* __restrict__ X, __half2* __restrict__ Y, int64_t rows, int64_t half_n) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * half_n) return;
  const int64_t r = idx / half_n;
  const int64_t j = idx % half_n;
  const float2 g = __half22float2(X[r * 2 * half_n + j]);
  const float2 u = __half22float2(X[r * 2 * half_n + half_n + j]);
  Y[idx] = __floats2half2_rn(silu_times(g.x, u.x), silu_times(g.y, u.y));
}

__global__ void __launch_bounds__(kThreads)
    silu_mul_single(const __half* __restrict__ X, __half* __restrict__ Y, int64_t rows, int64_t n) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * n) return;
  const int64_t r = idx / n;
  const int64_t j = idx % n;
  Y[idx] = __float2half_rn(silu_times(__half2float(X[r * 2 * n + j]), __half2float(X[r * 2 * n + n + j])));
}

}  // namespace

// 0, or a cudaError_t of the launch. X and Y 4-byte aligned where N is even (onnxruntime's buffers are).
extern "C" int onnxpipe_silu_mul(const void* X, void* Y, int64_t rows, int64_t n, void* stream) {
  if (rows <= 0 || n <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool pairs = n % 2 == 0 && (reinterpret_cast<uintptr_t>(X) | reinterpret_cast<uintptr_t>(Y)) % 4 == 0;
  const int64_t items = pairs ? rows * (n / 2) : rows * n;
  const unsigned blocks = (unsigned)((items + kThreads - 1) / kThreads);
  if (pairs) {
    silu_mul_pairs<<<blocks, kThreads, 0, st>>>(static_cast<const __half2*>(X), static_cast<__half2*>(Y), rows, n / 2);
  } else {
    silu_mul_single<<<blocks, kThreads, 0, st>>>(static_cast<const __half*>(X), static_cast<__half*>(Y), rows, n);
  }
  return (int)cudaGetLastError();
}
