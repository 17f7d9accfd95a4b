// wan_rt AOTInductor engines from C++: load one graph folder that `wan-rt build --backend aoti`
// wrote (model.pt2 + weights.safetensors) and run it with named tensors, as the Python runtime
// does (wan_rt/runtime/backends/aoti.py). Header only; link against libtorch.
//
//   wan_rt::AotiGraph dit("engines/dit_high_noise/main", torch::kCPU);
//   auto out = dit.run({{"latents", x}, {"timestep", t}, {"text_kv", kv}});  // {"noise_pred": ...}
//
// The package is code only: its weights are in weights.safetensors beside it and are handed to
// the compiled model here (load_constants, every constant required), exactly as in Python.
// Input and output names come from the package's metadata (`wan_rt.input_names`,
// `wan_rt.output_names`); run() checks the names only: dtypes and the size ranges the package
// was compiled for are the caller's contract here (the Python runner checks them; outside the
// compiled range the generated code is not safe).
// A package whose DiT uses wan_rt's Triton kernels (`--kernels triton`) calls them as Python
// custom ops and cannot run in a process without Python: build C++-served engines with
// `--kernels torch`.

#pragma once

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace wan_rt {

// ------------------------------------------------------------------ safetensors
// The format: an 8-byte little-endian header length, a JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the raw tensor bytes. The parser below reads exactly that JSON subset.
namespace detail {

struct Json {
  enum Kind { Null, Number, String, Array, Object } kind = Null;
  double number = 0;
  std::string text;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  Json parse() {
    Json v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("safetensors header: " + why + " at byte " + std::to_string(i_));
  }
  void space() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  char peek() {
    space();
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        ++i_;  // names are ASCII module paths; keep escaped characters as they are
        if (i_ >= s_.size()) fail("bad escape");
      }
      out += s_[i_++];
    }
    expect('"');
    return out;
  }
  Json value() {
    Json v;
    char c = peek();
    if (c == '{') {
      v.kind = Json::Object;
      ++i_;
      if (peek() == '}') { ++i_; return v; }
      while (true) {
        std::string key = string();
        expect(':');
        v.fields.emplace_back(key, value());
        if (peek() == ',') { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::Array;
      ++i_;
      if (peek() == ']') { ++i_; return v; }
      while (true) {
        v.items.push_back(value());
        if (peek() == ',') { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::String;
      v.text = string();
      return v;
    }
    size_t end = i_;
    while (end < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[end])) || std::strchr("+-.eE", s_[end]))) ++end;
    if (end == i_) fail("unsupported value");
    v.kind = Json::Number;
    v.number = std::stod(s_.substr(i_, end - i_));
    i_ = end;
    return v;
  }
};

inline const Json& field(const Json& obj, const std::string& key) {
  for (const auto& [k, v] : obj.fields)
    if (k == key) return v;
  throw std::runtime_error("safetensors header: missing \"" + key + "\"");
}

inline const std::map<std::string, at::ScalarType>& dtypes() {
  static const std::map<std::string, at::ScalarType> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}, {"F8_E4M3", at::kFloat8_e4m3fn},
      {"F8_E5M2", at::kFloat8_e5m2}};
  return table;
}

inline std::string dtype_name(at::ScalarType t) {
  for (const auto& [name, type] : dtypes())
    if (type == t) return name;
  throw std::runtime_error(std::string("safetensors: no name for dtype ") + c10::toString(t));
}

}  // namespace detail

// Every tensor of a .safetensors file, on `device`.
inline std::unordered_map<std::string, at::Tensor> read_safetensors(const std::string& path,
                                                                    const c10::Device& device) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  if (!f) throw std::runtime_error(path + ": truncated header");
  detail::Json root = detail::JsonParser(header).parse();
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& [name, info] : root.fields) {
    if (name == "__metadata__") continue;
    const std::string dtype = detail::field(info, "dtype").text;
    auto it = detail::dtypes().find(dtype);
    if (it == detail::dtypes().end()) throw std::runtime_error(path + ": " + name + " has unsupported dtype " + dtype);
    std::vector<int64_t> shape;
    for (const auto& d : detail::field(info, "shape").items) shape.push_back(static_cast<int64_t>(d.number));
    const auto& offsets = detail::field(info, "data_offsets").items;
    const auto begin = static_cast<int64_t>(offsets.at(0).number), end = static_cast<int64_t>(offsets.at(1).number);
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(it->second));
    if (static_cast<int64_t>(t.nbytes()) != end - begin)
      throw std::runtime_error(path + ": " + name + " has " + std::to_string(end - begin) + " bytes for its shape");
    f.seekg(static_cast<std::streamoff>(8 + n + begin));
    f.read(static_cast<char*>(t.data_ptr()), end - begin);
    if (!f) throw std::runtime_error(path + ": truncated data for " + name);
    out.emplace(name, t.to(device));
  }
  return out;
}

