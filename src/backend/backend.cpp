#include "backend/backend.h"

namespace tessera {

static Backend* g_backends[2] = {nullptr, nullptr};

void register_backend(Backend* backend) { g_backends[static_cast<int>(backend->device())] = backend; }

Backend& cpu_backend();  // defined in cpu/, always built

Backend& backend_for(Device device) {
  if (!g_backends[0]) register_backend(&cpu_backend());
  Backend* b = g_backends[static_cast<int>(device)];
  TS_CHECK(b, "no backend for device ", device_name(device), " in this build");
  return *b;
}

}  // namespace tessera
