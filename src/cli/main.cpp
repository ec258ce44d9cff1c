// The `tessera` binary: subcommands wire recipes and checkpoints to stages (DESIGN.md §4 "CLI").
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>

#include "cli/model_recipe.h"
#include "cli/pipeline.h"
#include "cli/pretrain.h"
#include "cli/sample.h"
#include "cli/stages.h"
#include "core/log.h"
#include "data/byte_tokenizer.h"
#include "data/prompts.h"
#include "data/sp_tokenizer.h"
#include "data/token_dataset.h"
#include "data/text_corpus.h"
#include "io/checkpoint.h"
#include "io/hf_export.h"
#include "model/model.h"
#include "model/inspect.h"
#include "model/qat.h"
#include "parallel/mpi_communicator.h"
#include "rl/evaluate.h"

using namespace tessera;
namespace fs = std::filesystem;

namespace {

// Rebuilds the model a checkpoint was saved with, loads its weights and reads the run's recipe (which also
// names the tokenizer).
struct LoadedModel {
  std::string path;
  CheckpointMeta meta;
  std::string stage;   // the stage that wrote it: pretrain, sft, grpo or opd
  PretrainConfig run;  // pretrain and sft checkpoints only (their data and held-out split)
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
};
LoadedModel load_model(const std::string& ckpt_or_run) {
  LoadedModel l;
  l.path = resolve_checkpoint(ckpt_or_run);
  ModelConfig cfg = checkpoint_model_config(l.path);
  l.model = make_model(cfg);
  l.meta = load_checkpoint(l.path, cfg, l.model->saved_tensors(), nullptr);
  Recipe recipe = Recipe::parse(l.meta.recipe, l.path + ":recipe");
  l.stage = recipe_stage_of(recipe);
  if (l.stage != "pretrain" && l.stage != "sft") {  // grpo, opd: no text data
    recipe.allow_section("");
    l.run.tokenizer_kind = recipe.get_string("tokenizer.kind", "byte");
    l.run.tokenizer_model = recipe.get_string("tokenizer.model", "");
  } else {
    l.run = pretrain_config_from_recipe(recipe);
  }
  l.tokenizer = load_tokenizer(l.run.tokenizer_kind, l.run.tokenizer_model);
  check_tokenizer(*l.tokenizer, l.meta, l.path);
  return l;
}

// Held-out loss. Without --data: the run's own held-out split, evaluated exactly as the trainer does
// (training.seq_len, training.batch_size, eval.batches), so it reproduces the run's last val_loss.
int cmd_eval(const std::string& ckpt, const std::vector<std::string>& data, const std::string& separator,
             int64_t seq_len, int64_t batch_size, int64_t max_batches) {
  LoadedModel l = load_model(ckpt);
  if (l.stage != "pretrain" && l.stage != "sft")
    TS_FAIL("eval: '", l.path, "' was written by a ", l.stage, " stage, which has no text data or held-out split; its held-out "
            "reward: tessera eval-rewards ", ckpt, " --prompts FILE --reward NAME");
  const PretrainConfig& run = l.run;
  if (seq_len <= 0) seq_len = run.seq_len;
  if (batch_size <= 0) batch_size = run.batch_size;
  if (max_batches <= 0) max_batches = run.eval_batches;
  TrainingData own;
  TextCorpus other;
  const TokenStore* split;
  const Tokenizer& tok = *l.tokenizer;
  if (data.empty()) {
    own = TrainingData::load(run);
    split = own.val();
  } else {
    other = TextCorpus::load(TextCorpusConfig{data, separator, 0.0, 0}, tok);
    split = &other.train;
  }
  PackedLoader loader(split, seq_len, run.seed, run.document_mask);
  EvalResult r = evaluate_loss(*l.model, loader, tok, batch_size, max_batches);
  std::printf("{\"checkpoint\": \"%s\", \"step\": %lld, \"split\": \"%s\", \"seq_len\": %lld, \"loss\": %.6f, "
              "\"nats_per_byte\": %.6f}\n",
              l.path.c_str(), (long long)l.meta.step, data.empty() ? "val" : "all", (long long)seq_len,
              r.nats_per_token, r.nats_per_byte);
  return 0;
}

int cmd_sample(const std::string& ckpt, const std::string& prompt, const SamplingOptions& opt) {
  LoadedModel l = load_model(ckpt);
  std::vector<int32_t> out = sample_tokens(*l.model, l.tokenizer->encode(prompt), opt);
  std::cout << l.tokenizer->decode(out) << std::endl;
  return 0;
}

// `tessera data prepare`: text or JSONL files to an HDF5 token dataset, with a progress line.
int cmd_data_prepare(const PrepareOptions& opt, const std::string& tokenizer_kind, const std::string& tokenizer_model) {
  std::unique_ptr<Tokenizer> tok = load_tokenizer(tokenizer_kind, tokenizer_model);
  const double t0 = now_seconds();
  // The progress line rewrites itself on a terminal; into a log file it would pile up, so it is left out there.
  const bool tty = isatty(fileno(stderr));
  auto progress = [&](int64_t done, int64_t total) {
    if (!tty) return;
    double dt = std::max(now_seconds() - t0, 1e-9), rate = double(done) / dt;
    std::fprintf(stderr, "\rprepare: %.1f / %.1f MB (%3.0f%%) | %.1f MB/s | ETA %.0fs   ", done / 1e6, total / 1e6,
                 100.0 * double(done) / double(std::max<int64_t>(total, 1)), rate / 1e6,
                 double(total - done) / std::max(rate, 1.0));
  };
  PrepareStats st = prepare_dataset(opt, *tok, progress);
  if (tty) std::fprintf(stderr, "\n");
  std::printf("{\"output\": \"%s\", \"documents\": %lld, \"train_tokens\": %lld, \"val_tokens\": %lld, "
              "\"train_bytes\": %lld, \"val_bytes\": %lld, \"seconds\": %.3f}\n",
              opt.output.c_str(), (long long)st.documents, (long long)st.train_tokens, (long long)st.val_tokens,
              (long long)st.train_bytes, (long long)st.val_bytes, now_seconds() - t0);
  return 0;
}

// `tessera ckpt quantize`: post-training quantisation (model/qat.h). A checkpoint whose eligible weights are their
// FP8 / FP4 values, dequantised and stored as fp32 (the codes themselves are not stored), with the source's step,
// recipe and tokenizer and no optimizer state: eval, sample, eval-rewards, export and init.checkpoint take it.
int cmd_ckpt_quantize(const std::string& ckpt, const std::string& mode_name, const std::string& out) {
  const qat::Mode mode = qat::parse_mode(mode_name);
  if (mode == qat::Mode::off) TS_FAIL("ckpt quantize: --mode must be fp8 or fp4_fp8");
  LoadedModel l = load_model(ckpt);
  const qat::Stats st = qat::quantize_in_place(l.model->params(), mode);
  save_checkpoint(fs::absolute(out).string(), l.model->config(), l.model->saved_tensors(), nullptr, l.meta);
  std::printf("{\"checkpoint\": \"%s\", \"output\": \"%s\", \"mode\": \"%s\", \"fp4_tensors\": %lld, "
              "\"fp4_elements\": %lld, \"fp8_tensors\": %lld, \"fp8_elements\": %lld, \"lossy_fp4_to_fp8\": %lld}\n",
              l.path.c_str(), out.c_str(), qat::mode_name(mode), (long long)st.fp4_tensors, (long long)st.fp4_elements,
              (long long)st.fp8_tensors, (long long)st.fp8_elements, (long long)st.lossy_fp4_matrices);
  return 0;
}

int cmd_ckpt_info(const std::string& ckpt) {
  std::string path = resolve_checkpoint(ckpt);
  ModelConfig cfg = checkpoint_model_config(path);
  CheckpointMeta meta = checkpoint_meta(path);
  std::unique_ptr<Model> model = make_model(cfg);
  std::printf("checkpoint: %s\nstep: %lld\nseed: %llu\ntokenizer: %s\nmodel: %s, dim %lld, %lld layers, %lld heads, "
              "vocab %lld\nparameters: %lld\n",
              path.c_str(), (long long)meta.step, (unsigned long long)meta.seed, meta.tokenizer.c_str(),
              cfg.arch.c_str(), (long long)cfg.dim, (long long)cfg.n_layers, (long long)cfg.n_heads,
              (long long)cfg.vocab_size, (long long)count_elements(model->params()));
  return 0;
}

// A context length: an integer, optionally with K (1024) or M (1048576): "1M" = 1048576, "128K" = 131072.
int64_t parse_context(const std::string& text) {
  std::string s = text;
  int64_t unit = 1;
  if (!s.empty() && (s.back() == 'K' || s.back() == 'k')) unit = int64_t(1) << 10, s.pop_back();
  else if (!s.empty() && (s.back() == 'M' || s.back() == 'm')) unit = int64_t(1) << 20, s.pop_back();
  char* end = nullptr;
  long long v = s.empty() ? 0 : std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < 1 || v > (int64_t(1) << 40) / unit)
    TS_FAIL("inspect: --context must be a positive integer, optionally with K or M (1M = 1048576), got '", text, "'");
  return v * unit;
}

