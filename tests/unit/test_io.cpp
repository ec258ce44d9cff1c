// Tensor file I/O: HDF5 checkpoints (round trips, atomic commit, corruption and truncation), safetensors and the
// Hugging Face DeepseekV4 export mapping.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "core/rng.h"
#include "io/checkpoint.h"
#include "io/h5.h"
#include "io/hf_export.h"
#include "io/safetensors.h"
#include "tests/unit/v4_test_model.h"

namespace tessera::io {
namespace {

namespace fs = std::filesystem;

// A unique path in the temp directory; the file and its ".tmp" sibling are removed at scope exit.
class TempPath {
 public:
  explicit TempPath(const std::string& ext) {
    static std::atomic<int> counter{0};
    path_ = (fs::temp_directory_path() / cat("tessera_test_io_", ::getpid(), "_", counter++, ext)).string();
  }
  ~TempPath() {
    std::error_code ec;
    fs::remove(path_, ec);
    fs::remove(path_ + ".tmp", ec);
  }
  const std::string& str() const { return path_; }

 private:
  std::string path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A tensor whose elements depend on the index and the seed, so mix-ups between tensors show.
Tensor make_tensor(const Shape& shape, DType dtype, int seed = 0) {
  Tensor t = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) {
    double v = (i * 7 + seed * 131) % 1000 - 500.25;
    switch (dtype) {
      case DType::f32: t.data<float>()[i] = static_cast<float>(v); break;
      case DType::f64: t.data<double>()[i] = v / 3; break;
      case DType::bf16: t.data<bf16>()[i] = to_bf16(static_cast<float>(v)); break;
      case DType::i32: t.data<int32_t>()[i] = static_cast<int32_t>(v * 1000); break;
      case DType::i64: t.data<int64_t>()[i] = static_cast<int64_t>(v) << 40; break;
    }
  }
  return t;
}

void expect_same(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.dtype(), b.dtype());
  ASSERT_EQ(a.shape(), b.shape());
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << a.str();
}

// Runs f, expecting a tessera::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

const DType all_dtypes[] = {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64};

TEST(H5, RoundTripsEveryDtypeAndRank) {
  TempPath path(".h5");
  const std::vector<Shape> shapes = {{}, {7}, {3, 5}, {2, 3, 4}, {0}, {3, 0, 2}};
  std::vector<std::pair<std::string, Tensor>> written;
  {
    H5Writer w(path.str());
    for (DType dt : all_dtypes) {
      for (size_t i = 0; i < shapes.size(); ++i) {
        std::string name = cat("t/", dtype_name(dt), "_", i);
        written.emplace_back(name, make_tensor(shapes[i], dt, static_cast<int>(i)));
        w.write_tensor(name, written.back().second);
      }
    }
    // Several chunks along dimension 0, the last one partial.
    written.emplace_back("big", make_tensor({600, 1000}, DType::f32, 9));
    w.write_tensor("big", written.back().second);
    w.commit();
  }
  H5Reader r(path.str());
  for (const auto& [name, t] : written) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(r.has_tensor(name));
    EXPECT_EQ(r.shape(name), t.shape());
    EXPECT_EQ(r.dtype(name), t.dtype());
    expect_same(r.read_tensor(name), t);
    Tensor into = Tensor::zeros(t.shape(), t.dtype());
    r.read_into(name, into);
    expect_same(into, t);
  }
}

// A shard's slice of a stored tensor (expert shards along dim 0, tensor-parallel shards along dim 0 or 1): element
// (i, j, k) of a (4, 6, 2) tensor holds 100 i + 10 j + k, so every read value says where it came from.
TEST(H5, ReadsSlicesAlongAnyDimension) {
  TempPath path(".h5");
  Tensor t = Tensor::empty({4, 6, 2}, DType::f32);
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 6; ++j)
      for (int64_t k = 0; k < 2; ++k) t.data<float>()[(i * 6 + j) * 2 + k] = float(100 * i + 10 * j + k);
  {
    H5Writer w(path.str());
    w.write_tensor("t", t);
    w.commit();
  }
  H5Reader r(path.str());
  for (int dim = 0; dim < 3; ++dim) {
    Shape part = t.shape();
    const int64_t start = dim == 2 ? 1 : 2;
    part[dim] = dim == 2 ? 1 : 2;
    Tensor got = Tensor::zeros(part, DType::f32);
    r.read_slice("t", dim, start, got);
    Tensor via_copy = Tensor::zeros(part, DType::f32);
    copy_along(t, dim, start, via_copy, false);  // the same slice cut in memory (Param::slice_of)
    for (int64_t i = 0; i < part[0]; ++i)
      for (int64_t j = 0; j < part[1]; ++j)
        for (int64_t k = 0; k < part[2]; ++k) {
          const int64_t at = (i * part[1] + j) * part[2] + k;
          int64_t idx[3] = {i, j, k};
          idx[dim] += start;
          const float want = float(100 * idx[0] + 10 * idx[1] + idx[2]);
          EXPECT_EQ(got.data<float>()[at], want) << "dim " << dim;
          EXPECT_EQ(via_copy.data<float>()[at], want) << "dim " << dim;
        }
    // Writing the slice back into a zero tensor puts it where it came from.
    Tensor back = Tensor::zeros(t.shape(), DType::f32);
    copy_along(back, dim, start, got, true);
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < 6; ++j)
        for (int64_t k = 0; k < 2; ++k) {
          const int64_t idx[3] = {i, j, k}, at = (i * 6 + j) * 2 + k;
          const bool inside = idx[dim] >= start && idx[dim] < start + part[dim];
          EXPECT_EQ(back.data<float>()[at], inside ? t.data<float>()[at] : 0.0f) << "dim " << dim;
        }
  }
  expect_error([&] { r.read_slice("t", 1, 5, Tensor::zeros({4, 2, 2}, DType::f32)); },
               {path.str(), "'t'", "[5, 7) along dimension 1"});
  expect_error([&] { r.read_slice("t", 1, 0, Tensor::zeros({3, 2, 2}, DType::f32)); }, {path.str(), "(4, 6, 2)"});
}

