// The DeepSeek-V4 ops (../shared/spec/deepseek-v4.md): forward/backward pairs, shape-checked here and run by the
// tensors' backend (Backend::v4(), kernel list in src/backend/v4_kernels.inc). Conventions as in ops.h:
// activation gradients are assigned, parameter gradients accumulate (+=). Float tensors are f32 or f64 (all of
// one call alike); index tensors are i32. N = tokens, E = experts, k = top-k.
#pragma once
#include "core/tensor.h"

namespace tessera::ops {

// ---------------------------------------------------------------- MoE routing and token movement (spec §7)
enum class ScoreFunc { sqrt_softplus = 0, sigmoid = 1, softmax = 2 };
ScoreFunc score_func_from_name(const std::string& name);  // "sqrtsoftplus", "sigmoid", "softmax"

// scores (N,E) = sqrt(softplus(logits)), sigmoid(logits) or the row softmax of logits, computed in fp64 inside.
void router_scores_forward(const Tensor& logits, ScoreFunc f, const Tensor& scores);
// dlogits (N,E) assigned from dscores.
void router_scores_backward(const Tensor& logits, const Tensor& scores, const Tensor& dscores, ScoreFunc f,
                            const Tensor& dlogits);
// idx (N,k) i32: per row, the k largest of scores + bias (bias (E) or undefined), in descending order, ties to the
// lower index. Entries equal to -inf are never chosen; slots left over are -1. No gradient.
void topk_indices(const Tensor& scores, const Tensor& bias, const Tensor& idx);
// weights (N,k) = route_scale * scores[idx] / (normalize ? sum over the row's valid slots of scores[idx] : 1);
// a slot with idx -1 gets weight 0. Backward: dscores (N,E) += the gradient (only at selected entries).
void route_weights_forward(const Tensor& scores, const Tensor& idx, bool normalize, double route_scale,
                           const Tensor& weights);
void route_weights_backward(const Tensor& scores, const Tensor& idx, const Tensor& dweights, bool normalize,
                            double route_scale, const Tensor& dscores);
// Sequence-wise balance loss (V3 form, spec §7) over B sequences: scores (B,T,E), idx (B,T,k). For each
// sequence f_i = E/(k T) * #{t : i in idx_t}, P_i = (1/T) sum_t scores_{t,i} / sum_j scores_{t,j};
// returns alpha * (1/B) sum_b sum_i f_i P_i. If dscores is defined: dscores += grad_scale * d(loss)/d(scores)
// (f is a count: no gradient through it).
double balance_loss(const Tensor& scores, const Tensor& idx, double alpha, double grad_scale, const Tensor& dscores);
// dst (M,C) = scale[i] * src[rows[i]] (scale (M) or undefined = 1).
void gather_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst);
// dst[rows[i]] += scale[i] * src[i] for i = 0..M-1 in that order (deterministic); src (M,C), dst (N,C).
void scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst);
// out (M) = src[i] . other[rows[i]]: the gradient of scatter_add_rows' scale.
void rows_dot(const Tensor& src, const Tensor& other, const Tensor& rows, const Tensor& out);

// ---------------------------------------------------------------- Compressor (spec §5 CSA, §6 HCA)
// kv, score (B,T,S*c): S = 2 is the overlapping CSA compressor (channels [0,c) are series b, used by the next
// block; [c,2c) series a, the block's own), S = 1 the HCA one. ape (m, S*c) the learned positional biases.
// block_start (B,NB) i32: the first token of each compressed block, whose tokens are block_start..+m-1
// (-1 = padding: that output row is zero); prev_start (B,NB) i32: the first token of the previous block of the
// same document (-1 = none, and always -1 when S = 1).
// out (B,NB,c): per channel ch, a softmax over the rows {score[t, c+ch] + ape[t - start, c+ch] : t in block}
// together with (S = 2 and a previous block) {score[t, ch] + ape[t - prev, ch] : t in previous block}, weighting
// the matching kv values (kv[t, c+ch] resp. kv[t, ch]). For S = 1 the channels are [0,c) for both.
void compress_forward(const Tensor& kv, const Tensor& score, const Tensor& ape, const Tensor& block_start,
                      const Tensor& prev_start, int64_t m, const Tensor& out);
// dkv, dscore assigned (zero for tokens in no block); dape +=.
void compress_backward(const Tensor& kv, const Tensor& score, const Tensor& ape, const Tensor& block_start,
                       const Tensor& prev_start, int64_t m, const Tensor& dout, const Tensor& dkv,
                       const Tensor& dscore, const Tensor& dape);

// ---------------------------------------------------------------- mHC (spec §3)
// mix (N,M) with M = 2n + n*n for a block's hyper-connection, or M = n for the head. scale (3) resp. (1),
// base (M). pre (N,n) = sigmoid(scale[0] * mix[:, j] + base[j]) + eps;
// post (N,n) = 2 sigmoid(scale[1] * mix[:, n+j] + base[n+j]);
// comb (N,n,n) = Sinkhorn of R[j][k] = scale[2] * mix[:, 2n + n j + k] + base[2n + n j + k] exactly as spec §3.3:
// C = softmax over k of R, + eps; C /= (column sums + eps); then iters - 1 rounds of {C /= (row sums + eps);
// C /= (column sums + eps)}. For the head (M = n) post and comb are undefined.
void hc_gates_forward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters, double eps,
                      const Tensor& pre, const Tensor& post, const Tensor& comb);
