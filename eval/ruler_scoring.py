"""Scores of RULER-style answers, as RULER's string matching (case-insensitive substrings).

Metric "all" (RULER's string_match_all): the percentage of a sample's references found in
the prediction. Metric "any" (string_match_part): 100 when any reference is found, else 0.
A task's score is the mean over its samples, in [0, 100].
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ruler_tasks import RulerSample

METRICS = ("all", "any")


def score(prediction: str, sample: RulerSample) -> float:
    """The prediction's score in [0, 100] under the sample's metric."""
    if sample.metric not in METRICS:
        raise ValueError(
            f"sample {sample.task}/{sample.index} has unknown metric {sample.metric!r}; "
            f"use one of {', '.join(METRICS)}"
        )
    if not sample.references:
        raise ValueError(f"sample {sample.task}/{sample.index} has no references")
    text = prediction.lower()
    hits = [ref.lower() in text for ref in sample.references]
    if sample.metric == "all":
        return 100.0 * sum(hits) / len(hits)
    return 100.0 if any(hits) else 0.0


def task_average(scores: Iterable[float]) -> float:
    """The mean of a task's sample scores."""
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("scores is empty: a task average needs at least one sample score")
    return sum(values) / len(values)