TEST(H5, DottedNamesGroupsAndListing) {
  TempPath path(".h5");
  const std::vector<std::string> names = {"model/layers.1.mlp.w1", "model/layers.0.attn.wq", "model/layers.0.attn.wk",
                                          "opt/m/model/layers.0.attn.wq", "step.scale"};
  {
    H5Writer w(path.str());
    for (size_t i = 0; i < names.size(); ++i) w.write_tensor(names[i], make_tensor({2, 2}, DType::f32, int(i)));
    expect_error([&] { w.write_tensor("model/layers.0.attn.wq", make_tensor({1}, DType::f32)); },
                 {path.str(), "model/layers.0.attn.wq", "already taken"});
    expect_error([&] { w.write_tensor("/model/x", make_tensor({1}, DType::f32)); }, {"invalid tensor name"});
    expect_error([&] { w.write_tensor("model//x", make_tensor({1}, DType::f32)); }, {"invalid tensor name"});
    w.commit();
  }
  H5Reader r(path.str());
  std::vector<std::string> sorted = names;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(r.tensor_names(), sorted);
  EXPECT_EQ(r.tensor_names("model"), (std::vector<std::string>{"model/layers.0.attn.wk", "model/layers.0.attn.wq",
                                                                "model/layers.1.mlp.w1"}));
  EXPECT_EQ(r.tensor_names("opt/m"), std::vector<std::string>{"opt/m/model/layers.0.attn.wq"});
  expect_same(r.read_tensor("opt/m/model/layers.0.attn.wq"), make_tensor({2, 2}, DType::f32, 3));
  EXPECT_FALSE(r.has_tensor("model"));  // a group
  EXPECT_FALSE(r.has_tensor("model/layers.0"));
  EXPECT_FALSE(r.has_tensor("nope/x"));
  EXPECT_FALSE(r.has_tensor("step.scale/x"));
  expect_error([&] { r.tensor_names("nope"); }, {path.str(), "no group 'nope'"});
}

TEST(H5, Attributes) {
  TempPath path(".h5");
  {
    H5Writer w(path.str());
    w.write_attr("step", int64_t{-1} << 40);
    w.write_attr("tokens", 12);  // int goes through the integral overload
    w.write_attr("lr", 3e-4);
    w.write_attr("recipe", std::string("name = \"tiny\"\nπ ≈ 3.14\n"));
    w.write_attr("empty", std::string());
    w.write_attr("kind", "checkpoint");
    w.write_attr("kind", "final");  // replaces
    w.commit();
  }
  H5Reader r(path.str());
  EXPECT_EQ(r.attr_int("step"), int64_t{-1} << 40);
  EXPECT_EQ(r.attr_int("tokens"), 12);
  EXPECT_EQ(r.attr_double("lr"), 3e-4);
  EXPECT_EQ(r.attr_string("recipe"), "name = \"tiny\"\nπ ≈ 3.14\n");
  EXPECT_EQ(r.attr_string("empty"), "");
  EXPECT_EQ(r.attr_string("kind"), "final");
  EXPECT_TRUE(r.has_attr("lr"));
  EXPECT_FALSE(r.has_attr("missing"));
  expect_error([&] { r.attr_int("missing"); }, {path.str(), "no attribute 'missing'"});
  expect_error([&] { r.attr_string("missing"); }, {path.str(), "missing"});
  expect_error([&] { r.attr_int("lr"); }, {path.str(), "'lr'", "is a float, expected an integer"});
  expect_error([&] { r.attr_double("recipe"); }, {path.str(), "'recipe'", "is a string, expected a float"});
  expect_error([&] { r.attr_string("step"); }, {path.str(), "'step'", "is an integer, expected a string"});
}

TEST(H5, MissingTensorAndShapeMismatch) {
  TempPath path(".h5");
  {
    H5Writer w(path.str());
    w.write_tensor("model/w", make_tensor({4, 8}, DType::f32));
    w.commit();
  }
  H5Reader r(path.str());
  expect_error([&] { r.read_tensor("model/missing"); }, {path.str(), "no tensor 'model/missing'"});
  expect_error([&] { r.shape("missing"); }, {path.str(), "no tensor 'missing'"});
  expect_error([&] { r.read_into("model/w", Tensor::zeros({4, 16}, DType::f32)); },
               {cat("file '", path.str(), "': tensor 'model/w' has shape (4, 8), expected (4, 16)")});
  expect_error([&] { r.read_into("model/w", Tensor::zeros({4, 8}, DType::bf16)); },
               {path.str(), "'model/w' has dtype f32, expected bf16"});
}

