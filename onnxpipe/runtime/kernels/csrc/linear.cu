// A float16 GEMV for the few rows of a decode step: Y[M, N] = A[M, K] @ W^T, W [N, K] row-major (PyTorch's Linear
// layout: each output's weights contiguous), M = 1-4 (any M is right: past 4 the weights are read again per 4 rows).
// onnxpipe.Linear (ops.cc) takes it at M <= ONNXPIPE_LINEAR_GEMV_MAX_M and cuBLAS past it.
//
// A lane reads 16 bytes (8 consecutive k) of a weight row a step, so a warp reads 512 contiguous bytes of it; each
// warp owns T weight rows (1, 2 or 4: the call's tile) and `split` warps of a block share a row group's k steps
// (1, 2, 4 or 8 warps along K), so a narrow projection still gives every SM blocks. A block is 8 warps and owns MR
// rows of A (grid.y walks M), staged once in shared memory as fp32, K in slices of at most kLinearStage floats for
// all MR rows. Lane l's 8 k of a step are the two 16-byte units 2 l and 2 l + 1 of that step's 256 k; unit u of
// chunk c is stored at 2 c + (u ^ ((c >> 2) & 1)), so a quarter warp's 8 lanes hit 8 different bank groups. Products
// are accumulated in fp32 (as cuBLAS does for MatMul here), each lane keeping its rows' next step in flight while it
// uses the current one; the sums go across the warp by shuffles and across the row group's warps in shared memory,
// in a fixed order: deterministic, no atomics, no workspace, graph-safe (launched on the given stream only).

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>

