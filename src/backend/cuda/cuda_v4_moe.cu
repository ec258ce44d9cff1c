// CUDA kernels for MoE routing, token movement and the compressors (contracts: src/ops/v4_ops.h; reference:
// src/backend/cpu/cpu_v4_moe.cpp, whose semantics these follow). Small reductions run in double as on the CPU.
// Every accumulation into shared memory locations is deterministic: scatter_add_rows adds each destination row's
// sources in source order (after a stable sort of the row indices), and compress_backward gives each thread a
// (batch, channel) pair of columns and sums the per-batch dape partials in batch order.
#include <cub/device/device_radix_sort.cuh>

#include <climits>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {
using namespace cuda;
namespace {

// Grid for one block per row (rows beyond the grid are taken by a block-uniform grid-stride loop).
inline unsigned grid_rows(int64_t n) {
  int64_t g = n < 1 ? 1 : n;
  if (g > 65535L * 16) g = 65535L * 16;
  return static_cast<unsigned>(g);
}

__device__ inline double d_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

// log(1 + e^x) without overflow for large x or cancellation for very negative x.
__device__ inline double d_softplus(double x) { return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)); }
__device__ inline double d_sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + exp(-x));
  double e = exp(x);
  return e / (1.0 + e);
}
// std::max(a, b) semantics: a unless a < b (a NaN b keeps a).
__device__ inline double d_max(double a, double b) { return a < b ? b : a; }

// ---------------------------------------------------------------- router scores

template <class T>
__global__ void router_elementwise_forward(const T* x, int64_t n, int score_func, T* s) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    double v = double(x[i]);
    s[i] = T(score_func == 0 ? sqrt(d_softplus(v)) : d_sigmoid(v));
  }
}

template <class T>
__global__ void router_elementwise_backward(const T* x, const T* g, int64_t n, int score_func, T* d) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    double v = double(x[i]);
    if (score_func == 1) {
      double sg = d_sigmoid(v);
      d[i] = T(double(g[i]) * sg * (1 - sg));
    } else {
      // d sqrt(sp)/dx = sigmoid / (2 sqrt(sp)); both underflow together for x << 0, where the limit is 0.
      double sp = d_softplus(v);
      d[i] = sp > 0 ? T(double(g[i]) * d_sigmoid(v) / (2 * sqrt(sp))) : T(0);
    }
  }
}

// Row softmax in double, one block per row: returns (through mx, sum) the row max and sum of exp(x - mx).
template <class T>
__device__ void row_softmax_stats(const T* xi, int64_t e, double* mx_out, double* sum_out) {
  double mx = -d_inf();
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) mx = d_max(mx, double(xi[j]));
  mx = block_max(mx);
  double sum = 0;
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) sum += exp(double(xi[j]) - mx);
  sum = block_sum(sum);
  *mx_out = mx;
  *sum_out = sum;
}

template <class T>
__global__ void router_softmax_forward(const T* x, int64_t n, int64_t e, T* s) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* xi = x + i * e;
    double mx, sum;
    row_softmax_stats(xi, e, &mx, &sum);
    for (int64_t j = threadIdx.x; j < e; j += blockDim.x) s[i * e + j] = T(exp(double(xi[j]) - mx) / sum);
  }
}

template <class T>
__global__ void router_softmax_backward(const T* x, const T* g, int64_t n, int64_t e, T* d) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* xi = x + i * e;
    const T* gi = g + i * e;
    double mx, sum;
    row_softmax_stats(xi, e, &mx, &sum);
    double dot = 0;
    for (int64_t j = threadIdx.x; j < e; j += blockDim.x) dot += exp(double(xi[j]) - mx) / sum * double(gi[j]);
    dot = block_sum(dot);
    for (int64_t j = threadIdx.x; j < e; j += blockDim.x) {
      double p = exp(double(xi[j]) - mx) / sum;
      d[i * e + j] = T(p * (double(gi[j]) - dot));
    }
  }
}

// ---------------------------------------------------------------- top-k

