// wan-rt-cpp: `wan-rt run` on an engines dir without Python (AOTInductor engines built with
// `wan-rt build --backend aoti --kernels torch`). The same flags, defaults and one-line errors.
#include "wan_rt/pipeline.h"
#include "wan_rt/safetensors.h"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <filesystem>
#include <iomanip>
#include <iostream>

namespace fs = std::filesystem;

namespace {

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// str(pathlib.Path(p).parent), as `wan-rt run` quotes a missing output folder.
std::string parent_of(const std::string& p) {
  const std::string parent = fs::path(p).lexically_normal().parent_path().string();
  return parent.empty() ? "." : parent;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

int run(int argc, char** argv) {
  CLI::App app{"Generate a video from AOTInductor engines built by `wan-rt build --backend aoti --kernels torch`.",
               "wan-rt-cpp"};
  std::string engines_dir = "engines", output = "out.mp4", frames_out, device = "cpu";
  wan_rt::Request r;
  std::optional<std::string> solver;
  app.add_option("--engines-dir", engines_dir, "the engines dir `wan-rt build` wrote")->capture_default_str();
  app.add_option("--prompt", r.prompt, "what the video shows")->required();
  app.add_option("--negative-prompt", r.negative_prompt, "default: the checkpoint's own default");
  app.add_option("--image", r.image, "first frame for image-to-video (i2v, ti2v)");
  app.add_option("--video", r.video, "video-to-video: re-generate this clip with --prompt (--frames default: its "
                                     "length, trimmed to 4k+1)");
  app.add_option("--strength", r.strength, "with --video: how much to change it, in (0, 1]; default 0.8");
  app.add_option("--height", r.height, "default: the model's");
  app.add_option("--width", r.width, "default: the model's");
  app.add_option("--frames", r.num_frames, "4k+1; default: the model's");
  app.add_option("--steps", r.steps, "default: the model's");
  app.add_option("--guidance", r.guidance, "CFG scale of the high-noise expert (or the only DiT)");
  app.add_option("--guidance-2", r.guidance_2, "CFG scale of the low-noise expert");
  app.add_option("--shift", r.shift, "flow shift; default: the checkpoint's");
  app.add_option("--solver", solver, "unipc, dpm++ or euler; default: the checkpoint's");
  app.add_option("--seed", r.seed, "noise seed (torch's CPU generator)")->capture_default_str();
  app.add_option("--device", device, "cpu, or cuda[:N] (not verified)")->capture_default_str();
  app.add_option("--output", output, "mp4 path")->capture_default_str();
  app.add_option("--frames-out", frames_out, "also save the frames before uint8 conversion (float32 [F, H, W, 3] "
                                             "in [0, 1], key 'frames')");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "wan-rt-cpp: error: " << first_line(e.what()) << "\n";
    return 2;
  }
  if (solver && *solver != "unipc" && *solver != "dpm++" && *solver != "euler")
    throw wan_rt::UsageError("argument --solver: invalid choice: '" + *solver +
                             "' (choose from 'unipc', 'dpm++', 'euler')");
  r.solver = solver;
  const fs::path out_path(output);
  if (lower(out_path.extension().string()) != ".mp4") throw wan_rt::UsageError("--output must end in .mp4; got " + output);
  if (!fs::is_directory(parent_of(output)))
    throw wan_rt::UsageError("--output folder does not exist: " + parent_of(output));
  if (!frames_out.empty() && (fs::path(frames_out).extension() != ".safetensors" || !fs::is_directory(parent_of(frames_out))))
    throw wan_rt::UsageError("--frames-out must be a .safetensors path in an existing folder; got " + frames_out);
  c10::Device dev("cpu");
  try {
    dev = c10::Device(device);
  } catch (const std::exception&) {
    throw wan_rt::UsageError("--device: expected cpu or cuda[:N]; got " + device);
  }

  // The checks `wan-rt run` makes before it loads anything, in its order.
  const wan_rt::EnginesDir engines(engines_dir);
  const auto& c = engines.config();
  wan_rt::check_strength(engines, r);
  if (r.video) r.video_rgb = wan_rt::read_video(*r.video);
  wan_rt::check_request(engines, r, "--image");
  if (r.image) r.image_rgb = wan_rt::read_image(*r.image);
  engines.check_fits(r.height.value_or(c.height), r.width.value_or(c.width), wan_rt::num_frames_of(c, r));

  const auto start = std::chrono::steady_clock::now();
  wan_rt::Pipeline pipe(engines_dir, dev);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const wan_rt::Video video = pipe.generate(r);
  video.save_mp4(output);
  if (!frames_out.empty()) wan_rt::write_safetensors(frames_out, {{"frames", video.frames}});
  std::cout << "wrote " << output << " (" << video.frames.size(0) << " frames, " << video.frames.size(2) << "x"
            << video.frames.size(1) << ", " << video.fps << " fps) from " << c.spec_name << " (aoti engines in "
            << engines.path() << ", C++)\n";
  std::cerr << std::fixed << std::setprecision(2) << "  load " << load_s << "s\n";
  for (const auto& [stage, seconds] : video.timings) {
    auto it = video.steps_per_stage.find(stage);
    std::cerr << "  " << stage << (it != video.steps_per_stage.end() ? " (" + std::to_string(it->second) + " steps)" : "")
              << ": " << seconds << "s\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const wan_rt::UsageError& e) {
    std::cerr << "wan-rt-cpp: error: " << first_line(e.what()) << "\n";
    return 2;
  } catch (const std::exception& e) {  // libtorch's errors carry a backtrace after the first line
    std::cerr << "wan-rt-cpp: internal error: " << first_line(e.what()) << "\n";
    return 1;
  }
}
