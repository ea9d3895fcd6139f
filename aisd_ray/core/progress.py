"""Progress bars for long work: shown on a terminal, silent in logs (Ray workers, CI, jobs)."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    # disable=None lets tqdm turn itself off when the stream is not a terminal
    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **kwargs)
