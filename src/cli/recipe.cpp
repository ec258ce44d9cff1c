#include "cli/recipe.h"

#include <toml++/toml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <tuple>

#include "core/error.h"

namespace tessera {

namespace fs = std::filesystem;

// Where a value came from: a line of a recipe file, or the --set argument that produced it.
struct Origin {
  std::string file;
  int64_t line = 0;
  std::string set;  // the whole --set argument; empty for values from files

  std::string where() const { return set.empty() ? cat(file, ":", line) : cat("--set ", set); }
};

// Our own copy of the TOML tree: toml++ drops source positions when nodes are copied, and merging
// files and overrides needs each value to keep its own origin.
struct Recipe::Node {
  enum class Kind { integer, floating, boolean, string, date_time, array, table };
  Kind kind = Kind::table;
  int64_t i = 0;
  double d = 0;
  bool b = false;
  std::string s;  // string value, or the TOML text of a date/time
  std::vector<Node> items;
  std::map<std::string, Node> fields;
  Origin origin;
};

namespace {

using Node = Recipe::Node;
using Kind = Node::Kind;

std::vector<std::string> split_key(const std::string& key) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    size_t dot = key.find('.', start);
    parts.push_back(key.substr(start, dot - start));
    if (dot == std::string::npos) return parts;
    start = dot + 1;
  }
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

// Shortest text that parses back to exactly `v` (std::to_chars guarantees the round trip), always
// recognisable as a TOML float.
std::string format_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, res.ptr);
  size_t e = s.find('e');
  if (e == std::string::npos) return s.find('.') == std::string::npos ? s + ".0" : s;
  // to_chars writes printf-style exponents ("3e-04", "1e+300"); "3e-4" and "1e300" are the same value.
  std::string mantissa = s.substr(0, e), exponent = s.substr(e + 1);
  std::string sign = exponent[0] == '-' ? "-" : "";
  size_t digits = exponent.find_first_not_of("+-0");
  return cat(mantissa, "e", sign, digits == std::string::npos ? "0" : exponent.substr(digits));
}

std::string quote_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04X", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string quote_key(const std::string& k) {
  bool bare = !k.empty() && std::all_of(k.begin(), k.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
  return bare ? k : quote_string(k);
}

std::string value_text(const Node& n) {
  switch (n.kind) {
    case Kind::integer:
      return std::to_string(n.i);
    case Kind::floating:
      return format_double(n.d);
    case Kind::boolean:
      return n.b ? "true" : "false";
    case Kind::string:
      return quote_string(n.s);
    case Kind::date_time:
      return n.s;
    case Kind::array: {
      std::string out = "[";
      for (size_t k = 0; k < n.items.size(); ++k) out += (k ? ", " : "") + value_text(n.items[k]);
      return out + "]";
    }
    case Kind::table: {
      std::string out = "{";
      for (const auto& [k, v] : n.fields)
        out += (out.size() > 1 ? ", " : " ") + quote_key(k) + " = " + value_text(v);
      return out + (n.fields.empty() ? "}" : " }");
    }
  }
  return "";
}

// "string \"x\"", "integer 5", ...: what the user wrote, for type errors.
std::string describe(const Node& n) {
  static const char* const names[] = {"integer", "float", "boolean", "string", "date/time", "array", "table"};
  return cat(names[static_cast<int>(n.kind)], " ", value_text(n));
}

