// CPU kernels for MoE routing, token movement and the compressors (contracts: src/ops/v4_ops.h). Small
// reductions accumulate in double; every reduction has a fixed order (per row, or per column owned by one loop
// iteration), so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_common.h"
#include "backend/cpu/cpu_v4.h"

namespace tessera {
using namespace cpu;
namespace {

// Columns are processed in fixed blocks so that sums over rows are thread-count independent.
constexpr int64_t kColBlock = 64;
// The compressor backward owns channel blocks of this width (small: c can be 128).
constexpr int64_t kChanBlock = 8;

// log(1 + e^x) without overflow for large x or cancellation for very negative x.
double softplus(double x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  double e = std::exp(x);
  return e / (1.0 + e);
}

// Row softmax of x (length e) into p, in double.
template <class T>
void softmax_row(const T* x, int64_t e, double* p) {
  double mx = -kInf, sum = 0;
  for (int64_t j = 0; j < e; ++j) mx = std::max(mx, double(x[j]));
  for (int64_t j = 0; j < e; ++j) sum += (p[j] = std::exp(double(x[j]) - mx));
  for (int64_t j = 0; j < e; ++j) p[j] /= sum;
}

// row(i, p) for the rows i of an (n, e) router tensor, parallel over rows; p: a per-thread scratch row of e doubles.
template <class F>
void for_each_router_row(int64_t n, int64_t e, F&& row) {
#pragma omp parallel
  {
    std::vector<double> p(e);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) row(i, p.data());
  }
}

}  // namespace

void CpuV4Kernels::router_scores_forward(const Tensor& logits, int score_func, const Tensor& scores) {
  dispatch_float(logits, [&]<class T>() {
    const T* x = logits.data<T>();
    T* s = scores.data<T>();
    int64_t n = logits.size(0), e = logits.size(1);
    for_each_router_row(n, e, [&](int64_t i, double* p) {
      const T* xi = x + i * e;
      T* si = s + i * e;
      if (score_func == 2) {
        softmax_row(xi, e, p);
        for (int64_t j = 0; j < e; ++j) si[j] = T(p[j]);
      } else {
        for (int64_t j = 0; j < e; ++j)
          si[j] = T(score_func == 0 ? std::sqrt(softplus(double(xi[j]))) : sigmoid(double(xi[j])));
      }
    });
  });
}

void CpuV4Kernels::router_scores_backward(const Tensor& logits, const Tensor& scores, const Tensor& dscores,
                                          int score_func, const Tensor& dlogits) {
  // Recomputed from the logits in double rather than read from (possibly fp32) scores.
  dispatch_float(logits, [&]<class T>() {
    const T* x = logits.data<T>();
    const T* g = dscores.data<T>();
    T* d = dlogits.data<T>();
    int64_t n = logits.size(0), e = logits.size(1);
    for_each_router_row(n, e, [&](int64_t i, double* p) {
      const T* xi = x + i * e;
      const T* gi = g + i * e;
      T* di = d + i * e;
      if (score_func == 2) {
        softmax_row(xi, e, p);
        double dot = 0;
        for (int64_t j = 0; j < e; ++j) dot += p[j] * double(gi[j]);
        for (int64_t j = 0; j < e; ++j) di[j] = T(p[j] * (double(gi[j]) - dot));
      } else if (score_func == 1) {
        for (int64_t j = 0; j < e; ++j) {
          double sg = sigmoid(double(xi[j]));
          di[j] = T(double(gi[j]) * sg * (1 - sg));
        }
      } else {
        // d sqrt(sp)/dx = sigmoid / (2 sqrt(sp)); both underflow together for x << 0, where the limit is 0.
        for (int64_t j = 0; j < e; ++j) {
          double sp = softplus(double(xi[j]));
          di[j] = sp > 0 ? T(double(gi[j]) * sigmoid(double(xi[j])) / (2 * std::sqrt(sp))) : T(0);
        }
      }
    });
  });
}

void CpuV4Kernels::topk_indices(const Tensor& scores, const Tensor& bias, const Tensor& idx) {
  dispatch_float(scores, [&]<class T>() {
    const T* s = scores.data<T>();
    const T* b = ptr_or_null<T>(bias);
    int32_t* out = idx.data<int32_t>();
    int64_t n = scores.size(0), e = scores.size(1), k = idx.size(1);
#pragma omp parallel
    {
      std::vector<double> key(e);
      std::vector<int32_t> cand;
      cand.reserve(e);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        cand.clear();
        for (int64_t j = 0; j < e; ++j) {
          key[j] = double(s[i * e + j]) + (b ? double(b[j]) : 0.0);
          if (key[j] > -kInf) cand.push_back(int32_t(j));  // drops -inf (and NaN)
        }
        int64_t take = std::min<int64_t>(k, int64_t(cand.size()));
        std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), [&](int32_t a, int32_t c) {
          return key[a] > key[c] || (key[a] == key[c] && a < c);
        });
        int32_t* oi = out + i * k;
        for (int64_t j = 0; j < k; ++j) oi[j] = j < take ? cand[j] : -1;
      }
    }
  });
}

