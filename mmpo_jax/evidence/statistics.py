"""Statistics of the study: mean ± std over seeds, and paired differences between rows with a
95% bootstrap interval over images and seeds.

Per-item counts come from the evaluation (``runner.pass_details``): each caption's CHAIR counts
and each POPE question's confusion counts. A row's items on one view (``"greedy"``,
``"sampled"``, an ADAPT decoding) are summed over the view's decoding passes per image, giving
``[S seeds, N images, K counts]``; POPE questions are summed per image.

Paired difference of rows A and B: both evaluated on the same images with the same seed indices
(seed i of A pairs with seed i of B: same data order and sampling keys). One bootstrap resample
draws seeds with replacement and images with replacement (the same draws for A and B) and takes
``metric(counts of A) - metric(counts of B)``, each metric a ratio of summed counts
(``ChairCounts.metrics``, ``PopeCounts.metrics``: CHAIR_i pooled over every mention of the
resample). The interval is the resamples' 2.5 and 97.5 percentiles; a difference is a **gain**
only where the interval excludes 0 in the better direction, a **loss** where it excludes 0 in the
worse one. [our choice] POPE is pooled over its three categories (the table's POPE columns
average them; with equal category sizes accuracy agrees).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmpo_jax.evaluation.chair import ChairCounts
from mmpo_jax.evaluation.pope import PopeCounts


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric with a paired interval: its view's items, name, and which direction is better."""

    key: str
    label: str
    view: str  # "sampled" | "greedy" (a decoding row's greedy is its own decoding)
    kind: str  # "chair" | "pope"
    name: str
    lower_is_better: bool


PAIRED_METRICS = (
    Metric("sampled/chair_i", "CHAIR_i sampled", "sampled", "chair", "chair_i", True),
    Metric("sampled/chair_s", "CHAIR_s sampled", "sampled", "chair", "chair_s", True),
    Metric("sampled/recall", "recall sampled", "sampled", "chair", "recall", False),
    Metric("chair_i", "CHAIR_i", "greedy", "chair", "chair_i", True),
    Metric("recall", "recall", "greedy", "chair", "recall", False),
    Metric("pope_accuracy", "POPE acc", "greedy", "pope", "accuracy", False),
    Metric("pope_f1", "POPE F1", "greedy", "pope", "f1", False),
)
PRIMARY = PAIRED_METRICS[0]
GREEDY_PRIMARY = PAIRED_METRICS[3]


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}``; std is the sample standard deviation (0 for one value)."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": int(len(array))}


def _by_image(counts: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    order = list(dict.fromkeys(keys))
    index = np.asarray([order.index(k) for k in keys])
    summed = np.zeros((len(order), counts.shape[1]), np.int64)
    np.add.at(summed, index, counts)
    return summed


def view_items(details: Mapping[str, list], view: str, kind: str) -> np.ndarray | None:
    """``[N images, K]`` counts of one evaluation's ``view`` summed over its passes; None when
    the view or kind was not evaluated."""
    passes = details.get(view) or []
    arrays = []
    for one in passes:
        if kind == "chair" and one["chair"]:
            arrays.append(np.asarray(one["chair"], np.int64))
        elif kind == "pope" and one["pope"]:
            arrays.append(_by_image(np.asarray(one["pope"], np.int64), one["pope_images"]))
    return np.sum(arrays, axis=0) if arrays else None


def metric_of(totals: np.ndarray, metric: Metric) -> float:
    """The metric of summed counts ``[K]``."""
    counts = (ChairCounts if metric.kind == "chair" else PopeCounts)(*(int(x) for x in totals))
    return counts.metrics()[metric.name]


@dataclasses.dataclass(frozen=True)
class Difference:
    """A minus B on one metric: the point estimate, the 95% interval and the verdict."""

    estimate: float
    low: float
    high: float
    verdict: str  # "gain" | "loss" | "n.s."

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _verdict(low: float, high: float, lower_is_better: bool) -> str:
    if low > 0 or high < 0:
        better = high < 0 if lower_is_better else low > 0
        return "gain" if better else "loss"
    return "n.s."


def paired_difference(a: np.ndarray, b: np.ndarray, metric: Metric, *, samples: int,
                      rng: np.random.Generator) -> Difference:
    """A − B with its bootstrap interval (module doc).

    Args:
      a, b: ``[S, N, K]`` item counts of the two rows (the same images and seed indices).
      metric: what to compare.
      samples: bootstrap resamples.
      rng: the resampling generator.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same seeds and images; got {a.shape} and {b.shape}")
    seeds, images = a.shape[:2]
    estimate = metric_of(a.sum((0, 1)), metric) - metric_of(b.sum((0, 1)), metric)
    seed_weights = np.stack([np.bincount(rng.integers(0, seeds, seeds), minlength=seeds)
                             for _ in range(samples)])
    image_weights = np.stack([np.bincount(rng.integers(0, images, images), minlength=images)
                              for _ in range(samples)])
    totals_a = np.einsum("rs,rn,snk->rk", seed_weights, image_weights, a)
    totals_b = np.einsum("rs,rn,snk->rk", seed_weights, image_weights, b)
    diffs = np.asarray([metric_of(x, metric) - metric_of(y, metric)
                        for x, y in zip(totals_a, totals_b)])
    low, high = (float(v) for v in np.percentile(diffs, [2.5, 97.5]))
    return Difference(float(estimate), low, high, _verdict(low, high, metric.lower_is_better))


def claim_verdict(differences: Sequence[Difference]) -> str:
    """A claim's verdict from its comparisons (better row minus worse row on its primary metric):
    "holds" when every one is a gain, "does not hold" when any is a loss, else "inconclusive"."""
    if differences and all(d.verdict == "gain" for d in differences):
        return "holds"
    if any(d.verdict == "loss" for d in differences):
        return "does not hold"
    return "inconclusive"
