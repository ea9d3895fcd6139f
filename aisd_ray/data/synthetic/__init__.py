"""The synthetic stand-in for AISD: PNG slices (``slices.py``), HU volumes (``volumes.py``), and
the writer of the layout a config asks for (``layouts.py``)."""
