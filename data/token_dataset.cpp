#include "data/token_dataset.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "core/rng.h"
#include "data/chat.h"
#include "io/h5.h"

namespace tessera {
namespace fs = std::filesystem;
namespace {

constexpr const char* kFormat = "tessera-tokens-1";
constexpr size_t kFlushTokens = size_t{1} << 20;  // tokens buffered per split before appending to the file

// Documents of one input file, one at a time, without holding the file in memory.
class DocumentReader {
 public:
  DocumentReader(const std::string& path, const PrepareOptions& opt) : path_(path), opt_(opt), in_(path, std::ios::binary) {
    if (!fs::exists(path)) TS_FAIL("input file '", path, "' not found");
    if (!in_) TS_FAIL("input file '", path, "' cannot be read");
  }
  // Next document's text; false at the end of the file.
  bool next(std::string& doc) {
    std::string line;
    if (opt_.format == "text") {
      doc.clear();
      bool any = false;
      while (std::getline(in_, line)) {
        bytes_ += line.size() + 1;
        if (!opt_.separator.empty() && line == opt_.separator) {
          if (doc.find_first_not_of(" \t\r\n") != std::string::npos) return true;
          doc.clear();
          continue;
        }
        doc += line;
        if (!in_.eof()) doc += '\n';
        any = true;
      }
      return any && doc.find_first_not_of(" \t\r\n") != std::string::npos;
    }
    while (std::getline(in_, line)) {  // jsonl: one document per non-blank line
      ++line_no_;
      bytes_ += line.size() + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        TS_FAIL(path_, ":", line_no_, ": malformed JSON (", e.what(), ")");
      }
      doc.clear();
      if (opt_.format == "chat") {  // the caller parses the messages
        doc = line;
        return true;
      }
      for (const std::string& f : opt_.fields) {
        if (!j.is_object() || !j.contains(f) || !j[f].is_string())
          TS_FAIL(path_, ":", line_no_, ": no string field '", f, "'");
        if (!doc.empty()) doc += '\n';
        doc += j[f].get<std::string>();
      }
      return true;
    }
    return false;
  }
  int64_t bytes_read() const { return bytes_; }
  int64_t line() const { return line_no_; }

 private:
  std::string path_;
  const PrepareOptions& opt_;
  std::ifstream in_;
  int64_t bytes_ = 0, line_no_ = 0;
};

// Buffers one split's tokens and appends them to the file in large pieces.
struct SplitWriter {
  explicit SplitWriter(std::string n) : name(std::move(n)) {}
  std::string name;
  std::vector<int32_t> buffer, mask;  // mask: chat datasets only (1 = trained on as a target)
  std::vector<int64_t> starts;
  int64_t tokens = 0, bytes = 0;

