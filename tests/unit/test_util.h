// Helpers shared by the unit tests: the message of the tessera::Error a call throws, and per-test temp files.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "core/batch.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/config.h"

namespace tessera::testing {

// A dense (Llama-layout) config for tests: 4 query heads over 2 KV heads; init_std 0.3 is large enough that every
// path carries signal.
inline ModelConfig dense_test_config(int64_t vocab, int64_t dim, int64_t n_layers, int64_t ffn_dim,
                                     int64_t max_seq_len, double init_std = 0.3) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.dim = dim;
  c.n_layers = n_layers;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.ffn_dim = ffn_dim;
  c.max_seq_len = max_seq_len;
  c.init_std = init_std;
  return c;
}

// The what() of the tessera::Error that f throws, or "" if it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A directory for this test process's files, under the system temp directory.
inline std::filesystem::path temp_dir(const std::string& tag) {
  auto p = std::filesystem::temp_directory_path() / ("tessera_test_" + tag + "_" + std::to_string(::getpid()));
  std::filesystem::create_directories(p);
  return p;
}

inline std::string write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path.string();
}

// B x T uniformly random input and target ids in [0, V), from Philox(seed): the same batch on every machine.
inline TokenBatch random_token_batch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  TokenBatch b;
  b.ids = Tensor::empty({B, T}, DType::i32);
  b.targets = Tensor::empty({B, T}, DType::i32);
  Rng rng{seed, stream_id("random-token-batch")};
  for (int64_t i = 0; i < B * T; ++i) {
    b.ids.data<int32_t>()[i] = int32_t(rng.below(2 * i, V));
    b.targets.data<int32_t>()[i] = int32_t(rng.below(2 * i + 1, V));
  }
  return b;
}

// A host tensor of `shape` (f64 or f32) holding v, row-major; and the values of an f32/f64 host tensor.
inline Tensor tensor_of(const std::vector<double>& v, const Shape& shape, DType dt = DType::f64) {
  Tensor t = Tensor::empty(shape, dt, Device::cpu);
  TS_CHECK(t.numel() == int64_t(v.size()), "tensor_of: ", v.size(), " values for ", t.numel(), " elements");
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == DType::f64)
      t.data<double>()[i] = v[i];
    else
      t.data<float>()[i] = float(v[i]);
  }
  return t;
}

// M micro-batches, micro-batch m made by make(m), and the number of targets they hold together (the global
// normalisation of a step's loss).
template <class Make>
std::vector<TokenBatch> micro_batches(int64_t M, Make make, int64_t& n_targets) {
  std::vector<TokenBatch> micro;
  n_targets = 0;
  for (int64_t m = 0; m < M; ++m) {
    micro.push_back(make(m));
    n_targets += micro.back().count_targets();
  }
  return micro;
}

inline std::vector<double> values_of(const Tensor& t) {
  std::vector<double> v(size_t(t.numel()));
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = t.dtype() == DType::f64 ? t.data<double>()[i] : double(t.data<float>()[i]);
  return v;
}

}  // namespace tessera::testing
