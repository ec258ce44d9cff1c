#include "data/tokenizer.h"

namespace tessera {

const std::vector<std::string>& v4_special_tokens() {
  static const std::vector<std::string> tokens = {
      kBosToken,   kEosToken,        kUserToken,          kAssistantToken, kThinkToken,
      kEndThinkToken, kDsmlToken,    kToolResultToken,    kEndToolResultToken, kPadToken};
  return tokens;
}

int64_t Tokenizer::token_bytes(int32_t id) const {
  for (const std::string& s : v4_special_tokens())
    if (special_id(s) == id) return 0;
  return static_cast<int64_t>(decode({id}).size());
}

std::vector<int32_t> Tokenizer::encode_with_specials(const std::string& text) const {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos < text.size()) {
    // The earliest special token at or after pos (the longest on ties).
    size_t best = std::string::npos, best_len = 0;
    const std::string* found = nullptr;
    for (const std::string& s : v4_special_tokens()) {
      size_t at = text.find(s, pos);
      if (at != std::string::npos && (at < best || (at == best && s.size() > best_len)))
        best = at, best_len = s.size(), found = &s;
    }
    size_t plain_end = found ? best : text.size();
    if (plain_end > pos) {
      std::vector<int32_t> part = encode(text.substr(pos, plain_end - pos));
      ids.insert(ids.end(), part.begin(), part.end());
    }
    if (!found) break;
    ids.push_back(special_id(*found));
    pos = best + best_len;
  }
  return ids;
}

}  // namespace tessera
