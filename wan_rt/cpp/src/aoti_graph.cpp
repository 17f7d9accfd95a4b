#include "wan_rt/aoti_graph.h"

#include "wan_rt/errors.h"
#include "wan_rt/safetensors.h"

#include <ATen/ATen.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/InferenceMode.h>
#include <torch/version.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <filesystem>
#include <sstream>

namespace wan_rt {
namespace {

Dim parse_dim(const nlohmann::json& d) {
  if (d.is_number_integer()) return Dim{d.get<int64_t>(), ""};
  const auto s = d.get<std::string>();
  const auto star = s.find('*');
  if (star == std::string::npos) return Dim{1, s};
  return Dim{std::stoll(s.substr(0, star)), s.substr(star + 1)};
}

std::vector<TensorContract> parse_tensors(const nlohmann::json& list) {
  std::vector<TensorContract> out;
  for (const auto& t : list) {  // [name, dtype, dims]
    TensorContract c{t.at(0).get<std::string>(), t.at(1).get<std::string>(), {}};
    for (const auto& d : t.at(2)) c.dims.push_back(parse_dim(d));
    out.push_back(std::move(c));
  }
  return out;
}

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  return s.str() + "]";
}

std::string dims_str(const std::vector<Dim>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + dims[i].str();
  return s + "]";
}

std::string sizes_str(const Sizes& sizes) {
  std::string s = "{";
  for (const auto& [k, v] : sizes) s += (s.size() > 1 ? ", '" : "'") + k + "': " + std::to_string(v);
  return s + "}";
}

std::string require_file(const std::string& path, const std::string& what) {
  if (!std::filesystem::is_regular_file(path)) throw StaleEngineError(path + " not found: " + what);
  return path;
}

// The x86 flags inductor's x86_isa_checker reads: torch.cpu.get_capabilities() from torch 2.13,
// the at::cpu::is_*_supported functions before (the only version built and run here is 2.13).
bool cpu_has(const std::string& flag) {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 13
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto it = caps.find(flag);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
#else
  if (flag == "avx2") return at::cpu::is_avx2_supported();
  if (flag == "avx512_f") return at::cpu::is_avx512_supported();
  if (flag == "avx512_vnni") return at::cpu::is_avx512_vnni_supported();
  if (flag == "amx_tile") return at::cpu::is_amx_tile_supported();
  return false;
#endif
}

}  // namespace

std::string torch_version() {
#ifdef WAN_RT_TORCH_VERSION
  return WAN_RT_TORCH_VERSION;
#else
  return TORCH_VERSION;
#endif
}

bool same_torch(const std::string& recorded) {
  const std::string ours = torch_version();
  if (recorded == ours) return true;
  return ours.find('+') == std::string::npos && recorded.substr(0, recorded.find('+')) == ours;
}

std::string device_key() {
  // inductor's supported_vec_isa_list, best first, each named by its flags; pick_vec_isa takes
  // the first the CPU has, or the one ATEN_CPU_CAPABILITY names ("default": none).
  std::vector<std::string> valid;
#if defined(__x86_64__) || defined(_M_X64)
  const bool avx512 = cpu_has("avx512_f"), vnni = avx512 && cpu_has("avx512_vnni");
  if (avx512 && vnni && cpu_has("amx_tile") && at::cpu::init_amx()) valid.push_back("avx512 avx512_vnni amx_tile");
  if (avx512 && vnni) valid.push_back("avx512 avx512_vnni");
  if (avx512) valid.push_back("avx512");
  if (cpu_has("avx2")) valid.push_back("avx2");
#elif defined(__aarch64__)
  valid.push_back("asimd");
#endif
  std::string isa = valid.empty() ? "scalar" : valid.front();
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string want = cap;
    if (want == "default") isa = "scalar";
    if (want == "avx2" || want == "avx512")
      for (const auto& v : valid)
        if (v.find(want) != std::string::npos) {
          isa = v;
          break;
        }
  }
  return "cpu-" + isa;
}

bool same_device(const std::string& recorded) {
  // With a GPU the Python key adds "+cuda-sm<major><minor>"; this library has no CUDA headers to
  // read the capability, so on a GPU machine only the CPU part and the presence of a GPU compare.
  const std::string cpu = device_key();
  if (!at::hasCUDA()) return recorded == cpu;
  return recorded.rfind(cpu + "+cuda-sm", 0) == 0;
}

int64_t Dim::resolve(const Sizes& sizes) const {
  if (symbol.empty()) return value;
  auto it = sizes.find(symbol);
  if (it == sizes.end()) throw std::runtime_error("size " + symbol + " is not known");
  return value * it->second;
}

std::string Dim::str() const {
  if (symbol.empty()) return std::to_string(value);
  return value == 1 ? "'" + symbol + "'" : "'" + std::to_string(value) + "*" + symbol + "'";
}

