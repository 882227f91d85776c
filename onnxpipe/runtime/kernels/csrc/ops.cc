// onnxpipe's ONNX Runtime custom-op library: domain `onnxpipe`, ops `MatMulInt4`, `SiluMul` and `Linear`.
//
// Linear: A [..., K] and W [N, K] (float or float16, the same type) -> Y [..., N] = A @ W^T (PyTorch's Linear
// layout, no bias; the rewrite feeds it a MatMul's [K, N] weight through a Transpose that onnxruntime folds at load).
// CUDA: float16, M up to ONNXPIPE_LINEAR_SMALL_M_MAX with our kernels (linear.cu), past it cublasGemmEx.
//
// SiluMul: X [..., 2N] (float or float16) -> Y [..., N] = silu(X[..., :N]) * X[..., N:], computed in float and rounded
// once (an MLP's gate and up projections made one MatMulInt4 of 2N rows by the rewrite, rewrite.py; the CUDA build:
// float16, silu_mul.cu).
//
// MatMulInt4 takes exactly com.microsoft.MatMulNBits' inputs and attributes for bits=4 without g_idx or bias:
//   A [..., K] (float or float16), B uint8 [N, K/block_size, block_size/2] (two 4-bit weights a byte, the first in
//   the low nibble), scales [N * K/block_size] or [N, K/block_size] (A's type), optional zero_points uint8
//   [N * ceil(blocks/2)] (packed nibbles, block 2i in the low one; absent: 8); attributes K, N, bits, block_size
//   (others, e.g. accuracy_level, are allowed and ignored); output Y [..., N] of A's type.
//
// Two kernels, one a build:
// - CPUExecutionProvider (libonnxpipe_kernels.so): a plain reference loop (dequantize a block, accumulate in double).
//   It is a reference, not a fast path: the tests use it to prove the ABI, the rewrite and the registration on a
//   machine without a GPU.
// - CUDAExecutionProvider (libonnxpipe_kernels_cuda.so, built with -DONNXPIPE_CUDA): float16 only, on onnxruntime's
//   compute stream, so it runs inside a captured CUDA graph. M up to ONNXPIPE_INT4_SMALL_M_MAX (int4_prefill.h):
//   onnxpipe_int4_gemm (int4_gemm.cu). Past it (a prefill): the weight dequantized to fp16 (int4_dequant.cu) into
//   scratch memory from onnxruntime's allocator, a slice of N at a time, and multiplied by cuBLAS (cublasGemmEx, taken
//   from the libcublas onnxruntime's CUDA EP loaded: cublas_abi.h). No cuBLAS in the process: the kernel is not made,
//   in one line (kernels=auto then runs onnxruntime's MatMulNBits and says why).
// Errors come back as an OrtStatus naming the op and what was wrong (CreateKernelV2 / KernelComputeV2).

#include <math.h>
#include <stdio.h>
#include <string.h>

#include <exception>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "cublas_abi.h"
#include "int4_prefill.h"
#include "ort_abi.h"

#define ONNXPIPE_EXPORT extern "C" __attribute__((visibility("default")))

#ifdef ONNXPIPE_CUDA
extern "C" int onnxpipe_int4_gemm(const void* A, const uint8_t* B, const void* scales, const uint8_t* zero_points,
                                  void* Y, int64_t M, int64_t N, int64_t K, int64_t block_size, void* stream);
extern "C" const char* onnxpipe_int4_gemm_error(int code);
extern "C" int onnxpipe_int4_dequantize(const uint8_t* B, const void* scales, const uint8_t* zero_points, void* W,
                                        int64_t n0, int64_t rows, int64_t N, int64_t K, int64_t block_size,
                                        void* stream);
extern "C" int onnxpipe_cuda_current_device(void);
extern "C" int onnxpipe_silu_mul(const void* X, void* Y, int64_t rows, int64_t n, void* stream);
extern "C" void onnxpipe_int4_dequant_load(void);
extern "C" int onnxpipe_linear(const void* A, const void* W, void* Y, int64_t M, int64_t N, int64_t K,
                               void* stream);
extern "C" void onnxpipe_linear_load(void);
#endif

// The M up to which Linear's CUDA kernel takes our own products (linear.cu: a GEMV to 4 rows, tensor cores to 32,
// each reading the weights once), cuBLAS past it
#define ONNXPIPE_LINEAR_SMALL_M_MAX 32

