// An int4 GEMM for small M (decode, M = 1-32) that reads MatMulNBits' packed weights once, on tensor cores.
//
// The product is computed transposed, Y^T[N, M] = W[N, K] @ A^T, with mma.sync.m16n8k16 (fp16 in, fp32
// accumulate): the weight is the 16-row operand, so M = 1-8 costs one 8-column tile and the weight is dequantized
// straight from registers into the operand; nothing goes through shared memory until the final reduction.
//
// The k order inside an mma is free (a dot product does not care), so each lane takes the k values its 16-byte
// load of B brings: lane (g = lane / 4, t = lane % 4) of a warp reads 32 consecutive k (16 bytes) of weight rows
// g and g + 8 at k0 + 32 t, for one 128-wide k step of 8 mmas. Word v (8 nibbles, k0 + 32 t + 8 v ...) feeds mmas
// 2 v and 2 v + 1; `(word >> s) & 0x000F000F | 0x64006400` turns nibbles s / 4 and s / 4 + 4 into the fp16 pair
// 1024 + q, which is why an mma's k slots (2t, 2t+1) hold k (+0, +4) and slots (2t+8, 2t+9) hold (+1, +5) (and +2,
// +6 / +3, +7 for the odd mma). The activations get the same order from their own 16-byte loads with byte
// permutes (row m = g of an 8-row tile, lanes t own the same k). (1024 + q) - (1024 + zp) is exact in fp16, then one
// rounding for the scale: the weight as a float dequantization rounded to fp16.
//
// A block owns 16 * NT weight rows and 8 * MT rows of A (grid.y walks M in such chunks, so any M is right; past 32
// the weight is read again per chunk, from L2 mostly). Its KW warps split K by 128-wide steps (warp w takes steps
// w, w + KW, ...), prefetching the next two steps' weights into registers, and are summed in shared memory in a fixed
// order at the end: deterministic, no atomics, no workspace. The host picks NT, MT and KW from M, N and the SM
// count so that a 2048-wide projection still gives every SM a block. At M = 1 the rule takes a third form without
// tensor cores (GEMV, below the cluster form): a warp walks its weight rows' K with 16-byte loads, no tile columns
// computed for nothing.

#include "int4_gemm.h"
#include "kernel_common.cuh"

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace {

namespace cg = cooperative_groups;

constexpr int kStep = 128;       // k per warp step: 4 lanes x 32 nibbles
constexpr int kMaxDevices = 64;  // device properties cached per device
constexpr int kMaxRowWarps = 8;  // the row-tiled form: at most 8 warps (128 weight rows) a block
constexpr int kMaxSlices = 8;    // and a cluster of at most 8 blocks along K (the portable cluster size)
constexpr int kStages = 3;       // the row-tiled form's k steps of A in shared memory: the one used, the next two

__device__ __forceinline__ uint32_t sub_mul(uint32_t q, uint32_t bias, uint32_t scale) {
  // (1024 + q) - (1024 + zp) exactly, then * scale (one rounding), on a pair
  union { uint32_t u; __half2 h; } x, b, s, r;
  x.u = q;
  b.u = bias;
  s.u = scale;
  r.h = __hmul2(__hsub2(x.h, b.h), s.h);
  return r.u;
}

__device__ __forceinline__ uint32_t nibble_pair(uint32_t word, int shift) {
  return ((word >> shift) & 0x000F000Fu) | 0x64006400u;
}

// One lane's share of a k step for one weight row: its 32 nibbles, and its block's bias (1024 + zp) and scale as
// broadcast fp16 pairs.
struct RowStep {
  uint4 q;
  uint32_t bias;
  uint32_t scale;
};

__device__ __forceinline__ uint32_t broadcast(__half h) {
  union { uint32_t u; __half2 h2; } r;
  r.h2 = __halves2half2(h, h);
  return r.u;
}

__device__ __forceinline__ RowStep load_row_step(const uint8_t* __restrict__ B, const __half* __restrict__ S,
                                                 const uint8_t* __restrict__ Z, int n, int N, int k, int K,
                                                 int block_shift, int blocks, int zp_stride) {
  RowStep r;
  if (n < N && k < K) {
    r.q = load_weight(B + (int64_t)n * (K / 2) + k / 2);
    const int blk = k >> block_shift;
    int zp = 8;
    if (Z != nullptr) zp = (Z[(int64_t)n * zp_stride + blk / 2] >> ((blk & 1) * 4)) & 0xF;
    r.bias = broadcast(__ushort_as_half((unsigned short)(0x6400 + zp)));  // 1024 + zp
    r.scale = broadcast(S[(int64_t)n * blocks + blk]);
  } else {
    r.q = make_uint4(0, 0, 0, 0);
    r.bias = 0x64006400u;  // 1024 - 1024 = 0
    r.scale = 0;
  }
  return r;
}

// One 128-wide k step of a warp: its lanes' activations (rows 8 j + g of the block's A rows, the lane's 32 k) as
// `act_at(j, v)` gives them (the v-th 8 k), permuted to the weight's k order, the weight rows dequantized, NT x MT
// x 8 mmas.
template <int NT, int MT, typename ActAt>
__device__ __forceinline__ void mma_step_from(float (&acc)[NT][MT][4], const RowStep (&cur)[NT][2], ActAt act_at) {
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    uint4 act[MT];  // 8 k of each A row: loaded a quarter step at a time, so that 64 rows (MT = 8) fit the registers
#pragma unroll
    for (int j = 0; j < MT; ++j) act[j] = act_at(j, v);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t b0[MT], b1[MT];
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        // halves (x0 x1)(x2 x3)(x4 x5)(x6 x7): even mma takes (x0, x4), (x1, x5); odd (x2, x6), (x3, x7)
        const uint32_t lo = h == 0 ? act[j].x : act[j].y;
        const uint32_t hi = h == 0 ? act[j].z : act[j].w;
        b0[j] = __byte_perm(lo, hi, 0x5410);
        b1[j] = __byte_perm(lo, hi, 0x7632);
      }
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const uint32_t w0 = v == 0 ? cur[i][0].q.x : v == 1 ? cur[i][0].q.y : v == 2 ? cur[i][0].q.z : cur[i][0].q.w;
        const uint32_t w1 = v == 0 ? cur[i][1].q.x : v == 1 ? cur[i][1].q.y : v == 2 ? cur[i][1].q.z : cur[i][1].q.w;
        const uint32_t a0 = sub_mul(nibble_pair(w0, 8 * h), cur[i][0].bias, cur[i][0].scale);      // row g
        const uint32_t a1 = sub_mul(nibble_pair(w1, 8 * h), cur[i][1].bias, cur[i][1].scale);      // row g + 8
        const uint32_t a2 = sub_mul(nibble_pair(w0, 8 * h + 4), cur[i][0].bias, cur[i][0].scale);  // row g
        const uint32_t a3 = sub_mul(nibble_pair(w1, 8 * h + 4), cur[i][1].bias, cur[i][1].scale);  // row g + 8
#pragma unroll
        for (int j = 0; j < MT; ++j) mma_16816(acc[i][j], a0, a1, a2, a3, b0[j], b1[j]);
      }
    }
  }
}

// mma_step_from with the activations read from global memory (through L1) by each warp for itself.
template <int NT, int MT>
__device__ __forceinline__ void mma_step(float (&acc)[NT][MT][4], const RowStep (&cur)[NT][2],
                                         const __half* __restrict__ A, int M, int K, int m0, int k) {
  const int g = (threadIdx.x % 32) / 4;
  mma_step_from<NT, MT>(acc, cur, [&](int j, int v) {
    const int m = m0 + 8 * j + g;
    return (m < M && k < K) ? __ldg(reinterpret_cast<const uint4*>(A + (int64_t)m * K + k + 8 * v))
                            : make_uint4(0, 0, 0, 0);
  });
}

