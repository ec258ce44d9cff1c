// Minimal logging to stderr; rank-aware callers prefix their own rank.
#pragma once
#include <string>

namespace tessera {
void log_info(const std::string& msg);
void log_warn(const std::string& msg);
// Silences log_info and log_warn in this process (the ranks other than 0 of a multi-process job).
void set_log_quiet(bool quiet);
double now_seconds();  // monotonic
}  // namespace tessera
