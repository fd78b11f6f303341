"""Read sweeps back from MLflow and turn them into leaderboards and figures (used by notebooks/analysis.ipynb).

A sweep is one MLflow run (tag ``mcl.kind=sweep``) whose trials are child runs (tag ``mcl.kind=stream_run``,
``mlflow.parentRunId`` = the sweep run). Every call goes through an explicit
:class:`mlflow.MlflowClient` built from the ``tracking_uri`` argument; nothing reads or sets MLflow's global
state. The metric maths lives in :mod:`mcl.evaluation.metrics` and :mod:`mcl.evaluation.leaderboard`; this
module only loads, groups and draws.

Trials are grouped by *variant*: the sweep's ``mcl.label`` tag (``ewc lr=0.003``), else the trial key
without its stream and seed parts (``ewc-lr0.003-generated-s0`` -> ``ewc-lr0.003``), so that trials which differ only in their seed are averaged together and a searched
hyper-parameter gets a row of its own. ``by="method"`` groups by method name only.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mcl.evaluation.leaderboard import (
    METRICS,
    Entry,
    has_orders,
    leaderboard,
    mean_std,
    to_csv_rows,
    zero_shot_records,
)
from mcl.evaluation.metrics import accuracy_matrix_json, cl_metrics
from mcl.run.rundir import MATRIX_JSON

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run

DEFAULT_EXPERIMENT = "mcl-sweeps"
MATRIX_ARTIFACT = MATRIX_JSON  # a stream run logs its run folder's matrix file under its own name
GroupBy = Literal["variant", "method"]


@dataclass
class TrialData:
    """One trial run of a sweep: a method on a stream with one seed (and one point of the search space)."""

    run_id: str
    key: str
    method: str
    stream: str
    seed: int | None
    status: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    matrix: list[list[float | None]] | None = None  # None cells: not evaluated (eval.tasks)
    baseline: list[float] | None = None
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)  # accuracy_matrix.json's "probes"
    tag_label: str = ""  # the sweep's ``mcl.label`` tag: method and searched values, e.g. "ewc lr=0.003"
    order: int = 0  # the sweep's ``mcl.order`` tag: which of its task orders (``tasks`` is that order)
    note: str = ""  # why the trial is left out of the analysis; "" for a usable trial

    @property
    def usable(self) -> bool:
        """Finished, with a valid accuracy matrix."""
        return not self.note and self.matrix is not None

    @property
    def variant(self) -> str:
        """The ``mcl.label`` tag, else the trial key without its stream and seed parts
        (``ewc-lr0.003-generated-s0`` -> ``ewc-lr0.003``)."""
        if self.tag_label:
            return self.tag_label
        label = self.key
        for part in (self.stream, f"o{self.order}", f"s{self.seed}" if self.seed is not None else ""):
            label = _drop_segment(label, part)
        return label

    def label(self, by: GroupBy) -> str:
        """The name this trial is grouped under: its variant or its method."""
        if by not in ("variant", "method"):
            raise ValueError(f"by: expected 'variant' or 'method', got {by!r}")
        return self.variant if by == "variant" else self.method


def _drop_segment(key: str, segment: str) -> str:
    """``key`` without its first ``-``-separated ``segment`` (not the leading one, the method name)."""
    if not segment:
        return key
    if f"-{segment}-" in key:
        return key.replace(f"-{segment}-", "-", 1)
    return key[: -len(segment) - 1] if key.endswith(f"-{segment}") else key


@dataclass
class SweepData:
    """A sweep run and its trials; ``trials`` are the usable ones, ``skipped`` the others (with a note)."""

    run_id: str
    name: str
    experiment: str
    tracking_uri: str
    status: str
    trials: list[TrialData] = field(default_factory=list)
    skipped: list[TrialData] = field(default_factory=list)

    @property
    def streams(self) -> list[str]:
        """The streams of the usable trials, sorted."""
        return sorted({t.stream for t in self.trials})

    def groups(
        self, by: GroupBy = "variant", stream: str | None = None
    ) -> dict[tuple[str, str], list[TrialData]]:
        """Usable trials keyed by ``(stream, label)``, sorted; only ``stream``'s when given."""
        if stream is not None and stream not in self.streams:
            raise ValueError(f"stream {stream!r} is not in sweep {self.name!r}; its streams: {self.streams}")
        out: dict[tuple[str, str], list[TrialData]] = {}
        for trial in self.trials:
            if stream is None or trial.stream == stream:
                out.setdefault((trial.stream, trial.label(by)), []).append(trial)
        return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------- loading