namespace {

const OrtApi* g_api = nullptr;
const char* const kDomain = "onnxpipe";
const char* const kOpName = "MatMulInt4";

// ---- float16 <-> float, without relying on a compiler extension (the CPU reference only) ----
float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = man;
      do {
        m <<= 1;
        ++e;
      } while ((m & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds past 65504: infinity
  if (absx < 0x38800000u) {                                      // below float16's smallest normal
    if (absx < 0x33000000u) return sign;                         // under half the smallest subnormal
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 + (112 - e) ... brings m to the subnormal grid
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias the exponent (127 -> 15)
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return (uint16_t)(sign | r);
}

// ---- small helpers over the C API ----
struct Tensor {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  void* data = nullptr;
  int64_t count() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

std::string shape_text(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

OrtStatus* error(const std::string& what) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kDomain) + "." + kOpName + ": " + what).c_str());
}

OrtStatus* describe(const OrtValue* value, Tensor* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  OrtStatus* st = g_api->GetTensorTypeAndShape(value, &info);
  if (st) return st;
  size_t rank = 0;
  if (!(st = g_api->GetTensorElementType(info, &out->type)) && !(st = g_api->GetDimensionsCount(info, &rank))) {
    out->dims.assign(rank, 0);
    st = g_api->GetDimensions(info, out->dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  return g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &out->data);
}

struct Kernel {
  int64_t K = 0, N = 0, bits = 4, block_size = 0;
  bool cuda = false;
  int device = -1;                  // CUDA: the device the kernel was made on, and its cuBLAS handle
  cublasHandle_t cublas = nullptr;
};

// Everything MatMulInt4 reads, checked against the attributes; Y allocated.
struct Call {
  const OrtValue* a_value = nullptr;
  Tensor A, B, scales, zero_points, Y;
  bool has_zero_points = false;
  int64_t M = 0, blocks = 0;
};

OrtStatus* prepare(const Kernel& k, OrtKernelContext* ctx, Call* c) {
  size_t n_in = 0;
  OrtStatus* st = g_api->KernelContext_GetInputCount(ctx, &n_in);
  if (st) return st;
  const OrtValue* values[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < n_in && i < 4; ++i)
    if ((st = g_api->KernelContext_GetInput(ctx, i, &values[i]))) return st;
  if (!values[0] || !values[1] || !values[2]) return error("inputs A, B and scales are required");
  c->a_value = values[0];
  if ((st = describe(values[0], &c->A)) || (st = describe(values[1], &c->B)) || (st = describe(values[2], &c->scales)))
    return st;
  if (values[3]) {
    if ((st = describe(values[3], &c->zero_points))) return st;
    c->has_zero_points = true;
  }
  if (c->A.dims.empty() || c->A.dims.back() != k.K)
    return error("A " + shape_text(c->A.dims) + " must end in K = " + std::to_string(k.K));
  if (c->A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && c->A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    return error("A must be float or float16");
  if (c->scales.type != c->A.type) return error("scales must have A's type");
  if (c->B.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) return error("B must be uint8");
  c->blocks = k.K / k.block_size;
  if (c->B.count() != k.N * c->blocks * (k.block_size / 2))
    return error("B " + shape_text(c->B.dims) + " does not hold N x K/block_size x block_size/2 = " +
                 std::to_string(k.N) + " x " + std::to_string(c->blocks) + " x " + std::to_string(k.block_size / 2));
  if (c->scales.count() != k.N * c->blocks)
    return error("scales " + shape_text(c->scales.dims) + " does not hold N * K/block_size = " +
                 std::to_string(k.N * c->blocks));
  if (c->has_zero_points) {
    if (c->zero_points.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
      return error("zero_points must be uint8 (packed 4-bit); float zero points are not supported");
    if (c->zero_points.count() != k.N * ((c->blocks + 1) / 2))
      return error("zero_points " + shape_text(c->zero_points.dims) + " does not hold N * ceil(blocks/2) = " +
                   std::to_string(k.N * ((c->blocks + 1) / 2)));
  }
  c->M = c->A.count() / k.K;
  std::vector<int64_t> ydims = c->A.dims;
  ydims.back() = k.N;
  OrtValue* y = nullptr;
  if ((st = g_api->KernelContext_GetOutput(ctx, 0, ydims.data(), ydims.size(), &y))) return st;
  c->Y.dims = ydims;
  c->Y.type = c->A.type;
  return g_api->GetTensorMutableData(y, &c->Y.data);
}

// ---- the CPU reference ----
template <typename Load, typename Store>
void reference_matmul(const Kernel& k, const Call& c, Load load, Store store) {
  const uint8_t* B = static_cast<const uint8_t*>(c.B.data);
  const uint8_t* zp = c.has_zero_points ? static_cast<const uint8_t*>(c.zero_points.data) : nullptr;
  const int64_t half_block = k.block_size / 2, zp_row = (c.blocks + 1) / 2;
  std::vector<double> w(k.K);
  for (int64_t n = 0; n < k.N; ++n) {
    for (int64_t blk = 0; blk < c.blocks; ++blk) {  // dequantize row n of W^T: (q - zero point) * scale
      const double scale = load(c.scales.data, n * c.blocks + blk);
      int zero = 8;
      if (zp) {
        const uint8_t packed = zp[n * zp_row + blk / 2];
        zero = (blk & 1) ? (packed >> 4) : (packed & 0x0f);
      }
      const uint8_t* q = B + (n * c.blocks + blk) * half_block;
      for (int64_t j = 0; j < half_block; ++j) {
        w[blk * k.block_size + 2 * j] = ((q[j] & 0x0f) - zero) * scale;
        w[blk * k.block_size + 2 * j + 1] = ((q[j] >> 4) - zero) * scale;
      }
    }
    for (int64_t m = 0; m < c.M; ++m) {
      double acc = 0.0;
      for (int64_t i = 0; i < k.K; ++i) acc += load(c.A.data, m * k.K + i) * w[i];
      store(c.Y.data, m * k.N + n, acc);
    }
  }
}

// The CUDA kernel's slots that the CPU path would not need, called here: the stream (193) with its neighbours (on
// the CPU the stream must be none, A must have a value (192) in "Cpu" memory (194, then 71)), and the scratch
// allocator's four (253, 75, 76, 132: an allocator for A's memory, 64 bytes taken, written and given back, the
// allocator released). A miscounted OrtApi table fails here, on a machine without a GPU.
OrtStatus* check_allocator(OrtKernelContext* ctx, const OrtMemoryInfo* memory) {
  OrtAllocator* allocator = nullptr;
  OrtStatus* st = g_api->KernelContext_GetAllocator(ctx, memory, &allocator);
  if (st) return st;
  if (!allocator) return error("KernelContext_GetAllocator gave no allocator (the OrtApi slot table is off)");
  void* p = nullptr;
  if (!(st = g_api->AllocatorAlloc(allocator, 64, &p))) {
    if (p) memset(p, 0xA5, 64);
    st = g_api->AllocatorFree(allocator, p);
  }
  g_api->ReleaseAllocator(allocator);
  if (!st && !p) return error("AllocatorAlloc gave no memory (the OrtApi slot table is off)");
  return st;
}

OrtStatus* check_abi(OrtKernelContext* ctx) {
  void* stream = reinterpret_cast<void*>(1);
  OrtStatus* st = g_api->KernelContext_GetGPUComputeStream(ctx, &stream);
  if (st) return st;
  const OrtValue* a = nullptr;
  if ((st = g_api->KernelContext_GetInput(ctx, 0, &a))) return st;
  int has_value = 0;
  const OrtMemoryInfo* memory = nullptr;
  const char* where = nullptr;
  if (a && ((st = g_api->HasValue(a, &has_value)) || (st = g_api->GetTensorMemoryInfo(a, &memory)) ||
            (st = g_api->MemoryInfoGetName(memory, &where))))
    return st;
  if (stream != nullptr || !a || has_value != 1 || !where || strcmp(where, "Cpu") != 0)
    return error("the OrtApi slot table does not match this onnxruntime (the CPU kernel's ABI check failed)");
  return check_allocator(ctx, memory);
}

OrtStatus* compute_cpu(const Kernel& k, OrtKernelContext* ctx) {
  OrtStatus* st = check_abi(ctx);
  if (st) return st;
  Call c;
  if ((st = prepare(k, ctx, &c))) return st;
  if (c.A.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    reference_matmul(
        k, c, [](const void* p, int64_t i) { return (double)static_cast<const float*>(p)[i]; },
        [](void* p, int64_t i, double v) { static_cast<float*>(p)[i] = (float)v; });
  } else {
    reference_matmul(
        k, c, [](const void* p, int64_t i) { return (double)half_to_float(static_cast<const uint16_t*>(p)[i]); },
        [](void* p, int64_t i, double v) { static_cast<uint16_t*>(p)[i] = float_to_half((float)v); });
  }
  return nullptr;
}

#ifdef ONNXPIPE_CUDA
// cuBLAS for the large-M path: the library onnxruntime loaded (found once), and one handle per device for the process,
// made when the first kernel on that device is (at session creation, never inside a graph capture) and kept to the
// end (a handle per node would be a cuBLAS workspace per node). A stream is set and the GEMM queued under one lock, so
// sessions running on several threads do not set each other's stream between the two calls.
struct SharedCublas {
  std::mutex lock;
  CublasApi api;
  bool found = false;
  std::map<int, cublasHandle_t> handles;
};

SharedCublas& shared_cublas() {
  static SharedCublas* s = new SharedCublas();  // never destroyed: kernels may outlive static destructors
  return *s;
}

// `who`: the op and what needs cuBLAS, the start of the one line a missing cuBLAS gives.
OrtStatus* cublas_for_device(int device, cublasHandle_t* out, const std::string& who) {
  SharedCublas& s = shared_cublas();
  std::lock_guard<std::mutex> guard(s.lock);
  if (!s.found) {
    std::string why;
    if (!find_cublas(&s.api, &why)) return g_api->CreateStatus(ORT_EP_FAIL, (who + " needs cuBLAS: " + why).c_str());
    s.found = true;
  }
  auto it = s.handles.find(device);
  if (it == s.handles.end()) {
    cublasHandle_t handle = nullptr;
    const int status = s.api.create(&handle);
    if (status != ONNXPIPE_CUBLAS_STATUS_SUCCESS || handle == nullptr)
      return g_api->CreateStatus(ORT_EP_FAIL, (who + ": cublasCreate_v2 (" + s.api.name + ") failed with status " +
                                               std::to_string(status))
                                                  .c_str());
    it = s.handles.emplace(device, handle).first;
  }
  *out = it->second;
  return nullptr;
}

OrtStatus* cuda_failure(const Call& c, const Kernel& k, const std::string& what) {
  return g_api->CreateStatus(ORT_EP_FAIL, (std::string(kDomain) + "." + kOpName + " (CUDA, M=" + std::to_string(c.M) +
                                           ", N=" + std::to_string(k.N) + ", K=" + std::to_string(k.K) + "): " + what)
                                              .c_str());
}

// M past the small-M kernel: per slice of N (int4_prefill.h), dequantize into scratch from onnxruntime's allocator for
// A's memory, then Y[:, slice] = A @ W_slice^T by cublasGemmEx (fp16 in and out, fp32 accumulation). The scratch is
// given back when the calls are queued, as onnxruntime's own kernels do with theirs: its allocator hands it out again
// only to work queued after these on the same stream.
OrtStatus* compute_cuda_gemm(const Kernel& k, OrtKernelContext* ctx, const Call& c, void* stream) {
  if (c.M > 0x7fffffff) return cuda_failure(c, k, "M past 2^31 - 1 (cuBLAS takes int dimensions)");
  const Int4PrefillPlan plan = int4_prefill_plan(c.M, k.N, k.K);
  const OrtMemoryInfo* memory = nullptr;
  OrtStatus* st = g_api->GetTensorMemoryInfo(c.a_value, &memory);
  if (st) return st;
  OrtAllocator* allocator = nullptr;
  if ((st = g_api->KernelContext_GetAllocator(ctx, memory, &allocator))) return st;
  void* scratch = nullptr;
  if ((st = g_api->AllocatorAlloc(allocator, (size_t)plan.scratch_bytes, &scratch)) || scratch == nullptr) {
    g_api->ReleaseAllocator(allocator);
    return st ? st : cuda_failure(c, k, "no scratch memory for the dequantized weight");
  }
  SharedCublas& s = shared_cublas();
  const float one = 1.0f, zero = 0.0f;
  const uint8_t* zp = c.has_zero_points ? static_cast<const uint8_t*>(c.zero_points.data) : nullptr;
  std::string failed;
  for (int64_t i = 0; i < plan.slices && failed.empty(); ++i) {
    Int4GemmCall g;
    if (int4_gemm_call(&plan, c.M, k.N, k.K, i, &g) != 0) {
      failed = "slice " + std::to_string(i) + " is outside the plan";
      break;
    }
    const int code = onnxpipe_int4_dequantize(static_cast<const uint8_t*>(c.B.data), c.scales.data, zp, scratch,
                                              g.n0, g.rows, k.N, k.K, k.block_size, stream);
    if (code != 0) {
      const char* why = onnxpipe_int4_gemm_error(code);
      failed = std::string("dequantize: ") + (why ? why : "unknown error") + " (code " + std::to_string(code) + ")";
      break;
    }
    std::lock_guard<std::mutex> guard(s.lock);
    int status = s.api.set_stream(k.cublas, stream);
    if (status != ONNXPIPE_CUBLAS_STATUS_SUCCESS) {
      failed = "cublasSetStream_v2 failed with status " + std::to_string(status);
      break;
    }
    status = s.api.gemm_ex(k.cublas, g.transa, g.transb, (int)g.m, (int)g.n, (int)g.k, &one, scratch,
                           ONNXPIPE_CUDA_R_16F, (int)g.lda, c.A.data, ONNXPIPE_CUDA_R_16F, (int)g.ldb, &zero,
                           static_cast<uint16_t*>(c.Y.data) + g.c_offset, ONNXPIPE_CUDA_R_16F, (int)g.ldc,
                           ONNXPIPE_CUBLAS_COMPUTE_32F, ONNXPIPE_CUBLAS_GEMM_DEFAULT);
    if (status != ONNXPIPE_CUBLAS_STATUS_SUCCESS)
      failed = "cublasGemmEx failed with status " + std::to_string(status);
  }
  st = g_api->AllocatorFree(allocator, scratch);
  g_api->ReleaseAllocator(allocator);
  if (!failed.empty()) {
    if (st) g_api->ReleaseStatus(st);
    return cuda_failure(c, k, failed);
  }
  return st;
}

OrtStatus* compute_cuda(const Kernel& k, OrtKernelContext* ctx) {
  void* stream = nullptr;
  OrtStatus* st = g_api->KernelContext_GetGPUComputeStream(ctx, &stream);
  if (st) return st;
  Call c;
  if ((st = prepare(k, ctx, &c))) return st;
  if (c.A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return error("the CUDA kernel takes float16 A only");
  if (c.M == 0) return nullptr;
  if (int4_prefill_plan(c.M, k.N, k.K).use_gemm) return compute_cuda_gemm(k, ctx, c, stream);
  const int code = onnxpipe_int4_gemm(c.A.data, static_cast<const uint8_t*>(c.B.data), c.scales.data,
                                      c.has_zero_points ? static_cast<const uint8_t*>(c.zero_points.data) : nullptr,
                                      c.Y.data, c.M, k.N, k.K, k.block_size, stream);
  if (code != 0) {
    const char* why = onnxpipe_int4_gemm_error(code);
    return g_api->CreateStatus(ORT_EP_FAIL, (std::string(kDomain) + "." + kOpName + " (CUDA, M=" + std::to_string(c.M) +
                                             ", N=" + std::to_string(k.N) + ", K=" + std::to_string(k.K) + "): " +
                                             (why ? why : "unknown error") + " (code " + std::to_string(code) + ")")
                                                .c_str());
  }
  return nullptr;
}
#endif

// ---- the OrtCustomOp callbacks ----
OrtStatus* read_attribute(const OrtKernelInfo* info, const char* name, int64_t* out, bool required) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (!st) return nullptr;
  if (!required) {  // keep the default
    g_api->ReleaseStatus(st);
    return nullptr;
  }
  g_api->ReleaseStatus(st);
  return error(std::string("attribute ") + name + " is required");
}

template <bool Cuda>
OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  Kernel k;
  k.cuda = Cuda;
  OrtStatus* st;
  if ((st = read_attribute(info, "K", &k.K, true)) || (st = read_attribute(info, "N", &k.N, true)) ||
      (st = read_attribute(info, "bits", &k.bits, false)) ||
      (st = read_attribute(info, "block_size", &k.block_size, true)))
    return st;
  if (k.bits != 4) return error("bits=" + std::to_string(k.bits) + ": MatMulInt4 takes 4-bit weights only");
  if (k.block_size < 16 || (k.block_size & (k.block_size - 1)))
    return error("block_size=" + std::to_string(k.block_size) + " must be a power of 2 >= 16");
  if (Cuda && k.block_size != 32 && k.block_size != 64 && k.block_size != 128)
    return error("block_size=" + std::to_string(k.block_size) + ": the CUDA kernel takes 32, 64 or 128");
  if (k.K <= 0 || k.N <= 0 || k.K % k.block_size)
    return error("K=" + std::to_string(k.K) + " must be a positive multiple of block_size=" +
                 std::to_string(k.block_size) + " and N=" + std::to_string(k.N) + " positive");
#ifdef ONNXPIPE_CUDA
  if (Cuda) {  // the large-M path's cuBLAS handle now, outside any graph capture; no cuBLAS: no kernel
    if (k.K > 0x7fffffff || k.N > 0x7fffffff) return error("K and N must be below 2^31 for the CUDA kernel");
    k.device = onnxpipe_cuda_current_device();
    const std::string who = std::string(kDomain) + "." + kOpName + ": M > " + std::to_string(ONNXPIPE_INT4_SMALL_M_MAX);
    if ((st = cublas_for_device(k.device, &k.cublas, who))) return st;
    onnxpipe_int4_dequant_load();
  }
#endif
  Kernel* kernel = new (std::nothrow) Kernel(k);
  if (!kernel) return g_api->CreateStatus(ORT_FAIL, "onnxpipe.MatMulInt4: out of memory");
  *out = kernel;
  return nullptr;
}

OrtStatus* kernel_compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  try {
#ifdef ONNXPIPE_CUDA
    if (k.cuda) return compute_cuda(k, ctx);
#endif
    return compute_cpu(k, ctx);
  } catch (const std::exception& e) {  // nothing may cross the C ABI
    return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string("onnxpipe.MatMulInt4: ") + e.what()).c_str());
  }
}

