#include "wan_rt/pipeline.h"

#include "components.h"
#include "wan_rt/scheduler.h"
#include "wan_rt/tokenizer.h"
#include "wan_rt/video_writer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <charconv>
#include <chrono>
#include <future>

namespace wan_rt {
namespace {

using Clock = std::chrono::steady_clock;

// repr(float) as Python prints it (shortest round trip, ".0" on integers): the errors quote values.
std::string py_float(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, end);
  return s.find_first_of(".eni") == std::string::npos ? s + ".0" : s;
}

constexpr double kDefaultStrength = 0.8;  // wan_rt.pipeline.DEFAULT_STRENGTH

// The request with the model's defaults filled in; video-to-video's frame count defaults to the
// source's, trimmed to 4k+1 (pipeline.source_frame_count).
struct Settings {
  int64_t height, width, num_frames, steps;
  std::string solver;
};

Settings settings(const PipelineConfig& c, const Request& r) {
  int64_t frames = c.num_frames;
  if (r.video_rgb) frames = (static_cast<int64_t>(r.video_rgb->size()) - 1) / 4 * 4 + 1;
  return {r.height.value_or(c.height), r.width.value_or(c.width), r.num_frames.value_or(frames),
          r.steps.value_or(c.steps), r.solver.value_or(c.sampling.solver)};
}

// The first step video-to-video runs (pipeline.strength_start: the last int(steps * strength)).
int64_t strength_start(int64_t steps, double strength) {
  if (!(0.0 < strength && strength <= 1.0))
    throw UsageError("strength must be in (0, 1]; got " + py_float(strength));
  const int64_t run = std::min(static_cast<int64_t>(static_cast<double>(steps) * strength), steps);
  if (run == 0)
    throw UsageError("strength " + py_float(strength) + " of " + std::to_string(steps) +
                     " steps runs no step; raise strength or the step count");
  return steps - run;
}

// guidance drives the first (high-noise) stage, guidance_2 the second, as in diffusers; with
// neither given each stage uses the model's own scale (Pipeline._guide_scales).
std::map<std::string, double> guide_scales(const PipelineConfig& c, const Request& r) {
  std::map<std::string, double> out;
  for (const auto& s : c.stages) out[s.component] = s.guide_scale;
  if (r.guidance) {
    for (const auto& s : c.stages) out[s.component] = *r.guidance;
  }
  if (r.guidance_2 && c.stages.size() > 1) out[c.stages[1].component] = *r.guidance_2;
  return out;
}

// The checkpoint's own diffusers scheduler when there is one and the solver is not overridden.
std::unique_ptr<FlowScheduler> scheduler(const PipelineConfig& c, const Request& r, int64_t steps) {
  const auto& from = c.sampling.from_scheduler_config;
  if (from && (!r.solver || *r.solver == c.sampling.solver))
    return make_scheduler(from->solver, steps, r.shift.value_or(from->shift), "diffusers", from->disable_corrector);
  return make_scheduler(r.solver.value_or(c.sampling.solver), steps, r.shift.value_or(c.sampling.shift),
                        c.sampling.grid);
}

// Consecutive step indices per stage from step `start` on; timesteps decrease, so each stage
// appears once.
std::vector<std::pair<const Stage*, std::vector<int64_t>>> group_by_stage(const PipelineConfig& c,
                                                                          const at::Tensor& timesteps, int64_t start) {
  std::vector<std::pair<const Stage*, std::vector<int64_t>>> groups;
  for (int64_t i = start; i < timesteps.size(0); ++i) {
    const Stage* stage = &c.stage_for(static_cast<double>(timesteps[i].item<int64_t>()));
    if (groups.empty() || groups.back().first != stage) groups.push_back({stage, {}});
    groups.back().second.push_back(i);
  }
  return groups;
}

// Seconds spent in a scope, added to the stage `name` (appended the first time: Python's order).
class Timed {
 public:
  Timed(std::vector<std::pair<std::string, double>>& timings, std::string name)
      : timings_(timings), name_(std::move(name)), start_(Clock::now()) {}
  ~Timed() {
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    for (auto& [stage, total] : timings_)
      if (stage == name_) {
        total += seconds;
        return;
      }
    timings_.emplace_back(name_, seconds);
  }

 private:
  std::vector<std::pair<std::string, double>>& timings_;
  std::string name_;
  Clock::time_point start_;
};

// image -> float32 [1, 3, height, width] in [-1, 1] (wan_rt.video.image_to_tensor).
at::Tensor image_to_tensor(const RgbImage& image, int64_t height, int64_t width) {
  RgbImage resized = resize_lanczos(image, width, height);
  at::Tensor pixels = at::from_blob(resized.pixels.data(), {height, width, 3}, at::kByte).to(at::kFloat) / 255.0;
  return pixels.permute({2, 0, 1}).unsqueeze(0) * 2.0 - 1.0;
}

}  // namespace