namespace {

constexpr int kLinearWarps = 8;     // warps a block
constexpr int kLinearStage = 8192;  // activations a slice (fp32, all MR rows): 32 KB

__device__ __forceinline__ uint4 load_row(const __half* p) {
  // streamed once: do not keep it in L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float2 pair_floats(uint32_t u) {
  union { uint32_t u; __half2 h; } x;
  x.u = u;
  return __half22float2(x.h);
}

// The 16 bytes of weight row n at chunk c (8 k), or zeros past N or the slice's end.
__device__ __forceinline__ uint4 linear_chunk(const __half* __restrict__ W, int n, int N, int c, int c_end, int K) {
  if (n < N && c < c_end) return load_row(W + (int64_t)n * K + (int64_t)c * 8);
  return make_uint4(0, 0, 0, 0);
}

template <int T, int MR>
__global__ void __launch_bounds__(kLinearWarps * 32)
    linear_gemv_kernel(const __half* __restrict__ A, const __half* __restrict__ W, __half* __restrict__ Y, int M,
                       int N, int K, int split, int slice) {
  // [MR][slice / 4] float4 activations (swizzled), then [kLinearWarps][T][MR] warp sums
  extern __shared__ float4 linear_smem[];
  float4* stage = linear_smem;
  float* partial = reinterpret_cast<float*>(linear_smem + MR * (slice / 4));

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = warp / split;
  const int part = warp % split;
  const int n0 = (blockIdx.x * (kLinearWarps / split) + group) * T;
  const int m0 = blockIdx.y * MR;
  const int chunks = K / 8;  // K % 8 == 0 (the host's check)
  const int slice_chunks = slice / 8;

  float acc[T][MR];
#pragma unroll
  for (int r = 0; r < T; ++r)
#pragma unroll
    for (int j = 0; j < MR; ++j) acc[r][j] = 0.0f;

  for (int c0 = 0; c0 < chunks; c0 += slice_chunks) {
    const int c1 = min(c0 + slice_chunks, chunks);
    uint4 cur[T];
#pragma unroll
    for (int r = 0; r < T; ++r) cur[r] = linear_chunk(W, n0 + r, N, c0 + 32 * part + lane, c1, K);
    __syncthreads();  // every warp done with the previous slice's activations
    const int units = (c1 - c0) * 2;  // 4 k a unit
    for (int i = threadIdx.x; i < MR * units; i += blockDim.x) {
      const int j = i / units;
      const int u = i % units;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (m0 + j < M) {
        const uint2 h = *reinterpret_cast<const uint2*>(A + (int64_t)(m0 + j) * K + (int64_t)c0 * 8 + 4 * u);
        const float2 lo = pair_floats(h.x), hi = pair_floats(h.y);
        v = make_float4(lo.x, lo.y, hi.x, hi.y);
      }
      const int c = u / 2;
      stage[j * (slice / 4) + 2 * c + ((u % 2) ^ ((c >> 2) & 1))] = v;
    }
    __syncthreads();
    for (int start = c0 + 32 * part; start < c1; start += 32 * split) {  // the same trip count for the warp's lanes
      const int c = start + lane;
      uint4 next[T];
#pragma unroll
      for (int r = 0; r < T; ++r) next[r] = linear_chunk(W, n0 + r, N, c + 32 * split, c1, K);
      if (c < c1) {
        const int cc = c - c0;
#pragma unroll
        for (int j = 0; j < MR; ++j) {
          const float4 a0 = stage[j * (slice / 4) + 2 * cc + ((cc >> 2) & 1)];
          const float4 a1 = stage[j * (slice / 4) + 2 * cc + (1 ^ ((cc >> 2) & 1))];
#pragma unroll
          for (int r = 0; r < T; ++r) {
            const float2 w0 = pair_floats(cur[r].x), w1 = pair_floats(cur[r].y);
            const float2 w2 = pair_floats(cur[r].z), w3 = pair_floats(cur[r].w);
            float s = acc[r][j];
            s = fmaf(w0.x, a0.x, s);
            s = fmaf(w0.y, a0.y, s);
            s = fmaf(w1.x, a0.z, s);
            s = fmaf(w1.y, a0.w, s);
            s = fmaf(w2.x, a1.x, s);
            s = fmaf(w2.y, a1.y, s);
            s = fmaf(w3.x, a1.z, s);
            s = fmaf(w3.y, a1.w, s);
            acc[r][j] = s;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < T; ++r) cur[r] = next[r];
    }
  }

  // the lanes' sums (butterfly: every lane ends with the same bits), then the row group's warps in order
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
    if (part != 0) return;
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

// Shared memory of a block: the staged activations and the warps' sums.
inline int linear_smem_bytes(int tile, int mr, int slice) {
  return (mr * slice + kLinearWarps * tile * mr) * (int)sizeof(float);
}

// The k a slice stages: all of K where it fits kLinearStage floats for the MR rows (a multiple of 8).
inline int linear_slice(int mr, int k) {
  const int cap = (kLinearStage / mr) / 8 * 8;
  return k < cap ? k : cap;
}

template <int T, int MR>
cudaError_t launch_linear(int split, const __half* A, const __half* W, __half* Y, int M, int N, int K,
                          cudaStream_t stream) {
  const int rows = T * (kLinearWarps / split);
  const dim3 grid((N + rows - 1) / rows, (M + MR - 1) / MR);
  const int slice = linear_slice(MR, K);
  linear_gemv_kernel<T, MR><<<grid, kLinearWarps * 32, linear_smem_bytes(T, MR, slice), stream>>>(
      A, W, Y, M, N, K, split, slice);
  return cudaGetLastError();
}

template <int MR>
cudaError_t launch_linear_for(int tile, int split, const __half* A, const __half* W, __half* Y, int M, int N, int K,
                              cudaStream_t stream) {
  if (tile == 1) return launch_linear<1, MR>(split, A, W, Y, M, N, K, stream);
  if (tile == 2) return launch_linear<2, MR>(split, A, W, Y, M, N, K, stream);
  return launch_linear<4, MR>(split, A, W, Y, M, N, K, stream);
}

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    return 132;
  return sms;
}

struct LinearPlan {
  int mr, tile, split;
  dim3 grid;
};

// tile / split 0: by rule. The rule: 1 weight row a warp, and the fewest warps along K (1, 2, 4, 8) whose grid gives
// every SM two blocks (a 2048-wide projection: 256 blocks, split 1; 512-wide k/v: split 4); a larger tile where the
// grid is wide anyway (the LM head: 4 rows a warp). Returns false for a tile or split it does not take.
bool linear_plan(int m, int n, int tile, int split, int sms, LinearPlan* p) {
  p->mr = m == 1 ? 1 : m == 2 ? 2 : 4;
  const int m_chunks = (m + p->mr - 1) / p->mr;
  int t = 1;
  for (int c = 4; c > 1; c /= 2) {
    if ((int64_t)((n + c * kLinearWarps - 1) / (c * kLinearWarps)) * m_chunks >= 8 * sms) {
      t = c;
      break;
    }
  }
  int s = 1;
  while (s < kLinearWarps && (int64_t)((n + t * (kLinearWarps / s) - 1) / (t * (kLinearWarps / s))) * m_chunks < 2 * sms)
    s *= 2;
  if (tile != 0) t = tile;
  if (split != 0) s = split;
  if ((t != 1 && t != 2 && t != 4) || (s != 1 && s != 2 && s != 4 && s != 8)) return false;
  p->tile = t;
  p->split = s;
  const int rows = t * (kLinearWarps / s);
  p->grid = dim3((n + rows - 1) / rows, m_chunks, 1);
  return true;
}

}  // namespace

// Codes: 0, a cudaError_t (> 0), or -1 bad shape (M < 0, N or K < 1, K not a multiple of 8, past int32), -2 a pointer
// NULL or not 16-byte aligned, -3 a tile or split the kernel does not take.
extern "C" int onnxpipe_linear_gemv_config(int tile, int split, const void* A, const void* W, void* Y, int64_t M,
                                           int64_t N, int64_t K, void* stream) {
  if (M < 0 || N < 1 || K < 1 || K % 8 != 0 || M > INT_MAX || N > INT_MAX || K > INT_MAX) return -1;
  if (A == nullptr || W == nullptr || Y == nullptr ||
      (reinterpret_cast<uintptr_t>(A) | reinterpret_cast<uintptr_t>(W)) % 16 != 0)
    return -2;
  LinearPlan p;
  if (!linear_plan((int)(M > 0 ? M : 1), (int)N, tile, split, sm_count(), &p)) return -3;
  if (M == 0) return 0;
  const __half* a = static_cast<const __half*>(A);
  const __half* w = static_cast<const __half*>(W);
  __half* y = static_cast<__half*>(Y);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (p.mr == 1) {
    err = launch_linear_for<1>(p.tile, p.split, a, w, y, (int)M, (int)N, (int)K, st);
  } else if (p.mr == 2) {
    err = launch_linear_for<2>(p.tile, p.split, a, w, y, (int)M, (int)N, (int)K, st);
  } else {
    err = launch_linear_for<4>(p.tile, p.split, a, w, y, (int)M, (int)N, (int)K, st);
  }
  return (int)err;
}

extern "C" int onnxpipe_linear_gemv(const void* A, const void* W, void* Y, int64_t M, int64_t N, int64_t K,
                                    void* stream) {
  return onnxpipe_linear_gemv_config(0, 0, A, W, Y, M, N, K, stream);
}

// How a call is laid out (the rule without a GPU assumes 132 SMs): 0, or -1 / -3 as above.
extern "C" int onnxpipe_linear_gemv_describe(int tile, int split, int64_t M, int64_t N, int64_t K, char* out,
                                             int size) {
  if (out == nullptr || size < 1 || M < 1 || N < 1 || K < 1 || K % 8 != 0 || M > INT_MAX || N > INT_MAX ||
      K > INT_MAX)
    return -1;
  LinearPlan p;
  if (!linear_plan((int)M, (int)N, tile, split, sm_count(), &p)) return -3;
  snprintf(out, size, "linear: grid %ux%u, %d weight rows and %d A rows a block, %d weight rows a warp, %d warps "
           "along K, K staged %d at a time", p.grid.x, p.grid.y, p.tile * (kLinearWarps / p.split), p.mr, p.tile,
           p.split, linear_slice(p.mr, (int)K));
  return 0;
}

// Every instantiation loaded now (CUDA loads a kernel lazily at its first launch, which may be inside a capture).
extern "C" void onnxpipe_linear_load(void) {
  cudaFuncAttributes a;
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<1, 1>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<1, 2>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<1, 4>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<2, 1>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<2, 2>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<2, 4>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<4, 1>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<4, 2>);
  (void)cudaFuncGetAttributes(&a, linear_gemv_kernel<4, 4>);
}
