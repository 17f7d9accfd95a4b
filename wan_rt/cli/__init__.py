"""`wan-rt` command line: subcommands are modules with add_parser(subparsers) and run(args).

Subcommand modules are imported inside main() so `wan-rt --help` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Optional, Sequence

SUBCOMMANDS = ("build", "run", "parity", "serve")


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit code 2, no traceback (WAN_RT_DEBUG=1 shows it)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help only where it tells something: not after a help
    that states its own default ("default: the model's"), nor for None / False / [] (values the
    code works out, flags off, nothing repeated)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or re.search(r"\bdefault:", text, re.I):
            return text
        return super()._get_help_string(action) or text


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage dump) and exit code 2; option help
    through HelpFormatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The `wan-rt` parser and its subcommand modules by name."""
    parser = _Parser(prog="wan-rt", description="Run Wan 2.2 video models from compiled engines.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modules = {name: importlib.import_module(f"wan_rt.cli.{name}") for name in SUBCOMMANDS}
    for module in modules.values():
        module.add_parser(subparsers)
    return parser, modules


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, modules = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad argument already printed as one line
        return int(exit_.code or 0)
    args.argv = argv  # a multi-process run starts its ranks with the same command line
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("wan-rt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure the user can cause becomes one line
        if os.environ.get("WAN_RT_DEBUG"):
            raise
        user_error = _is_user_error(exc)
        if "RANK" in os.environ:  # a rank of wan-rt's launcher: it prints the first rank's failure once
            from wan_rt.parallel.launch import record_failure

            if record_failure(exc, user_error):
                return 2 if user_error else 1
        if not user_error:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike
            print(f"wan-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _is_user_error(exc: Exception) -> bool:
    from wan_rt.models.checkpoint import CheckpointError
    from wan_rt.runtime.engines_dir import StaleEngineError

    if isinstance(exc, ImportError) and "pip install" in str(exc):  # an optional package: it names the extra
        return True
    return isinstance(exc, (UsageError, ValueError, FileNotFoundError, CheckpointError, StaleEngineError))


if __name__ == "__main__":
    sys.exit(main())
