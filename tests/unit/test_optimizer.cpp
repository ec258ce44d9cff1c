// The hybrid optimizer (optim/optimizer.h, docs/optimizer.md) on the tiny V4 model: the group rule (every
// kind == matrix parameter, 3-D expert stacks and grouped wo_a included, to Muon; embedding, head and vectors to
// AdamW), the optimizer.adamw_params override, optimizer.name = "adamw", the unknown-name error, one step equal
// bitwise to AdamW and Muon applied separately to the split lists, the state() keys and shapes, the start-of-run
// group listing, and a checkpoint round trip (src/io/checkpoint.h) that continues bitwise like an uninterrupted run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "io/checkpoint.h"
#include "optim/optimizer.h"
#include "tests/unit/v4_test_model.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

OptimizerConfig config(const std::string& name, std::vector<std::string> adamw_params = {}) {
  OptimizerConfig c;
  c.name = name;
  c.adamw.lr = c.muon.lr = 1e-2;
  c.adamw_params = std::move(adamw_params);
  return c;
}

bool has_param(const ParamList& ps, const std::string& name) {
  return std::any_of(ps.begin(), ps.end(), [&](const Param* p) { return p->name == name; });
}

std::set<std::string> names(const ParamList& ps) {
  std::set<std::string> s;
  for (const Param* p : ps) s.insert(p->name);
  return s;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

bool all_zero(const Tensor& t) {
  const auto* b = static_cast<const unsigned char*>(t.raw());
  return std::all_of(b, b + t.nbytes(), [](unsigned char x) { return x == 0; });
}

// A gradient for every parameter that depends on (seed, step, name) only, so two models get the same one.
void set_gradients(const ParamList& ps, uint64_t seed, int64_t step) {
  for (Param* p : ps) {
    Tensor f = Tensor::empty(p->value.shape(), DType::f32);
    Rng{seed + uint64_t(step), stream_id(p->name.c_str())}.fill_normal(f.data<float>(), f.numel(), 0.0, 0.1);
    p->grad.copy_from(f.to(p->grad.dtype()));
  }
}

// The real objective's gradient on a fixed batch of this step.
void model_gradients(V4Model& m, int64_t step) {
  TokenBatch b = tiny_v4_batch(m.config().vocab_size, 100 + uint64_t(step));
  m.zero_grad();
  m.forward_backward(b, 1.0 / double(b.count_targets()));
}

CheckpointMeta meta_at(int64_t step, uint64_t seed) {
  CheckpointMeta m;
  m.step = step;
  m.seed = seed;
  return m;
}

// "muon: 3 tensors, 120 parameters (a, b, c)" -> {3, 120, [a, b, c]}.
struct Group {
  int64_t tensors = -1, elements = -1;
  std::vector<std::string> names;
};
Group parse_group(const std::string& line, const std::string& rule) {
  Group g;
  EXPECT_TRUE(line.starts_with(rule + ": ")) << line;
  std::istringstream in(line.substr(rule.size() + 2));
  std::string word;
  in >> g.tensors >> word;
  EXPECT_EQ(word, "tensors,") << line;
  in >> g.elements >> word;
  EXPECT_EQ(word, "parameters") << line;
  size_t open = line.find(" ("), close = line.rfind(')');
  if (open != std::string::npos && close != std::string::npos) {
    std::string list = line.substr(open + 2, close - open - 2);
    for (size_t pos = 0; pos <= list.size();) {
      size_t comma = list.find(", ", pos);
      g.names.push_back(list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
      if (comma == std::string::npos) break;
      pos = comma + 2;
    }
  }
  return g;
}

}  // namespace

TEST(OptimizerGroups, MatricesToMuonEverythingElseToAdamW) {
  V4Model model(tiny_v4_config());
  ParamList params = model.params(), adamw, muon;
  split_param_groups(params, config("muon"), adamw, muon);
  EXPECT_EQ(adamw.size() + muon.size(), params.size());
  for (const Param* p : params) {
    const bool is_matrix = p->kind == ParamKind::matrix;
    EXPECT_EQ(has_param(muon, p->name), is_matrix) << p->name << " (" << param_kind_name(p->kind) << ")";
    EXPECT_EQ(has_param(adamw, p->name), !is_matrix) << p->name << " (" << param_kind_name(p->kind) << ")";
  }
  // The tiny config has every kind of parameter the rule names (layer 1 is CSA, layer 2 HCA, layer 0 hash-routed).
  for (const char* n : {"layers.0.hc_attn.fn", "layers.0.hc_ffn.fn", "hc_head.fn", "layers.0.attn.wq_a",
                        "layers.0.attn.wq_b", "layers.0.attn.wkv", "layers.0.attn.wo_a", "layers.0.attn.wo_b",
                        "layers.1.attn.compressor.wkv", "layers.1.attn.compressor.wgate",
                        "layers.2.attn.compressor.wkv", "layers.1.attn.indexer.wq_b",
                        "layers.1.attn.indexer.weights_proj", "layers.1.attn.indexer.compressor.wkv",
                        "layers.1.attn.indexer.compressor.wgate", "layers.0.ffn.gate.weight",
                        "layers.1.ffn.gate.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.experts.w2",
                        "layers.1.ffn.experts.w3", "layers.1.ffn.shared.w1", "layers.1.ffn.shared.w2", "mtp.e_proj",
                        "mtp.h_proj"})
    EXPECT_TRUE(has_param(muon, n)) << n << " should be on Muon";
  for (const char* n : {"tok_embeddings", "output", "norm", "layers.0.attn_norm", "layers.0.ffn_norm",
                        "layers.0.attn.q_norm", "layers.0.attn.kv_norm", "layers.0.attn.sink",
                        "layers.0.hc_attn.base", "layers.0.hc_attn.scale", "hc_head.base", "hc_head.scale",
                        "layers.1.attn.compressor.ape", "layers.1.attn.compressor.norm",
                        "layers.1.attn.indexer.compressor.ape", "mtp.e_norm", "mtp.h_norm"})
    EXPECT_TRUE(has_param(adamw, n)) << n << " should be on AdamW";
  // 3-D stacks of independent matrices go to Muon as they are (Muon orthogonalises each matrix of the stack).
  int stacks = 0;
  for (const Param* p : muon) {
    EXPECT_TRUE(p->value.ndim() == 2 || p->value.ndim() == 3) << p->name << " " << p->value.str();
    stacks += p->value.ndim() == 3;
  }
  EXPECT_GT(stacks, 0);
  for (const Param* p : model.params()) {
    if (p->name.ends_with("attn.wo_a") || p->name.find("experts.w") != std::string::npos) {
      EXPECT_EQ(p->value.ndim(), 3) << p->name;
    }
  }
  // MoE buffers (balancing bias, hash table) are not parameters, so no optimizer sees them.
  for (const Param* b : model.buffers()) EXPECT_FALSE(has_param(params, b->name)) << b->name;

  Optimizer opt(params, config("muon"));
  for (const Param* p : params) EXPECT_EQ(opt.uses_muon(*p), p->kind == ParamKind::matrix) << p->name;
}

TEST(OptimizerGroups, AdamWParamsMovesMatchingMatrices) {
  V4Model model(tiny_v4_config());
  ParamList params = model.params(), base_adamw, base_muon, adamw, muon;
  split_param_groups(params, config("muon"), base_adamw, base_muon);
  // Substrings, not exact names: "experts." matches every routed-expert stack, "hc_" every mHC projection.
  split_param_groups(params, config("muon", {"experts.", "hc_", "attn.wo_a"}), adamw, muon);
  int moved = 0;
  for (const Param* p : params) {
    const std::string& n = p->name;
    const bool matches = n.find("experts.") != std::string::npos || n.find("hc_") != std::string::npos ||
                         n.find("attn.wo_a") != std::string::npos;
    const bool want_muon = p->kind == ParamKind::matrix && !matches;
    EXPECT_EQ(has_param(muon, n), want_muon) << n;
    EXPECT_EQ(has_param(adamw, n), !want_muon) << n;
    moved += has_param(base_muon, n) && !want_muon;
  }
  EXPECT_EQ(moved, int(base_muon.size() - muon.size()));
  EXPECT_GT(moved, 10);
  EXPECT_TRUE(has_param(muon, "layers.0.attn.wq_a"));
  EXPECT_TRUE(has_param(adamw, "layers.1.ffn.experts.w2"));
  EXPECT_TRUE(has_param(muon, "layers.1.ffn.shared.w2"));  // "shared." is not "experts."
  // A substring that matches nothing changes nothing; one that matches only vectors changes nothing either.
  adamw.clear();
  muon.clear();
  split_param_groups(params, config("muon", {"no_such_parameter", "norm"}), adamw, muon);
  EXPECT_EQ(names(muon), names(base_muon));
  EXPECT_EQ(names(adamw), names(base_adamw));
}

TEST(OptimizerGroups, AdamWNamePutsEverythingOnAdamW) {
  V4Model model(tiny_v4_config());
  ParamList params = model.params(), adamw, muon;
  split_param_groups(params, config("adamw"), adamw, muon);
  EXPECT_TRUE(muon.empty());
  EXPECT_EQ(names(adamw), names(params));
  // In the parameter order (the order of checkpoint state and of the AdamW updates).
  ASSERT_EQ(adamw.size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) EXPECT_EQ(adamw[i], params[i]);
  Optimizer opt(params, config("adamw", {"experts."}));  // adamw_params is moot without Muon
  for (const Param* p : params) EXPECT_FALSE(opt.uses_muon(*p)) << p->name;
  EXPECT_EQ(opt.state().size(), 2 * params.size());
}

TEST(OptimizerGroups, UnknownNameIsAnErrorNamingTheKey) {
  V4Model model(tiny_v4_config());
  ParamList params = model.params(), adamw, muon;
  for (const char* bad : {"sgd", "Muon", ""}) {
    std::string err = error_of([&] { split_param_groups(params, config(bad), adamw, muon); });
    EXPECT_NE(err.find("optimizer.name"), std::string::npos) << err;
    EXPECT_NE(err.find(std::string("'") + bad + "'"), std::string::npos) << err;
    EXPECT_NE(err.find("adamw, muon"), std::string::npos) << err;
    err = error_of([&] { Optimizer opt(params, config(bad)); });
    EXPECT_NE(err.find("optimizer.name"), std::string::npos) << err;
  }
}

// Two steps of the hybrid equal, bitwise, two steps of AdamW on the AdamW list and Muon on the Muon list;
// and the AdamW-group parameters end exactly where an all-AdamW run puts them (the rules do not interact).
TEST(Optimizer, StepEqualsAdamWAndMuonOnTheSplitLists) {
  const ModelConfig cfg = tiny_v4_config();
  V4Model hybrid(cfg), split(cfg), all_adamw(cfg);
  for (V4Model* m : {&hybrid, &split, &all_adamw}) randomize_v4(*m, 3);
  const OptimizerConfig oc = config("muon");
  Optimizer opt(hybrid.params(), oc);
  ParamList a_list, m_list;
  split_param_groups(split.params(), oc, a_list, m_list);
  AdamW adamw(a_list, oc.adamw);
  Muon muon(m_list, oc.muon);
  Optimizer plain(all_adamw.params(), config("adamw"));
  for (int64_t s = 0; s < 2; ++s) {  // the second step uses the momenta and moments of the first
    const double lr = 1e-2 * (1.0 + 0.5 * double(s));
    for (V4Model* m : {&hybrid, &split, &all_adamw}) set_gradients(m->params(), 17, s);
    opt.step(lr);
    adamw.step(lr);
    muon.step(lr);
    plain.step(lr);
  }
  EXPECT_EQ(opt.steps_taken(), 2);
  ParamList h = hybrid.params(), p = split.params(), a = all_adamw.params();
  int muon_params = 0;
  for (size_t i = 0; i < h.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(h[i]->value, p[i]->value)) << h[i]->name;
    if (opt.uses_muon(*h[i])) {
      ++muon_params;
      EXPECT_FALSE(bitwise_equal(h[i]->value, a[i]->value)) << h[i]->name << ": Muon gave AdamW's update";
    } else {
      EXPECT_TRUE(bitwise_equal(h[i]->value, a[i]->value)) << h[i]->name;
    }
  }
  EXPECT_EQ(muon_params, int(m_list.size()));
  // The optimizer's state is the two rules' state.
  std::map<std::string, Tensor> st;
  for (const Optimizer::State& s : opt.state()) st[s.key] = s.tensor;
  for (size_t i = 0; i < a_list.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(st.at("adamw/m/" + a_list[i]->name), adamw.first_moments()[i])) << a_list[i]->name;
    EXPECT_TRUE(bitwise_equal(st.at("adamw/v/" + a_list[i]->name), adamw.second_moments()[i])) << a_list[i]->name;
  }
  for (size_t i = 0; i < m_list.size(); ++i)
    EXPECT_TRUE(bitwise_equal(st.at("muon/m/" + m_list[i]->name), muon.momenta()[i])) << m_list[i]->name;
}