template <class T>
std::string date_time_text(const T& v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// `set` is the --set argument for override values (empty for files); `key` is the dotted path so far.
Node convert(const toml::node& t, const std::string& file, const std::string& set, const std::string& key) {
  Node n;
  n.origin = {file, static_cast<int64_t>(t.source().begin.line), set};
  switch (t.type()) {
    case toml::node_type::table:
      n.kind = Kind::table;
      for (auto&& [k, v] : *t.as_table()) {
        std::string name(k.str());
        std::string sub = key.empty() ? name : cat(key, ".", name);
        // Dotted getter keys could not address such a key.
        if (name.find('.') != std::string::npos)
          TS_FAIL(set.empty() ? cat(file, ":", k.source().begin.line) : cat("--set ", set), ": key '", sub,
                  "': key names containing '.' are not supported");
        n.fields.emplace(name, convert(v, file, set, sub));
      }
      break;
    case toml::node_type::array:
      n.kind = Kind::array;
      for (const auto& v : *t.as_array()) n.items.push_back(convert(v, file, set, key));
      break;
    case toml::node_type::string:
      n.kind = Kind::string;
      n.s = t.as_string()->get();
      break;
    case toml::node_type::integer:
      n.kind = Kind::integer;
      n.i = t.as_integer()->get();
      break;
    case toml::node_type::floating_point:
      n.kind = Kind::floating;
      n.d = t.as_floating_point()->get();
      break;
    case toml::node_type::boolean:
      n.kind = Kind::boolean;
      n.b = t.as_boolean()->get();
      break;
    case toml::node_type::date:
      n.kind = Kind::date_time;
      n.s = date_time_text(*t.as_date());
      break;
    case toml::node_type::time:
      n.kind = Kind::date_time;
      n.s = date_time_text(*t.as_time());
      break;
    case toml::node_type::date_time:
      n.kind = Kind::date_time;
      n.s = date_time_text(*t.as_date_time());
      break;
    case toml::node_type::none:
      break;
  }
  return n;
}

// Tables merge key by key; anything else in `top` replaces what `base` had.
void merge_into(Node& base, Node&& top) {
  for (auto& [k, v] : top.fields) {
    auto it = base.fields.find(k);
    if (it != base.fields.end() && it->second.kind == Kind::table && v.kind == Kind::table)
      merge_into(it->second, std::move(v));
    else
      base.fields.insert_or_assign(k, std::move(v));
  }
}

const Node* find_node(const Node& root, const std::string& key) {
  const Node* n = &root;
  for (const auto& part : split_key(key)) {
    if (n->kind != Kind::table) return nullptr;
    auto it = n->fields.find(part);
    if (it == n->fields.end()) return nullptr;
    n = &it->second;
  }
  return n;
}

// Identity of a file for cycle detection, independent of how the path was spelled.
std::string file_id(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(path, ec);
  return ec ? path : p.string();
}

// Loads a recipe and its inherit chain; `stack_` holds the files being loaded, for cycle detection.
class Loader {
 public:
  Node load_file(const std::string& path, const std::string& inherited_by) {
    if (!fs::is_regular_file(path))
      TS_FAIL("recipe file '", path, "' not found",
              inherited_by.empty() ? "" : cat(" (inherited by ", inherited_by, ")"));
    std::ifstream in(path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in) TS_FAIL("cannot read recipe file '", path, "'");
    return load_text(text.str(), path);
  }

  Node load_text(const std::string& text, const std::string& name) {
    std::string id = file_id(name);
    for (size_t k = 0; k < stack_.size(); ++k) {
      if (stack_[k].second != id) continue;
      std::string cycle;
      for (size_t j = k; j < stack_.size(); ++j) cycle += stack_[j].first + " -> ";
      TS_FAIL("recipe inherit cycle: ", cycle, name);
    }
    toml::table table;
    try {
      table = toml::parse(text, name);
    } catch (const toml::parse_error& e) {
      TS_FAIL(name, ":", e.source().begin.line, ":", e.source().begin.column, ": ", e.description());
    }
    stack_.emplace_back(name, id);
    Node merged;
    if (const toml::node* inherit = table.get("inherit")) {
      std::string where = cat(name, ":", inherit->source().begin.line);
      for (const std::string& parent : parents(*inherit, where, name)) {
        fs::path p(parent);
        if (p.is_relative()) p = fs::path(name).parent_path() / p;
        merge_into(merged, load_file(p.lexically_normal().string(), where));
      }
      table.erase("inherit");
    }
    merge_into(merged, convert(table, name, "", ""));
    stack_.pop_back();
    return merged;
  }

 private:
  static std::vector<std::string> parents(const toml::node& inherit, const std::string& where,
                                          const std::string& name) {
    std::vector<std::string> out;
    if (auto s = inherit.value<std::string>()) {
      out.push_back(*s);
    } else if (const toml::array* arr = inherit.as_array();
               arr && (arr->empty() || arr->is_homogeneous(toml::node_type::string))) {
      for (const auto& v : *arr) out.push_back(v.as_string()->get());
    } else {
      TS_FAIL(where, ": key 'inherit': expected a file name or a list of file names, got ",
              describe(convert(inherit, name, "", "inherit")));
    }
    return out;
  }

  std::vector<std::pair<std::string, std::string>> stack_;  // (name, file_id)
};

// The value is TOML when "v = <text>" parses to exactly that one key, otherwise the raw text as a string.
Node override_value(const std::string& text, const std::string& arg, const std::string& key) {
  try {
    std::string doc = "v = " + text;
    toml::table t = toml::parse(std::string_view(doc), std::string_view("--set"));
    if (t.size() == 1 && t.contains("v")) return convert(*t.get("v"), "", arg, key);
  } catch (const toml::parse_error&) {
    // not a TOML value: a plain string
  }
  Node n;
  n.kind = Kind::string;
  n.s = text;
  n.origin = {"", 0, arg};
  return n;
}

// --set key=value, deep-merged into the recipe.
void apply_override(Node& root, const std::string& arg) {
  size_t eq = arg.find('=');
  if (eq == std::string::npos) TS_FAIL("--set '", arg, "': expected key=value");
  std::string key = trim(arg.substr(0, eq));
  if (key.empty()) TS_FAIL("--set '", arg, "': empty key");
  std::vector<std::string> parts = split_key(key);
  if (std::any_of(parts.begin(), parts.end(), [](const std::string& p) { return p.empty(); }))
    TS_FAIL("--set '", arg, "': malformed key '", key, "'");

  Node value = override_value(trim(arg.substr(eq + 1)), arg, key);

  // Refuse to turn a scalar into a table: `--set lr.x=1` over `lr = 3e-4` is a typo, not a request.
  const Node* n = &root;
  for (size_t k = 0; k + 1 < parts.size(); ++k) {
    auto it = n->fields.find(parts[k]);
    if (it == n->fields.end()) break;
    n = &it->second;
    if (n->kind != Kind::table)
      TS_FAIL("--set ", arg, ": key '", key, "': '", parts[k], "' is ", describe(*n), " (from ",
              n->origin.where(), "), not a table");
  }
  // Wrap the value in tables along the key and deep-merge it, as a child recipe would be.
  for (size_t k = parts.size(); k-- > 1;) {
    Node table;
    table.origin = {"", 0, arg};
    table.fields.emplace(parts[k], std::move(value));
    value = std::move(table);
  }
  Node top;
  top.fields.emplace(parts[0], std::move(value));
  merge_into(root, std::move(top));
}

// Optimal string alignment distance: Levenshtein plus adjacent transpositions ("stpes" -> "steps" is 1).
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

std::string last_component(const std::string& key) {
  return key.substr(key.rfind('.') + 1);
}

template <class T, class Fmt>
std::string range_text(T min, T max, T lowest, T highest, Fmt fmt) {
  if (min == lowest) return cat("must be <= ", fmt(max));
  if (max == highest) return cat("must be >= ", fmt(min));
  return cat("must be in [", fmt(min), ", ", fmt(max), "]");
}

std::string int_text(int64_t v) {
  return std::to_string(v);
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (size_t k = 0; k < v.size(); ++k) out += (k ? sep : "") + v[k];
  return out;
}

[[noreturn]] void fail_value(const std::string& key, const Node& n, const std::string& what) {
  TS_FAIL(n.origin.where(), ": key '", key, "': ", what);
}

}  // namespace