ModelConfig inspect_model(const std::string& path, const std::vector<std::string>& overrides) {
  Recipe r = Recipe::load(path, overrides);
  r.allow_section("");  // inspect reads the model only; other sections belong to stages
  std::string kind = r.get_string("tokenizer.kind", "byte"), model_file = r.get_string("tokenizer.model", "");
  return model_config_from_recipe(r, load_tokenizer(kind, model_file)->vocab_size());
}

// Every figure `tessera inspect` prints, in print order (docs/model.md, "Inspect").
std::vector<std::pair<std::string, double>> inspect_figures(const ModelConfig& cfg, int64_t context,
                                                            double kv_bytes) {
  ParamCounts p = count_params(cfg);
  FlopCounts train = count_flops(cfg, context, true), inf = count_flops(cfg, context, false);
  return {{"total_params", p.total},
          {"active_params", p.active},
          {"mtp_params", p.mtp},
          {"embedding_params", p.embedding},
          {"non_embedding_params", p.total - p.embedding},
          {"published_total_params", p.published_total()},
          {"published_active_params", p.published_active()},
          {"train_flops_per_token", 3 * train.total()},
          {"forward_flops_per_token", train.total()},
          {"inference_flops_per_token", inf.total()},
          {"inference_matmul_flops_per_token", inf.matmul},
          {"inference_attention_flops_per_token", inf.attention + inf.indexer},
          {"inference_indexer_flops_per_token", inf.indexer},
          {"inference_fp8_equivalent_flops_per_token", fp8_equivalent_flops(cfg, inf)},
          {"kv_cache_bytes_per_token", kv_cache_bytes_per_token(cfg, context, kv_bytes)},
          {"kv_cache_bytes_per_token_bf16", kv_cache_bytes_per_token(cfg, context, 2.0)}};
}

