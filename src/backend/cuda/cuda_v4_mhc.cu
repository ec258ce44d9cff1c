// CUDA kernels for mHC (gates with Sinkhorn, collapse, expand), the Walsh-Hadamard transform and the FP4/FP8
// quantisation simulation (contracts: src/ops/v4_ops.h; reference: src/backend/cpu/cpu_v4_mhc.cpp). As on the CPU,
// everything is computed in double inside, for f32 and f64 alike. Sums over tokens (dscale, dbase) go through
// per-token partials in a scratch buffer and a fixed-order block reduction, so they are deterministic.
#include <cmath>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {
namespace {

using cuda::kBlock;
using cuda::grid_for;

// ---------------------------------------------------------------- mHC gates

__device__ inline double sigmoid(double z) { return 1.0 / (1.0 + ::exp(-z)); }

// Element t of line l of an n x n row-major matrix: line l is column l (col) or row l.
__device__ inline int line_at(bool col, int l, int t, int n) { return col ? t * n + l : l * n + t; }

// Row softmax of R (n x n) into S.
__device__ inline void row_softmax(const double* R, double* S, int n) {
  for (int j = 0; j < n; ++j) {
    const double* r = R + j * n;
    double mx = r[0];
    for (int k = 1; k < n; ++k) mx = r[k] > mx ? r[k] : mx;
    double sum = 0;
    for (int k = 0; k < n; ++k) sum += (S[j * n + k] = ::exp(r[k] - mx));
    for (int k = 0; k < n; ++k) S[j * n + k] /= sum;
  }
}

// The 2 iters - 1 Sinkhorn normalisations of C in place (even steps divide by column sums + eps, odd by row
// sums + eps). With hist, the input of step s, element q, of token i is stored at hist[(s * n*n + q) * N + i].
__device__ inline void sinkhorn_steps(double* C, int n, int steps, double eps, double* hist, int64_t N, int64_t i) {
  const int nn = n * n;
  for (int s = 0; s < steps; ++s) {
    if (hist)
      for (int q = 0; q < nn; ++q) hist[(int64_t(s) * nn + q) * N + i] = C[q];
    bool col = s % 2 == 0;
    for (int l = 0; l < n; ++l) {
      double sum = 0;
      for (int t = 0; t < n; ++t) sum += C[line_at(col, l, t, n)];
      double d = sum + eps;
      for (int t = 0; t < n; ++t) C[line_at(col, l, t, n)] /= d;
    }
  }
}

// The block layout (M = 2n + n^2, scale (3)): one thread per token. NM bounds n (local arrays).
template <class T, int NM>
__global__ void gates_block_forward_kernel(const T* mix, const T* sc, const T* b, int64_t N, int n, int steps,
                                           double eps, T* pre, T* post, T* comb) {
  const int M = 2 * n + n * n, nn = n * n;
  const double s0 = sc[0], s1 = sc[1], s2 = sc[2];
  double S[NM * NM], C[NM * NM];
  TS_CUDA_KERNEL_LOOP(i, N) {
    const T* m = mix + i * M;
    for (int j = 0; j < n; ++j) pre[i * n + j] = T(sigmoid(s0 * double(m[j]) + double(b[j])) + eps);
    for (int j = 0; j < n; ++j) post[i * n + j] = T(2 * sigmoid(s1 * double(m[n + j]) + double(b[n + j])));
    for (int q = 0; q < nn; ++q) C[q] = s2 * double(m[2 * n + q]) + double(b[2 * n + q]);  // R
    row_softmax(C, S, n);
    for (int q = 0; q < nn; ++q) C[q] = S[q] + eps;
    sinkhorn_steps(C, n, steps, eps, nullptr, N, i);
    for (int q = 0; q < nn; ++q) comb[i * nn + q] = T(C[q]);
  }
}

// The head layout (M = n, scale (1)): pre only, elementwise over (N, n).
template <class T>
__global__ void gates_head_forward_kernel(const T* mix, const T* sc, const T* b, int64_t N, int64_t n, double eps,
                                          T* pre) {
  const double s0 = sc[0];
  TS_CUDA_KERNEL_LOOP(e, N * n) pre[e] = T(sigmoid(s0 * double(mix[e]) + double(b[e % n])) + eps);
}

// Backward of the block layout, one thread per token: writes dmix (N, M) and, with dz, the logit gradients
// dz[c * N + i] (M, N) for the parameter reductions. hist: scratch for the Sinkhorn intermediates (steps, n*n, N),
// needed only with gcomb.
template <class T, int NM>
__global__ void gates_block_backward_kernel(const T* mix, const T* sc, const T* b, int64_t N, int n, int steps,
                                            double eps, const T* gpre, const T* gpost, const T* gcomb, T* dmix,
                                            double* dz, double* hist) {
  const int M = 2 * n + n * n, nn = n * n;
  const double s0 = sc[0], s1 = sc[1], s2 = sc[2];
  double S[NM * NM], C[NM * NM], g[NM * NM];
  TS_CUDA_KERNEL_LOOP(i, N) {
    const T* m = mix + i * M;
    T* dm = dmix + i * M;
    for (int j = 0; j < n; ++j) {
      double d = 0;
      if (gpre) {
        double s = sigmoid(s0 * double(m[j]) + double(b[j]));
        d = double(gpre[i * n + j]) * s * (1 - s);
      }
      if (dz) dz[int64_t(j) * N + i] = d;
      dm[j] = T(s0 * d);
    }
    for (int j = 0; j < n; ++j) {
      double d = 0;
      if (gpost) {
        double s = sigmoid(s1 * double(m[n + j]) + double(b[n + j]));
        d = 2 * double(gpost[i * n + j]) * s * (1 - s);
      }
      if (dz) dz[int64_t(n + j) * N + i] = d;
      dm[n + j] = T(s1 * d);
    }
    if (gcomb) {
      // Forward again, keeping every step's input in hist.
      for (int q = 0; q < nn; ++q) C[q] = s2 * double(m[2 * n + q]) + double(b[2 * n + q]);
      row_softmax(C, S, n);
      for (int q = 0; q < nn; ++q) C[q] = S[q] + eps;
      sinkhorn_steps(C, n, steps, eps, hist, N, i);
      // Backward through each step: for Y = X / d with d = sum over the line of X + eps,
      // dX = (dY - sum_line(dY X) / d) / d. d is recomputed from X exactly as the forward computed it.
      for (int q = 0; q < nn; ++q) g[q] = double(gcomb[i * nn + q]);
      for (int s = steps - 1; s >= 0; --s) {
        const double* X = hist + int64_t(s) * nn * N + i;  // X[q * N]
        bool col = s % 2 == 0;
        for (int l = 0; l < n; ++l) {
          double sum = 0, dot = 0;
          for (int t = 0; t < n; ++t) sum += X[int64_t(line_at(col, l, t, n)) * N];
          double d = sum + eps;
          for (int t = 0; t < n; ++t) {
            int q = line_at(col, l, t, n);
            dot += g[q] * X[int64_t(q) * N];
          }
          for (int t = 0; t < n; ++t) {
            int q = line_at(col, l, t, n);
            g[q] = (g[q] - dot / d) / d;
          }
        }
      }
      // g is d(S + eps) = dS; through the row softmax, into C as dR.
      for (int j = 0; j < n; ++j) {
        double dot = 0;
        for (int k = 0; k < n; ++k) dot += g[j * n + k] * S[j * n + k];
        for (int k = 0; k < n; ++k) C[j * n + k] = S[j * n + k] * (g[j * n + k] - dot);
      }
    } else {
      for (int q = 0; q < nn; ++q) C[q] = 0;
    }
    for (int q = 0; q < nn; ++q) {
      if (dz) dz[int64_t(2 * n + q) * N + i] = C[q];
      dm[2 * n + q] = T(s2 * C[q]);
    }
  }
}

// Backward of the head layout, elementwise over (N, n) (M = n).
template <class T>
__global__ void gates_head_backward_kernel(const T* mix, const T* sc, const T* b, int64_t N, int64_t n,
                                           const T* gpre, T* dmix, double* dz) {
  const double s0 = sc[0];
  TS_CUDA_KERNEL_LOOP(e, N * n) {
    int64_t i = e / n, j = e % n;
    double d = 0;
    if (gpre) {
      double s = sigmoid(s0 * double(mix[e]) + double(b[j]));
      d = double(gpre[e]) * s * (1 - s);
    }
    if (dz) dz[j * N + i] = d;
    dmix[e] = T(s0 * d);
  }
}

// One block per column c: sums[c] = sum_i dz[c, i], sums[M + c] = sum_i dz[c, i] mix[i, c] (fixed order).
template <class T>
__global__ void gates_column_sums_kernel(const double* dz, const T* mix, int64_t N, int64_t M, double* sums) {
  for (int64_t c = blockIdx.x; c < M; c += gridDim.x) {
    double a = 0, am = 0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      double v = dz[c * N + i];
      a += v;
      am += v * double(mix[i * M + c]);
    }
    a = cuda::block_sum(a);
    am = cuda::block_sum(am);
    if (threadIdx.x == 0) {
      sums[c] = a;
      sums[M + c] = am;
    }
  }
}

