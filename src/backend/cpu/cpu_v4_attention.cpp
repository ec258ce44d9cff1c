// CPU kernels for the V4 sparse attention and the lightning indexer (contracts: src/ops/v4_ops.h).
// Sparse attention works on blocks of consecutive queries that share one range of window keys: the window scores
// are one matrix product per block, then each query's probabilities outside its own window are set to exactly 0,
// so (finite) keys it may not see add exactly nothing; the compressed entries are gathered per query.
// Gradients that many queries share (dkv, dckv, dki) are built in chunks: first per-block contributions, in
// parallel; then the accumulation, parallel over column or key blocks that one thread owns, with the blocks in
// order. Every sum has a fixed order, so results do not depend on the thread count.
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

constexpr int64_t kQueryBlock = 16;   // queries sharing one window-key product
constexpr int64_t kChunkBlocks = 16;  // query blocks per backward chunk (at most)
constexpr int64_t kRowChunk = 64;     // indexer query rows per backward chunk (at most)
constexpr int64_t kColBlock = 32;     // columns owned by one accumulation task
constexpr int64_t kKeyBlock = 64;     // indexer keys owned by one accumulation task
constexpr int64_t kMaxChunkElems = int64_t(1) << 22;  // bound on the indexer's per-chunk coefficient buffer
constexpr int64_t kMaxWindowGradElems = int64_t(1) << 24;  // bound on the per-chunk window-key gradients

// first[b*T + t]: the first window key of query t, max(t - window + 1, start of t's document). Non-decreasing
// in t, so a block's window range starts at its first query's.
std::vector<int64_t> window_first(const Tensor& doc, int64_t B, int64_t Tn, int64_t window) {
  std::vector<int64_t> first(B * Tn), start;
  const int32_t* d = ptr_or_null<int32_t>(doc);
  for (int64_t b = 0; b < B; ++b) {
    document_starts(d ? d + b * Tn : nullptr, Tn, start);
    for (int64_t t = 0; t < Tn; ++t) first[b * Tn + t] = std::max(t - window + 1, start[t]);
  }
  return first;
}

// Query block g: batch row b, queries t0..t1-1 (rows r0 = b*T + t0 ...), window keys w0..t1-1.
struct Block {
  int64_t b, t0, t1, w0, r0;
  int64_t nq() const { return t1 - t0; }
  int64_t nw() const { return t1 - w0; }
};

// Shared view of the sparse attention's inputs.
template <class T>
struct Sparse {
  const T *q, *kv, *ckv, *sink;
  const int32_t* cidx;
  int64_t B, Tn, H, D, K, K1, NB, nbpb, wmax;
  std::vector<int64_t> first;

  Sparse(const Tensor& q_, const Tensor& kv_, const Tensor& ckv_, const Tensor& cidx_, const Tensor& sink_,
         const Tensor& doc, int64_t window)
      : q(q_.data<T>()), kv(kv_.data<T>()), ckv(ptr_or_null<T>(ckv_)),
        sink(sink_.data<T>()), cidx(ptr_or_null<int32_t>(cidx_)), B(q_.size(0)),
        Tn(q_.size(1)), H(q_.size(2)), D(q_.size(3)), K(cidx_.defined() ? cidx_.size(2) : 0),
        K1(std::max<int64_t>(K, 1)), NB(ckv_.defined() ? ckv_.size(1) : 0),
        nbpb((Tn + kQueryBlock - 1) / kQueryBlock),
        wmax(std::min(Tn, kQueryBlock - 1 + std::min(window, Tn))), first(window_first(doc, B, Tn, window)) {}

  int64_t nblocks() const { return B * nbpb; }
  Block block(int64_t g) const {
    int64_t b = g / nbpb, t0 = (g % nbpb) * kQueryBlock, t1 = std::min(Tn, t0 + kQueryBlock);
    return {b, t0, t1, first[b * Tn + t0], b * Tn + t0};
  }
  // Copies row r's valid compressed entries, in slot order, into kc (nc x D); returns nc.
  int64_t gather(int64_t r, T* kc) const {
    int64_t nc = 0;
    for (int64_t j = 0; j < K; ++j) {
      int32_t c = cidx[r * K + j];
      if (c < 0) continue;
      const T* e = ckv + ((r / Tn) * NB + c) * D;
      std::copy(e, e + D, kc + nc++ * D);
    }
    return nc;
  }
};

