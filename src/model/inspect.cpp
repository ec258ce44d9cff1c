// STUB: to be implemented (parameter counts, FLOPs, KV-cache bytes).
#include "model/inspect.h"

#include "core/error.h"

namespace tessera {

ParamCounts count_params(const ModelConfig& c) { TS_FAIL("count_params: not implemented"); }
double forward_flops_per_token(const ModelConfig& c, int64_t context) { TS_FAIL("not implemented"); }
double attention_flops_per_token(const ModelConfig& c, int64_t context) { TS_FAIL("not implemented"); }
double kv_cache_bytes_per_token(const ModelConfig& c, int64_t context, double bytes_per_value) {
  TS_FAIL("not implemented");
}

}  // namespace tessera
