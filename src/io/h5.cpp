#include "io/h5.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <type_traits>
#include <utility>

namespace tessera::io {

static_assert(std::is_same_v<hid_t, int64_t>, "H5Reader and H5Writer keep hid_t as int64_t");

namespace {

// Owns one HDF5 identifier and releases it with the matching close function.
class Handle {
 public:
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Handle(Handle&& o) noexcept : id_(std::exchange(o.id_, -1)), close_(o.close_) {}
  Handle& operator=(Handle&&) = delete;
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  hid_t get() const { return id_; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

// Errors are reported through exceptions; HDF5's own stack dump to stderr would only be noise.
void quiet_hdf5() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

struct ErrorDetail {
  std::string innermost;  // the most specific description on the HDF5 error stack
  bool checksum = false;  // some frame reports a data or metadata checksum failure
};

herr_t collect_error(unsigned n, const H5E_error2_t* e, void* data) {
  auto* detail = static_cast<ErrorDetail*>(data);
  std::string desc = e->desc ? e->desc : "";
  if (n == 0) detail->innermost = desc;
  if (desc.find("checksum") != std::string::npos) detail->checksum = true;
  return 0;
}

ErrorDetail take_error_detail() {
  ErrorDetail detail;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collect_error, &detail);
  H5Eclear2(H5E_DEFAULT);
  return detail;
}

// Throws `context` completed with what HDF5 reported.
[[noreturn]] void fail_hdf5(const std::string& context) {
  ErrorDetail detail = take_error_detail();
  if (detail.checksum) TS_FAIL(context, ": the file is corrupted (", detail.innermost, ")");
  if (detail.innermost.empty()) TS_FAIL(context);
  TS_FAIL(context, " (", detail.innermost, ")");
}

hid_t check_id(hid_t id, const std::string& context) {
  if (id < 0) fail_hdf5(context);
  return id;
}

void check(herr_t rc, const std::string& context) {
  if (rc < 0) fail_hdf5(context);
}

std::string where(const std::string& path) { return cat("file '", path, "'"); }

// Names are '/'-separated paths relative to the root: no leading, trailing or doubled '/', no "." or "..".
void check_name(const std::string& path, const std::string& name) {
  bool ok = !name.empty();
  for (size_t begin = 0; ok && begin <= name.size();) {
    size_t end = std::min(name.find('/', begin), name.size());
    std::string part = name.substr(begin, end - begin);
    ok = !part.empty() && part != "." && part != "..";
    begin = end + 1;
  }
  if (!ok) TS_FAIL(where(path), ": invalid tensor name '", name, "'");
}

// The type of the object at `name` below `loc`, or H5I_BADID when there is none. H5Lexists requires every
// intermediate group to exist, so the path is checked one component at a time.
H5I_type_t object_type(hid_t loc, const std::string& name) {
  for (size_t slash = name.find('/'); slash != std::string::npos; slash = name.find('/', slash + 1))
    if (H5Lexists(loc, name.substr(0, slash).c_str(), H5P_DEFAULT) <= 0) return H5I_BADID;
  if (H5Lexists(loc, name.c_str(), H5P_DEFAULT) <= 0) return H5I_BADID;
  hid_t obj = H5Oopen(loc, name.c_str(), H5P_DEFAULT);
  if (obj < 0) return H5I_BADID;
  H5I_type_t type = H5Iget_type(obj);
  H5Oclose(obj);
  return type;
}

hid_t file_type(DType t) {
  switch (t) {
    case DType::f32: return H5T_IEEE_F32LE;
    case DType::f64: return H5T_IEEE_F64LE;
    case DType::bf16: return H5T_STD_U16LE;
    case DType::i32: return H5T_STD_I32LE;
    case DType::i64: return H5T_STD_I64LE;
  }
  TS_CHECK(false, "unknown dtype");
}

hid_t memory_type(DType t) {
  switch (t) {
    case DType::f32: return H5T_NATIVE_FLOAT;
    case DType::f64: return H5T_NATIVE_DOUBLE;
    case DType::bf16: return H5T_NATIVE_UINT16;
    case DType::i32: return H5T_NATIVE_INT32;
    case DType::i64: return H5T_NATIVE_INT64;
  }
  TS_CHECK(false, "unknown dtype");
}

// Chunks of about 1 MiB: they fit HDF5's default chunk cache, and per-chunk overhead stays negligible. Leading
// dimensions are split first, so a chunk is a contiguous run of the row-major data whenever one row fits.
std::vector<hsize_t> chunk_dims(const Shape& shape, size_t elem_size) {
  constexpr size_t target = size_t{1} << 20;
  std::vector<hsize_t> chunk(shape.begin(), shape.end());
  size_t inner = elem_size * shape_numel(shape);
  for (size_t d = 0; d < shape.size(); ++d) {
    inner /= shape[d];  // bytes of one step along dimension d
    if (inner >= target) {
      chunk[d] = 1;
      continue;
    }
    chunk[d] = std::min<hsize_t>(shape[d], target / inner);
    break;
  }
  return chunk;
}

// Variable-length UTF-8: what h5py writes for str and reads back as str.
Handle utf8_string_type(const std::string& context) {
  Handle type(check_id(H5Tcopy(H5T_C_S1), context), H5Tclose);
  check(H5Tset_size(type.get(), H5T_VARIABLE), context);
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), context);
  return type;
}

void write_attr_raw(hid_t loc, const std::string& key, hid_t type, const void* value, const std::string& context) {
  htri_t exists = H5Aexists(loc, key.c_str());
  check(exists, context);
  if (exists > 0) check(H5Adelete(loc, key.c_str()), context);
  Handle space(check_id(H5Screate(H5S_SCALAR), context), H5Sclose);
  Handle attr(check_id(H5Acreate2(loc, key.c_str(), type, space.get(), H5P_DEFAULT, H5P_DEFAULT), context), H5Aclose);
  check(H5Awrite(attr.get(), type, value), context);
}

void write_string_attr(hid_t loc, const std::string& key, const std::string& value, const std::string& context) {
  // Variable-length strings end at the first NUL; refuse rather than silently truncate.
  if (value.find('\0') != std::string::npos) TS_FAIL(context, ": string contains a NUL character");
  Handle type = utf8_string_type(context);
  const char* ptr = value.c_str();
  write_attr_raw(loc, key, type.get(), &ptr, context);
}

const char* type_class_name(H5T_class_t c) {
  switch (c) {
    case H5T_INTEGER: return "an integer";
    case H5T_FLOAT: return "a float";
    case H5T_STRING: return "a string";
    default: return "of another type";
  }
}

// Attributes this library reads are single values.
void check_scalar_attr(hid_t attr, const std::string& context) {
  Handle space(check_id(H5Aget_space(attr), context), H5Sclose);
  hssize_t n = H5Sget_simple_extent_npoints(space.get());
  if (n != 1) TS_FAIL(context, " holds ", n, " values, expected one");
}

std::string read_string_attr(hid_t attr, const std::string& context) {
  check_scalar_attr(attr, context);
  Handle type(check_id(H5Aget_type(attr), context), H5Tclose);
  H5T_class_t cls = H5Tget_class(type.get());
  if (cls != H5T_STRING) TS_FAIL(context, " is ", type_class_name(cls), ", expected a string");
  H5T_cset_t cset = H5Tget_cset(type.get());
  htri_t variable = H5Tis_variable_str(type.get());
  check(variable, context);
  if (variable > 0) {
    Handle mem = utf8_string_type(context);
    check(H5Tset_cset(mem.get(), cset), context);  // HDF5 does not convert between character sets
    char* ptr = nullptr;
    check(H5Aread(attr, mem.get(), &ptr), context);
    std::string value = ptr ? ptr : "";
    H5free_memory(ptr);
    return value;
  }
  size_t size = H5Tget_size(type.get());
  std::string value(size, '\0');
  Handle mem(check_id(H5Tcopy(type.get()), context), H5Tclose);
  check(H5Aread(attr, mem.get(), value.data()), context);
  value.resize(std::min(value.find('\0'), value.size()));
  if (H5Tget_strpad(type.get()) == H5T_STR_SPACEPAD) value.erase(value.find_last_not_of(' ') + 1);
  return value;
}

int fsync_or_errno(const std::string& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return errno;
  int err = ::fsync(fd) == 0 ? 0 : errno;
  ::close(fd);
  return err;
}

}  // namespace

