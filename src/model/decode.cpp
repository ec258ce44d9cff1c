#include "model/decode.h"

#include "core/error.h"
#include "model/model.h"

namespace tessera {

std::unique_ptr<DecodeCache> Model::new_cache(int64_t, int64_t) {
  TS_FAIL("cached decoding is not supported for model.arch = ", config().arch);
}

void Model::decode(const Tensor&, DecodeCache&, const Tensor&) {
  TS_FAIL("cached decoding is not supported for model.arch = ", config().arch);
}

DecodePlan plan_decode(const Tensor& ids, const DecodeCache& cache, int64_t vocab_size) {
  TS_CHECK(ids.dtype() == DType::i32 && ids.ndim() == 2 && ids.device() == Device::cpu,
           "decode: ids must be host i32 (B, t), got ", ids.str());
  DecodePlan p;
  p.B = ids.size(0), p.t = ids.size(1);
  TS_CHECK(p.B == cache.batch, "decode: ", p.B, " rows of ids for a cache of ", cache.batch, " rows");
  const int32_t* x = ids.data<int32_t>();
  p.n_new.assign(p.B, 0);
  p.pos.assign(p.B * p.t, -1);
  p.ids = Tensor::empty({p.B * p.t}, DType::i32, Device::cpu);
  p.q_pos = Tensor::empty({p.B, p.t}, DType::i32, Device::cpu);
  p.rope_pos = Tensor::empty({p.B * p.t}, DType::i32, Device::cpu);
  for (int64_t b = 0; b < p.B; ++b) {
    int64_t n = 0;
    while (n < p.t && x[b * p.t + n] >= 0) ++n;
    for (int64_t i = n; i < p.t; ++i)
      TS_CHECK(x[b * p.t + i] < 0, "decode: row ", b, " has a token after padding (", x[b * p.t + i], ")");
    TS_CHECK(cache.len[b] + n <= cache.capacity, "decode: row ", b, " would hold ", cache.len[b] + n,
             " tokens, beyond the cache capacity ", cache.capacity);
    p.n_new[b] = n;
    for (int64_t i = 0; i < p.t; ++i) {
      int32_t id = x[b * p.t + i];
      TS_CHECK(id < vocab_size, "decode: token id ", id, " out of vocabulary (", vocab_size, ")");
      int32_t pos = i < n ? int32_t(cache.len[b] + i) : -1;
      p.pos[b * p.t + i] = pos;
      p.ids.data<int32_t>()[b * p.t + i] = i < n ? id : 0;
      p.q_pos.data<int32_t>()[b * p.t + i] = pos;
      p.rope_pos.data<int32_t>()[b * p.t + i] = pos < 0 ? 0 : pos;
    }
  }
  return p;
}

}  // namespace tessera
