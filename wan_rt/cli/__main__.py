"""`python -m wan_rt.cli ...` (what `torchrun ... -m wan_rt.cli run` and the launcher start)."""

import sys

from wan_rt.cli import main

sys.exit(main())
