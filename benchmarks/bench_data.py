"""Data-pipeline benchmarks: the same as `suncet bench data [options]` (see --help).

The implementation lives in the installed package (suncet/bench/data.py); this script only
forwards its arguments, so that it runs from a checkout as well.
"""

import sys

from suncet.bench.data import data

if __name__ == "__main__":
    data.main(args=sys.argv[1:], prog_name="bench_data.py")
