// main() of the gtest binaries that run under mpirun with one in-process model as the reference
// (test_expert_parallel, test_pipeline_parallel): every rank runs every test (the collectives need them all),
// rank 0 prints the report, and a failure on any rank fails the job. The test file defines g_world.
#pragma once
#include <gtest/gtest.h>

#include <memory>

#include "parallel/mpi_communicator.h"

namespace tessera {
extern Communicator* g_world;
}

int main(int argc, char** argv) {
  tessera::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  std::unique_ptr<tessera::Communicator> world = tessera::make_mpi_world();
  tessera::g_world = world.get();
  if (world->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int failed = RUN_ALL_TESTS();
  tessera::Tensor f = tessera::Tensor::empty({1}, tessera::DType::i32, tessera::Device::cpu);
  f.data<int32_t>()[0] = failed;
  world->all_reduce(f, tessera::ReduceOp::max);
  return f.data<int32_t>()[0];
}
