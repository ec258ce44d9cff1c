#include "model/param.h"

#include <cstring>

#include "parallel/communicator.h"

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
  if (sharded()) s[shard_dim] = shard_size;
  return s;
}

void copy_along(const Tensor& big, int dim, int64_t offset, const Tensor& small, bool into_big) {
  bool agree = big.ndim() == small.ndim() && dim >= 0 && dim < big.ndim() && big.dtype() == small.dtype() &&
               offset >= 0 && offset + small.size(dim) <= big.size(dim);
  for (int d = 0; agree && d < big.ndim(); ++d) agree = d == dim || big.size(d) == small.size(d);
  TS_CHECK(agree, "copy_along: ", small.str(), " at ", offset, " along dimension ", dim, " of ", big.str());
  TS_CHECK(big.is_contiguous() && small.is_contiguous() && big.device() == Device::cpu &&
               small.device() == Device::cpu,
           "copy_along: contiguous host tensors");
  int64_t outer = 1, inner = int64_t(dtype_size(big.dtype()));
  for (int d = 0; d < dim; ++d) outer *= big.size(d);
  for (int d = dim + 1; d < big.ndim(); ++d) inner *= big.size(d);
  auto* b = static_cast<char*>(big.raw());
  auto* s = static_cast<char*>(small.raw());
  const int64_t block = small.size(dim) * inner, stride = big.size(dim) * inner;
  for (int64_t o = 0; o < outer; ++o) {
    char* at = b + o * stride + offset * inner;
    if (into_big) std::memcpy(at, s + o * block, size_t(block));
    else std::memcpy(s + o * block, at, size_t(block));
  }
}

void split_param(Param& p, int dim, Communicator& group) {
  if (!p.value.defined()) return;
  Shape s = p.value.shape();
  const int64_t P = group.size();
  TS_CHECK(s[dim] % P == 0, "split_param: ", p.name, " ", p.value.str(), " along dimension ", dim, " over ", P,
           " ranks");
  p.shard_group = &group, p.shard_dim = dim, p.shard_size = s[dim];
  s[dim] /= P;
  p.shard_offset = group.rank() * s[dim];
  p.value = Tensor::zeros(s, p.value.dtype()), p.grad = Tensor::zeros(s, p.value.dtype());
}

Tensor Param::slice_of(const Tensor& logical) const {
  if (!sharded()) return logical;
  Tensor part = Tensor::empty(value.shape(), logical.dtype(), Device::cpu);
  copy_along(logical, shard_dim, shard_offset, part, false);
  return part;
}

int64_t count_elements(const ParamList& params) {
  int64_t n = 0;
  for (const Param* p : params) n += shape_numel(p->logical_shape());
  return n;
}

}  // namespace tessera