TEST(H5, UncommittedWriterLeavesExistingFileUntouched) {
  TempPath path(".h5");
  {
    H5Writer w(path.str());
    w.write_tensor("a", make_tensor({16}, DType::f32, 1));
    w.write_attr("step", 1);
    w.commit();
  }
  const std::string before = read_bytes(path.str());
  ASSERT_FALSE(before.empty());

  EXPECT_THROW(
      {
        H5Writer w(path.str());
        w.write_tensor("a", make_tensor({16}, DType::f32, 2));
        EXPECT_TRUE(fs::exists(path.str() + ".tmp"));
        throw std::runtime_error("crash while saving");
      },
      std::runtime_error);
  EXPECT_EQ(read_bytes(path.str()), before);
  EXPECT_FALSE(fs::exists(path.str() + ".tmp"));

  {
    H5Writer w(path.str());
    w.write_tensor("b", make_tensor({16}, DType::f32, 3));
  }  // destroyed without commit
  EXPECT_EQ(read_bytes(path.str()), before);
  EXPECT_FALSE(fs::exists(path.str() + ".tmp"));

  // A committed writer replaces the file.
  {
    H5Writer w(path.str());
    w.write_tensor("b", make_tensor({16}, DType::f32, 3));
    w.commit();
  }
  EXPECT_FALSE(fs::exists(path.str() + ".tmp"));
  H5Reader r(path.str());
  EXPECT_EQ(r.tensor_names(), std::vector<std::string>{"b"});
  EXPECT_FALSE(r.has_attr("step"));
}

TEST(H5, UnreadableFilesNameThePath) {
  TempPath missing(".h5");
  expect_error([&] { H5Reader r(missing.str()); }, {missing.str(), "no such file"});

  TempPath text(".h5");
  write_bytes(text.str(), "this is not an HDF5 file, just some text\n");
  expect_error([&] { H5Reader r(text.str()); }, {text.str()});

  TempPath truncated(".h5");
  {
    H5Writer w(truncated.str());
    w.write_tensor("model/w", make_tensor({256, 256}, DType::f32));
    w.write_attr("step", 5);
    w.commit();
  }
  fs::resize_file(truncated.str(), fs::file_size(truncated.str()) / 2);
  expect_error([&] { H5Reader r(truncated.str()); }, {truncated.str()});
}

TEST(H5, CorruptedDataIsDetected) {
  TempPath path(".h5");
  Tensor big = make_tensor({256, 256}, DType::f32, 4);
  Tensor other = make_tensor({8}, DType::i64, 5);
  {
    H5Writer w(path.str());
    w.write_tensor("model/big", big);
    w.write_tensor("model/other", other);
    w.commit();
  }
  std::string bytes = read_bytes(path.str());
  const std::string needle(static_cast<const char*>(big.raw()), 256);
  size_t at = bytes.find(needle);
  ASSERT_NE(at, std::string::npos) << "tensor data not found in the file";
  for (size_t i = 0; i < 8; ++i) bytes[at + 4096 + i] ^= 0x5a;
  write_bytes(path.str(), bytes);

  H5Reader r(path.str());
  expect_error([&] { r.read_tensor("model/big"); }, {path.str(), "model/big", "corrupted"});
  expect_error([&] { r.read_into("model/big", Tensor::zeros({256, 256}, DType::f32)); }, {"corrupted"});
  expect_same(r.read_tensor("model/other"), other);
}

// Files written by other tools: contiguous storage, big-endian data, fixed-length strings, 32-bit integers.
TEST(H5, ReadsForeignLayouts) {
  TempPath path(".h5");
  {
    hid_t file = H5Fcreate(path.str().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    hsize_t dims[2] = {2, 3};
    double values[6] = {1.5, -2, 3, 4.25, 5, 6};
    hid_t space = H5Screate_simple(2, dims, nullptr);
    hid_t ds = H5Dcreate2(file, "w", H5T_IEEE_F64BE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values), 0);
    H5Dclose(ds);
    H5Sclose(space);

    hid_t scalar = H5Screate(H5S_SCALAR);
    hid_t str = H5Tcopy(H5T_C_S1);
    H5Tset_size(str, 8);
    H5Tset_strpad(str, H5T_STR_NULLPAD);
    hid_t a = H5Acreate2(file, "name", str, scalar, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(H5Awrite(a, str, "tiny\0\0\0\0"), 0);
    H5Aclose(a);
    int32_t v = 42;
    a = H5Acreate2(file, "n", H5T_STD_I32BE, scalar, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT32, &v), 0);
    H5Aclose(a);
    H5Tclose(str);
    H5Sclose(scalar);
    H5Fclose(file);
  }
  H5Reader r(path.str());
  Tensor w = r.read_tensor("w");
  ASSERT_EQ(w.dtype(), DType::f64);
  ASSERT_EQ(w.shape(), (Shape{2, 3}));
  EXPECT_EQ(w.data<double>()[0], 1.5);
  EXPECT_EQ(w.data<double>()[3], 4.25);
  EXPECT_EQ(r.attr_string("name"), "tiny");
  EXPECT_EQ(r.attr_int("n"), 42);
}

