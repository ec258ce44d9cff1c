// FP4 (e2m1) / FP8 (e4m3fn) codes and block scales (ops/quant.h) against hand-enumerated tables, agreement
// with the simulated ops (ops::fake_quant_fp4 / fake_quant_fp8), and the property the spec states for V4's
// QAT (deepseek-v4.md §9): FP4 -> FP8 requantisation is lossless when the FP4 sub-block scale ratios within
// an FP8 128 x 128 tile fit -- exhaustively for every e2m1 value and every ratio in range, and where it
// stops.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <random>

#include "core/error.h"
#include "ops/quant.h"
#include "ops/v4_ops.h"
#include "test_util.h"

using namespace tessera;
using namespace tessera::quant;
using tessera::testing::error_of;

namespace {

// The 16 e2m1 codes, by hand: sign bit 3, then magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
const double kE2m1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};

bool has(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

TEST(Quant, E2m1Table) {
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(e2m1_decode(uint8_t(c)), kE2m1[c]) << c;
    EXPECT_EQ(std::signbit(e2m1_decode(uint8_t(c))), c >= 8) << c;
    EXPECT_EQ(e2m1_encode(kE2m1[c]), c) << c;
  }
  // Rounding, to nearest with ties to the even code (codes 0, 2, 4, 6 = 0, 1, 2, 4 win ties):
  //   0.25 (0 | 0.5) -> 0; 0.75 (0.5 | 1) -> 1; 1.25 (1 | 1.5) -> 1; 1.75 (1.5 | 2) -> 2; 2.5 (2 | 3) -> 2;
  //   3.5 (3 | 4) -> 4; 5 (4 | 6) -> 4; beyond 6 saturates.
  const double in[] = {0.25, 0.3, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 7.0, 1e30, -2.5, -0.1};
  const double out[] = {0, 0.5, 1, 1, 1.5, 2, 2, 3, 4, 4, 6, 6, 6, -2, -0.0};
  for (size_t i = 0; i < std::size(in); ++i) EXPECT_EQ(e2m1_decode(e2m1_encode(in[i])), out[i]) << in[i];
  EXPECT_TRUE(has(error_of([] { e2m1_encode(std::nan("")); }), "not finite"));
}

TEST(Quant, E4m3Table) {
  // Hand-decoded codes (sign | 4 exponent bits, bias 7 | 3 mantissa bits):
  //   0x00 0;  0x01 = 1 * 2^-9 (smallest subnormal);  0x07 = 7 * 2^-9;  0x08 = 2^-6 (smallest normal);
  //   0x09 = 1.125 * 2^-6;  0x38 = 2^0 = 1;  0x39 = 1.125;  0x3f = 1.875;  0x40 = 2;  0x77 = 1.875 * 2^7 =
  //   240; 0x78 = 256;  0x7e = 1.75 * 2^8 = 448 (max);  0x7f NaN;  0x80 -0;  0xb8 -1;  0xfe -448;  0xff NaN.
  const struct {
    uint8_t code;
    double value;
  } table[] = {{0x00, 0.0},   {0x01, 0.001953125}, {0x07, 0.013671875}, {0x08, 0.015625}, {0x09, 0.017578125},
               {0x38, 1.0},   {0x39, 1.125},       {0x3f, 1.875},       {0x40, 2.0},      {0x77, 240.0},
               {0x78, 256.0}, {0x7e, 448.0},       {0x80, -0.0},        {0xb8, -1.0},     {0xfe, -448.0}};
  for (const auto& t : table) {
    EXPECT_EQ(e4m3_decode(t.code), t.value) << int(t.code);
    EXPECT_EQ(std::signbit(e4m3_decode(t.code)), (t.code & 0x80) != 0);
    EXPECT_EQ(e4m3_encode(t.value), t.code) << t.value;
  }
  EXPECT_TRUE(std::isnan(e4m3_decode(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_decode(0xff)));
  // Every non-NaN code round-trips, and the positive codes increase with the value (127 of them: 0 .. 448).
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    EXPECT_EQ(e4m3_encode(e4m3_decode(uint8_t(c))), c) << c;
    if (c >= 1 && c <= 0x7e) {
      EXPECT_LT(e4m3_decode(uint8_t(c - 1)), e4m3_decode(uint8_t(c)));
    }
  }
  // Rounding: 1.0625 (1 | 1.125) -> 1 (even mantissa); 1.1875 (1.125 | 1.25) -> 1.25; 2^-10 (0 | 2^-9) -> 0;
  // 3 * 2^-10 (2^-9 | 2^-8) -> 2^-8; 464 (448 | 480, which would be the NaN code) -> 448; 1000 saturates.
  const double in[] = {1.0625, 1.1875, std::ldexp(1.0, -10), 3 * std::ldexp(1.0, -10), 449.0, 464.0,
                       1000.0, -1e9};
  const double out[] = {1.0, 1.25, 0.0, std::ldexp(1.0, -8), 448.0, 448.0, 448.0, -448.0};
  for (size_t i = 0; i < std::size(in); ++i) EXPECT_EQ(e4m3_decode(e4m3_encode(in[i])), out[i]) << in[i];
}

