// Op test harness in the style of ggml's test-backend-ops: every op's backward against central finite
// differences in fp64, and every op's fp32 forward and backward against its fp64 result, with per-op tolerances.
// Failures print the case, the input, the element and both values.
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace tessera::testing {

using Tensors = std::vector<Tensor>;

struct OpCase {
  std::string name;
  Tensors inputs;                 // fp64 for float inputs; i32 inputs (ids, positions, docs) are held fixed
  std::vector<bool> differentiable;  // per input
  int n_loss_outputs = 1;         // the first n outputs enter the scalar loss; the rest are saved state
  std::function<Tensors(const Tensors& in)> forward;
  // Returns one gradient per input (undefined where not differentiable), given dout for the loss outputs.
  std::function<Tensors(const Tensors& in, const Tensors& out, const Tensors& dout)> backward;
  double f32_tol = 1e-5;   // relative (to the output's max magnitude) fp32 vs fp64 tolerance
  double grad_rtol = 1e-6;  // finite-difference tolerance in fp64
};

Tensor random_tensor(const Shape& shape, uint64_t seed, double std = 1.0, DType dtype = DType::f64);
Tensor ids_tensor(const std::vector<int32_t>& values, const Shape& shape);
Tensor like_zeros(const Tensor& t);  // zeros with t's shape and dtype

// Runs the full check: finite differences in fp64, then fp32 vs fp64 for forward and backward.
void check_op(const OpCase& c);

// max |a - b| / max(max |b|, tiny), in double, over all elements (any float dtypes).
double max_rel_diff(const Tensor& a, const Tensor& b);
double value_at(const Tensor& t, int64_t i);

}  // namespace tessera::testing