// One thread per row. Slot by slot, the best remaining candidate in the order (key descending, index
// ascending): the first candidate strictly after the previous pick in that order. Keys that are not > -inf
// (-inf, NaN) are never candidates; slots left over are -1. Same result as the CPU's partial_sort.
template <class T>
__global__ void topk_kernel(const T* s, const T* bias, int64_t n, int64_t e, int64_t k, int32_t* out) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    const T* si = s + i * e;
    int32_t* oi = out + i * k;
    double prev_key = 0;
    int64_t prev = -1;  // the previous pick (-1: none yet)
    int64_t slot = 0;
    for (; slot < k; ++slot) {
      int64_t best = -1;
      double best_key = 0;
      for (int64_t j = 0; j < e; ++j) {
        double key = double(si[j]) + (bias ? double(bias[j]) : 0.0);
        if (!(key > -d_inf())) continue;
        if (prev >= 0 && !(key < prev_key || (key == prev_key && j > prev))) continue;  // already taken
        if (best < 0 || key > best_key) best = j, best_key = key;  // j ascending: ties keep the lower index
      }
      if (best < 0) break;
      oi[slot] = int32_t(best);
      prev = best;
      prev_key = best_key;
    }
    for (; slot < k; ++slot) oi[slot] = -1;
  }
}

// ---------------------------------------------------------------- route weights

template <class T>
__global__ void route_weights_forward_kernel(const T* s, const int32_t* id, int64_t n, int64_t e, int64_t k,
                                             bool normalize, double route_scale, T* w) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    const int32_t* ii = id + i * k;
    double sum = 0;
    for (int64_t j = 0; j < k; ++j)
      if (ii[j] >= 0) sum += double(s[i * e + ii[j]]);
    double denom = (normalize && sum != 0) ? sum : 1.0;  // an all-zero selection keeps weight 0, not NaN
    for (int64_t j = 0; j < k; ++j)
      w[i * k + j] = ii[j] >= 0 ? T(route_scale * double(s[i * e + ii[j]]) / denom) : T(0);
  }
}

// One thread per row: the only writer of the row's dscores (repeated slots add up in slot order).
template <class T>
__global__ void route_weights_backward_kernel(const T* s, const int32_t* id, const T* g, int64_t n, int64_t e,
                                              int64_t k, bool normalize, double route_scale, T* ds) {
  TS_CUDA_KERNEL_LOOP(i, n) {
    const int32_t* ii = id + i * k;
    const T* gi = g + i * k;
    double sum = 0, dot = 0;
    for (int64_t j = 0; j < k; ++j)
      if (ii[j] >= 0) sum += double(s[i * e + ii[j]]), dot += double(gi[j]) * double(s[i * e + ii[j]]);
    double denom = (normalize && sum != 0) ? sum : 1.0;
    for (int64_t j = 0; j < k; ++j) {
      if (ii[j] < 0) continue;
      double grad = normalize ? route_scale / denom * (double(gi[j]) - dot / denom) : route_scale * double(gi[j]);
      ds[i * e + ii[j]] += T(grad);
    }
  }
}

// ---------------------------------------------------------------- balance loss

// f (B,E) = E/(k T) * #{t : expert i in idx_t}; one block per (b, i).
__global__ void balance_counts(const int32_t* id, int64_t B, int64_t Tn, int64_t E, int64_t k, double* f) {
  for (int64_t be = blockIdx.x; be < B * E; be += gridDim.x) {
    int64_t b = be / E, i = be % E;
    double cnt = 0;
    for (int64_t t = threadIdx.x; t < Tn; t += blockDim.x) {
      const int32_t* it = id + (b * Tn + t) * k;
      bool has = false;
      for (int64_t j = 0; j < k; ++j) has = has || (int64_t(it[j]) == i);
      cnt += has ? 1.0 : 0.0;
    }
    cnt = block_sum(cnt);
    if (threadIdx.x == 0) f[be] = cnt * (double(E) / double(k * Tn));
  }
}

// Per token row r: row[r] = sum_i f_i s_i / S (0 if S = 0), and ds += c (f_i - row[r]); one block per row.
template <class T>
__global__ void balance_rows(const T* s, const double* f, int64_t B, int64_t Tn, int64_t E, double alpha,
                             double grad_scale, double* row, T* ds) {
  for (int64_t r = blockIdx.x; r < B * Tn; r += gridDim.x) {
    const double* fb = f + (r / Tn) * E;
    const T* sr = s + r * E;
    double sum = 0, dot = 0;
    for (int64_t i = threadIdx.x; i < E; i += blockDim.x) sum += double(sr[i]), dot += fb[i] * double(sr[i]);
    sum = block_sum(sum);
    dot = block_sum(dot);
    if (sum == 0) {  // all-zero scores: no defined share, no contribution
      if (threadIdx.x == 0) row[r] = 0;
      continue;
    }
    double share = dot / sum;
    if (threadIdx.x == 0) row[r] = share;
    if (ds) {
      double c = grad_scale * alpha / (double(B * Tn) * sum);
      for (int64_t i = threadIdx.x; i < E; i += blockDim.x) ds[r * E + i] += T(c * (fb[i] - share));
    }
  }
}

