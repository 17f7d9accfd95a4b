#include "wan_rt/safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <vector>

namespace wan_rt {
namespace {

const std::map<std::string, at::ScalarType>& dtypes() {
  static const std::map<std::string, at::ScalarType> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}, {"F8_E4M3", at::kFloat8_e4m3fn},
      {"F8_E5M2", at::kFloat8_e5m2}};
  return table;
}

std::string dtype_name(at::ScalarType t) {
  for (const auto& [name, type] : dtypes())
    if (type == t) return name;
  throw std::runtime_error(std::string("safetensors: no name for dtype ") + c10::toString(t));
}

}  // namespace

std::unordered_map<std::string, at::Tensor> read_safetensors(const std::string& path, const c10::Device& device) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  if (!f || n > (uint64_t{1} << 30)) throw std::runtime_error(path + ": not a safetensors file");
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  if (!f) throw std::runtime_error(path + ": truncated header");
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": unreadable header (" + e.what() + ")");
  }
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& [name, info] : root.items()) {
    if (name == "__metadata__") continue;
    const std::string dtype = info.at("dtype").get<std::string>();
    auto it = dtypes().find(dtype);
    if (it == dtypes().end()) throw std::runtime_error(path + ": " + name + " has unsupported dtype " + dtype);
    const auto shape = info.at("shape").get<std::vector<int64_t>>();
    const auto offsets = info.at("data_offsets").get<std::vector<int64_t>>();
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(it->second));
    if (offsets.size() != 2 || static_cast<int64_t>(t.nbytes()) != offsets[1] - offsets[0])
      throw std::runtime_error(path + ": " + name + " has " + std::to_string(offsets.at(1) - offsets.at(0)) +
                               " bytes for its shape");
    f.seekg(static_cast<std::streamoff>(8 + n + offsets[0]));
    f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!f) throw std::runtime_error(path + ": truncated data for " + name);
    out.emplace(name, t.to(device));
  }
  return out;
}

std::unordered_map<std::string, at::Tensor> read_weight_refs(const std::string& path, const c10::Device& device) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": unreadable (" + e.what() + ")");
  }
  std::vector<std::string> files;
  std::vector<std::ifstream> streams;  // one per checkpoint file, opened once
  for (const auto& f : root.at("files")) {
    std::filesystem::path where(f.at("path").get<std::string>());
    if (where.is_relative()) where = std::filesystem::path(path).parent_path() / where;
    std::error_code ec;
    const auto size = std::filesystem::file_size(where, ec);
    if (ec || size != f.at("size").get<uint64_t>())
      throw std::runtime_error(path + ": the checkpoint file its weights are read from, " + where.string() +
                               ", is missing or changed; rebuild the engines with `wan-rt build`");
    files.push_back(where.string());
    streams.emplace_back(where, std::ios::binary);
  }
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& [name, info] : root.at("tensors").items()) {
    const std::string dtype = info.at("dtype").get<std::string>();
    auto it = dtypes().find(dtype);
    if (it == dtypes().end()) throw std::runtime_error(path + ": " + name + " has unsupported dtype " + dtype);
    const size_t index = info.at("file").get<size_t>();
    const std::string& file = files.at(index);
    at::Tensor t = at::empty(info.at("shape").get<std::vector<int64_t>>(), at::TensorOptions().dtype(it->second));
    std::ifstream& f = streams.at(index);
    f.seekg(static_cast<std::streamoff>(info.at("offset").get<int64_t>()));
    f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!f) throw std::runtime_error(path + ": truncated data for " + name + " in " + file);
    out.emplace(name, t.to(device));
  }
  return out;
}

void write_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<at::Tensor> blobs;
  int64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const auto nbytes = static_cast<int64_t>(t.nbytes());
    header[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    blobs.push_back(t);
  }
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';  // the format pads the header to 8 bytes
  const std::filesystem::path target(path);
  const auto tmp = target.parent_path() / ("." + target.filename().string() + ".partial");
  {
    std::ofstream f(tmp, std::ios::binary);
    const uint64_t n = h.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f.write(h.data(), static_cast<std::streamsize>(n));
    for (const auto& t : blobs)
      f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!f) {
      std::filesystem::remove(tmp);
      throw std::runtime_error("cannot write " + path);
    }
  }
  std::filesystem::rename(tmp, target);
}

}  // namespace wan_rt
