// The components the pipeline talks to, each over the graphs of one engine (named tensors in,
// float32 tensors out), as wan_rt/runtime/engine_component.py: the text encoder; a DiT expert
// (`text` once per prompt, cached, `main` every step); the streaming VAE (`first`, then `step`
// chunks carrying the causal-conv cache). Private to the library.
#pragma once

#include "wan_rt/aoti_graph.h"
#include "wan_rt/engines_dir.h"

#include <ATen/core/Tensor.h>

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace wan_rt::detail {

at::ScalarType dtype_named(const std::string& name);  // "float32" | "bfloat16" | "float16"

class TextEncoder {
 public:
  TextEncoder(const EngineManifest& m, const c10::Device& device, at::ScalarType compute);
  at::Tensor operator()(const at::Tensor& input_ids, const at::Tensor& attention_mask);  // -> context

 private:
  AotiGraph main_;
};

class DiT {
 public:
  DiT(EngineManifest m, const c10::Device& device, at::ScalarType compute);
  void load();  // both graphs; safe to call from a loader thread while nothing runs this expert
  at::Tensor operator()(const at::Tensor& latents, const at::Tensor& timestep, const at::Tensor& context);
  void clear_cache() { kv_.clear(); }

 private:
  EngineManifest manifest_;
  c10::Device device_;
  at::ScalarType compute_;
  std::mutex loading_;
  std::unique_ptr<AotiGraph> text_, main_;
  // Cross-attention K/V per context tensor, keyed by identity (the entry keeps the tensor alive,
  // so its address cannot be reused); two entries hold CFG's prompt and negative prompt.
  std::vector<std::pair<at::Tensor, at::Tensor>> kv_;
};

class StreamingVAE {
 public:
  StreamingVAE(const std::string& name, const EngineManifest& m, const PipelineConfig& config,
               const c10::Device& device);
  at::Tensor decode(const at::Tensor& latents);  // [B, z, T, h, w] -> video [B, 3, F, H, W]
  at::Tensor encode(const at::Tensor& video);    // [B, 3, F, H, W] -> latents [B, z, T, h, w]

 private:
  const PipelineConfig& config_;
  c10::Device device_;
  AotiGraph first_, step_;
  at::Tensor stream(const std::vector<at::Tensor>& chunks, const std::string& x_name, int64_t batch, int64_t h,
                    int64_t w);
};

}  // namespace wan_rt::detail
