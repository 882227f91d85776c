// MatMulNBits' 4-bit weight rows dequantized to fp16, for MatMulInt4 past the small-M kernel (ops.cc: then cuBLAS).
//
//   B            uint8 [N][K / block_size][block_size / 2]: element k of a row in byte k / 2, the low nibble for
//                even k (MatMulNBits, bits = 4)
//   scales       fp16 [N][K / block_size]
//   zero_points  uint8 [N][ceil((K / block_size) / 2)], block 2j in the low nibble of byte j; NULL: 8
//   W            fp16 [rows][K] row-major: W[r, k] = (q[n0 + r, k] - zero_point) * scale, rounded once to fp16
//
// (q - zp) is an integer of at most 5 bits and the scale has 11, so their product is exact in float and the one
// rounding is to fp16: the same value as the small-M kernel's ((1024 + q) - (1024 + zp)) * scale in fp16.
// One thread per 8 weights (one 32-bit word of B: K % 32 == 0, so a row is whole words and a word lies in one
// block), one 16-byte store. Launched on `stream` alone: nothing allocated, nothing synchronised.
//
// tests/runtime/test_kernels_prefill.py runs the code above the launcher's line on the CPU under the int4 GEMM's
// host simulation, against the layout read independently.

#include "int4_gemm.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kDequantThreads = 256;

__device__ __forceinline__ uint32_t half_pair(float lo, float hi) {
  return (uint32_t)__half_as_ushort(__float2half_rn(lo)) | ((uint32_t)__half_as_ushort(__float2half_rn(hi)) << 16);
}

__global__ void __launch_bounds__(kDequantThreads)
    int4_dequant_kernel(const uint8_t* __restrict__ B, const __half* __restrict__ S, const uint8_t* __restrict__ Z,
                        __half* __restrict__ W, int64_t n0, int64_t rows, int64_t K, int block_shift) {
  const int64_t words = K / 8;  // a row's 32-bit words of B
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * words) return;
  const int64_t r = idx / words;
  const int64_t w = idx % words;
  const int64_t n = n0 + r;
  const int64_t blocks = K >> block_shift;
  const int64_t blk = (8 * w) >> block_shift;
  int zp = 8;
  if (Z != nullptr) zp = (Z[n * ((blocks + 1) / 2) + blk / 2] >> ((blk & 1) * 4)) & 0xF;
  const float scale = __half2float(S[n * blocks + blk]);
  const uint32_t word = reinterpret_cast<const uint32_t*>(B + n * (K / 2))[w];
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // byte i of the word: weights 2i (its low nibble) and 2i + 1 (its high one)
    const int lo_shift = 8 * i, hi_shift = 8 * i + 4;
    out[i] = half_pair((float)((int)((word >> lo_shift) & 0xF) - zp) * scale,
                       (float)((int)((word >> hi_shift) & 0xF) - zp) * scale);
  }
  reinterpret_cast<uint4*>(W + r * K)[w] = make_uint4(out[0], out[1], out[2], out[3]);
}

// The launch's grid: one thread per word of the rows asked for, the last block partly idle.
inline int64_t dequant_blocks(int64_t rows, int64_t K) {
  return (rows * (K / 8) + kDequantThreads - 1) / kDequantThreads;
}

// ---- the launcher (not simulated) ----

}  // namespace

// W[rows, K] (fp16, 16-byte aligned) from rows n0 .. n0 + rows of the packed weight; 0, a cudaError_t (> 0) from the
// launch, or an int4_gemm.h code (onnxpipe_int4_gemm_error names them all).
extern "C" int onnxpipe_int4_dequantize(const uint8_t* B, const void* scales, const uint8_t* zero_points, void* W,
                                        int64_t n0, int64_t rows, int64_t N, int64_t K, int64_t block_size,
                                        void* stream) {
  if (B == nullptr || scales == nullptr || W == nullptr) return ONNXPIPE_INT4_GEMM_NULL_POINTER;
  if (N < 1 || K < 1 || rows < 1 || n0 < 0 || n0 + rows > N) return ONNXPIPE_INT4_GEMM_BAD_SHAPE;
  int block_shift;
  if (block_size == 32) {
    block_shift = 5;
  } else if (block_size == 64) {
    block_shift = 6;
  } else if (block_size == 128) {
    block_shift = 7;
  } else {
    return ONNXPIPE_INT4_GEMM_BAD_BLOCK;
  }
  if (K % block_size != 0) return ONNXPIPE_INT4_GEMM_BAD_BLOCK;
  if ((reinterpret_cast<uintptr_t>(B) | reinterpret_cast<uintptr_t>(W)) % 16 != 0) return ONNXPIPE_INT4_GEMM_MISALIGNED;
  const int64_t grid = dequant_blocks(rows, K);
  if (grid > 0x7fffffff) return ONNXPIPE_INT4_GEMM_BAD_SHAPE;
  int4_dequant_kernel<<<(unsigned)grid, kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      B, static_cast<const __half*>(scales), zero_points, static_cast<__half*>(W), n0, rows, K, block_shift);
  return (int)cudaGetLastError();
}

// The current CUDA device (the one a cuBLAS handle made now belongs to); -1 where there is none.
extern "C" int onnxpipe_cuda_current_device(void) {
  int device = -1;
  return cudaGetDevice(&device) == cudaSuccess ? device : -1;
}

// The dequantize kernel loaded now (CUDA's lazy loading would load it at its first launch, which for a prefill
// shape first met inside a graph capture would be during the capture).
extern "C" void onnxpipe_int4_dequant_load(void) {
  cudaFuncAttributes attributes;
  (void)cudaFuncGetAttributes(&attributes, int4_dequant_kernel);
}
