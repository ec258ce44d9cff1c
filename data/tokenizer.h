// The tokenizer interface: byte-level and SentencePiece tokenizers implement it. DeepSeek-V4's special
// tokens are reserved in every tokenizer as single ids, so chat and tool-call formats encode the same way.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

// V4's special tokens, in the order their ids are assigned (after the byte or piece vocabulary).
const std::vector<std::string>& v4_special_tokens();
inline const char* kBosToken = "<｜begin▁of▁sentence｜>";
inline const char* kEosToken = "<｜end▁of▁sentence｜>";
inline const char* kUserToken = "<｜User｜>";
inline const char* kAssistantToken = "<｜Assistant｜>";
inline const char* kThinkToken = "<think>";
inline const char* kEndThinkToken = "</think>";
inline const char* kDsmlToken = "｜DSML｜";
inline const char* kToolResultToken = "<tool_result>";
inline const char* kEndToolResultToken = "</tool_result>";
inline const char* kPadToken = "<｜pad｜>";

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual int64_t vocab_size() const = 0;
  // Plain text to ids; special-token strings in the text are NOT recognised (use encode_with_specials).
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  // Ids to text; special ids decode to their strings.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // The id of a special token (throws tessera::Error for unknown names).
  virtual int32_t special_id(const std::string& token) const = 0;
  virtual std::string kind() const = 0;  // "byte" or "sentencepiece"
  // Identifies the tokenizer (kind, vocabulary, specials): stored in datasets and checkpoints to detect mixing.
  virtual uint64_t hash() const = 0;

  // Bytes of text that token `id` stands for (0 for special tokens): for losses in nats per byte. The default
  // decodes the token alone.
  virtual int64_t token_bytes(int32_t id) const;

  int32_t bos_id() const { return special_id(kBosToken); }
  int32_t eos_id() const { return special_id(kEosToken); }
  // Text in which V4 special-token strings become their single ids.
  std::vector<int32_t> encode_with_specials(const std::string& text) const;
};

// "byte", or "sentencepiece" with the path of its .model file. Errors name the kind or the file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& kind, const std::string& model_path);

}  // namespace tessera