TEST(Safetensors, RoundTripsEveryDtypeAndRank) {
  TempPath path(".safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  int seed = 0;
  for (DType dt : all_dtypes)
    for (const Shape& s : std::vector<Shape>{{}, {5}, {3, 4}, {2, 3, 2}, {0, 4}})
      tensors.emplace_back(cat("model.", dtype_name(dt), ".", seed, ".weight"), make_tensor(s, dt, seed++));
  write_safetensors(path.str(), tensors, {{"format", "pt"}, {"step", "100"}});
  EXPECT_FALSE(fs::exists(path.str() + ".tmp"));

  auto back = read_safetensors(path.str());
  ASSERT_EQ(back.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    SCOPED_TRACE(tensors[i].first);
    EXPECT_EQ(back[i].first, tensors[i].first);  // data order is the written order
    expect_same(back[i].second, tensors[i].second);
  }
}

TEST(Safetensors, HeaderMatchesTheFormat) {
  TempPath path(".safetensors");
  Tensor a = make_tensor({2, 3}, DType::f32, 1);
  Tensor b = make_tensor({4}, DType::bf16, 2);
  write_safetensors(path.str(), {{"a", a}, {"b", b}}, {{"k", "v"}});

  std::string bytes = read_bytes(path.str());
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + n + 24 + 8);
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["a"]["dtype"], "F32");
  EXPECT_EQ(header["a"]["shape"], nlohmann::json({2, 3}));
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json({0, 24}));
  EXPECT_EQ(header["b"]["dtype"], "BF16");
  EXPECT_EQ(header["b"]["shape"], nlohmann::json({4}));
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json({24, 32}));
  EXPECT_EQ(header["__metadata__"], nlohmann::json({{"k", "v"}}));
  EXPECT_EQ(header.size(), 3u);
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + n, a.raw(), 24), 0);
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + n + 24, b.raw(), 8), 0);
}

