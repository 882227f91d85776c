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
// w, w + KW, ...), prefetching the next step's weight into registers, and are summed in shared memory in a fixed
// order at the end: deterministic, no atomics, no workspace. The host picks NT, MT and KW from M, N and the SM
// count so that a 2048-wide projection still gives every SM a block.

#include "int4_gemm.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

namespace {

constexpr int kStep = 128;       // k per warp step: 4 lanes x 32 nibbles
constexpr int kMaxDevices = 64;  // SM counts cached per device

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

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load_weight(const uint8_t* p) {
  // streamed once: do not keep it in L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
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

  RowStep cur[NT][2];
  int step = warp;
  if (step < steps) {
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        cur[i][r] = load_row_step(B, S, Z, n0 + 16 * i + 8 * r + g, N, step * kStep + 32 * t, K, block_shift,
                                  blocks, zp_stride);
  }
  for (; step < steps; step += KW) {
    const int k = step * kStep + 32 * t;  // K % 32 == 0: a lane's 32 k are all in range or all out
    // the next step's weight in flight while this one is used
    RowStep next[NT][2];
    const int step_next = step + KW;
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        next[i][r] = load_row_step(B, S, Z, n0 + 16 * i + 8 * r + g, N, step_next * kStep + 32 * t,
                                   step_next < steps ? K : 0, block_shift, blocks, zp_stride);

    uint4 act[MT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int m = m0 + 8 * j + g;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        act[j][v] = (m < M && k < K) ? __ldg(reinterpret_cast<const uint4*>(A + (int64_t)m * K + k + 8 * v))
                                     : make_uint4(0, 0, 0, 0);
      }
    }

#pragma unroll
    for (int v = 0; v < 4; ++v) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t b0[MT], b1[MT];
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          // halves (x0 x1)(x2 x3)(x4 x5)(x6 x7): even mma takes (x0, x4), (x1, x5); odd (x2, x6), (x3, x7)
          const uint32_t lo = h == 0 ? act[j][v].x : act[j][v].y;
          const uint32_t hi = h == 0 ? act[j][v].z : act[j][v].w;
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
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) cur[i][r] = next[i][r];
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

template <int MT>
cudaError_t launch_for(int nt, int kw, const __half* A, const uint8_t* B, const __half* S, const uint8_t* Z,
                       __half* Y, int M, int N, int K, int block_shift, cudaStream_t stream) {
  if (nt == 2) {
    if (kw == 4) return launch<2, MT, 4>(A, B, S, Z, Y, M, N, K, block_shift, stream);
    return launch<2, MT, 8>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  }
  if (kw == 4) return launch<1, MT, 4>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  if (kw == 8) return launch<1, MT, 8>(A, B, S, Z, Y, M, N, K, block_shift, stream);
  return launch<1, MT, 16>(A, B, S, Z, Y, M, N, K, block_shift, stream);
}

int sm_count() {
  // read once per device, before any capture in practice (a session runs once before it captures a graph)
  static int counts[kMaxDevices] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 132;
  if (counts[device] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
    counts[device] = sms;
  }
  return counts[device];
}

}  // namespace

extern "C" int onnxpipe_int4_gemm(const void* A, const uint8_t* B, const void* scales, const uint8_t* zero_points,
                                  void* Y, int64_t M, int64_t N, int64_t K, int64_t block_size, void* stream) {
  if (A == nullptr || B == nullptr || scales == nullptr || Y == nullptr) return ONNXPIPE_INT4_GEMM_NULL_POINTER;
  if (M < 0 || N < 1 || K < 1 || M > INT_MAX || N > INT_MAX || K > INT_MAX) return ONNXPIPE_INT4_GEMM_BAD_SHAPE;
  int block_shift = 0;
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
  if ((reinterpret_cast<uintptr_t>(A) | reinterpret_cast<uintptr_t>(B)) % 16 != 0) {
    return ONNXPIPE_INT4_GEMM_MISALIGNED;
  }
  if (M == 0) return ONNXPIPE_INT4_GEMM_OK;

  const int m = (int)M, n = (int)N, k = (int)K;
  const int mt = m <= 8 ? 1 : m <= 16 ? 2 : 4;
  const int sms = sm_count();
  const int n16 = (n + 15) / 16;
  const int m_chunks = (m + 8 * mt - 1) / (8 * mt);
  // two weight tiles a block when the activations are reused enough (M > 8) and the grid stays full
  const int nt = (mt >= 2 && (n16 / 2) * m_chunks >= sms) ? 2 : 1;
  const int grid = ((n16 + nt - 1) / nt) * m_chunks;
  const int steps = (k + kStep - 1) / kStep;
  int kw = grid >= 2 * sms ? 4 : grid >= sms ? 8 : 16;
  if (nt == 2 && kw > 8) kw = 8;
  while (kw > 4 && kw / 2 >= steps) kw /= 2;  // no warp left without a k step where it can be helped

  const __half* a = static_cast<const __half*>(A);
  const __half* s = static_cast<const __half*>(scales);
  __half* y = static_cast<__half*>(Y);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (mt == 1) {
    err = launch_for<1>(nt, kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
  } else if (mt == 2) {
    err = launch_for<2>(nt, kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
  } else {
    err = launch_for<4>(nt, kw, a, B, s, zero_points, y, m, n, k, block_shift, st);
  }
  return (int)err;
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
    default:
      break;
  }
  if (code > 0) return cudaGetErrorString(static_cast<cudaError_t>(code));
  return "int4 gemm: unknown error code";
}
