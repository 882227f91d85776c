// Float16 products for the few rows of a decode step: Y[M, N] = A[M, K] @ W^T, W [N, K] row-major (PyTorch's Linear
// layout: each output's weights contiguous). onnxpipe_linear takes M = 1-4 to the GEMV below and M = 5-32 to the mma
// form after it; onnxpipe.Linear (ops.cc) calls it up to M = 32 and cuBLAS past it. Any M is right in either form
// (past its rows a block, the weights are read again per chunk of A rows).
//
// The GEMV (M = 1-4):
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

#include "kernel_common.cuh"

// the entry points stay visible in the library (built with -fvisibility=hidden) for ops.cc, the checks and the tests
#define LINEAR_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kLinearWarps = 8;     // warps a block
constexpr int kLinearStage = 8192;  // activations a slice (fp32, all MR rows): 32 KB

__device__ __forceinline__ float2 pair_floats(uint32_t u) {
  union { uint32_t u; __half2 h; } x;
  x.u = u;
  return __half22float2(x.h);
}

// The 16 bytes of weight row n at chunk c (8 k), or zeros past N or the slice's end.
__device__ __forceinline__ uint4 linear_chunk(const __half* __restrict__ W, int n, int N, int c, int c_end, int K) {
  if (n < N && c < c_end) return load_weight(W + (int64_t)n * K + (int64_t)c * 8);
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

  gemv_finish<T, MR>(acc, partial, Y, M, N, n0, m0, split);
}

// The mma form (M = 5-32): Y^T = W @ A^T on tensor cores (mma.sync.m16n8k16, fp16 in, fp32 accumulate), the weight
// the 16-row operand, so a block's 16 weight rows meet 8, 16 or 32 rows of A (MT = 1, 2, 4 tiles of 8). Lane
// (g = lane / 4, t = lane % 4) of a warp reads 16 bytes (8 consecutive k) of weight rows g and g + 8 and of A row g of
// each tile at k0 + 8 t, a 32-k warp step: words 0-1 of those loads feed one mma and words 2-3 the next (the k order
// inside an mma is free, and the weight's and A's words carry the same k, so no permutes). The block's KW warps split
// K by steps (warp w takes w, w + KW, ...), keep their next two steps' weights in flight in registers, and are summed
// in shared memory in warp order: deterministic, no atomics, no workspace.
constexpr int kMmaStep = 32;  // k a warp step: 4 lanes x 8 k

// Lane t's 8 k of weight row n at warp step `step`, or zeros past N, K or the last step.
__device__ __forceinline__ uint4 mma_weights(const __half* __restrict__ W, int n, int N, int step, int steps, int K) {
  const int k = step * kMmaStep + 8 * (threadIdx.x % 4);
  if (n < N && step < steps && k < K) return load_weight(W + (int64_t)n * K + k);
  return make_uint4(0, 0, 0, 0);
}

template <int MT, int KW>
__global__ void __launch_bounds__(KW * 32)
    linear_mma_kernel(const __half* __restrict__ A, const __half* __restrict__ W, __half* __restrict__ Y, int M, int N,
                      int K) {
  __shared__ float partial[KW][8 * MT][16];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int n0 = blockIdx.x * 16;
  const int m0 = blockIdx.y * 8 * MT;
  const int steps = (K + kMmaStep - 1) / kMmaStep;

  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

  uint4 cur[2], next[2];  // weight rows g and g + 8: this step's and the next one's
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    cur[r] = mma_weights(W, n0 + 8 * r + g, N, warp, steps, K);
    next[r] = mma_weights(W, n0 + 8 * r + g, N, warp + KW, steps, K);
  }
  for (int step = warp; step < steps; step += KW) {
    uint4 after[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) after[r] = mma_weights(W, n0 + 8 * r + g, N, step + 2 * KW, steps, K);
    const int k = step * kMmaStep + 8 * t;  // K % 8 == 0: a lane's 8 k are all in range or all out
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int m = m0 + 8 * j + g;
      const uint4 x = (m < M && k < K) ? __ldg(reinterpret_cast<const uint4*>(A + (int64_t)m * K + k))
                                       : make_uint4(0, 0, 0, 0);
      mma_16816(acc[j], cur[0].x, cur[1].x, cur[0].y, cur[1].y, x.x, x.y);
      mma_16816(acc[j], cur[0].z, cur[1].z, cur[0].w, cur[1].w, x.z, x.w);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      cur[r] = next[r];
      next[r] = after[r];
    }
  }

  // accumulator (weight rows g / g + 8, A rows 2t / 2t + 1 of each tile) -> shared, then the KW warps in order
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int m = 8 * j + 2 * t;
    partial[warp][m][g] = acc[j][0];
    partial[warp][m + 1][g] = acc[j][1];
    partial[warp][m][g + 8] = acc[j][2];
    partial[warp][m + 1][g + 8] = acc[j][3];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 16 * 8 * MT; e += KW * 32) {
    const int n = e % 16;
    const int m = e / 16;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < KW; ++w) sum += partial[w][m][n];
    if (m0 + m < M && n0 + n < N) Y[(int64_t)(m0 + m) * N + n0 + n] = __float2half_rn(sum);
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

