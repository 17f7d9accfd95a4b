#include "wan_rt/scheduler.h"

#include "wan_rt/errors.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

namespace wan_rt {
namespace {

constexpr double kTrainTimesteps = 1000;  // wan_rt.config.NUM_TRAIN_TIMESTEPS
using Grid = std::pair<at::Tensor, at::Tensor>;  // (sigmas float32 [N+1], timesteps int64 [N])

// numpy.linspace(start, stop, num) in float64: i * step + start, the last element set to stop.
std::vector<double> linspace(double start, double stop, int64_t num) {
  std::vector<double> y(num);
  const double div = static_cast<double>(num - 1), delta = stop - start;
  const double step = div > 0 ? delta / div : 0.0;
  for (int64_t i = 0; i < num; ++i) {
    const double k = static_cast<double>(i);
    y[i] = (div > 0 ? (step == 0 ? k / div * delta : k * step) : k * delta) + start;
  }
  if (num > 1) y[num - 1] = stop;
  return y;
}

// sigma' = s * sigma / (1 + (s - 1) * sigma), in float64 like the Python module's numpy.
std::vector<double> shifted(std::vector<double> sigmas, double shift) {
  for (double& s : sigmas) s = shift * s / (1 + (shift - 1) * s);
  return sigmas;
}

// timesteps = float64 sigma * 1000 truncated to int64; sigmas = float32 of the float64, then a 0.
Grid finish(const std::vector<double>& sig) {
  const auto n = static_cast<int64_t>(sig.size());
  at::Tensor sigmas = at::empty({n + 1}, at::kFloat), timesteps = at::empty({n}, at::kLong);
  for (int64_t i = 0; i < n; ++i) {
    sigmas[i] = static_cast<float>(sig[i]);
    timesteps[i] = static_cast<int64_t>(sig[i] * kTrainTimesteps);
  }
  sigmas[n] = 0.0f;
  return {sigmas, timesteps};
}

Grid official_sigmas(int64_t steps, double shift) {
  // sigma_max: the first training sigma 1 - 1/1000 read back from float32, as Wan2.2 does.
  const double sigma_max = static_cast<double>(static_cast<float>(1.0 - 1.0 / kTrainTimesteps));
  auto s = linspace(sigma_max, 0.0, steps + 1);
  s.pop_back();
  return finish(shifted(s, shift));
}

Grid diffusers_sigmas(int64_t steps, double shift) {
  auto s = linspace(1.0, 1.0 / kTrainTimesteps, steps + 1);
  s.pop_back();
  s = shifted(s, shift);
  if (std::abs(s[0] - 1.0) < 1e-6) s[0] -= 1e-6;  // diffusers keeps ln(alpha) finite
  return finish(s);
}

Grid official_dpm_sigmas(int64_t steps, double shift) {
  auto s = linspace(1.0, 0.0, steps + 1);
  s.resize(steps);
  return finish(shifted(s, shift));
}

Grid diffusers_dpm_sigmas(int64_t steps, double shift) {
  auto s = linspace(1.0, 1.0 / kTrainTimesteps, steps + 1);
  for (double& x : s) x = 1.0 - x;
  s = shifted(s, shift);
  std::reverse(s.begin(), s.end());
  s.pop_back();
  return finish(s);
}

Grid diffusers_euler_sigmas(int64_t steps, double shift) {
  // FlowMatchEulerDiscreteScheduler: shifts the float32 training sigmas, spaces the shifted ends
  // linearly and shifts again; timesteps are float32 sigma * 1000, truncated here.
  const at::Tensor train_min = at::full({1}, 1.0 / kTrainTimesteps, at::kFloat);
  const double sigma_min = (shift * train_min / (1 + (shift - 1) * train_min)).item<double>();
  auto ts = linspace(1.0 * kTrainTimesteps, sigma_min * kTrainTimesteps, steps);
  for (double& t : ts) t /= kTrainTimesteps;
  ts = shifted(ts, shift);
  at::Tensor sig = at::empty({steps}, at::kDouble);
  for (int64_t i = 0; i < steps; ++i) sig[i] = ts[i];
  at::Tensor sigmas = sig.to(at::kFloat);
  at::Tensor timesteps = (sigmas * kTrainTimesteps).to(at::kLong);
  return {at::cat({sigmas, at::zeros({1}, at::kFloat)}), timesteps};
}

class EulerScheduler : public FlowScheduler {
 public:
  using FlowScheduler::FlowScheduler;
  at::Tensor step(const at::Tensor& v, int64_t step_index, const at::Tensor& sample) override {
    const int64_t i = advance(step_index);
    return sample.to(at::kFloat) + (sigmas_[i + 1] - sigmas_[i]) * v.to(at::kFloat);
  }
};

// DPM-Solver++ 2M, midpoint, x0 prediction: order 1 on the first and last step, else 2.
class DPMppScheduler : public FlowScheduler {
 public:
  using FlowScheduler::FlowScheduler;
  at::Tensor step(const at::Tensor& v, int64_t step_index, const at::Tensor& sample) override {
    const int64_t i = advance(step_index);
    const at::Tensor x = sample.to(at::kFloat);
    const at::Tensor m = x - sigmas_[i] * v.to(at::kFloat);
    x0_.push_back(m);
    if (x0_.size() > 2) x0_.erase(x0_.begin());
    const at::Tensor sigma_s = sigmas_[i], sigma_t = sigmas_[i + 1];
    const at::Tensor h = lambdas_[i + 1] - lambdas_[i];
    const at::Tensor coef = (1 - sigma_t) * (at::exp(-h) - 1.0);
    at::Tensor x_next = sigma_t / sigma_s * x - coef * m;
    if (x0_.size() == 2 && i < num_steps() - 1) {  // order 2 once there is history
      const at::Tensor r = (lambdas_[i] - lambdas_[i - 1]) / h;
      const at::Tensor d = (r.reciprocal() * 1.0) * (m - x0_.front());  // Python's 1.0 / r
      x_next = x_next - 0.5 * coef * d;
    }
    return x_next;
  }

