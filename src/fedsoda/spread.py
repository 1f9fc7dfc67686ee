"""Mean and spread over seeds, and how a table prints them: one rule for every report
(``fedsoda.comparison`` and ``fedsoda.clock_report``)."""

from __future__ import annotations

import statistics


def mean_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample spread; ``(None, None)`` for a figure a method does not have (FedRA's
    clients hold a different random sub-model each round, so it has no sub-model accuracy).
    One seed has no spread (None), not a spread of 0."""
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(value: float | None, spread: float | None, scale: float = 1, decimals: int = 3) -> str:
    """A figure with its spread, both scaled and rounded alike; "–" where there is no figure."""
    if value is None:
        return "–"
    shown = f"{scale * value:.{decimals}f}"
    return shown if spread is None else f"{shown} ± {scale * spread:.{decimals}f}"


def percent(value: float | None, spread: float | None) -> str:
    """A fraction as a percentage with its spread, "–" where there is no figure."""
    return cell(value, spread, scale=100, decimals=1)
