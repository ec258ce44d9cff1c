// CPU kernels for mHC (gates with Sinkhorn, collapse, expand), the Walsh-Hadamard transform and the FP4/FP8
// quantisation simulation (contracts: src/ops/v4_ops.h). Everything is computed in double inside, for f32 and
// f64 alike; sums over tokens run in a fixed order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_common.h"
#include "backend/cpu/cpu_v4.h"

namespace tessera {
using namespace cpu;
namespace {

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// The gate layout: a block's mix has M = 2n + n^2 columns and scale (3); the head's M = n and scale (1).
struct GateLayout {
  int64_t n, M;
  bool block;
};
GateLayout gate_layout(const Tensor& mix, const Tensor& scale) {
  int64_t M = mix.size(1);
  if (scale.numel() == 1) return {M, M, false};
  return {std::llround(std::sqrt(double(M + 1))) - 1, M, true};
}

// The Sinkhorn of one token (spec §3.3), keeping what the backward needs: the softmax S and the input and
// denominators of each of the 2 iters - 1 normalisations (even steps divide by column sums, odd by row sums).
class Sinkhorn {
 public:
  Sinkhorn(int64_t n, int64_t iters, double eps)
      : n_(n), steps_(2 * iters - 1), eps_(eps), S_(n * n), X_(steps_ * n * n), den_(steps_ * n) {}

  void forward(const double* R, double* C) {
    const int64_t n = n_;
    for (int64_t j = 0; j < n; ++j) {
      const double* r = R + j * n;
      double mx = *std::max_element(r, r + n), sum = 0;
      for (int64_t k = 0; k < n; ++k) sum += (S_[j * n + k] = std::exp(r[k] - mx));
      for (int64_t k = 0; k < n; ++k) S_[j * n + k] /= sum;
    }
    for (int64_t q = 0; q < n * n; ++q) C[q] = S_[q] + eps_;
    for (int64_t s = 0; s < steps_; ++s) {
      std::copy(C, C + n * n, X_.data() + s * n * n);
      bool col = s % 2 == 0;
      for (int64_t l = 0; l < n; ++l) {
        double sum = 0;
        for (int64_t t = 0; t < n; ++t) sum += C[at(col, l, t)];
        double d = sum + eps_;
        den_[s * n + l] = d;
        for (int64_t t = 0; t < n; ++t) C[at(col, l, t)] /= d;
      }
    }
  }

  // After forward(R, ...): dR from dC. For Y = X / d with d = sum over the line of X + eps:
  // dX = (dY - sum_line(dY X) / d) / d.
  void backward(const double* dC, double* dR) {
    const int64_t n = n_;
    std::vector<double>& g = g_;
    g.assign(dC, dC + n * n);
    for (int64_t s = steps_ - 1; s >= 0; --s) {
      const double* X = X_.data() + s * n * n;
      bool col = s % 2 == 0;
      for (int64_t l = 0; l < n; ++l) {
        double d = den_[s * n + l], dot = 0;
        for (int64_t t = 0; t < n; ++t) dot += g[at(col, l, t)] * X[at(col, l, t)];
        for (int64_t t = 0; t < n; ++t) g[at(col, l, t)] = (g[at(col, l, t)] - dot / d) / d;
      }
    }
    // g is now d(S + eps) = dS; through the row softmax.
    for (int64_t j = 0; j < n; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < n; ++k) dot += g[j * n + k] * S_[j * n + k];
      for (int64_t k = 0; k < n; ++k) dR[j * n + k] = S_[j * n + k] * (g[j * n + k] - dot);
    }
  }

 private:
  // Element t of line l: line l is column l (col) or row l.
  int64_t at(bool col, int64_t l, int64_t t) const { return col ? t * n_ + l : l * n_ + t; }

  int64_t n_, steps_;
  double eps_;
  std::vector<double> S_, X_, den_, g_;
};

// 2^ceil(log2(amax / qmax)): the smallest power of two s with qmax * s >= amax, found by exact comparisons (a
// rounded log2 could be off by one at powers of two). 1 for an all-zero block; NaN for a non-finite one, so
// an overflow upstream shows up rather than being quantised away.
double pow2_scale(double amax, bool finite, double qmax) {
  if (!finite) return std::numeric_limits<double>::quiet_NaN();
  if (amax == 0) return 1.0;
  int e;
  std::frexp(amax / qmax, &e);
  double s = std::ldexp(1.0, e);
  while (qmax * s * 0.5 >= amax) s *= 0.5;
  while (qmax * s < amax) s *= 2.0;
  return s;
}

// Nearest e2m1 magnitude (0, .5, 1, 1.5, 2, 3, 4, 6) of a scaled value with |v| <= 6; at a midpoint the
// neighbour with the even code wins: the lower one (codes 0, 2, 4, 6 = values 0, 1, 2, 4) uses <=, else <.
double round_e2m1(double v) {
  double a = std::abs(v), q;
  if (a <= 0.25) q = 0;
  else if (a < 0.75) q = 0.5;
  else if (a <= 1.25) q = 1;
  else if (a < 1.75) q = 1.5;
  else if (a <= 2.5) q = 2;
  else if (a < 3.5) q = 3;
  else if (a <= 5) q = 4;
  else q = 6;
  return std::copysign(q, v);
}

// Round to nearest, ties to even, independent of the floating-point rounding mode.
double round_half_even(double t) {
  double r = std::floor(t), frac = t - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0)) r += 1;
  return r;
}