void kernel_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* op_name(const OrtCustomOp*) { return kOpName; }
// One op per (provider, float type) under the one name: onnxruntime merges them into one schema whose A, scales and
// Y take float or float16 (a single op with undefined types cannot say that Y has A's type).
template <ONNXTensorElementDataType T>
ONNXTensorElementDataType input_type(const OrtCustomOp*, size_t index) {
  return (index == 1 || index == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : T;
}
size_t input_count(const OrtCustomOp*) { return 4; }
template <ONNXTensorElementDataType T>
ONNXTensorElementDataType output_type(const OrtCustomOp*, size_t) { return T; }
size_t output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic input_characteristic(const OrtCustomOp*, size_t index) {
  return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int variadic_min_arity(const OrtCustomOp*) { return 1; }
int variadic_homogeneity(const OrtCustomOp*) { return 0; }
const char* cpu_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
const char* cuda_provider(const OrtCustomOp*) { return "CUDAExecutionProvider"; }

// What every op of the library shares: the API version, the provider, default memory, no variadic inputs or outputs,
// every input and output required (an op's own callbacks then replace what differs).
OrtCustomOp base_op(bool cuda) {
  OrtCustomOp op;
  memset(&op, 0, sizeof op);
  op.version = ONNXPIPE_ORT_API_VERSION;
  op.GetExecutionProviderType = cuda ? cuda_provider : cpu_provider;
  op.GetInputCharacteristic = output_characteristic;  // required
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory_type;
  op.GetVariadicInputMinArity = variadic_min_arity;
  op.GetVariadicInputHomogeneity = variadic_homogeneity;
  op.GetVariadicOutputMinArity = variadic_min_arity;
  op.GetVariadicOutputHomogeneity = variadic_homogeneity;
  return op;
}

template <ONNXTensorElementDataType T>
OrtCustomOp make_op(bool cuda) {
  OrtCustomOp op = base_op(cuda);
  op.GetName = op_name;
  op.GetInputType = input_type<T>;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type<T>;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = kernel_destroy;
  op.GetInputCharacteristic = input_characteristic;  // zero_points optional
  op.CreateKernelV2 = cuda ? create_kernel<true> : create_kernel<false>;
  op.KernelComputeV2 = kernel_compute;
  return op;
}

// ---- SiluMul ----
const char* const kSiluMulName = "SiluMul";

OrtStatus* silu_error(const std::string& what) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kDomain) + "." + kSiluMulName + ": " + what).c_str());
}