Recipe Recipe::load(const std::string& path, const std::vector<std::string>& overrides) {
  Node root = Loader().load_file(path, "");
  for (const auto& o : overrides) apply_override(root, o);
  return Recipe(path, std::make_shared<const Node>(std::move(root)));
}

Recipe Recipe::parse(const std::string& text, const std::string& name,
                     const std::vector<std::string>& overrides) {
  Node root = Loader().load_text(text, name);
  for (const auto& o : overrides) apply_override(root, o);
  return Recipe(name, std::make_shared<const Node>(std::move(root)));
}

const Recipe::Node* Recipe::lookup(const std::string& key) {
  known_.insert(key);
  return find_node(*root_, key);
}

bool Recipe::has(const std::string& key) const {
  return find_node(*root_, key) != nullptr;
}

void Recipe::allow_section(const std::string& prefix) {
  sections_.push_back(prefix);
}

bool Recipe::is_known(const std::string& key) const {
  if (known_.count(key)) return true;
  return std::any_of(sections_.begin(), sections_.end(), [&](const std::string& s) {
    return s.empty() || key == s ||
           (key.size() > s.size() && key.compare(0, s.size(), s) == 0 && key[s.size()] == '.');
  });
}

int64_t Recipe::get_int(const std::string& key, int64_t def, int64_t min, int64_t max) {
  int64_t v = def;
  if (const Node* n = lookup(key)) {
    if (n->kind != Kind::integer) fail_value(key, *n, cat("expected an integer, got ", describe(*n)));
    v = n->i;
    if (v < min || v > max)
      fail_value(key, *n, cat(range_text(min, max, INT64_MIN, INT64_MAX, int_text), ", got ", v));
  }
  used_[key] = v;
  return v;
}