// Nearest e4m3fn value of a scaled value with |v| <= 448: 3 mantissa bits, so the step in the binade
// [2^E, 2^(E+1)) is 2^(E-3); below the smallest normal 2^-6 the subnormals keep that binade's step 2^-9.
// An even multiple of the step is an even mantissa code, so ties to even on the multiple is ties to even code.
double round_e4m3(double v) {
  double a = std::abs(v);
  if (a == 0) return v;
  int e;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e)
  double step = std::ldexp(1.0, std::max(e - 1, -6) - 3);
  return std::copysign(round_half_even(a / step) * step, v);
}

// Quantises out[b0, b1) from x[b0, b1) with one power-of-two scale: out = round(x / s) * s.
template <class T, class Round>
void quant_block(const T* x, T* out, int64_t b0, int64_t b1, double qmax, Round round) {
  double amax = 0;
  bool finite = true;
  for (int64_t i = b0; i < b1; ++i) {
    finite = finite && std::isfinite(double(x[i]));
    amax = std::max(amax, std::abs(double(x[i])));
  }
  double s = pow2_scale(amax, finite, qmax);
  for (int64_t i = b0; i < b1; ++i) out[i] = static_cast<T>(round(double(x[i]) / s) * s);
}

}  // namespace

void CpuV4Kernels::hc_gates_forward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters,
                                    double eps, const Tensor& pre, const Tensor& post, const Tensor& comb) {
  GateLayout g = gate_layout(mix, scale);
  dispatch_float(mix, [&]<class T>() {
    const T *mx = mix.data<T>(), *sc = scale.data<T>(), *b = base.data<T>();
    T* pr = pre.data<T>();
    T* po = g.block ? post.data<T>() : nullptr;
    T* cb = g.block ? comb.data<T>() : nullptr;
    const int64_t N = mix.size(0), n = g.n, M = g.M;
#pragma omp parallel
    {
      Sinkhorn sk(n, g.block ? iters : 1, eps);
      std::vector<double> R(n * n), C(n * n);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        const T* m = mx + i * M;
        for (int64_t j = 0; j < n; ++j) pr[i * n + j] = T(sigmoid(double(sc[0]) * m[j] + b[j]) + eps);
        if (!g.block) continue;
        for (int64_t j = 0; j < n; ++j) po[i * n + j] = T(2 * sigmoid(double(sc[1]) * m[n + j] + b[n + j]));
        for (int64_t q = 0; q < n * n; ++q) R[q] = double(sc[2]) * m[2 * n + q] + b[2 * n + q];
        sk.forward(R.data(), C.data());
        for (int64_t q = 0; q < n * n; ++q) cb[i * n * n + q] = T(C[q]);
      }
    }
  });
}

