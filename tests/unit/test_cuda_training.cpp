// Training on the CUDA backend against the CPU: the same dense model, initialisation and batches give the same
// losses, gradients and weights after optimizer steps (fp32 on both: the GPU differs only in summation order),
// and the bf16 tensor-core mode stays close. Skips when no GPU is usable (TESSERA_REQUIRE_CUDA=1 makes that a
// failure, for launch/gpu-check.sh).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "backend/backend.h"
#include "model/model.h"
#include "optim/optimizer.h"
#include "gpu_test_util.h"
#include "test_util.h"

using namespace tessera;

namespace {

ModelConfig small_dense() { return tessera::testing::dense_test_config(272, 64, 2, 160, 64, 0.05); }

TokenBatch batch_with_docs(uint64_t seed) {
  const int64_t B = 2, T = 48;
  TokenBatch b = tessera::testing::random_token_batch(B, T, 272, seed);
  b.targets.data<int32_t>()[5] = -1;
  b.doc = Tensor::empty({B, T}, DType::i32);
  for (int64_t i = 0; i < B * T; ++i) b.doc.data<int32_t>()[i] = int32_t((i % T) >= 20);
  return b;
}

// Trains both models `steps` steps with `opt_name` and checks losses, gradients and weights after each.
void expect_same_training(const std::string& opt_name, double loss_rtol, double tensor_rtol, bool bf16) {
  ModelConfig cfg = small_dense();
  auto cpu = make_model(cfg, DType::f32, Device::cpu);
  auto gpu = make_model(cfg, DType::f32, Device::cuda);
  cpu->init(7);
  gpu->init(7);
  backend_for(Device::cuda).set_matmul_precision(bf16 ? MatmulPrecision::bf16 : MatmulPrecision::fp32);
  OptimizerConfig oc;
  oc.name = opt_name;
  Optimizer cpu_opt(cpu->params(), oc), gpu_opt(gpu->params(), oc);
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    TokenBatch b = batch_with_docs(100 + step);
    cpu->zero_grad();
    gpu->zero_grad();
    double lc = cpu->forward_backward(b, 1.0 / 90), lg = gpu->forward_backward(b, 1.0 / 90);
    EXPECT_NEAR(lg, lc, loss_rtol * std::abs(lc)) << "loss";
    ParamList pc = cpu->params(), pg = gpu->params();
    for (size_t i = 0; i < pc.size(); ++i)
      EXPECT_LE(tessera::testing::max_rel_to_host(pg[i]->grad, pc[i]->grad), tensor_rtol) << "gradient of " << pc[i]->name;
    cpu_opt.step(1e-3);
    gpu_opt.step(1e-3);
    for (size_t i = 0; i < pc.size(); ++i)
      EXPECT_LE(tessera::testing::max_rel_to_host(pg[i]->value, pc[i]->value), tensor_rtol) << "weights of " << pc[i]->name;
  }
  backend_for(Device::cuda).set_matmul_precision(MatmulPrecision::fp32);
}

}  // namespace

TEST(CudaTraining, DenseAdamWMatchesCpu) {
  if (!tessera::testing::need_gpu()) GTEST_SKIP() << "no CUDA device: GPU training parity not run";
  expect_same_training("adamw", 1e-5, 1e-4, false);
}

TEST(CudaTraining, DenseMuonMatchesCpu) {
  if (!tessera::testing::need_gpu()) GTEST_SKIP() << "no CUDA device: GPU training parity not run";
  expect_same_training("muon", 1e-5, 1e-4, false);
}

// bf16 tensor cores: inputs of every product rounded to 8 mantissa bits, so only closeness is expected.
TEST(CudaTraining, DenseBf16MatmulsStayClose) {
  if (!tessera::testing::need_gpu()) GTEST_SKIP() << "no CUDA device: GPU training parity not run";
  expect_same_training("adamw", 2e-3, 5e-2, true);
}

TEST(CudaTraining, LogitsOfAForwardMatchCpu) {
  if (!tessera::testing::need_gpu()) GTEST_SKIP() << "no CUDA device: GPU training parity not run";
  ModelConfig cfg = small_dense();
  auto cpu = make_model(cfg, DType::f32, Device::cpu);
  auto gpu = make_model(cfg, DType::f32, Device::cuda);
  cpu->init(3);
  gpu->init(3);
  TokenBatch b = batch_with_docs(5);
  Tensor lc, lg;
  double loss_c = cpu->forward(b, &lc), loss_g = gpu->forward(b, &lg);
  EXPECT_EQ(lg.device(), Device::cuda);
  EXPECT_LE(tessera::testing::max_rel_to_host(lg, lc), 1e-5);
  EXPECT_NEAR(loss_g, loss_c, 1e-5 * loss_c);
}
