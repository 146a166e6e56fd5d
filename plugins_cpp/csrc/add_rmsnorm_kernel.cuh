// The add + RMSNorm kernel and its launcher on raw pointers, shared by the torch op
// (add_rmsnorm.cu) and the TensorRT plugin (../tensorrt/add_rmsnorm_plugin.cu).
//
//   s = x + residual              (rounded to the dtype, as torch adds)
//   y = w * round(s * rsqrt(mean(s^2) + eps))    (float32 inside; rounded as HF LlamaRMSNorm)
//
// One block per row. Each thread adds and stores its 16-byte vectors of s while summing squares;
// after one block reduction it re-reads the same vectors of s (just written: in L1/L2) to scale.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace trtllm_cpp {

enum class NormDtype { kFloat32, kFloat16, kBFloat16 };

namespace detail {

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
__device__ __forceinline__ float block_sum(float value) {
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
cudaError_t launch(const void* x, const void* residual, const void* w, void* y, void* s, int64_t rows, int hidden,
                   float eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (rows == 0) return cudaSuccess;
  const bool vectorized = hidden % kVec == 0;
  const int per_thread = vectorized ? kVec : 1;
  const int threads = std::min(1024, std::max(32, (hidden / per_thread + 31) / 32 * 32));
  auto in = [](const void* p) { return static_cast<const T*>(p); };
  auto out = [](void* p) { return static_cast<T*>(p); };
  if (vectorized) {
    add_rmsnorm_kernel<T, kVec><<<rows, threads, 0, stream>>>(in(x), in(residual), in(w), out(y), out(s), hidden, eps);
  } else {
    add_rmsnorm_kernel<T, 1><<<rows, threads, 0, stream>>>(in(x), in(residual), in(w), out(y), out(s), hidden, eps);
  }
  return cudaGetLastError();
}

}  // namespace detail

// x, residual, y, s: [rows, hidden]; w: [hidden]; all of `dtype`, contiguous, 16-byte aligned.
inline cudaError_t launch_add_rmsnorm(NormDtype dtype, const void* x, const void* residual, const void* w, void* y,
                                      void* s, int64_t rows, int hidden, float eps, cudaStream_t stream) {
  switch (dtype) {
    case NormDtype::kFloat32: return detail::launch<float>(x, residual, w, y, s, rows, hidden, eps, stream);
    case NormDtype::kFloat16: return detail::launch<__half>(x, residual, w, y, s, rows, hidden, eps, stream);
    case NormDtype::kBFloat16: return detail::launch<__nv_bfloat16>(x, residual, w, y, s, rows, hidden, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace trtllm_cpp
