// `tessera inspect` arithmetic (src/model/inspect.cpp) and the model recipes: published V4 / V3.2 sizes, a
// tiny V4 config counted by hand term by term, the 1M-context fractions of V4 vs V3.2, and the recipe parsing
// of the V4 fields (strict types and ranges, errors naming file, line and key).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include "cli/model_recipe.h"
#include "cli/recipe.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "model/dense.h"
#include "model/inspect.h"
#include "model/param.h"
#include "model/v4.h"

using namespace tessera;
namespace fs = std::filesystem;

namespace {

ModelConfig load_model(const std::string& name) {
  Recipe r = Recipe::load(std::string(TESSERA_RECIPES_DIR) + "/" + name);
  ModelConfig c = model_config_from_recipe(r, 272);  // the byte tokenizer's vocabulary
  r.check_no_unknown_keys();
  return c;
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << parts[0] << "'";
  } catch (const Error& e) {
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

constexpr double kM = 1048576;  // 1M context = 2^20 tokens

// ---------------------------------------------------------------- published sizes
// DeepSeek publishes the main model without the MTP block (V3: 671B, and 685B on Hugging Face with it) and
// active parameters without the embedding lookup (V3's 37B: 37.5B with it would round to 38B).
TEST(Inspect, V4FlashAndProMatchThePublishedSizes) {
  ParamCounts flash = count_params(load_model("deepseek-v4-flash.toml"));
  ParamCounts pro = count_params(load_model("deepseek-v4-pro.toml"));
  EXPECT_NEAR(flash.published_total() / 284e9, 1.0, 0.02) << flash.published_total();
  EXPECT_NEAR(pro.published_total() / 1.6e12, 1.0, 0.02) << pro.published_total();
  EXPECT_NEAR(pro.published_active() / 49e9, 1.0, 0.02) << pro.published_active();
  // Flash's active count is 13.27B, 2.1% above the published "13B": the figure is rounded to whole billions,
  // so the claim is [12.5B, 13.5B). All four figures round to the published ones.
  EXPECT_NEAR(flash.published_active() / 13e9, 1.0, 0.025) << flash.published_active();
  EXPECT_EQ(std::llround(flash.published_total() / 1e9), 284);
  EXPECT_EQ(std::llround(flash.published_active() / 1e9), 13);
  EXPECT_EQ(std::llround(pro.published_total() / 1e11), 16);  // 1.6T
  EXPECT_EQ(std::llround(pro.published_active() / 1e9), 49);
  // The MTP block: one window-only layer plus 2 d^2 projections and its head.
  EXPECT_GT(flash.mtp, 6e9);
  EXPECT_EQ(flash.total, flash.published_total() + flash.mtp);
}

TEST(Inspect, V32MatchesThePublishedSizes) {
  ModelConfig v32 = load_model("deepseek-v3.2.toml");
  ParamCounts p = count_params(v32);
  // V3's 671B / 37B plus V3.2's indexer (~14M a layer); Hugging Face lists 685B with the MTP layer, whose
  // checkpoint repeats the embedding and head (2 x 0.93B) that we count once.
  EXPECT_NEAR(p.published_total() / 671e9, 1.0, 0.01) << p.published_total();
  EXPECT_EQ(std::llround(p.published_active() / 1e9), 37) << p.published_active();
  EXPECT_NEAR((p.total + 2 * p.embedding) / 685e9, 1.0, 0.01) << p.total;
}

// ---------------------------------------------------------------- a tiny V4 config, by hand
ModelConfig tiny_v4() {
  ModelConfig c;
  c.arch = "deepseek_v4";
  c.vocab_size = 300;
  c.dim = 128;
  c.n_layers = 5;
  c.n_heads = 4;
  c.head_dim = 64;
  c.rope_dim = 16;
  c.q_lora_rank = 64;
  c.o_groups = 2;
  c.o_lora_rank = 64;
  c.window = 32;
  c.compress_ratios = {0, 4, 16, 4, 16, 0};
  c.csa_ratio = 4;
  c.index_n_heads = 4;
  c.index_head_dim = 32;
  c.index_topk = 8;
  c.n_routed_experts = 8;
  c.n_activated_experts = 2;
  c.n_shared_experts = 1;
  c.moe_inter_dim = 128;
  c.n_hash_layers = 1;
  c.hc_mult = 4;
  c.mtp_depth = 1;
  return c;
}

TEST(Inspect, TinyV4ParametersByHand) {
  // V=300 d=128 n=4 H=4 c=64 dc=64 g=2 dg=64 HI=4 cI=32 E=8 k=2 F=128; layers: window, CSA 4, HCA 16, CSA,
  // HCA.
  const double hc_site = 24.0 * (4 * 128) + 24 + 3;  // fn (2n+n^2, n d), base, scale
  const double attn = 64.0 * 128 + 64                // wq_a, q_norm
                      + 4.0 * 64 * 64                // wq_b
                      + 64.0 * 128 + 64              // wkv, kv_norm
                      + 4                            // sink
                      + 2.0 * 64 * (4 * 64 / 2)      // wo_a
                      + 128.0 * 2 * 64;              // wo_b
  const double experts = 8.0 * 3 * 128 * 128, active_experts = 2.0 * 3 * 128 * 128;
  const double moe = 8.0 * 128 + 3.0 * 128 * 128 + experts;     // gate, shared, routed
  const double layer = 2 * hc_site + 2 * 128 + attn + moe;      // + attn_norm, ffn_norm
  const double csa = 2 * (2.0 * 64 * 128) + 4 * 2 * 64 + 64     // compressor wkv, wgate, ape (m, 2c), norm
                     + 4.0 * 32 * 64 + 4.0 * 128                // indexer wq_b, weights_proj
                     + 2 * (2.0 * 32 * 128) + 4 * 2 * 32 + 32;  // indexer compressor
  const double hca = 2 * (64.0 * 128) + 16 * 64 + 64;           // wkv, wgate, ape (m', c), norm
  const double head =
      300.0 * 128 + (4.0 * 4 * 128 + 4 + 1) + 128 + 300.0 * 128;  // emb, hc_head, norm, output
  const double mtp = 2 * 128 + 2 * (128.0 * 128) + layer + (4.0 * 4 * 128 + 4 + 1) + 128;
  const double total_main = 5 * layer + 2 * csa + 2 * hca + head;
  EXPECT_EQ(total_main + mtp, 3470246.0);  // the sum above, once by hand
  ParamCounts p = count_params(tiny_v4());
  EXPECT_EQ(p.total, total_main + mtp);
  EXPECT_EQ(p.mtp, mtp);
  EXPECT_EQ(p.embedding, 300.0 * 128);
  EXPECT_EQ(p.active, p.total - 6 * (experts - active_experts));
  EXPECT_EQ(p.mtp_active, mtp - (experts - active_experts));
  EXPECT_EQ(p.published_active(), total_main - 5 * (experts - active_experts) - 300.0 * 128);
}

TEST(Inspect, TinyV4FlopsByHand) {
  const int64_t T = 64;
  // Multiply-accumulates per token. A window-only layer: mHC mixes, attention, router, shared + 2 experts.
  const double layer = 2 * (24.0 * 512) +
                       (64.0 * 128 + 4.0 * 64 * 64 + 64.0 * 128 + 2.0 * 64 * 128 + 128.0 * 128) +
                       (8.0 * 128 + 3.0 * 128 * 128 + 2 * 3.0 * 128 * 128);
  const double csa = 2 * (2.0 * 64 * 128) + 4.0 * 32 * 64 + 4.0 * 128 + 2 * (2.0 * 32 * 128);
  const double hca = 2 * (64.0 * 128);
  const double head = 4.0 * 512 + 300.0 * 128;  // hc_head, output
  const double main_macs = 5 * layer + 2 * csa + 2 * hca + head;
  // MTP: e_proj once, h_proj on each of the 4 streams, the block, its hc_head, the shared output head again.
  const double mtp_macs = 128.0 * 128 + 4 * 128.0 * 128 + layer + 4.0 * 512 + 300.0 * 128;
  // Attention of the last token of 64: window 32 keys; CSA + min(8, 64/4 = 16); HCA + 64/16 = 4.
  const double per_key = 2 * 2 * 4 * 64;  // scores and values, 4 heads of 64
  const double attn_main = per_key * (32 + (32 + 8) + (32 + 4) + (32 + 8) + (32 + 4));
  const double indexer = 2 * (2.0 * 4 * 32 * (64 / 4));  // 2 CSA layers score 16 entries with 4 heads of 32
  const double attn_mtp = per_key * 32;

  FlopCounts inf = count_flops(tiny_v4(), T, false), train = count_flops(tiny_v4(), T, true);
  EXPECT_EQ(inf.matmul, 2 * main_macs);
  EXPECT_EQ(inf.attention, attn_main);
  EXPECT_EQ(inf.indexer, indexer);
  EXPECT_EQ(train.matmul, 2 * (main_macs + mtp_macs));
  EXPECT_EQ(train.attention, attn_main + attn_mtp);
  EXPECT_EQ(forward_flops_per_token(tiny_v4(), T),
            2 * (main_macs + mtp_macs) + attn_main + attn_mtp + indexer);
  EXPECT_EQ(attention_flops_per_token(tiny_v4(), T), attn_main + attn_mtp + indexer);
  EXPECT_EQ(tiny_v4().train_flops_per_token(T), 3 * forward_flops_per_token(tiny_v4(), T));
  EXPECT_EQ(fp8_equivalent_flops(tiny_v4(), inf), 2 * main_macs + 2 * attn_main + 0.5 * indexer);
  // A short context: fewer than a block's tokens see no compressed entry.
  FlopCounts short_ctx = count_flops(tiny_v4(), 3, false);
  EXPECT_EQ(short_ctx.attention, per_key * 3 * 5);
  EXPECT_EQ(short_ctx.indexer, 0);
}

TEST(Inspect, TinyV4KvCacheByHand) {
  const int64_t T = 64;
  // Per layer: the window's 32 kv vectors; CSA 16 entries + 16 indexer keys; HCA 4 entries.
  const double values = 5 * 32 * 64 + 2 * (16 * 64 + 16 * 32) + 2 * (4 * 64);
  EXPECT_EQ(kv_cache_bytes_per_token(tiny_v4(), T, 2.0), values * 2 / T);
  EXPECT_EQ(kv_cache_bytes_per_token(tiny_v4(), T, 0.5), values * 0.5 / T);
  // Native: an entry is 48 FP8 + 1 scale byte + 16 BF16 RoPE dims = 81 bytes; an indexer key 16 + 1 = 17.
  const double native = 5 * 32 * 81.0 + 2 * (16 * 81.0 + 16 * 17.0) + 2 * (4 * 81.0);
  EXPECT_EQ(kv_cache_bytes_per_token(tiny_v4(), T, kNativeKvPrecision), native / T);
}

TEST(Inspect, DenseMatchesTheBuiltModel) {
  ModelConfig c = load_model("dense-tiny.toml");
  DenseModel m(c);
  ParamCounts p = count_params(c);
  EXPECT_EQ(p.total, double(count_elements(m.params())));
  EXPECT_EQ(p.active, p.total);
  EXPECT_EQ(p.mtp, 0);
  // The dense FLOP formula of docs/metrics.md.
  EXPECT_EQ(3 * forward_flops_per_token(c, 48), c.train_flops_per_token(48));
  EXPECT_EQ(kv_cache_bytes_per_token(c, 48, kNativeKvPrecision),
            double(c.n_layers * 2 * c.n_kv_heads * (c.dim / c.n_heads) * 2));
}

// The built V4 model holds exactly the parameters counted (buffers apart), for the tiny config and v4-tiny.
TEST(Inspect, V4MatchesTheBuiltModel) {
  for (const ModelConfig& c : {tiny_v4(), load_model("v4-tiny.toml")}) {
    V4Model m(c);
    ParamCounts p = count_params(c);
    EXPECT_EQ(p.total, double(count_elements(m.params())));
    int64_t mtp = 0;
    for (const Param* q : m.params())
      if (q->name.rfind("mtp.", 0) == 0) mtp += q->value.numel();
    EXPECT_EQ(p.mtp, double(mtp));
  }
}


// ---------------------------------------------------------------- V4 vs V3.2 at 1M context
// Published (V4 report / model cards): at 1M, Pro needs 27% of V3.2's single-token FLOPs and 10% of its KV
// cache, Flash 10% and 7%.
TEST(Inspect, AttentionAndKvAt1MAgainstV32ByHand) {
  ModelConfig flash = load_model("deepseek-v4-flash.toml"), pro = load_model("deepseek-v4-pro.toml"),
              v32 = load_model("deepseek-v3.2.toml");
  const int64_t T = 1 << 20;
  // Attention + indexer FLOPs of the last token (main model), written out.
  const double v32_attn = 61 * (2.0 * 128 * (576 + 512) * 2048 + 2.0 * 64 * 128 * kM);
  const double pro_attn = 30 * (4.0 * 128 * 512 * (128 + 1024) + 2.0 * 64 * 128 * (kM / 4)) +
                          31 * (4.0 * 128 * 512 * (128 + kM / 128));
  const double flash_attn = 2 * (4.0 * 64 * 512 * 128) +
                            21 * (4.0 * 64 * 512 * (128 + 512) + 2.0 * 64 * 128 * (kM / 4)) +
                            20 * (4.0 * 64 * 512 * (128 + kM / 128));
  auto attn = [&](const ModelConfig& c) {
    FlopCounts f = count_flops(c, T, false);
    return f.attention + f.indexer;
  };
  EXPECT_EQ(attn(v32), v32_attn);
  EXPECT_EQ(attn(pro), pro_attn);
  EXPECT_EQ(attn(flash), flash_attn);
  // KV bytes per token, native formats: V3.2 656-byte MLA entry + 132-byte FP8 indexer key per layer; V4
  // 583-byte entries (448 FP8 + 7 scale bytes + 64 BF16) for the window, the CSA and HCA blocks, 68-byte FP4
  // indexer keys.
  const double v32_kv = 61 * (656.0 + 132.0);
  const double pro_kv = (61 * 128 * 583.0 + 30 * (kM / 4) * (583.0 + 68.0) + 31 * (kM / 128) * 583.0) / kM;
  const double flash_kv = (43 * 128 * 583.0 + 21 * (kM / 4) * (583.0 + 68.0) + 20 * (kM / 128) * 583.0) / kM;
  EXPECT_EQ(kv_cache_bytes_per_token(v32, T, kNativeKvPrecision), v32_kv);
  EXPECT_DOUBLE_EQ(kv_cache_bytes_per_token(pro, T, kNativeKvPrecision), pro_kv);
  EXPECT_DOUBLE_EQ(kv_cache_bytes_per_token(flash, T, kNativeKvPrecision), flash_kv);

  // KV: 10.46% and 7.31%, the published 10% and 7% to the rounding they are given with.
  EXPECT_NEAR(pro_kv / v32_kv, 0.10, 0.005);
  EXPECT_NEAR(flash_kv / v32_kv, 0.07, 0.005);
  // Attention alone: Pro 19.0%, Flash 10.5% of V3.2 (the indexer is 97% of V3.2's attention at 1M).
  EXPECT_NEAR(pro_attn / v32_attn, 0.190, 0.001);
  EXPECT_NEAR(flash_attn / v32_attn, 0.105, 0.001);
}

TEST(Inspect, SingleTokenFlopsAt1MAgainstV32) {
  ModelConfig flash = load_model("deepseek-v4-flash.toml"), pro = load_model("deepseek-v4-pro.toml"),
              v32 = load_model("deepseek-v3.2.toml");
  const int64_t T = 1 << 20;
  FlopCounts f = count_flops(flash, T, false), p = count_flops(pro, T, false), v = count_flops(v32, T, false);
  // Plain FLOPs (matrices + attention + indexer): Pro 26.2%, Flash 12.1%.
  EXPECT_NEAR(p.total() / v.total(), 0.262, 0.002);
  EXPECT_NEAR(f.total() / v.total(), 0.121, 0.002);
  // In FP8-equivalent FLOPs (BF16 attention x2, FP4 V4 indexer x0.5, FP8 GEMMs and V3.2 indexer x1):
  // Pro 26.5%, Flash 9.97%, the published 27% and 10% within one percentage point.
  double pe = fp8_equivalent_flops(pro, p), fe = fp8_equivalent_flops(flash, f),
         ve = fp8_equivalent_flops(v32, v);
  EXPECT_NEAR(pe / ve, 0.27, 0.01) << pe / ve;
  EXPECT_NEAR(fe / ve, 0.10, 0.01) << fe / ve;
}

// ---------------------------------------------------------------- recipes
class ModelRecipeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("tessera_inspect_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& text) {
    fs::path p = dir_ / "m.toml";
    std::ofstream(p) << text;
    return p.string();
  }
  fs::path dir_;
};

TEST_F(ModelRecipeTest, PublishedRecipesCarryTheSpecValues) {
  ModelConfig f = load_model("deepseek-v4-flash.toml"), p = load_model("deepseek-v4-pro.toml");
  ASSERT_EQ(f.compress_ratios.size(), 44u);
  ASSERT_EQ(p.compress_ratios.size(), 62u);
  int f_csa = 0, f_hca = 0, p_csa = 0, p_hca = 0;
  for (int64_t l = 0; l < f.n_layers; ++l) f_csa += f.layer_ratio(l) == 4, f_hca += f.layer_ratio(l) == 128;
  for (int64_t l = 0; l < p.n_layers; ++l) p_csa += p.layer_ratio(l) == 4, p_hca += p.layer_ratio(l) == 128;
  EXPECT_EQ(f_csa, 21);
  EXPECT_EQ(f_hca, 20);
  EXPECT_EQ(p_csa, 30);
  EXPECT_EQ(p_hca, 31);
  EXPECT_EQ(f.layer_ratio(0), 0);
  EXPECT_EQ(f.layer_ratio(1), 0);
  EXPECT_EQ(p.layer_ratio(0), 128);
  EXPECT_EQ(f.compress_ratios.back(), 0);
  EXPECT_EQ(p.compress_ratios.back(), 0);
  EXPECT_EQ(f.yarn_factor, 16.0);
  EXPECT_EQ(p.yarn_original_len, 65536);
  EXPECT_EQ(f.max_seq_len, 1 << 20);
  EXPECT_EQ(f.index_topk, 512);
  EXPECT_EQ(p.index_topk, 1024);
  EXPECT_EQ(p.route_scale, 2.5);
  ModelConfig tiny = load_model("v4-tiny.toml");
  EXPECT_EQ(tiny.vocab_size, 272);  // the tokenizer's
  EXPECT_TRUE(tiny.is_v4());
}

TEST_F(ModelRecipeTest, StrictV4Keys) {
  const std::string base =
      "[model]\narch = \"deepseek_v4\"\ndim = 64\nn_layers = 2\nn_heads = 2\nhead_dim = 32\nrope_dim = 8\n"
      "q_lora_rank = 16\no_groups = 2\no_lora_rank = 16\nindex_head_dim = 16\nn_hash_layers = 1\n";
  {  // an element out of range: file, line, key, element
    std::string f = write(base + "compress_ratios = [\n  0,\n  -4,\n]\n");
    Recipe r = Recipe::load(f);
    expect_error([&] { model_config_from_recipe(r, 272); },
                 {f + ":15: key 'model.compress_ratios': element 1 must be in [0, ", "got -4"});
  }
  {  // the wrong type
    std::string f = write(base + "compress_ratios = [0, 4]\nwindow = \"big\"\n");
    Recipe r = Recipe::load(f);
    expect_error([&] { model_config_from_recipe(r, 272); },
                 {f + ":14: key 'model.window': expected an integer, got string \"big\""});
  }
  {  // missing compress_ratios
    std::string f = write(base);
    Recipe r = Recipe::load(f);
    expect_error([&] { model_config_from_recipe(r, 272); }, {"missing required key 'model.compress_ratios'"});
  }
  {  // a dense-only key in a V4 recipe is unknown
    std::string f = write(base + "compress_ratios = [0, 4]\nffn_dim = 128\n");
    Recipe r = Recipe::load(f);
    ModelConfig c = model_config_from_recipe(r, 272);
    EXPECT_EQ(c.compress_ratios, (std::vector<int64_t>{0, 4}));
    expect_error([&] { r.check_no_unknown_keys(); }, {f + ":14: unknown key 'model.ffn_dim'"});
  }
  {  // a cross-field check names the file
    std::string f = write(base + "compress_ratios = [0, 4, 4]\n");
    Recipe r = Recipe::load(f);
    expect_error([&] { model_config_from_recipe(r, 272); },
                 {f + ": model.compress_ratios: the MTP entry (the last) must be 0"});
  }
  {  // out of range scalar
    std::string f = write(base + "compress_ratios = [0, 4]\nmtp_depth = 2\n");
    Recipe r = Recipe::load(f);
    expect_error([&] { model_config_from_recipe(r, 272); },
                 {f + ":14: key 'model.mtp_depth': must be in [0, 1], got 2"});
  }
}

// Every V4 field travels in the checkpoint's model.* attributes; the mismatch report names each one.
TEST_F(ModelRecipeTest, CheckpointCarriesEveryV4Field) {
  ModelConfig c = load_model("v4-tiny.toml");
  c.kv_fp8 = true;
  c.score_func = "sigmoid";
  c.yarn_factor = 4.0;
  c.mtp_loss_weight = 0.1;
  std::string path = (dir_ / "ckpt.h5").string();
  save_checkpoint(path, c, {}, nullptr, CheckpointMeta{});
  ModelConfig back = checkpoint_model_config(path);
  EXPECT_EQ(back.arch, "deepseek_v4");
  EXPECT_EQ(back.compress_ratios, c.compress_ratios);
  EXPECT_EQ(back.kv_fp8, true);
  EXPECT_EQ(back.score_func, "sigmoid");
  EXPECT_EQ(back.yarn_factor, 4.0);
  EXPECT_EQ(back.mtp_loss_weight, 0.1);
  EXPECT_EQ(back.index_topk, c.index_topk);
  EXPECT_EQ(back.hc_mult, c.hc_mult);
  EXPECT_EQ(back.n_hash_layers, c.n_hash_layers);
  EXPECT_NO_THROW(load_checkpoint(path, c, {}, nullptr));
  ModelConfig other = c;
  other.compress_ratios = {0, 4, 16, 4, 4, 0};
  other.index_topk = 16;
  other.kv_fp8 = false;
  expect_error([&] { load_checkpoint(path, other, {}, nullptr); },
               {"model.compress_ratios is [0,4,16,4,16,0] in the checkpoint, [0,4,16,4,4,0] in the recipe",
                "model.index_topk is 8 in the checkpoint, 16 in the recipe",
                "model.kv_fp8 is true in the checkpoint, false in the recipe"});
  // The training objective's weights may change on resume (spec §8 lowers the MTP weight when LR decay
  // starts).
  ModelConfig resumed = c;
  resumed.mtp_loss_weight = 0.3;
  EXPECT_NO_THROW(load_checkpoint(path, resumed, {}, nullptr));
}

}  // namespace
