// onnxpipe's own declarations of the few parts of ONNX Runtime's C API that the kernels library uses.
//
// ONNX Runtime's C API is versioned and ABI-stable: OrtApi is a table of function pointers that only ever grows at
// its end, and OrtCustomOp is a struct of callbacks whose `version` field tells onnxruntime how many of them to read.
// Its headers are not on PyPI, and nothing may be downloaded when the library is built, so this file declares what
// we call and nothing else; every slot we do not call is padding of the same size (a pointer).
//
// How the slot indices were counted: by reading `struct OrtApi` in include/onnxruntime/core/session/
// onnxruntime_c_api.h (microsoft/onnxruntime, API version 30) from its first member, one slot per function pointer
// (ORT_API2_STATUS, ORT_CLASS_RELEASE and the plain function pointers alike), starting at 0. The slots used here
// were all present by API 14 and keep their index in every later version. A wrong index shows as a crash or a wrong
// call: the CPU reference kernel exercises every slot below, the CUDA stream's included (on the CPU it must answer
// "no stream"), and checks the two slots either side of it (192 HasValue, 194 GetTensorMemoryInfo, which must say
// the input is there and in "Cpu" memory), so the tests catch a miscount without a GPU.
//
// The four allocator slots (75 AllocatorAlloc, 76 AllocatorFree, 132 ReleaseAllocator, 253 KernelContext_GetAllocator:
// the CUDA kernel's scratch memory for M past the small-M kernel) were counted the same way, by a script, from the
// API 15 header (the copy vendored in github.com/AMXZzzz/SF_TRT_62, include/onnxruntime_c_api.h, "#define
// ORT_API_VERSION 15"); the same count gives every older slot above its index here. KernelContext_GetAllocator is
// "\since Version 1.15", inside the version 16 we ask for. The CPU reference calls all four on every run (an
// allocator for A's memory, 64 bytes taken, written and given back, the allocator released).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The API version we ask GetApi for: KernelComputeV2 / CreateKernelV2 (errors come back as an OrtStatus) arrived
// in 16; onnxruntime 1.31 and 1.32 serve every version up to their own (31, 32).
#define ONNXPIPE_ORT_API_VERSION 16

typedef struct OrtStatus OrtStatus;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;
typedef struct OrtMemoryInfo OrtMemoryInfo;
typedef struct OrtAllocator OrtAllocator;  // used only through the API's slots, never by its fields
typedef struct OrtCustomOp OrtCustomOp;
typedef struct OrtApi OrtApi;

// ONNX's TensorProto data types, as onnxruntime numbers them (the ones the kernels read or write)
typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_RUNTIME_EXCEPTION = 6,
  ORT_NOT_IMPLEMENTED = 9,
  ORT_EP_FAIL = 11,
} OrtErrorCode;

typedef enum OrtMemType {
  OrtMemTypeCPUInput = -2,
  OrtMemTypeCPUOutput = -1,
  OrtMemTypeDefault = 0,
} OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
} OrtCustomOpInputOutputCharacteristic;

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);  // NULL where this onnxruntime does not serve `version`
  const char* (*GetVersionString)(void);
} OrtApiBase;

// A slot we do not call: same size as a function pointer.
#define ONNXPIPE_PAD(first, count) void* pad_##first[count]

