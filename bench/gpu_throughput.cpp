// Training throughput on the CUDA backend: tokens/s and MFU of a full training step (forward, backward,
// optimizer) of dense Llama-layout models sized to fill an H100/H200, against the bf16 dense peak of 989
// TFLOP/s; plus the GEMM rate of ops::gemm at 8192^3 in each matmul precision (the ceiling of this design).
// FLOPs per token: ModelConfig::train_flops_per_token (6 x matmul parameters + 12 x layers x dim x seq).
// Usage: gpu_throughput [steps] [preset...]   presets: dense-1b dense-3b (default: both)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "core/rng.h"
#include "model/model.h"
#include "ops/ops.h"
#include "optim/optimizer.h"

using namespace tessera;

namespace {

constexpr double kPeakBf16 = 989e12;  // H100/H200 SXM dense bf16, the reference

struct Preset {
  std::string name;
  ModelConfig cfg;
  int64_t batch, seq;
};

Preset preset(const std::string& name) {
  ModelConfig c;
  c.vocab_size = 32768;
  c.max_seq_len = 2048;
  c.init_std = 0.02;
  if (name == "dense-1b") {
    c.dim = 2048, c.n_layers = 16, c.n_heads = 16, c.n_kv_heads = 4, c.ffn_dim = 5632;
    return {name, c, 8, 2048};
  }
  if (name == "dense-3b") {
    c.dim = 3072, c.n_layers = 24, c.n_heads = 24, c.n_kv_heads = 8, c.ffn_dim = 8192;
    return {name, c, 4, 2048};
  }
  std::fprintf(stderr, "unknown preset %s (dense-1b, dense-3b)\n", name.c_str());
  std::exit(2);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void gemm_rate(Backend& gpu) {
  const int64_t n = 8192;
  Tensor a = Tensor::empty({n, n}, DType::f32, Device::cuda), b = Tensor::empty({n, n}, DType::f32, Device::cuda);
  Tensor c = Tensor::empty({n, n}, DType::f32, Device::cuda);
  ops::fill(a, 0.01);
  ops::fill(b, 0.02);
  for (MatmulPrecision p : {MatmulPrecision::fp32, MatmulPrecision::bf16}) {
    gpu.set_matmul_precision(p);
    ops::gemm(a, false, b, true, c);
    gpu.synchronize();
    const int reps = 10;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) ops::gemm(a, false, b, true, c);
    gpu.synchronize();
    double s = seconds_since(t0) / reps, tflops = 2.0 * n * n * n / s / 1e12;
    std::printf("gemm 8192^3 fp32 tensors, %s products: %.1f TFLOP/s (%.1f%% of 989)\n",
                p == MatmulPrecision::fp32 ? "fp32" : "bf16 tensor-core", tflops, 100 * tflops * 1e12 / kPeakBf16);
  }
}

void train_rate(Backend& gpu, const Preset& ps, int steps, const std::string& optimizer) {
  gpu.set_matmul_precision(MatmulPrecision::bf16);
  auto model = make_model(ps.cfg, DType::f32, Device::cuda);
  model->init(1);
  OptimizerConfig oc;
  oc.name = optimizer;
  Optimizer opt(model->params(), oc);
  std::vector<TokenBatch> batches;
  for (int i = 0; i < 2; ++i) {
    TokenBatch b;
    b.ids = Tensor::empty({ps.batch, ps.seq}, DType::i32, Device::cpu);
    b.targets = Tensor::empty({ps.batch, ps.seq}, DType::i32, Device::cpu);
    Rng rng{uint64_t(i), stream_id("bench")};
    for (int64_t j = 0; j < b.ids.numel(); ++j) {
      b.ids.data<int32_t>()[j] = int32_t(rng.below(2 * j, ps.cfg.vocab_size));
      b.targets.data<int32_t>()[j] = int32_t(rng.below(2 * j + 1, ps.cfg.vocab_size));
    }
    batches.push_back(b.on(Device::cuda));
  }
  const double tokens = double(ps.batch * ps.seq), flops = ps.cfg.train_flops_per_token(ps.seq);
  double params = 0;
  for (Param* p : model->params()) params += double(p->value.numel());
  double fb_time = 0, step_time = 0, loss = 0;
  for (int s = -1; s < steps; ++s) {  // step -1 warms up (allocations, cuBLAS heuristics)
    auto t0 = std::chrono::steady_clock::now();
    model->zero_grad();
    loss = model->forward_backward(batches[(s + 1) % 2], 1.0 / tokens);  // the loss read-back synchronises
    double fb = seconds_since(t0);
    opt.step(1e-4);
    gpu.synchronize();
    if (s >= 0) fb_time += fb, step_time += seconds_since(t0);
  }
  fb_time /= steps, step_time /= steps;
  std::printf("%s (%.2fB params, %s, batch %lld x %lld): loss %.3f | step %.3f s: %.0f tokens/s, MFU %.1f%% | "
              "forward+backward %.3f s: MFU %.1f%% | GPU memory held %.1f GB\n",
              ps.name.c_str(), params / 1e9, optimizer.c_str(), (long long)ps.batch, (long long)ps.seq,
              loss / tokens, step_time, tokens / step_time, 100 * tokens * flops / step_time / kPeakBf16, fb_time,
              100 * tokens * flops / fb_time / kPeakBf16, double(cuda_peak_reserved_bytes()) / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  if (!device_available(Device::cuda)) {
    std::printf("gpu_throughput: no CUDA device; nothing measured\n");
    return 0;
  }
  int steps = argc > 1 ? std::atoi(argv[1]) : 5;
  std::vector<std::string> names;
  for (int i = 2; i < argc; ++i) names.push_back(argv[i]);
  if (names.empty()) names = {"dense-1b", "dense-3b"};
  Backend& gpu = backend_for(Device::cuda);
  try {
    gemm_rate(gpu);
    for (const std::string& n : names) train_rate(gpu, preset(n), steps, "adamw");
    train_rate(gpu, preset(names.front()), steps, "muon");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_throughput: %s\n", e.what());
    return 1;
  }
  return 0;
}