// The activations of one k step staged in shared memory for every warp of a block (the row-tiled form): 8 * MT rows
// of 128 k, each row 16 units of 16 bytes (8 k). Unit c of row r sits at stage_unit(r, c): a warp's 16-byte reads
// (lane g, t takes unit 4 t + v of row 8 j + g) then fall, per quarter warp (g of one parity, t = 0-3), on 8
// different 16-byte bank groups instead of two.
__device__ __forceinline__ int stage_unit(int row, int unit) {
  return (((unit & 3) << 2) | (unit >> 2)) ^ ((row & 1) << 2);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
  // 16 bytes global -> shared without the registers; `full` false writes 16 zero bytes (nothing read)
  const uint32_t dst = (uint32_t)__cvta_generic_to_shared(smem);
  const int bytes = full ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// wait until at most one group of this thread's copies is still in flight
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

// The block's threads copy A rows m0 .. m0 + 8 MT - 1, k step `step`, into `dst` (rows past M and k past K: zeros).
template <int MT>
__device__ __forceinline__ void stage_activations(uint4 (*dst)[16], const __half* __restrict__ A, int M, int K,
                                                  int m0, int step) {
  for (int e = threadIdx.x; e < 8 * MT * 16; e += blockDim.x) {
    const int row = e / 16;
    const int unit = e % 16;
    const int m = m0 + row;
    const int k = step * kStep + 8 * unit;
    const bool in = m < M && k < K;
    cp_async16(&dst[row][stage_unit(row, unit)], in ? A + (int64_t)m * K + k : A, in);
  }
}

template <int NT, int MT, int KW>
__global__ void __launch_bounds__(KW * 32)
    int4_gemm_kernel(const __half* __restrict__ A, const uint8_t* __restrict__ B, const __half* __restrict__ S,
                     const uint8_t* __restrict__ Z, __half* __restrict__ Y, int M, int N, int K, int block_shift) {
  constexpr int kRows = 16 * NT;  // weight rows (outputs n) of the block
  constexpr int kCols = 8 * MT;   // rows of A (outputs m) of the block
  __shared__ float partial[KW][kCols][kRows];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int n0 = blockIdx.x * kRows;
  const int m0 = blockIdx.y * kCols;
  const int blocks = K >> block_shift;
  const int zp_stride = (blocks + 1) / 2;
  const int steps = (K + kStep - 1) / kStep;

  float acc[NT][MT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // the weights of this warp's next two k steps in flight while one is used (a step past the end loads nothing)
  RowStep cur[NT][2], next[NT][2];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int n = n0 + 16 * i + 8 * r + g;
      cur[i][r] = load_row_step(B, S, Z, n, N, warp * kStep + 32 * t, warp < steps ? K : 0, block_shift, blocks,
                                zp_stride);
      next[i][r] = load_row_step(B, S, Z, n, N, (warp + KW) * kStep + 32 * t, warp + KW < steps ? K : 0,
                                 block_shift, blocks, zp_stride);
    }
  for (int step = warp; step < steps; step += KW) {
    const int k = step * kStep + 32 * t;  // K % 32 == 0: a lane's 32 k are all in range or all out
    RowStep after[NT][2];
    const int step_after = step + 2 * KW;
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        after[i][r] = load_row_step(B, S, Z, n0 + 16 * i + 8 * r + g, N, step_after * kStep + 32 * t,
                                    step_after < steps ? K : 0, block_shift, blocks, zp_stride);

    mma_step<NT, MT>(acc, cur, A, M, K, m0, k);
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        cur[i][r] = next[i][r];
        next[i][r] = after[i][r];
      }
  }

  // accumulator (row g / g + 8 of the weight tile, columns 2t, 2t + 1 of the A tile) -> shared, then the KW warps
  // summed in warp order
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int n = 16 * i + g;
      const int m = 8 * j + 2 * t;
      partial[warp][m][n] = acc[i][j][0];
      partial[warp][m + 1][n] = acc[i][j][1];
      partial[warp][m][n + 8] = acc[i][j][2];
      partial[warp][m + 1][n + 8] = acc[i][j][3];
    }
  __syncthreads();
  for (int e = threadIdx.x; e < kRows * kCols; e += KW * 32) {
    const int n = e % kRows;
    const int m = e / kRows;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < KW; ++w) sum += partial[w][m][n];
    if (m0 + m < M && n0 + n < N) Y[(int64_t)(m0 + m) * N + n0 + n] = __float2half_rn(sum);
  }
}

template <int NT, int MT, int KW>
cudaError_t launch(const __half* A, const uint8_t* B, const __half* S, const uint8_t* Z, __half* Y, int M, int N,
                   int K, int block_shift, cudaStream_t stream) {
  const dim3 grid((N + 16 * NT - 1) / (16 * NT), (M + 8 * MT - 1) / (8 * MT));
  int4_gemm_kernel<NT, MT, KW><<<grid, KW * 32, 0, stream>>>(A, B, S, Z, Y, M, N, K, block_shift);
  return cudaGetLastError();
}

// The row-tiled form (sm_90): a block's WN warps each own 16 weight rows and walk the same k steps, so the block's
// activations are fetched from L2 once per block, not once per 16 rows as in the form above: the block's threads
// copy each k step's A rows into shared memory with cp.async, kStages steps ahead (a warp that read A for itself
// waited on L2 at every step, which left M = 32 at 2-3x M = 8's time), and every warp reads them from there. K is
// split across the blocks of a thread-block cluster instead (gridDim.z = slices, cluster 1 x 1 x slices): each block
// sums its k slice, then each reduces its share of the tile by reading every block's partial sums through
// distributed shared memory in rank order. Deterministic; no global workspace, no atomics.
template <int MT>
__global__ void __launch_bounds__(kMaxRowWarps * 32)
    int4_gemm_rows_kernel(const __half* __restrict__ A, const uint8_t* __restrict__ B, const __half* __restrict__ S,
                          const uint8_t* __restrict__ Z, __half* __restrict__ Y, int M, int N, int K,
                          int block_shift) {
  constexpr int kCols = 8 * MT;
  constexpr int kStageBytes = kStages * kCols * 16 * 16;
  constexpr int kPartialBytes = kCols * kMaxRowWarps * 16 * 4;
  // the staged activations, and after the last step the partial sums in the same bytes (MT = 8: 48 KB, the most a
  // block may declare statically)
  __shared__ __align__(16) unsigned char smem[kStageBytes > kPartialBytes ? kStageBytes : kPartialBytes];
  auto staged = reinterpret_cast<uint4(*)[kCols][16]>(smem);
  auto partial = reinterpret_cast<float(*)[kMaxRowWarps * 16]>(smem);

  const int warps = blockDim.x / 32;
  const int rows = 16 * warps;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int n_block = blockIdx.x * rows;
  const int n0 = n_block + 16 * warp;
  const int m0 = blockIdx.y * kCols;
  const int blocks = K >> block_shift;
  const int zp_stride = (blocks + 1) / 2;
  const int steps = (K + kStep - 1) / kStep;
  const int slices = gridDim.z;
  const int slice = blockIdx.z;  // = the block's rank in its cluster (cluster 1 x 1 x slices)
  const int first = (int)((int64_t)slice * steps / slices);
  const int last = (int)((int64_t)(slice + 1) * steps / slices);

  float acc[1][MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][j][e] = 0.0f;

  // the weights of the next two k steps in flight while one is used (a step past the slice loads nothing)
  RowStep cur[1][2], next[1][2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    cur[0][r] = load_row_step(B, S, Z, n0 + 8 * r + g, N, first * kStep + 32 * t, first < last ? K : 0,
                              block_shift, blocks, zp_stride);
    next[0][r] = load_row_step(B, S, Z, n0 + 8 * r + g, N, (first + 1) * kStep + 32 * t, first + 1 < last ? K : 0,
                               block_shift, blocks, zp_stride);
  }
  // the activations of the first kStages - 1 steps on their way (one copy group a step, empty past the slice, so
  // that "all groups but the newest done" always means the step about to be used has landed)
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (first + i < last) stage_activations<MT>(staged[i], A, M, K, m0, first + i);
    cp_async_commit();
  }
  for (int step = first; step < last; ++step) {
    const int i = step - first;
    RowStep after[1][2];
    const int step_after = step + 2;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      after[0][r] = load_row_step(B, S, Z, n0 + 8 * r + g, N, step_after * kStep + 32 * t,
                                  step_after < last ? K : 0, block_shift, blocks, zp_stride);
    cp_async_wait_one();
    __syncthreads();  // this step's activations visible to all; every warp done with the stage refilled below
    if (step + kStages - 1 < last) stage_activations<MT>(staged[(i + kStages - 1) % kStages], A, M, K, m0,
                                                         step + kStages - 1);
    cp_async_commit();
    const uint4(*stage)[16] = staged[i % kStages];
    mma_step_from<1, MT>(acc, cur, [&](int j, int v) {
      const int row = 8 * j + g;
      return stage[row][stage_unit(row, 4 * t + v)];
    });
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      cur[0][r] = next[0][r];
      next[0][r] = after[0][r];
    }
  }
  asm volatile("cp.async.wait_all;\n" ::);
  __syncthreads();  // every warp done reading the stages before the partial sums overwrite them