TEST(Quant, PowerOfTwoScaleExponent) {
  // The smallest k with qmax 2^k >= amax.
  EXPECT_EQ(pow2_scale_exponent(6.0, 6.0), 0);
  EXPECT_EQ(pow2_scale_exponent(6.0001, 6.0), 1);
  EXPECT_EQ(pow2_scale_exponent(12.0, 6.0), 1);
  EXPECT_EQ(pow2_scale_exponent(3.0, 6.0), -1);
  EXPECT_EQ(pow2_scale_exponent(2.9, 6.0), -1);
  EXPECT_EQ(pow2_scale_exponent(0.0, 6.0), 0);
  EXPECT_EQ(pow2_scale_exponent(448.0, 448.0), 0);
  EXPECT_EQ(pow2_scale_exponent(1000.0, 448.0), 2);  // 448 * 2 = 896 < 1000 <= 1792
  EXPECT_EQ(pow2_scale_exponent(6.0, 448.0), -6);    // 448 / 128 = 3.5 < 6 <= 7 = 448 / 64
  EXPECT_EQ(pow2_scale_exponent(3.0, 448.0), -7);    // 448 / 256 = 1.75 < 3 <= 3.5
}

TEST(Quant, QuantizeHandWorked) {
  // FP4, one row of 32 then a second block of 3: block 0 amax 12 -> k = 1 (6 * 2 = 12): 12 / 2 = 6 -> 12;
  // 5 / 2 = 2.5 -> 2 (tie, even) -> 4; -0.7 / 2 = -0.35 -> -0.5 -> -1; 0.2 / 2 = 0.1 -> 0.
  // Block 1 amax 0.3 -> k = -4 (6 / 16 = 0.375 >= 0.3 > 0.1875): 0.3 * 16 = 4.8 -> 4 -> 0.25; 0.1 * 16 = 1.6
  // -> 1.5
  // -> 0.09375; 0 -> 0.
  std::vector<double> x(35, 0.0);
  x[0] = 12;
  x[1] = 5;
  x[2] = -0.7;
  x[3] = 0.2;
  x[32] = 0.3;
  x[33] = 0.1;
  Fp4Matrix q = quantize_fp4(x, 1, 35);
  ASSERT_EQ(q.scale_exp.size(), 2u);
  EXPECT_EQ(q.scale_exp[0], 1);
  EXPECT_EQ(q.scale_exp[1], -4);
  auto d = dequantize(q);
  const double expect[] = {12, 4, -1, 0};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(d[size_t(i)], expect[i]) << i;
  EXPECT_EQ(d[32], 0.25);
  EXPECT_EQ(d[33], 0.09375);
  EXPECT_EQ(d[34], 0.0);
  EXPECT_EQ(q.codes[0], 7);
  EXPECT_EQ(q.codes[2], 9);  // -0.5 (sign 8 | code 1), times the scale 2
  // FP8, 130 x 130 with 128 x 128 tiles: tile (0, 0) amax 1000 -> K = 2: 1000 / 4 = 250 -> 256 (step 16 in
  // [128, 256): 15.625 steps -> 16) -> 1024; 3 / 4 = 0.75 exact -> 3; 0.001 / 4 = 0.00025 = 0.128 * 2^-9 ->
  // 0. Tile (0, 1) (cols 128, 129) holds 0.5 -> K = -9 (448 / 1024 = 0.4375 < 0.5 <= 0.875): exact. Tile (1,
  // 0) (rows 128, 129) is all zero -> K = 0.
  std::vector<double> y(130 * 130, 0.0);
  y[0] = 1000;
  y[1] = 3;
  y[2] = 0.001;
  y[129] = 0.5;
  Fp8Matrix f = quantize_fp8(y, 130, 130);
  ASSERT_EQ(f.scale_exp.size(), 4u);
  EXPECT_EQ(f.scale_exp[0], 2);
  EXPECT_EQ(f.scale_exp[1], -9);
  EXPECT_EQ(f.scale_exp[2], 0);
  auto fd = dequantize(f);
  EXPECT_EQ(fd[0], 1024.0);
  EXPECT_EQ(fd[1], 3.0);
  EXPECT_EQ(fd[2], 0.0);
  EXPECT_EQ(fd[129], 0.5);
  EXPECT_EQ(f.tile_exp(129, 0), 0);
}

