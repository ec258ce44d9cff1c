// HDF5 token datasets: `prepare` keeps every document exactly once across the two splits, the on-disk store
// reads what an in-memory split of the same tokens reads, and bad input is a clear error.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "test_util.h"
#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/token_dataset.h"

using namespace tessera;
using tessera::testing::error_of;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir() {
  fs::path d = fs::temp_directory_path() / ("tessera_test_tokens_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

std::string write(const std::string& name, const std::string& text) {
  fs::path p = temp_dir() / name;
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}


// Documents of a split, decoded back to text (each ends with EOS, which is dropped).
std::multiset<std::string> documents(const TokenStore& s, const Tokenizer& tok) {
  std::multiset<std::string> out;
  const auto& starts = s.doc_starts();
  for (size_t i = 0; i < starts.size(); ++i) {
    int64_t end = i + 1 < starts.size() ? starts[i + 1] : s.size();
    std::vector<int32_t> ids(end - starts[i]);
    s.read(starts[i], end - starts[i], ids.data());
    EXPECT_EQ(ids.back(), tok.eos_id());
    ids.pop_back();
    out.insert(tok.decode(ids));
  }
  return out;
}

}  // namespace

TEST(TokenDataset, EveryDocumentLandsInExactlyOneSplit) {
  std::string text;
  std::multiset<std::string> want;
  for (int i = 0; i < 300; ++i) {
    std::string doc = "document " + std::to_string(i) + " says " + std::string(i % 17, 'x') + "\n";
    text += doc + "%\n";
    want.insert(doc);
  }
  PrepareOptions opt;
  opt.inputs = {write("docs.txt", text)};
  opt.separator = "%";
  opt.val_fraction = 0.2;
  opt.output = (temp_dir() / "docs.h5").string();
  ByteTokenizer tok;
  int64_t last_done = -1, last_total = -2;
  PrepareStats st = prepare_dataset(opt, tok, [&](int64_t d, int64_t t) { last_done = d, last_total = t; });
  EXPECT_EQ(st.documents, 300);
  EXPECT_EQ(last_done, last_total);
  TokenDataset ds = TokenDataset::open(opt.output, &tok);
  std::multiset<std::string> got = documents(*ds.train, tok), val = documents(*ds.val, tok);
  EXPECT_GT(val.size(), 30u);  // about 20% of 300
  EXPECT_LT(val.size(), 90u);
  got.insert(val.begin(), val.end());
  EXPECT_EQ(got, want);
  EXPECT_EQ(ds.train->bytes() + ds.val->bytes(), int64_t(text.size()) - 300 * 2);  // minus the "%\n" lines
}

TEST(TokenDataset, OnDiskStoreLoadsLikeTheSameTokensInMemory) {
  std::string text;
  for (int i = 0; i < 2000; ++i) text += "line " + std::to_string(i * 7919 % 1000) + " of the corpus\n";
  PrepareOptions opt;
  opt.inputs = {write("corpus.txt", text)};
  opt.val_fraction = 0.0;
  opt.output = (temp_dir() / "corpus.h5").string();
  ByteTokenizer tok;
  prepare_dataset(opt, tok);
  TokenDataset ds = TokenDataset::open(opt.output, &tok);
  TokenSplit mem;
  mem.tokens.resize(ds.train->size());
  ds.train->read(0, ds.train->size(), mem.tokens.data());
  mem.starts = ds.train->doc_starts();
  EXPECT_EQ(tok.decode({mem.tokens.begin(), mem.tokens.end() - 1}), text);
  PackedLoader a(ds.train.get(), 32, 5, true), b(&mem, 32, 5, true);
  for (int64_t step = 0; step < 3; ++step) {
    TokenBatch x = a.train_batch(step, 0, 1, 4), y = b.train_batch(step, 0, 1, 4);
    EXPECT_TRUE(std::equal(x.ids.data<int32_t>(), x.ids.data<int32_t>() + 128, y.ids.data<int32_t>()));
    EXPECT_TRUE(std::equal(x.targets.data<int32_t>(), x.targets.data<int32_t>() + 128, y.targets.data<int32_t>()));
  }
}

TEST(TokenDataset, JsonlFieldsAndErrorsNameTheLine) {
  std::string ok = write("ok.jsonl", "{\"question\": \"2+2?\", \"answer\": \"#### 4\"}\n\n{\"question\": \"q\", \"answer\": \"a\"}\n");
  PrepareOptions opt;
  opt.inputs = {ok};
  opt.format = "jsonl";
  opt.fields = {"question", "answer"};
  opt.val_fraction = 0.0;
  opt.output = (temp_dir() / "ok.h5").string();
  ByteTokenizer tok;
  EXPECT_EQ(prepare_dataset(opt, tok).documents, 2);
  TokenDataset ds = TokenDataset::open(opt.output, &tok);
  EXPECT_EQ(documents(*ds.train, tok), (std::multiset<std::string>{"2+2?\n#### 4", "q\na"}));

  opt.inputs = {write("bad.jsonl", "{\"question\": \"a\", \"answer\": \"b\"}\n{\"question\": \"a\", \n")};
  opt.output = (temp_dir() / "bad.h5").string();
  EXPECT_NE(error_of([&] { prepare_dataset(opt, tok); }).find("bad.jsonl:2: malformed JSON"), std::string::npos);
  EXPECT_FALSE(fs::exists(opt.output));  // nothing half-written
  opt.inputs = {write("nofield.jsonl", "{\"question\": \"a\"}\n")};
  EXPECT_NE(error_of([&] { prepare_dataset(opt, tok); }).find("nofield.jsonl:1: no string field 'answer'"),
            std::string::npos);
  opt.inputs = {write("empty.jsonl", "\n\n")};
  EXPECT_NE(error_of([&] { prepare_dataset(opt, tok); }).find("hold no documents"), std::string::npos);
  opt.inputs = {(temp_dir() / "missing.txt").string()};
  EXPECT_NE(error_of([&] { prepare_dataset(opt, tok); }).find("not found"), std::string::npos);
}

TEST(TokenDataset, RejectsOtherFilesAndOtherTokenizers) {
  std::string not_dataset = write("plain.txt", "hello");
  EXPECT_NE(error_of([&] { TokenDataset::open(not_dataset); }).find("plain.txt"), std::string::npos);

  struct OtherTokenizer : Tokenizer {
    ByteTokenizer b;
    int64_t vocab_size() const override { return b.vocab_size(); }
    std::vector<int32_t> encode(const std::string& t) const override { return b.encode(t); }
    std::string decode(const std::vector<int32_t>& i) const override { return b.decode(i); }
    int32_t special_id(const std::string& s) const override { return b.special_id(s); }
    std::string kind() const override { return "byte"; }
    uint64_t hash() const override { return 42; }
  } other;
  PrepareOptions opt;
  opt.inputs = {write("t.txt", "some text for a dataset\n")};
  opt.val_fraction = 0.0;
  opt.output = (temp_dir() / "t.h5").string();
  prepare_dataset(opt, ByteTokenizer());
  EXPECT_NE(error_of([&] { TokenDataset::open(opt.output, &other); }).find("another tokenizer"), std::string::npos);
}

TEST(TokenDataset, SingleDocumentHoldsOutTheSameTailAsTheInMemoryCorpus) {
  std::string text;
  for (int i = 0; i < 500; ++i) text += "Verse " + std::to_string(i) + ": caf\xc3\xa9 and tea\n";
  std::string path = write("single.txt", text);
  ByteTokenizer tok;
  TextCorpus mem = TextCorpus::load({{path}, "", 0.1, 0}, tok);
  PrepareOptions opt;
  opt.inputs = {path};
  opt.val_fraction = 0.1;
  opt.output = (temp_dir() / "single.h5").string();
  prepare_dataset(opt, tok);
  TokenDataset ds = TokenDataset::open(opt.output, &tok);
  std::multiset<std::string> val = documents(*ds.val, tok);
  ASSERT_EQ(val.size(), 1u);
  EXPECT_EQ(*val.begin(), tok.decode(mem.val.tokens));
  EXPECT_EQ(*documents(*ds.train, tok).begin() + *val.begin(), text);
  EXPECT_NEAR(double(val.begin()->size()), 0.1 * double(text.size()), 2.0);
}

TEST(TokenDataset, ChatDatasetsTrainOnAssistantTokensOnly) {
  std::string line =
      R"({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})";
  PrepareOptions opt;
  opt.inputs = {write("chat.jsonl", line + "\n" + line + "\n")};
  opt.format = "chat";
  opt.val_fraction = 0.0;
  opt.output = (temp_dir() / "chat.h5").string();
  ByteTokenizer tok;
  prepare_dataset(opt, tok);
  TokenDataset ds = TokenDataset::open(opt.output, &tok);
  ASSERT_TRUE(ds.train->has_loss_mask());
  // Each conversation: BOS <User> "2+2?" <Assistant> </think> "4" EOS; trained targets: </think> "4" EOS.
  PackedLoader loader(ds.train.get(), 9, 0, true);
  TokenBatch b = loader.eval_batch(0, 1);
  std::vector<int32_t> trained;
  for (int t = 0; t < 9; ++t)
    if (b.targets.data<int32_t>()[t] >= 0) trained.push_back(b.targets.data<int32_t>()[t]);
  EXPECT_EQ(tok.decode(trained), "</think>4<｜end▁of▁sentence｜>");

  opt.inputs = {write("badchat.jsonl", line + "\n" + R"({"messages": [{"role": "assistant", "content": "hi"}]})" + "\n")};
  opt.output = (temp_dir() / "badchat.h5").string();
  EXPECT_NE(error_of([&] { prepare_dataset(opt, tok); }).find("badchat.jsonl:2: "), std::string::npos);
}
