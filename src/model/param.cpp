#include "model/param.h"

namespace tessera {

const char* param_kind_name(ParamKind k) {
  switch (k) {
    case ParamKind::matrix: return "matrix";
    case ParamKind::embedding: return "embedding";
    case ParamKind::head: return "head";
    case ParamKind::vector: return "vector";
  }
  return "?";
}

Param make_param(const std::string& name, ParamKind kind, const Shape& shape, DType dtype) {
  Param p;
  p.name = name;
  p.kind = kind;
  p.value = Tensor::zeros(shape, dtype);
  p.grad = Tensor::zeros(shape, dtype);
  return p;
}

Shape Param::logical_shape() const {
  Shape s = value.shape();
  if (sharded()) s[0] = shard_rows;
  return s;
}

int64_t count_elements(const ParamList& params) {
  int64_t n = 0;
  for (const Param* p : params) n += shape_numel(p->logical_shape());
  return n;
}

}  // namespace tessera
