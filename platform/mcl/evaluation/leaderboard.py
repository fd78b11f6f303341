"""Leaderboards: CL metrics of many runs, grouped by method (and stream), as mean and std over seeds (and task
orders).

Pure functions over plain records (``{"method", "stream", "seed", "order", "mfn", ...}``; ``order`` is the
index of the run's task order, 0 when absent), so a comparison job, a sweep or a notebook can build the same
table from MLflow runs or from run summaries. Where a row has runs of several task orders, it also has an
order-sensitivity figure per metric: the sample std over orders of the per-order means over seeds. A record
that carries its run's ``baseline`` (the untrained model's accuracy per task) also gives the ``zero_shot`` row
(:func:`zero_shot_records`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

METRICS = ("mft", "mfn", "maa", "bwt", "fwt", "forgetting")
ZERO_SHOT = "zero_shot"


@dataclass
class Entry:
    """One leaderboard row: a method on a stream over ``n`` runs: ``orders`` task orders of (at most) ``seeds``
    runs each (its seeds; with ``by="method"`` in the analysis, also its search points).

    ``mean``/``std``: over every run. ``order_std``: the std over orders of the per-order seed means (NaN with
    a single order)."""

    method: str
    stream: str
    n: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    seeds: int = 0
    orders: int = 1
    order_std: dict[str, float] = field(default_factory=dict)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def leaderboard(records: Iterable[dict[str, Any]], metrics: Sequence[str] = METRICS) -> list[Entry]:
    """Group run records by (method, stream) and aggregate each metric; sorted by stream, then MFN
    (best first)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((str(r["method"]), str(r.get("stream", ""))), []).append(r)
    entries = []
    for (method, stream), runs in groups.items():
        by_order: dict[Any, list[dict[str, Any]]] = {}
        for r in runs:
            by_order.setdefault(r.get("order", 0), []).append(r)
        entry = Entry(method, stream, len(runs), seeds=max(len(rs) for rs in by_order.values()))
        entry.orders = len(by_order)
        for m in metrics:
            entry.mean[m], entry.std[m] = mean_std(_finite(runs, m))
            order_means = [mean_std(_finite(rs, m))[0] for rs in by_order.values()]
            finite = [v for v in order_means if math.isfinite(v)]
            entry.order_std[m] = mean_std(finite)[1] if len(finite) > 1 else float("nan")
        entries.append(entry)
    return sorted(entries, key=lambda e: (e.stream, -_or_inf(e.mean.get("mfn"))))


def zero_shot_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``zero_shot`` records of the untrained model: one per (stream, seed) among ``records`` that carry a
    ``baseline`` (the first such record's; every method starts from the same base model), with the metrics
    of :func:`mcl.evaluation.metrics.zero_shot_metrics` (MFN = MFT = its mean accuracy, BWT = FWT = 0)."""
    from mcl.evaluation.metrics import zero_shot_metrics

    out: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in records:
        baseline = r.get("baseline")
        key = (str(r.get("stream", "")), r.get("seed"))
        if baseline is None or key in out or any(b is None for b in baseline):
            continue
        out[key] = {"method": ZERO_SHOT, "stream": key[0], "seed": key[1], **zero_shot_metrics(baseline)}
    return list(out.values())


def _finite(runs: Sequence[dict[str, Any]], metric: str) -> list[float]:
    return [
        float(r[metric])
        for r in runs
        if metric in r and r[metric] is not None and math.isfinite(float(r[metric]))
    ]


def has_orders(entries: Sequence[Entry]) -> bool:
    """Whether any row averages runs of more than one task order (its tables then show order columns)."""
    return any(e.orders > 1 for e in entries)


def _or_inf(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -math.inf


def to_markdown(entries: Sequence[Entry], metrics: Sequence[str] = METRICS) -> str:
    """A markdown table: one row per method (and stream), ``mean ± std`` per metric; with several task orders,
    an ``orders`` column and one ``<METRIC> order std`` column per metric (order sensitivity)."""
    orders = has_orders(entries)
    names = [m.upper() for m in metrics] + ([f"{m.upper()} order std" for m in metrics] if orders else [])
    head = "| method | stream | seeds | " + ("orders | " if orders else "") + " | ".join(names) + " |"
    rule = "|---|---|---|" + ("---|" if orders else "") + "---|" * len(names)
    lines = [head, rule]
    for e in entries:
        cells = [f"{e.mean[m]:.1f} ± {e.std[m]:.1f}" if math.isfinite(e.mean[m]) else "n/a" for m in metrics]
        if orders:
            cells += [f"{e.order_std[m]:.1f}" if math.isfinite(e.order_std[m]) else "n/a" for m in metrics]
        lead = f"| {e.method} | {e.stream} | {e.seeds or e.n} | " + (f"{e.orders} | " if orders else "")
        lines.append(lead + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv_rows(entries: Sequence[Entry], metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Flat rows (``mfn_mean``, ``mfn_std``, ...) for a CSV file; with several task orders, also ``orders``
    and ``<metric>_order_std`` (the std over orders of the per-order seed means)."""
    orders = has_orders(entries)
    rows = []
    for e in entries:
        row: dict[str, Any] = {"method": e.method, "stream": e.stream, "seeds": e.seeds or e.n}
        if orders:
            row["orders"] = e.orders
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = e.mean[m], e.std[m]
            if orders:
                row[f"{m}_order_std"] = e.order_std[m]
        rows.append(row)
    return rows


__all__ = [
    "METRICS",
    "ZERO_SHOT",
    "Entry",
    "has_orders",
    "leaderboard",
    "mean_std",
    "to_csv_rows",
    "to_markdown",
    "zero_shot_records",
]