at::Tensor Video::to_uint8() const { return (frames.clamp(0, 1) * 255).round().to(at::kByte); }

std::string Video::save_mp4(const std::string& path) const {
  const at::Tensor bytes = to_uint8().contiguous();
  return write_mp4(path, bytes.data_ptr<uint8_t>(), bytes.size(0), bytes.size(1), bytes.size(2), static_cast<int>(fps));
}

int64_t num_frames_of(const PipelineConfig& c, const Request& r) { return settings(c, r).num_frames; }

void check_strength(const EnginesDir& engines, const Request& r) {
  if (r.strength && !r.video && !r.video_rgb) throw UsageError("--strength applies to --video");
  if (r.video || r.video_rgb) strength_start(settings(engines.config(), r).steps, r.strength.value_or(kDefaultStrength));
}

void check_request(const EnginesDir& engines, const Request& r, const std::string& image_arg) {
  const PipelineConfig& c = engines.config();
  check_strength(engines, r);
  const Settings s = settings(c, r);
  if (r.video_rgb && r.num_frames && *r.num_frames > static_cast<int64_t>(r.video_rgb->size()))
    throw UsageError("video has " + std::to_string(r.video_rgb->size()) + " frames; num_frames=" +
                     std::to_string(*r.num_frames) + " needs at least that many");
  const int64_t m = c.spatial_multiple();
  if (s.height <= 0 || s.width <= 0 || s.height % m || s.width % m)
    throw UsageError("width and height must be positive multiples of " + std::to_string(m) + " for " + c.spec_name +
                     "; got width " + std::to_string(s.width) + ", height " + std::to_string(s.height));
  if (s.num_frames < 1 || (s.num_frames - 1) % c.vae_stride[0])
    throw UsageError("num_frames must be 4k+1 (1, 5, 9, ..., 81); got " + std::to_string(s.num_frames));
  if (s.steps < 1) throw UsageError("num_inference_steps must be >= 1; got " + std::to_string(s.steps));
  if (s.solver != "unipc" && s.solver != "dpm++" && s.solver != "euler")
    throw UsageError("solver must be one of unipc, dpm++, euler; got '" + s.solver + "'");
  if (r.shift && !(*r.shift > 0))
    throw UsageError("need steps >= 1 and shift > 0, got steps=" + std::to_string(s.steps) +
                     ", shift=" + py_float(*r.shift));
  const bool has_image = r.image || r.image_rgb;
  // An i2v model without an image conditions video-to-video on the source's first frame.
  if (c.task == "i2v" && !has_image && !r.video_rgb) throw UsageError(c.spec_name + " is an image-to-video model: pass " + image_arg);
  if (c.task == "t2v" && has_image)
    throw UsageError(c.spec_name + " is a text-to-video model; --image needs an i2v or ti2v model");
}

struct Pipeline::Impl {
  EnginesDir engines;
  c10::Device device;
  Tokenizer tokenizer;
  std::map<std::string, EngineManifest> manifests;
  std::unique_ptr<detail::TextEncoder> text_encoder;
  std::map<std::string, std::unique_ptr<detail::DiT>> dits;
  std::unique_ptr<detail::StreamingVAE> vae_encoder, vae_decoder;

  int64_t text_len = 0;  // what prompts are padded to

  Impl(const std::string& path, const c10::Device& dev)
      : engines(path), device(dev), tokenizer(engines.config().tokenizer) {
    const PipelineConfig& c = engines.config();
    for (const auto& name : c.components()) manifests.emplace(name, engines.verified(name));  // all, before loading
    // The text length the engines were built for (`wan-rt build --text-len`), else the model's.
    for (const auto& [_, m] : manifests) {
      auto it = m.profile_max.find("S");
      if (it != m.profile_max.end()) text_len = text_len ? std::min(text_len, it->second) : it->second;
    }
    if (!text_len) text_len = c.text_len;
    auto dtype = [&](const std::string& name) { return detail::dtype_named(c.compute_dtypes.at(name)); };
    text_encoder = std::make_unique<detail::TextEncoder>(manifests.at("text_encoder"), device, dtype("text_encoder"));
    for (const auto& s : c.stages)
      dits[s.component] = std::make_unique<detail::DiT>(manifests.at(s.component), device, dtype(s.component));
    vae_decoder = std::make_unique<detail::StreamingVAE>("vae_decoder", manifests.at("vae_decoder"), c, device);
  }

