#include "data/prompts.h"

#include <functional>

#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <utility>

#include "core/error.h"
#include "core/rng.h"

namespace tessera {
namespace {

using nlohmann::json;

std::string_view trim(std::string_view s) {
  constexpr const char* ws = " \t\r\n\f\v";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

bool is_digit(char c) {
  return std::isdigit(static_cast<unsigned char>(c)) != 0;
}

// One parsed line; `where` is "file:line" for errors.
Prompt parse_prompt(const json& j, const std::string& where) {
  if (!j.is_object()) TS_FAIL(where, ": expected a JSON object");
  auto str = [&](const char* key) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) TS_FAIL(where, ": missing or non-string \"", key, "\"");
    return it->get<std::string>();
  };
  Prompt p;
  p.question = str("question");
  std::string answer = str("answer");
  if (!j.contains("task")) {  // GSM8K's own format
    auto a = extract_gsm8k_answer(answer);
    if (!a) TS_FAIL(where, ": GSM8K answer has no final answer after \"####\"");
    p.task = "gsm8k";
    p.answer = *a;
    p.solution = std::move(answer);
  } else {
    p.task = str("task");
    p.answer = std::move(answer);
    if (j.contains("solution")) p.solution = str("solution");
    if (j.contains("numbers")) {
      const json& nums = j["numbers"];
      if (!nums.is_array()) TS_FAIL(where, ": \"numbers\" must be an array of integers");
      for (const json& x : nums) {
        if (!x.is_number_integer()) TS_FAIL(where, ": \"numbers\" must be an array of integers");
        p.numbers.push_back(x.get<int64_t>());
      }
    }
    if (j.contains("target")) {
      if (!j["target"].is_number_integer()) TS_FAIL(where, ": \"target\" must be an integer");
      p.target = j["target"].get<int64_t>();
    }
  }
  if (j.contains("id")) p.id = str("id");
  return p;
}

// Recursive descent over expr := term (('+'|'-') term)*, term := factor (('*'|'/') factor)*,
// factor := number | '(' expr ')'. Literals are consumed from the pool so each number is used at most once.
class CountdownParser {
 public:
  CountdownParser(std::string_view s, std::vector<int64_t> pool) : s_(s), pool_(std::move(pool)) {}

  std::optional<int64_t> parse() {
    auto v = expr();
    skip();
    if (!v || pos_ != s_.size()) return std::nullopt;
    return v;
  }

 private:
  void skip() {
    while (pos_ < s_.size() && s_[pos_] == ' ') ++pos_;
  }
  bool eat(char c) {
    skip();
    if (pos_ < s_.size() && s_[pos_] == c) return ++pos_, true;
    return false;
  }

  std::optional<int64_t> expr() {
    auto v = term();
    while (v) {
      if (eat('+'))
        v = apply('+', *v, term());
      else if (eat('-'))
        v = apply('-', *v, term());
      else
        break;
    }
    return v;
  }

  std::optional<int64_t> term() {
    auto v = factor();
    while (v) {
      if (eat('*'))
        v = apply('*', *v, factor());
      else if (eat('/'))
        v = apply('/', *v, factor());
      else
        break;
    }
    return v;
  }

  std::optional<int64_t> factor() {
    if (eat('(')) {
      auto v = expr();
      if (!v || !eat(')')) return std::nullopt;
      return v;
    }
    size_t start = pos_;
    while (pos_ < s_.size() && is_digit(s_[pos_])) ++pos_;
    if (pos_ == start || pos_ - start > 18) return std::nullopt;  // no literal, or one past int64
    int64_t v = std::stoll(std::string(s_.substr(start, pos_ - start)));
    for (size_t k = 0; k < pool_.size(); ++k) {
      if (pool_[k] == v) {
        pool_.erase(pool_.begin() + k);
        return v;
      }
    }
    return std::nullopt;  // not offered, or already used
  }

  static std::optional<int64_t> apply(char op, int64_t a, std::optional<int64_t> b) {
    if (!b) return std::nullopt;
    int64_t r;
    switch (op) {
      case '+':
        return __builtin_add_overflow(a, *b, &r) ? std::nullopt : std::optional(r);
      case '-':
        return __builtin_sub_overflow(a, *b, &r) ? std::nullopt : std::optional(r);
      case '*':
        return __builtin_mul_overflow(a, *b, &r) ? std::nullopt : std::optional(r);
      default:  // '/': exact only
        if (*b == 0 || (a == INT64_MIN && *b == -1) || a % *b != 0) return std::nullopt;
        return a / *b;
    }
  }

  std::string_view s_;
  std::vector<int64_t> pool_;
  size_t pos_ = 0;
};

// Philox indices reserved per generated prompt: prompt i draws from [i * kDraws, (i + 1) * kDraws).
constexpr uint64_t kDraws = 64;

Prompt simple_prompt(std::string id, std::string task, std::string question, std::string answer) {
  Prompt p;
  p.id = std::move(id);
  p.task = std::move(task);
  p.question = std::move(question);
  p.answer = std::move(answer);
  return p;
}

void check_count(const char* what, int64_t n) {
  if (n < 0) TS_FAIL(what, ": prompt count must be >= 0, got ", n);
}

}  // namespace

