// Expert parallelism on the tiny V4 model, under mpirun (-np 4 in ctest): every rank also builds the whole model
// in-process as the reference. The ep ranks each train a contiguous share of the micro-batches (as data-parallel
// ranks do), their MoE layers exchanging rows by all_to_all_v; the losses and every gradient must equal the
// single-process pairwise sum over all micro-batches bitwise, including when routing sends no token to one rank.
#include <gtest/gtest.h>

#include <memory>

#include "core/error.h"
#include "ops/ops.h"
#include "parallel/data_parallel.h"
#include "parallel/mpi_communicator.h"
#include "tests/unit/v4_test_model.h"

namespace tessera {
Communicator* g_world = nullptr;
namespace {


ModelConfig ep_config(int64_t n_hash_layers) {
  ModelConfig c = testing::tiny_v4_config();
  c.n_routed_experts = 8;  // divisible by ep = 2 and 4
  c.n_hash_layers = n_hash_layers;
  return c;
}

// The reference's values in the EP model (each shard its rows), buffers included.
void copy_values(V4Model& from, V4Model& to) {
  ParamList a = from.saved_tensors(), b = to.saved_tensors();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i]->name, b[i]->name);
    ASSERT_EQ(a[i]->value.shape(), b[i]->logical_shape()) << a[i]->name;
    b[i]->value.copy_from(a[i]->value.slice(b[i]->shard_offset, b[i]->value.size(0)));
  }
}

// Routing of every score-routed layer pinned to experts {0, 1}: all on the first ep rank.
std::vector<Tensor> all_to_first_rank(V4Model& model, int64_t N) {
  std::vector<Tensor> idx;
  for (int64_t l = 0; l < model.n_score_routed_layers(); ++l) {
    Tensor t = Tensor::empty({N, 2}, DType::i32);
    for (int64_t i = 0; i < N; ++i) t.data<int32_t>()[2 * i] = 0, t.data<int32_t>()[2 * i + 1] = 1;
    idx.push_back(t);
  }
  return idx;
}

// Losses and gradients of micro-batches [0, M) at ep = the group size of `ep`, against the whole model.
void check_against_one_process(int ep_size, int64_t n_hash_layers, bool pin_routing) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  Communicator& world = *g_world;
  ASSERT_EQ(world.size() % ep_size, 0);
  // Consecutive blocks of ep_size ranks (the layout topology.h gives EP carved from DP): each block is one group.
  std::unique_ptr<Communicator> ep = world.split(world.rank() / ep_size, world.rank());
  const ModelConfig cfg = ep_config(n_hash_layers);
  const int64_t M = 4, per_rank = M / ep_size, first = ep->rank() * per_rank;
  int64_t n_targets = 0;
  const std::vector<TokenBatch> micro =
      testing::micro_batches(
          M, [&](int64_t m) { return testing::tiny_v4_batch(cfg.vocab_size, 100 + uint64_t(m)); }, n_targets);
  const int64_t N = micro[0].ids.numel();
  const double scale = 1.0 / double(n_targets);

  V4Model whole(cfg);
  testing::randomize_v4(whole, 7);
  if (pin_routing) whole.set_routing_override(all_to_first_rank(whole, N));
  GradientStack stack;
  std::vector<double> whole_loss(M);
  pairwise_gradients(whole, 0, M, stack, [&](int64_t m) { whole_loss[m] = whole.forward_backward(micro[m], scale); });

  V4Model sharded(cfg);
  sharded.set_expert_parallel(*ep);
  copy_values(whole, sharded);
  if (pin_routing) sharded.set_routing_override(all_to_first_rank(sharded, N));
  GradientStack stack2;
  std::vector<double> loss(M, 0.0);
  pairwise_gradients(sharded, first, first + per_rank, stack2,
                     [&](int64_t m) { loss[m] = sharded.forward_backward(micro[m], scale); });
  for (int64_t m = first; m < first + per_rank; ++m) EXPECT_EQ(loss[m], whole_loss[m]) << "micro-batch " << m;

  // The data-parallel sum over the group finishes the non-expert gradients; the expert gradients are complete.
  ParamList ps = sharded.params(), ref = whole.params();
  bool any_expert_zero = false;
  for (size_t i = 0; i < ps.size(); ++i) {
    Param& p = *ps[i];
    if (!p.sharded()) ep->all_reduce(p.grad, ReduceOp::sum);
    Tensor want = ref[i]->grad.slice(p.shard_offset, p.grad.size(0));
    std::vector<double> got = testing::values_of(p.grad), exp = testing::values_of(want);
    ASSERT_EQ(got.size(), exp.size()) << p.name;
    int64_t diff = 0;
    for (size_t k = 0; k < got.size(); ++k) diff += got[k] != exp[k];
    EXPECT_EQ(diff, 0) << p.name << " on ep rank " << ep->rank() << ": " << diff << " elements differ";
    if (p.sharded() && ops::sum_squares(p.grad) == 0.0) any_expert_zero = true;
  }
  if (pin_routing && ep->rank() > 0) {
    EXPECT_TRUE(any_expert_zero) << "rank " << ep->rank() << " got tokens";
  }
}

TEST(ExpertParallel, TwoRanksEqualOneProcess) { check_against_one_process(2, 1, false); }
TEST(ExpertParallel, FourRanksEqualOneProcess) { check_against_one_process(4, 1, false); }
// No hash layer (its table would route to every rank): every token goes to experts 0 and 1 of ep rank 0; the
// others receive nothing, still take part in every exchange, and their experts' gradients are exactly zero.
TEST(ExpertParallel, RankWithNoTokens) { check_against_one_process(4, 0, true); }

TEST(ExpertParallel, ExpertsMustDivide) {
  ASSERT_TRUE(g_world);
  ModelConfig c = ep_config(1);
  c.n_routed_experts = 6;
  std::unique_ptr<Communicator> ep = g_world->split(g_world->rank() / 4, g_world->rank());
  V4Model m(c);
  try {
    m.set_expert_parallel(*ep);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n_routed_experts (6) must be a multiple of parallel.ep (4)"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace tessera

#include "tests/parallel/mpi_gtest_main.h"
