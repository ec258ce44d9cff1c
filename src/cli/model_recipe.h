// `[model]` of a recipe to a ModelConfig: every field of the architecture `model.arch` names (dense,
// deepseek_v4, deepseek_v32), with type and range checks (errors name file, line and key), then
// ModelConfig::validate's cross-field checks. Keys of another architecture are left unread, so they are
// reported as unknown by Recipe::check_no_unknown_keys.
#pragma once
#include <cstdint>

#include "cli/recipe.h"
#include "model/config.h"

namespace tessera {

// tokenizer_vocab: the default of model.vocab_size, and its lower bound.
ModelConfig model_config_from_recipe(Recipe& r, int64_t tokenizer_vocab);

}  // namespace tessera