  detail::StreamingVAE& encoder() {  // only image-conditioned generations need it
    if (!vae_encoder)
      vae_encoder = std::make_unique<detail::StreamingVAE>("vae_encoder", manifests.at("vae_encoder"),
                                                           engines.config(), device);
    return *vae_encoder;
  }

  at::Tensor encode_prompt(const std::string& prompt) {
    const Tokens t = tokenizer(prompt, text_len);
    const auto n = static_cast<int64_t>(t.input_ids.size());
    auto ids = at::tensor(t.input_ids, at::kLong).view({1, n});
    auto mask = at::tensor(t.attention_mask, at::kLong).view({1, n});
    return (*text_encoder)(ids, mask);
  }

  // I2V: [4-channel first-frame mask; latents of (image, zeros...)]; TI2V: the image's latent.
  at::Tensor image_condition(const RgbImage& image, const Settings& s) {
    const PipelineConfig& c = engines.config();
    const at::Tensor pixels = image_to_tensor(image, s.height, s.width).to(device);
    if (c.task == "ti2v") return encoder().encode(pixels.unsqueeze(2));
    const at::Tensor video =
        at::cat({pixels.unsqueeze(2), at::zeros({1, 3, s.num_frames - 1, s.height, s.width}, pixels.options())}, 2);
    const at::Tensor z = encoder().encode(video);
    const int64_t t = z.size(2), h = z.size(3), w = z.size(4), st = c.vae_stride[0];
    at::Tensor mask = at::zeros({1, 1, s.num_frames + st - 1, h, w}, z.options());
    mask.slice(2, 0, st).fill_(1);  // pixel frame 0 repeated st times so frames group into latent frames
    mask = mask.view({1, t, st, h, w}).transpose(1, 2);
    return at::cat({mask, z}, 1);
  }

  // (model input, timestep) of one step (Pipeline._model_input).
  std::pair<at::Tensor, at::Tensor> model_input(const at::Tensor& latents, const at::Tensor& condition,
                                                const at::Tensor& first_frame_mask, const at::Tensor& t_int) {
    const at::Tensor t = t_int.to(device, at::kFloat);
    if (!first_frame_mask.defined())
      return {condition.defined() ? at::cat({latents, condition}, 1) : latents, t.expand({latents.size(0)})};
    // TI2V: per-token timestep, 0 on the clean first frame.
    const at::Tensor in =
        condition.defined() ? (1 - first_frame_mask) * condition + first_frame_mask * latents : latents;
    const auto& p = engines.config().patch_size;
    const at::Tensor per_token =
        (first_frame_mask[0][0].slice(1, 0, c10::nullopt, p[1]).slice(2, 0, c10::nullopt, p[2]) * t).flatten();
    return {in, per_token.unsqueeze(0).expand({latents.size(0), -1})};
  }
};

Pipeline::Pipeline(const std::string& engines_dir, const c10::Device& device)
    : impl_(std::make_unique<Impl>(engines_dir, device)) {}

Pipeline::~Pipeline() = default;

const EnginesDir& Pipeline::engines() const { return impl_->engines; }
const PipelineConfig& Pipeline::config() const { return impl_->engines.config(); }

