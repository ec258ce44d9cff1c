// The GRPO stage: `tessera train RECIPE` with stage = "grpo" (docs/post-training.md).
#pragma once
#include "cli/pretrain.h"

namespace tessera {

class Communicator;
int run_grpo(const TrainOptions& opts, Communicator* world = nullptr);

}  // namespace tessera
