// Held-out reward evaluation (rl/evaluate.h) on a hand-built dense model whose greedy (and, with a large head, its
// temperature-1) output is known: every layer is zeroed, so the residual stream is the current token's embedding,
// and embeddings are one-hot over a few "states" whose head rows name the next token. The model is then a bigram
// automaton: <｜Assistant｜> -> "</think>" -> "4" -> "2" -> EOS, and in thinking modes <think> -> "x" -> "</think>".
// The reward means, lengths and truncation are checked against hand-computed values, and a data-parallel split over
// an in-process two-rank communicator (two threads) gives the one-process result.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "data/byte_tokenizer.h"
#include "model/dense.h"
#include "ops/ops.h"
#include "parallel/communicator.h"
#include "rl/evaluate.h"
#include "rl/generate.h"
#include "tests/unit/test_util.h"

using namespace tessera;
using namespace tessera::rl;

namespace {

constexpr int64_t kDim = 8;

// The bigram automaton described at the top of the file. Tokens not listed go to state 0, which emits "9".
std::unique_ptr<DenseModel> automaton_model(const Tokenizer& tok) {
  ModelConfig c;
  c.vocab_size = tok.vocab_size();
  c.dim = kDim;
  c.n_layers = 1;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.ffn_dim = 8;
  c.max_seq_len = 64;
  c.init_std = 0.3;
  auto m = std::make_unique<DenseModel>(c);
  m->init(1);
  const int32_t asst = tok.special_id(kAssistantToken), end_think = tok.special_id(kEndThinkToken),
                think = tok.special_id(kThinkToken), eos = tok.eos_id();
  // state of each token (its embedding's one-hot dim) and the token each state emits
  std::vector<std::pair<int32_t, int>> state = {{asst, 1}, {end_think, 2}, {'4', 3}, {'2', 4}, {think, 5}, {'x', 6}, {eos, 7}};
  std::vector<std::pair<int, int32_t>> emits = {{0, '9'}, {1, end_think}, {2, '4'}, {3, '2'}, {4, eos}, {5, 'x'}, {6, end_think}, {7, '9'}};
  for (Param* p : m->params()) {
    if (p->name.rfind("layers.", 0) == 0) ops::fill(p->value, 0.0);
  }
  for (Param* p : m->params()) {
    float* w = p->value.data<float>();
    if (p->name == "tok_embeddings") {
      ops::fill(p->value, 0.0);
      for (int64_t v = 0; v < c.vocab_size; ++v) w[v * kDim + 0] = 1;
      for (auto [t, s] : state) w[t * kDim + 0] = 0, w[t * kDim + s] = 1;
    } else if (p->name == "norm") {
      ops::fill(p->value, 1.0);
    } else if (p->name == "output") {
      ops::fill(p->value, 0.0);
      // logit gap 50 * sqrt(kDim) ~ 141: temperature-1 sampling is as deterministic as greedy
      for (auto [s, t] : emits) w[t * kDim + s] = 50;
    }
  }
  return m;
}

Prompt prompt(const std::string& q, const std::string& answer) {
  Prompt p;
  p.id = q;
  p.task = "arithmetic";
  p.question = q;
  p.answer = answer;
  return p;
}

// Two answers are "42" (what the model always says), one is not.
std::vector<Prompt> prompts3() {
  return {prompt("What is 6 * 7?", "42"), prompt("What is 40 + 2?", "42"), prompt("What is 3 + 4?", "7")};
}

CompositeReward arith_format() { return CompositeReward({{"arithmetic", 1.0}, {"format", 0.5}}); }

// An in-process group of `size` ranks, one thread each: all_reduce (sum of f64) and barrier only.
struct ThreadGroup {
  std::mutex mu;
  std::condition_variable cv;
  int size;
  int arrived = 0;
  int64_t generation = 0;
  std::vector<double> acc, result;
  explicit ThreadGroup(int n) : size(n) {}
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(ThreadGroup* g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->size; }
  Device device() const override { return Device::cpu; }
  const char* backend() const override { return "threads"; }
  void all_reduce(const Tensor& t, ReduceOp op) override {
    TS_CHECK(op == ReduceOp::sum && t.dtype() == DType::f64, "ThreadComm: f64 sums only");
    stats_.all_reduce.calls++;
    double* x = t.data<double>();
    const int64_t n = t.numel();
    std::unique_lock<std::mutex> lock(g_->mu);
    if (g_->arrived == 0) g_->acc.assign(n, 0.0);
    TS_CHECK(int64_t(g_->acc.size()) == n, "ThreadComm: sizes differ");
    for (int64_t i = 0; i < n; ++i) g_->acc[i] += x[i];
    const int64_t gen = g_->generation;
    if (++g_->arrived == g_->size) {
      g_->result = g_->acc;
      g_->arrived = 0;
      g_->generation++;
      g_->cv.notify_all();
    } else {
      g_->cv.wait(lock, [&] { return g_->generation != gen; });
    }
    for (int64_t i = 0; i < n; ++i) x[i] = g_->result[i];
  }
  void barrier() override {
    Tensor t = Tensor::zeros({1}, DType::f64, Device::cpu);
    all_reduce(t, ReduceOp::sum);
  }
  void reduce_scatter(const Tensor&, const Tensor&, ReduceOp) override { TS_FAIL("ThreadComm: no reduce_scatter"); }
  void all_gather(const Tensor&, const Tensor&) override { TS_FAIL("ThreadComm: no all_gather"); }
  void all_to_all_v(const Tensor&, const std::vector<int64_t>&, const Tensor&, const std::vector<int64_t>&) override {
    TS_FAIL("ThreadComm: no all_to_all_v");
  }
  void send(const Tensor&, int) override { TS_FAIL("ThreadComm: no send"); }
  void recv(const Tensor&, int) override { TS_FAIL("ThreadComm: no recv"); }
  void send_recv(const Tensor&, int, const Tensor&, int) override { TS_FAIL("ThreadComm: no send_recv"); }
  void broadcast(const Tensor&, int) override { TS_FAIL("ThreadComm: no broadcast"); }
  std::unique_ptr<Communicator> split(int, int) override { TS_FAIL("ThreadComm: no split"); }

