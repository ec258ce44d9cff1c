#include "rl/rewards.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <set>

#include "core/error.h"
#include "data/tokenizer.h"

namespace tessera::rl {

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

bool thinking(ReasoningMode m) { return m != ReasoningMode::non_thinking; }

// The response up to (not including) the first EOS string.
std::string_view before_eos(std::string_view response) {
  return response.substr(0, response.find(kEosToken));
}

// "-?digits" with an optional all-zero fraction, the whole string; normalised like last_integer. None otherwise.
std::optional<std::string> strict_integer(std::string_view s) {
  s = trim(s);
  if (s.empty()) return std::nullopt;
  size_t i = 0;
  if (s[0] == '-') i = 1;
  const size_t start = i;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
  if (i == start) return std::nullopt;
  if (i < s.size() && s[i] == '.') {
    size_t f = i + 1;
    if (f == s.size()) return std::nullopt;
    for (; f < s.size(); ++f)
      if (s[f] != '0') return std::nullopt;
    i = s.size();
  }
  if (i != s.size()) return std::nullopt;
  return last_integer(s);  // normalises "-007" -> "-7", "-0" -> "0", "12.00" -> "12"
}

// The prompt's reference answer as a normalised integer (a data error otherwise).
std::string reference_integer(const Prompt& p, const char* reward) {
  auto r = strict_integer(p.answer);
  if (!r) TS_FAIL("reward '", reward, "': prompt '", p.id, "' has answer '", p.answer, "', which is not an integer");
  return *r;
}

bool is_countdown_format(std::string_view s) {
  if (s.empty() || s.size() > 200) return false;
  bool digit = false;
  for (char c : s) {
    if (c >= '0' && c <= '9')
      digit = true;
    else if (c != '+' && c != '-' && c != '*' && c != '/' && c != '(' && c != ')' && c != ' ')
      return false;
  }
  return digit;
}

}  // namespace

std::string answer_text(std::string_view response, ReasoningMode mode) {
  std::string_view r = before_eos(response);
  const size_t close = r.rfind(kEndThinkToken);
  if (close != std::string_view::npos) return std::string(r.substr(close + std::string_view(kEndThinkToken).size()));
  if (thinking(mode)) return "";
  return std::string(r);
}

double arithmetic_reward(const Prompt& p, std::string_view response, const RewardContext& ctx) {
  const std::string ref = reference_integer(p, "arithmetic");
  const auto got = last_integer(answer_text(response, ctx.mode));
  return got && *got == ref ? 1.0 : 0.0;
}

double gsm8k_reward(const Prompt& p, std::string_view response, const RewardContext& ctx) {
  const std::string ref = reference_integer(p, "gsm8k");
  const std::string a = answer_text(response, ctx.mode);
  std::optional<std::string> got;
  if (a.find("####") != std::string::npos) {
    auto e = extract_gsm8k_answer(a);  // none when nothing follows the last "####"
    if (e) {
      std::string_view v = trim(*e);
      if (!v.empty() && v.front() == '$') v.remove_prefix(1);
      if (!v.empty() && v.back() == '.') v.remove_suffix(1);
      got = strict_integer(v);
    }
  } else {
    got = last_integer(a);
  }
  return got && *got == ref ? 1.0 : 0.0;
}

double countdown_reward(const Prompt& p, std::string_view response, const RewardContext& ctx) {
  if (p.numbers.empty()) TS_FAIL("reward 'countdown': prompt '", p.id, "' has no numbers");
  const std::string a = answer_text(response, ctx.mode);
  // The last non-empty line.
  std::string_view rest(a), line;
  while (!rest.empty()) {
    const size_t nl = rest.find('\n');
    std::string_view l = trim(rest.substr(0, nl));
    if (!l.empty()) line = l;
    if (nl == std::string_view::npos) break;
    rest.remove_prefix(nl + 1);
  }
  if (!is_countdown_format(line)) return 0.0;
  const auto v = evaluate_countdown(std::string(line), p.numbers);
  return v && *v == p.target ? 1.0 : 0.1;
}

double format_reward(const Prompt&, std::string_view response, const RewardContext& ctx) {
  const std::string_view eos(kEosToken), close(kEndThinkToken), open(kThinkToken);
  // EOS at most once, and only at the very end.
  const size_t e = response.find(eos);
  if (e != std::string_view::npos) {
    if (e + eos.size() != response.size()) return 0.0;
    response = response.substr(0, e);
  }
  const size_t c = response.find(close);
  if (c == std::string_view::npos) return 0.0;
  const std::string_view reasoning = response.substr(0, c), answer = response.substr(c + close.size());
  if (thinking(ctx.mode)) {
    if (trim(reasoning).empty() || reasoning.find(open) != std::string_view::npos) return 0.0;
  } else if (c != 0) {
    return 0.0;
  }
  if (trim(answer).empty()) return 0.0;
  if (answer.find(open) != std::string_view::npos || answer.find(close) != std::string_view::npos ||
      answer.find("<｜") != std::string_view::npos)
    return 0.0;
  return 1.0;
}

namespace {
const std::map<std::string, RewardFn>& registry() {
  static const std::map<std::string, RewardFn> r = {
      {"arithmetic", arithmetic_reward},
      {"countdown", countdown_reward},
      {"format", format_reward},
      {"gsm8k", gsm8k_reward},
  };
  return r;
}
}  // namespace

std::vector<std::string> reward_names() {
  std::vector<std::string> names;
  for (const auto& [n, f] : registry()) names.push_back(n);
  return names;  // std::map keeps them sorted
}

RewardFn find_reward(const std::string& name) {
  auto it = registry().find(name);
  if (it != registry().end()) return it->second;
  std::string known;
  for (const auto& n : reward_names()) known += (known.empty() ? "" : ", ") + n;
  TS_FAIL("reward '", name, "': unknown; known: ", known);
}

RewardTerm parse_reward_term(const std::string& text) {
  const size_t colon = text.find(':');
  RewardTerm t{text.substr(0, colon), 1.0};
  if (t.name.empty()) TS_FAIL("reward '", text, "': expected NAME or NAME:WEIGHT");
  if (colon != std::string::npos) {
    const std::string w = text.substr(colon + 1);
    char* end = nullptr;
    t.weight = std::strtod(w.c_str(), &end);
    if (w.empty() || *end != '\0' || !std::isfinite(t.weight))
      TS_FAIL("reward '", text, "': the weight after ':' must be a finite number, got '", w, "'");
  }
  return t;
}

CompositeReward::CompositeReward(std::vector<RewardTerm> terms) : terms_(std::move(terms)) {
  if (terms_.empty()) {
    std::string known;
    for (const auto& n : reward_names()) known += (known.empty() ? "" : ", ") + n;
    TS_FAIL("rewards: the list is empty; name at least one reward (known: ", known, ")");
  }
  std::set<std::string> seen;
  for (const RewardTerm& t : terms_) {
    fns_.push_back(find_reward(t.name));
    if (!seen.insert(t.name).second) TS_FAIL("reward '", t.name, "': listed twice");
    if (!std::isfinite(t.weight)) TS_FAIL("reward '", t.name, "': weight must be finite, got ", t.weight);
  }
}

RewardScore CompositeReward::score(const Prompt& p, std::string_view response, const RewardContext& ctx) const {
  RewardScore s;
  s.terms.reserve(terms_.size());
  for (size_t i = 0; i < terms_.size(); ++i) {
    const double v = fns_[i](p, response, ctx);
    s.terms.push_back(v);
    s.total += terms_[i].weight * v;
  }
  return s;
}

}  // namespace tessera::rl
