// Rule-based rewards (spec/post-training.md §5): a registry of verifiers by name and their weighted sums.
// A verifier only parses text; nothing here ever executes model output.
//
// The response is the decoded text of the generated tokens, i.e. what follows the generation prompt
// (data/chat.h encode_prompt): in thinking modes the prompt ends with "<think>", so a well-formed response is
// "{reasoning}</think>{answer}" optionally followed by the EOS string; in non-thinking mode it is
// "</think>{answer}" (+ EOS). Prompts without the chat template (plain completion) are non-thinking.
//
// The ANSWER TEXT that answer rewards read (answer_text below):
//   1. everything from the first EOS string on is dropped (nothing after EOS is part of the response);
//   2. if the response contains "</think>", the text after the LAST "</think>";
//      otherwise, in thinking modes: empty (the model never closed its reasoning, so it gave no answer);
//      in non-thinking mode: the whole response (a model that omits the leading "</think>" still answers).
// So numbers in the reasoning never count as the answer.
//
// The rewards (each returns a value in [0, 1]):
//   arithmetic  1 if last_integer(answer text) equals the prompt's integer answer, else 0. "15" never matches
//               "5" (whole numbers, not substrings); "3.5" is no integer; no number -> 0.
//   gsm8k       if the answer text contains "####": the text after the last "####" up to the end of its line
//               (extract_gsm8k_answer: commas stripped), with an optional leading '$' and trailing '.', must be
//               exactly one integer ("-?digits", optional ".000") equal to the reference; otherwise
//               (no "####") the last integer of the answer text must equal it. Reference: the prompt's answer,
//               which must be an integer (GSM8K's are).
//   countdown   the candidate is the last non-empty line of the answer text, trimmed. 1.0 if it evaluates
//               (data/prompts.h evaluate_countdown: each listed number at most once, exact integer arithmetic)
//               to the target; 0.1 if it only has the format: non-empty, <= 200 characters, matches
//               ^[0-9+\-*/() ]+$ and holds a digit; 0 otherwise (words, "=", code, empty).
//   format      1 if the response follows the chat format of its mode, else 0:
//               thinking:      R "</think>" A [EOS]  with R non-blank and free of "<think>"/"</think>"
//               non-thinking:  "</think>" A [EOS]    (the response starts with "</think>")
//               and in both, A is non-blank and contains neither "<think>", "</think>" nor "<｜" (the start of
//               every other V4 special string: BOS, EOS, role markers, pad, and the DSML tool-call tags, so a
//               tool-call block fails this math-oriented format). The EOS string may end the response once;
//               a response without it (truncated) is not penalised here: truncation masking and overlong
//               shaping handle length.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "data/chat.h"
#include "data/prompts.h"

namespace tessera::rl {

struct RewardContext {
  ReasoningMode mode = ReasoningMode::non_thinking;
};

// One reward function: (prompt, decoded response, context) -> score.
using RewardFn = std::function<double(const Prompt&, std::string_view, const RewardContext&)>;

// The known reward names, sorted: arithmetic, countdown, format, gsm8k.
std::vector<std::string> reward_names();
// The reward called `name`; tessera::Error "reward 'x': unknown; known: arithmetic, countdown, format, gsm8k".
RewardFn find_reward(const std::string& name);

// The text the answer rewards read (see the top of this file).
std::string answer_text(std::string_view response, ReasoningMode mode);

// The individual verifiers (what the registry returns).
double arithmetic_reward(const Prompt& p, std::string_view response, const RewardContext& ctx);
double gsm8k_reward(const Prompt& p, std::string_view response, const RewardContext& ctx);
double countdown_reward(const Prompt& p, std::string_view response, const RewardContext& ctx);
double format_reward(const Prompt& p, std::string_view response, const RewardContext& ctx);

// A recipe's `rewards = [{name = "arithmetic", weight = 1.0}, {name = "format", weight = 0.1}]`.
struct RewardTerm {
  std::string name;
  double weight = 1.0;
};

// "name" (weight 1) or "name:weight" (the recipe's `rewards.terms` entries and --reward on the command line);
// tessera::Error naming the text otherwise. The name is resolved later (CompositeReward).
RewardTerm parse_reward_term(const std::string& text);

struct RewardScore {
  double total = 0;           // sum of weight * value
  std::vector<double> terms;  // each term's unweighted value, in the order of the terms (per-reward metrics)
};

// A weighted sum of registered rewards. The constructor resolves every name (unknown names are the error
// above) and checks the list is non-empty, names are not repeated and weights are finite.
class CompositeReward {
 public:
  explicit CompositeReward(std::vector<RewardTerm> terms);
  RewardScore score(const Prompt& p, std::string_view response, const RewardContext& ctx) const;
  const std::vector<RewardTerm>& terms() const { return terms_; }

 private:
  std::vector<RewardTerm> terms_;
  std::vector<RewardFn> fns_;
};

}  // namespace tessera::rl
