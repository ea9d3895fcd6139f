"""``aisd-ray prepare``: an AISD source in, shards and a manifest out.

Four sources are read: the original's ``{train,valid,test}/{images,masks}`` PNG tree; the raw
AISD release (``image.zip``/``mask.zip`` or their extracted folders, one folder per case),
which is split by patient with the official test cases as the test split; and CT volumes in HU
(``volume_source.py``: nnU-Net's raw dataset layout, or DICOM series cases with label volumes),
split by patient too, windowed by ``data.windows`` into the channels of ``data.channels`` (PNG
sources are grey only). Either may lie in a bucket (``--source gs://bucket/prefix``): it is copied
to a local temp folder first (file times kept, so an unchanged source is recognised and left
alone), read, and the copy removed.

The training split is written in a shuffled order (keyed by ``data.split_seed``), so that every
shard mixes cases and an epoch's shard permutation mixes them further; validation and test keep
name order, whole cases together. The manifest's per-split ``index`` maps names to (shard, row).

Resumable and idempotent: a store whose manifest records the same source and settings, and
whose every shard is there with the size and SHA-256 the manifest lists, is left alone; a store
with a missing or damaged shard is rewritten (the shard is named). That is decided from file
stamps first (``uptodate.py``): when no source file and no shard changed (size and modification
time, or generation and CRC32C on gs://), nothing is read, not even a bucket's source; a shard
whose stamp changed is read and checked whole; ``verify`` reads every shard. A volume source's
cases are listed from their file names and stamps (no volume read) and only then, when the store
must be written, read and windowed in parallel (``map``: a process pool, or Ray tasks from
``stages``). Otherwise new shards are
written beside the old ones (their names carry the new fingerprint), the new manifest replaces
the old one last, and only then are the old shards deleted. A prepare that fails (a bad source
file, a failed write) removes what it wrote: the output is as it was before, no folder where
there was none, an existing store untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import secrets
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from aisd_ray.config import SPLITS, Config
from aisd_ray.core import stamps, storage
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.sources import layout, masks, raw
from aisd_ray.data.store import parallel, shards, uptodate, volume_source

log = logging.getLogger(__name__)


def split_dirs(cfg: Config) -> dict[str, tuple[str, str]]:
    """(images_dir, masks_dir) per split: explicit ``data.split_dirs`` or ``data.source_dir``."""
    dirs = dict(cfg.data.split_dirs)
    if cfg.data.source_dir:
        root = Path(cfg.data.source_dir)
        if not root.is_dir():
            raise layout.DataError(f"{root}: source folder not found (data.source_dir / --source)")
        for split in SPLITS:
            if split not in dirs and (root / split).is_dir():
                dirs[split] = (str(root / split / "images"), str(root / split / "masks"))
    missing = [s for s in ("train", "valid") if s not in dirs]
    if missing:
        where = f"{cfg.data.source_dir}: " if cfg.data.source_dir else ""
        raise layout.DataError(f"{where}no {'/'.join(missing)} split found: set data.source_dir to a folder with "
                               "{train,valid,test}/{images,masks} or to the raw AISD release (image.zip and "
                               "mask.zip, or image/ and mask/), or give data.split_dirs")
    return dirs


def list_volumes(cfg: Config) -> volume_source.VolumeListing | None:
    """A volume source's cases, listed from names and file stamps; None for a slice source."""
    d = cfg.data
    if d.source_dir and not d.split_dirs and volume_source.volume_layout(d.source_dir):
        log.info("%s: CT volumes (%s layout), windows %s HU, channels %s", d.source_dir,
                 volume_source.volume_layout(d.source_dir), [list(w) for w in d.windows], d.channels)
        return volume_source.list_volume_source(d.source_dir, d, cfg.model.num_classes)
    return None


