#include "io/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <utility>

#include "io/h5.h"

namespace tessera::io {

// Tensor bytes are written and read as they lie in memory; the format is little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

// The reference implementation refuses larger headers; so do we, before allocating for one.
constexpr uint64_t max_header_bytes = uint64_t{100} << 20;

std::string where(const std::string& path) { return cat("safetensors '", path, "'"); }

const char* format_dtype(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
  }
  TS_CHECK(false, "unknown dtype");
}

bool parse_dtype(const std::string& s, DType* out) {
  for (DType t : {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64}) {
    if (s == format_dtype(t)) {
      *out = t;
      return true;
    }
  }
  return false;
}

// Removes the temp file unless the write got as far as renaming it.
struct TempFile {
  std::string path;
  int fd = -1;
  bool renamed = false;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!renamed) std::remove(path.c_str());
  }
};

void write_all(const TempFile& file, const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::write(file.fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) TS_FAIL("cannot write '", file.path, "': ", std::strerror(errno));
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

Entry parse_entry(const std::string& path, const std::string& name, const nlohmann::json& v) {
  std::string context = cat(where(path), ": tensor '", name, "'");
  if (!v.is_object()) TS_FAIL(context, ": header entry is not an object");
  Entry e{name, DType::f32, {}, 0, 0};

  auto dtype = v.find("dtype");
  if (dtype == v.end() || !dtype->is_string()) TS_FAIL(context, ": missing \"dtype\"");
  if (!parse_dtype(dtype->get<std::string>(), &e.dtype))
    TS_FAIL(context, ": unsupported dtype ", dtype->dump(), " (expected F32, F64, BF16, I32 or I64)");

  auto shape = v.find("shape");
  if (shape == v.end() || !shape->is_array()) TS_FAIL(context, ": missing \"shape\"");
  uint64_t bytes = dtype_size(e.dtype);
  for (const auto& d : *shape) {
    // Bounding each dimension and the product keeps every later int64 and size_t computation exact.
    if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 62) ||
        __builtin_mul_overflow(bytes, d.get<uint64_t>(), &bytes) || bytes > (uint64_t{1} << 62))
      TS_FAIL(context, ": invalid shape ", shape->dump());
    e.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
  }

  auto offsets = v.find("data_offsets");
  if (offsets == v.end() || !offsets->is_array() || offsets->size() != 2 || !(*offsets)[0].is_number_unsigned() ||
      !(*offsets)[1].is_number_unsigned())
    TS_FAIL(context, ": missing or invalid \"data_offsets\"");
  e.begin = (*offsets)[0].get<uint64_t>();
  e.end = (*offsets)[1].get<uint64_t>();
  if (e.end < e.begin || e.end - e.begin != bytes)
    TS_FAIL(context, ": data_offsets ", offsets->dump(), " do not span the ", bytes, " bytes of ",
            format_dtype(e.dtype), shape_str(e.shape));
  return e;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps the header in the order the data is laid out, which makes files easy to inspect.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name.empty() || name == "__metadata__") TS_FAIL(where(path), ": invalid tensor name '", name, "'");
    if (!names.insert(name).second) TS_FAIL(where(path), ": tensor '", name, "' given twice");
    TS_CHECK(t.defined() && t.device() == Device::cpu && t.is_contiguous(), "write_safetensors '", name,
             "' needs a contiguous host tensor");
    header[name] = {{"dtype", format_dtype(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    TS_FAIL(where(path), ": tensor names and metadata must be valid UTF-8 (", e.what(), ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // aligns the data to 8 bytes
  uint64_t header_len = text.size();

  TempFile file{path + ".tmp"};
  file.fd = ::open(file.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (file.fd < 0) TS_FAIL(where(path), ": cannot create '", file.path, "': ", std::strerror(errno));
  write_all(file, &header_len, sizeof header_len);
  write_all(file, text.data(), text.size());
  for (const auto& [name, t] : tensors) write_all(file, t.raw(), t.nbytes());
  if (::close(std::exchange(file.fd, -1)) != 0)
    TS_FAIL(where(path), ": cannot write '", file.path, "': ", std::strerror(errno));
  detail::commit_temp_file(file.path, path);
  file.renamed = true;
}

std::vector<std::pair<std::string, Tensor>> read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) TS_FAIL(where(path), ": cannot open (", std::strerror(errno), ")");
  std::error_code ec;
  uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) TS_FAIL(where(path), ": cannot stat (", ec.message(), ")");
  if (file_size < 8) TS_FAIL(where(path), ": truncated (", file_size, " bytes, no header length)");

  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), sizeof header_len);
  if (header_len > file_size - 8)
    TS_FAIL(where(path), ": truncated (header of ", header_len, " bytes, file of ", file_size, " bytes)");
  if (header_len > max_header_bytes) TS_FAIL(where(path), ": header of ", header_len, " bytes is too large");
  std::string text(header_len, '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(header_len))) TS_FAIL(where(path), ": cannot read header");

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    TS_FAIL(where(path), ": invalid JSON header (", e.what(), ")");
  }
  if (!header.is_object()) TS_FAIL(where(path), ": header is not a JSON object");

  std::vector<Entry> entries;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      bool ok = v.is_object() && std::all_of(v.begin(), v.end(), [](const auto& x) { return x.is_string(); });
      if (!ok) TS_FAIL(where(path), ": __metadata__ must map strings to strings");
      continue;
    }
    entries.push_back(parse_entry(path, name, v));
  }

  // The data must tile the data section exactly: no overlaps, no holes, nothing missing or left over.
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return std::tie(a.begin, a.end) < std::tie(b.begin, b.end); });
  uint64_t data_size = file_size - 8 - header_len;
  uint64_t expected = 0;
  for (const Entry& e : entries) {
    if (e.end > data_size)
      TS_FAIL(where(path), ": truncated (tensor '", e.name, "' ends at data byte ", e.end, ", the file holds ",
              data_size, ")");
    if (e.begin != expected)
      TS_FAIL(where(path), ": tensor '", e.name, "' starts at data byte ", e.begin, ", expected ", expected,
              " (overlapping or missing data)");
    expected = e.end;
  }
  if (expected != data_size)
    TS_FAIL(where(path), ": ", data_size - expected, " bytes after the last tensor's data");

  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(entries.size());
  for (const Entry& e : entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    in.seekg(static_cast<std::streamoff>(8 + header_len + e.begin));
    if (!in.read(static_cast<char*>(t.raw()), static_cast<std::streamsize>(t.nbytes())))
      TS_FAIL(where(path), ": cannot read tensor '", e.name, "'");
    out.emplace_back(e.name, std::move(t));
  }
  return out;
}

}  // namespace tessera::io