 private:
  ThreadGroup* g_;
  int rank_;
};

void expect_same(const RewardEvalResult& a, const RewardEvalResult& b) {
  EXPECT_EQ(a.responses, b.responses);
  EXPECT_DOUBLE_EQ(a.reward_mean, b.reward_mean);
  ASSERT_EQ(a.term_means.size(), b.term_means.size());
  for (size_t i = 0; i < a.term_means.size(); ++i) EXPECT_DOUBLE_EQ(a.term_means[i], b.term_means[i]);
  EXPECT_DOUBLE_EQ(a.response_length_mean, b.response_length_mean);
  EXPECT_DOUBLE_EQ(a.frac_truncated, b.frac_truncated);
}

}  // namespace

TEST(EvaluateRewards, PromptTokensAreTheChatGenerationPrompt) {
  ByteTokenizer tok;
  Prompt p = prompt("What is 1 + 1?", "2");
  std::vector<int32_t> ids = prompt_tokens(tok, p, ReasoningMode::non_thinking);
  EXPECT_EQ(ids, encode_prompt(tok, {ChatMessage{"user", p.question, "", {}}}, ReasoningMode::non_thinking));
  EXPECT_EQ(ids.back(), tok.special_id(kAssistantToken));
  EXPECT_EQ(prompt_tokens(tok, p, ReasoningMode::think_high).back(), tok.special_id(kThinkToken));
}

TEST(EvaluateRewards, TheAutomatonSaysFortyTwo) {
  ByteTokenizer tok;
  auto m = automaton_model(tok);
  GenerationRequest r;
  r.prompt = prompt_tokens(tok, prompts3()[2], ReasoningMode::non_thinking);
  r.max_new_tokens = 10;
  r.stop_tokens = {tok.eos_id()};
  r.temperature = 0;
  std::vector<GenerationResult> g = generate(*m, {r});
  EXPECT_EQ(tok.decode(g[0].tokens), std::string(kEndThinkToken) + "42" + kEosToken);
  EXPECT_EQ(g[0].finish, FinishReason::stop);
}

TEST(EvaluateRewards, GreedyMeansMatchHandComputedValues) {
  ByteTokenizer tok;
  auto m = automaton_model(tok);
  RewardEvalOptions o;
  o.max_new_tokens = 8;
  // "</think>42<EOS>": 4 tokens, stopped; 2 of 3 answers are 42; the format holds.
  RewardEvalResult r = evaluate_rewards(*m, tok, prompts3(), arith_format(), o);
  EXPECT_EQ(r.responses, 3);
  ASSERT_EQ(r.term_means.size(), 2u);
  EXPECT_DOUBLE_EQ(r.term_means[0], 2.0 / 3);
  EXPECT_DOUBLE_EQ(r.term_means[1], 1.0);
  EXPECT_DOUBLE_EQ(r.reward_mean, (1.5 + 1.5 + 0.5) / 3);
  EXPECT_DOUBLE_EQ(r.response_length_mean, 4.0);
  EXPECT_DOUBLE_EQ(r.frac_truncated, 0.0);

  // 3 tokens: "</think>42" is truncated (finish == length) but still answers 42.
  o.max_new_tokens = 3;
  r = evaluate_rewards(*m, tok, prompts3(), arith_format(), o);
  EXPECT_DOUBLE_EQ(r.term_means[0], 2.0 / 3);
  EXPECT_DOUBLE_EQ(r.response_length_mean, 3.0);
  EXPECT_DOUBLE_EQ(r.frac_truncated, 1.0);

  // 2 tokens: "</think>4" answers 4, right for none.
  o.max_new_tokens = 2;
  r = evaluate_rewards(*m, tok, prompts3(), arith_format(), o);
  EXPECT_DOUBLE_EQ(r.term_means[0], 0.0);
  EXPECT_DOUBLE_EQ(r.term_means[1], 1.0);
  EXPECT_DOUBLE_EQ(r.reward_mean, 0.5);
  EXPECT_DOUBLE_EQ(r.response_length_mean, 2.0);
  EXPECT_DOUBLE_EQ(r.frac_truncated, 1.0);
}

