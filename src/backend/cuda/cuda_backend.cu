// STUB: replaced by the base CUDA ops.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {

void CudaBackend::gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, double alpha, double beta) { TS_FAIL("CUDA gemm: not implemented"); }
void CudaBackend::transpose01(const Tensor& x, const Tensor& out) { TS_FAIL("CUDA transpose01: not implemented"); }
void CudaBackend::fill(const Tensor& x, double value) { TS_FAIL("CUDA fill: not implemented"); }
void CudaBackend::axpy(double alpha, const Tensor& x, const Tensor& y) { TS_FAIL("CUDA axpy: not implemented"); }
void CudaBackend::scale(const Tensor& x, double alpha) { TS_FAIL("CUDA scale: not implemented"); }
double CudaBackend::sum_squares(const Tensor& x) { TS_FAIL("CUDA sum_squares: not implemented"); }
void CudaBackend::embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) { TS_FAIL("CUDA embedding_forward: not implemented"); }
void CudaBackend::embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) { TS_FAIL("CUDA embedding_backward: not implemented"); }
void CudaBackend::rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& out, const Tensor& rstd) { TS_FAIL("CUDA rmsnorm_forward: not implemented"); }
void CudaBackend::rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dout, const Tensor& dx, const Tensor& dweight) { TS_FAIL("CUDA rmsnorm_backward: not implemented"); }
void CudaBackend::rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool interleaved, bool inverse, const Tensor& out) { TS_FAIL("CUDA rope: not implemented"); }
void CudaBackend::swiglu_forward(const Tensor& gate, const Tensor& up, double limit, const Tensor& out) { TS_FAIL("CUDA swiglu_forward: not implemented"); }
void CudaBackend::swiglu_backward(const Tensor& gate, const Tensor& up, double limit, const Tensor& dout, const Tensor& dgate, const Tensor& dup) { TS_FAIL("CUDA swiglu_backward: not implemented"); }
void CudaBackend::softmax_forward(const Tensor& x, const Tensor& out) { TS_FAIL("CUDA softmax_forward: not implemented"); }
void CudaBackend::softmax_backward(const Tensor& y, const Tensor& dy, const Tensor& dx) { TS_FAIL("CUDA softmax_backward: not implemented"); }
void CudaBackend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale, const Tensor& out, const Tensor& lse) { TS_FAIL("CUDA attention_forward: not implemented"); }
void CudaBackend::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale, const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv) { TS_FAIL("CUDA attention_backward: not implemented"); }
void CudaBackend::cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale, const Tensor& dlogits) { TS_FAIL("CUDA cross_entropy: not implemented"); }
void CudaBackend::adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr, double beta1, double beta2, double eps, double weight_decay, double bias_correction1, double bias_correction2) { TS_FAIL("CUDA adamw_update: not implemented"); }

}  // namespace tessera
