// Helpers shared by the GPU tests (test_cuda_training, test_cuda_v4_training).
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "backend/backend.h"
#include "core/tensor.h"

namespace tessera::testing {

// Whether a GPU test should run: a CUDA device is usable. Without one the caller skips, unless
// TESSERA_REQUIRE_CUDA=1 (launch/gpu-check.sh), which makes the absence a failure.
inline bool need_gpu() {
  if (device_available(Device::cuda)) return true;
  const char* need = std::getenv("TESSERA_REQUIRE_CUDA");
  if (need && std::string(need) == "1") ADD_FAILURE() << "TESSERA_REQUIRE_CUDA=1 but no CUDA device is usable";
  return false;
}

// max |gpu - cpu| / max |cpu| over an f32 tensor (gpu on any device, cpu on the host).
inline double max_rel_to_host(const Tensor& gpu, const Tensor& cpu) {
  Tensor g = gpu.to_device(Device::cpu);
  double scale = 1e-30, diff = 0;
  for (int64_t i = 0; i < cpu.numel(); ++i) scale = std::max(scale, double(std::abs(cpu.data<float>()[i])));
  for (int64_t i = 0; i < cpu.numel(); ++i)
    diff = std::max(diff, double(std::abs(g.data<float>()[i] - cpu.data<float>()[i])));
  return diff / scale;
}

}  // namespace tessera::testing
