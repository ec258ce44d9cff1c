// Rule-based rewards (rl/rewards.h): correct, incorrect, format-only and adversarial responses for every
// reward, the answer-text rule in both reasoning modes, weighted combinations, and the unknown-name error.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "rl/rewards.h"
#include "test_util.h"

using namespace tessera;
using namespace tessera::rl;
using tessera::testing::error_of;

namespace {

const std::string EOS = kEosToken;
const RewardContext plain{ReasoningMode::non_thinking};
const RewardContext think{ReasoningMode::think_high};

Prompt answer_prompt(const std::string& task, const std::string& answer) {
  return Prompt{.id = task + "-0", .task = task, .question = std::string(1, 'q'), .answer = answer,
                .solution = {}, .numbers = {}, .target = 0};
}

Prompt countdown_prompt() {
  Prompt p;
  p.id = "countdown-0";
  p.task = "countdown";
  p.numbers = {3, 8, 4, 100};
  p.target = 36;
  p.answer = "(100 - 4) / 8 * 3";  // worked by hand: 96 / 8 = 12, * 3 = 36
  return p;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(Rewards, AnswerText) {
  EXPECT_EQ(answer_text("</think>42", plain.mode), "42");
  EXPECT_EQ(answer_text("42", plain.mode), "42");                      // no </think>: the whole response
  EXPECT_EQ(answer_text("I think 41", think.mode), "");                // thinking, never closed: no answer
  EXPECT_EQ(answer_text("a</think>b</think>42", think.mode), "42");    // after the last </think>
  EXPECT_EQ(answer_text("r</think>42" + EOS + "99", think.mode), "42");  // nothing after EOS counts
  EXPECT_EQ(answer_text(EOS + "</think>42", plain.mode), "");
}

TEST(Rewards, Arithmetic) {
  const Prompt p = answer_prompt("arithmetic", "5");
  auto r = [&](const std::string& s, const RewardContext& c = plain) { return arithmetic_reward(p, s, c); };
  EXPECT_EQ(r("5"), 1.0);
  EXPECT_EQ(r("</think>The answer is 5." + EOS), 1.0);
  EXPECT_EQ(r("2 + 3 = 5"), 1.0);
  EXPECT_EQ(r("5.00"), 1.0);
  EXPECT_EQ(r("15"), 0.0);        // substring trap: "5" inside "15"
  EXPECT_EQ(r("5 or 6"), 0.0);    // the last integer decides
  EXPECT_EQ(r("5.5"), 0.0);       // not an integer
  EXPECT_EQ(r("-5"), 0.0);
  EXPECT_EQ(r("50"), 0.0);
  EXPECT_EQ(r(""), 0.0);          // empty answer
  EXPECT_EQ(r("   "), 0.0);
  EXPECT_EQ(r("five"), 0.0);
  EXPECT_EQ(r("__import__('os').system('rm -rf /')"), 0.0);
  EXPECT_EQ(r(EOS + "5"), 0.0);   // after EOS is not the response
  // Thinking: only the text after </think> counts.
  EXPECT_EQ(r("2 plus 3 is 5</think>5", think), 1.0);
  EXPECT_EQ(r("it is 5</think>I don't know", think), 0.0);
  EXPECT_EQ(r("it is 5", think), 0.0);  // never closed the reasoning
  // Negative answers; "10-12" ends in 12, not -12.
  const Prompt n = answer_prompt("arithmetic", "-12");
  EXPECT_EQ(arithmetic_reward(n, "It is -12.", plain), 1.0);
  EXPECT_EQ(arithmetic_reward(n, "10-12", plain), 0.0);
  EXPECT_EQ(arithmetic_reward(n, "12", plain), 0.0);
  // A prompt whose answer is no integer is a data error naming the prompt.
  const Prompt bad = answer_prompt("arithmetic", "3.5");
  EXPECT_TRUE(has(error_of([&] { arithmetic_reward(bad, "3", plain); }), "arithmetic-0"));
}

TEST(Rewards, Gsm8k) {
  const Prompt p = answer_prompt("gsm8k", "1072");
  auto r = [&](const std::string& s, const RewardContext& c = plain) { return gsm8k_reward(p, s, c); };
  EXPECT_EQ(r("She has 1000 + 72 = 1072 dollars.\n#### 1072"), 1.0);
  EXPECT_EQ(r("#### 1,072"), 1.0);  // commas stripped
  EXPECT_EQ(r("#### $1072."), 1.0);
  EXPECT_EQ(r("#### 1072.00"), 1.0);
  EXPECT_EQ(r("#### 1072\nthat is all, 5"), 1.0);  // the "####" line, not the last number
  EXPECT_EQ(r("The answer is 1072."), 1.0);         // no "####": the last integer
  EXPECT_EQ(r("reasoning 7</think>#### 1072", think), 1.0);
  EXPECT_EQ(r("#### 1072 dollars"), 0.0);           // after "####" there must be one number only
  EXPECT_EQ(r("#### 10723"), 0.0);
  EXPECT_EQ(r("#### 01072"), 1.0);                  // leading zeros normalise
  EXPECT_EQ(r("#### 107"), 0.0);                    // prefix trap
  EXPECT_EQ(r("#### 21072"), 0.0);                  // suffix trap
  EXPECT_EQ(r("1072\n#### 1071"), 0.0);             // the marked answer wins
  EXPECT_EQ(r("#### -1072"), 0.0);
  EXPECT_EQ(r("#### "), 0.0);                       // empty answer
  EXPECT_EQ(r("####"), 0.0);
  EXPECT_EQ(r(""), 0.0);
  EXPECT_EQ(r("#### 1072 or #### 5"), 0.0);
  EXPECT_EQ(r("1072</think>no idea", think), 0.0);
  EXPECT_EQ(r("import os; os.system('echo')"), 0.0);
}

TEST(Rewards, Countdown) {
  const Prompt p = countdown_prompt();
  auto r = [&](const std::string& s, const RewardContext& c = plain) { return countdown_reward(p, s, c); };
  EXPECT_EQ(r("(100 - 4) / 8 * 3"), 1.0);
  EXPECT_EQ(r("</think>(100-4)/8*3" + EOS), 1.0);
  EXPECT_EQ(r("Let me see.\n(100 - 4) / 8 * 3\n\n"), 1.0);  // the last non-empty line
  EXPECT_EQ(r("try 3 + 8\n</think>\n(100 - 4) / 8 * 3", think), 1.0);
  EXPECT_EQ(r("3 * (8 + 4)"), 1.0);  // 36 from a subset: each number at most once
  // Format only (0.1): the right alphabet, but not a valid expression reaching the target.
  EXPECT_EQ(r("3 + 8 * 4"), 0.1);   // 35
  EXPECT_EQ(r("3 + 3 * 11"), 0.1);  // 3 reused, 11 not given
  EXPECT_EQ(r("36"), 0.1);          // 36 is not one of the numbers
  EXPECT_EQ(r("(100 - 4"), 0.1);    // malformed
  EXPECT_EQ(r("8 / 3"), 0.1);       // inexact division
  // Nothing (0).
  EXPECT_EQ(r("(100 - 4) / 8 * 3 = 36"), 0.0);  // '=' is outside the alphabet
  EXPECT_EQ(r("(100 - 4) / 8 * 3\nso the answer is 36"), 0.0);
  EXPECT_EQ(r("import os"), 0.0);
  EXPECT_EQ(r("__import__('os').system('rm -rf /')"), 0.0);
  EXPECT_EQ(r("eval(\"(100 - 4) / 8 * 3\")"), 0.0);
  EXPECT_EQ(r(""), 0.0);
  EXPECT_EQ(r("  \n "), 0.0);
  EXPECT_EQ(r("()"), 0.0);  // no digit
  EXPECT_EQ(r("(100 - 4) / 8 * 3</think>", think), 0.0);  // the answer after </think> is empty
  EXPECT_EQ(r("(100 - 4) / 8 * 3", think), 0.0);          // reasoning never closed
  std::string long_expr = "3";
  while (long_expr.size() <= 200) long_expr += " + 0";
  EXPECT_EQ(r(long_expr), 0.0);  // over 200 characters
  Prompt none = p;
  none.numbers.clear();
  EXPECT_TRUE(has(error_of([&] { countdown_reward(none, "3", plain); }), "countdown-0"));
}

TEST(Rewards, Format) {
  const Prompt p = answer_prompt("arithmetic", "5");
  auto r = [&](const std::string& s, const RewardContext& c) { return format_reward(p, s, c); };
  // Non-thinking: "</think>{answer}[EOS]".
  EXPECT_EQ(r("</think>42", plain), 1.0);
  EXPECT_EQ(r("</think>The answer is 42." + EOS, plain), 1.0);
  EXPECT_EQ(r("42", plain), 0.0);                        // no </think>
  EXPECT_EQ(r(" </think>42", plain), 0.0);               // must start with </think>
  EXPECT_EQ(r("</think>", plain), 0.0);                  // empty answer
  EXPECT_EQ(r("</think> \n" + EOS, plain), 0.0);         // blank answer
  EXPECT_EQ(r("</think>4</think>2", plain), 0.0);
  EXPECT_EQ(r("<think>x</think>42", plain), 0.0);
  EXPECT_EQ(r("</think>42" + EOS + "more", plain), 0.0);  // EOS only at the very end
  EXPECT_EQ(r("</think>42" + EOS + EOS, plain), 0.0);
  EXPECT_EQ(r("</think>42<｜User｜>and more", plain), 0.0);
  EXPECT_EQ(r("</think>42<think>", plain), 0.0);
  // Thinking: "{reasoning}</think>{answer}[EOS]" with non-blank reasoning.
  EXPECT_EQ(r("2 + 3 = 5</think>5", think), 1.0);
  EXPECT_EQ(r("2 + 3 = 5</think>5" + EOS, think), 1.0);
  EXPECT_EQ(r("</think>5", think), 0.0);          // empty reasoning
  EXPECT_EQ(r("  \n</think>5", think), 0.0);      // blank reasoning
  EXPECT_EQ(r("reasoning only", think), 0.0);     // never closed
  EXPECT_EQ(r("r</think>", think), 0.0);          // no answer
  EXPECT_EQ(r("a<think>b</think>5", think), 0.0);  // nested <think>
  EXPECT_EQ(r("a</think>b</think>5", think), 0.0);
  EXPECT_EQ(r("", think), 0.0);
  EXPECT_EQ(r("", plain), 0.0);
  const RewardContext max{ReasoningMode::think_max};
  EXPECT_EQ(r("long reasoning</think>5", max), 1.0);
}

TEST(Rewards, RegistryAndUnknownNames) {
  EXPECT_EQ(reward_names(), (std::vector<std::string>{"arithmetic", "countdown", "format", "gsm8k"}));
  EXPECT_EQ(error_of([] { find_reward("arithmatic"); }),
            "reward 'arithmatic': unknown; known: arithmetic, countdown, format, gsm8k");
  EXPECT_EQ(error_of([] { CompositeReward({{"arithmetic", 1.0}, {"fromat", 0.1}}); }),
            "reward 'fromat': unknown; known: arithmetic, countdown, format, gsm8k");
  const Prompt p = answer_prompt("arithmetic", "5");
  EXPECT_EQ(find_reward("arithmetic")(p, "5", plain), 1.0);
  EXPECT_EQ(find_reward("gsm8k")(p, "#### 5", plain), 1.0);
  EXPECT_EQ(find_reward("format")(p, "</think>5", plain), 1.0);
  EXPECT_EQ(find_reward("countdown")(countdown_prompt(), "3 * (8 + 4)", plain), 1.0);
  EXPECT_TRUE(has(error_of([] { CompositeReward({}); }), "empty"));
  EXPECT_TRUE(has(error_of([] { CompositeReward({{"format", 1.0}, {"format", 0.5}}); }), "listed twice"));
  EXPECT_TRUE(has(error_of([] { CompositeReward({{"format", NAN}}); }), "finite"));
}

TEST(Rewards, WeightedCombination) {
  // rewards = [{name="arithmetic", weight=1.0}, {name="format", weight=0.1}]
  const CompositeReward c({{"arithmetic", 1.0}, {"format", 0.1}});
  const Prompt p = answer_prompt("arithmetic", "5");
  auto both = c.score(p, "</think>5" + EOS, plain);
  EXPECT_DOUBLE_EQ(both.total, 1.1);
  EXPECT_EQ(both.terms, (std::vector<double>{1.0, 1.0}));
  auto answer_only = c.score(p, "5", plain);
  EXPECT_EQ(answer_only.total, 1.0);
  EXPECT_EQ(answer_only.terms, (std::vector<double>{1.0, 0.0}));
  auto format_only = c.score(p, "</think>15", plain);
  EXPECT_DOUBLE_EQ(format_only.total, 0.1);
  EXPECT_EQ(format_only.terms, (std::vector<double>{0.0, 1.0}));
  auto neither = c.score(p, "", plain);
  EXPECT_EQ(neither.total, 0.0);
  // Negative weights are allowed (a penalty term).
  const CompositeReward pen({{"countdown", 1.0}, {"format", -0.5}});
  auto s = pen.score(countdown_prompt(), "</think>3 + 8 * 4", plain);
  EXPECT_DOUBLE_EQ(s.total, 0.1 - 0.5);
  EXPECT_EQ(pen.terms().size(), 2u);
}

}  // namespace
