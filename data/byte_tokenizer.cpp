#include "data/byte_tokenizer.h"

#include "core/error.h"

namespace tessera {

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  const auto& specials = v4_special_tokens();
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) TS_FAIL("token id ", id, " is outside the byte vocabulary [0, ", vocab_size(), ")");
    if (id < 256) out.push_back(static_cast<char>(id));
    else if (id - 256 < int32_t(specials.size())) out += specials[id - 256];
    else out += "<|reserved_" + std::to_string(id - 256) + "|>";
  }
  return out;
}

int32_t ByteTokenizer::special_id(const std::string& token) const {
  const auto& specials = v4_special_tokens();
  for (size_t i = 0; i < specials.size(); ++i)
    if (specials[i] == token) return 256 + static_cast<int32_t>(i);
  TS_FAIL("the byte tokenizer has no special token '", token, "'");
}

uint64_t ByteTokenizer::hash() const {
  uint64_t h = 1469598103934665603ull;
  for (char c : std::string("byte/") + std::to_string(vocab_size())) h = (h ^ uint8_t(c)) * 1099511628211ull;
  for (const std::string& s : v4_special_tokens())
    for (char c : s) h = (h ^ uint8_t(c)) * 1099511628211ull;
  return h;
}

}  // namespace tessera
