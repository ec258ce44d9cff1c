// Writes what the PyTorch oracle (check_v4.py) compares against: the tiny V4 model's parameters (moved off their
// initialisation), a packed batch with two documents, and Tessera's objective, main loss, logits, MTP logits and
// every parameter gradient of the objective. Usage: v4_dump OUT.h5 f32|f64 [score_func]
// With `v4_dump OUT_DIR hf` it writes instead the configuration where Hugging Face's DeepseekV4ForCausalLM agrees
// with Tessera by construction (one document per row, no quantisation simulation, index_topk covering every
// block; MTP is not exported): OUT_DIR/hf (the export) and OUT_DIR/dump.h5 (ids and Tessera's fp32 logits), for
// check_v4_hf.py.
#include <cstdio>

#include "io/h5.h"
#include "io/hf_export.h"
#include "tests/unit/v4_test_model.h"

using namespace tessera;

static int dump_for_hf(const std::string& dir) {
  ModelConfig cfg = testing::tiny_v4_config();
  cfg.indexer_fp4 = false;
  cfg.kv_fp8 = false;
  TokenBatch batch = testing::tiny_v4_batch(cfg.vocab_size, 3);
  batch.doc = Tensor();  // Hugging Face has no packed documents
  const int64_t B = batch.batch_size(), T = batch.seq_len(), V = cfg.vocab_size;
  cfg.index_topk = T / cfg.csa_ratio;  // top-k keeps every block: no tie-breaking differences
  V4Model model(cfg, DType::f32);
  testing::randomize_v4(model, 7);
  Tensor logits;
  model.forward(batch, &logits);
  NamedTensors named;
  for (Param* p : model.saved_tensors()) named.emplace_back(p->name, p->value);
  write_hf_v4(cfg, named, dir + "/hf", 0, 1);
  io::H5Writer w(dir + "/dump.h5");
  w.write_attr("config_json", testing::v4_config_json(cfg));
  w.write_attr("dtype", std::string("f32"));
  w.write_tensor("batch/ids", batch.ids);
  w.write_tensor("out/logits", logits.reshape({B, T, V}));
  w.commit();
  std::printf("wrote %s/hf and %s/dump.h5\n", dir.c_str(), dir.c_str());
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[2]) == "hf") return dump_for_hf(argv[1]);
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s OUT.h5 f32|f64 [score_func]\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1], prec = argv[2];
  const DType dt = prec == "f64" ? DType::f64 : DType::f32;
  ModelConfig cfg = testing::tiny_v4_config();
  if (argc > 3) cfg.score_func = argv[3];
  V4Model model(cfg, dt);
  testing::randomize_v4(model, 7);
  TokenBatch batch = testing::tiny_v4_batch(cfg.vocab_size, 3);
  const int64_t B = batch.batch_size(), T = batch.seq_len(), V = cfg.vocab_size;
  const int64_t n_targets = batch.count_targets();
  model.zero_grad();
  double loss_sum = model.forward_backward(batch, 1.0 / double(n_targets));
  Tensor logits;
  model.forward(batch, &logits);

  io::H5Writer w(out);
  w.write_attr("config_json", testing::v4_config_json(cfg));
  w.write_attr("dtype", prec);
  for (const Param* p : model.params()) w.write_tensor("params/" + p->name, p->value);
  for (const Param* p : model.buffers()) w.write_tensor("params/" + p->name, p->value);
  w.write_tensor("batch/ids", batch.ids);
  w.write_tensor("batch/targets", batch.targets);
  w.write_tensor("batch/doc", batch.doc);
  Tensor obj = Tensor::empty({1}, DType::f64), loss = Tensor::empty({1}, DType::f64);
  obj.data<double>()[0] = model.last_stats().objective;
  loss.data<double>()[0] = loss_sum / double(n_targets);
  w.write_tensor("out/objective", obj);
  w.write_tensor("out/loss", loss);
  w.write_tensor("out/logits", logits.reshape({B, T, V}));
  if (cfg.mtp_depth == 1) w.write_tensor("out/mtp_logits", model.last_mtp_logits().reshape({B, T, V}));
  for (const Param* p : model.params()) w.write_tensor("grads/" + p->name, p->grad);
  w.commit();
  std::printf("wrote %s: loss %.6f objective %.6f\n", out.c_str(), loss.data<double>()[0], obj.data<double>()[0]);
  return 0;
}
