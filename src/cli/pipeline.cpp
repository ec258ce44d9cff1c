#include "cli/pipeline.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <toml++/toml.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "cli/recipe.h"
#include "cli/run_files.h"
#include "cli/stages.h"
#include "core/error.h"
#include "core/log.h"
#include "io/checkpoint.h"
#include "parallel/communicator.h"

extern char** environ;

namespace tessera {

namespace fs = std::filesystem;

namespace {

// ---- the pipeline file ----

std::string where(const std::string& path, const toml::source_region& src) {
  return cat(path, ":", src.begin.line);
}

std::string string_value(const std::string& path, const toml::node& n, const std::string& key) {
  const toml::value<std::string>* s = n.as_string();
  if (!s) TS_FAIL(where(path, n.source()), ": key '", key, "': must be a string");
  return s->get();
}

std::vector<std::string> string_list(const std::string& path, const toml::node& n, const std::string& key) {
  const toml::array* a = n.as_array();
  if (!a) TS_FAIL(where(path, n.source()), ": key '", key, "': must be an array of strings");
  std::vector<std::string> out;
  for (const toml::node& v : *a) out.push_back(string_value(path, v, key));
  return out;
}

bool valid_stage_name(const std::string& s) {
  if (s.empty() || s == "." || s == "..") return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

// ---- hashing and stamps ----

struct Hasher {
  uint64_t h = 1469598103934665603ull;  // FNV-1a, 64 bits
  void add(std::string_view s) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    h = (h ^ 0xff) * 1099511628211ull;  // separator: ("ab", "c") != ("a", "bc")
  }
  std::string hex() const {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)h);
    return buf;
  }
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) TS_FAIL("cannot read '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Adds a recipe file and every file it inherits (depth first, in inherit order) to the hash: a change to any of
// them changes the stage's configuration. Recipe::load has already checked the chain (existence, cycles, syntax).
void hash_recipe_chain(const fs::path& file, Hasher& h, std::set<std::string>& stack) {
  const std::string key = file.lexically_normal().string();
  if (!stack.insert(key).second) return;  // a cycle: Recipe::load reports it
  std::string text = read_file(key);
  h.add(key);
  h.add(text);
  toml::table t;
  try {
    t = toml::parse(text, key);
  } catch (const toml::parse_error&) {
    stack.erase(key);
    return;
  }
  std::vector<std::string> parents;
  if (const toml::node* inherit = t.get("inherit")) {
    if (auto s = inherit->value<std::string>()) parents.push_back(*s);
    else if (const toml::array* a = inherit->as_array())
      for (const toml::node& v : *a)
        if (auto s = v.value<std::string>()) parents.push_back(*s);
  }
  for (const std::string& p : parents) hash_recipe_chain(file.parent_path() / p, h, stack);
  stack.erase(key);
}

struct Stamp {
  std::string config, run;
  std::map<std::string, std::string> deps;  // dependency -> the run id of it this stage ran after
  std::vector<std::string> outputs;
};

std::optional<Stamp> read_stamp(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  Stamp s;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string k;
    ls >> k;
    if (k == "config") ls >> s.config;
    else if (k == "run") ls >> s.run;
    else if (k == "dep") {
      std::string name, id;
      ls >> name >> id;
      s.deps[name] = id;
    } else if (k == "output") {
      std::string rest;
      std::getline(ls >> std::ws, rest);
      s.outputs.push_back(rest);
    }
  }
  if (s.config.empty() || s.run.empty()) return std::nullopt;  // unreadable: as if never run
  return s;
}

std::string stamp_text(const Stamp& s) {
  std::string out = cat("# tessera pipeline stamp: written when the stage finished\nconfig ", s.config, "\nrun ", s.run, "\n");
  for (const auto& [k, v] : s.deps) out += cat("dep ", k, " ", v, "\n");
  for (const std::string& o : s.outputs) out += cat("output ", o, "\n");
  return out;
}

std::string new_run_id(const std::string& config) {
  Hasher h;
  h.add(config);
  h.add(std::to_string(std::chrono::system_clock::now().time_since_epoch().count()));
  h.add(std::to_string(::getpid()));
  return h.hex();
}

