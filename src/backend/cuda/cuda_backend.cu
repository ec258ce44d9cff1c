// The base ops of the CUDA backend: GEMMs through cuBLAS (row-major via the column-major transpose trick),
// elementwise and row kernels, and causal grouped-query attention built from strided-batched GEMMs over
// materialised score matrices. Every kernel mirrors the arithmetic of the CPU backend (cpu_backend.cpp) in the
// tensor's own type T; reductions over a row use a block-wide tree (fixed order, hence deterministic).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {
namespace {

using cuda::dptr;
using cuda::grid_for;
using cuda::kBlock;

// ---------------------------------------------------------------------------------------------------------------
// Helpers

// Math in the type T (float overloads for float, so f32 results follow fp32 arithmetic like the CPU's std::exp).
template <class T>
__device__ __forceinline__ T dexp(T x) {
  if constexpr (std::is_same_v<T, float>) return expf(x);
  else return exp(x);
}
template <class T>
__device__ __forceinline__ T dlog(T x) {
  if constexpr (std::is_same_v<T, float>) return logf(x);
  else return log(x);
}
template <class T>
__device__ __forceinline__ T dsqrt(T x) {
  if constexpr (std::is_same_v<T, float>) return sqrtf(x);
  else return sqrt(x);
}
// std::max(a, b) semantics: (a < b) ? b : a.
template <class T>
__device__ __forceinline__ T dmax(T a, T b) {
  return (a < b) ? b : a;
}

// An index / int tensor usable by kernels: the tensor itself when on the GPU, else a device copy (ids, positions,
// targets and documents may live on the host; the ops layer accepts either). Undefined stays undefined.
Tensor on_device(const Tensor& t) {
  if (!t.defined() || t.device() == Device::cuda) return t;
  return t.to_device(Device::cuda);
}

// Row-major strided-batched GEMM: for i < batch, C_i (m x n, row stride ldc) = alpha op(A_i) op(B_i) + beta C_i,
// where A_i = A + i * sa is stored row-major with row stride lda ((m x k) or, transposed, (k x m)), likewise B_i.
// cuBLAS is column-major, so it computes C^T = op(B)^T op(A)^T: a row-major matrix read column-major is its
// transpose, hence the operands swap and keep their own transpose flags.
template <class T>
void gemm_rm(MatmulPrecision prec, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
             int64_t lda, int64_t sa, const T* b, int64_t ldb, int64_t sb, double beta, T* c, int64_t ldc, int64_t sc,
             int64_t batch) {
  if (m == 0 || n == 0 || batch == 0) return;
  TS_CHECK(k > 0, "gemm_rm: k must be positive");
  cublasHandle_t h = cuda::cublas();
  // True fp32 unless bf16 is asked for explicitly through the compute type: no TF32 through the math mode.
  TS_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  TS_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));  // alpha, beta live on the host
  cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  if constexpr (std::is_same_v<T, float>) {
    float al = static_cast<float>(alpha), be = static_cast<float>(beta);
    cublasComputeType_t ct = prec == MatmulPrecision::bf16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
    TS_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, op_b, op_a, static_cast<int>(n), static_cast<int>(m),
                                               static_cast<int>(k), &al, b, CUDA_R_32F, static_cast<int>(ldb),
                                               static_cast<long long>(sb), a, CUDA_R_32F, static_cast<int>(lda),
                                               static_cast<long long>(sa), &be, c, CUDA_R_32F, static_cast<int>(ldc),
                                               static_cast<long long>(sc), static_cast<int>(batch), ct,
                                               CUBLAS_GEMM_DEFAULT));
  } else {
    double al = alpha, be = beta;
    TS_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, op_b, op_a, static_cast<int>(n), static_cast<int>(m),
                                               static_cast<int>(k), &al, b, CUDA_R_64F, static_cast<int>(ldb),
                                               static_cast<long long>(sb), a, CUDA_R_64F, static_cast<int>(lda),
                                               static_cast<long long>(sa), &be, c, CUDA_R_64F, static_cast<int>(ldc),
                                               static_cast<long long>(sc), static_cast<int>(batch),
                                               CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise kernels

template <class T>
__global__ void fill_kernel(T* p, T value, int64_t n) {
  TS_CUDA_KERNEL_LOOP(i, n) p[i] = value;
}

template <class T>
__global__ void axpy_kernel(T alpha, const T* x, T* y, int64_t n) {
  TS_CUDA_KERNEL_LOOP(i, n) y[i] += alpha * x[i];
}

template <class T>
__global__ void scale_kernel(T* p, T alpha, int64_t n) {
  TS_CUDA_KERNEL_LOOP(i, n) p[i] *= alpha;
}

// out (B, A, C) = x (A, B, C) transposed in the first two dims; one thread per output element.
template <class T>
__global__ void transpose01_kernel(const T* x, T* out, int64_t A, int64_t B, int64_t C) {
  TS_CUDA_KERNEL_LOOP(idx, A * B * C) {
    int64_t c = idx % C, r = idx / C;  // r = b * A + a
    int64_t a = r % A, b = r / A;
    out[idx] = x[(a * B + b) * C + c];
  }
}

template <class T>
__global__ void embedding_forward_kernel(const int32_t* ids, const T* table, T* out, int64_t n, int64_t c) {
  TS_CUDA_KERNEL_LOOP(idx, n * c) {
    int64_t i = idx / c, j = idx % c;
    out[idx] = table[int64_t(ids[i]) * c + j];
  }
}

template <class T>
__global__ void embedding_backward_kernel(const int32_t* ids, const T* g, T* dw, int64_t n, int64_t c) {
  TS_CUDA_KERNEL_LOOP(idx, n * c) {
    int64_t i = idx / c, j = idx % c;
    atomicAdd(dw + int64_t(ids[i]) * c + j, g[idx]);
  }
}

template <class T>
__global__ void swiglu_forward_kernel(const T* g, const T* u, T* o, int64_t n, T lim, bool clamp) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    T gi = g[i], ui = u[i];
    if (clamp) {
      gi = (lim < gi) ? lim : gi;                              // std::min(gi, lim)
      ui = (ui < -lim) ? -lim : ((lim < ui) ? lim : ui);       // std::clamp(ui, -lim, lim)
    }
    o[i] = gi / (T(1) + dexp(-gi)) * ui;
  }
}