def _client(tracking_uri: str) -> MlflowClient:
    """A client on ``tracking_uri``; a sqlite file that does not exist is an error, not a new empty store."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.exists():
            raise FileNotFoundError(f"tracking_uri {tracking_uri!r}: no MLflow store at {db}")
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment named {experiment!r} in {client.tracking_uri}; experiments: {names}")
    return exp.experiment_id


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every active run matching ``filter_string``, newest first, across result pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _sweep_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    return _search_all(client, experiment_id, "tags.`mcl.kind` = 'sweep'")


def _trial_runs(client: MlflowClient, experiment_id: str, sweep_run_id: str) -> list[Run]:
    query = f"tags.`mlflow.parentRunId` = '{sweep_run_id}' and tags.`mcl.kind` = 'stream_run'"
    return _search_all(client, experiment_id, query)


def _count(run: Run, metric: str, fallback: int) -> int:
    value = run.data.metrics.get(metric)
    return int(value) if value is not None and math.isfinite(value) else fallback


def list_sweeps(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> list[dict[str, Any]]:
    """The sweeps of ``experiment``, newest first: ``run_id, name, start_time, status, trials_total,
    trials_finished`` (the sweep's own metrics, else counted from its trial runs)."""
    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    rows = []
    for run in _sweep_runs(client, experiment_id):
        trials = _trial_runs(client, experiment_id, run.info.run_id)
        rows.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "start_time": datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc),
                "status": run.info.status,
                "trials_total": _count(run, "trials_total", len(trials)),
                "trials_finished": _count(
                    run, "trials_finished", sum(t.info.status == "FINISHED" for t in trials)
                ),
            }
        )
    return rows


def _find_sweep(client: MlflowClient, experiment_id: str, experiment: str, sweep: str | None) -> Run:
    """The newest sweep run whose run id or run name is ``sweep`` (the newest of all for None)."""
    runs = _sweep_runs(client, experiment_id)
    if not runs:
        raise ValueError(f"experiment {experiment!r} in {client.tracking_uri} has no sweep runs")
    if sweep is None:
        return runs[0]
    for run in runs:
        if sweep in (run.info.run_id, run.info.run_name, run.data.tags.get("mcl.sweep")):
            return run
    names = sorted({r.info.run_name for r in runs})
    raise ValueError(f"no sweep named {sweep!r} in experiment {experiment!r}; sweeps: {names}")


def _read_matrix(client: MlflowClient, run_id: str, folder: Path) -> dict[str, Any]:
    """The trial's ``accuracy_matrix.json``, validated (square matrix, one task name per row)."""
    from mlflow.exceptions import MlflowException

    try:
        local = client.download_artifacts(run_id, MATRIX_ARTIFACT, dst_path=str(folder))
    except (MlflowException, OSError) as err:
        raise ValueError(f"no {MATRIX_ARTIFACT} artifact ({type(err).__name__})") from err
    raw = json.loads(Path(local).read_text())
    if not isinstance(raw, dict) or "tasks" not in raw or "matrix" not in raw:
        raise ValueError(f"{MATRIX_ARTIFACT} lacks 'tasks' or 'matrix'")
    data = accuracy_matrix_json(raw["tasks"], raw["matrix"])
    baseline = raw.get("baseline")
    if baseline is not None and len(baseline) != len(data["tasks"]):
        raise ValueError(
            f"{MATRIX_ARTIFACT}: baseline has {len(baseline)} entries for {len(data['tasks'])} tasks"
        )
    data["baseline"] = [None if b is None else float(b) for b in baseline] if baseline is not None else None
    data["probes"] = raw.get("probes") or {}
    return data


