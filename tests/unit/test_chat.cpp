// V4 chat format and DSML tool calls: exact rendered text and loss masks for a multi-turn tool-using
// conversation in each reasoning mode, DSML round trips, a table of malformed blocks the parser must reject
// with a specific reason, and the conversation validation rules.
#include <gtest/gtest.h>

#include <functional>

#include "test_util.h"
#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/chat.h"
#include "data/dsml.h"

using namespace tessera;
using tessera::testing::error_of;

namespace {


// Hand-written specials (not the library's constants) so a changed constant shows up here.
const std::string BOS = "<｜begin▁of▁sentence｜>", EOS = "<｜end▁of▁sentence｜>";
const std::string USER = "<｜User｜>", ASSISTANT = "<｜Assistant｜>";

const std::string kBlock = R"x(<｜DSML｜tool_calls>
<｜DSML｜invoke name="add">
<｜DSML｜parameter name="a" string="false">5</｜DSML｜parameter>
<｜DSML｜parameter name="b" string="false">3</｜DSML｜parameter>
</｜DSML｜invoke>
<｜DSML｜invoke name="note">
<｜DSML｜parameter name="text" string="true">sum is "8"</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls>)x";

std::vector<ToolCall> block_calls() {
  return {{"add", {{"a", false, "5"}, {"b", false, "3"}}}, {"note", {{"text", true, "sum is \"8\""}}}};
}

// System, user, assistant with two tool calls, two tool results plus a user follow-up, final assistant.
std::vector<ChatMessage> conversation() {
  return {{"system", "You are a calculator.", "", {}},
          {"user", "What is 5+3?", "", {}},
          {"assistant", "Let me compute.", "Use the add tool.", block_calls()},
          {"tool", "8", "", {}},
          {"tool", "saved", "", {}},
          {"user", "Thanks.", "", {}},
          {"assistant", "5+3 = 8.", "The tool said 8.", {}}};
}

std::string masked_text(const Tokenizer& tok, const EncodedChat& enc) {
  std::vector<int32_t> kept;
  for (size_t i = 0; i < enc.ids.size(); ++i)
    if (enc.loss_mask[i]) kept.push_back(enc.ids[i]);
  return tok.decode(kept);
}

const std::string kToolTurn = USER + "<tool_result>8</tool_result><tool_result>saved</tool_result>Thanks.";

}  // namespace

// ---- chat format ------------------------------------------------------------------------------------

TEST(Chat, NonThinkingConversation) {
  ByteTokenizer tok;
  EncodedChat enc = encode_chat(tok, conversation(), ReasoningMode::non_thinking);
  ASSERT_EQ(enc.ids.size(), enc.loss_mask.size());
  EXPECT_EQ(tok.decode(enc.ids), BOS + "You are a calculator." + USER + "What is 5+3?" + ASSISTANT +
                                     "</think>Let me compute.\n\n" + kBlock + EOS + kToolTurn + ASSISTANT +
                                     "</think>5+3 = 8." + EOS);
  EXPECT_EQ(masked_text(tok, enc), "</think>Let me compute.\n\n" + kBlock + EOS + "</think>5+3 = 8." + EOS);
}

TEST(Chat, ThinkHighConversation) {
  ByteTokenizer tok;
  EncodedChat enc = encode_chat(tok, conversation(), ReasoningMode::think_high);
  EXPECT_EQ(tok.decode(enc.ids), BOS + "You are a calculator." + USER + "What is 5+3?" + ASSISTANT +
                                     "<think>Use the add tool.</think>Let me compute.\n\n" + kBlock + EOS +
                                     kToolTurn + ASSISTANT + "<think>The tool said 8.</think>5+3 = 8." + EOS);
  EXPECT_EQ(masked_text(tok, enc), "Use the add tool.</think>Let me compute.\n\n" + kBlock + EOS +
                                       "The tool said 8.</think>5+3 = 8." + EOS);
}

