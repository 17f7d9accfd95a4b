"""The parallel plan: how one video is spread over C × R × U processes, and their groups.

Degrees: Ulysses U (attention heads split, all-to-all), ring R (key/value blocks passed around
a ring), CFG C ∈ {1, 2} (cond on one half of the ranks, uncond on the other); world = C·R·U.
Rank layout, cfg outermost and Ulysses innermost, so that the heaviest traffic (Ulysses'
all-to-all, every block) stays between neighbouring ranks (one node, NVLink):

    rank = c·(R·U) + r·U + u

The DiT tokens are split over the R·U ranks of one CFG half in that (r, u) order: chunk
r·U + u of the padded sequence lives on rank (c, r, u). `ParallelPlan` is a plain value (check it
anywhere, e.g. in the CLI before starting processes); `ParallelPlan.groups()` makes the process
groups inside an initialized torch.distributed job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional, Sequence

from wan_rt.config import ModelSpec


class PlanError(ValueError):
    """A plan that cannot run this model or this job: one line naming what would work."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelPlan:
    """ulysses, ring, cfg: the degrees; shard_weights: FSDP2-shard every DiT block over the
    world (each rank keeps 1/world of the weights between uses); text_encoder_on_one_rank: umT5
    is loaded and run on rank 0 only and its output broadcast; split_vae: the VAE decode is split
    by height over the world (eager VAE; exact, with halo rows); timeout_s: how long a collective
    of the plan's process groups waits for the other ranks before it fails (None: torch's default,
    10 min on NCCL, 30 on gloo); pass the same to `launch.init_process_group` for the world group."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    shard_weights: bool = False
    text_encoder_on_one_rank: bool = True
    split_vae: bool = True
    timeout_s: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"--{name} must be a positive integer; got {value!r}")
        if self.cfg not in (1, 2):
            raise PlanError(f"the CFG degree is 1 or 2 (cond and uncond); got {self.cfg!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise PlanError(f"a collective timeout must be > 0 seconds; got {self.timeout_s!r}")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def sequence_degree(self) -> int:
        """Ranks one CFG half splits the DiT tokens over."""
        return self.ring * self.ulysses

    def describe(self) -> str:
        parts = [f"ulysses {self.ulysses}"] + ([f"ring {self.ring}"] if self.ring > 1 else [])
        parts += ["cfg 2"] if self.cfg > 1 else []
        parts += ["sharded weights"] if self.shard_weights else []
        return f"{' × '.join(parts)} on {self.world_size} processes"

    # ------------------------------------------------------------------ checks
    def check_model(self, spec: ModelSpec) -> None:
        heads = spec.dit.num_heads
        if heads % self.ulysses:
            valid = ", ".join(map(str, divisors(heads)))
            raise PlanError(f"--ulysses {self.ulysses} does not divide the {heads} attention heads of {spec.name}; "
                            f"valid Ulysses degrees: {valid}")

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise PlanError(f"world size {world_size} is not cfg {self.cfg} × ring {self.ring} × ulysses "
                            f"{self.ulysses} = {self.world_size}")

    def check_guidance(self, guide: Mapping[str, float]) -> None:
        """CFG parallel splits cond and uncond; a stage without guidance has only cond."""
        if self.cfg == 1:
            return
        unguided = [f"{name} {g:g}" for name, g in guide.items() if g <= 1.0]
        if unguided:
            raise PlanError(f"--cfg-parallel needs classifier-free guidance (> 1) on every expert; "
                            f"guidance is {', '.join(unguided)}")

    def check_engine_dits(self, engine_dits: Sequence[str]) -> None:
        """Sequence parallelism and sharding change the eager DiT; an engine's graph is fixed."""
        if engine_dits and (self.sequence_degree > 1 or self.shard_weights):
            name = engine_dits[0]
            raise PlanError(f"--ulysses/--ring/--shard-weights work on the eager DiT; {name} runs on an engine "
                            f"(pass --backend eager or --backend-for {name}=eager, or use --cfg-parallel alone)")

    # ------------------------------------------------------------------ process groups
    def groups(self) -> "ParallelGroups":
        """This rank's coordinates and process groups. Every rank of the job must call it, in
        the same order relative to other group creation (torch.distributed's rule)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise PlanError("a parallel plan runs inside an initialized torch.distributed process group "
                            "(torchrun, or `wan-rt run --ulysses N`, which starts the processes)")
        world, rank = dist.get_world_size(), dist.get_rank()
        self.check_world(world)
        C, R, U = self.cfg, self.ring, self.ulysses
        c, r, u = rank // (R * U), rank // U % R, rank % U
        # new_group does not inherit the world's timeout: it takes torch's default unless given one
        timeout = None if self.timeout_s is None else timedelta(seconds=self.timeout_s)

        def make(members_of: list[list[int]], size: int):
            """One group per member list (every rank creates every group); returns this rank's."""
            if size == 1:
                return None
            mine = None
            for members in members_of:
                group = dist.new_group(members, timeout=timeout)
                if rank in members:
                    mine = group
            return mine

        seq = make([[k * R * U + i for i in range(R * U)] for k in range(C)], R * U)
        ulysses = make([[k * R * U + j * U + i for i in range(U)] for k in range(C) for j in range(R)], U)
        ring = make([[k * R * U + j * U + i for j in range(R)] for k in range(C) for i in range(U)], R)
        cfg = make([[k * R * U + j * U + i for k in range(C)] for j in range(R) for i in range(U)], C)
        return ParallelGroups(self, rank, world, c, r, u, seq, ulysses, ring, cfg, dist.group.WORLD)


@dataclass
class ParallelGroups:
    """One rank's place in the plan and its process groups (None where the degree is 1)."""

    plan: ParallelPlan
    rank: int
    world_size: int
    cfg_index: int        # c: 0 runs cond, 1 uncond
    ring_index: int       # r
    ulysses_index: int    # u
    sequence: Optional[object]   # the R·U ranks of this CFG half (token split and gather)
    ulysses: Optional[object]    # the U ranks sharing ring chunk r (all-to-all)
    ring: Optional[object]       # the R ranks with the same u (K/V ring)
    cfg: Optional[object]        # the C ranks holding the same tokens (cond / uncond exchange)
    world: object

    @property
    def sequence_index(self) -> int:
        """Which chunk of the padded token sequence this rank computes."""
        return self.ring_index * self.plan.ulysses + self.ulysses_index

    def ring_neighbours(self) -> tuple[int, int]:
        """Global ranks (previous, next) on this rank's K/V ring."""
        R, U = self.plan.ring, self.plan.ulysses
        base = self.cfg_index * R * U + self.ulysses_index
        return base + (self.ring_index - 1) % R * U, base + (self.ring_index + 1) % R * U


def from_environment() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) when this process was started by torchrun or by
    `wan-rt run`'s launcher (their environment variables), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def local_device():
    """This process's device in a multi-process job: cuda:LOCAL_RANK on a GPU machine, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
