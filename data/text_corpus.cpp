#include "data/text_corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/rng.h"

namespace tessera {
namespace {

std::string read_file(const std::string& path) {
  if (!std::filesystem::exists(path)) TS_FAIL("data file '", path, "' not found");
  if (std::filesystem::is_directory(path)) TS_FAIL("data file '", path, "' is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) TS_FAIL("data file '", path, "' cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Splits on lines that hold exactly `sep`; drops documents that are only whitespace.
std::vector<std::string> split_documents(const std::string& text, const std::string& sep) {
  std::vector<std::string> docs;
  if (sep.empty()) {
    docs.push_back(text);
    return docs;
  }
  std::string cur;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    size_t next = end == std::string::npos ? text.size() : end + 1;
    std::string_view line(text.data() + pos, (end == std::string::npos ? text.size() : end) - pos);
    if (line == sep) docs.push_back(std::move(cur)), cur.clear();
    else cur.append(text, pos, next - pos);
    pos = next;
  }
  docs.push_back(std::move(cur));
  std::erase_if(docs, [](const std::string& d) { return d.find_first_not_of(" \t\r\n") == std::string::npos; });
  return docs;
}

void append_document(TokenSplit& split, const std::vector<int32_t>& ids, int32_t eos) {
  split.starts.push_back(static_cast<int64_t>(split.tokens.size()));
  split.tokens.insert(split.tokens.end(), ids.begin(), ids.end());
  if (eos >= 0) split.tokens.push_back(eos);
}

}  // namespace

std::pair<std::string, std::string> split_tail(const std::string& text, double fraction) {
  size_t cut = text.size() - static_cast<size_t>(double(text.size()) * fraction);
  while (cut < text.size() && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) ++cut;  // not inside a UTF-8 character
  return {text.substr(0, cut), text.substr(cut)};
}

TextCorpus TextCorpus::load(const TextCorpusConfig& cfg, const Tokenizer& tok) {
  if (cfg.files.empty()) TS_FAIL("data: no input files given");
  TextCorpus c;
  std::vector<std::string> texts;
  for (const std::string& f : cfg.files) {
    std::string text = read_file(f);
    if (text.empty()) TS_FAIL("data file '", f, "' is empty");
    for (std::string& d : split_documents(text, cfg.separator)) texts.push_back(std::move(d));
  }
  c.n_documents = static_cast<int64_t>(texts.size());
  const int32_t eos = cfg.separator.empty() ? -1 : tok.eos_id();
  if (texts.size() == 1) {
    // One document: hold out the tail of its text (the usual split for a single corpus such as
    // tinyshakespeare), cut at the same byte whatever the tokenizer, so held-out losses compare per byte.
    auto [head, tail] = split_tail(texts[0], cfg.val_fraction);
    append_document(c.train, tok.encode(head), eos);
    if (!tail.empty()) append_document(c.val, tok.encode(tail), eos);
  } else {
    std::vector<std::vector<int32_t>> docs;
    for (const std::string& t : texts) docs.push_back(tok.encode(t));
    Rng pick{cfg.split_seed, stream_id("val-split")};
    for (size_t i = 0; i < docs.size(); ++i)
      append_document(pick.uniform(i) < cfg.val_fraction ? c.val : c.train, docs[i], eos);
  }
  // FNV-1a over both splits and their document starts, with the split sizes as boundaries.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  for (const TokenSplit* s : {&c.train, &c.val}) {
    mix(s->tokens.size());
    for (int32_t t : s->tokens) mix(static_cast<uint32_t>(t));
    for (int64_t d : s->starts) mix(static_cast<uint64_t>(d));
  }
  c.fingerprint = h;
  return c;
}

PackedLoader::PackedLoader(const TokenStore* split, int64_t seq_len, uint64_t seed, bool document_mask)
    : split_(split), seq_len_(seq_len), seed_(seed), document_mask_(document_mask) {
  if (split->size() < seq_len + 1)
    TS_FAIL("data split has ", split->size(), " tokens, fewer than one sequence of ", seq_len + 1,
            " (seq_len + 1); use a smaller training.seq_len or more data");
}

static TokenBatch make_batch(int64_t B, int64_t T, bool with_doc) {
  TokenBatch b;
  b.ids = Tensor::empty({B, T}, DType::i32);
  b.targets = Tensor::empty({B, T}, DType::i32);
  if (with_doc) b.doc = Tensor::empty({B, T}, DType::i32);
  return b;
}

void PackedLoader::fill_row(int64_t start, TokenBatch& b, int64_t row) const {
  const int64_t T = seq_len_;
  std::vector<int32_t> window(T + 1);
  split_->read(start, T + 1, window.data());
  std::copy(window.begin(), window.end() - 1, b.ids.data<int32_t>() + row * T);
  int32_t* targets = b.targets.data<int32_t>() + row * T;
  std::copy(window.begin() + 1, window.end(), targets);
  if (split_->has_loss_mask()) {
    std::vector<uint8_t> mask(T + 1);
    split_->read_mask(start, T + 1, mask.data());
    for (int64_t t = 0; t < T; ++t)
      if (!mask[t + 1]) targets[t] = -1;  // the token at t + 1 is not trained on (prompt, user turn)
  }
  if (!b.doc.defined()) return;
  // Document index relative to the window's first document.
  const auto& ds = split_->doc_starts();
  auto next = std::upper_bound(ds.begin(), ds.end(), start);
  int32_t d = 0;
  int32_t* out = b.doc.data<int32_t>() + row * T;
  for (int64_t t = 0; t < T; ++t) {
    while (next != ds.end() && *next <= start + t) ++d, ++next;
    out[t] = d;
  }
}

TokenBatch PackedLoader::train_batch(int64_t step, int64_t micro, int64_t accum, int64_t B, int64_t dp_rank,
                                     int64_t dp_size) const {
  TokenBatch b = make_batch(B, seq_len_, document_mask_);
  const uint64_t n_starts = split_->size() - seq_len_;  // windows need T + 1 tokens
  Rng rng{seed_, stream_id("train-windows")};
  for (int64_t r = 0; r < B; ++r) {
    int64_t g = ((step * accum + micro) * dp_size + dp_rank) * B + r;
    fill_row(static_cast<int64_t>(rng.below(g, n_starts)), b, r);
  }
  return b;
}

int64_t PackedLoader::eval_windows() const { return (split_->size() - 1) / seq_len_; }

TokenBatch PackedLoader::eval_batch(int64_t first_window, int64_t B) const {
  TS_CHECK(first_window + B <= eval_windows(), "eval batch beyond the held-out split");
  TokenBatch b = make_batch(B, seq_len_, document_mask_);
  for (int64_t r = 0; r < B; ++r) fill_row((first_window + r) * seq_len_, b, r);
  return b;
}

}  // namespace tessera