AotiGraph::AotiGraph(const std::string& package, const std::string& weights, const c10::Device& device,
                     at::ScalarType compute_dtype, std::string where)
    : where_(where.empty() ? package : std::move(where)), device_(device), compute_(compute_dtype) {
  require_file(package, "not a wan_rt aoti graph");
  require_file(weights, "not a wan_rt aoti graph");
  loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
      package, "model", false, 1, device.is_cuda() ? device.index() : -1);
  auto meta = loader_->get_metadata();
  if (meta.count("wan_rt.custom_ops"))
    throw StaleEngineError(where_ + ": the package calls wan_rt's Triton kernels (" + meta["wan_rt.custom_ops"] +
                           "), Python custom ops; build C++-served engines with --kernels torch");
  if (!meta.count("wan_rt.contract"))
    throw StaleEngineError(where_ + ": the package has no wan_rt contract metadata; rebuild it with `wan-rt build`");
  const auto contract = nlohmann::json::parse(meta["wan_rt.contract"]);
  contract_.inputs = parse_tensors(contract.at("inputs"));
  contract_.outputs = parse_tensors(contract.at("outputs"));
  contract_.min = contract.at("min").get<Sizes>();
  contract_.max = contract.at("max").get<Sizes>();
  weights_ = read_safetensors(weights, device);
  // Constants that are a checkpoint's own bytes are pointed at, not copied (export/aoti_export.py).
  const auto refs = std::filesystem::path(weights).parent_path() / "weights.json";
  if (std::filesystem::is_regular_file(refs))
    for (auto& [name, t] : read_weight_refs(refs.string(), device)) weights_.emplace(name, std::move(t));
  loader_->load_constants(weights_, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
}

AotiGraph::AotiGraph(const std::string& folder, const c10::Device& device)
    : AotiGraph(folder + "/model.pt2", folder + "/weights.safetensors", device, at::kFloat, folder) {}

AotiGraph::~AotiGraph() = default;

Sizes AotiGraph::read_sizes(const std::vector<at::Tensor>& args) const {
  Sizes sizes;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& t = contract_.inputs[i];
    const auto shape = args[i].sizes();
    bool ok = shape.size() == t.dims.size();
    for (size_t k = 0; ok && k < shape.size(); ++k) {
      const Dim& d = t.dims[k];
      if (d.symbol.empty()) {
        ok = d.value == shape[k];
        continue;
      }
      ok = shape[k] % d.value == 0 && sizes.emplace(d.symbol, shape[k] / d.value).first->second == shape[k] / d.value;
    }
    if (!ok)
      throw std::invalid_argument(where_ + ": " + t.name + " has shape " + shape_str(shape) + ", which does not fit " +
                                  dims_str(t.dims) + " (sizes from the inputs before it: " + sizes_str(sizes) + ")");
  }
  for (const auto& [sym, n] : sizes) {
    const int64_t lo = contract_.min.at(sym), hi = contract_.max.at(sym);
    if (n < lo || n > hi)
      throw std::invalid_argument(where_ + ": " + sym + " = " + std::to_string(n) +
                                  " is outside the range this package was compiled for [" + std::to_string(lo) +
                                  ", " + std::to_string(hi) + "]; rebuild for this size");
  }
  return sizes;
}

std::map<std::string, at::Tensor> AotiGraph::run(const std::map<std::string, at::Tensor>& inputs) {
  std::vector<at::Tensor> args;
  for (const auto& t : contract_.inputs) {
    auto it = inputs.find(t.name);
    if (it == inputs.end()) throw std::invalid_argument(where_ + ": missing input '" + t.name + "'");
    const at::ScalarType want = t.dtype == "int64" ? at::kLong : t.dtype == "float32" ? at::kFloat : compute_;
    const at::Tensor& x = it->second;
    if (x.is_floating_point() != at::isFloatingType(want))
      throw std::invalid_argument(where_ + ": " + t.name + " is " + std::string(c10::toString(x.scalar_type())) +
                                  ", the graph takes " + c10::toString(want));
    args.push_back(x.to(device_, want).contiguous());
  }
  if (inputs.size() != args.size())
    throw std::invalid_argument(where_ + ": unexpected inputs (the graph takes " + std::to_string(args.size()) + ")");
  read_sizes(args);
  c10::InferenceMode guard;
  std::vector<at::Tensor> out = loader_->run(args);
  if (out.size() != contract_.outputs.size())
    throw std::runtime_error(where_ + ": the package returned " + std::to_string(out.size()) + " outputs, expected " +
                             std::to_string(contract_.outputs.size()));
  std::map<std::string, at::Tensor> result;
  for (size_t i = 0; i < out.size(); ++i) result.emplace(contract_.outputs[i].name, out[i]);
  return result;
}

}  // namespace wan_rt
