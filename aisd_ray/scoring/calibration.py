"""Calibration and uncertainty numbers: temperature scaling, expected calibration error, the
predictive entropy per voxel, lesion and case, the review threshold and an AUROC. NumPy and SciPy
only (no TensorFlow, no Ray): what the export applies (``inference/export.py``), what is fitted on
the validation patients (``evaluation/calibrate.py``) and what ``evaluate`` and ``infer`` report.

- **Temperature scaling** (Guo et al. 2017, "On Calibration of Modern Neural Networks", ICML): one
  scalar T > 0 divides the logits; the network gives softmax probabilities p, and softmax(log(p) / T)
  equals softmax(logits / T) (log p differs from the logits by a per-voxel constant, which softmax
  ignores), so T is applied to what the export gives. With mirroring TTA or an ensemble, T divides
  each forward pass's logits and the passes' calibrated probabilities are averaged: ``scaled`` on a
  (K, ..., C) stack. T is fitted by minimising the mean negative log-likelihood of the true class over
  log T (``scipy.optimize.minimize_scalar``, bounded, T in [0.05, 20]). The argmax of one pass never
  changes (the order of its logits is kept); that of an average of passes may, rarely.
- **ECE** (Guo et al.'s, eq. 3): top-label confidence (the largest class probability of a voxel)
  against top-label accuracy (the most likely class is the true one), ``ECE_BINS`` = 15 equal-width
  bins over [0, 1] (a confidence of exactly 1 in the last), ECE = sum over bins of (bin voxels / all
  voxels) * |accuracy - mean confidence|. Top-label and not the lesion probability alone: it is
  defined for any number of classes (core and penumbra too), it is what temperature scaling is
  judged by in the literature, so the numbers compare. Over all voxels of a split it is dominated by
  confidently right background: small numbers, the change before/after is what tells.
- **Uncertainty** per voxel: the predictive entropy of the (calibrated, averaged) softmax,
  -sum_c p_c log p_c / log C, 0 (certain) .. 1 (uniform). Entropy and not the disagreement of the
  members: it is defined in all three cases inference has (the mirrored TTA pair averaged, an
  ensemble's members averaged, one softmax with TTA off and one model) and in the same units, and it
  includes the disagreement (the entropy of a mean is at least the mean of the entropies).
  ``MEASURES`` names which case applied.
- **Per lesion**: the mean voxel uncertainty over the lesion's voxels. **Per case**: the mean voxel
  uncertainty over the case's *candidate* voxels, those whose lesion probability (1 - background)
  exceeds ``CANDIDATE`` = 0.1, 0 where there is none. Why this rule: Dice is a ratio over the lesion,
  and its errors lie where the model considered lesion (a wrong or fuzzy border, a doubtful
  spot, a half-seen lesion); a mean over the whole head would be diluted by its confidently clear
  brain and rank cases by head size. Mehrtash et al. 2020 (IEEE TMI, "Confidence calibration and
  predictive uncertainty estimation for deep medical image segmentation") found the mean entropy
  of the predicted segment to fall as Dice rises; the candidate region adds the near misses. A
  lesion the model never saw at all (every probability <= 0.1) cannot be scored by any rule of this
  kind.
- **Review threshold**: the case score that best separates the validation cases with Dice < 0.5
  from the others, by Youden's J (sensitivity + specificity - 1, a case flagged when its score is
  >= the threshold; the highest such score on a tie); when none or all of the cases have Dice < 0.5,
  the 90th percentile of the scores (the top tenth flagged).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import optimize

from aisd_ray.scoring import volume_metrics

ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)
CANDIDATE = 0.1  # lesion probability above which a voxel counts in its case's score
BAD_DICE = 0.5  # a case below this Dice is one to review
TOP_SHARE = 0.1  # flagged when no case (or every case) is below BAD_DICE
EPS = 1e-12
MEASURE = "predictive entropy of the mean softmax / log(classes), 0..1"
MEASURES = {"tta": "mean of the slice's and its left-right mirror's softmax",
            "ensemble": "mean of the ensemble members' softmax",
            "ensemble+tta": "mean of the ensemble members' softmax, each of the slice and its mirror",
            "single": "the one softmax (TTA off, one model)"}
CASE_RULE = (f"mean voxel uncertainty over the voxels whose lesion probability (1 - background) > {CANDIDATE}; "
             "0 when there is none")
LESION_RULE = "mean voxel uncertainty over the lesion's voxels"
THRESHOLD_RULE = (f"the case score maximising Youden's J for case Dice < {BAD_DICE} on the validation cases "
                  f"(flagged: score >= threshold); the top tenth's score (90th percentile) when none or all "
                  f"have Dice < {BAD_DICE}")


def _stack(probabilities: Any) -> np.ndarray:
    """(K, N, C) float64 of (N, C) or (K, N, C) probabilities, clipped away from 0."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3:
        raise ValueError(f"probabilities must be (N, C) or (K, N, C), got shape {p.shape}")
    return np.clip(p, EPS, 1.0)