TEST(Safetensors, RejectsBadFiles) {
  TempPath path(".safetensors");
  write_safetensors(path.str(), {{"w", make_tensor({64, 64}, DType::f32)}, {"b", make_tensor({64}, DType::f32)}});
  const std::string good = read_bytes(path.str());

  fs::resize_file(path.str(), good.size() / 2);
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "truncated"});
  write_bytes(path.str(), good.substr(0, 4));
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "truncated"});
  write_bytes(path.str(), good.substr(0, 40));
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "truncated"});

  auto with_header = [](std::string json, const std::string& data) {
    json.append((8 - json.size() % 8) % 8, ' ');
    uint64_t n = json.size();
    return std::string(reinterpret_cast<const char*>(&n), 8) + json + data;
  };
  write_bytes(path.str(), with_header("{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]", ""));
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "invalid JSON header"});
  write_bytes(path.str(), with_header(R"({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})", "1234"));
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "'w'", "unsupported dtype \"F16\""});
  write_bytes(path.str(), with_header(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", "1234"));
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "'w'", "data_offsets"});
  write_bytes(path.str(), with_header(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", "12345678"));
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "'w'", "starts at data byte 4"});
  write_bytes(path.str(), with_header(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", "12345678"));
  expect_error([&] { read_safetensors(path.str()); }, {path.str(), "4 bytes after the last tensor"});
  expect_error([&] { read_safetensors(path.str() + ".missing"); }, {path.str() + ".missing", "cannot open"});
}

TEST(Safetensors, FailedWriteLeavesExistingFileUntouched) {
  TempPath path(".safetensors");
  write_safetensors(path.str(), {{"w", make_tensor({4}, DType::f32)}});
  const std::string before = read_bytes(path.str());
  expect_error([&] { write_safetensors(path.str(), {{"w", make_tensor({4}, DType::f32)}, {"w", make_tensor({4}, DType::f32)}}); },
               {path.str(), "'w' given twice"});
  EXPECT_EQ(read_bytes(path.str()), before);
  EXPECT_FALSE(fs::exists(path.str() + ".tmp"));
}

// ---- Hugging Face DeepseekV4 export ----

// A small V4 with every layer kind: window-only, CSA (m = 4), HCA (m' = 8), CSA, window-only; two hash layers;
// an MTP block.
ModelConfig tiny_v4() {
  ModelConfig c;
  c.arch = "deepseek_v4";
  c.vocab_size = 64;
  c.dim = 32;
  c.n_layers = 5;
  c.n_heads = 4;
  c.max_seq_len = 64;
  c.norm_eps = 1e-6;
  c.head_dim = 16;
  c.rope_dim = 8;
  c.q_lora_rank = 24;
  c.o_groups = 2;
  c.o_lora_rank = 8;
  c.window = 8;
  c.compress_ratios = {0, 4, 8, 4, 0, 0};
  c.csa_ratio = 4;
  c.yarn_factor = 4;
  c.yarn_original_len = 16;
  c.index_n_heads = 2;
  c.index_head_dim = 8;
  c.index_topk = 16;
  c.indexer_fp4 = false;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.n_activated_experts = 2;
  c.moe_inter_dim = 16;
  c.n_hash_layers = 2;
  c.route_scale = 1.5;
  c.swiglu_limit = 0.5;  // low enough that the clamps act on the test's activations
  c.hc_mult = 4;
  c.mtp_depth = 1;
  return c;
}

// Tessera V4 parameter names and shapes, written out from docs/model.md's table (independently of the exporter).
std::vector<std::pair<std::string, Shape>> tessera_v4_shapes(const ModelConfig& c) {
  const int64_t V = c.vocab_size, d = c.dim, n = c.hc_mult, H = c.n_heads, hd = c.head_dim, dc = c.q_lora_rank,
                g = c.o_groups, dg = c.o_lora_rank, E = c.n_routed_experts, F = c.moe_inter_dim,
                k = c.n_activated_experts, HI = c.index_n_heads, cI = c.index_head_dim, mix = 2 * n + n * n;
  std::vector<std::pair<std::string, Shape>> s;
  auto block = [&](const std::string& L, int64_t m, bool csa, bool hash) {
    for (const char* site : {"hc_attn", "hc_ffn"}) {
      s.push_back({L + site + ".fn", {mix, n * d}});
      s.push_back({L + site + ".base", {mix}});
      s.push_back({L + site + ".scale", {3}});
    }
    s.push_back({L + "attn_norm", {d}});
    s.push_back({L + "ffn_norm", {d}});
    s.push_back({L + "attn.wq_a", {dc, d}});
    s.push_back({L + "attn.q_norm", {dc}});
    s.push_back({L + "attn.wq_b", {H * hd, dc}});
    s.push_back({L + "attn.wkv", {hd, d}});
    s.push_back({L + "attn.kv_norm", {hd}});
    s.push_back({L + "attn.sink", {H}});
    s.push_back({L + "attn.wo_a", {g, dg, H * hd / g}});
    s.push_back({L + "attn.wo_b", {d, g * dg}});
    if (m > 0) {
      int64_t S = csa ? 2 : 1;
      s.push_back({L + "attn.compressor.wkv", {S * hd, d}});
      s.push_back({L + "attn.compressor.wgate", {S * hd, d}});
      s.push_back({L + "attn.compressor.ape", {m, S * hd}});
      s.push_back({L + "attn.compressor.norm", {hd}});
    }
    if (csa) {
      s.push_back({L + "attn.indexer.wq_b", {HI * cI, dc}});
      s.push_back({L + "attn.indexer.weights_proj", {HI, d}});
      s.push_back({L + "attn.indexer.compressor.wkv", {2 * cI, d}});
      s.push_back({L + "attn.indexer.compressor.wgate", {2 * cI, d}});
      s.push_back({L + "attn.indexer.compressor.ape", {m, 2 * cI}});
      s.push_back({L + "attn.indexer.compressor.norm", {cI}});
    }
    s.push_back({L + "ffn.gate.weight", {E, d}});
    s.push_back({L + "ffn.gate.bias", {E}});  // a buffer in every layer; the hash layers do not use it
    if (hash) s.push_back({L + "ffn.gate.tid2eid", {V, k}});
    s.push_back({L + "ffn.experts.w1", {E, F, d}});
    s.push_back({L + "ffn.experts.w3", {E, F, d}});
    s.push_back({L + "ffn.experts.w2", {E, d, F}});
    s.push_back({L + "ffn.shared.w1", {c.n_shared_experts * F, d}});
    s.push_back({L + "ffn.shared.w3", {c.n_shared_experts * F, d}});
    s.push_back({L + "ffn.shared.w2", {d, c.n_shared_experts * F}});
  };
  s.push_back({"tok_embeddings", {V, d}});
  for (int64_t l = 0; l < c.n_layers; ++l)
    block(cat("layers.", l, "."), c.layer_ratio(l), c.layer_is_csa(l), c.layer_is_hash(l));
  s.push_back({"hc_head.fn", {n, n * d}});
  s.push_back({"hc_head.base", {n}});
  s.push_back({"hc_head.scale", {1}});
  s.push_back({"norm", {d}});
  s.push_back({"output", {V, d}});
  if (c.mtp_depth) {
    s.push_back({"mtp.e_norm", {d}});
    s.push_back({"mtp.h_norm", {d}});
    s.push_back({"mtp.e_proj", {d, d}});
    s.push_back({"mtp.h_proj", {d, d}});
    block("mtp.block.", 0, false, false);
    s.push_back({"mtp.hc_head.fn", {n, n * d}});
    s.push_back({"mtp.hc_head.base", {n}});
    s.push_back({"mtp.hc_head.scale", {1}});
    s.push_back({"mtp.norm", {d}});
  }
  return s;
}

// Fake weights. index_values: every element distinct (index and seed), to trace each one through the mapping.
// Otherwise random with the scales of a working model (unit-RMS activations), every part of the forward active:
// norms near 1, sizeable hc base/scale, sinks, ape and balancing bias; tid2eid k distinct experts per token.
NamedTensors fake_v4_params(const ModelConfig& c, bool index_values, uint64_t seed = 7) {
  NamedTensors out;
  int stream = 0;
  for (const auto& [name, shape] : tessera_v4_shapes(c)) {
    Rng rng{seed, stream_id("fake-v4", stream++)};
    if (name.ends_with("tid2eid")) {
      Tensor t = Tensor::empty(shape, DType::i32);
      for (int64_t v = 0; v < shape[0]; ++v) {
        std::vector<int32_t> perm(c.n_routed_experts);
        for (int32_t e = 0; e < c.n_routed_experts; ++e) perm[e] = e;
        for (int64_t i = 0; i < shape[1]; ++i) {  // partial Fisher-Yates
          int64_t j = i + int64_t(rng.below(v * 64 + i, perm.size() - i));
          std::swap(perm[i], perm[j]);
          t.data<int32_t>()[v * shape[1] + i] = perm[i];
        }
      }
      out.emplace_back(name, t);
      continue;
    }
    Tensor t = Tensor::empty(shape, DType::f32);
    float* p = t.data<float>();
    int64_t N = t.numel();
    if (index_values) {
      for (int64_t i = 0; i < N; ++i) p[i] = float(stream * 100000 + i);
    } else if (shape.size() == 1 || name.ends_with(".ape")) {
      double mean = 0, std = 0.5;
      if (name.ends_with("norm") || name.ends_with(".norm") || name == "norm") mean = 1, std = 0.2;
      if (name.ends_with(".scale")) mean = 0.6, std = 0.2;
      if (name.ends_with(".sink")) mean = 0, std = 1;
      if (name.ends_with("gate.bias")) mean = 0, std = 0.1;
      rng.fill_normal(p, N, mean, std);
    } else {
      double std = name == "tok_embeddings" ? 1.0 : 1.0 / std::sqrt(double(shape.back()));
      rng.fill_normal(p, N, 0, std);
    }
    out.emplace_back(name, t);
  }
  return out;
}

const Tensor& find(const NamedTensors& ts, const std::string& name) {
  for (const auto& [n, t] : ts)
    if (n == name) return t;
  throw std::runtime_error("no tensor " + name);
}

TEST(HfExportV4, MapsEveryParameterToTheHuggingFaceNameAndLayout) {
  ModelConfig c = tiny_v4();
  NamedTensors ours = fake_v4_params(c, true);
  NamedTensors hf = hf_v4_tensors(c, ours);
  auto want = hf_v4_param_shapes(c);
  ASSERT_EQ(hf.size(), want.size());
  for (size_t i = 0; i < hf.size(); ++i) {
    EXPECT_EQ(hf[i].first, want[i].first);
    EXPECT_EQ(hf[i].second.shape(), want[i].second) << hf[i].first;
    EXPECT_EQ(hf[i].second.dtype(), hf[i].first.ends_with("tid2eid") ? DType::i64 : DType::f32) << hf[i].first;
  }
  std::set<std::string> names;
  for (const auto& [n, t] : hf) names.insert(n);
  for (const auto& n : names) EXPECT_EQ(n.find("mtp"), std::string::npos) << n;

  // Same-layout parameters keep their bytes.
  for (const auto& [h, t] : std::vector<std::pair<std::string, std::string>>{
           {"model.embed_tokens.weight", "tok_embeddings"},
           {"lm_head.weight", "output"},
           {"model.norm.weight", "norm"},
           {"model.hc_head.hc_fn", "hc_head.fn"},
           {"model.hc_head.hc_scale", "hc_head.scale"},
           {"model.layers.1.attn_hc.fn", "layers.1.hc_attn.fn"},
           {"model.layers.2.ffn_hc.base", "layers.2.hc_ffn.base"},
           {"model.layers.3.input_layernorm.weight", "layers.3.attn_norm"},
           {"model.layers.3.post_attention_layernorm.weight", "layers.3.ffn_norm"},
           {"model.layers.0.self_attn.sinks", "layers.0.attn.sink"},
           {"model.layers.0.self_attn.q_a_proj.weight", "layers.0.attn.wq_a"},
           {"model.layers.0.self_attn.q_a_norm.weight", "layers.0.attn.q_norm"},
           {"model.layers.0.self_attn.q_b_proj.weight", "layers.0.attn.wq_b"},
           {"model.layers.0.self_attn.kv_proj.weight", "layers.0.attn.wkv"},
           {"model.layers.0.self_attn.kv_norm.weight", "layers.0.attn.kv_norm"},
           {"model.layers.0.self_attn.o_b_proj.weight", "layers.0.attn.wo_b"},
           {"model.layers.1.self_attn.compressor.kv_proj.weight", "layers.1.attn.compressor.wkv"},
           {"model.layers.1.self_attn.compressor.gate_proj.weight", "layers.1.attn.compressor.wgate"},
           {"model.layers.1.self_attn.compressor.position_bias", "layers.1.attn.compressor.ape"},
           {"model.layers.1.self_attn.compressor.kv_norm.weight", "layers.1.attn.compressor.norm"},
           {"model.layers.1.self_attn.compressor.indexer.kv_proj.weight", "layers.1.attn.indexer.compressor.wkv"},
           {"model.layers.1.self_attn.compressor.indexer.gate_proj.weight", "layers.1.attn.indexer.compressor.wgate"},
           {"model.layers.1.self_attn.compressor.indexer.position_bias", "layers.1.attn.indexer.compressor.ape"},
           {"model.layers.1.self_attn.compressor.indexer.kv_norm.weight", "layers.1.attn.indexer.compressor.norm"},
           {"model.layers.1.self_attn.compressor.indexer.q_b_proj.weight", "layers.1.attn.indexer.wq_b"},
           {"model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight", "layers.1.attn.indexer.weights_proj"},
           {"model.layers.2.self_attn.compressor.kv_proj.weight", "layers.2.attn.compressor.wkv"},
           {"model.layers.2.self_attn.compressor.position_bias", "layers.2.attn.compressor.ape"},
           {"model.layers.2.mlp.gate.weight", "layers.2.ffn.gate.weight"},
           {"model.layers.2.mlp.gate.e_score_correction_bias", "layers.2.ffn.gate.bias"},
           {"model.layers.2.mlp.experts.down_proj", "layers.2.ffn.experts.w2"},
           {"model.layers.2.mlp.shared_experts.gate_proj.weight", "layers.2.ffn.shared.w1"},
           {"model.layers.2.mlp.shared_experts.up_proj.weight", "layers.2.ffn.shared.w3"},
           {"model.layers.2.mlp.shared_experts.down_proj.weight", "layers.2.ffn.shared.w2"}}) {
    SCOPED_TRACE(h);
    const Tensor &a = find(hf, h), &b = find(ours, t);
    ASSERT_EQ(a.shape(), b.shape());
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
  }
  // Grouped output projection: (g, d_g, H c / g) -> (g d_g, H c / g), row r = group r / d_g, row r % d_g.
  const Tensor &wo_a = find(ours, "layers.4.attn.wo_a"), &o_a = find(hf, "model.layers.4.self_attn.o_a_proj.weight");
  EXPECT_EQ(o_a.shape(), (Shape{16, 32}));
  EXPECT_EQ(std::memcmp(o_a.raw(), wo_a.raw(), wo_a.nbytes()), 0);
  // Experts: gate_up_proj[e] = [w1[e]; w3[e]] (HF chunks gate, then up).
  const Tensor &w1 = find(ours, "layers.3.ffn.experts.w1"), &w3 = find(ours, "layers.3.ffn.experts.w3");
  const Tensor& gu = find(hf, "model.layers.3.mlp.experts.gate_up_proj");
  const int64_t E = 4, F = 16, d = 32;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t f = 0; f < F; ++f)
      for (int64_t i = 0; i < d; i += 7) {
        EXPECT_EQ(gu.data<float>()[(e * 2 * F + f) * d + i], w1.data<float>()[(e * F + f) * d + i]);
        EXPECT_EQ(gu.data<float>()[(e * 2 * F + F + f) * d + i], w3.data<float>()[(e * F + f) * d + i]);
      }
  // Hash layers: tid2eid as int64, no balancing bias; score-routed layers: the bias, no table.
  for (int64_t l = 0; l < c.n_layers; ++l) {
    std::string P = cat("model.layers.", l, ".mlp.gate.");
    EXPECT_EQ(names.count(P + "tid2eid"), l < 2 ? 1u : 0u) << l;
    EXPECT_EQ(names.count(P + "e_score_correction_bias"), l < 2 ? 0u : 1u) << l;
  }
  const Tensor &t32 = find(ours, "layers.1.ffn.gate.tid2eid"), &t64 = find(hf, "model.layers.1.mlp.gate.tid2eid");
  for (int64_t i = 0; i < t32.numel(); ++i) ASSERT_EQ(t64.data<int64_t>()[i], t32.data<int32_t>()[i]);
  // Compressors only where the layer compresses; indexers only in CSA layers.
  for (int64_t l : {0, 4}) EXPECT_EQ(names.count(cat("model.layers.", l, ".self_attn.compressor.kv_proj.weight")), 0u);
  EXPECT_EQ(names.count("model.layers.2.self_attn.compressor.indexer.kv_proj.weight"), 0u);
  EXPECT_EQ(find(hf, "model.layers.2.self_attn.compressor.kv_proj.weight").shape(), (Shape{16, 32}));
  EXPECT_EQ(find(hf, "model.layers.3.self_attn.compressor.kv_proj.weight").shape(), (Shape{32, 32}));
  // bf16 parameters are widened to f32.
  NamedTensors bf = ours;
  for (auto& [n, t] : bf)
    if (t.dtype() == DType::f32) t = t.to(DType::bf16);
  NamedTensors hf_bf = hf_v4_tensors(c, bf);
  EXPECT_EQ(find(hf_bf, "lm_head.weight").dtype(), DType::f32);
  EXPECT_EQ(find(hf_bf, "lm_head.weight").data<float>()[5], from_bf16(find(bf, "output").data<bf16>()[5]));
}

