"""`ray job submit ... -- python jobs/crossval.py [flags]`: patient k-fold cross-validation, the
folds trained at once on the cluster; the folds' ensemble is exported.

Same flags as `aisd-ray crossval` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["crossval", *sys.argv[1:]]))
