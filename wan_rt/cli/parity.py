"""`wan-rt parity`: check built engines against the eager oracle (run it after every build)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wan_rt.cli.build import DEFAULT_ENGINES_DIR


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("parity", help="compare engines with the eager oracle")
    p.add_argument("--engines-dir", default=DEFAULT_ENGINES_DIR, help="the engines to check")
    p.add_argument("--model", default=None, help="default: the model the engines were built from")
    p.add_argument("--steps", type=int, default=2,
                   help="steps of the end-to-end check (0 skips it; fp8/int8 engines: their quality report "
                        "runs the model's default steps)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def run(args: argparse.Namespace) -> int:
    import torch

    from wan_rt.parity import format_rows, parity_rows

    device = torch.device(args.device) if args.device else None
    rows = parity_rows(Path(args.engines_dir), model=args.model, steps=args.steps, device=device)
    print(format_rows(rows))
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
