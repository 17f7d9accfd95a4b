// Flow-matching samplers, the same numbers as wan_rt/scheduler.py (UniPC, the default; DPM-Solver++
// 2M; Euler) on both sigma grids ("official": Wan2.2's, "diffusers": diffusers' classes). The grids
// are computed in double as numpy does, and every step with the same tensor operations in the same
// order as the Python module, so both runtimes produce the same latents.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace wan_rt {

class FlowScheduler {
 public:
  // sigmas: float32 [N+1] ending in 0; timesteps: int64 [N], what the network is fed.
  FlowScheduler(at::Tensor sigmas, at::Tensor timesteps);
  virtual ~FlowScheduler() = default;

  const at::Tensor& sigmas() const { return sigmas_; }
  const at::Tensor& timesteps() const { return timesteps_; }
  int64_t num_steps() const { return timesteps_.size(0); }

  // The (CFG-combined) velocity at step i -> the sample at step i+1, float32. Steps run in order.
  virtual at::Tensor step(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample) = 0;

  // On a fresh scheduler: the first step is `step_index` (video-to-video skips the noisiest ones),
  // taken without history, as scheduler.py's start_at.
  void start_at(int64_t step_index);

 protected:
  at::Tensor sigmas_, timesteps_, lambdas_;  // lambda = ln(1 - sigma) - ln(sigma), per element
  int64_t next_step_ = 0;
  int64_t advance(int64_t step_index);
};

// solver: "unipc" | "dpm++" | "euler"; grid: "official" | "diffusers". Throws UsageError.
std::unique_ptr<FlowScheduler> make_scheduler(const std::string& solver, int64_t steps, double shift,
                                              const std::string& grid,
                                              const std::vector<int64_t>& disable_corrector = {});

}  // namespace wan_rt