template <int MT, int KW>
cudaError_t launch_mma(const __half* A, const __half* W, __half* Y, int M, int N, int K, cudaStream_t stream) {
  const dim3 grid((N + 15) / 16, (M + 8 * MT - 1) / (8 * MT));
  linear_mma_kernel<MT, KW><<<grid, KW * 32, 0, stream>>>(A, W, Y, M, N, K);
  return cudaGetLastError();
}

template <int MT>
cudaError_t launch_mma_for(int kw, const __half* A, const __half* W, __half* Y, int M, int N, int K,
                           cudaStream_t stream) {
  if (kw == 1) return launch_mma<MT, 1>(A, W, Y, M, N, K, stream);
  if (kw == 2) return launch_mma<MT, 2>(A, W, Y, M, N, K, stream);
  if (kw == 4) return launch_mma<MT, 4>(A, W, Y, M, N, K, stream);
  if (kw == 8) return launch_mma<MT, 8>(A, W, Y, M, N, K, stream);
  return launch_mma<MT, 16>(A, W, Y, M, N, K, stream);
}

// The SM count of the current device, read once per device (132 where it cannot be read: no GPU here).
int sm_count() {
  static int counts[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int sms = 0;
    counts[device] =
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && sms > 0 ? sms : 132;
  }
  return counts[device];
}

struct LinearPlan {
  bool mma;            // the mma form (else the GEMV)
  int mr, tile, split;  // GEMV: A rows a block, weight rows a warp, warps along K; mma: A tiles of 8 (mr), warps (split)
  dim3 grid;
};

// The mma form's layout: 1, 2 or 4 tiles of 8 A rows (M 5-8, 9-16, past 16); warps along K by the grid as the int4
// warps form's rule (4, 8 or 16 as the grid is at least twice, once or less than the SM count; no more than steps).
bool mma_plan(int m, int n, int k, int split, int sms, LinearPlan* p) {
  p->mma = true;
  p->tile = 1;
  p->mr = m <= 8 ? 1 : m <= 16 ? 2 : 4;
  const int m_chunks = (m + 8 * p->mr - 1) / (8 * p->mr);
  const int grid = ((n + 15) / 16) * m_chunks;
  const int steps = (k + kMmaStep - 1) / kMmaStep;
  int kw = grid >= 2 * sms ? 4 : grid >= sms ? 8 : 16;
  while (kw > 4 && kw / 2 >= steps) kw /= 2;
  if (split != 0) kw = split;
  if (kw != 1 && kw != 2 && kw != 4 && kw != 8 && kw != 16) return false;
  p->split = kw;
  p->grid = dim3((n + 15) / 16, m_chunks, 1);
  return true;
}

// tile / split 0: by rule. The rule: 1 weight row a warp, and the fewest warps along K (1, 2, 4, 8) whose grid gives
// every SM two blocks (a 2048-wide projection: 256 blocks, split 1; 512-wide k/v: split 4); a larger tile where the
// grid is wide anyway (the LM head: 4 rows a warp). Returns false for a tile or split it does not take.
bool linear_plan(int m, int n, int tile, int split, int sms, LinearPlan* p) {
  p->mma = false;
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

// A call's arguments: 0, -1 a bad shape, -2 a pointer NULL or not 16-byte aligned.
int check_call(const void* A, const void* W, const void* Y, int64_t M, int64_t N, int64_t K) {
  if (M < 0 || N < 1 || K < 1 || K % 8 != 0 || M > INT_MAX || N > INT_MAX || K > INT_MAX) return -1;
  if (A == nullptr || W == nullptr || Y == nullptr ||
      (reinterpret_cast<uintptr_t>(A) | reinterpret_cast<uintptr_t>(W)) % 16 != 0)
    return -2;
  return 0;
}

}  // namespace

