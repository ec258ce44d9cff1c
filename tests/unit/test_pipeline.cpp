// Pipeline files (cli/pipeline.h): the default `after`, the topological order, and the errors that name the file,
// the line and the key. Running pipelines is tested end to end (tests/e2e/pipeline.sh).
#include <gtest/gtest.h>

#include "cli/pipeline.h"
#include "tests/unit/test_util.h"

using namespace tessera;

namespace {

std::string write(const std::string& name, const std::string& text) {
  return tessera::testing::write_file(tessera::testing::temp_dir("pipeline") / name, text);
}

std::vector<std::string> order_names(const Pipeline& p) {
  std::vector<std::string> out;
  for (size_t i : p.order) out.push_back(p.stages[i].name);
  return out;
}

}  // namespace

TEST(Pipeline, DefaultAfterIsThePreviousStageAndOrderIsTopological) {
  std::string path = write("p1.toml", R"(
[[stage]]
name = "b"
recipe = "b.toml"
after = ["c"]

[[stage]]
name = "a"
command = ["data", "prompts", "--out", "x.jsonl"]
outputs = ["x.jsonl"]
after = []

[[stage]]
name = "c"
command = ["data", "prompts", "--out", "y.jsonl"]
stdout = "y.json"

[[stage]]
name = "d"
recipe = "d.toml"
set = ["training.steps=3"]
)");
  Pipeline p = load_pipeline(path);
  EXPECT_EQ(p.name, "p1");
  ASSERT_EQ(p.stages.size(), 4u);
  EXPECT_TRUE(p.stages[0].after == std::vector<std::string>{"c"});
  EXPECT_TRUE(p.stages[1].after.empty());
  EXPECT_TRUE(p.stages[2].after == std::vector<std::string>{"a"});  // the stage before it in the file
  EXPECT_TRUE(p.stages[3].after == std::vector<std::string>{"c"});
  EXPECT_EQ(p.stages[3].set, std::vector<std::string>{"training.steps=3"});
  EXPECT_EQ(p.stages[2].stdout_path, "y.json");
  EXPECT_EQ(p.stages[0].line, 2);
  // a first (the only stage ready), then c, then b and d in file order
  EXPECT_EQ(order_names(p), (std::vector<std::string>{"a", "c", "b", "d"}));
}

TEST(Pipeline, ErrorsNameFileLineAndKey) {
  auto err = [](const std::string& name, const std::string& text) {
    std::string path = write(name, text);
    return tessera::testing::error_of([&] { load_pipeline(path); });
  };
  std::string e = err("typo.toml", "[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\nstes = 1\n");
  EXPECT_NE(e.find("typo.toml:4: unknown key 'stage.stes'"), std::string::npos) << e;
  e = err("top.toml", "nmae = \"x\"\n[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\n");
  EXPECT_NE(e.find("top.toml:1: unknown key 'nmae'"), std::string::npos) << e;
  e = err("type.toml", "[[stage]]\nname = \"a\"\nrecipe = 5\n");
  EXPECT_NE(e.find("type.toml:3: key 'stage.recipe': must be a string"), std::string::npos) << e;
  e = err("both.toml", "[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\ncommand = [\"data\"]\n");
  EXPECT_NE(e.find("both.toml:1: stage 'a': give either recipe"), std::string::npos) << e;
  e = err("neither.toml", "[[stage]]\nname = \"a\"\n");
  EXPECT_NE(e.find("not neither"), std::string::npos) << e;
  e = err("noout.toml", "[[stage]]\nname = \"a\"\ncommand = [\"data\", \"prompts\"]\n");
  EXPECT_NE(e.find("needs outputs"), std::string::npos) << e;
  e = err("train.toml", "[[stage]]\nname = \"a\"\ncommand = [\"train\", \"r.toml\"]\noutputs = [\"x\"]\n");
  EXPECT_NE(e.find("run training as a recipe stage"), std::string::npos) << e;
  e = err("dup.toml", "[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\n[[stage]]\nname = \"a\"\nrecipe = \"s.toml\"\n");
  EXPECT_NE(e.find("dup.toml:4: stage 'a' is defined twice (first at line 1)"), std::string::npos) << e;
  e = err("unknown.toml", "[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\nafter = [\"zz\"]\n");
  EXPECT_NE(e.find("unknown.toml:1: stage 'a': key 'stage.after': no stage 'zz' (stages: a)"), std::string::npos) << e;
  e = err("cycle.toml",
          "[[stage]]\nname = \"a\"\nrecipe = \"r.toml\"\nafter = [\"b\"]\n[[stage]]\nname = \"b\"\nrecipe = \"r.toml\"\n");
  EXPECT_NE(e.find("cycle among: a, b"), std::string::npos) << e;
  e = err("badname.toml", "[[stage]]\nname = \"a/b\"\nrecipe = \"r.toml\"\n");
  EXPECT_NE(e.find("key 'stage.name'"), std::string::npos) << e;
  e = err("empty.toml", "name = \"x\"\n");
  EXPECT_NE(e.find("no stages"), std::string::npos) << e;
  e = err("syntax.toml", "[[stage]\nname = \"a\"\n");
  EXPECT_NE(e.find("syntax.toml:1"), std::string::npos) << e;
  EXPECT_NE(tessera::testing::error_of([] { load_pipeline("/nonexistent/p.toml"); }).find("does not exist"),
            std::string::npos);
}
