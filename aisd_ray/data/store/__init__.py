"""The shard store and what feeds training from it: the shard format and manifest, ``prepare``
(from slices or CT volumes), the epoch order, the feed, the Ray Data reader, tf.data, augmentation."""
