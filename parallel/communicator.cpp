#include "parallel/communicator.h"

namespace tessera {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::max: return "max";
    case ReduceOp::avg: return "avg";
  }
  return "?";
}

void Communicator::isend(const Tensor&, int, int) {
  TS_FAIL("the ", backend(), " communicator has no non-blocking sends (isend); an interleaved pipeline needs MPI");
}
void Communicator::recv_on(const Tensor&, int, int) {
  TS_FAIL("the ", backend(), " communicator has no channel receives (recv_on); an interleaved pipeline needs MPI");
}
void Communicator::wait_sends() {}

namespace comm_checks {

std::string tensor_error(const Tensor& t, const char* name, Device device, const char* backend) {
  if (!t.defined()) return cat(name, " is an undefined tensor");
  if (t.device() != device)
    return cat(name, " ", t.str(), " is on ", device_name(t.device()), " (", backend, " needs ", device_name(device),
               " tensors)");
  if (!t.is_contiguous()) return cat(name, " ", t.str(), " is not contiguous");
  return {};
}

int64_t row_elems(const Tensor& t) {
  Shape rest(t.shape().begin() + (t.ndim() > 0 ? 1 : 0), t.shape().end());
  return shape_numel(rest);
}

std::string all_to_all_error(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                             const std::vector<int64_t>& recv_counts, int size) {
  if (send.ndim() == 0 || recv.ndim() == 0) return "send and recv need a dim 0 (rows)";
  if (send.dtype() != recv.dtype()) return cat("dtypes differ: send ", send.str(), ", recv ", recv.str());
  if (row_elems(send) != row_elems(recv)) return cat("rows differ: send ", send.str(), ", recv ", recv.str());
  if (int(send_counts.size()) != size || int(recv_counts.size()) != size)
    return cat("send_counts (", send_counts.size(), ") and recv_counts (", recv_counts.size(), ") need ", size,
               " entries");
  int64_t s = 0, r = 0;
  bool negative = false;
  for (int p = 0; p < size; ++p) {
    s += send_counts[p];
    r += recv_counts[p];
    negative |= send_counts[p] < 0 || recv_counts[p] < 0;
  }
  if (negative) return "negative count";
  if (s != send.size(0)) return cat("send_counts sum to ", s, " rows, send ", send.str(), " has ", send.size(0));
  if (r != recv.size(0)) return cat("recv_counts sum to ", r, " rows, recv ", recv.str(), " has ", recv.size(0));
  return {};
}

}  // namespace comm_checks

}  // namespace tessera