TEST(Quant, AgreesWithTheSimulatedOps) {
  // quantize -> dequantize is what the model's fake_quant_fp4 (1 x 32) and fake_quant_fp8 (1 x block)
  // compute.
  std::mt19937_64 rng(17);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int64_t R = 6, D = 256;
  std::vector<double> x(size_t(R * D));
  for (size_t i = 0; i < x.size(); ++i) x[i] = nd(rng) * std::ldexp(1.0, int(i / 32) % 9 - 4);
  x[5] = 0;
  for (int i = 64; i < 96; ++i) x[size_t(i)] = 0;  // an all-zero block
  Tensor t = Tensor::empty({R, D}, DType::f64, Device::cpu),
         o4 = Tensor::empty({R, D}, DType::f64, Device::cpu);
  Tensor o8 = Tensor::empty({R, D}, DType::f64, Device::cpu);
  std::copy(x.begin(), x.end(), t.data<double>());
  ops::fake_quant_fp4(t, 32, o4);
  ops::fake_quant_fp8(t, 64, D, o8);
  auto d4 = dequantize(quantize_fp4(x, R, D, 32));
  auto d8 = dequantize(quantize_fp8(x, R, D, 1, 64));
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(d4[i], o4.data<double>()[i]) << i;
    EXPECT_EQ(d8[i], o8.data<double>()[i]) << i;
  }
}

// ------------------------------------------------------------------------------------------- e2m1 inside
// e4m3

TEST(Quant, EveryE2m1ValueFitsE4m3AtShiftsMinus8To6) {
  // c 2^d is an e4m3 value for every e2m1 value c exactly when d in [-8, 6]: e2m1 values have at most two
  // significant bits (1.5 = 1.1b), e4m3 has four (1 + 3 mantissa bits), so only the exponent range can fail.
  for (int d = kFp4InFp8MinShift; d <= kFp4InFp8MaxShift; ++d)
    for (double c : kE2m1) {
      const double v = std::ldexp(c, d);
      EXPECT_EQ(e4m3_decode(e4m3_encode(v)), v) << c << " * 2^" << d;
    }
  EXPECT_EQ(kFp4InFp8MinShift, -8);
  EXPECT_EQ(kFp4InFp8MaxShift, 6);
  // Just outside, by hand, the magnitudes 0.5, 1, 1.5, 2, 3, 4, 6 become:
  //   d = 7:   64, 128, 192, 256, 384, 448 (512 saturates), 448 (768 saturates)
  //   d = -9:  in units of 2^-9 (the smallest subnormal): 0.5 -> 0 (tie, even), 1, 1.5 -> 2 (tie, even), 2,
  //   3, 4, 6 d = -10: in units of 2^-10: 0.5 -> 0, 1 -> 0 (tie), 1.5 -> 2, 2, 3 -> 4 (tie), 4, 6
  const double mags[] = {0.5, 1, 1.5, 2, 3, 4, 6};
  const double up7[] = {64, 128, 192, 256, 384, 448, 448};
  const double dn9[] = {0, 1, 2, 2, 3, 4, 6};
  const double dn10[] = {0, 0, 2, 2, 4, 4, 6};
  for (int i = 0; i < 7; ++i) {
    for (double s : {1.0, -1.0}) {
      EXPECT_EQ(e4m3_decode(e4m3_encode(s * std::ldexp(mags[i], 7))), s * up7[i]) << mags[i];
      EXPECT_EQ(e4m3_decode(e4m3_encode(s * std::ldexp(mags[i], -9))), s * std::ldexp(dn9[i], -9)) << mags[i];
      EXPECT_EQ(e4m3_decode(e4m3_encode(s * std::ldexp(mags[i], -10))), s * std::ldexp(dn10[i], -10))
          << mags[i];
    }
  }
}