#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int n = 16 * warp + g;
    const int m = 8 * j + 2 * t;
    partial[m][n] = acc[0][j][0];
    partial[m + 1][n] = acc[0][j][1];
    partial[m][n + 8] = acc[0][j][2];
    partial[m + 1][n + 8] = acc[0][j][3];
  }
  const int tile = rows * kCols;
  if (slices == 1) {
    __syncthreads();
    for (int e = threadIdx.x; e < tile; e += blockDim.x) {
      const int n = e % rows;
      const int m = e / rows;
      if (m0 + m < M && n_block + n < N) Y[(int64_t)(m0 + m) * N + n_block + n] = __float2half_rn(partial[m][n]);
    }
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's partial sums written
  const int begin = (int)((int64_t)slice * tile / slices);
  const int end = (int)((int64_t)(slice + 1) * tile / slices);
  for (int e = begin + threadIdx.x; e < end; e += blockDim.x) {
    const int n = e % rows;
    const int m = e / rows;
    float sum = 0.0f;
    for (int r = 0; r < slices; ++r) sum += cluster.map_shared_rank(&partial[0][0], r)[m * (kMaxRowWarps * 16) + n];
    if (m0 + m < M && n_block + n < N) Y[(int64_t)(m0 + m) * N + n_block + n] = __float2half_rn(sum);
  }
  cluster.sync();  // no block leaves while another still reads its shared memory
#endif
}