// total[0] = sum of v[0..n); a single block.
__global__ void sum_doubles(const double* v, int64_t n, double* total) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) total[0] = acc;
}

// ---------------------------------------------------------------- token movement

template <class T>
__global__ void gather_rows_kernel(const T* x, const int32_t* r, const T* sc, int64_t M, int64_t C, T* o) {
  TS_CUDA_KERNEL_LOOP(idx, M * C) {
    int64_t i = idx / C, j = idx % C;
    T v = x[int64_t(r[i]) * C + j];
    o[idx] = sc ? sc[i] * v : v;
  }
}

__global__ void iota_i32(int32_t* v, int64_t n) {
  TS_CUDA_KERNEL_LOOP(i, n) v[i] = int32_t(i);
}

// keys (M): the destination rows sorted stably, src_of (M) the matching source rows (ascending within equal
// keys). The thread of (p, j) with p the first position of its key adds that destination row's sources, in
// order, to column j: the only writer of dst[key, j].
template <class T>
__global__ void scatter_add_sorted(const T* x, const int32_t* keys, const int32_t* src_of, const T* sc, int64_t M,
                                   int64_t C, T* o) {
  TS_CUDA_KERNEL_LOOP(idx, M * C) {
    int64_t p = idx / C, j = idx % C;
    int32_t key = keys[p];
    if (p > 0 && keys[p - 1] == key) continue;
    T* oj = o + int64_t(key) * C + j;
    T acc = *oj;
    for (int64_t q = p; q < M && keys[q] == key; ++q) {
      int64_t i = src_of[q];
      T a = sc ? sc[i] : T(1);
      acc += a * x[i * C + j];
    }
    *oj = acc;
  }
}

// out[i] = src[i] . other[rows[i]] in double; one block per row.
template <class T>
__global__ void rows_dot_kernel(const T* x, const T* y, const int32_t* r, int64_t M, int64_t C, T* out) {
  for (int64_t i = blockIdx.x; i < M; i += gridDim.x) {
    const T* xi = x + i * C;
    const T* yi = y + int64_t(r[i]) * C;
    double acc = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) acc += double(xi[j]) * double(yi[j]);
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[i] = T(acc);
  }
}

// ---------------------------------------------------------------- compressor

// The tensors and sizes of one compressor call. A block (b, n) has up to two segments of m tokens: its own
// (starting at block_start, columns col0 = S == 2 ? c : 0) and, for S = 2 with a previous block, the previous
// block's (starting at prev_start, columns col0 = 0). Segment row r of channel ch reads column col0 + ch of
// token t0 + r in kv/score and row r of ape.
template <class T>
struct CompressArgs {
  const T *kv, *score, *ape;
  const int32_t *block_start, *prev_start;
  int64_t B, Tn, W, NB, c, m, S;
};

template <class T>
__device__ int compress_segments(const CompressArgs<T>& a, int64_t b, int64_t n, int64_t* t0, int64_t* col0) {
  int64_t st = a.block_start[b * a.NB + n], pv = a.prev_start[b * a.NB + n];
  if (st < 0) return 0;
  int k = 0;
  t0[k] = st, col0[k] = a.S == 2 ? a.c : 0, ++k;
  if (a.S == 2 && pv >= 0) t0[k] = pv, col0[k] = 0, ++k;
  return k;
}

// Softmax max, denominator and output of channel ch of block b (segments given), in the CPU's order.
template <class T>
__device__ void compress_stats(const CompressArgs<T>& a, int64_t b, const int64_t* t0, const int64_t* col0, int ns,
                               int64_t ch, double* mx_out, double* sum_out, double* val_out) {
  double mx = -d_inf(), sum = 0, out = 0;
  for (int g = 0; g < ns; ++g)
    for (int64_t r = 0; r < a.m; ++r) {
      int64_t off = (b * a.Tn + t0[g] + r) * a.W + col0[g] + ch;
      mx = d_max(mx, double(a.score[off]) + double(a.ape[r * a.W + col0[g] + ch]));
    }
  for (int g = 0; g < ns; ++g)
    for (int64_t r = 0; r < a.m; ++r) {
      int64_t off = (b * a.Tn + t0[g] + r) * a.W + col0[g] + ch;
      double e = exp(double(a.score[off]) + double(a.ape[r * a.W + col0[g] + ch]) - mx);
      sum += e;
      out += e * double(a.kv[off]);
    }
  *mx_out = mx;
  *sum_out = sum;
  *val_out = out / sum;
}

