#include "data/sp_tokenizer.h"

#include <omp.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <tuple>
#include <unordered_map>

#include "core/error.h"

namespace tessera {
namespace {

const std::string kMeta = "\xE2\x96\x81";  // U+2581: SentencePiece's symbol for a space

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

std::string byte_piece(int b) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "<0x%02X>", b);
  return buf;
}

std::string reserved_piece(int64_t i) { return "<|reserved_" + std::to_string(i) + "|>"; }

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& s : items) {
    if (!out.empty()) out += ',';
    out += s;
  }
  return out;
}

// A JSON string literal (UTF-8 passes through; quotes, backslashes and control characters are escaped).
std::string json_str(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += char(c);
    else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else out += char(c);
  }
  return out + "\"";
}

void write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  if (!f.good()) TS_FAIL("cannot write '", path.string(), "'");
}

}  // namespace

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::load(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) TS_FAIL("SentencePiece model '", path, "' does not exist");
  std::unique_ptr<SentencePieceTokenizer> tok(new SentencePieceTokenizer());
  tok->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  auto status = tok->sp_->Load(path);
  if (!status.ok()) TS_FAIL("cannot load SentencePiece model '", path, "': ", status.ToString());
  for (int b = 0; b < 256; ++b) {
    int id = tok->sp_->PieceToId(byte_piece(b));
    if (!tok->sp_->IsByte(id)) TS_FAIL("SentencePiece model '", path, "' has no byte fallback (train it with train_sentencepiece)");
    tok->byte_ids_[b] = id;
  }
  for (const std::string& s : v4_special_tokens()) {
    int id = tok->sp_->PieceToId(s);
    if (!tok->sp_->IsControl(id)) TS_FAIL("SentencePiece model '", path, "' lacks the special token '", s, "'");
  }
  for (int id = 0; id < tok->sp_->GetPieceSize(); ++id)
    if (tok->sp_->IdToPiece(id).find('\n') != std::string::npos) tok->split_lines_ = false;
  uint64_t h = 1469598103934665603ull;
  for (char c : tok->sp_->serialized_model_proto()) h = (h ^ uint8_t(c)) * 1099511628211ull;
  tok->hash_ = h;
  return tok;
}

int64_t SentencePieceTokenizer::vocab_size() const { return sp_->GetPieceSize(); }

std::vector<int32_t> SentencePieceTokenizer::encode(const std::string& text) const {
  // Specials are control pieces, which SentencePiece never produces from text. A literal U+2581 in the text
  // would decode as a space, so each one is encoded as its three bytes instead. No piece spans a newline,
  // so lines are encoded one at a time (SentencePiece's BPE slows down on long inputs).
  std::vector<int32_t> ids;
  std::vector<int> part;
  size_t meta = text.find(kMeta), newline = split_lines_ ? text.find('\n') : std::string::npos;
  for (size_t pos = 0; pos < text.size();) {
    if (meta < pos) meta = text.find(kMeta, pos);
    if (newline < pos) newline = text.find('\n', pos);
    size_t at = std::min({meta, newline, text.size()});
    if (at > pos) {
      auto status = sp_->Encode(std::string_view(text).substr(pos, at - pos), &part);
      if (!status.ok()) TS_FAIL("SentencePiece encode failed: ", status.ToString());
      ids.insert(ids.end(), part.begin(), part.end());
    }
    if (at == text.size()) break;
    pos = at + (at == meta ? kMeta.size() : 1);
    for (size_t k = at; k < pos; ++k) ids.push_back(byte_ids_[uint8_t(text[k])]);
  }
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) TS_FAIL("token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")");
    const std::string& piece = sp_->IdToPiece(id);
    if (sp_->IsByte(id)) out.push_back(char(std::stoi(piece.substr(3, 2), nullptr, 16)));
    else if (sp_->IsControl(id) || sp_->IsUnknown(id)) out += piece;
    else out += replace_all(piece, kMeta, " ");
  }
  return out;
}

int32_t SentencePieceTokenizer::special_id(const std::string& token) const {
  int id = sp_->PieceToId(token);
  if (!sp_->IsControl(id)) TS_FAIL("the SentencePiece tokenizer has no special token '", token, "'");
  return id;
}

