#include "model/model.h"

#include "model/dense.h"
#include "model/v4.h"
#include "ops/ops.h"

namespace tessera {

void Model::zero_grad() {
  for (Param* p : params()) ops::zero(p->grad);
}

ParamList Model::saved_tensors() {
  ParamList ps = params();
  for (Param* p : buffers()) ps.push_back(p);
  return ps;
}

std::unique_ptr<Model> make_model(const ModelConfig& cfg, DType dtype, Device device) {
  if (cfg.is_v4()) return std::make_unique<V4Model>(cfg, dtype, device);
  return std::make_unique<DenseModel>(cfg, dtype, device);
}

}  // namespace tessera
