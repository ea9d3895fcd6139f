"""Entry point for `ray job submit ... -- python jobs/sweep.py --output DIR`: the sweep over random seeds.

A thin layer over the package: same flags as `aisd-ray sweep`; a failure exits non-zero.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