template <class T>
__global__ void swiglu_backward_kernel(const T* g, const T* u, const T* d, T* dg, T* du, int64_t n, T lim,
                                       bool clamp) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    T gi = g[i], ui = u[i], di = d[i];
    bool gate_clamped = clamp && gi > lim, up_clamped = clamp && (ui > lim || ui < -lim);
    if (clamp) {
      gi = (lim < gi) ? lim : gi;
      ui = (ui < -lim) ? -lim : ((lim < ui) ? lim : ui);
    }
    T s = T(1) / (T(1) + dexp(-gi));
    T silu = gi * s;
    T dgi = gate_clamped ? T(0) : di * ui * (s + silu * (T(1) - s));
    T dui = up_clamped ? T(0) : di * silu;
    dg[i] = dgi;
    du[i] = dui;
  }
}

template <class T>
__global__ void adamw_kernel(T* p, const T* g, T* ms, T* vs, int64_t n, T b1, T b2, T step, T decay, T sbc2, T e) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    T gi = g[i];
    T mi = b1 * ms[i] + (T(1) - b1) * gi;
    T vi = b2 * vs[i] + (T(1) - b2) * gi * gi;
    ms[i] = mi;
    vs[i] = vi;
    // torch.optim.AdamW's order: decay first, then p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
    p[i] = p[i] * decay - step * mi / (dsqrt(vi) / sbc2 + e);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// sum_squares: fixed grid of per-block partial sums (in double), then one block sums them. Deterministic.

constexpr int kSumBlocks = 1024;

template <class T>
__global__ void sum_squares_partial_kernel(const T* p, int64_t n, double* partial) {
  double s = 0;
  TS_CUDA_KERNEL_LOOP(i, n) {
    double v = double(p[i]);
    s += v * v;
  }
  s = cuda::block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sum_partials_kernel(const double* partial, int n, double* out) {
  double s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  s = cuda::block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

// ---------------------------------------------------------------------------------------------------------------
// Row kernels: one block per row.

template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const T* w, T eps, T* out, T* rstd, int64_t c) {
  int64_t row = blockIdx.x;
  const T* xi = x + row * c;
  T* oi = out + row * c;
  T ss = 0;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) ss += xi[j] * xi[j];
  ss = cuda::block_sum(ss);
  T r = T(1) / dsqrt(ss / T(c) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) oi[j] = w ? xi[j] * r * w[j] : xi[j] * r;
}