TEST(Chat, ThinkMaxConversation) {
  ByteTokenizer tok;
  EncodedChat enc = encode_chat(tok, conversation(), ReasoningMode::think_max);
  // The fixed instruction is pinned here: changing it changes every Think Max data set.
  const std::string instruction =
      "Reasoning effort: maximum. Before answering, reason with maximum intensity: explore every plausible "
      "approach, check each step, look for mistakes and counterexamples, and verify the final answer. Take "
      "as "
      "long as the problem needs.";
  EXPECT_EQ(instruction, kThinkMaxInstruction);
  EXPECT_EQ(tok.decode(enc.ids), BOS + instruction + "\n\nYou are a calculator." + USER + "What is 5+3?" +
                                     ASSISTANT + "<think>Use the add tool.</think>Let me compute.\n\n" +
                                     kBlock + EOS + kToolTurn + ASSISTANT +
                                     "<think>The tool said 8.</think>5+3 = 8." + EOS);
  EXPECT_EQ(masked_text(tok, enc), "Use the add tool.</think>Let me compute.\n\n" + kBlock + EOS +
                                       "The tool said 8.</think>5+3 = 8." + EOS);
}

TEST(Chat, SpecialsAreSingleIdsAndContentCannotInjectThem) {
  ByteTokenizer tok;
  std::vector<ChatMessage> msgs = {{"user", "<｜User｜></think>", "", {}}, {"assistant", "<think>", "", {}}};
  EncodedChat enc = encode_chat(tok, msgs, ReasoningMode::non_thinking);
  // BOS, User, Assistant, </think>, EOS are the only special ids; the message text stays bytes.
  std::vector<int32_t> specials;
  for (int32_t id : enc.ids)
    if (id >= 256) specials.push_back(id);
  EXPECT_EQ(specials,
            (std::vector<int32_t>{tok.special_id(BOS), tok.special_id(USER), tok.special_id(ASSISTANT),
                                  tok.special_id("</think>"), tok.special_id(EOS)}));
  // In a tool-call block the DSML marker is one id per tag; a <think> inside a value stays bytes.
  EncodedChat with_calls =
      encode_chat(tok, {{"user", "go", "", {}}, {"assistant", "", "", {{"f", {{"x", true, "<think>"}}}}}},
                  ReasoningMode::non_thinking);
  int dsml = 0, think = 0;
  for (int32_t id : with_calls.ids)
    dsml += id == tok.special_id("｜DSML｜"), think += id == tok.special_id("<think>");
  EXPECT_EQ(dsml, 6);  // tool_calls, invoke, parameter: open and close each
  EXPECT_EQ(think, 0);
  EXPECT_EQ(masked_text(tok, with_calls), R"x(</think><｜DSML｜tool_calls>
<｜DSML｜invoke name="f">
<｜DSML｜parameter name="x" string="true"><think></｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls><｜end▁of▁sentence｜>)x");  // no answer: no blank line before the block
}

TEST(Chat, PromptIsPrefixOfTrainedConversation) {
  ByteTokenizer tok;
  const std::vector<ChatMessage> conv = conversation();
  for (ReasoningMode mode :
       {ReasoningMode::non_thinking, ReasoningMode::think_high, ReasoningMode::think_max}) {
    for (size_t k : {size_t(2), size_t(6)}) {  // the two assistant turns
      std::vector<ChatMessage> history(conv.begin(), conv.begin() + k);
      std::vector<ChatMessage> with_reply(conv.begin(), conv.begin() + k + 1);
      std::vector<int32_t> prompt = encode_prompt(tok, history, mode);
      EncodedChat full = encode_chat(tok, with_reply, mode);
      ASSERT_LT(prompt.size(), full.ids.size());
      EXPECT_TRUE(std::equal(prompt.begin(), prompt.end(), full.ids.begin()));
      // Everything generated after the prompt is trained, and the prompt's tail is not.
      for (size_t i = prompt.size(); i < full.ids.size(); ++i) EXPECT_EQ(full.loss_mask[i], 1) << i;
      EXPECT_EQ(full.loss_mask[prompt.size() - 1], 0);
      std::string tail = tok.decode(
          std::vector<int32_t>(prompt.end() - (mode == ReasoningMode::non_thinking ? 1 : 2), prompt.end()));
      EXPECT_EQ(tail, mode == ReasoningMode::non_thinking ? ASSISTANT : ASSISTANT + "<think>");
    }
  }
  std::vector<int32_t> p = encode_prompt(tok, {{"user", "hi", "", {}}}, ReasoningMode::non_thinking);
  EXPECT_EQ(tok.decode(p), BOS + USER + "hi" + ASSISTANT);
  p = encode_prompt(tok, std::vector<ChatMessage>(conv.begin(), conv.begin() + 5),
                    ReasoningMode::think_high);  // ends with tool results
  EXPECT_TRUE(tok.decode(p).ends_with("<tool_result>saved</tool_result>" + ASSISTANT + "<think>"));
}

