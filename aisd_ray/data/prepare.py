"""``aisd-ray prepare``: an AISD PNG tree in, shards and a manifest out.

Resumable and idempotent: a store whose manifest records the same source and settings is
left alone; otherwise the old manifest goes first, then each split's folder is rewritten,
and the new manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from aisd_ray import storage
from aisd_ray.config import Config
from aisd_ray.data import layout, shards
from aisd_ray.progress import progress_bar

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


def split_dirs(cfg: Config) -> dict[str, tuple[str, str]]:
    """(images_dir, masks_dir) per split: explicit ``data.split_dirs`` or ``data.source_dir``."""
    dirs = dict(cfg.data.split_dirs)
    if cfg.data.source_dir:
        root = Path(cfg.data.source_dir)
        for split in SPLITS:
            if split not in dirs and (root / split).is_dir():
                dirs[split] = (str(root / split / "images"), str(root / split / "masks"))
    missing = [s for s in ("train", "valid") if s not in dirs]
    if missing:
        raise layout.DataError(f"no {'/'.join(missing)} split found: set data.source_dir to a folder with "
                               "{train,valid,test}/{images,masks} or give data.split_dirs")
    return dirs


def _fingerprint(cfg: Config, pairs: dict[str, list]) -> str:
    """What the shards depend on: the source files (name, size, mtime) and the settings."""
    h = hashlib.sha256()
    m = cfg.model
    h.update(json.dumps([m.image_height, m.image_width, m.image_channels, cfg.data.rgb_map,
                         cfg.data.shard_format, cfg.data.shard_target_mb, cfg.data.min_shards]).encode())
    for split in sorted(pairs):
        for name, image, mask in pairs[split]:
            for p in (image, mask):
                st = p.stat()
                h.update(f"{split}/{name}/{p.name}/{st.st_size}/{st.st_mtime_ns}".encode())
    return h.hexdigest()


def prepare(cfg: Config, out_uri: str, progress: bool = True) -> dict[str, Any]:
    """Shard every split found; returns the manifest."""
    dirs = split_dirs(cfg)
    pairs = {split: layout.pair_by_name(*dirs[split]) for split in dirs}
    fingerprint = _fingerprint(cfg, pairs)
    manifest_uri = storage.join(out_uri, shards.MANIFEST)
    if storage.exists(manifest_uri):
        old = json.loads(storage.read_bytes(manifest_uri))
        if old.get("fingerprint") == fingerprint:
            log.info("%s is up to date (same source and settings); nothing to do", manifest_uri)
            return old
        storage.delete(manifest_uri)  # the store is incomplete from here until the new manifest
    m = cfg.model
    plan = shards.ShardPlan(int(cfg.data.shard_target_mb * 2**20), cfg.data.min_shards)
    total = sum(len(p) for p in pairs.values())
    bar = progress_bar(total=total, desc="prepare", unit="slice", enabled=progress)
    entries = {}
    for split, split_pairs in pairs.items():
        storage.delete(storage.join(out_uri, split))
        samples = (layout.load_pair(name, image, mask, m.image_height, m.image_width, m.image_channels,
                                    cfg.data.rgb_map) for name, image, mask in split_pairs)
        entries[split] = shards.write_split(samples, len(split_pairs), out_uri, split,
                                            cfg.data.shard_format, plan, progress=bar)
    bar.close()
    info = {"fingerprint": fingerprint, "shard_format": cfg.data.shard_format,
            "image": {"height": m.image_height, "width": m.image_width, "channels": m.image_channels},
            "num_classes": m.num_classes, "class_names": list(cfg.data.class_names),
            "rgb_map": [list(c) for c in cfg.data.rgb_map],
            "source": {s: list(d) for s, d in dirs.items()}}
    manifest = shards.write_manifest(out_uri, entries, info)
    log.info("wrote %s: %s", manifest_uri,
             ", ".join(f"{s} {e['records']} slices in {len(e['shards'])} shards" for s, e in entries.items()))
    return manifest
