// DeepSeek-V4 training on the CUDA backend against the CPU: the tiny V4 model (every layer type, hash and
// score-routed MoE, mHC, MTP, the indexer loss) with the same parameters and buffers, on a batch packing two
// documents, gives the same losses, V4 stats, routing, gradients, balancing-bias updates and weights after
// optimizer steps (fp32 on both: the GPU differs only in summation order). Skips when no GPU is usable
// (TESSERA_REQUIRE_CUDA=1 makes that a failure, for launch/gpu-check.sh).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "model/model.h"
#include "optim/optimizer.h"
#include "tests/unit/gpu_test_util.h"
#include "tests/unit/test_util.h"
#include "tests/unit/v4_test_model.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

void expect_close(double gpu, double cpu, double rtol, const char* what) {
  EXPECT_NEAR(gpu, cpu, rtol * std::max(std::abs(cpu), 1e-6)) << what;
}

// The tiny V4 model on the CPU (randomised) and the same parameters and buffers copied into one on the GPU.
struct Pair {
  ModelConfig cfg = tiny_v4_config();
  V4Model cpu{cfg, DType::f32, Device::cpu};
  V4Model gpu{cfg, DType::f32, Device::cuda};
  Pair() {
    randomize_v4(cpu, 3);
    ParamList a = cpu.saved_tensors(), b = gpu.saved_tensors();
    EXPECT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(b[i]->value.device(), Device::cuda) << b[i]->name;
      b[i]->value.copy_from(a[i]->value);
    }
  }
};

void expect_same_stats(V4Model& gpu, V4Model& cpu) {
  const V4Model::Stats &g = gpu.last_stats(), &c = cpu.last_stats();
  expect_close(g.main_loss_sum, c.main_loss_sum, 1e-5, "main_loss_sum");
  expect_close(g.mtp_loss_sum, c.mtp_loss_sum, 1e-5, "mtp_loss_sum");
  expect_close(g.balance_loss, c.balance_loss, 1e-5, "balance_loss");
  expect_close(g.indexer_kl_sum, c.indexer_kl_sum, 1e-4, "indexer_kl_sum");
  expect_close(g.objective, c.objective, 1e-5, "objective");
  EXPECT_EQ(g.main_targets, c.main_targets);
  EXPECT_EQ(g.mtp_targets, c.mtp_targets);
  ASSERT_EQ(g.swiglu_input_max_abs.size(), c.swiglu_input_max_abs.size());
  ASSERT_EQ(g.router_logit_max.size(), c.router_logit_max.size());
  for (size_t l = 0; l < c.swiglu_input_max_abs.size(); ++l) {
    expect_close(g.swiglu_input_max_abs[l], c.swiglu_input_max_abs[l], 1e-4, "swiglu_input_max_abs");
    expect_close(g.router_logit_max[l], c.router_logit_max[l], 1e-4, "router_logit_max");
  }
  // The same experts chosen: identical routing (and so identical loads and balancing-bias updates).
  std::vector<Tensor> ig = gpu.routing_indices(), ic = cpu.routing_indices();
  ASSERT_EQ(ig.size(), ic.size());
  for (size_t l = 0; l < ic.size(); ++l) {
    ASSERT_EQ(ig[l].device(), Device::cpu);
    ASSERT_EQ(ig[l].shape(), ic[l].shape());
    EXPECT_EQ(std::memcmp(ig[l].raw(), ic[l].raw(), ic[l].nbytes()), 0) << "routing of score-routed layer " << l;
  }
  EXPECT_EQ(gpu.expert_load(), cpu.expert_load());
}

