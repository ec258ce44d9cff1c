// Internal to the CUDA backend: error checks, launch shapes and dtype dispatch shared by the cuda_*.cu files.
// Every kernel runs on the legacy default stream (stream 0), so kernels, cuBLAS calls and cudaMemcpy are
// ordered without explicit synchronisation; results read back to the host (a returned double) synchronise.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/error.h"
#include "core/tensor.h"

#define TS_CUDA_CHECK(expr)                                                                       \
  do {                                                                                            \
    cudaError_t ts_err_ = (expr);                                                                 \
    TS_CHECK(ts_err_ == cudaSuccess, "CUDA error ", cudaGetErrorString(ts_err_), " in ", #expr); \
  } while (0)

#define TS_CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                          \
    cublasStatus_t ts_st_ = (expr);                                                             \
    TS_CHECK(ts_st_ == CUBLAS_STATUS_SUCCESS, "cuBLAS error ", cublasGetStatusString(ts_st_), \
             " in ", #expr);                                                                    \
  } while (0)

// After a kernel launch: reports a bad launch configuration at once (execution errors surface at the next
// synchronising call).
#define TS_CUDA_LAUNCH_CHECK() TS_CUDA_CHECK(cudaGetLastError())

namespace tessera::cuda {

constexpr int kBlock = 256;

// Blocks of kBlock threads covering n elements (grid-stride loops take the rest).
inline unsigned grid_for(int64_t n, int block = kBlock) {
  int64_t g = (n + block - 1) / block;
  if (g < 1) g = 1;
  if (g > 65535L * 16) g = 65535L * 16;
  return static_cast<unsigned>(g);
}

// A tensor's device pointer (nullptr for an undefined optional tensor).
template <class T>
T* dptr(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.raw()) : nullptr;
}

// Calls f.template operator()<T>() with T = float or double according to the tensor's dtype.
template <class F>
void dispatch_float(const Tensor& t, F&& f) {
  if (t.dtype() == DType::f32) f.template operator()<float>();
  else if (t.dtype() == DType::f64) f.template operator()<double>();
  else TS_CHECK(false, "CUDA kernels take f32 or f64, got ", t.str());
}

// Grid-stride loop over [0, n).
#define TS_CUDA_KERNEL_LOOP(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

// Block-wide sum (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
template <class T>
__device__ inline T block_sum(T v) {
  __shared__ T partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  int nw = (blockDim.x + 31) >> 5;
  T total = 0;
  for (int w = 0; w < nw; ++w) total += partial[w];
  return total;
}

// Block-wide max; every thread gets the result.
template <class T>
__device__ inline T block_max(T v) {
  __shared__ T partial[32];
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  int nw = (blockDim.x + 31) >> 5;
  T m = partial[0];
  for (int w = 1; w < nw; ++w) m = max(m, partial[w]);
  return m;
}

// The process-wide cuBLAS / cuBLASLt handles (created on first use, bound to stream 0) and a workspace.
cublasHandle_t cublas();
cublasLtHandle_t cublaslt();
void* cublaslt_workspace(size_t* bytes);

// Copies a device scalar (or small array) to the host; synchronises.
template <class T>
T read_scalar(const T* device_ptr) {
  T v;
  TS_CUDA_CHECK(cudaMemcpy(&v, device_ptr, sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

}  // namespace tessera::cuda