void CpuV4Kernels::route_weights_forward(const Tensor& scores, const Tensor& idx, bool normalize, double route_scale,
                                         const Tensor& weights) {
  dispatch_float(scores, [&]<class T>() {
    const T* s = scores.data<T>();
    const int32_t* id = idx.data<int32_t>();
    T* w = weights.data<T>();
    int64_t n = scores.size(0), e = scores.size(1), k = idx.size(1);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* ii = id + i * k;
      double sum = 0;
      for (int64_t j = 0; j < k; ++j)
        if (ii[j] >= 0) sum += double(s[i * e + ii[j]]);
      double denom = (normalize && sum != 0) ? sum : 1.0;  // an all-zero selection keeps weight 0, not NaN
      for (int64_t j = 0; j < k; ++j) w[i * k + j] = ii[j] >= 0 ? T(route_scale * double(s[i * e + ii[j]]) / denom) : T(0);
    }
  });
}

void CpuV4Kernels::route_weights_backward(const Tensor& scores, const Tensor& idx, const Tensor& dweights,
                                          bool normalize, double route_scale, const Tensor& dscores) {
  dispatch_float(scores, [&]<class T>() {
    const T* s = scores.data<T>();
    const int32_t* id = idx.data<int32_t>();
    const T* g = dweights.data<T>();
    T* ds = dscores.data<T>();
    int64_t n = scores.size(0), e = scores.size(1), k = idx.size(1);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* ii = id + i * k;
      const T* gi = g + i * k;
      double sum = 0, dot = 0;  // dot = sum_j g_j s_j over valid slots
      for (int64_t j = 0; j < k; ++j)
        if (ii[j] >= 0) sum += double(s[i * e + ii[j]]), dot += double(gi[j]) * double(s[i * e + ii[j]]);
      double denom = (normalize && sum != 0) ? sum : 1.0;
      // w_j = r s_j / S  =>  dL/ds_i = r / S (g_i - dot / S); without normalisation r g_i.
      for (int64_t j = 0; j < k; ++j) {
        if (ii[j] < 0) continue;
        double grad = normalize ? route_scale / denom * (double(gi[j]) - dot / denom) : route_scale * double(gi[j]);
        ds[i * e + ii[j]] += T(grad);
      }
    }
  });
}

double CpuV4Kernels::balance_loss(const Tensor& scores, const Tensor& idx, double alpha, double grad_scale,
                                  const Tensor& dscores) {
  double loss = 0;
  dispatch_float(scores, [&]<class T>() {
    const T* s = scores.data<T>();
    const int32_t* id = idx.data<int32_t>();
    T* ds = ptr_or_null<T>(dscores);
    int64_t B = scores.size(0), Tn = scores.size(1), E = scores.size(2), k = idx.size(2);
    // f (B,E): E/(kT) * number of tokens whose selection contains expert i (a repeated slot counts once).
    std::vector<double> f(B * E, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < Tn; ++t) {
        const int32_t* it = id + (b * Tn + t) * k;
        for (int64_t j = 0; j < k; ++j)
          if (it[j] >= 0 && std::find(it, it + j, it[j]) == it + j) f[b * E + it[j]] += 1;
      }
      for (int64_t i = 0; i < E; ++i) f[b * E + i] *= double(E) / double(k * Tn);
    }
    // Per token: sum_i f_i s_i / S_t, summed afterwards in token order.
    std::vector<double> row(B * Tn, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < B * Tn; ++r) {
      const double* fb = f.data() + (r / Tn) * E;
      const T* sr = s + r * E;
      double sum = 0, dot = 0;
      for (int64_t i = 0; i < E; ++i) sum += double(sr[i]), dot += fb[i] * double(sr[i]);
      if (sum == 0) continue;  // all-zero scores: no defined share, no contribution
      row[r] = dot / sum;
      if (ds) {
        // d/ds_i of dot/S = (f_i - dot/S) / S.
        double c = grad_scale * alpha / (double(B * Tn) * sum);
        for (int64_t i = 0; i < E; ++i) ds[r * E + i] += T(c * (fb[i] - row[r]));
      }
    }
    double total = 0;
    for (double v : row) total += v;
    loss = alpha * total / double(B * Tn);
  });
  return loss;
}