  void add(io::H5Writer& w, const std::vector<int32_t>& ids, int64_t doc_bytes, const std::vector<uint8_t>* loss_mask = nullptr) {
    starts.push_back(tokens);
    buffer.insert(buffer.end(), ids.begin(), ids.end());
    if (loss_mask) mask.insert(mask.end(), loss_mask->begin(), loss_mask->end());
    tokens += static_cast<int64_t>(ids.size());
    bytes += doc_bytes;
    if (buffer.size() >= kFlushTokens) flush(w);
  }
  void flush(io::H5Writer& w) {
    auto append = [&](const std::string& dataset, const auto& values) {
      Tensor t = Tensor::empty({int64_t(values.size())}, DType::i32);
      std::copy(values.begin(), values.end(), t.data<int32_t>());
      w.append(name + "/" + dataset, t);
    };
    append("tokens", buffer);
    if (!mask.empty() || with_mask) append("loss_mask", mask);
    buffer.clear();
    mask.clear();
  }
  bool with_mask = false;
  void finish(io::H5Writer& w) {
    flush(w);
    Tensor s = Tensor::empty({int64_t(starts.size())}, DType::i64);
    std::copy(starts.begin(), starts.end(), s.data<int64_t>());
    w.write_tensor(name + "/doc_starts", s);
    w.write_attr(name + ".tokens", tokens);
    w.write_attr(name + ".bytes", bytes);
  }
};

// One chat JSONL line: {"messages": [{"role", "content", "reasoning"?, "tool_calls"?: [{"name", "arguments":
// {...}}]}], "mode"?: "think_high"}. String arguments are verbatim (string="true"), others JSON.
EncodedChat encode_chat_json(const Tokenizer& tok, const std::string& line, const std::string& default_mode) {
  nlohmann::json j = nlohmann::json::parse(line);
  if (!j.is_object() || !j.contains("messages") || !j["messages"].is_array()) TS_FAIL("no \"messages\" list");
  std::vector<ChatMessage> messages;
  for (const auto& m : j["messages"]) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string())
      TS_FAIL("a message needs string \"role\" and \"content\"");
    ChatMessage msg{m["role"].get<std::string>(), m["content"].get<std::string>(), m.value("reasoning", std::string()), {}};
    for (const auto& c : m.value("tool_calls", nlohmann::json::array())) {
      if (!c.contains("name") || !c["name"].is_string()) TS_FAIL("a tool call needs a string \"name\"");
      ToolCall call{c["name"].get<std::string>(), {}};
      if (c.contains("arguments") && !c["arguments"].is_object()) TS_FAIL("tool call \"arguments\" must be an object");
      for (const auto& [k, v] : c.value("arguments", nlohmann::json::object()).items())
        call.params.push_back(v.is_string() ? ToolParam{k, true, v.get<std::string>()} : ToolParam{k, false, v.dump()});
      msg.tool_calls.push_back(std::move(call));
    }
    messages.push_back(std::move(msg));
  }
  return encode_chat(tok, messages, parse_reasoning_mode(j.value("mode", default_mode)));
}

}  // namespace

