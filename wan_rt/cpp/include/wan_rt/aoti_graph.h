// One AOTInductor engine graph of a wan_rt engines dir (model.pt2 + weights.safetensors, as
// `wan-rt build --backend aoti` writes them) run with named tensors, as the Python runtime does
// (wan_rt/runtime/backends/aoti.py).
//
//   wan_rt::AotiGraph dit("engines/dit_high_noise/main", c10::Device("cpu"));
//   auto out = dit.run({{"latents", x}, {"timestep", t}, {"text_kv", kv}});  // {"noise_pred": ...}
//
// The package is code only: its weights are handed to the compiled model at load time (every
// constant required). The package's metadata carries wan_rt's contract (input/output names,
// dtypes, dims, and the range of every size symbol it was compiled for); run() checks inputs
// against it before the compiled code reads them, because AOTInductor does not (outside its
// compiled range the generated code indexes out of bounds rather than raising).
// A package built with wan_rt's Triton kernels (`--kernels triton`) calls Python custom ops and
// is refused here: build C++-served engines with `--kernels torch`.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace wan_rt {

using Sizes = std::map<std::string, int64_t>;  // size symbol ("B", "T", "h", "w", "L", "S") -> value

// A dimension of a graph tensor: a number, a symbol, or a multiple of one ("2*h").
struct Dim {
  int64_t value = 0;   // the number when `symbol` is empty, else the multiple
  std::string symbol;
  int64_t resolve(const Sizes& sizes) const;
  std::string str() const;
};

struct TensorContract {
  std::string name;
  std::string dtype;  // "compute" (the engine's precision), "float32" or "int64"
  std::vector<Dim> dims;
};

struct GraphContract {
  std::vector<TensorContract> inputs, outputs;
  Sizes min, max;  // the range of every symbol the package was compiled for
};

// What an AOTInductor package is tied to (the manifests' tool_versions "torch" and "device"):
// the torch this library was built against (torch.__version__ of the wheel when built by
// `python -m wan_rt.cpp build`; the libtorch version without a local part otherwise, which then
// matches any local part), and the CPU vector ISA inductor compiles for here, named as the Python
// runtime names it (runtime/backends/aoti.py device_key: inductor's pick_vec_isa from the CPU's
// flags; its compiler probes are not repeated here).
std::string torch_version();
bool same_torch(const std::string& recorded);
std::string device_key();
bool same_device(const std::string& recorded);

class AotiGraph {
 public:
  // `package`: a .pt2 file; `weights`: the weights.safetensors beside it. `where` names the graph
  // in errors (e.g. "dit_high_noise/main"). `compute_dtype`: what "compute" tensors are.
  AotiGraph(const std::string& package, const std::string& weights, const c10::Device& device,
            at::ScalarType compute_dtype = at::kFloat, std::string where = "");
  // A graph folder: folder/model.pt2 + folder/weights.safetensors.
  AotiGraph(const std::string& folder, const c10::Device& device);
  ~AotiGraph();
  AotiGraph(const AotiGraph&) = delete;
  AotiGraph& operator=(const AotiGraph&) = delete;

  const GraphContract& contract() const { return contract_; }

  // Inputs by name (floating ones cast to the contract's dtype, all moved to the device); checks
  // the shapes against the contract and the compiled ranges; outputs by name.
  std::map<std::string, at::Tensor> run(const std::map<std::string, at::Tensor>& inputs);

 private:
  std::string where_;
  c10::Device device_;
  at::ScalarType compute_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::unordered_map<std::string, at::Tensor> weights_;  // handed to the model (user managed): kept alive here
  GraphContract contract_;

  Sizes read_sizes(const std::vector<at::Tensor>& args) const;
};

}  // namespace wan_rt