TEST(Chat, EndingWithUnansweredToolCallIsTrainable) {
  ByteTokenizer tok;
  std::vector<ChatMessage> conv = conversation();
  conv.resize(3);
  EncodedChat enc = encode_chat(tok, conv, ReasoningMode::non_thinking);
  EXPECT_TRUE(tok.decode(enc.ids).ends_with(kBlock + EOS));
}

TEST(Chat, ValidationErrors) {
  ByteTokenizer tok;
  using M = std::vector<ChatMessage>;
  const ChatMessage sys{"system", "s", "", {}}, user{"user", "u", "", {}}, plain{"assistant", "a", "", {}};
  const ChatMessage caller{"assistant", "", "", block_calls()}, tool{"tool", "r", "", {}};
  auto chat = [&](const M& m) { return error_of([&] { encode_chat(tok, m, ReasoningMode::think_high); }); };
  auto prompt = [&](const M& m) {
    return error_of([&] { encode_prompt(tok, m, ReasoningMode::think_high); });
  };
  EXPECT_NE(chat({}).find("no messages"), std::string::npos);
  EXPECT_NE(chat({user, {"bot", "x", "", {}}}).find("message 1 (bot): unknown role 'bot'"),
            std::string::npos);
  EXPECT_NE(chat({plain}).find("must start with a user turn"), std::string::npos);
  EXPECT_NE(chat({sys, plain}).find("must start with a user turn"), std::string::npos);
  EXPECT_NE(chat({tool, plain}).find("must start with a user turn"), std::string::npos);
  EXPECT_NE(chat({user, sys, plain}).find("a system message must come first"), std::string::npos);
  EXPECT_NE(chat({user, user, plain}).find("two user messages in a row"), std::string::npos);
  EXPECT_NE(chat({user, plain, plain}).find("two assistant turns in a row"), std::string::npos);
  EXPECT_NE(chat({user, plain, tool, plain}).find("tool result without a preceding assistant tool call"),
            std::string::npos);
  EXPECT_NE(chat({user, caller, tool, tool, tool, plain}).find("more tool results than the 2 tool call(s)"),
            std::string::npos);
  EXPECT_NE(chat({user, caller, tool, plain})
                .find("message 3 (assistant): assistant message 1 made 2 tool call(s) "
                      "but 1 tool result(s) follow"),
            std::string::npos);
  EXPECT_NE(chat({user, caller, user, plain}).find("made 2 tool call(s) but 0 tool result(s)"),
            std::string::npos);
  EXPECT_NE(chat({{"user", "u", "r", {}}, plain}).find("only assistant messages carry"), std::string::npos);
  EXPECT_NE(chat({user, plain, user}).find("must end with an assistant turn"), std::string::npos);
  EXPECT_NE(prompt({user, plain}).find("a prompt must end with a user or tool message"), std::string::npos);
  EXPECT_NE(prompt({user, caller, tool}).find("made 2 tool call(s) but 1 tool result(s)"), std::string::npos);
  EXPECT_NE(chat({user, {"assistant", "", "", {{"f", {{"x", false, "{bad"}}}}}}).find("does not parse"),
            std::string::npos);
  EXPECT_EQ(chat({sys, user, caller, tool, tool, user, plain}), "");  // the valid shape
  EXPECT_EQ(parse_reasoning_mode("think_max"), ReasoningMode::think_max);
  EXPECT_NE(error_of([] { parse_reasoning_mode("max"); }).find("unknown reasoning mode 'max'"),
            std::string::npos);
}

