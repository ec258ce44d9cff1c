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

// The device that tensors allocated without an explicit device go to (cpu unless a DeviceScope says
// otherwise). Models and op tests allocate their tensors this way, so the same code runs on any device.
Device default_device();
class DeviceScope {
 public:
  explicit DeviceScope(Device d);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  Device saved_;
};

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

struct Storage;
// How the core reaches accelerator memory; the CUDA backend registers this (core has no CUDA dependency).
struct DeviceMemory {
  std::shared_ptr<Storage> (*allocate)(size_t bytes) = nullptr;
  void (*zero)(void* p, size_t bytes) = nullptr;
  void (*copy)(void* dst, const void* src, size_t bytes) = nullptr;  // any direction (unified addressing)
};
void register_device_memory(const DeviceMemory& memory);

class Tensor {
 public:
  Tensor() = default;

  // A new contiguous tensor on `device` (contents undefined / zero-filled).
  static Tensor empty(const Shape& shape, DType dtype, Device device = default_device());
  static Tensor zeros(const Shape& shape, DType dtype, Device device = default_device());

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

  // The element pointer on the tensor's own device (backends use this).
  void* raw() const { return static_cast<char*>(storage_->data) + offset_ * dtype_size(dtype_); }
  // Host access: a device tensor must be copied first (to_device(Device::cpu)).
  template <class T>
  T* data() const {
    TS_CHECK(dtype_of<T>() == dtype_, "tensor is ", dtype_name(dtype_), ", accessed as ", dtype_name(dtype_of<T>()));
    TS_CHECK(device_ == Device::cpu, "host access to a ", device_name(device_), " tensor ", str(),
             " (copy it with to_device(Device::cpu))");
    return static_cast<T*>(raw());
  }

  // Views share the buffer. reshape needs a contiguous tensor; slice narrows dimension 0.
  Tensor reshape(const Shape& shape) const;
  Tensor slice(int64_t start, int64_t length) const;

  // Deep copies (contiguous tensors).
  Tensor clone() const;                   // same device
  Tensor to_device(Device device) const;  // a copy on `device` (a copy even if already there)
  Tensor to(DType dtype) const;           // host only: converts between float types (f32, f64, bf16)
  void copy_from(const Tensor& src) const;  // same shape and dtype, any devices (writes the data, not the handle)

  std::string str() const;  // "f32(2, 3)"

 private:
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
  Shape shape_, strides_;
  int64_t offset_ = 0;
  std::shared_ptr<Storage> storage_;
};

}  // namespace tessera
