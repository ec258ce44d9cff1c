// SentencePiece BPE tokenizer: trained by train_sentencepiece with V4's special tokens (and reserved ones) as
// control pieces, so plain text never encodes to them; byte fallback makes every UTF-8 string round-trip.
// export_hf_tokenizer writes a tokenizer.json that Hugging Face's AutoTokenizer loads with identical ids.
#pragma once
#include <array>
#include <memory>

#include "data/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace tessera {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Loads a `.model` file written by train_sentencepiece (throws tessera::Error naming the file).
  static std::unique_ptr<SentencePieceTokenizer> load(const std::string& path);
  ~SentencePieceTokenizer() override;

  int64_t vocab_size() const override;
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int32_t special_id(const std::string& token) const override;
  std::string kind() const override { return "sentencepiece"; }
  uint64_t hash() const override { return hash_; }  // FNV-1a of the serialized model proto

  const sentencepiece::SentencePieceProcessor& processor() const { return *sp_; }

 private:
  SentencePieceTokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::array<int32_t, 256> byte_ids_{};
  uint64_t hash_ = 0;
  bool split_lines_ = true;  // no piece holds a newline (always so for models trained on lines of text)
};

// Trains a BPE model on text files (one sentence per line) and writes <model_prefix>.model and .vocab.
// The vocabulary holds <unk>, V4's specials, `reserved` <|reserved_N|> pieces, the 256 byte pieces, then merges.
void train_sentencepiece(const std::vector<std::string>& input_files, const std::string& model_prefix,
                         int64_t vocab_size, int64_t reserved = 8);

// Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir (created if needed).
void export_hf_tokenizer(const SentencePieceTokenizer& tok, const std::string& out_dir);

}  // namespace tessera
