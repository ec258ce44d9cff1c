#include "ops/quant.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace tessera::quant {

namespace {

// Round to nearest, ties to even, independent of the floating-point rounding mode.
double round_half_even(double t) {
  double r = std::floor(t), frac = t - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0)) r += 1;
  return r;
}

// Magnitude code of a minifloat with `mbits` mantissa bits, exponent bias `bias` (so the smallest normal is
// 2^(1 - bias)), subnormals below it, codes increasing with the value: subnormal code q = a / 2^(1 - bias -
// mbits), normal code (E + bias) 2^mbits + q - 2^mbits with q = a / 2^(E - mbits) in [2^mbits, 2^(mbits+1)]
// (a carry to 2^(mbits+1) lands on the next binade's first code by the same formula). Saturates at max_code.
uint32_t magnitude_code(double a, int mbits, int bias, uint32_t max_code) {
  if (a == 0) return 0;
  int e;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e)
  const int E = e - 1, emin = 1 - bias;
  const double one = double(1u << mbits);
  double code;
  if (E < emin) {
    code = round_half_even(std::ldexp(a, -(emin - mbits)));
  } else {
    code = double(E + bias) * one + round_half_even(std::ldexp(a, -(E - mbits))) - one;
  }
  return code >= double(max_code) ? max_code : uint32_t(code);
}

double magnitude_value(uint32_t code, int mbits, int bias) {
  const uint32_t e = code >> mbits, m = code & ((1u << mbits) - 1);
  if (e == 0) return std::ldexp(double(m), 1 - bias - mbits);
  return std::ldexp(double((1u << mbits) + m), int(e) - bias - mbits);
}

void check_matrix(const std::vector<double>& x, int64_t rows, int64_t cols) {
  TS_CHECK(rows >= 0 && cols >= 0, "matrix shape (", rows, ", ", cols, ") must be non-negative");
  TS_CHECK(int64_t(x.size()) == rows * cols, "matrix data has ", x.size(), " values for (", rows, ", ", cols,
           ")");
}

double scaled(double v, int32_t k) {
  return std::ldexp(v, k);
}

}  // namespace

double e2m1_decode(uint8_t code) {
  TS_CHECK(code < 16, "e2m1 code ", int(code), " is not a 4-bit code");
  const double m = magnitude_value(code & 7u, 1, 1);
  return (code & 8u) ? -m : m;
}

uint8_t e2m1_encode(double v) {
  TS_CHECK(std::isfinite(v), "e2m1_encode: value ", v, " is not finite");
  return uint8_t((std::signbit(v) ? 8u : 0u) | magnitude_code(std::abs(v), 1, 1, 7));
}

double e4m3_decode(uint8_t code) {
  if ((code & 0x7fu) == 0x7fu) return std::numeric_limits<double>::quiet_NaN();
  const double m = magnitude_value(code & 0x7fu, 3, 7);
  return (code & 0x80u) ? -m : m;
}

uint8_t e4m3_encode(double v) {
  TS_CHECK(std::isfinite(v), "e4m3_encode: value ", v, " is not finite");
  return uint8_t((std::signbit(v) ? 0x80u : 0u) | magnitude_code(std::abs(v), 3, 7, 0x7e));
}

int32_t pow2_scale_exponent(double amax, double qmax) {
  TS_CHECK(std::isfinite(amax) && amax >= 0, "block amax ", amax, " must be finite and >= 0");
  TS_CHECK(qmax > 0, "qmax must be > 0");
  if (amax == 0) return 0;
  int e;
  std::frexp(amax / qmax, &e);  // amax / qmax in [2^(e-1), 2^e)
  int32_t k = e;
  while (qmax * std::ldexp(1.0, k - 1) >= amax) --k;
  while (qmax * std::ldexp(1.0, k) < amax) ++k;
  return k;
}

// ------------------------------------------------------------------------------------------- FP4

double Fp4Matrix::value(int64_t r, int64_t c) const {
  return scaled(e2m1_decode(codes[size_t(r * cols + c)]),
                scale_exp[size_t(r * blocks_per_row() + c / block)]);
}

Fp4Matrix quantize_fp4(const std::vector<double>& x, int64_t rows, int64_t cols, int64_t block) {
  check_matrix(x, rows, cols);
  TS_CHECK(block > 0, "FP4 block must be > 0, got ", block);
  Fp4Matrix q;
  q.rows = rows;
  q.cols = cols;
  q.block = block;
  q.codes.resize(x.size());
  q.scale_exp.resize(size_t(rows * q.blocks_per_row()));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < q.blocks_per_row(); ++j) {
      const int64_t c0 = j * block, c1 = std::min(cols, c0 + block);
      double amax = 0;
      for (int64_t c = c0; c < c1; ++c) {
        TS_CHECK(std::isfinite(x[size_t(r * cols + c)]), "quantize_fp4: value at (", r, ", ", c,
                 ") is not finite");
        amax = std::max(amax, std::abs(x[size_t(r * cols + c)]));
      }
      const int32_t k = pow2_scale_exponent(amax, 6.0);
      q.scale_exp[size_t(r * q.blocks_per_row() + j)] = k;
      for (int64_t c = c0; c < c1; ++c)
        q.codes[size_t(r * cols + c)] = e2m1_encode(scaled(x[size_t(r * cols + c)], -k));
    }
  return q;
}

