"""One video across N processes (GPUs, or CPU processes with gloo): Ulysses and ring sequence
parallelism, CFG parallel, FSDP2-sharded experts, the text encoder on one rank and the VAE
decode split by height. Everything here is applied from outside: model-op swaps on the eager
DiT and VAE (sequence.py, vae.py) and component wrappers (cfg.py, text.py, shard.py); the
denoise loop is unchanged. `parallelize` applies a plan to a pipeline's components;
`launch.py` starts the processes for the CLI."""

from wan_rt.parallel.apply import local_component_names, parallelize
from wan_rt.parallel.plan import ParallelGroups, ParallelPlan, PlanError

__all__ = ["ParallelPlan", "ParallelGroups", "PlanError", "parallelize", "local_component_names"]
