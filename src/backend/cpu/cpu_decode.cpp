// Decoding kernels of the CPU backend (contracts: src/ops/ops.h, Backend::attention_decode).
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_common.h"

namespace tessera::cpu {

void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, double scale,
                      const Tensor& out) {
  dispatch_float(q, [&]<class T>() {
    const int64_t B = q.size(0), t = q.size(1), H = q.size(2), D = q.size(3), L = k.size(1), KH = k.size(2);
    const int64_t group = H / KH;
    const int32_t* pos = q_pos.data<int32_t>();
    const T* Q = q.data<T>();
    const T* K = k.data<T>();
    const T* Vv = v.data<T>();
    T* O = out.data<T>();
    for (int64_t r = 0; r < B * t; ++r)
      TS_CHECK(pos[r] < L, "attention_decode: query position ", pos[r], " beyond the cache length ", L);
#pragma omp parallel for schedule(static) collapse(3)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < t; ++i)
        for (int64_t h = 0; h < H; ++h) {
          T* o = O + ((b * t + i) * H + h) * D;
          const int64_t p = pos[b * t + i];
          for (int64_t d = 0; d < D; ++d) o[d] = 0;
          if (p < 0) continue;
          const T* qi = Q + ((b * t + i) * H + h) * D;
          const int64_t kh = h / group;
          std::vector<T> s(p + 1);
          T m = -std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j <= p; ++j) {
            const T* kj = K + ((b * L + j) * KH + kh) * D;
            T acc = 0;
            for (int64_t d = 0; d < D; ++d) acc += qi[d] * kj[d];
            s[j] = acc * T(scale);
            m = std::max(m, s[j]);
          }
          T sum = 0;
          for (int64_t j = 0; j <= p; ++j) sum += (s[j] = std::exp(s[j] - m));
          for (int64_t j = 0; j <= p; ++j) {
            const T* vj = Vv + ((b * L + j) * KH + kh) * D;
            const T w = s[j] / sum;
            for (int64_t d = 0; d < D; ++d) o[d] += w * vj[d];
          }
        }
  });
}

}  // namespace tessera::cpu
