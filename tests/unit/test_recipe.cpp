// Recipe loader: inherit chains, --set overrides, strict unknown-key checks, error messages, effective TOML.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>

#include "cli/recipe.h"
#include "core/error.h"

namespace fs = std::filesystem;
using tessera::Recipe;

namespace {

// A fresh directory per test, removed afterwards.
class RecipeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("tessera_recipe_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `text` at `rel` (creating directories) and returns the full path.
  std::string write(const std::string& rel, const std::string& text) {
    fs::path p = dir_ / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }

  fs::path dir_;
};

// Runs `fn`, expecting a tessera::Error whose message contains every one of `parts`; returns the message.
std::string error_of(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const tessera::Error& e) {
    std::string msg = e.what();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "missing '" << p << "' in: " << msg;
    return msg;
  }
  ADD_FAILURE() << "no tessera::Error thrown";
  return "";
}

bool same_bits(double a, double b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

TEST_F(RecipeTest, InheritChainMergesInOrderAcrossDirectories) {
  write("models/common/base.toml",
        "a = 1\nb = 1\nc = 1\nlist = [1, 2, 3]\n"
        "[model]\ndim = 64\nlayers = 2\nheads = 4\n[model.norm]\neps = 1e-5\nkind = \"rms\"\n");
  write("models/mid.toml",
        "inherit = \"common/base.toml\"\nb = 2\nc = 2\nlist = [9]\n[model]\nlayers = 4\n[model.norm]\nkind = "
        "\"layer\"\n");
  std::string top = write("exp/run.toml", "inherit = \"../models/mid.toml\"\nc = 3\n[model]\nheads = 8\n");

  Recipe r = Recipe::load(top);
  EXPECT_EQ(r.path(), top);
  EXPECT_EQ(r.get_int("a", 0), 1);
  EXPECT_EQ(r.get_int("b", 0), 2);
  EXPECT_EQ(r.get_int("c", 0), 3);
  EXPECT_EQ(r.get_int_list("list", {}), std::vector<int64_t>{9});  // arrays replace, never concatenate
  EXPECT_EQ(r.get_int("model.dim", 0), 64);
  EXPECT_EQ(r.get_int("model.layers", 0), 4);
  EXPECT_EQ(r.get_int("model.heads", 0), 8);
  EXPECT_EQ(r.get_double("model.norm.eps", 0), 1e-5);
  EXPECT_EQ(r.get_string("model.norm.kind", ""), "layer");
  EXPECT_FALSE(r.has("inherit"));
  EXPECT_NO_THROW(r.check_no_unknown_keys());  // `inherit` is never unknown
}

TEST_F(RecipeTest, InheritListLaterParentWinsThenChild) {
  write("a.toml", "x = \"a\"\ny = \"a\"\nonly_a = true\n[t]\np = 1\n");
  write("b.toml", "x = \"b\"\ny = \"b\"\n[t]\nq = 2\n");
  std::string top = write("child.toml", "inherit = [\"a.toml\", \"b.toml\"]\ny = \"child\"\n");
  Recipe r = Recipe::load(top);
  EXPECT_EQ(r.get_string("x", ""), "b");
  EXPECT_EQ(r.get_string("y", ""), "child");
  EXPECT_TRUE(r.get_bool("only_a", false));
  EXPECT_EQ(r.get_int("t.p", 0), 1);
  EXPECT_EQ(r.get_int("t.q", 0), 2);
  r.check_no_unknown_keys();
}

TEST_F(RecipeTest, ChildScalarReplacesParentTableAndViceVersa) {
  write("base.toml", "[opt]\nlr = 1.0\nsched = 5\n");
  std::string top = write("child.toml", "inherit = \"base.toml\"\nopt = \"sgd\"\n[sched]\nkind = \"cos\"\n");
  Recipe r = Recipe::load(top);
  EXPECT_EQ(r.get_string("opt", ""), "sgd");
  EXPECT_FALSE(r.has("opt.lr"));
  EXPECT_EQ(r.get_string("sched.kind", ""), "cos");
}

TEST_F(RecipeTest, InheritCycleNamesTheFiles) {
  write("a.toml", "inherit = \"b.toml\"\nx = 1\n");
  write("b.toml", "inherit = \"sub/c.toml\"\n");
  write("sub/c.toml", "inherit = \"../a.toml\"\n");
  error_of([&] { Recipe::load((dir_ / "a.toml").string()); }, {"cycle", "a.toml", "b.toml", "c.toml"});

  std::string self = write("self.toml", "inherit = \"self.toml\"\n");
  error_of([&] { Recipe::load(self); }, {"cycle", "self.toml"});
}

TEST_F(RecipeTest, DiamondInheritanceIsNotACycle) {
  write("root.toml", "x = 1\n");
  write("l.toml", "inherit = \"root.toml\"\nl = 1\n");
  write("r.toml", "inherit = \"root.toml\"\nr = 1\n");
  Recipe r = Recipe::load(write("top.toml", "inherit = [\"l.toml\", \"r.toml\"]\n"));
  EXPECT_EQ(r.get_int("x", 0) + r.get_int("l", 0) + r.get_int("r", 0), 3);
}

TEST_F(RecipeTest, MissingFiles) {
  std::string missing = (dir_ / "nope.toml").string();
  error_of([&] { Recipe::load(missing); }, {"recipe file '" + missing + "' not found"});

  std::string child = write("child.toml", "x = 1\ninherit = \"gone.toml\"\n");
  error_of([&] { Recipe::load(child); }, {"gone.toml' not found", child + ":2"});
}

TEST_F(RecipeTest, InheritMustBeFileNames) {
  std::string f = write("bad.toml", "inherit = 3\n");
  error_of([&] { Recipe::load(f); }, {f + ":1", "inherit", "got integer 3"});
}

TEST_F(RecipeTest, SyntaxErrorNamesFileLineAndColumn) {
  std::string f = write("bad.toml", "a = 1\n\nb = = 2\n");
  std::string msg = error_of([&] { Recipe::load(f); }, {});
  EXPECT_EQ(msg.rfind(f + ":3:", 0), 0u) << msg;

  error_of([] { Recipe::parse("[t]\nx = [1, 2\n", "inline.toml"); }, {"inline.toml:"});
}

TEST_F(RecipeTest, SetOverridesInheritedKeysWithTomlValues) {
  write("base.toml", "[training]\nsteps = 100\nlr = 0.5\n[job]\nname = \"base\"\n");
  std::string top = write("child.toml", "inherit = \"base.toml\"\n[training]\nbatch = 8\n");
  Recipe r = Recipe::load(
      top, {"training.steps=5", "training.lr = 1e-3", "job.name=foo", "job.tag=\"a b\"", "job.flag=true",
            "job.dims=[1, 2]", "job.words=[\"x\", \"y\"]", "job.ver=1.2.3", "job.note=has spaces"});
  EXPECT_EQ(r.get_int("training.steps", 0), 5);
  EXPECT_EQ(r.get_double("training.lr", 0), 1e-3);
  EXPECT_EQ(r.get_int("training.batch", 0), 8);
  EXPECT_EQ(r.get_string("job.name", ""), "foo");  // bare word: not TOML, taken as a string
  EXPECT_EQ(r.get_string("job.tag", ""), "a b");
  EXPECT_TRUE(r.get_bool("job.flag", false));
  EXPECT_EQ(r.get_int_list("job.dims", {}), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(r.get_string_list("job.words", {}), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(r.get_string("job.ver", ""), "1.2.3");
  EXPECT_EQ(r.get_string("job.note", ""), "has spaces");
  r.check_no_unknown_keys();

  // Later --set wins; an inline table deep-merges like a child recipe.
  Recipe r2 = Recipe::load(top, {"training.steps=1", "training.steps=2", "training={warmup=3}"});
  EXPECT_EQ(r2.get_int("training.steps", 0), 2);
  EXPECT_EQ(r2.get_int("training.warmup", 0), 3);
  EXPECT_EQ(r2.get_int("training.batch", 0), 8);
}

TEST_F(RecipeTest, SetErrors) {
  error_of([] { Recipe::parse("", "r.toml", {"training.steps"}); }, {"--set 'training.steps'", "key=value"});
  error_of([] { Recipe::parse("", "r.toml", {"=3"}); }, {"--set '=3'", "empty key"});
  error_of([] { Recipe::parse("", "r.toml", {"a..b=3"}); }, {"--set 'a..b=3'"});
  // A scalar cannot silently become a table.
  error_of([] { Recipe::parse("lr = 0.1\n", "r.toml", {"lr.x=1"}); },
           {"--set lr.x=1", "'lr'", "not a table"});
}

TEST_F(RecipeTest, SetOfUnknownKeyIsReportedAsSet) {
  Recipe r = Recipe::parse("[training]\nsteps = 10\n", "r.toml", {"training.stpes=3"});
  EXPECT_EQ(r.get_int("training.steps", 0), 10);
  error_of([&] { r.check_no_unknown_keys(); },
           {"--set training.stpes=3: unknown key 'training.stpes'", "did you mean 'training.steps'?"});
}

TEST_F(RecipeTest, UnknownKeyInFileNamesFileLineAndSuggestion) {
  std::string f = write("run.toml", "# comment\n[training]\nsteps = 10\nstpes = 20\n");
  Recipe r = Recipe::load(f);
  r.get_int("training.steps", 0);
  std::string msg = error_of([&] { r.check_no_unknown_keys(); },
                             {f + ":4: unknown key 'training.stpes' (did you mean 'training.steps'?)"});
  EXPECT_EQ(msg.find("'training.steps' ("), std::string::npos) << "a read key is not unknown: " << msg;
}

TEST_F(RecipeTest, UnknownKeysInParentsAreAllListed) {
  write("base.toml", "[model]\nlr = 1.0\n");
  std::string top = write("top.toml", "inherit = \"base.toml\"\n\n[optim]\nlr = 0.1\nzzz_unrelated = 1\n");
  Recipe r = Recipe::load(top);
  r.get_double("optim.lr", 0);
  std::string base = (dir_ / "base.toml").lexically_normal().string();
  error_of([&] { r.check_no_unknown_keys(); },
           {"2 unknown keys", base + ":2: unknown key 'model.lr' (did you mean 'optim.lr'?)",
            top + ":5: unknown key 'optim.zzz_unrelated'"});
  std::string msg = error_of([&] { r.check_no_unknown_keys(); }, {});
  EXPECT_EQ(msg.find("zzz_unrelated' (did"), std::string::npos) << "no far-fetched suggestion: " << msg;
}

TEST_F(RecipeTest, EmptyTableIsUnknownUnlessReadBelow) {
  Recipe r = Recipe::parse("[unused]\n[model]\n", "r.toml");
  r.get_int("model.dim", 8);
  error_of([&] { r.check_no_unknown_keys(); }, {"r.toml:1: unknown key 'unused'"});
  std::string msg = error_of([&] { r.check_no_unknown_keys(); }, {});
  EXPECT_EQ(msg.find("'model'"), std::string::npos) << msg;
}

TEST_F(RecipeTest, AllowSectionAndHas) {
  Recipe r = Recipe::parse("[data]\npath = \"x\"\n[data.mix]\nw = [1, 2]\n[datax]\ny = 1\n", "r.toml");
  EXPECT_TRUE(r.has("data.mix.w"));
  EXPECT_TRUE(r.has("data"));
  EXPECT_FALSE(r.has("data.nope"));
  EXPECT_FALSE(r.has("data.path.deeper"));
  r.allow_section("data");
  // has() did not mark datax; the prefix "data" does not cover "datax".
  error_of([&] { r.check_no_unknown_keys(); }, {"unknown key 'datax.y'"});
  r.allow_section("datax");
  EXPECT_NO_THROW(r.check_no_unknown_keys());
  EXPECT_EQ(r.effective_toml(), "");  // allowed sections record no values
}

TEST_F(RecipeTest, WrongTypeNamesFileLineKeyAndValue) {
  std::string f =
      write("t.toml", "[training]\n\nsteps = \"x\"\nlr = true\nflag = 1\nname = 3\ndims = [1, \"a\"]\n");
  Recipe r = Recipe::load(f);
  error_of([&] { r.get_int("training.steps", 0); },
           {f + ":3: key 'training.steps': expected an integer, got string \"x\""});
  error_of([&] { r.get_double("training.lr", 0); },
           {f + ":4: key 'training.lr': expected a number, got boolean true"});
  error_of([&] { r.get_bool("training.flag", false); }, {f + ":5:", "expected a boolean, got integer 1"});
  error_of([&] { r.get_string("training.name", ""); }, {f + ":6:", "expected a string, got integer 3"});
  error_of([&] { r.get_int_list("training.dims", {}); },
           {f + ":7:", "expected a list of integers, got array [1, \"a\"]"});
  error_of([&] { r.get_string_list("training.dims", {}); }, {"expected a list of strings"});
  error_of([&] { r.get_int("training", 0); }, {"expected an integer, got table"});
  // Floats are not silently truncated to integers.
  error_of([] { Recipe::parse("n = 3.0\n", "r.toml").get_int("n", 0); },
           {"r.toml:1: key 'n'", "got float 3.0"});

  Recipe o = Recipe::parse("", "r.toml", {"training.steps=abc"});
  error_of([&] { o.get_int("training.steps", 0); },
           {"--set training.steps=abc: key 'training.steps': expected an integer, got string \"abc\""});
}

TEST_F(RecipeTest, DoubleAcceptsIntegers) {
  Recipe r = Recipe::parse("a = 3\nb = -2\n", "r.toml");
  EXPECT_EQ(r.get_double("a", 0), 3.0);
  EXPECT_EQ(r.require_double("b"), -2.0);
}

TEST_F(RecipeTest, OutOfRange) {
  Recipe r = Recipe::parse("heads = 0\nlr = -0.5\nbig = 100\ndrop = 1.5\n", "r.toml");
  error_of([&] { r.get_int("heads", 1, 1, 64); }, {"r.toml:1: key 'heads': must be in [1, 64], got 0"});
  error_of([&] { r.get_double("lr", 1, 0.0); }, {"r.toml:2: key 'lr': must be >= 0.0, got -0.5"});
  error_of([&] { r.require_int("big", INT64_MIN, 10); }, {"key 'big': must be <= 10, got 100"});
  error_of([&] { r.get_double("drop", 0, 0.0, 1.0); }, {"must be in [0.0, 1.0], got 1.5"});
  EXPECT_EQ(r.get_int("heads", 1, 0, 64), 0);   // bounds are inclusive
  EXPECT_EQ(r.get_int("absent", 0, 1, 64), 0);  // defaults are the caller's business
}

TEST_F(RecipeTest, AllowedStrings) {
  Recipe r = Recipe::parse("[optim]\nname = \"sgd\"\n", "r.toml");
  error_of(
      [&] {
        r.get_string("optim.name", "adamw", {"adamw", "muon"});
      },
      {"r.toml:2: key 'optim.name': must be one of adamw, muon, got \"sgd\""});
  error_of([&] { r.require_string("optim.name", {"adamw", "muon"}); }, {"must be one of adamw, muon"});
  EXPECT_EQ(r.get_string("optim.name", "", {"sgd", "adamw"}), "sgd");
  EXPECT_EQ(r.get_string("optim.other", "muon", {"adamw", "muon"}), "muon");
}

TEST_F(RecipeTest, MissingRequiredKeyNamesKeyAndFile) {
  std::string f = write("req.toml", "[model]\ndim = 4\n");
  Recipe r = Recipe::load(f);
  EXPECT_EQ(r.require_int("model.dim", 1), 4);
  error_of([&] { r.require_int("model.layers"); }, {f, "missing required key 'model.layers'"});
  error_of([&] { r.require_double("optim.lr"); }, {f, "missing required key 'optim.lr'"});
  error_of([&] { r.require_string("data.path"); }, {f, "missing required key 'data.path'"});
}

TEST_F(RecipeTest, EffectiveTomlRoundTripsExactly) {
  const std::string tricky = "say \"hi\"\\ C:\\path\ttab\nnewline \x01 \xc3\xa9 'single'";
  Recipe r = Recipe::parse(
      "inherit = []\n"
      "[optim]\nlr = 3e-4\nbeta2 = 0.1\nwd = 1e300\neps = 5e-324\nmin_lr = -0.0\nsteps = "
      "9223372036854775807\n"
      "[model]\ndims = [1, -2, 3]\n",
      "r.toml",
      {"job.name=" +
       std::string("\"say \\\"hi\\\"\\\\ C:\\\\path\\ttab\\nnewline \\u0001 \xc3\xa9 'single'\"")});

  auto read_all = [&](Recipe& x) {
    struct Values {
      double lr, beta2, wd, eps, min_lr, third, inf_default;
      int64_t steps, neg;
      bool on;
      std::string name, plain;
      std::vector<int64_t> dims;
      std::vector<std::string> tags;
    } v;
    v.lr = x.get_double("optim.lr", 0);
    v.beta2 = x.get_double("optim.beta2", 0);
    v.wd = x.get_double("optim.wd", 0);
    v.eps = x.get_double("optim.eps", 0);
    v.min_lr = x.get_double("optim.min_lr", 1);
    v.third = x.get_double("optim.sched.third", 1.0 / 3.0);  // default, nested table
    v.inf_default = x.get_double("optim.clip", std::numeric_limits<double>::infinity());
    v.steps = x.get_int("optim.steps", 0);
    v.neg = x.get_int("neg", INT64_MIN);
    v.on = x.get_bool("model.tied", true);
    v.name = x.get_string("job.name", "");
    v.plain = x.get_string("job.odd key", "x");
    v.dims = x.get_int_list("model.dims", {});
    v.tags = x.get_string_list("job.tags", {"a\"b", "c\\d", ""});
    return v;
  };
  auto a = read_all(r);
  EXPECT_EQ(a.name, tricky);
  EXPECT_NO_THROW(r.check_no_unknown_keys());

  std::string text = r.effective_toml();
  EXPECT_EQ(text.find("inherit"), std::string::npos) << text;
  EXPECT_NE(text.find("beta2 = 0.1\n"), std::string::npos) << "shortest exact form: " << text;
  EXPECT_NE(text.find("lr = 3e-4\n"), std::string::npos) << text;
  EXPECT_EQ(text, r.effective_toml());  // deterministic
  EXPECT_LT(text.find("neg = "), text.find("[job]")) << "root values before tables: " << text;
  EXPECT_LT(text.find("[job]"), text.find("[model]")) << text;
  EXPECT_LT(text.find("[optim]"), text.find("[optim.sched]")) << text;

  Recipe back = Recipe::parse(text, "effective.toml");
  auto b = read_all(back);
  EXPECT_NO_THROW(back.check_no_unknown_keys()) << text;
  for (auto [x, y] : {std::pair{a.lr, b.lr},
                      {a.beta2, b.beta2},
                      {a.wd, b.wd},
                      {a.eps, b.eps},
                      {a.min_lr, b.min_lr},
                      {a.third, b.third},
                      {a.inf_default, b.inf_default}})
    EXPECT_TRUE(same_bits(x, y)) << x << " vs " << y << " in\n" << text;
  EXPECT_EQ(a.lr, 3e-4);
  EXPECT_EQ(a.beta2, 0.1);
  EXPECT_TRUE(std::signbit(b.min_lr));
  EXPECT_EQ(b.steps, INT64_MAX);
  EXPECT_EQ(b.neg, INT64_MIN);
  EXPECT_EQ(b.on, true);
  EXPECT_EQ(b.name, tricky);
  EXPECT_EQ(b.plain, "x");
  EXPECT_EQ(b.dims, (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(b.tags, a.tags);
  EXPECT_EQ(back.effective_toml(), text);  // a fixed point
}

TEST_F(RecipeTest, EffectiveTomlRoundTripsRandomDoubles) {
  std::mt19937_64 rng(42);
  std::vector<double> values = {0.1,
                                1.0 / 3.0,
                                5e-324,
                                2.2250738585072014e-308,
                                1.7976931348623157e308,
                                1e21,
                                1e-7,
                                123456789012345678.0,
                                -2.5};
  while (values.size() < 2000) {
    uint64_t bits = rng();
    double v;
    std::memcpy(&v, &bits, sizeof v);
    if (std::isfinite(v)) values.push_back(v);
  }
  Recipe r = Recipe::parse("", "r.toml");
  for (size_t k = 0; k < values.size(); ++k) r.get_double("v.k" + std::to_string(k), values[k]);
  Recipe back = Recipe::parse(r.effective_toml(), "effective.toml");
  for (size_t k = 0; k < values.size(); ++k) {
    double got = back.get_double("v.k" + std::to_string(k), std::nan(""));
    ASSERT_TRUE(same_bits(got, values[k])) << values[k] << " came back as " << got;
  }
}

TEST_F(RecipeTest, EffectiveTomlLayout) {
  Recipe r = Recipe::parse("", "r.toml");
  r.get_int("b.y", 2);
  r.get_int("top", 1);
  r.get_double("b.x", 1.0);
  r.get_string("a.deep.s", "v");
  EXPECT_EQ(r.effective_toml(), "top = 1\n\n[a.deep]\ns = \"v\"\n\n[b]\nx = 1.0\ny = 2\n");
}

TEST_F(RecipeTest, DottedKeyNamesAreRejected) {
  error_of([] { Recipe::parse("\"a.b\" = 1\n", "r.toml"); }, {"r.toml:1", "'a.b'", "not supported"});
}

}  // namespace

TEST_F(RecipeTest, DoubleListsAcceptIntegersCheckRangesAndRoundTrip) {
  std::string f = write("w.toml", "[opd]\nweights = [1, 0.25, 3e-7]\nbad = [1, \"x\"]\nneg = [0.5, -1]\n");
  Recipe r = Recipe::load(f);
  EXPECT_EQ(r.get_double_list("opd.weights", {}), (std::vector<double>{1.0, 0.25, 3e-7}));
  error_of([&] { r.get_double_list("opd.bad", {}); }, {f + ":3:", "expected a list of numbers, got array [1, \"x\"]"});
  error_of([&] { r.get_double_list("opd.neg", {}, 0.0); }, {f + ":4:", "element 1", "got -1"});
  EXPECT_EQ(r.get_double_list("opd.absent", {0.1, 2.0}), (std::vector<double>{0.1, 2.0}));
  Recipe back = Recipe::parse(r.effective_toml(), "effective.toml");
  EXPECT_EQ(back.get_double_list("opd.weights", {}), (std::vector<double>{1.0, 0.25, 3e-7}));
  EXPECT_EQ(back.get_double_list("opd.absent", {}), (std::vector<double>{0.1, 2.0}));
}