def scaled(probabilities: Any, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) of each pass, averaged over passes: (N, C) float64 of (N, C) or (K, N, C)
    softmax probabilities (K passes: TTA, ensemble members)."""
    z = np.log(_stack(probabilities)) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).mean(axis=0)


def nll(probabilities: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` (N,) int under ``scaled(probabilities, T)``."""
    p = scaled(probabilities, temperature)
    y = np.asarray(labels, np.int64).ravel()
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))


def fit_temperature(probabilities: Any, labels: Any, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature T minimising ``nll`` (Guo et al. 2017): a bounded scalar search over log T.
    ``probabilities``: (N, C) softmax, or (K, N, C) for K passes averaged after scaling (the
    export's TTA pair and ensemble members); ``labels``: (N,) int class ids. ValueError for no
    samples or mismatched shapes."""
    p = _stack(probabilities)
    y = np.asarray(labels, np.int64).ravel()
    if p.shape[1] == 0 or p.shape[1] != len(y):
        raise ValueError(f"fit_temperature: {p.shape[1]} probability rows and {len(y)} labels; need as many, > 0")
    lo, hi = (math.log(b) for b in bounds)
    result = optimize.minimize_scalar(lambda t: nll(p, y, math.exp(t)), bounds=(lo, hi), method="bounded",
                                      options={"xatol": 1e-4})
    return float(math.exp(result.x))


class Reliability:
    """Top-label reliability bins accumulated over batches (``ECE_BINS`` equal-width bins of
    confidence over [0, 1]): voxel count, summed confidence and summed correctness per bin."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.count = np.zeros(bins, np.int64)
        self.confidence = np.zeros(bins, np.float64)
        self.correct = np.zeros(bins, np.float64)

    def add(self, probabilities: Any, labels: Any) -> None:
        """``probabilities`` (..., C), ``labels`` (...) int class ids of the same leading shape."""
        p = np.asarray(probabilities).reshape(-1, np.shape(probabilities)[-1])
        y = np.asarray(labels).ravel()
        conf = p.max(axis=-1).astype(np.float64)
        right = (p.argmax(axis=-1) == y).astype(np.float64)
        index = np.minimum((conf * self.bins).astype(np.int64), self.bins - 1)
        self.count += np.bincount(index, minlength=self.bins)
        self.confidence += np.bincount(index, conf, minlength=self.bins)
        self.correct += np.bincount(index, right, minlength=self.bins)

    def ece(self) -> float:
        """Expected calibration error (the module); NaN with no voxel."""
        total = self.count.sum()
        if total == 0:
            return math.nan
        return float(np.sum(np.abs(self.correct - self.confidence)) / total)

    def table(self) -> list[dict[str, float]]:
        """One row per bin: ``lo``, ``hi``, ``voxels``, mean ``confidence`` and ``accuracy`` (NaN in
        an empty bin): a reliability diagram's points."""
        rows = []
        for i in range(self.bins):
            n = int(self.count[i])
            rows.append({"lo": i / self.bins, "hi": (i + 1) / self.bins, "voxels": n,
                         "confidence": float(self.confidence[i] / n) if n else math.nan,
                         "accuracy": float(self.correct[i] / n) if n else math.nan})
        return rows


def ece(probabilities: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error of ``probabilities`` (..., C) against ``labels`` (...) int (the
    module: top-label, ``bins`` equal-width bins, weighted by bin share); NaN for no voxel."""
    r = Reliability(bins)
    r.add(probabilities, labels)
    return r.ece()


def entropy(probabilities: Any) -> np.ndarray:
    """Normalised predictive entropy, -sum p log p / log C, of ``probabilities`` (..., C): (...)
    float32 in 0..1 (1 for the uniform softmax)."""
    p = np.clip(np.asarray(probabilities, np.float64), EPS, 1.0)
    c = p.shape[-1]
    return np.clip(-(p * np.log(p)).sum(axis=-1) / math.log(c), 0.0, 1.0).astype(np.float32)


def measure_of(tta: bool, members: int) -> str:
    """The ``MEASURES`` key of a prediction with mirroring ``tta`` and ``members`` models."""
    if members > 1:
        return "ensemble+tta" if tta else "ensemble"
    return "tta" if tta else "single"


class CaseScores:
    """Each case's uncertainty sum and count over its candidate voxels, accumulated slice by slice
    (the case score is their ratio: ``CASE_RULE``)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, case_id: str, lesion_probability: Any, uncertainty: Any) -> None:
        """``lesion_probability`` (1 - background) and ``uncertainty`` of some of the case's voxels,
        arrays of one shape."""
        mask = np.asarray(lesion_probability) > CANDIDATE
        entry = self.sums.setdefault(case_id, [0.0, 0])
        entry[0] += float(np.asarray(uncertainty, np.float64)[mask].sum())
        entry[1] += int(mask.sum())

    def scores(self) -> dict[str, float]:
        return {case: (s / n if n else 0.0) for case, (s, n) in self.sums.items()}


def case_score(lesion_probability: Any, uncertainty: Any) -> float:
    """A case's score (``CASE_RULE``) of its ``lesion_probability`` (1 - background) and
    ``uncertainty``, arrays of one shape."""
    scores = CaseScores()
    scores.add("", lesion_probability, uncertainty)
    return scores.scores()[""]


def lesion_scores(mask: Any, uncertainty: Any) -> list[float]:
    """The mean uncertainty over each 3-D lesion of ``mask`` (Z, Y, X) bool, in the order of
    ``volume_metrics.components`` (largest first, ties in label order). ``uncertainty``: (Z, Y, X),
    or a function of a slice index giving that slice's (Y, X) (so a caller need not hold the whole
    volume's map). Summed slice by slice: no float64 copy of the volume."""
    lesions, count = volume_metrics.label_lesions(mask)
    if count == 0:
        return []
    sums, voxels = np.zeros(count + 1), np.zeros(count + 1, np.int64)
    for k in range(lesions.shape[0]):
        ids = lesions[k].ravel()
        if not ids.any():
            continue
        u = uncertainty(k) if callable(uncertainty) else np.asarray(uncertainty[k])
        sums += np.bincount(ids, np.asarray(u, np.float64).ravel(), minlength=count + 1)
        voxels += np.bincount(ids, minlength=count + 1)
    order = sorted(range(1, count + 1), key=lambda i: -int(voxels[i]))
    return [float(sums[i] / voxels[i]) for i in order]


def annotate(info: dict[str, Any], mask: Any, score: float, uncertainty: Any,
             record: dict[str, Any] | None, measure: str) -> dict[str, Any]:
    """A case's summary ``info`` (``infer_volumes.summary``, its ``lesions`` from ``mask``) with its
    ``uncertainty`` block (``case_block`` of its case ``score``: ``case_score``, or ``CaseScores``
    summed slice by slice) and each lesion's ``uncertainty`` (``lesion_scores`` of ``uncertainty``:
    (Z, Y, X) or a function of a slice index); ``record``: the export's calibration.json (None: no review threshold)."""
    info["uncertainty"] = case_block(score, record, measure)
    for lesion, value in zip(info.get("lesions", []), lesion_scores(mask, uncertainty)):
        lesion["uncertainty"] = round(value, 5)
    return info


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` ranking the ``positives`` first (the Mann-Whitney U
    statistic / (positives x negatives), ties counted half); NaN when either group is empty."""
    s = np.asarray(scores, np.float64)
    pos = np.asarray(positives, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    greater = (s[pos][:, None] > s[~pos][None, :]).sum()
    ties = (s[pos][:, None] == s[~pos][None, :]).sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def review_threshold(case_scores: Sequence[float], case_dice: Sequence[float]) -> tuple[float, str]:
    """(threshold, how it was chosen) of the validation cases' scores and Dice (``THRESHOLD_RULE``;
    cases of undefined (NaN) Dice, no lesion in truth nor prediction, count as not bad). "youden"
    or "top tenth"; (NaN, "no cases") without cases."""
    s = np.asarray(case_scores, np.float64)
    d = np.asarray(case_dice, np.float64)
    if len(s) == 0:
        return math.nan, "no cases"
    bad = np.nan_to_num(d, nan=1.0) < BAD_DICE
    if bad.all() or not bad.any():
        return float(np.quantile(s, 1.0 - TOP_SHARE)), "top tenth"
    best, best_j = math.nan, -math.inf
    for t in np.unique(s)[::-1]:  # highest first: a tie keeps the highest threshold
        flagged = s >= t
        j = flagged[bad].mean() - flagged[~bad].mean()
        if j > best_j:
            best, best_j = float(t), j
    return best, "youden"


def is_review(score: float, threshold: float | None) -> bool | None:
    """Whether a case of ``score`` is to be reviewed; None without a threshold."""
    if threshold is None or threshold != threshold:
        return None
    return bool(score >= threshold)


def case_block(score: float, record: dict[str, Any] | None, measure: str) -> dict[str, Any]:
    """A case's ``uncertainty`` block for summary.json: the measure, the case score, the export's
    review threshold (None without ``calibration.json``) and ``review``."""
    threshold = (record or {}).get("review_threshold")
    return {"measure": f"{MEASURE}; {MEASURES.get(measure, measure)}", "case_rule": CASE_RULE,
            "case_score": round(float(score), 5), "threshold": threshold, "review": is_review(score, threshold)}


def pooled(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the case score ranks bad cases over ``cases`` pooled (dicts with ``dice``, ``uncertainty``
    and ``review``: True/False, or empty/None without a threshold): ``cases`` of defined Dice,
    ``bad`` (Dice < 0.5), ``auroc``, ``flagged``, the mean Dice of the unflagged and of all."""
    rows = [c for c in cases if c.get("dice") is not None and c["dice"] == c["dice"]
            and c.get("uncertainty") is not None]
    kept = [c["dice"] for c in rows if c.get("review") is False]
    return {"cases": len(rows), "bad": sum(c["dice"] < BAD_DICE for c in rows),
            "auroc": auroc([c["uncertainty"] for c in rows], [c["dice"] < BAD_DICE for c in rows]),
            "flagged": sum(c.get("review") is True for c in rows),
            "unflagged_dice_mean": float(np.mean(kept)) if kept else math.nan,
            "all_dice_mean": float(np.mean([c["dice"] for c in rows])) if rows else math.nan}