void CpuV4Kernels::hc_gates_backward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters,
                                     double eps, const Tensor& dpre, const Tensor& dpost, const Tensor& dcomb,
                                     const Tensor& dmix, const Tensor& dscale, const Tensor& dbase) {
  GateLayout g = gate_layout(mix, scale);
  dispatch_float(mix, [&]<class T>() {
    const T *mx = mix.data<T>(), *sc = scale.data<T>(), *b = base.data<T>();
    const T *gpre = ptr_or_null<T>(dpre), *gpost = ptr_or_null<T>(dpost), *gcomb = ptr_or_null<T>(dcomb);
    T* dm = dmix.data<T>();
    const int64_t N = mix.size(0), n = g.n, M = g.M;
    // Which scale multiplies column m: 0 for pre, 1 for post, 2 for comb.
    auto group = [&](int64_t m) -> int64_t { return m < n ? 0 : m < 2 * n ? 1 : 2; };
    // dz (N, M): the gradient at the gate logits z = scale * mix + base, kept in double for the reductions.
    std::vector<double> dz(N * M, 0.0);
#pragma omp parallel
    {
      Sinkhorn sk(n, g.block ? iters : 1, eps);
      std::vector<double> R(n * n), C(n * n), dC(n * n), dR(n * n);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        const T* m = mx + i * M;
        double* d = dz.data() + i * M;
        if (gpre)
          for (int64_t j = 0; j < n; ++j) {
            double s = sigmoid(double(sc[0]) * m[j] + b[j]);
            d[j] = double(gpre[i * n + j]) * s * (1 - s);
          }
        if (g.block && gpost)
          for (int64_t j = 0; j < n; ++j) {
            double s = sigmoid(double(sc[1]) * m[n + j] + b[n + j]);
            d[n + j] = 2 * double(gpost[i * n + j]) * s * (1 - s);
          }
        if (g.block && gcomb) {
          for (int64_t q = 0; q < n * n; ++q) R[q] = double(sc[2]) * m[2 * n + q] + b[2 * n + q];
          sk.forward(R.data(), C.data());  // recomputed: the backward needs every round's intermediates
          for (int64_t q = 0; q < n * n; ++q) dC[q] = gcomb[i * n * n + q];
          sk.backward(dC.data(), dR.data());
          for (int64_t q = 0; q < n * n; ++q) d[2 * n + q] = dR[q];
        }
        for (int64_t c = 0; c < M; ++c) dm[i * M + c] = T(double(sc[group(c)]) * d[c]);
      }
    }
    // Sums over tokens, each column in token order.
    std::vector<double> sum_dz(M, 0.0), sum_dz_mix(M, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < M; ++c)
      for (int64_t i = 0; i < N; ++i) {
        sum_dz[c] += dz[i * M + c];
        sum_dz_mix[c] += dz[i * M + c] * double(mx[i * M + c]);
      }
    if (dbase.defined()) {
      T* db = dbase.data<T>();
      for (int64_t c = 0; c < M; ++c) db[c] += T(sum_dz[c]);
    }
    if (dscale.defined()) {
      T* ds = dscale.data<T>();
      double acc[3] = {0, 0, 0};
      for (int64_t c = 0; c < M; ++c) acc[group(c)] += sum_dz_mix[c];
      for (int64_t k = 0; k < dscale.numel(); ++k) ds[k] += T(acc[k]);
    }
  });
}

void CpuV4Kernels::hc_collapse_forward(const Tensor& x, const Tensor& w, const Tensor& y) {
  dispatch_float(x, [&]<class T>() {
    const T *xs = x.data<T>(), *ws = w.data<T>();
    T* ys = y.data<T>();
    const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
#pragma omp parallel
    {
      std::vector<double> acc(d);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < n; ++j) {
          double wj = ws[i * n + j];
          const T* xj = xs + (i * n + j) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += wj * double(xj[c]);
        }
        for (int64_t c = 0; c < d; ++c) ys[i * d + c] = T(acc[c]);
      }
    }
  });
}

void CpuV4Kernels::hc_collapse_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                                        const Tensor& dw) {
  dispatch_float(x, [&]<class T>() {
    const T *xs = x.data<T>(), *ws = w.data<T>(), *g = dy.data<T>();
    T *gx = ptr_or_null<T>(dx), *gw = ptr_or_null<T>(dw);
    const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const T* gi = g + i * d;
      for (int64_t j = 0; j < n; ++j) {
        const T* xj = xs + (i * n + j) * d;
        if (gx) {
          double wj = ws[i * n + j];
          T* o = gx + (i * n + j) * d;
          for (int64_t c = 0; c < d; ++c) o[c] = T(wj * double(gi[c]));
        }
        if (gw) {
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += double(gi[c]) * double(xj[c]);
          gw[i * n + j] = T(dot);
        }
      }
    }
  });
}

void CpuV4Kernels::hc_expand_forward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb,
                                     const Tensor& out) {
  dispatch_float(x, [&]<class T>() {
    const T *xs = x.data<T>(), *fs = f.data<T>(), *ps = post.data<T>(), *cs = comb.data<T>();
    T* os = out.data<T>();
    const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
#pragma omp parallel
    {
      std::vector<double> acc(d);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i)
        for (int64_t k = 0; k < n; ++k) {
          double pk = ps[i * n + k];
          for (int64_t c = 0; c < d; ++c) acc[c] = pk * double(fs[i * d + c]);
          for (int64_t j = 0; j < n; ++j) {
            double cjk = cs[(i * n + j) * n + k];
            const T* xj = xs + (i * n + j) * d;
            for (int64_t c = 0; c < d; ++c) acc[c] += cjk * double(xj[c]);
          }
          T* o = os + (i * n + k) * d;
          for (int64_t c = 0; c < d; ++c) o[c] = T(acc[c]);
        }
    }
  });
}