template <class T>
__global__ void rmsnorm_backward_kernel(const T* x, const T* w, const T* rstd, const T* g, T* dx, int64_t c) {
  int64_t row = blockIdx.x;
  const T* xi = x + row * c;
  const T* gi = g + row * c;
  T* di = dx + row * c;
  T r = rstd[row];
  T dot = 0;  // sum_j (g_j w_j) x_j
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) dot += gi[j] * (w ? w[j] : T(1)) * xi[j];
  dot = cuda::block_sum(dot);
  T k = r * r * r * dot / T(c);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) di[j] = r * gi[j] * (w ? w[j] : T(1)) - k * xi[j];
}

// dweight column sums, deterministically: partial[chunk][j] = sum over the chunk's rows of g * x * rstd, then
// dw[j] += sum over chunks in order.
template <class T>
__global__ void rmsnorm_dweight_partial_kernel(const T* x, const T* rstd, const T* g, T* partial, int64_t n,
                                               int64_t c, int64_t rows_per_chunk) {
  int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t chunk = blockIdx.y;
  if (j >= c) return;
  int64_t i0 = chunk * rows_per_chunk, i1 = min(n, i0 + rows_per_chunk);
  T s = 0;
  for (int64_t i = i0; i < i1; ++i) s += g[i * c + j] * x[i * c + j] * rstd[i];
  partial[chunk * c + j] = s;
}

template <class T>
__global__ void column_sum_add_kernel(const T* partial, int64_t chunks, int64_t c, T* dw) {
  TS_CUDA_KERNEL_LOOP(j, c) {
    T s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += partial[k * c + j];
    dw[j] += s;
  }
}

template <class T>
__global__ void softmax_forward_kernel(const T* x, T* out, int64_t c) {
  int64_t row = blockIdx.x;
  const T* xi = x + row * c;
  T* oi = out + row * c;
  T m = T(-INFINITY);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) m = dmax(m, xi[j]);
  m = cuda::block_max(m);
  T s = 0;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) s += dexp(xi[j] - m);
  s = cuda::block_sum(s);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) oi[j] = dexp(xi[j] - m) / s;
}

template <class T>
__global__ void softmax_backward_kernel(const T* y, const T* g, T* dx, int64_t c) {
  int64_t row = blockIdx.x;
  const T* yi = y + row * c;
  const T* gi = g + row * c;
  T* di = dx + row * c;
  T dot = 0;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) dot += yi[j] * gi[j];
  dot = cuda::block_sum(dot);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) di[j] = yi[j] * (gi[j] - dot);
}

// Cross-entropy: one block per row. dlogits may alias logits: x[t] is read by every thread before any write (the
// block reductions in between synchronise), and each element is read and then written by the same thread.
template <class T>
__global__ void cross_entropy_kernel(const T* x, const int32_t* targets, T* losses, T sc, T* d, int64_t V) {
  int64_t row = blockIdx.x;
  const T* xi = x + row * V;
  T* di = d ? d + row * V : nullptr;
  int64_t t = targets[row];
  if (t < 0) {  // uniform over the block
    if (threadIdx.x == 0) losses[row] = 0;
    if (di)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) di[j] = T(0);
    return;
  }
  bool valid = t < V;  // out-of-range targets (unchecked for device targets) give a NaN loss, not a bad access
  T xt = valid ? xi[t] : T(NAN);
  T m = T(-INFINITY);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = dmax(m, xi[j]);
  m = cuda::block_max(m);
  T s = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += dexp(xi[j] - m);
  s = cuda::block_sum(s);
  T lse = m + dlog(s);
  if (threadIdx.x == 0) losses[row] = lse - xt;
  if (di)
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      T v = dexp(xi[j] - lse) * sc;
      if (j == t) v -= sc;
      di[j] = v;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE: a (B*T, half) table of cos and +-sin (angle in fp32, cos/sin in double, like the CPU), then the rotation.

template <class T>
__global__ void rope_table_kernel(const int32_t* pos, const double* freq, int64_t bt, int64_t half, double sign,
                                  T* cs, T* sn) {
  TS_CUDA_KERNEL_LOOP(idx, bt * half) {
    int64_t r = idx / half, i = idx % half;
    float ang = float(pos[r]) * float(freq[i]);
    cs[idx] = T(cos(double(ang)));
    sn[idx] = T(sign * sin(double(ang)));
  }
}