namespace detail {

void commit_temp_file(const std::string& tmp_path, const std::string& path) {
  if (int err = fsync_or_errno(tmp_path, O_RDONLY))
    TS_FAIL("cannot sync '", tmp_path, "' to disk: ", std::strerror(err));
  if (std::rename(tmp_path.c_str(), path.c_str()) != 0)
    TS_FAIL("cannot rename '", tmp_path, "' to '", path, "': ", std::strerror(errno));
  // The rename itself is only durable once the directory entry is on disk.
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (int err = fsync_or_errno(dir.empty() ? "." : dir, O_RDONLY | O_DIRECTORY))
    TS_FAIL("cannot sync directory of '", path, "' to disk: ", std::strerror(err));
}

}  // namespace detail

// ---- H5Writer ----

H5Writer::H5Writer(const std::string& path) : path_(path), tmp_path_(path + ".tmp") {
  quiet_hdf5();
  std::string context = cat(where(path_), ": cannot create '", tmp_path_, "'");
  Handle fapl(check_id(H5Pcreate(H5P_FILE_ACCESS), context), H5Pclose);
  // The 1.10 format checksums all metadata (superblock, object headers and the chunk index), so corruption outside
  // the data is detected too; a flipped chunk-index byte in the 1.8 format could silently turn data into fill
  // values. Any HDF5 >= 1.10 reads it, and so does h5py.
  check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_V110), context);
  // Closing the file closes anything still open in it, so commit() never renames a file that is still being written.
  check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG), context);
  file_ = check_id(H5Fcreate(tmp_path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), context);
}

