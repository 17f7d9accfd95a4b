"""python -m wan_rt.cpp run_graph [OUTPUT]: print the command that builds the C++ example."""

import shlex
import sys

from wan_rt.cpp import EXAMPLES, compile_command


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in EXAMPLES:
        print(f"usage: python -m wan_rt.cpp {{{','.join(EXAMPLES)}}} [OUTPUT]", file=sys.stderr)
        return 2
    name = sys.argv[1]
    print(shlex.join(compile_command(EXAMPLES[name], sys.argv[2] if len(sys.argv) > 2 else name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
