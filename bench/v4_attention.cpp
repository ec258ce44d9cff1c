// Forward + backward time per token of one V4 attention layer at growing context: dense (a window as long as the
// context), CSA (m = 4, top-k from the lightning indexer) and HCA (m' = 128), each with the 128-token window.
// The layer is a one-layer V4 model whose MoE, embedding and head are tiny, so attention dominates; the same
// projections run in all three. Usage: v4_attention [max_context] [repeats]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/rng.h"
#include "model/v4.h"

using namespace tessera;

static ModelConfig layer_config(const std::string& kind, int64_t T) {
  ModelConfig c;
  c.arch = "deepseek_v4";
  c.vocab_size = 64;
  c.dim = 256;
  c.n_layers = 1;
  c.max_seq_len = T;
  c.n_heads = 4;
  c.head_dim = 128;
  c.rope_dim = 32;
  c.q_lora_rank = 128;
  c.o_groups = 2;
  c.o_lora_rank = 128;
  c.window = kind == "dense" ? T : 128;
  c.compress_ratios = {kind == "csa" ? 4 : kind == "hca" ? 128 : 0};
  c.index_n_heads = 4;
  c.index_head_dim = 64;
  c.index_topk = 64;
  c.n_routed_experts = 1;
  c.n_activated_experts = 1;
  c.n_shared_experts = 0;
  c.moe_inter_dim = 8;
  c.n_hash_layers = 0;
  c.mtp_depth = 0;
  c.hc_mult = 4;
  return c;
}

int main(int argc, char** argv) {
  const int64_t max_T = argc > 1 ? std::atoll(argv[1]) : 16384;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 2;
  std::printf("%-6s %8s %14s %12s\n", "kind", "context", "us/token", "vs half ctx");
  for (const char* kind : {"dense", "csa", "hca"}) {
    double prev = 0;
    for (int64_t T = 1024; T <= max_T; T *= 2) {
      V4Model model(layer_config(kind, T));
      model.init(1);
      TokenBatch b;
      b.ids = Tensor::empty({1, T}, DType::i32);
      b.targets = Tensor::empty({1, T}, DType::i32);
      Rng rng{1, stream_id("bench")};
      for (int64_t t = 0; t < T; ++t) {
        b.ids.data<int32_t>()[t] = int32_t(rng.below(t, 64));
        b.targets.data<int32_t>()[t] = int32_t(rng.below(T + t, 64));
      }
      model.forward_backward(b, 1.0 / T);  // warm-up
      double best = 1e30;
      for (int r = 0; r < repeats; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        model.forward_backward(b, 1.0 / T);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      double us = best / double(T) * 1e6;
      if (prev > 0) std::printf("%-6s %8lld %14.2f %11.2fx\n", kind, (long long)T, us, us / prev);
      else std::printf("%-6s %8lld %14.2f %12s\n", kind, (long long)T, us, "-");
      std::fflush(stdout);
      prev = us;
    }
  }
  return 0;
}