template <int MT>
cudaError_t launch_rows(int warps, int slices, const __half* A, const uint8_t* B, const __half* S, const uint8_t* Z,
                        __half* Y, int M, int N, int K, int block_shift, cudaStream_t stream) {
  const dim3 grid((N + 16 * warps - 1) / (16 * warps), (M + 8 * MT - 1) / (8 * MT), slices);
  if (slices == 1) {
    int4_gemm_rows_kernel<MT><<<grid, warps * 32, 0, stream>>>(A, B, S, Z, Y, M, N, K, block_shift);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(warps * 32);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = 1;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = slices;
  config.attrs = attribute;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, int4_gemm_rows_kernel<MT>, A, B, S, Z, Y, M, N, K, block_shift);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// The GEMV form (M = 1-4, no tensor cores): at M = 1 the mma forms compute 8 columns of a tile for one. Here a
// lane takes 32 consecutive k (16 bytes of packed nibbles) of a weight row, so a warp reads 512 contiguous bytes of
// it a step, and each warp owns T weight rows (the call's tile) and walks K in such steps, split warps of a block
// sharing a row group's k steps (the call's split: 1, 2, 4 or 8 warps along K). A block is kGemvWarps warps, so it
// owns T * kGemvWarps / split weight rows and MR rows of A (grid.y walks M in such chunks: any M is right, the
// weights read again per chunk).
//
// The block's MR rows of A are staged once in shared memory as fp32, with each 32-k chunk's sum, K in slices of at
// most kGemvStage / MR k (a larger K loops over slices). A chunk's 8 float4 are stored swizzled (unit x of chunk c at
// x ^ (c % 8)), so the 8 lanes of a quarter warp, reading 8 consecutive chunks, hit 8 different bank groups.
// Dequantization is exact in fp32: nibble q becomes the float 1 + q / 16 by or-ing it into the mantissa of 1.0, so
// for a lane's 32 k (inside one quantization block) sum (q - zp) a = 16 sum (1 + q / 16) a - (16 + zp) sum a, then
// times the block's scale. Each lane keeps its rows' next k step in flight while it uses the current one; the sums
// are reduced across the warp with shuffles and across a row group's warps in shared memory, in a fixed order:
// deterministic, no atomics, no workspace.
constexpr int kGemvWarps = 8;      // warps a block
constexpr int kGemvStage = 8192;   // activations a slice (fp32, all MR rows): 32 KB
constexpr int kGemvMaxTile = 4;    // weight rows a warp: 1, 2 or 4

// One lane's 32 k of a weight row (both GEMV forms): the 16 bytes of nibbles, the block's scale and its zero point
// (a row past N or a chunk past the slice: no weights, scale 0).
struct GemvChunk {
  uint4 q;
  float scale;
  int zp;
};

__device__ __forceinline__ GemvChunk load_gemv_chunk(const uint8_t* __restrict__ B, const __half* __restrict__ S,
                                                     const uint8_t* __restrict__ Z, int n, int N, int c, int c_end,
                                                     int K, int block_shift, int blocks, int zp_stride) {
  GemvChunk r;
  r.zp = 8;
  if (n < N && c < c_end) {
    r.q = load_weight(B + (int64_t)n * (K / 2) + (int64_t)c * 16);
    const int blk = (c * 32) >> block_shift;
    if (Z != nullptr) r.zp = (Z[(int64_t)n * zp_stride + blk / 2] >> ((blk & 1) * 4)) & 0xF;
    r.scale = __half2float(S[(int64_t)n * blocks + blk]);
  } else {
    r.q = make_uint4(0, 0, 0, 0);
    r.scale = 0.0f;
  }
  return r;
}

// 1 + q / 16 exactly, q the nibble i (0-7) of a word: q into mantissa bits 19-22 of 1.0f
__device__ __forceinline__ float nibble_float(uint32_t word, int i) {
  const uint32_t bits = i <= 4 ? word << (19 - 4 * i) : word >> (4 * i - 19);
  return __int_as_float((int)((bits & 0x00780000u) | 0x3F800000u));
}

__device__ __forceinline__ float2 half2_floats(uint32_t u) {
  union { uint32_t u; __half2 h; } x;
  x.u = u;
  return __half22float2(x.h);
}

__device__ __forceinline__ uint32_t word_of(const uint4& q, int v) {
  return v == 0 ? q.x : v == 1 ? q.y : v == 2 ? q.z : q.w;
}

template <int T, int MR>
__global__ void __launch_bounds__(kGemvWarps * 32)
    int4_gemv_kernel(const __half* __restrict__ A, const uint8_t* __restrict__ B, const __half* __restrict__ S,
                     const uint8_t* __restrict__ Z, __half* __restrict__ Y, int M, int N, int K, int block_shift,
                     int split, int slice) {
  // [MR][slice / 4] float4 activations (swizzled), [MR][slice / 32] chunk sums, [kGemvWarps][T][MR] warp sums
  extern __shared__ float4 gemv_smem[];
  float4* stage = gemv_smem;
  float* sums = reinterpret_cast<float*>(gemv_smem + MR * (slice / 4));
  float* partial = sums + MR * (slice / 32);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = warp / split;
  const int part = warp % split;
  const int n0 = (blockIdx.x * (kGemvWarps / split) + group) * T;
  const int m0 = blockIdx.y * MR;
  const int blocks = K >> block_shift;
  const int zp_stride = (blocks + 1) / 2;
  const int chunks = K / 32;  // K % 32 == 0 (block_size divides it)
  const int slice_chunks = slice / 32;

  float acc[T][MR];
#pragma unroll
  for (int r = 0; r < T; ++r)
#pragma unroll
    for (int j = 0; j < MR; ++j) acc[r][j] = 0.0f;

  for (int c0 = 0; c0 < chunks; c0 += slice_chunks) {
    const int c1 = min(c0 + slice_chunks, chunks);
    // this warp's first k step of the slice in flight while the slice's activations are staged
    GemvChunk cur[T];
#pragma unroll
    for (int r = 0; r < T; ++r)
      cur[r] = load_gemv_chunk(B, S, Z, n0 + r, N, c0 + 32 * part + lane, c1, K, block_shift, blocks, zp_stride);
    __syncthreads();  // every warp done with the previous slice's activations
    // 8 halves a thread (groups of 4 threads: a chunk, summed with shuffles); the trip count is the same for every
    // thread, so every lane takes part in the shuffles
    const int units = (c1 - c0) * 4;
    for (int base = 0; base < MR * units; base += blockDim.x) {
      const int i = base + threadIdx.x;
      const bool in = i < MR * units;
      const int j = in ? i / units : 0;
      const int u = in ? i % units : 0;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (in && m0 + j < M) {
        v = __ldg(reinterpret_cast<const uint4*>(A + (int64_t)(m0 + j) * K + (int64_t)c0 * 32 + 8 * u));
      }
      const float2 p0 = half2_floats(v.x), p1 = half2_floats(v.y), p2 = half2_floats(v.z), p3 = half2_floats(v.w);
      const float f[8] = {p0.x, p0.y, p1.x, p1.y, p2.x, p2.y, p3.x, p3.y};
      float s = ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
      s += __shfl_xor_sync(0xFFFFFFFFu, s, 1);
      s += __shfl_xor_sync(0xFFFFFFFFu, s, 2);
      if (in) {
        const int cc = u / 4;
        const int x = 2 * (u % 4);
        float4* row = stage + j * (slice / 4) + cc * 8;
        row[x ^ (cc & 7)] = make_float4(f[0], f[1], f[2], f[3]);
        row[(x + 1) ^ (cc & 7)] = make_float4(f[4], f[5], f[6], f[7]);
        if (u % 4 == 0) sums[j * slice_chunks + cc] = s;
      }
    }
    __syncthreads();
    for (int start = c0 + 32 * part; start < c1; start += 32 * split) {  // the same trip count for the warp's lanes
      const int c = start + lane;
      GemvChunk next[T];
#pragma unroll
      for (int r = 0; r < T; ++r)
        next[r] = load_gemv_chunk(B, S, Z, n0 + r, N, c + 32 * split, c1, K, block_shift, blocks, zp_stride);
      if (c < c1) {
        const int cc = c - c0;
#pragma unroll
        for (int j = 0; j < MR; ++j) {
          const float4* a = stage + j * (slice / 4) + cc * 8;
          float dot[T];
#pragma unroll
          for (int r = 0; r < T; ++r) dot[r] = 0.0f;
#pragma unroll
          for (int x = 0; x < 8; ++x) {  // unit x: k 4x .. 4x + 3 of the chunk, nibbles 4 (x % 2) .. + 3 of word x / 2
            const float4 v = a[x ^ (cc & 7)];
#pragma unroll
            for (int r = 0; r < T; ++r) {
              const uint32_t w = word_of(cur[r].q, x / 2);
              const int i = 4 * (x % 2);
              dot[r] = fmaf(nibble_float(w, i), v.x, dot[r]);
              dot[r] = fmaf(nibble_float(w, i + 1), v.y, dot[r]);
              dot[r] = fmaf(nibble_float(w, i + 2), v.z, dot[r]);
              dot[r] = fmaf(nibble_float(w, i + 3), v.w, dot[r]);
            }
          }
          const float sa = sums[j * slice_chunks + cc];
#pragma unroll
          for (int r = 0; r < T; ++r)
            acc[r][j] = fmaf(cur[r].scale, 16.0f * dot[r] - (float)(16 + cur[r].zp) * sa, acc[r][j]);
        }
      }
#pragma unroll
      for (int r = 0; r < T; ++r) cur[r] = next[r];
    }
  }

  gemv_finish<T, MR>(acc, partial, Y, M, N, n0, m0, split);
}

// Shared memory of a GEMV block: the staged activations, their chunk sums and the warps' sums.
inline int gemv_smem_bytes(int tile, int mr, int slice) {
  return (mr * slice + mr * (slice / 32) + kGemvWarps * tile * mr) * (int)sizeof(float);
}

// The k a slice stages: all of K where it fits kGemvStage floats for the MR rows.
inline int gemv_slice(int mr, int k) {
  const int cap = (kGemvStage / mr) / 32 * 32;
  return k < cap ? k : cap;
}

// The half2 GEMV form (form 4, M = 1-4, no tensor cores): the GEMV form's layout (a lane takes 32 consecutive k of a
// weight row a step, each warp T rows, `split` warps of a block sharing a row group's k steps) with the arithmetic
// of fp16 pairs, about half the instructions a weight of the GEMV form's exact fp32: the nibbles become fp16 pairs
// by mask-and-or ((w >> s) & 0x000F000F | 0x64006400 is 1024 + q for nibbles s / 4 and s / 4 + 4), one exact
// subtraction of 1024 + zp gives q - zp, and one fused multiply-add a pair accumulates (q - zp) * a in fp16. So that
// fp16 accumulation stays short, a lane's 32 k go into two pairs of 8 products each, added in fp32 and times the
// block's scale in fp32 at the end of every 32 k. The block's MR rows of A are staged once in shared memory as the
// pairs the nibbles meet, (a[8v + i], a[8v + i + 4]) for word v and i = 0-3 (one 16-byte unit per word), in slices of
// at most kHgemvStage halves for all MR rows. Unit v of a chunk c sits at 4 c + (v ^ ((c >> 1) & 3)), so the 8 lanes
// of a quarter warp, reading unit v of 8 consecutive chunks, hit 8 different 16-byte bank groups. Sums across the
// warp and the row group's warps as in the GEMV form: a fixed order, deterministic, no atomics, no workspace.
constexpr int kHgemvStage = 16384;  // halves a slice (all MR rows): 32 KB

__device__ __forceinline__ uint32_t hfma_pair(uint32_t a, uint32_t b, uint32_t c) {
  union { uint32_t u; __half2 h; } x, y, z, r;
  x.u = a;
  y.u = b;
  z.u = c;
  r.h = __hfma2(x.h, y.h, z.h);
  return r.u;
}

__device__ __forceinline__ uint32_t hsub_pair(uint32_t a, uint32_t b) {
  union { uint32_t u; __half2 h; } x, y, r;
  x.u = a;
  y.u = b;
  r.h = __hsub2(x.h, y.h);
  return r.u;
}

__device__ __forceinline__ float pair_sum(uint32_t u) {
  const float2 f = half2_floats(u);
  return f.x + f.y;
}

__device__ __forceinline__ uint32_t unit_word(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

template <int T, int MR>
__global__ void __launch_bounds__(kGemvWarps * 32)
    int4_hgemv_kernel(const __half* __restrict__ A, const uint8_t* __restrict__ B, const __half* __restrict__ S,
                      const uint8_t* __restrict__ Z, __half* __restrict__ Y, int M, int N, int K, int block_shift,
                      int split, int slice) {
  // [MR][slice / 8] uint4 activation pairs (swizzled), then [kGemvWarps][T][MR] warp sums
  extern __shared__ uint4 hgemv_smem[];
  uint4* stage = hgemv_smem;
  float* partial = reinterpret_cast<float*>(hgemv_smem + MR * (slice / 8));

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = warp / split;
  const int part = warp % split;
  const int n0 = (blockIdx.x * (kGemvWarps / split) + group) * T;
  const int m0 = blockIdx.y * MR;
  const int blocks = K >> block_shift;
  const int zp_stride = (blocks + 1) / 2;
  const int chunks = K / 32;  // K % 32 == 0 (block_size divides it)
  const int slice_chunks = slice / 32;
  const int row_units = slice / 8;

  float acc[T][MR];
#pragma unroll
  for (int r = 0; r < T; ++r)
#pragma unroll
    for (int j = 0; j < MR; ++j) acc[r][j] = 0.0f;

  for (int c0 = 0; c0 < chunks; c0 += slice_chunks) {
    const int c1 = min(c0 + slice_chunks, chunks);
    GemvChunk cur[T];
#pragma unroll
    for (int r = 0; r < T; ++r)
      cur[r] = load_gemv_chunk(B, S, Z, n0 + r, N, c0 + 32 * part + lane, c1, K, block_shift, blocks, zp_stride);
    __syncthreads();  // every warp done with the previous slice's activations
    // a thread a 16-byte unit of A (8 k: word v of a chunk), permuted into the pairs the nibbles meet
    const int units = (c1 - c0) * 4;
    for (int i = threadIdx.x; i < MR * units; i += blockDim.x) {
      const int j = i / units;
      const int u = i % units;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + j < M) v = __ldg(reinterpret_cast<const uint4*>(A + (int64_t)(m0 + j) * K + (int64_t)c0 * 32 + 8 * u));
      const int cc = u / 4;
      stage[j * row_units + 4 * cc + ((u % 4) ^ ((cc >> 1) & 3))] =
          make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410),
                     __byte_perm(v.y, v.w, 0x7632));
    }
    __syncthreads();
    for (int start = c0 + 32 * part; start < c1; start += 32 * split) {  // the same trip count for the warp's lanes
      const int c = start + lane;
      GemvChunk next[T];
#pragma unroll
      for (int r = 0; r < T; ++r)
        next[r] = load_gemv_chunk(B, S, Z, n0 + r, N, c + 32 * split, c1, K, block_shift, blocks, zp_stride);
      if (c < c1) {
        const int cc = c - c0;
        uint32_t h[T][MR][2];
#pragma unroll
        for (int r = 0; r < T; ++r)
#pragma unroll
          for (int j = 0; j < MR; ++j) h[r][j][0] = h[r][j][1] = 0u;
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          uint4 a[MR];
#pragma unroll
          for (int j = 0; j < MR; ++j) a[j] = stage[j * row_units + 4 * cc + (v ^ ((cc >> 1) & 3))];
#pragma unroll
          for (int r = 0; r < T; ++r) {
            const uint32_t w = word_of(cur[r].q, v);
            const uint32_t bias = (uint32_t)(0x6400 + cur[r].zp) * 0x00010001u;  // the pair (1024 + zp, 1024 + zp)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const uint32_t d = hsub_pair(nibble_pair(w, 4 * i), bias);  // (q - zp) for k 8v + i, 8v + i + 4
#pragma unroll
              for (int j = 0; j < MR; ++j) h[r][j][i / 2] = hfma_pair(d, unit_word(a[j], i), h[r][j][i / 2]);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < T; ++r)
#pragma unroll
          for (int j = 0; j < MR; ++j)
            acc[r][j] = fmaf(cur[r].scale, pair_sum(h[r][j][0]) + pair_sum(h[r][j][1]), acc[r][j]);
      }
#pragma unroll
      for (int r = 0; r < T; ++r) cur[r] = next[r];
    }
  }

  gemv_finish<T, MR>(acc, partial, Y, M, N, n0, m0, split);
}