// ---- running a stage ----

std::string quoted_command(const std::vector<std::string>& args) {
  std::string out = "tessera";
  for (const std::string& a : args) {
    bool plain = !a.empty() && a.find_first_of(" \t\"'\\$`") == std::string::npos;
    out += plain ? " " + a : " '" + a + "'";
  }
  return out;
}

// Runs `exe args...` and waits; its stdout goes to stdout_file when given. The environment is ours without the
// variables of an MPI or Slurm launch, so the child never mistakes itself for one rank of this job.
// Returns "" on exit status 0, else why not.
std::string spawn_and_wait(const std::string& exe, const std::vector<std::string>& args, const std::string& stdout_file) {
  std::vector<std::string> argv_s{"tessera"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (char** e = environ; *e; ++e) {
    std::string_view v(*e);
    bool mpi = false;
    for (const char* p : {"OMPI_", "PMI_", "PMIX_", "SLURM_"}) mpi = mpi || v.rfind(p, 0) == 0;
    if (!mpi) envp.push_back(*e);
  }
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (!stdout_file.empty())
    posix_spawn_file_actions_addopen(&fa, 1, stdout_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = 0;
  int err = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (err != 0) return cat("cannot start '", exe, "': ", std::strerror(err));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return cat("waiting for `", quoted_command(args), "`: ", std::strerror(errno));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  if (WIFEXITED(status)) return cat("`", quoted_command(args), "` exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return cat("`", quoted_command(args), "` was killed by signal ", WTERMSIG(status));
  return cat("`", quoted_command(args), "` ended abnormally");
}

// What a stage is, resolved from its files: its configuration hash, its outputs and (training) its run.
struct Resolved {
  std::string config;
  std::vector<std::string> outputs;
  std::string run_dir;  // training stages
  TrainOptions train;
};

Resolved resolve(const PipelineStage& s) {
  Resolved r;
  Hasher h;
  h.add(s.recipe.empty() ? "command" : "train");
  for (const std::string& a : s.after) h.add("after:" + a);
  if (!s.recipe.empty()) {
    if (!fs::exists(s.recipe)) TS_FAIL("recipe '", s.recipe, "' does not exist");
    Recipe recipe = Recipe::load(s.recipe, s.set);
    const std::string name = recipe.get_string("job.name", fs::path(recipe.path()).stem().string());
    r.run_dir = recipe.get_string("job.run_dir", "runs/" + name);
    const int64_t steps = recipe.get_int("training.steps", 0);
    if (steps <= 0) TS_FAIL("recipe '", s.recipe, "': training.steps must be set (a positive integer)");
    r.outputs.push_back(checkpoint_path(r.run_dir, steps));
    std::set<std::string> stack;
    hash_recipe_chain(s.recipe, h, stack);
    for (const std::string& o : s.set) h.add("set:" + o);
    r.train.recipe_path = s.recipe;
    r.train.overrides = s.set;
  } else {
    for (const std::string& a : s.command) h.add("arg:" + a);
    r.outputs = s.outputs;
    if (!s.stdout_path.empty()) {
      h.add("stdout:" + s.stdout_path);
      r.outputs.push_back(s.stdout_path);
    }
    for (const std::string& o : s.outputs) h.add("output:" + o);
  }
  r.config = h.hex();
  return r;
}

std::string duration(double seconds) {
  if (seconds >= 60) return format_duration(seconds);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  return buf;
}

void say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

}  // namespace

Pipeline load_pipeline(const std::string& path) {
  if (!fs::exists(path)) TS_FAIL("pipeline '", path, "' does not exist");
  toml::table t;
  try {
    t = toml::parse(read_file(path), path);
  } catch (const toml::parse_error& e) {
    TS_FAIL(path, ":", e.source().begin.line, ": ", e.description());
  }
  Pipeline p;
  p.path = path;
  p.name = fs::path(path).stem().string();
  for (auto&& [k, v] : t) {
    const std::string key(k.str());
    if (key == "name") {
      p.name = string_value(path, v, "name");
      if (!valid_stage_name(p.name))
        TS_FAIL(where(path, v.source()), ": key 'name': use letters, digits, '-', '_' and '.' only");
    } else if (key == "stage") {
      const toml::array* a = v.as_array();
      if (!a || !a->is_homogeneous(toml::node_type::table))
        TS_FAIL(where(path, v.source()), ": key 'stage': must be an array of tables ([[stage]] sections)");
      for (const toml::node& sn : *a) {
        PipelineStage s;
        s.line = sn.source().begin.line;
        bool has_after = false;
        for (auto&& [sk, sv] : *sn.as_table()) {
          const std::string skey(sk.str()), full = "stage." + skey;
          if (skey == "name") s.name = string_value(path, sv, full);
          else if (skey == "recipe") s.recipe = string_value(path, sv, full);
          else if (skey == "set") s.set = string_list(path, sv, full);
          else if (skey == "command") s.command = string_list(path, sv, full);
          else if (skey == "outputs") s.outputs = string_list(path, sv, full);
          else if (skey == "stdout") s.stdout_path = string_value(path, sv, full);
          else if (skey == "after") s.after = string_list(path, sv, full), has_after = true;
          else
            TS_FAIL(where(path, sk.source()), ": unknown key '", full,
                    "' (a stage has name, recipe, set, after, or command, outputs, stdout, after)");
        }
        const std::string at = cat(path, ":", s.line);
        if (!valid_stage_name(s.name))
          TS_FAIL(at, ": key 'stage.name': every stage needs a name of letters, digits, '-', '_' and '.'",
                  s.name.empty() ? "" : cat(" (got '", s.name, "')"));
        if (s.recipe.empty() == s.command.empty())
          TS_FAIL(at, ": stage '", s.name, "': give either recipe = \"...\" (a training stage) or command = [...] "
                  "(a tessera subcommand), not ", s.recipe.empty() ? "neither" : "both");
        if (!s.recipe.empty() && (!s.outputs.empty() || !s.stdout_path.empty()))
          TS_FAIL(at, ": stage '", s.name, "': outputs and stdout belong to command stages (a training stage's output "
                  "is its final checkpoint)");
        if (s.command.empty() == false && s.outputs.empty() && s.stdout_path.empty())
          TS_FAIL(at, ": stage '", s.name, "': a command stage needs outputs = [...] or stdout = \"...\" (the files that "
                  "show it is done)");
        if (!s.command.empty() && !s.set.empty())
          TS_FAIL(at, ": stage '", s.name, "': set = [...] belongs to training stages");
        if (!s.command.empty() && (s.command[0] == "train" || s.command[0] == "pipeline"))
          TS_FAIL(at, ": stage '", s.name, "': run training as a recipe stage (recipe = \"...\"), not as a command");
        for (const PipelineStage& o : p.stages)
          if (o.name == s.name) TS_FAIL(at, ": stage '", s.name, "' is defined twice (first at line ", o.line, ")");
        if (!has_after && !p.stages.empty()) s.after = {p.stages.back().name};
        p.stages.push_back(std::move(s));
      }
    } else {
      TS_FAIL(where(path, k.source()), ": unknown key '", key, "' (a pipeline file has name and [[stage]] sections)");
    }
  }
  if (p.stages.empty()) TS_FAIL(path, ": no stages (add [[stage]] sections)");
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < p.stages.size(); ++i) index[p.stages[i].name] = i;
  std::vector<std::vector<size_t>> users(p.stages.size());
  std::vector<size_t> pending(p.stages.size(), 0);
  for (size_t i = 0; i < p.stages.size(); ++i) {
    std::set<std::string> seen;
    for (const std::string& d : p.stages[i].after) {
      auto it = index.find(d);
      if (it == index.end()) {
        std::string known;
        for (const PipelineStage& o : p.stages) known += (known.empty() ? "" : ", ") + o.name;
        TS_FAIL(path, ":", p.stages[i].line, ": stage '", p.stages[i].name, "': key 'stage.after': no stage '", d,
                "' (stages: ", known, ")");
      }
      if (it->second == i) TS_FAIL(path, ":", p.stages[i].line, ": stage '", d, "' cannot run after itself");
      if (!seen.insert(d).second) continue;
      users[it->second].push_back(i);
      pending[i]++;
    }
  }
  // Kahn's algorithm, taking the ready stage that comes first in the file.
  std::set<size_t> ready;
  for (size_t i = 0; i < p.stages.size(); ++i)
    if (pending[i] == 0) ready.insert(i);
  while (!ready.empty()) {
    size_t i = *ready.begin();
    ready.erase(ready.begin());
    p.order.push_back(i);
    for (size_t u : users[i])
      if (--pending[u] == 0) ready.insert(u);
  }
  if (p.order.size() != p.stages.size()) {
    std::string cyc;
    for (size_t i = 0; i < p.stages.size(); ++i)
      if (pending[i] > 0) cyc += (cyc.empty() ? "" : ", ") + p.stages[i].name;
    TS_FAIL(path, ": the stages' `after` lists form a cycle among: ", cyc);
  }
  return p;
}

int run_pipeline(const PipelineOptions& opts, Communicator* world) {
  Pipeline p = load_pipeline(opts.path);
  const bool multi = world && world->size() > 1;
  const bool rank0 = !world || world->rank() == 0;
  // Every rank takes the same decisions: rank 0's.
  auto from_rank0 = [&](int64_t v) {
    if (!multi) return v;
    Tensor t = Tensor::zeros({1}, DType::i64, Device::cpu);
    t.data<int64_t>()[0] = v;
    world->broadcast(t, 0);
    return t.data<int64_t>()[0];
  };
  auto out = [&](const std::string& line) {
    if (rank0) say(line);
  };
  if (!opts.from.empty()) {
    bool found = false;
    for (const PipelineStage& s : p.stages) found = found || s.name == opts.from;
    if (!found) {
      std::string known;
      for (const PipelineStage& s : p.stages) known += (known.empty() ? "" : ", ") + s.name;
      TS_FAIL("--from ", opts.from, ": no such stage in ", opts.path, " (stages: ", known, ")");
    }
  }
  const fs::path stamp_dir = fs::path("runs") / "pipelines" / p.name;
  out(cat("pipeline ", p.name, ": ", p.stages.size(), " stages (stamps in ", stamp_dir.string(), ")",
          opts.dry_run ? "; dry run" : ""));

  struct State {
    bool runs = false;   // ran (or, in a dry run, would run) in this invocation
    std::string run_id;  // its stamp's run id after this invocation
  };
  std::map<std::string, State> state;
  int ran = 0, skipped = 0;
  const double t_all = now_seconds();
  for (size_t idx : p.order) {
    const PipelineStage& s = p.stages[idx];
    Resolved r;
    std::string reason;
    std::optional<Stamp> stamp;
    try {
      r = resolve(s);
      stamp = read_stamp(stamp_dir / (s.name + ".stamp"));
      if (opts.from == s.name) reason = "--from";
      else if (!stamp) reason = "not run by this pipeline yet";
      else if (stamp->config != r.config) reason = s.recipe.empty() ? "its command changed" : "its recipe changed";
      if (reason.empty())
        for (const std::string& o : r.outputs)
          if (!fs::exists(o)) {
            reason = "missing output " + o;
            break;
          }
      if (reason.empty())
        for (const std::string& d : s.after) {
          const State& ds = state.at(d);
          if (ds.runs) reason = cat("after ", d, opts.dry_run ? ", which would run" : ", which ran");
          else if (!stamp->deps.count(d) || stamp->deps.at(d) != ds.run_id) reason = cat(d, " changed since it ran");
          if (!reason.empty()) break;
        }
    } catch (const std::exception& e) {
      TS_FAIL("stage ", s.name, " failed: ", e.what());
    }
    const bool run = from_rank0(reason.empty() ? 0 : 1) != 0;
    State& st = state[s.name];
    if (!run) {
      out(cat("stage ", s.name, ": up to date"));
      st.run_id = stamp->run;
      ++skipped;
      continue;
    }
    st.runs = true;
    if (opts.dry_run) {
      out(cat("stage ", s.name, ": would run (", reason, ")",
              s.recipe.empty() ? cat(": ", quoted_command(s.command)) : cat(": ", s.recipe, " -> ", r.outputs[0])));
      st.run_id = "(dry-run)";
      ++ran;
      continue;
    }
    out(cat("stage ", s.name, ": running (", reason, ")",
            s.recipe.empty() ? cat(": ", quoted_command(s.command)) : cat(": ", s.recipe)));
    const double t0 = now_seconds();
    std::string failure;
    if (!s.recipe.empty()) {
      // A rerun starts in an empty run directory; the earlier run waits beside it and comes back if this one fails.
      const fs::path run_dir = r.run_dir, previous = r.run_dir + ".previous", failed = r.run_dir + ".failed";
      bool moved = false;
      if (rank0 && fs::exists(run_dir)) {
        fs::remove_all(previous);
        fs::rename(run_dir, previous);
        moved = true;
        say(cat("stage ", s.name, ": the earlier run waits in ", previous.string(), " until this one succeeds"));
      }
      if (multi) world->barrier();
      try {
        run_train(r.train, world);
        if (from_rank0(rank0 && !fs::exists(r.outputs[0]) ? 1 : 0))
          failure = cat("the run ended without its final checkpoint ", r.outputs[0]);
      } catch (const std::exception& e) {
        failure = e.what();
      }
      if (rank0 && !failure.empty()) {
        if (fs::exists(run_dir)) {
          fs::remove_all(failed);
          fs::rename(run_dir, failed);
          failure += cat(" (this attempt's files are in ", failed.string(), ")");
        }
        if (moved) {
          fs::rename(previous, run_dir);
          failure += cat("; the earlier run is back in ", run_dir.string());
        }
      } else if (rank0 && moved) {
        fs::remove_all(previous);
      }
    } else {
      int64_t bad = 0;
      if (rank0) {
        try {
          for (const std::string& o : r.outputs)
            if (fs::path(o).has_parent_path()) fs::create_directories(fs::path(o).parent_path());
          const std::string tmp = s.stdout_path.empty() ? "" : s.stdout_path + ".tmp";
          failure = spawn_and_wait(opts.exe, s.command, tmp);
          if (failure.empty() && !tmp.empty()) fs::rename(tmp, s.stdout_path);
          else if (!tmp.empty()) fs::remove(tmp);
          if (failure.empty())
            for (const std::string& o : r.outputs)
              if (!fs::exists(o)) {
                failure = cat("`", quoted_command(s.command), "` succeeded but did not write ", o);
                break;
              }
        } catch (const std::exception& e) {
          failure = e.what();
        }
        bad = failure.empty() ? 0 : 1;
      }
      if (from_rank0(bad) && failure.empty()) failure = "it failed on rank 0";
    }
    if (!failure.empty()) TS_FAIL("stage ", s.name, " failed: ", failure);
    st.run_id = new_run_id(r.config);
    if (rank0) {
      Stamp ns;
      ns.config = r.config;
      ns.run = st.run_id;
      for (const std::string& d : s.after) ns.deps[d] = state.at(d).run_id;
      ns.outputs = r.outputs;
      fs::create_directories(stamp_dir);
      write_atomically(stamp_dir / (s.name + ".stamp"), stamp_text(ns));
    }
    if (multi) world->barrier();
    // Ranks other than 0 need the run id rank 0 stored: the next stages compare their stamps with it.
    if (multi) {
      std::optional<Stamp> written = read_stamp(stamp_dir / (s.name + ".stamp"));
      if (written) st.run_id = written->run;
    }
    out(cat("stage ", s.name, ": done in ", duration(now_seconds() - t0)));
    ++ran;
  }
  if (ran == 0) out(cat("pipeline ", p.name, ": nothing to do, every stage is up to date"));
  else if (opts.dry_run) out(cat("pipeline ", p.name, ": dry run: ", ran, " of ", p.stages.size(), " stages would run"));
  else
    out(cat("pipeline ", p.name, ": done in ", duration(now_seconds() - t_all), ": ", ran, ran == 1 ? " stage" : " stages",
            " ran, ", skipped, " up to date"));
  return 0;
}

}  // namespace tessera
