"""What a file is, without reading it: a stamp per file of a folder or a bucket prefix.

A local file's stamp is ``[size, mtime_ns]`` (``os.stat``); an object's is ``[size, generation,
crc32c]``, from the bucket's listing (google-cloud-storage's ``list_blobs``: one request per 1,000
objects, no object downloaded). An object is replaced whole, and every replacement has a new
generation; a local file rewritten gets a new modification time (a rewrite that restores the old
time by hand is not seen: ``prepare --verify`` reads everything). ``prepare`` compares these
stamps with the ones its manifest recorded to decide that nothing changed (no-op prepare).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

from aisd_ray.core import storage

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _client(emulator: str | None, project: str | None):
    from google.cloud import storage as gcs

    if emulator:  # the client reads STORAGE_EMULATOR_HOST itself; no credentials there
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(project=project or "aisd-ray", credentials=AnonymousCredentials())
    return gcs.Client(project=project)


def tree(uri: str) -> dict[str, list[Any]] | None:
    """{path relative to ``uri`` ("train/train-00000-ab12cd34.parquet"): its stamp} of every file
    under the folder or prefix ``uri``; {} when there is none; None when it cannot be listed now
    (the caller then reads what it must)."""
    try:
        if storage.is_local(uri):
            return _local(storage.resolve(uri)[1])
        return _bucket(uri)
    except Exception as exc:  # noqa: BLE001 - a listing that fails only means "read instead"
        log.info("%s: cannot list file stamps (%s); files are read instead", uri, str(exc)[:200])
        return None


def _local(root: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    if not os.path.isdir(root):
        return out
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[os.path.relpath(path, root).replace(os.sep, "/")] = [st.st_size, st.st_mtime_ns]
    return out


def _bucket(uri: str) -> dict[str, list[Any]]:
    bucket, _, prefix = uri[len("gs://"):].rstrip("/").partition("/")
    prefix = f"{prefix}/" if prefix else ""
    client = _client(os.environ.get("STORAGE_EMULATOR_HOST"), os.environ.get("GOOGLE_CLOUD_PROJECT"))
    out: dict[str, list[Any]] = {}
    for blob in client.list_blobs(bucket, prefix=prefix):
        if not blob.name.endswith("/"):  # pyarrow's empty "folder/" markers are not files
            out[blob.name[len(prefix):]] = [blob.size, blob.generation, blob.crc32c]
    return out


def modified_ns(stamp: list[Any] | None) -> int | None:
    """A local stamp's modification time (ns); None for an object's (which has generations instead)."""
    return stamp[1] if stamp is not None and len(stamp) == 2 else None


def settle(uri: str, stamps: dict[str, list[Any]]) -> None:
    """Wait until a file written now under the local folder ``uri`` gets a later modification time
    than every stamp in ``stamps`` (file systems stamp with a coarse clock, a few ms per tick), so
    that a file changed after the next write can never carry the time recorded for it. Nothing to
    wait for on object storage."""
    times = [t for t in map(modified_ns, stamps.values()) if t is not None]
    if not storage.is_local(uri) or not times:
        return
    wait = (max(times) + 25_000_000 - time.time_ns()) / 1e9  # 25 ms: more than one tick of the coarse clock
    if wait > 0:
        time.sleep(min(wait, 0.1))
