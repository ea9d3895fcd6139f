"""Entry point for `ray job submit ... -- python jobs/demo.py --output DIR`: the whole pipeline.

A thin layer over the package: same flags as `aisd-ray demo`; a failure exits non-zero.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