// Tensors (moved to the CPU, made contiguous) into a .safetensors file.
inline void write_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  std::ostringstream header;
  std::vector<at::Tensor> blobs;
  int64_t offset = 0;
  header << "{";
  bool first = true;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    header << (first ? "" : ",") << "\"" << name << "\":{\"dtype\":\"" << detail::dtype_name(t.scalar_type())
           << "\",\"shape\":[";
    for (int64_t i = 0; i < t.dim(); ++i) header << (i ? "," : "") << t.size(i);
    header << "],\"data_offsets\":[" << offset << "," << offset + static_cast<int64_t>(t.nbytes()) << "]}";
    offset += static_cast<int64_t>(t.nbytes());
    blobs.push_back(t);
    first = false;
  }
  header << "}";
  std::string h = header.str();
  while (h.size() % 8) h += ' ';  // the format pads the header to 8 bytes
  std::ofstream f(path, std::ios::binary);
  const uint64_t n = h.size();
  f.write(reinterpret_cast<const char*>(&n), 8);
  f.write(h.data(), static_cast<std::streamsize>(n));
  for (const auto& t : blobs) f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

// ------------------------------------------------------------------ one engine graph
inline std::vector<std::string> split_names(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// `folder`/model.pt2, after checking the folder holds an engine graph (torch's own error for a
// missing file does not name it).
inline std::string package_path(const std::string& folder) {
  for (const char* name : {"/model.pt2", "/weights.safetensors"})
    if (!std::ifstream(folder + name)) throw std::runtime_error(folder + name + " not found: not a wan_rt aoti graph folder");
  return folder + "/model.pt2";
}

class AotiGraph {
 public:
  // `folder`: a graph folder of an engines dir (e.g. engines/dit_high_noise/main).
  AotiGraph(const std::string& folder, const c10::Device& device)
      : device_(device),
        loader_(package_path(folder), "model", false, 1, device.is_cuda() ? device.index() : -1) {
    auto meta = loader_.get_metadata();
    if (!meta.count("wan_rt.input_names"))
      throw std::runtime_error(folder + ": the package has no wan_rt I/O names; rebuild it with `wan-rt build`");
    if (meta.count("wan_rt.custom_ops"))
      throw std::runtime_error(folder + ": the package calls wan_rt's Triton kernels (" + meta["wan_rt.custom_ops"] +
                               "), Python custom ops; build C++-served engines with --kernels torch");
    inputs_ = split_names(meta["wan_rt.input_names"]);
    outputs_ = split_names(meta["wan_rt.output_names"]);
    weights_ = read_safetensors(folder + "/weights.safetensors", device);
    loader_.load_constants(weights_, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
  }

  const std::vector<std::string>& input_names() const { return inputs_; }
  const std::vector<std::string>& output_names() const { return outputs_; }

  std::map<std::string, at::Tensor> run(const std::map<std::string, at::Tensor>& named) {
    std::vector<at::Tensor> args;
    for (const auto& name : inputs_) {
      auto it = named.find(name);
      if (it == named.end()) throw std::runtime_error("missing input " + name);
      args.push_back(it->second.to(device_).contiguous());
    }
    if (named.size() != inputs_.size()) throw std::runtime_error("unexpected inputs (the graph takes " +
                                                                 std::to_string(inputs_.size()) + ")");
    c10::InferenceMode guard;
    std::vector<at::Tensor> out = loader_.run(args);
    if (out.size() != outputs_.size()) throw std::runtime_error("the package returned an unexpected output count");
    std::map<std::string, at::Tensor> result;
    for (size_t i = 0; i < out.size(); ++i) result.emplace(outputs_[i], out[i]);
    return result;
  }

 private:
  c10::Device device_;
  torch::inductor::AOTIModelPackageLoader loader_;
  std::unordered_map<std::string, at::Tensor> weights_;  // user_managed: the model reads these
  std::vector<std::string> inputs_, outputs_;
};

}  // namespace wan_rt
