// Tensor file I/O: HDF5 checkpoints (round trips, atomic commit, corruption and truncation) and safetensors.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "io/h5.h"
#include "io/safetensors.h"

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

}  // namespace
}  // namespace tessera::io
