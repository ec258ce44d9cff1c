#include "data/chat.h"

#include "core/error.h"

namespace tessera {

const char* kThinkMaxInstruction =
    "Reasoning effort: maximum. Before answering, reason with maximum intensity: explore every plausible "
    "approach, check each step, look for mistakes and counterexamples, and verify the final answer. Take as "
    "long as the problem needs.";

ReasoningMode parse_reasoning_mode(const std::string& name) {
  if (name == "non_thinking") return ReasoningMode::non_thinking;
  if (name == "think_high") return ReasoningMode::think_high;
  if (name == "think_max") return ReasoningMode::think_max;
  TS_FAIL("unknown reasoning mode '", name, "' (expected non_thinking, think_high or think_max)");
}

namespace {

// Appends ids with their mask; message text goes through plain encode so it can never inject control ids.
struct Builder {
  const Tokenizer& tok;
  EncodedChat out;

  void special(const char* token, bool trained) { push({tok.special_id(token)}, trained); }
  void text(const std::string& s, bool trained) {
    if (!s.empty()) push(tok.encode(s), trained);
  }
  // A DSML block: the marker is a special id; everything between markers is plain text (the encoder
  // rejects values containing the marker, so every marker here is markup).
  void dsml(const std::string& block, bool trained) {
    const std::string marker = kDsmlToken;
    size_t pos = 0;
    for (size_t m; (m = block.find(marker, pos)) != std::string::npos; pos = m + marker.size()) {
      text(block.substr(pos, m - pos), trained);
      special(kDsmlToken, trained);
    }
    text(block.substr(pos), trained);
  }
  void push(const std::vector<int32_t>& ids, bool trained) {
    out.ids.insert(out.ids.end(), ids.begin(), ids.end());
    out.loss_mask.insert(out.loss_mask.end(), ids.size(), trained ? 1 : 0);
  }
};

// Checks roles and turn order (see chat.h). A prompt ends with a user or tool message, a training
// conversation with an assistant turn.
void validate(const std::vector<ChatMessage>& msgs, bool for_prompt) {
  if (msgs.empty()) TS_FAIL("chat: no messages");
  auto at = [&](size_t i) { return cat("chat: message ", i, " (", msgs[i].role, "): "); };
  std::string prev;                           // the previous message's role
  size_t calls = 0, results = 0, caller = 0;  // tool calls of the last assistant turn, results seen so far
  auto check_results = [&](size_t i) {
    if (results != calls)
      TS_FAIL(at(i), "assistant message ", caller, " made ", calls, " tool call(s) but ", results,
              " tool result(s) follow");
  };
  for (size_t i = 0; i < msgs.size(); ++i) {
    const ChatMessage& m = msgs[i];
    const std::string& r = m.role;
    if (r != "system" && r != "user" && r != "assistant" && r != "tool")
      TS_FAIL(at(i), "unknown role '", r, "' (expected system, user, assistant or tool)");
    if (r != "assistant" && (!m.reasoning.empty() || !m.tool_calls.empty()))
      TS_FAIL(at(i), "only assistant messages carry reasoning or tool calls");
    if (r == "system" && i != 0) TS_FAIL(at(i), "a system message must come first");
    if (r != "system" && (prev.empty() || prev == "system") && r != "user")
      TS_FAIL(at(i), "the conversation must start with a user turn (after an optional system message)");
    if (r == "user") {
      if (prev == "user") TS_FAIL(at(i), "two user messages in a row: merge them into one");
      check_results(i);  // an assistant turn's tool calls need their results first
      calls = results = 0;
    } else if (r == "assistant") {
      if (prev == "assistant") TS_FAIL(at(i), "two assistant turns in a row");
      check_results(i);
      calls = m.tool_calls.size(), results = 0, caller = i;
    } else if (r == "tool") {
      if (calls == 0) TS_FAIL(at(i), "tool result without a preceding assistant tool call");
      if (results == calls)
        TS_FAIL(at(i), "more tool results than the ", calls, " tool call(s) of assistant message ", caller);
      ++results;
    }
    prev = r;
  }
  if (for_prompt) {
    if (prev != "user" && prev != "tool")
      TS_FAIL("chat: a prompt must end with a user or tool message, not ", prev);
    if (prev == "tool") check_results(msgs.size() - 1);
  } else if (prev != "assistant") {
    TS_FAIL(
        "chat: a training conversation must end with an assistant turn (use encode_prompt for generation)");
  }
}

EncodedChat encode_messages(const Tokenizer& tok, const std::vector<ChatMessage>& msgs, ReasoningMode mode) {
  const bool thinking = mode != ReasoningMode::non_thinking;
  Builder b{tok, {}};
  b.special(kBosToken, false);
  if (mode == ReasoningMode::think_max) b.text(std::string(kThinkMaxInstruction) + "\n\n", false);
  bool in_user_turn = false;  // tool results open a user turn that a following user message joins
  for (const ChatMessage& m : msgs) {
    if (m.role == "system") {
      b.text(m.content, false);
    } else if (m.role == "user" || m.role == "tool") {
      if (!in_user_turn) b.special(kUserToken, false);
      in_user_turn = true;
      if (m.role == "user") {
        b.text(m.content, false);
      } else {
        b.special(kToolResultToken, false);
        b.text(m.content, false);
        b.special(kEndToolResultToken, false);
      }
    } else {
      // The prompt side (<｜Assistant｜>, <think>) is given at generation, so it is not trained.
      b.special(kAssistantToken, false);
      if (thinking) {
        b.special(kThinkToken, false);
        b.text(m.reasoning, true);
      }
      b.special(kEndThinkToken, true);
      b.text(m.content, true);
      if (!m.tool_calls.empty()) {
        if (!m.content.empty()) b.text("\n\n", true);
        b.dsml(encode_tool_calls(m.tool_calls), true);
      }
      b.special(kEosToken, true);
      in_user_turn = false;
    }
  }
  return std::move(b.out);
}

}  // namespace

EncodedChat encode_chat(const Tokenizer& tok, const std::vector<ChatMessage>& messages, ReasoningMode mode) {
  validate(messages, false);
  return encode_messages(tok, messages, mode);
}

std::vector<int32_t> encode_prompt(const Tokenizer& tok, const std::vector<ChatMessage>& messages,
                                   ReasoningMode mode) {
  validate(messages, true);
  Builder b{tok, encode_messages(tok, messages, mode)};
  b.special(kAssistantToken, false);
  if (mode != ReasoningMode::non_thinking) b.special(kThinkToken, false);
  return std::move(b.out.ids);
}

}  // namespace tessera
