// MatMulInt4 past the small-M kernel (a prefill: M = batch x prompt): the weight dequantized to fp16 into scratch
// memory, N rows at a time, and each slice multiplied by cuBLAS. This header is the host-side plan alone (no CUDA):
// which path an M takes, how much scratch, and the exact cublasGemmEx arguments of each slice. ops.cc runs it on the
// GPU, and exports it (onnxpipe_int4_prefill_plan / _gemm) so that the tests check it on the CPU against a numpy model
// of what cublasGemmEx computes.
//
// The GEMM: Y [M, N] row-major = A [M, K] row-major @ W^T, W [N, K] row-major (the dequantized weight). cuBLAS is
// column-major, and a row-major [r, c] matrix is the column-major [c, r] one with the same leading dimension, so
// cuBLAS computes the transpose, Y^T [N, M] (ld N) = W [N, K] (stored as column-major [K, N], ld K: op T) @ A^T [K, M]
// (column-major [K, M], ld K: op N). A slice of rows n0 .. n0 + rows of W writes rows n0 .. of Y^T: C starts at
// Y + n0 with the same ldc = N.
#pragma once

#include <stdint.h>

// M up to this runs the small-M kernel (int4_gemm.cu), which takes up to 32 rows of A in one chunk and so reads each
// weight once; past it, that kernel reads every weight again per 32-row chunk (M / 32 times), while dequantize +
// cuBLAS reads the packed weight once, writes and reads 2 bytes a weight, and runs the GEMM at tensor-core rate. The
// crossover is not measured yet: scripts/check_kernels.py times the small-M kernel alone (through ctypes) beside
// this path at M = 64, 128, 512 and 2048, which is what would move this value.
#define ONNXPIPE_INT4_SMALL_M_MAX 32

// The most scratch a call takes: the largest projection of a 1B model (8192 x 2048 fp16, 32 MiB) in one slice, an 8B
// model's gate/up (14336 x 4096, 112 MiB) in two, a 128256-row LM head in 8 slices rather than 0.5 GB of scratch.
// (The tests build the CPU library with a small cap, to see several slices of a small weight.)
#ifndef ONNXPIPE_INT4_SCRATCH_MAX_BYTES
#define ONNXPIPE_INT4_SCRATCH_MAX_BYTES (64ll << 20)
#endif
// A slice is a multiple of this many rows (where more than one fits): C = Y + n0 stays 256-byte aligned.
#define ONNXPIPE_INT4_SLICE_ROWS 128

// cuBLAS's values (cublas_api.h): CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
#define ONNXPIPE_CUBLAS_OP_N 0
#define ONNXPIPE_CUBLAS_OP_T 1

typedef struct Int4PrefillPlan {
  int use_gemm;           // 0: the small-M kernel; 1: dequantize + cuBLAS
  int64_t slice_rows;     // rows of W a slice dequantizes
  int64_t slices;         // ceil(N / slice_rows)
  int64_t scratch_bytes;  // fp16 [slice_rows, K] (or [N, K] when it is one slice)
} Int4PrefillPlan;

// One slice's dequantization (rows n0 .. n0 + rows of W into scratch) and its cublasGemmEx call, every argument as
// passed: C = Y + c_offset elements; A is the scratch (lda), B the activations (ldb).
typedef struct Int4GemmCall {
  int64_t n0, rows;
  int transa, transb;
  int64_t m, n, k, lda, ldb, ldc, c_offset;
} Int4GemmCall;

static inline Int4PrefillPlan int4_prefill_plan(int64_t M, int64_t N, int64_t K) {
  Int4PrefillPlan p = {0, 0, 0, 0};
  p.use_gemm = M > ONNXPIPE_INT4_SMALL_M_MAX;
  if (!p.use_gemm || N < 1 || K < 1) return p;
  int64_t rows = ONNXPIPE_INT4_SCRATCH_MAX_BYTES / (2 * K);
  if (rows >= N) {
    rows = N;
  } else if (rows >= ONNXPIPE_INT4_SLICE_ROWS) {
    rows -= rows % ONNXPIPE_INT4_SLICE_ROWS;
  } else if (rows < 1) {
    rows = 1;  // a row wider than the cap (K past 32 M): one row a slice
  }
  p.slice_rows = rows;
  p.slices = (N + rows - 1) / rows;
  p.scratch_bytes = rows * K * 2;
  return p;
}

// Slice `index` of the plan (0 <= index < slices); returns 0, or -1 for an index outside the plan.
static inline int int4_gemm_call(const Int4PrefillPlan* p, int64_t M, int64_t N, int64_t K, int64_t index,
                                 Int4GemmCall* out) {
  if (!p->use_gemm || index < 0 || index >= p->slices) return -1;
  out->n0 = index * p->slice_rows;
  out->rows = N - out->n0 < p->slice_rows ? N - out->n0 : p->slice_rows;
  out->transa = ONNXPIPE_CUBLAS_OP_T;  // W stored [K, rows] column-major: its transpose [rows, K]
  out->transb = ONNXPIPE_CUBLAS_OP_N;  // A stored [K, M] column-major: as it is
  out->m = out->rows;
  out->n = M;
  out->k = K;
  out->lda = K;
  out->ldb = K;
  out->ldc = N;
  out->c_offset = out->n0;
  return 0;
}