// Shared memory of a half2 GEMV block: the staged activation pairs and the warps' sums.
inline int hgemv_smem_bytes(int tile, int mr, int slice) {
  return mr * slice * (int)sizeof(__half) + kGemvWarps * tile * mr * (int)sizeof(float);
}

// The k a half2 GEMV slice stages: all of K where it fits kHgemvStage halves for the MR rows.
inline int hgemv_slice(int mr, int k) {
  const int cap = (kHgemvStage / mr) / 32 * 32;
  return k < cap ? k : cap;
}

// H: the half2 form (int4_hgemv_kernel), else the fp32 one (int4_gemv_kernel); they take the same arguments.
template <bool H, int T, int MR>
cudaError_t launch_gemv(int split, const __half* A, const uint8_t* B, const __half* S, const uint8_t* Z, __half* Y,
                        int M, int N, int K, int block_shift, cudaStream_t stream) {
  const int rows = T * (kGemvWarps / split);
  const dim3 grid((N + rows - 1) / rows, (M + MR - 1) / MR);
  const int slice = H ? hgemv_slice(MR, K) : gemv_slice(MR, K);
  const int smem = H ? hgemv_smem_bytes(T, MR, slice) : gemv_smem_bytes(T, MR, slice);
  if (H) {
    int4_hgemv_kernel<T, MR><<<grid, kGemvWarps * 32, smem, stream>>>(A, B, S, Z, Y, M, N, K, block_shift, split, slice);
  } else {
    int4_gemv_kernel<T, MR><<<grid, kGemvWarps * 32, smem, stream>>>(A, B, S, Z, Y, M, N, K, block_shift, split, slice);
  }
  return cudaGetLastError();
}

template <bool H, int MR>
cudaError_t launch_gemv_for(int tile, int split, const __half* A, const uint8_t* B, const __half* S,
                            const uint8_t* Z, __half* Y, int M, int N, int K, int block_shift, cudaStream_t stream) {
  if (tile == 1) return launch_gemv<H, 1, MR>(split, A, B, S, Z, Y, M, N, K, block_shift, stream);
  if (tile == 2) return launch_gemv<H, 2, MR>(split, A, B, S, Z, Y, M, N, K, block_shift, stream);
  return launch_gemv<H, 4, MR>(split, A, B, S, Z, Y, M, N, K, block_shift, stream);
}

template <int MT>
cudaError_t launch_for(int nt, int kw, const __half* A, const uint8_t* B, const __half* S, const uint8_t* Z,
                       __half* Y, int M, int N, int K, int block_shift, cudaStream_t stream) {
  if (nt == 2) {
    if (kw == 1) return launch<2, MT, 1>(A, B, S, Z, Y, M, N, K, block_shift, stream);
    if (kw == 2) return launch<2, MT, 2>(A, B, S, Z, Y, M, N, K, block_shift, stream);
    if (kw == 4) return launch<2, MT, 4>(A, B, S, Z, Y, M, N, K, block_shift, stream);
    return launch<2, MT, 8>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  }
  if (kw == 1) return launch<1, MT, 1>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  if (kw == 2) return launch<1, MT, 2>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  if (kw == 4) return launch<1, MT, 4>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  if (kw == 8) return launch<1, MT, 8>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  return launch<1, MT, 16>(A, B, S, Z, Y, M, N, K, block_shift, stream);
}

struct Device {
  int sms = 0;
  int major = 0;
  bool clusters = false;  // the GPU has them and the code loaded for it was compiled with them (sm_90 on)
};

template <class Kernel>
void load(Kernel kernel) {
  cudaFuncAttributes attributes;
  (void)cudaFuncGetAttributes(&attributes, kernel);
}

