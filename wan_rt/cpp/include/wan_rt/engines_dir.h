// An engines dir as `wan-rt build` writes it (wan_rt/runtime/engines_dir.py owns the format):
// engines.json (index), pipeline.json (how to make a video: wan_rt/runtime/pipeline_config.py),
// tokenizer/spiece.model, and one folder per component with manifest.json and its graphs.
//
// Everything the C++ runtime knows about the model comes from here; nothing needs a checkpoint.
// An engine that cannot run here is refused with one line naming the component, what differs and
// the command that rebuilds it, in the words of the Python runtime: another torch, another CPU
// vector ISA, missing files, another model's engines, a backend other than AOTInductor.
// What only Python can check: that the engines still match a checkpoint's weights (the engines
// dir carries its own weights, so there is nothing to compare them with here).
#pragma once

#include "wan_rt/aoti_graph.h"

#include <array>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace wan_rt {

struct Stage {
  std::string component;  // "dit_high_noise" | "dit_low_noise" | "dit"
  double min_timestep;    // the stage runs while timestep >= this (boundary x 1000; 0 for the last)
  double guide_scale;
};

// A diffusers scheduler_config.json, as the pipeline samples it when the solver is not overridden.
struct SchedulerFromConfig {
  std::string solver;
  double shift;
  std::vector<int64_t> disable_corrector;
};

struct SamplingDefaults {
  std::string solver;  // "unipc" | "dpm++" | "euler"
  std::string grid;    // "official" | "diffusers"
  double shift;
  std::string negative_prompt;
  std::optional<SchedulerFromConfig> from_scheduler_config;
};

// pipeline.json: the model's wiring and defaults.
struct PipelineConfig {
  std::string spec_name, spec_hash, task;  // task: "t2v" | "i2v" | "ti2v"
  std::vector<Stage> stages;               // high noise -> low noise
  int64_t height, width, num_frames, steps, fps;
  SamplingDefaults sampling;
  std::array<int64_t, 3> vae_stride;  // (time, height, width)
  int64_t z_dim;
  std::array<int64_t, 3> patch_size;
  int64_t text_len;  // the model's; engines built with `--text-len` state theirs in their profiles (S)
  bool per_token_timestep;
  std::string tokenizer;  // absolute path of spiece.model
  std::map<std::string, std::string> compute_dtypes;  // component -> "float32" | "bfloat16" | "float16"

  int64_t spatial_multiple() const { return vae_stride[1] * patch_size[1]; }
  const Stage& stage_for(double timestep) const;
  std::vector<std::string> components() const;  // text_encoder, the DiTs, vae_encoder, vae_decoder
  // [C, T, H, W] of the latent for a video of num_frames x height x width pixels.
  std::array<int64_t, 4> latent_shape(int64_t height, int64_t width, int64_t num_frames) const;
};

struct GraphFiles {
  std::string package, weights;  // absolute paths
};

struct EngineManifest {
  std::string component, backend, precision, spec_hash;
  std::map<std::string, GraphFiles> graphs;  // "main" | "text"+"main" | "first"+"step"
  Sizes profile_min, profile_max;
};

class EnginesDir {
 public:
  // Reads engines.json and pipeline.json; throws StaleEngineError (one line) when either is
  // missing, unreadable, not an AOTInductor build, or from another model.
  explicit EnginesDir(const std::string& path);

  const std::string& path() const { return path_; }  // as the user gave it, normalised like Python's Path
  const std::string& model() const { return model_; }  // the checkpoint or preset it was built from
  const PipelineConfig& config() const { return config_; }

  // The request's size against every engine's shape profile (Python's check_fits message).
  void check_fits(int64_t height, int64_t width, int64_t num_frames) const;

  // One component's manifest after every check this process can make (see above).
  EngineManifest verified(const std::string& component) const;

 private:
  std::string path_, root_, model_, backend_, precision_, spec_hash_;
  std::vector<std::string> components_;
  PipelineConfig config_;

  std::string fix() const;
};

}  // namespace wan_rt
