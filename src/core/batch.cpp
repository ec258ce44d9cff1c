#include "core/batch.h"

namespace tessera {

int64_t TokenBatch::count_targets() const {
  int64_t n = 0;
  const int32_t* t = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) n += t[i] >= 0;
  return n;
}

TokenBatch TokenBatch::on(Device device) const {
  auto move = [&](const Tensor& t) { return !t.defined() || t.device() == device ? t : t.to_device(device); };
  return TokenBatch{move(ids), move(targets), move(doc)};
}

}  // namespace tessera
