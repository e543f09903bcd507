"""``python -m benchmarks.profiled OUT MODULE [ARGS...]``: run ``python -m MODULE ARGS`` under
cProfile and write its stats (pstats) to ``OUT`` when it returns, as ``kvplane router``
does on SIGTERM. For ``benchmarks/route.py --profile-router``; the product code has no
profiler hook."""

from __future__ import annotations

import cProfile
import runpy
import sys


def main() -> None:
    out, module, *rest = sys.argv[1:]
    sys.argv = [module, *rest]
    profile = cProfile.Profile()
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
