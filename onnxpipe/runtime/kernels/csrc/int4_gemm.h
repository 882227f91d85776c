/* An int4 GEMM for small M on CUDA: Y[M, N] = A[M, K] @ W^T, W dequantized from MatMulNBits' 4-bit layout.
 *
 *   A            fp16 [M, K], row-major, 16-byte aligned
 *   B            uint8 [N][K / block_size][block_size / 2]: element k of a block in byte k / 2, the low nibble
 *                for even k, the high nibble for odd k (MatMulNBits, bits = 4); 16-byte aligned
 *   scales       fp16 [N][K / block_size]
 *   zero_points  uint8 [N][ceil((K / block_size) / 2)], two blocks a byte, the low nibble first; NULL: 8
 *   Y            fp16 [M, N]
 *   W[n, k] = (q[n, k] - zero_point[n, k / block_size]) * scales[n, k / block_size]
 *
 * block_size is 32, 64 or 128 and divides K. The kernel is launched on `stream` (a cudaStream_t) and nothing else:
 * no allocation, no synchronisation, no atomics, so it can be captured in a CUDA graph and a call gives the same
 * bits every time for the same M, N, K. Returns 0, a cudaError_t (> 0) from the launch, or one of the codes below;
 * onnxpipe_int4_gemm_error names any of them. */
#ifndef ONNXPIPE_INT4_GEMM_H_
#define ONNXPIPE_INT4_GEMM_H_

#include <stdint.h>

#define ONNXPIPE_INT4_GEMM_OK 0
#define ONNXPIPE_INT4_GEMM_BAD_SHAPE (-1)      /* M < 0, N or K < 1, or a dimension past int32 */
#define ONNXPIPE_INT4_GEMM_BAD_BLOCK (-2)      /* block_size not 32, 64 or 128, or not dividing K */
#define ONNXPIPE_INT4_GEMM_MISALIGNED (-3)     /* A or B not 16-byte aligned */
#define ONNXPIPE_INT4_GEMM_NULL_POINTER (-4)   /* A, B, scales or Y is NULL */
#define ONNXPIPE_INT4_GEMM_BAD_FORM (-5)       /* a form other than the five below, or a tile / split it refuses */

/* The kernel's forms (onnxpipe_int4_gemm takes $ONNXPIPE_INT4_GEMM_FORM: "warps", "cluster", "gemv" or "hgemv", else
 * auto):
 * warps: a block's warps split K (16 or 32 weight rows a block), any GPU from sm_80;
 * cluster: a block's warps split N (up to 128 rows a block, the activations read once a block), K split across
 * the blocks of a thread-block cluster (sm_90 on; elsewhere it falls back to warps);
 * gemv: no tensor cores, for M = 1 (auto takes it there; 1-4 A rows a block): each warp owns 1-4 weight rows and
 * walks K with 16-byte loads, the activations staged in shared memory as fp32, any GPU from sm_80;
 * hgemv: the GEMV form's layout with fp16-pair arithmetic (q - zp exact, 8 products summed in fp16, then fp32 with
 * the scale), the activations staged as fp16 pairs; a candidate for M = 1 that no rule takes yet. */
#define ONNXPIPE_INT4_GEMM_AUTO 0
#define ONNXPIPE_INT4_GEMM_WARPS 1
#define ONNXPIPE_INT4_GEMM_CLUSTER 2
#define ONNXPIPE_INT4_GEMM_GEMV 3
#define ONNXPIPE_INT4_GEMM_HGEMV 4

#ifdef __cplusplus
extern "C" {
#endif

/* Visible in the library the runtime loads (built with -fvisibility=hidden), so that checks and tests can call a named
 * form and layout through ctypes. */
#pragma GCC visibility push(default)

int onnxpipe_int4_gemm(const void* A, const uint8_t* B, const void* scales, const uint8_t* zero_points, void* Y,
                       int64_t M, int64_t N, int64_t K, int64_t block_size, void* stream);

const char* onnxpipe_int4_gemm_error(int code);

/* The same product in a named form (checks and benchmarks compare them); _config also sets the form's tile and
 * split (0: chosen by shape, from the layout table where an entry holds the call, else by rule; warps form: weight
 * tiles a block 1-2, warps along K 1/2/4/8/16 (up to 8 with 2 tiles); cluster form: warps along N 1-8, blocks along
 * K 1-8; gemv and hgemv forms: weight rows a warp 1/2/4, warps along K 1/2/4/8 of the block's 8, which share a
 * warp's rows);
 * _describe writes how a call of that form and shape is laid out into out[size]. */
int onnxpipe_int4_gemm_form(int form, const void* A, const uint8_t* B, const void* scales, const uint8_t* zero_points,
                            void* Y, int64_t M, int64_t N, int64_t K, int64_t block_size, void* stream);
int onnxpipe_int4_gemm_config(int form, int tile, int split, const void* A, const uint8_t* B, const void* scales,
                              const uint8_t* zero_points, void* Y, int64_t M, int64_t N, int64_t K,
                              int64_t block_size, void* stream);
int onnxpipe_int4_gemm_describe(int form, int tile, int split, int64_t M, int64_t N, int64_t K, char* out, int size);

/* The layout table (int4_gemm.cu, kLayouts): entry `index` as out[9] = M min, M max, N min, N max, K min, K max (all
 * inclusive), form, tile, split; 0, or -1 past the last entry. _layout_for: the entry a call of this form (0: as
 * onnxpipe_int4_gemm resolves it) and shape takes on the current device, or -1 (the rule's layout). */
int onnxpipe_int4_gemm_layout(int index, int* out);
int onnxpipe_int4_gemm_layout_for(int form, int64_t M, int64_t N, int64_t K);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif

#endif /* ONNXPIPE_INT4_GEMM_H_ */
