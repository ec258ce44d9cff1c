#include "model/qat.h"

#include <algorithm>

#include "core/error.h"
#include "ops/quant.h"

namespace tessera::qat {

Mode parse_mode(const std::string& s) {
  if (s == "off") return Mode::off;
  if (s == "fp8") return Mode::fp8;
  if (s == "fp4_fp8") return Mode::fp4_fp8;
  TS_FAIL("quantisation mode '", s, "': expected \"off\", \"fp8\" or \"fp4_fp8\"");
}

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::off: return "off";
    case Mode::fp8: return "fp8";
    case Mode::fp4_fp8: return "fp4_fp8";
  }
  return "?";
}

const char* format_name(Format f) {
  switch (f) {
    case Format::none: return "none";
    case Format::fp8: return "fp8";
    case Format::fp4: return "fp4";
  }
  return "?";
}

namespace {

// A dot-separated segment of the name starts with `prefix`.
bool has_segment_prefix(const std::string& name, const std::string& prefix) {
  size_t start = 0;
  while (start <= name.size()) {
    if (name.compare(start, prefix.size(), prefix) == 0) return true;
    const size_t dot = name.find('.', start);
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return false;
}

}  // namespace

Format weight_format(const Param& p, Mode mode) {
  if (mode == Mode::off || p.kind != ParamKind::matrix) return Format::none;
  const int nd = p.value.ndim();
  if (nd != 2 && nd != 3) return Format::none;
  if (has_segment_prefix(p.name, "hc_")) return Format::none;    // mHC mixing matrices
  if (p.name.ends_with("gate.weight")) return Format::none;       // the MoE router
  const bool routed_expert = p.name.find(".experts.") != std::string::npos || p.name.starts_with("experts.");
  if (routed_expert && mode == Mode::fp4_fp8) return Format::fp4;
  return Format::fp8;
}

std::vector<double> quantize_dequantize(const std::vector<double>& x, int64_t rows, int64_t cols, Format f,
                                        int64_t* lossy_matrices) {
  switch (f) {
    case Format::none: return x;
    case Format::fp8: return quant::dequantize(quant::quantize_fp8(x, rows, cols, 128, 128));
    case Format::fp4: {
      const quant::Fp4Matrix q4 = quant::quantize_fp4(x, rows, cols, 32);
      std::vector<double> v4 = quant::dequantize(q4);
      std::vector<double> v8 = quant::dequantize(quant::fp4_to_fp8(q4, 128, 128));
      if (lossy_matrices && v4 != v8) ++*lossy_matrices;
      return v8;
    }
  }
  return x;
}

namespace {

// The quantised values of one parameter, as a host tensor of its dtype and shape.
Tensor quantized_value(const Param& p, Format f, Stats& st) {
  const Tensor& v = p.value;
  TS_CHECK(v.is_contiguous(), "quantisation of '", p.name, "': the tensor is not contiguous");
  const Tensor host64 = (v.device() == Device::cpu ? v : v.to_device(Device::cpu)).to(DType::f64);
  const int64_t G = v.ndim() == 3 ? v.size(0) : 1, rows = v.size(-2), cols = v.size(-1);
  Tensor out64 = Tensor::empty(v.shape(), DType::f64, Device::cpu);
  const double* src = host64.data<double>();
  double* dst = out64.data<double>();
  for (int64_t g = 0; g < G; ++g) {
    const std::vector<double> x(src + g * rows * cols, src + (g + 1) * rows * cols);
    const std::vector<double> y = quantize_dequantize(x, rows, cols, f, &st.lossy_fp4_matrices);
    std::copy(y.begin(), y.end(), dst + g * rows * cols);
  }
  if (f == Format::fp4) ++st.fp4_tensors, st.fp4_elements += v.numel();
  else ++st.fp8_tensors, st.fp8_elements += v.numel();
  return out64.to(v.dtype());
}

}  // namespace

Stats quantize_in_place(const ParamList& params, Mode mode) {
  Stats st;
  for (Param* p : params) {
    const Format f = weight_format(*p, mode);
    if (f != Format::none) p->value.copy_from(quantized_value(*p, f, st));
  }
  return st;
}

FakeQuantWeights::FakeQuantWeights(const ParamList& params, Mode mode) {
  if (mode == Mode::off) return;
  try {
    for (Param* p : params) {
      const Format f = weight_format(*p, mode);
      if (f == Format::none) continue;
      Tensor q = quantized_value(*p, f, stats_);
      saved_.emplace_back(p, p->value.clone());
      p->value.copy_from(q);
    }
  } catch (...) {
    restore();  // no half-quantised model is left behind (a non-finite weight, say)
    throw;
  }
}

FakeQuantWeights::~FakeQuantWeights() {
  restore();
}

void FakeQuantWeights::restore() {
  for (auto& [p, master] : saved_) p->value.copy_from(master);
  saved_.clear();
}

}  // namespace tessera::qat
