"""`ray job submit ... -- python jobs/train.py [flags]`: train (or resume) a run with Ray Train.

Same flags as `aisd-ray train` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
