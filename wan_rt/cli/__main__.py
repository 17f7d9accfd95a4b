"""`python -m wan_rt.cli ...` (what `torchrun ... -m wan_rt.cli run` and the launcher start)."""

import os
import sys

from wan_rt.child_process import drop_current_folder

drop_current_folder()  # from a clone's root, its kernels/ would shadow the installed `kernels`

from wan_rt.cli import main  # noqa: E402

code = main()
if os.environ.get("WAN_RT_LAUNCHER"):
    # A rank of wan-rt's own launcher: its work is written and its process group destroyed, so
    # leave without the interpreter's finalization, where daemon threads and the C++ destructors
    # of the collectives' state (gloo / NCCL threads) can abort a process that has succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
