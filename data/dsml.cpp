#include "data/dsml.h"

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <utility>

#include "core/error.h"
#include "data/tokenizer.h"

namespace tessera {
namespace {

const std::string kMarker = kDsmlToken;  // "｜DSML｜"
const std::string kOpen = "<" + kMarker, kClose = "</" + kMarker;

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

void check_name(const std::string& name, const char* what) {
  if (name.empty()) TS_FAIL("DSML: empty ", what, " name");
  if (name.find('"') != std::string::npos) TS_FAIL("DSML: ", what, " name '", name, "' contains a quote");
  if (name.find(kMarker) != std::string::npos)
    TS_FAIL("DSML: ", what, " name '", name, "' contains the DSML marker");
}

struct Tag {
  bool close = false;
  std::string name;                                        // tool_calls, invoke or parameter
  std::vector<std::pair<std::string, std::string>> attrs;  // in order of appearance
  size_t begin = 0, end = 0;                               // byte range of the whole tag
  bool is(const char* n, bool c) const { return name == n && close == c; }
  const std::string* attr(const char* key) const {
    for (const auto& [k, v] : attrs)
      if (k == key) return &v;
    return nullptr;
  }
};

// A cursor over the block; every failure reports the absolute byte offset and line.
class Parser {
 public:
  explicit Parser(const std::string& s, size_t pos) : s_(s), pos_(pos) {}

  [[noreturn]] void fail(size_t at, const std::string& reason) const {
    at = std::min(at, s_.size());
    size_t line = 1 + std::count(s_.begin(), s_.begin() + at, '\n');
    TS_FAIL("DSML: ", reason, " (at byte ", at, ", line ", line, ")");
  }

  std::string text(const Tag& t) const { return s_.substr(t.begin, t.end - t.begin); }

  // The next tag after whitespace; nullopt at the end of input. Anything else is text outside tags.
  std::optional<Tag> next() {
    while (pos_ < s_.size() && is_space(s_[pos_])) ++pos_;
    if (pos_ == s_.size()) return std::nullopt;
    if (s_.compare(pos_, kOpen.size(), kOpen) != 0 && s_.compare(pos_, kClose.size(), kClose) != 0)
      fail(pos_, "text outside tags");
    Tag t;
    t.begin = pos_;
    t.close = s_[pos_ + 1] == '/';
    size_t q = pos_ + (t.close ? kClose : kOpen).size();
    while (q < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[q])) || s_[q] == '_'))
      t.name += s_[q++];
    if (t.name.empty()) fail(t.begin, "tag without a name");
    for (;;) {
      if (q >= s_.size()) fail(t.begin, "unterminated tag");
      if (s_[q] == '>') break;
      if (s_[q] == ' ') {
        ++q;
        continue;
      }
      size_t key_at = q;
      std::string key;
      while (q < s_.size() && (std::isalpha(static_cast<unsigned char>(s_[q])) || s_[q] == '_'))
        key += s_[q++];
      if (key.empty() || s_.compare(q, 2, "=\"") != 0)
        fail(key_at, "malformed attribute in tag <" + kMarker + t.name);
      size_t quote = s_.find('"', q + 2);
      if (quote == std::string::npos) fail(key_at, "unterminated attribute value");
      if (t.attr(key.c_str())) fail(key_at, "duplicate attribute '" + key + "'");
      t.attrs.emplace_back(key, s_.substr(q + 2, quote - q - 2));
      q = quote + 1;
    }
    t.end = pos_ = q + 1;
    check_tag(t);
    return t;
  }

  // A parameter's value runs verbatim to the next DSML marker, which must start </｜DSML｜parameter>.
  std::string value(const Tag& param) {
    const std::string end_tag = kClose + "parameter>";
    size_t m = s_.find(kMarker, pos_);
    const std::string& name = *param.attr("name");
    if (m == std::string::npos) fail(param.begin, "unterminated parameter '" + name + "': no " + end_tag);
    if (m < pos_ + 2 || s_.compare(m - 2, end_tag.size(), end_tag) != 0)
      fail(m, "unterminated parameter '" + name + "': another DSML tag comes before " + end_tag);
    std::string v = s_.substr(pos_, m - 2 - pos_);
    pos_ = m - 2 + end_tag.size();
    return v;
  }

  size_t size() const { return s_.size(); }

 private:
  // Known tags and their attributes only.
  void check_tag(const Tag& t) const {
    std::string shown = (t.close ? kClose : kOpen) + t.name + ">";
    std::vector<std::string> allowed;
    if (t.name == "invoke")
      allowed = {"name"};
    else if (t.name == "parameter")
      allowed = {"name", "string"};
    else if (t.name != "tool_calls")
      fail(t.begin, "unknown tag " + shown);
    if (t.close && !t.attrs.empty()) fail(t.begin, "closing tag " + shown + " takes no attributes");
    if (t.close) return;
    for (const auto& [k, v] : t.attrs)
      if (std::find(allowed.begin(), allowed.end(), k) == allowed.end())
        fail(t.begin, "unexpected attribute '" + k + "' on " + shown);
    if (t.name == "tool_calls") return;
    const std::string* name = t.attr("name");
    if (!name) fail(t.begin, t.name + " without name");
    if (name->empty()) fail(t.begin, t.name + " with an empty name");
    if (t.name == "parameter") {
      const std::string* str = t.attr("string");
      if (!str) fail(t.begin, "parameter '" + *name + "' without a string attribute");
      if (*str != "true" && *str != "false")
        fail(t.begin, "parameter '" + *name + "': string attribute must be \"true\" or \"false\", got \"" +
                          *str + "\"");
    }
  }

  const std::string& s_;
  size_t pos_;
};

