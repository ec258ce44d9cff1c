// Prompt sets for RL with verifiable rewards: GSM8K from JSONL, seeded synthetic tasks, and the pure answer
// checkers the rewards use (post-training spec §5). Nothing here executes model output.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

struct Prompt {
  std::string id;
  std::string task;  // "gsm8k", "arithmetic", "countdown", "digits"
  std::string question;
  std::string answer;            // reference final answer, normalised (countdown: one valid expression)
  std::string solution;          // full reference text if any (GSM8K's worked answer)
  std::vector<int64_t> numbers;  // countdown inputs
  int64_t target = 0;            // countdown target

  friend bool operator==(const Prompt&, const Prompt&) = default;
};

// One JSON object per line, either GSM8K's {"question", "answer": "...#### 72"} (task "gsm8k", answer = the
// text after the last "####", trimmed, commas removed; solution = the whole answer text) or the generated
// format written below (recognised by its "task" key; answer kept verbatim). Lines without "id" get
// "<file stem>:<line>". Blank lines are skipped. Errors name the file and the 1-based line.
std::vector<Prompt> load_prompts_jsonl(const std::string& path);

// Writes the generated format {"id", "task", "question", "answer"[, "solution"][, "numbers", "target"]},
// atomically (temporary file, then rename), so generate -> write -> load round-trips.
void write_prompts_jsonl(const std::string& path, const std::vector<Prompt>& prompts);

// The same prompts as SFT conversations for `tessera data prepare --format chat`: one
// {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]} per line, the
// reply being the reference solution when there is one (GSM8K's worked answer), else the answer. Atomic.
void write_sft_chat_jsonl(const std::string& path, const std::vector<Prompt>& prompts);

// Generators are pure functions of (n, seed, parameters): prompt i uses its own block of Philox indices, so
// prompt i is the same whatever n is.

// "What is 37 + 58?" with +, - or * on two `digits`-digit operands (1..9); answer: the exact integer.
std::vector<Prompt> generate_arithmetic(int64_t n, uint64_t seed, int digits = 2);

// n_numbers (2..6) numbers in [1, max_number] and a target built by combining all of them at random with
// + - * / (larger minus smaller, exact division only, every intermediate in [1, 10 * max_number]), so each
// prompt is solvable; answer: that expression.
std::vector<Prompt> generate_countdown(int64_t n, uint64_t seed, int n_numbers = 4, int64_t max_number = 100);

// Sequence completion: `len` (>= 2) terms of an arithmetic progression (start 0..99, step 1..9), stated as
// such in the question; answer: the next term, which the stated rule makes unambiguous.
std::vector<Prompt> generate_digit_completion(int64_t n, uint64_t seed, int len = 4);

// The text after the last "####", up to the end of that line, trimmed and with commas removed; none if there
// is no "####" or nothing follows it.
std::optional<std::string> extract_gsm8k_answer(std::string_view text);

// The last number in text, normalised ("-1,234" -> "-1234", "007" -> "7", "12.00" -> "12"); none if there is
// no number or the last one has a non-zero fractional part (so "3.5" never matches "5"). A '-' directly
// before the digits is a sign unless it follows a letter, digit or ')' (so "10-3" ends in 3).
std::optional<std::string> last_integer(std::string_view text);

// Value of a countdown expression over ^[0-9+\-*/() ]+$ with + - * / and parentheses (no unary minus), in
// exact integer arithmetic; each literal must be an unused entry of `numbers` (multiset: each at most once,
// not all required). None for anything else: other characters, malformed or over-long (> 200 chars) input,
// inexact division or division by zero, overflow.
std::optional<int64_t> evaluate_countdown(const std::string& expr, const std::vector<int64_t>& numbers);

}  // namespace tessera