def _seed(run: Run) -> int | None:
    text = run.data.tags.get("mcl.seed", run.data.params.get("train.seed"))
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _trial(client: MlflowClient, run: Run, folder: Path) -> TrialData:
    """One trial run as :class:`TrialData`; a note says why it cannot be used (unfinished, no matrix)."""
    tags, params = run.data.tags, run.data.params
    trial = TrialData(
        run_id=run.info.run_id,
        key=tags.get("mcl.trial", run.info.run_name),
        method=tags.get("mcl.method", params.get("method.name", "")),
        stream=tags.get("mcl.stream", params.get("stream.name", "")),
        seed=_seed(run),
        status=run.info.status,
        tag_label=tags.get("mcl.label", ""),
        order=int(tags.get("mcl.order", "0") or 0),
        params=dict(params),
        metrics=dict(run.data.metrics),
    )
    if trial.status != "FINISHED":
        trial.note = f"unfinished: status {trial.status}"
        return trial
    try:
        data = _read_matrix(client, trial.run_id, folder / trial.run_id)
    except ValueError as err:
        trial.note = f"left out: {err}"
        return trial
    trial.tasks, trial.matrix, trial.baseline = data["tasks"], data["matrix"], data["baseline"]
    trial.probes = data["probes"]
    return trial


def load_sweep(
    tracking_uri: str, sweep: str | None = None, experiment: str = DEFAULT_EXPERIMENT
) -> SweepData:
    """Load a sweep and its trials (``sweep``: run name or run id; None = the newest sweep).

    Trials that did not finish or lack a valid ``accuracy_matrix.json`` go to ``SweepData.skipped`` with a
    ``note`` saying why.
    """
    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    run = _find_sweep(client, experiment_id, experiment, sweep)
    data = SweepData(run.info.run_id, run.info.run_name, experiment, tracking_uri, run.info.status)
    with tempfile.TemporaryDirectory(prefix="mcl-sweep-") as tmp:
        for trial_run in _trial_runs(client, experiment_id, run.info.run_id):
            trial = _trial(client, trial_run, Path(tmp))
            (data.trials if trial.usable else data.skipped).append(trial)
    data.trials.sort(key=lambda t: (t.stream, t.method, t.key))
    return data


# ------------------------------------------------------------------------------------------ leaderboards


def trial_metrics(trial: TrialData) -> dict[str, float]:
    """The trial's CL metrics: those logged on its run, any missing one computed from its matrix."""
    logged = {m: trial.metrics[m] for m in METRICS if m in trial.metrics}
    if trial.matrix is None or len(logged) == len(METRICS):
        return logged
    return {**cl_metrics(trial.matrix, trial.baseline), **logged}


def _records(trials: Sequence[TrialData], by: GroupBy) -> list[dict[str, Any]]:
    return [
        {
            "method": t.label(by),
            "stream": t.stream,
            "seed": t.seed,
            "order": t.order,
            "baseline": t.baseline,
            **trial_metrics(t),
        }
        for t in trials
    ]


def leaderboard_entries(
    sweep_data: SweepData, by: GroupBy = "variant", stream: str | None = None, zero_shot: bool = False
) -> list[Entry]:
    """Leaderboard entries (mean and std over seeds and task orders, order sensitivity) of the sweep's usable
    trials; with ``zero_shot``, also the untrained model's row (``zero_shot``, see
    :func:`mcl.evaluation.leaderboard.zero_shot_records`)."""
    trials = [t for group in sweep_data.groups(by, stream).values() for t in group]
    records = _records(trials, by)
    return leaderboard([*records, *zero_shot_records(records)] if zero_shot else records)