template <class T>
__global__ void rope_apply_kernel(const T* x, T* o, const T* cs, const T* sn, int64_t bt, int64_t h, int64_t d,
                                  int64_t half, int64_t first, bool interleaved) {
  TS_CUDA_KERNEL_LOOP(idx, bt * h * half) {
    int64_t i = idx % half, rh = idx / half;  // rh = r * h + head
    int64_t r = rh / h;
    const T* xi = x + rh * d;
    T* oi = o + rh * d;
    int64_t i0 = interleaved ? first + 2 * i : first + i;
    int64_t i1 = interleaved ? first + 2 * i + 1 : first + i + half;
    T a = xi[i0], b = xi[i1];
    T c = cs[r * half + i], s = sn[r * half + i];
    oi[i0] = a * c - b * s;
    oi[i1] = b * c + a * s;
  }
}

// Copies the first `first` (non-rotary) dims of each head.
template <class T>
__global__ void rope_copy_kernel(const T* x, T* o, int64_t rows, int64_t d, int64_t first) {
  TS_CUDA_KERNEL_LOOP(idx, rows * first) {
    int64_t rh = idx / first, j = idx % first;
    o[rh * d + j] = x[rh * d + j];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention

constexpr int kScanThreads = 1024;

// start[b*T + t] = the first position of t's document (a document = a maximal run of equal doc values), as
// document_starts in cpu_common.h. One block per batch row: each thread takes a contiguous chunk, the chunks'
// last starts are max-scanned across the block, then each chunk is rewritten with its carry.
__global__ void document_starts_kernel(const int32_t* doc, int64_t T, int32_t* start) {
  __shared__ int32_t carry[kScanThreads];
  const int32_t* d = doc + int64_t(blockIdx.x) * T;
  int32_t* s = start + int64_t(blockIdx.x) * T;
  int64_t chunk = (T + kScanThreads - 1) / kScanThreads;
  int64_t lo = int64_t(threadIdx.x) * chunk, hi = min(T, lo + chunk);
  int32_t run = -1;
  for (int64_t t = lo; t < hi; ++t)
    if (t == 0 || d[t] != d[t - 1]) run = int32_t(t);
  carry[threadIdx.x] = run;
  __syncthreads();
  // Inclusive max-scan (Hillis-Steele) over the chunks.
  for (int off = 1; off < kScanThreads; off <<= 1) {
    int32_t v = threadIdx.x >= unsigned(off) ? carry[threadIdx.x - off] : -1;
    __syncthreads();
    if (v > carry[threadIdx.x]) carry[threadIdx.x] = v;
    __syncthreads();
  }
  run = threadIdx.x > 0 ? carry[threadIdx.x - 1] : -1;  // the last start before this chunk
  for (int64_t t = lo; t < hi; ++t) {
    if (t == 0 || d[t] != d[t - 1]) run = int32_t(t);
    s[t] = run;
  }
}

// Forward rows: S (KH, T, T) holds the scaled scores of heads h = kh * group + g of batch row b. Row (kh, i) becomes
// the probabilities P (exactly 0 outside [start(i), i]) and lse[b, h, i] = m + log(sum).
template <class T>
__global__ void attention_forward_rows_kernel(T* S, T* lse, const int32_t* starts, int64_t Tn, int64_t H,
                                              int64_t group, int64_t g, int64_t b) {
  int64_t row = blockIdx.x;  // kh * Tn + i
  int64_t kh = row / Tn, i = row % Tn, h = kh * group + g;
  int64_t st = starts ? int64_t(starts[b * Tn + i]) : 0;
  T* s = S + row * Tn;
  T m = T(-INFINITY);
  for (int64_t j = st + threadIdx.x; j <= i; j += blockDim.x) m = dmax(m, s[j]);
  m = cuda::block_max(m);
  T sum = 0;
  for (int64_t j = st + threadIdx.x; j <= i; j += blockDim.x) sum += dexp(s[j] - m);
  sum = cuda::block_sum(sum);  // synchronises: every read of s above is done before the writes below
  for (int64_t j = threadIdx.x; j < Tn; j += blockDim.x) s[j] = (j >= st && j <= i) ? dexp(s[j] - m) / sum : T(0);
  if (threadIdx.x == 0) lse[(b * H + h) * Tn + i] = m + dlog(sum);
}

// delta[row] = sum_d O[row, d] dO[row, d] over the rows (b, t, h) of (B, T, H, D); one warp per row.
template <class T>
__global__ void attention_delta_kernel(const T* o, const T* dout, T* delta, int64_t rows, int64_t D) {
  int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps return together
  T s = 0;
  for (int64_t d = lane; d < D; d += 32) s += o[row * D + d] * dout[row * D + d];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) delta[row] = s;
}

// Backward rows: P holds the scaled scores, dP holds dO V^T. P becomes exp(S - lse) (0 when masked) and dP becomes
// dS = P * (dP - delta) * scale.
template <class T>
__global__ void attention_backward_rows_kernel(T* P, T* dP, const T* lse, const T* delta, const int32_t* starts,
                                               int64_t Tn, int64_t H, int64_t group, int64_t g, int64_t b, T scale) {
  int64_t row = blockIdx.x;  // kh * Tn + i
  int64_t kh = row / Tn, i = row % Tn, h = kh * group + g;
  int64_t st = starts ? int64_t(starts[b * Tn + i]) : 0;
  T L = lse[(b * H + h) * Tn + i];
  T dl = delta[(b * Tn + i) * H + h];
  T* p = P + row * Tn;
  T* dp = dP + row * Tn;
  for (int64_t j = threadIdx.x; j < Tn; j += blockDim.x) {
    bool valid = j >= st && j <= i;
    T pj = valid ? dexp(p[j] - L) : T(0);
    p[j] = pj;
    dp[j] = valid ? pj * (dp[j] - dl) * scale : T(0);
  }
}

}  // namespace

