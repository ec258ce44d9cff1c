// The backend interface: the small set of kernels every device implements. Shapes and dtypes are checked
// once in src/ops; a backend may assume contiguous tensors of matching float dtype (f32 or f64).
#pragma once
#include "core/tensor.h"

namespace tessera {

class V4Kernels;

// How an accelerator may compute fp32 matrix products: exactly in fp32, or on bf16 tensor cores (inputs rounded
// to bf16, fp32 accumulation and output). fp64 products are always exact; the CPU backend is always exact.
enum class MatmulPrecision { fp32, bf16 };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual const char* name() const = 0;
  virtual void set_matmul_precision(MatmulPrecision) {}
  // Waits for queued device work (timing); a no-op on the CPU.
  virtual void synchronize() {}

  // C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b]; A, B, C are (M,K)/(K,M), (K,N)/(N,K), (M,N), with an
  // optional leading batch dimension (a batch of 1 broadcasts A or B).
  virtual void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, double alpha,
                    double beta) = 0;

  // out (B, A, C) = x (A, B, C) with the first two dimensions swapped.
  virtual void transpose01(const Tensor& x, const Tensor& out) = 0;

  virtual void fill(const Tensor& x, double value) = 0;
  virtual void axpy(double alpha, const Tensor& x, const Tensor& y) = 0;  // y += alpha * x
  virtual void scale(const Tensor& x, double alpha) = 0;                   // x *= alpha
  virtual double sum_squares(const Tensor& x) = 0;                         // fixed-order reduction

  // ids (N) i32; table (V, C); out (N, C). Backward: dtable += scatter of dout rows.
  virtual void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) = 0;
  virtual void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) = 0;

  // x (N, C); weight (C) or undefined (weightless); out (N, C); rstd (N) = 1/sqrt(mean(x^2) + eps).
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& out,
                               const Tensor& rstd) = 0;
  // dx = (assigned); dweight += (if defined).
  virtual void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dout,
                                const Tensor& dx, const Tensor& dweight) = 0;

  // x, out (B, T, H, D); positions (B*T) i32; inv_freq (rotary_dim / 2) f64, the angle of pair i at position p
  // is p * inv_freq[i] (in fp32). Rotates the last rotary_dim = 2 * inv_freq.numel() dims of each head:
  // half-split pairs (i, i + r/2) or interleaved pairs (2i, 2i+1). inverse rotates by -angle (= backward).
  virtual void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool interleaved, bool inverse,
                    const Tensor& out) = 0;

  // out = silu(min(gate, limit)) * clamp(up, -limit, limit); limit 0 = no clamp. Backward passes no gradient
  // where a clamp is active (torch.clamp semantics: the bound itself passes).
  virtual void swiglu_forward(const Tensor& gate, const Tensor& up, double limit, const Tensor& out) = 0;
  virtual void swiglu_backward(const Tensor& gate, const Tensor& up, double limit, const Tensor& dout,
                               const Tensor& dgate, const Tensor& dup) = 0;

  // Row softmax over the last dimension of (N, C).
  virtual void softmax_forward(const Tensor& x, const Tensor& out) = 0;
  virtual void softmax_backward(const Tensor& y, const Tensor& dy, const Tensor& dx) = 0;

  // Causal attention. q (B, T, H, D); k, v (B, T, KH, D) with H % KH == 0 (grouped-query);
  // doc (B, T) i32 or undefined: a query attends only to keys of its own document. out (B, T, H, D);
  // lse (B, H, T) = logsumexp of the scaled scores, kept for backward. Backward assigns dq, dk, dv.
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                                 const Tensor& out, const Tensor& lse) = 0;
  virtual void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                                  const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq,
                                  const Tensor& dk, const Tensor& dv) = 0;

  // Attention of t new queries against a KV cache (decoding; forward only). q (B, t, H, D); k, v (B, L, KH, D) the
  // cache; q_pos (B, t) i32: the position of each query, which sees the cache keys 0..q_pos (q_pos < L), or -1
  // for a padding query (its output row is 0). out (B, t, H, D).
  virtual void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, double scale,
                                const Tensor& out) = 0;

  // logits (N, V); targets (N) i32, negative = ignored; losses (N) = -log softmax(logits)[target] (0 if ignored).
  // If dlogits is defined it receives loss_scale * (softmax - onehot) (zero rows for ignored targets); it may
  // alias logits.
  virtual void cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                             const Tensor& dlogits) = 0;

  // One AdamW step on one parameter: m, v are the moments; bias corrections are precomputed by the caller.
  virtual void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr,
                            double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                            double bias_correction2) = 0;

  // The V4 kernels of this device.
  virtual V4Kernels& v4() = 0;
};

// The DeepSeek-V4 kernels (MoE routing, mHC, compressors, sparse attention, indexer, quantisation
// simulation). Their contracts are documented once, in src/ops/v4_ops.h, whose functions have the same
// signatures and check shapes before calling these.
class V4Kernels {
 public:
  virtual ~V4Kernels() = default;
#define TS_V4_KERNEL(ret, name, ...) virtual ret name(__VA_ARGS__) = 0;
#include "backend/v4_kernels.inc"
#undef TS_V4_KERNEL
};

// The backend that owns tensors on `device`; throws if that device's backend was not built or no such device
// is present.
Backend& backend_for(Device device);
void register_backend(Backend* backend);
// Whether `device` can be used: built in, and (for cuda) a GPU present.
bool device_available(Device device);

}  // namespace tessera