def _frame(entries: list[Entry]) -> pd.DataFrame:
    import pandas as pd

    orders = has_orders(entries)
    stats = ("mean", "std", "order_std") if orders else ("mean", "std")
    head = ["method", "stream", "seeds"] + (["orders"] if orders else [])
    columns = head + [f"{m}_{s}" for m in METRICS for s in stats]
    return pd.DataFrame(to_csv_rows(entries), columns=columns)


def leaderboard_frame(
    sweep_data: SweepData, by: GroupBy = "variant", stream: str | None = None, zero_shot: bool = False
) -> pd.DataFrame:
    """The sweep's leaderboard: one row per (method, stream), ``<metric>_mean`` and ``<metric>_std`` columns;
    with several task orders also ``orders`` and ``<metric>_order_std`` (std over orders of the seed means);
    with ``zero_shot``, also the untrained model's row."""
    return _frame(leaderboard_entries(sweep_data, by, stream, zero_shot))


def zero_shot_frame(sweep_data: SweepData, stream: str | None = None) -> pd.DataFrame:
    """The untrained model's row (``zero_shot``) per stream, as leaderboard columns: MFN = MFT = its mean
    accuracy over the tasks, BWT = FWT = 0; mean and std over seeds."""
    trials = [t for group in sweep_data.groups("method", stream).values() for t in group]
    return _frame(leaderboard(zero_shot_records(_records(trials, "method"))))


def probe_frame(sweep_data: SweepData, by: GroupBy = "variant", stream: str | None = None) -> pd.DataFrame:
    """General-capability probes (``stream.probes``) per (method, stream, probe): the untrained model's
    accuracy, the final accuracy and ``retention`` = final / untrained, mean and std over seeds."""
    import pandas as pd

    rows = []
    for (stream_name, label), trials in sweep_data.groups(by, stream).items():
        names = sorted({p for t in trials for p in t.probes})
        for name in names:
            found = [t.probes[name] for t in trials if name in t.probes]
            row: dict[str, Any] = {"method": label, "stream": stream_name, "probe": name, "seeds": len(found)}
            for key, values in (
                ("baseline", [p.get("baseline") for p in found]),
                ("final", [(p.get("after_task") or [None])[-1] for p in found]),
                ("retention", [p.get("retention") for p in found]),
            ):
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std([float(v) for v in values if v is not None])
            rows.append(row)
    stats = [f"{k}_{s}" for k in ("baseline", "final", "retention") for s in ("mean", "std")]
    return pd.DataFrame(rows, columns=["method", "stream", "probe", "seeds", *stats])


def leaderboard_across_sweeps(
    tracking_uri: str,
    stream: str,
    sweeps: Sequence[str] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    by: GroupBy = "variant",
) -> pd.DataFrame:
    """One row per (sweep, method) on ``stream``, best MFN first, to compare sweeps (``sweeps``: names or
    run ids; None = every sweep of the experiment)."""
    import pandas as pd

    if sweeps is None:
        client = _client(tracking_uri)
        sweeps = [r.info.run_id for r in _sweep_runs(client, _experiment_id(client, experiment))]
    names = list(sweeps)
    frames, seen = [], set()
    for name in names:
        data = load_sweep(tracking_uri, name, experiment)
        seen.update(data.streams)
        if stream in data.streams:
            frame = leaderboard_frame(data, by, stream)
            frame.insert(0, "sweep", data.name)
            frame.insert(1, "sweep_run_id", data.run_id)
            frames.append(frame)
    if not frames:
        raise ValueError(f"no sweep has finished trials on stream {stream!r}; streams found: {sorted(seen)}")
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values("mfn_mean", ascending=False, kind="stable", na_position="last").reset_index(
        drop=True
    )


# ------------------------------------------------------------------------------------------------ figures


