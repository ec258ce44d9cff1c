// safetensors export and import (the Hugging Face format): an 8-byte little-endian header length, a JSON header
// {"__metadata__": {str: str}, "<name>": {"dtype": "F32"|"F64"|"BF16"|"I32"|"I64", "shape": [...],
// "data_offsets": [begin, end]}} padded with spaces to a multiple of 8 bytes, then the raw little-endian data.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace tessera::io {

// Data is laid out in the given order. Written atomically: "<path>.tmp", fsync, rename, fsync of the directory.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Tensors in file (data offset) order. The header, dtypes, shapes and offsets are validated (the data must tile the
// file exactly); any problem is a tessera::Error naming the file.
std::vector<std::pair<std::string, Tensor>> read_safetensors(const std::string& path);

}  // namespace tessera::io
