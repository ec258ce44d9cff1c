#include "cli/rl_stage.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>

#include "backend/backend.h"
#include "cli/model_recipe.h"
#include "cli/run_files.h"
#include "cli/stages.h"
#include "core/log.h"
#include "core/rng.h"
#include "data/prompts.h"
#include "io/checkpoint.h"
#include "model/qat.h"
#include "model/v4.h"
#include "parallel/data_parallel.h"
#include "parallel/topology.h"
#include "rl/evaluate.h"
#include "rl/generate.h"

namespace tessera {
namespace fs = std::filesystem;

namespace {

std::vector<rl::RewardTerm> reward_terms(Recipe& r, const std::string& key) {
  std::vector<rl::RewardTerm> terms;
  try {
    for (const std::string& t : r.get_string_list(key, {})) terms.push_back(rl::parse_reward_term(t));
    rl::CompositeReward check(terms);  // unknown or repeated names fail here, before any work
  } catch (const Error& e) {
    TS_FAIL(r.path(), ": key '", key, "': ", e.what());
  }
  return terms;
}

ReasoningMode mode_key(Recipe& r, const std::string& key) {
  return parse_reasoning_mode(r.get_string(key, "non_thinking", {"non_thinking", "think_high", "think_max"}));
}

}  // namespace

RlConfig rl_config_from_recipe(Recipe& r) {
  RlConfig c;
  c.stage = r.get_string("stage", "grpo", {"grpo", "opd"});
  const bool opd = c.stage == "opd";
  c.init_checkpoint = r.get_string("init.checkpoint", "");
  if (c.init_checkpoint.empty())
    TS_FAIL(r.path(), ": stage = \"", c.stage, "\" needs init.checkpoint (the starting run directory or checkpoint file)");
  if (!opd) c.reference = r.get_string("init.reference", c.init_checkpoint);
  static_cast<RunKeys&>(c) = run_keys_from_recipe(r);

  // Prompt sets: one ([prompts] + [rewards]) or several named domains ([domain.NAME] each). OPD needs domains:
  // each names its teacher.
  const std::vector<std::string> names = r.get_string_list("domains", {});
  if (names.empty()) {
    if (opd)
      TS_FAIL(r.path(), ": stage = \"opd\" needs domains = [\"name\", ...] with a [domain.NAME] table each ",
              "(prompts, rewards, teacher)");
    RlDomain d;
    d.train = r.get_string("prompts.train", "");
    if (d.train.empty()) TS_FAIL(r.path(), ": stage = \"grpo\" needs prompts.train (a prompt-set JSONL file)");
    d.eval = r.get_string("prompts.eval", "");
    d.eval_limit = r.get_int("prompts.eval_limit", d.eval_limit, 1);
    d.mode = mode_key(r, "prompts.mode");
    d.rewards = reward_terms(r, "rewards.terms");
    c.domains.push_back(d);
  }
  for (const std::string& n : names) {
    const std::string k = "domain." + n + ".";
    RlDomain d;
    d.name = n;
    for (const RlDomain& o : c.domains)
      if (o.name == n) TS_FAIL(r.path(), ": key 'domains': '", n, "' is listed twice");
    d.train = r.get_string(k + "prompts", "");
    if (d.train.empty()) TS_FAIL(r.path(), ": domain '", n, "' needs ", k, "prompts (a prompt-set JSONL file)");
    d.eval = r.get_string(k + "eval", "");
    d.eval_limit = r.get_int(k + "eval_limit", d.eval_limit, 1);
    d.mode = mode_key(r, k + "mode");
    d.max_new_tokens = r.get_int(k + "max_new_tokens", 0, 0, c.model.max_seq_len - 1);
    d.rewards = reward_terms(r, k + "rewards");
    if (opd) {
      d.teacher = r.get_string(k + "teacher", "");
      if (d.teacher.empty()) TS_FAIL(r.path(), ": domain '", n, "' needs ", k, "teacher (a checkpoint or run directory)");
      d.weight = r.get_double(k + "weight", d.weight, 0.0);
    }
    c.domains.push_back(d);
  }

  c.steps = r.require_int("training.steps", 1);
  c.grad_clip = r.get_double("training.grad_clip", c.grad_clip, 0.0);
  c.qat = r.get_string("training.qat", "off", {"off", "fp8", "fp4_fp8"});  // QAT: model/qat.h
  c.device = r.get_string("training.device", "cpu", {"cpu", "cuda"}) == "cuda" ? Device::cuda : Device::cpu;
  if (c.device == Device::cuda && !device_available(Device::cuda))
    TS_FAIL(r.path(), ": training.device = \"cuda\" but this build has no CUDA backend or no GPU is present");
  c.dp = int(r.get_int("parallel.dp", -1, -1, 1 << 20));
  for (const char* key : {"parallel.tp", "parallel.pp", "parallel.ep"})
    if (r.get_int(key, 1, 1, 1 << 20) > 1)
      TS_FAIL(r.path(), ": ", key, " > 1: the ", c.stage, " stage runs data-parallel only (parallel.dp)");

  c.prompts_per_step = r.get_int("grpo.prompts_per_step", c.prompts_per_step, 1);
  c.group_size = r.get_int("grpo.group_size", opd ? 1 : c.group_size, opd ? 1 : 2);
  c.epochs = r.get_int("grpo.epochs", c.epochs, 1);
  c.mini_batches = r.get_int("grpo.mini_batches", c.mini_batches, 1);
  c.micro_batch_rows = r.get_int("grpo.micro_batch_rows", c.micro_batch_rows, 1);
  c.max_new_tokens = r.get_int("sampling.max_new_tokens", c.max_new_tokens, 1, c.model.max_seq_len - 1);
  int64_t budget_min = INT64_MAX, budget_max = 0;  // over the prompt sets
  for (RlDomain& d : c.domains) {
    const bool own = d.max_new_tokens > 0;
    if (!own) d.max_new_tokens = c.max_new_tokens;
    budget_min = std::min(budget_min, d.max_new_tokens), budget_max = std::max(budget_max, d.max_new_tokens);
  }
  c.temperature = r.get_double("sampling.temperature", c.temperature, 1e-3, 100.0);
  c.top_p = r.get_double("sampling.top_p", c.top_p, 1e-6, 1.0);
  c.top_k = r.get_int("sampling.top_k", c.top_k, 0);
  c.mask_truncated = r.get_bool("grpo.mask_truncated", c.mask_truncated);
  if (opd) {
    c.distill.divergence = rl::parse_distill_divergence(
        r.get_string("opd.divergence", "reverse_kl", {"reverse_kl", "forward_kl", "jsd"}));
    c.distill.beta = r.get_double("opd.beta", c.distill.beta, 0.0, 1.0);
    c.distill.temperature = c.temperature;
    c.sampled_token = r.get_string("opd.form", "full_vocab", {"full_vocab", "sampled_token"}) == "sampled_token";
  } else {
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
    L.norm_constant = r.get_double("grpo.norm_constant", double(budget_max), 1e-9);
    try {
      L.validate();
    } catch (const Error& e) {
      TS_FAIL(r.path(), ": [grpo]: ", e.what());
    }
    c.dynamic_sampling = r.get_bool("grpo.dynamic_sampling", c.dynamic_sampling);
    c.offpolicy_delta = r.get_double("grpo.offpolicy_delta", c.offpolicy_delta, 0.0);
    c.overlong_buffer = r.get_int("grpo.overlong_buffer", c.overlong_buffer, 0, budget_min);
    c.overlong_factor = r.get_double("grpo.overlong_factor", c.overlong_factor, 0.0);
  }

  c.eval_every = r.get_int("eval.every", c.eval_every, 0);
  // 0: each prompt set's response budget.
  c.eval_max_new_tokens = r.get_int("eval.max_new_tokens", 0, 0, c.model.max_seq_len - 1);
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
  int64_t prompt = 0;  // index into the stage's prompts (all domains)
  int domain = 0;
  std::vector<int32_t> prompt_ids, response;
  std::vector<double> sampler_logp;  // log p under the sampling distribution (temperature applied)
  bool truncated = false;
  double reward = 0, shaped = 0;  // the verifiers' total, and with the overlong penalty
  std::vector<double> terms;
  double advantage = 0;
  // Filled per micro-batch: the old policy's and the reference's (grpo) or the teacher's (opd, sampled-token
  // form) log-probabilities of the response tokens.
  std::vector<double> old_logp, ref_logp, teacher_logp;
};

// A micro-batch of rollouts as model input: row b is prompt ++ response shifted by one; targets on the response
// tokens only. mask (B, T) f64: 1 where a response token trains.
struct MicroBatch {
  std::vector<Rollout*> rows;
  TokenBatch batch;
  int64_t T = 0;
  Tensor teacher_logits;  // opd, full vocabulary: (B*T, V) host f32, each row's from its domain's teacher
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

// A prompt of the stage: its domain and its generation prompt.
struct StagePrompt {
  Prompt prompt;
  int domain = 0;
  std::vector<int32_t> ids;
};

uint64_t hash_prompts(const std::vector<StagePrompt>& ps) {
  uint64_t h = 1469598103934665603ULL;
  auto add = [&](const std::string& s) {
    for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ULL;
    h = (h ^ 0xff) * 1099511628211ULL;
  };
  for (const StagePrompt& p : ps) add(p.prompt.question), add(p.prompt.answer), add(std::to_string(p.domain));
  return h;
}

}  // namespace

int run_rl_stage(const TrainOptions& opts, Communicator* world) {
  const bool resuming = !opts.resume_dir.empty();
  Recipe recipe = Recipe::load(train_recipe_path(opts), opts.overrides);
  RlConfig cfg = rl_config_from_recipe(recipe);
  const bool opd = cfg.stage == "opd";
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

  const std::string resume_from = checkpoint_to_resume(cfg.run_dir, resuming);

  // Prompts of every domain. Those that leave no room for a whole response within the model's context are left
  // out (as verl's filter_overlong_prompts), with a warning.
  std::unique_ptr<Tokenizer> tok = load_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_model);
  const size_t n_domains = cfg.domains.size();
  std::vector<StagePrompt> prompts;
  std::vector<std::vector<Prompt>> eval_prompts(n_domains);
  std::vector<rl::CompositeReward> rewards;
  for (size_t d = 0; d < n_domains; ++d) {
    const RlDomain& dom = cfg.domains[d];
    rewards.emplace_back(dom.rewards);
    int64_t too_long = 0, kept = 0;
    std::string first_too_long;
    for (const Prompt& p : load_prompts_jsonl(dom.train)) {
      std::vector<int32_t> ids = rl::prompt_tokens(*tok, p, dom.mode);
      if (int64_t(ids.size()) + dom.max_new_tokens > cfg.model.max_seq_len) {
        if (too_long++ == 0) first_too_long = cat(p.id, " (", ids.size(), " tokens)");
        continue;
      }
      prompts.push_back({p, int(d), std::move(ids)});
      ++kept;
    }
    if (too_long)
      log_warn(cat("'", dom.train, "': ", too_long, " prompt(s) left out, first ", first_too_long,
                   ": prompt + the response budget (", dom.max_new_tokens, ") exceeds model.max_seq_len (",
                   cfg.model.max_seq_len, ")"));
    if (kept == 0)
      TS_FAIL("'", dom.train, "' (domain ", dom.name, "): no prompt fits model.max_seq_len = ", cfg.model.max_seq_len,
              " with a response budget of ", dom.max_new_tokens, " tokens");
    if (!dom.eval.empty()) {
      eval_prompts[d] = load_prompts_jsonl(dom.eval);
      if (int64_t(eval_prompts[d].size()) > dom.eval_limit) eval_prompts[d].resize(dom.eval_limit);
    }
  }
  const uint64_t fingerprint = hash_prompts(prompts);
  const bool multi = n_domains > 1;

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
    log_info(cat(opd ? "student" : "policy", " from ", init_from, " (step ", m.step, ")"));
  }
  std::unique_ptr<Model> ref_ptr;
  if (!opd && cfg.loss.beta > 0) {
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
  // OPD teachers, each loaded when its rows are scored (one resident at a time); checked now so that a wrong
  // teacher fails before any work. A teacher may be any size, but must share the student's tokenizer.
  std::vector<std::string> teachers;  // distinct checkpoint paths, in domain order
  std::vector<int> teacher_of(n_domains, -1);
  auto load_teacher = [&](const std::string& path) {
    const ModelConfig tc = checkpoint_model_config(path);
    if (tc.vocab_size != cfg.model.vocab_size)
      TS_FAIL("teacher '", path, "' has a vocabulary of ", tc.vocab_size, " tokens, the student ", cfg.model.vocab_size,
              ": on-policy distillation needs the teacher and the student to share the tokenizer");
    std::unique_ptr<Model> t = make_model(tc, DType::f32, cfg.device);
    ParamList ts = t->saved_tensors();
    CheckpointMeta m = load_checkpoint(path, tc, ts, nullptr);
    try {
      check_tokenizer(*tok, m, path);
    } catch (const Error& e) {
      TS_FAIL("teacher '", path, "': on-policy distillation needs the teacher and the student to share the tokenizer: ",
              e.what());
    }
    return t;
  };
  for (size_t d = 0; d < n_domains && opd; ++d) {
    const std::string path = resolve_checkpoint(cfg.domains[d].teacher);
    auto it = std::find(teachers.begin(), teachers.end(), path);
    teacher_of[d] = int(it - teachers.begin());
    if (it == teachers.end()) {
      teachers.push_back(path);
      load_teacher(path);  // validation only
      log_info(cat("teacher of domain ", cfg.domains[d].name, ": ", path, " (weight ", cfg.domains[d].weight, ")"));
    }
  }

  Optimizer opt(params, cfg.optimizer);
  const qat::Mode qat_mode = qat::parse_mode(cfg.qat);  // QAT (training.qat)
  if (qat_mode != qat::Mode::off) {
    const qat::FakeQuantWeights probe(params, qat_mode);
    log_info(cat("quantisation-aware training (training.qat = \"", cfg.qat, "\"): ", probe.stats().fp4_tensors,
                 " routed-expert weights in FP4, ", probe.stats().fp8_tensors,
                 " matrices in FP8; rollouts, log-probabilities, updates and held-out rewards use the quantised "
                 "weights, the optimizer updates the fp32 masters"));
  }
  int64_t start_step = 0;
  const fs::path metrics_path = fs::path(cfg.run_dir) / "metrics.jsonl";
  if (!resume_from.empty()) {
    CheckpointMeta meta = load_checkpoint(resume_from, cfg.model, saved, &opt);
    check_tokenizer(*tok, meta, resume_from);
    if (meta.data_fingerprint != fingerprint)
      TS_FAIL("checkpoint '", resume_from, "' was trained on other prompts than the recipe's prompt sets now hold; ",
              "resuming would not continue the same run");
    start_step = meta.step;
    log_info(cat("resuming from ", resume_from, " at step ", start_step));
  }
  if (writer) prepare_run_directory(cfg.run_dir, !resume_from.empty(), start_step, cfg.recipe_toml);
  std::unique_ptr<GradientBuckets> grad_buckets = dp ? std::make_unique<GradientBuckets>(*dp, params) : nullptr;
  GradientStack grad_stack;
  log_info(cat(opd ? "OPD" : "GRPO", ": ", cfg.steps, " steps of ", cfg.prompts_per_step, " prompts x ",
               cfg.group_size, " responses (", prompts.size(), " prompts in ", n_domains, " domain(s)), ", cfg.epochs,
               " epoch(s) x ", cfg.mini_batches, " mini-batch(es) per step",
               dp ? cat(", over ", n_ranks, " data-parallel ranks") : ""));

  // Held-out rewards (greedy) per domain; the overall value is the mean over every held-out prompt.
  const bool have_eval = std::any_of(eval_prompts.begin(), eval_prompts.end(), [](const auto& v) { return !v.empty(); });
  auto evaluate = [&](int64_t step) {
    const qat::FakeQuantWeights qat_scope(params, qat_mode);  // QAT: the quantised policy's reward
    std::string out;
    double sum = 0, n = 0, len = 0;
    for (size_t d = 0; d < n_domains; ++d) {
      if (eval_prompts[d].empty()) continue;
      rl::RewardEvalOptions eo;
      eo.max_new_tokens = cfg.eval_max_new_tokens > 0 ? cfg.eval_max_new_tokens : cfg.domains[d].max_new_tokens;
      eo.temperature = 0.0;
      eo.seed = cfg.seed;
      eo.mode = cfg.domains[d].mode;
      const rl::RewardEvalResult ev = rl::evaluate_rewards(model, *tok, eval_prompts[d], rewards[d], eo, dp);
      sum += ev.reward_mean * double(ev.responses), n += double(ev.responses);
      len += ev.response_length_mean * double(ev.responses);
      if (multi) out += cat(", \"eval_reward/", cfg.domains[d].name, "\": ", json_number(ev.reward_mean));
      log_info(cat("step ", step, ": held-out reward ", ev.reward_mean, multi ? " (" + cfg.domains[d].name + ")" : "",
                   " (greedy, ", ev.responses, " prompts)"));
    }
    if (v4) v4->reset_expert_load();  // evaluation does not count towards the next bias update
    return cat(", \"eval_reward_mean\": ", json_number(sum / n), ", \"eval_response_length_mean\": ",
               json_number(len / n), out);
  };
  std::ofstream metrics;
  if (writer) metrics.open(metrics_path, std::ios::app);
  if (have_eval && start_step == 0) {
    const std::string ev = evaluate(0);
    if (writer) metrics << "{\"step\": 0, \"kind\": \"eval\"" << ev << "}\n" << std::flush;
  }

  // Reward terms as metrics keys: reward/TERM with one domain, reward/DOMAIN/TERM with several.
  std::vector<std::string> term_keys;
  std::vector<size_t> term_base(n_domains), term_domain;
  for (size_t d = 0; d < n_domains; ++d) {
    term_base[d] = term_keys.size();
    for (const rl::RewardTerm& t : cfg.domains[d].rewards) {
      term_keys.push_back(multi ? cfg.domains[d].name + "/" + t.name : t.name);
      term_domain.push_back(d);
    }
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
      const int64_t pi = prompt_at(step, k, cfg.prompts_per_step, int64_t(prompts.size()), cfg.seed);
      for (int64_t g = 0; g < cfg.group_size; ++g) {
        GenerationRequest q;
        q.prompt = prompts[pi].ids;
        q.max_new_tokens = cfg.domains[prompts[pi].domain].max_new_tokens;
        q.stop_tokens = {tok->eos_id()};
        q.temperature = cfg.temperature, q.top_p = cfg.top_p, q.top_k = cfg.top_k;
        q.seed = mix64(cfg.seed ^ mix64(uint64_t(step) * 0x100000001b3ULL + uint64_t(k * cfg.group_size + g)));
        requests.push_back(q);
        Rollout r;
        r.k = k;
        r.prompt = pi;
        r.domain = prompts[pi].domain;
        r.prompt_ids = prompts[pi].ids;
        rollouts.push_back(std::move(r));
      }
    }
    // QAT (training.qat): rollouts and the old-policy pass at the quantised weights (sampler = trainer).
    std::optional<qat::FakeQuantWeights> qat_scope;
    if (qat_mode != qat::Mode::off) qat_scope.emplace(params, qat_mode);
    std::vector<GenerationResult> results = generate(model, requests);
    int64_t rollout_tokens = 0;
    for (size_t i = 0; i < rollouts.size(); ++i) {
      Rollout& r = rollouts[i];
      r.response = results[i].tokens;
      r.sampler_logp = results[i].logprobs;
      r.truncated = results[i].finish == FinishReason::length;
      rollout_tokens += int64_t(r.response.size());
      const rl::RewardScore s = rewards[r.domain].score(prompts[r.prompt].prompt, tok->decode(r.response),
                                                        rl::RewardContext{cfg.domains[r.domain].mode});
      r.reward = s.total, r.terms = s.terms;
      const int64_t budget = cfg.domains[r.domain].max_new_tokens;
      r.shaped = r.reward + (cfg.overlong_buffer > 0 ? rl::overlong_penalty(int64_t(r.response.size()), budget,
                                                                            cfg.overlong_buffer, cfg.overlong_factor)
                                                     : 0.0);
    }
    rl::Advantages adv;
    if (!opd) {
      std::vector<double> shaped;
      for (const Rollout& r : rollouts) shaped.push_back(r.shaped);
      adv = rl::compute_advantages(shaped, cfg.group_size, cfg.advantage);
      for (size_t i = 0; i < rollouts.size(); ++i) rollouts[i].advantage = adv.values[i];
    }
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

    // ---------------------------------------------------------------- old-policy, reference and teacher passes
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
    // Teachers, one resident at a time: each scores the micro-batches holding rows of its domains. The full
    // vocabulary form keeps the teacher's tempered logits of those rows; the sampled-token form their
    // log-probabilities of the sampled tokens.
    for (size_t t = 0; t < teachers.size(); ++t) {
      std::unique_ptr<Model> teacher = load_teacher(teachers[t]);
      for (auto& mini : minis)
        for (MicroBatch& mb : mini) {
          const int64_t B = int64_t(mb.rows.size()), N = B * mb.T;
          bool any = false;
          for (const Rollout* r : mb.rows) any |= teacher_of[r->domain] == int(t);
          if (!any) continue;
          Tensor logits;
          teacher->forward(mb.batch, &logits);
          // Full vocabulary: the raw logits (distill_loss applies the temperature to both models).
          const Tensor scaled = cfg.sampled_token ? tempered(logits, cfg.temperature) : tempered(logits, 1.0);
          const int64_t V = scaled.size(1);
          if (!cfg.sampled_token && !mb.teacher_logits.defined())
            mb.teacher_logits = Tensor::zeros({N, V}, DType::f32);
          const Tensor lp = cfg.sampled_token ? rl::token_logprobs(scaled, mb.batch.targets.reshape({N})) : Tensor();
          for (int64_t b = 0; b < B; ++b) {
            Rollout& r = *mb.rows[b];
            if (teacher_of[r.domain] != int(t)) continue;
            if (cfg.sampled_token) {
              r.teacher_logp.resize(r.response.size());
              for (size_t i = 0; i < r.response.size(); ++i) r.teacher_logp[i] = lp.data<float>()[slot(mb, b, i)];
            } else {
              std::copy(scaled.data<float>() + b * mb.T * V, scaled.data<float>() + (b + 1) * mb.T * V,
                        mb.teacher_logits.data<float>() + b * mb.T * V);
            }
          }
        }
    }
    if (v4) v4->reset_expert_load();  // the bias update counts the update passes' routing only
    qat_scope.reset();  // QAT: master weights back
    const double t_logp = now_seconds() - t1;

    // ---------------------------------------------------------------- updates
    const double t2 = now_seconds();
    rl::PolicyLossStats loss_stats;
    rl::DistillMetrics distill_stats;
    double distill_loss = 0;
    double grad_norm = 0, lr = 0;
    int64_t train_tokens = 0;
    for (int64_t epoch = 0; epoch < cfg.epochs; ++epoch)
      for (int64_t m = 0; m < M; ++m) {
        std::vector<MicroBatch>& mini = minis[m];
        // Per-token masks (truncation) and the mini-batch's global counts: tokens and sequences (grpo), weighted
        // tokens (opd).
        std::vector<Tensor> masks;
        rl::LossCounts counts;
        for (MicroBatch& mb : mini) {
          const int64_t B = int64_t(mb.rows.size());
          Tensor mask = Tensor::zeros({B, mb.T}, DType::f64);
          for (int64_t b = 0; b < B; ++b) {
            const Rollout& r = *mb.rows[b];
            const bool off = (cfg.mask_truncated && r.truncated) || (opd && cfg.domains[r.domain].weight == 0);
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
        if (qat_mode != qat::Mode::off) qat_scope.emplace(params, qat_mode);  // QAT: gradient at quantised weights
        pairwise_gradients(model, 0, int64_t(mini.size()), grad_stack, [&](int64_t mi) {
          MicroBatch& mb = mini[mi];
          const int64_t B = int64_t(mb.rows.size()), N = B * mb.T;
          const Tensor targets = mb.batch.targets.reshape({N});
          if (opd) {
            // Per-token weights: the mask times the domain's teacher weight.
            Tensor w = Tensor::empty({N}, DType::f64);
            for (int64_t b = 0; b < B; ++b)
              for (int64_t t = 0; t < mb.T; ++t)
                w.data<double>()[b * mb.T + t] =
                    masks[mi].data<double>()[b * mb.T + t] * cfg.domains[mb.rows[b]->domain].weight;
            model.forward_backward_logits(mb.batch, [&](const Tensor& logits, const Tensor& dlogits) {
              Tensor host = logits.device() == Device::cpu ? logits : logits.to_device(Device::cpu);
              Tensor dl = Tensor::empty(host.shape(), DType::f32);
              if (cfg.sampled_token) {
                const Tensor scaled = tempered(host, cfg.temperature);
                const Tensor lp = rl::token_logprobs(scaled, targets);
                Tensor lt = Tensor::zeros({N}, DType::f64);
                for (int64_t b = 0; b < B; ++b)
                  for (size_t i = 0; i < mb.rows[b]->response.size(); ++i)
                    lt.data<double>()[slot(mb, b, int64_t(i))] = mb.rows[b]->teacher_logp[i];
                const rl::SampledDistillResult res = rl::sampled_distill_loss(lp, lt, w, double(counts.tokens));
                distill_loss += res.loss, distill_stats += res.metrics;
                rl::token_logprobs_backward(scaled, targets, res.dlogp, dl);
                if (cfg.temperature != 1.0)
                  for (int64_t i = 0; i < dl.numel(); ++i) dl.data<float>()[i] *= float(1.0 / cfg.temperature);
              } else {
                const rl::DistillLossResult res =
                    rl::distill_loss(host, mb.teacher_logits, w, double(counts.tokens), cfg.distill, dl);
                distill_loss += res.loss, distill_stats += res.metrics;
              }
              dlogits.copy_from(dl);
            });
          } else {
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
          }
          train_tokens += N;
        });
        qat_scope.reset();  // QAT: the optimizer steps the masters (straight-through)
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
    enum : size_t {
      kN, kReward, kReward2, kLen, kTrunc, kShaped, kGroups, kZeroStd, kKept, kEnt, kEntN, kMis, kMisN, kTok,
      kClipLo, kClipHi, kDual, kRatio, kKl, kPg, kKlLoss, kRollTok, kTrainTok, kDiv, kDivN, kDistill, kFixed
    };
    std::vector<double> sums(kFixed, 0.0);
    sums[kGroups] = double(adv.groups), sums[kZeroStd] = double(adv.zero_std_groups), sums[kKept] = double(kept_groups);
    sums[kEnt] = entropy, sums[kEntN] = double(entropy_n), sums[kMis] = mismatch, sums[kMisN] = double(mismatch_n);
    sums[kTok] = double(loss_stats.tokens), sums[kClipLo] = double(loss_stats.clipped_low);
    sums[kClipHi] = double(loss_stats.clipped_high), sums[kDual] = double(loss_stats.dual_clipped);
    sums[kRatio] = loss_stats.ratio_sum, sums[kKl] = loss_stats.kl_sum, sums[kPg] = loss_stats.pg_loss;
    sums[kKlLoss] = loss_stats.kl_loss, sums[kRollTok] = double(rollout_tokens), sums[kTrainTok] = double(train_tokens);
    sums[kDiv] = distill_stats.divergence_sum, sums[kDivN] = double(distill_stats.tokens), sums[kDistill] = distill_loss;
    // Per term, and per domain (count, reward sum).
    sums.resize(kFixed + term_keys.size() + 2 * n_domains, 0.0);
    const size_t kDomain = kFixed + term_keys.size();
    double reward_max = -INFINITY, neg_reward_min = -INFINITY, length_max = 0;
    for (const Rollout& r : rollouts) {
      sums[kN] += 1, sums[kReward] += r.reward, sums[kReward2] += r.reward * r.reward;
      sums[kLen] += double(r.response.size()), sums[kTrunc] += r.truncated, sums[kShaped] += r.shaped;
      for (size_t t = 0; t < r.terms.size(); ++t) sums[kFixed + term_base[r.domain] + t] += r.terms[t];
      sums[kDomain + 2 * r.domain] += 1, sums[kDomain + 2 * r.domain + 1] += r.reward;
      reward_max = std::max(reward_max, r.reward), neg_reward_min = std::max(neg_reward_min, -r.reward);
      length_max = std::max(length_max, double(r.response.size()));
    }
    std::vector<double> maxes = {reward_max, neg_reward_min, length_max, mismatch_max, distill_stats.divergence_max};
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
    const double n = sums[kN], reward_mean = sums[kReward] / n;
    const double reward_std =
        n > 1 ? std::sqrt(std::max(0.0, (sums[kReward2] - n * reward_mean * reward_mean) / (n - 1))) : 0;
    const double tokens = sums[kTok], per_update = double(cfg.epochs * M);
    auto frac = [&](size_t k) { return json_number(tokens > 0 ? sums[k] / tokens : 0.0); };
    const double step_time = now_seconds() - t0;
    const int64_t done = step + 1;
    const bool last = done == cfg.steps;
    const bool eval_now = have_eval && ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || last);
    const std::string eval_fields = eval_now ? evaluate(done) : std::string();
    if (writer) {
      std::string line = cat("{\"step\": ", done, ", \"lr\": ", json_number(lr), ", \"reward_mean\": ",
                             json_number(reward_mean), ", \"reward_std\": ", json_number(reward_std),
                             ", \"reward_min\": ", json_number(-maxes[1]), ", \"reward_max\": ", json_number(maxes[0]));
      for (size_t t = 0; t < term_keys.size(); ++t) {  // mean over the responses of the term's domain
        const double count = sums[kDomain + 2 * term_domain[t]];
        line += cat(", \"reward/", term_keys[t], "\": ", json_number(count > 0 ? sums[kFixed + t] / count : NAN));
      }
      if (multi)
        for (size_t d = 0; d < n_domains; ++d)
          line += cat(", \"reward/", cfg.domains[d].name, "\": ",
                      json_number(sums[kDomain + 2 * d] > 0 ? sums[kDomain + 2 * d + 1] / sums[kDomain + 2 * d] : NAN));
      if (cfg.overlong_buffer > 0) line += cat(", \"reward_shaped_mean\": ", json_number(sums[kShaped] / n));
      if (!opd) line += cat(", \"frac_reward_zero_std\": ", json_number(sums[kZeroStd] / sums[kGroups]));
      if (cfg.dynamic_sampling) line += cat(", \"kept_groups\": ", int64_t(sums[kKept]));
      line += cat(", \"response_length_mean\": ", json_number(sums[kLen] / n), ", \"response_length_max\": ",
                  json_number(maxes[2]), ", \"frac_truncated\": ", json_number(sums[kTrunc] / n));
      if (opd) {
        line += cat(", \"loss\": ", json_number(sums[kDistill] / per_update), ", \"distill_divergence\": ",
                    json_number(sums[kDivN] > 0 ? sums[kDiv] / sums[kDivN] : NAN), ", \"distill_divergence_max\": ",
                    json_number(maxes[4]));
      } else {
        line += cat(", \"pg_loss\": ", json_number(sums[kPg] / per_update),
                    ", \"kl\": ", ref_ptr ? json_number(tokens > 0 ? sums[kKl] / tokens : NAN) : std::string("null"),
                    ", \"loss\": ", json_number((sums[kPg] + cfg.loss.beta * sums[kKlLoss]) / per_update),
                    ", \"clip_frac_low\": ", frac(kClipLo), ", \"clip_frac_high\": ", frac(kClipHi),
                    ", \"dual_clip_frac\": ", frac(kDual),
                    ", \"ratio_mean\": ", json_number(tokens > 0 ? sums[kRatio] / tokens : NAN));
      }
      line += cat(", \"entropy\": ", json_number(sums[kEnt] / sums[kEntN]), ", \"grad_norm\": ", json_number(grad_norm),
                  ", \"logprob_mismatch\": ", json_number(sums[kMis] / sums[kMisN]),
                  ", \"logprob_mismatch_max\": ", json_number(maxes[3]),
                  ", \"rollout_tokens_per_s\": ", json_number(sums[kRollTok] / t_rollout),
                  ", \"train_tokens_per_s\": ", json_number(sums[kTrainTok] / t_update),
                  ", \"time_rollout_s\": ", json_number(t_rollout), ", \"time_logprobs_s\": ", json_number(t_logp),
                  ", \"time_update_s\": ", json_number(t_update), ", \"step_time_s\": ", json_number(step_time),
                  ", \"elapsed_s\": ", json_number(now_seconds() - t_start));
      metrics << line << eval_fields << "}\n" << std::flush;
    }
    if (done % cfg.log_every == 0 || last) {
      char buf[320];
      if (opd)
        std::snprintf(buf, sizeof buf,
                      "step %4lld/%lld | reward %.3f (std %.3f) | len %.1f | divergence %.4f | mismatch %.4f | "
                      "gnorm %.3f | %.1fs (rollout %.1fs)",
                      (long long)done, (long long)cfg.steps, reward_mean, reward_std, sums[kLen] / n,
                      sums[kDivN] > 0 ? sums[kDiv] / sums[kDivN] : 0.0, sums[kMis] / sums[kMisN], grad_norm, step_time,
                      t_rollout);
      else
        std::snprintf(buf, sizeof buf,
                      "step %4lld/%lld | reward %.3f (std %.3f) | len %.1f | pg %.4f | clip %.3f | mismatch %.4f | "
                      "gnorm %.3f | %.1fs (rollout %.1fs)",
                      (long long)done, (long long)cfg.steps, reward_mean, reward_std, sums[kLen] / n,
                      sums[kPg] / per_update, tokens > 0 ? (sums[kClipLo] + sums[kClipHi]) / tokens : 0.0,
                      sums[kMis] / sums[kMisN], grad_norm, step_time, t_rollout);
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