// ------------------------------------------------------------------------------------------- FP4 -> FP8
// tiles

// A rows x cols FP4 matrix (block 32) built from codes and scales directly: sub-block (r, j) has scale
// top[tile] - offset(r, j), and its 32 codes run through all 16 codes twice (rotated by r + j, so every code
// appears at many positions). Sub-block (tile's first row, first block) keeps offset 0 and includes the code
// 6, so the tile's FP8 scale is top - 6.
Fp4Matrix build(int64_t rows, int64_t cols, const std::vector<int32_t>& top,
                const std::function<int32_t(int64_t r, int64_t j)>& offset, int max_mag_code = 7) {
  Fp4Matrix q;
  q.rows = rows;
  q.cols = cols;
  q.block = 32;
  q.codes.resize(size_t(rows * cols));
  q.scale_exp.resize(size_t(rows * q.blocks_per_row()));
  const int64_t tc = (cols + 127) / 128;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < q.blocks_per_row(); ++j) {
      const int32_t t = top[size_t((r / 128) * tc + (j * 32) / 128)];
      q.scale_exp[size_t(r * q.blocks_per_row() + j)] = t - offset(r, j);
      for (int64_t c = j * 32; c < std::min(cols, j * 32 + 32); ++c) {
        int code = int((c + r + j) % 16);
        if ((code & 7) > max_mag_code) code = (code & 8) | max_mag_code;
        q.codes[size_t(r * cols + c)] = uint8_t(code);
      }
    }
  return q;
}

TEST(Quant, Fp4ToFp8IsLosslessForEveryScaleRatioUpTo2Pow14) {
  // 256 x 256: four 128 x 128 tiles with different top scales (including very small and very large ones). In
  // each tile the 512 FP4 sub-blocks take every offset 0..14 below the top (ratio 1 .. 2^14), and every e2m1
  // code appears at every offset: the FP8 copy must reproduce every value bit for bit.
  const std::vector<int32_t> top = {0, -30, 7, 60};
  Fp4Matrix q = build(256, 256, top, [](int64_t r, int64_t j) { return int32_t((r * 8 + j) % 15); });
  EXPECT_EQ(fp4_scale_spread(q), kFp4ToFp8LosslessSpread);
  Fp8Matrix f = fp4_to_fp8(q);
  for (size_t t = 0; t < top.size(); ++t) EXPECT_EQ(f.scale_exp[t], top[t] - 6) << t;
  const auto a = dequantize(q), b = dequantize(f);
  int64_t nonzero = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(b[i], a[i]) << "element " << i;
    EXPECT_EQ(std::signbit(b[i]), std::signbit(a[i]));
    nonzero += a[i] != 0;
  }
  EXPECT_EQ(nonzero, 256 * 256 * 14 / 16);
  // Every (code, offset) pair really occurs in tile 0.
  std::vector<int> seen(16 * 15, 0);
  for (int64_t r = 0; r < 128; ++r)
    for (int64_t c = 0; c < 128; ++c)
      seen[size_t(q.codes[size_t(r * 256 + c)] * 15 + (r * 8 + c / 32) % 15)] = 1;
  for (int s : seen) EXPECT_EQ(s, 1);
}

