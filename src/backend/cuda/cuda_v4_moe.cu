// STUB: replaced by the CUDA kernels of this family.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {

void CudaV4Kernels::router_scores_forward(const Tensor& logits, int score_func, const Tensor& scores) { TS_FAIL("CUDA router_scores_forward: not implemented"); }
void CudaV4Kernels::router_scores_backward(const Tensor& logits, const Tensor& scores, const Tensor& dscores, int score_func, const Tensor& dlogits) { TS_FAIL("CUDA router_scores_backward: not implemented"); }
void CudaV4Kernels::topk_indices(const Tensor& scores, const Tensor& bias, const Tensor& idx) { TS_FAIL("CUDA topk_indices: not implemented"); }
void CudaV4Kernels::route_weights_forward(const Tensor& scores, const Tensor& idx, bool normalize, double route_scale, const Tensor& weights) { TS_FAIL("CUDA route_weights_forward: not implemented"); }
void CudaV4Kernels::route_weights_backward(const Tensor& scores, const Tensor& idx, const Tensor& dweights, bool normalize, double route_scale, const Tensor& dscores) { TS_FAIL("CUDA route_weights_backward: not implemented"); }
double CudaV4Kernels::balance_loss(const Tensor& scores, const Tensor& idx, double alpha, double grad_scale, const Tensor& dscores) { TS_FAIL("CUDA balance_loss: not implemented"); }
void CudaV4Kernels::gather_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst) { TS_FAIL("CUDA gather_rows: not implemented"); }
void CudaV4Kernels::scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst) { TS_FAIL("CUDA scatter_add_rows: not implemented"); }
void CudaV4Kernels::rows_dot(const Tensor& src, const Tensor& other, const Tensor& rows, const Tensor& out) { TS_FAIL("CUDA rows_dot: not implemented"); }
void CudaV4Kernels::compress_forward(const Tensor& kv, const Tensor& score, const Tensor& ape, const Tensor& block_start, const Tensor& prev_start, int64_t m, const Tensor& out) { TS_FAIL("CUDA compress_forward: not implemented"); }
void CudaV4Kernels::compress_backward(const Tensor& kv, const Tensor& score, const Tensor& ape, const Tensor& block_start, const Tensor& prev_start, int64_t m, const Tensor& dout, const Tensor& dkv, const Tensor& dscore, const Tensor& dape) { TS_FAIL("CUDA compress_backward: not implemented"); }

}  // namespace tessera