def _new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A Figure on an Agg canvas: no pyplot, so no global backend switch and no figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _grid(fig: Figure, count: int, max_cols: int = 3) -> list[Axes]:
    cols = min(count, max_cols)
    rows = math.ceil(count / cols)
    return [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def _usable_groups(
    sweep_data: SweepData, by: GroupBy, stream: str | None
) -> dict[tuple[str, str], list[TrialData]]:
    groups = sweep_data.groups(by, stream)
    if not groups:
        notes = [f"{t.key}: {t.note}" for t in sweep_data.skipped]
        raise ValueError(f"sweep {sweep_data.name!r} has no finished trials to plot; skipped: {notes}")
    return groups


def _title(stream: str, label: str, streams: int) -> str:
    return f"{label} · {stream}" if streams > 1 else label


def mean_matrix(trials: Sequence[TrialData]) -> tuple[list[str], Any, Any]:
    """Task names, and the element-wise mean and sample std (0 for one trial) of the trials' matrices.

    A matrix's columns are in its trial's own task order; they are aligned by task name to the first trial's
    order (rows stay by training step: row t is after the t-th trained task, whichever task it was)."""
    import numpy as np

    tasks = trials[0].tasks
    for trial in trials[1:]:
        if sorted(trial.tasks) != sorted(tasks):
            raise ValueError(
                f"trials {trials[0].key} and {trial.key} have different tasks: {tasks} vs {trial.tasks}"
            )
    stack = np.array([_columns_in(t, tasks) for t in trials], dtype=float)
    std = stack.std(axis=0, ddof=1) if len(trials) > 1 else np.zeros_like(stack[0])
    return tasks, stack.mean(axis=0), std


def _columns_in(trial: TrialData, tasks: list[str]) -> list[list[float]]:
    """``trial``'s matrix with its columns in the order of ``tasks`` (the same task names)."""
    assert trial.matrix is not None
    index = [trial.tasks.index(name) for name in tasks]
    return [[row[i] for i in index] for row in trial.matrix]


def _one_order(trials: Sequence[TrialData]) -> bool:
    return all(t.tasks == trials[0].tasks for t in trials)


def _step_labels(trials: Sequence[TrialData]) -> list[str]:
    """Row labels of averaged matrices: ``after <task>``, or ``after task <t>`` when the trials' orders differ."""
    if _one_order(trials):
        return [f"after {n}" for n in trials[0].tasks]
    return [f"after task {t + 1}" for t in range(len(trials[0].tasks))]


def plot_matrices(sweep_data: SweepData, by: GroupBy = "variant", stream: str | None = None) -> Figure:
    """One annotated heatmap per (method, stream): the accuracy matrix averaged over seeds (grey: not
    evaluated)."""
    import numpy as np
    from matplotlib import colormaps

    groups = _usable_groups(sweep_data, by, stream)
    size = max(len(g[0].tasks) for g in groups.values())
    side = max(3.5, 0.8 * size + 2.0)
    cols = min(len(groups), 3)
    fig = _new_figure((side + 0.8) * cols + 1.0, side * math.ceil(len(groups) / 3))
    axes = _grid(fig, len(groups))
    streams = len({s for s, _ in groups})
    image = None
    for ax, ((stream_name, label), trials) in zip(axes, groups.items(), strict=True):
        tasks, mean, _ = mean_matrix(trials)
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # not evaluated (eval.tasks): grey
        image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=0.0, vmax=100.0)
        for t in range(len(tasks)):
            for i in range(len(tasks)):
                value = mean[t][i]
                color = "black" if not math.isfinite(value) or value > 60.0 else "white"
                text = f"{value:.1f}" if math.isfinite(value) else "-"
                ax.text(i, t, text, ha="center", va="center", color=color, fontsize=8)
        ax.set_xticks(range(len(tasks)), labels=tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), labels=_step_labels(trials))
        ax.set_xlabel("evaluated task")
        ax.set_title(f"{_title(stream_name, label, streams)} (n={len(trials)})")
    fig.colorbar(image, ax=axes, label="accuracy (%)")
    return fig


