// The NCCL communicator: the Communicator interface for device (cuda) tensors. This header needs no CUDA or
// NCCL header; the implementation is built only with TESSERA_CUDA (elsewhere the factory throws).
//
// Bootstrap: rank 0 of `bootstrap` (an MPI communicator) creates the ncclUniqueId and broadcasts it over
// `bootstrap`; every rank selects device local_rank % device_count and calls ncclCommInitRank. All work is
// enqueued on stream 0, the CUDA backend's stream, so it is ordered with the kernels before and after it
// without explicit synchronisation (barrier synchronises the stream).
//
// Reductions are NCCL's (ncclSum / ncclMax / ncclAvg). NCCL's ring and tree algorithms give every rank the same
// bits and are run-to-run deterministic for a fixed layout, NCCL version and NCCL_ALGO / NCCL_PROTO, but the
// order of the sums is NCCL's, not the MPI communicator's rank order: compare the two with a tolerance.
// all_to_all_v is grouped ncclSend / ncclRecv; split is ncclCommSplit. validate() is not implemented here
// (arguments are checked locally only). Errors throw tessera::Error "NCCL <collective> on rank r of n: ...".
#pragma once
#include <memory>

#include "parallel/communicator.h"

namespace tessera {

// Collective over `bootstrap`: a communicator over the same ranks, in the same order, for cuda tensors.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int local_rank);

}  // namespace tessera