def read_source(cfg: Config, progress: bool = True, listing: volume_source.VolumeListing | None = None,
                map: parallel.Map | None = None) -> tuple[dict[str, list[layout.SliceRef]], dict[str, Any]]:
    """Slice refs per split and what the manifest should say about the source. ``listing``:
    ``list_volumes``'s, for a volume source; ``map``: how its cases are read (``parallel``)."""
    m, d = cfg.model, cfg.data
    listing = listing or list_volumes(cfg)
    if listing is not None:
        found = volume_source.read_volume_source(d.source_dir, d, m.image_height, m.image_width, m.image_channels,
                                                 m.num_classes, progress, listing,
                                                 map or parallel.local_map(d.prepare_workers))
        return found.refs, found.info
    if d.channels != "grey":
        raise layout.DataError(f"{d.source_dir or 'data.split_dirs'}: data.channels = {d.channels!r} needs CT volumes "
                               "in HU (nnU-Net, DICOM); PNG slices are one window already: use 'grey'")
    if d.source_dir and not d.split_dirs and raw.is_raw_release(d.source_dir):
        release = raw.read_release(d.source_dir, d, m.image_height, m.image_width, m.image_channels)
        return release.refs, {"layout": "raw", "root": str(Path(d.source_dir).resolve()),
                              "cases": release.cases, "unpaired_skipped": release.unpaired,
                              "metadata_skipped": release.metadata_skipped, "padded_ids": release.padded_ids,
                              "test_cases_missing": release.test_cases_missing}
    if d.folds:
        raise layout.DataError(f"{d.source_dir or 'data.split_dirs'}: data.folds = {d.folds} divides patients into "
                               "folds, but the original's tree comes split into folders without patient ids: use the "
                               "raw AISD release or CT volumes")
    dirs = split_dirs(cfg)
    refs = {split: masks.original_refs(*dirs[split], m.image_height, m.image_width, m.image_channels, d, split)
            for split in dirs}
    return refs, {"layout": "original", "splits": {s: list(v) for s, v in dirs.items()}}


def _settings(cfg: Config) -> list[Any]:
    m, d = cfg.model, cfg.data
    return [shards.FORMAT_VERSION, m.image_height, m.image_width, m.image_channels, d.rgb_map, d.shard_format,
            d.shard_target_mb, min_shards(cfg), d.raw_label_map, d.test_cases, d.valid_fraction, d.split_seed,
            d.drop_empty_train, d.mask_colour_tolerance, d.row_encoding, d.mask_values, d.windows,
            # only when not grey, so that a grey store written before channel modes existed stays valid
            *([d.channels] if d.channels != "grey" else []),
            *([d.folds, d.fold] if d.folds else [])]  # likewise: a store from before folds stays valid


def _fingerprint(cfg: Config, refs: dict[str, list[Any]]) -> str:
    """What the shards depend on: the source files (name, size, mtime or CRC) and the settings;
    ``refs``: slice refs per split, or a volume source's cases per split (each case's files)."""
    h = hashlib.sha256(json.dumps(_settings(cfg)).encode())
    for split in sorted(refs):
        for ref in refs[split]:
            name = ref.name if isinstance(ref, layout.SliceRef) else ref.case_id
            h.update(f"{split}/{name}/{ref.stamp}".encode())
    return h.hexdigest()


def min_shards(cfg: Config) -> int:
    """Every split gets at least one shard per training worker (and ``data.min_shards``)."""
    return max(cfg.data.min_shards, cfg.train.num_workers)


def _drop_empty(refs: list[layout.SliceRef], progress: bool) -> list[layout.SliceRef]:
    """The slices whose mask has lesion pixels (masks only are read)."""
    bar = progress_bar(refs, desc="scan train masks", unit="mask", enabled=progress)
    kept = [ref for ref in bar if ref.load_labels().any()]
    log.info("drop_empty_train: kept %d of %d train slices (the others have no lesion)", len(kept), len(refs))
    return kept


def _mask_readings(refs: dict[str, list[layout.SliceRef]]) -> dict[str, str]:
    """How each split's masks are read ("colours", "class_ids", "raw_labels"; aisd_ray.data.sources.masks),
    chosen from all of its masks; a mask that fits no reading, or masks that disagree, are a
    DataError naming the file."""
    return {split: split_refs[0].masks.reading for split, split_refs in refs.items()
            if split_refs and split_refs[0].masks is not None}


