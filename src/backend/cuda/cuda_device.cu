// Device setup for the CUDA backend: the caching allocator, the core's memory hooks, the cuBLAS handles and
// the backend instance.
#include <map>
#include <mutex>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {
namespace {

// cudaMalloc and cudaFree synchronise the device and cost tens of microseconds, and a training step allocates
// thousands of activations: freed blocks go to a free list by rounded size and are reused. All work is on
// stream 0, so reusing a block for later work is ordered after the work that used it.
class CachingAllocator {
 public:
  static size_t round(size_t bytes) {
    const size_t small = 512, large = size_t(2) << 20;
    return bytes < large ? (bytes + small - 1) / small * small : (bytes + large - 1) / large * large;
  }

  void* allocate(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      return p;
    }
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
      (void)cudaGetLastError();
      release_cached();  // fragmentation: give every cached block back and try once more
      cudaError_t err = cudaMalloc(&p, bytes);
      TS_CHECK(err == cudaSuccess, "out of GPU memory allocating ", bytes, " bytes (", reserved_,
               " bytes held by live tensors): ", cudaGetErrorString(err));
    }
    reserved_ += bytes;
    peak_ = std::max(peak_, reserved_);
    return p;
  }

  void release(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_[bytes].push_back(p);
  }

  size_t reserved() const { return reserved_; }
  size_t peak() const { return peak_; }

 private:
  void release_cached() {
    cudaDeviceSynchronize();
    for (auto& [bytes, blocks] : free_)
      for (void* p : blocks) {
        cudaFree(p);
        reserved_ -= bytes;
      }
    free_.clear();
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  size_t reserved_ = 0, peak_ = 0;
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator;  // never destroyed: tensors may outlive static teardown
  return *a;
}

std::shared_ptr<Storage> allocate(size_t bytes) {
  size_t rounded = CachingAllocator::round(bytes);
  auto st = std::make_shared<Storage>();
  st->bytes = bytes;
  st->device = Device::cuda;
  st->data = allocator().allocate(rounded);
  st->deleter = [rounded](void* p) { allocator().release(p, rounded); };
  return st;
}

void zero(void* p, size_t bytes) { TS_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, 0)); }
void copy(void* dst, const void* src, size_t bytes) { TS_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault)); }

}  // namespace

Backend* cuda_backend() {
  static Backend* backend = []() -> Backend* {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      (void)cudaGetLastError();
      return nullptr;
    }
    register_device_memory(DeviceMemory{allocate, zero, copy});
    return new CudaBackend;
  }();
  return backend;
}

size_t cuda_reserved_bytes() { return allocator().reserved(); }
size_t cuda_peak_reserved_bytes() { return allocator().peak(); }

void CudaBackend::synchronize() { TS_CUDA_CHECK(cudaDeviceSynchronize()); }

namespace cuda {

cublasHandle_t cublas() {
  static cublasHandle_t h = [] {
    cublasHandle_t handle;
    TS_CUBLAS_CHECK(cublasCreate(&handle));
    return handle;
  }();
  return h;
}

cublasLtHandle_t cublaslt() {
  static cublasLtHandle_t h = [] {
    cublasLtHandle_t handle;
    TS_CUBLAS_CHECK(cublasLtCreate(&handle));
    return handle;
  }();
  return h;
}

void* cublaslt_workspace(size_t* bytes) {
  static size_t size = size_t(64) << 20;
  static void* ws = [] {
    void* p = nullptr;
    TS_CUDA_CHECK(cudaMalloc(&p, size));
    return p;
  }();
  *bytes = size;
  return ws;
}

}  // namespace cuda
}  // namespace tessera
