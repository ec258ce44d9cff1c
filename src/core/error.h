// Checked errors that carry file and line: every failure says where and why.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace tessera {

// A user-facing error (bad recipe, bad data, bad checkpoint): the message is the whole story.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail_at(const char* file, int line, const std::string& what);

namespace detail {
inline void append(std::ostringstream&) {}
template <class T, class... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  return os.str();
}

}  // namespace tessera

// TS_CHECK(cond, msg...): internal invariant; throws tessera::Error with file:line, the condition and msg.
#define TS_CHECK(cond, ...)                                                                       \
  do {                                                                                            \
    if (!(cond))                                                                                  \
      ::tessera::fail_at(__FILE__, __LINE__, ::tessera::cat("check failed: " #cond " ", ##__VA_ARGS__)); \
  } while (0)

// TS_FAIL(msg...): user-facing error with a message only (no source location: it is about the input).
#define TS_FAIL(...) throw ::tessera::Error(::tessera::cat(__VA_ARGS__))