PrepareStats prepare_dataset(const PrepareOptions& opt, const Tokenizer& tok, const ProgressFn& progress) {
  if (opt.inputs.empty()) TS_FAIL("data prepare: no input files");
  if (opt.format != "text" && opt.format != "jsonl" && opt.format != "chat")
    TS_FAIL("data prepare: unknown format '", opt.format, "' (text, jsonl, chat)");
  int64_t total_bytes = 0;
  nlohmann::json sources = nlohmann::json::array();
  for (const std::string& f : opt.inputs) {
    if (!fs::exists(f)) TS_FAIL("input file '", f, "' not found");
    total_bytes += static_cast<int64_t>(fs::file_size(f));
    sources.push_back({{"path", f}, {"bytes", fs::file_size(f)}});
  }
  fs::path out(opt.output);
  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  io::H5Writer w(opt.output);
  SplitWriter train{"train"}, val{"val"};
  train.with_mask = val.with_mask = opt.format == "chat";
  Rng pick{opt.seed, stream_id("val-split")};
  PrepareStats stats;
  int64_t done_before = 0;
  // One text file that is one document (tinyshakespeare): hold out the tail of its bytes at the same cut as
  // TextCorpus, so held-out losses of different tokenizers are over the same text. Each part ends with EOS.
  if (opt.format == "text" && opt.separator.empty() && opt.inputs.size() == 1) {
    std::ifstream in(opt.inputs[0], std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto [head, tail] = split_tail(text, opt.val_fraction);
    for (auto [part, split] : {std::pair{&head, &train}, std::pair{&tail, &val}}) {
      if (part->empty()) continue;
      std::vector<int32_t> ids = tok.encode(*part);
      ids.push_back(tok.eos_id());
      split->add(w, ids, int64_t(part->size()));
    }
    stats.documents = 1;
    if (progress) progress(total_bytes, total_bytes);
  }
  for (const std::string& f : stats.documents > 0 ? std::vector<std::string>{} : opt.inputs) {
    DocumentReader reader(f, opt);
    std::string doc;
    while (reader.next(doc)) {
      SplitWriter& split = pick.uniform(stats.documents) < opt.val_fraction ? val : train;
      if (opt.format == "chat") {
        EncodedChat chat;
        try {
          chat = encode_chat_json(tok, doc, opt.reasoning_mode);
        } catch (const std::exception& e) {  // ours and nlohmann's (a wrong JSON type)
          TS_FAIL(f, ":", reader.line(), ": ", e.what());
        }
        split.add(w, chat.ids, int64_t(doc.size()), &chat.loss_mask);
      } else {
        std::vector<int32_t> ids = tok.encode(doc);
        ids.push_back(tok.eos_id());  // documents end with EOS, as in the packed in-memory corpora
        split.add(w, ids, int64_t(doc.size()));
      }
      ++stats.documents;
      if (progress && stats.documents % 256 == 0) progress(done_before + reader.bytes_read(), total_bytes);
    }
    done_before += reader.bytes_read();
  }
  if (progress) progress(total_bytes, total_bytes);
  if (stats.documents == 0) TS_FAIL("data prepare: the inputs hold no documents (", opt.inputs[0], ", ...)");
  if (train.tokens == 0) TS_FAIL("data prepare: every document went to the held-out split; lower --val-fraction");
  train.finish(w);
  val.finish(w);
  w.write_attr("format", std::string(kFormat));
  w.write_attr("tokenizer.kind", tok.kind());
  w.write_attr("tokenizer.hash", static_cast<int64_t>(tok.hash()));
  w.write_attr("vocab_size", tok.vocab_size());
  w.write_attr("documents", stats.documents);
  w.write_attr("sources", sources.dump());
  w.write_attr("val_fraction", opt.val_fraction);
  w.write_attr("seed", static_cast<int64_t>(opt.seed));
  w.commit();
  stats.train_tokens = train.tokens, stats.val_tokens = val.tokens;
  stats.train_bytes = train.bytes, stats.val_bytes = val.bytes;
  return stats;
}

H5TokenStore::H5TokenStore(std::shared_ptr<const io::H5Reader> file, const std::string& split)
    : file_(std::move(file)), split_(split) {
  size_ = file_->attr_int(split + ".tokens");
  bytes_ = file_->attr_int(split + ".bytes");
  has_mask_ = file_->has_tensor(split + "/loss_mask");
  Tensor s = file_->read_tensor(split + "/doc_starts");
  starts_.assign(s.data<int64_t>(), s.data<int64_t>() + s.numel());
}

void H5TokenStore::read(int64_t start, int64_t n, int32_t* out) const {
  Tensor t = Tensor::empty({n}, DType::i32);
  file_->read_range(split_ + "/tokens", start, t);
  std::copy(t.data<int32_t>(), t.data<int32_t>() + n, out);
}

void H5TokenStore::read_mask(int64_t start, int64_t n, uint8_t* out) const {
  Tensor t = Tensor::empty({n}, DType::i32);
  file_->read_range(split_ + "/loss_mask", start, t);
  for (int64_t i = 0; i < n; ++i) out[i] = t.data<int32_t>()[i] != 0;
}

TokenDataset TokenDataset::open(const std::string& path, const Tokenizer* expected) {
  auto file = std::make_shared<io::H5Reader>(path);
  if (!file->has_attr("format") || file->attr_string("format") != kFormat)
    TS_FAIL("'", path, "' is not a Tessera token dataset (no format attribute '", kFormat, "'); make one with `tessera data prepare`");
  TokenDataset d;
  d.path = path;
  d.tokenizer_kind = file->attr_string("tokenizer.kind");
  d.tokenizer_hash = static_cast<uint64_t>(file->attr_int("tokenizer.hash"));
  d.vocab_size = file->attr_int("vocab_size");
  if (expected && (expected->kind() != d.tokenizer_kind || expected->hash() != d.tokenizer_hash))
    TS_FAIL("dataset '", path, "' was made with another tokenizer (", d.tokenizer_kind, ", hash ", d.tokenizer_hash,
            ") than the model's (", expected->kind(), ", hash ", expected->hash(), ")");
  d.train = std::make_unique<H5TokenStore>(file, "train");
  d.val = std::make_unique<H5TokenStore>(file, "val");
  if (d.train->size() == 0) TS_FAIL("dataset '", path, "' has an empty training split");
  return d;
}

}  // namespace tessera