struct OrtApi {
  OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg);                       // 0
  OrtErrorCode (*GetErrorCode)(const OrtStatus* status);                                // 1
  const char* (*GetErrorMessage)(const OrtStatus* status);                              // 2
  ONNXPIPE_PAD(3, 23);                                                                  // 3..25
  OrtStatus* (*CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);      // 26
  OrtStatus* (*CustomOpDomain_Add)(OrtCustomOpDomain* domain, const OrtCustomOp* op);   // 27
  OrtStatus* (*AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain);  // 28
  ONNXPIPE_PAD(29, 22);                                                                 // 29..50
  OrtStatus* (*GetTensorMutableData)(OrtValue* value, void** out);                      // 51
  ONNXPIPE_PAD(52, 8);                                                                  // 52..59
  OrtStatus* (*GetTensorElementType)(const OrtTensorTypeAndShapeInfo* info,
                                     ONNXTensorElementDataType* out);                   // 60
  OrtStatus* (*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);  // 61
  OrtStatus* (*GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count);  // 62
  ONNXPIPE_PAD(63, 2);                                                                  // 63..64
  OrtStatus* (*GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);  // 65
  ONNXPIPE_PAD(66, 5);                                                                  // 66..70
  OrtStatus* (*MemoryInfoGetName)(const OrtMemoryInfo* info, const char** out);         // 71
  ONNXPIPE_PAD(72, 3);                                                                  // 72..74
  OrtStatus* (*AllocatorAlloc)(OrtAllocator* allocator, size_t size, void** out);       // 75
  OrtStatus* (*AllocatorFree)(OrtAllocator* allocator, void* p);                        // 76
  ONNXPIPE_PAD(77, 9);                                                                  // 77..85
  OrtStatus* (*KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name, int64_t* out);  // 86
  ONNXPIPE_PAD(87, 1);                                                                  // 87
  OrtStatus* (*KernelContext_GetInputCount)(const OrtKernelContext* context, size_t* out);  // 88
  OrtStatus* (*KernelContext_GetOutputCount)(const OrtKernelContext* context, size_t* out);  // 89
  OrtStatus* (*KernelContext_GetInput)(const OrtKernelContext* context, size_t index, const OrtValue** out);  // 90
  OrtStatus* (*KernelContext_GetOutput)(OrtKernelContext* context, size_t index, const int64_t* dims,
                                        size_t dim_count, OrtValue** out);              // 91
  ONNXPIPE_PAD(92, 1);                                                                  // 92 ReleaseEnv
  void (*ReleaseStatus)(OrtStatus* status);                                             // 93
  ONNXPIPE_PAD(94, 5);                                                                  // 94..98
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);               // 99
  ONNXPIPE_PAD(100, 32);                                                                // 100..131
  void (*ReleaseAllocator)(OrtAllocator* allocator);                                    // 132
  ONNXPIPE_PAD(133, 59);                                                                // 133..191
  OrtStatus* (*HasValue)(const OrtValue* value, int* out);                              // 192
  OrtStatus* (*KernelContext_GetGPUComputeStream)(const OrtKernelContext* context, void** out);  // 193
  OrtStatus* (*GetTensorMemoryInfo)(const OrtValue* value, const OrtMemoryInfo** out);  // 194
  ONNXPIPE_PAD(195, 58);                                                                // 195..252
  OrtStatus* (*KernelContext_GetAllocator)(const OrtKernelContext* context, const OrtMemoryInfo* mem_info,
                                           OrtAllocator** out);                         // 253
};

#ifdef __cplusplus
static_assert(offsetof(OrtApi, CreateCustomOpDomain) == 26 * sizeof(void*), "OrtApi slot 26");
static_assert(offsetof(OrtApi, GetTensorMutableData) == 51 * sizeof(void*), "OrtApi slot 51");
static_assert(offsetof(OrtApi, GetTensorTypeAndShape) == 65 * sizeof(void*), "OrtApi slot 65");
static_assert(offsetof(OrtApi, KernelInfoGetAttribute_int64) == 86 * sizeof(void*), "OrtApi slot 86");
static_assert(offsetof(OrtApi, KernelContext_GetInputCount) == 88 * sizeof(void*), "OrtApi slot 88");
static_assert(offsetof(OrtApi, ReleaseStatus) == 93 * sizeof(void*), "OrtApi slot 93");
static_assert(offsetof(OrtApi, ReleaseTensorTypeAndShapeInfo) == 99 * sizeof(void*), "OrtApi slot 99");
static_assert(offsetof(OrtApi, MemoryInfoGetName) == 71 * sizeof(void*), "OrtApi slot 71");
static_assert(offsetof(OrtApi, HasValue) == 192 * sizeof(void*), "OrtApi slot 192");
static_assert(offsetof(OrtApi, KernelContext_GetGPUComputeStream) == 193 * sizeof(void*), "OrtApi slot 193");
static_assert(offsetof(OrtApi, GetTensorMemoryInfo) == 194 * sizeof(void*), "OrtApi slot 194");
static_assert(offsetof(OrtApi, AllocatorAlloc) == 75 * sizeof(void*), "OrtApi slot 75");
static_assert(offsetof(OrtApi, AllocatorFree) == 76 * sizeof(void*), "OrtApi slot 76");
static_assert(offsetof(OrtApi, ReleaseAllocator) == 132 * sizeof(void*), "OrtApi slot 132");
static_assert(offsetof(OrtApi, KernelContext_GetAllocator) == 253 * sizeof(void*), "OrtApi slot 253");
static_assert(sizeof(OrtApi) == 254 * sizeof(void*), "OrtApi: slots 0..253");
#endif

// The custom op's callbacks, in onnxruntime's order, up to what version 16 reads (CreateKernelV2 and
// KernelComputeV2) and the three fields after it that later versions add (left NULL: `version` stays 16, so
// onnxruntime does not read them).
struct OrtCustomOp {
  uint32_t version;  // ONNXPIPE_ORT_API_VERSION
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);  // v1 path: NULL
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);  // v1 path: NULL
  void (*KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);  // version >= 17
  int (*GetStartVersion)(const OrtCustomOp* op);                                           // version >= 17
  int (*GetEndVersion)(const OrtCustomOp* op);                                             // version >= 17
};

#ifdef __cplusplus
static_assert(offsetof(OrtCustomOp, CreateKernelV2) == 17 * sizeof(void*), "OrtCustomOp CreateKernelV2");
#endif

#ifdef __cplusplus
}  // extern "C"
#endif