H5Writer::~H5Writer() {
  if (file_ >= 0) H5Fclose(file_);
  if (!committed_) std::remove(tmp_path_.c_str());
}

void H5Writer::check_open() const { TS_CHECK(file_ >= 0, "H5Writer for '", path_, "' used after commit"); }

void H5Writer::write_tensor(const std::string& name, const Tensor& t) {
  check_open();
  check_name(path_, name);
  TS_CHECK(t.defined() && t.is_contiguous(), "write_tensor '", name, "' needs a contiguous tensor");
  std::string context = cat(where(path_), ": cannot write tensor '", name, "'");
  if (object_type(file_, name) != H5I_BADID) TS_FAIL(context, ": the name is already taken");

  std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
  Handle space(check_id(t.ndim() == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(t.ndim(), dims.data(), nullptr),
                        context),
               H5Sclose);
  Handle dcpl(check_id(H5Pcreate(H5P_DATASET_CREATE), context), H5Pclose);
  if (t.ndim() == 0) {
    // A scalar cannot be chunked; compact storage keeps it inside the checksummed object header.
    check(H5Pset_layout(dcpl.get(), H5D_COMPACT), context);
  } else if (t.numel() > 0) {
    std::vector<hsize_t> chunk = chunk_dims(t.shape(), dtype_size(t.dtype()));
    check(H5Pset_chunk(dcpl.get(), t.ndim(), chunk.data()), context);
    check(H5Pset_fletcher32(dcpl.get()), context);
  }
  Handle lcpl(check_id(H5Pcreate(H5P_LINK_CREATE), context), H5Pclose);
  check(H5Pset_create_intermediate_group(lcpl.get(), 1), context);
  Handle dataset(check_id(H5Dcreate2(file_, name.c_str(), file_type(t.dtype()), space.get(), lcpl.get(), dcpl.get(),
                                     H5P_DEFAULT),
                          context),
                 H5Dclose);
  const Tensor host = t.device() == Device::cpu ? t : t.to_device(Device::cpu);  // GPU tensors go via the host
  if (t.numel() > 0)
    check(H5Dwrite(dataset.get(), memory_type(t.dtype()), H5S_ALL, H5S_ALL, H5P_DEFAULT, host.raw()), context);
  if (t.dtype() == DType::bf16) write_string_attr(dataset.get(), "dtype", "bf16", context);
}