def plot_task_curves(sweep_data: SweepData, by: GroupBy = "variant", stream: str | None = None) -> Figure:
    """Per (method, stream), the accuracy on each task after every training step (seed mean ± std)."""
    groups = _usable_groups(sweep_data, by, stream)
    cols = min(len(groups), 3)
    fig = _new_figure(4.5 * cols, 3.5 * math.ceil(len(groups) / 3))
    axes = _grid(fig, len(groups))
    streams = len({s for s, _ in groups})
    for ax, ((stream_name, label), trials) in zip(axes, groups.items(), strict=True):
        tasks, mean, std = mean_matrix(trials)
        steps = list(range(len(tasks)))
        for i, task in enumerate(tasks):
            (line,) = ax.plot(steps, mean[:, i], marker="o", label=task)
            if len(trials) > 1:
                ax.fill_between(
                    steps, mean[:, i] - std[:, i], mean[:, i] + std[:, i], alpha=0.15, color=line.get_color()
                )
            if _one_order(trials):
                ax.plot(
                    [i], [mean[i, i]], marker="*", markersize=12, color=line.get_color(), linestyle="none"
                )
        ax.set_xticks(steps, labels=_step_labels(trials), rotation=30, ha="right")
        ax.set_ylim(0.0, 100.0)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{_title(stream_name, label, streams)} (n={len(trials)})")
        ax.legend(fontsize=7, title="task (★ = just trained)", title_fontsize=7)
    return fig


def _entry_label(entry: Entry, streams: int) -> str:
    return f"{entry.method}\n{entry.stream}" if streams > 1 else entry.method


def plot_leaderboard(
    sweep_data: SweepData, metric: str = "mfn", by: GroupBy = "variant", stream: str | None = None
) -> Figure:
    """Bars of ``metric`` per (method, stream), best first, with the std over seeds as error bars."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    _usable_groups(sweep_data, by, stream)
    entries = leaderboard_entries(sweep_data, by, stream)
    entries = sorted(entries, key=lambda e: -e.mean[metric] if math.isfinite(e.mean[metric]) else math.inf)
    streams = len({e.stream for e in entries})
    fig = _new_figure(max(4.0, 1.1 * len(entries) + 1.5), 4.0)
    ax = fig.add_subplot()
    labels = [_entry_label(e, streams) for e in entries]
    means = [e.mean[metric] if math.isfinite(e.mean[metric]) else 0.0 for e in entries]
    stds = [e.std[metric] if math.isfinite(e.std[metric]) else 0.0 for e in entries]
    ax.bar(range(len(entries)), means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(entries)), labels=labels, rotation=30, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"{metric.upper()} (%)")
    ax.set_title(f"{sweep_data.name}: {metric.upper()} (mean ± std over seeds)")
    return fig


def leaderboard_png(
    entries: Sequence[Entry], path: str | Path, metrics: tuple[str, ...] = ("mfn", "maa", "bwt")
) -> Path:
    """Bars of mean ± std over seeds per leaderboard row, one panel per metric (and per stream), as a PNG at
    ``path`` (the sweep writes its ``leaderboard.png`` with it)."""
    streams = list(dict.fromkeys(e.stream for e in entries))
    fig = _new_figure(4.5 * len(metrics), 0.45 * max(4, len(entries)) + 1.5, layout=None)
    axes = fig.subplots(len(streams), len(metrics), squeeze=False)
    for r, stream in enumerate(streams):
        rows = [e for e in entries if e.stream == stream]
        labels = [e.method for e in rows]
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            ax.barh(
                range(len(rows)),
                [e.mean[metric] for e in rows],
                xerr=[e.std[metric] for e in rows],
                color="#4c72b0",
                capsize=3,
            )
            ax.set_yticks(range(len(rows)), labels if c == 0 else [""] * len(rows))
            ax.invert_yaxis()
            ax.axvline(0, color="black", linewidth=0.6)
            ax.set_title(f"{stream}: {metric.upper()} (%)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_stability_plasticity(
    sweep_data: SweepData, by: GroupBy = "variant", stream: str | None = None
) -> Figure:
    """One point per (method, stream): x = MFT (plasticity), y = BWT (stability), std over seeds as bars."""
    _usable_groups(sweep_data, by, stream)
    entries = leaderboard_entries(sweep_data, by, stream)
    streams = len({e.stream for e in entries})
    fig = _new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    for entry in entries:
        label = _entry_label(entry, streams).replace("\n", " · ")
        ax.errorbar(
            entry.mean["mft"],
            entry.mean["bwt"],
            xerr=entry.std["mft"],
            yerr=entry.std["bwt"],
            fmt="o",
            capsize=3,
            label=label,
        )
        ax.annotate(
            label,
            (entry.mean["mft"], entry.mean["bwt"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.axhline(0.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel("MFT (%): accuracy right after training (plasticity)")
    ax.set_ylabel("BWT (%): change since then (stability)")
    ax.set_title(f"{sweep_data.name}: stability vs plasticity")
    return fig


def order_frame(
    sweep_data: SweepData, metric: str = "mfn", by: GroupBy = "variant", stream: str | None = None
) -> pd.DataFrame:
    """One row per (stream, method, task order): the order (index and task names), its seeds, and ``metric``'s
    mean and std over those seeds. The std over a method's rows of ``mean`` is its order sensitivity (the
    leaderboard's ``<metric>_order_std``)."""
    import pandas as pd

    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    rows = []
    for (stream_name, label), trials in _usable_groups(sweep_data, by, stream).items():
        by_order: dict[int, list[TrialData]] = {}
        for trial in trials:
            by_order.setdefault(trial.order, []).append(trial)
        for order, runs in sorted(by_order.items()):
            values = [trial_metrics(t).get(metric, math.nan) for t in runs]
            mean, std = mean_std([v for v in values if math.isfinite(v)])
            rows.append(
                {
                    "method": label,
                    "stream": stream_name,
                    "order": order,
                    "tasks": " > ".join(runs[0].tasks),
                    "seeds": len(runs),
                    f"{metric}_mean": mean,
                    f"{metric}_std": std,
                }
            )
    return pd.DataFrame(rows)


