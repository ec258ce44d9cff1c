#include "backend/backend.h"

namespace tessera {

static Backend* g_backends[2] = {nullptr, nullptr};

void register_backend(Backend* backend) { g_backends[static_cast<int>(backend->device())] = backend; }

Backend& cpu_backend();  // defined in cpu/, always built
#ifdef TESSERA_CUDA
Backend* cuda_backend();  // defined in cuda/; nullptr when no GPU is present
#endif

Backend& backend_for(Device device) {
  if (!g_backends[0]) register_backend(&cpu_backend());
#ifdef TESSERA_CUDA
  if (device == Device::cuda && !g_backends[1]) {
    Backend* b = cuda_backend();
    TS_CHECK(b, "no CUDA device is present");
    register_backend(b);
  }
#endif
  Backend* b = g_backends[static_cast<int>(device)];
  TS_CHECK(b, "no backend for device ", device_name(device), " in this build (configure with -DTESSERA_CUDA=ON)");
  return *b;
}

bool device_available(Device device) {
  if (device == Device::cpu) return true;
#ifdef TESSERA_CUDA
  return cuda_backend() != nullptr;
#else
  return false;
#endif
}

}  // namespace tessera
