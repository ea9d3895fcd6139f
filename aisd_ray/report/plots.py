"""Plots people would rather look at than a CSV: training curves, volume agreement, search results.

Each function draws one figure and writes it as a PNG to a local path or an object-store URI.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from aisd_ray.core import storage  # noqa: E402

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


def lines(series: Sequence[Series], xlabel: str, ylabel: str, uri: str, dashed: Sequence[str] = (),
          title: str = "", mark_x: float | None = None) -> None:
    """One line per series, with markers; labels named in ``dashed`` are drawn dashed; ``mark_x``
    draws a dotted vertical line (the best epoch)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, x, y in series:
        ax.plot(x, y, "--" if label in dashed else "-", marker="o", ms=3, label=label)
    if mark_x is not None:
        ax.axvline(mark_x, color="k", ls=":", lw=1, label=f"best epoch ({mark_x:g})")
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, ax, xlabel, ylabel, uri)


def training_metrics(history: Sequence[dict], title: str, uri: str, best_epoch: int | None = None,
                     classes: Sequence[str] = ()) -> None:
    """The run's metrics in three panels sharing the epoch axis: lesion scores on their own 0..1
    axis with ``best_epoch`` marked (the caller's choice: ``checkpoint.best_row``) at its
    ``val_score`` (else ``val_lesion_dice``); the original's background-inclusive metric apart (it
    sits near 1 and would squash the lesion curves); the learning rate (log scale), rollbacks
    marked. ``classes``: foreground class names whose ``val_<name>_dice`` is drawn too (dashed),
    the mean of them being the best-epoch score."""
    epochs = [row["epoch"] for row in history]

    def col(key):
        return [row.get(key, float("nan")) for row in history]

    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(6.5, 7.5), dpi=100, sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1.3, 1.3]})
    for key, label in (("lesion_dice", "train lesion Dice"), ("val_lesion_dice", "val lesion Dice"),
                       ("val_lesion_iou", "val lesion IoU")):
        if key in history[0]:
            top.plot(epochs, col(key), marker="o", ms=3, label=label)
    for name in classes:
        top.plot(epochs, col(f"val_{name}_dice"), "--", marker="o", ms=3, label=f"val {name} Dice")
    several = len(classes) > 1
    score_key = "val_score" if "val_score" in history[0] else "val_lesion_dice"
    if best_epoch is not None:
        at = best_epoch
        best = col(score_key)[epochs.index(at)]
        top.axvline(at, color="k", ls=":", lw=1)
        what = "best class mean" if several else "best"
        top.annotate(f"{what} {best:.3f} @ epoch {at:g}", (at, best), textcoords="offset points", xytext=(4, -14),
                     fontsize=8)
    top.set_ylim(0, 1)
    top.set_ylabel("lesion score")
    top.set_title(f"{title}: lesion metrics (background excluded)", fontsize=10)
    top.legend(fontsize=8, loc="lower right")
    mid.plot(epochs, col("val_dice_coef_multiclass"), "--", marker="o", ms=3, color="gray")
    mid.set_ylabel("original's metric")
    mid.set_title("dice_coef_multiclass (background-inclusive, for comparison only)", fontsize=9)
    low.plot(epochs, col("learning_rate"), marker="o", ms=3, color="tab:purple")
    low.set_yscale("log")
    low.set_ylabel("learning rate")
    rollbacks = [0.0] + col("rollbacks")
    marked = [e for e, before, now in zip(epochs, rollbacks, rollbacks[1:]) if now == now and now > before]
    for k, epoch in enumerate(marked):
        for ax in (top, mid, low):
            ax.axvline(epoch, color="tab:red", lw=1, alpha=0.6,
                       label="divergence guard rollback" if ax is top and k == 0 else None)
    if marked:
        top.legend(fontsize=8, loc="lower right")
    for ax in (top, mid, low):
        ax.grid(alpha=0.3)
    low.xaxis.set_major_locator(MaxNLocator(integer=True))
    low.set_xlabel("epoch")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def case_bars(rows: Sequence[dict], uri: str, title: str = "") -> None:
    """Per-case lesion Dice as bars, best first, with the mean; a case whose Dice is undefined
    (no lesion in truth or prediction) is listed at the end without a bar."""
    scored = sorted((r for r in rows if r["dice"] == r["dice"]), key=lambda r: -r["dice"])
    undefined = [r for r in rows if r["dice"] != r["dice"]]
    names = [r["case_id"] for r in scored + undefined]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * len(names) + 1.5), 4), dpi=100)
    ax.bar(range(len(scored)), [r["dice"] for r in scored], color="tab:blue")
    if scored:
        mean = sum(r["dice"] for r in scored) / len(scored)
        ax.axhline(mean, color="k", ls=":", lw=1, label=f"mean {mean:.3f} over {len(scored)} cases")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, ax, "case", "case lesion Dice", uri)


def scatter(series: Sequence[Series], xlabel: str, ylabel: str, uri: str, logx: bool = False,
            identity: bool = False, title: str = "", crossed: Sequence[str] = ()) -> None:
    """Points per series; ``identity`` adds the y = x line (agreement plots); series whose labels
    are in ``crossed`` are drawn as crosses (points set apart: a search's collapsed trials)."""
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    for label, x, y in series:
        ax.scatter(x, y, s=40 if label in crossed else 18, marker="x" if label in crossed else "o", label=label)
    if identity:
        top = max([max(list(x) + list(y), default=0) for _, x, y in series], default=0) or 1
        ax.plot([0, top], [0, top], "k:", lw=1, label="y = x")
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, ax, xlabel, ylabel, uri)


def reliability(before: Sequence[dict], after: Sequence[dict], uri: str, title: str = "") -> None:
    """A reliability diagram: each confidence bin's mean confidence against its accuracy
    (``calibration.Reliability.table`` rows), before and after temperature scaling, with the
    diagonal of perfect calibration; empty bins left out. Below it, each bin's share of the voxels
    (log scale: over a split they pile up near confidence 1)."""
    fig, (ax, low) = plt.subplots(2, 1, figsize=(5, 6), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfectly calibrated")
    for rows, label, marker in ((before, "before (T = 1)", "o"), (after, "after temperature scaling", "s")):
        shown = [r for r in rows if r["voxels"]]
        ax.plot([r["confidence"] for r in shown], [r["accuracy"] for r in shown], marker=marker, ms=4, label=label)
        total = sum(r["voxels"] for r in rows) or 1
        low.step([r["hi"] for r in rows], [r["voxels"] / total for r in rows], where="pre", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (top label)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    low.set_yscale("log")
    low.set_ylabel("share of voxels")
    _save(fig, low, "confidence (top-label probability), equal-width bins", "share of voxels", uri, legend=False)
