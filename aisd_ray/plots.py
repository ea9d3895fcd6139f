"""Plots people would rather look at than a CSV: training curves, volume agreement, search results.

Each function draws one figure and writes it as a PNG to a local path or an object-store URI.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from aisd_ray import storage  # noqa: E402

Series = tuple[str, Sequence[float], Sequence[float]]  # (label, x, y)


def _save(fig, ax, xlabel: str, ylabel: str, uri: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def lines(series: Sequence[Series], xlabel: str, ylabel: str, uri: str, dashed: Sequence[str] = ()) -> None:
    """One line per series, with markers; labels named in ``dashed`` are drawn dashed."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, x, y in series:
        ax.plot(x, y, "--" if label in dashed else "-", marker="o", ms=3, label=label)
    _save(fig, ax, xlabel, ylabel, uri)


def scatter(series: Sequence[Series], xlabel: str, ylabel: str, uri: str, logx: bool = False,
            identity: bool = False, title: str = "") -> None:
    """Points per series; ``identity`` adds the y = x line (agreement plots)."""
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    for label, x, y in series:
        ax.scatter(x, y, s=18, label=label)
    if identity:
        top = max([max(list(x) + list(y), default=0) for _, x, y in series], default=0) or 1
        ax.plot([0, top], [0, top], "k:", lw=1, label="y = x")
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, ax, xlabel, ylabel, uri)
