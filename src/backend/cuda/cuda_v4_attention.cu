// CUDA kernels for the V4 sparse attention and the lightning indexer (contracts: src/ops/v4_ops.h; reference:
// src/backend/cpu/cpu_v4_attention.cpp).
// Layout: one thread block of kThreads (4 warps) per output row. Keys are processed in chunks of kChunk: each warp
// computes whole dot products for the chunk's keys (lanes stride over D, warp shuffles reduce) and lane 0 writes
// the per-key coefficients to shared memory; after a barrier every thread owns the dims d = tid, tid + kThreads,
// ... of the block's row and accumulates over the chunk's keys in key order.
// Gradients shared between queries: dkv (window keys) and dki are built key-centrically (one block per key, no
// atomics, deterministic); dckv (compressed entries chosen by arbitrary queries) uses atomicAdd; dsink is summed
// per head by a separate deterministic reduction (in double, as on the CPU).
#include <cmath>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {
namespace {

constexpr int kThreads = 128;               // threads per block (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = kThreads;            // keys (items) per shared-memory chunk
constexpr int64_t kMaxGrid = int64_t(1) << 20;  // blocks per launch at most; block-stride loops take the rest

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>(n < kMaxGrid ? n : kMaxGrid); }

__device__ inline float dexp(float x) { return expf(x); }
__device__ inline double dexp(double x) { return ::exp(x); }
__device__ inline float dlog(float x) { return logf(x); }
__device__ inline double dlog(double x) { return ::log(x); }

template <class T>
__device__ inline T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <class T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// first[b*T + t]: the first window key of query t, max(t - window + 1, start of t's run of equal doc ids) (the
// CPU's document_starts: a document is a run of equal consecutive ids).
__global__ void window_first_kernel(const int32_t* doc, int64_t B, int64_t Tn, int64_t window, int64_t* first) {
  TS_CUDA_KERNEL_LOOP(i, B * Tn) {
    const int64_t t = i % Tn;
    const int64_t lo = t - window + 1 > 0 ? t - window + 1 : 0;
    int64_t j = lo;
    if (doc) {
      const int32_t* d = doc + (i - t);  // the batch row
      const int32_t id = d[t];
      j = t;
      while (j > lo && d[j - 1] == id) --j;
    }
    first[i] = j;
  }
}

template <class T>
struct SparseArgs {
  const T *q, *kv, *ckv, *sink;
  const int32_t* cidx;
  const int64_t* first;
  int64_t B, Tn, H, D, K, NB;
  T sc;
};

// Key i (0 <= i < nw + K) of query row r = b*T + t whose window is [f, f + nw): window key f + i for i < nw, else
// compressed slot i - nw; *c gets the compressed entry (-1 for a window key or an unused slot). nullptr for an
// unused slot.
template <class T>
__device__ inline const T* key_ptr(const SparseArgs<T>& a, int64_t b, int64_t r, int64_t f, int64_t nw, int64_t i,
                                   int32_t* c) {
  *c = -1;
  if (i < nw) return a.kv + (b * a.Tn + f + i) * a.D;
  const int32_t e = a.cidx[r * a.K + (i - nw)];
  if (e < 0) return nullptr;
  *c = e;
  return a.ckv + (b * a.NB + e) * a.D;
}

// ------------------------------------------------------------------------------------------------ sparse forward

