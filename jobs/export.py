"""`ray job submit ... -- python jobs/export.py --run RUN [--output DIR]`: export a run's best
checkpoint as a SavedModel.

Same flags as `aisd-ray export` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