TEST(Optimizer, StateKeysAndShapes) {
  V4Model model(tiny_v4_config());
  ParamList params = model.params();
  for (const std::string name : {"muon", "adamw"}) {
    SCOPED_TRACE(name);
    Optimizer opt(params, config(name, {"experts.w2"}));
    std::map<std::string, const Tensor*> st;
    std::vector<Optimizer::State> state = opt.state();
    for (const Optimizer::State& s : state) EXPECT_TRUE(st.emplace(s.key, &s.tensor).second) << "repeated " << s.key;
    size_t expected = 0;
    for (const Param* p : params) {
      std::vector<std::string> keys;
      if (opt.uses_muon(*p))
        keys = {"muon/m/" + p->name};
      else
        keys = {"adamw/m/" + p->name, "adamw/v/" + p->name};
      for (const std::string& k : keys) {
        ASSERT_TRUE(st.count(k)) << k;
        EXPECT_EQ(st[k]->shape(), p->value.shape()) << k;
        EXPECT_EQ(st[k]->dtype(), p->value.dtype()) << k;
        EXPECT_TRUE(all_zero(*st[k])) << k << " starts at zero";
      }
      expected += keys.size();
    }
    EXPECT_EQ(state.size(), expected);
    if (name == "muon") {
      EXPECT_TRUE(st.count("muon/m/layers.1.ffn.experts.w1"));
      EXPECT_TRUE(st.count("adamw/v/layers.1.ffn.experts.w2"));  // moved by adamw_params
      EXPECT_FALSE(st.count("muon/m/layers.1.ffn.experts.w2"));
      EXPECT_TRUE(st.count("muon/m/layers.0.attn.wo_a"));
    } else {
      for (const auto& [k, t] : st) EXPECT_TRUE(k.starts_with("adamw/")) << k;
    }
  }
}

