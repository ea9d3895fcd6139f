"""`ray job submit ... -- python jobs/infer.py [flags]`: segment a folder of images with an export.

Same flags as `aisd-ray infer` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