def _warn_lesion_free(entries: dict[str, Any], cfg: Config) -> None:
    """A train or valid split without a lesion pixel: a loud warning (train refuses such a store
    unless data.allow_lesion_free_splits)."""
    for split in ("train", "valid"):
        entry = entries.get(split)
        if not entry or not entry["records"] or entry["lesion_fraction"] > 0:
            continue
        if cfg.data.allow_lesion_free_splits:
            log.info("the %s split has no lesion pixel (allowed by data.allow_lesion_free_splits)", split)
            continue
        log.warning("\n%s\nTHE %s SPLIT HAS NO LESION PIXEL in its %d slices (masks read as %s). A model cannot learn "
                    "or be selected on it, and `aisd-ray train` refuses this store. Check the masks "
                    "(data.mask_values, data.rgb_map, data.raw_label_map), or set data.allow_lesion_free_splits = "
                    "true if this is intended.\n%s", "!" * 78, split.upper(), entry["records"],
                    masks.describe(entry.get("mask_values")), "!" * 78)


def _remove_stale(out_uri: str, manifest: dict[str, Any]) -> None:
    """Delete what the new manifest does not list: earlier shards, splits and half-written files."""
    listed = {s["name"] for entry in manifest["splits"].values() for s in entry["shards"]}
    for folder in storage.list_dir(out_uri):
        if folder == shards.MANIFEST:
            continue
        if folder not in manifest["splits"]:
            if folder in SPLITS:
                storage.delete(storage.join(out_uri, folder))
            continue
        for name in storage.list_dir(storage.join(out_uri, folder)):
            if f"{folder}/{name}" not in listed:
                storage.delete(storage.join(out_uri, folder, name))


def prepare(cfg: Config, out_uri: str, progress: bool = True, verify: bool = False,
            map: parallel.Map | None = None) -> dict[str, Any]:
    """Shard every split found; returns the manifest. ``verify``: read every shard of an existing
    store to decide it is up to date (else only those whose file stamps changed); ``map``: how a
    volume source's cases are read and windowed (default: a process pool of
    ``data.prepare_workers``)."""
    key = uptodate.source_key(cfg, _settings(cfg))
    if not verify and (same := uptodate.unchanged(out_uri, key)) is not None:
        log.info("%s is up to date (no source file or shard changed since it was written); nothing to do",
                 storage.join(out_uri, shards.MANIFEST))
        return same
    source_uri = cfg.data.source_dir
    if source_uri and not storage.is_local(source_uri):
        with tempfile.TemporaryDirectory(prefix="aisd-source-") as tmp:
            log.info("copying %s to a local temp folder", source_uri)
            files = storage.download_tree(source_uri, tmp, progress=progress)
            if not files:
                raise layout.DataError(f"{source_uri}: no files under this prefix")
            local = copy.deepcopy(cfg)
            local.data.source_dir = tmp
            return _prepare(local, out_uri, progress, source_uri, key, verify, map)
    return _prepare(cfg, out_uri, progress, None, key, verify, map)


def _store_damage(out_uri: str, verify: bool = True) -> tuple[str | None, dict[str, Any], dict[str, list[Any]]]:
    """(None, the manifest, its shards' stamps now) when the store's manifest reads and every shard
    it lists is there with its size and SHA-256 (only shards whose file stamps changed are read,
    every one with ``verify``: ``uptodate.check``); else (what is wrong, naming the shard or
    manifest entry, {}, {})."""
    try:
        manifest = shards.read_manifest(out_uri)
    except (layout.DataError, KeyError, TypeError) as exc:
        return (str(exc) if isinstance(exc, layout.DataError) else f"{shards.MANIFEST} entry without {exc}"), {}, {}
    damage, current = uptodate.check(out_uri, manifest, verify)
    return damage, manifest, current