void train_sentencepiece(const std::vector<std::string>& input_files, const std::string& model_prefix,
                         int64_t vocab_size, int64_t reserved) {
  if (input_files.empty()) TS_FAIL("tokenizer training needs at least one input file");
  for (const std::string& f : input_files) {
    if (!std::filesystem::is_regular_file(f)) TS_FAIL("tokenizer training input '", f, "' does not exist");
    if (f.find(',') != std::string::npos) TS_FAIL("tokenizer training input '", f, "': SentencePiece cannot take a file name with a comma");
  }
  if (reserved < 0) TS_FAIL("the number of reserved tokens must be >= 0, got ", reserved);
  std::vector<std::string> controls = v4_special_tokens();
  for (int64_t i = 0; i < reserved; ++i) controls.push_back(reserved_piece(i));
  // <unk>, the specials, the reserved pieces and 256 bytes, plus at least one learned piece.
  int64_t min_vocab = 1 + int64_t(v4_special_tokens().size()) + reserved + 256 + 1;
  if (vocab_size < min_vocab)
    TS_FAIL("tokenizer vocab_size ", vocab_size, " is too small: <unk>, ", v4_special_tokens().size(), " specials, ", reserved,
            " reserved and 256 byte pieces need at least ", min_vocab);
  std::unordered_map<std::string, std::string> args = {
      {"input", join(input_files)},
      {"model_prefix", model_prefix},
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"character_coverage", "0.9995"},
      {"control_symbols", join(controls)},
      {"unk_id", "0"},
      {"bos_id", "-1"},
      {"eos_id", "-1"},
      {"pad_id", "-1"},
      {"input_sentence_size", "2000000"},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(std::max(1, omp_get_max_threads()))},
      {"minloglevel", "1"},
  };
  auto status = sentencepiece::SentencePieceTrainer::Train(args);
  if (!status.ok()) TS_FAIL("SentencePiece training of '", model_prefix, ".model' failed: ", status.ToString());
}

void export_hf_tokenizer(const SentencePieceTokenizer& tok, const std::string& out_dir) {
  const sentencepiece::SentencePieceProcessor& sp = tok.processor();
  const int n = sp.GetPieceSize();
  auto normal = [&](int id) { return !sp.IsControl(id) && !sp.IsUnknown(id) && !sp.IsByte(id) && !sp.IsUnused(id); };
  // Hugging Face sees raw text (no normalizer), so pieces spell spaces as spaces rather than U+2581.
  std::vector<std::string> pieces(n);
  std::unordered_map<std::string, int> normal_ids;
  for (int id = 0; id < n; ++id) {
    pieces[id] = normal(id) ? replace_all(sp.IdToPiece(id), kMeta, " ") : sp.IdToPiece(id);
    if (normal(id)) normal_ids.emplace(sp.IdToPiece(id), id);
  }
  std::unordered_map<std::string, int> seen;
  for (int id = 0; id < n; ++id)
    if (!seen.emplace(pieces[id], id).second) TS_FAIL("cannot export the tokenizer: piece '", pieces[id], "' appears twice");

  // SentencePiece's BPE repeatedly joins the adjacent pair whose concatenation is the highest-scoring piece:
  // every split of a piece into two pieces is a merge, ranked by the piece's score.
  std::vector<std::tuple<float, int, int, int>> merges;  // (-score, piece, left, right)
  for (const auto& [piece, id] : normal_ids)
    for (size_t k = 1; k < piece.size(); ++k) {
      auto l = normal_ids.find(piece.substr(0, k)), r = normal_ids.find(piece.substr(k));
      if (l != normal_ids.end() && r != normal_ids.end()) merges.emplace_back(-sp.GetScore(id), id, l->second, r->second);
    }
  std::sort(merges.begin(), merges.end());

  std::string j = "{\n\"version\": \"1.0\",\n\"truncation\": null,\n\"padding\": null,\n\"added_tokens\": [";
  bool first = true;
  for (const std::string& s : v4_special_tokens()) {
    j += std::string(first ? "\n" : ",\n") + "{\"id\": " + std::to_string(tok.special_id(s)) + ", \"content\": " + json_str(s) +
         ", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}";
    first = false;
  }
  j += "\n],\n\"normalizer\": null,\n\"pre_tokenizer\": null,\n\"post_processor\": null,\n"
       "\"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}]},\n"
       "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": " + json_str(sp.IdToPiece(sp.unk_id())) +
       ", \"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, \"fuse_unk\": true, \"byte_fallback\": true, "
       "\"ignore_merges\": false,\n\"vocab\": {";
  for (int id = 0; id < n; ++id) j += std::string(id ? ",\n" : "\n") + json_str(pieces[id]) + ": " + std::to_string(id);
  j += "\n},\n\"merges\": [";
  for (size_t i = 0; i < merges.size(); ++i)
    j += std::string(i ? ",\n" : "\n") + "[" + json_str(pieces[std::get<2>(merges[i])]) + ", " + json_str(pieces[std::get<3>(merges[i])]) + "]";
  j += "\n]}\n}\n";

  std::string specials = "\"bos_token\": " + json_str(kBosToken) + ", \"eos_token\": " + json_str(kEosToken) +
                         ", \"pad_token\": " + json_str(kPadToken);
  std::filesystem::create_directories(out_dir);
  write_file(std::filesystem::path(out_dir) / "tokenizer.json", j);
  write_file(std::filesystem::path(out_dir) / "tokenizer_config.json",
             "{\"tokenizer_class\": \"PreTrainedTokenizerFast\", \"add_bos_token\": false, \"add_eos_token\": false, "
             "\"clean_up_tokenization_spaces\": false, " + specials + "}\n");
  write_file(std::filesystem::path(out_dir) / "special_tokens_map.json", "{" + specials + "}\n");
}

}  // namespace tessera
