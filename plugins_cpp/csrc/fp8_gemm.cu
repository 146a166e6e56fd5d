// trtllm_cpp::fp8_gemm: out = act((x_fp8 @ w_fp8^T) * x_scale * w_scale + bias) through cuBLASLt's
// FP8 (E4M3) GEMM, per-tensor scales as device scalars, output bf16 or fp16.
#include <torch/library.h>

#include "cublaslt_gemm.h"

namespace trtllm_cpp {

// x_fp8 [M, K], w_fp8 [N, K] float8_e4m3fn (K a multiple of 16); x_scale, w_scale: one float32
// each; bias [N] in out_dtype or none -> [M, N] in out_dtype
at::Tensor fp8_gemm(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                    const c10::optional<at::Tensor>& bias, std::string act, at::ScalarType out_dtype) {
  check_gemm_operand(x, "x_fp8");
  check_gemm_operand(w, "w_fp8");
  TORCH_CHECK(x.scalar_type() == at::kFloat8_e4m3fn && w.scalar_type() == at::kFloat8_e4m3fn,
              "fp8_gemm: x and w must be float8_e4m3fn");
  TORCH_CHECK(x.size(1) == w.size(1) && x.size(1) % 16 == 0 && w.size(0) % 16 == 0,
              "fp8_gemm: K must match and K, N be multiples of 16; got x ", x.sizes(), ", w ", w.sizes());
  for (const at::Tensor* s : {&x_scale, &w_scale}) {
    TORCH_CHECK(s->numel() == 1 && s->scalar_type() == at::kFloat && s->is_cuda(),
                "fp8_gemm: scales must be one float32 on the GPU (per-tensor)");
  }
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, "fp8_gemm: out_dtype must be bf16 or fp16");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == w.size(0) && bias->scalar_type() == out_dtype && bias->is_contiguous(),
                "fp8_gemm: bias must be a contiguous [N] tensor of out_dtype");
  }
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(out_dtype));
  lt_matmul(x, w, bias, act, out, x_scale.data_ptr<float>(), w_scale.data_ptr<float>());
  return out;
}

}  // namespace trtllm_cpp

TORCH_LIBRARY_FRAGMENT(trtllm_cpp, m) {
  m.def("fp8_gemm(Tensor x_fp8, Tensor x_scale, Tensor w_fp8, Tensor w_scale, Tensor? bias, str act, "
        "ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(trtllm_cpp, CUDA, m) { m.impl("fp8_gemm", &trtllm_cpp::fp8_gemm); }