template <bool Cuda>
OrtStatus* silu_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** out) {
  *out = reinterpret_cast<void*>(Cuda ? 2 : 1);  // stateless: the pointer only says which build made it
  return nullptr;
}

float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

OrtStatus* silu_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    const bool cuda = reinterpret_cast<uintptr_t>(kernel) == 2;
    const OrtValue* xv = nullptr;
    OrtStatus* st = g_api->KernelContext_GetInput(ctx, 0, &xv);
    if (st) return st;
    if (!xv) return silu_error("input X is required");
    Tensor x;
    if ((st = describe(xv, &x))) return st;
    if (x.dims.empty() || x.dims.back() % 2 != 0)
      return silu_error("X " + shape_text(x.dims) + " must end in an even width (gate and up side by side)");
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      return silu_error("X must be float or float16");
    const int64_t n = x.dims.back() / 2;
    const int64_t rows = n == 0 ? 0 : x.count() / (2 * n);
    std::vector<int64_t> ydims = x.dims;
    ydims.back() = n;
    OrtValue* yv = nullptr;
    if ((st = g_api->KernelContext_GetOutput(ctx, 0, ydims.data(), ydims.size(), &yv))) return st;
    void* y = nullptr;
    if ((st = g_api->GetTensorMutableData(yv, &y))) return st;
    if (rows == 0) return nullptr;
