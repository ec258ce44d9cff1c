// A tensor is a plain descriptor: dtype, shape, strides, device and a shared buffer. No autograd state.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace tessera {

enum class Device : uint8_t { cpu, cuda };
const char* device_name(Device d);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// Owns one allocation; the deleter is the allocating backend's.
struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  Device device = Device::cpu;
  std::function<void(void*)> deleter;
  ~Storage() {
    if (data && deleter) deleter(data);
  }
};

class Tensor {
 public:
  Tensor() = default;

  // A new contiguous tensor on `device` (contents undefined / zero-filled).
  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu);
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::cpu);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t size(int d) const { return shape_.at(d < 0 ? d + ndim() : d); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  bool is_contiguous() const;

  void* raw() const { return static_cast<char*>(storage_->data) + offset_ * dtype_size(dtype_); }
  template <class T>
  T* data() const {
    TS_CHECK(dtype_of<T>() == dtype_, "tensor is ", dtype_name(dtype_), ", accessed as ", dtype_name(dtype_of<T>()));
    return static_cast<T*>(raw());
  }

  // Views share the buffer. reshape needs a contiguous tensor; slice narrows dimension 0.
  Tensor reshape(const Shape& shape) const;
  Tensor slice(int64_t start, int64_t length) const;

  // Deep copies.
  Tensor clone() const;
  Tensor to(DType dtype) const;  // CPU only: converts between float types (f32, f64, bf16)
  void copy_from(const Tensor& src);  // same shape and dtype, CPU

  std::string str() const;  // "f32(2, 3)"

 private:
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
  Shape shape_, strides_;
  int64_t offset_ = 0;
  std::shared_ptr<Storage> storage_;
};

}  // namespace tessera
