"""`ray job submit ... -- python jobs/infer.py [flags]`: segment CT patients (a DICOM series folder, a
NIfTI file, or a folder of them: `--input`) or a folder of images (`--images`) with an export.

Same flags as `aisd-ray infer` (see `--help`); a failure exits non-zero with the reason.
"""

import sys

from aisd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
