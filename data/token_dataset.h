// Tokenized datasets in HDF5 (layout in docs/data.md) and `tessera data prepare`, which writes them from
// plain text, JSONL or chat JSONL by streaming: a corpus larger than memory is fine, and so is reading one.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "data/text_corpus.h"
#include "data/tokenizer.h"

namespace tessera {

namespace io {
class H5Reader;
}

struct PrepareOptions {
  std::vector<std::string> inputs;
  std::string format = "text";  // text | jsonl | chat (V4 chat format with an assistant-only loss mask)
  std::string separator;        // text: a line holding only this separates documents (empty: a file is one)
  std::vector<std::string> fields = {"text"};  // jsonl: string fields joined by a newline form the document
  std::string reasoning_mode = "non_thinking";  // chat: lines without "mode" use this
  double val_fraction = 0.01;   // documents held out, chosen by Philox(seed, document index)
  uint64_t seed = 0;
  std::string output;
};

struct PrepareStats {
  int64_t documents = 0, train_tokens = 0, val_tokens = 0, train_bytes = 0, val_bytes = 0;
};

// Progress: called with (input bytes read so far, total input bytes).
using ProgressFn = std::function<void(int64_t done, int64_t total)>;
PrepareStats prepare_dataset(const PrepareOptions& opt, const Tokenizer& tok, const ProgressFn& progress = {});

// One split of a dataset file, read on demand (tokens are never all in memory; document starts are).
class H5TokenStore final : public TokenStore {
 public:
  H5TokenStore(std::shared_ptr<const io::H5Reader> file, const std::string& split);
  int64_t size() const override { return size_; }
  void read(int64_t start, int64_t n, int32_t* out) const override;
  const std::vector<int64_t>& doc_starts() const override { return starts_; }
  bool has_loss_mask() const override { return has_mask_; }
  void read_mask(int64_t start, int64_t n, uint8_t* out) const override;
  int64_t bytes() const { return bytes_; }  // UTF-8 bytes of the source text of this split

 private:
  std::shared_ptr<const io::H5Reader> file_;
  std::string split_;
  int64_t size_ = 0, bytes_ = 0;
  bool has_mask_ = false;
  std::vector<int64_t> starts_;
};

struct TokenDataset {
  std::string path;
  std::string tokenizer_kind;
  uint64_t tokenizer_hash = 0;
  int64_t vocab_size = 0;
  std::unique_ptr<H5TokenStore> train, val;

  // Errors name the file: not a token dataset, or made with another tokenizer than `expected` (if given).
  static TokenDataset open(const std::string& path, const Tokenizer* expected = nullptr);
};

}  // namespace tessera
