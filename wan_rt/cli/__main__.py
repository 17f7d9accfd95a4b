"""`python -m wan_rt.cli ...` (what `torchrun ... -m wan_rt.cli run` and the launcher start)."""

import sys

from wan_rt.child_process import drop_current_folder

drop_current_folder()  # from a clone's root, its kernels/ would shadow the installed `kernels`

from wan_rt.cli import main  # noqa: E402

sys.exit(main())
