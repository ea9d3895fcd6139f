"""TensorFlow without its C++ start-up chatter.

TensorFlow 2.21 logs through absl before absl's logging is initialised, which ignores
``TF_CPP_MIN_LOG_LEVEL``: every process that imports it prints a "WARNING: All log messages
before absl::InitializeLog()..." line, oneDNN and CUDA-stub notices and, on a machine without a
GPU, "failed call to cuInit" - in every command's output and every Ray worker's job log.
``import_tensorflow`` sends the process's stderr to /dev/null while TensorFlow loads and probes
its devices, then restores it; Python-level errors still surface. ``verbose`` keeps the chatter.
"""

from __future__ import annotations

import os
import sys

VERBOSE_ENV = "AISD_RAY_VERBOSE"  # "1": keep the chatter (set by -v; Ray workers inherit it)


def import_tensorflow(verbose: bool | None = None):
    """``import tensorflow`` (and its device probe) quietly unless ``verbose`` (default: the
    ``AISD_RAY_VERBOSE`` environment variable); returns the module."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    if verbose or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA probing happens here, once per process
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook`` (see ``ensure_ray`` and jobs/runtime_env.yaml): loads
    TensorFlow quietly in every Ray worker process of the job before Ray Train's TensorFlow
    backend imports it loudly, and keeps Ray Data's per-execution INFO lines ("Starting execution
    of Dataset ...", "... execution finished in ...", from the actor that splits a dataset between
    the training workers) out of the job's output unless verbose."""
    import_tensorflow()
    if os.environ.get(VERBOSE_ENV) != "1":
        import ray.data  # noqa: F401 - configures the "ray.data" logger; quieten it afterwards

        quiet_ray_data_logs()


def quiet_ray_data_logs() -> None:
    """Ray Data's INFO lines per execution, and its one-off warning that progress bars are off
    (they are off on purpose, see ``ray_train.quiet_ray_data``), out of the output."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
