"""Continual-learning metrics over an accuracy matrix.

``a[t][i]`` is the accuracy (percent) on task ``i`` after training through task ``t``. The matrix is
``T x T``. A cell may be None: not evaluated (``eval.tasks: seen_and_next`` evaluates after task ``t`` only the
tasks ``i <= t + 1``, see :mod:`mcl.evaluation.policy`). No metric reads such a cell where it is defined; a
metric that would raises ValueError naming it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

Matrix = Sequence[Sequence[float | None]]


def _at(m: list[list[float | None]], t: int, i: int) -> float:
    """Cell ``[t][i]``; ValueError if it was not evaluated."""
    value = m[t][i]
    if value is None:
        raise ValueError(f"accuracy matrix entry [{t}][{i}] was not evaluated (null)")
    return value


def _row(m: list[list[float | None]], t: int, stop: int | None = None) -> list[float]:
    """Row ``t`` (its first ``stop`` cells), every cell evaluated."""
    return [_at(m, t, i) for i in range(len(m[t]) if stop is None else stop)]


def _checked(a: Matrix) -> list[list[float | None]]:
    """Return ``a`` as a list of rows (floats, None where not evaluated); raise ValueError unless it is a
    non-empty square matrix of finite numbers and nulls."""
    if len(a) == 0:
        raise ValueError("accuracy matrix is empty")
    size = len(a)
    rows: list[list[float | None]] = []
    for t, row in enumerate(a):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            raise ValueError(f"accuracy matrix row {t} is {row!r}, expected a sequence of {size} numbers")
        if len(row) != size:
            raise ValueError(
                f"accuracy matrix is not square: row {t} has {len(row)} entries, expected {size}"
            )
        values = [None if x is None else float(x) for x in row]
        for i, x in enumerate(values):
            if x is not None and not math.isfinite(x):
                raise ValueError(f"accuracy matrix entry [{t}][{i}] is {x}, expected a finite number")
        rows.append(values)
    return rows


def mft(a: Matrix) -> float:
    """Mean fine-tune accuracy: mean of the diagonal, each task right after training on it."""
    m = _checked(a)
    return fmean(_at(m, i, i) for i in range(len(m)))


def mfn(a: Matrix) -> float:
    """Mean final accuracy: mean of the last row, every task after training on all of them."""
    m = _checked(a)
    return fmean(_row(m, len(m) - 1))


def maa(a: Matrix) -> float:
    """Mean average accuracy: mean over steps ``t`` of the mean accuracy on tasks seen so far (``i <= t``)."""
    m = _checked(a)
    return fmean(fmean(_row(m, t, t + 1)) for t in range(len(m)))


def bwt(a: Matrix) -> float:
    """Backward transfer: mean over ``i < T-1`` of ``a[T-1][i] - a[i][i]``; 0.0 for a single task."""
    m = _checked(a)
    last = len(m) - 1
    if last == 0:
        return 0.0
    return fmean(_at(m, last, i) - _at(m, i, i) for i in range(last))


def fwt(a: Matrix, baseline: Sequence[float]) -> float:
    """Forward transfer (GEM): mean over ``i >= 1`` of ``a[i-1][i] - baseline[i]``; 0.0 for a single task.

    Args:
        a: The accuracy matrix.
        baseline: ``baseline[i]`` is the untrained model's accuracy on task ``i``; one entry per task.
    """
    m = _checked(a)
    if len(baseline) != len(m):
        raise ValueError(f"baseline has {len(baseline)} entries, expected {len(m)} (one per task)")
    if len(m) == 1:
        return 0.0
    return fmean(_at(m, i - 1, i) - float(baseline[i]) for i in range(1, len(m)))


def average_forgetting(a: Matrix) -> float:
    """Average forgetting (Chaudhry et al.): mean over ``i < T-1`` of the drop from best to final accuracy.

    ``f_i = max_{l in [i, T-2]} a[l][i] - a[T-1][i]``; 0.0 for a single task. Negative when the final step
    beats every earlier one on a task.
    """
    m = _checked(a)
    last = len(m) - 1
    if last == 0:
        return 0.0
    return fmean(max(_at(m, step, i) for step in range(i, last)) - _at(m, last, i) for i in range(last))


def last_step_scores(a: Matrix) -> list[float]:
    """Accuracy on every task after the last training step (the last row)."""
    m = _checked(a)
    return _row(m, len(m) - 1)


def cl_metrics(a: Matrix, baseline: Sequence[float] | None = None) -> dict[str, float]:
    """All summary metrics: mft, mfn, maa, bwt, forgetting, and fwt when ``baseline`` is given."""
    out = {
        "mft": mft(a),
        "mfn": mfn(a),
        "maa": maa(a),
        "bwt": bwt(a),
        "forgetting": average_forgetting(a),
    }
    if baseline is not None:
        out["fwt"] = fwt(a, baseline)
    return out


def zero_shot_metrics(baseline: Sequence[float]) -> dict[str, float]:
    """The metrics of the untrained model (the baseline row) as if every step left it unchanged: its row
    repeated for every step, so MFT = MFN = its mean accuracy, BWT = forgetting = FWT = 0."""
    row = [float(b) for b in baseline]
    return cl_metrics([row] * len(row), row)


def _checked_tasks(tasks: Sequence[str], m: list[list[float]]) -> list[str]:
    if len(tasks) != len(m):
        raise ValueError(f"{len(tasks)} task names for a {len(m)}x{len(m)} accuracy matrix")
    return [str(t) for t in tasks]


def accuracy_matrix_json(tasks: Sequence[str], a: Matrix) -> dict[str, Any]:
    """JSON-ready form of the matrix: ``{"tasks": [...], "matrix": [[...], ...]}`` (null: not evaluated)."""
    m = _checked(a)
    return {"tasks": _checked_tasks(tasks, m), "matrix": m}


def heatmap_png(tasks: Sequence[str], a: Matrix, path: str | Path, title: str = "") -> Path:
    """Draw the matrix as an annotated heatmap PNG at ``path`` and return the path.

    Rows are labelled ``after <task>`` (training step), columns by the evaluated task.
    """
    m = _checked(a)
    names = _checked_tasks(tasks, m)
    # Figure + Agg canvas, not pyplot: no global backend switch, no figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = len(m)
    side = max(4.0, 0.9 * size + 2.5)
    fig = Figure(figsize=(side, side * 0.85))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    import numpy as np
    from matplotlib import colormaps

    cells = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in m]))
    vmax = max(100.0, float(cells.max()) if cells.count() else 0.0)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # not evaluated: grey
    image = ax.imshow(cells, cmap=cmap, vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_xticks(range(size), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(size), labels=[f"after {n}" for n in names])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training step")
    for t in range(size):
        for i in range(size):
            value = m[t][i]
            color = "black" if value is None or value > 0.6 * vmax else "white"
            text = "-" if value is None else f"{value:.1f}"
            ax.text(i, t, text, ha="center", va="center", color=color, fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out