void H5Writer::append(const std::string& name, const Tensor& values) {
  check_open();
  check_name(path_, name);
  TS_CHECK(values.ndim() == 1 && values.device() == Device::cpu && values.is_contiguous(), "append '", name,
           "' needs a 1-D contiguous host tensor");
  std::string context = cat(where(path_), ": cannot append to '", name, "'");
  if (object_type(file_, name) == H5I_BADID) {
    hsize_t zero = 0, unlimited = H5S_UNLIMITED, chunk = (size_t{1} << 20) / dtype_size(values.dtype());
    Handle space(check_id(H5Screate_simple(1, &zero, &unlimited), context), H5Sclose);
    Handle dcpl(check_id(H5Pcreate(H5P_DATASET_CREATE), context), H5Pclose);
    check(H5Pset_chunk(dcpl.get(), 1, &chunk), context);
    check(H5Pset_fletcher32(dcpl.get()), context);
    Handle lcpl(check_id(H5Pcreate(H5P_LINK_CREATE), context), H5Pclose);
    check(H5Pset_create_intermediate_group(lcpl.get(), 1), context);
    Handle created(check_id(H5Dcreate2(file_, name.c_str(), file_type(values.dtype()), space.get(), lcpl.get(),
                                       dcpl.get(), H5P_DEFAULT),
                            context),
                   H5Dclose);
  }
  if (values.numel() == 0) return;
  Handle dataset(check_id(H5Dopen2(file_, name.c_str(), H5P_DEFAULT), context), H5Dclose);
  hsize_t old_size = 0;
  {
    Handle space(check_id(H5Dget_space(dataset.get()), context), H5Sclose);
    H5Sget_simple_extent_dims(space.get(), &old_size, nullptr);
  }
  hsize_t new_size = old_size + values.numel(), count = values.numel();
  check(H5Dset_extent(dataset.get(), &new_size), context);
  Handle file_space(check_id(H5Dget_space(dataset.get()), context), H5Sclose);
  check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &old_size, nullptr, &count, nullptr), context);
  Handle mem_space(check_id(H5Screate_simple(1, &count, nullptr), context), H5Sclose);
  check(H5Dwrite(dataset.get(), memory_type(values.dtype()), mem_space.get(), file_space.get(), H5P_DEFAULT,
                 values.raw()),
        context);
}

void H5Writer::write_attr(const std::string& key, int64_t v) {
  check_open();
  write_attr_raw(file_, key, H5T_NATIVE_INT64, &v, cat(where(path_), ": cannot write attribute '", key, "'"));
}

void H5Writer::write_attr(const std::string& key, double v) {
  check_open();
  write_attr_raw(file_, key, H5T_NATIVE_DOUBLE, &v, cat(where(path_), ": cannot write attribute '", key, "'"));
}

void H5Writer::write_attr(const std::string& key, const std::string& v) {
  check_open();
  write_string_attr(file_, key, v, cat(where(path_), ": cannot write attribute '", key, "'"));
}

void H5Writer::commit() {
  check_open();
  std::string context = cat(where(path_), ": cannot finish writing '", tmp_path_, "'");
  check(H5Fflush(file_, H5F_SCOPE_GLOBAL), context);
  check(H5Fclose(std::exchange(file_, -1)), context);
  detail::commit_temp_file(tmp_path_, path_);
  committed_ = true;
}

// ---- H5Reader ----

H5Reader::H5Reader(const std::string& path) : path_(path) {
  quiet_hdf5();
  std::error_code ec;
  if (!std::filesystem::exists(path_, ec)) TS_FAIL(where(path_), ": no such file");
  file_ = check_id(H5Fopen(path_.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT),
                   cat(where(path_), ": cannot open as HDF5"));
}

H5Reader::~H5Reader() { H5Fclose(file_); }

bool H5Reader::has_tensor(const std::string& name) const { return object_type(file_, name) == H5I_DATASET; }

namespace {
struct Listing {
  std::string prefix;
  std::vector<std::string> names;
};

herr_t list_dataset(hid_t group, const char* name, const H5L_info_t* info, void* data) {
  auto* listing = static_cast<Listing*>(data);
  if (info->type == H5L_TYPE_HARD && object_type(group, name) == H5I_DATASET)
    listing->names.push_back(listing->prefix + name);
  return 0;
}
}  // namespace

std::vector<std::string> H5Reader::tensor_names(const std::string& group) const {
  Listing listing;
  std::string group_path = "/";
  if (!group.empty()) {
    if (object_type(file_, group) != H5I_GROUP) TS_FAIL(where(path_), ": no group '", group, "'");
    group_path = group;
    listing.prefix = group + "/";
  }
  std::string context = cat(where(path_), ": cannot list group '", group_path, "'");
  Handle g(check_id(H5Gopen2(file_, group_path.c_str(), H5P_DEFAULT), context), H5Gclose);
  check(H5Lvisit(g.get(), H5_INDEX_NAME, H5_ITER_INC, list_dataset, &listing), context);
  std::sort(listing.names.begin(), listing.names.end());
  return listing.names;
}

int64_t H5Reader::open_dataset(const std::string& name) const {
  if (!has_tensor(name)) TS_FAIL(where(path_), ": no tensor '", name, "'");
  return check_id(H5Dopen2(file_, name.c_str(), H5P_DEFAULT), cat(where(path_), ": cannot open tensor '", name, "'"));
}

