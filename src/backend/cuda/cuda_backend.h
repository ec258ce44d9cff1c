// The CUDA backend: the Backend and V4Kernels interfaces on NVIDIA GPUs. The class is declared here once and
// its members are defined across files: cuda_backend.cu (GEMMs via cuBLAS/cuBLASLt and the base ops),
// cuda_v4_moe.cu (routing, token movement, compressor), cuda_v4_mhc.cu (mHC, Hadamard, quantisation
// simulation), cuda_v4_attention.cu (sparse attention, indexer). Memory: cuda_memory.cu.
#pragma once
#include "backend/backend.h"

namespace tessera {

class CudaV4Kernels final : public V4Kernels {
 public:
#define TS_V4_KERNEL(ret, name, ...) ret name(__VA_ARGS__) override;
#include "backend/v4_kernels.inc"
#undef TS_V4_KERNEL
};

class CudaBackend final : public Backend {
 public:
  Device device() const override { return Device::cuda; }
  const char* name() const override { return "cuda"; }
  void set_matmul_precision(MatmulPrecision p) override { precision_ = p; }
  MatmulPrecision matmul_precision() const { return precision_; }
  void synchronize() override;
  V4Kernels& v4() override { return v4_; }

  void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, double alpha,
            double beta) override;
  void transpose01(const Tensor& x, const Tensor& out) override;
  void fill(const Tensor& x, double value) override;
  void axpy(double alpha, const Tensor& x, const Tensor& y) override;
  void scale(const Tensor& x, double alpha) override;
  double sum_squares(const Tensor& x) override;
  void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) override;
  void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) override;
  void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& out,
                       const Tensor& rstd) override;
  void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dout,
                        const Tensor& dx, const Tensor& dweight) override;
  void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool interleaved, bool inverse,
            const Tensor& out) override;
  void swiglu_forward(const Tensor& gate, const Tensor& up, double limit, const Tensor& out) override;
  void swiglu_backward(const Tensor& gate, const Tensor& up, double limit, const Tensor& dout, const Tensor& dgate,
                       const Tensor& dup) override;
  void softmax_forward(const Tensor& x, const Tensor& out) override;
  void softmax_backward(const Tensor& y, const Tensor& dy, const Tensor& dx) override;
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                         const Tensor& out, const Tensor& lse) override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                          const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq,
                          const Tensor& dk, const Tensor& dv) override;
  void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, double scale,
                        const Tensor& out) override;  // cuda_decode.cu
  void cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                     const Tensor& dlogits) override;
  void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                    double bias_correction2) override;

 private:
  MatmulPrecision precision_ = MatmulPrecision::fp32;
  CudaV4Kernels v4_;
};

// The backend, or nullptr when no GPU is present (the first call also registers device memory with the core).
Backend* cuda_backend();
// Bytes the caching allocator holds from cudaMalloc, and the most it has held.
size_t cuda_reserved_bytes();
size_t cuda_peak_reserved_bytes();

}  // namespace tessera