// Every kernel loaded now: with CUDA's lazy loading a kernel is otherwise loaded at its first launch, which for a
// shape first met inside a graph capture would be during the capture.
void load_all() {
  load(int4_gemm_kernel<1, 1, 1>);
  load(int4_gemm_kernel<1, 1, 2>);
  load(int4_gemm_kernel<1, 2, 1>);
  load(int4_gemm_kernel<1, 2, 2>);
  load(int4_gemm_kernel<1, 4, 1>);
  load(int4_gemm_kernel<1, 4, 2>);
  load(int4_gemm_kernel<2, 1, 1>);
  load(int4_gemm_kernel<2, 1, 2>);
  load(int4_gemm_kernel<2, 2, 1>);
  load(int4_gemm_kernel<2, 2, 2>);
  load(int4_gemm_kernel<2, 4, 1>);
  load(int4_gemm_kernel<2, 4, 2>);
  load(int4_gemm_kernel<1, 1, 4>);
  load(int4_gemm_kernel<1, 1, 8>);
  load(int4_gemm_kernel<1, 1, 16>);
  load(int4_gemm_kernel<1, 2, 4>);
  load(int4_gemm_kernel<1, 2, 8>);
  load(int4_gemm_kernel<1, 2, 16>);
  load(int4_gemm_kernel<1, 4, 4>);
  load(int4_gemm_kernel<1, 4, 8>);
  load(int4_gemm_kernel<1, 4, 16>);
  load(int4_gemm_kernel<2, 1, 4>);
  load(int4_gemm_kernel<2, 1, 8>);
  load(int4_gemm_kernel<2, 2, 4>);
  load(int4_gemm_kernel<2, 2, 8>);
  load(int4_gemm_kernel<2, 4, 4>);
  load(int4_gemm_kernel<2, 4, 8>);
  load(int4_gemm_rows_kernel<1>);
  load(int4_gemm_rows_kernel<2>);
  load(int4_gemm_rows_kernel<4>);
  load(int4_gemm_rows_kernel<8>);
  load(int4_gemv_kernel<1, 1>);
  load(int4_gemv_kernel<1, 2>);
  load(int4_gemv_kernel<1, 4>);
  load(int4_gemv_kernel<2, 1>);
  load(int4_gemv_kernel<2, 2>);
  load(int4_gemv_kernel<2, 4>);
  load(int4_gemv_kernel<4, 1>);
  load(int4_gemv_kernel<4, 2>);
  load(int4_gemv_kernel<4, 4>);
  load(int4_hgemv_kernel<1, 1>);
  load(int4_hgemv_kernel<1, 2>);
  load(int4_hgemv_kernel<1, 4>);
  load(int4_hgemv_kernel<2, 1>);
  load(int4_hgemv_kernel<2, 2>);
  load(int4_hgemv_kernel<2, 4>);
  load(int4_hgemv_kernel<4, 1>);
  load(int4_hgemv_kernel<4, 2>);
  load(int4_hgemv_kernel<4, 4>);
}

Device device_info() {
  // read once per device, before any capture in practice (a session runs once before it captures a graph)
  static Device devices[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return Device{132, 9, true};
  Device& d = devices[device];
  if (d.sms == 0) {
    int sms = 0, major = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) major = 8;
    // an sm_90 GPU running code built for sm_80 (PTX) has no cluster reduction in it
    cudaFuncAttributes attributes;
    const bool built = cudaFuncGetAttributes(&attributes, int4_gemm_rows_kernel<1>) == cudaSuccess &&
                       attributes.binaryVersion >= 90;
    d.clusters = major >= 9 && built;
    load_all();
    d.major = major;
    d.sms = sms;
  }
  return d;
}

int form_from_env() {
  static int form = -1;
  if (form < 0) {
    const char* v = getenv("ONNXPIPE_INT4_GEMM_FORM");
    form = v == nullptr ? ONNXPIPE_INT4_GEMM_AUTO
           : strcmp(v, "warps") == 0   ? ONNXPIPE_INT4_GEMM_WARPS
           : strcmp(v, "cluster") == 0 ? ONNXPIPE_INT4_GEMM_CLUSTER
           : strcmp(v, "gemv") == 0    ? ONNXPIPE_INT4_GEMM_GEMV
           : strcmp(v, "hgemv") == 0   ? ONNXPIPE_INT4_GEMM_HGEMV
                                       : ONNXPIPE_INT4_GEMM_AUTO;
  }
  return form;
}

// How a call is laid out: the form, the A rows a block takes (8 * mt; the GEMV form: mt), and for the warps form
// the weight tiles a block (nt) and its warps along K (kw); for the cluster form its warps along N (kw) and the
// cluster's blocks along K (slices); for the GEMV forms the weight rows a warp (nt) and its block's warps along K (kw).
struct Plan {
  int form, mt, nt, kw, slices;
  dim3 grid;
};

// tile and split (0: chosen here) set, for the warps form, the weight tiles a block (1, 2) and its warps along K
// (1, 2, 4, 8, 16; up to 8 with 2 tiles); for the cluster form, its warps along N (1-8) and the cluster's blocks
// along K (1-8); for the GEMV forms (fp32 and half2), the weight rows a warp (1, 2, 4) and the warps along K that
// share them (1, 2, 4, 8 of the block's 8). A value outside those gives form -1.
// The form a call takes when none is asked for and no entry of kLayouts holds the call: GEMV at M = 1 (the mma
// forms use 1 of their tile's 8 columns there), else the warps form until a GPU run of scripts/check_kernels.py has
// compared it with the cluster form on the Llama shapes.
int auto_form(int m, int /*n*/, int /*k*/, const Device& /*d*/) {
  return m == 1 ? ONNXPIPE_INT4_GEMM_GEMV : ONNXPIPE_INT4_GEMM_WARPS;
}

// Layouts measured faster than the rule in make_plan for a shape: the first entry whose ranges (inclusive) hold a
// call's M, N and K gives its form, tile and split, where the call asks for no tile and split and its form is auto
// or the entry's (a cluster entry needs clusters on the GPU). Entries come from scripts/check_kernels.py's sweep
// (every layout timed per shape at M = 1, 8, 32; its "layouts" lines print the rows to paste here, with the figures
// they rest on); a shape no entry holds keeps the rule. onnxpipe_int4_gemm_layout reads the table back.
struct Layout {
  int m_min, m_max, n_min, n_max, k_min, k_max, form, tile, split;
};
constexpr Layout kLayouts[] = {
    // Llama-3.2-1B gate/up (8192 x 2048), M 17-32: 2 weight tiles a block, 4 warps along K: 12.63 us against the
    // rule's 2 x 8 at 14.83 (H100, check_kernels run 28, block 128 with zero points)
    {17, 32, 8192, 8192, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 2, 4},
    // The rows below: H100, check_kernels run 29 (the bench's variant: block 32, no zero points), each against the
    // rule's layout timed beside it in the same sweep.
    // (M = 1 is left to the rule, the GEMV form, which run 29 did not have: its sweep's M = 1 rows of the warps form,
    // 4.95 us for the packed q/k/v and 72.02 for the head, are what GEMV has to beat there)
    // 1B packed q/k/v (3072 x 2048), M 2-8: 16 warps along K, 4.98 us against the rule's 8 at 5.59
    {2, 8, 3072, 3072, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 1, 16},
    // 1B gate/up, M 2-8: 8 warps along K, 8.18 us against the rule's 4 at 8.67
    {2, 8, 8192, 8192, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 1, 8},
    // 1B LM head (128256 x 2048), M 2-8: 2 warps along K, 77.22 us against the rule's 4 at 82.82;
    // M 17-32: the row-tiled form, 8 warps along N, K not split, 140.82 us against 174.78 for run 29's entry (2
    // weight tiles, 1 warp along K; H100, check_kernels run 34, code at 1f23316)
    {2, 8, 128256, 128256, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 1, 2},
    {17, 32, 128256, 128256, 2048, 2048, ONNXPIPE_INT4_GEMM_CLUSTER, 8, 1},
    // The rows below: H100, check_kernels run 34 (block 32, no zero points), code at 1f23316 (the row-tiled form's
    // activations staged in shared memory), against the default beside them in the same sweep.
    // 1B down (2048 x 8192), M = 1: 16 warps along K, 9.31 us against the GEMV rule's 10.66
    {1, 1, 2048, 2048, 8192, 8192, ONNXPIPE_INT4_GEMM_WARPS, 1, 16},
    // 1B LM head, M = 1: 2 warps along K, 72.11 us against the GEMV rule's 110.87
    {1, 1, 128256, 128256, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 1, 2},
    // 1B gate and up as one (16384 x 2048, kernels/gate_up.py), M 17-32: the row-tiled form, 8 warps along N,
    // clusters of 2 along K, 26.02 us against the warps rule's 28.60 (check_kernels run 35, code at bc7799d)
    {17, 32, 16384, 16384, 2048, 2048, ONNXPIPE_INT4_GEMM_CLUSTER, 8, 2},
};
constexpr int kLayoutCount = (int)(sizeof(kLayouts) / sizeof(kLayouts[0]));

