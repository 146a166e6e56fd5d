// One cuBLASLt GEMM with an epilogue, shared by gemm_act.cu and fp8_gemm.cu.
//
//   out[M, N] = epilogue(alpha * x[M, K] @ w[N, K]^T + bias[N])       (row-major torch tensors)
//
// cuBLASLt is column-major, so it computes out^T[N, M] = op(A) @ B with A = w seen as a
// column-major [K, N] matrix taken transposed (the "TN" layout FP8 requires) and B = x seen as
// a column-major [K, M] matrix. The bias epilogue adds bias[i] to row i of the column-major
// result, which is column i of `out`. Scales (FP8 only) are per-tensor device scalars.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>

#define TRTLLM_CHECK_CUBLAS(expr)                                                                  \
  do {                                                                                             \
    cublasStatus_t status_ = (expr);                                                               \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt call failed with status ",             \
                static_cast<int>(status_), ": " #expr);                                            \
  } while (0)

namespace trtllm_cpp {

constexpr int64_t kWorkspaceBytes = 32 << 20;  // cuBLASLt's scratch memory for split-K and friends

inline cudaDataType_t cuda_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat8_e4m3fn: return CUDA_R_8F_E4M3;
    default: TORCH_CHECK(false, "cuBLASLt GEMM: unsupported dtype ", type);
  }
}

// act ("none", "relu", "gelu_tanh") and whether a bias is added -> cuBLASLt epilogue.
inline cublasLtEpilogue_t epilogue_for(const std::string& act, bool has_bias) {
  if (act == "none") return has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (act == "relu") return has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  if (act == "gelu_tanh") return has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  TORCH_CHECK(false, "cuBLASLt epilogues apply act 'none', 'relu' or 'gelu_tanh', got '", act,
              "'; use trtllm::gemm_act (Triton) for other activations");
}

// One cuBLASLt handle for the process (cuBLASLt handles are not tied to a device or stream).
inline cublasLtHandle_t lt_handle() {
  static cublasLtHandle_t handle = [] {
    cublasLtHandle_t created;
    TRTLLM_CHECK_CUBLAS(cublasLtCreate(&created));
    return created;
  }();
  return handle;
}

// Matrix layout handles, destroyed with the object.
struct LtLayout {
  cublasLtMatrixLayout_t handle = nullptr;
  LtLayout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    TRTLLM_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&handle, type, rows, cols, ld));
  }
  ~LtLayout() { cublasLtMatrixLayoutDestroy(handle); }
};

struct LtDesc {
  cublasLtMatmulDesc_t handle = nullptr;
  LtDesc() { TRTLLM_CHECK_CUBLAS(cublasLtMatmulDescCreate(&handle, CUBLAS_COMPUTE_32F, CUDA_R_32F)); }
  ~LtDesc() { cublasLtMatmulDescDestroy(handle); }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    TRTLLM_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(handle, attribute, &value, sizeof(value)));
  }
};

// The heuristic's first algorithm per problem, found once (the lookup costs host time per call).
using AlgoKey = std::tuple<int64_t, int64_t, int64_t, int, int, int, int>;

inline cublasLtMatmulAlgo_t find_algo(cublasLtHandle_t lt, const AlgoKey& key, LtDesc& desc, LtLayout& a,
                                      LtLayout& b, LtLayout& d) {
  static std::map<AlgoKey, cublasLtMatmulAlgo_t> cache;
  static std::mutex mutex;
  std::lock_guard<std::mutex> guard(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  cublasLtMatmulPreference_t preference;
  TRTLLM_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&preference));
  uint64_t workspace = kWorkspaceBytes;
  TRTLLM_CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
      preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
  cublasLtMatmulHeuristicResult_t result;
  int returned = 0;
  cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(lt, desc.handle, a.handle, b.handle, d.handle,
                                                         d.handle, preference, 1, &result, &returned);
  cublasLtMatmulPreferenceDestroy(preference);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS && returned > 0,
              "cuBLASLt has no algorithm for this GEMM (M, N, K = ", std::get<0>(key), ", ",
              std::get<1>(key), ", ", std::get<2>(key), ")");
  cache.emplace(key, result.algo);
  return result.algo;
}

// out[M, N] = epilogue(x[M, K] @ w[N, K]^T * (x_scale * w_scale) + bias[N]); scales may be null.
inline void lt_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                      const std::string& act, at::Tensor& out, const float* x_scale, const float* w_scale) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  LtDesc desc;
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  cublasLtEpilogue_t epilogue = epilogue_for(act, has_bias);
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (has_bias) {
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias->data_ptr());
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, cuda_type(bias->scalar_type()));
  }
  if (w_scale != nullptr) desc.set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_scale);
  if (x_scale != nullptr) desc.set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scale);
  LtLayout a(cuda_type(w.scalar_type()), k, n, k);    // w: column-major [K, N], used transposed
  LtLayout b(cuda_type(x.scalar_type()), k, m, k);    // x: column-major [K, M]
  LtLayout d(cuda_type(out.scalar_type()), n, m, n);  // out: column-major [N, M] = row-major [M, N]
  cublasLtHandle_t lt = lt_handle();
  AlgoKey key{m, n, k, static_cast<int>(x.scalar_type()), static_cast<int>(out.scalar_type()),
              static_cast<int>(epilogue), x.get_device()};
  cublasLtMatmulAlgo_t algo = find_algo(lt, key, desc, a, b, d);
  at::Tensor workspace = at::empty({kWorkspaceBytes}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  TRTLLM_CHECK_CUBLAS(cublasLtMatmul(lt, desc.handle, &alpha, w.data_ptr(), a.handle, x.data_ptr(), b.handle,
                                     &beta, out.data_ptr(), d.handle, out.data_ptr(), d.handle, &algo,
                                     workspace.data_ptr(), kWorkspaceBytes,
                                     c10::cuda::getCurrentCUDAStream(x.get_device()).stream()));
}

inline void check_gemm_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor, got shape ", t.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

}  // namespace trtllm_cpp