TEST(HfExportV4, ConfigJsonDescribesTheModel) {
  ModelConfig c = tiny_v4();
  auto j = nlohmann::json::parse(hf_v4_config(c, 0, 1));
  EXPECT_EQ(j["model_type"], "deepseek_v4");
  EXPECT_EQ(j["architectures"], nlohmann::json({"DeepseekV4ForCausalLM"}));
  EXPECT_EQ(j["layer_types"], nlohmann::json({"sliding_attention", "compressed_sparse_attention",
                                               "heavily_compressed_attention", "compressed_sparse_attention",
                                               "sliding_attention"}));
  EXPECT_EQ(j["mlp_layer_types"], nlohmann::json({"hash_moe", "hash_moe", "moe", "moe", "moe"}));
  EXPECT_EQ(j["compress_rates"]["compressed_sparse_attention"], 4);
  EXPECT_EQ(j["compress_rates"]["heavily_compressed_attention"], 8);
  EXPECT_EQ(j["num_nextn_predict_layers"], 0);
  EXPECT_EQ(j["num_key_value_heads"], 1);
  EXPECT_EQ(j["sliding_window"], 8);
  EXPECT_EQ(j["partial_rotary_factor"], 0.5);
  EXPECT_EQ(j["swiglu_limit"], 0.5);
  EXPECT_EQ(j["routed_scaling_factor"], 1.5);
  EXPECT_EQ(j["scoring_func"], "sqrtsoftplus");
  EXPECT_EQ(j["rms_norm_eps"], 1e-6);
  EXPECT_EQ(j["bos_token_id"], 0);
  EXPECT_EQ(j["eos_token_id"], 1);
  EXPECT_EQ(j["rope_parameters"]["main"]["rope_type"], "default");
  EXPECT_EQ(j["rope_parameters"]["main"]["rope_theta"], 10000.0);
  auto yarn = j["rope_parameters"]["compress"];
  EXPECT_EQ(yarn["rope_type"], "yarn");
  EXPECT_EQ(yarn["rope_theta"], 160000.0);
  EXPECT_EQ(yarn["factor"], 4.0);
  EXPECT_EQ(yarn["original_max_position_embeddings"], 16);
  EXPECT_EQ(yarn["attention_factor"], 1.0);

  c.yarn_factor = 1;
  c.swiglu_limit = 0;
  c.compress_ratios = {0, 0, 4, 0, 0};
  j = nlohmann::json::parse(hf_v4_config(c, 2, 3));
  EXPECT_EQ(j["rope_parameters"]["compress"]["rope_type"], "default");
  EXPECT_FALSE(j["rope_parameters"]["compress"].contains("factor"));
  EXPECT_GT(j["swiglu_limit"].get<double>(), 1e29);  // no clamp
  EXPECT_EQ(j["compress_rates"]["heavily_compressed_attention"], 128);  // no HCA layer: HF's default
}

