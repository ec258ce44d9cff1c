#include "data/byte_tokenizer.h"

#include "core/error.h"

namespace tessera {

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::special_name(int32_t id) {
  switch (id) {
    case kBos: return "<|bos|>";
    case kEos: return "<|eos|>";
    case kPad: return "<|pad|>";
    default: return "<|reserved_" + std::to_string(id - 256) + "|>";
  }
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) TS_FAIL("token id ", id, " is outside the byte vocabulary [0, ", vocab_size(), ")");
    if (id < 256) out.push_back(static_cast<char>(id));
    else out += special_name(id);
  }
  return out;
}

}  // namespace tessera