// One thread per (b, n, ch): out (B,NB,c), zero for padding blocks.
template <class T>
__global__ void compress_forward_kernel(CompressArgs<T> a, T* out) {
  TS_CUDA_KERNEL_LOOP(idx, a.B * a.NB * a.c) {
    int64_t ch = idx % a.c, bn = idx / a.c, b = bn / a.NB, n = bn % a.NB;
    int64_t t0[2], col0[2];
    int ns = compress_segments(a, b, n, t0, col0);
    if (ns == 0) {
      out[idx] = T(0);
      continue;
    }
    double mx, sum, val;
    compress_stats(a, b, t0, col0, ns, ch, &mx, &sum, &val);
    out[idx] = T(val);
  }
}

// One thread per (b, n, ch): the softmax statistics into stats (3, B*NB*c) (padding blocks: unused).
template <class T>
__global__ void compress_stats_kernel(CompressArgs<T> a, double* stats) {
  int64_t total = a.B * a.NB * a.c;
  TS_CUDA_KERNEL_LOOP(idx, total) {
    int64_t ch = idx % a.c, bn = idx / a.c, b = bn / a.NB, n = bn % a.NB;
    int64_t t0[2], col0[2];
    int ns = compress_segments(a, b, n, t0, col0);
    if (ns == 0) continue;
    compress_stats(a, b, t0, col0, ns, ch, stats + idx, stats + total + idx, stats + 2 * total + idx);
  }
}

// One thread per (b, ch): visits batch b's blocks in order and is the only writer of batch b's columns ch and
// col0 + ch of dkv and dscore (zeroed before) and of dape_part (B, m, W) (zeroed before) at those columns.
template <class T>
__global__ void compress_backward_kernel(CompressArgs<T> a, const double* stats, const T* g, T* dk, T* dz,
                                         double* dape_part) {
  int64_t total = a.B * a.NB * a.c;
  TS_CUDA_KERNEL_LOOP(idx, a.B * a.c) {
    int64_t b = idx / a.c, ch = idx % a.c;
    for (int64_t n = 0; n < a.NB; ++n) {
      int64_t t0[2], col0[2];
      int ns = compress_segments(a, b, n, t0, col0);
      if (ns == 0) continue;
      int64_t si = (b * a.NB + n) * a.c + ch;
      double mx = stats[si], sum = stats[total + si], val = stats[2 * total + si];
      double gj = double(g[si]);
      // out = sum_r p_r v_r: dv_r = p_r g, dz_r = p_r (v_r - out) g.
      for (int gi = 0; gi < ns; ++gi)
        for (int64_t r = 0; r < a.m; ++r) {
          int64_t off = (b * a.Tn + t0[gi] + r) * a.W + col0[gi] + ch;
          int64_t aoff = r * a.W + col0[gi] + ch;
          double p = exp(double(a.score[off]) + double(a.ape[aoff]) - mx) / sum;
          double dlogit = p * (double(a.kv[off]) - val) * gj;
          dk[off] += T(p * gj);
          dz[off] += T(dlogit);
          dape_part[b * a.m * a.W + aoff] += dlogit;
        }
    }
  }
}

// dape (m, W) += sum over b of dape_part (B, m, W), in batch order.
template <class T>
__global__ void compress_dape_sum(const double* part, int64_t B, int64_t mW, T* da) {
  TS_CUDA_KERNEL_LOOP(idx, mW) {
    double acc = 0;
    for (int64_t b = 0; b < B; ++b) acc += part[b * mW + idx];
    da[idx] += T(acc);
  }
}

template <class T>
CompressArgs<T> compress_args(const Tensor& kv, const Tensor& score, const Tensor& ape, const Tensor& bs,
                              const Tensor& ps, int64_t m, int64_t c) {
  return {dptr<T>(kv), dptr<T>(score), dptr<T>(ape), dptr<int32_t>(bs), dptr<int32_t>(ps), kv.size(0), kv.size(1),
          kv.size(2), bs.size(1), c, m, kv.size(2) / c};
}

}  // namespace