std::string json_number(double v) {
  char buf[64];
  if (v == double(int64_t(v)) && std::abs(v) < 1e18) std::snprintf(buf, sizeof buf, "%lld", (long long)v);
  else std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// `tessera eval-rewards`: mean reward of a checkpoint on a prompt set, one JSON line.
int cmd_eval_rewards(const std::string& ckpt, const std::string& prompts_path, const std::vector<std::string>& rewards,
                     rl::RewardEvalOptions opt, const std::string& mode, int64_t limit) {
  std::vector<rl::RewardTerm> terms;
  for (const std::string& r : rewards) terms.push_back(rl::parse_reward_term(r));
  rl::CompositeReward reward(terms);  // unknown names fail here, listing the known ones
  opt.mode = parse_reasoning_mode(mode);
  std::vector<Prompt> prompts = load_prompts_jsonl(prompts_path);
  if (prompts.empty()) TS_FAIL("eval-rewards: '", prompts_path, "' holds no prompts");
  if (limit > 0 && int64_t(prompts.size()) > limit) prompts.resize(limit);
  LoadedModel l = load_model(ckpt);
  const double t0 = now_seconds();
  rl::RewardEvalResult r = rl::evaluate_rewards(*l.model, *l.tokenizer, prompts, reward, opt);
  std::string out = cat("{\"checkpoint\": \"", l.path, "\", \"step\": ", l.meta.step, ", \"prompts\": ", prompts.size(),
                        ", \"responses\": ", r.responses, ", \"mode\": \"", mode, "\", \"temperature\": ",
                        json_number(opt.temperature), ", \"reward_mean\": ", json_number(r.reward_mean), ", \"terms\": {");
  for (size_t i = 0; i < terms.size(); ++i)
    out += cat(i ? ", " : "", "\"", terms[i].name, "\": ", json_number(r.term_means[i]));
  char tail[160];
  std::snprintf(tail, sizeof tail, "}, \"response_length_mean\": %s, \"frac_truncated\": %s, \"seconds\": %.2f}",
                json_number(r.response_length_mean).c_str(), json_number(r.frac_truncated).c_str(), now_seconds() - t0);
  std::printf("%s%s\n", out.c_str(), tail);
  return 0;
}

// One JSON object: the figures of RECIPE at --context, and with --compare each as a fraction of OTHER's at the
// same context and KV precision.
int cmd_inspect(const std::string& recipe_path, const std::vector<std::string>& overrides, const std::string& context_text,
                const std::string& kv_text, const std::string& compare_path) {
  ModelConfig cfg = inspect_model(recipe_path, overrides);
  int64_t context = context_text.empty() ? cfg.max_seq_len : parse_context(context_text);
  double kv_bytes = kNativeKvPrecision;
  if (kv_text != "native") {
    char* end = nullptr;
    kv_bytes = std::strtod(kv_text.c_str(), &end);
    if (kv_text.empty() || *end != '\0' || !(kv_bytes > 0) || kv_bytes > 64)
      TS_FAIL("inspect: --kv-bytes must be 'native' or bytes per cached value in (0, 64] (2 = bf16, 1 = fp8, "
              "0.5 = fp4), got '", kv_text, "'");
  }
  std::string kv_precision = kv_text == "native" ? kv_native_precision(cfg) : cat(kv_bytes, " bytes per value");
  auto figures = inspect_figures(cfg, context, kv_bytes);
  std::string out = cat("{\"model\": \"", recipe_path, "\", \"arch\": \"", cfg.arch, "\", \"context\": ", context,
                        ", \"seq_len\": ", context, ", \"kv_precision\": \"", kv_precision, "\"");
  for (const auto& [k, v] : figures) out += cat(", \"", k, "\": ", json_number(v));
  if (!compare_path.empty()) {
    ModelConfig other = inspect_model(compare_path, {});
    auto base = inspect_figures(other, context, kv_bytes);
    out += cat(", \"compare\": {\"model\": \"", compare_path, "\", \"arch\": \"", other.arch, "\"");
    if (kv_text == "native") out += cat(", \"kv_precision\": \"", kv_native_precision(other), "\"");
    for (size_t i = 0; i < figures.size(); ++i) {
      char buf[64];
      if (base[i].second == 0) std::snprintf(buf, sizeof buf, "null");
      else std::snprintf(buf, sizeof buf, "%.4f", figures[i].second / base[i].second);
      out += cat(", \"", figures[i].first, "\": ", buf);
    }
    out += "}";
  }
  std::printf("%s}\n", out.c_str());
  return 0;
}

}  // namespace

