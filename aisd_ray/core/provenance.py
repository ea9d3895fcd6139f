"""What made a run: package versions, the code's git commit, the config's hash and the machine.

Written as ``provenance.json`` into every run folder and into every export's ``export.json``,
so a figure can always be traced to the code, libraries and hardware that produced it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aisd_ray.core import storage

PACKAGES = ("aisd-ray", "tensorflow", "keras", "ray", "numpy", "pyarrow", "google-cloud-storage")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def package_version() -> str:
    """aisd-ray's installed version (``--version``)."""
    return _version("aisd-ray") or "unknown (not installed)"


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree this package runs from (with '+dirty' for local changes)."""
    root = Path(__file__).resolve().parents[2]  # aisd_ray/core/provenance.py: the repository
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "system": platform.platform(),
            "python": platform.python_version(), "host": platform.node()}


def facts(config_toml: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"created": storage.utc_now(),
                           "packages": {name: _version(name) for name in PACKAGES},
                           "git_commit": git_commit(), "machine": machine()}
    if config_toml is not None:
        out["config_sha256"] = hashlib.sha256(config_toml.encode()).hexdigest()
    return out