ToolCall parse_invoke(Parser& p, const Tag& open) {
  ToolCall call{*open.attr("name"), {}};
  std::set<std::string> seen;
  for (;;) {
    std::optional<Tag> t = p.next();
    if (!t) p.fail(p.size(), "missing </" + kMarker + "invoke> for invoke '" + call.name + "'");
    if (t->is("invoke", true)) return call;
    if (t->is("tool_calls", false)) p.fail(t->begin, "nested <" + kMarker + "tool_calls>");
    if (t->is("tool_calls", true))
      p.fail(t->begin, "missing </" + kMarker + "invoke> before </" + kMarker + "tool_calls>");
    if (t->is("parameter", true)) p.fail(t->begin, "unbalanced </" + kMarker + "parameter>");
    if (!t->is("parameter", false))
      p.fail(t->begin, "expected a parameter or </" + kMarker + "invoke> in invoke '" + call.name +
                           "', found " + p.text(*t));
    ToolParam param{*t->attr("name"), *t->attr("string") == "true", ""};
    if (!seen.insert(param.name).second)
      p.fail(t->begin, "duplicate parameter '" + param.name + "' in invoke '" + call.name + "'");
    param.value = p.value(*t);
    if (!param.is_string) {
      try {
        nlohmann::json parsed = nlohmann::json::parse(param.value);  // only validity matters
        (void)parsed;
      } catch (const nlohmann::json::parse_error& e) {
        p.fail(t->end, "parameter '" + param.name +
                           "' has string=\"false\" but its value is not valid JSON: " + e.what());
      }
    }
    call.params.push_back(std::move(param));
  }
}

std::vector<ToolCall> parse_from(const std::string& s, size_t begin) {
  Parser p(s, begin);
  std::optional<Tag> t = p.next();
  if (!t) p.fail(s.size(), "empty input: no tool_calls block");
  if (!t->is("tool_calls", false))
    p.fail(t->begin, "missing <" + kMarker + "tool_calls> (found " + p.text(*t) + ")");
  std::vector<ToolCall> calls;
  for (;;) {
    t = p.next();
    if (!t) p.fail(p.size(), "missing </" + kMarker + "tool_calls>");
    if (t->is("tool_calls", true)) break;
    if (t->is("tool_calls", false)) p.fail(t->begin, "nested <" + kMarker + "tool_calls>");
    if (t->close) p.fail(t->begin, "unbalanced " + p.text(*t));
    if (!t->is("invoke", false))
      p.fail(t->begin, "expected <" + kMarker + "invoke>, found " + p.text(*t) + " outside an invoke");
    calls.push_back(parse_invoke(p, *t));
  }
  if (calls.empty()) p.fail(t->begin, "empty tool_calls block");
  if ((t = p.next())) p.fail(t->begin, "content after </" + kMarker + "tool_calls>");
  return calls;
}

}  // namespace

std::string encode_tool_calls(const std::vector<ToolCall>& calls) {
  if (calls.empty()) TS_FAIL("DSML: no tool calls to encode (an empty block is malformed)");
  std::string out = kOpen + "tool_calls>\n";
  for (const ToolCall& call : calls) {
    check_name(call.name, "tool");
    out += kOpen + "invoke name=\"" + call.name + "\">\n";
    std::set<std::string> seen;
    for (const ToolParam& p : call.params) {
      check_name(p.name, "parameter");
      if (!seen.insert(p.name).second)
        TS_FAIL("DSML: duplicate parameter '", p.name, "' in call '", call.name, "'");
      if (!p.is_string && !nlohmann::json::accept(p.value))
        TS_FAIL("DSML: parameter '", p.name, "' of call '", call.name,
                "' is marked JSON but does not parse: ", p.value);
      if (p.value.find(kMarker) != std::string::npos)
        TS_FAIL("DSML: parameter '", p.name, "' of call '", call.name, "' contains the DSML marker");
      out += kOpen + "parameter name=\"" + p.name + "\" string=\"" + (p.is_string ? "true" : "false") +
             "\">" + p.value + kClose + "parameter>\n";
    }
    out += kClose + "invoke>\n";
  }
  return out + kClose + "tool_calls>";
}

std::vector<ToolCall> parse_tool_calls(const std::string& block) {
  return parse_from(block, 0);
}

AssistantReply split_answer_and_tool_calls(const std::string& text) {
  size_t m = text.find(kMarker);
  if (m == std::string::npos) return {text, {}};
  // The block starts at the tag holding the first marker; the parser rejects it unless it opens tool_calls.
  size_t start = m >= 2 && text.compare(m - 2, 2, "</") == 0 ? m - 2
                 : m >= 1 && text[m - 1] == '<'              ? m - 1
                                                             : m;
  AssistantReply reply{text.substr(0, start), {}};
  if (!reply.answer.empty()) {
    if (!reply.answer.ends_with("\n\n"))
      TS_FAIL("DSML: tool calls must follow the answer after a blank line (at byte ", start, ")");
    reply.answer.resize(reply.answer.size() - 2);
  }
  reply.tool_calls = parse_from(text, start);
  return reply;
}

}  // namespace tessera
