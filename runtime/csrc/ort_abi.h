/*
 * The part of ONNX Runtime's C ABI (API version 8) that the runtime's kernels use (q4_matmul.c: int4
 * MatMulNBits, attention.c: decode attention), and what the two files share: the thread pool and tensor shapes.
 *
 * The header of ONNX Runtime is not on PyPI, so these declarations are written here: entry points are looked up by
 * their slot in the OrtApi function table of API version 8 (the table is append-only; slots below 102 are "version
 * 1, do not modify"), and the custom-op description is the version-8 layout. RegisterCustomOps (q4_matmul.c)
 * checks the table with a status round trip before using it.
 */
#ifndef GLM_ORT_ABI_H
#define GLM_ORT_ABI_H
#include <stddef.h>
#include <stdint.h>

#define ORT_API_VERSION_USED 8
typedef void OrtStatus;
typedef void (*AnyFn)(void);
typedef struct OrtApiTable { AnyFn slot[102]; } OrtApiTable;   /* only the first 102 slots are read */
typedef struct OrtApiBase {
  const OrtApiTable *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum {
  SLOT_CreateStatus = 0, SLOT_GetErrorMessage = 2, SLOT_CreateCustomOpDomain = 26, SLOT_CustomOpDomain_Add = 27,
  SLOT_AddCustomOpDomain = 28, SLOT_GetTensorMutableData = 51, SLOT_GetDimensionsCount = 61,
  SLOT_GetDimensions = 62, SLOT_GetTensorTypeAndShape = 65, SLOT_KernelInfoGetAttribute_float = 85,
  SLOT_KernelInfoGetAttribute_int64 = 86,
  SLOT_KernelContext_GetInputCount = 88, SLOT_KernelContext_GetInput = 90, SLOT_KernelContext_GetOutput = 91,
  SLOT_ReleaseStatus = 93, SLOT_ReleaseTensorTypeAndShapeInfo = 99,
};
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_BOOL = 9 };

extern const OrtApiTable *glm_ort_api;   /* set by RegisterCustomOps */
#define ORT_FN(index, type) ((type)glm_ort_api->slot[index])
typedef OrtStatus *(*CreateStatusFn)(int, const char *);
typedef const char *(*GetErrorMessageFn)(const OrtStatus *);
typedef void (*ReleaseFn)(void *);
typedef OrtStatus *(*CreateDomainFn)(const char *, void **);
typedef OrtStatus *(*DomainAddFn)(void *, const void *);
typedef OrtStatus *(*AddDomainFn)(void *, void *);
typedef OrtStatus *(*GetDataFn)(void *, void **);
typedef OrtStatus *(*GetDimCountFn)(const void *, size_t *);
typedef OrtStatus *(*GetDimsFn)(const void *, int64_t *, size_t);
typedef OrtStatus *(*GetShapeFn)(const void *, void **);
typedef OrtStatus *(*GetAttrIntFn)(const void *, const char *, int64_t *);
typedef OrtStatus *(*GetAttrFloatFn)(const void *, const char *, float *);
typedef OrtStatus *(*GetCountFn)(const void *, size_t *);
typedef OrtStatus *(*GetInputFn)(const void *, size_t, const void **);
typedef OrtStatus *(*GetOutputFn)(void *, size_t, const int64_t *, size_t, void **);

typedef struct CustomOp {              /* ONNX Runtime's custom-op description, version-8 layout */
  uint32_t version;
  void *(*CreateKernel)(const struct CustomOp *, const OrtApiTable *, const void *info);
  const char *(*GetName)(const struct CustomOp *);
  const char *(*GetExecutionProviderType)(const struct CustomOp *);
  int (*GetInputType)(const struct CustomOp *, size_t);
  size_t (*GetInputTypeCount)(const struct CustomOp *);
  int (*GetOutputType)(const struct CustomOp *, size_t);
  size_t (*GetOutputTypeCount)(const struct CustomOp *);
  void (*KernelCompute)(void *, void *context);
  void (*KernelDestroy)(void *);
  int (*GetInputCharacteristic)(const struct CustomOp *, size_t);
  int (*GetOutputCharacteristic)(const struct CustomOp *, size_t);
} CustomOp;

static inline int status_failed(OrtStatus *st) {
  if (!st) return 0;
  ORT_FN(SLOT_ReleaseStatus, ReleaseFn)(st);
  return 1;
}

/* Elements of a tensor (-1 when its shape cannot be read), and its shape in dims[8] / *rank. */
int64_t glm_element_count(const void *value, int64_t dims[8], size_t *rank);

/* Run fn(arg, who, nthreads) on the calling thread (who = 0) and each worker of the pool, and return when all have
 * returned. One job at a time: a concurrent caller runs fn(arg, 0, 1) alone on its own thread. */
void glm_pool_run(void (*fn)(void *arg, int who, int nthreads), void *arg);

/* The attention op (attention.c), registered in the ONNX domain when glm_q4_select asks for it: its work split over
 * the pool, or (_single) run on the calling thread. */
extern const CustomOp glm_attention_op, glm_attention_op_single;

#endif
