// Real FP4 (e2m1) and FP8 (e4m3fn) encodings with power-of-two block scales, and the FP4 -> FP8
// requantisation of V4's quantisation-aware post-training (spec/deepseek-v4.md §9: "FP32 master -> FP4 ->
// dequantised to FP8, which is lossless when FP4 sub-block scale ratios fit -> FP8 GEMM"). Pure host
// functions on codes and scale exponents, computed in f64 (every value here is exact in f64). The simulated
// ops ops::fake_quant_fp4 / fake_quant_fp8 (v4_ops.h) round the same way; these add the codes themselves, 2-D
// (128 x 128) FP8 blocks and the requantisation, and do not change those ops.
//
// Formats (OCP MX / FP8 conventions):
//   e2m1  4 bits: sign (bit 3), 2 exponent bits (bias 1), 1 mantissa bit; no inf/NaN. Magnitudes of codes
//   0..7:
//         0, 0.5, 1, 1.5, 2, 3, 4, 6.
//   e4m3fn 8 bits: sign (bit 7), 4 exponent bits (bias 7), 3 mantissa bits; no inf; 0x7f / 0xff are NaN.
//         Normals (1 + m/8) 2^(e-7) up to 448 (0x7e); subnormals m 2^-9 (smallest 2^-9).
// Rounding: to nearest, ties to the even code; magnitudes beyond the largest value saturate to it (+-6,
// +-448). Block scales are powers of two 2^k (e8m0 / ue8m0: only the exponent k is stored), chosen from the
// block's amax as the smallest 2^k with qmax 2^k >= amax (k = 0 for an all-zero block), as the simulated ops
// do.
//
// When is FP4 -> FP8 lossless? An FP4 element is c 2^(k_b) (c an e2m1 value, k_b its 1x32 sub-block's scale).
// In an FP8 block with scale 2^K it is stored as c 2^(k_b - K), exact iff that is an e4m3 value. e2m1 values
// have at most 2 significant bits, so only the exponent range matters: c 2^d is exact for EVERY c iff d in
// [-8, 6] (6 2^6 = 384 <= 448 < 768 = 6 2^7; 0.5 2^-8 = 2^-9 is the smallest subnormal, and 1.5 2^-8 = 3 2^-9
// still fits, while 0.5 2^-9 and 1.5 2^-9 do not). With the amax scale, K = k_max - 6 whenever the
// largest-scale sub-block holds a 4 or a 6 (and is smaller otherwise, never overflowing), so the guarantee
// is:
//   within every FP8 block, k_max - k_min <= 14 over its non-zero FP4 sub-blocks (scale ratio <= 2^14)
//   => the requantisation is exact. Beyond it the smallest codes of the smallest sub-blocks round (to 0
//   first).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace tessera::quant {

// ------------------------------------------------------------------------------------------- element codes
double e2m1_decode(uint8_t code);  // code in [0, 16)
uint8_t e2m1_encode(double v);     // finite v; round to nearest even code, saturate at +-6; -0.0 -> 8
double e4m3_decode(uint8_t code);  // NaN for 0x7f / 0xff
uint8_t e4m3_encode(double v);     // finite v; round to nearest even code, saturate at +-448; -0.0 -> 0x80

// The exponent k of the power-of-two scale 2^k for a block with max magnitude amax and largest code value
// qmax (6 for e2m1, 448 for e4m3): the smallest k with qmax 2^k >= amax; 0 when amax == 0. amax finite, >= 0.
int32_t pow2_scale_exponent(double amax, double qmax);

// ------------------------------------------------------------------------------------------- FP4, 1 x block
// A (rows, cols) matrix in e2m1 with one power-of-two scale per `block` consecutive elements of a row
// (MXFP4: block 32, the routed experts' weights along the input dimension).
struct Fp4Matrix {
  int64_t rows = 0, cols = 0, block = 32;
  std::vector<uint8_t> codes;      // rows * cols, one code per byte (unpacked)
  std::vector<int32_t> scale_exp;  // rows * ceil(cols / block): sub-block (r, j) covers cols [j block, ...)
  int64_t blocks_per_row() const { return (cols + block - 1) / block; }
  double value(int64_t r, int64_t c) const;  // e2m1_decode(code) * 2^scale_exp
};
// x: rows * cols finite values, row-major.
Fp4Matrix quantize_fp4(const std::vector<double>& x, int64_t rows, int64_t cols, int64_t block = 32);
std::vector<double> dequantize(const Fp4Matrix& q);

// ------------------------------------------------------------------------------------------- FP8, 2-D blocks
// A (rows, cols) matrix in e4m3fn with one power-of-two scale per block_rows x block_cols tile (the linears'
// 128 x 128 weight blocks; block_rows = 1 gives the 1 x block activation / KV layout of fake_quant_fp8).
struct Fp8Matrix {
  int64_t rows = 0, cols = 0, block_rows = 128, block_cols = 128;
  std::vector<uint8_t> codes;      // rows * cols
  std::vector<int32_t> scale_exp;  // ceil(rows / block_rows) * ceil(cols / block_cols), row-major over tiles
  int64_t tile_cols() const { return (cols + block_cols - 1) / block_cols; }
  int32_t tile_exp(int64_t r, int64_t c) const {
    return scale_exp[size_t((r / block_rows) * tile_cols() + c / block_cols)];
  }
  double value(int64_t r, int64_t c) const;
};
Fp8Matrix quantize_fp8(const std::vector<double>& x, int64_t rows, int64_t cols, int64_t block_rows = 128,
                       int64_t block_cols = 128);
std::vector<double> dequantize(const Fp8Matrix& q);

// ------------------------------------------------------------------------------------------- FP4 -> FP8
// Requantises FP4 weights to FP8 tiles: each tile's scale from the amax of its dequantised FP4 values, then
// every value encoded in e4m3. block_cols must be a multiple of the FP4 block (sub-blocks never straddle
// tiles).
Fp8Matrix fp4_to_fp8(const Fp4Matrix& q, int64_t block_rows = 128, int64_t block_cols = 128);

// The largest k_max - k_min over the FP8 tiles, taken over each tile's FP4 sub-blocks that hold a non-zero
// code (an all-zero sub-block's scale is arbitrary and stores nothing); 0 for a matrix of zeros.
int32_t fp4_scale_spread(const Fp4Matrix& q, int64_t block_rows = 128, int64_t block_cols = 128);
// The spread up to which fp4_to_fp8 is guaranteed exact (see the header comment): 14, i.e. a ratio of 2^14.
constexpr int32_t kFp4ToFp8LosslessSpread = 14;
// The range of d = k_b - K for which c 2^d is an e4m3 value for every e2m1 value c.
constexpr int32_t kFp4InFp8MinShift = -8, kFp4InFp8MaxShift = 6;

}  // namespace tessera::quant
