"""Whether a shard store is up to date, decided from file stamps: no source volume and no shard byte read.

The manifest records (``"stamps"``) a key of the source (the settings that make the shards and the
stamp of every file under the source: ``core.stamps``, size and modification time locally,
generation and CRC32C on gs://) and each shard's stamp. A later ``prepare`` lists the source and
the store (stat calls, or one bucket listing each) and compares:

- the same source key and every shard with its recorded stamp: nothing to do, nothing read;
- a shard whose stamp changed (size, time, generation), or one that was modified no earlier than
  the manifest itself (a file system whose clock ticks coarsely could give a change the recorded
  time), is read and its SHA-256 checked against the manifest; a missing shard, or one of another
  size, is damage, and the store is rewritten (``prepare`` names the shard);
- ``prepare --verify``: every shard read and checked, as before stamps existed.

A store whose shards were checked whole gets their new stamps recorded (the manifest rewritten,
its contents otherwise the same), so the next ``prepare`` reads nothing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from aisd_ray.config import Config
from aisd_ray.core import stamps, storage
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store import shards

log = logging.getLogger(__name__)
STAMPS = "stamps"  # the manifest's key: {"source": source key, "shards": {shard name: stamp}}


def source_roots(cfg: Config) -> list[str]:
    """The folders (or gs:// prefixes) the source lies in: ``data.source_dir``, else every
    ``data.split_dirs`` folder."""
    if cfg.data.source_dir:
        return [cfg.data.source_dir]
    return sorted({folder for pair in cfg.data.split_dirs.values() for folder in pair})


def source_key(cfg: Config, settings: list[Any]) -> str | None:
    """SHA-256 of ``settings`` and the stamp of every file under the source; None when a source
    folder cannot be listed or holds no file (``prepare`` then reads the source and says why)."""
    h = hashlib.sha256(json.dumps(settings).encode())
    for i, root in enumerate(source_roots(cfg)):
        found = stamps.tree(root)
        if not found:
            return None
        h.update(json.dumps([i, sorted(found.items())]).encode())
    return h.hexdigest()


def _listed(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(split, shard) for split, entry in manifest["splits"].items() for shard in entry["shards"]]


def shard_stamps(out_uri: str, splits: dict[str, Any]) -> dict[str, list[Any]]:
    """The stamp of every shard ``splits`` (manifest entries) lists, as the store holds them now."""
    found = stamps.tree(out_uri) or {}
    return {shard["name"]: found[shard["name"]] for _, shard in _listed({"splits": splits}) if shard["name"] in found}


def check(out_uri: str, manifest: dict[str, Any], verify: bool = False) -> tuple[str | None, dict[str, list[Any]]]:
    """(None, the shards' stamps now) when every shard the manifest lists is there with its size and
    SHA-256, reading only the shards whose stamp changed (every shard with ``verify``); else (what
    is wrong, naming the shard or manifest entry, {})."""
    recorded = (manifest.get(STAMPS) or {}).get("shards") or {}
    try:
        found = stamps.tree(out_uri)
        manifest_time = stamps.modified_ns((found or {}).get(shards.MANIFEST))
        suspect: dict[str, list[dict[str, Any]]] = {}
        for split, shard in _listed(manifest):
            shards.shard_uri(out_uri, split, shard)  # a name outside the store is damage, before any read
            now = found.get(shard["name"]) if found is not None else None
            changed_at = stamps.modified_ns(now)
            racy = changed_at is not None and manifest_time is not None and changed_at >= manifest_time
            if verify or now is None or now != recorded.get(shard["name"]) or racy:
                suspect.setdefault(split, []).append(shard)
        if suspect:
            shards.verify_shards(out_uri, {"splits": {s: {"shards": v} for s, v in suspect.items()}}, checksums=True)
            log.info("%s: %d shard(s) read whole and verified (SHA-256)%s", out_uri,
                     sum(map(len, suspect.values())), "" if verify else ": their stamps changed")
    except (DataError, KeyError, TypeError, AttributeError) as exc:
        return (str(exc) if isinstance(exc, DataError) else f"{shards.MANIFEST} entry without {exc}"), {}
    return None, {name: stamp for name, stamp in (found or {}).items() if name in {s["name"] for _, s in _listed(
        manifest)}}


def record(out_uri: str, manifest: dict[str, Any], key: str | None, current: dict[str, list[Any]]) -> dict[str, Any]:
    """``manifest`` with the source ``key`` and the shards' ``current`` stamps; rewritten (atomically,
    after ``stamps.settle``) only when these differ from what it holds. The manifest returned."""
    wanted = {"source": key, "shards": current}
    if manifest.get(STAMPS) == wanted:
        return manifest
    stamps.settle(out_uri, current)
    manifest = {**manifest, STAMPS: wanted}
    storage.write_text(storage.join(out_uri, shards.MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def unchanged(out_uri: str, key: str | None) -> dict[str, Any] | None:
    """The store's manifest when it records the source ``key`` and every shard checks out (``check``);
    else None (then ``prepare`` reads the source and decides)."""
    if key is None:
        return None
    try:
        manifest = json.loads(storage.read_bytes(storage.join(out_uri, shards.MANIFEST)))
    except (OSError, ValueError):  # no store yet, or a manifest that does not read: prepare decides
        return None
    if not isinstance(manifest, dict) or (manifest.get(STAMPS) or {}).get("source") != key:
        return None
    if not isinstance(manifest.get("splits"), dict):
        return None
    damage, current = check(out_uri, manifest)
    return None if damage else record(out_uri, manifest, key, current)
