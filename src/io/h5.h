// HDF5 tensor files (checkpoints): atomic writes, checksummed data, errors that name the file and the tensor.
// The HDF5 library is not thread-safe in the Debian build: use one reader or writer per thread at most, and
// not concurrently with other HDF5 users.
#pragma once
#include <concepts>
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace tessera::io {

// Writes an HDF5 file atomically: everything goes to "<path>.tmp"; commit() flushes, closes, fsyncs the file and
// its directory and renames over <path>. Destroying an uncommitted writer removes the temp file, so a crash or an
// exception never leaves a half-written file at <path> and never damages an existing one.
class H5Writer {
 public:
  explicit H5Writer(const std::string& path);
  ~H5Writer();
  H5Writer(const H5Writer&) = delete;
  H5Writer& operator=(const H5Writer&) = delete;

  // A name with '/' creates intermediate groups ("model/layers.0.attn.wq" -> group model, dataset
  // "layers.0.attn.wq"). Datasets keep the logical shape, row-major, in the native dtype (bf16 as uint16 with the
  // attribute dtype="bf16"), chunked with Fletcher32 checksums. 0-d tensors are stored in the (checksummed) object
  // header, empty tensors without storage.
  void write_tensor(const std::string& name, const Tensor& t);
  // Appends elements to an extendable 1-D dataset, created (chunked, checksummed) by the first call: for token
  // streams written in pieces, larger than memory.
  void append(const std::string& name, const Tensor& values);

  // Attributes on the root group; writing a key again replaces it. Strings are variable-length UTF-8.
  void write_attr(const std::string& key, int64_t v);
  void write_attr(const std::string& key, double v);
  void write_attr(const std::string& key, const std::string& v);
  // Any other integer type (int, size_t, ...) would be ambiguous between int64_t and double.
  template <std::integral T>
  void write_attr(const std::string& key, T v) {
    write_attr(key, static_cast<int64_t>(v));
  }

  void commit();

 private:
  void check_open() const;

  std::string path_, tmp_path_;
  int64_t file_ = -1;  // hid_t
  bool committed_ = false;
};

class H5Reader {
 public:
  explicit H5Reader(const std::string& path);  // missing, not HDF5 or truncated -> tessera::Error naming the path
  ~H5Reader();
  H5Reader(const H5Reader&) = delete;
  H5Reader& operator=(const H5Reader&) = delete;

  bool has_tensor(const std::string& name) const;
  // Full names of all datasets below `group` (the root when empty), sorted.
  std::vector<std::string> tensor_names(const std::string& group = "") const;
  Shape shape(const std::string& name) const;
  DType dtype(const std::string& name) const;
  // Errors name the file and the tensor; a checksum failure says the tensor is corrupted.
  Tensor read_tensor(const std::string& name) const;
  // Reads into an existing contiguous host tensor of the same shape and dtype.
  void read_into(const std::string& name, const Tensor& dst) const;
  // Indices [start, start + dst.size(dim)) along dimension `dim` of a dataset whose other dims equal dst's (a
  // shard of a logical tensor: expert and tensor parallelism).
  void read_slice(const std::string& name, int dim, int64_t start, const Tensor& dst) const;
  // Elements [start, start + dst.numel()) of a 1-D dataset.
  void read_range(const std::string& name, int64_t start, const Tensor& dst) const;

  bool has_attr(const std::string& key) const;
  // Root attributes; a missing key or a value of another type is an error naming the file and the key.
  int64_t attr_int(const std::string& key) const;
  double attr_double(const std::string& key) const;
  std::string attr_string(const std::string& key) const;  // variable or fixed length

 private:
  struct Info {
    Shape shape;
    DType dtype;
  };
  int64_t open_dataset(const std::string& name) const;  // hid_t, caller closes
  Info info(int64_t dataset, const std::string& name) const;
  void read_data(int64_t dataset, const std::string& name, const Info& info, void* dst) const;
  int64_t open_attr(const std::string& key) const;  // hid_t, caller closes

  std::string path_;
  int64_t file_ = -1;  // hid_t
};

namespace detail {
// Makes a finished temp file durable and moves it over `path`: fsync the file, rename, fsync the directory.
// Shared by the HDF5 and safetensors writers.
void commit_temp_file(const std::string& tmp_path, const std::string& path);
}  // namespace detail

}  // namespace tessera::io
