// DeepSeek-V4's chat format and reasoning-effort modes (spec/post-training.md §8), encoded to token ids with
// the loss mask SFT trains on.
//
//   BOS [think-max instruction "\n\n"] {system}
//   <｜User｜>{user}                                   (a user turn)
//   <｜User｜><tool_result>{r1}</tool_result>...{user} (tool results, in call order, open the next user turn;
//                                                      an optional user message follows them in that turn)
//   <｜Assistant｜></think>{answer}[\n\n{DSML block}]EOS                 (non_thinking)
//   <｜Assistant｜><think>{reasoning}</think>{answer}[\n\n{DSML block}]EOS (think_high, think_max)
//
// Rules (violations throw tessera::Error naming the message index): roles are system|user|assistant|tool; an
// optional system message comes first, then a user turn; user and assistant turns alternate (two user
// messages in a row are rejected: merge them, the format has no separator between them); tool messages
// follow an assistant turn with tool calls, one per call; the next user or assistant turn needs them all.
// Content is tokenized as plain text, so special-token strings inside messages never become control ids.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/dsml.h"
#include "data/tokenizer.h"

namespace tessera {

enum class ReasoningMode { non_thinking, think_high, think_max };

// "non_thinking", "think_high" or "think_max" (recipe spelling); throws tessera::Error otherwise.
ReasoningMode parse_reasoning_mode(const std::string& name);

// Think Max prepends this before the system prompt. V4's exact wording is not published in our spec; this is
// our fixed text, and changing it changes every Think Max data set and checkpoint trained on it.
extern const char* kThinkMaxInstruction;

struct ChatMessage {
  std::string role;  // system | user | assistant | tool
  std::string content;
  std::string reasoning;             // assistant only; ignored in non_thinking mode
  std::vector<ToolCall> tool_calls;  // assistant only
};

struct EncodedChat {
  std::vector<int32_t> ids;
  // 1 on what the model produces after encode_prompt: reasoning, </think>, answer, tool-call block and the
  // closing EOS of every assistant turn. 0 on BOS, instruction, system, user turns, tool results, and the
  // prompt-side <｜Assistant｜> (and <think> in thinking modes).
  std::vector<uint8_t> loss_mask;
};

// A whole conversation for training; it must end with an assistant turn.
EncodedChat encode_chat(const Tokenizer& tok, const std::vector<ChatMessage>& messages, ReasoningMode mode);

// A generation prompt: the conversation so far (ending with a user or tool message) followed by
// <｜Assistant｜>, and <think> in thinking modes. It is a prefix of encode_chat with the reply appended.
std::vector<int32_t> encode_prompt(const Tokenizer& tok, const std::vector<ChatMessage>& messages,
                                   ReasoningMode mode);

}  // namespace tessera
