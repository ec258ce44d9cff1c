// Minimal logging to stderr; rank-aware callers prefix their own rank.
#pragma once
#include <string>

namespace tessera {
void log_info(const std::string& msg);
void log_warn(const std::string& msg);
double now_seconds();  // monotonic
}  // namespace tessera