std::vector<Prompt> load_prompts_jsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) TS_FAIL("cannot open prompts file '", path, "': ", std::strerror(errno));
  const std::string stem = std::filesystem::path(path).stem().string();
  std::vector<Prompt> out;
  std::string line;
  for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (trim(line).empty()) continue;
    const std::string where = cat(path, ":", lineno);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      TS_FAIL(where, ": malformed JSON: ", e.what());
    }
    Prompt p = parse_prompt(j, where);
    if (p.id.empty()) p.id = cat(stem, ":", lineno);
    out.push_back(std::move(p));
  }
  if (in.bad()) TS_FAIL("error reading prompts file '", path, "'");
  if (out.empty()) TS_FAIL(path, ": no prompts");
  return out;
}

// Writes one JSON object per line (make(prompt)) atomically: a temporary file, then rename.
static void write_jsonl_atomically(const std::string& path, const std::vector<Prompt>& prompts,
                                   const std::function<nlohmann::ordered_json(const Prompt&)>& make) {
  const std::string tmp = cat(path, ".tmp.", ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) TS_FAIL("cannot create '", tmp, "': ", std::strerror(errno));
    for (const Prompt& p : prompts) {
      try {
        out << make(p).dump() << '\n';
      } catch (const json::exception& e) {  // invalid UTF-8
        out.close();
        std::remove(tmp.c_str());
        TS_FAIL("cannot write prompt '", p.id, "' to '", path, "': ", e.what());
      }
    }
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      TS_FAIL("error writing '", tmp, "'");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    TS_FAIL("cannot rename '", tmp, "' to '", path, "': ", std::strerror(err));
  }
}

void write_prompts_jsonl(const std::string& path, const std::vector<Prompt>& prompts) {
  write_jsonl_atomically(path, prompts, [](const Prompt& p) {
    // ordered_json keeps the keys in this readable order.
    nlohmann::ordered_json j = {{"id", p.id}, {"task", p.task}, {"question", p.question}, {"answer", p.answer}};
    if (!p.solution.empty()) j["solution"] = p.solution;
    if (!p.numbers.empty() || p.task == "countdown") {
      j["numbers"] = p.numbers;
      j["target"] = p.target;
    }
    return j;
  });
}

void write_sft_chat_jsonl(const std::string& path, const std::vector<Prompt>& prompts) {
  write_jsonl_atomically(path, prompts, [](const Prompt& p) {
    const std::string reply = p.solution.empty() ? p.answer : p.solution;
    return nlohmann::ordered_json{
        {"messages", {{{"role", "user"}, {"content", p.question}}, {{"role", "assistant"}, {"content", reply}}}}};
  });
}

std::vector<Prompt> generate_arithmetic(int64_t n, uint64_t seed, int digits) {
  check_count("generate_arithmetic", n);
  if (digits < 1 || digits > 9) TS_FAIL("generate_arithmetic: digits must be in [1, 9], got ", digits);
  const Rng rng{seed, stream_id("prompts.arithmetic")};
  int64_t hi = 1;
  for (int d = 0; d < digits; ++d) hi *= 10;
  const int64_t lo = digits == 1 ? 0 : hi / 10;  // operands have exactly `digits` digits
  std::vector<Prompt> out(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t base = i * kDraws;
    int64_t a = lo + rng.below(base, hi - lo), b = lo + rng.below(base + 1, hi - lo);
    char op = "+-*"[rng.below(base + 2, 3)];
    int64_t v = op == '+' ? a + b : op == '-' ? a - b : a * b;
    out[i] = simple_prompt(cat("arithmetic-", seed, "-", i), "arithmetic",
                           cat("What is ", a, " ", op, " ", b, "?"), std::to_string(v));
  }
  return out;
}

