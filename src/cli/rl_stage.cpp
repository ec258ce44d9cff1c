#include "cli/grpo_stage.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "backend/backend.h"
#include "cli/model_recipe.h"
#include "cli/run_files.h"
#include "core/log.h"
#include "core/rng.h"
#include "data/prompts.h"
#include "io/checkpoint.h"
#include "model/v4.h"
#include "parallel/data_parallel.h"
#include "parallel/topology.h"
#include "rl/evaluate.h"
#include "rl/generate.h"

namespace tessera {
namespace fs = std::filesystem;

GrpoConfig grpo_config_from_recipe(Recipe& r) {
  GrpoConfig c;
  r.get_string("stage", "grpo", {"grpo"});
  c.init_checkpoint = r.get_string("init.checkpoint", "");
  if (c.init_checkpoint.empty())
    TS_FAIL(r.path(), ": stage = \"grpo\" needs init.checkpoint (the SFT run directory or checkpoint file)");
  c.reference = r.get_string("init.reference", c.init_checkpoint);
  c.name = r.get_string("job.name", fs::path(r.path()).stem().string());
  c.run_dir = r.get_string("job.run_dir", "runs/" + c.name);
  c.seed = static_cast<uint64_t>(r.get_int("job.seed", 0, 0));
  c.tokenizer_kind = r.get_string("tokenizer.kind", "byte", {"byte", "sentencepiece"});
  c.tokenizer_model = r.get_string("tokenizer.model", "");
  if (c.tokenizer_kind == "sentencepiece" && c.tokenizer_model.empty())
    TS_FAIL(r.path(), ": tokenizer.kind = \"sentencepiece\" needs tokenizer.model (a .model file)");
  c.model = model_config_from_recipe(r, load_tokenizer(c.tokenizer_kind, c.tokenizer_model)->vocab_size());

  c.train_prompts = r.get_string("prompts.train", "");
  if (c.train_prompts.empty()) TS_FAIL(r.path(), ": stage = \"grpo\" needs prompts.train (a prompt-set JSONL file)");
  c.eval_prompts = r.get_string("prompts.eval", "");
  c.eval_limit = r.get_int("prompts.eval_limit", c.eval_limit, 1);
  c.mode = parse_reasoning_mode(
      r.get_string("prompts.mode", "non_thinking", {"non_thinking", "think_high", "think_max"}));
  for (const std::string& t : r.get_string_list("rewards.terms", {})) {
    try {
      c.rewards.push_back(rl::parse_reward_term(t));
    } catch (const Error& e) {
      TS_FAIL(r.path(), ": key 'rewards.terms': ", e.what());
    }
  }
  try {
    rl::CompositeReward check(c.rewards);  // unknown or repeated names fail here, before any work
  } catch (const Error& e) {
    TS_FAIL(r.path(), ": key 'rewards.terms': ", e.what());
  }

  c.steps = r.require_int("training.steps", 1);
  c.grad_clip = r.get_double("training.grad_clip", c.grad_clip, 0.0);
  c.device = r.get_string("training.device", "cpu", {"cpu", "cuda"}) == "cuda" ? Device::cuda : Device::cpu;
  if (c.device == Device::cuda && !device_available(Device::cuda))
    TS_FAIL(r.path(), ": training.device = \"cuda\" but this build has no CUDA backend or no GPU is present");
  c.dp = int(r.get_int("parallel.dp", -1, -1, 1 << 20));

  c.prompts_per_step = r.get_int("grpo.prompts_per_step", c.prompts_per_step, 1);
  c.group_size = r.get_int("grpo.group_size", c.group_size, 2);
  c.epochs = r.get_int("grpo.epochs", c.epochs, 1);
  c.mini_batches = r.get_int("grpo.mini_batches", c.mini_batches, 1);
  c.micro_batch_rows = r.get_int("grpo.micro_batch_rows", c.micro_batch_rows, 1);
  c.advantage = rl::parse_advantage_estimator(
      r.get_string("grpo.advantage", "group_norm", {"group_norm", "dr_grpo", "rloo"}));
  rl::PolicyLossConfig& L = c.loss;
  L.eps_low = r.get_double("grpo.eps_low", L.eps_low, 0.0, 0.999);
  L.eps_high = r.get_double("grpo.eps_high", L.eps_high, 0.0);
  L.dual_clip_c = r.get_double("grpo.dual_clip", L.dual_clip_c, 0.0);
  L.beta = r.get_double("grpo.kl_coef", L.beta, 0.0);
  L.kl = rl::parse_kl_estimator(r.get_string("grpo.kl_estimator", "k3", {"k1", "k2", "k3", "k3_ratio"}));
  L.aggregation = rl::parse_loss_aggregation(r.get_string(
      "grpo.loss_aggregation", "token-mean", {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}));
  c.dynamic_sampling = r.get_bool("grpo.dynamic_sampling", c.dynamic_sampling);
  c.mask_truncated = r.get_bool("grpo.mask_truncated", c.mask_truncated);
  c.offpolicy_delta = r.get_double("grpo.offpolicy_delta", c.offpolicy_delta, 0.0);

  c.max_new_tokens = r.get_int("sampling.max_new_tokens", c.max_new_tokens, 1, c.model.max_seq_len - 1);
  c.temperature = r.get_double("sampling.temperature", c.temperature, 1e-3, 100.0);
  c.top_p = r.get_double("sampling.top_p", c.top_p, 1e-6, 1.0);
  c.top_k = r.get_int("sampling.top_k", c.top_k, 0);
  c.overlong_buffer = r.get_int("grpo.overlong_buffer", c.overlong_buffer, 0, c.max_new_tokens);
  c.overlong_factor = r.get_double("grpo.overlong_factor", c.overlong_factor, 0.0);
  L.norm_constant = r.get_double("grpo.norm_constant", double(c.max_new_tokens), 1e-9);
  try {
    L.validate();
  } catch (const Error& e) {
    TS_FAIL(r.path(), ": [grpo]: ", e.what());
  }

  c.eval_every = r.get_int("eval.every", c.eval_every, 0);
  c.eval_max_new_tokens = r.get_int("eval.max_new_tokens", c.max_new_tokens, 1, c.model.max_seq_len - 1);
  optimizer_from_recipe(r, c.steps * c.epochs * c.mini_batches, c.optimizer, c.schedule);
  c.checkpoint_every = r.get_int("checkpoint.every", 0, 0);
  c.checkpoint_keep = r.get_int("checkpoint.keep", 3, 0);
  c.log_every = r.get_int("metrics.log_every", 1, 1);
  r.check_no_unknown_keys();
  c.recipe_toml = r.effective_toml();
  return c;
}

namespace {

// One sampled response and what the update needs of it.
struct Rollout {
  int64_t k = 0;       // the step's prompt number (0 .. prompts_per_step - 1): decides the mini-batch
  int64_t prompt = 0;  // index into the prompt set
  std::vector<int32_t> prompt_ids, response;
  std::vector<double> sampler_logp;  // log p under the sampling distribution (temperature applied)
  bool truncated = false;
  double reward = 0, shaped = 0;  // the verifiers' total, and with the overlong penalty
  std::vector<double> terms;
  double advantage = 0;
  // Filled per micro-batch: the old policy's and the reference's log-probabilities of the response tokens.
  std::vector<double> old_logp, ref_logp;
  bool keep = true;  // off-policy masking
};

// A micro-batch of rollouts as model input: row b is prompt ++ response shifted by one; targets on the response
// tokens only. mask (B, T) f64: 1 where a response token trains.
struct MicroBatch {
  std::vector<Rollout*> rows;
  TokenBatch batch;
  int64_t T = 0;
};

MicroBatch make_micro_batch(std::vector<Rollout*> rows) {
  MicroBatch mb;
  mb.rows = std::move(rows);
  for (Rollout* r : mb.rows) mb.T = std::max<int64_t>(mb.T, int64_t(r->prompt_ids.size() + r->response.size()) - 1);
  const int64_t B = int64_t(mb.rows.size()), T = std::max<int64_t>(mb.T, 1);
  mb.T = T;
  mb.batch.ids = Tensor::zeros({B, T}, DType::i32);
  mb.batch.targets = Tensor::empty({B, T}, DType::i32);
  for (int64_t b = 0; b < B; ++b) {
    const Rollout& r = *mb.rows[b];
    int32_t* ids = mb.batch.ids.data<int32_t>() + b * T;
    int32_t* tg = mb.batch.targets.data<int32_t>() + b * T;
    std::fill(tg, tg + T, -1);
    const int64_t P = int64_t(r.prompt_ids.size()), R = int64_t(r.response.size());
    for (int64_t t = 0; t < P + R - 1; ++t) ids[t] = t < P ? r.prompt_ids[t] : r.response[t - P];
    for (int64_t i = 0; i < R; ++i) tg[P - 1 + i] = r.response[i];  // position P-1+i predicts response token i
  }
  return mb;
}

// Per-token view of a micro-batch's response slots: position of response token i of row b.
int64_t slot(const MicroBatch& mb, int64_t b, int64_t i) {
  return b * mb.T + int64_t(mb.rows[b]->prompt_ids.size()) - 1 + i;
}

// Logits / temperature on the host (the sampler's distribution).
Tensor tempered(const Tensor& logits, double temperature) {
  Tensor h = logits.device() == Device::cpu ? logits.clone() : logits.to_device(Device::cpu);
  if (temperature != 1.0) {
    const float inv = float(1.0 / temperature);
    float* p = h.data<float>();
    for (int64_t i = 0; i < h.numel(); ++i) p[i] *= inv;
  }
  return h;
}

// Mean entropy (nats) of the rows of `logits` (N, V) host f32 that have a target, and how many.
void entropy_sum(const Tensor& logits, const Tensor& targets, double& sum, int64_t& count) {
  const int64_t N = logits.size(0), V = logits.size(1);
  for (int64_t i = 0; i < N; ++i) {
    if (targets.data<int32_t>()[i] < 0) continue;
    const float* l = logits.data<float>() + i * V;
    double mx = l[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(l[v]));
    double z = 0, s = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double e = std::exp(double(l[v]) - mx);
      z += e;
      s += e * (double(l[v]) - mx);
    }
    sum += std::log(z) - s / z;
    ++count;
  }
}

uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Prompt k (0-based, global) of step s: epoch e = (s * P + k) / n walks a Philox permutation of the prompt set.
// Stateless, so a resumed run samples the prompts the uninterrupted run would.
int64_t prompt_at(int64_t step, int64_t k, int64_t per_step, int64_t n, uint64_t seed) {
  const int64_t flat = step * per_step + k, epoch = flat / n, pos = flat % n;
  static thread_local std::pair<int64_t, std::vector<int64_t>> cache{-1, {}};
  if (cache.first != epoch || int64_t(cache.second.size()) != n) {
    std::vector<int64_t> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    const Rng rng{seed, stream_id("grpo.prompts") + uint64_t(epoch)};
    for (int64_t i = n - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(uint64_t(i), uint64_t(i + 1))]);
    cache = {epoch, std::move(perm)};
  }
  return cache.second[pos];
}

