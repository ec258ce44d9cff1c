#include "rl/evaluate.h"

#include "core/error.h"
#include "core/rng.h"
#include "parallel/communicator.h"
#include "rl/generate.h"

namespace tessera::rl {

std::vector<int32_t> prompt_tokens(const Tokenizer& tok, const Prompt& p, ReasoningMode mode) {
  ChatMessage user;
  user.role = "user";
  user.content = p.question;
  return encode_prompt(tok, {user}, mode);
}

uint64_t eval_request_seed(uint64_t seed, int64_t prompt_index, int64_t sample) {
  auto w = philox4x32(seed, stream_id("eval-rewards", uint64_t(sample)), uint64_t(prompt_index));
  return (uint64_t(w[0]) << 32) | w[1];
}

RewardEvalResult evaluate_rewards(Model& model, const Tokenizer& tok, const std::vector<Prompt>& prompts,
                                  const CompositeReward& reward, const RewardEvalOptions& opt, Communicator* dp) {
  if (prompts.empty()) TS_FAIL("evaluate_rewards: the prompt set is empty");
  if (opt.samples_per_prompt < 1) TS_FAIL("evaluate_rewards: samples_per_prompt must be >= 1, got ", opt.samples_per_prompt);
  if (opt.max_new_tokens < 1) TS_FAIL("evaluate_rewards: max_new_tokens must be >= 1, got ", opt.max_new_tokens);
  const int64_t rank = dp ? dp->rank() : 0, size = dp ? dp->size() : 1;
  const int32_t eos = tok.eos_id();

  std::vector<GenerationRequest> reqs;
  std::vector<int64_t> owner;  // prompt index of each request
  for (int64_t i = rank; i < int64_t(prompts.size()); i += size) {
    std::vector<int32_t> ids = prompt_tokens(tok, prompts[i], opt.mode);
    for (int64_t s = 0; s < opt.samples_per_prompt; ++s) {
      GenerationRequest r;
      r.prompt = ids;
      r.max_new_tokens = opt.max_new_tokens;
      r.stop_tokens = {eos};
      r.temperature = opt.temperature;
      r.top_p = opt.top_p;
      r.top_k = opt.top_k;
      r.seed = eval_request_seed(opt.seed, i, s);
      reqs.push_back(std::move(r));
      owner.push_back(i);
    }
  }
  GenerateOptions gopt;
  gopt.max_batch = opt.max_batch;
  std::vector<GenerationResult> outs;
  if (!reqs.empty()) outs = generate(model, reqs, gopt);

  // Sums: responses, total reward, response length, truncated, then one per term.
  const size_t n_terms = reward.terms().size();
  Tensor sums = Tensor::zeros({int64_t(4 + n_terms)}, DType::f64, Device::cpu);
  double* s = sums.data<double>();
  const RewardContext ctx{opt.mode};
  for (size_t k = 0; k < outs.size(); ++k) {
    const GenerationResult& g = outs[k];
    RewardScore sc = reward.score(prompts[owner[k]], tok.decode(g.tokens), ctx);
    s[0] += 1;
    s[1] += sc.total;
    s[2] += double(g.tokens.size());
    s[3] += g.finish == FinishReason::length ? 1 : 0;
    for (size_t t = 0; t < n_terms; ++t) s[4 + t] += sc.terms[t];
  }
  if (dp && size > 1) {
    if (dp->device() == Device::cpu) {
      dp->all_reduce(sums, ReduceOp::sum);
    } else {
      Tensor d = sums.to_device(dp->device());
      dp->all_reduce(d, ReduceOp::sum);
      sums.copy_from(d);
    }
  }
  RewardEvalResult r;
  const double n = s[0];
  r.responses = int64_t(n);
  TS_CHECK(r.responses == int64_t(prompts.size()) * opt.samples_per_prompt, "evaluate_rewards: ", r.responses,
           " responses for ", prompts.size(), " prompts");
  r.reward_mean = s[1] / n;
  r.response_length_mean = s[2] / n;
  r.frac_truncated = s[3] / n;
  for (size_t t = 0; t < n_terms; ++t) r.term_means.push_back(s[4 + t] / n);
  return r;
}

}  // namespace tessera::rl