def _entries(out_uri: str) -> set[str] | None:
    """Relative paths of everything under ``out_uri`` (files and folders); None when it does not exist."""
    fs, path = storage.resolve(out_uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return None
    if kind != pafs.FileType.Directory:
        return set()
    return {i.path[len(path):].strip("/") for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}


def _topmost_missing(out_uri: str) -> str:
    """The highest folder of a local ``out_uri`` that does not exist yet (what ``ensure_dir`` creates)."""
    if not storage.is_local(out_uri):
        return out_uri
    path = Path(storage.resolve(out_uri)[1])
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return str(path)


def _undo(out_uri: str, before: set[str] | None, created: str) -> None:
    """Put the output back as it was before a failed prepare: remove a folder it created, or what it
    added to an existing one (new shards, split folders, temp files); what was there stays."""
    try:
        if before is None:
            storage.delete(created)
            return
        for entry in sorted((_entries(out_uri) or set()) - before, key=lambda e: -e.count("/")):
            storage.delete(storage.join(out_uri, entry))
    except OSError as exc:  # the failure that brought us here is the one to report
        log.warning("could not remove what the failed prepare wrote under %s: %s", out_uri, exc)


def _prepare(cfg: Config, out_uri: str, progress: bool, source_uri: str | None = None, key: str | None = None,
             verify: bool = False, map: parallel.Map | None = None) -> dict[str, Any]:
    listing = list_volumes(cfg)  # a volume source: its cases from names and stamps, no volume read yet
    if listing is None:
        refs, source = read_source(cfg, progress)
    fingerprint = _fingerprint(cfg, refs if listing is None else listing.cases)
    generation = fingerprint[:8]
    manifest_uri = storage.join(out_uri, shards.MANIFEST)
    if storage.exists(manifest_uri):
        try:
            old = json.loads(storage.read_bytes(manifest_uri))
        except ValueError:  # truncated or not JSON: treated as absent, the store is rebuilt
            log.warning("%s is unreadable; rebuilding the store", manifest_uri)
            old = {}
        if isinstance(old, dict) and old.get("fingerprint") == fingerprint:
            damage, old, current = _store_damage(out_uri, verify)
            if damage is None:
                log.info("%s is up to date (same source and settings, every shard there%s); nothing to do",
                         manifest_uri, " and verified" if verify else "")
                return uptodate.record(out_uri, old, key, current)
            log.warning("%s; rewriting the store", damage.removesuffix("; re-run `aisd-ray prepare`"))
            # new names, so that the damaged store stays as it was until the new manifest replaces it
            generation = f"{generation}-{secrets.token_hex(3)}"
    if listing is not None:
        refs, source = read_source(cfg, progress, listing, map)
    if source_uri:
        source["root"] = source_uri
    readings = _mask_readings(refs)  # every split's masks judged whole before anything is written
    if cfg.data.drop_empty_train and "train" in refs:
        refs["train"] = _drop_empty(refs["train"], progress)
    if "train" in refs:  # shards that mix cases (a source lists slices case by case)
        refs["train"] = list(refs["train"])
        random.Random(cfg.data.split_seed).shuffle(refs["train"])
    before, created = _entries(out_uri), _topmost_missing(out_uri)
    m = cfg.model
    plan = shards.ShardPlan(int(cfg.data.shard_target_mb * 2**20), min_shards(cfg))
    bar = progress_bar(total=sum(len(r) for r in refs.values()), desc="prepare", unit="slice", enabled=progress)
    entries = {}
    try:  # a slice that fails to load (bad input) or a write that fails leaves the output as it was
        storage.ensure_dir(out_uri)
        for split, split_refs in refs.items():
            entries[split] = shards.write_split((ref.load() for ref in split_refs), len(split_refs), out_uri, split,
                                                cfg.data.shard_format, plan, progress=bar, generation=generation,
                                                encoding=cfg.data.row_encoding)
            entries[split]["mask_values"] = readings.get(split)
        bar.close()
        for split, entry in entries.items():
            log.info("%s: %d slices, masks read as %s, lesion fraction %.4f", split, entry["records"],
                     masks.describe(entry["mask_values"]), entry["lesion_fraction"])
        _warn_lesion_free(entries, cfg)
        info = {"fingerprint": fingerprint, "shard_format": cfg.data.shard_format,
                "row_encoding": cfg.data.row_encoding,
                "image": {"height": m.image_height, "width": m.image_width, "channels": m.image_channels},
                "num_classes": m.num_classes, "class_names": list(cfg.data.class_names),
                "rgb_map": [list(c) for c in cfg.data.rgb_map], "source": source}
        current = uptodate.shard_stamps(out_uri, entries)
        stamps.settle(out_uri, current)  # the manifest's time after every shard's: see uptodate
        info[uptodate.STAMPS] = {"source": key, "shards": current}
        manifest = shards.write_manifest(out_uri, entries, info)
    except BaseException:
        bar.close()
        _undo(out_uri, before, created)
        raise
    _remove_stale(out_uri, manifest)
    log.info("wrote %s: %s", manifest_uri,
             ", ".join(f"{s} {e['records']} slices in {len(e['shards'])} shards" for s, e in entries.items()))
    return manifest