// The entry of kLayouts a call of this form and shape takes, or -1.
int table_layout(int form, int m, int n, int k, const Device& d) {
  for (int i = 0; i < kLayoutCount; ++i) {
    const Layout& e = kLayouts[i];
    if (m < e.m_min || m > e.m_max || n < e.n_min || n > e.n_max || k < e.k_min || k > e.k_max) continue;
    if (form != ONNXPIPE_INT4_GEMM_AUTO && form != e.form) continue;
    if (e.form == ONNXPIPE_INT4_GEMM_CLUSTER && e.split != 1 && !d.clusters) continue;  // K split: needs clusters
    return i;
  }
  return -1;
}

Plan make_plan(int form, int m, int n, int k, int tile, int split) {
  const Device d = device_info();
  const int sms = d.sms;
  Plan p{};
  if (tile == 0 && split == 0) {
    const int entry = table_layout(form, m, n, k, d);
    if (entry >= 0) {
      form = kLayouts[entry].form;
      tile = kLayouts[entry].tile;
      split = kLayouts[entry].split;
    }
  }
  if (form == ONNXPIPE_INT4_GEMM_AUTO) form = auto_form(m, n, k, d);
  // clusters (K split across blocks): sm_90 on; the row-tiled form with K not split runs anywhere
  if (form == ONNXPIPE_INT4_GEMM_CLUSTER && !d.clusters && split != 1) form = ONNXPIPE_INT4_GEMM_WARPS;
  p.form = form;
  if (form == ONNXPIPE_INT4_GEMM_GEMV || form == ONNXPIPE_INT4_GEMM_HGEMV) {
    // 1, 2 or 4 A rows a block (M = 3: 4, one masked); the most weight rows a warp (4, 2, 1) whose grid still gives
    // every SM two blocks, all 8 warps on their own rows
    p.mt = m == 1 ? 1 : m == 2 ? 2 : 4;
    const int m_chunks = (m + p.mt - 1) / p.mt;
    int rows = 1;
    for (int t = kGemvMaxTile; t > 1; t /= 2) {
      if ((int64_t)((n + t * kGemvWarps - 1) / (t * kGemvWarps)) * m_chunks >= 2 * sms) {
        rows = t;
        break;
      }
    }
    const int warps_k = split != 0 ? split : 1;
    if (tile != 0) rows = tile;
    if ((rows != 1 && rows != 2 && rows != 4) || (warps_k != 1 && warps_k != 2 && warps_k != 4 && warps_k != 8)) {
      p.form = -1;
      return p;
    }
    p.nt = rows;
    p.kw = warps_k;
    p.slices = 1;
    const int block_rows = rows * (kGemvWarps / warps_k);
    p.grid = dim3((n + block_rows - 1) / block_rows, m_chunks, 1);
    return p;
  }
  // A rows a block: 8, 16, 32; 64 past 32 in the cluster form (its one weight tile a warp leaves the registers;
  // the weights are then read once per 64 rows of a prefill, not per 32)
  p.mt = m <= 8 ? 1 : m <= 16 ? 2 : (m <= 32 || form != ONNXPIPE_INT4_GEMM_CLUSTER) ? 4 : 8;
  const int m_chunks = (m + 8 * p.mt - 1) / (8 * p.mt);
  const int steps = (k + kStep - 1) / kStep;
  if (form == ONNXPIPE_INT4_GEMM_CLUSTER) {
    // the widest row tile whose grid, split along K by up to 8, still fills the SMs; then the fewest slices that do
    const int max_slices = steps < kMaxSlices ? steps : kMaxSlices;
    int warps = kMaxRowWarps;
    while (warps > 2 && ((n + 16 * warps - 1) / (16 * warps)) * m_chunks * max_slices < sms) warps /= 2;
    if (tile != 0) warps = tile;
    if (warps < 1 || warps > kMaxRowWarps) {
      p.form = -1;
      return p;
    }
    const int tiles = ((n + 16 * warps - 1) / (16 * warps)) * m_chunks;
    int slices = (sms + tiles - 1) / tiles;
    if (slices > max_slices) slices = max_slices;
    if (slices < 1) slices = 1;
    if (split != 0) slices = split;
    if (slices < 1 || slices > kMaxSlices || (slices > 1 && !d.clusters)) {
      p.form = -1;
      return p;
    }
    p.nt = 1;
    p.kw = warps;
    p.slices = slices;
    p.grid = dim3((n + 16 * warps - 1) / (16 * warps), m_chunks, slices);
    return p;
  }
  const int n16 = (n + 15) / 16;
  // two weight tiles a block when the activations are reused enough (M > 8) and the grid stays full
  p.nt = (p.mt >= 2 && (n16 / 2) * m_chunks >= sms) ? 2 : 1;
  const int grid = ((n16 + p.nt - 1) / p.nt) * m_chunks;
  int kw = grid >= 2 * sms ? 4 : grid >= sms ? 8 : 16;
  if (p.nt == 2 && kw > 8) kw = 8;
  while (kw > 4 && kw / 2 >= steps) kw /= 2;  // no warp left without a k step where it can be helped
  if (tile != 0) {
    if (tile != 1 && tile != 2) p.form = -1;
    p.nt = tile;
  }
  if (split != 0) {
    if (split != 1 && split != 2 && split != 4 && split != 8 && split != 16) p.form = -1;
    kw = split;
  }
  if (p.nt == 2 && kw > 8) p.form = -1;  // its shared memory: 8 warps of 32 x 32 partial sums at most
  p.kw = kw;
  p.slices = 1;
  p.grid = dim3((n16 + p.nt - 1) / p.nt, m_chunks, 1);
  return p;
}

int check_args(const void* A, const uint8_t* B, const void* scales, void* Y, int64_t M, int64_t N, int64_t K,
               int64_t block_size, int* block_shift) {
  if (A == nullptr || B == nullptr || scales == nullptr || Y == nullptr) return ONNXPIPE_INT4_GEMM_NULL_POINTER;
  if (M < 0 || N < 1 || K < 1 || M > INT_MAX || N > INT_MAX || K > INT_MAX) return ONNXPIPE_INT4_GEMM_BAD_SHAPE;
  if (block_size == 32) {
    *block_shift = 5;
  } else if (block_size == 64) {
    *block_shift = 6;
  } else if (block_size == 128) {
    *block_shift = 7;
  } else {
    return ONNXPIPE_INT4_GEMM_BAD_BLOCK;
  }
  if (K % block_size != 0) return ONNXPIPE_INT4_GEMM_BAD_BLOCK;
  if ((reinterpret_cast<uintptr_t>(A) | reinterpret_cast<uintptr_t>(B)) % 16 != 0) {
    return ONNXPIPE_INT4_GEMM_MISALIGNED;
  }
  return ONNXPIPE_INT4_GEMM_OK;
}

}  // namespace