// Trains both models 3 steps with `opt_name` (balancing-bias updates included) and checks losses, stats, routing,
// gradients, buffers and weights after each.
void expect_same_training(const std::string& opt_name) {
  Pair m;
  backend_for(Device::cuda).set_matmul_precision(MatmulPrecision::fp32);
  OptimizerConfig oc;
  oc.name = opt_name;
  Optimizer cpu_opt(m.cpu.params(), oc), gpu_opt(m.gpu.params(), oc);
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    TokenBatch b = tiny_v4_batch(m.cfg.vocab_size, 100 + step);  // row 0 packs two documents
    m.cpu.zero_grad();
    m.gpu.zero_grad();
    double lc = m.cpu.forward_backward(b, 1.0 / 60), lg = m.gpu.forward_backward(b, 1.0 / 60);
    EXPECT_NEAR(lg, lc, 1e-5 * std::abs(lc)) << "loss";
    expect_same_stats(m.gpu, m.cpu);
    ParamList pc = m.cpu.params(), pg = m.gpu.params();
    ASSERT_EQ(pc.size(), pg.size());
    for (size_t i = 0; i < pc.size(); ++i)
      EXPECT_LE(tessera::testing::max_rel_to_host(pg[i]->grad, pc[i]->grad), 1e-4) << "gradient of " << pc[i]->name;
    cpu_opt.step(1e-3);
    gpu_opt.step(1e-3);
    m.cpu.update_routing_bias(1e-3);
    m.gpu.update_routing_bias(1e-3);
    for (size_t i = 0; i < pc.size(); ++i)
      EXPECT_LE(tessera::testing::max_rel_to_host(pg[i]->value, pc[i]->value), 1e-4) << "weights of " << pc[i]->name;
    ParamList bc = m.cpu.buffers(), bg = m.gpu.buffers();
    ASSERT_EQ(bc.size(), bg.size());
    for (size_t i = 0; i < bc.size(); ++i) {
      Tensor g = bg[i]->value.to_device(Device::cpu);
      ASSERT_EQ(g.nbytes(), bc[i]->value.nbytes());
      if (bc[i]->value.dtype() == DType::i32)
        EXPECT_EQ(std::memcmp(g.raw(), bc[i]->value.raw(), g.nbytes()), 0) << bc[i]->name;
      else
        EXPECT_LE(tessera::testing::max_rel_to_host(bg[i]->value, bc[i]->value), 1e-5) << bc[i]->name;
    }
  }
}

}  // namespace

TEST(CudaV4Training, AdamWMatchesCpu) {
  if (!tessera::testing::need_gpu()) GTEST_SKIP() << "no CUDA device: GPU training parity not run";
  expect_same_training("adamw");
}

TEST(CudaV4Training, MuonMatchesCpu) {
  if (!tessera::testing::need_gpu()) GTEST_SKIP() << "no CUDA device: GPU training parity not run";
  expect_same_training("muon");
}

// A no-grad forward through make_model: logits on the GPU, the same as the CPU's, and the same stats.
TEST(CudaV4Training, LogitsOfAForwardMatchCpu) {
  if (!tessera::testing::need_gpu()) GTEST_SKIP() << "no CUDA device: GPU training parity not run";
  Pair m;
  auto via_factory = make_model(m.cfg, DType::f32, Device::cuda);
  ParamList a = m.cpu.saved_tensors(), b = via_factory->saved_tensors();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) b[i]->value.copy_from(a[i]->value);
  TokenBatch batch = tiny_v4_batch(m.cfg.vocab_size, 5);
  Tensor lc, lg, lf;
  double loss_c = m.cpu.forward(batch, &lc), loss_g = m.gpu.forward(batch, &lg);
  double loss_f = via_factory->forward(batch, &lf);
  EXPECT_EQ(lg.device(), Device::cuda);
  EXPECT_LE(tessera::testing::max_rel_to_host(lg, lc), 1e-5);
  EXPECT_LE(tessera::testing::max_rel_to_host(lf, lc), 1e-5);
  EXPECT_LE(tessera::testing::max_rel_to_host(m.gpu.last_mtp_logits(), m.cpu.last_mtp_logits()), 1e-5);
  EXPECT_NEAR(loss_g, loss_c, 1e-5 * loss_c);
  EXPECT_NEAR(loss_f, loss_c, 1e-5 * loss_c);
  expect_same_stats(m.gpu, m.cpu);
}
