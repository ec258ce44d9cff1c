// Element types. Compute happens in fp32 (or fp64 for gradient checks); bf16 is a storage type.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace tessera {

enum class DType : uint8_t { f32, f64, bf16, i32, i64 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
DType dtype_from_name(const std::string& name);  // throws on unknown names

template <class T>
constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }

// bf16: the top 16 bits of an fp32, rounded to nearest even.
struct bf16 {
  uint16_t bits;
};
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }

inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
inline float from_bf16(bf16 b) {
  uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace tessera
