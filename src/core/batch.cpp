#include "core/batch.h"

namespace tessera {

int64_t TokenBatch::count_targets() const {
  int64_t n = 0;
  const int32_t* t = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) n += t[i] >= 0;
  return n;
}

}  // namespace tessera
