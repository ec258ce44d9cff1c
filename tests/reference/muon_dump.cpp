// Writes what the PyTorch oracle (check_muon.py) compares against: for each case, the initial weights, the
// gradients and learning rates of a few Muon steps, and the weights after every step.
//   <case>/w0 (shape), <case>/grads (steps, shape), <case>/lrs (steps), <case>/weights (steps, shape),
//   <case>/momentum (shape, after the last step); root attributes "<case>.<field>" hold each case's config.
#include <cstdio>
#include <filesystem>
#include <string>

#include "core/rng.h"
#include "io/h5.h"
#include "optim/muon.h"

using namespace tessera;

namespace {

Tensor gaussian(const Shape& shape, uint64_t seed, double std) {
  Tensor t = Tensor::empty(shape, DType::f32);
  Rng{seed, stream_id("reference-muon")}.fill_normal(t.data<float>(), t.numel(), 0.0, std);
  return t;
}

Shape with_steps(int64_t steps, const Shape& shape) {
  Shape s{steps};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

struct Case {
  std::string name;
  Shape shape;
  MuonConfig cfg;
};

void run_case(io::H5Writer& dump, const Case& c, uint64_t seed) {
  const int64_t steps = 4;
  const double lrs[steps] = {0.02, 0.015, 0.01, 0.005};
  Param p{c.name, ParamKind::matrix, gaussian(c.shape, seed, 0.02), Tensor::zeros(c.shape, DType::f32)};
  dump.write_tensor(c.name + "/w0", p.value);
  Tensor grads = Tensor::empty(with_steps(steps, c.shape), DType::f32);
  Tensor weights = Tensor::empty(with_steps(steps, c.shape), DType::f32);
  Tensor lr_t = Tensor::empty({steps}, DType::f64);
  Muon opt({&p}, c.cfg);
  for (int64_t s = 0; s < steps; ++s) {
    p.grad = gaussian(c.shape, seed + 1000 * (s + 1), 1.0 + 0.5 * double(s));
    grads.slice(s, 1).reshape(c.shape).copy_from(p.grad);
    lr_t.data<double>()[s] = lrs[s];
    opt.step(lrs[s]);
    weights.slice(s, 1).reshape(c.shape).copy_from(p.value);
  }
  dump.write_tensor(c.name + "/grads", grads);
  dump.write_tensor(c.name + "/weights", weights);
  dump.write_tensor(c.name + "/lrs", lr_t);
  dump.write_tensor(c.name + "/momentum", opt.momenta()[0]);
  dump.write_attr(c.name + ".momentum", c.cfg.momentum);
  dump.write_attr(c.name + ".nesterov", int64_t(c.cfg.nesterov));
  dump.write_attr(c.name + ".weight_decay", c.cfg.weight_decay);
  dump.write_attr(c.name + ".update_rms", c.cfg.update_rms);
  dump.write_attr(c.name + ".ns_schedule", std::string(ns_schedule_name(c.cfg.ns_schedule)));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1];
  std::filesystem::create_directories(out);
  MuonConfig v4;  // the defaults: V4 schedule, mu 0.95, Nesterov, wd 0.1, update RMS 0.18
  MuonConfig original = v4;
  original.ns_schedule = NsSchedule::original;
  original.nesterov = false;
  original.update_rms = 0.2;  // Moonlight's factor
  original.weight_decay = 0.05;
  const Case cases[] = {
      {"square", {64, 64}, v4},
      {"wide", {32, 96}, v4},
      {"tall", {96, 32}, v4},
      {"experts", {4, 32, 48}, v4},
      {"tall_original", {80, 48}, original},
  };
  io::H5Writer dump(out + "/muon.h5");
  uint64_t seed = 1;
  for (const Case& c : cases) run_case(dump, c, seed++);
  dump.commit();
  std::printf("wrote %s/muon.h5\n", out.c_str());
  return 0;
}