void CpuV4Kernels::hc_expand_backward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb,
                                      const Tensor& dout, const Tensor& dx, const Tensor& df, const Tensor& dpost,
                                      const Tensor& dcomb) {
  dispatch_float(x, [&]<class T>() {
    const T *xs = x.data<T>(), *fs = f.data<T>(), *ps = post.data<T>(), *cs = comb.data<T>(), *g = dout.data<T>();
    T *gx = ptr_or_null<T>(dx), *gf = ptr_or_null<T>(df), *gp = ptr_or_null<T>(dpost), *gc = ptr_or_null<T>(dcomb);
    const int64_t N = x.size(0), n = x.size(1), d = x.size(2);
#pragma omp parallel
    {
      std::vector<double> acc(d);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        const T* gi = g + i * n * d;  // dout[i] (n, d)
        if (gx)  // dx[j] = sum_k comb[j][k] dout[k]
          for (int64_t j = 0; j < n; ++j) {
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t k = 0; k < n; ++k) {
              double cjk = cs[(i * n + j) * n + k];
              for (int64_t c = 0; c < d; ++c) acc[c] += cjk * double(gi[k * d + c]);
            }
            for (int64_t c = 0; c < d; ++c) gx[(i * n + j) * d + c] = T(acc[c]);
          }
        if (gf) {  // df = sum_k post[k] dout[k]
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t k = 0; k < n; ++k) {
            double pk = ps[i * n + k];
            for (int64_t c = 0; c < d; ++c) acc[c] += pk * double(gi[k * d + c]);
          }
          for (int64_t c = 0; c < d; ++c) gf[i * d + c] = T(acc[c]);
        }
        for (int64_t k = 0; k < n; ++k) {
          const T* gk = gi + k * d;
          if (gp) {  // dpost[k] = dout[k] . f
            double dot = 0;
            for (int64_t c = 0; c < d; ++c) dot += double(gk[c]) * double(fs[i * d + c]);
            gp[i * n + k] = T(dot);
          }
          if (gc)  // dcomb[j][k] = dout[k] . x[j]
            for (int64_t j = 0; j < n; ++j) {
              const T* xj = xs + (i * n + j) * d;
              double dot = 0;
              for (int64_t c = 0; c < d; ++c) dot += double(gk[c]) * double(xj[c]);
              gc[(i * n + j) * n + k] = T(dot);
            }
        }
      }
    }
  });
}

void CpuV4Kernels::hadamard(const Tensor& x, const Tensor& out) {
  dispatch_float(x, [&]<class T>() {
    const T* xs = x.data<T>();
    T* os = out.data<T>();
    const int64_t D = x.size(-1), rows = x.numel() / D;
    const double norm = 1.0 / std::sqrt(double(D));
#pragma omp parallel
    {
      std::vector<double> v(D);  // the whole row is read before any write: out may alias x
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < D; ++c) v[c] = xs[r * D + c];
        // Butterflies (a, b) -> (a + b, a - b) give the Sylvester ordering H[i][j] = (-1)^popcount(i & j).
        for (int64_t h = 1; h < D; h *= 2)
          for (int64_t s = 0; s < D; s += 2 * h)
            for (int64_t c = s; c < s + h; ++c) {
              double a = v[c], b = v[c + h];
              v[c] = a + b;
              v[c + h] = a - b;
            }
        for (int64_t c = 0; c < D; ++c) os[r * D + c] = T(v[c] * norm);
      }
    }
  });
}

void CpuV4Kernels::fake_quant_fp4(const Tensor& x, int64_t block, const Tensor& out) {
  dispatch_float(x, [&]<class T>() {
    const T* xs = x.data<T>();
    T* os = out.data<T>();
    const int64_t D = x.size(-1), rows = x.numel() / D;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b0 = 0; b0 < D; b0 += block)
        quant_block(xs + r * D, os + r * D, b0, std::min(D, b0 + block), 6.0, round_e2m1);
  });
}

void CpuV4Kernels::fake_quant_fp8(const Tensor& x, int64_t block, int64_t dims, const Tensor& out) {
  dispatch_float(x, [&]<class T>() {
    const T* xs = x.data<T>();
    T* os = out.data<T>();
    const int64_t D = x.size(-1), rows = x.numel() / D;
    const int64_t qd = (dims < 0 || dims > D) ? D : dims;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b0 = 0; b0 < qd; b0 += block)
        quant_block(xs + r * D, os + r * D, b0, std::min(qd, b0 + block), 448.0, round_e4m3);
      for (int64_t c = qd; c < D; ++c) os[r * D + c] = xs[r * D + c];
    }
  });
}

}  // namespace tessera
