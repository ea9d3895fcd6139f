"""TensorFlow without its C++ start-up chatter.

TensorFlow 2.21 logs through absl before absl's logging is initialised, which ignores
``TF_CPP_MIN_LOG_LEVEL``: every process that imports it prints a "WARNING: All log messages
before absl::InitializeLog()..." line, oneDNN and CUDA-stub notices, the cpu_feature_guard line
and, on a machine without a GPU, "failed call to cuInit" - in every command's output and every
Ray worker's job log. The only way to keep them out is to send the process's stderr (file
descriptor 2) to /dev/null while TensorFlow loads and probes its devices, then restore it;
Python-level errors still surface.

Which module imports TensorFlow first differs by command and by config (Keras through the model,
``export``, ``evaluate``, ``infer``, the TFRecord writer of ``prepare``...), so the quieting is tied
to the import itself, not to a list of commands: ``quiet_tensorflow_import`` puts a finder on
``sys.meta_path`` that loads ``tensorflow`` with stderr silenced whenever, and by whomever, it is
first imported. ``import_tensorflow`` loads it now, the same way. ``verbose`` keeps the chatter.
Ray worker processes get the finder from ``quiet_worker`` and import TensorFlow only if they use it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys

# One log line format for the driver and the training workers: "15:06:10 INFO aisd_ray.x: message".
LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
VERBOSE_ENV = "AISD_RAY_VERBOSE"  # "1": keep the chatter (set by -v; Ray workers inherit it)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 goes to /dev/null inside the block (C++ writes there directly)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _OnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds module ``name`` as the other finders do and loads it through ``load(exec_module,
    module)`` (which must call ``exec_module(module)``), then hands the module back to its own
    loader; any other name is left to the other finders. Removes itself once it has found it."""

    def __init__(self, name: str, load) -> None:
        self.name, self.load, self.loader = name, load, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    self.loader, spec.loader = spec.loader, self
                return spec
        return None

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.load(self.loader.exec_module, module)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader


def _load_tensorflow_quietly(exec_module, module) -> None:
    """TensorFlow's own loader with stderr silenced, and its device probe (CUDA probing happens
    there, once per process)."""
    with _stderr_silenced():
        exec_module(module)
        module.config.list_physical_devices()


def _remove_finder(name: str) -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, _OnImport) and f.name == name)]


def quiet_tensorflow_import(quiet: bool = True) -> None:
    """From now on in this process, the first ``import tensorflow`` (direct, or through Keras or
    any submodule) is silent; ``quiet=False`` takes that back (``-v``). Does nothing once
    TensorFlow is loaded: its start-up lines are printed once, at load."""
    _remove_finder("tensorflow")
    if quiet and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _OnImport("tensorflow", _load_tensorflow_quietly))


def import_tensorflow(verbose: bool | None = None):
    """``import tensorflow`` (and its device probe) quietly unless ``verbose`` (default: the
    ``AISD_RAY_VERBOSE`` environment variable); returns the module."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    if not verbose:
        quiet_tensorflow_import()
    import tensorflow as tf

    return tf


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook`` (see ``ensure_ray`` and jobs/runtime_env.yaml), run in
    every Ray worker process of the job: TensorFlow, when the process imports it (Ray Train's
    TensorFlow backend, our training loop), loads quietly; Ray Data's per-execution INFO lines
    ("Starting execution of Dataset ...", "... execution finished in ...", from the actor that
    splits a dataset between the training workers) stay out of the job's output, once Ray Data is
    imported. Both unless verbose. Nothing is imported here: most of a job's worker processes
    (Ray Train's controller helpers, Ray Data's read tasks) never need TensorFlow, whose import
    costs each about 6 CPU seconds and raises its peak memory from 65 to 666 MiB (measured Nov
    2026 on the 2-core machine)."""
    verbose = os.environ.get(VERBOSE_ENV) == "1"
    quiet_tensorflow_import(quiet=not verbose)
    if verbose:
        return
    if "ray.data" in sys.modules:
        quiet_ray_data_logs()
    else:
        def then_quiet(exec_module, module) -> None:  # ray.data's import sets its loggers' levels
            exec_module(module)
            quiet_ray_data_logs()

        _remove_finder("ray.data")
        sys.meta_path.insert(0, _OnImport("ray.data", then_quiet))


def quiet_ray_data_logs() -> None:
    """Ray Data's INFO lines per execution, and its one-off warning that progress bars are off
    (they are off on purpose, see ``data.ray_data.quiet_ray_data``), out of the output."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
