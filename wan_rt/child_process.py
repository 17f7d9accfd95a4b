"""Python processes wan_rt starts, kept from importing the folder they were started in.

`python -m X` and `python -c ...` put the current folder first on sys.path. From the root of a
clone that folder holds `kernels/` and `export/`, which would then shadow installed packages of
the same name: transformers imports the hub package `kernels`, and gets the clone's folder.
So every Python child wan_rt starts (the ranks of a parallel run, service workers) runs in
Python's safe-path mode (`-P`, Python 3.11+; on 3.10 a one-line bootstrap drops the entry), with
PYTHONSAFEPATH=1 in its environment, which its own children inherit (Inductor's compile workers,
torch elastic's ranks), and without PYTHONPATH entries that name the current folder.
`python -m wan_rt...` entry points call `drop_current_folder()` first, for the same reason.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

SAFE_PATH_FLAG = sys.version_info >= (3, 11)   # -P and PYTHONSAFEPATH arrived in Python 3.11


def python_command(*args: str) -> list[str]:
    """The argv of `python *args` (args: `-m MODULE`, `-c CODE` or a script, then its arguments)
    that keeps the current folder off the child's sys.path."""
    args = args[1:] if args[:1] == ("-P",) else args
    if SAFE_PATH_FLAG:
        return [sys.executable, "-P", *args]
    if args[0] not in ("-m", "-c"):  # a script: Python puts the script's folder first, not this one
        return [sys.executable, *args]
    flag, target, *rest = args
    drop = "import sys; del sys.path[0]"   # Python 3.10 put '' (-c) or the folder (-m) there
    if flag == "-m":
        code = f"{drop}; import runpy; runpy.run_module({target!r}, run_name='__main__', alter_sys=True)"
    else:
        code = f"{drop}\n{target}"
    return [sys.executable, "-c", code, *rest]


def child_environment(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """`base` (default os.environ) for a child process: safe-path mode on, and PYTHONPATH without
    entries that resolve to the current folder ('', '.', the folder itself)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONSAFEPATH"] = "1"
    if "PYTHONPATH" in env:
        kept = [p for p in env["PYTHONPATH"].split(os.pathsep) if not _is_current_folder(p)]
        if kept:
            env["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            del env["PYTHONPATH"]
    return env


def drop_current_folder() -> None:
    """In a `python -m wan_rt...` entry point: remove the current folder Python put first on
    sys.path (nothing under -P / PYTHONSAFEPATH, where it put none)."""
    if not getattr(sys.flags, "safe_path", False) and sys.path and _is_current_folder(sys.path[0]):
        del sys.path[0]


def _is_current_folder(entry: str) -> bool:
    try:
        return os.path.samefile(entry or ".", ".")
    except OSError:  # a PYTHONPATH entry that does not exist names no folder
        return False
