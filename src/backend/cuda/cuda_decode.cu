// CUDA decoding kernels (contracts: src/ops/ops.h, Backend::attention_decode; reference:
// src/backend/cpu/cpu_decode.cpp). One thread block per (batch row, query, head): the scores of the query's keys
// go to a global scratch row, then a block max / sum, then every thread owns dims d = tid, tid + blockDim, ... of
// the output and accumulates over the keys in order (deterministic).
#include <cmath>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {
namespace {

template <class T>
__device__ inline T dec_exp(T x) {
  return exp(x);
}

template <class T>
__global__ void attention_decode_kernel(const T* q, const T* k, const T* v, const int32_t* q_pos, T* scratch,
                                        T* out, int64_t t, int64_t H, int64_t D, int64_t L, int64_t KH, T scale) {
  const int64_t row = blockIdx.x;  // (b * t + i) * H + h
  const int64_t h = row % H, bi = row / H, b = bi / t;
  const int64_t kh = h / (H / KH);
  const int64_t p = q_pos[bi];
  T* o = out + row * D;
  if (p < 0) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) o[d] = T(0);
    return;  // the whole block returns together
  }
  const T* qi = q + row * D;
  T* s = scratch + row * L;
  T m = T(-INFINITY);
  for (int64_t j = threadIdx.x; j <= p; j += blockDim.x) {
    const T* kj = k + ((b * L + j) * KH + kh) * D;
    T acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += qi[d] * kj[d];
    s[j] = acc * scale;
    m = max(m, s[j]);
  }
  m = cuda::block_max(m);
  T sum = 0;
  for (int64_t j = threadIdx.x; j <= p; j += blockDim.x) sum += (s[j] = dec_exp(s[j] - m));
  sum = cuda::block_sum(sum);  // synchronises: every s[j] is written before the reads below
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    T acc = 0;
    for (int64_t j = 0; j <= p; ++j) acc += s[j] * v[((b * L + j) * KH + kh) * D + d];
    o[d] = acc / sum;
  }
}

}  // namespace

void CudaBackend::attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                   double scale, const Tensor& out) {
  const int64_t B = q.size(0), t = q.size(1), H = q.size(2), D = q.size(3), L = k.size(1), KH = k.size(2);
  const int64_t rows = B * t * H;
  if (rows == 0) return;
  cuda::dispatch_float(q, [&]<class T>() {
    Tensor scratch = Tensor::empty({rows, L > 0 ? L : 1}, q.dtype(), Device::cuda);
    attention_decode_kernel<T><<<static_cast<unsigned>(rows), cuda::kBlock>>>(
        cuda::dptr<T>(q), cuda::dptr<T>(k), cuda::dptr<T>(v), cuda::dptr<int32_t>(q_pos), cuda::dptr<T>(scratch),
        cuda::dptr<T>(out), t, H, D, L, KH, T(scale));
    TS_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace tessera
