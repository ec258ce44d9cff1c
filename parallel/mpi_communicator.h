// The MPI communicator: host tensors, deterministic reductions. This header needs no MPI header.
//
// Determinism: all_reduce and reduce_scatter never use MPI's reduction algorithms. The tensor is cut into
// size() contiguous chunks (chunk j = elements [N*j/size, N*(j+1)/size)); an MPI_Alltoallv gives rank j
// chunk j of every rank; rank j reduces them over ranks as a pairwise tree (ranks [0, n/2) then [n/2, n),
// recursively; bf16 accumulated in f32 and rounded once; avg = sum / size); an MPI_Allgatherv returns the
// reduced chunks to everyone. The tree is what makes data parallelism over 2^k ranks bitwise equal to one
// process (parallel/data_parallel.h). Each element is
// therefore summed exactly once, in a fixed order, by one rank: the result is bitwise identical on every rank
// and across runs with the same group size, whatever MPI's tuned algorithms do. (Bandwidth as a ring
// all-reduce: each rank sends and receives about 2 (size-1)/size of the tensor.) reduce_scatter is the
// first half of the same scheme.
//
// Errors: the communicators use MPI_ERRORS_RETURN; a failed MPI call or a bad argument throws tessera::Error
// "MPI <collective> on rank r of n: ...". With validate() on (default), the ranks first agree on sizes, dtypes
// and argument errors (one small MPI_Allreduce), so a mismatch between ranks throws on every rank.
#pragma once
#include <memory>

#include "parallel/communicator.h"

namespace tessera {

// Initialises MPI (if nobody has) and finalises it on destruction (if this object initialised it). Create one
// in main before any communicator and destroy it after the last one.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

 private:
  bool owns_ = false;
};

// A communicator over all processes (a duplicate of MPI_COMM_WORLD with MPI_ERRORS_RETURN). MPI must be
// initialised.
std::unique_ptr<Communicator> make_mpi_world();
// This process's rank among the processes on its node (MPI_COMM_TYPE_SHARED), e.g. to pick a GPU.
int mpi_local_rank();
// Whether this process was started by an MPI launcher (mpirun, srun): its environment names a rank.
bool launched_by_mpi();
// Ends every process of the job (MPI_Abort on MPI_COMM_WORLD) with `code`: what a rank calls after a fatal error,
// so that no other rank waits forever in a collective.
[[noreturn]] void mpi_abort(int code);

}  // namespace tessera