// One thread: dbase += sums over tokens; dscale[k] += the dz * mix sums of scale k's columns, in column order.
template <class T>
__global__ void gates_param_accumulate_kernel(const double* sums, int64_t M, int64_t n, int64_t nscale, T* db,
                                              T* ds) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  if (db)
    for (int64_t c = 0; c < M; ++c) db[c] += T(sums[c]);
  if (ds) {
    double acc[3] = {0, 0, 0};
    for (int64_t c = 0; c < M; ++c) acc[c < n ? 0 : c < 2 * n ? 1 : 2] += sums[M + c];
    for (int64_t k = 0; k < nscale; ++k) ds[k] += T(acc[k]);
  }
}

struct GateLayout {
  int64_t N, M, n;
  bool block;
};
GateLayout gate_layout(const Tensor& mix, const Tensor& scale) {
  int64_t N = mix.size(0), M = mix.size(1);
  if (scale.numel() == 1) return {N, M, M, false};
  return {N, M, std::llround(std::sqrt(double(M + 1))) - 1, true};
}

// Calls f.template operator()<NM>() with the smallest supported bound NM >= n.
template <class F>
void dispatch_gate_n(int64_t n, F&& f) {
  if (n <= 4) f.template operator()<4>();
  else if (n <= 8) f.template operator()<8>();
  else TS_FAIL("CUDA hc_gates: n = ", n, " streams is not supported (at most 8)");
}