TEST(Quant, Fp4ToFp8LosesTheSmallestCodesBeyond2Pow14) {
  // The same construction with offsets 0..16: sub-blocks at offset 15 and 16 sit 2^-9 and 2^-10 below the FP8
  // tile's reach (d = k_b - K = -9, -10), and their small codes round as the hand table in
  // EveryE2m1ValueFitsE4m3AtShiftsMinus8To6 says; offsets up to 14 stay exact.
  const std::vector<int32_t> top = {3};
  auto offset = [](int64_t r, int64_t j) { return int32_t((r * 4 + j) % 17); };
  Fp4Matrix q = build(128, 128, top, offset);
  EXPECT_EQ(fp4_scale_spread(q), 16);
  Fp8Matrix f = fp4_to_fp8(q);
  EXPECT_EQ(f.scale_exp[0], 3 - 6);
  // By magnitude code 0..7 (0, 0.5, 1, 1.5, 2, 3, 4, 6), what the FP8 copy holds in units of the sub-block
  // scale:
  const double at15[8] = {0, 0, 1, 2, 2, 3, 4, 6};  // d = -9
  const double at16[8] = {0, 0, 0, 2, 2, 4, 4, 6};  // d = -10
  int64_t lost = 0;
  for (int64_t r = 0; r < 128; ++r)
    for (int64_t c = 0; c < 128; ++c) {
      const int32_t off = offset(r, c / 32);
      const uint8_t code = q.codes[size_t(r * 128 + c)];
      const double sign = (code & 8) ? -1.0 : 1.0, unit = std::ldexp(1.0, 3 - off);
      double want = q.value(r, c);
      if (off == 15) want = sign * at15[code & 7] * unit;
      if (off == 16) want = sign * at16[code & 7] * unit;
      ASSERT_EQ(f.value(r, c), want) << r << ", " << c << " offset " << off << " code " << int(code);
      lost += f.value(r, c) != q.value(r, c);
    }
  // Offset 15 loses the codes 0.5 and 1.5 (4 of its 16 codes with signs), offset 16 the codes 0.5, 1, 1.5, 3
  // (8 of 16); each offset covers 512 / 17 sub-blocks rounded: offsets 0..1 get 31, the rest 30 (512 = 17 *
  // 30 + 2).
  EXPECT_EQ(lost, 30 * 32 * 4 / 16 + 30 * 32 * 8 / 16);
}

TEST(Quant, TheSpreadBoundIsSufficientNotNecessary) {
  // If no code above 3 occurs, the tile's amax is 3 2^top and K = top - 7 (448 / 256 = 1.75 < 3 <= 3.5), one
  // lower: then offset 15 (d = -8) is still exact for every remaining code.
  Fp4Matrix q = build(
      128, 128, {0}, [](int64_t r, int64_t j) { return int32_t((r * 4 + j) % 16); }, 5);
  EXPECT_EQ(fp4_scale_spread(q), 15);
  Fp8Matrix f = fp4_to_fp8(q);
  EXPECT_EQ(f.scale_exp[0], -7);
  const auto a = dequantize(q), b = dequantize(f);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(b[i], a[i]) << i;
}

TEST(Quant, QuantizedWeightsRequantiseLosslesslyWhenInRange) {
  // End to end: real weights -> FP4 (1 x 32) -> FP8 (128 x 128). Rows whose magnitudes span less than 2^12
  // keep the sub-block spread within 14 and the requantisation exact; a tile mixing 1e-6 and 1 does not.
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> w(128 * 256);
  for (size_t i = 0; i < w.size(); ++i) w[i] = nd(rng) * std::ldexp(1.0, int(i % 13) - 6);
  Fp4Matrix q = quantize_fp4(w, 128, 256);
  EXPECT_LE(fp4_scale_spread(q), kFp4ToFp8LosslessSpread);
  EXPECT_EQ(dequantize(fp4_to_fp8(q)), dequantize(q));
  for (size_t i = 0; i < 32; ++i) w[i] = 1e-6 * nd(rng);  // one tiny sub-block in tile 0
  Fp4Matrix q2 = quantize_fp4(w, 128, 256);
  EXPECT_GT(fp4_scale_spread(q2), kFp4ToFp8LosslessSpread);
  EXPECT_NE(dequantize(fp4_to_fp8(q2)), dequantize(q2));
}

TEST(Quant, Errors) {
  EXPECT_TRUE(has(error_of([] { quantize_fp4({1.0, std::nan("")}, 1, 2); }), "not finite"));
  EXPECT_TRUE(has(error_of([] { quantize_fp8({1.0, 2.0}, 1, 3); }), "2 values for (1, 3)"));
  Fp4Matrix q = quantize_fp4(std::vector<double>(64, 1.0), 1, 64);
  EXPECT_TRUE(has(error_of([&] { fp4_to_fp8(q, 128, 48); }), "multiple of the FP4 block 32"));
  EXPECT_TRUE(has(error_of([] { e2m1_decode(16); }), "not a 4-bit code"));
  EXPECT_TRUE(has(error_of([] { e4m3_encode(std::numeric_limits<double>::infinity()); }), "not finite"));
}

}  // namespace
