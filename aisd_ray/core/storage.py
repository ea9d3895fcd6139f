"""All file I/O of run outputs and shards goes through pyarrow filesystems.

Paths are plain strings (a local path or a URI) so that an object store drops in behind
the same calls; TensorFlow's own file system layer is never used for them.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import io
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs


class StorageError(Exception):
    """Object storage that cannot be used: unreachable, no credentials, no such bucket, unknown scheme."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem object and in-filesystem path of ``uri`` (a local path or ``gs://``). The
    first use of a bucket checks that it is reachable and exists (a missing bucket is an error,
    never created on the fly)."""
    if uri.startswith("gs://"):
        path = uri[len("gs://"):].rstrip("/")
        env = tuple(os.environ.get(k) for k in GCS_ENV)
        _check_bucket(path.split("/", 1)[0], *env)
        return _gcs(*env), path
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: storage scheme {scheme}:// is not supported (use a folder or gs://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


# Transient GCS errors (429, 5xx, dropped connections) are retried by the client library for up to
# AISD_STORAGE_RETRY_SECONDS (default 30); an endpoint still unreachable then is an error.
RETRY_ENV = "AISD_STORAGE_RETRY_SECONDS"
# Environment that decides where gs:// goes; Ray workers get it from the driver (see ray_train).
GCS_ENV = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", RETRY_ENV)


def retry_seconds(value: str | None = None) -> float:
    raw = value if value is not None else os.environ.get(RETRY_ENV)
    try:
        seconds = float(raw) if raw else 30.0
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={raw!r}: expected a number of seconds") from None
    return max(seconds, 1.0)


@functools.lru_cache(maxsize=None)
def _gcs(emulator: str | None, project: str | None, retry: str | None = None) -> pafs.GcsFileSystem:
    limit = datetime.timedelta(seconds=retry_seconds(retry))
    if emulator:
        scheme, _, endpoint = emulator.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, scheme=scheme or "http", endpoint_override=endpoint,
                                  project_id=project or "aisd-ray", retry_time_limit=limit)
    return pafs.GcsFileSystem(project_id=project, retry_time_limit=limit)


@functools.lru_cache(maxsize=None)
def _check_bucket(bucket: str, emulator: str | None, project: str | None, retry: str | None = None) -> None:
    where = f"the emulator at {emulator}" if emulator else "Google Cloud Storage"
    # Half the budget: the client's exponential backoff overshoots its time limit by up to as
    # much again (a 30 s limit measured 44 s against a closed port), and the first use of a
    # bucket is where a wrong endpoint shows, so it must end within the promised time.
    try:
        info = _gcs(emulator, project, str(retry_seconds(retry) / 2)).get_file_info(bucket)
    except OSError as exc:
        reason = str(exc).split(" error_info=")[0][:200]
        raise StorageError(f"gs://{bucket}: cannot reach {where} within {retry_seconds(retry):g} s "
                           f"({reason}); check the network, credentials and {RETRY_ENV}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"gs://{bucket}: no such bucket in {where}; create it first (infra/gcp/bucket.sh)")


def endpoint() -> str:
    """Where gs:// goes, in words: the emulator's address or Google Cloud Storage."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    return f"the emulator at {emulator}" if emulator else "Google Cloud Storage"


def explain(exc: OSError) -> str | None:
    """One line for an object-storage failure that outlived the retries (pyarrow's raw
    ``google::cloud::Status(...)`` text), naming the endpoint; None for any other OSError."""
    text = str(exc)
    if not text.startswith("google::cloud::Status("):
        return None
    reason = text.split(" error_info=")[0].removeprefix("google::cloud::Status(")
    reason = reason.split("last message of ")[-1][:160]
    return (f"{endpoint()} stopped answering ({reason}); gave up after {retry_seconds():g} s of retries "
            f"({RETRY_ENV}); rerun the same command when it is back: work resumes from the last checkpoint")