// ---------------------------------------------------------------- collapse / expand

// y (N, d) = sum_j w[:, j] x[:, j, :]: one thread per (i, c).
template <class T>
__global__ void collapse_forward_kernel(const T* x, const T* w, int64_t N, int64_t n, int64_t d, T* y) {
  TS_CUDA_KERNEL_LOOP(e, N * d) {
    int64_t i = e / d, c = e % d;
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += double(w[i * n + j]) * double(x[(i * n + j) * d + c]);
    y[e] = T(acc);
  }
}

// dx[i, j, c] = w[i, j] dy[i, c].
template <class T>
__global__ void collapse_dx_kernel(const T* w, const T* dy, int64_t N, int64_t n, int64_t d, T* dx) {
  TS_CUDA_KERNEL_LOOP(e, N * n * d) {
    int64_t r = e / d, c = e % d;
    dx[e] = T(double(w[r]) * double(dy[(r / n) * d + c]));
  }
}

// out (N, n, d): out[i, k, c] = post[i, k] f[i, c] + sum_j comb[i, j, k] x[i, j, c].
template <class T>
__global__ void expand_forward_kernel(const T* x, const T* f, const T* post, const T* comb, int64_t N, int64_t n,
                                      int64_t d, T* out) {
  TS_CUDA_KERNEL_LOOP(e, N * n * d) {
    int64_t r = e / d, c = e % d, i = r / n, k = r % n;
    double acc = double(post[r]) * double(f[i * d + c]);
    for (int64_t j = 0; j < n; ++j) acc += double(comb[(i * n + j) * n + k]) * double(x[(i * n + j) * d + c]);
    out[e] = T(acc);
  }
}

// dx[i, j, c] = sum_k comb[i, j, k] dout[i, k, c].
template <class T>
__global__ void expand_dx_kernel(const T* comb, const T* dout, int64_t N, int64_t n, int64_t d, T* dx) {
  TS_CUDA_KERNEL_LOOP(e, N * n * d) {
    int64_t r = e / d, c = e % d, i = r / n;
    double acc = 0;
    for (int64_t k = 0; k < n; ++k) acc += double(comb[r * n + k]) * double(dout[(i * n + k) * d + c]);
    dx[e] = T(acc);
  }
}

