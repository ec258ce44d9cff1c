// Plain-text corpora tokenized in memory, split into train and held-out parts by document, and the packed
// loader that cuts fixed-length windows from any token store (memory here, HDF5 in token_dataset.h).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/batch.h"
#include "data/tokenizer.h"

namespace tessera {

// Where a loader reads tokens from: memory (TokenSplit) or an HDF5 token dataset (token_dataset.h).
class TokenStore {
 public:
  virtual ~TokenStore() = default;
  virtual int64_t size() const = 0;
  virtual void read(int64_t start, int64_t n, int32_t* out) const = 0;  // tokens [start, start + n)
  virtual const std::vector<int64_t>& doc_starts() const = 0;  // sorted offsets where documents begin
  // Chat datasets carry a loss mask: 1 where a token is trained on as a target (assistant tokens).
  virtual bool has_loss_mask() const { return false; }
  virtual void read_mask(int64_t start, int64_t n, uint8_t* out) const {}
};

struct TokenSplit final : TokenStore {
  std::vector<int32_t> tokens;
  std::vector<int64_t> starts;  // doc_starts; starts[0] == 0

  int64_t size() const override { return static_cast<int64_t>(tokens.size()); }
  void read(int64_t start, int64_t n, int32_t* out) const override {
    std::copy(tokens.begin() + start, tokens.begin() + start + n, out);
  }
  const std::vector<int64_t>& doc_starts() const override { return starts; }
};

// The text split at the start of its last `fraction` of bytes (moved forward to a UTF-8 character boundary).
std::pair<std::string, std::string> split_tail(const std::string& text, double fraction);

struct TextCorpusConfig {
  std::vector<std::string> files;
  // A line holding only this string separates documents (fortunes use "%"). Empty: each file is one document.
  // With documents, each one ends with the end-of-sequence token.
  std::string separator;
  double val_fraction = 0.1;
  uint64_t split_seed = 0;  // which documents are held out
};

struct TextCorpus {
  TokenSplit train, val;
  int64_t n_documents = 0;
  uint64_t fingerprint = 0;  // of the token stream, stored in checkpoints to detect a changed dataset

  // Errors name the file: missing, unreadable, empty, or too short to split.
  static TextCorpus load(const TextCorpusConfig& cfg, const Tokenizer& tok);
};

// Deterministic packed loader: row g of the stream is the window starting at a position drawn by Philox from
// (seed, g), so batch(step) is a pure function of (seed, step, dp_rank, dp_size) and the cursor is the step.
class PackedLoader {
 public:
  PackedLoader(const TokenStore* split, int64_t seq_len, uint64_t seed, bool document_mask);

  // Micro-batch `micro` of training step `step`: rows ((step * accum + micro) * dp_size + dp_rank) * B + r,
  // so DP ranks see disjoint rows whose union is the one-rank batch of size B * dp_size.
  TokenBatch train_batch(int64_t step, int64_t micro, int64_t accum, int64_t batch_size, int64_t dp_rank = 0,
                         int64_t dp_size = 1) const;
  // Held-out batches: consecutive non-overlapping windows from the start of the split.
  int64_t eval_windows() const;
  TokenBatch eval_batch(int64_t first_window, int64_t batch_size) const;

 private:
  void fill_row(int64_t start, TokenBatch& b, int64_t row) const;
  const TokenStore* split_;
  int64_t seq_len_;
  uint64_t seed_;
  bool document_mask_;
};

}  // namespace tessera
