"""`ray job submit ... -- python jobs/tune.py [flags]`: a Ray Tune search; the best trial is exported.

Same flags as `aisd-ray tune` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
