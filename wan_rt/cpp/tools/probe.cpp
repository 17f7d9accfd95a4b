// wan-rt-cpp-probe: the library's pieces one at a time, for the tests that hold them against the
// Python runtime (tests/test_cpp.py). Not an interface for users.
//
//   probe randn SEED OUT.safetensors D0 [D1 ...]                  torch's CPU generator
//   probe schedule SOLVER GRID STEPS SHIFT IN.safetensors OUT.safetensors [DISABLE_CORRECTOR ...]
//         IN: x [...] and v [N, ...]; OUT: sigmas, timesteps, x [N+1, ...] (the sample after each step)
//   probe tokenize SPIECE MAX_LEN < prompts.json                  JSON: [{"clean", "ids", "mask"}]
//   probe resize IMAGE WIDTH HEIGHT OUT.safetensors               uint8 [H, W, 3] after the Lanczos resize
//   probe device                                                  torch version and device key
//   probe interrupt ENGINES_DIR STOP_AFTER                        generate, the callback stopping it
//   probe serve ENGINES_DIR FRAMES_OUT                            load once, then a generation per JSON line on
//                                                                 stdin, a JSON line of ms, CPU ms and stages each
#include "wan_rt/aoti_graph.h"
#include "wan_rt/image.h"
#include "wan_rt/pipeline.h"
#include "wan_rt/safetensors.h"
#include "wan_rt/scheduler.h"
#include "wan_rt/tokenizer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <ctime>
#include <iostream>
#include <vector>

int main(int argc, char** argv) {
  const std::vector<std::string> a(argv, argv + argc);
  try {
    if (a.size() >= 4 && a[1] == "randn") {
      std::vector<int64_t> shape;
      for (size_t i = 4; i < a.size(); ++i) shape.push_back(std::stoll(a[i]));
      auto gen = at::make_generator<at::CPUGeneratorImpl>(std::stoull(a[2]));
      wan_rt::write_safetensors(a[3], {{"noise", at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat))}});
    } else if (a.size() >= 8 && a[1] == "schedule") {
      std::vector<int64_t> disable;
      for (size_t i = 8; i < a.size(); ++i) disable.push_back(std::stoll(a[i]));
      auto sched = wan_rt::make_scheduler(a[2], std::stoll(a[4]), std::stod(a[5]), a[3], disable);
      auto in = wan_rt::read_safetensors(a[6]);
      std::vector<at::Tensor> xs{in.at("x")};
      for (int64_t i = 0; i < sched->num_steps(); ++i) xs.push_back(sched->step(in.at("v")[i], i, xs.back()));
      wan_rt::write_safetensors(a[7], {{"sigmas", sched->sigmas()}, {"timesteps", sched->timesteps()},
                                       {"x", at::stack(xs)}});
    } else if (a.size() == 4 && a[1] == "tokenize") {
      const wan_rt::Tokenizer tok(a[2]);
      nlohmann::json out = nlohmann::json::array();
      for (const auto& prompt : nlohmann::json::parse(std::cin)) {
        const auto t = tok(prompt.get<std::string>(), std::stoll(a[3]));
        out.push_back({{"clean", wan_rt::clean_prompt(prompt.get<std::string>())}, {"ids", t.input_ids},
                       {"mask", t.attention_mask}});
      }
      std::cout << out.dump() << "\n";
    } else if (a.size() == 6 && a[1] == "resize") {
      auto img = wan_rt::resize_lanczos(wan_rt::read_image(a[2]), std::stoll(a[3]), std::stoll(a[4]));
      auto t = at::from_blob(img.pixels.data(), {img.height, img.width, 3}, at::kByte).clone();
      wan_rt::write_safetensors(a[5], {{"pixels", t}});
    } else if (a.size() == 2 && a[1] == "device") {
      std::cout << nlohmann::json{{"torch", wan_rt::torch_version()}, {"device", wan_rt::device_key()}}.dump() << "\n";
    } else if (a.size() == 4 && a[1] == "interrupt") {
      wan_rt::Pipeline pipe(a[2]);
      wan_rt::Request request;
      request.prompt = "a fox";
      const int64_t stop_after = std::stoll(a[3]);
      try {
        pipe.generate(request, [&](const wan_rt::StepInfo& s) { return s.step + 1 < stop_after; });
        std::cout << "not interrupted\n";
      } catch (const wan_rt::GenerationInterrupted& e) {
        std::cout << e.what() << "\n";
      }
    } else if (a.size() == 4 && a[1] == "serve") {
      // One pipeline, then one generation per request line on stdin, one result line each.
      using Clock = std::chrono::steady_clock;
      wan_rt::Pipeline pipe(a[2]);
      std::cout << nlohmann::json{{"ready", true}}.dump() << std::endl;
      for (std::string line; std::getline(std::cin, line);) {
        const auto j = nlohmann::json::parse(line);
        wan_rt::Request request;
        request.prompt = j.at("prompt");
        request.negative_prompt = j.at("negative_prompt").get<std::string>();
        request.height = j.at("height");
        request.width = j.at("width");
        request.num_frames = j.at("num_frames");
        request.steps = j.at("steps");
        request.seed = j.at("seed");
        const auto t0 = Clock::now();
        const std::clock_t c0 = std::clock();  // CPU time of the whole process, every thread
        const wan_rt::Video video = pipe.generate(request);
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        const double cpu_ms = 1000.0 * static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
        nlohmann::json stages;
        for (const auto& [stage, seconds] : video.timings) stages[stage] = seconds * 1000;
        wan_rt::write_safetensors(a[3], {{"frames", video.frames}});
        std::cout << nlohmann::json{{"ms", ms}, {"cpu_ms", cpu_ms}, {"stages_ms", stages}}.dump() << std::endl;
      }
    } else {
      std::cerr << "usage: see the comment at the top of tools/probe.cpp\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::cerr << "probe: error: " << what.substr(0, what.find('\n')) << "\n";
    return 2;
  }
  return 0;
}
