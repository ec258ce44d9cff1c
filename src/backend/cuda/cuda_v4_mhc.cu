// STUB: replaced by the CUDA kernels of this family.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace tessera {

void CudaV4Kernels::hc_gates_forward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters, double eps, const Tensor& pre, const Tensor& post, const Tensor& comb) { TS_FAIL("CUDA hc_gates_forward: not implemented"); }
void CudaV4Kernels::hc_gates_backward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters, double eps, const Tensor& dpre, const Tensor& dpost, const Tensor& dcomb, const Tensor& dmix, const Tensor& dscale, const Tensor& dbase) { TS_FAIL("CUDA hc_gates_backward: not implemented"); }
void CudaV4Kernels::hc_collapse_forward(const Tensor& x, const Tensor& w, const Tensor& y) { TS_FAIL("CUDA hc_collapse_forward: not implemented"); }
void CudaV4Kernels::hc_collapse_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw) { TS_FAIL("CUDA hc_collapse_backward: not implemented"); }
void CudaV4Kernels::hc_expand_forward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb, const Tensor& out) { TS_FAIL("CUDA hc_expand_forward: not implemented"); }
void CudaV4Kernels::hc_expand_backward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb, const Tensor& dout, const Tensor& dx, const Tensor& df, const Tensor& dpost, const Tensor& dcomb) { TS_FAIL("CUDA hc_expand_backward: not implemented"); }
void CudaV4Kernels::hadamard(const Tensor& x, const Tensor& out) { TS_FAIL("CUDA hadamard: not implemented"); }
void CudaV4Kernels::fake_quant_fp4(const Tensor& x, int64_t block, const Tensor& out) { TS_FAIL("CUDA fake_quant_fp4: not implemented"); }
void CudaV4Kernels::fake_quant_fp8(const Tensor& x, int64_t block, int64_t dims, const Tensor& out) { TS_FAIL("CUDA fake_quant_fp8: not implemented"); }

}  // namespace tessera
