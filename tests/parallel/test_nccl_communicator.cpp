// The NCCL communicator on cuda tensors: the same collective checks as test_communicator. Meaningful at one rank
// (ctest runs it with -np 1 on a single-GPU machine); skips with a message when no GPU is present.
#include <cstdio>
#include <cstdlib>
#include <string>
#include "backend/backend.h"
#include "collective_checks.inc"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"

namespace tessera {
namespace {

TEST(Nccl, ReportsItsDeviceAndBackend) {
  COMM_OR_SKIP();
  EXPECT_EQ(comm.device(), Device::cuda);
  EXPECT_STREQ(comm.backend(), "nccl");
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  tessera::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rc = 0;
  {
    std::unique_ptr<tessera::Communicator> world = tessera::make_mpi_world();
    std::unique_ptr<tessera::Communicator> nccl;
    if (tessera::device_available(tessera::Device::cuda)) {
      nccl = tessera::make_nccl_communicator(*world, tessera::mpi_local_rank());
      tessera::env().world = nccl.get();
    } else {
      tessera::env().skip_reason = "no CUDA device available (NCCL communicator tests need a GPU)";
      const char* need = std::getenv("TESSERA_REQUIRE_CUDA");  // launch/gpu-check.sh: a missing GPU is a failure
      if (need && std::string(need) == "1") {
        std::fprintf(stderr, "TESSERA_REQUIRE_CUDA=1 but no CUDA device is usable\n");
        return 1;
      }
    }
    tessera::env().device = tessera::Device::cuda;
    tessera::env().exact = false;             // NCCL's own order of float sums
    tessera::env().cross_rank_checks = false;  // argument checks are local only
    rc = tessera::run_tests_on_all_ranks();
    tessera::env().world = nullptr;
  }
  return rc;
}
