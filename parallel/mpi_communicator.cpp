// The MPI communicator (see mpi_communicator.h for the reduction order and the error model).
#include "parallel/mpi_communicator.h"

#include <cstdlib>

#include <mpi.h>

#include <climits>
#include <type_traits>
#include <cstring>
#include <numeric>

namespace tessera {

namespace {

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::bf16: return MPI_UINT16_T;  // moved as bits; reduced in f32 by us
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
  }
  return MPI_DATATYPE_NULL;
}

bool is_int(DType t) { return t == DType::i32 || t == DType::i64; }

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, len);
}

std::string tensor_error(const Tensor& t, const char* name) {
  return comm_checks::tensor_error(t, name, Device::cpu, "MPI");
}
using comm_checks::row_elems;

// op over ranks [lo, hi) of element i, as a pairwise tree: (lo..mid) op (mid..hi), mid = (lo + hi) / 2. The
// tree makes a sum over 2^k ranks equal the sum of its halves, so a data-parallel group whose ranks hold the
// pairwise sums of consecutive micro-batches reproduces the single-process pairwise sum bitwise.
template <class Acc, class T>
Acc reduce_range(const T* src, int64_t len, int64_t i, int lo, int hi, ReduceOp op) {
  if (hi - lo == 1) {
    if constexpr (std::is_same_v<T, bf16>) return from_bf16(src[lo * len + i]);
    else return src[lo * len + i];
  }
  const int mid = (lo + hi) / 2;
  Acc a = reduce_range<Acc>(src, len, i, lo, mid, op), b = reduce_range<Acc>(src, len, i, mid, hi, op);
  if (op == ReduceOp::max) return (b > a || b != b) ? b : a;
  return a + b;
}

template <class T>
void reduce_typed(const T* src, int n, int64_t len, T* dst, ReduceOp op) {
  using Acc = std::conditional_t<std::is_same_v<T, bf16>, float, T>;  // bf16 accumulates in f32, rounded once
  for (int64_t i = 0; i < len; ++i) {
    Acc acc = reduce_range<Acc>(src, len, i, 0, n, op);
    if (op == ReduceOp::avg) acc /= static_cast<Acc>(n);
    if constexpr (std::is_same_v<T, bf16>) dst[i] = to_bf16(acc);
    else dst[i] = acc;
  }
}

