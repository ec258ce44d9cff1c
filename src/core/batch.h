// A batch of token sequences, as the data loaders produce it and the models consume it.
#pragma once
#include "core/tensor.h"

namespace tessera {

struct TokenBatch {
  Tensor ids;      // (B, T) i32 input tokens
  Tensor targets;  // (B, T) i32 next tokens; negative = no loss at this position
  Tensor doc;      // (B, T) i32 document index per position, or undefined (one document per row)

  int64_t batch_size() const { return ids.size(0); }
  int64_t seq_len() const { return ids.size(1); }
  int64_t count_targets() const;  // positions that carry a loss
  // This batch with its tensors on `device` (shared, not copied, where they are already there).
  TokenBatch on(Device device) const;
};

}  // namespace tessera