// ---- DSML -------------------------------------------------------------------------------------------

TEST(Dsml, EncodesTheSpecBlockExactly) {
  EXPECT_EQ(encode_tool_calls(block_calls()), kBlock);
  EXPECT_EQ(encode_tool_calls({{"add", {{"a", false, "5"}, {"note", true, "raw text"}}}}),
            R"x(<｜DSML｜tool_calls>
<｜DSML｜invoke name="add">
<｜DSML｜parameter name="a" string="false">5</｜DSML｜parameter>
<｜DSML｜parameter name="note" string="true">raw text</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls>)x");
}

TEST(Dsml, RoundTripsMixedParameters) {
  std::vector<ToolCall> calls = {
      {"search",
       {{"query", true, "héllo \"wörld\" ✓ 日本語"},
        {"filters", false, R"({"lang": ["en", "fr"], "nested": {"x": null, "y": [1, 2.5e-3]}})"},
        {"limit", false, "10"}}},
      {"write_file",
       {{"path", true, "/tmp/a b.txt"},
        {"body", true, "line 1\nline \"2\" <b>bold</b> </think>\n\n  indented"},
        {"tags", false, "[\"a\", 1, true, null, {\"k\": \"v\\\"q\"}]"},
        {"empty", true, ""}}},
      {"now", {}},
      {"add", {{"a", false, "-1.5e3"}, {"b", false, " \"json string with \\\"quotes\\\" and \\u00e9\" "}}},
      {"add", {{"a", false, "false"}}},  // the same tool twice is fine
  };
  std::string block = encode_tool_calls(calls);
  EXPECT_EQ(parse_tool_calls(block), calls);
  // Whitespace between tags and around the block is allowed.
  std::string spaced = "\n  " + block + "\n\n";
  EXPECT_EQ(parse_tool_calls(spaced), calls);
}

TEST(Dsml, EncoderRejectsBadCalls) {
  auto err = [](const std::vector<ToolCall>& c) { return error_of([&] { encode_tool_calls(c); }); };
  EXPECT_NE(err({}).find("no tool calls"), std::string::npos);
  EXPECT_NE(err({{"", {}}}).find("empty tool name"), std::string::npos);
  EXPECT_NE(err({{"a\"b", {}}}).find("contains a quote"), std::string::npos);
  EXPECT_NE(err({{"f", {{"", true, "x"}}}}).find("empty parameter name"), std::string::npos);
  EXPECT_NE(err({{"f", {{"x", false, "{'a': 1}"}}}}).find("is marked JSON but does not parse"),
            std::string::npos);
  EXPECT_NE(err({{"f", {{"x", true, "1"}, {"x", true, "2"}}}}).find("duplicate parameter 'x'"),
            std::string::npos);
  EXPECT_NE(err({{"f", {{"x", true, "a</｜DSML｜parameter>"}}}}).find("contains the DSML marker"),
            std::string::npos);
}

