"""The pipeline's stages as plain functions, the one door of every command: the CLI and the
``jobs/`` entry points parse and print, and call these.

synthesize, prepare (``data.py``) -> train, export (``run.py``) -> evaluate, infer (``score.py``);
``pipeline`` chains them for one submission and ``demo`` runs it on synthetic data
(``pipeline.py``). Each returns where its outputs went, or its figures. Nothing below this package
imports it: the many-run orchestrators that call it (tune, crossval, sweep: ``aisd_ray.studies``;
the benchmark: ``aisd_ray.bench``) sit above it, and the CLI reaches them directly.
"""

from aisd_ray.stages.data import prepare, synthesize, synthetic_source
from aisd_ray.stages.pipeline import DemoResult, demo, pipeline
from aisd_ray.stages.run import export, on_node, run_config, run_uri, train
from aisd_ray.stages.score import Inferred, evaluate, infer


__all__ = ["DemoResult", "Inferred", "demo", "evaluate", "export", "infer", "on_node", "pipeline", "prepare",
           "run_config", "run_uri", "synthesize", "synthetic_source", "train"]