std::vector<Prompt> generate_countdown(int64_t n, uint64_t seed, int n_numbers, int64_t max_number) {
  check_count("generate_countdown", n);
  if (n_numbers < 2 || n_numbers > 6)
    TS_FAIL("generate_countdown: n_numbers must be in [2, 6], got ", n_numbers);
  if (max_number < 1 || max_number > 1000000)
    TS_FAIL("generate_countdown: max_number must be in [1, 1000000], got ", max_number);
  const Rng rng{seed, stream_id("prompts.countdown")};
  const int64_t cap = 10 * max_number;  // keeps targets in a range a model can reach by hand
  struct Item {
    int64_t value;
    std::string text;
    bool composite;
  };
  std::vector<Prompt> out(n);
  for (int64_t i = 0; i < n; ++i) {
    Prompt& p = out[i];
    uint64_t d = i * kDraws;  // 2..6 numbers + 3 draws per merge stays far below kDraws
    std::vector<Item> pool;
    for (int k = 0; k < n_numbers; ++k) {
      int64_t v = 1 + static_cast<int64_t>(rng.below(d++, max_number));
      p.numbers.push_back(v);
      pool.push_back({v, std::to_string(v), false});
    }
    // Merge two random items with a random valid operation until one expression is left.
    while (pool.size() > 1) {
      size_t x = rng.below(d++, pool.size()), y = rng.below(d++, pool.size() - 1);
      if (y >= x) ++y;
      Item a = pool[x], b = pool[y];
      if (a.value < b.value) std::swap(a, b);  // larger first: a - b > 0, and a / b is the useful division
      std::vector<std::pair<char, int64_t>> ops;
      if (a.value + b.value <= cap) ops.emplace_back('+', a.value + b.value);
      if (a.value * b.value <= cap) ops.emplace_back('*', a.value * b.value);
      if (a.value > b.value) ops.emplace_back('-', a.value - b.value);
      if (a.value % b.value == 0) ops.emplace_back('/', a.value / b.value);  // never empty: a == b allows '/'
      auto [op, v] = ops[rng.below(d++, ops.size())];
      auto wrap = [](const Item& it) { return it.composite ? "(" + it.text + ")" : it.text; };
      Item merged{v, cat(wrap(a), " ", op, " ", wrap(b)), true};
      pool.erase(pool.begin() + std::max(x, y));
      pool.erase(pool.begin() + std::min(x, y));
      pool.push_back(std::move(merged));
    }
    p.id = cat("countdown-", seed, "-", i);
    p.task = "countdown";
    p.target = pool[0].value;
    p.answer = pool[0].text;
    std::string listed;
    for (size_t k = 0; k < p.numbers.size(); ++k) listed += cat(k ? ", " : "", p.numbers[k]);
    p.question = cat("Using the numbers ", listed,
                     " (each at most once) and + - * / with parentheses, write an expression equal to ",
                     p.target, ".");
  }
  return out;
}

std::vector<Prompt> generate_digit_completion(int64_t n, uint64_t seed, int len) {
  check_count("generate_digit_completion", n);
  if (len < 2 || len > 100) TS_FAIL("generate_digit_completion: len must be in [2, 100], got ", len);
  const Rng rng{seed, stream_id("prompts.digits")};
  std::vector<Prompt> out(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t base = i * kDraws;
    int64_t start = rng.below(base, 100), step = 1 + rng.below(base + 1, 9);
    std::string terms;
    for (int k = 0; k < len; ++k) terms += cat(k ? " " : "", start + k * step);
    out[i] = simple_prompt(cat("digits-", seed, "-", i), "digits",
                           cat("Each number is the previous one plus the same step. Continue the sequence: ",
                               terms, ". What is the next number?"),
                           std::to_string(start + len * step));
  }
  return out;
}

std::optional<std::string> extract_gsm8k_answer(std::string_view text) {
  size_t pos = text.rfind("####");
  if (pos == std::string_view::npos) return std::nullopt;
  std::string_view rest = trim(text.substr(pos + 4));
  rest = trim(rest.substr(0, rest.find('\n')));  // model output may go on after the answer line
  std::string a;
  for (char c : rest)
    if (c != ',') a += c;
  if (a.empty()) return std::nullopt;  // an empty answer must never match anything
  return a;
}

std::optional<std::string> last_integer(std::string_view s) {
  std::optional<std::string> last;
  const size_t n = s.size();
  auto digit_at = [&](size_t k) { return k < n && is_digit(s[k]); };
  size_t i = 0;
  while (i < n) {
    if (!digit_at(i)) {
      ++i;
      continue;
    }
    const size_t start = i;
    std::string digits;
    while (digit_at(i)) digits += s[i++];
    // Thousands groups ",ddd" (not ",dddd"), only after a first group of at most three digits.
    if (digits.size() <= 3) {
      while (i < n && s[i] == ',' && digit_at(i + 1) && digit_at(i + 2) && digit_at(i + 3) &&
             !digit_at(i + 4)) {
        digits.append(s.substr(i + 1, 3));
        i += 4;
      }
    }
    bool integral = true;
    if (i < n && s[i] == '.' && digit_at(i + 1)) {
      for (++i; digit_at(i); ++i) integral = integral && s[i] == '0';
    }
    if (!integral) {
      last.reset();
      continue;
    }
    size_t nz = digits.find_first_not_of('0');
    digits = nz == std::string::npos ? "0" : digits.substr(nz);
    bool negative =
        start > 0 && s[start - 1] == '-' &&
        !(start > 1 && (std::isalnum(static_cast<unsigned char>(s[start - 2])) || s[start - 2] == ')'));
    last = (negative && digits != "0" ? "-" : "") + digits;
  }
  return last;
}

std::optional<int64_t> evaluate_countdown(const std::string& expr, const std::vector<int64_t>& numbers) {
  if (expr.empty() || expr.size() > 200) return std::nullopt;
  for (char c : expr)
    if (!is_digit(c) && (c == '\0' || !std::strchr("+-*/() ", c))) return std::nullopt;
  return CountdownParser(expr, numbers).parse();
}

}  // namespace tessera