TEST(Dsml, ParserRejectsMalformedBlocks) {
  const std::string O = "<｜DSML｜", C = "</｜DSML｜";
  const std::string TC = O + "tool_calls>\n", ETC = C + "tool_calls>", INV = O + "invoke name=\"f\">\n",
                    EINV = C + "invoke>\n";
  auto param = [&](const std::string& attrs, const std::string& v) {
    return O + "parameter " + attrs + ">" + v + C + "parameter>\n";
  };
  struct Case {
    std::string input, reason;
  };
  const std::vector<Case> cases = {
      {"", "empty input: no tool_calls block"},
      {"  \n", "empty input: no tool_calls block"},
      {INV + EINV, "missing <｜DSML｜tool_calls> (found <｜DSML｜invoke name=\"f\">)"},
      {TC + INV + EINV, "missing </｜DSML｜tool_calls>"},
      {TC + INV + ETC, "missing </｜DSML｜invoke> before </｜DSML｜tool_calls>"},
      {TC + INV, "missing </｜DSML｜invoke> for invoke 'f'"},
      {TC + EINV + ETC, "unbalanced </｜DSML｜invoke>"},
      {TC + INV + C + "parameter>" + EINV + ETC, "unbalanced </｜DSML｜parameter>"},
      {O + "function_calls>\n" + ETC, "unknown tag <｜DSML｜function_calls>"},
      {TC + O + "invoke>\n" + EINV + ETC, "invoke without name"},
      {TC + O + "invoke name=\"\">\n" + EINV + ETC, "invoke with an empty name"},
      {TC + INV + param("string=\"true\"", "x") + EINV + ETC, "parameter without name"},
      {TC + INV + param("name=\"a\" string=\"true\"", "1") + param("name=\"a\" string=\"false\"", "2") +
           EINV + ETC,
       "duplicate parameter 'a' in invoke 'f'"},
      {TC + INV + param("name=\"a\" string=\"yes\"", "1") + EINV + ETC,
       "parameter 'a': string attribute must be \"true\" or \"false\", got \"yes\""},
      {TC + INV + param("name=\"a\"", "1") + EINV + ETC, "parameter 'a' without a string attribute"},
      {TC + INV + param("name=\"a\" string=\"false\"", "{a: 1}") + EINV + ETC,
       "parameter 'a' has string=\"false\" but its value is not valid JSON"},
      {TC + INV + param("name=\"a\" string=\"false\"", "raw text") + EINV + ETC,
       "parameter 'a' has string=\"false\" but its value is not valid JSON"},
      {TC + INV + param("name=\"a\" string=\"false\"", "") + EINV + ETC,
       "parameter 'a' has string=\"false\" but its value is not valid JSON"},
      {TC + "hello\n" + INV + EINV + ETC, "text outside tags"},
      {TC + INV + "stray" + EINV + ETC, "text outside tags"},
      {"Sure!\n" + TC + INV + EINV + ETC, "text outside tags"},
      {TC + ETC, "empty tool_calls block"},
      {TC + TC + INV + EINV + ETC + "\n" + ETC, "nested <｜DSML｜tool_calls>"},
      {TC + INV + TC + EINV + ETC, "nested <｜DSML｜tool_calls>"},
      {TC + INV + O + "parameter name=\"a\" string=\"true\">5\n" + EINV + ETC,
       "unterminated parameter 'a': another DSML tag comes before </｜DSML｜parameter>"},
      {TC + INV + O + "parameter name=\"a\" string=\"true\">5",
       "unterminated parameter 'a': no </｜DSML｜parameter>"},
      {TC + INV + EINV + ETC + "\n" + TC + INV + EINV + ETC, "content after </｜DSML｜tool_calls>"},
      {TC + INV + EINV + ETC + " done", "text outside tags"},
      {TC + O + "invoke name=\"f\" type=\"x\">\n" + EINV + ETC,
       "unexpected attribute 'type' on <｜DSML｜invoke>"},
      {TC + param("name=\"a\" string=\"true\"", "1") + ETC, "expected <｜DSML｜invoke>"},
      {TC + INV + INV + EINV + EINV + ETC, "expected a parameter or </｜DSML｜invoke> in invoke 'f'"},
      {TC + O + "invoke name=\"f", "unterminated attribute value"},
      {TC + O + "invoke name=\"f\"", "unterminated tag"},
      {TC + O + "invoke name=f>" + EINV + ETC, "malformed attribute"},
      {TC + INV + C + "invoke name=\"f\">\n" + ETC, "closing tag </｜DSML｜invoke> takes no attributes"},
      {TC + O + ">" + ETC, "tag without a name"},
      {TC + O + "invoke name=\"f\" name=\"g\">\n" + EINV + ETC, "duplicate attribute 'name'"},
  };
  for (const Case& c : cases) {
    std::string msg = error_of([&] { parse_tool_calls(c.input); });
    EXPECT_NE(msg.find("DSML: " + c.reason), std::string::npos) << "input:\n"
                                                                << c.input << "\nmessage: " << msg;
    EXPECT_NE(msg.find("(at byte "), std::string::npos) << msg;
  }
  // The location is exact: the stray text starts right after the first line.
  std::string msg = error_of([&] { parse_tool_calls(TC + "hello"); });
  EXPECT_NE(msg.find("text outside tags (at byte " + std::to_string(TC.size()) + ", line 2)"),
            std::string::npos)
      << msg;
}