// dst[0..w) += sum_h a[h * as] x_h + c[h * as] y_h with x_h = x + h * ld (y likewise), summed in registers over
// the heads. W = kColBlock fixes the width at compile time; W = 0 takes w (the same arithmetic).
template <int64_t W, class T>
inline void add_heads(int64_t w, int64_t H, const T* a, const T* c, int64_t as, const T* x, const T* y, int64_t ld,
                      T* dst) {
  const int64_t n = W > 0 ? W : w;
  T acc[kColBlock];
  for (int64_t i = 0; i < n; ++i) acc[i] = dst[i];
  for (int64_t h = 0; h < H; ++h) {
    const T ah = a[h * as], ch = c[h * as];
    const T* xh = x + h * ld;
    const T* yh = y + h * ld;
    for (int64_t i = 0; i < n; ++i) acc[i] += ah * xh[i] + ch * yh[i];
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = acc[i];
}

}  // namespace

void CpuV4Kernels::sparse_attention_forward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                                            const Tensor& sink, const Tensor& doc, int64_t window, double scale,
                                            const Tensor& out, const Tensor& lse) {
  dispatch_float(q, [&]<class T>() {
    Sparse<T> sp(q, kv, ckv, cidx, sink, doc, window);
    const int64_t H = sp.H, D = sp.D, K1 = sp.K1;
    const T sc = T(scale);
    T* o = out.data<T>();
    T* l = lse.data<T>();
#pragma omp parallel
    {
      // sw: window scores, then probabilities (rows query * H + h); kc, pc: one query's compressed entries and
      // their scores, then probabilities (H x nc).
      std::vector<T> sw(kQueryBlock * H * sp.wmax), kc(K1 * D), pc(H * K1);
#pragma omp for schedule(static)
      for (int64_t g = 0; g < sp.nblocks(); ++g) {
        Block k = sp.block(g);
        const int64_t nw = k.nw();
        CMapMat<T> Qb(sp.q + k.r0 * H * D, k.nq() * H, D), Kw(sp.kv + (k.b * sp.Tn + k.w0) * D, nw, D);
        MapMat<T> Sw(sw.data(), k.nq() * H, nw), Ob(o + k.r0 * H * D, k.nq() * H, D);
        Sw.noalias() = Qb * Kw.transpose();
        for (int64_t i = 0; i < k.nq(); ++i) {
          const int64_t r = k.r0 + i, lo = sp.first[r] - k.w0, hi = k.t0 + i - k.w0;  // window columns [lo, hi]
          const int64_t nc = sp.cidx ? sp.gather(r, kc.data()) : 0;
          CMapMat<T> Kc(kc.data(), nc, D), Q(sp.q + r * H * D, H, D);
          MapMat<T> Pc(pc.data(), H, nc), O(o + r * H * D, H, D);
          Pc.noalias() = Q * Kc.transpose();
          for (int64_t h = 0; h < H; ++h) {
            T* s = &Sw(i * H + h, 0);
            T* p = pc.data() + h * nc;
            T m = sp.sink[h];
            for (int64_t j = lo; j <= hi; ++j) m = std::max(m, s[j] *= sc);
            for (int64_t j = 0; j < nc; ++j) m = std::max(m, p[j] *= sc);
            T sum = std::exp(sp.sink[h] - m);
            for (int64_t j = lo; j <= hi; ++j) sum += (s[j] = std::exp(s[j] - m));
            for (int64_t j = 0; j < nc; ++j) sum += (p[j] = std::exp(p[j] - m));
            // Columns outside the query's window get exactly 0, so those keys add nothing below.
            for (int64_t j = 0; j < nw; ++j) s[j] = (j >= lo && j <= hi) ? s[j] / sum : T(0);
            for (int64_t j = 0; j < nc; ++j) p[j] /= sum;
            l[r * H + h] = m + std::log(sum);
          }
          if (nc > 0) O.noalias() = Pc * Kc;
          else O.setZero();
        }
        Ob.noalias() += Sw * Kw;
      }
    }
  });
}

