"""python -m wan_rt.cpp build | source-dir | tables

build       configure and build the C++ runtime (cached); the last line printed is wan-rt-cpp's path
source-dir  the CMake project's folder (for a service's add_subdirectory)
tables      regenerate src/text_tables.inc (prompt cleaning tables) from Python's and ftfy's
"""

import sys

from wan_rt.child_process import drop_current_folder


def main() -> int:
    drop_current_folder()  # from a clone's root, its top-level folders would shadow installed packages
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "build":
        from wan_rt.cpp import CppBuildError, build

        try:
            print(build())
        except CppBuildError as exc:
            print(f"python -m wan_rt.cpp build: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if command == "source-dir":
        from wan_rt.cpp import SOURCE_DIR

        print(SOURCE_DIR)
        return 0
    if command == "tables":
        from wan_rt.cpp.text_tables import write

        print(write())
        return 0
    print("usage: python -m wan_rt.cpp {build,source-dir,tables}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
