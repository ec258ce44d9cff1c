// Internal to the CPU backend: the helpers shared by cpu_backend.cpp and the V4 kernel files (cpu_v4_*.cpp).
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"

namespace tessera::cpu {

// Row-major Eigen matrices, and maps of tensor memory as such (MapVec: a column vector).
template <class T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MapMat = Eigen::Map<RowMat<T>>;
template <class T>
using CMapMat = Eigen::Map<const RowMat<T>>;
template <class T>
using StridedMap = Eigen::Map<RowMat<T>, 0, Eigen::OuterStride<>>;
template <class T>
using MapVec = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>;
template <class T>
using CMapVec = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Calls f.template operator()<T>() with T = float or double according to the tensor's dtype.
template <class F>
void dispatch_float(const Tensor& t, F&& f) {
  if (t.dtype() == DType::f32) f.template operator()<float>();
  else if (t.dtype() == DType::f64) f.template operator()<double>();
  else TS_CHECK(false, "CPU kernels take f32 or f64, got ", t.str());
}

// t's data, or nullptr for an undefined (optional) tensor.
template <class T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

// start[t]: the first key position a query at t may see, the start of its document (0 for all t without
// documents, doc = nullptr).
inline void document_starts(const int32_t* doc, int64_t T, std::vector<int64_t>& start) {
  start.resize(T);
  for (int64_t t = 0; t < T; ++t) start[t] = (!doc || t == 0 || doc[t] != doc[t - 1]) ? t : start[t - 1];
  if (!doc) std::fill(start.begin(), start.end(), 0);
}

// Backend::attention_decode on the CPU (cpu_decode.cpp).
void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, double scale,
                      const Tensor& out);

}  // namespace tessera::cpu