void CpuV4Kernels::gather_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst) {
  dispatch_float(src, [&]<class T>() {
    const T* x = src.data<T>();
    const int32_t* r = rows.data<int32_t>();
    const T* sc = ptr_or_null<T>(scale);
    T* o = dst.data<T>();
    int64_t M = dst.size(0), C = dst.size(1);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const T* xi = x + int64_t(r[i]) * C;
      T* oi = o + i * C;
      if (sc) for (int64_t j = 0; j < C; ++j) oi[j] = sc[i] * xi[j];
      else std::copy(xi, xi + C, oi);
    }
  });
}

void CpuV4Kernels::scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst) {
  dispatch_float(src, [&]<class T>() {
    const T* x = src.data<T>();
    const int32_t* r = rows.data<int32_t>();
    const T* sc = ptr_or_null<T>(scale);
    T* o = dst.data<T>();
    int64_t M = src.size(0), C = src.size(1);
    // Parallel over column blocks, rows in order: repeated rows add up deterministically.
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += kColBlock) {
      int64_t c1 = std::min(C, c0 + kColBlock);
      for (int64_t i = 0; i < M; ++i) {
        T* oi = o + int64_t(r[i]) * C;
        const T* xi = x + i * C;
        T a = sc ? sc[i] : T(1);
        for (int64_t j = c0; j < c1; ++j) oi[j] += a * xi[j];
      }
    }
  });
}

void CpuV4Kernels::rows_dot(const Tensor& src, const Tensor& other, const Tensor& rows, const Tensor& out) {
  dispatch_float(src, [&]<class T>() {
    const T* x = src.data<T>();
    const T* y = other.data<T>();
    const int32_t* r = rows.data<int32_t>();
    T* o = out.data<T>();
    int64_t M = src.size(0), C = src.size(1);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const T* xi = x + i * C;
      const T* yi = y + int64_t(r[i]) * C;
      double acc = 0;
      for (int64_t j = 0; j < C; ++j) acc += double(xi[j]) * double(yi[j]);
      o[i] = T(acc);
    }
  });
}

namespace {

// One compressed block: up to two segments of m tokens (the block's own, then for S = 2 the previous block's).
// Segment rows t0..t0+m-1 use columns col0 + ch of kv/score and ape row t - t0, column col0 + ch.
struct Segment {
  int64_t t0, col0;
};

template <class T>
struct Compressor {
  const T *kv, *score, *ape;
  const int32_t *block_start, *prev_start;
  int64_t B, Tn, W, NB, c, m, S;

  Compressor(const Tensor& kv_, const Tensor& score_, const Tensor& ape_, const Tensor& bs, const Tensor& ps,
             int64_t m_, int64_t c_)
      : kv(kv_.data<T>()), score(score_.data<T>()), ape(ape_.data<T>()), block_start(bs.data<int32_t>()),
        prev_start(ps.data<int32_t>()), B(kv_.size(0)), Tn(kv_.size(1)), W(kv_.size(2)), NB(bs.size(1)), c(c_),
        m(m_), S(kv_.size(2) / c_) {}

  // The segments of block (b, n); 0 for padding.
  int segments(int64_t b, int64_t n, Segment* seg) const {
    int64_t st = block_start[b * NB + n], pv = prev_start[b * NB + n];
    if (st < 0) return 0;
    int k = 0;
    seg[k++] = {st, S == 2 ? c : 0};
    if (S == 2 && pv >= 0) seg[k++] = {pv, 0};
    return k;
  }

  // Per channel ch in [c0, c1) of block b: softmax max mx, denominator sum and output out (indexed ch - c0).
  void stats(int64_t b, const Segment* seg, int ns, int64_t c0, int64_t c1, double* mx, double* sum,
             double* out) const {
    int64_t w = c1 - c0;
    std::fill(mx, mx + w, -kInf);
    std::fill(sum, sum + w, 0.0);
    std::fill(out, out + w, 0.0);
    for (int g = 0; g < ns; ++g)
      for (int64_t r = 0; r < m; ++r) {
        const T* z = score + (b * Tn + seg[g].t0 + r) * W + seg[g].col0 + c0;
        const T* a = ape + r * W + seg[g].col0 + c0;
        for (int64_t j = 0; j < w; ++j) mx[j] = std::max(mx[j], double(z[j]) + double(a[j]));
      }
    for (int g = 0; g < ns; ++g)
      for (int64_t r = 0; r < m; ++r) {
        int64_t off = (b * Tn + seg[g].t0 + r) * W + seg[g].col0 + c0;
        const T* a = ape + r * W + seg[g].col0 + c0;
        for (int64_t j = 0; j < w; ++j) {
          double e = std::exp(double(score[off + j]) + double(a[j]) - mx[j]);
          sum[j] += e;
          out[j] += e * double(kv[off + j]);
        }
      }
    for (int64_t j = 0; j < w; ++j) out[j] /= sum[j];
  }
};

}  // namespace

