// Files of a run directory shared by the training stages: metrics lines, atomic writes, plots.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace tessera {

std::string format_duration(double seconds);  // "1h02m" or "3m07s"

// Writes path.tmp, then renames it over path: a reader never sees a partial file.
void write_atomically(const std::filesystem::path& path, const std::string& text);

// Keeps the metrics lines the checkpoint we resume from had seen: every line up to the last one of step
// last_step (a rollback on a loss spike repeats step numbers, and the lines of the abandoned steps stay), or,
// without such a line, the lines of steps <= last_step.
void truncate_metrics(const std::filesystem::path& path, int64_t last_step);

// JSON has no NaN or infinity: such values are written as null.
std::string json_number(double v);

// Runs launch/plot_metrics.py RUN_DIR ARGS... (matplotlib, from the .venv that setup.sh makes); a missing Python
// or matplotlib is a warning naming `what` (e.g. "loss plot"), not a failed run. TESSERA_PYTHON picks the
// interpreter.
bool plot_metrics(const std::string& run_dir, const std::vector<std::string>& args, const std::string& what);

}  // namespace tessera
