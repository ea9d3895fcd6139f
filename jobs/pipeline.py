"""`ray job submit ... -- python jobs/pipeline.py [flags]`: prepare, train, export, evaluate and
infer in one submission; with `--folds K`, the whole study (crossval, its ensemble scored on the test
split, every test patient segmented).

Same flags as `aisd-ray pipeline` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