void CpuV4Kernels::compress_forward(const Tensor& kv, const Tensor& score, const Tensor& ape,
                                    const Tensor& block_start, const Tensor& prev_start, int64_t m, const Tensor& out) {
  dispatch_float(kv, [&]<class T>() {
    int64_t c = out.size(2);
    Compressor<T> cp(kv, score, ape, block_start, prev_start, m, c);
    T* o = out.data<T>();
#pragma omp parallel
    {
      std::vector<double> mx(c), sum(c), val(c);
#pragma omp for schedule(static) collapse(2)
      for (int64_t b = 0; b < cp.B; ++b)
        for (int64_t n = 0; n < cp.NB; ++n) {
          Segment seg[2];
          int ns = cp.segments(b, n, seg);
          T* on = o + (b * cp.NB + n) * c;
          if (ns == 0) {
            std::fill(on, on + c, T(0));
            continue;
          }
          cp.stats(b, seg, ns, 0, c, mx.data(), sum.data(), val.data());
          for (int64_t j = 0; j < c; ++j) on[j] = T(val[j]);
        }
    }
  });
}

void CpuV4Kernels::compress_backward(const Tensor& kv, const Tensor& score, const Tensor& ape,
                                     const Tensor& block_start, const Tensor& prev_start, int64_t m,
                                     const Tensor& dout, const Tensor& dkv, const Tensor& dscore,
                                     const Tensor& dape) {
  dispatch_float(kv, [&]<class T>() {
    int64_t c = dout.size(2);
    Compressor<T> cp(kv, score, ape, block_start, prev_start, m, c);
    const T* g = dout.data<T>();
    T* dk = dkv.data<T>();
    T* dz = dscore.data<T>();
    T* da = dape.data<T>();
    int64_t W = cp.W, Tn = cp.Tn;
    // Each iteration owns channels [c0, c1) and their partners (ch and c + ch): it is the only writer of those
    // columns of dkv, dscore and dape and visits blocks in order, so overlapping uses add up deterministically.
#pragma omp parallel
    {
      std::vector<double> mx(kChanBlock), sum(kChanBlock), val(kChanBlock);
#pragma omp for schedule(static)
      for (int64_t c0 = 0; c0 < c; c0 += kChanBlock) {
        int64_t c1 = std::min(c, c0 + kChanBlock), w = c1 - c0;
        for (int64_t s = 0; s < cp.S; ++s)
          for (int64_t bt = 0; bt < cp.B * Tn; ++bt) {
            std::fill(dk + bt * W + s * c + c0, dk + bt * W + s * c + c1, T(0));
            std::fill(dz + bt * W + s * c + c0, dz + bt * W + s * c + c1, T(0));
          }
        for (int64_t b = 0; b < cp.B; ++b)
          for (int64_t n = 0; n < cp.NB; ++n) {
            Segment seg[2];
            int ns = cp.segments(b, n, seg);
            if (ns == 0) continue;
            cp.stats(b, seg, ns, c0, c1, mx.data(), sum.data(), val.data());
            const T* gn = g + (b * cp.NB + n) * c + c0;
            // out = sum_r p_r v_r: dv_r = p_r g, dz_r = p_r (v_r - out) g.
            for (int gi = 0; gi < ns; ++gi)
              for (int64_t r = 0; r < m; ++r) {
                int64_t off = (b * Tn + seg[gi].t0 + r) * W + seg[gi].col0 + c0;
                int64_t aoff = r * W + seg[gi].col0 + c0;
                for (int64_t j = 0; j < w; ++j) {
                  double p = std::exp(double(cp.score[off + j]) + double(cp.ape[aoff + j]) - mx[j]) / sum[j];
                  double gj = double(gn[j]);
                  double dlogit = p * (double(cp.kv[off + j]) - val[j]) * gj;
                  dk[off + j] += T(p * gj);
                  dz[off + j] += T(dlogit);
                  da[aoff + j] += T(dlogit);
                }
              }
          }
      }
    }
  });
}

}  // namespace tessera