// df[i, c] = sum_k post[i, k] dout[i, k, c].
template <class T>
__global__ void expand_df_kernel(const T* post, const T* dout, int64_t N, int64_t n, int64_t d, T* df) {
  TS_CUDA_KERNEL_LOOP(e, N * d) {
    int64_t i = e / d, c = e % d;
    double acc = 0;
    for (int64_t k = 0; k < n; ++k) acc += double(post[i * n + k]) * double(dout[(i * n + k) * d + c]);
    df[e] = T(acc);
  }
}

// Dot products over the channel dim d, one block per output row r (block-wide reduction):
//   kCollapseDw: r = i*n + j,          out[r] = a[i] . b[i, j]   (a = dy (N, d), b = x (N, n, d))
//   kExpandDpost: r = i*n + k,         out[r] = a[i, k] . b[i]   (a = dout (N, n, d), b = f (N, d))
//   kExpandDcomb: r = (i*n + j)*n + k, out[r] = a[i, k] . b[i, j] (a = dout, b = x)
enum DotKind { kCollapseDw = 0, kExpandDpost = 1, kExpandDcomb = 2 };

template <class T>
__global__ void row_dots_kernel(const T* a, const T* b, int64_t rows, int64_t n, int64_t d, int kind, T* out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform per block: block_sum's barriers are safe
    int64_t ao, bo;
    if (kind == kCollapseDw) {
      ao = (r / n) * d;
      bo = r * d;
    } else if (kind == kExpandDpost) {
      ao = r * d;
      bo = (r / n) * d;
    } else {
      int64_t i = r / (n * n), j = (r / n) % n, k = r % n;
      ao = (i * n + k) * d;
      bo = (i * n + j) * d;
    }
    double acc = 0;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) acc += double(a[ao + c]) * double(b[bo + c]);
    acc = cuda::block_sum(acc);
    if (threadIdx.x == 0) out[r] = T(acc);
  }
}

template <class T>
void launch_row_dots(const T* a, const T* b, int64_t rows, int64_t n, int64_t d, DotKind kind, T* out) {
  if (rows == 0) return;
  row_dots_kernel<T><<<grid_for(rows, 1), kBlock>>>(a, b, rows, n, d, int(kind), out);
  TS_CUDA_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- Hadamard

// One block per row (rows strided by gridDim): the row is read whole into v (shared memory, or this block's slice
// of a global scratch when it does not fit) before any write, so out may alias x. Butterflies (a, b) -> (a + b,
// a - b) as on the CPU (Sylvester ordering); the same additions in the same order, so the results are identical.
template <class T>
__global__ void hadamard_kernel(const T* x, T* out, int64_t rows, int64_t D, double norm, double* gscratch) {
  extern __shared__ double hadamard_smem[];
  double* v = gscratch ? gscratch + int64_t(blockIdx.x) * D : hadamard_smem;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) v[c] = double(x[r * D + c]);
    __syncthreads();
    for (int64_t h = 1; h < D; h *= 2) {
      for (int64_t p = threadIdx.x; p < D / 2; p += blockDim.x) {
        int64_t c = (p / h) * 2 * h + p % h;  // the p-th pair (c, c + h) of this stage
        double a = v[c], bb = v[c + h];
        v[c] = a + bb;
        v[c + h] = a - bb;
      }
      __syncthreads();
    }
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) out[r * D + c] = T(v[c] * norm);
    __syncthreads();  // v is reused by the next row
  }
}

// ---------------------------------------------------------------- FP4 / FP8 simulation (bit-for-bit as the CPU)

__device__ inline bool finite_value(double v) { return ::fabs(v) <= 1.7976931348623157e308; }  // false: inf, NaN

// 2^ceil(log2(amax / qmax)) by exact comparisons; 1 for an all-zero block; NaN for a non-finite one.
__device__ inline double pow2_scale(double amax, bool finite, double qmax) {
  if (!finite) return __longlong_as_double(0x7ff8000000000000LL);  // quiet NaN
  if (amax == 0) return 1.0;
  int e;
  ::frexp(amax / qmax, &e);
  double s = ::ldexp(1.0, e);
  while (qmax * s * 0.5 >= amax) s *= 0.5;
  while (qmax * s < amax) s *= 2.0;
  return s;
}