TEST(HfExportV4, RejectsWhatHuggingFaceCannotExpress) {
  ModelConfig c = tiny_v4();
  NamedTensors ours = fake_v4_params(c, true);
  ModelConfig bad = c;
  bad.score_func = "softmax";
  expect_error([&] { hf_v4_config(bad, 0, 1); }, {"score_func", "softmax"});
  bad = c;
  bad.n_shared_experts = 2;
  expect_error([&] { hf_v4_tensors(bad, ours); }, {"n_shared_experts", "2"});
  bad = c;
  bad.compress_ratios = {0, 4, 8, 16, 0};
  expect_error([&] { hf_v4_config(bad, 0, 1); }, {"HCA", "8", "16"});
  bad = c;
  bad.arch = "dense";
  expect_error([&] { hf_v4_config(bad, 0, 1); }, {"deepseek_v4"});

  NamedTensors missing;
  for (const auto& nt : ours)
    if (nt.first != "layers.2.attn.compressor.ape") missing.push_back(nt);
  expect_error([&] { hf_v4_tensors(c, missing); }, {"layers.2.attn.compressor.ape"});
  NamedTensors extra = ours;
  extra.emplace_back("layers.0.attn.wq", Tensor::zeros({4}, DType::f32));
  expect_error([&] { hf_v4_tensors(c, extra); }, {"no DeepseekV4ForCausalLM counterpart", "'layers.0.attn.wq'"});
  NamedTensors wrong = ours;
  for (auto& [n, t] : wrong)
    if (n == "layers.3.ffn.experts.w1") t = Tensor::zeros({4, 32, 16}, DType::f32);
  expect_error([&] { hf_v4_tensors(c, wrong); }, {"layers.3.ffn.experts.w1", "(4, 16, 32)"});
  NamedTensors bad_table = ours;
  for (auto& [n, t] : bad_table)
    if (n == "layers.0.ffn.gate.tid2eid") t.data<int32_t>()[3] = 4;
  expect_error([&] { hf_v4_tensors(c, bad_table); }, {"layers.0.ffn.gate.tid2eid", "expert 4"});
}

