#include "wan_rt/engines_dir.h"

#include "wan_rt/errors.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;
using nlohmann::json;

namespace wan_rt {
namespace {

constexpr int kFormat = 1;  // engines.json, manifest.json and pipeline.json format

// str(pathlib.Path(p)): no empty or "." parts, no trailing slash; the errors quote paths this way.
std::string python_path(const std::string& p) {
  std::string out = p.rfind('/', 0) == 0 ? "/" : "";
  std::stringstream parts(p);
  for (std::string part; std::getline(parts, part, '/');) {
    if (part.empty() || part == ".") continue;
    out += (out.empty() || out == "/" ? "" : "/") + part;
  }
  return out.empty() ? "." : out;
}

json read_json(const fs::path& path, const std::string& missing, const std::string& unreadable_fix) {
  std::ifstream f(path);
  if (!f) throw StaleEngineError(missing);
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    throw StaleEngineError(path.string() + ": unreadable (" + std::string(e.what()) + "); " + unreadable_fix);
  }
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

PipelineConfig parse_config(const json& j, const fs::path& root) {
  PipelineConfig c;
  j.at("spec_name").get_to(c.spec_name);
  j.at("spec_hash").get_to(c.spec_hash);
  j.at("task").get_to(c.task);
  for (const auto& s : j.at("stages"))
    c.stages.push_back({s.at("component"), s.at("min_timestep").get<double>(), s.at("guide_scale").get<double>()});
  const auto& d = j.at("request_defaults");
  d.at("height").get_to(c.height);
  d.at("width").get_to(c.width);
  d.at("num_frames").get_to(c.num_frames);
  d.at("steps").get_to(c.steps);
  j.at("fps").get_to(c.fps);
  const auto& s = j.at("sampling");
  c.sampling = {s.at("solver"), s.at("grid"), s.at("shift").get<double>(), s.at("negative_prompt"), std::nullopt};
  if (!s.at("from_scheduler_config").is_null()) {
    const auto& f = s.at("from_scheduler_config");
    c.sampling.from_scheduler_config =
        SchedulerFromConfig{f.at("solver"), f.at("shift").get<double>(), f.at("disable_corrector")};
  }
  j.at("vae").at("stride").get_to(c.vae_stride);
  j.at("vae").at("z_dim").get_to(c.z_dim);
  j.at("dit").at("patch_size").get_to(c.patch_size);
  j.at("dit").at("text_len").get_to(c.text_len);
  j.at("dit").at("per_token_timestep").get_to(c.per_token_timestep);
  if (!j.at("tokenizer").is_null()) c.tokenizer = (root / j.at("tokenizer").get<std::string>()).string();
  j.at("compute_dtypes").get_to(c.compute_dtypes);
  return c;
}

}  // namespace

const Stage& PipelineConfig::stage_for(double timestep) const {
  for (const auto& s : stages)
    if (timestep >= s.min_timestep) return s;
  return stages.back();
}

std::vector<std::string> PipelineConfig::components() const {
  std::vector<std::string> out{"text_encoder"};
  for (const auto& s : stages) out.push_back(s.component);
  out.push_back("vae_encoder");
  out.push_back("vae_decoder");
  return out;
}

std::array<int64_t, 4> PipelineConfig::latent_shape(int64_t height, int64_t width, int64_t num_frames) const {
  return {z_dim, (num_frames - 1) / vae_stride[0] + 1, height / vae_stride[1], width / vae_stride[2]};
}

EnginesDir::EnginesDir(const std::string& path) : path_(python_path(path)), root_(fs::absolute(path).string()) {
  const fs::path root(root_);
  const json index = read_json(root / "engines.json",
                               "no engines in " + path_ + " (no engines.json); run `wan-rt build` first",
                               "re-run `wan-rt build`");
  try {
    index.at("model").get_to(model_);
    index.at("backend").get_to(backend_);
    index.at("precision").get_to(precision_);
    index.at("spec_hash").get_to(spec_hash_);
    index.at("components").get_to(components_);
  } catch (const json::exception& e) {
    throw StaleEngineError(path_ + "/engines.json: unreadable (" + std::string(e.what()) + "); re-run `wan-rt build`");
  }
  if (backend_ != "aoti")
    throw StaleEngineError(path_ + " holds " + backend_ + " engines; the C++ runtime runs AOTInductor engines: build "
                           "them with `wan-rt build --model " + model_ + " --backend aoti --kernels torch "
                           "--engines-dir " + path_ + "`");
  const json config = read_json(root / "pipeline.json",
                                path_ + "/pipeline.json not found (engines built before wan_rt wrote it); " + fix(),
                                fix());
  if (config.value("format", 0) != kFormat)
    throw StaleEngineError(path_ + "/pipeline.json: format " + config.value("format", json(nullptr)).dump() +
                           " is not " + std::to_string(kFormat) + "; " + fix());
  try {
    config_ = parse_config(config, root);
  } catch (const json::exception& e) {
    throw StaleEngineError(path_ + "/pipeline.json: unreadable (" + std::string(e.what()) + "); " + fix());
  }
  if (config_.spec_hash != spec_hash_)
    throw StaleEngineError(path_ + "/pipeline.json describes another model than its engines (spec_hash); " + fix());
  if (config_.tokenizer.empty())
    throw StaleEngineError(path_ + ": the checkpoint has no spiece.model (SentencePiece), which the C++ runtime "
                           "tokenizes with; only the Python runtime can run " + model_);
}

std::string EnginesDir::fix() const {
  return "re-run `wan-rt build --model " + model_ + " --engines-dir " + path_ + "`";
}

void EnginesDir::check_fits(int64_t height, int64_t width, int64_t num_frames) const {
  const auto shape = config_.latent_shape(height, width, num_frames);
  const Sizes want{{"T", shape[1]}, {"h", shape[2]}, {"w", shape[3]}};
  for (const auto& name : components_) {
    std::ifstream f(fs::path(root_) / name / "manifest.json");
    json profile;
    try {
      profile = json::parse(f).at("profile");
    } catch (const json::exception&) {
      continue;  // an unreadable manifest is reported by verified()
    }
    const auto& lo = profile.at("min");
    const auto& hi = profile.at("max");
    for (const auto& [sym, n] : want) {
      if (!lo.contains(sym) || (lo[sym].get<int64_t>() <= n && n <= hi[sym].get<int64_t>())) continue;
      auto range = [&](const char* s) { return lo[s].dump() + ".." + hi[s].dump(); };
      throw UsageError(std::to_string(width) + "x" + std::to_string(height) + "x" + std::to_string(num_frames) +
                       " is outside the shapes the " + name + " engine was built for (latent T " + range("T") +
                       ", h " + range("h") + ", w " + range("w") + "); rebuild with `wan-rt build --height " +
                       std::to_string(height) + " --width " + std::to_string(width) + " --frames " +
                       std::to_string(num_frames) + " --engines-dir " + path_ + "`");
    }
  }
}

EngineManifest EnginesDir::verified(const std::string& component) const {
  const fs::path folder = fs::path(root_) / component;
  const std::string shown = path_ == "." ? component : path_ + "/" + component;
  const json j = read_json(folder / "manifest.json",
                           shown + ": no manifest.json (never built, or the build was interrupted); run `wan-rt build`",
                           "re-run `wan-rt build`");
  if (j.value("format", 0) != kFormat)
    throw StaleEngineError(shown + "/manifest.json: manifest format " + j.value("format", json(nullptr)).dump() +
                           " is not " + std::to_string(kFormat) + "; re-run `wan-rt build`");
  EngineManifest m;
  std::map<std::string, std::string> versions;
  std::vector<std::string> missing;
  try {
    j.at("component").get_to(m.component);
    j.at("backend").get_to(m.backend);
    j.at("precision").get_to(m.precision);
    j.at("spec_hash").get_to(m.spec_hash);
    j.at("profile").at("min").get_to(m.profile_min);
    j.at("profile").at("max").get_to(m.profile_max);
    j.at("tool_versions").get_to(versions);
    for (const auto& [graph, g] : j.at("graphs").items()) {
      GraphFiles files;
      for (const auto& f : g.at("files")) {
        const std::string rel = f.get<std::string>();
        // weights.json and the checkpoint files it links to are read through the graph's weights.
        const std::string name = fs::path(rel).filename().string();
        if (name == "model.pt2") files.package = (folder / rel).string();
        if (name == "weights.safetensors") files.weights = (folder / rel).string();
        if (!fs::is_regular_file(folder / rel)) missing.push_back(rel);
      }
      m.graphs[graph] = files;
    }
  } catch (const json::exception& e) {
    throw StaleEngineError(shown + "/manifest.json: unreadable manifest (" + std::string(e.what()) +
                           "); re-run `wan-rt build`");
  }
  if (m.component != component || m.backend != backend_)
    throw StaleEngineError("engine for " + component + " is stale: it belongs to another build (" +
                           (m.component != component ? "component" : "backend") + "); " + fix());
  if (m.spec_hash != config_.spec_hash)
    throw StaleEngineError("engine for " + component +
                           " is stale: the model architecture changed since it was built (spec_hash); " + fix());
  if (!same_torch(versions["torch"]))
    throw StaleEngineError("engine for " + component + " cannot run here: built with torch " + versions["torch"] +
                           ", this machine has " + torch_version() + "; " + fix());
  if (!same_device(versions["device"]))
    throw StaleEngineError("engine for " + component + " cannot run here: built with device " + versions["device"] +
                           ", this machine has " + device_key() + "; " + fix());
  if (!missing.empty())
    throw StaleEngineError("engine for " + component + " is incomplete (missing " + missing.front() + "); " + fix());
  return m;
}

}  // namespace wan_rt
