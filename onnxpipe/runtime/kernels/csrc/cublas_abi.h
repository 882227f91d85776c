// onnxpipe's own declarations of the few parts of cuBLAS that MatMulInt4's large-M path calls, and how it finds them.
//
// The library is not linked against cuBLAS (the kernels extra installs no cuBLAS, and a second copy in the process
// would be a second set of kernels and handles): onnxruntime's CUDA EP has already loaded libcublas into the process
// by the time a kernel is made, so dlopen(RTLD_NOLOAD) takes that copy, by the sonames it may have.
//
// The values and prototypes below were checked against the public CUDA 13.0 header text, cublas_api.h
// (CUBLAS_VER_MAJOR 13, CUBLAS_VER_BUILD 19; the copy in github.com/leomaxwell972/CU13ToolKit_Includes,
// include/cublas_api.h) and library_types.h (nvidia-cuda-runtime 13.5 on PyPI: CUDA_R_16F = 2, CUDA_R_32F = 0):
//   cublasStatus_t cublasCreate_v2(cublasHandle_t* handle);
//   cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId);
//   cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
//                               int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
//                               cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
//                               cublasComputeType_t computeType, cublasGemmAlgo_t algo);
// The enums are C enums (int-sized on the x86-64 and aarch64 ABIs); cuBLAS 12 has the same values and prototypes.
#pragma once

#include <dlfcn.h>
#include <stddef.h>

#include <string>

typedef struct cublasContext* cublasHandle_t;

typedef enum { ONNXPIPE_CUBLAS_STATUS_SUCCESS = 0 } onnxpipe_cublasStatus_t;  // cublasStatus_t
typedef enum { ONNXPIPE_CUDA_R_32F = 0, ONNXPIPE_CUDA_R_16F = 2 } onnxpipe_cudaDataType;  // cudaDataType
typedef enum { ONNXPIPE_CUBLAS_COMPUTE_32F = 68 } onnxpipe_cublasComputeType_t;  // fp32 accumulation
typedef enum { ONNXPIPE_CUBLAS_GEMM_DEFAULT = -1 } onnxpipe_cublasGemmAlgo_t;
static_assert(sizeof(onnxpipe_cublasStatus_t) == sizeof(int) && sizeof(onnxpipe_cudaDataType) == sizeof(int) &&
                  sizeof(onnxpipe_cublasComputeType_t) == sizeof(int) && sizeof(onnxpipe_cublasGemmAlgo_t) == sizeof(int),
              "cuBLAS's enums are passed as int");

typedef int (*onnxpipe_cublasCreate_v2)(cublasHandle_t* handle);
typedef int (*onnxpipe_cublasSetStream_v2)(cublasHandle_t handle, void* stream);
typedef int (*onnxpipe_cublasGemmEx)(cublasHandle_t handle, int transa, int transb, int m, int n, int k,
                                     const void* alpha, const void* A, int Atype, int lda, const void* B, int Btype,
                                     int ldb, const void* beta, void* C, int Ctype, int ldc, int computeType, int algo);

// The sonames cuBLAS has in the process, newest first (onnxruntime-gpu for CUDA 13, then 12).
static const char* const kCublasNames[] = {"libcublas.so.13", "libcublas.so.12"};

struct CublasApi {
  const char* name = nullptr;  // the soname it was found under
  onnxpipe_cublasCreate_v2 create = nullptr;
  onnxpipe_cublasSetStream_v2 set_stream = nullptr;
  onnxpipe_cublasGemmEx gemm_ex = nullptr;
};

// cuBLAS as already loaded in this process: true and *out filled, or false and *why one line saying what is missing.
static inline bool find_cublas(CublasApi* out, std::string* why) {
  std::string missing;
  for (const char* name : kCublasNames) {
    void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (lib == nullptr) continue;
    CublasApi api;
    api.name = name;
    api.create = reinterpret_cast<onnxpipe_cublasCreate_v2>(dlsym(lib, "cublasCreate_v2"));
    api.set_stream = reinterpret_cast<onnxpipe_cublasSetStream_v2>(dlsym(lib, "cublasSetStream_v2"));
    api.gemm_ex = reinterpret_cast<onnxpipe_cublasGemmEx>(dlsym(lib, "cublasGemmEx"));
    if (api.create && api.set_stream && api.gemm_ex) {
      *out = api;  // the handle from dlopen stays open: the library stays loaded as long as we hold its functions
      return true;
    }
    missing += std::string(missing.empty() ? "" : "; ") + name + " lacks " +
               (!api.create ? "cublasCreate_v2" : !api.set_stream ? "cublasSetStream_v2" : "cublasGemmEx");
    dlclose(lib);
  }
  *why = missing.empty() ? std::string("cuBLAS is not loaded in this process (neither ") + kCublasNames[0] + " nor " +
                               kCublasNames[1] + "; onnxruntime-gpu's CUDA EP loads it)"
                         : missing;
  return false;
}
