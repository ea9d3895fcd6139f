"""The top of the package: ``aisd-ray``'s commands (``commands.py``: one per stage, plus ``demo``) and
their flags as config overrides (``flags.py``). ``aisd_ray.cli:main`` is the console script and what
the ``jobs/`` entry points call; ``python -m aisd_ray.cli`` runs it too (``__main__.py``)."""

from aisd_ray.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