int64_t Recipe::require_int(const std::string& key, int64_t min, int64_t max) {
  if (!lookup(key)) fail_missing(key);
  return get_int(key, 0, min, max);
}

double Recipe::get_double(const std::string& key, double def, double min, double max) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  double v = def;
  if (const Node* n = lookup(key)) {
    if (n->kind == Kind::integer)
      v = static_cast<double>(n->i);
    else if (n->kind == Kind::floating)
      v = n->d;
    else
      fail_value(key, *n, cat("expected a number, got ", describe(*n)));
    bool bounded = min != -inf || max != inf;
    if (bounded && !(v >= min && v <= max))
      fail_value(key, *n, cat(range_text(min, max, -inf, inf, format_double), ", got ", format_double(v)));
  }
  used_[key] = v;
  return v;
}

double Recipe::require_double(const std::string& key, double min, double max) {
  if (!lookup(key)) fail_missing(key);
  return get_double(key, 0, min, max);
}

bool Recipe::get_bool(const std::string& key, bool def) {
  bool v = def;
  if (const Node* n = lookup(key)) {
    if (n->kind != Kind::boolean) fail_value(key, *n, cat("expected a boolean, got ", describe(*n)));
    v = n->b;
  }
  used_[key] = v;
  return v;
}

std::string Recipe::get_string(const std::string& key, const std::string& def,
                               const std::vector<std::string>& allowed) {
  std::string v = def;
  if (const Node* n = lookup(key)) {
    if (n->kind != Kind::string) fail_value(key, *n, cat("expected a string, got ", describe(*n)));
    v = n->s;
    if (!allowed.empty() && std::find(allowed.begin(), allowed.end(), v) == allowed.end())
      fail_value(key, *n, cat("must be one of ", join(allowed, ", "), ", got ", quote_string(v)));
  }
  used_[key] = v;
  return v;
}

std::string Recipe::require_string(const std::string& key, const std::vector<std::string>& allowed) {
  if (!lookup(key)) fail_missing(key);
  return get_string(key, "", allowed);
}

