// Byte-level tokenizer: ids 0-255 are the bytes of UTF-8 text, followed by reserved special tokens.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

class ByteTokenizer {
 public:
  static constexpr int32_t kBos = 256;
  static constexpr int32_t kEos = 257;
  static constexpr int32_t kPad = 258;
  static constexpr int32_t kNumSpecial = 8;  // 256..263; the rest are reserved for later formats

  int64_t vocab_size() const { return 256 + kNumSpecial; }
  std::vector<int32_t> encode(const std::string& text) const;
  // Special tokens decode to their names ("<|eos|>"); the byte sequence is returned as is (may be partial UTF-8).
  std::string decode(const std::vector<int32_t>& ids) const;
  static std::string special_name(int32_t id);
};

}  // namespace tessera