// One block per (query row r, head h), rh = r*H + h. Online softmax over chunks, starting from the sink
// (m = sink, s = exp(sink - m) = 1); out accumulates in place (each thread owns its dims).
template <class T>
__global__ void __launch_bounds__(kThreads) sparse_fwd_kernel(SparseArgs<T> a, T* out, T* lse) {
  __shared__ T ps[kChunk];
  __shared__ const T* kp[kChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrows = a.B * a.Tn * a.H, D = a.D;
  for (int64_t rh = blockIdx.x; rh < nrows; rh += gridDim.x) {
    const int64_t r = rh / a.H, h = rh % a.H, b = r / a.Tn, t = r % a.Tn;
    const int64_t f = a.first[r], nw = t - f + 1, n = nw + a.K;
    const T* qr = a.q + rh * D;
    T* o = out + rh * D;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) o[d] = T(0);
    T m = a.sink[h], s = T(1);
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int cn = int(n - c0 < kChunk ? n - c0 : kChunk);
      for (int i = warp; i < cn; i += kWarps) {
        int32_t c;
        const T* k = key_ptr(a, b, r, f, nw, c0 + i, &c);
        T x = neg_inf<T>();
        if (k) {
          T acc = 0;
          for (int64_t d = lane; d < D; d += 32) acc += qr[d] * k[d];
          x = warp_sum(acc) * a.sc;
        }
        if (lane == 0) ps[i] = x, kp[i] = k;
      }
      __syncthreads();
      T cm = m;
      for (int i = 0; i < cn; ++i) cm = ps[i] > cm ? ps[i] : cm;
      __syncthreads();  // all maxima read before ps is overwritten
      if (threadIdx.x < cn) ps[threadIdx.x] = dexp(ps[threadIdx.x] - cm);  // unused slots: exp(-inf) = 0
      __syncthreads();
      // The first chunk holds window key f (finite score), so cm is finite from here on even for a -inf sink.
      const T alpha = dexp(m - cm);
      T cs = 0;
      for (int i = 0; i < cn; ++i) cs += ps[i];
      s = s * alpha + cs;
      m = cm;
      for (int64_t d = threadIdx.x; d < D; d += kThreads) {
        T acc = 0;
        for (int i = 0; i < cn; ++i)
          if (kp[i]) acc += ps[i] * kp[i][d];
        o[d] = o[d] * alpha + acc;
      }
      __syncthreads();  // ps, kp free for the next chunk
    }
    const T inv = T(1) / s;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) o[d] *= inv;
    if (threadIdx.x == 0) lse[rh] = m + dlog(s);
  }
}

// ------------------------------------------------------------------------------------------------ sparse backward

// One block per (r, h): dq assigned; dl = out . dout and the sink gradient per row saved for later kernels;
// dckv += p dout + g q by atomicAdd. p = exp(sc q.k - L), g = p (dout.k - dl) sc.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sparse_bwd_query_kernel(SparseArgs<T> a, const T* out, const T* lse, const T* dout, T* dq, T* dckv, T* dl_buf,
                            T* sink_g) {
  __shared__ T ps[kChunk], gs[kChunk];
  __shared__ const T* kp[kChunk];
  __shared__ int32_t ce[kChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrows = a.B * a.Tn * a.H, D = a.D;
  for (int64_t rh = blockIdx.x; rh < nrows; rh += gridDim.x) {
    const int64_t r = rh / a.H, h = rh % a.H, b = r / a.Tn, t = r % a.Tn;
    const int64_t f = a.first[r], nw = t - f + 1, n = nw + a.K;
    const T* qr = a.q + rh * D;
    const T* gr = dout + rh * D;
    const T* orow = out + rh * D;
    T part = 0;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) part += orow[d] * gr[d];
    const T dl = cuda::block_sum(part);
    const T L = lse[rh];
    if (threadIdx.x == 0) {
      dl_buf[rh] = dl;
      sink_g[rh] = -dexp(a.sink[h] - L) * dl;
    }
    T* dqr = dq + rh * D;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) dqr[d] = T(0);
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int cn = int(n - c0 < kChunk ? n - c0 : kChunk);
      for (int i = warp; i < cn; i += kWarps) {
        int32_t c;
        const T* k = key_ptr(a, b, r, f, nw, c0 + i, &c);
        T pv = 0, gv = 0;
        if (k) {
          T sq = 0, sg = 0;
          for (int64_t d = lane; d < D; d += 32) {
            sq += qr[d] * k[d];
            sg += gr[d] * k[d];
          }
          sq = warp_sum(sq);
          sg = warp_sum(sg);
          pv = dexp(sq * a.sc - L);
          gv = pv * (sg - dl) * a.sc;
        }
        if (lane == 0) ps[i] = pv, gs[i] = gv, kp[i] = k, ce[i] = c;
      }
      __syncthreads();
      for (int64_t d = threadIdx.x; d < D; d += kThreads) {
        T acc = 0;
        for (int i = 0; i < cn; ++i) {
          if (!kp[i]) continue;
          acc += gs[i] * kp[i][d];
          if (ce[i] >= 0) atomicAdd(dckv + (b * a.NB + ce[i]) * D + d, ps[i] * gr[d] + gs[i] * qr[d]);
        }
        dqr[d] += acc;
      }
      __syncthreads();
    }
  }
}