void CpuV4Kernels::sparse_attention_backward(const Tensor& q, const Tensor& kv, const Tensor& ckv,
                                             const Tensor& cidx, const Tensor& sink, const Tensor& doc,
                                             int64_t window, double scale, const Tensor& out, const Tensor& lse,
                                             const Tensor& dout, const Tensor& dq, const Tensor& dkv,
                                             const Tensor& dckv, const Tensor& dsink) {
  dispatch_float(q, [&]<class T>() {
    Sparse<T> sp(q, kv, ckv, cidx, sink, doc, window);
    const int64_t H = sp.H, D = sp.D, K = sp.K, K1 = sp.K1, wmax = sp.wmax, nblocks = sp.nblocks();
    const T sc = T(scale);
    const T* o = out.data<T>();
    const T* l = lse.data<T>();
    const T* g = dout.data<T>();
    T* dQ = dq.data<T>();
    T* dK = dkv.data<T>();
    T* dC = ptr_or_null<T>(dckv);
    std::fill(dK, dK + dkv.numel(), T(0));
    if (dC) std::fill(dC, dC + dckv.numel(), T(0));
    // Per chunk: each block's window-key gradient (nw x D); per query, its valid compressed slots' probabilities
    // P and scale * dlogits G (H x nc), which give an entry's gradient sum_h P dout_h + G q_h; the sink gradients.
    // Fewer blocks per chunk only when windows are very long (a window as long as the context).
    const int64_t chunk = std::clamp<int64_t>(kMaxWindowGradElems / std::max<int64_t>(1, wmax * D), 1, kChunkBlocks);
    const int64_t cq = chunk * kQueryBlock;
    std::vector<T> dkw(chunk * wmax * D), P(cq * H * K1), G(cq * H * K1), sink_g(cq * H);
    std::vector<double> dsink_acc(H, 0.0);
    const int64_t ncb = (D + kColBlock - 1) / kColBlock;
#pragma omp parallel
    {
      std::vector<T> sw(kQueryBlock * H * wmax), dpw(kQueryBlock * H * wmax), kc(K1 * D), dpc(H * K1);
      for (int64_t g0 = 0; g0 < nblocks; g0 += chunk) {
        const int64_t g1 = std::min(nblocks, g0 + chunk);
#pragma omp for schedule(static)
        for (int64_t gb = g0; gb < g1; ++gb) {
          Block k = sp.block(gb);
          const int64_t nw = k.nw(), nr = k.nq() * H, off = k.r0 * H * D;
          CMapMat<T> Qb(sp.q + off, nr, D), Ob(o + off, nr, D), dOb(g + off, nr, D),
              Kw(sp.kv + (k.b * sp.Tn + k.w0) * D, nw, D);
          MapMat<T> Pw(sw.data(), nr, nw), Gw(dpw.data(), nr, nw), dQb(dQ + off, nr, D);
          Pw.noalias() = Qb * Kw.transpose();
          Gw.noalias() = dOb * Kw.transpose();
          for (int64_t i = 0; i < k.nq(); ++i) {
            const int64_t r = k.r0 + i, lo = sp.first[r] - k.w0, hi = k.t0 + i - k.w0;
            const int64_t qc = (gb - g0) * kQueryBlock + i;  // the query's index in the chunk
            const int64_t nc = sp.cidx ? sp.gather(r, kc.data()) : 0;
            CMapMat<T> Kc(kc.data(), nc, D), Q(sp.q + r * H * D, H, D), dO(g + r * H * D, H, D);
            MapMat<T> Pc(P.data() + qc * H * K1, H, nc), Gc(G.data() + qc * H * K1, H, nc), dPc(dpc.data(), H, nc),
                dQr(dQ + r * H * D, H, D);
            Pc.noalias() = Q * Kc.transpose();
            dPc.noalias() = dO * Kc.transpose();
            for (int64_t h = 0; h < H; ++h) {
              const int64_t row = i * H + h;
              const T L = l[r * H + h], dl = Ob.row(row).dot(dOb.row(row));  // sum p dp (the sink's value is 0)
              T* p = &Pw(row, 0);
              T* gg = &Gw(row, 0);
              for (int64_t j = 0; j < nw; ++j) {
                bool in = j >= lo && j <= hi;
                p[j] = in ? std::exp(p[j] * sc - L) : T(0);
                gg[j] = in ? p[j] * (gg[j] - dl) * sc : T(0);
              }
              T* pc = &Pc(h, 0);
              T* gc = &Gc(h, 0);
              const T* dp = &dPc(h, 0);
              for (int64_t j = 0; j < nc; ++j) {
                pc[j] = std::exp(pc[j] * sc - L);
                gc[j] = pc[j] * (dp[j] - dl) * sc;
              }
              sink_g[qc * H + h] = -std::exp(sp.sink[h] - L) * dl;
            }
            if (nc > 0) dQr.noalias() = Gc * Kc;
            else dQr.setZero();
          }
          dQb.noalias() += Gw * Kw;
          MapMat<T> dKw(dkw.data() + (gb - g0) * wmax * D, nw, D);
          dKw.noalias() = Pw.transpose() * dOb;
          dKw.noalias() += Gw.transpose() * Qb;
        }
        // Implicit barrier. Each task owns columns [c0, c0 + w) of dkv and dckv and visits blocks in order.
#pragma omp for schedule(static)
        for (int64_t cb = 0; cb < ncb; ++cb) {
          const int64_t c0 = cb * kColBlock, w = std::min(D, c0 + kColBlock) - c0;
          for (int64_t gb = g0; gb < g1; ++gb) {
            Block k = sp.block(gb);
            const T* src = dkw.data() + (gb - g0) * wmax * D + c0;
            T* dst = dK + (k.b * sp.Tn + k.w0) * D + c0;
            for (int64_t i = 0; i < k.nw(); ++i)
              for (int64_t c = 0; c < w; ++c) dst[i * D + c] += src[i * D + c];
            for (int64_t i = 0; K > 0 && i < k.nq(); ++i) {
              const int64_t r = k.r0 + i, qc = (gb - g0) * kQueryBlock + i;
              int64_t nc = 0;
              for (int64_t j = 0; j < K; ++j)
                if (sp.cidx[r * K + j] >= 0) ++nc;
              for (int64_t j = 0, jj = 0; j < K; ++j) {
                int32_t c = sp.cidx[r * K + j];
                if (c < 0) continue;
                const T* a = P.data() + qc * H * K1 + jj;
                const T* bg = G.data() + qc * H * K1 + jj++;
                const T* x = g + r * H * D + c0;
                const T* y = sp.q + r * H * D + c0;
                T* de = dC + (k.b * sp.NB + c) * D + c0;
                if (w == kColBlock) add_heads<kColBlock>(w, H, a, bg, nc, x, y, D, de);
                else add_heads<0>(w, H, a, bg, nc, x, y, D, de);
              }
            }
          }
        }
#pragma omp single
        for (int64_t gb = g0; gb < g1; ++gb) {
          Block k = sp.block(gb);
          for (int64_t i = 0; i < k.nq(); ++i)
            for (int64_t h = 0; h < H; ++h) dsink_acc[h] += double(sink_g[((gb - g0) * kQueryBlock + i) * H + h]);
        }
        // Implicit barrier after single: the chunk buffers are free again.
      }
    }
    T* ds = dsink.data<T>();
    for (int64_t h = 0; h < H; ++h) ds[h] += T(dsink_acc[h]);
  });
}