#ifdef ONNXPIPE_CUDA
    if (cuda) {
      if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return silu_error("the CUDA kernel takes float16 X only");
      void* stream = nullptr;
      if ((st = g_api->KernelContext_GetGPUComputeStream(ctx, &stream))) return st;
      const int code = onnxpipe_silu_mul(x.data, y, rows, n, stream);
      if (code != 0) return silu_error("CUDA launch failed (code " + std::to_string(code) + ")");
      return nullptr;
    }
#else
    (void)cuda;
#endif
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t g = r * 2 * n + j, u = g + n, o = r * n + j;
        if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
          const float* xs = static_cast<const float*>(x.data);
          static_cast<float*>(y)[o] = silu_times(xs[g], xs[u]);
        } else {
          const uint16_t* xs = static_cast<const uint16_t*>(x.data);
          static_cast<uint16_t*>(y)[o] = float_to_half(silu_times(half_to_float(xs[g]), half_to_float(xs[u])));
        }
      }
    }
    return nullptr;
  } catch (const std::exception& e) {  // nothing may cross the C ABI
    return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string("onnxpipe.SiluMul: ") + e.what()).c_str());
  }
}

void silu_destroy(void*) {}
const char* silu_name(const OrtCustomOp*) { return kSiluMulName; }
template <ONNXTensorElementDataType T>
ONNXTensorElementDataType silu_type(const OrtCustomOp*, size_t) { return T; }
size_t one(const OrtCustomOp*) { return 1; }