// One block per window key (b, j): dkv[b, j] = sum over the queries t >= j that see j (first[t] <= j,
// t < j + window) and heads h of p dout + g q. Assigned; no atomics.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sparse_bwd_key_kernel(SparseArgs<T> a, int64_t window, const T* lse, const T* dout, const T* dl_buf, T* dkv) {
  __shared__ T ps[kChunk], gs[kChunk];
  __shared__ int64_t rows[kChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nkeys = a.B * a.Tn, D = a.D, H = a.H;
  for (int64_t bj = blockIdx.x; bj < nkeys; bj += gridDim.x) {
    const int64_t b = bj / a.Tn, j = bj % a.Tn;
    const T* k = a.kv + bj * D;
    T* dk = dkv + bj * D;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) dk[d] = T(0);
    const int64_t nt = window < a.Tn - j ? window : a.Tn - j;  // queries t = j .. j + nt - 1
    const int64_t n = nt * H;                                   // items (t, h), t-major
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int cn = int(n - c0 < kChunk ? n - c0 : kChunk);
      for (int i = warp; i < cn; i += kWarps) {
        const int64_t item = c0 + i, t = j + item / H, h = item % H, r = b * a.Tn + t, rh = r * H + h;
        const bool valid = a.first[r] <= j;
        T pv = 0, gv = 0;
        if (valid) {
          const T* qr = a.q + rh * D;
          const T* gr = dout + rh * D;
          T sq = 0, sg = 0;
          for (int64_t d = lane; d < D; d += 32) {
            sq += qr[d] * k[d];
            sg += gr[d] * k[d];
          }
          sq = warp_sum(sq);
          sg = warp_sum(sg);
          pv = dexp(sq * a.sc - lse[rh]);
          gv = pv * (sg - dl_buf[rh]) * a.sc;
        }
        if (lane == 0) ps[i] = pv, gs[i] = gv, rows[i] = valid ? rh : -1;
      }
      __syncthreads();
      for (int64_t d = threadIdx.x; d < D; d += kThreads) {
        T acc = 0;
        for (int i = 0; i < cn; ++i)
          if (rows[i] >= 0) acc += ps[i] * dout[rows[i] * D + d] + gs[i] * a.q[rows[i] * D + d];
        dk[d] += acc;
      }
      __syncthreads();
    }
  }
}

// dsink[h] += sum over rows of sink_g[r*H + h], one block per head, summed in double in a fixed order.
template <class T>
__global__ void __launch_bounds__(kThreads) sink_reduce_kernel(const T* sink_g, int64_t R, int64_t H, T* dsink) {
  for (int64_t h = blockIdx.x; h < H; h += gridDim.x) {
    double acc = 0;
    for (int64_t r = threadIdx.x; r < R; r += kThreads) acc += double(sink_g[r * H + h]);
    acc = cuda::block_sum(acc);
    if (threadIdx.x == 0) dsink[h] += T(acc);
  }
}

// ------------------------------------------------------------------------------------------------ cprob

// One warp per (r, slot j): sum over heads (in order) of exp(sc q_h . ckv_c - lse_h); 0 for unused slots.
template <class T>
__global__ void __launch_bounds__(kThreads)
    cprob_kernel(const T* q, const T* ckv, const int32_t* cidx, const T* lse, int64_t B, int64_t Tn, int64_t H,
                 int64_t D, int64_t K, int64_t NB, T sc, T* cprob) {
  const int lane = threadIdx.x & 31;
  const int64_t n = B * Tn * K, stride = int64_t(gridDim.x) * kWarps;
  for (int64_t w = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); w < n; w += stride) {
    const int64_t r = w / K;
    const int32_t c = cidx[w];
    T sum = 0;
    if (c >= 0) {
      const T* e = ckv + ((r / Tn) * NB + c) * D;
      for (int64_t h = 0; h < H; ++h) {
        const T* qh = q + (r * H + h) * D;
        T acc = 0;
        for (int64_t d = lane; d < D; d += 32) acc += qh[d] * e[d];
        acc = warp_sum(acc);
        sum += dexp(acc * sc - lse[r * H + h]);
      }
    }
    if (lane == 0) cprob[w] = sum;
  }
}