void CpuV4Kernels::sparse_attention_cprob(const Tensor& q, const Tensor& ckv, const Tensor& cidx, const Tensor& lse,
                                          double scale, const Tensor& cprob) {
  dispatch_float(q, [&]<class T>() {
    const int64_t B = q.size(0), Tn = q.size(1), H = q.size(2), D = q.size(3), K = cidx.size(2), NB = ckv.size(1);
    const T* Qp = q.data<T>();
    const T* C = ckv.data<T>();
    const T* l = lse.data<T>();
    const int32_t* ci = cidx.data<int32_t>();
    T* cp = cprob.data<T>();
#pragma omp parallel
    {
      std::vector<T> col(H);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B * Tn; ++r) {
        CMapMat<T> Q(Qp + r * H * D, H, D);
        for (int64_t j = 0; j < K; ++j) {
          int32_t c = ci[r * K + j];
          T sum = 0;
          if (c >= 0) {
            MapVec<T>(col.data(), H).noalias() = Q * CMapVec<T>(C + ((r / Tn) * NB + c) * D, D);
            for (int64_t h = 0; h < H; ++h) sum += std::exp(col[h] * T(scale) - l[r * H + h]);
          }
          cp[r * K + j] = sum;
        }
      }
    }
  });
}

void CpuV4Kernels::indexer_scores_forward(const Tensor& qi, const Tensor& ki, const Tensor& w, const Tensor& vis_begin,
                                          const Tensor& vis_end, const Tensor& scores) {
  dispatch_float(qi, [&]<class T>() {
    const int64_t B = qi.size(0), Tn = qi.size(1), HI = qi.size(2), DI = qi.size(3), NB = ki.size(1);
    const T* Qp = qi.data<T>();
    const T* Kp = ki.data<T>();
    const T* W = w.data<T>();
    const int32_t* vb = vis_begin.data<int32_t>();
    const int32_t* ve = vis_end.data<int32_t>();
    T* out = scores.data<T>();
#pragma omp parallel
    {
      std::vector<T> zb(HI * NB);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B * Tn; ++r) {
        int64_t b = r / Tn, s0 = vb[r], n = ve[r] - s0;
        T* sr = out + r * NB;
        std::fill(sr, sr + NB, -std::numeric_limits<T>::infinity());
        if (n <= 0) continue;
        CMapMat<T> Q(Qp + r * HI * DI, HI, DI), Kr(Kp + (b * NB + s0) * DI, n, DI);
        MapMat<T> Z(zb.data(), HI, n);
        Z.noalias() = Q * Kr.transpose();
        T* dst = sr + s0;
        std::fill(dst, dst + n, T(0));
        for (int64_t h = 0; h < HI; ++h) {
          T wh = W[r * HI + h];
          const T* z = &Z(h, 0);
          for (int64_t i = 0; i < n; ++i) dst[i] += wh * std::max(z[i], T(0));
        }
      }
    }
  });
}