def check_reachable(uri: str) -> None:
    """Raise a StorageError naming the endpoint when the storage of ``uri`` does not answer now
    (after the retries); nothing for a local path or storage that answers."""
    if is_local(uri):
        return
    fs, path = resolve(uri)
    try:
        fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{uri}: {explain(exc) or exc}") from None


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers run in another directory); URIs unchanged."""
    return os.path.abspath(uri.removeprefix("file://")) if is_local(uri) else uri


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def ensure_dir(uri: str) -> None:
    """Create the folder ``uri`` (and its parents); a path that cannot be one is a StorageError
    naming it (a file in the way, a read-only place)."""
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc).split("Detail: ")[-1]
        raise StorageError(f"{uri}: cannot create this folder: {reason}") from None


def size(uri: str) -> int | None:
    """The size of the file ``uri`` in bytes; None when there is no such file."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers never see it half-written: locally through a temporary
    name and a rename; an object store publishes an object only once its upload completes."""
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if not is_local(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def utc_now() -> str:
    """Now as ISO 8601 UTC to the second (``2026-11-30T15:06:10Z``): how manifests, markers and
    provenance stamp the time."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def json_safe(value: Any) -> Any:
    """NaN (an undefined figure) as null; tuples as lists; numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(uri: str, value: Any) -> None:
    """``value`` as indented JSON (``json_safe``: NaN as null), atomically."""
    write_text(uri, json.dumps(json_safe(value), indent=2))


def write_csv(uri: str, rows: list[dict[str, Any]], fields: list[str] | None = None) -> None:
    """Rows as CSV with a header (``fields``, else every key of the rows in first-seen order),
    atomically; a row without a field leaves it empty."""
    fields = fields or list(dict.fromkeys(k for row in rows for k in row)) or ["name"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(uri, buf.getvalue())


def open_output(uri: str):
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    return fs.open_output_stream(path)


def open_input(uri: str):
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_dir(uri: str, folders: bool = False) -> list[str]:
    """Base names directly under ``uri`` (empty when it does not exist); with ``folders``, only the
    folders (a name something lies under, or one the store reports as a directory)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    # Recursive, then cut to the first level: object stores do not always report "folders"
    # that exist only as a prefix of deeper objects.
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = set()
    for info in infos:
        first, _, below = info.path[len(path):].strip("/").partition("/")
        if not folders or below or info.type == pafs.FileType.Directory:
            names.add(first)
    return sorted(names - {""})


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to ``uri`` (replacing files of the same name)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | Path) -> None:
    fs, path = resolve(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())


def download_tree(uri: str, local_dir: str | Path, progress: bool = False) -> int:
    """Copy every file under ``uri`` to ``local_dir``, keeping the relative paths and the objects'
    modification times (so a source's file stamps are the same on every copy); the file count."""
    from aisd_ray.core.progress import progress_bar

    fs, path = resolve(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    bar = progress_bar(total=sum(i.size for i in infos), desc="download", unit="B", unit_scale=True,
                       enabled=progress)
    for info in infos:
        target = Path(local_dir) / info.path[len(path.rstrip("/")):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path, compression=None) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if info.mtime is not None:
            stamp = info.mtime.timestamp()
            os.utime(target, (stamp, stamp))
        bar.update(info.size)
    bar.close()
    return len(infos)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local folder holding ``uri``: the folder itself when local, else a downloaded copy."""
    if is_local(uri):
        yield Path(resolve(uri)[1])
        return
    with tempfile.TemporaryDirectory(prefix="aisd-ray-") as tmp:
        download_dir(uri, tmp)
        yield Path(tmp)


COMPLETE = ".complete"  # written last into every staged output folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(parent: str, prefix: str) -> None:
    """Remove staging folders for the same output left by a command that was killed (its PID,
    part of the name, is gone); a live command's staging is left alone."""
    for stale in Path(parent).glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(uri: str) -> Iterator[Path]:
    """A fresh local folder whose contents replace ``uri`` only once the block succeeds.

    Used for outputs that must never look complete when half-written (exports, evaluations,
    inference). A ``.complete`` marker is written last: locally the staged folder (marker
    included) is renamed into place; on object storage the old marker is deleted first and the
    new one uploaded after every other file, so a reader that requires the marker never takes a
    half-copied folder for a finished one. Staging left by a killed command is removed."""
    fs, path = resolve(uri)
    local = is_local(uri)
    parent = os.path.dirname(path.rstrip("/")) if local else None
    prefix = f".staging-{os.path.basename(path.rstrip('/'))}-"
    if parent:
        os.makedirs(parent, exist_ok=True)
        _remove_stale_staging(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield tmp
        marker = json.dumps({"completed_at": utc_now()})
        if local:
            (tmp / COMPLETE).write_text(marker)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            if exists(join(uri, COMPLETE)):
                delete(join(uri, COMPLETE))  # from here on readers see the old folder as incomplete
            delete(uri)
            upload_dir(tmp, uri)
            write_text(join(uri, COMPLETE), marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

