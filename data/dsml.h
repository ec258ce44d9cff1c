// DeepSeek-V4's DSML tool-call blocks (spec/post-training.md §8): an encoder that writes the exact block
// and a strict parser that rejects anything malformed with the reason and the byte offset, never guessing.
#pragma once
#include <string>
#include <vector>

namespace tessera {

struct ToolParam {
  std::string name;
  bool is_string = true;  // string="true": value is verbatim text; string="false": value is JSON text
  std::string value;
  bool operator==(const ToolParam&) const = default;
};

struct ToolCall {
  std::string name;
  std::vector<ToolParam> params;
  bool operator==(const ToolCall&) const = default;
};

// The block, newline-separated as in the spec, without a trailing newline:
//   <｜DSML｜tool_calls>
//   <｜DSML｜invoke name="add">
//   <｜DSML｜parameter name="a" string="false">5</｜DSML｜parameter>
//   </｜DSML｜invoke>
//   </｜DSML｜tool_calls>
// Throws tessera::Error for no calls, empty names or names with '"', duplicate parameter names, JSON values
// that do not parse, and values containing the DSML marker (they would not round-trip).
std::string encode_tool_calls(const std::vector<ToolCall>& calls);

// Parses exactly one block (whitespace allowed between tags and around the block). Throws tessera::Error
// "DSML: <reason> (at byte N, line L)" for missing or unbalanced tags, unknown tags or attributes, nameless
// invokes/parameters, duplicate parameters, string attributes other than "true"/"false", invalid JSON in a
// string="false" value, text outside tags, an empty block, nested blocks and unterminated parameters.
std::vector<ToolCall> parse_tool_calls(const std::string& block);

struct AssistantReply {
  std::string answer;
  std::vector<ToolCall> tool_calls;
};

// Splits an assistant answer "{answer}\n\n<block>" (or just "<block>") into its parts. Text without the DSML
// marker is all answer. A malformed block, or a block not preceded by a blank line, throws tessera::Error.
AssistantReply split_answer_and_tool_calls(const std::string& assistant_text);

}  // namespace tessera
