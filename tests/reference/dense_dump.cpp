// Writes what the PyTorch oracle (check_dense.py) compares against: a tiny dense model's checkpoint exported
// to the Hugging Face Llama layout, its logits, loss and every parameter gradient on a fixed batch, and a
// ten-step AdamW trajectory (losses, learning rates, final weights).
#include <cstdio>
#include <filesystem>

#include "tests/unit/test_util.h"
#include "io/checkpoint.h"
#include "io/h5.h"
#include "io/hf_export.h"
#include "model/dense.h"
#include "optim/adamw.h"

using namespace tessera;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1];
  std::filesystem::create_directories(out);
  ModelConfig cfg;
  cfg.vocab_size = 272;  // the byte tokenizer's
  cfg.dim = 64;
  cfg.n_layers = 2;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.ffn_dim = 160;
  cfg.max_seq_len = 32;
  cfg.init_std = 0.1;
  const int64_t B = 2, T = 24, steps = 10;

  DenseModel model(cfg);
  ParamList params = model.params();
  model.init(1);
  save_checkpoint(out + "/init.h5", cfg, params, nullptr, CheckpointMeta{});
  export_hf(out + "/init.h5", out + "/hf", 256, 257);  // the byte tokenizer's BOS and EOS

  io::H5Writer dump(out + "/dump.h5");
  TokenBatch batch = tessera::testing::random_token_batch(B, T, cfg.vocab_size, 0);
  dump.write_tensor("inputs", batch.ids);
  dump.write_tensor("targets", batch.targets);
  Tensor logits;
  double loss = model.forward(batch, &logits) / double(B * T);
  dump.write_tensor("logits", logits.reshape({B, T, cfg.vocab_size}));
  dump.write_attr("loss", loss);
  model.zero_grad();
  model.forward_backward(batch, 1.0 / double(B * T));
  for (const Param* p : params) dump.write_tensor("grads/" + hf_llama_name(p->name), p->grad);

  // Ten AdamW steps: warmup then cosine, clipping at 1.0, a new batch each step.
  {
    const std::string prefix = "adamw/";
    DenseModel m(cfg);
    ParamList ps = m.params();
    m.init(1);
    AdamWConfig acfg{3e-3, 0.9, 0.95, 1e-8, 0.1};
    LrSchedule sched{acfg.lr, 3, steps, steps - 3, 0.1};
    const double clip = 1.0;
    AdamW opt(ps, acfg);
    Tensor losses = Tensor::empty({steps}, DType::f64), lrs = Tensor::empty({steps}, DType::f64);
    Tensor inputs = Tensor::empty({steps, B, T}, DType::i32), targets = Tensor::empty({steps, B, T}, DType::i32);
    for (int64_t s = 0; s < steps; ++s) {
      TokenBatch b = tessera::testing::random_token_batch(B, T, cfg.vocab_size, 100 + s);
      inputs.slice(s, 1).reshape({B, T}).copy_from(b.ids);
      targets.slice(s, 1).reshape({B, T}).copy_from(b.targets);
      m.zero_grad();
      losses.data<double>()[s] = m.forward_backward(b, 1.0 / double(B * T)) / double(B * T);
      clip_grad_norm(ps, clip);
      lrs.data<double>()[s] = sched.at(s);
      opt.step(sched.at(s));
    }
    dump.write_tensor(prefix + "inputs", inputs);
    dump.write_tensor(prefix + "targets", targets);
    dump.write_tensor(prefix + "losses", losses);
    dump.write_tensor(prefix + "lrs", lrs);
    dump.write_attr("adamw.beta1", acfg.beta1);
    dump.write_attr("adamw.beta2", acfg.beta2);
    dump.write_attr("adamw.eps", acfg.eps);
    dump.write_attr("adamw.weight_decay", acfg.weight_decay);
    dump.write_attr("adamw.grad_clip", clip);
    for (const Param* p : ps) {
      dump.write_tensor(prefix + "final/" + hf_llama_name(p->name), p->value);
      dump.write_attr("decay/" + hf_llama_name(p->name), int64_t(AdamW::decays(*p)));
    }
  }
  dump.commit();
  std::printf("wrote %s/dump.h5 and %s/hf\n", out.c_str(), out.c_str());
  return 0;
}
