"""Entry point for `ray job submit ... -- python jobs/benchmark.py --output FILE.json` on a GPU node."""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