template <ONNXTensorElementDataType T>
OrtCustomOp make_silu_op(bool cuda) {
  OrtCustomOp op = base_op(cuda);
  op.GetName = silu_name;
  op.GetInputType = silu_type<T>;
  op.GetInputTypeCount = one;
  op.GetOutputType = silu_type<T>;
  op.GetOutputTypeCount = one;
  op.KernelDestroy = silu_destroy;
  op.CreateKernelV2 = cuda ? silu_create<true> : silu_create<false>;
  op.KernelComputeV2 = silu_compute;
  return op;
}

// ---- Linear ----
const char* const kLinearName = "Linear";

OrtStatus* linear_error(const std::string& what) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kDomain) + "." + kLinearName + ": " + what).c_str());
}

struct LinearKernel {
  bool cuda = false;
  int device = -1;
  cublasHandle_t cublas = nullptr;
};

template <bool Cuda>
OrtStatus* linear_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** out) {
  LinearKernel k;
  k.cuda = Cuda;
#ifdef ONNXPIPE_CUDA
  if (Cuda) {  // cuBLAS for M past our kernels, now, outside any graph capture; every instantiation loaded
    k.device = onnxpipe_cuda_current_device();
    const std::string who = std::string(kDomain) + "." + kLinearName + ": M > " +
                            std::to_string(ONNXPIPE_LINEAR_SMALL_M_MAX);
    OrtStatus* st = cublas_for_device(k.device, &k.cublas, who);
    if (st) return st;
    onnxpipe_linear_load();
  }
#endif
  LinearKernel* kernel = new (std::nothrow) LinearKernel(k);
  if (!kernel) return g_api->CreateStatus(ORT_FAIL, "onnxpipe.Linear: out of memory");
  *out = kernel;
  return nullptr;
}