H5Reader::Info H5Reader::info(int64_t dataset, const std::string& name) const {
  std::string context = cat(where(path_), ": cannot read tensor '", name, "'");
  Info out;
  Handle space(check_id(H5Dget_space(dataset), context), H5Sclose);
  int ndims = H5Sget_simple_extent_ndims(space.get());
  if (ndims < 0) fail_hdf5(context);
  std::vector<hsize_t> dims(ndims);
  check(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr), context);
  out.shape.assign(dims.begin(), dims.end());

  Handle type(check_id(H5Dget_type(dataset), context), H5Tclose);
  H5T_class_t cls = H5Tget_class(type.get());
  size_t size = H5Tget_size(type.get());
  bool is_signed = cls == H5T_INTEGER && H5Tget_sign(type.get()) == H5T_SGN_2;
  if (cls == H5T_FLOAT && size == 4) {
    out.dtype = DType::f32;
  } else if (cls == H5T_FLOAT && size == 8) {
    out.dtype = DType::f64;
  } else if (is_signed && size == 4) {
    out.dtype = DType::i32;
  } else if (is_signed && size == 8) {
    out.dtype = DType::i64;
  } else if (cls == H5T_INTEGER && !is_signed && size == 2 && H5Aexists(dataset, "dtype") > 0) {
    Handle attr(check_id(H5Aopen(dataset, "dtype", H5P_DEFAULT), context), H5Aclose);
    std::string tag = read_string_attr(attr.get(), cat(context, ": attribute 'dtype'"));
    if (tag != "bf16") TS_FAIL(context, ": uint16 data tagged dtype='", tag, "', expected 'bf16'");
    out.dtype = DType::bf16;
  } else {
    TS_FAIL(context, ": unsupported element type (", type_class_name(cls), ", ", size,
            " bytes; expected f32, f64, bf16, i32 or i64)");
  }
  return out;
}

void H5Reader::read_data(int64_t dataset, const std::string& name, const Info& info, void* dst) const {
  if (shape_numel(info.shape) == 0) return;
  check(H5Dread(dataset, memory_type(info.dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, dst),
        cat(where(path_), ": cannot read tensor '", name, "'"));
}

Shape H5Reader::shape(const std::string& name) const {
  Handle dataset(open_dataset(name), H5Dclose);
  return info(dataset.get(), name).shape;
}

DType H5Reader::dtype(const std::string& name) const {
  Handle dataset(open_dataset(name), H5Dclose);
  return info(dataset.get(), name).dtype;
}

Tensor H5Reader::read_tensor(const std::string& name) const {
  Handle dataset(open_dataset(name), H5Dclose);
  Info i = info(dataset.get(), name);
  Tensor t = Tensor::empty(i.shape, i.dtype);
  read_data(dataset.get(), name, i, t.raw());
  return t;
}

void H5Reader::read_into(const std::string& name, const Tensor& dst) const {
  TS_CHECK(dst.defined() && dst.is_contiguous(), "read_into '", name, "' needs a contiguous tensor");
  if (dst.device() != Device::cpu) {  // GPU tensors are read via the host
    Tensor host = Tensor::empty(dst.shape(), dst.dtype(), Device::cpu);
    read_into(name, host);
    dst.copy_from(host);
    return;
  }
  Handle dataset(open_dataset(name), H5Dclose);
  Info i = info(dataset.get(), name);
  if (i.shape != dst.shape())
    TS_FAIL(where(path_), ": tensor '", name, "' has shape ", shape_str(i.shape), ", expected ",
            shape_str(dst.shape()));
  if (i.dtype != dst.dtype())
    TS_FAIL(where(path_), ": tensor '", name, "' has dtype ", dtype_name(i.dtype), ", expected ",
            dtype_name(dst.dtype()));
  read_data(dataset.get(), name, i, dst.raw());
}

void H5Reader::read_slice(const std::string& name, int dim, int64_t start, const Tensor& dst) const {
  TS_CHECK(dst.defined() && dst.is_contiguous() && dim >= 0 && dim < dst.ndim(), "read_slice '", name,
           "' needs a contiguous tensor with a dimension ", dim);
  if (dst.device() != Device::cpu) {
    Tensor host = Tensor::empty(dst.shape(), dst.dtype(), Device::cpu);
    read_slice(name, dim, start, host);
    dst.copy_from(host);
    return;
  }
  Handle dataset(open_dataset(name), H5Dclose);
  Info i = info(dataset.get(), name);
  Shape want = dst.shape();
  bool fits = i.shape.size() == want.size() && start >= 0 && start + want[dim] <= i.shape[dim];
  for (size_t d = 0; fits && d < want.size(); ++d) fits = int(d) == dim || i.shape[d] == want[d];
  const std::string what = cat("[", start, ", ", start + want[dim], ") along dimension ", dim);
  if (!fits)
    TS_FAIL(where(path_), ": tensor '", name, "' has shape ", shape_str(i.shape), "; cannot read ", what,
            " into shape ", shape_str(want));
  if (i.dtype != dst.dtype())
    TS_FAIL(where(path_), ": tensor '", name, "' has dtype ", dtype_name(i.dtype), ", expected ",
            dtype_name(dst.dtype()));
  if (dst.numel() == 0) return;
  std::string context = cat(where(path_), ": cannot read ", what, " of '", name, "'");
  std::vector<hsize_t> offset(want.size(), 0), count(want.begin(), want.end());
  offset[dim] = hsize_t(start);
  Handle file_space(check_id(H5Dget_space(dataset.get()), context), H5Sclose);
  check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, offset.data(), nullptr, count.data(), nullptr),
        context);
  Handle mem_space(check_id(H5Screate_simple(int(count.size()), count.data(), nullptr), context), H5Sclose);
  check(H5Dread(dataset.get(), memory_type(i.dtype), mem_space.get(), file_space.get(), H5P_DEFAULT, dst.raw()),
        context);
}

