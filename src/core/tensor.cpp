#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

namespace tessera {

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

static thread_local Device t_default_device = Device::cpu;
Device default_device() { return t_default_device; }
DeviceScope::DeviceScope(Device d) : saved_(t_default_device) { t_default_device = d; }
DeviceScope::~DeviceScope() { t_default_device = saved_; }

static DeviceMemory g_device_memory;
void register_device_memory(const DeviceMemory& memory) { g_device_memory = memory; }

static const DeviceMemory& device_memory() {
  TS_CHECK(g_device_memory.allocate, "no CUDA backend in this build (configure with -DTESSERA_CUDA=ON)");
  return g_device_memory;
}

std::string shape_str(const Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

static Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t acc = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) TS_CHECK(d >= 0, "negative dimension in ", shape_str(shape));
  Tensor t;
  t.dtype_ = dtype;
  t.device_ = device;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  size_t bytes = std::max<size_t>(64, shape_numel(shape) * dtype_size(dtype));
  if (device == Device::cpu) {
    auto st = std::make_shared<Storage>();
    st->bytes = bytes;
    st->data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TS_CHECK(st->data, "out of host memory allocating ", bytes, " bytes");
    st->deleter = [](void* p) { std::free(p); };
    t.storage_ = std::move(st);
  } else {
    t.storage_ = device_memory().allocate(bytes);
  }
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  if (device == Device::cpu) std::memset(t.raw(), 0, t.nbytes());
  else device_memory().zero(t.raw(), t.nbytes());
  return t;
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

Tensor Tensor::reshape(const Shape& shape) const {
  TS_CHECK(is_contiguous(), "reshape of a non-contiguous tensor ", str());
  TS_CHECK(shape_numel(shape) == numel(), "reshape ", str(), " to ", shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

Tensor Tensor::slice(int64_t start, int64_t length) const {
  TS_CHECK(ndim() >= 1 && start >= 0 && length >= 0 && start + length <= shape_[0], "slice [", start, ", ",
           start + length, ") of ", str());
  Tensor t = *this;
  t.shape_[0] = length;
  t.offset_ += start * strides_[0];
  return t;
}

Tensor Tensor::clone() const { return to_device(device_); }

Tensor Tensor::to_device(Device device) const {
  Tensor t = empty(shape_, dtype_, device);
  t.copy_from(*this);
  return t;
}

void Tensor::copy_from(const Tensor& src) const {
  TS_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, "copy_from ", src.str(), " into ", str());
  TS_CHECK(is_contiguous() && src.is_contiguous(), "copy_from needs contiguous tensors");
  if (device_ == Device::cpu && src.device_ == Device::cpu) std::memmove(raw(), src.raw(), nbytes());
  else device_memory().copy(raw(), src.raw(), nbytes());
}

template <class To, class From>
static To convert(From v) {
  if constexpr (std::is_same_v<From, bf16>) return static_cast<To>(from_bf16(v));
  else if constexpr (std::is_same_v<To, bf16>) return to_bf16(static_cast<float>(v));
  else return static_cast<To>(v);
}

template <class To, class From>
static void convert_all(const From* src, To* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = convert<To>(src[i]);
}

template <class From>
static void convert_from(const From* src, const Tensor& out) {
  int64_t n = out.numel();
  switch (out.dtype()) {
    case DType::f32: convert_all(src, out.data<float>(), n); break;
    case DType::f64: convert_all(src, out.data<double>(), n); break;
    case DType::bf16: convert_all(src, out.data<bf16>(), n); break;
    default: TS_CHECK(false, "to(): float types only, got ", dtype_name(out.dtype()));
  }
}

Tensor Tensor::to(DType dtype) const {
  TS_CHECK(device_ == Device::cpu && is_contiguous(), "to(", dtype_name(dtype), ") needs a contiguous host tensor, got ",
           device_name(device_), " ", str());
  if (dtype == dtype_) return clone();
  Tensor out = empty(shape_, dtype, device_);
  switch (dtype_) {
    case DType::f32: convert_from(data<float>(), out); break;
    case DType::f64: convert_from(data<double>(), out); break;
    case DType::bf16: convert_from(data<bf16>(), out); break;
    default: TS_CHECK(false, "to(): float types only, got ", dtype_name(dtype_));
  }
  return out;
}

std::string Tensor::str() const { return std::string(dtype_name(dtype_)) + shape_str(shape_); }

}  // namespace tessera