// Nearest e2m1 magnitude; ties to the even code (<= for the lower neighbour with an even code, else <).
__device__ inline double round_e2m1(double v) {
  double a = ::fabs(v), q;
  if (a <= 0.25) q = 0;
  else if (a < 0.75) q = 0.5;
  else if (a <= 1.25) q = 1;
  else if (a < 1.75) q = 1.5;
  else if (a <= 2.5) q = 2;
  else if (a < 3.5) q = 3;
  else if (a <= 5) q = 4;
  else q = 6;
  return ::copysign(q, v);
}

// Round to nearest, ties to even, independent of the rounding mode.
__device__ inline double round_half_even(double t) {
  double r = ::floor(t), frac = t - r;
  if (frac > 0.5 || (frac == 0.5 && ::fmod(r, 2.0) != 0)) r += 1;
  return r;
}

// Nearest e4m3fn value (subnormals below 2^-6 keep the step 2^-9).
__device__ inline double round_e4m3(double v) {
  double a = ::fabs(v);
  if (a == 0) return v;
  int e;
  ::frexp(a, &e);
  int ex = e - 1 > -6 ? e - 1 : -6;
  double step = ::ldexp(1.0, ex - 3);
  return ::copysign(round_half_even(a / step) * step, v);
}

// One warp per quantisation block: row r = w / nb, elements [b0, b1) with b0 = (w % nb) * block, b1 =
// min(qd, b0 + block). Each element is read and written by the same lane, so out may alias x.
template <class T, bool kFp8>
__global__ void fake_quant_kernel(const T* x, T* out, int64_t rows, int64_t D, int64_t qd, int64_t block,
                                  int64_t nb) {
  constexpr double qmax = kFp8 ? 448.0 : 6.0;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = warp; w < rows * nb; w += nwarps) {  // uniform across the warp
    const int64_t r = w / nb, b0 = (w % nb) * block, b1 = b0 + block < qd ? b0 + block : qd;
    const T* xr = x + r * D;
    T* orow = out + r * D;
    double amax = 0;
    bool finite = true;
    for (int64_t i = b0 + lane; i < b1; i += 32) {
      double v = double(xr[i]);
      finite = finite && finite_value(v);
      amax = ::fmax(amax, ::fabs(v));
    }
    for (int o = 16; o > 0; o >>= 1) amax = ::fmax(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    finite = __all_sync(0xffffffffu, finite);
    const double s = pow2_scale(amax, finite, qmax);
    for (int64_t i = b0 + lane; i < b1; i += 32) {
      double v = double(xr[i]) / s;
      orow[i] = T((kFp8 ? round_e4m3(v) : round_e2m1(v)) * s);
    }
  }
}

// out[r, c] = x[r, c] for c in [qd, D).
template <class T>
__global__ void copy_tail_kernel(const T* x, T* out, int64_t rows, int64_t D, int64_t qd) {
  const int64_t w = D - qd;
  TS_CUDA_KERNEL_LOOP(e, rows * w) {
    int64_t idx = (e / w) * D + qd + e % w;
    out[idx] = x[idx];
  }
}

