// The NCCL communicator (see nccl_communicator.h): device tensors, stream 0, bootstrapped over MPI.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>

#include "parallel/nccl_communicator.h"

namespace tessera {
namespace {

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
  }
  return ncclFloat32;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::avg: return ncclAvg;
  }
  return ncclSum;
}

bool is_int(DType t) { return t == DType::i32 || t == DType::i64; }

std::string tensor_error(const Tensor& t, const char* name) {
  return comm_checks::tensor_error(t, name, Device::cuda, "NCCL");
}
using comm_checks::row_elems;

// Stream 0: the legacy default stream, on which the CUDA backend runs everything.
const cudaStream_t kStream = 0;

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size) : comm_(comm), rank_(rank), size_(size) { validate_ = false; }
  ~NcclCommunicator() override {
    if (scratch_) cudaFree(scratch_);
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::cuda; }
  const char* backend() const override { return "nccl"; }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    const char* name = "all_reduce";
    std::string err = tensor_error(t, "t");
    if (err.empty() && is_int(t.dtype()) && op == ReduceOp::avg) err = cat("avg of an integer tensor ", t.str());
    if (!err.empty()) fail(name, err);
    stats_.all_reduce.calls++;
    stats_.all_reduce.bytes += t.nbytes();
    if (t.numel() == 0) return;
    check(ncclAllReduce(t.raw(), t.raw(), t.numel(), nccl_type(t.dtype()), nccl_op(op), comm_, kStream), name,
          "ncclAllReduce");
  }

  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) override {
    const char* name = "reduce_scatter";
    std::string err = tensor_error(in, "in");
    if (err.empty()) err = tensor_error(out, "out");
    if (err.empty() && in.dtype() != out.dtype()) err = cat("dtypes differ: in ", in.str(), ", out ", out.str());
    if (err.empty() && in.numel() != int64_t(size_) * out.numel())
      err = cat("in ", in.str(), " must hold size (", size_, ") x out ", out.str(), " elements");
    if (err.empty() && is_int(in.dtype()) && op == ReduceOp::avg) err = cat("avg of an integer tensor ", in.str());
    if (!err.empty()) fail(name, err);
    stats_.reduce_scatter.calls++;
    stats_.reduce_scatter.bytes += in.nbytes();
    if (out.numel() == 0) return;
    check(ncclReduceScatter(in.raw(), out.raw(), out.numel(), nccl_type(in.dtype()), nccl_op(op), comm_, kStream), name,
          "ncclReduceScatter");
  }

  void all_gather(const Tensor& in, const Tensor& out) override {
    const char* name = "all_gather";
    std::string err = tensor_error(in, "in");
    if (err.empty()) err = tensor_error(out, "out");
    if (err.empty() && in.dtype() != out.dtype()) err = cat("dtypes differ: in ", in.str(), ", out ", out.str());
    if (err.empty() && out.numel() != int64_t(size_) * in.numel())
      err = cat("out ", out.str(), " must hold size (", size_, ") x in ", in.str(), " elements");
    if (!err.empty()) fail(name, err);
    stats_.all_gather.calls++;
    stats_.all_gather.bytes += out.nbytes();
    if (in.numel() == 0) return;
    check(ncclAllGather(in.raw(), out.raw(), in.numel(), nccl_type(in.dtype()), comm_, kStream), name, "ncclAllGather");
  }

  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                    const std::vector<int64_t>& recv_counts) override {
    const char* name = "all_to_all_v";
    std::string err = tensor_error(send, "send");
    if (err.empty()) err = tensor_error(recv, "recv");
    if (err.empty()) err = comm_checks::all_to_all_error(send, send_counts, recv, recv_counts, size_);
    if (!err.empty()) fail(name, err);
    const int64_t row = row_elems(send);
    const size_t row_bytes = row * dtype_size(send.dtype());
    const ncclDataType_t type = nccl_type(send.dtype());
    stats_.all_to_all.calls++;
    for (int p = 0; p < size_; ++p)
      if (p != rank_) stats_.all_to_all.bytes += send_counts[p] * int64_t(row_bytes);
    char* sp = static_cast<char*>(send.raw());
    char* rp = static_cast<char*>(recv.raw());
    check(ncclGroupStart(), name, "ncclGroupStart");
    int64_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      if (send_counts[p] > 0 && row > 0)
        check(ncclSend(sp + so * row_bytes, send_counts[p] * row, type, p, comm_, kStream), name, "ncclSend");
      if (recv_counts[p] > 0 && row > 0)
        check(ncclRecv(rp + ro * row_bytes, recv_counts[p] * row, type, p, comm_, kStream), name, "ncclRecv");
      so += send_counts[p];
      ro += recv_counts[p];
    }
    check(ncclGroupEnd(), name, "ncclGroupEnd");
  }

  void send(const Tensor& t, int peer) override {
    std::string err = p2p_error(t, peer);
    if (!err.empty()) fail("send", err);
    stats_.send.calls++;
    stats_.send.bytes += t.nbytes();
    if (t.numel() == 0) return;
    check(ncclSend(t.raw(), t.numel(), nccl_type(t.dtype()), peer, comm_, kStream), "send", "ncclSend");
  }

  void recv(const Tensor& t, int peer) override {
    std::string err = p2p_error(t, peer);
    if (!err.empty()) fail("recv", err);
    stats_.recv.calls++;
    stats_.recv.bytes += t.nbytes();
    if (t.numel() == 0) return;
    check(ncclRecv(t.raw(), t.numel(), nccl_type(t.dtype()), peer, comm_, kStream), "recv", "ncclRecv");
  }

  void send_recv(const Tensor& out, int dst, const Tensor& in, int src) override {
    std::string err = p2p_error(out, dst);
    if (err.empty()) err = p2p_error(in, src);
    if (!err.empty()) fail("send_recv", err);
    stats_.send.calls++;
    stats_.send.bytes += out.nbytes();
    stats_.recv.calls++;
    stats_.recv.bytes += in.nbytes();
    check(ncclGroupStart(), "send_recv", "ncclGroupStart");
    if (out.numel() > 0)
      check(ncclSend(out.raw(), out.numel(), nccl_type(out.dtype()), dst, comm_, kStream), "send_recv", "ncclSend");
    if (in.numel() > 0)
      check(ncclRecv(in.raw(), in.numel(), nccl_type(in.dtype()), src, comm_, kStream), "send_recv", "ncclRecv");
    check(ncclGroupEnd(), "send_recv", "ncclGroupEnd");
  }

  void broadcast(const Tensor& t, int root) override {
    std::string err = tensor_error(t, "t");
    if (err.empty() && (root < 0 || root >= size_)) err = cat("root ", root, " out of range");
    if (!err.empty()) fail("broadcast", err);
    stats_.broadcast.calls++;
    stats_.broadcast.bytes += t.nbytes();
    if (t.numel() == 0) return;
    check(ncclBroadcast(t.raw(), t.raw(), t.numel(), nccl_type(t.dtype()), root, comm_, kStream), "broadcast",
          "ncclBroadcast");
  }

  void barrier() override {
    stats_.barrier.calls++;
    if (!scratch_) cuda_check(cudaMalloc(&scratch_, sizeof(float)), "barrier", "cudaMalloc");
    check(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, kStream), "barrier", "ncclAllReduce");
    cuda_check(cudaStreamSynchronize(kStream), "barrier", "cudaStreamSynchronize");
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    ncclComm_t sub = nullptr;
    check(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &sub, nullptr), "split", "ncclCommSplit");
    if (color < 0 || sub == nullptr) return nullptr;
    int r = 0, n = 0;
    check(ncclCommUserRank(sub, &r), "split", "ncclCommUserRank");
    check(ncclCommCount(sub, &n), "split", "ncclCommCount");
    return std::make_unique<NcclCommunicator>(sub, r, n);
  }

 private:
  [[noreturn]] void fail(const char* op, const std::string& why) const {
    throw Error(cat("NCCL ", op, " on rank ", rank_, " of ", size_, ": ", why));
  }
  void check(ncclResult_t rc, const char* op, const char* call) const {
    if (rc != ncclSuccess && rc != ncclInProgress) {
      const char* last = comm_ ? ncclGetLastError(comm_) : nullptr;
      fail(op, cat(call, " failed: ", ncclGetErrorString(rc), last && *last ? cat(" (", last, ")") : std::string()));
    }
  }
  void cuda_check(cudaError_t rc, const char* op, const char* call) const {
    if (rc != cudaSuccess) fail(op, cat(call, " failed: ", cudaGetErrorString(rc)));
  }
  std::string p2p_error(const Tensor& t, int peer) const {
    std::string err = tensor_error(t, "t");
    if (err.empty() && (peer < 0 || peer >= size_)) err = cat("peer ", peer, " out of range");
    if (err.empty() && peer == rank_) err = "peer is this rank (use all_to_all_v for a self copy)";
    return err;
  }

  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1;
  void* scratch_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int local_rank) {
  const std::string where = cat("NCCL init on rank ", bootstrap.rank(), " of ", bootstrap.size(), ": ");
  TS_CHECK(bootstrap.device() == Device::cpu, "the NCCL bootstrap must be a host (MPI) communicator");
  int devices = 0;
  cudaError_t ce = cudaGetDeviceCount(&devices);
  if (ce != cudaSuccess || devices == 0)
    TS_FAIL(where, "no CUDA device (", ce != cudaSuccess ? cudaGetErrorString(ce) : "device count 0", ")");
  ce = cudaSetDevice(local_rank % devices);
  if (ce != cudaSuccess) TS_FAIL(where, "cudaSetDevice(", local_rank % devices, "): ", cudaGetErrorString(ce));

  // The 128-byte unique id travels as i64 words through the bootstrap's broadcast (MPI_Bcast).
  static_assert(sizeof(ncclUniqueId) % sizeof(int64_t) == 0);
  Tensor id_words = Tensor::zeros({int64_t(sizeof(ncclUniqueId) / sizeof(int64_t))}, DType::i64, Device::cpu);
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (bootstrap.rank() == 0) {
    ncclResult_t rc = ncclGetUniqueId(&id);
    if (rc != ncclSuccess) TS_FAIL(where, "ncclGetUniqueId failed: ", ncclGetErrorString(rc));
    std::memcpy(id_words.data<int64_t>(), &id, sizeof(id));
  }
  bootstrap.broadcast(id_words, 0);
  std::memcpy(&id, id_words.data<int64_t>(), sizeof(id));

  ncclComm_t comm = nullptr;
  ncclResult_t rc = ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank());
  if (rc != ncclSuccess) TS_FAIL(where, "ncclCommInitRank failed: ", ncclGetErrorString(rc));
  return std::make_unique<NcclCommunicator>(comm, bootstrap.rank(), bootstrap.size());
}

}  // namespace tessera