uint64_t hash_prompts(const std::vector<Prompt>& ps) {
  uint64_t h = 1469598103934665603ULL;
  auto add = [&](const std::string& s) {
    for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ULL;
    h = (h ^ 0xff) * 1099511628211ULL;
  };
  for (const Prompt& p : ps) add(p.question), add(p.answer);
  return h;
}

}  // namespace

int run_grpo(const TrainOptions& opts, Communicator* world) {
  const bool resuming = !opts.resume_dir.empty();
  std::string recipe_path = opts.recipe_path;
  if (resuming) {
    if (!recipe_path.empty()) TS_FAIL("give either a recipe or --resume RUN_DIR, not both");
    recipe_path = (fs::path(opts.resume_dir) / "recipe.toml").string();
  }
  Recipe recipe = Recipe::load(recipe_path, opts.overrides);
  GrpoConfig cfg = grpo_config_from_recipe(recipe);
  if (resuming) cfg.run_dir = opts.resume_dir;
  if (!opts.run_dir.empty()) cfg.run_dir = opts.run_dir;

  const int world_size = world ? world->size() : 1;
  ParallelConfig pc;
  pc.dp = cfg.dp;
  const Topology topo = Topology::make(pc, world_size);
  std::unique_ptr<ProcessGroups> groups;
  Communicator* dp = nullptr;
  if (world && world_size > 1) {
    groups = std::make_unique<ProcessGroups>(ProcessGroups::build(topo, *world));
    dp = groups->dp.get();
  }
  const int n_ranks = dp ? dp->size() : 1, rank = dp ? dp->rank() : 0;
  const bool writer = !world || world->rank() == 0;
  if (cfg.prompts_per_step % n_ranks != 0)
    TS_FAIL(recipe.path(), ": grpo.prompts_per_step (", cfg.prompts_per_step, ") must be a multiple of parallel.dp (",
            n_ranks, "): each data-parallel rank samples and trains on whole groups");
  if (cfg.prompts_per_step / n_ranks % cfg.mini_batches != 0)
    TS_FAIL(recipe.path(), ": grpo.mini_batches (", cfg.mini_batches, ") must divide the prompts per rank and step (",
            cfg.prompts_per_step / n_ranks, " = grpo.prompts_per_step / dp): a mini-batch takes whole groups from every rank");

  std::string resume_from;
  if (resuming) {
    resume_from = latest_checkpoint(cfg.run_dir);
    if (resume_from.empty()) TS_FAIL("--resume ", cfg.run_dir, ": no checkpoint to resume from in ", cfg.run_dir, "/checkpoints");
  } else if (!latest_checkpoint(cfg.run_dir).empty()) {
    TS_FAIL("run directory '", cfg.run_dir, "' already holds checkpoints; continue it with `tessera train --resume ",
            cfg.run_dir, "` or choose another job.run_dir");
  }

  // Prompts: every prompt must leave room for the response within the model's context.
  std::unique_ptr<Tokenizer> tok = load_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_model);
  const std::vector<Prompt> train_prompts = load_prompts_jsonl(cfg.train_prompts);
  if (train_prompts.empty()) TS_FAIL("prompts.train '", cfg.train_prompts, "': no prompts");
  std::vector<Prompt> eval_prompts;
  if (!cfg.eval_prompts.empty()) {
    eval_prompts = load_prompts_jsonl(cfg.eval_prompts);
    if (int64_t(eval_prompts.size()) > cfg.eval_limit) eval_prompts.resize(cfg.eval_limit);
  }
  std::vector<std::vector<int32_t>> prompt_ids;
  for (const Prompt& p : train_prompts) {
    prompt_ids.push_back(rl::prompt_tokens(*tok, p, cfg.mode));
    if (int64_t(prompt_ids.back().size()) + cfg.max_new_tokens > cfg.model.max_seq_len)
      TS_FAIL("prompts.train '", cfg.train_prompts, "': prompt '", p.id, "' has ", prompt_ids.back().size(),
              " tokens; with sampling.max_new_tokens = ", cfg.max_new_tokens, " it exceeds model.max_seq_len = ",
              cfg.model.max_seq_len);
  }
  const uint64_t fingerprint = hash_prompts(train_prompts);
  const rl::CompositeReward reward(cfg.rewards);
  const rl::RewardContext reward_ctx{cfg.mode};

  // The policy (from init.checkpoint, or the run's latest checkpoint) and the frozen reference.
  std::unique_ptr<Model> model_ptr = make_model(cfg.model, DType::f32, cfg.device);
  Model& model = *model_ptr;
  V4Model* v4 = dynamic_cast<V4Model*>(&model);
  ParamList params = model.params(), saved = model.saved_tensors();
  model.init(cfg.seed);
  const std::string init_from = resolve_checkpoint(cfg.init_checkpoint);
  if (!resuming) {
    CheckpointMeta m = load_checkpoint(init_from, cfg.model, saved, nullptr);
    check_tokenizer(*tok, m, init_from);
    log_info(cat("policy from ", init_from, " (step ", m.step, ")"));
  }
  std::unique_ptr<Model> ref_ptr;
  if (cfg.loss.beta > 0) {
    const std::string ref_from = resolve_checkpoint(cfg.reference);
    ref_ptr = make_model(cfg.model, DType::f32, cfg.device);
    ParamList ref_saved = ref_ptr->saved_tensors();
    try {
      CheckpointMeta m = load_checkpoint(ref_from, cfg.model, ref_saved, nullptr);
      check_tokenizer(*tok, m, ref_from);
    } catch (const Error& e) {
      TS_FAIL("init.reference: the reference policy must be the policy's model and tokenizer: ", e.what());
    }
    log_info(cat("KL reference (", rl::kl_estimator_name(cfg.loss.kl), ", coefficient ", cfg.loss.beta, ") from ",
                 ref_from));
  }
  Optimizer opt(params, cfg.optimizer);
  int64_t start_step = 0;
  const fs::path metrics_path = fs::path(cfg.run_dir) / "metrics.jsonl";
  if (!resume_from.empty()) {
    CheckpointMeta meta = load_checkpoint(resume_from, cfg.model, saved, &opt);
    check_tokenizer(*tok, meta, resume_from);
    if (meta.data_fingerprint != fingerprint)
      TS_FAIL("checkpoint '", resume_from, "' was trained on other prompts than prompts.train (", cfg.train_prompts,
              ") now holds; resuming would not continue the same run");
    start_step = meta.step;
    if (writer) truncate_metrics(metrics_path, start_step);
    log_info(cat("resuming from ", resume_from, " at step ", start_step));
  } else if (writer) {
    fs::create_directories(cfg.run_dir);
    write_atomically(metrics_path, "");
  }
  if (writer) write_atomically(fs::path(cfg.run_dir) / "recipe.toml", cfg.recipe_toml);
  std::unique_ptr<GradientBuckets> grad_buckets = dp ? std::make_unique<GradientBuckets>(*dp, params) : nullptr;
  GradientStack grad_stack;
  log_info(cat("GRPO: ", cfg.steps, " steps of ", cfg.prompts_per_step, " prompts x ", cfg.group_size,
               " responses (", train_prompts.size(), " prompts in ", cfg.train_prompts, "), ", cfg.epochs, " epoch(s) x ",
               cfg.mini_batches, " mini-batch(es) per step", dp ? cat(", over ", n_ranks, " data-parallel ranks") : ""));

  auto evaluate = [&](int64_t step) {
    rl::RewardEvalOptions eo;
    eo.max_new_tokens = cfg.eval_max_new_tokens;
    eo.temperature = 0.0;
    eo.seed = cfg.seed;
    eo.mode = cfg.mode;
    rl::RewardEvalResult ev = rl::evaluate_rewards(model, *tok, eval_prompts, reward, eo, dp);
    if (v4) v4->reset_expert_load();  // evaluation does not count towards the next bias update
    log_info(cat("step ", step, ": held-out reward ", ev.reward_mean, " (greedy, ", ev.responses, " prompts)"));
    return ev;
  };
  std::ofstream metrics;
  if (writer) metrics.open(metrics_path, std::ios::app);
  if (!eval_prompts.empty() && start_step == 0) {
    rl::RewardEvalResult ev = evaluate(0);
    if (writer)
      metrics << "{\"step\": 0, \"kind\": \"eval\", \"eval_reward_mean\": " << json_number(ev.reward_mean)
              << ", \"eval_response_length_mean\": " << json_number(ev.response_length_mean) << "}\n"
              << std::flush;
  }

  const double t_start = now_seconds();
  int64_t opt_steps_done = start_step * cfg.epochs * cfg.mini_batches;
  for (int64_t step = start_step; step < cfg.steps; ++step) {
    if (opts.stop_after >= 0 && step >= start_step + opts.stop_after) break;
    const double t0 = now_seconds();

    // ---------------------------------------------------------------- rollout: this rank's prompts, G each
    const int64_t per_rank = cfg.prompts_per_step / n_ranks;
    std::vector<Rollout> rollouts;
    std::vector<GenerationRequest> requests;
    for (int64_t k = rank * per_rank; k < (rank + 1) * per_rank; ++k) {
      const int64_t pi = prompt_at(step, k, cfg.prompts_per_step, int64_t(train_prompts.size()), cfg.seed);
      for (int64_t g = 0; g < cfg.group_size; ++g) {
        GenerationRequest q;
        q.prompt = prompt_ids[pi];
        q.max_new_tokens = cfg.max_new_tokens;
        q.stop_tokens = {tok->eos_id()};
        q.temperature = cfg.temperature, q.top_p = cfg.top_p, q.top_k = cfg.top_k;
        q.seed = mix64(cfg.seed ^ mix64(uint64_t(step) * 0x100000001b3ULL + uint64_t(k * cfg.group_size + g)));
        requests.push_back(q);
        Rollout r;
        r.k = k;
        r.prompt = pi;
        r.prompt_ids = prompt_ids[pi];
        rollouts.push_back(std::move(r));
      }
    }
    std::vector<GenerationResult> results = generate(model, requests);
    int64_t rollout_tokens = 0;
    for (size_t i = 0; i < rollouts.size(); ++i) {
      Rollout& r = rollouts[i];
      r.response = results[i].tokens;
      r.sampler_logp = results[i].logprobs;
      r.truncated = results[i].finish == FinishReason::length;
      rollout_tokens += int64_t(r.response.size());
      const rl::RewardScore s = reward.score(train_prompts[r.prompt], tok->decode(r.response), reward_ctx);
      r.reward = s.total, r.terms = s.terms;
      r.shaped = r.reward + (cfg.overlong_buffer > 0 ? rl::overlong_penalty(int64_t(r.response.size()),
                                                                            cfg.max_new_tokens, cfg.overlong_buffer,
                                                                            cfg.overlong_factor)
                                                     : 0.0);
    }
    std::vector<double> shaped;
    for (const Rollout& r : rollouts) shaped.push_back(r.shaped);
    const rl::Advantages adv = rl::compute_advantages(shaped, cfg.group_size, cfg.advantage);
    for (size_t i = 0; i < rollouts.size(); ++i) rollouts[i].advantage = adv.values[i];
    const double t_rollout = now_seconds() - t0;

    // Rows that train: dynamic sampling drops whole groups whose rewards are all equal (they have no signal).
    std::vector<Rollout*> rows;
    int64_t kept_groups = 0;
    for (int64_t g0 = 0; g0 < int64_t(rollouts.size()); g0 += cfg.group_size) {
      bool all_equal = true;
      for (int64_t j = 1; j < cfg.group_size; ++j) all_equal &= rollouts[g0 + j].shaped == rollouts[g0].shaped;
      if (cfg.dynamic_sampling && all_equal) continue;
      ++kept_groups;
      for (int64_t j = 0; j < cfg.group_size; ++j) rows.push_back(&rollouts[g0 + j]);
    }
    // Mini-batch m holds the groups of the step's prompts k with k % M == m: the same responses whatever the
    // data-parallel layout (each rank trains on its share of them). Micro-batches are consecutive rows of it.
    const int64_t M = cfg.mini_batches;
    std::vector<std::vector<MicroBatch>> minis(M);
    for (int64_t m = 0; m < M; ++m) {
      std::vector<Rollout*> mine;
      for (Rollout* r : rows)
        if (r->k % M == m) mine.push_back(r);
      for (size_t a = 0; a < mine.size(); a += size_t(cfg.micro_batch_rows))
        minis[m].push_back(
            make_micro_batch({mine.begin() + a, mine.begin() + std::min(mine.size(), a + size_t(cfg.micro_batch_rows))}));
    }

    // ---------------------------------------------------------------- old-policy and reference log-probabilities
    const double t1 = now_seconds();
    double entropy = 0, mismatch = 0, mismatch_max = 0;
    int64_t entropy_n = 0, mismatch_n = 0;
    for (auto& mini : minis)
      for (MicroBatch& mb : mini) {
        const Tensor targets = mb.batch.targets.reshape({int64_t(mb.rows.size()) * mb.T});
        Tensor logits;
        model.forward(mb.batch, &logits);
        const Tensor scaled = tempered(logits, cfg.temperature);
        entropy_sum(scaled, targets, entropy, entropy_n);
        const Tensor lp = rl::token_logprobs(scaled, targets);
        Tensor ref_lp;
        if (ref_ptr) {
          Tensor ref_logits;
          ref_ptr->forward(mb.batch, &ref_logits);
          ref_lp = rl::token_logprobs(tempered(ref_logits, cfg.temperature), targets);
        }
        for (int64_t b = 0; b < int64_t(mb.rows.size()); ++b) {
          Rollout& r = *mb.rows[b];
          r.old_logp.resize(r.response.size());
          r.ref_logp.assign(r.response.size(), 0.0);
          for (int64_t i = 0; i < int64_t(r.response.size()); ++i) {
            r.old_logp[i] = lp.data<float>()[slot(mb, b, i)];
            if (ref_ptr) r.ref_logp[i] = ref_lp.data<float>()[slot(mb, b, i)];
            // NeMo-RL's token_mult_prob_error: exp|log p_trainer - log p_sampler|, 1 when they agree.
            const double e = std::exp(std::abs(r.old_logp[i] - r.sampler_logp[i]));
            mismatch += e, mismatch_max = std::max(mismatch_max, e), ++mismatch_n;
          }
        }
      }
    if (v4) v4->reset_expert_load();  // the bias update counts the update passes' routing only
    const double t_logp = now_seconds() - t1;

    // ---------------------------------------------------------------- policy updates
    const double t2 = now_seconds();
    rl::PolicyLossStats loss_stats;
    double grad_norm = 0, lr = 0;
    int64_t train_tokens = 0;
    for (int64_t epoch = 0; epoch < cfg.epochs; ++epoch)
      for (int64_t m = 0; m < M; ++m) {
        std::vector<MicroBatch>& mini = minis[m];
        // Per-row masks (truncation, off-policy) and the mini-batch's global token and sequence counts.
        std::vector<Tensor> masks;
        rl::LossCounts counts;
        for (MicroBatch& mb : mini) {
          const int64_t B = int64_t(mb.rows.size());
          Tensor mask = Tensor::zeros({B, mb.T}, DType::f64);
          for (int64_t b = 0; b < B; ++b) {
            const Rollout& r = *mb.rows[b];
            const bool off = cfg.mask_truncated && r.truncated;
            for (int64_t i = 0; i < int64_t(r.response.size()); ++i) mask.data<double>()[slot(mb, b, i)] = off ? 0 : 1;
          }
          counts += rl::count_loss_tokens(mask);
          masks.push_back(mask);
        }
        if (dp) {
          Tensor c = Tensor::empty({2}, DType::f64);
          c.data<double>()[0] = double(counts.tokens), c.data<double>()[1] = double(counts.seqs);
          dp->all_reduce(c, ReduceOp::sum);
          counts.tokens = int64_t(c.data<double>()[0]), counts.seqs = int64_t(c.data<double>()[1]);
        }
        pairwise_gradients(model, 0, int64_t(mini.size()), grad_stack, [&](int64_t mi) {
          MicroBatch& mb = mini[mi];
          const int64_t B = int64_t(mb.rows.size()), N = B * mb.T;
          const Tensor targets = mb.batch.targets.reshape({N});
          rl::PolicyLossInputs in;
          in.logp_old = Tensor::zeros({B, mb.T}, DType::f64);
          in.logp_ref = Tensor::zeros({B, mb.T}, DType::f64);
          in.advantages = Tensor::empty({B}, DType::f64);
          for (int64_t b = 0; b < B; ++b) {
            const Rollout& r = *mb.rows[b];
            in.advantages.data<double>()[b] = r.advantage;
            for (int64_t i = 0; i < int64_t(r.response.size()); ++i) {
              in.logp_old.data<double>()[slot(mb, b, i)] = r.old_logp[i];
              in.logp_ref.data<double>()[slot(mb, b, i)] = r.ref_logp[i];
            }
          }
          if (!ref_ptr) in.logp_ref = Tensor();
          in.mask = masks[mi];
          model.forward_backward_logits(mb.batch, [&](const Tensor& logits, const Tensor& dlogits) {
            const Tensor scaled = tempered(logits, cfg.temperature);
            in.logp = rl::token_logprobs(scaled, targets).to(DType::f64).reshape({B, mb.T});
            if (cfg.offpolicy_delta > 0) {  // a no-op on the first update, where the policy is the old one
              std::vector<double> a(in.advantages.data<double>(), in.advantages.data<double>() + B);
              in.mask = rl::mask_rows(in.mask, rl::offpolicy_sequence_keep(in.logp, in.logp_old, in.mask, a,
                                                                           cfg.offpolicy_delta));
            }
            const rl::PolicyLossResult res = rl::policy_loss(in, cfg.loss, counts);
            loss_stats += res.stats;
            Tensor dl = Tensor::empty(scaled.shape(), DType::f32);
            rl::token_logprobs_backward(scaled, targets, res.dlogp.reshape({N}), dl);
            if (cfg.temperature != 1.0) {  // d/dlogits of logits / temperature
              const float inv = float(1.0 / cfg.temperature);
              for (int64_t i = 0; i < dl.numel(); ++i) dl.data<float>()[i] *= inv;
            }
            dlogits.copy_from(dl);
          });
          train_tokens += N;
        });
        if (dp) {
          grad_buckets->all_reduce();
          if (v4) all_reduce_expert_load(*v4, *dp);
        }
        grad_norm = clip_grad_norm(params, cfg.grad_clip);
        lr = cfg.schedule.at(opt_steps_done);
        opt.step(lr);
        ++opt_steps_done;
        if (v4) v4->update_routing_bias(cfg.model.bias_update_speed);
      }
    const double t_update = now_seconds() - t2;

    // ---------------------------------------------------------------- metrics (sums over the ranks)
    std::vector<double> sums = {0, 0, 0, 0, 0, 0, double(adv.groups), double(adv.zero_std_groups),
                                double(kept_groups), entropy, double(entropy_n), mismatch, double(mismatch_n),
                                double(loss_stats.tokens), double(loss_stats.clipped_low),
                                double(loss_stats.clipped_high), double(loss_stats.dual_clipped), loss_stats.ratio_sum,
                                loss_stats.kl_sum, loss_stats.pg_loss, loss_stats.kl_loss, double(rollout_tokens),
                                double(train_tokens)};
    const size_t n_fixed = sums.size();
    sums.resize(n_fixed + cfg.rewards.size(), 0.0);
    double reward_max = -INFINITY, neg_reward_min = -INFINITY, length_max = 0;
    for (const Rollout& r : rollouts) {
      sums[0] += 1, sums[1] += r.reward, sums[2] += r.reward * r.reward;
      sums[3] += double(r.response.size()), sums[4] += r.truncated, sums[5] += r.shaped;
      for (size_t t = 0; t < r.terms.size(); ++t) sums[n_fixed + t] += r.terms[t];
      reward_max = std::max(reward_max, r.reward), neg_reward_min = std::max(neg_reward_min, -r.reward);
      length_max = std::max(length_max, double(r.response.size()));
    }
    std::vector<double> maxes = {reward_max, neg_reward_min, length_max, mismatch_max};
    if (dp) {
      Tensor t = Tensor::empty({int64_t(sums.size())}, DType::f64);
      std::copy(sums.begin(), sums.end(), t.data<double>());
      dp->all_reduce(t, ReduceOp::sum);
      std::copy(t.data<double>(), t.data<double>() + sums.size(), sums.begin());
      Tensor x = Tensor::empty({int64_t(maxes.size())}, DType::f64);
      std::copy(maxes.begin(), maxes.end(), x.data<double>());
      dp->all_reduce(x, ReduceOp::max);
      std::copy(x.data<double>(), x.data<double>() + maxes.size(), maxes.begin());
    }
    const double n = sums[0], reward_mean = sums[1] / n;
    const double reward_std = n > 1 ? std::sqrt(std::max(0.0, (sums[2] - n * reward_mean * reward_mean) / (n - 1))) : 0;
    const double tokens = sums[13], per_update = double(cfg.epochs * M);
    const double step_time = now_seconds() - t0;
    const int64_t done = step + 1;
    rl::RewardEvalResult ev;
    const bool last = done == cfg.steps;
    const bool eval_now = !eval_prompts.empty() && ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || last);
    if (eval_now) ev = evaluate(done);
    if (writer) {
      std::string line = cat("{\"step\": ", done, ", \"lr\": ", json_number(lr), ", \"reward_mean\": ",
                             json_number(reward_mean), ", \"reward_std\": ", json_number(reward_std),
                             ", \"reward_min\": ", json_number(-maxes[1]), ", \"reward_max\": ", json_number(maxes[0]));
      for (size_t t = 0; t < cfg.rewards.size(); ++t)
        line += cat(", \"reward/", cfg.rewards[t].name, "\": ", json_number(sums[n_fixed + t] / n));
      if (cfg.overlong_buffer > 0) line += cat(", \"reward_shaped_mean\": ", json_number(sums[5] / n));
      line += cat(", \"frac_reward_zero_std\": ", json_number(sums[7] / sums[6]));
      if (cfg.dynamic_sampling) line += cat(", \"kept_groups\": ", int64_t(sums[8]));
      line += cat(", \"response_length_mean\": ", json_number(sums[3] / n),
                  ", \"response_length_max\": ", json_number(maxes[2]), ", \"frac_truncated\": ", json_number(sums[4] / n),
                  ", \"pg_loss\": ", json_number(sums[19] / per_update),
                  ", \"kl\": ", ref_ptr ? json_number(tokens > 0 ? sums[18] / tokens : NAN) : std::string("null"),
                  ", \"loss\": ", json_number((sums[19] + cfg.loss.beta * sums[20]) / per_update),
                  ", \"entropy\": ", json_number(sums[9] / sums[10]),
                  ", \"clip_frac_low\": ", json_number(tokens > 0 ? sums[14] / tokens : 0.0),
                  ", \"clip_frac_high\": ", json_number(tokens > 0 ? sums[15] / tokens : 0.0),
                  ", \"dual_clip_frac\": ", json_number(tokens > 0 ? sums[16] / tokens : 0.0),
                  ", \"ratio_mean\": ", json_number(tokens > 0 ? sums[17] / tokens : NAN),
                  ", \"grad_norm\": ", json_number(grad_norm),
                  ", \"logprob_mismatch\": ", json_number(sums[11] / sums[12]),
                  ", \"logprob_mismatch_max\": ", json_number(maxes[3]),
                  ", \"rollout_tokens_per_s\": ", json_number(sums[21] / t_rollout),
                  ", \"train_tokens_per_s\": ", json_number(sums[22] / t_update),
                  ", \"time_rollout_s\": ", json_number(t_rollout), ", \"time_logprobs_s\": ", json_number(t_logp),
                  ", \"time_update_s\": ", json_number(t_update), ", \"step_time_s\": ", json_number(step_time),
                  ", \"elapsed_s\": ", json_number(now_seconds() - t_start));
      if (eval_now)
        line += cat(", \"eval_reward_mean\": ", json_number(ev.reward_mean),
                    ", \"eval_response_length_mean\": ", json_number(ev.response_length_mean));
      metrics << line << "}\n" << std::flush;
    }
    if (done % cfg.log_every == 0 || last) {
      char buf[320];
      std::snprintf(buf, sizeof buf,
                    "step %4lld/%lld | reward %.3f (std %.3f) | len %.1f | pg %.4f | clip %.3f | mismatch %.4f | "
                    "gnorm %.3f | %.1fs (rollout %.1fs)",
                    (long long)done, (long long)cfg.steps, reward_mean, reward_std, sums[3] / n, sums[19] / per_update,
                    tokens > 0 ? (sums[14] + sums[15]) / tokens : 0.0, sums[11] / sums[12], grad_norm, step_time,
                    t_rollout);
      log_info(buf);
    }
    if (!std::isfinite(grad_norm))
      TS_FAIL("gradient norm is ", grad_norm, " at step ", done, "; the last checkpoint in ", cfg.run_dir,
              " is intact (lower optimizer.lr?)");

    const bool save = (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || last;
    if (writer && save) {
      CheckpointMeta meta{done, cfg.seed, fingerprint, cfg.recipe_toml, cfg.tokenizer_kind, tok->hash()};
      save_checkpoint(checkpoint_path(cfg.run_dir, done), cfg.model, saved, &opt, meta);
      if (cfg.checkpoint_keep > 0) {
        std::vector<std::string> all = list_checkpoints(cfg.run_dir);
        for (size_t i = 0; i + cfg.checkpoint_keep < all.size(); ++i) fs::remove(all[i]);
      }
    }
  }
  if (dp) dp->barrier();
  if (!writer) return 0;
  const bool plotted = plot_metrics(cfg.run_dir,
                                    {"--key", "reward_mean", "--val-key", "eval_reward_mean", "--out",
                                     (fs::path(cfg.run_dir) / "reward.png").string()},
                                    "reward curve");
  log_info(cat("run directory: ", cfg.run_dir, " (metrics.jsonl, recipe.toml, checkpoints/",
               plotted ? ", reward.png" : "", ")"));
  return 0;
}

}  // namespace tessera
