#include "core/error.h"

namespace tessera {

void fail_at(const char* file, int line, const std::string& what) {
  std::string f(file);
  auto pos = f.rfind("/src/");
  if (pos == std::string::npos) pos = f.rfind("/tessera/");
  if (pos != std::string::npos) f = f.substr(pos + 1);
  throw Error(cat(f, ":", line, ": ", what));
}

}  // namespace tessera