extern "C" int onnxpipe_int4_gemm_config(int form, int tile, int split, const void* A, const uint8_t* B,
                                         const void* scales, const uint8_t* zero_points, void* Y, int64_t M,
                                         int64_t N, int64_t K, int64_t block_size, void* stream) {
  int block_shift = 0;
  const int bad = check_args(A, B, scales, Y, M, N, K, block_size, &block_shift);
  if (bad != ONNXPIPE_INT4_GEMM_OK) return bad;
  if (M == 0) return ONNXPIPE_INT4_GEMM_OK;
  if (form < ONNXPIPE_INT4_GEMM_AUTO || form > ONNXPIPE_INT4_GEMM_HGEMV) return ONNXPIPE_INT4_GEMM_BAD_FORM;

  const int m = (int)M, n = (int)N, k = (int)K;
  const Plan p = make_plan(form, m, n, k, tile, split);
  if (p.form < 0) return ONNXPIPE_INT4_GEMM_BAD_FORM;
  const __half* a = static_cast<const __half*>(A);
  const __half* s = static_cast<const __half*>(scales);
  __half* y = static_cast<__half*>(Y);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (p.form == ONNXPIPE_INT4_GEMM_HGEMV) {
    if (p.mt == 1) {
      err = launch_gemv_for<true, 1>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
    } else if (p.mt == 2) {
      err = launch_gemv_for<true, 2>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
    } else {
      err = launch_gemv_for<true, 4>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
    }
  } else if (p.form == ONNXPIPE_INT4_GEMM_GEMV) {
    if (p.mt == 1) {
      err = launch_gemv_for<false, 1>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
    } else if (p.mt == 2) {
      err = launch_gemv_for<false, 2>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
    } else {
      err = launch_gemv_for<false, 4>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
    }
  } else if (p.form == ONNXPIPE_INT4_GEMM_CLUSTER) {
    if (p.mt == 1) {
      err = launch_rows<1>(p.kw, p.slices, a, B, s, zero_points, y, m, n, k, block_shift, st);
    } else if (p.mt == 2) {
      err = launch_rows<2>(p.kw, p.slices, a, B, s, zero_points, y, m, n, k, block_shift, st);
    } else if (p.mt == 4) {
      err = launch_rows<4>(p.kw, p.slices, a, B, s, zero_points, y, m, n, k, block_shift, st);
    } else {
      err = launch_rows<8>(p.kw, p.slices, a, B, s, zero_points, y, m, n, k, block_shift, st);
    }
  } else if (p.mt == 1) {
    err = launch_for<1>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
  } else if (p.mt == 2) {
    err = launch_for<2>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
  } else {
    err = launch_for<4>(p.nt, p.kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
  }
  return (int)err;
}

extern "C" int onnxpipe_int4_gemm_form(int form, const void* A, const uint8_t* B, const void* scales,
                                       const uint8_t* zero_points, void* Y, int64_t M, int64_t N, int64_t K,
                                       int64_t block_size, void* stream) {
  return onnxpipe_int4_gemm_config(form, 0, 0, A, B, scales, zero_points, Y, M, N, K, block_size, stream);
}

extern "C" int onnxpipe_int4_gemm(const void* A, const uint8_t* B, const void* scales, const uint8_t* zero_points,
                                  void* Y, int64_t M, int64_t N, int64_t K, int64_t block_size, void* stream) {
  return onnxpipe_int4_gemm_form(form_from_env(), A, B, scales, zero_points, Y, M, N, K, block_size, stream);
}

extern "C" int onnxpipe_int4_gemm_describe(int form, int tile, int split, int64_t M, int64_t N, int64_t K,
                                           char* out, int size) {
  if (out == nullptr || size < 1 || M < 1 || N < 1 || K < 1 || M > INT_MAX || N > INT_MAX || K > INT_MAX) {
    return ONNXPIPE_INT4_GEMM_BAD_SHAPE;
  }
  if (form < ONNXPIPE_INT4_GEMM_AUTO || form > ONNXPIPE_INT4_GEMM_HGEMV) return ONNXPIPE_INT4_GEMM_BAD_FORM;
  if (form == ONNXPIPE_INT4_GEMM_AUTO) form = form_from_env();
  const Plan p = make_plan(form, (int)M, (int)N, (int)K, tile, split);
  if (p.form < 0) return ONNXPIPE_INT4_GEMM_BAD_FORM;
  if (p.form == ONNXPIPE_INT4_GEMM_GEMV || p.form == ONNXPIPE_INT4_GEMM_HGEMV) {
    // tile: weight rows a warp; split: the block's warps along K that share them
    const bool h = p.form == ONNXPIPE_INT4_GEMM_HGEMV;
    const int slice = h ? hgemv_slice(p.mt, (int)K) : gemv_slice(p.mt, (int)K);
    snprintf(out, size,
             "%s: grid %ux%u, %d weight rows and %d A rows a block, %d weight rows a warp, %d warps along K, "
             "K staged %d at a time",
             h ? "hgemv" : "gemv", p.grid.x, p.grid.y, p.nt * (kGemvWarps / p.kw), p.mt, p.nt, p.kw, slice);
  } else if (p.form == ONNXPIPE_INT4_GEMM_CLUSTER) {
    snprintf(out, size, "cluster: grid %ux%ux%u, %d warps along N, %d A rows a block, clusters of %d along K",
             p.grid.x, p.grid.y, p.grid.z, p.kw, 8 * p.mt, p.slices);
  } else {
    snprintf(out, size, "warps: grid %ux%u, %d weight rows and %d A rows a block, %d warps along K", p.grid.x,
             p.grid.y, 16 * p.nt, 8 * p.mt, p.kw);
  }
  return ONNXPIPE_INT4_GEMM_OK;
}

extern "C" int onnxpipe_int4_gemm_layout(int index, int* out) {
  if (out == nullptr || index < 0 || index >= kLayoutCount) return -1;
  const Layout& e = kLayouts[index];
  const int values[9] = {e.m_min, e.m_max, e.n_min, e.n_max, e.k_min, e.k_max, e.form, e.tile, e.split};
  memcpy(out, values, sizeof values);
  return 0;
}

extern "C" int onnxpipe_int4_gemm_layout_for(int form, int64_t M, int64_t N, int64_t K) {
  if (M < 1 || N < 1 || K < 1 || M > INT_MAX || N > INT_MAX || K > INT_MAX) return -1;
  if (form == ONNXPIPE_INT4_GEMM_AUTO) form = form_from_env();
  return table_layout(form, (int)M, (int)N, (int)K, device_info());
}

extern "C" const char* onnxpipe_int4_gemm_error(int code) {
  switch (code) {
    case ONNXPIPE_INT4_GEMM_OK:
      return "ok";
    case ONNXPIPE_INT4_GEMM_BAD_SHAPE:
      return "int4 gemm: M must be >= 0, N and K >= 1, each at most 2^31 - 1";
    case ONNXPIPE_INT4_GEMM_BAD_BLOCK:
      return "int4 gemm: block_size must be 32, 64 or 128 and divide K";
    case ONNXPIPE_INT4_GEMM_MISALIGNED:
      return "int4 gemm: A and B must be 16-byte aligned";
    case ONNXPIPE_INT4_GEMM_NULL_POINTER:
      return "int4 gemm: A, B, scales and Y must not be NULL";
    case ONNXPIPE_INT4_GEMM_BAD_FORM:
      return "int4 gemm: form must be 0 (auto), 1 (warps), 2 (cluster), 3 (gemv) or 4 (hgemv), with a tile and split it "
             "takes";
    default:
      break;
  }
  if (code > 0) return cudaGetErrorString(static_cast<cudaError_t>(code));
  return "int4 gemm: unknown error code";
}