 private:
  std::vector<at::Tensor> x0_;
};

// UniPC-2 (bh2 predictor + corrector, x0 prediction), as scheduler.py's UniPCScheduler.
class UniPCScheduler : public FlowScheduler {
 public:
  UniPCScheduler(at::Tensor sigmas, at::Tensor timesteps, const std::vector<int64_t>& disable_corrector)
      : FlowScheduler(std::move(sigmas), std::move(timesteps)),
        disable_corrector_(disable_corrector.begin(), disable_corrector.end()) {}

  at::Tensor step(const at::Tensor& v, int64_t step_index, const at::Tensor& sample) override {
    const int64_t i = advance(step_index);
    at::Tensor x = sample.to(at::kFloat);
    const at::Tensor m = x - sigmas_[i] * v.to(at::kFloat);
    if (last_sample_.defined() && !disable_corrector_.count(i - 1)) x = correct(m, i);
    x0_.push_back(m);
    if (x0_.size() > 2) x0_.erase(x0_.begin());
    const int64_t order = std::min<int64_t>({2, num_steps() - i, static_cast<int64_t>(x0_.size())});
    last_sample_ = x;
    last_order_ = order;
    return predict(x, i, order);
  }

 private:
  std::set<int64_t> disable_corrector_;
  std::vector<at::Tensor> x0_;  // x0 predictions of the last two steps, oldest first
  at::Tensor last_sample_;      // x the last predictor started from
  int64_t last_order_ = 0;

  at::Tensor predict(const at::Tensor& x, int64_t i, int64_t order) {
    const at::Tensor& m0 = x0_.back();
    const at::Tensor sigma_s = sigmas_[i], sigma_t = sigmas_[i + 1];
    const at::Tensor alpha_t = 1 - sigma_t;
    const at::Tensor h = lambdas_[i + 1] - lambdas_[i];
    const at::Tensor phi = at::expm1(-h);
    at::Tensor x_next = sigma_t / sigma_s * x - alpha_t * phi * m0;
    if (order == 2) {
      const at::Tensor r = (lambdas_[i - 1] - lambdas_[i]) / h;
      const at::Tensor d = (x0_[x0_.size() - 2] - m0) / r;
      x_next = x_next - alpha_t * phi * (0.5 * d);
    }
    return x_next;
  }