OrtStatus* linear_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    const LinearKernel& k = *static_cast<LinearKernel*>(kernel);
    const OrtValue* av = nullptr;
    const OrtValue* wv = nullptr;
    OrtStatus* st;
    if ((st = g_api->KernelContext_GetInput(ctx, 0, &av)) || (st = g_api->KernelContext_GetInput(ctx, 1, &wv)))
      return st;
    if (!av || !wv) return linear_error("inputs A and W are required");
    Tensor a, w;
    if ((st = describe(av, &a)) || (st = describe(wv, &w))) return st;
    if (w.dims.size() != 2) return linear_error("W " + shape_text(w.dims) + " must be [N, K]");
    const int64_t n = w.dims[0], kk = w.dims[1];
    if (a.dims.empty() || a.dims.back() != kk)
      return linear_error("A " + shape_text(a.dims) + " must end in W's K = " + std::to_string(kk));
    if (a.type != w.type) return linear_error("A and W must have the same type");
    if (a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      return linear_error("A must be float or float16");
    const int64_t m = kk == 0 ? 0 : a.count() / kk;
    std::vector<int64_t> ydims = a.dims;
    ydims.back() = n;
    OrtValue* yv = nullptr;
    if ((st = g_api->KernelContext_GetOutput(ctx, 0, ydims.data(), ydims.size(), &yv))) return st;
    void* y = nullptr;
    if ((st = g_api->GetTensorMutableData(yv, &y))) return st;
    if (m == 0 || n == 0) return nullptr;
#ifdef ONNXPIPE_CUDA
    if (k.cuda) {
      if (a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return linear_error("the CUDA kernel takes float16 only");
      void* stream = nullptr;
      if ((st = g_api->KernelContext_GetGPUComputeStream(ctx, &stream))) return st;
      const std::string where = " (CUDA, M=" + std::to_string(m) + ", N=" + std::to_string(n) + ", K=" +
                                std::to_string(kk) + ")";
      const bool aligned = ((reinterpret_cast<uintptr_t>(a.data) | reinterpret_cast<uintptr_t>(w.data)) % 16) == 0;
      if (m <= ONNXPIPE_LINEAR_SMALL_M_MAX && kk % 8 == 0 && aligned) {  // else cuBLAS, which takes any of them
        const int code = onnxpipe_linear(a.data, w.data, y, m, n, kk, stream);
        if (code != 0) return linear_error("the small-M kernel" + where + " failed with code " + std::to_string(code));
        return nullptr;
      }
      if (m > 0x7fffffff || n > 0x7fffffff || kk > 0x7fffffff)
        return linear_error("dimensions past 2^31 - 1" + where + " (cuBLAS takes int)");
      // column-major: Y^T [N, M] = W [N, K] (stored [K, N]: transposed, lda = K) @ A^T (stored [K, M], ldb = K)
      SharedCublas& s = shared_cublas();
      const float one = 1.0f, zero = 0.0f;
      std::lock_guard<std::mutex> guard(s.lock);
      int status = s.api.set_stream(k.cublas, stream);
      if (status == ONNXPIPE_CUBLAS_STATUS_SUCCESS)
        status = s.api.gemm_ex(k.cublas, ONNXPIPE_CUBLAS_OP_T, ONNXPIPE_CUBLAS_OP_N, (int)n, (int)m, (int)kk, &one,
                               w.data, ONNXPIPE_CUDA_R_16F, (int)kk, a.data, ONNXPIPE_CUDA_R_16F, (int)kk, &zero, y,
                               ONNXPIPE_CUDA_R_16F, (int)n, ONNXPIPE_CUBLAS_COMPUTE_32F, ONNXPIPE_CUBLAS_GEMM_DEFAULT);
      if (status != ONNXPIPE_CUBLAS_STATUS_SUCCESS)
        return linear_error("cuBLAS" + where + " failed with status " + std::to_string(status));
      return nullptr;
    }
#endif
    for (int64_t r = 0; r < m; ++r) {  // the reference: double accumulation, one rounding
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0.0;
        if (a.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
          const float* as = static_cast<const float*>(a.data) + r * kk;
          const float* ws = static_cast<const float*>(w.data) + j * kk;
          for (int64_t i = 0; i < kk; ++i) acc += (double)as[i] * ws[i];
          static_cast<float*>(y)[r * n + j] = (float)acc;
        } else {
          const uint16_t* as = static_cast<const uint16_t*>(a.data) + r * kk;
          const uint16_t* ws = static_cast<const uint16_t*>(w.data) + j * kk;
          for (int64_t i = 0; i < kk; ++i) acc += (double)half_to_float(as[i]) * half_to_float(ws[i]);
          static_cast<uint16_t*>(y)[r * n + j] = float_to_half((float)acc);
        }
      }
    }
    return nullptr;
  } catch (const std::exception& e) {  // nothing may cross the C ABI
    return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string("onnxpipe.Linear: ") + e.what()).c_str());
  }
}