TEST(Optimizer, DescribeGroupsListsEveryParameterOnce) {
  V4Model model(tiny_v4_config());
  ParamList params = model.params();
  for (const std::string name : {"muon", "adamw"}) {
    SCOPED_TRACE(name);
    Optimizer opt(params, config(name, {"attn.wo_b"}));
    const std::string text = opt.describe_groups();
    const size_t nl = text.find('\n');
    ASSERT_NE(nl, std::string::npos) << text;
    ASSERT_EQ(text.find('\n', nl + 1), std::string::npos) << "two lines expected:\n" << text;
    Group m = parse_group(text.substr(0, nl), "muon"), a = parse_group(text.substr(nl + 1), "adamw");
    std::map<std::string, int> seen;
    ParamList m_list, a_list;
    for (const std::string& n : m.names) ++seen[n];
    for (const std::string& n : a.names) ++seen[n];
    for (const Param* p : params) {
      EXPECT_EQ(seen[p->name], 1) << p->name;
      const bool listed_muon = std::find(m.names.begin(), m.names.end(), p->name) != m.names.end();
      EXPECT_EQ(listed_muon, opt.uses_muon(*p)) << p->name;
      (listed_muon ? m_list : a_list).push_back(const_cast<Param*>(p));
    }
    EXPECT_EQ(seen.size(), params.size());
    EXPECT_EQ(m.tensors, int64_t(m.names.size()));
    EXPECT_EQ(a.tensors, int64_t(a.names.size()));
    EXPECT_EQ(m.elements, count_elements(m_list));
    EXPECT_EQ(a.elements, count_elements(a_list));
    EXPECT_EQ(m.elements + a.elements, count_elements(params));
    if (name == "adamw") {
      EXPECT_EQ(text.substr(0, nl), "muon: 0 tensors, 0 parameters");
    }
  }
}

