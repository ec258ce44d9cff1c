#include "core/rng.h"

#include <cmath>

namespace tessera {

std::array<uint32_t, 4> philox4x32(uint64_t key, uint64_t counter_hi, uint64_t counter_lo) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t{0xD2511F53u} * c0, p1 = uint64_t{0xCD9E8D57u} * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = static_cast<uint32_t>(p1);
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

uint64_t stream_id(const char* name, uint64_t sub) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (const char* p = name; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 1099511628211ull;
  return h ^ (sub * 0x9E3779B97F4A7C15ull);
}

uint64_t Rng::below(uint64_t index, uint64_t n) const {
  auto r = philox4x32(seed, stream, index);
  uint64_t x = (uint64_t{r[0]} << 32) | r[1];
  return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * n) >> 64);
}

double Rng::normal(uint64_t index) const {
  auto r = philox4x32(seed, stream, index);
  // 53-bit uniforms; u1 in (0, 1] so log is finite.
  double u1 = ((((uint64_t{r[0]} << 32) | r[1]) >> 11) + 1) * (1.0 / 9007199254740992.0);
  double u2 = ((((uint64_t{r[2]} << 32) | r[3]) >> 11)) * (1.0 / 9007199254740992.0);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

void Rng::fill_normal(float* out, int64_t n, double mean, double std, uint64_t offset) const {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(mean + std * normal(offset + i));
}

}  // namespace tessera