  // Redo x_{i-1} -> x_i with m_i known; x0_ still ends at m_{i-1}.
  at::Tensor correct(const at::Tensor& m, int64_t i) {
    const at::Tensor& m0 = x0_.back();
    const at::Tensor sigma_s = sigmas_[i - 1], sigma_t = sigmas_[i];
    const at::Tensor alpha_t = 1 - sigma_t;
    const at::Tensor h = lambdas_[i] - lambdas_[i - 1];
    const at::Tensor phi = at::expm1(-h);
    const at::Tensor x_corr = sigma_t / sigma_s * last_sample_ - alpha_t * phi * m0;
    if (last_order_ == 1) return x_corr - alpha_t * phi * (0.5 * (m - m0));
    const at::Tensor r = (lambdas_[i - 2] - lambdas_[i - 1]) / h;
    const at::Tensor d = (x0_[x0_.size() - 2] - m0) / r;
    const at::Tensor hphi_1 = phi / -h - 1;
    const at::Tensor hphi_2 = hphi_1 / -h - 0.5;
    const at::Tensor one = at::ones({}, at::kFloat);
    const at::Tensor R = at::stack({at::stack({one, one}), at::stack({r, one})});
    const at::Tensor rho = at::linalg_solve(R, at::stack({hphi_1 / phi, hphi_2 * 2 / phi}));
    return x_corr - alpha_t * phi * (rho[0] * d + rho[1] * (m - m0));
  }
};

}  // namespace

FlowScheduler::FlowScheduler(at::Tensor sigmas, at::Tensor timesteps)
    : sigmas_(std::move(sigmas)), timesteps_(std::move(timesteps)) {
  // Per element as 0-dim ops, like the Python module (a vectorised log may round differently).
  std::vector<at::Tensor> lambdas;
  for (int64_t i = 0; i < sigmas_.size(0); ++i) {
    const at::Tensor s = sigmas_[i];
    lambdas.push_back(at::log(1 - s) - at::log(s));
  }
  lambdas_ = at::stack(lambdas);
}

void FlowScheduler::start_at(int64_t step_index) {
  if (step_index < 0 || step_index >= num_steps())
    throw UsageError("start step must be in 0.." + std::to_string(num_steps() - 1) + "; got " +
                     std::to_string(step_index));
  next_step_ = step_index;
}

int64_t FlowScheduler::advance(int64_t step_index) {
  if (step_index != next_step_ || step_index >= num_steps())
    throw std::logic_error("expected step " + std::to_string(next_step_) + ", got " + std::to_string(step_index) +
                           ": steps run in order");
  ++next_step_;
  return step_index;
}

std::unique_ptr<FlowScheduler> make_scheduler(const std::string& solver, int64_t steps, double shift,
                                              const std::string& grid,
                                              const std::vector<int64_t>& disable_corrector) {
  using GridFn = std::function<Grid(int64_t, double)>;
  // (solver, grid) -> grid; Euler has no official sampler and reuses the official UniPC grid.
  static const std::map<std::pair<std::string, std::string>, GridFn> grids = {
      {{"unipc", "official"}, official_sigmas},     {{"unipc", "diffusers"}, diffusers_sigmas},
      {{"dpm++", "official"}, official_dpm_sigmas}, {{"dpm++", "diffusers"}, diffusers_dpm_sigmas},
      {{"euler", "official"}, official_sigmas},     {{"euler", "diffusers"}, diffusers_euler_sigmas}};
  auto it = grids.find({solver, grid});
  if (it == grids.end())
    throw UsageError("unknown solver/grid '" + solver + "'/'" + grid +
                     "'; solvers: ['dpm++', 'euler', 'unipc'], grids: 'official', 'diffusers'");
  if (steps < 1 || !(shift > 0))
    throw UsageError("need steps >= 1 and shift > 0, got steps=" + std::to_string(steps) + ", shift=" +
                     std::to_string(shift));
  auto [sigmas, timesteps] = it->second(steps, shift);
  if (solver == "unipc") return std::make_unique<UniPCScheduler>(sigmas, timesteps, disable_corrector);
  if (solver == "dpm++") return std::make_unique<DPMppScheduler>(sigmas, timesteps);
  return std::make_unique<EulerScheduler>(sigmas, timesteps);
}

}  // namespace wan_rt
