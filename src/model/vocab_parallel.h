// Vocab-parallel embedding and cross-entropy (tensor parallelism, Megatron's VocabParallelEmbedding and
// vocab_parallel_cross_entropy): rank r of a tp group of P ranks holds vocabulary rows [v0, v0 + V/P) of the
// embedding table and of the output head, so no rank ever holds a whole (N, V) logits matrix. Host tensors,
// f32 or f64 (tensor parallelism runs on host tensors).
#pragma once
#include "core/tensor.h"

namespace tessera {

class Communicator;

// out (N, C) = the embedding rows of ids (N) i32, each taken from the rank that holds it (the others add zeros:
// exact). A collective over `tp`.
void vocab_parallel_embedding_forward(const Tensor& ids, const Tensor& table_part, int64_t v0, const Tensor& out,
                                      Communicator& tp);
// dtable_part += the rows of dout whose ids fall in [v0, v0 + table rows).
void vocab_parallel_embedding_backward(const Tensor& ids, const Tensor& dout, int64_t v0, const Tensor& dtable_part);

// losses (N) = logsumexp over the whole vocabulary - the target's logit (0 where target < 0), from this rank's
// columns logits_part (N, V/P) of the logits; if dlogits_part is defined (it may alias logits_part), it receives
// loss_scale * (softmax - onehot(target)) for this rank's columns. One max and one sum all-reduce over `tp`.
void vocab_parallel_cross_entropy(const Tensor& logits_part, const Tensor& targets, int64_t v0, Communicator& tp,
                                  const Tensor& losses, double loss_scale, const Tensor& dlogits_part);

}  // namespace tessera