// Codes: 0, a cudaError_t (> 0), or -1 bad shape (M < 0, N or K < 1, K not a multiple of 8, past int32), -2 a pointer
// NULL or not 16-byte aligned, -3 a tile or split the kernel does not take.
LINEAR_EXPORT int onnxpipe_linear_gemv_config(int tile, int split, const void* A, const void* W, void* Y, int64_t M,
                                           int64_t N, int64_t K, void* stream) {
  const int bad = check_call(A, W, Y, M, N, K);
  if (bad != 0) return bad;
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

// The mma form with `split` warps along K (0: by rule); codes as above.
LINEAR_EXPORT int onnxpipe_linear_mma_config(int split, const void* A, const void* W, void* Y, int64_t M, int64_t N,
                                          int64_t K, void* stream) {
  const int bad = check_call(A, W, Y, M, N, K);
  if (bad != 0) return bad;
  LinearPlan p;
  if (!mma_plan((int)(M > 0 ? M : 1), (int)N, (int)K, split, sm_count(), &p)) return -3;
  if (M == 0) return 0;
  const __half* a = static_cast<const __half*>(A);
  const __half* w = static_cast<const __half*>(W);
  __half* y = static_cast<__half*>(Y);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (p.mr == 1) {
    err = launch_mma_for<1>(p.split, a, w, y, (int)M, (int)N, (int)K, st);
  } else if (p.mr == 2) {
    err = launch_mma_for<2>(p.split, a, w, y, (int)M, (int)N, (int)K, st);
  } else {
    err = launch_mma_for<4>(p.split, a, w, y, (int)M, (int)N, (int)K, st);
  }
  return (int)err;
}

// The product for M = 1-32 by its form: the GEMV up to ONNXPIPE_LINEAR_GEMV_MAX_M (4) rows, the mma form past it.
LINEAR_EXPORT int onnxpipe_linear(const void* A, const void* W, void* Y, int64_t M, int64_t N, int64_t K, void* stream) {
  return M <= 4 ? onnxpipe_linear_gemv_config(0, 0, A, W, Y, M, N, K, stream)
                : onnxpipe_linear_mma_config(0, A, W, Y, M, N, K, stream);
}

// How a call is laid out (the rule without a GPU assumes 132 SMs); form 0: as onnxpipe_linear takes it, 1: the GEMV
// (tile, split), 2: the mma form (split). 0, or -1 / -3 as above.
LINEAR_EXPORT int onnxpipe_linear_describe(int form, int tile, int split, int64_t M, int64_t N, int64_t K, char* out,
                                        int size) {
  if (out == nullptr || size < 1 || M < 1 || N < 1 || K < 1 || K % 8 != 0 || M > INT_MAX || N > INT_MAX ||
      K > INT_MAX || form < 0 || form > 2)
    return -1;
  LinearPlan p;
  if (form == 2 || (form == 0 && M > 4)) {
    if (!mma_plan((int)M, (int)N, (int)K, split, sm_count(), &p)) return -3;
    snprintf(out, size, "linear mma: grid %ux%u, 16 weight rows and %d A rows a block, %d warps along K", p.grid.x,
             p.grid.y, 8 * p.mr, p.split);
    return 0;
  }
  if (!linear_plan((int)M, (int)N, tile, split, sm_count(), &p)) return -3;
  snprintf(out, size, "linear: grid %ux%u, %d weight rows and %d A rows a block, %d weight rows a warp, %d warps "
           "along K, K staged %d at a time", p.grid.x, p.grid.y, p.tile * (kLinearWarps / p.split), p.mr, p.tile,
           p.split, linear_slice(p.mr, (int)K));
  return 0;
}

// Every instantiation loaded now (CUDA loads a kernel lazily at its first launch, which may be inside a capture).
LINEAR_EXPORT void onnxpipe_linear_load(void) {
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
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<1, 1>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<1, 2>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<1, 4>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<1, 8>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<1, 16>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<2, 1>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<2, 2>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<2, 4>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<2, 8>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<2, 16>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<4, 1>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<4, 2>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<4, 4>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<4, 8>);
  (void)cudaFuncGetAttributes(&a, linear_mma_kernel<4, 16>);
}