TEST(HfExportV4, ExportsACheckpointFile) {
  ModelConfig c = tiny_v4();
  TempPath ckpt(".h5");
  NamedTensors fake = fake_v4_params(c, false);
  std::vector<Param> store(fake.size());
  ParamList params;
  for (size_t i = 0; i < fake.size(); ++i) {
    store[i].name = fake[i].first;
    store[i].value = fake[i].second;
    params.push_back(&store[i]);
  }
  save_checkpoint(ckpt.str(), c, params, nullptr, CheckpointMeta{});
  auto dir = fs::temp_directory_path() / cat("tessera_test_io_hfv4_", ::getpid());
  export_hf(ckpt.str(), dir.string(), 0, 1);
  auto back = read_safetensors((dir / "model.safetensors").string());
  auto want = hf_v4_param_shapes(c);
  ASSERT_EQ(back.size(), want.size());
  for (size_t i = 0; i < back.size(); ++i) EXPECT_EQ(back[i].first, want[i].first);
  expect_same(find(back, "lm_head.weight"), find(fake, "output"));
  auto j = nlohmann::json::parse(read_bytes((dir / "config.json").string()));
  EXPECT_EQ(j["model_type"], "deepseek_v4");
  EXPECT_EQ(j["num_hidden_layers"], 5);
  fs::remove_all(dir);
}

// Not a unit test: writes a random tiny V4 for tests/reference/check_v4_hf_export.py, which loads DIR/hf with
// transformers (no missing or unexpected keys) and compares its logits with a PyTorch transcription of
// docs/model.md run on DIR/tessera.safetensors. Run with TESSERA_V4_HF_DUMP=DIR --gtest_also_run_disabled_tests
// --gtest_filter=HfExportV4.DISABLED_DumpForHf.
TEST(HfExportV4, DISABLED_DumpForHf) {
  const char* dir_env = std::getenv("TESSERA_V4_HF_DUMP");
  ASSERT_NE(dir_env, nullptr) << "set TESSERA_V4_HF_DUMP";
  fs::path dir = dir_env;
  fs::create_directories(dir);
  ModelConfig c = tiny_v4();
  NamedTensors params = fake_v4_params(c, false);
  write_hf_v4(c, params, (dir / "hf").string(), 0, 1);
  write_safetensors((dir / "tessera.safetensors").string(), params, {{"format", "pt"}});
  std::ofstream(dir / "tessera_config.json") << tessera::testing::v4_config_json(c) << "\n";
}

}  // namespace
}  // namespace tessera::io
