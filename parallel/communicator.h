// The communication interface of every parallel layout: collectives over tensors of one process group.
// Implementations: MPI for host tensors (parallel/mpi_communicator.h), NCCL for device tensors
// (parallel/nccl_communicator.h, TESSERA_CUDA builds). No MPI or NCCL header is needed to use this one.
//
// Conventions
// - Tensors are descriptors: buffers passed as `const Tensor&` are still written (outputs, in-place ops).
//   Every tensor must be contiguous and live on the communicator's device (host for MPI, cuda for NCCL).
// - "Along dim 0": reduce_scatter, all_gather and all_to_all_v split and concatenate whole rows of dim 0
//   (any trailing shape); the element counts are what must match, shapes are checked for row size only.
// - Dtypes: f32, f64, bf16 for reductions (bf16 is summed in f32 and rounded once); i32, i64 for
//   all_reduce sum/max, all_gather, broadcast, all_to_all_v, send/recv.
// - Every rank of the group calls every collective, with the same sizes, in the same order; a rank with no
//   data still calls (with empty tensors or zero counts). A failure throws tessera::Error naming the
//   collective and the rank.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace tessera {

enum class ReduceOp : uint8_t { sum, max, avg };
const char* reduce_op_name(ReduceOp op);

// Communication volume, per kind of collective: the number of calls and their payload bytes on this rank.
// Payload bytes are algorithm-independent (the same for MPI and NCCL): all_reduce: the tensor;
// reduce_scatter: the input; all_gather: the output; all_to_all: the rows sent to other ranks (not to
// itself); send / recv: the tensor; broadcast: the tensor (on every rank). barrier counts calls only.
struct CommCounter {
  int64_t calls = 0;
  int64_t bytes = 0;
};
struct CommStats {
  CommCounter all_reduce, reduce_scatter, all_gather, all_to_all, send, recv, broadcast, barrier;
  CommStats& operator+=(const CommStats& o) {
    for (auto m : {&CommStats::all_reduce, &CommStats::reduce_scatter, &CommStats::all_gather, &CommStats::all_to_all,
                   &CommStats::send, &CommStats::recv, &CommStats::broadcast, &CommStats::barrier}) {
      (this->*m).calls += (o.*m).calls;
      (this->*m).bytes += (o.*m).bytes;
    }
    return *this;
  }
  int64_t total_bytes() const {
    return all_reduce.bytes + reduce_scatter.bytes + all_gather.bytes + all_to_all.bytes + send.bytes + recv.bytes +
           broadcast.bytes;
  }
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual Device device() const = 0;     // where the tensors must live
  virtual const char* backend() const = 0;  // "mpi", "nccl"

  // In place: t = op over ranks of t. Every rank gets the bitwise-same result (see the implementation for the
  // order of the sums).
  virtual void all_reduce(const Tensor& t, ReduceOp op = ReduceOp::sum) = 0;
  // in: size() * out.numel() elements (size() blocks along dim 0); out = op over ranks of block rank().
  virtual void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op = ReduceOp::sum) = 0;
  // out: size() * in.numel() elements; block r of out (along dim 0) = in of rank r.
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  // send: rows of dim 0, send_counts[p] rows for peer p in peer order; recv: recv_counts[p] rows from peer p in
  // peer order. Counts are in rows (size() entries each); rows of send and recv have the same element count.
  // send_counts[p] on this rank must equal recv_counts[this rank] on p.
  virtual void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                            const std::vector<int64_t>& recv_counts) = 0;
  // Point to point (blocking for MPI, stream-ordered for NCCL); the sizes and dtypes must match.
  virtual void send(const Tensor& t, int peer) = 0;
  virtual void recv(const Tensor& t, int peer) = 0;
  // Sends `out` to dst and receives `in` from src at once (counted as one send and one recv): two ranks that each
  // send to the other cannot deadlock, as two blocking sends can (a pipeline's forward and backward exchanges).
  virtual void send_recv(const Tensor& out, int dst, const Tensor& in, int src) = 0;
  // Non-blocking sends on numbered channels (an interleaved pipeline schedule, whose waits are only on receives):
  // isend returns at once and `t` must stay unchanged until wait_sends(); recv_on receives the next message of
  // `channel` from `peer` (one channel's messages between two ranks arrive in the order sent). Counted as send and
  // recv. The defaults fail: MPI implements them.
  virtual void isend(const Tensor& t, int peer, int channel);
  virtual void recv_on(const Tensor& t, int peer, int channel);
  virtual void wait_sends();
  // In place: t = t of rank root.
  virtual void broadcast(const Tensor& t, int root) = 0;
  virtual void barrier() = 0;
  // Collective over this communicator: ranks with the same color form a group, ordered by (key, rank).
  // A negative color takes part in the call but joins no group and gets nullptr.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CommStats{}; }

  // Cross-rank argument checks (on by default where the implementation supports them: MPI): before each
  // collective the ranks agree on sizes, dtypes and on whether any rank found a bad argument, so a mismatch
  // throws on every rank instead of hanging or corrupting memory. Costs one small extra reduction per call.
  void set_validate(bool on) { validate_ = on; }
  bool validate() const { return validate_; }

 protected:
  CommStats stats_;
  bool validate_ = true;
};

// Argument checks shared by the implementations: each returns "" when the arguments are fine, else why not.
namespace comm_checks {
// Defined, contiguous and on `device` (`backend` names the implementation in the message).
std::string tensor_error(const Tensor& t, const char* name, Device device, const char* backend);
// Elements per row of dim 0 (all of a 0-d tensor).
int64_t row_elems(const Tensor& t);
// all_to_all_v's shapes, dtypes and counts against a group of `size` ranks (after tensor_error of both).
std::string all_to_all_error(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                             const std::vector<int64_t>& recv_counts, int size);
}  // namespace comm_checks

}  // namespace tessera
