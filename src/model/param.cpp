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

int64_t count_elements(const ParamList& params) {
  int64_t n = 0;
  for (const Param* p : params) n += p->value.numel();
  return n;
}

}  // namespace tessera
