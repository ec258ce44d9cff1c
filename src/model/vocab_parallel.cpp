#include "model/vocab_parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "parallel/communicator.h"

namespace tessera {

namespace {

template <class F>
void on_float(const Tensor& t, F&& f) {
  TS_CHECK(t.device() == Device::cpu, "vocab parallelism works on host tensors, got ", t.str(), " on ",
           device_name(t.device()));
  if (t.dtype() == DType::f32) f.template operator()<float>();
  else if (t.dtype() == DType::f64) f.template operator()<double>();
  else TS_FAIL("vocab parallelism: f32 or f64 tensors, got ", t.str());
}

}  // namespace

void vocab_parallel_embedding_forward(const Tensor& ids, const Tensor& table_part, int64_t v0, const Tensor& out,
                                      Communicator& tp) {
  on_float(table_part, [&]<class T>() {
    const int32_t* id = ids.data<int32_t>();
    const T* w = table_part.data<T>();
    T* o = out.data<T>();
    const int64_t n = ids.numel(), c = table_part.size(1), rows = table_part.size(0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t local = int64_t(id[i]) - v0;
      if (local >= 0 && local < rows) std::copy(w + local * c, w + (local + 1) * c, o + i * c);
      else std::fill(o + i * c, o + (i + 1) * c, T(0));
    }
  });
  tp.all_reduce(out);
}

void vocab_parallel_embedding_backward(const Tensor& ids, const Tensor& dout, int64_t v0, const Tensor& dtable_part) {
  on_float(dtable_part, [&]<class T>() {
    const int32_t* id = ids.data<int32_t>();
    const T* g = dout.data<T>();
    T* dw = dtable_part.data<T>();
    const int64_t n = ids.numel(), c = dtable_part.size(1), rows = dtable_part.size(0);
    for (int64_t i = 0; i < n; ++i) {  // in token order, as the single-table backward
      const int64_t local = int64_t(id[i]) - v0;
      if (local < 0 || local >= rows) continue;
      for (int64_t j = 0; j < c; ++j) dw[local * c + j] += g[i * c + j];
    }
  });
}

void vocab_parallel_cross_entropy(const Tensor& logits_part, const Tensor& targets, int64_t v0, Communicator& tp,
                                  const Tensor& losses, double loss_scale, const Tensor& dlogits_part) {
  on_float(logits_part, [&]<class T>() {
    const int64_t n = logits_part.size(0), V = logits_part.size(1);
    const T* x = logits_part.data<T>();
    const int32_t* tg = targets.data<int32_t>();
    // Row maxima over the whole vocabulary, then [sum of exp(x - max) | the target's logit] summed over the ranks
    // (the target's logit is on one rank, zeros elsewhere).
    Tensor row_max = Tensor::empty({n}, logits_part.dtype(), Device::cpu);
    Tensor sums = Tensor::zeros({2, n}, logits_part.dtype(), Device::cpu);
    T* m = row_max.data<T>();
    T* s = sums.data<T>();
    for (int64_t i = 0; i < n; ++i) m[i] = V ? *std::max_element(x + i * V, x + (i + 1) * V) : -std::numeric_limits<T>::infinity();
    tp.all_reduce(row_max, ReduceOp::max);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < V; ++j) s[i] += std::exp(x[i * V + j] - m[i]);
      const int64_t local = int64_t(tg[i]) - v0;
      if (tg[i] >= 0 && local >= 0 && local < V) s[n + i] = x[i * V + local];
    }
    tp.all_reduce(sums);
    T* ls = losses.data<T>();
    T* d = dlogits_part.defined() ? dlogits_part.data<T>() : nullptr;
    const T sc = T(loss_scale);
    for (int64_t i = 0; i < n; ++i) {
      const T lse = m[i] + std::log(s[i]);
      ls[i] = tg[i] < 0 ? T(0) : lse - s[n + i];
      if (!d) continue;
      T* di = d + i * V;
      if (tg[i] < 0) {
        std::fill(di, di + V, T(0));
        continue;
      }
      for (int64_t j = 0; j < V; ++j) di[j] = std::exp(x[i * V + j] - lse) * sc;  // safe if di aliases x
      const int64_t local = int64_t(tg[i]) - v0;
      if (local >= 0 && local < V) di[local] -= sc;
    }
  });
}

}  // namespace tessera