TEST(Dsml, SplitsAnswerAndToolCalls) {
  AssistantReply r = split_answer_and_tool_calls("Just text, no tools.\n\n");
  EXPECT_EQ(r.answer, "Just text, no tools.\n\n");
  EXPECT_TRUE(r.tool_calls.empty());

  r = split_answer_and_tool_calls("Let me compute.\n\n" + kBlock);
  EXPECT_EQ(r.answer, "Let me compute.");
  EXPECT_EQ(r.tool_calls, block_calls());

  r = split_answer_and_tool_calls(kBlock + "\n");  // block only, trailing whitespace
  EXPECT_EQ(r.answer, "");
  EXPECT_EQ(r.tool_calls, block_calls());

  r = split_answer_and_tool_calls("Two paragraphs.\n\nSecond.\n\n" + kBlock);
  EXPECT_EQ(r.answer, "Two paragraphs.\n\nSecond.");

  EXPECT_NE(error_of([] {
              split_answer_and_tool_calls("Answer\n" + kBlock);
            }).find("must follow the answer after a blank line"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              split_answer_and_tool_calls("Answer\n\n" + kBlock + "\nmore text");
            }).find("text outside tags"),
            std::string::npos);
  // Offsets count from the start of the assistant text.
  const std::string head = "Hi\n\n<｜DSML｜tool_calls>\n";
  EXPECT_NE(error_of([&] {
              split_answer_and_tool_calls(head + "oops");
            }).find("text outside tags (at byte " + std::to_string(head.size()) + ", line 4)"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              split_answer_and_tool_calls("Hi\n\n</｜DSML｜tool_calls>");
            }).find("missing <｜DSML｜tool_calls>"),
            std::string::npos);
  // An encoded reply splits back into what produced it.
  std::vector<ChatMessage> conv = conversation();
  r = split_answer_and_tool_calls(conv[2].content + "\n\n" + encode_tool_calls(conv[2].tool_calls));
  EXPECT_EQ(r.answer, conv[2].content);
  EXPECT_EQ(r.tool_calls, conv[2].tool_calls);
}

TEST(Dsml, DamagedBlocksFailCleanly) {
  // Every truncation and every single-byte deletion either parses or throws tessera::Error (nothing else).
  const std::string block =
      encode_tool_calls({{"f", {{"a", false, "[1, {\"b\": 2}]"}, {"s", true, "x\"y"}}}});
  std::vector<std::string> damaged;
  for (size_t i = 0; i < block.size(); ++i) {
    damaged.push_back(block.substr(0, i));
    damaged.push_back(block.substr(0, i) + block.substr(i + 1));
  }
  size_t rejected = 0;
  for (const std::string& d : damaged) {
    try {
      parse_tool_calls(d);
    } catch (const Error& e) {
      ++rejected;
      EXPECT_NE(std::string(e.what()).find("(at byte "), std::string::npos) << e.what();
    } catch (...) {
      ADD_FAILURE() << "non-tessera exception for input:\n" << d;
    }
  }
  EXPECT_GT(rejected, damaged.size() * 9 / 10);
}