void CpuV4Kernels::indexer_scores_backward(const Tensor& qi, const Tensor& ki, const Tensor& w,
                                           const Tensor& vis_begin, const Tensor& vis_end, const Tensor& dscores,
                                           const Tensor& dqi, const Tensor& dki, const Tensor& dw) {
  dispatch_float(qi, [&]<class T>() {
    const int64_t B = qi.size(0), Tn = qi.size(1), HI = qi.size(2), DI = qi.size(3), NB = ki.size(1);
    const T* Qp = qi.data<T>();
    const T* Kp = ki.data<T>();
    const T* W = w.data<T>();
    const T* gs = dscores.data<T>();
    const int32_t* vb = vis_begin.data<int32_t>();
    const int32_t* ve = vis_end.data<int32_t>();
    T* dQ = dqi.data<T>();
    T* dK = dki.data<T>();
    T* dW = dw.data<T>();
    std::fill(dK, dK + dki.numel(), T(0));
    if (NB == 0) {
      std::fill(dQ, dQ + dqi.numel(), T(0));
      std::fill(dW, dW + dw.numel(), T(0));
      return;
    }
    // Per chunk row: G (HI x NB) = dL/d(qi_h . ki_s), zero outside the visible range and where the relu is off.
    // A chunk stays inside one batch row b, so dki[b] += G^T qi over the chunk is one product per key block.
    const int64_t rows = std::clamp<int64_t>(kMaxChunkElems / (HI * NB), 1, kRowChunk);
    std::vector<T> G(rows * HI * NB);
    const int64_t nkb = (NB + kKeyBlock - 1) / kKeyBlock;
#pragma omp parallel
    {
      std::vector<T> zb(HI * NB);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t0 = 0; t0 < Tn; t0 += rows) {
          int64_t t1 = std::min(Tn, t0 + rows), r0 = b * Tn + t0;
#pragma omp for schedule(static)
          for (int64_t r = r0; r < b * Tn + t1; ++r) {
            int64_t s0 = vb[r], n = ve[r] - s0;
            T* Gr = G.data() + (r - r0) * HI * NB;
            std::fill(Gr, Gr + HI * NB, T(0));
            MapMat<T> dQr(dQ + r * HI * DI, HI, DI);
            if (n <= 0) {
              dQr.setZero();
              std::fill(dW + r * HI, dW + (r + 1) * HI, T(0));
              continue;
            }
            CMapMat<T> Q(Qp + r * HI * DI, HI, DI), Kr(Kp + (b * NB + s0) * DI, n, DI);
            MapMat<T> Z(zb.data(), HI, n);
            StridedMap<T> Gm(Gr + s0, HI, n, Eigen::OuterStride<>(NB));
            Z.noalias() = Q * Kr.transpose();
            const T* ds = gs + r * NB + s0;
            for (int64_t h = 0; h < HI; ++h) {
              T wh = W[r * HI + h], acc = 0;
              const T* z = &Z(h, 0);
              T* gg = &Gm(h, 0);
              for (int64_t i = 0; i < n; ++i) {
                bool on = z[i] > T(0);
                acc += on ? ds[i] * z[i] : T(0);
                gg[i] = on ? ds[i] * wh : T(0);
              }
              dW[r * HI + h] = acc;
            }
            dQr.noalias() = Gm * Kr;
          }
          // Each task owns keys [k0, k0 + kKeyBlock) of dki[b]; one product covers the chunk's rows in order.
          int64_t nr = t1 - t0, lo = NB, hi = 0;  // the union of the chunk's visible ranges
          for (int64_t r = r0; r < r0 + nr; ++r)
            if (ve[r] > vb[r]) lo = std::min<int64_t>(lo, vb[r]), hi = std::max<int64_t>(hi, ve[r]);
#pragma omp for schedule(static)
          for (int64_t kb = 0; kb < nkb; ++kb) {
            int64_t k0 = kb * kKeyBlock, len = std::min(NB, k0 + kKeyBlock) - k0;
            if (k0 + len <= lo || k0 >= hi) continue;  // G is zero there
            StridedMap<T> Gb(G.data() + k0, nr * HI, len, Eigen::OuterStride<>(NB));
            CMapMat<T> Qc(Qp + r0 * HI * DI, nr * HI, DI);
            MapMat<T> dKb(dK + (b * NB + k0) * DI, len, DI);
            dKb.noalias() += Gb.transpose() * Qc;
          }
        }
    }
  });
}

