// Recipes: strict TOML files with `inherit` and --set overrides. Every key must be read by some stage
// (typos are errors, not silently ignored defaults), and the values actually used can be written back
// as one self-contained TOML file for the run directory.
#pragma once
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <variant>
#include <vector>

namespace tessera {

class Recipe {
 public:
  // Load a TOML file. `inherit = "rel/path.toml"` or `inherit = ["a.toml", "b.toml"]` at top level: paths
  // relative to the inheriting file; parents are merged in order (later wins), then the child's own keys win.
  // Tables merge key by key (deep merge), arrays/scalars replace. Cycles are an error naming the files.
  // Then `overrides` ("a.b.c=value") are applied: value parsed as a TOML value (123, 1e-3, true, "str",
  // [1,2]); a bare word that is not a valid TOML value is taken as a string (so --set job.name=foo works).
  static Recipe load(const std::string& path, const std::vector<std::string>& overrides = {});
  // Same from a string; `name` stands in for the file name in messages, and relative `inherit` paths are
  // resolved against its directory.
  static Recipe parse(const std::string& text, const std::string& name,
                      const std::vector<std::string>& overrides = {});

  // Typed getters by dotted key. Each marks the key as known (even when absent) and records the value used
  // (default included) for effective_toml(). Errors name "file:line: key 'a.b': ..." for values from a file
  // and "--set a.b=...: key 'a.b': ..." for overrides. Defaults are not range-checked.
  int64_t get_int(const std::string& key, int64_t def, int64_t min = INT64_MIN, int64_t max = INT64_MAX);
  int64_t require_int(const std::string& key, int64_t min = INT64_MIN, int64_t max = INT64_MAX);
  // Accepts integers too. NaN passes only when no bound is given.
  double get_double(const std::string& key, double def, double min = -std::numeric_limits<double>::infinity(),
                    double max = std::numeric_limits<double>::infinity());
  double require_double(const std::string& key, double min = -std::numeric_limits<double>::infinity(),
                        double max = std::numeric_limits<double>::infinity());
  bool get_bool(const std::string& key, bool def);
  std::string get_string(const std::string& key, const std::string& def,
                         const std::vector<std::string>& allowed = {});
  std::string require_string(const std::string& key, const std::vector<std::string>& allowed = {});
  // Each element must lie in [min, max]; an error names the element's index (and its line, for a file).
  std::vector<int64_t> get_int_list(const std::string& key, const std::vector<int64_t>& def,
                                    int64_t min = INT64_MIN, int64_t max = INT64_MAX);
  std::vector<int64_t> require_int_list(const std::string& key, int64_t min = INT64_MIN, int64_t max = INT64_MAX);
  std::vector<std::string> get_string_list(const std::string& key, const std::vector<std::string>& def);
  // Numbers (integers accepted), each in [min, max].
  std::vector<double> get_double_list(const std::string& key, const std::vector<double>& def,
                                      double min = -std::numeric_limits<double>::infinity(),
                                      double max = std::numeric_limits<double>::infinity());

  // Present in the merged recipe (does not mark the key as known).
  bool has(const std::string& key) const;
  // Marks every key below `prefix` (and `prefix` itself) as known, for sections a later stage will read,
  // without recording values.
  void allow_section(const std::string& prefix);

  // Throws one tessera::Error listing every key in the merged recipe that no getter asked for, each as
  // "file:line: unknown key 'training.stpes' (did you mean 'training.steps'?)", or "--set k=v: unknown key
  // ..." for overrides.
  void check_no_unknown_keys() const;

  // The effective recipe as TOML: every key read through a getter with the value used (defaults included),
  // grouped in tables, sorted by key; doubles in the shortest form that round-trips exactly.
  std::string effective_toml() const;

  const std::string& path() const { return path_; }

  struct Node;  // merged TOML tree; defined in recipe.cpp

 private:
  using Used =
      std::variant<int64_t, double, bool, std::string, std::vector<int64_t>, std::vector<double>, std::vector<std::string>>;

  Recipe(std::string path, std::shared_ptr<const Node> root)
      : path_(std::move(path)), root_(std::move(root)) {}
  // Marks `key` known and returns its node, or nullptr when absent.
  const Node* lookup(const std::string& key);
  [[noreturn]] void fail_missing(const std::string& key) const;
  struct Unknown;
  std::vector<Unknown> unknown_keys() const;  // present in the recipe, asked for by no getter
  bool is_known(const std::string& key) const;

  std::string path_;
  std::shared_ptr<const Node> root_;  // immutable after load, so copies of a Recipe may share it
  std::set<std::string> known_;
  std::vector<std::string> sections_;
  std::map<std::string, Used> used_;
};

}  // namespace tessera