std::vector<double> dequantize(const Fp4Matrix& q) {
  std::vector<double> out(size_t(q.rows * q.cols));
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) out[size_t(r * q.cols + c)] = q.value(r, c);
  return out;
}

// ------------------------------------------------------------------------------------------- FP8

double Fp8Matrix::value(int64_t r, int64_t c) const {
  return scaled(e4m3_decode(codes[size_t(r * cols + c)]), tile_exp(r, c));
}

Fp8Matrix quantize_fp8(const std::vector<double>& x, int64_t rows, int64_t cols, int64_t block_rows,
                       int64_t block_cols) {
  check_matrix(x, rows, cols);
  TS_CHECK(block_rows > 0 && block_cols > 0, "FP8 blocks must be > 0, got ", block_rows, " x ", block_cols);
  Fp8Matrix q;
  q.rows = rows;
  q.cols = cols;
  q.block_rows = block_rows;
  q.block_cols = block_cols;
  q.codes.resize(x.size());
  const int64_t tr = (rows + block_rows - 1) / block_rows, tc = q.tile_cols();
  q.scale_exp.resize(size_t(tr * tc));
  for (int64_t bi = 0; bi < tr; ++bi)
    for (int64_t bj = 0; bj < tc; ++bj) {
      const int64_t r0 = bi * block_rows, r1 = std::min(rows, r0 + block_rows);
      const int64_t c0 = bj * block_cols, c1 = std::min(cols, c0 + block_cols);
      double amax = 0;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          TS_CHECK(std::isfinite(x[size_t(r * cols + c)]), "quantize_fp8: value at (", r, ", ", c,
                   ") is not finite");
          amax = std::max(amax, std::abs(x[size_t(r * cols + c)]));
        }
      const int32_t k = pow2_scale_exponent(amax, 448.0);
      q.scale_exp[size_t(bi * tc + bj)] = k;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c)
          q.codes[size_t(r * cols + c)] = e4m3_encode(scaled(x[size_t(r * cols + c)], -k));
    }
  return q;
}

std::vector<double> dequantize(const Fp8Matrix& q) {
  std::vector<double> out(size_t(q.rows * q.cols));
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) out[size_t(r * q.cols + c)] = q.value(r, c);
  return out;
}

// ------------------------------------------------------------------------------------------- FP4 -> FP8

Fp8Matrix fp4_to_fp8(const Fp4Matrix& q, int64_t block_rows, int64_t block_cols) {
  TS_CHECK(block_cols > 0 && block_cols % q.block == 0, "FP8 block_cols ", block_cols,
           " must be a multiple of the FP4 block ", q.block);
  // The FP4 values are exact in f64, so quantising them is the requantisation.
  return quantize_fp8(dequantize(q), q.rows, q.cols, block_rows, block_cols);
}

int32_t fp4_scale_spread(const Fp4Matrix& q, int64_t block_rows, int64_t block_cols) {
  TS_CHECK(block_rows > 0 && block_cols > 0 && block_cols % q.block == 0, "FP8 tile ", block_rows, " x ",
           block_cols, " must have block_cols a multiple of the FP4 block ", q.block);
  const int64_t tr = (q.rows + block_rows - 1) / block_rows, tc = (q.cols + block_cols - 1) / block_cols;
  std::vector<int32_t> lo(size_t(tr * tc), std::numeric_limits<int32_t>::max());
  std::vector<int32_t> hi(size_t(tr * tc), std::numeric_limits<int32_t>::min());
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t j = 0; j < q.blocks_per_row(); ++j) {
      const int64_t c0 = j * q.block, c1 = std::min(q.cols, c0 + q.block);
      bool nonzero = false;
      for (int64_t c = c0; c < c1; ++c) nonzero = nonzero || (q.codes[size_t(r * q.cols + c)] & 7u) != 0;
      if (!nonzero) continue;
      const size_t t = size_t((r / block_rows) * tc + c0 / block_cols);
      const int32_t k = q.scale_exp[size_t(r * q.blocks_per_row() + j)];
      lo[t] = std::min(lo[t], k);
      hi[t] = std::max(hi[t], k);
    }
  int32_t spread = 0;
  for (size_t t = 0; t < lo.size(); ++t)
    if (hi[t] >= lo[t]) spread = std::max(spread, hi[t] - lo[t]);
  return spread;
}

}  // namespace tessera::quant