std::vector<int64_t> Recipe::get_int_list(const std::string& key, const std::vector<int64_t>& def, int64_t min,
                                          int64_t max) {
  std::vector<int64_t> v = def;
  if (const Node* n = lookup(key)) {
    bool ok = n->kind == Kind::array && std::all_of(n->items.begin(), n->items.end(),
                                                    [](const Node& x) { return x.kind == Kind::integer; });
    if (!ok) fail_value(key, *n, cat("expected a list of integers, got ", describe(*n)));
    v.clear();
    for (const Node& x : n->items) {
      if (x.i < min || x.i > max)
        fail_value(key, x, cat("element ", v.size(), " ", range_text(min, max, INT64_MIN, INT64_MAX, int_text),
                               ", got ", x.i));
      v.push_back(x.i);
    }
  }
  used_[key] = v;
  return v;
}

std::vector<int64_t> Recipe::require_int_list(const std::string& key, int64_t min, int64_t max) {
  if (!lookup(key)) fail_missing(key);
  return get_int_list(key, {}, min, max);
}

std::vector<std::string> Recipe::get_string_list(const std::string& key,
                                                 const std::vector<std::string>& def) {
  std::vector<std::string> v = def;
  if (const Node* n = lookup(key)) {
    bool ok = n->kind == Kind::array && std::all_of(n->items.begin(), n->items.end(),
                                                    [](const Node& x) { return x.kind == Kind::string; });
    if (!ok) fail_value(key, *n, cat("expected a list of strings, got ", describe(*n)));
    v.clear();
    for (const Node& x : n->items) v.push_back(x.s);
  }
  used_[key] = v;
  return v;
}

std::vector<double> Recipe::get_double_list(const std::string& key, const std::vector<double>& def, double min,
                                            double max) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  std::vector<double> v = def;
  if (const Node* n = lookup(key)) {
    bool ok = n->kind == Kind::array && std::all_of(n->items.begin(), n->items.end(), [](const Node& x) {
                return x.kind == Kind::integer || x.kind == Kind::floating;
              });
    if (!ok) fail_value(key, *n, cat("expected a list of numbers, got ", describe(*n)));
    v.clear();
    for (const Node& x : n->items) {
      const double d = x.kind == Kind::integer ? static_cast<double>(x.i) : x.d;
      if (!(d >= min && d <= max))
        fail_value(key, x, cat("element ", v.size(), " ", range_text(min, max, -inf, inf, format_double), ", got ",
                               format_double(d)));
      v.push_back(d);
    }
  }
  used_[key] = v;
  return v;
}

struct Recipe::Unknown {
  const Origin* origin;
  std::string key;
};

std::vector<Recipe::Unknown> Recipe::unknown_keys() const {
  std::vector<Unknown> unknown;
  // Leaves are values and empty tables; a whole subtree is skipped once its key is known.
  auto collect = [&](auto& self, const Node& n, const std::string& key) -> void {
    if (!key.empty() && is_known(key)) return;
    if (n.kind == Kind::table && (key.empty() || !n.fields.empty())) {
      for (const auto& [k, v] : n.fields) self(self, v, key.empty() ? k : cat(key, ".", k));
      return;
    }
    // An empty table some getter read below (all defaults) was used, not mistyped.
    auto below = known_.lower_bound(key + ".");
    if (n.kind == Kind::table && below != known_.end() && below->compare(0, key.size() + 1, key + ".") == 0)
      return;
    unknown.push_back({&n.origin, key});
  };
  collect(collect, *root_, "");
  return unknown;
}

void Recipe::fail_missing(const std::string& key) const {
  // A required key is most often missing because it is misspelled: name the misspelling where it is.
  for (const Unknown& u : unknown_keys())
    if (edit_distance(u.key, key) <= 2)
      TS_FAIL(u.origin->where(), ": unknown key '", u.key, "' (did you mean '", key, "'?)");
  TS_FAIL(path_, ": missing required key '", key, "'");
}