TEST(EvaluateRewards, ThinkingModeAndSamples) {
  ByteTokenizer tok;
  auto m = automaton_model(tok);
  RewardEvalOptions o;
  o.max_new_tokens = 8;
  o.mode = ReasoningMode::think_high;
  // "x</think>42<EOS>": 5 tokens; reasoning "x" is non-blank, so the thinking format holds.
  RewardEvalResult r = evaluate_rewards(*m, tok, prompts3(), arith_format(), o);
  EXPECT_DOUBLE_EQ(r.term_means[0], 2.0 / 3);
  EXPECT_DOUBLE_EQ(r.term_means[1], 1.0);
  EXPECT_DOUBLE_EQ(r.response_length_mean, 5.0);
  // Three samples per prompt at temperature 1 (the head's margin makes them all the automaton's answer).
  CompositeReward arith({{"arithmetic", 1.0}});
  o.samples_per_prompt = 3;
  o.temperature = 1.0;
  o.seed = 5;
  r = evaluate_rewards(*m, tok, prompts3(), arith, o);
  EXPECT_EQ(r.responses, 9);
  EXPECT_DOUBLE_EQ(r.reward_mean, 2.0 / 3);
  ASSERT_EQ(r.term_means.size(), 1u);
  EXPECT_DOUBLE_EQ(r.response_length_mean, 5.0);
}

TEST(EvaluateRewards, RequestSeedsAreDistinctAndStable) {
  EXPECT_EQ(eval_request_seed(1, 2, 3), eval_request_seed(1, 2, 3));
  EXPECT_NE(eval_request_seed(1, 2, 3), eval_request_seed(1, 2, 4));
  EXPECT_NE(eval_request_seed(1, 2, 3), eval_request_seed(1, 3, 3));
  EXPECT_NE(eval_request_seed(1, 2, 3), eval_request_seed(2, 2, 3));
}

TEST(EvaluateRewards, DataParallelSplitGivesTheOneProcessResult) {
  ByteTokenizer tok;
  // Five prompts (an uneven split over two ranks), two samples each, sampled at temperature 1 from a randomly
  // initialised model (varied lengths and truncation), so the split must keep each request's seed.
  ModelConfig c;
  c.vocab_size = tok.vocab_size();
  c.dim = 16;
  c.n_layers = 1;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.ffn_dim = 16;
  c.max_seq_len = 64;
  c.init_std = 1.0;
  std::vector<Prompt> ps = prompts3();
  ps.push_back(prompt("What is 9 - 2?", "7"));
  ps.push_back(prompt("What is 1 + 0?", "1"));
  RewardEvalOptions o;
  o.max_new_tokens = 12;
  o.temperature = 1.0;
  o.samples_per_prompt = 2;
  o.seed = 11;
  o.max_batch = 3;
  CompositeReward rw({{"arithmetic", 1.0}, {"format", 0.25}});
  DenseModel single(c);
  single.init(7);
  RewardEvalResult one = evaluate_rewards(single, tok, ps, rw, o);
  EXPECT_EQ(one.responses, 10);
  EXPECT_GT(one.response_length_mean, 0.0);

  // Rank 0 and rank 1, each with its own copy of the model.
  ThreadGroup group(2);
  std::vector<RewardEvalResult> res(2);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        DenseModel m(c);
        m.init(7);
        ThreadComm comm(&group, rank);
        res[rank] = evaluate_rewards(m, tok, ps, rw, o, &comm);
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors[0], "");
  EXPECT_EQ(errors[1], "");
  expect_same(res[0], one);
  expect_same(res[1], one);

  // A one-rank group is the plain call.
  ThreadGroup solo(1);
  ThreadComm comm1(&solo, 0);
  expect_same(evaluate_rewards(single, tok, ps, rw, o, &comm1), one);
}

TEST(EvaluateRewards, BadArgumentsAreErrors) {
  ByteTokenizer tok;
  auto m = automaton_model(tok);
  RewardEvalOptions o;
  EXPECT_NE(tessera::testing::error_of([&] { evaluate_rewards(*m, tok, {}, arith_format(), o); }).find("empty"),
            std::string::npos);
  o.samples_per_prompt = 0;
  EXPECT_NE(tessera::testing::error_of([&] { evaluate_rewards(*m, tok, prompts3(), arith_format(), o); })
                .find("samples_per_prompt"),
            std::string::npos);
}
