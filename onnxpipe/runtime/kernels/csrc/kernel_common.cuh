// Device helpers shared by the int4 GEMM (int4_gemm.cu) and Linear (linear.cu): a streamed 16-byte load, the one
// tensor-core instruction, and the end of a GEMV (its sums across a warp and a row group's warps, then the store).
// Each .cu file includes it before its own anonymous namespace; the CPU simulation of the tests prepends this
// namespace's text to each file's device code (tests/runtime/test_int4_gemm_sim.py, test_linear.py).
#ifndef ONNXPIPE_KERNEL_COMMON_CUH_
#define ONNXPIPE_KERNEL_COMMON_CUH_

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// 16 bytes read once (weights streamed through): not kept in L1
__device__ __forceinline__ uint4 load_weight(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// c += a (16 x 16, rows a0 a1 / a2 a3 as PTX lays them out) * b (16 x 8), fp16 in, fp32 accumulate
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The end of a GEMV whose warps each own T weight rows and MR rows of A, `split` consecutive warps of a block sharing
// a row group's k steps: the lanes' sums (butterfly: every lane ends with the same bits), then the group's warps in
// order through `partial` (shared memory, [warps][T][MR] floats), and lane 0 of the group's first warp writes its
// rows' outputs. Every thread of the block calls it (the barrier).
template <int T, int MR>
__device__ __forceinline__ void gemv_finish(float (&acc)[T][MR], float* partial, __half* __restrict__ Y, int M, int N,
                                            int n0, int m0, int split) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < T; ++r)
#pragma unroll
    for (int j = 0; j < MR; ++j) {
      float v = acc[r][j];
#pragma unroll
      for (int o = 16; o >= 1; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
      acc[r][j] = v;
    }
  if (split > 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < T; ++r)
#pragma unroll
        for (int j = 0; j < MR; ++j) partial[(warp * T + r) * MR + j] = acc[r][j];
    }
    __syncthreads();
    if (warp % split != 0) return;
#pragma unroll
    for (int r = 0; r < T; ++r)
#pragma unroll
      for (int j = 0; j < MR; ++j) {
        float sum = 0.0f;
        for (int p = 0; p < split; ++p) sum += partial[((warp + p) * T + r) * MR + j];
        acc[r][j] = sum;
      }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < T; ++r)
#pragma unroll
      for (int j = 0; j < MR; ++j)
        if (n0 + r < N && m0 + j < M) Y[(int64_t)(m0 + j) * N + n0 + r] = __float2half_rn(acc[r][j]);
  }
}

}  // namespace

#endif  // ONNXPIPE_KERNEL_COMMON_CUH_