// -----------------------------------------------------------------------------------------------------------------
// CudaBackend members

void CudaBackend::gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, double alpha,
                       double beta) {
  int64_t batch = c.ndim() == 3 ? c.size(0) : 1;
  int64_t m = c.size(-2), n = c.size(-1);
  int64_t k = trans_a ? a.size(-2) : a.size(-1);
  int64_t a_step = (a.ndim() == 3 && a.size(0) > 1) ? a.size(-2) * a.size(-1) : 0;
  int64_t b_step = (b.ndim() == 3 && b.size(0) > 1) ? b.size(-2) * b.size(-1) : 0;
  if (batch == 0 || m == 0 || n == 0) return;
  if (k == 0) {  // empty product: C = beta * C (C not read when beta = 0, as BLAS)
    if (beta == 0) fill(c, 0.0);
    else if (beta != 1) scale(c, beta);
    return;
  }
  MatmulPrecision prec = precision_;
  cuda::dispatch_float(c, [&]<class T>() {
    gemm_rm<T>(prec, trans_a, trans_b, m, n, k, alpha, dptr<T>(a), a.size(-1), a_step, dptr<T>(b), b.size(-1), b_step,
               beta, dptr<T>(c), n, m * n, batch);
  });
}

void CudaBackend::transpose01(const Tensor& x, const Tensor& out) {
  int64_t A = x.size(0), B = x.size(1), C = x.size(2);
  if (A * B * C == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    transpose01_kernel<T><<<grid_for(A * B * C), kBlock>>>(dptr<T>(x), dptr<T>(out), A, B, C);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::fill(const Tensor& x, double value) {
  int64_t n = x.numel();
  if (n == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    fill_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(x), static_cast<T>(value), n);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::axpy(double alpha, const Tensor& x, const Tensor& y) {
  int64_t n = x.numel();
  if (n == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    axpy_kernel<T><<<grid_for(n), kBlock>>>(static_cast<T>(alpha), dptr<T>(x), dptr<T>(y), n);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::scale(const Tensor& x, double alpha) {
  int64_t n = x.numel();
  if (n == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    scale_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(x), static_cast<T>(alpha), n);
    TS_CUDA_LAUNCH_CHECK();
  });
}

double CudaBackend::sum_squares(const Tensor& x) {
  int64_t n = x.numel();
  if (n == 0) return 0.0;
  int blocks = static_cast<int>(std::min<int64_t>(kSumBlocks, grid_for(n)));  // a function of n only
  Tensor partial = Tensor::empty({blocks + 1}, DType::f64, Device::cuda);     // partials, then the total
  double* p = dptr<double>(partial);
  cuda::dispatch_float(x, [&]<class T>() {
    sum_squares_partial_kernel<T><<<blocks, kBlock>>>(dptr<T>(x), n, p);
    TS_CUDA_LAUNCH_CHECK();
  });
  sum_partials_kernel<<<1, kBlock>>>(p, blocks, p + blocks);
  TS_CUDA_LAUNCH_CHECK();
  return cuda::read_scalar(p + blocks);
}

void CudaBackend::embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) {
  int64_t n = ids.numel(), c = table.size(1);
  if (n * c == 0) return;
  Tensor id = on_device(ids);
  cuda::dispatch_float(table, [&]<class T>() {
    embedding_forward_kernel<T><<<grid_for(n * c), kBlock>>>(dptr<int32_t>(id), dptr<T>(table), dptr<T>(out), n, c);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  int64_t n = ids.numel(), c = dtable.size(1);
  if (n * c == 0) return;
  Tensor id = on_device(ids);
  cuda::dispatch_float(dtable, [&]<class T>() {
    embedding_backward_kernel<T><<<grid_for(n * c), kBlock>>>(dptr<int32_t>(id), dptr<T>(dout), dptr<T>(dtable), n,
                                                              c);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& out,
                                  const Tensor& rstd) {
  int64_t n = x.size(0), c = x.size(1);
  if (n == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    rmsnorm_forward_kernel<T><<<static_cast<unsigned>(n), kBlock>>>(dptr<T>(x), dptr<T>(weight), static_cast<T>(eps),
                                                                    dptr<T>(out), dptr<T>(rstd), c);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dout,
                                   const Tensor& dx, const Tensor& dweight) {
  int64_t n = x.size(0), c = x.size(1);
  if (n == 0 || c == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    rmsnorm_backward_kernel<T><<<static_cast<unsigned>(n), kBlock>>>(dptr<T>(x), dptr<T>(weight), dptr<T>(rstd),
                                                                     dptr<T>(dout), dptr<T>(dx), c);
    TS_CUDA_LAUNCH_CHECK();
    if (dweight.defined()) {
      // At most 1024 row chunks of at least 64 rows; the chunking depends only on n, so the sum is deterministic.
      int64_t rows_per_chunk = std::max<int64_t>(64, (n + 1023) / 1024);
      int64_t chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
      Tensor partial = Tensor::empty({chunks, c}, x.dtype(), Device::cuda);
      dim3 grid(static_cast<unsigned>((c + kBlock - 1) / kBlock), static_cast<unsigned>(chunks));
      rmsnorm_dweight_partial_kernel<T><<<grid, kBlock>>>(dptr<T>(x), dptr<T>(rstd), dptr<T>(dout), dptr<T>(partial),
                                                          n, c, rows_per_chunk);
      TS_CUDA_LAUNCH_CHECK();
      column_sum_add_kernel<T><<<grid_for(c), kBlock>>>(dptr<T>(partial), chunks, c, dptr<T>(dweight));
      TS_CUDA_LAUNCH_CHECK();
    }
  });
}

void CudaBackend::rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool interleaved,
                       bool inverse, const Tensor& out) {
  int64_t bt = x.size(0) * x.size(1), h = x.size(2), d = x.size(3), half = inv_freq.numel();
  int64_t first = d - 2 * half;  // rotary dims are the last 2 * half of each head
  if (bt * h * d == 0) return;
  Tensor pos = on_device(positions);
  Tensor freq = on_device(inv_freq);  // f64; the ops layer passes it from the host
  double sign = inverse ? -1.0 : 1.0;
  cuda::dispatch_float(x, [&]<class T>() {
    if (first > 0 && out.raw() != x.raw()) {
      rope_copy_kernel<T><<<grid_for(bt * h * first), kBlock>>>(dptr<T>(x), dptr<T>(out), bt * h, d, first);
      TS_CUDA_LAUNCH_CHECK();
    }
    if (half == 0) return;
    Tensor cs = Tensor::empty({bt, half}, x.dtype(), Device::cuda);
    Tensor sn = Tensor::empty({bt, half}, x.dtype(), Device::cuda);
    rope_table_kernel<T><<<grid_for(bt * half), kBlock>>>(dptr<int32_t>(pos), dptr<double>(freq), bt, half, sign,
                                                          dptr<T>(cs), dptr<T>(sn));
    TS_CUDA_LAUNCH_CHECK();
    rope_apply_kernel<T><<<grid_for(bt * h * half), kBlock>>>(dptr<T>(x), dptr<T>(out), dptr<T>(cs), dptr<T>(sn), bt,
                                                              h, d, half, first, interleaved);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::swiglu_forward(const Tensor& gate, const Tensor& up, double limit, const Tensor& out) {
  int64_t n = gate.numel();
  if (n == 0) return;
  cuda::dispatch_float(gate, [&]<class T>() {
    swiglu_forward_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(gate), dptr<T>(up), dptr<T>(out), n,
                                                      static_cast<T>(limit), limit > 0);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::swiglu_backward(const Tensor& gate, const Tensor& up, double limit, const Tensor& dout,
                                  const Tensor& dgate, const Tensor& dup) {
  int64_t n = gate.numel();
  if (n == 0) return;
  cuda::dispatch_float(gate, [&]<class T>() {
    swiglu_backward_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(gate), dptr<T>(up), dptr<T>(dout), dptr<T>(dgate),
                                                       dptr<T>(dup), n, static_cast<T>(limit), limit > 0);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::softmax_forward(const Tensor& x, const Tensor& out) {
  int64_t n = x.size(0), c = x.size(1);
  if (n == 0 || c == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    softmax_forward_kernel<T><<<static_cast<unsigned>(n), kBlock>>>(dptr<T>(x), dptr<T>(out), c);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::softmax_backward(const Tensor& y, const Tensor& dy, const Tensor& dx) {
  int64_t n = y.size(0), c = y.size(1);
  if (n == 0 || c == 0) return;
  cuda::dispatch_float(y, [&]<class T>() {
    softmax_backward_kernel<T><<<static_cast<unsigned>(n), kBlock>>>(dptr<T>(y), dptr<T>(dy), dptr<T>(dx), c);
    TS_CUDA_LAUNCH_CHECK();
  });
}

namespace {

// The document starts (B, T) i32 on the device, or an undefined tensor without documents.
Tensor attention_starts(const Tensor& doc, int64_t B, int64_t Tn) {
  if (!doc.defined()) return Tensor();
  Tensor d = on_device(doc);
  Tensor starts = Tensor::empty({B, Tn}, DType::i32, Device::cuda);
  document_starts_kernel<<<static_cast<unsigned>(B), kScanThreads>>>(dptr<int32_t>(d), Tn, dptr<int32_t>(starts));
  TS_CUDA_LAUNCH_CHECK();
  return starts;
}

}  // namespace

// For each batch row b and each position g within a query group, the KH heads h = kh * group + g form one
// strided batch: Q_h starts at q + (b*T*H + h)*D (batch stride group*D, row stride H*D), K/V_kh at
// k + (b*T*KH + kh)*D (batch stride D, row stride KH*D). Scores (KH, T, T) are materialised per (b, g).
void CudaBackend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc,
                                    double scale, const Tensor& out, const Tensor& lse) {
  int64_t B = q.size(0), Tn = q.size(1), H = q.size(2), D = q.size(3), KH = k.size(2);
  if (B == 0 || Tn == 0 || H == 0) return;
  int64_t group = H / KH;
  Tensor starts = attention_starts(doc, B, Tn);
  const int32_t* st = dptr<int32_t>(starts);
  MatmulPrecision prec = precision_;
  cuda::dispatch_float(q, [&]<class T>() {
    Tensor S = Tensor::empty({KH, Tn, Tn}, q.dtype(), Device::cuda);
    T* s = dptr<T>(S);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < group; ++g) {
        const T* qb = dptr<T>(q) + b * Tn * H * D + g * D;
        const T* kb = dptr<T>(k) + b * Tn * KH * D;
        const T* vb = dptr<T>(v) + b * Tn * KH * D;
        T* ob = dptr<T>(out) + b * Tn * H * D + g * D;
        // S = scale * Q K^T (all zero without features)
        if (D > 0)
          gemm_rm<T>(prec, false, true, Tn, Tn, D, scale, qb, H * D, group * D, kb, KH * D, D, 0.0, s, Tn, Tn * Tn,
                     KH);
        else
          fill(S, 0.0);
        attention_forward_rows_kernel<T><<<static_cast<unsigned>(KH * Tn), kBlock>>>(s, dptr<T>(lse), st, Tn, H,
                                                                                     group, g, b);
        TS_CUDA_LAUNCH_CHECK();
        // O = P V
        gemm_rm<T>(prec, false, false, Tn, D, Tn, 1.0, s, Tn, Tn * Tn, vb, KH * D, D, 0.0, ob, H * D, group * D, KH);
      }
  });
}

void CudaBackend::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc,
                                     double scale, const Tensor& out, const Tensor& lse, const Tensor& dout,
                                     const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  int64_t B = q.size(0), Tn = q.size(1), H = q.size(2), D = q.size(3), KH = k.size(2);
  if (B == 0 || Tn == 0 || H == 0 || D == 0) return;
  int64_t group = H / KH;
  Tensor starts = attention_starts(doc, B, Tn);
  const int32_t* st = dptr<int32_t>(starts);
  MatmulPrecision prec = precision_;
  cuda::dispatch_float(q, [&]<class T>() {
    // delta (B, T, H) = rowwise O . dO
    int64_t rows = B * Tn * H;
    Tensor delta = Tensor::empty({B, Tn, H}, q.dtype(), Device::cuda);
    attention_delta_kernel<T><<<static_cast<unsigned>((rows * 32 + kBlock - 1) / kBlock), kBlock>>>(
        dptr<T>(out), dptr<T>(dout), dptr<T>(delta), rows, D);
    TS_CUDA_LAUNCH_CHECK();
    Tensor Pt = Tensor::empty({KH, Tn, Tn}, q.dtype(), Device::cuda);
    Tensor dPt = Tensor::empty({KH, Tn, Tn}, q.dtype(), Device::cuda);
    T* P = dptr<T>(Pt);
    T* dP = dptr<T>(dPt);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < group; ++g) {
        const T* qb = dptr<T>(q) + b * Tn * H * D + g * D;
        const T* dob = dptr<T>(dout) + b * Tn * H * D + g * D;
        T* dqb = dptr<T>(dq) + b * Tn * H * D + g * D;
        const T* kb = dptr<T>(k) + b * Tn * KH * D;
        const T* vb = dptr<T>(v) + b * Tn * KH * D;
        T* dkb = dptr<T>(dk) + b * Tn * KH * D;
        T* dvb = dptr<T>(dv) + b * Tn * KH * D;
        double acc = g == 0 ? 0.0 : 1.0;  // dk, dv: assigned by the group's first head, accumulated after
        // S = scale * Q K^T (as in the forward), dP = dO V^T
        gemm_rm<T>(prec, false, true, Tn, Tn, D, scale, qb, H * D, group * D, kb, KH * D, D, 0.0, P, Tn, Tn * Tn, KH);
        gemm_rm<T>(prec, false, true, Tn, Tn, D, 1.0, dob, H * D, group * D, vb, KH * D, D, 0.0, dP, Tn, Tn * Tn, KH);
        attention_backward_rows_kernel<T><<<static_cast<unsigned>(KH * Tn), kBlock>>>(
            P, dP, dptr<T>(lse), dptr<T>(delta), st, Tn, H, group, g, b, static_cast<T>(scale));
        TS_CUDA_LAUNCH_CHECK();
        // dV (+)= P^T dO; dQ = dS K; dK (+)= dS^T Q
        gemm_rm<T>(prec, true, false, Tn, D, Tn, 1.0, P, Tn, Tn * Tn, dob, H * D, group * D, acc, dvb, KH * D, D, KH);
        gemm_rm<T>(prec, false, false, Tn, D, Tn, 1.0, dP, Tn, Tn * Tn, kb, KH * D, D, 0.0, dqb, H * D, group * D, KH);
        gemm_rm<T>(prec, true, false, Tn, D, Tn, 1.0, dP, Tn, Tn * Tn, qb, H * D, group * D, acc, dkb, KH * D, D, KH);
      }
  });
}

void CudaBackend::cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                                const Tensor& dlogits) {
  int64_t n = logits.size(0), V = logits.size(1);
  if (n == 0) return;
  Tensor tg = on_device(targets);
  cuda::dispatch_float(logits, [&]<class T>() {
    cross_entropy_kernel<T><<<static_cast<unsigned>(n), 512>>>(dptr<T>(logits), dptr<int32_t>(tg), dptr<T>(losses),
                                                               static_cast<T>(loss_scale), dptr<T>(dlogits), V);
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaBackend::adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr,
                               double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                               double bias_correction2) {
  int64_t n = param.numel();
  if (n == 0) return;
  cuda::dispatch_float(param, [&]<class T>() {
    T b1 = T(beta1), b2 = T(beta2), step = T(lr / bias_correction1), decay = T(1 - lr * weight_decay);
    T sbc2 = T(std::sqrt(bias_correction2)), e = T(eps);
    adamw_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(param), dptr<T>(grad), dptr<T>(m), dptr<T>(v), n, b1, b2, step,
                                             decay, sbc2, e);
    TS_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace tessera
