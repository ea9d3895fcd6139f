"""The pipeline's stages as plain functions, the one door of every command: the CLI and the
``jobs/`` entry points parse and print, and call these.

synthesize, prepare (``data.py``) -> train, export (``run.py``) -> evaluate, infer (``score.py``);
``pipeline`` chains them for one submission and ``demo`` runs it on synthetic data
(``pipeline.py``); tune, crossval, sweep and benchmark run many of them (their own modules, reached here).
Each returns where its outputs went, or its figures.
"""

from aisd_ray.stages.data import prepare, synthesize, synthetic_source
from aisd_ray.stages.pipeline import DemoResult, demo, pipeline
from aisd_ray.stages.run import export, on_node, run_config, run_uri, train
from aisd_ray.stages.score import Inferred, evaluate, infer


def tune(cfg, shards_uri: str, output: str):
    """A Ray Tune search over Ray Train trials (``aisd_ray.tune``); its result."""
    from aisd_ray.tune import search

    return search(cfg, shards_uri, output)


def crossval(cfg, output: str, progress: bool = True):
    """Patient k-fold cross-validation with an ensemble export (``aisd_ray.crossval``); its summary."""
    from aisd_ray.crossval import crossval as run

    return run(cfg, output, progress)


def sweep(cfg, output: str, plan, progress: bool = False):
    """The demo over several seeds on both backends (``aisd_ray.sweep``, ``plan``: a ``sweep.Plan``), or
    the accuracy variants side by side (``aisd_ray.sweep_variants``, a ``VariantPlan``); its report."""
    from aisd_ray import sweep as sweeps
    from aisd_ray import sweep_variants

    if isinstance(plan, sweep_variants.VariantPlan):
        return sweep_variants.sweep_variants(cfg, output, plan, progress)
    return sweeps.sweep(cfg, output, plan, progress)


def benchmark(output: str, **options):
    """Input pipeline, memory, training and inference speed (``aisd_ray.benchmark.run``); its report."""
    from aisd_ray import benchmark as benchmarks

    return benchmarks.run(output, **options)


__all__ = ["DemoResult", "Inferred", "benchmark", "crossval", "demo", "evaluate", "export", "infer", "on_node",
           "pipeline", "prepare", "run_config", "run_uri", "sweep", "synthesize", "synthetic_source", "train", "tune"]