// Save after 2 of 3 steps (real gradients of the tiny model), load into a fresh model and optimizer, take the
// third step: weights, buffers and optimizer state equal the uninterrupted run's bitwise.
TEST(OptimizerCheckpoint, HybridRoundTripContinuesBitwise) {
  const ModelConfig cfg = tiny_v4_config();
  const OptimizerConfig oc = config("muon", {"ffn.shared."});
  const auto dir = temp_dir("optimizer_ckpt");
  const std::string path = (dir / "step_2.h5").string();
  auto lr_at = [](int64_t s) { return 1e-2 / double(s + 1); };

  V4Model a(cfg);
  randomize_v4(a, 5);
  Optimizer opt_a(a.params(), oc);
  for (int64_t s = 0; s < 3; ++s) {
    model_gradients(a, s);
    opt_a.step(lr_at(s));
    if (s == 1) save_checkpoint(path, cfg, a.saved_tensors(), &opt_a, meta_at(2, 5));
  }

  V4Model b(cfg);
  randomize_v4(b, 6);  // other weights, buffers: the load must replace all of them
  Optimizer opt_b(b.params(), oc);
  CheckpointMeta meta = load_checkpoint(path, cfg, b.saved_tensors(), &opt_b);
  EXPECT_EQ(meta.step, 2);
  EXPECT_EQ(opt_b.steps_taken(), 2);
  model_gradients(b, 2);
  opt_b.step(lr_at(2));
  EXPECT_EQ(opt_b.steps_taken(), opt_a.steps_taken());
  ParamList ta = a.saved_tensors(), tb = b.saved_tensors();
  ASSERT_EQ(ta.size(), tb.size());
  for (size_t i = 0; i < ta.size(); ++i) EXPECT_TRUE(bitwise_equal(ta[i]->value, tb[i]->value)) << ta[i]->name;
  std::vector<Optimizer::State> sa = opt_a.state(), sb = opt_b.state();
  ASSERT_EQ(sa.size(), sb.size());
  int muon_keys = 0;
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(sa[i].key, sb[i].key);
    EXPECT_TRUE(bitwise_equal(sa[i].tensor, sb[i].tensor)) << sa[i].key;
    muon_keys += sa[i].key.starts_with("muon/m/");
  }
  EXPECT_GT(muon_keys, 20);

  // Without the optimizer state the continuation differs (so the comparison above can fail).
  V4Model c(cfg);
  Optimizer opt_c(c.params(), oc);
  load_checkpoint(path, cfg, c.saved_tensors(), nullptr);
  opt_c.set_steps_taken(2);
  model_gradients(c, 2);
  opt_c.step(lr_at(2));
  int differ_muon = 0, differ_adamw = 0;
  for (size_t i = 0; i < a.params().size(); ++i)
    if (!bitwise_equal(a.params()[i]->value, c.params()[i]->value))
      ++(opt_a.uses_muon(*a.params()[i]) ? differ_muon : differ_adamw);
  EXPECT_GT(differ_muon, 0);
  EXPECT_GT(differ_adamw, 0);
  std::filesystem::remove_all(dir);
}

