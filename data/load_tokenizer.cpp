#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/sp_tokenizer.h"

namespace tessera {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& kind, const std::string& model_path) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  if (kind == "sentencepiece") {
    if (model_path.empty()) TS_FAIL("a sentencepiece tokenizer needs its .model file (tokenizer.model)");
    return SentencePieceTokenizer::load(model_path);
  }
  TS_FAIL("unknown tokenizer kind '", kind, "' (byte, sentencepiece)");
}

}  // namespace tessera