Video Pipeline::generate(const Request& request, const StepCallback& on_step) {
  Impl& p = *impl_;
  const PipelineConfig& c = p.engines.config();
  Request r = request;
  check_strength(p.engines, r);
  if (r.video && !r.video_rgb) r.video_rgb = read_video(*r.video);
  check_request(p.engines, r);
  if (r.video_rgb && c.task == "i2v" && !r.image && !r.image_rgb) r.image_rgb = r.video_rgb->front();
  const Settings s = settings(c, r);
  p.engines.check_fits(s.height, s.width, s.num_frames);
  c10::InferenceMode guard;
  Video out;
  out.fps = c.fps;
  auto& timings = out.timings;
  const auto guide = guide_scales(c, r);

  // 1. Text: prompt and negative prompt, each zero-padded to the text length.
  at::Tensor context, context_null;
  {
    Timed t(timings, "text_encoder");
    context = p.encode_prompt(r.prompt);
    bool needs_cfg = false;
    for (const auto& [_, g] : guide) needs_cfg = needs_cfg || g > 1.0;
    if (needs_cfg) context_null = p.encode_prompt(r.negative_prompt.value_or(c.sampling.negative_prompt));
  }

  // 2. Noise from torch's CPU generator (what torch.Generator("cpu").manual_seed(seed) gives),
  // and the image condition where the task has one.
  const auto ls = c.latent_shape(s.height, s.width, s.num_frames);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(r.seed));
  at::Tensor latents = at::randn({1, ls[0], ls[1], ls[2], ls[3]}, gen, at::TensorOptions().dtype(at::kFloat));
  latents = latents.to(p.device);
  at::Tensor condition, first_frame_mask;
  if (r.image || r.image_rgb) {
    Timed t(timings, "vae_encoder");
    condition = p.image_condition(r.image_rgb ? *r.image_rgb : read_image(*r.image), s);
  }
  if (c.task == "ti2v") {
    first_frame_mask = at::ones({1, 1, ls[1], ls[2], ls[3]}, latents.options());
    if (condition.defined()) first_frame_mask.select(2, 0).fill_(0);
  }

  // Video-to-video: the source's latents noised to the sigma of the first step that runs,
  // x = (1 - sigma) * x0 + sigma * noise; strength 1 (start 0) is text-to-video from that noise.
  auto sched = scheduler(c, r, s.steps);
  const int64_t start = r.video_rgb ? strength_start(s.steps, r.strength.value_or(kDefaultStrength)) : 0;
  sched->start_at(start);
  if (r.video_rgb && start > 0) {
    Timed t(timings, "vae_encoder");
    std::vector<at::Tensor> frames;
    for (int64_t f = 0; f < s.num_frames; ++f) frames.push_back(image_to_tensor((*r.video_rgb)[f], s.height, s.width)[0]);
    const at::Tensor z = p.encoder().encode(at::stack(frames, 1).unsqueeze(0).to(p.device)).to(p.device, at::kFloat);
    const at::Tensor sigma = sched->sigmas()[start].to(p.device);
    latents = (1 - sigma) * z + sigma * latents;
  }

  // 3. Denoise: the stages in order, each expert once; CFG's cond and uncond as one batch of two.
  const at::Tensor context_pair = context_null.defined() ? at::cat({context, context_null}) : at::Tensor();
  const auto groups = group_by_stage(c, sched->timesteps(), start);
  const int64_t total = sched->num_steps() - start;
  std::map<std::string, std::future<void>> loading;  // experts being loaded ahead of their stage
  for (size_t n = 0; n < groups.size(); ++n) {
    const std::string& name = groups[n].first->component;
    const auto& indices = groups[n].second;
    const std::string upcoming = n + 1 < groups.size() ? groups[n + 1].first->component : "";
    detail::DiT& dit = *p.dits.at(name);
    const double g = guide.at(name);
    out.steps_per_stage[name] = static_cast<int64_t>(indices.size());
    {
      // Making the first expert resident is loading; waiting for the next one is the swap stall.
      Timed t(timings, n ? "swap_stall" : "expert_load");
      auto it = loading.find(name);
      if (it != loading.end()) {
        it->second.get();
        loading.erase(it);
      }
      dit.load();
    }
    Timed t(timings, name);
    for (size_t k = 0; k < indices.size(); ++k) {
      const int64_t i = indices[k];
      const at::Tensor step_t = sched->timesteps()[i];
      auto [model_in, timestep] = p.model_input(latents, condition, first_frame_mask, step_t);
      at::Tensor v;
      if (g > 1.0 && context_pair.defined()) {
        auto both = dit(model_in.expand({2, -1, -1, -1, -1}),
                        timestep.dim() == 1 ? timestep.expand({2}) : timestep.expand({2, -1}), context_pair)
                        .chunk(2);
        v = both[1] + g * (both[0] - both[1]);
      } else {
        v = dit(model_in, timestep, context);
      }
      latents = sched->step(v, i, latents);
      const int64_t left = static_cast<int64_t>(indices.size() - k - 1);
      if (!upcoming.empty() && upcoming != name && left <= 2 && !loading.count(upcoming)) {
        detail::DiT* next = p.dits.at(upcoming).get();
        loading[upcoming] = std::async(std::launch::async, [next] { next->load(); });
      }
      if (on_step && !on_step({i - start, total, step_t.item<int64_t>(), name}))
        throw GenerationInterrupted("interrupted after step " + std::to_string(i - start + 1) + " of " +
                                    std::to_string(total));
    }
  }
  if (first_frame_mask.defined() && condition.defined())  // TI2V: frame 0 is the image latent
    latents = (1 - first_frame_mask) * condition + first_frame_mask * latents;

  // 4. Decode, chunk by chunk.
  at::Tensor video;
  {
    Timed t(timings, "vae_decoder");
    video = p.vae_decoder->decode(latents);
  }
  out.frames = (video.to(at::kFloat) / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 4, 1})[0].contiguous().cpu();
  return out;
}

}  // namespace wan_rt
