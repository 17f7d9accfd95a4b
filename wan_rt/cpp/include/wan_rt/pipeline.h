// The whole generation from an engines dir, equal to wan_rt's Python pipeline (wan_rt/pipeline.py)
// on the same engines and seed: umT5 tokens -> text encoder -> noise from torch's CPU generator ->
// (I2V / TI2V: the first frame encoded as the condition; video-to-video: the source encoded and
// noised to the first step `strength` leaves) -> the denoising stages with CFG as one
// batch of two and the expert switch at the boundary (the next expert loaded ahead) -> the VAE
// decoded chunk by chunk with its cache -> frames.
//
//   wan_rt::Pipeline pipe("engines", c10::Device("cpu"));
//   wan_rt::Request request;
//   request.prompt = "a fox in the snow";
//   request.seed = 42;
//   wan_rt::Video video = pipe.generate(request, [](const wan_rt::StepInfo& s) {
//     std::cout << s.step + 1 << "/" << s.num_steps << "\n";
//     return true;  // false stops at this step boundary (GenerationInterrupted)
//   });
//   video.save_mp4("fox.mp4");
//
// Unset request fields take the model's defaults from the engines dir (pipeline.json), exactly as
// `wan-rt run` does. One prompt per call (CFG's cond/uncond run as a batch of two).
#pragma once

#include "wan_rt/engines_dir.h"
#include "wan_rt/errors.h"
#include "wan_rt/image.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace wan_rt {

struct Request {
  std::string prompt;
  std::optional<std::string> negative_prompt;  // default: the checkpoint's own
  std::optional<std::string> image;            // first frame (i2v, ti2v): a file ...
  std::optional<RgbImage> image_rgb;           // ... or its pixels
  std::optional<std::string> video;            // video-to-video source: a file (read_video) ...
  std::optional<std::vector<RgbImage>> video_rgb;  // ... or its frames
  std::optional<double> strength;              // video-to-video: in (0, 1], default 0.8
  std::optional<int64_t> height, width, num_frames, steps;
  std::optional<double> guidance;              // CFG of the high-noise expert (or the only DiT)
  std::optional<double> guidance_2;            // CFG of the low-noise expert
  std::optional<double> shift;                 // flow shift
  std::optional<std::string> solver;           // "unipc" | "dpm++" | "euler"
  int64_t seed = 0;
};

struct StepInfo {
  int64_t step, num_steps;  // step index in [0, num_steps): the steps that run (video-to-video: the last ones)
  int64_t timestep;
  std::string component;    // the expert that ran it
};
using StepCallback = std::function<bool(const StepInfo&)>;

struct Video {
  at::Tensor frames;  // float32 [F, H, W, 3] in [0, 1]: what `wan-rt run --frames-out` saves
  int64_t fps = 16;
  std::vector<std::pair<std::string, double>> timings;  // seconds per stage, in order, named as in Python
  std::map<std::string, int64_t> steps_per_stage;

  at::Tensor to_uint8() const;                    // round(frames * 255), as wan_rt.video does
  std::string save_mp4(const std::string& path) const;  // returns the codec used
};

// The request's one-line errors, as `wan-rt run` words them (sizes, frames, steps, solver, shift,
// the image the task needs or refuses; `image_arg` names the missing image; a video's frame count,
// so its frames must be read: video_rgb). The size the engines were built for is
// EnginesDir::check_fits. generate() runs both.
void check_request(const EnginesDir& engines, const Request& request, const std::string& image_arg = "an image");

// The video-to-video flags' errors that need no frames (strength without a video, out of (0, 1],
// running no step), in `wan-rt run`'s words; check_request runs it too.
void check_strength(const EnginesDir& engines, const Request& request);

// The frames generate() makes: num_frames, else the source video's count trimmed to 4k+1, else the model's.
int64_t num_frames_of(const PipelineConfig& config, const Request& request);

class Pipeline {
 public:
  // Verifies every engine (stale ones refused, one line) and loads the text encoder and VAE;
  // the experts load when their stage comes (the next one ahead of it, on a thread).
  explicit Pipeline(const std::string& engines_dir, const c10::Device& device = c10::Device("cpu"));
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  const EnginesDir& engines() const;
  const PipelineConfig& config() const;

  Video generate(const Request& request, const StepCallback& on_step = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace wan_rt
