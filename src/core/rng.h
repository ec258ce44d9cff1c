// Counter-based RNG (Philox4x32-10): the value at (seed, stream, index) is a pure function of those three,
// so results never depend on thread count, chunking or the order of calls.
#pragma once
#include <array>
#include <cstdint>

namespace tessera {

std::array<uint32_t, 4> philox4x32(uint64_t key, uint64_t counter_hi, uint64_t counter_lo);

// Named streams keep independent uses (init of each parameter, data order, sampling) from overlapping.
uint64_t stream_id(const char* name, uint64_t sub = 0);

struct Rng {
  uint64_t seed = 0;
  uint64_t stream = 0;

  uint32_t bits(uint64_t index) const { return philox4x32(seed, stream, index)[0]; }
  // Uniform in [0, 1) with 24 random bits.
  float uniform(uint64_t index) const { return (bits(index) >> 8) * (1.0f / 16777216.0f); }
  // Uniform integer in [0, n) (n < 2^32; bias below 2^-32 * n).
  uint64_t below(uint64_t index, uint64_t n) const;
  // Standard normal by Box-Muller; index i uses Philox block i.
  double normal(uint64_t index) const;
  // out[i] = mean + std * normal(offset + i) for i in [0, n).
  void fill_normal(float* out, int64_t n, double mean, double std, uint64_t offset = 0) const;
};

}  // namespace tessera