void Recipe::check_no_unknown_keys() const {
  std::vector<Unknown> unknown = unknown_keys();
  if (unknown.empty()) return;

  // Files first in file/line order, then overrides.
  std::sort(unknown.begin(), unknown.end(), [](const Unknown& a, const Unknown& b) {
    return std::tie(a.origin->set, a.origin->file, a.origin->line, a.key) <
           std::tie(b.origin->set, b.origin->file, b.origin->line, b.key);
  });
  std::vector<std::string> lines;
  for (const Unknown& u : unknown) {
    // Closest known key within a few edits (scaled by the last component's length), else a known key
    // with the same last component (the right name in the wrong section).
    std::string hint;
    size_t best = std::max<size_t>(1, std::min<size_t>(3, last_component(u.key).size() / 3)) + 1;
    for (const auto& k : known_) {
      size_t d = edit_distance(u.key, k);
      if (d < best) best = d, hint = k;
    }
    if (hint.empty()) {
      for (const auto& k : known_)
        if (last_component(k) == last_component(u.key)) {
          hint = k;
          break;
        }
    }
    lines.push_back(cat(u.origin->where(), ": unknown key '", u.key, "'",
                        hint.empty() ? "" : cat(" (did you mean '", hint, "'?)")));
  }
  if (lines.size() == 1) TS_FAIL(lines[0]);
  TS_FAIL(lines.size(), " unknown keys in recipe '", path_, "':\n  ", join(lines, "\n  "));
}

std::string Recipe::effective_toml() const {
  struct Table {
    std::map<std::string, const Used*> values;
    std::map<std::string, Table> tables;
  };
  Table root;
  for (const auto& [key, used] : used_) {
    std::vector<std::string> parts = split_key(key);
    Table* t = &root;
    for (size_t k = 0; k + 1 < parts.size(); ++k) {
      TS_CHECK(!t->values.count(parts[k]), "recipe key '", key, "' read below a key read as a value");
      t = &t->tables[parts[k]];
    }
    TS_CHECK(!t->tables.count(parts.back()), "recipe key '", key, "' read as a value and as a table");
    t->values[parts.back()] = &used;
  }

  auto text = [](const Used& u) -> std::string {
    return std::visit(
        [](const auto& v) -> std::string {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, int64_t>)
            return std::to_string(v);
          else if constexpr (std::is_same_v<T, double>)
            return format_double(v);
          else if constexpr (std::is_same_v<T, bool>)
            return v ? "true" : "false";
          else if constexpr (std::is_same_v<T, std::string>)
            return quote_string(v);
          else {
            std::vector<std::string> items;
            for (const auto& x : v) {
              if constexpr (std::is_same_v<T, std::vector<int64_t>>)
                items.push_back(std::to_string(x));
              else if constexpr (std::is_same_v<T, std::vector<double>>)
                items.push_back(format_double(x));
              else
                items.push_back(quote_string(x));
            }
            return cat("[", join(items, ", "), "]");
          }
        },
        u);
  };
  std::ostringstream os;
  // Values of a table under its [header] (none for the root), then its subtables; tables holding only
  // subtables need no header of their own.
  auto emit = [&](auto& self, const Table& t, const std::string& prefix) -> void {
    if (!t.values.empty()) {
      if (!prefix.empty()) os << (os.tellp() > 0 ? "\n[" : "[") << prefix << "]\n";
      for (const auto& [k, v] : t.values) os << quote_key(k) << " = " << text(*v) << "\n";
    }
    for (const auto& [k, sub] : t.tables)
      self(self, sub, prefix.empty() ? quote_key(k) : cat(prefix, ".", quote_key(k)));
  };
  emit(emit, root, "");
  return os.str();
}

}  // namespace tessera
