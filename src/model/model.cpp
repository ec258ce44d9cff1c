#include "model/model.h"

#include "model/dense.h"
#include "model/v4.h"
#include "ops/ops.h"

namespace tessera {

std::vector<Tensor> Model::gradient_accumulators() {
  std::vector<Tensor> out;
  for (Param* p : params()) out.push_back(p->grad);
  return out;
}

void Model::zero_grad() {
  for (const Tensor& t : gradient_accumulators()) ops::zero(t);
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
