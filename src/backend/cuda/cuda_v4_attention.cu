// STUB: replaced by the CUDA kernels of this family.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {

void CudaV4Kernels::sparse_attention_forward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx, const Tensor& sink, const Tensor& doc, int64_t window, double scale, const Tensor& out, const Tensor& lse) { TS_FAIL("CUDA sparse_attention_forward: not implemented"); }
void CudaV4Kernels::sparse_attention_backward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx, const Tensor& sink, const Tensor& doc, int64_t window, double scale, const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq, const Tensor& dkv, const Tensor& dckv, const Tensor& dsink) { TS_FAIL("CUDA sparse_attention_backward: not implemented"); }
void CudaV4Kernels::sparse_attention_cprob(const Tensor& q, const Tensor& ckv, const Tensor& cidx, const Tensor& lse, double scale, const Tensor& cprob) { TS_FAIL("CUDA sparse_attention_cprob: not implemented"); }
void CudaV4Kernels::indexer_scores_forward(const Tensor& qi, const Tensor& ki, const Tensor& w, const Tensor& vis_begin, const Tensor& vis_end, const Tensor& scores) { TS_FAIL("CUDA indexer_scores_forward: not implemented"); }
void CudaV4Kernels::indexer_scores_backward(const Tensor& qi, const Tensor& ki, const Tensor& w, const Tensor& vis_begin, const Tensor& vis_end, const Tensor& dscores, const Tensor& dqi, const Tensor& dki, const Tensor& dw) { TS_FAIL("CUDA indexer_scores_backward: not implemented"); }
double CudaV4Kernels::indexer_kl(const Tensor& scores, const Tensor& target, double grad_scale, const Tensor& dscores) { TS_FAIL("CUDA indexer_kl: not implemented"); }

}  // namespace tessera
