#include "cli/grpo_stage.h"

#include "core/error.h"

namespace tessera {

int run_grpo(const TrainOptions&, Communicator*) { TS_FAIL("stage = \"grpo\": not built yet"); }

}  // namespace tessera
