"""`ray job submit ... -- python jobs/evaluate.py [flags]`: score an export on a sharded split.

Same flags as `aisd-ray evaluate` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