// ------------------------------------------------------------------------------------------------ indexer

// One warp per (r, s): sum_h w_h relu(qi_h . ki_s) inside [vis_begin, vis_end), -inf outside.
template <class T>
__global__ void __launch_bounds__(kThreads)
    indexer_fwd_kernel(const T* qi, const T* ki, const T* w, const int32_t* vb, const int32_t* ve, int64_t B,
                       int64_t Tn, int64_t HI, int64_t DI, int64_t NB, T* scores) {
  const int lane = threadIdx.x & 31;
  const int64_t n = B * Tn * NB, stride = int64_t(gridDim.x) * kWarps;
  for (int64_t x = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); x < n; x += stride) {
    const int64_t r = x / NB, s = x % NB, b = r / Tn;
    T val = neg_inf<T>();
    if (s >= vb[r] && s < ve[r]) {
      val = T(0);
      const T* k = ki + (b * NB + s) * DI;
      for (int64_t h = 0; h < HI; ++h) {
        const T* qh = qi + (r * HI + h) * DI;
        T acc = 0;
        for (int64_t d = lane; d < DI; d += 32) acc += qh[d] * k[d];
        acc = warp_sum(acc);
        val += w[r * HI + h] * (acc > T(0) ? acc : T(0));
      }
    }
    if (lane == 0) scores[x] = val;
  }
}

