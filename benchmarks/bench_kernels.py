"""Kernel micro-benchmarks: the same as `suncet bench kernels [options]` (see --help).

The implementation lives in the installed package (suncet/bench/kernels.py); this script only
forwards its arguments, so that it runs from a checkout as well.
"""

import sys

from suncet.cli.bench import kernels_command

if __name__ == "__main__":
    kernels_command.main(args=sys.argv[1:], prog_name="bench_kernels.py")
