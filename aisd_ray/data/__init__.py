"""The data, from what users have to what training reads: ``sources`` (readers and the writer back),
``ct`` (HU windows, channels, the head model, the QA gate), ``synthetic`` (the stand-in), ``store``
(shards, prepare, the epoch order and the readers that feed training)."""
