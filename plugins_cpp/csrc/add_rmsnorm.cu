// trtllm_cpp::add_rmsnorm: the residual add fused with Llama's RMSNorm as a torch op; the
// kernel is in add_rmsnorm_kernel.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "add_rmsnorm_kernel.cuh"

namespace trtllm_cpp {

// x, residual [..., H] and w [H], one dtype (fp32 / fp16 / bf16), contiguous -> (y, x + residual)
std::tuple<at::Tensor, at::Tensor> add_rmsnorm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                                               double eps) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && residual.is_contiguous() && w.is_contiguous(),
              "add_rmsnorm: x, residual and w must be contiguous CUDA tensors");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rmsnorm: x ", x.sizes(), " and residual ", residual.sizes(),
              " must have one shape");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "add_rmsnorm: w must be [", x.size(-1), "], got ", w.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == w.scalar_type(),
              "add_rmsnorm: x, residual and w must share a dtype");
  NormDtype dtype;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = NormDtype::kFloat32; break;
    case at::kHalf: dtype = NormDtype::kFloat16; break;
    case at::kBFloat16: dtype = NormDtype::kBFloat16; break;
    default: TORCH_CHECK(false, "add_rmsnorm: dtype ", x.scalar_type(), " is not fp32, fp16 or bf16");
  }
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x), s = at::empty_like(x);
  const int hidden = static_cast<int>(x.size(-1));
  C10_CUDA_CHECK(launch_add_rmsnorm(dtype, x.data_ptr(), residual.data_ptr(), w.data_ptr(), y.data_ptr(), s.data_ptr(),
                                    x.numel() / hidden, hidden, static_cast<float>(eps),
                                    c10::cuda::getCurrentCUDAStream(x.get_device()).stream()));
  return {y, s};
}

}  // namespace trtllm_cpp

TORCH_LIBRARY_FRAGMENT(trtllm_cpp, m) {
  m.def("add_rmsnorm(Tensor x, Tensor residual, Tensor w, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(trtllm_cpp, CUDA, m) { m.impl("add_rmsnorm", &trtllm_cpp::add_rmsnorm); }
