// Internal to src/ops: the argument checks shared by ops.cpp and the V4 op files (v4_ops_*.cpp), and the
// backend lookups they dispatch through. Every check throws tessera::Error naming the op and the operand.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "backend/backend.h"
#include "core/tensor.h"

namespace tessera::ops::detail {

inline Backend& be(const Tensor& t) { return backend_for(t.device()); }
inline V4Kernels& v4(const Tensor& t) { return backend_for(t.device()).v4(); }

// t.str(), or "undefined" for an undefined tensor.
inline std::string desc(const Tensor& t) { return t.defined() ? t.str() : std::string("undefined"); }

// ref defined and contiguous, of a float dtype (f32 or f64); every defined tensor in `others` contiguous, on ref's
// device, with ref's dtype. Undefined tensors in `others` are skipped.
void check_float(const char* op, const Tensor& ref, std::initializer_list<const Tensor*> others);
// t is defined and has shape `want`.
void check_shape(const char* op, const char* what, const Tensor& t, const Shape& want);
// As check_shape when t is defined; an undefined t passes.
void check_shape_if_defined(const char* op, const char* what, const Tensor& t, const Shape& want);
// Token ids: a contiguous i32 tensor of n elements (any shape, any device).
void check_ids(const char* op, const Tensor& ids, int64_t n);
// A contiguous i32 tensor of shape `want` on ref's device.
void check_i32(const char* op, const char* what, const Tensor& t, const Shape& want, const Tensor& ref);
// As check_i32, and every value in [lo, hi) (checked when t is on the host).
void check_index(const char* op, const char* what, const Tensor& t, const Shape& want, const Tensor& ref, int64_t lo,
                 int64_t hi);

}  // namespace tessera::ops::detail
