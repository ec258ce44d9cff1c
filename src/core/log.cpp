#include "core/log.h"

#include <chrono>
#include <cstdio>

namespace tessera {
static bool g_quiet = false;
void set_log_quiet(bool quiet) { g_quiet = quiet; }
void log_info(const std::string& msg) {
  if (!g_quiet) std::fprintf(stderr, "%s\n", msg.c_str());
}
void log_warn(const std::string& msg) {
  if (!g_quiet) std::fprintf(stderr, "warning: %s\n", msg.c_str());
}
double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}
}  // namespace tessera