double CpuV4Kernels::indexer_kl(const Tensor& scores, const Tensor& target, double grad_scale,
                                const Tensor& dscores) {
  double total = 0;
  dispatch_float(scores, [&]<class T>() {
    const int64_t S = scores.size(-1), R = S > 0 ? scores.numel() / S : 0;
    const T* z = scores.data<T>();
    const T* tg = target.data<T>();
    T* d = ptr_or_null<T>(dscores);
    std::vector<double> row(R, 0.0);
    // Per row in double: p = target / sum |target|, q = softmax over the finite scores, KL = sum_{p>0} p log(p/q),
    // dKL/dz = q - p (p sums to 1).
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const T* zr = z + r * S;
      const T* tr = tg + r * S;
      double norm = 0, mx = -kInf;
      for (int64_t s = 0; s < S; ++s) {
        norm += std::abs(double(tr[s]));
        if (std::isfinite(double(zr[s]))) mx = std::max(mx, double(zr[s]));
      }
      if (norm == 0) {
        if (d) std::fill(d + r * S, d + (r + 1) * S, T(0));
        continue;
      }
      double sum = 0;
      for (int64_t s = 0; s < S; ++s)
        if (std::isfinite(double(zr[s]))) sum += std::exp(double(zr[s]) - mx);
      double lse = mx + std::log(sum), kl = 0;
      for (int64_t s = 0; s < S; ++s) {
        double p = double(tr[s]) / norm;
        if (p != 0) kl += p * (std::log(p) - (double(zr[s]) - lse));
        if (d) d[r * S + s] = std::isfinite(double(zr[s])) ? T(grad_scale * (std::exp(double(zr[s]) - lse) - p)) : T(0);
      }
      row[r] = kl;
    }
    for (double v : row) total += v;
  });
  return total;
}

}  // namespace tessera
