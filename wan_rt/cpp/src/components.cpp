#include "components.h"

#include <ATen/ATen.h>

#include "wan_rt/errors.h"

namespace wan_rt::detail {
namespace {

const GraphFiles& files(const EngineManifest& m, const std::string& graph) {
  auto it = m.graphs.find(graph);
  if (it == m.graphs.end() && graph == "main" && m.graphs.count("embed"))
    throw StaleEngineError(m.component + " was built with --step-cache or --dit-parts (the step as several graphs), "
                             "which the C++ runtime does not run; rebuild without --step-cache / --dit-parts");
  if (it == m.graphs.end()) throw std::runtime_error(m.component + ": the manifest has no graph " + graph);
  return it->second;
}

}  // namespace

at::ScalarType dtype_named(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  return at::kFloat;
}

TextEncoder::TextEncoder(const EngineManifest& m, const c10::Device& device, at::ScalarType compute)
    : main_(files(m, "main").package, files(m, "main").weights, device, compute, m.component + "/main") {}

at::Tensor TextEncoder::operator()(const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  return main_.run({{"input_ids", input_ids}, {"attention_mask", attention_mask}}).at("context").to(at::kFloat);
}

DiT::DiT(EngineManifest m, const c10::Device& device, at::ScalarType compute)
    : manifest_(std::move(m)), device_(device), compute_(compute) {}

void DiT::load() {
  std::lock_guard<std::mutex> lock(loading_);
  if (main_) return;
  const auto &t = files(manifest_, "text"), &s = files(manifest_, "main");
  text_ = std::make_unique<AotiGraph>(t.package, t.weights, device_, compute_, manifest_.component + "/text");
  main_ = std::make_unique<AotiGraph>(s.package, s.weights, device_, compute_, manifest_.component + "/main");
}

at::Tensor DiT::operator()(const at::Tensor& latents, const at::Tensor& timestep, const at::Tensor& context) {
  load();
  at::Tensor kv;
  for (const auto& [ctx, cached] : kv_)
    if (ctx.unsafeGetTensorImpl() == context.unsafeGetTensorImpl()) kv = cached;
  if (!kv.defined()) {
    kv = text_->run({{"context", context}}).at("text_kv");
    kv_.insert(kv_.begin(), {context, kv});
    if (kv_.size() > 2) kv_.pop_back();
  }
  return main_->run({{"latents", latents}, {"timestep", timestep}, {"text_kv", kv}}).at("noise_pred").to(at::kFloat);
}

StreamingVAE::StreamingVAE(const std::string& name, const EngineManifest& m, const PipelineConfig& config,
                           const c10::Device& device)
    : config_(config),
      device_(device),
      first_(files(m, "first").package, files(m, "first").weights, device, at::kFloat, name + "/first"),
      step_(files(m, "step").package, files(m, "step").weights, device, at::kFloat, name + "/step") {}

at::Tensor StreamingVAE::stream(const std::vector<at::Tensor>& chunks, const std::string& x_name, int64_t batch,
                                int64_t h, int64_t w) {
  const Sizes sizes{{"B", batch}, {"h", h}, {"w", w}};
  std::map<std::string, at::Tensor> cache;  // zeros: the official "no cache yet"
  for (const auto& t : first_.contract().inputs) {
    if (t.name.rfind("cache_in_", 0) != 0) continue;
    std::vector<int64_t> shape;
    for (const auto& d : t.dims) shape.push_back(d.resolve(sizes));
    cache[t.name] = at::zeros(shape, at::TensorOptions().device(device_).dtype(at::kFloat));
  }
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < chunks.size(); ++i) {
    AotiGraph& graph = i == 0 ? first_ : step_;
    auto inputs = cache;
    inputs[x_name] = chunks[i];
    auto result = graph.run(inputs);
    outs.push_back(result.at(graph.contract().outputs.front().name).to(at::kFloat));
    cache.clear();
    for (auto& [name, value] : result)
      if (name.rfind("cache_out_", 0) == 0) cache["cache_in_" + name.substr(10)] = value;
  }
  return at::cat(outs, 2);
}

at::Tensor StreamingVAE::decode(const at::Tensor& z) {
  std::vector<at::Tensor> chunks;
  for (int64_t i = 0; i < z.size(2); ++i) chunks.push_back(z.slice(2, i, i + 1));
  return stream(chunks, "latents", z.size(0), z.size(3), z.size(4));
}

at::Tensor StreamingVAE::encode(const at::Tensor& v) {
  const int64_t st = config_.vae_stride[0];
  std::vector<at::Tensor> chunks{v.slice(2, 0, 1)};  // frame 0 alone, then chunks of st frames
  for (int64_t i = 1; i < v.size(2); i += st) chunks.push_back(v.slice(2, i, i + st));
  return stream(chunks, "video", v.size(0), v.size(3) / config_.vae_stride[1], v.size(4) / config_.vae_stride[2]);
}

}  // namespace wan_rt::detail
