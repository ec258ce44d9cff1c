// RL prompt sets: GSM8K loading (the real file when ../shared is present), JSONL errors with file:line,
// generator determinism and correctness checked by independent computation, and the answer checkers.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "test_util.h"
#include "core/error.h"
#include "data/prompts.h"

using namespace tessera;
using tessera::testing::error_of;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir() {
  fs::path d = fs::temp_directory_path() / ("tessera_test_prompts_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

std::string write_temp(const std::string& name, const std::string& text) {
  fs::path p = temp_dir() / name;
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}


std::string load_error(const std::string& name, const std::string& text) {
  std::string path = write_temp(name, text);
  return error_of([&] { load_prompts_jsonl(path); });
}

}  // namespace

TEST(Prompts, LoadsRealGsm8k) {
  // The shared data folder sits next to the repository: tests/unit/ -> repo root -> ../shared.
  fs::path path = fs::path(__FILE__).parent_path() / "../../../shared/data/gsm8k-train.jsonl";
  if (!fs::exists(path)) GTEST_SKIP() << "GSM8K not found at " << path << " (../shared/data is absent)";
  std::vector<Prompt> ps = load_prompts_jsonl(path.string());
  ASSERT_EQ(ps.size(), 7473u);
  EXPECT_EQ(ps[0].task, "gsm8k");
  EXPECT_EQ(ps[0].id, "gsm8k-train:1");
  EXPECT_EQ(ps[0].answer, "72");
  EXPECT_NE(ps[0].question.find("Natalia sold clips"), std::string::npos);
  EXPECT_NE(ps[0].solution.find("<<48/2=24>>"), std::string::npos);
  for (const Prompt& p : ps) {  // every reference answer is a plain integer with no commas
    ASSERT_EQ(last_integer(p.answer), p.answer) << p.id;
    ASSERT_EQ(extract_gsm8k_answer(p.solution), p.answer) << p.id;
  }
}

TEST(Prompts, LoadErrorsNameFileAndLine) {
  const std::string good = R"({"question": "q", "answer": "x\n#### 1"})";
  std::string missing = (temp_dir() / "nope.jsonl").string();
  std::string e = error_of([&] { load_prompts_jsonl(missing); });
  EXPECT_NE(e.find(missing), std::string::npos) << e;

  e = load_error("empty.jsonl", "");
  EXPECT_NE(e.find("empty.jsonl: no prompts"), std::string::npos) << e;
  e = load_error("blank.jsonl", "\n  \n\r\n");
  EXPECT_NE(e.find("blank.jsonl: no prompts"), std::string::npos) << e;

  e = load_error("bad.jsonl", good + "\n\n{\"question\": \"q\", \n");
  EXPECT_NE(e.find("bad.jsonl:3: malformed JSON"), std::string::npos) << e;
  EXPECT_NE(e.find("parse error"), std::string::npos) << e;  // the parser's own reason

  e = load_error("noq.jsonl", good + "\n" + R"({"answer": "#### 1"})" + "\n");
  EXPECT_NE(e.find("noq.jsonl:2: missing or non-string \"question\""), std::string::npos) << e;
  e = load_error("numa.jsonl", R"({"question": "q", "answer": 5})");
  EXPECT_NE(e.find("numa.jsonl:1: missing or non-string \"answer\""), std::string::npos) << e;
  e = load_error("nohash.jsonl", good + "\n" + good + "\n" + R"({"question": "q", "answer": "it is 42"})");
  EXPECT_NE(e.find("nohash.jsonl:3: GSM8K answer has no final answer after \"####\""), std::string::npos)
      << e;
  e = load_error("emptyhash.jsonl", R"({"question": "q", "answer": "it is ####  "})");
  EXPECT_NE(e.find("emptyhash.jsonl:1: GSM8K"), std::string::npos) << e;
  e = load_error("array.jsonl", "[1, 2]");
  EXPECT_NE(e.find("array.jsonl:1: expected a JSON object"), std::string::npos) << e;
  e = load_error("nums.jsonl",
                 R"({"task": "countdown", "question": "q", "answer": "1", "numbers": [1, "2"]})");
  EXPECT_NE(e.find("nums.jsonl:1: \"numbers\""), std::string::npos) << e;
}

TEST(Prompts, SkipsBlankLinesAndAcceptsCrlf) {
  std::string path =
      write_temp("crlf.jsonl",
                 "\r\n{\"question\": \"a\", \"answer\": \"1 + 1\\n#### 1,234\"}\r\n\n"
                 "{\"task\": \"arithmetic\", \"question\": \"What is 1 + 1?\", \"answer\": \"2\"}\r\n");
  std::vector<Prompt> ps = load_prompts_jsonl(path);
  ASSERT_EQ(ps.size(), 2u);
  EXPECT_EQ(ps[0].answer, "1234");
  EXPECT_EQ(ps[0].id, "crlf:2");
  EXPECT_EQ(ps[1].task, "arithmetic");
  EXPECT_EQ(ps[1].answer, "2");
  EXPECT_EQ(ps[1].id, "crlf:4");
}

TEST(Prompts, GeneratorsAreDeterministicInTheSeed) {
  EXPECT_EQ(generate_arithmetic(50, 7, 2), generate_arithmetic(50, 7, 2));
  EXPECT_EQ(generate_countdown(50, 7, 4, 100), generate_countdown(50, 7, 4, 100));
  EXPECT_EQ(generate_digit_completion(50, 7, 4), generate_digit_completion(50, 7, 4));
  // Prompt i does not depend on n.
  auto a = generate_countdown(20, 7, 3, 50), b = generate_countdown(5, 7, 3, 50);
  EXPECT_EQ(std::vector<Prompt>(a.begin(), a.begin() + 5), b);

  auto questions_differ = [](const std::vector<Prompt>& x, const std::vector<Prompt>& y) {
    int differ = 0;
    for (size_t i = 0; i < x.size(); ++i) differ += x[i].question != y[i].question;
    return differ;
  };
  EXPECT_GT(questions_differ(generate_arithmetic(50, 7, 2), generate_arithmetic(50, 8, 2)), 40);
  EXPECT_GT(questions_differ(generate_countdown(50, 7, 4, 100), generate_countdown(50, 8, 4, 100)), 40);
  EXPECT_GT(questions_differ(generate_digit_completion(50, 7, 4), generate_digit_completion(50, 8, 4)), 40);
  EXPECT_TRUE(generate_arithmetic(0, 7).empty());
  EXPECT_NE(error_of([] { generate_arithmetic(1, 0, 10); }).find("digits"), std::string::npos);
  EXPECT_NE(error_of([] { generate_countdown(1, 0, 7, 100); }).find("n_numbers"), std::string::npos);
}

TEST(Prompts, ArithmeticAnswersAreExact) {
  for (int digits : {1, 2, 3, 9}) {
    std::set<char> ops;
    for (const Prompt& p : generate_arithmetic(300, 3, digits)) {
      long long a = 0, b = 0;
      char op = 0;
      ASSERT_EQ(std::sscanf(p.question.c_str(), "What is %lld %c %lld?", &a, &op, &b), 3) << p.question;
      long long want = op == '+' ? a + b : op == '-' ? a - b : a * b;
      ASSERT_TRUE(op == '+' || op == '-' || op == '*') << p.question;
      EXPECT_EQ(p.answer, std::to_string(want)) << p.question;
      EXPECT_EQ(p.task, "arithmetic");
      if (digits > 1) {
        EXPECT_EQ(std::to_string(a).size(), size_t(digits)) << p.question;
      }
      EXPECT_LE(std::to_string(b).size(), size_t(digits)) << p.question;
      ops.insert(op);
    }
    EXPECT_EQ(ops.size(), 3u);
  }
}

TEST(Prompts, CountdownAnswersReachTheTarget) {
  for (int k : {3, 4}) {
    std::set<char> ops;
    for (const Prompt& p : generate_countdown(500, 11, k, 100)) {
      ASSERT_EQ(p.numbers.size(), size_t(k));
      for (int64_t x : p.numbers) ASSERT_TRUE(x >= 1 && x <= 100) << p.id;
      EXPECT_GE(p.target, 1);
      EXPECT_LE(p.target, 1000);
      EXPECT_EQ(evaluate_countdown(p.answer, p.numbers), p.target) << p.answer;
      EXPECT_NE(p.question.find(" equal to " + std::to_string(p.target) + "."), std::string::npos)
          << p.question;
      for (char c : p.answer) ops.insert(c);
    }
    for (char op : {'+', '-', '*', '/'}) EXPECT_TRUE(ops.count(op)) << op;  // every operation occurs
  }
}

TEST(Prompts, DigitCompletionIsAnArithmeticProgression) {
  for (const Prompt& p : generate_digit_completion(200, 5, 5)) {
    std::string terms = p.question.substr(p.question.find(": ") + 2);
    std::istringstream in(terms.substr(0, terms.find('.')));
    std::vector<int64_t> xs;
    for (int64_t x; in >> x;) xs.push_back(x);
    ASSERT_EQ(xs.size(), 5u) << p.question;
    int64_t step = xs[1] - xs[0];
    EXPECT_TRUE(step >= 1 && step <= 9) << p.question;
    for (size_t k = 2; k < xs.size(); ++k) EXPECT_EQ(xs[k] - xs[k - 1], step) << p.question;
    EXPECT_EQ(p.answer, std::to_string(xs.back() + step)) << p.question;
  }
}

TEST(Prompts, EvaluateCountdown) {
  const std::vector<int64_t> nums = {3, 8, 4, 100};
  EXPECT_EQ(evaluate_countdown("(100 - 4) / 8 * 3", nums), 36);  // worked by hand: 96 / 8 = 12, * 3
  EXPECT_EQ(evaluate_countdown("3 + 8 * 4", nums), 35);          // precedence
  EXPECT_EQ(evaluate_countdown("(3+8)*4", nums), 44);
  EXPECT_EQ(evaluate_countdown("100 - 8 - 4", nums), 88);  // left associative
  EXPECT_EQ(evaluate_countdown("100 / 4 / 5", {100, 4, 5}), 5);
  EXPECT_EQ(evaluate_countdown("  8 ", nums), 8);  // a subset of the numbers is fine
  EXPECT_EQ(evaluate_countdown("3 - 8", nums), -5);
  EXPECT_EQ(evaluate_countdown("3 + 3", {3, 3}), 6);  // multiplicity

  EXPECT_EQ(evaluate_countdown("3 + 3", nums), std::nullopt);             // reuse
  EXPECT_EQ(evaluate_countdown("3 + 9", nums), std::nullopt);             // not in the list
  EXPECT_EQ(evaluate_countdown("38 + 4", nums), std::nullopt);            // concatenating digits
  EXPECT_EQ(evaluate_countdown("8 / 3", nums), std::nullopt);             // inexact division
  EXPECT_EQ(evaluate_countdown("4 / (8 - 8)", {4, 8, 8}), std::nullopt);  // division by zero
  EXPECT_EQ(evaluate_countdown("3 + x", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("__import__('os').system('ls')", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("(3 + 8", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("3 + 8)", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("()", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("3 +", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("3 8", nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("-3 + 8", nums), std::nullopt);  // no unary minus
  EXPECT_EQ(evaluate_countdown("3\t+ 8", nums), std::nullopt);  // only spaces
  EXPECT_EQ(evaluate_countdown(std::string("3 + 8\0", 6), nums), std::nullopt);
  EXPECT_EQ(evaluate_countdown("3000000000000 * 3000000000000", {3000000000000, 3000000000000}),
            std::nullopt);
  std::string at_limit = "(3 + 8)" + std::string(193, ' ');
  ASSERT_EQ(at_limit.size(), 200u);
  EXPECT_EQ(evaluate_countdown(at_limit, nums), 11);
  EXPECT_EQ(evaluate_countdown(at_limit + " ", nums), std::nullopt);  // over-long
}

TEST(Prompts, LastInteger) {
  EXPECT_EQ(last_integer("The answer is 42."), "42");
  EXPECT_EQ(last_integer("37 - 58 = -21"), "-21");
  EXPECT_EQ(last_integer("x = -1,234 apples"), "-1234");
  EXPECT_EQ(last_integer("costs $1,000,000 in total"), "1000000");
  EXPECT_EQ(last_integer("10-3"), "3");  // a minus between numbers is not a sign
  EXPECT_EQ(last_integer("list: 1,2,3"), "3");
  EXPECT_EQ(last_integer("1,2345"), "2345");
  EXPECT_EQ(last_integer("answer 007"), "7");
  EXPECT_EQ(last_integer("-0"), "0");
  EXPECT_EQ(last_integer("12.00 dollars"), "12");
  EXPECT_EQ(last_integer("5 and 3.5"), std::nullopt);  // the last number is not an integer
  EXPECT_EQ(last_integer("no numbers here"), std::nullopt);
  EXPECT_EQ(last_integer(""), std::nullopt);
}

TEST(Prompts, ExtractGsm8kAnswer) {
  EXPECT_EQ(extract_gsm8k_answer("work\n#### 1,234"), "1234");
  EXPECT_EQ(extract_gsm8k_answer("#### 5\n#### 6"), "6");  // the last marker wins
  EXPECT_EQ(extract_gsm8k_answer("####   -3  "), "-3");
  EXPECT_EQ(extract_gsm8k_answer("#### 72\nHope that helps"), "72");
  EXPECT_EQ(extract_gsm8k_answer("no marker 72"), std::nullopt);
  EXPECT_EQ(extract_gsm8k_answer("#### "), std::nullopt);  // an empty answer never matches
  EXPECT_EQ(extract_gsm8k_answer("#### ,"), std::nullopt);
}

TEST(Prompts, WriteLoadRoundTrip) {
  std::vector<Prompt> ps = generate_arithmetic(5, 1, 2);
  for (auto gen : {generate_countdown(5, 1, 4, 100), generate_digit_completion(5, 1, 4)})
    ps.insert(ps.end(), gen.begin(), gen.end());
  Prompt g;
  g.id = "gsm8k-x";
  g.task = "gsm8k";
  g.question = "How many \"quoted\" \xc3\xa9?";
  g.answer = "72";
  g.solution = "48 + 24 = <<48+24=72>>72\n#### 72";
  ps.push_back(g);
  fs::path path = temp_dir() / "round.jsonl";
  write_prompts_jsonl(path.string(), ps);
  EXPECT_EQ(load_prompts_jsonl(path.string()), ps);
  for (const auto& entry : fs::directory_iterator(temp_dir()))  // no temporary file left behind
    EXPECT_EQ(entry.path().filename().string().find(".tmp"), std::string::npos) << entry.path();

  std::string e = error_of([&] { write_prompts_jsonl((temp_dir() / "no/such/dir.jsonl").string(), ps); });
  EXPECT_NE(e.find("cannot create"), std::string::npos) << e;
}
