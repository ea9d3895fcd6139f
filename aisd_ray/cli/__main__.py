"""``python -m aisd_ray.cli``: the same as the ``aisd-ray`` console script."""

import sys

from aisd_ray.cli.commands import main

sys.exit(main())
