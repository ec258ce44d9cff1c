// Byte tokenizer round trips, corpus splitting, and the packed loader's determinism, DP sharding and
// document ids, checked against hand-built expectations.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "test_util.h"
#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/text_corpus.h"

using namespace tessera;
using tessera::testing::error_of;
namespace fs = std::filesystem;

namespace {

std::string write_temp(const std::string& name, const std::string& text) {
  fs::path p = fs::temp_directory_path() / ("tessera_test_data_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}


}  // namespace

TEST(ByteTokenizer, RoundTripsArbitraryBytes) {
  ByteTokenizer tok;
  std::string text = "h\xc3\xa9llo \xe2\x9c\x93 \x00\xff end";
  text.push_back('\0');
  EXPECT_EQ(tok.decode(tok.encode(text)), text);
  EXPECT_EQ(tok.encode("A")[0], 65);
  EXPECT_EQ(tok.decode({72, 105, tok.eos_id()}), "Hi<｜end▁of▁sentence｜>");
  EXPECT_EQ(tok.eos_id(), 257);
  EXPECT_EQ(tok.encode_with_specials("a<｜User｜>b</think>"), (std::vector<int32_t>{97, 258, 98, 261}));
}

TEST(TextCorpus, SplitsDocumentsOnSeparatorLines) {
  std::string f = write_temp("docs.txt", "one\n%\ntwo two\n%\n\n%\nthree\n");
  TextCorpus c = TextCorpus::load({{f}, "%", 0.0, 0}, ByteTokenizer());
  EXPECT_EQ(c.n_documents, 3);  // the whitespace-only document is dropped
  std::vector<int32_t> want;
  for (std::string d : {"one\n", "two two\n", "three\n"}) {
    for (char ch : d) want.push_back(ch);
    want.push_back(ByteTokenizer().eos_id());
  }
  EXPECT_EQ(c.train.tokens, want);
  EXPECT_EQ(c.train.starts, (std::vector<int64_t>{0, 5, 14}));
}

TEST(TextCorpus, SingleDocumentHoldsOutItsTail) {
  std::string f = write_temp("single.txt", std::string(100, 'a') + std::string(10, 'b'));
  TextCorpus c = TextCorpus::load({{f}, "", 0.1, 0}, ByteTokenizer());
  EXPECT_EQ(c.train.tokens.size(), 99u);
  EXPECT_EQ(c.val.tokens.size(), 11u);
  EXPECT_EQ(c.val.tokens.back(), 'b');
}

TEST(TextCorpus, MissingAndEmptyFilesAreClearErrors) {
  EXPECT_NE(error_of([] { TextCorpus::load({{"/nonexistent/x.txt"}, "", 0.1, 0}, ByteTokenizer()); })
                .find("data file '/nonexistent/x.txt' not found"),
            std::string::npos);
  std::string f = write_temp("empty.txt", "");
  EXPECT_NE(error_of([&] { TextCorpus::load({{f}, "", 0.1, 0}, ByteTokenizer()); }).find("is empty"),
            std::string::npos);
  std::string s = write_temp("short.txt", "abc");
  TextCorpus c = TextCorpus::load({{s}, "", 0.0, 0}, ByteTokenizer());
  EXPECT_NE(error_of([&] { PackedLoader(&c.train, 8, 0, false); }).find("fewer than one sequence"),
            std::string::npos);
}

TEST(PackedLoader, SameStepSameBatchAndTargetsAreShiftedInputs) {
  TokenSplit s;
  for (int i = 0; i < 1000; ++i) s.tokens.push_back(i % 251);
  s.starts = {0};
  PackedLoader loader(&s, 16, 42, false);
  TokenBatch a = loader.train_batch(7, 0, 1, 4), b = loader.train_batch(7, 0, 1, 4), c = loader.train_batch(8, 0, 1, 4);
  EXPECT_TRUE(std::equal(a.ids.data<int32_t>(), a.ids.data<int32_t>() + 64, b.ids.data<int32_t>()));
  EXPECT_FALSE(std::equal(a.ids.data<int32_t>(), a.ids.data<int32_t>() + 64, c.ids.data<int32_t>()));
  for (int r = 0; r < 4; ++r)
    for (int t = 0; t < 16; ++t)
      EXPECT_EQ(a.targets.data<int32_t>()[r * 16 + t], (a.ids.data<int32_t>()[r * 16] + t + 1) % 251);
}

TEST(PackedLoader, DataParallelRanksPartitionTheOneRankBatch) {
  TokenSplit s;
  for (int i = 0; i < 5000; ++i) s.tokens.push_back(i % 1000);
  s.starts = {0};
  PackedLoader loader(&s, 8, 3, false);
  TokenBatch whole = loader.train_batch(5, 1, 2, 6);  // one rank, 6 rows
  for (int rank = 0; rank < 2; ++rank) {
    TokenBatch part = loader.train_batch(5, 1, 2, 3, rank, 2);  // 3 rows on each of 2 ranks
    EXPECT_TRUE(std::equal(part.ids.data<int32_t>(), part.ids.data<int32_t>() + 24,
                           whole.ids.data<int32_t>() + rank * 24))
        << "rank " << rank;
  }
}

TEST(PackedLoader, AnyDataParallelLayoutOfTheSameGlobalBatchReadsTheSameRows) {
  // A resume with another DP size but the same global batch is an exact re-shard: the rows of a step depend
  // only on (seed, step, global row), so 1 x 12, 2 x 6, 3 x 4 and 4 x 3 rows read the same data in order.
  TokenSplit s;
  for (int i = 0; i < 5000; ++i) s.tokens.push_back(i % 997);
  s.starts = {0};
  PackedLoader loader(&s, 8, 11, false);
  TokenBatch whole = loader.train_batch(3, 0, 1, 12);
  for (int64_t dp : {2, 3, 4}) {
    std::vector<int32_t> joined;
    for (int64_t rank = 0; rank < dp; ++rank) {
      TokenBatch part = loader.train_batch(3, 0, 1, 12 / dp, rank, dp);
      joined.insert(joined.end(), part.ids.data<int32_t>(), part.ids.data<int32_t>() + part.ids.numel());
    }
    EXPECT_TRUE(std::equal(joined.begin(), joined.end(), whole.ids.data<int32_t>())) << "dp " << dp;
  }
}

TEST(PackedLoader, DocumentIdsFollowDocumentStarts) {
  TokenSplit s;
  for (int i = 0; i < 40; ++i) s.tokens.push_back(i);
  s.starts = {0, 10, 13, 30};
  PackedLoader loader(&s, 8, 0, true);
  TokenBatch b = loader.eval_batch(1, 1);  // window [8, 16): docs 0 (8,9), 1 (10..12), 2 (13..15)
  std::vector<int32_t> want = {0, 0, 1, 1, 1, 2, 2, 2};
  EXPECT_EQ(std::vector<int32_t>(b.doc.data<int32_t>(), b.doc.data<int32_t>() + 8), want);
  EXPECT_EQ(loader.eval_windows(), 4);  // (40 - 1) / 8
}