template <class T, bool kFp8>
void launch_fake_quant(const Tensor& x, int64_t block, int64_t qd, const Tensor& out) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  const T* xs = cuda::dptr<T>(x);
  T* os = cuda::dptr<T>(out);
  if (rows == 0) return;
  if (qd > 0) {
    const int64_t nb = (qd + block - 1) / block;
    constexpr int kWarps = kBlock / 32;
    fake_quant_kernel<T, kFp8><<<grid_for(rows * nb, kWarps), kBlock>>>(xs, os, rows, D, qd, block, nb);
    TS_CUDA_LAUNCH_CHECK();
  }
  if (qd < D && static_cast<const void*>(xs) != static_cast<const void*>(os)) {
    copy_tail_kernel<T><<<grid_for(rows * (D - qd)), kBlock>>>(xs, os, rows, D, qd);
    TS_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

void CudaV4Kernels::hc_gates_forward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters,
                                     double eps, const Tensor& pre, const Tensor& post, const Tensor& comb) {
  GateLayout g = gate_layout(mix, scale);
  if (g.N == 0) return;
  cuda::dispatch_float(mix, [&]<class T>() {
    const T *mx = cuda::dptr<T>(mix), *sc = cuda::dptr<T>(scale), *b = cuda::dptr<T>(base);
    if (!g.block) {
      gates_head_forward_kernel<T><<<grid_for(g.N * g.n), kBlock>>>(mx, sc, b, g.N, g.n, eps, cuda::dptr<T>(pre));
      TS_CUDA_LAUNCH_CHECK();
      return;
    }
    const int steps = int(2 * iters - 1);
    dispatch_gate_n(g.n, [&]<int NM>() {
      gates_block_forward_kernel<T, NM><<<grid_for(g.N), kBlock>>>(mx, sc, b, g.N, int(g.n), steps, eps,
                                                                   cuda::dptr<T>(pre), cuda::dptr<T>(post),
                                                                   cuda::dptr<T>(comb));
      TS_CUDA_LAUNCH_CHECK();
    });
  });
}

