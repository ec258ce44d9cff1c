#include "op_harness.h"

#include <cmath>
#include <cstdlib>

#include "backend/backend.h"

namespace tessera::testing {

Tensor random_tensor(const Shape& shape, uint64_t seed, double std, DType dtype) {
  Tensor t = Tensor::empty(shape, DType::f64);
  Rng rng{seed, stream_id("test")};
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = std * rng.normal(i);
  return dtype == DType::f64 ? t : t.to(dtype);
}

Tensor ids_tensor(const std::vector<int32_t>& values, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::i32);
  EXPECT_EQ(int64_t(values.size()), t.numel());
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

Tensor like_zeros(const Tensor& t) { return Tensor::zeros(t.shape(), t.dtype()); }

double value_at(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::f32: return t.data<float>()[i];
    case DType::f64: return t.data<double>()[i];
    case DType::bf16: return from_bf16(t.data<bf16>()[i]);
    case DType::i32: return t.data<int32_t>()[i];
    case DType::i64: return double(t.data<int64_t>()[i]);
  }
  return 0;
}

double max_rel_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double scale = 1e-30, diff = 0;
  for (int64_t i = 0; i < b.numel(); ++i) scale = std::max(scale, std::abs(value_at(b, i)));
  for (int64_t i = 0; i < a.numel(); ++i) diff = std::max(diff, std::abs(value_at(a, i) - value_at(b, i)));
  return diff / scale;
}

static Tensors to_device(const Tensors& in, Device device) {
  Tensors out;
  for (const Tensor& t : in) out.push_back(t.defined() ? t.to_device(device) : t);
  return out;
}

// Whether to compare against the CUDA backend: a GPU is present, or TESSERA_REQUIRE_CUDA=1 (gpu-check.sh) makes
// its absence an error rather than a silent CPU-only run.
static bool cuda_parity_enabled() {
  if (device_available(Device::cuda)) return true;
  const char* need = std::getenv("TESSERA_REQUIRE_CUDA");
  if (need && std::string(need) == "1") ADD_FAILURE() << "TESSERA_REQUIRE_CUDA=1 but no CUDA device is usable";
  return false;
}

static Tensors to_dtype(const Tensors& in, DType dtype) {
  Tensors out;
  for (const Tensor& t : in) out.push_back((t.defined() && (t.dtype() == DType::f64 || t.dtype() == DType::f32))
                                               ? t.to(dtype) : t);
  return out;
}

// Fixed random projections R_o, so the loss sum_o <out_o, R_o> exercises every output element.
static Tensors projections(const OpCase& c, const Tensors& out) {
  Tensors r;
  for (int o = 0; o < c.n_loss_outputs; ++o) r.push_back(random_tensor(out[o].shape(), 1000 + o));
  return r;
}

static double loss_of(const OpCase& c, const Tensors& in, const Tensors& r) {
  Tensors out = c.forward(in);
  double l = 0;
  for (int o = 0; o < c.n_loss_outputs; ++o)
    for (int64_t i = 0; i < out[o].numel(); ++i) l += value_at(out[o], i) * r[o].data<double>()[i];
  return l;
}

void check_op(const OpCase& c) {
  SCOPED_TRACE("op case: " + c.name);
  Tensors out64 = c.forward(c.inputs);
  Tensors r = projections(c, out64);
  Tensors grads64 = c.backward(c.inputs, out64, r);
  ASSERT_EQ(grads64.size(), c.inputs.size());

  // 1. Finite differences in fp64 (all elements of small inputs, a strided sample of large ones).
  const double eps = 1e-6;
  for (size_t k = 0; k < c.inputs.size(); ++k) {
    if (!c.differentiable[k]) continue;
    Tensor x = c.inputs[k];
    ASSERT_TRUE(grads64[k].defined()) << c.name << ": no gradient for input " << k;
    int64_t n = x.numel(), stride = std::max<int64_t>(1, n / 97);
    for (int64_t i = 0; i < n; i += stride) {
      Tensors in = c.inputs;
      in[k] = x.clone();
      double* p = in[k].data<double>();
      double x0 = p[i];
      p[i] = x0 + eps;
      double lp = loss_of(c, in, r);
      p[i] = x0 - eps;
      double lm = loss_of(c, in, r);
      double numeric = (lp - lm) / (2 * eps), analytic = grads64[k].data<double>()[i];
      double tol = c.grad_rtol * std::max({1.0, std::abs(numeric), std::abs(analytic)});
      EXPECT_NEAR(analytic, numeric, tol) << c.name << ": d loss / d input " << k << " " << x.str() << " element "
                                          << i << " (analytic vs central difference)";
    }
  }

  // 2. fp32 against fp64, forward and backward.
  Tensors in32 = to_dtype(c.inputs, DType::f32);
  Tensors out32 = c.forward(in32);
  for (size_t o = 0; o < out64.size(); ++o)
    EXPECT_LE(max_rel_diff(out32[o], out64[o]), c.f32_tol) << c.name << ": fp32 output " << o << " vs fp64";
  Tensors r32 = to_dtype(r, DType::f32);
  Tensors grads32 = c.backward(in32, out32, r32);
  for (size_t k = 0; k < c.inputs.size(); ++k) {
    if (c.differentiable[k]) {
      EXPECT_LE(max_rel_diff(grads32[k], grads64[k]), 10 * c.f32_tol)
          << c.name << ": fp32 gradient of input " << k << " vs fp64";
    }
  }

  // 3. The CUDA backend's fp32 forward and backward against the CPU's fp32 (same tolerances as step 2: the two
  // differ only in the order of fp32 sums). The case's functions allocate on the default device, which the
  // scope makes the GPU.
  if (!cuda_parity_enabled()) return;
  Tensors in_gpu = to_device(in32, Device::cuda), r_gpu = to_device(r32, Device::cuda);
  Tensors out_gpu, grads_gpu;
  {
    DeviceScope on_gpu(Device::cuda);
    Tensors out_dev = c.forward(in_gpu);
    grads_gpu = to_device(c.backward(in_gpu, out_dev, r_gpu), Device::cpu);
    out_gpu = to_device(out_dev, Device::cpu);
  }
  for (size_t o = 0; o < out32.size(); ++o)
    EXPECT_LE(max_rel_diff(out_gpu[o], out32[o]), c.f32_tol) << c.name << ": CUDA output " << o << " vs CPU (fp32)";
  for (size_t k = 0; k < c.inputs.size(); ++k) {
    if (c.differentiable[k]) {
      EXPECT_LE(max_rel_diff(grads_gpu[k], grads32[k]), 10 * c.f32_tol)
          << c.name << ": CUDA gradient of input " << k << " vs CPU (fp32)";
    }
  }
}

}  // namespace tessera::testing