void CudaV4Kernels::router_scores_forward(const Tensor& logits, int score_func, const Tensor& scores) {
  dispatch_float(logits, [&]<class T>() {
    int64_t n = logits.size(0), e = logits.size(1);
    if (n * e == 0) return;
    if (score_func == 2) {
      router_softmax_forward<T><<<grid_rows(n), kBlock>>>(dptr<T>(logits), n, e, dptr<T>(scores));
    } else {
      router_elementwise_forward<T><<<grid_for(n * e), kBlock>>>(dptr<T>(logits), n * e, score_func,
                                                                 dptr<T>(scores));
    }
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::router_scores_backward(const Tensor& logits, const Tensor& /*scores*/, const Tensor& dscores,
                                           int score_func, const Tensor& dlogits) {
  // Recomputed from the logits in double rather than read from (possibly fp32) scores, as on the CPU.
  dispatch_float(logits, [&]<class T>() {
    int64_t n = logits.size(0), e = logits.size(1);
    if (n * e == 0) return;
    if (score_func == 2) {
      router_softmax_backward<T><<<grid_rows(n), kBlock>>>(dptr<T>(logits), dptr<T>(dscores), n, e,
                                                          dptr<T>(dlogits));
    } else {
      router_elementwise_backward<T><<<grid_for(n * e), kBlock>>>(dptr<T>(logits), dptr<T>(dscores), n * e,
                                                                  score_func, dptr<T>(dlogits));
    }
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::topk_indices(const Tensor& scores, const Tensor& bias, const Tensor& idx) {
  dispatch_float(scores, [&]<class T>() {
    int64_t n = scores.size(0), e = scores.size(1), k = idx.size(1);
    if (n == 0 || k == 0) return;
    topk_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(scores), dptr<T>(bias), n, e, k, dptr<int32_t>(idx));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::route_weights_forward(const Tensor& scores, const Tensor& idx, bool normalize,
                                          double route_scale, const Tensor& weights) {
  dispatch_float(scores, [&]<class T>() {
    int64_t n = scores.size(0), e = scores.size(1), k = idx.size(1);
    if (n == 0 || k == 0) return;
    route_weights_forward_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(scores), dptr<int32_t>(idx), n, e, k,
                                                             normalize, route_scale, dptr<T>(weights));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::route_weights_backward(const Tensor& scores, const Tensor& idx, const Tensor& dweights,
                                           bool normalize, double route_scale, const Tensor& dscores) {
  dispatch_float(scores, [&]<class T>() {
    int64_t n = scores.size(0), e = scores.size(1), k = idx.size(1);
    if (n == 0 || k == 0) return;
    route_weights_backward_kernel<T><<<grid_for(n), kBlock>>>(dptr<T>(scores), dptr<int32_t>(idx),
                                                              dptr<T>(dweights), n, e, k, normalize, route_scale,
                                                              dptr<T>(dscores));
    TS_CUDA_LAUNCH_CHECK();
  });
}

double CudaV4Kernels::balance_loss(const Tensor& scores, const Tensor& idx, double alpha, double grad_scale,
                                   const Tensor& dscores) {
  int64_t B = scores.size(0), Tn = scores.size(1), E = scores.size(2), k = idx.size(2);
  // f (B*E), then per-row shares (B*Tn), then their total (1), all double.
  Tensor tmp = Tensor::empty({B * E + B * Tn + 1}, DType::f64, Device::cuda);
  double* f = dptr<double>(tmp);
  double* row = f + B * E;
  double* total = row + B * Tn;
  dispatch_float(scores, [&]<class T>() {
    if (B * E > 0) {
      balance_counts<<<grid_rows(B * E), kBlock>>>(dptr<int32_t>(idx), B, Tn, E, k, f);
      TS_CUDA_LAUNCH_CHECK();
    }
    if (B * Tn > 0) {
      balance_rows<T><<<grid_rows(B * Tn), kBlock>>>(dptr<T>(scores), f, B, Tn, E, alpha, grad_scale, row,
                                                     dptr<T>(dscores));
      TS_CUDA_LAUNCH_CHECK();
    }
    sum_doubles<<<1, kBlock>>>(row, B * Tn, total);
    TS_CUDA_LAUNCH_CHECK();
  });
  return alpha * read_scalar(total) / double(B * Tn);
}

void CudaV4Kernels::gather_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst) {
  dispatch_float(src, [&]<class T>() {
    int64_t M = dst.size(0), C = dst.size(1);
    if (M * C == 0) return;
    gather_rows_kernel<T><<<grid_for(M * C), kBlock>>>(dptr<T>(src), dptr<int32_t>(rows), dptr<T>(scale), M, C,
                                                       dptr<T>(dst));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale,
                                     const Tensor& dst) {
  int64_t M = src.size(0), C = src.size(1);
  if (M * C == 0) return;
  TS_CHECK(M < INT_MAX, "CUDA scatter_add_rows: too many rows (", M, ")");
  // Stable sort of (rows[i], i) by row: each destination row's sources in source order.
  Tensor sorted = Tensor::empty({3, M}, DType::i32, Device::cuda);
  int32_t* iota = dptr<int32_t>(sorted);
  int32_t* keys = iota + M;
  int32_t* src_of = keys + M;
  iota_i32<<<grid_for(M), kBlock>>>(iota, M);
  TS_CUDA_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  TS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, dptr<int32_t>(rows), keys, iota, src_of,
                                                int(M), 0, int(sizeof(int32_t) * 8), cudaStream_t(0)));
  Tensor temp = Tensor::empty({int64_t(temp_bytes / 8 + 1)}, DType::i64, Device::cuda);
  TS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw(), temp_bytes, dptr<int32_t>(rows), keys, iota, src_of,
                                                int(M), 0, int(sizeof(int32_t) * 8), cudaStream_t(0)));
  dispatch_float(src, [&]<class T>() {
    scatter_add_sorted<T><<<grid_for(M * C), kBlock>>>(dptr<T>(src), keys, src_of, dptr<T>(scale), M, C,
                                                       dptr<T>(dst));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::rows_dot(const Tensor& src, const Tensor& other, const Tensor& rows, const Tensor& out) {
  dispatch_float(src, [&]<class T>() {
    int64_t M = src.size(0), C = src.size(1);
    if (M == 0) return;
    rows_dot_kernel<T><<<grid_rows(M), kBlock>>>(dptr<T>(src), dptr<T>(other), dptr<int32_t>(rows), M, C,
                                                 dptr<T>(out));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::compress_forward(const Tensor& kv, const Tensor& score, const Tensor& ape,
                                     const Tensor& block_start, const Tensor& prev_start, int64_t m,
                                     const Tensor& out) {
  dispatch_float(kv, [&]<class T>() {
    CompressArgs<T> a = compress_args<T>(kv, score, ape, block_start, prev_start, m, out.size(2));
    if (a.B * a.NB * a.c == 0) return;
    compress_forward_kernel<T><<<grid_for(a.B * a.NB * a.c), kBlock>>>(a, dptr<T>(out));
    TS_CUDA_LAUNCH_CHECK();
  });
}

void CudaV4Kernels::compress_backward(const Tensor& kv, const Tensor& score, const Tensor& ape,
                                      const Tensor& block_start, const Tensor& prev_start, int64_t m,
                                      const Tensor& dout, const Tensor& dkv, const Tensor& dscore,
                                      const Tensor& dape) {
  dispatch_float(kv, [&]<class T>() {
    CompressArgs<T> a = compress_args<T>(kv, score, ape, block_start, prev_start, m, dout.size(2));
    // dkv, dscore are assigned: zero for tokens in no block (all-zero bits are 0.0 in f32 and f64).
    if (kv.numel() > 0) {
      TS_CUDA_CHECK(cudaMemsetAsync(dptr<T>(dkv), 0, size_t(kv.numel()) * sizeof(T), cudaStream_t(0)));
      TS_CUDA_CHECK(cudaMemsetAsync(dptr<T>(dscore), 0, size_t(kv.numel()) * sizeof(T), cudaStream_t(0)));
    }
    int64_t total = a.B * a.NB * a.c, mW = a.m * a.W;
    if (total == 0) return;  // no blocks: dape unchanged
    Tensor stats = Tensor::empty({3, total}, DType::f64, Device::cuda);
    int64_t nbatch = a.B;
    Tensor part = Tensor::empty({nbatch, mW}, DType::f64, Device::cuda);
    TS_CUDA_CHECK(cudaMemsetAsync(dptr<double>(part), 0, size_t(nbatch * mW) * sizeof(double), cudaStream_t(0)));
    compress_stats_kernel<T><<<grid_for(total), kBlock>>>(a, dptr<double>(stats));
    TS_CUDA_LAUNCH_CHECK();
    compress_backward_kernel<T><<<grid_for(a.B * a.c), kBlock>>>(a, dptr<double>(stats), dptr<T>(dout),
                                                                 dptr<T>(dkv), dptr<T>(dscore), dptr<double>(part));
    TS_CUDA_LAUNCH_CHECK();
    compress_dape_sum<T><<<grid_for(mW), kBlock>>>(dptr<double>(part), a.B, mW, dptr<T>(dape));
    TS_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace tessera