TEST(OptimizerCheckpoint, OtherOptimizerOrGroupsIsAClearError) {
  const ModelConfig cfg = tiny_v4_config();
  const auto dir = temp_dir("optimizer_ckpt_err");
  V4Model model(cfg);
  randomize_v4(model, 8);
  const std::string adamw_path = (dir / "adamw.h5").string(), muon_path = (dir / "muon.h5").string();
  {
    Optimizer adamw(model.params(), config("adamw"));
    save_checkpoint(adamw_path, cfg, model.saved_tensors(), &adamw, meta_at(1, 8));
    Optimizer muon(model.params(), config("muon"));
    save_checkpoint(muon_path, cfg, model.saved_tensors(), &muon, meta_at(1, 8));
  }
  // adamw checkpoint, muon recipe, and the other way round: both optimizer names and the file are named.
  for (const auto& [file, saved_name, wanted] :
       {std::tuple{adamw_path, "adamw", "muon"}, std::tuple{muon_path, "muon", "adamw"}}) {
    Optimizer opt(model.params(), config(wanted));
    std::string err = error_of([&] { load_checkpoint(file, cfg, model.saved_tensors(), &opt); });
    EXPECT_NE(err.find(file), std::string::npos) << err;
    EXPECT_NE(err.find(std::string("optimizer.name = \"") + saved_name + "\""), std::string::npos) << err;
    EXPECT_NE(err.find(std::string("asks for \"") + wanted + "\""), std::string::npos) << err;
  }
  // Same name, other groups: a matrix moved to AdamW has no AdamW moments in the file.
  Optimizer moved(model.params(), config("muon", {"layers.0.attn.wq_a"}));
  std::string err = error_of([&] { load_checkpoint(muon_path, cfg, model.saved_tensors(), &moved); });
  EXPECT_NE(err.find("optim/adamw/m/layers.0.attn.wq_a"), std::string::npos) << err;
  EXPECT_NE(err.find("optimizer.adamw_params"), std::string::npos) << err;
  // The weights alone load into any optimizer (e.g. starting a Muon run from an AdamW checkpoint's weights).
  EXPECT_EQ(error_of([&] { load_checkpoint(adamw_path, cfg, model.saved_tensors(), nullptr); }), "");
  std::filesystem::remove_all(dir);
}
