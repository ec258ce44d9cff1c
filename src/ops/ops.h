// Ops: forward and backward pairs, shape-checked here and run by the tensors' backend.
// Conventions (llm.c): activation gradients are assigned, parameter gradients accumulate (+=).
#pragma once
#include "core/tensor.h"

namespace tessera::ops {

// C = alpha * op(A) @ op(B) + beta * C, optionally batched (see Backend::gemm).
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, double alpha = 1.0,
          double beta = 0.0);

// y (N, out) = x (N, in) @ w (out, in)^T.  Backward: dx = dy @ w (if defined); dw += dy^T @ x.
void linear_forward(const Tensor& x, const Tensor& w, const Tensor& y);
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw);

// out (B, A, C) = x (A, B, C) with the first two dimensions swapped.
void transpose01(const Tensor& x, const Tensor& out);
void fill(const Tensor& x, double value);
void zero(const Tensor& x);
void axpy(double alpha, const Tensor& x, const Tensor& y);  // y += alpha * x
void scale(const Tensor& x, double alpha);
void copy(const Tensor& src, const Tensor& dst);
double sum_squares(const Tensor& x);

void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out);
void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable);

void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& out, const Tensor& rstd);
void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dout,
                      const Tensor& dx, const Tensor& dweight);

// The standard inverse frequencies theta^(-2i/r), i < r/2, as a host f64 vector.
Tensor rope_inv_freq(double theta, int64_t rotary_dim);
// RoPE with explicit inverse frequencies (YaRN and others); rotary_dim = 2 * inv_freq.numel().
void rope_forward(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool interleaved,
                  const Tensor& out);
void rope_backward(const Tensor& dout, const Tensor& positions, const Tensor& inv_freq, bool interleaved,
                   const Tensor& dx);
// RoPE forward rotates by +angle; rope_backward rotates the gradient by -angle (the transpose).
void rope_forward(const Tensor& x, const Tensor& positions, double theta, int64_t rotary_dim, bool interleaved,
                  const Tensor& out);
void rope_backward(const Tensor& dout, const Tensor& positions, double theta, int64_t rotary_dim, bool interleaved,
                   const Tensor& dx);

// out = silu(min(gate, limit)) * clamp(up, -limit, limit) (V4's clamp; limit 0 = none). No gradient where a
// clamp is active.
void swiglu_forward(const Tensor& gate, const Tensor& up, const Tensor& out, double limit = 0.0);
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate,
                     const Tensor& dup, double limit = 0.0);

void softmax_forward(const Tensor& x, const Tensor& out);
void softmax_backward(const Tensor& y, const Tensor& dy, const Tensor& dx);

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                       const Tensor& out, const Tensor& lse);
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                        const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv);

// Decoding: t new queries against a KV cache. q (B, t, H, D); k, v (B, L, KH, D); q_pos (B, t) i32, the position
// of each query (it attends cache keys 0..q_pos, q_pos < L), -1 = padding (output 0). out (B, t, H, D). No backward.
void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, double scale,
                      const Tensor& out);

// Per-row losses; with dlogits defined, the fused backward of loss_scale * sum(losses).
void cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                   const Tensor& dlogits);

void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step);

}  // namespace tessera::ops
