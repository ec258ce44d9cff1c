#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/tokenizer.h"

namespace tessera {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& kind, const std::string& model_path) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  TS_FAIL("unknown tokenizer kind '", kind, "' (byte)");
}

}  // namespace tessera