// dst[i] = op over r = 0..n-1 (a pairwise tree, reduce_range) of src[r * len + i].
void reduce_chunks(DType t, const void* src, int n, int64_t len, void* dst, ReduceOp op) {
  switch (t) {
    case DType::f32: return reduce_typed(static_cast<const float*>(src), n, len, static_cast<float*>(dst), op);
    case DType::f64: return reduce_typed(static_cast<const double*>(src), n, len, static_cast<double*>(dst), op);
    case DType::bf16: return reduce_typed(static_cast<const bf16*>(src), n, len, static_cast<bf16*>(dst), op);
    case DType::i32: return reduce_typed(static_cast<const int32_t*>(src), n, len, static_cast<int32_t*>(dst), op);
    case DType::i64: return reduce_typed(static_cast<const int64_t*>(src), n, len, static_cast<int64_t*>(dst), op);
  }
}

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of comm (freed on destruction).
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    int rc = MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(comm_, &rank_);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm_, &size_);
    if (rc != MPI_SUCCESS) TS_FAIL("MPI communicator setup failed: ", mpi_error_string(rc));
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::cpu; }
  const char* backend() const override { return "mpi"; }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    const char* name = "all_reduce";
    std::string err = tensor_error(t, "t");
    if (err.empty() && is_int(t.dtype()) && op == ReduceOp::avg) err = cat("avg of an integer tensor ", t.str());
    if (err.empty() && t.numel() > INT_MAX) err = cat(t.str(), " has more than 2^31-1 elements");
    agree(name, err, t.numel(), "element count", int64_t(t.dtype()) * 8 + int64_t(op), "dtype and op");
    stats_.all_reduce.calls++;
    stats_.all_reduce.bytes += t.nbytes();
    if (size_ == 1 || t.numel() == 0) return;

    const int64_t n = t.numel();
    const size_t esz = dtype_size(t.dtype());
    std::vector<int> counts(size_), displs(size_);
    for (int j = 0; j < size_; ++j) {
      displs[j] = static_cast<int>(n * j / size_);
      counts[j] = static_cast<int>(n * (j + 1) / size_) - displs[j];
    }
    const int mine = counts[rank_];
    std::vector<int> rcounts(size_, mine), rdispls(size_);
    for (int i = 0; i < size_; ++i) rdispls[i] = i * mine;
    std::vector<char> buf(static_cast<size_t>(mine) * size_ * esz + 1);
    MPI_Datatype type = mpi_type(t.dtype());
    check(MPI_Alltoallv(t.raw(), counts.data(), displs.data(), type, buf.data(), rcounts.data(), rdispls.data(), type,
                        comm_),
          name, "MPI_Alltoallv");
    reduce_chunks(t.dtype(), buf.data(), size_, mine, static_cast<char*>(t.raw()) + displs[rank_] * esz, op);
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, t.raw(), counts.data(), displs.data(), type, comm_), name,
          "MPI_Allgatherv");
  }

  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) override {
    const char* name = "reduce_scatter";
    std::string err = tensor_error(in, "in");
    if (err.empty()) err = tensor_error(out, "out");
    if (err.empty() && in.dtype() != out.dtype())
      err = cat("dtypes differ: in ", in.str(), ", out ", out.str());
    if (err.empty() && in.numel() != int64_t(size_) * out.numel())
      err = cat("in ", in.str(), " must hold size (", size_, ") x out ", out.str(), " elements");
    if (err.empty() && is_int(in.dtype()) && op == ReduceOp::avg) err = cat("avg of an integer tensor ", in.str());
    if (err.empty() && in.numel() > INT_MAX) err = cat(in.str(), " has more than 2^31-1 elements");
    agree(name, err, out.numel(), "output element count", int64_t(out.dtype()) * 8 + int64_t(op), "dtype and op");
    stats_.reduce_scatter.calls++;
    stats_.reduce_scatter.bytes += in.nbytes();
    const int64_t m = out.numel();
    if (m == 0) return;
    if (size_ == 1) {
      std::memcpy(out.raw(), in.raw(), out.nbytes());
      return;
    }
    std::vector<char> buf(in.nbytes());
    MPI_Datatype type = mpi_type(in.dtype());
    check(MPI_Alltoall(in.raw(), static_cast<int>(m), type, buf.data(), static_cast<int>(m), type, comm_), name,
          "MPI_Alltoall");
    reduce_chunks(in.dtype(), buf.data(), size_, m, out.raw(), op);
  }

  void all_gather(const Tensor& in, const Tensor& out) override {
    const char* name = "all_gather";
    std::string err = tensor_error(in, "in");
    if (err.empty()) err = tensor_error(out, "out");
    if (err.empty() && in.dtype() != out.dtype()) err = cat("dtypes differ: in ", in.str(), ", out ", out.str());
    if (err.empty() && out.numel() != int64_t(size_) * in.numel())
      err = cat("out ", out.str(), " must hold size (", size_, ") x in ", in.str(), " elements");
    if (err.empty() && out.numel() > INT_MAX) err = cat(out.str(), " has more than 2^31-1 elements");
    agree(name, err, in.numel(), "input element count", int64_t(in.dtype()), "dtype");
    stats_.all_gather.calls++;
    stats_.all_gather.bytes += out.nbytes();
    if (in.numel() == 0) return;
    MPI_Datatype type = mpi_type(in.dtype());
    const int n = static_cast<int>(in.numel());
    check(MPI_Allgather(in.raw(), n, type, out.raw(), n, type, comm_), name, "MPI_Allgather");
  }

  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                    const std::vector<int64_t>& recv_counts) override {
    const char* name = "all_to_all_v";
    std::string err = tensor_error(send, "send");
    if (err.empty()) err = tensor_error(recv, "recv");
    if (err.empty()) err = comm_checks::all_to_all_error(send, send_counts, recv, recv_counts, size_);
    if (err.empty() && (send.numel() > INT_MAX || recv.numel() > INT_MAX)) err = "more than 2^31-1 elements";
    const int64_t row = send.defined() ? row_elems(send) : 0;
    agree(name, err, row, "row size", send.defined() ? int64_t(send.dtype()) : -1, "dtype");
    if (validate_) {
      // Everyone learns what the others send it and checks it against what it expects.
      std::vector<int64_t> incoming(size_);
      check(MPI_Alltoall(send_counts.data(), 1, MPI_INT64_T, incoming.data(), 1, MPI_INT64_T, comm_), name,
            "MPI_Alltoall (counts)");
      std::string mismatch;
      for (int p = 0; p < size_ && mismatch.empty(); ++p)
        if (incoming[p] != recv_counts[p])
          mismatch = cat("rank ", p, " sends ", incoming[p], " rows, recv_counts[", p, "] = ", recv_counts[p]);
      agree(name, mismatch, 0, "", 0, "");
    }
    std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
    int64_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      sc[p] = static_cast<int>(send_counts[p] * row);
      rc[p] = static_cast<int>(recv_counts[p] * row);
      sd[p] = static_cast<int>(so);
      rd[p] = static_cast<int>(ro);
      so += sc[p];
      ro += rc[p];
      if (p != rank_) stats_.all_to_all.bytes += int64_t(sc[p]) * dtype_size(send.dtype());
    }
    stats_.all_to_all.calls++;
    MPI_Datatype type = mpi_type(send.dtype());
    // MPI wants valid buffers even for empty tensors.
    char dummy[16];
    void* sp = send.numel() ? send.raw() : dummy;
    void* rp = recv.numel() ? recv.raw() : dummy + 8;
    check(MPI_Alltoallv(sp, sc.data(), sd.data(), type, rp, rc.data(), rd.data(), type, comm_), name,
          "MPI_Alltoallv");
  }

  void send(const Tensor& t, int peer) override {
    std::string err = p2p_error(t, peer);
    if (!err.empty()) fail("send", err);
    stats_.send.calls++;
    stats_.send.bytes += t.nbytes();
    check(MPI_Send(t.numel() ? t.raw() : nullptr, static_cast<int>(t.numel()), mpi_type(t.dtype()), peer, kTag, comm_),
          "send", "MPI_Send");
  }

  void recv(const Tensor& t, int peer) override { recv_tagged(t, peer, kTag, "recv"); }

  void isend(const Tensor& t, int peer, int channel) override {
    std::string err = p2p_error(t, peer);
    if (err.empty() && (channel < 0 || channel > 1000)) err = cat("channel ", channel, " out of range [0, 1000]");
    if (!err.empty()) fail("isend", err);
    stats_.send.calls++;
    stats_.send.bytes += t.nbytes();
    MPI_Request request;
    check(MPI_Isend(t.numel() ? t.raw() : nullptr, static_cast<int>(t.numel()), mpi_type(t.dtype()), peer,
                    kTag + 1 + channel, comm_, &request),
          "isend", "MPI_Isend");
    pending_.push_back(request);
    pending_tensors_.push_back(t);  // keeps the buffer alive until wait_sends
  }

  void recv_on(const Tensor& t, int peer, int channel) override {
    if (channel < 0 || channel > 1000) fail("recv_on", cat("channel ", channel, " out of range [0, 1000]"));
    recv_tagged(t, peer, kTag + 1 + channel, "recv_on");
  }

  void wait_sends() override {
    if (pending_.empty()) return;
    check(MPI_Waitall(int(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE), "wait_sends", "MPI_Waitall");
    pending_.clear();
    pending_tensors_.clear();
  }

  void send_recv(const Tensor& out, int dst, const Tensor& in, int src) override {
    std::string err = p2p_error(out, dst);
    if (err.empty()) err = p2p_error(in, src);
    if (!err.empty()) fail("send_recv", err);
    stats_.send.calls++;
    stats_.send.bytes += out.nbytes();
    stats_.recv.calls++;
    stats_.recv.bytes += in.nbytes();
    MPI_Status status;
    MPI_Datatype type = mpi_type(in.dtype());
    check(MPI_Sendrecv(out.numel() ? out.raw() : nullptr, static_cast<int>(out.numel()), mpi_type(out.dtype()), dst,
                       kTag, in.numel() ? in.raw() : nullptr, static_cast<int>(in.numel()), type, src, kTag, comm_,
                       &status),
          "send_recv", "MPI_Sendrecv");
    int got = 0;
    check(MPI_Get_count(&status, type, &got), "send_recv", "MPI_Get_count");
    if (got != in.numel())
      fail("send_recv", cat("rank ", src, " sent ", got, " elements (or another dtype), expected ", in.str()));
  }

  void broadcast(const Tensor& t, int root) override {
    const char* name = "broadcast";
    std::string err = tensor_error(t, "t");
    if (err.empty() && (root < 0 || root >= size_)) err = cat("root ", root, " out of range");
    if (err.empty() && t.numel() > INT_MAX) err = cat(t.str(), " has more than 2^31-1 elements");
    agree(name, err, t.numel(), "element count", int64_t(t.dtype()) + 8 * int64_t(root), "dtype and root");
    stats_.broadcast.calls++;
    stats_.broadcast.bytes += t.nbytes();
    if (size_ == 1 || t.numel() == 0) return;
    check(MPI_Bcast(t.raw(), static_cast<int>(t.numel()), mpi_type(t.dtype()), root, comm_), name, "MPI_Bcast");
  }

  void barrier() override {
    stats_.barrier.calls++;
    check(MPI_Barrier(comm_), "barrier", "MPI_Barrier");
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    check(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub), "split", "MPI_Comm_split");
    if (sub == MPI_COMM_NULL) return nullptr;
    auto c = std::make_unique<MpiCommunicator>(sub);
    c->set_validate(validate_);
    return c;
  }

 private:
  static constexpr int kTag = 4242;  // recv/send; channel c of isend/recv_on is kTag + 1 + c

  void recv_tagged(const Tensor& t, int peer, int tag, const char* op) {
    std::string err = p2p_error(t, peer);
    if (!err.empty()) fail(op, err);
    stats_.recv.calls++;
    stats_.recv.bytes += t.nbytes();
    MPI_Status status;
    MPI_Datatype type = mpi_type(t.dtype());
    int rc = MPI_Recv(t.numel() ? t.raw() : nullptr, static_cast<int>(t.numel()), type, peer, tag, comm_, &status);
    if (rc == MPI_ERR_TRUNCATE || (rc == MPI_ERR_IN_STATUS && status.MPI_ERROR == MPI_ERR_TRUNCATE))
      fail(op, cat("rank ", peer, " sent more than the ", t.numel(), " elements of ", t.str()));
    check(rc, op, "MPI_Recv");
    int got = 0;
    check(MPI_Get_count(&status, type, &got), op, "MPI_Get_count");
    if (got != t.numel())
      fail(op, cat("rank ", peer, " sent ", got, " elements (or another dtype), expected ", t.str()));
  }

  [[noreturn]] void fail(const char* op, const std::string& why) const {
    throw Error(cat("MPI ", op, " on rank ", rank_, " of ", size_, ": ", why));
  }
  void check(int rc, const char* op, const char* call) const {
    if (rc != MPI_SUCCESS) fail(op, cat(call, " failed: ", mpi_error_string(rc)));
  }

  std::string p2p_error(const Tensor& t, int peer) const {
    std::string err = tensor_error(t, "t");
    if (err.empty() && (peer < 0 || peer >= size_)) err = cat("peer ", peer, " out of range");
    if (err.empty() && peer == rank_) err = "peer is this rank";
    if (err.empty() && t.numel() > INT_MAX) err = cat(t.str(), " has more than 2^31-1 elements");
    return err;
  }

  // Without validation: throws local_error if any. With it: one MPI_Allreduce through which the ranks learn
  // whether any rank found a bad argument and whether they all pass the same a and b; throws on every rank if
  // not.
  void agree(const char* op, const std::string& local_error, int64_t a, const char* a_name, int64_t b,
             const char* b_name) {
    if (!validate_ || size_ == 1) {
      if (!local_error.empty()) fail(op, local_error);
      return;
    }
    int64_t v[5] = {local_error.empty() ? 0 : rank_ + 1, a, -a, b, -b};
    check(MPI_Allreduce(MPI_IN_PLACE, v, 5, MPI_INT64_T, MPI_MAX, comm_), op, "MPI_Allreduce (argument check)");
    if (!local_error.empty()) fail(op, local_error);
    if (v[0] > 0) fail(op, cat("rank ", v[0] - 1, " was called with bad arguments (its own error says which)"));
    if (v[1] != -v[2]) fail(op, cat("ranks disagree on the ", a_name, ": from ", -v[2], " to ", v[1], " (this rank: ", a, ")"));
    if (v[3] != -v[4]) fail(op, cat("ranks disagree on the ", b_name));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::vector<MPI_Request> pending_;     // isends not yet waited for
  std::vector<Tensor> pending_tensors_;  // their buffers
};

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS) TS_FAIL("MPI_Init_thread failed: ", mpi_error_string(rc));
    owns_ = true;
  }
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) MPI_Finalize();
}

std::unique_ptr<Communicator> make_mpi_world() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) TS_FAIL("make_mpi_world: MPI is not initialised (create an MpiRuntime first)");
  MPI_Comm comm = MPI_COMM_NULL;
  int rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  if (rc != MPI_SUCCESS) TS_FAIL("MPI_Comm_dup(MPI_COMM_WORLD) failed: ", mpi_error_string(rc));
  return std::make_unique<MpiCommunicator>(comm);
}

int mpi_local_rank() {
  MPI_Comm local = MPI_COMM_NULL;
  int rc = MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);
  if (rc != MPI_SUCCESS) TS_FAIL("MPI_Comm_split_type failed: ", mpi_error_string(rc));
  int r = 0;
  MPI_Comm_rank(local, &r);
  MPI_Comm_free(&local);
  return r;
}

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID"})
    if (std::getenv(v)) return true;
  return false;
}

void mpi_abort(int code) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace tessera
