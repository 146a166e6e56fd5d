// trtllm_cpp::add_rmsnorm: the residual add fused with Llama's RMSNorm, one pass over the row.
//
//   s = x + residual              (rounded to the dtype, as torch adds)
//   y = w * round(s * rsqrt(mean(s^2) + eps))    (float32 inside; rounded as HF LlamaRMSNorm)
//
// One block per row. Each thread adds and stores its 16-byte vectors of s while summing squares;
// after one block reduction it re-reads the same vectors of s (just written: in L1/L2) to scale.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>

namespace trtllm_cpp {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Sum over the block; every thread gets the total. blockDim.x is a multiple of 32, at most 1024.
__device__ float block_sum(float value) {
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  value = lane < blockDim.x / 32 ? partial[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

template <typename T, int VEC>
__global__ void add_rmsnorm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ w,
                                   T* __restrict__ y, T* __restrict__ s, int hidden, float eps) {
  using V = Vec<T, VEC>;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * hidden;
  float squares = 0.0f;
  for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
    const V a = *reinterpret_cast<const V*>(x + offset + i);
    const V b = *reinterpret_cast<const V*>(residual + offset + i);
    V sum;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sum.v[j] = from_float<T>(to_float(a.v[j]) + to_float(b.v[j]));
      const float f = to_float(sum.v[j]);
      squares += f * f;
    }
    *reinterpret_cast<V*>(s + offset + i) = sum;
  }
  const float inv_rms = rsqrtf(block_sum(squares) / hidden + eps);
  for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
    const V sum = *reinterpret_cast<const V*>(s + offset + i);  // this thread's own stores
    const V weight = *reinterpret_cast<const V*>(w + i);
    V out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const T normalized = from_float<T>(to_float(sum.v[j]) * inv_rms);
      out.v[j] = from_float<T>(to_float(weight.v[j]) * to_float(normalized));
    }
    *reinterpret_cast<V*>(y + offset + i) = out;
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w, at::Tensor& y, at::Tensor& s,
            double eps) {
  const int hidden = static_cast<int>(x.size(-1));
  const int64_t rows = x.numel() / hidden;
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = hidden % kVec == 0;
  const int per_thread = vectorized ? kVec : 1;
  const int threads = std::min(1024, std::max(32, (hidden / per_thread + 31) / 32 * 32));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
  if (rows == 0) return;
  if (vectorized) {
    add_rmsnorm_kernel<T, kVec><<<rows, threads, 0, stream>>>(ptr(x), ptr(residual), ptr(w), ptr(y), ptr(s), hidden,
                                                              static_cast<float>(eps));
  } else {
    add_rmsnorm_kernel<T, 1><<<rows, threads, 0, stream>>>(ptr(x), ptr(residual), ptr(w), ptr(y), ptr(s), hidden,
                                                           static_cast<float>(eps));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

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
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x), s = at::empty_like(x);
  switch (x.scalar_type()) {
    case at::kFloat: launch<float>(x, residual, w, y, s, eps); break;
    case at::kHalf: launch<__half>(x, residual, w, y, s, eps); break;
    case at::kBFloat16: launch<__nv_bfloat16>(x, residual, w, y, s, eps); break;
    default: TORCH_CHECK(false, "add_rmsnorm: dtype ", x.scalar_type(), " is not fp32, fp16 or bf16");
  }
  return {y, s};
}

}  // namespace trtllm_cpp

TORCH_LIBRARY_FRAGMENT(trtllm_cpp, m) {
  m.def("add_rmsnorm(Tensor x, Tensor residual, Tensor w, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(trtllm_cpp, CUDA, m) { m.impl("add_rmsnorm", &trtllm_cpp::add_rmsnorm); }
