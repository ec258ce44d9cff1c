// CPU backend: OpenBLAS for the large GEMMs, Eigen for the small per-head products inside attention,
// OpenMP across rows/heads. Every reduction over rows has a fixed order that does not depend on the thread
// count, so results are reproducible.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_common.h"
#include "backend/cpu/cpu_v4.h"

namespace tessera {
using namespace cpu;
namespace {

void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, double beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k,
              static_cast<float>(alpha), a, lda, b, ldb, static_cast<float>(beta), c, ldc);
}
void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
               const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a,
              lda, b, ldb, beta, c, ldc);
}

// Columns are processed in fixed blocks so that column sums over rows are thread-count independent.
constexpr int64_t kColBlock = 64;

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu; }
  const char* name() const override { return "cpu"; }
  V4Kernels& v4() override { return v4_; }

  void gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c, double alpha,
            double beta) override {
    int64_t batch = c.ndim() == 3 ? c.size(0) : 1;
    int64_t m = c.size(-2), n = c.size(-1);
    int64_t k = ta ? a.size(-2) : a.size(-1);
    int64_t a_step = (a.ndim() == 3 && a.size(0) > 1) ? a.size(-2) * a.size(-1) : 0;
    int64_t b_step = (b.ndim() == 3 && b.size(0) > 1) ? b.size(-2) * b.size(-1) : 0;
    dispatch_float(c, [&]<class T>() {
      for (int64_t i = 0; i < batch; ++i)
        blas_gemm(ta, tb, m, n, k, alpha, a.data<T>() + i * a_step, a.size(-1), b.data<T>() + i * b_step,
                  b.size(-1), beta, c.data<T>() + i * m * n, n);
    });
  }

  void transpose01(const Tensor& x, const Tensor& out) override {
    dispatch_float(x, [&]<class T>() {
      const T* xs = x.data<T>();
      T* o = out.data<T>();
      int64_t A = x.size(0), B = x.size(1), C = x.size(2);
#pragma omp parallel for schedule(static)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t a = 0; a < A; ++a) std::copy(xs + (a * B + b) * C, xs + (a * B + b + 1) * C, o + (b * A + a) * C);
    });
  }

  void fill(const Tensor& x, double value) override {
    dispatch_float(x, [&]<class T>() {
      T* p = x.data<T>();
      int64_t n = x.numel();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(value);
    });
  }

  void axpy(double alpha, const Tensor& x, const Tensor& y) override {
    dispatch_float(x, [&]<class T>() {
      const T* xs = x.data<T>();
      T* ys = y.data<T>();
      T al = static_cast<T>(alpha);
      int64_t n = x.numel();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) ys[i] += al * xs[i];
    });
  }

  void scale(const Tensor& x, double alpha) override {
    dispatch_float(x, [&]<class T>() {
      T* p = x.data<T>();
      T al = static_cast<T>(alpha);
      int64_t n = x.numel();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) p[i] *= al;
    });
  }

  double sum_squares(const Tensor& x) override {
    double total = 0;
    dispatch_float(x, [&]<class T>() {
      const T* p = x.data<T>();
      int64_t n = x.numel();
      constexpr int64_t kChunk = 4096;  // fixed chunks, summed in order: thread-count independent
      int64_t chunks = (n + kChunk - 1) / kChunk;
      std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        double s = 0;
        for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) s += double(p[i]) * double(p[i]);
        partial[c] = s;
      }
      for (double s : partial) total += s;
    });
    return total;
  }

  void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) override {
    dispatch_float(table, [&]<class T>() {
      const int32_t* id = ids.data<int32_t>();
      const T* w = table.data<T>();
      T* o = out.data<T>();
      int64_t n = ids.numel(), c = table.size(1);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) std::copy(w + int64_t(id[i]) * c, w + int64_t(id[i] + 1) * c, o + i * c);
    });
  }

  void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) override {
    dispatch_float(dtable, [&]<class T>() {
      const int32_t* id = ids.data<int32_t>();
      const T* g = dout.data<T>();
      T* dw = dtable.data<T>();
      int64_t n = ids.numel(), c = dtable.size(1);
#pragma omp parallel for schedule(static)
      for (int64_t c0 = 0; c0 < c; c0 += kColBlock) {
        int64_t c1 = std::min(c, c0 + kColBlock);
        for (int64_t i = 0; i < n; ++i) {
          T* row = dw + int64_t(id[i]) * c;
          const T* gi = g + i * c;
          for (int64_t j = c0; j < c1; ++j) row[j] += gi[j];
        }
      }
    });
  }

  void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& out,
                       const Tensor& rstd) override {
    dispatch_float(x, [&]<class T>() {
      const T* xs = x.data<T>();
      const T* w = ptr_or_null<T>(weight);
      T* o = out.data<T>();
      T* rs = rstd.data<T>();
      int64_t n = x.size(0), c = x.size(1);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xi = xs + i * c;
        T ss = 0;
        for (int64_t j = 0; j < c; ++j) ss += xi[j] * xi[j];
        T r = T(1) / std::sqrt(ss / T(c) + T(eps));
        rs[i] = r;
        T* oi = o + i * c;
        if (w) for (int64_t j = 0; j < c; ++j) oi[j] = xi[j] * r * w[j];
        else for (int64_t j = 0; j < c; ++j) oi[j] = xi[j] * r;
      }
    });
  }

  void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dout,
                        const Tensor& dx, const Tensor& dweight) override {
    dispatch_float(x, [&]<class T>() {
      const T* xs = x.data<T>();
      const T* w = ptr_or_null<T>(weight);
      const T* rs = rstd.data<T>();
      const T* g = dout.data<T>();
      T* d = dx.data<T>();
      int64_t n = x.size(0), c = x.size(1);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xi = xs + i * c;
        const T* gi = g + i * c;
        T r = rs[i];
        T dot = 0;  // sum_j (g_j w_j) x_j
        for (int64_t j = 0; j < c; ++j) dot += gi[j] * (w ? w[j] : T(1)) * xi[j];
        T k = r * r * r * dot / T(c);
        T* di = d + i * c;
        for (int64_t j = 0; j < c; ++j) di[j] = r * gi[j] * (w ? w[j] : T(1)) - k * xi[j];
      }
      if (dweight.defined()) {
        T* dw = dweight.data<T>();
#pragma omp parallel for schedule(static)
        for (int64_t c0 = 0; c0 < c; c0 += kColBlock) {
          int64_t c1 = std::min(c, c0 + kColBlock);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = c0; j < c1; ++j) dw[j] += g[i * c + j] * xs[i * c + j] * rs[i];
        }
      }
    });
  }

  void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool interleaved, bool inverse,
            const Tensor& out) override {
    dispatch_float(x, [&]<class T>() {
      const T* xs = x.data<T>();
      T* o = out.data<T>();
      const int32_t* pos = positions.data<int32_t>();
      const double* freq = inv_freq.data<double>();
      int64_t bt = x.size(0) * x.size(1), h = x.size(2), d = x.size(3), half = inv_freq.numel();
      int64_t first = d - 2 * half;  // rotary dims are the last 2 * half of each head
      double sign = inverse ? -1.0 : 1.0;
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < bt; ++r) {
        std::vector<T> cs(half), sn(half);
        for (int64_t i = 0; i < half; ++i) {
          // Angles in fp32 like the reference implementations, then cos/sin.
          float ang = float(pos[r]) * float(freq[i]);
          cs[i] = T(std::cos(double(ang)));
          sn[i] = T(sign * std::sin(double(ang)));
        }
        for (int64_t hh = 0; hh < h; ++hh) {
          const T* xi = xs + (r * h + hh) * d;
          T* oi = o + (r * h + hh) * d;
          if (oi != xi) std::copy(xi, xi + first, oi);
          for (int64_t i = 0; i < half; ++i) {
            int64_t i0 = interleaved ? first + 2 * i : first + i;
            int64_t i1 = interleaved ? first + 2 * i + 1 : first + i + half;
            T a = xi[i0], b = xi[i1];
            oi[i0] = a * cs[i] - b * sn[i];
            oi[i1] = b * cs[i] + a * sn[i];
          }
        }
      }
    });
  }

  void swiglu_forward(const Tensor& gate, const Tensor& up, double limit, const Tensor& out) override {
    dispatch_float(gate, [&]<class T>() {
      const T* g = gate.data<T>();
      const T* u = up.data<T>();
      T* o = out.data<T>();
      int64_t n = gate.numel();
      const T lim = T(limit);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        T gi = g[i], ui = u[i];
        if (limit > 0) gi = std::min(gi, lim), ui = std::clamp(ui, -lim, lim);
        o[i] = gi / (T(1) + std::exp(-gi)) * ui;
      }
    });
  }

  void swiglu_backward(const Tensor& gate, const Tensor& up, double limit, const Tensor& dout, const Tensor& dgate,
                       const Tensor& dup) override {
    dispatch_float(gate, [&]<class T>() {
      const T* g = gate.data<T>();
      const T* u = up.data<T>();
      const T* d = dout.data<T>();
      T* dg = dgate.data<T>();
      T* du = dup.data<T>();
      int64_t n = gate.numel();
      const T lim = T(limit);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        T gi = g[i], ui = u[i];
        bool gate_clamped = limit > 0 && gi > lim, up_clamped = limit > 0 && (ui > lim || ui < -lim);
        if (limit > 0) gi = std::min(gi, lim), ui = std::clamp(ui, -lim, lim);
        T s = T(1) / (T(1) + std::exp(-gi));
        T silu = gi * s;
        dg[i] = gate_clamped ? T(0) : d[i] * ui * (s + silu * (T(1) - s));
        du[i] = up_clamped ? T(0) : d[i] * silu;
      }
    });
  }

  void softmax_forward(const Tensor& x, const Tensor& out) override {
    dispatch_float(x, [&]<class T>() {
      const T* xs = x.data<T>();
      T* o = out.data<T>();
      int64_t n = x.size(0), c = x.size(1);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xi = xs + i * c;
        T* oi = o + i * c;
        T m = *std::max_element(xi, xi + c), s = 0;
        for (int64_t j = 0; j < c; ++j) s += (oi[j] = std::exp(xi[j] - m));
        for (int64_t j = 0; j < c; ++j) oi[j] /= s;
      }
    });
  }

  void softmax_backward(const Tensor& y, const Tensor& dy, const Tensor& dx) override {
    dispatch_float(y, [&]<class T>() {
      const T* ys = y.data<T>();
      const T* g = dy.data<T>();
      T* d = dx.data<T>();
      int64_t n = y.size(0), c = y.size(1);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        T dot = 0;
        for (int64_t j = 0; j < c; ++j) dot += ys[i * c + j] * g[i * c + j];
        for (int64_t j = 0; j < c; ++j) d[i * c + j] = ys[i * c + j] * (g[i * c + j] - dot);
      }
    });
  }

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                         const Tensor& out, const Tensor& lse) override {
    dispatch_float(q, [&]<class T>() {
      int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), KH = k.size(2);
      int64_t group = H / KH;
      const int32_t* docs = ptr_or_null<int32_t>(doc);
#pragma omp parallel for schedule(static) collapse(2)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          std::vector<int64_t> start;
          document_starts(docs ? docs + b * Tq : nullptr, Tq, start);
          int64_t kh = h / group;
          StridedMap<T> Q(q.data<T>() + (b * Tq * H + h) * D, Tq, D, Eigen::OuterStride<>(H * D));
          StridedMap<T> K(k.data<T>() + (b * Tq * KH + kh) * D, Tq, D, Eigen::OuterStride<>(KH * D));
          StridedMap<T> V(v.data<T>() + (b * Tq * KH + kh) * D, Tq, D, Eigen::OuterStride<>(KH * D));
          StridedMap<T> O(out.data<T>() + (b * Tq * H + h) * D, Tq, D, Eigen::OuterStride<>(H * D));
          T* L = lse.data<T>() + (b * H + h) * Tq;
          RowMat<T> S = (Q * K.transpose()) * T(scale);
          for (int64_t i = 0; i < Tq; ++i) {
            T* s = S.row(i).data();
            T m = -std::numeric_limits<T>::infinity();
            for (int64_t j = start[i]; j <= i; ++j) m = std::max(m, s[j]);
            T sum = 0;
            for (int64_t j = 0; j < start[i]; ++j) s[j] = 0;
            for (int64_t j = start[i]; j <= i; ++j) sum += (s[j] = std::exp(s[j] - m));
            for (int64_t j = start[i]; j <= i; ++j) s[j] /= sum;
            for (int64_t j = i + 1; j < Tq; ++j) s[j] = 0;
            L[i] = m + std::log(sum);
          }
          O.noalias() = S * V;
        }
    });
  }

  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                          const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq,
                          const Tensor& dk, const Tensor& dv) override {
    dispatch_float(q, [&]<class T>() {
      int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), KH = k.size(2);
      int64_t group = H / KH;
      const int32_t* docs = ptr_or_null<int32_t>(doc);
      // Parallel over (batch, kv head): the heads sharing a kv head accumulate into it in a fixed order.
#pragma omp parallel for schedule(static) collapse(2)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t kh = 0; kh < KH; ++kh) {
          std::vector<int64_t> start;
          document_starts(docs ? docs + b * Tq : nullptr, Tq, start);
          StridedMap<T> K(k.data<T>() + (b * Tq * KH + kh) * D, Tq, D, Eigen::OuterStride<>(KH * D));
          StridedMap<T> V(v.data<T>() + (b * Tq * KH + kh) * D, Tq, D, Eigen::OuterStride<>(KH * D));
          StridedMap<T> dK(dk.data<T>() + (b * Tq * KH + kh) * D, Tq, D, Eigen::OuterStride<>(KH * D));
          StridedMap<T> dV(dv.data<T>() + (b * Tq * KH + kh) * D, Tq, D, Eigen::OuterStride<>(KH * D));
          dK.setZero();
          dV.setZero();
          for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
            StridedMap<T> Q(q.data<T>() + (b * Tq * H + h) * D, Tq, D, Eigen::OuterStride<>(H * D));
            StridedMap<T> O(out.data<T>() + (b * Tq * H + h) * D, Tq, D, Eigen::OuterStride<>(H * D));
            StridedMap<T> dO(dout.data<T>() + (b * Tq * H + h) * D, Tq, D, Eigen::OuterStride<>(H * D));
            StridedMap<T> dQ(dq.data<T>() + (b * Tq * H + h) * D, Tq, D, Eigen::OuterStride<>(H * D));
            const T* L = lse.data<T>() + (b * H + h) * Tq;
            RowMat<T> P = (Q * K.transpose()) * T(scale);  // recomputed probabilities
            for (int64_t i = 0; i < Tq; ++i) {
              T* p = P.row(i).data();
              for (int64_t j = 0; j < Tq; ++j) p[j] = (j >= start[i] && j <= i) ? std::exp(p[j] - L[i]) : T(0);
            }
            RowMat<T> dP = dO * V.transpose();
            for (int64_t i = 0; i < Tq; ++i) {
              T delta = O.row(i).dot(dO.row(i));  // sum_j P_ij dP_ij
              for (int64_t j = 0; j < Tq; ++j) dP(i, j) = P(i, j) * (dP(i, j) - delta) * T(scale);
            }
            dV.noalias() += P.transpose() * dO;
            dQ.noalias() = dP * K;
            dK.noalias() += dP.transpose() * Q;
          }
        }
    });
  }

  void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, double scale,
                        const Tensor& out) override {
    cpu::attention_decode(q, k, v, q_pos, scale, out);  // cpu_decode.cpp
  }
  void cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                     const Tensor& dlogits) override {
    dispatch_float(logits, [&]<class T>() {
      const T* x = logits.data<T>();
      const int32_t* tg = targets.data<int32_t>();
      T* ls = losses.data<T>();
      T* d = ptr_or_null<T>(dlogits);
      int64_t n = logits.size(0), V = logits.size(1);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xi = x + i * V;
        int32_t t = tg[i];
        if (t < 0) {
          ls[i] = 0;
          if (d) std::fill(d + i * V, d + (i + 1) * V, T(0));
          continue;
        }
        T m = *std::max_element(xi, xi + V), s = 0;
        for (int64_t j = 0; j < V; ++j) s += std::exp(xi[j] - m);
        T lse = m + std::log(s);
        ls[i] = lse - xi[t];
        if (d) {
          T* di = d + i * V;
          T sc = T(loss_scale);
          for (int64_t j = 0; j < V; ++j) di[j] = std::exp(xi[j] - lse) * sc;  // safe if di aliases xi
          di[t] -= sc;
        }
      }
    });
  }

  void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double bc1, double bc2) override {
    dispatch_float(param, [&]<class T>() {
      T* p = param.data<T>();
      const T* g = grad.data<T>();
      T* ms = m.data<T>();
      T* vs = v.data<T>();
      int64_t n = param.numel();
      T b1 = T(beta1), b2 = T(beta2), step = T(lr / bc1), decay = T(1 - lr * weight_decay);
      T sbc2 = T(std::sqrt(bc2)), e = T(eps);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        ms[i] = b1 * ms[i] + (T(1) - b1) * g[i];
        vs[i] = b2 * vs[i] + (T(1) - b2) * g[i] * g[i];
        // torch.optim.AdamW's order: decay first, then p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
        p[i] = p[i] * decay - step * ms[i] / (std::sqrt(vs[i]) / sbc2 + e);
      }
    });
  }

 private:
  CpuV4Kernels v4_;
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

}  // namespace tessera
