#include "ops/checks.h"

namespace tessera::ops::detail {

void check_float(const char* op, const Tensor& ref, std::initializer_list<const Tensor*> others) {
  TS_CHECK(ref.defined() && ref.is_contiguous(), op, ": first operand must be a defined contiguous tensor");
  TS_CHECK(ref.dtype() == DType::f32 || ref.dtype() == DType::f64, op, ": float op on ", ref.str());
  for (const Tensor* t : others) {
    if (!t->defined()) continue;
    TS_CHECK(t->is_contiguous(), op, ": non-contiguous operand ", t->str());
    TS_CHECK(t->device() == ref.device(), op, ": operands on different devices");
    TS_CHECK(t->dtype() == ref.dtype(), op, ": dtype mismatch ", t->str(), " vs ", ref.str());
  }
}

void check_shape(const char* op, const char* what, const Tensor& t, const Shape& want) {
  TS_CHECK(t.defined(), op, ": ", what, " is undefined, expected ", shape_str(want));
  TS_CHECK(t.shape() == want, op, ": ", what, " is ", shape_str(t.shape()), ", expected ", shape_str(want));
}

void check_shape_if_defined(const char* op, const char* what, const Tensor& t, const Shape& want) {
  if (t.defined()) check_shape(op, what, t, want);
}

void check_ids(const char* op, const Tensor& ids, int64_t n) {
  TS_CHECK(ids.dtype() == DType::i32 && ids.is_contiguous() && ids.numel() == n, op, ": ids must be i32 with ", n,
           " elements, got ", ids.str());
}

void check_i32(const char* op, const char* what, const Tensor& t, const Shape& want, const Tensor& ref) {
  TS_CHECK(t.defined() && t.dtype() == DType::i32 && t.is_contiguous(), op, ": ", what,
           " must be a contiguous i32 tensor, got ", desc(t));
  TS_CHECK(t.device() == ref.device(), op, ": ", what, " is on a different device");
  check_shape(op, what, t, want);
}

void check_index(const char* op, const char* what, const Tensor& t, const Shape& want, const Tensor& ref, int64_t lo,
                 int64_t hi) {
  check_i32(op, what, t, want, ref);
  if (t.device() != Device::cpu) return;
  const int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (p[i] < lo || p[i] >= hi)
      TS_FAIL(op, ": ", what, " value ", p[i], " at flat position ", i, " is outside [", lo, ", ", hi, ")");
}

}  // namespace tessera::ops::detail
