// trtllm_cpp::gemm_act: out = act(x @ w^T + bias) as one cuBLASLt GEMM with the bias and the
// activation in its epilogue (act "none", "relu" or "gelu_tanh"; cuBLASLt's GELU is the tanh form).
#include <torch/library.h>

#include "cublaslt_gemm.h"

namespace trtllm_cpp {

// x [M, K], w [N, K] (fp16 / bf16 / fp32, one dtype), bias [N] or none -> [M, N]
at::Tensor gemm_act(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                    std::string act) {
  check_gemm_operand(x, "x");
  check_gemm_operand(w, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "gemm_act: x is [", x.size(0), ", ", x.size(1), "] but w is [", w.size(0),
              ", ", w.size(1), "]; their last dims must match");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemm_act: x and w must share a dtype");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == w.size(0) && bias->is_contiguous() && bias->scalar_type() == x.scalar_type(),
                "gemm_act: bias must be a contiguous [N] tensor of x's dtype");
  }
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  lt_matmul(x, w, bias, act, out, nullptr, nullptr);
  return out;
}

}  // namespace trtllm_cpp

TORCH_LIBRARY_FRAGMENT(trtllm_cpp, m) {
  m.def("gemm_act(Tensor x, Tensor w, Tensor? bias, str act) -> Tensor");
}

TORCH_LIBRARY_IMPL(trtllm_cpp, CUDA, m) { m.impl("gemm_act", &trtllm_cpp::gemm_act); }
