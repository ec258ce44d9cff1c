// Byte-level tokenizer: ids 0-255 are the bytes of UTF-8 text, then V4's special tokens, then reserved ids.
#pragma once
#include "data/tokenizer.h"

namespace tessera {

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kNumSpecial = 16;  // V4's specials, then reserved ids up to 256 + 16

  int64_t vocab_size() const override { return 256 + kNumSpecial; }
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int32_t special_id(const std::string& token) const override;
  std::string kind() const override { return "byte"; }
  uint64_t hash() const override;
  int64_t token_bytes(int32_t id) const override { return id < 256 ? 1 : 0; }
};

}  // namespace tessera
