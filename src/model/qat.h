// Quantisation-aware training (QAT) with a straight-through estimator, and post-training quantisation of a
// checkpoint's weights (spec/deepseek-v4.md §9 "QAT, post-training only"; docs/post-training.md "Quantisation-aware
// training").
//
// Simulated quantisation of the weights: while a FakeQuantWeights scope is alive, every eligible weight holds its
// quantised-then-dequantised value (fp32); the fp32 master values are saved by the scope and written back, bitwise,
// when it ends. A forward/backward run inside the scope therefore computes the gradient AT the quantised weights;
// the optimizer (run after the scope ends) applies it to the master weights: the straight-through estimator
// (d W_q / d W taken as the identity).
//
// Which weights, and how (by parameter kind and name; model/param.h, model/v4.cpp, model/dense.cpp):
//   - ParamKind::embedding, ParamKind::head and ParamKind::vector (norm weights, biases, sinks, APE, mHC base and
//     scale, the hash table) are never quantised;
//   - mHC mixing matrices (a name segment starting with "hc_": layers.N.hc_attn.fn, hc_ffn.fn, hc_head.fn,
//     mtp.hc_head.fn) stay fp32, as V4 computes mHC in fp32;
//   - the MoE router (names ending "ffn.gate.weight") stays fp32, as the gate of the DeepSeek-V3/V4 inference code
//     is a plain parameter, not an FP8 linear;
//   - routed experts (names containing ".experts.": layers.N.ffn.experts.w1/w2/w3, [E, out, in]) under "fp4_fp8":
//     FP4 e2m1 with a power-of-two scale per 1 x 32 block along the input (last) dimension, then requantised to
//     FP8 128 x 128 tiles (V4's FP4 -> FP8 path; exact unless an FP8 tile's FP4 scale spread exceeds 2^14, see
//     ops/quant.h; the rare rounding is kept, as V4's FP8 GEMM sees it) - each expert its own matrix;
//   - every other ParamKind::matrix (attention projections, shared experts, compressor and indexer projections,
//     MTP projections; all hidden matrices of the dense model; the routed experts under "fp8"): FP8 e4m3 with a
//     power-of-two scale per 128 x 128 tile. A 3-D weight ([G, out, in]: wo_a's groups, experts) is G matrices.
// Values are quantised on the host (ops/quant.h, in f64, exact); tensors on an accelerator are copied there and
// back.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/param.h"

namespace tessera::qat {

// training.qat / ckpt quantize --mode: "off", "fp8" (every eligible matrix FP8) or "fp4_fp8" (routed experts FP4,
// the other eligible matrices FP8).
enum class Mode { off, fp8, fp4_fp8 };
Mode parse_mode(const std::string& s);  // fails naming the accepted values
const char* mode_name(Mode m);

// How one parameter is quantised under a mode (the rule above).
enum class Format { none, fp8, fp4 };
Format weight_format(const Param& p, Mode mode);
const char* format_name(Format f);

// Quantise-dequantise `x` (rows x cols, row-major) in the given format: FP8 128 x 128 tiles, or FP4 1 x 32 blocks
// requantised to FP8 128 x 128 tiles (Format::none returns x). For fp4, *lossy_matrices (if given) is incremented
// when the FP4 -> FP8 requantisation of this matrix was not exact.
std::vector<double> quantize_dequantize(const std::vector<double>& x, int64_t rows, int64_t cols, Format f,
                                        int64_t* lossy_matrices = nullptr);

struct Stats {
  int64_t fp8_tensors = 0, fp4_tensors = 0;    // parameters quantised
  int64_t fp8_elements = 0, fp4_elements = 0;
  int64_t lossy_fp4_matrices = 0;  // expert matrices whose FP4 -> FP8 requantisation rounded some value
};

// Replaces every eligible parameter's value by its quantised value, for good (ckpt quantize).
Stats quantize_in_place(const ParamList& params, Mode mode);

// The QAT scope: quantised values from construction to restore() / destruction, master values after. Gradients
// are not touched. With Mode::off it does nothing.
class FakeQuantWeights {
 public:
  FakeQuantWeights(const ParamList& params, Mode mode);
  ~FakeQuantWeights();
  FakeQuantWeights(const FakeQuantWeights&) = delete;
  FakeQuantWeights& operator=(const FakeQuantWeights&) = delete;
  // Writes the master values back (bitwise); idempotent.
  void restore();
  const Stats& stats() const { return stats_; }
  bool active() const { return !saved_.empty(); }

 private:
  std::vector<std::pair<Param*, Tensor>> saved_;
  Stats stats_;
};

}  // namespace tessera::qat