void H5Reader::read_range(const std::string& name, int64_t start, const Tensor& dst) const {
  TS_CHECK(dst.ndim() == 1 && dst.device() == Device::cpu && dst.is_contiguous(), "read_range '", name,
           "' needs a 1-D contiguous host tensor");
  std::string context = cat(where(path_), ": cannot read elements [", start, ", ", start + dst.numel(), ") of '",
                            name, "'");
  Handle dataset(open_dataset(name), H5Dclose);
  Info i = info(dataset.get(), name);
  if (i.shape.size() != 1 || i.dtype != dst.dtype() || start < 0 || start + dst.numel() > i.shape[0])
    TS_FAIL(context, ": the dataset is ", dtype_name(i.dtype), shape_str(i.shape));
  if (dst.numel() == 0) return;
  hsize_t offset = start, count = dst.numel();
  Handle file_space(check_id(H5Dget_space(dataset.get()), context), H5Sclose);
  check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &offset, nullptr, &count, nullptr), context);
  Handle mem_space(check_id(H5Screate_simple(1, &count, nullptr), context), H5Sclose);
  check(H5Dread(dataset.get(), memory_type(i.dtype), mem_space.get(), file_space.get(), H5P_DEFAULT, dst.raw()),
        context);
}

bool H5Reader::has_attr(const std::string& key) const { return H5Aexists(file_, key.c_str()) > 0; }

int64_t H5Reader::open_attr(const std::string& key) const {
  if (!has_attr(key)) TS_FAIL(where(path_), ": no attribute '", key, "'");
  return check_id(H5Aopen(file_, key.c_str(), H5P_DEFAULT), cat(where(path_), ": cannot open attribute '", key, "'"));
}

int64_t H5Reader::attr_int(const std::string& key) const {
  std::string context = cat(where(path_), ": attribute '", key, "'");
  Handle attr(open_attr(key), H5Aclose);
  check_scalar_attr(attr.get(), context);
  Handle type(check_id(H5Aget_type(attr.get()), context), H5Tclose);
  H5T_class_t cls = H5Tget_class(type.get());
  if (cls != H5T_INTEGER) TS_FAIL(context, " is ", type_class_name(cls), ", expected an integer");
  int64_t v = 0;
  check(H5Aread(attr.get(), H5T_NATIVE_INT64, &v), context);
  return v;
}

double H5Reader::attr_double(const std::string& key) const {
  std::string context = cat(where(path_), ": attribute '", key, "'");
  Handle attr(open_attr(key), H5Aclose);
  check_scalar_attr(attr.get(), context);
  Handle type(check_id(H5Aget_type(attr.get()), context), H5Tclose);
  H5T_class_t cls = H5Tget_class(type.get());
  if (cls != H5T_FLOAT) TS_FAIL(context, " is ", type_class_name(cls), ", expected a float");
  double v = 0;
  check(H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &v), context);
  return v;
}

std::string H5Reader::attr_string(const std::string& key) const {
  Handle attr(open_attr(key), H5Aclose);
  return read_string_attr(attr.get(), cat(where(path_), ": attribute '", key, "'"));
}

}  // namespace tessera::io
