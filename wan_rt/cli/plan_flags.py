"""The parallel-plan flags `wan-rt run` and `wan-rt serve` share (README "Multi-GPU")."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from wan_rt.parallel import ParallelPlan


def add_plan_arguments(parser: argparse.ArgumentParser, title: str):
    group = parser.add_argument_group(title)
    group.add_argument("--ulysses", type=int, default=1, metavar="U",
                       help="Ulysses degree: attention heads split U ways")
    group.add_argument("--ring", type=int, default=1, metavar="R",
                       help="ring-attention degree: K/V blocks passed around R ranks")
    group.add_argument("--cfg-parallel", action="store_true", help="cond and uncond on two halves of the ranks")
    group.add_argument("--shard-weights", action="store_true", help="FSDP2-shard each DiT expert over the ranks")
    return group


def plan_from_args(args: argparse.Namespace) -> Optional["ParallelPlan"]:
    """The plan the flags ask for; None when they ask for none. (Torch loads here, not at --help.)"""
    if args.ulysses == 1 and args.ring == 1 and not args.cfg_parallel and not args.shard_weights:
        return None
    from wan_rt.parallel import ParallelPlan

    return ParallelPlan(ulysses=args.ulysses, ring=args.ring, cfg=2 if args.cfg_parallel else 1,
                        shard_weights=args.shard_weights)
