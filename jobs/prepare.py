"""`ray job submit ... -- python jobs/prepare.py [flags]`: shard a source (the original's tree or the
raw AISD release) into SHARDS.

Same flags as `aisd-ray prepare` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