// dmix assigned; dscale, dbase +=. Backward through every Sinkhorn round (recomputed from mix).
void hc_gates_backward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters, double eps,
                       const Tensor& dpre, const Tensor& dpost, const Tensor& dcomb, const Tensor& dmix,
                       const Tensor& dscale, const Tensor& dbase);
// y (N,d) = sum_j w[:, j] x[:, j, :]; x (N,n,d), w (N,n). Backward assigns dx and dw.
void hc_collapse_forward(const Tensor& x, const Tensor& w, const Tensor& y);
void hc_collapse_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw);
// out (N,n,d): out[:, k] = post[:, k] f + sum_j comb[:, j, k] x[:, j]. Backward assigns dx, df, dpost, dcomb.
void hc_expand_forward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb, const Tensor& out);
void hc_expand_backward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb,
                        const Tensor& dout, const Tensor& dx, const Tensor& df, const Tensor& dpost,
                        const Tensor& dcomb);

// ---------------------------------------------------------------- Transforms and quantisation simulation (§5, §9)
// Orthonormal Walsh-Hadamard transform of the last dim D (a power of two): out = x H_D / sqrt(D). It is its own
// inverse and symmetric, so the backward is the same call on dout. out may alias x.
void hadamard(const Tensor& x, const Tensor& out);
// Simulated FP4 e2m1 (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; round to nearest, ties to even) with one
// power-of-two scale per `block` consecutive elements of the last dim: scale = 2^ceil(log2(amax / 6)) (1 for an
// all-zero block). out may alias x. The straight-through backward is the identity (the caller copies).
void fake_quant_fp4(const Tensor& x, int64_t block, const Tensor& out);
// Simulated FP8 e4m3 (max 448, subnormals, round to nearest even) with power-of-two block scales
// 2^ceil(log2(amax / 448)) over blocks of `block` along the last dim, applied to its first `dims` entries only
// (the rest copied). out may alias x.
void fake_quant_fp8(const Tensor& x, int64_t block, int64_t dims, const Tensor& out);

// ---------------------------------------------------------------- Sparse attention and the indexer (§4, §5)
// q (B,T,H,D); kv (B,T,D): the window keys, which are also the values (one shared head); ckv (B,NB,D) the
// compressed entries (keys = values); cidx (B,T,K) i32: the entries of ckv query t attends (-1 = unused slot),
// or undefined (window only; then ckv may be undefined too). sink (H): learned per-head logits that join the
// softmax's denominator only. doc (B,T) i32 or undefined: the window of query t is the tokens
// max(t - window + 1, start of t's document) .. t. One softmax over window scores, compressed scores and the
// sink: out (B,T,H,D) = sum p v; lse (B,T,H) = log(sum exp(scale q.k) + exp(sink_h)).
void sparse_attention_forward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                              const Tensor& sink, const Tensor& doc, int64_t window, double scale, const Tensor& out,
                              const Tensor& lse);
// dq, dkv, dckv assigned (dckv may be undefined when cidx is); dsink +=.
void sparse_attention_backward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                               const Tensor& sink, const Tensor& doc, int64_t window, double scale,
                               const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq,
                               const Tensor& dkv, const Tensor& dckv, const Tensor& dsink);
// cprob (B,T,K) = sum over heads of the attention probability of each selected compressed entry (0 for -1
// slots): the indexer loss's target, from the saved lse.
void sparse_attention_cprob(const Tensor& q, const Tensor& ckv, const Tensor& cidx, const Tensor& lse, double scale,
                            const Tensor& cprob);
// qi (B,T,HI,DI), ki (B,NB,DI), w (B,T,HI); vis_begin, vis_end (B,T) i32: query t may see the entries
// [vis_begin, vis_end). scores (B,T,NB) = sum_h w_h relu(qi_h . ki_s) inside that range, -inf outside.
void indexer_scores_forward(const Tensor& qi, const Tensor& ki, const Tensor& w, const Tensor& vis_begin,
                            const Tensor& vis_end, const Tensor& scores);
// dqi, dki, dw assigned (the relu passes no gradient where q.k <= 0; -inf entries pass none).
void indexer_scores_backward(const Tensor& qi, const Tensor& ki, const Tensor& w, const Tensor& vis_begin,
                             const Tensor& vis_end, const Tensor& dscores, const Tensor& dqi, const Tensor& dki,
                             const Tensor& dw);
// scores, target (R,S): per row with a non-zero target, KL(target || softmax(scores)) over the finite scores,
// where target is L1-normalised inside (target must be 0 where scores are -inf); returns the sum over rows.
// If dscores is defined it is assigned grad_scale * d(sum)/d(scores) (0 at -inf entries).
double indexer_kl(const Tensor& scores, const Tensor& target, double grad_scale, const Tensor& dscores);

}  // namespace tessera::ops