// `tessera train` or `tessera pipeline` started by mpirun / srun: one process per rank. An error on any rank is
// printed with the rank and ends the whole job (MPI_Abort), so no other rank waits forever in a collective.
static int run_under_mpi(int argc, char** argv, const std::function<int(Communicator*)>& body) {
  // MPI and the world communicator outlive the try block: an error must reach MPI_Abort, not MPI_Finalize.
  MpiRuntime mpi(&argc, &argv);
  std::unique_ptr<Communicator> world = make_mpi_world();
  const int rank = world->rank(), size = world->size();
  set_log_quiet(rank != 0);
  try {
    int rc = body(world.get());
    world.reset();
    return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: rank %d of %d: %s\n", rank, size, e.what());
    std::fflush(stderr);
    mpi_abort(1);
  }
}

int main(int argc, char** argv) {
  CLI::App app{"Tessera: pretraining and post-training of DeepSeek-V4-style models"};
  app.require_subcommand(1);

  TrainOptions train;
  auto* c_train = app.add_subcommand("train", "run the stage a recipe names (pretrain, sft, grpo)");
  c_train->add_option("recipe", train.recipe_path, "recipe TOML file");
  c_train->add_option("--set", train.overrides, "override a recipe key: --set training.steps=100")->take_all();
  c_train->add_option("--resume", train.resume_dir, "continue the run in this directory from its latest checkpoint");
  c_train->add_option("--run-dir", train.run_dir, "run directory (default: job.run_dir, else runs/<job.name>)");
  c_train->add_option("--stop-after", train.stop_after, "stop after this many steps without a final checkpoint");

  PipelineOptions popt;
  auto* c_pipeline = app.add_subcommand("pipeline", "run a pipeline file's stages in order, skipping those up to date");
  c_pipeline->add_option("pipeline", popt.path, "pipeline TOML file ([[stage]] sections)")->required();
  c_pipeline->add_option("--from", popt.from, "rerun this stage even if it is up to date (and every stage after it that depends on it)");
  c_pipeline->add_flag("--dry-run", popt.dry_run, "print which stages would run and why; run nothing");

  std::string ckpt, separator, prompt = "\n", out_dir, format = "hf";
  std::vector<std::string> data, overrides;
  int64_t seq_len = 0, batch_size = 0, max_batches = 0;
  auto* c_eval = app.add_subcommand("eval", "held-out loss of a checkpoint, printed as JSON");
  c_eval->add_option("checkpoint", ckpt, "checkpoint file or run directory")->required();
  c_eval->add_option("--data", data, "text files to evaluate on (default: the run's held-out split)");
  c_eval->add_option("--separator", separator, "document separator line in --data");
  c_eval->add_option("--seq-len", seq_len, "sequence length (default: the run's training.seq_len)");
  c_eval->add_option("--batch-size", batch_size, "sequences per batch (default: training.batch_size)");
  c_eval->add_option("--max-batches", max_batches, "evaluate at most this many batches (default: eval.batches)");

  SamplingOptions sopt;
  auto* c_sample = app.add_subcommand("sample", "generate text from a checkpoint");
  c_sample->add_option("checkpoint", ckpt, "checkpoint file or run directory")->required();
  c_sample->add_option("--prompt", prompt, "prompt text");
  c_sample->add_option("--max-new-tokens", sopt.max_new_tokens, "tokens to generate");
  c_sample->add_option("--temperature", sopt.temperature, "softmax temperature (0 = greedy)");
  c_sample->add_option("--top-k", sopt.top_k, "keep the k most likely tokens (0 = all)");
  c_sample->add_option("--top-p", sopt.top_p, "nucleus sampling mass (1 = off)");
  c_sample->add_option("--seed", sopt.seed, "sampling seed");

  std::string eval_prompts, eval_mode = "non_thinking";
  std::vector<std::string> eval_rewards_list;
  rl::RewardEvalOptions ropt;
  int64_t eval_limit = 0;
  auto* c_eval_rewards = app.add_subcommand("eval-rewards", "mean reward of a checkpoint on a prompt set, printed as JSON");
  c_eval_rewards->add_option("checkpoint", ckpt, "checkpoint file or run directory")->required();
  c_eval_rewards->add_option("--prompts", eval_prompts, "prompt set (JSONL: `tessera data prompts` or GSM8K)")->required();
  c_eval_rewards->add_option("--reward", eval_rewards_list, "a reward NAME or NAME:WEIGHT (repeatable): arithmetic, countdown, format, gsm8k")
      ->required();
  c_eval_rewards->add_option("--max-new-tokens", ropt.max_new_tokens, "tokens per response")->check(CLI::PositiveNumber);
  c_eval_rewards->add_option("--temperature", ropt.temperature, "softmax temperature (0 = greedy)")->check(CLI::NonNegativeNumber);
  c_eval_rewards->add_option("--top-k", ropt.top_k, "keep the k most likely tokens (0 = all)");
  c_eval_rewards->add_option("--top-p", ropt.top_p, "nucleus sampling mass (1 = off)");
  c_eval_rewards->add_option("--samples", ropt.samples_per_prompt, "responses per prompt")->check(CLI::PositiveNumber);
  c_eval_rewards->add_option("--seed", ropt.seed, "sampling seed");
  c_eval_rewards->add_option("--mode", eval_mode, "reasoning mode")
      ->check(CLI::IsMember({"non_thinking", "think_high", "think_max"}));
  c_eval_rewards->add_option("--limit", eval_limit, "evaluate the first N prompts only (0 = all)")->check(CLI::NonNegativeNumber);
  c_eval_rewards->add_option("--max-batch", ropt.max_batch, "responses decoded together")->check(CLI::PositiveNumber);

  auto* c_ckpt = app.add_subcommand("ckpt", "checkpoint tools");
  c_ckpt->require_subcommand(1);
  auto* c_info = c_ckpt->add_subcommand("info", "print what a checkpoint holds");
  c_info->add_option("checkpoint", ckpt, "checkpoint file or run directory")->required();
  auto* c_export = c_ckpt->add_subcommand("export", "export a checkpoint for other frameworks");
  c_export->add_option("checkpoint", ckpt, "checkpoint file or run directory")->required();
  c_export->add_option("--format", format, "export format")->check(CLI::IsMember({"hf"}));
  c_export->add_option("--out", out_dir, "output directory")->required();
  std::string quant_mode, quant_out;  // ckpt quantize (model/qat.h)
  auto* c_quantize = c_ckpt->add_subcommand(
      "quantize", "post-training quantisation: a checkpoint of the FP8 / FP4 weights, dequantised to fp32");
  c_quantize->add_option("checkpoint", ckpt, "checkpoint file or run directory")->required();
  c_quantize->add_option("--mode", quant_mode, "fp8 (every hidden matrix) or fp4_fp8 (routed experts FP4, others FP8)")
      ->required()
      ->check(CLI::IsMember({"fp8", "fp4_fp8"}));
  c_quantize->add_option("--out", quant_out, "output checkpoint file (.h5)")->required();

  std::string recipe_path, inspect_context, inspect_kv = "native", inspect_compare;
  auto* c_inspect = app.add_subcommand("inspect", "parameter counts, FLOPs and KV-cache bytes of a model recipe");
  c_inspect->add_option("recipe", recipe_path, "model or training recipe")->required();
  c_inspect->add_option("--set", overrides, "override a recipe key")->take_all();
  c_inspect->add_option("--context,--seq-len", inspect_context,
                        "context length for FLOPs and KV bytes; K and M suffixes, 1M = 1048576 (default: max_seq_len)");
  c_inspect->add_option("--kv-bytes", inspect_kv,
                        "bytes per cached KV value (2 = bf16, 1 = fp8, 0.5 = fp4), or 'native' (the released format)");
  c_inspect->add_option("--compare", inspect_compare, "another model recipe: print each figure as a fraction of its");

  PrepareOptions prep;
  std::string tok_kind = "byte", tok_model;
  auto* c_data = app.add_subcommand("data", "tokenizers and token datasets");
  c_data->require_subcommand(1);
  auto* c_prepare = c_data->add_subcommand("prepare", "tokenize text or JSONL files into an HDF5 token dataset");
  c_prepare->add_option("inputs", prep.inputs, "input files")->required();
  c_prepare->add_option("--out", prep.output, "output .h5 file")->required();
  c_prepare->add_option("--format", prep.format, "text, jsonl or chat")->check(CLI::IsMember({"text", "jsonl", "chat"}));
  c_prepare->add_option("--reasoning-mode", prep.reasoning_mode, "chat: non_thinking, think_high or think_max");
  c_prepare->add_option("--separator", prep.separator, "text: a line holding only this separates documents");
  c_prepare->add_option("--fields", prep.fields, "jsonl: string fields joined into each document")->delimiter(',');
  c_prepare->add_option("--val-fraction", prep.val_fraction, "fraction of documents held out")->check(CLI::Range(0.0, 0.9));
  c_prepare->add_option("--seed", prep.seed, "seed of the train / held-out split");
  c_prepare->add_option("--tokenizer", tok_kind, "byte or sentencepiece")->check(CLI::IsMember({"byte", "sentencepiece"}));
  c_prepare->add_option("--tokenizer-model", tok_model, "sentencepiece .model file");

  std::vector<std::string> tok_inputs;
  std::string tok_prefix;
  int64_t tok_vocab = 8000, tok_reserved = 8;
  auto* c_tokenizer = c_data->add_subcommand("tokenizer", "train a SentencePiece BPE tokenizer with V4's special tokens");
  c_tokenizer->add_option("inputs", tok_inputs, "text files")->required();
  c_tokenizer->add_option("--out", tok_prefix, "output prefix: writes PREFIX.model and PREFIX.vocab")->required();
  c_tokenizer->add_option("--vocab-size", tok_vocab, "vocabulary size (bytes and specials included)");
  c_tokenizer->add_option("--reserved", tok_reserved, "reserved special ids beyond V4's");
  std::string tok_hf_out;
  c_tokenizer->add_option("--hf-out", tok_hf_out, "also write tokenizer.json for Hugging Face's AutoTokenizer here");

  std::string task = "arithmetic", prompts_out;
  int64_t n_prompts = 1000, difficulty = 0;
  uint64_t prompt_seed = 0;
  auto* c_prompts = c_data->add_subcommand("prompts", "generate a verifiable RL prompt set (JSONL with reference answers)");
  c_prompts->add_option("--task", task, "arithmetic, countdown or digits")
      ->check(CLI::IsMember({"arithmetic", "countdown", "digits"}));
  c_prompts->add_option("--n", n_prompts, "number of prompts")->check(CLI::PositiveNumber);
  c_prompts->add_option("--seed", prompt_seed, "generator seed");
  c_prompts->add_option("--difficulty", difficulty,
                        "arithmetic: operand digits (2); countdown: numbers (4); digits: sequence length (4)");
  c_prompts->add_option("--out", prompts_out, "output .jsonl")->required();
  bool prompts_chat = false;
  c_prompts->add_flag("--chat", prompts_chat,
                      "write SFT conversations (user: question, assistant: reference answer) for `data prepare --format chat`");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (*c_train && launched_by_mpi())
    return run_under_mpi(argc, argv, [&](Communicator* world) {
      if (train.recipe_path.empty() && train.resume_dir.empty()) TS_FAIL("train: give a recipe or --resume RUN_DIR");
      return run_train(train, world);
    });
  if (*c_pipeline && launched_by_mpi())
    return run_under_mpi(argc, argv, [&](Communicator* world) { return run_pipeline(popt, world); });
  try {
    if (*c_train) {
      if (train.recipe_path.empty() && train.resume_dir.empty()) TS_FAIL("train: give a recipe or --resume RUN_DIR");
      return run_train(train);
    }
    if (*c_pipeline) return run_pipeline(popt);
    if (*c_eval) return cmd_eval(ckpt, data, separator, seq_len, batch_size, max_batches);
    if (*c_sample) return cmd_sample(ckpt, prompt, sopt);
    if (*c_eval_rewards) return cmd_eval_rewards(ckpt, eval_prompts, eval_rewards_list, ropt, eval_mode, eval_limit);
    if (*c_info) return cmd_ckpt_info(ckpt);
    if (*c_quantize) return cmd_ckpt_quantize(ckpt, quant_mode, quant_out);
    if (*c_export) {
      LoadedModel l = load_model(ckpt);
      export_hf(l.path, out_dir, l.tokenizer->bos_id(), l.tokenizer->eos_id());
      std::printf("wrote %s/model.safetensors and %s/config.json\n", out_dir.c_str(), out_dir.c_str());
      if (l.run.tokenizer_kind == "sentencepiece") {  // the tokenizer travels with the model
        export_hf_tokenizer(static_cast<const SentencePieceTokenizer&>(*l.tokenizer), out_dir);
        std::printf("wrote %s/tokenizer.json (AutoTokenizer)\n", out_dir.c_str());
      }
      return 0;
    }
    if (*c_inspect) return cmd_inspect(recipe_path, overrides, inspect_context, inspect_kv, inspect_compare);
    if (*c_prepare) return cmd_data_prepare(prep, tok_kind, tok_model);
    if (*c_prompts) {
      std::vector<Prompt> ps = task == "arithmetic" ? generate_arithmetic(n_prompts, prompt_seed, difficulty ? difficulty : 2)
                               : task == "countdown" ? generate_countdown(n_prompts, prompt_seed, difficulty ? difficulty : 4)
                                                     : generate_digit_completion(n_prompts, prompt_seed, difficulty ? difficulty : 4);
      if (prompts_chat) write_sft_chat_jsonl(prompts_out, ps);
      else write_prompts_jsonl(prompts_out, ps);
      std::printf("{\"output\": \"%s\", \"task\": \"%s\", \"prompts\": %lld}\n", prompts_out.c_str(), task.c_str(),
                  (long long)ps.size());
      return 0;
    }
    if (*c_tokenizer) {
      const double t0 = now_seconds();
      train_sentencepiece(tok_inputs, tok_prefix, tok_vocab, tok_reserved);
      auto tok = SentencePieceTokenizer::load(tok_prefix + ".model");
      if (!tok_hf_out.empty()) export_hf_tokenizer(*tok, tok_hf_out);
      std::printf("{\"model\": \"%s.model\", \"vocab_size\": %lld, \"hash\": %llu, \"seconds\": %.2f}\n",
                  tok_prefix.c_str(), (long long)tok->vocab_size(), (unsigned long long)tok->hash(), now_seconds() - t0);
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
