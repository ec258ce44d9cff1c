#include "cli/run_files.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "core/error.h"
#include "core/log.h"

extern char** environ;

namespace tessera {
namespace fs = std::filesystem;

std::string format_duration(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), int(std::fmod(s, 3600) / 60));
  else std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(std::fmod(s, 60)));
  return buf;
}

void write_atomically(const std::filesystem::path& path, const std::string& text) {
  fs::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    out << text;
    if (!out.flush()) TS_FAIL("cannot write '", tmp.string(), "'");
  }
  fs::rename(tmp, path);
}

// Keeps the metrics lines the checkpoint we resume from had seen: every line up to the last one of step
// last_step (a rollback on a loss spike repeats step numbers, and the lines of the abandoned steps stay), or,
// without such a line, the lines of steps <= last_step.
void truncate_metrics(const std::filesystem::path& path, int64_t last_step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string line;
  std::vector<std::pair<long long, std::string>> lines;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    auto pos = line.find("\"step\": ");
    char* end = nullptr;
    long long step = pos == std::string::npos ? -1 : std::strtoll(line.c_str() + pos + 8, &end, 10);
    if (step < 0) log_warn(cat(path.string(), ":", n, ": not a metrics line, dropped"));
    else lines.emplace_back(step, line);
  }
  size_t last = lines.size();
  for (size_t i = 0; i < lines.size(); ++i)
    if (lines[i].first == last_step) last = i;
  std::string kept;
  for (size_t i = 0; i < lines.size(); ++i)
    if (last < lines.size() ? i <= last : lines[i].first <= last_step) kept += lines[i].second + "\n";
  write_atomically(path, kept);
}

// JSON has no NaN or infinity: such values are written as null.
std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

bool plot_metrics(const std::string& run_dir, const std::vector<std::string>& args, const std::string& what) {
  const char* env = std::getenv("TESSERA_PYTHON");
  std::string python = env && *env ? env
                       : fs::exists(TESSERA_SOURCE_DIR "/.venv/bin/python") ? TESSERA_SOURCE_DIR "/.venv/bin/python"
                                                                          : "python3";
  std::string script = TESSERA_SOURCE_DIR "/launch/plot_metrics.py";
  std::vector<std::string> words = {python, script, run_dir};
  words.insert(words.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid;
  int status = -1;
  if (posix_spawnp(&pid, python.c_str(), &actions, nullptr, argv.data(), environ) == 0) waitpid(pid, &status, 0);
  posix_spawn_file_actions_destroy(&actions);
  bool ok = status == 0;
  if (!ok) {
    std::string cmd;
    for (size_t i = 0; i + 1 < argv.size(); ++i) cmd += cat(i ? " " : "", argv[i]);
    log_warn(cat("could not draw the ", what, "; run: ", cmd));
  }
  return ok;
}

}  // namespace tessera