void linear_destroy(void* kernel) { delete static_cast<LinearKernel*>(kernel); }
const char* linear_name(const OrtCustomOp*) { return kLinearName; }
size_t two(const OrtCustomOp*) { return 2; }

template <ONNXTensorElementDataType T>
OrtCustomOp make_linear_op(bool cuda) {
  OrtCustomOp op = base_op(cuda);
  op.GetName = linear_name;
  op.GetInputType = silu_type<T>;  // every input and the output: T
  op.GetInputTypeCount = two;
  op.GetOutputType = silu_type<T>;
  op.GetOutputTypeCount = one;
  op.KernelDestroy = linear_destroy;
  op.CreateKernelV2 = cuda ? linear_create<true> : linear_create<false>;
  op.KernelComputeV2 = linear_compute;
  return op;
}

// The CUDA build registers the CUDA kernel alone: a rewritten graph that lands on the CPU then fails to load (and
// the session falls back to the graph as it is, saying so) rather than running the slow reference unnoticed.
#ifdef ONNXPIPE_CUDA
const OrtCustomOp g_ops[3] = {make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(true),
                              make_silu_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(true),
                              make_linear_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(true)};
#else
const OrtCustomOp g_ops[6] = {make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>(false),
                              make_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(false),
                              make_silu_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>(false),
                              make_silu_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(false),
                              make_linear_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>(false),
                              make_linear_op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(false)};
#endif

}  // namespace

// onnxruntime calls this when the library is registered (SessionOptions.register_custom_ops_library). The domain
// must outlive every session made from these options: it is created here and never released (a few bytes a call).
ONNXPIPE_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ONNXPIPE_ORT_API_VERSION);
  if (!api) {  // every onnxruntime serves version 1, whose first slot is CreateStatus
    const OrtApi* v1 = api_base->GetApi(1);
    char msg[200];
    snprintf(msg, sizeof msg, "onnxpipe kernels need onnxruntime C API version %d; this onnxruntime (%s) lacks it",
             ONNXPIPE_ORT_API_VERSION, api_base->GetVersionString());
    return v1->CreateStatus(ORT_FAIL, msg);
  }
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain);
  if (st) return st;
  for (const OrtCustomOp& op : g_ops)
    if ((st = api->CustomOpDomain_Add(domain, &op))) return st;
  return api->AddCustomOpDomain(options, domain);
}

// Which kernels this build registers: "cpu" (the reference) or "cuda".
ONNXPIPE_EXPORT const char* onnxpipe_kernels_build(void) {
#ifdef ONNXPIPE_CUDA
  return "cuda";
#else
  return "cpu";
#endif
}

// The large-M path's plan (int4_prefill.h), for the tests and scripts/check_kernels.py (both builds export it):
// out[4] = use_gemm, slice rows, slices, scratch bytes.
ONNXPIPE_EXPORT void onnxpipe_int4_prefill_plan(int64_t M, int64_t N, int64_t K, int64_t* out) {
  const Int4PrefillPlan p = int4_prefill_plan(M, N, K);
  out[0] = p.use_gemm;
  out[1] = p.slice_rows;
  out[2] = p.slices;
  out[3] = p.scratch_bytes;
}

// Slice `index`'s dequantization and cublasGemmEx arguments, as compute_cuda_gemm passes them: out[11] = n0, rows,
// transa, transb, m, n, k, lda, ldb, ldc, C's offset into Y in elements. 0, or -1 for an index outside the plan.
ONNXPIPE_EXPORT int onnxpipe_int4_prefill_gemm(int64_t M, int64_t N, int64_t K, int64_t index, int64_t* out) {
  const Int4PrefillPlan p = int4_prefill_plan(M, N, K);
  Int4GemmCall g;
  if (int4_gemm_call(&p, M, N, K, index, &g) != 0) return -1;
  const int64_t values[11] = {g.n0, g.rows, g.transa, g.transb, g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.c_offset};
  memcpy(out, values, sizeof values);
  return 0;
}

// How the CUDA kernel would find cuBLAS in this process (cublas_abi.h): 1 and the soname in out, or 0 and the one
// line saying why not.
ONNXPIPE_EXPORT int onnxpipe_find_cublas(char* out, int size) {
  CublasApi api;
  std::string why;
  const bool found = find_cublas(&api, &why);
  snprintf(out, (size_t)size, "%s", found ? api.name : why.c_str());
  return found ? 1 : 0;
}
