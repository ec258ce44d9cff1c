// Builds without TESSERA_CUDA: the NCCL communicator's factory says why it is missing.
#include "parallel/nccl_communicator.h"

namespace tessera {

std::unique_ptr<Communicator> make_nccl_communicator(Communicator&, int) {
  TS_FAIL("the NCCL communicator needs a build with -DTESSERA_CUDA=ON");
}

}  // namespace tessera
