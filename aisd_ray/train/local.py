"""The local fallback: the same loop in this process, no Ray (one GPU if present, else CPU)."""

from __future__ import annotations

import tensorflow as tf

from aisd_ray.config import Config
from aisd_ray.core import storage
from aisd_ray.data.store import shards
from aisd_ray.data.store.feed import shard_feed
from aisd_ray.train import checkpoint as ckpt
from aisd_ray.train.loop import run_training


class LocalReporter:
    """Keeps checkpoints as Ray does: ``checkpoint_*`` folders, the latest and the best candidate
    (``checkpoint.ranked``)."""

    def __init__(self, run_uri: str, keep: int = 2):
        self.run_uri, self.keep = run_uri, keep

    def resume(self, model, optimizer):
        return ckpt.restore_latest(self.run_uri, model, optimizer)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        uri = storage.join(self.run_uri, f"checkpoint_{int(metrics['epoch']):06d}")
        storage.upload_dir(checkpoint_dir, uri)
        found = ckpt.list_checkpoints(self.run_uri)
        if uri not in [u for u, _ in found]:  # object storage may answer "not found" while it is going away
            storage.check_reachable(uri)
            where = "" if storage.is_local(uri) else f" from {storage.endpoint()}"
            raise storage.StorageError(f"{uri}: the checkpoint just written cannot be read back{where}; rerun the "
                                       "same command once the storage answers: training resumes from its last "
                                       "checkpoint")
        best = ckpt.best_of(found)  # from this listing: no second pass over the run folder
        for old, _ in found[:-1][: max(len(found) - self.keep, 0)]:
            if best is None or old != best[0]:
                storage.delete(old)


def train_local(cfg: Config, store: shards.ShardStore, run_uri: str) -> ckpt.LoopState:
    return run_training(cfg, tf.distribute.get_strategy(), shard_feed(cfg, store.uri, store.manifest),
                        LocalReporter(run_uri), run_uri, rank=0, world=1)