def plot_order_sensitivity(
    sweep_data: SweepData, metric: str = "mfn", by: GroupBy = "variant", stream: str | None = None
) -> Figure:
    """Per (method, stream), ``metric`` for each task order (mean ± std over seeds), and in the legend the
    std over orders of those means (the leaderboard's order-sensitivity column)."""
    frame = order_frame(sweep_data, metric, by, stream)
    groups = list(dict.fromkeys(zip(frame["stream"], frame["method"], strict=True)))
    streams = len({s for s, _ in groups})
    orders = sorted(set(frame["order"]))
    fig = _new_figure(max(5.0, 1.2 * len(orders) * len(groups) + 2.0), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(groups)
    for g, (stream_name, label) in enumerate(groups):
        rows = frame[(frame["stream"] == stream_name) & (frame["method"] == label)]
        means = list(rows[f"{metric}_mean"])
        spread = mean_std([v for v in means if math.isfinite(v)])[1] if len(means) > 1 else math.nan
        x = [orders.index(o) + (g - (len(groups) - 1) / 2) * width for o in rows["order"]]
        name = _title(stream_name, label, streams)
        ax.bar(
            x,
            means,
            width,
            yerr=list(rows[f"{metric}_std"]),
            capsize=3,
            label=f"{name} (order std {spread:.1f})",
        )
    ax.set_xticks(range(len(orders)), labels=[f"order {o}" for o in orders])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"{metric.upper()} (%)")
    ax.set_title(f"{sweep_data.name}: {metric.upper()} per task order (mean ± std over seeds)")
    ax.legend(fontsize=7)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
    return out


__all__ = [
    "DEFAULT_EXPERIMENT",
    "SweepData",
    "TrialData",
    "leaderboard_across_sweeps",
    "leaderboard_entries",
    "leaderboard_frame",
    "leaderboard_png",
    "list_sweeps",
    "load_sweep",
    "mean_matrix",
    "order_frame",
    "plot_leaderboard",
    "plot_matrices",
    "plot_order_sensitivity",
    "plot_stability_plasticity",
    "plot_task_curves",
    "probe_frame",
    "save_figure",
    "trial_metrics",
    "zero_shot_frame",
]