void CudaV4Kernels::hc_gates_backward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters,
                                      double eps, const Tensor& dpre, const Tensor& dpost, const Tensor& dcomb,
                                      const Tensor& dmix, const Tensor& dscale, const Tensor& dbase) {
  GateLayout g = gate_layout(mix, scale);
  if (g.N == 0) return;  // no tokens: dmix is empty and the parameter sums are zero
  cuda::dispatch_float(mix, [&]<class T>() {
    const T *mx = cuda::dptr<T>(mix), *sc = cuda::dptr<T>(scale), *b = cuda::dptr<T>(base);
    const T* gpre = cuda::dptr<T>(dpre);
    T* dm = cuda::dptr<T>(dmix);
    const bool sums_needed = dscale.defined() || dbase.defined();
    Tensor dz_buf = sums_needed ? Tensor::empty({g.M, g.N}, DType::f64, Device::cuda) : Tensor();
    double* dz = cuda::dptr<double>(dz_buf);
    if (!g.block) {
      gates_head_backward_kernel<T><<<grid_for(g.N * g.n), kBlock>>>(mx, sc, b, g.N, g.n, gpre, dm, dz);
      TS_CUDA_LAUNCH_CHECK();
    } else {
      const int steps = int(2 * iters - 1);
      const T *gpost = cuda::dptr<T>(dpost), *gcomb = cuda::dptr<T>(dcomb);
      Tensor hist_buf =
          gcomb ? Tensor::empty({int64_t(steps), g.n * g.n, g.N}, DType::f64, Device::cuda) : Tensor();
      double* hist = cuda::dptr<double>(hist_buf);
      dispatch_gate_n(g.n, [&]<int NM>() {
        gates_block_backward_kernel<T, NM><<<grid_for(g.N), kBlock>>>(mx, sc, b, g.N, int(g.n), steps, eps, gpre,
                                                                      gpost, gcomb, dm, dz, hist);
        TS_CUDA_LAUNCH_CHECK();
      });
    }
    if (!sums_needed) return;
    Tensor sums_buf = Tensor::empty({2 * g.M}, DType::f64, Device::cuda);
    double* sums = cuda::dptr<double>(sums_buf);
    gates_column_sums_kernel<T><<<grid_for(g.M, 1), kBlock>>>(dz, mx, g.N, g.M, sums);
    TS_CUDA_LAUNCH_CHECK();
    gates_param_accumulate_kernel<T><<<1, 1>>>(sums, g.M, g.n, dscale.defined() ? dscale.numel() : 0,
                                               cuda::dptr<T>(dbase), cuda::dptr<T>(dscale));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::hc_collapse_forward(const Tensor& x, const Tensor& w, const Tensor& y) {
  const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
  if (N * d == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    collapse_forward_kernel<T><<<grid_for(N * d), kBlock>>>(cuda::dptr<T>(x), cuda::dptr<T>(w), N, n, d,
                                                            cuda::dptr<T>(y));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::hc_collapse_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                                         const Tensor& dw) {
  const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
  cuda::dispatch_float(x, [&]<class T>() {
    const T *xs = cuda::dptr<T>(x), *ws = cuda::dptr<T>(w), *g = cuda::dptr<T>(dy);
    if (dx.defined() && N * n * d > 0) {
      collapse_dx_kernel<T><<<grid_for(N * n * d), kBlock>>>(ws, g, N, n, d, cuda::dptr<T>(dx));
      TS_CUDA_LAUNCH_CHECK();
    }
    if (dw.defined()) launch_row_dots<T>(g, xs, N * n, n, d, kCollapseDw, cuda::dptr<T>(dw));
  });
}

void CudaV4Kernels::hc_expand_forward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb,
                                      const Tensor& out) {
  const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
  if (N * n * d == 0) return;
  cuda::dispatch_float(x, [&]<class T>() {
    expand_forward_kernel<T><<<grid_for(N * n * d), kBlock>>>(cuda::dptr<T>(x), cuda::dptr<T>(f),
                                                              cuda::dptr<T>(post), cuda::dptr<T>(comb), N, n, d,
                                                              cuda::dptr<T>(out));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::hc_expand_backward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb,
                                       const Tensor& dout, const Tensor& dx, const Tensor& df, const Tensor& dpost,
                                       const Tensor& dcomb) {
  const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
  cuda::dispatch_float(x, [&]<class T>() {
    const T *xs = cuda::dptr<T>(x), *fs = cuda::dptr<T>(f), *ps = cuda::dptr<T>(post), *cs = cuda::dptr<T>(comb);
    const T* g = cuda::dptr<T>(dout);
    if (dx.defined() && N * n * d > 0) {
      expand_dx_kernel<T><<<grid_for(N * n * d), kBlock>>>(cs, g, N, n, d, cuda::dptr<T>(dx));
      TS_CUDA_LAUNCH_CHECK();
    }
    if (df.defined() && N * d > 0) {
      expand_df_kernel<T><<<grid_for(N * d), kBlock>>>(ps, g, N, n, d, cuda::dptr<T>(df));
      TS_CUDA_LAUNCH_CHECK();
    }
    if (dpost.defined()) launch_row_dots<T>(g, fs, N * n, n, d, kExpandDpost, cuda::dptr<T>(dpost));
    if (dcomb.defined()) launch_row_dots<T>(g, xs, N * n * n, n, d, kExpandDcomb, cuda::dptr<T>(dcomb));
  });
}

void CudaV4Kernels::hadamard(const Tensor& x, const Tensor& out) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  if (rows == 0) return;
  const double norm = 1.0 / std::sqrt(double(D));
  cuda::dispatch_float(x, [&]<class T>() {
    const T* xs = cuda::dptr<T>(x);
    T* os = cuda::dptr<T>(out);
    constexpr size_t kMaxShared = 48 * 1024;  // without opting in to more dynamic shared memory
    if (size_t(D) * sizeof(double) <= kMaxShared) {
      hadamard_kernel<T><<<grid_for(rows, 1), kBlock, size_t(D) * sizeof(double)>>>(xs, os, rows, D, norm, nullptr);
      TS_CUDA_LAUNCH_CHECK();
    } else {
      // Large rows: each block works in its own D-double slice of a global scratch.
      const int64_t blocks = rows < 512 ? rows : 512;
      Tensor scratch = Tensor::empty({blocks, D}, DType::f64, Device::cuda);
      hadamard_kernel<T><<<unsigned(blocks), kBlock>>>(xs, os, rows, D, norm, cuda::dptr<double>(scratch));
      TS_CUDA_LAUNCH_CHECK();
    }
  });
}

void CudaV4Kernels::fake_quant_fp4(const Tensor& x, int64_t block, const Tensor& out) {
  cuda::dispatch_float(x, [&]<class T>() { launch_fake_quant<T, false>(x, block, x.size(-1), out); });
}

void CudaV4Kernels::fake_quant_fp8(const Tensor& x, int64_t block, int64_t dims, const Tensor& out) {
  const int64_t D = x.size(-1);
  const int64_t qd = (dims < 0 || dims > D) ? D : dims;
  cuda::dispatch_float(x, [&]<class T>() { launch_fake_quant<T, true>(x, block, qd, out); });
}

}  // namespace tessera