// One block per (r, h): dqi[r, h] = sum_{visible s, z > 0} ds w_h ki_s and dw[r, h] = sum ds z (both assigned).
template <class T>
__global__ void __launch_bounds__(kThreads)
    indexer_bwd_query_kernel(const T* qi, const T* ki, const T* w, const int32_t* vb, const int32_t* ve,
                             const T* ds, int64_t B, int64_t Tn, int64_t HI, int64_t DI, int64_t NB, T* dqi, T* dw) {
  __shared__ T gsh[kChunk], dwp[kChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrows = B * Tn * HI;
  for (int64_t rh = blockIdx.x; rh < nrows; rh += gridDim.x) {
    const int64_t r = rh / HI, b = r / Tn, s0 = vb[r], n = int64_t(ve[r]) - s0;
    const T wh = w[rh];
    const T* qh = qi + rh * DI;
    T* dq = dqi + rh * DI;
    for (int64_t d = threadIdx.x; d < DI; d += kThreads) dq[d] = T(0);
    T dwacc = 0;  // thread 0's
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int cn = int(n - c0 < kChunk ? n - c0 : kChunk);
      for (int i = warp; i < cn; i += kWarps) {
        const int64_t s = s0 + c0 + i;
        const T* k = ki + (b * NB + s) * DI;
        T z = 0;
        for (int64_t d = lane; d < DI; d += 32) z += qh[d] * k[d];
        z = warp_sum(z);
        const T g = ds[r * NB + s];
        const bool on = z > T(0);
        if (lane == 0) gsh[i] = on ? g * wh : T(0), dwp[i] = on ? g * z : T(0);
      }
      __syncthreads();
      if (threadIdx.x == 0)
        for (int i = 0; i < cn; ++i) dwacc += dwp[i];
      for (int64_t d = threadIdx.x; d < DI; d += kThreads) {
        T acc = 0;
        for (int i = 0; i < cn; ++i)
          if (gsh[i] != T(0)) acc += gsh[i] * ki[(b * NB + s0 + c0 + i) * DI + d];
        dq[d] += acc;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) dw[rh] = dwacc;
  }
}

// One block per key (b, s): dki[b, s] = sum over queries t that see s and heads h with qi.ki > 0 of
// ds[t, s] w_{t,h} qi_{t,h} (assigned; no atomics).
template <class T>
__global__ void __launch_bounds__(kThreads)
    indexer_bwd_key_kernel(const T* qi, const T* ki, const T* w, const int32_t* vb, const int32_t* ve, const T* ds,
                           int64_t B, int64_t Tn, int64_t HI, int64_t DI, int64_t NB, T* dki) {
  __shared__ T coef[kChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nkeys = B * NB, n = Tn * HI;  // items (t, h), t-major
  for (int64_t bs = blockIdx.x; bs < nkeys; bs += gridDim.x) {
    const int64_t b = bs / NB, s = bs % NB, base = b * Tn * HI;  // item i is row rh = base + i
    const T* k = ki + bs * DI;
    T* dk = dki + bs * DI;
    for (int64_t d = threadIdx.x; d < DI; d += kThreads) dk[d] = T(0);
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int cn = int(n - c0 < kChunk ? n - c0 : kChunk);
      for (int i = warp; i < cn; i += kWarps) {
        const int64_t item = c0 + i, r = b * Tn + item / HI, rh = base + item;
        T cv = 0;
        if (s >= vb[r] && s < ve[r]) {
          const T* qh = qi + rh * DI;
          T z = 0;
          for (int64_t d = lane; d < DI; d += 32) z += qh[d] * k[d];
          z = warp_sum(z);
          if (z > T(0)) cv = ds[r * NB + s] * w[rh];
        }
        if (lane == 0) coef[i] = cv;
      }
      __syncthreads();
      for (int64_t d = threadIdx.x; d < DI; d += kThreads) {
        T acc = 0;
        for (int i = 0; i < cn; ++i)
          if (coef[i] != T(0)) acc += coef[i] * qi[(base + c0 + i) * DI + d];
        dk[d] += acc;
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------------------------ indexer KL

// One block per row, in double: p = target / sum |target|, q = softmax over the finite scores,
// KL = sum_{p != 0} p (log p - log q); d = grad_scale (q - p) at finite scores, 0 elsewhere.
template <class T>
__global__ void __launch_bounds__(kThreads)
    kl_row_kernel(const T* z, const T* tg, int64_t R, int64_t S, double grad_scale, T* dz, double* row_kl) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const T* zr = z + r * S;
    const T* tr = tg + r * S;
    double norm = 0, mx = -static_cast<double>(INFINITY);
    for (int64_t s = threadIdx.x; s < S; s += kThreads) {
      norm += fabs(double(tr[s]));
      const double v = double(zr[s]);
      if (isfinite(v) && v > mx) mx = v;
    }
    norm = cuda::block_sum(norm);
    mx = cuda::block_max(mx);
    if (norm == 0) {  // the same for every thread of the block
      if (dz)
        for (int64_t s = threadIdx.x; s < S; s += kThreads) dz[r * S + s] = T(0);
      if (threadIdx.x == 0) row_kl[r] = 0;
      continue;
    }
    double sum = 0;
    for (int64_t s = threadIdx.x; s < S; s += kThreads) {
      const double v = double(zr[s]);
      if (isfinite(v)) sum += ::exp(v - mx);
    }
    sum = cuda::block_sum(sum);
    const double lse = mx + ::log(sum);
    double kl = 0;
    for (int64_t s = threadIdx.x; s < S; s += kThreads) {
      const double v = double(zr[s]), p = double(tr[s]) / norm;
      if (p != 0) kl += p * (::log(p) - (v - lse));
      if (dz) dz[r * S + s] = isfinite(v) ? T(grad_scale * (::exp(v - lse) - p)) : T(0);
    }
    kl = cuda::block_sum(kl);
    if (threadIdx.x == 0) row_kl[r] = kl;
  }
}

// out[0] = sum of x[0..n), one block, fixed order.
__global__ void __launch_bounds__(kThreads) sum_kernel(const double* x, int64_t n, double* out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += x[i];
  acc = cuda::block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc;
}

// The window-start buffer (B*T i64) for the sparse attention.
Tensor window_first(const Tensor& doc, int64_t B, int64_t Tn, int64_t window) {
  Tensor first = Tensor::empty({B * Tn}, DType::i64, Device::cuda);
  if (B * Tn > 0) {
    window_first_kernel<<<cuda::grid_for(B * Tn), cuda::kBlock>>>(cuda::dptr<int32_t>(doc), B, Tn, window,
                                                                   cuda::dptr<int64_t>(first));
    TS_CUDA_LAUNCH_CHECK();
  }
  return first;
}

template <class T>
SparseArgs<T> sparse_args(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                          const Tensor& sink, const Tensor& first, double scale) {
  SparseArgs<T> a;
  a.q = cuda::dptr<T>(q);
  a.kv = cuda::dptr<T>(kv);
  a.ckv = cidx.defined() ? cuda::dptr<T>(ckv) : nullptr;
  a.sink = cuda::dptr<T>(sink);
  a.cidx = cuda::dptr<int32_t>(cidx);
  a.first = cuda::dptr<int64_t>(first);
  a.B = q.size(0), a.Tn = q.size(1), a.H = q.size(2), a.D = q.size(3);
  a.K = cidx.defined() ? cidx.size(2) : 0;
  a.NB = cidx.defined() ? ckv.size(1) : 0;
  a.sc = T(scale);
  return a;
}

}  // namespace

void CudaV4Kernels::sparse_attention_forward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                                             const Tensor& sink, const Tensor& doc, int64_t window, double scale,
                                             const Tensor& out, const Tensor& lse) {
  const int64_t B = q.size(0), Tn = q.size(1), H = q.size(2);
  if (B * Tn * H == 0) return;
  Tensor first = window_first(doc, B, Tn, window);
  cuda::dispatch_float(q, [&]<class T>() {
    SparseArgs<T> a = sparse_args<T>(q, kv, ckv, cidx, sink, first, scale);
    sparse_fwd_kernel<T><<<blocks_for(B * Tn * H), kThreads>>>(a, cuda::dptr<T>(out), cuda::dptr<T>(lse));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::sparse_attention_backward(const Tensor& q, const Tensor& kv, const Tensor& ckv,
                                              const Tensor& cidx, const Tensor& sink, const Tensor& doc,
                                              int64_t window, double scale, const Tensor& out, const Tensor& lse,
                                              const Tensor& dout, const Tensor& dq, const Tensor& dkv,
                                              const Tensor& dckv, const Tensor& dsink) {
  const int64_t B = q.size(0), Tn = q.size(1), H = q.size(2);
  // dckv is assigned: zero it first (the query kernel adds into it).
  if (dckv.defined() && dckv.nbytes() > 0) TS_CUDA_CHECK(cudaMemsetAsync(dckv.raw(), 0, dckv.nbytes(), 0));
  if (B * Tn * H == 0) {
    if (dkv.nbytes() > 0) TS_CUDA_CHECK(cudaMemsetAsync(dkv.raw(), 0, dkv.nbytes(), 0));
    return;
  }
  Tensor first = window_first(doc, B, Tn, window);
  cuda::dispatch_float(q, [&]<class T>() {
    SparseArgs<T> a = sparse_args<T>(q, kv, ckv, cidx, sink, first, scale);
    Tensor dl = Tensor::empty({B * Tn * H}, q.dtype(), Device::cuda);
    Tensor sink_g = Tensor::empty({B * Tn * H}, q.dtype(), Device::cuda);
    sparse_bwd_query_kernel<T><<<blocks_for(B * Tn * H), kThreads>>>(
        a, cuda::dptr<T>(out), cuda::dptr<T>(lse), cuda::dptr<T>(dout), cuda::dptr<T>(dq),
        cidx.defined() ? cuda::dptr<T>(dckv) : nullptr, cuda::dptr<T>(dl), cuda::dptr<T>(sink_g));
    TS_CUDA_LAUNCH_CHECK();
    sparse_bwd_key_kernel<T><<<blocks_for(B * Tn), kThreads>>>(a, window, cuda::dptr<T>(lse), cuda::dptr<T>(dout),
                                                               cuda::dptr<T>(dl), cuda::dptr<T>(dkv));
    TS_CUDA_LAUNCH_CHECK();
    sink_reduce_kernel<T><<<blocks_for(H), kThreads>>>(cuda::dptr<T>(sink_g), B * Tn, H, cuda::dptr<T>(dsink));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::sparse_attention_cprob(const Tensor& q, const Tensor& ckv, const Tensor& cidx, const Tensor& lse,
                                           double scale, const Tensor& cprob) {
  const int64_t B = q.size(0), Tn = q.size(1), H = q.size(2), D = q.size(3), K = cidx.size(2), NB = ckv.size(1);
  const int64_t n = B * Tn * K;
  if (n == 0) return;
  cuda::dispatch_float(q, [&]<class T>() {
    cprob_kernel<T><<<blocks_for((n + kWarps - 1) / kWarps), kThreads>>>(
        cuda::dptr<T>(q), cuda::dptr<T>(ckv), cuda::dptr<int32_t>(cidx), cuda::dptr<T>(lse), B, Tn, H, D, K, NB,
        T(scale), cuda::dptr<T>(cprob));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::indexer_scores_forward(const Tensor& qi, const Tensor& ki, const Tensor& w,
                                           const Tensor& vis_begin, const Tensor& vis_end, const Tensor& scores) {
  const int64_t B = qi.size(0), Tn = qi.size(1), HI = qi.size(2), DI = qi.size(3), NB = ki.size(1);
  const int64_t n = B * Tn * NB;
  if (n == 0) return;
  cuda::dispatch_float(qi, [&]<class T>() {
    indexer_fwd_kernel<T><<<blocks_for((n + kWarps - 1) / kWarps), kThreads>>>(
        cuda::dptr<T>(qi), cuda::dptr<T>(ki), cuda::dptr<T>(w), cuda::dptr<int32_t>(vis_begin),
        cuda::dptr<int32_t>(vis_end), B, Tn, HI, DI, NB, cuda::dptr<T>(scores));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::indexer_scores_backward(const Tensor& qi, const Tensor& ki, const Tensor& w,
                                            const Tensor& vis_begin, const Tensor& vis_end, const Tensor& dscores,
                                            const Tensor& dqi, const Tensor& dki, const Tensor& dw) {
  const int64_t B = qi.size(0), Tn = qi.size(1), HI = qi.size(2), DI = qi.size(3), NB = ki.size(1);
  cuda::dispatch_float(qi, [&]<class T>() {
    const T *Q = cuda::dptr<T>(qi), *Kp = cuda::dptr<T>(ki), *W = cuda::dptr<T>(w), *G = cuda::dptr<T>(dscores);
    const int32_t *vb = cuda::dptr<int32_t>(vis_begin), *ve = cuda::dptr<int32_t>(vis_end);
    // With NB = 0 every range is empty: the query kernel assigns dqi = 0 and dw = 0 (it reads no scores).
    if (B * Tn * HI > 0) {
      indexer_bwd_query_kernel<T><<<blocks_for(B * Tn * HI), kThreads>>>(Q, Kp, W, vb, ve, G, B, Tn, HI, DI, NB,
                                                                         cuda::dptr<T>(dqi), cuda::dptr<T>(dw));
      TS_CUDA_LAUNCH_CHECK();
    }
    if (B * NB > 0) {
      indexer_bwd_key_kernel<T><<<blocks_for(B * NB), kThreads>>>(Q, Kp, W, vb, ve, G, B, Tn, HI, DI, NB,
                                                                  cuda::dptr<T>(dki));
      TS_CUDA_LAUNCH_CHECK();
    }
  });
}

double CudaV4Kernels::indexer_kl(const Tensor& scores, const Tensor& target, double grad_scale,
                                 const Tensor& dscores) {
  const int64_t S = scores.size(-1), R = S > 0 ? scores.numel() / S : 0;
  if (R == 0) return 0.0;
  Tensor rows = Tensor::empty({R}, DType::f64, Device::cuda);
  Tensor total = Tensor::empty({1}, DType::f64, Device::cuda);
  cuda::dispatch_float(scores, [&]<class T>() {
    kl_row_kernel<T><<<blocks_for(R), kThreads>>>(cuda::dptr<T>(scores), cuda::dptr<T>(target), R, S, grad_scale,
                                                  cuda::dptr<T>(dscores), cuda::dptr<double>(rows));
    TS_CUDA_LAUNCH_CHECK();
  });
  sum_kernel<<<1, kThreads>>>(cuda::dptr<double>(rows), R, cuda::dptr<double>(total));
  TS_CUDA_LAUNCH_CHECK();
  return cuda::read_scalar(cuda::dptr<double>(total));
}

}  // namespace tessera
