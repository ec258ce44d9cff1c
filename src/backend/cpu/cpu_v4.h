// The CPU implementation of the V4 kernels, spread over cpu_v4_moe.cpp (routing, token movement, compressor),
// cpu_v4_mhc.cpp (mHC, Hadamard, quantisation simulation) and cpu_v4_attention.cpp (sparse attention, indexer).
#pragma once
#include "backend/backend.h"

namespace tessera {

class CpuV4Kernels final : public V4Kernels {
 public:
#define TS_V4_KERNEL(ret, name, ...) ret name(__VA_ARGS__) override;
#include "backend/v4_kernels.inc"
#undef TS_V4_KERNEL
};

}  // namespace tessera
