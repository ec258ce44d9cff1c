// Checks shared by the tensor-parallel tests (dense and V4): a split model against the whole model built in the
// same process.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include "model/param.h"
#include "optim/muon.h"
#include "parallel/data_parallel.h"
#include "tests/unit/test_util.h"

namespace tessera::testing {

// max |got - want| over the tensor, relative to max |want|.
inline double relative_error(const Tensor& got, const Tensor& want) {
  std::vector<double> g = values_of(got), w = values_of(want);
  EXPECT_EQ(g.size(), w.size());
  double diff = 0, scale = 0;
  for (size_t k = 0; k < g.size() && k < w.size(); ++k) {
    diff = std::max(diff, std::abs(g[k] - w[k]));
    scale = std::max(scale, std::abs(w[k]));
  }
  return scale > 0 ? diff / scale : diff;
}

inline std::map<std::string, Param*> by_name(const ParamList& ps) {
  std::map<std::string, Param*> out;
  for (Param* p : ps) out[p->name] = p;
  return out;
}

// The clipping norm of the parts is the whole model's (within tolerance / 10: one sum, no Newton-Schulz); Muon on
// the parts gives each rank's part of the whole matrices' update within tolerance (the gradients set equal first,
// so that the comparison is of Muon alone). Changes both models' matrices.
inline void expect_clipping_and_muon_on_parts(const ParamList& part, const ParamList& whole, double tolerance,
                                              const std::string& where) {
  const double whole_norm = clip_grad_norm(whole, 0.0), part_norm = clip_grad_norm(part, 0.0);
  EXPECT_NEAR(part_norm, whole_norm, tolerance / 10 * whole_norm) << where;
  std::map<std::string, Param*> ref = by_name(whole);
  ParamList whole_matrices, part_matrices;
  for (Param* p : part)
    if (p->kind == ParamKind::matrix) {
      p->grad.copy_from(p->slice_of(ref.at(p->name)->grad));
      part_matrices.push_back(p), whole_matrices.push_back(ref.at(p->name));
    }
  Muon whole_muon(whole_matrices, MuonConfig{}), part_muon(part_matrices, MuonConfig{});
  for (int step = 0; step < 2; ++step) whole_muon.step(0.01), part_muon.step(0.01);
  for (Param* p : part_matrices)
    EXPECT_LT(relative_error(p->value, p->slice_of(ref.at(p->name)->value)), tolerance)
        << p->name << " after Muon" << where;
}

}  // namespace tessera::testing
