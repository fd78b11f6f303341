"""Sweep analysis on a real MLflow sqlite store in the sweep layout: loading, leaderboards, errors, figures.

Expected numbers are computed by hand from :data:`sweep_store.MATRICES`:

=====================  =====  =====  =====
trial                  MFT    MFN    BWT
=====================  =====  =====  =====
sequential_lora s0     86.67  50.00  -55.0
sequential_lora s1     80.00  60.00  -30.0
replay s0              83.33  75.00  -12.5
replay s1              86.67  78.33  -12.5
=====================  =====  =====  =====

The sample std of two values is ``|a - b| / sqrt(2)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.container import ErrorbarContainer
from sweep_store import (
    BASELINE,
    MATRICES,
    ORDER_1,
    TASKS,
    TrialSpec,
    build_sweep,
    default_trials,
    order_trials,
)

from mcl.analysis import (
    SweepData,
    TrialData,
    leaderboard_across_sweeps,
    leaderboard_frame,
    leaderboard_png,
    list_sweeps,
    load_sweep,
    mean_matrix,
    order_frame,
    plot_leaderboard,
    plot_matrices,
    plot_order_sensitivity,
    plot_stability_plasticity,
    plot_task_curves,
    probe_frame,
    save_figure,
    trial_metrics,
    zero_shot_frame,
)
from mcl.evaluation.leaderboard import leaderboard

SQRT2 = math.sqrt(2.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two sweeps: ``alpha`` (2 methods x 2 seeds, one unfinished trial, one finished without its matrix)
    then ``beta`` (replay at two learning rates, one labelled by an ``mcl.label`` tag, one trial on a second
    stream)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    alpha = default_trials() + [
        TrialSpec("replay", 2, MATRICES[("replay", 0)], finished=False),
        TrialSpec("replay", 3, MATRICES[("replay", 0)], artifact=False),
    ]
    build_sweep(uri, "alpha", alpha)
    beta = [
        TrialSpec("replay", 0, MATRICES[("replay", 1)], suffix="-lr0.001", label="replay lr=0.001"),
        TrialSpec("replay", 0, MATRICES[("sequential_lora", 0)], suffix="-lr0.003"),
        TrialSpec("replay", 0, MATRICES[("replay", 0)], stream="other"),
    ]
    build_sweep(uri, "beta", beta)
    return uri


@pytest.fixture(scope="module")
def alpha(store: str) -> SweepData:
    return load_sweep(store, "alpha")


def test_list_sweeps_is_newest_first_with_trial_counts(store):
    sweeps = list_sweeps(store)
    assert [s["name"] for s in sweeps] == ["beta", "alpha"]
    assert sweeps[0]["start_time"] > sweeps[1]["start_time"]
    assert (sweeps[1]["trials_total"], sweeps[1]["trials_finished"]) == (6, 5)
    assert all(s["status"] == "FINISHED" and len(s["run_id"]) == 32 for s in sweeps)


def test_load_sweep_reads_every_finished_trial_and_notes_the_rest(alpha):
    assert alpha.name == "alpha" and alpha.streams == ["generated"]
    assert sorted((t.method, t.seed) for t in alpha.trials) == sorted(MATRICES)
    for trial in alpha.trials:
        assert trial.tasks == TASKS
        assert trial.matrix == MATRICES[(trial.method, trial.seed)]
        assert trial.baseline == BASELINE
        assert trial.key == f"{trial.method}-generated-s{trial.seed}"
        assert trial.params["train.seed"] == str(trial.seed)
        assert trial.metrics["mfn"] == pytest.approx(sum(trial.matrix[-1]) / 3)
        assert trial.status == "FINISHED" and trial.note == ""
    notes = {t.key: t.note for t in alpha.skipped}
    assert notes["replay-generated-s2"] == "unfinished: status RUNNING"
    assert "no accuracy_matrix.json" in notes["replay-generated-s3"]
    assert set(notes) == {"replay-generated-s2", "replay-generated-s3"}  # task runs are not trials


def test_load_sweep_by_run_id_and_newest_by_default(store, alpha):
    assert load_sweep(store, alpha.run_id).name == "alpha"
    assert load_sweep(store).name == "beta"


def test_leaderboard_means_and_stds_match_hand_computed_values(alpha):
    frame = leaderboard_frame(alpha).set_index("method")
    assert list(frame.index) == ["replay", "sequential_lora"]  # best MFN first
    replay, seq = frame.loc["replay"], frame.loc["sequential_lora"]
    assert replay["seeds"] == 2 and seq["seeds"] == 2
    assert seq["mfn_mean"] == pytest.approx(55.0) and seq["mfn_std"] == pytest.approx(10.0 / SQRT2)
    assert seq["bwt_mean"] == pytest.approx(-42.5) and seq["bwt_std"] == pytest.approx(25.0 / SQRT2)
    assert seq["mft_mean"] == pytest.approx(250.0 / 3) and seq["mft_std"] == pytest.approx((20.0 / 3) / SQRT2)
    assert replay["mfn_mean"] == pytest.approx(230.0 / 3) and replay["mfn_std"] == pytest.approx(
        10.0 / 3 / SQRT2
    )
    assert replay["bwt_mean"] == pytest.approx(-12.5) and replay["bwt_std"] == pytest.approx(0.0)
    # fwt against BASELINE: seq s0 ((10-10) + (10-15)) / 2 = -2.5, seq s1 ((20-10) + (20-15)) / 2 = 7.5
    assert seq["fwt_mean"] == pytest.approx(2.5)


def test_zero_shot_row_and_probes_of_a_sweep(alpha):
    zero = zero_shot_frame(alpha)
    assert list(zero["method"]) == ["zero_shot"] and zero["seeds"][0] == 2  # one per (stream, seed)
    assert zero["mfn_mean"][0] == pytest.approx(sum(BASELINE) / 3) and zero["bwt_mean"][0] == 0.0
    with_zero = leaderboard_frame(alpha, zero_shot=True).set_index("method")
    assert with_zero.loc["zero_shot", "mfn_mean"] == pytest.approx(10.0) and len(with_zero) == 3
    probes = probe_frame(alpha).set_index("method")
    assert list(probes["probe"]) == ["vqa", "vqa"] and list(probes["seeds"]) == [2, 2]
    assert probes.loc["replay", "retention_mean"] == pytest.approx(0.5)
    assert probes.loc["replay", "final_mean"] == pytest.approx(25.0)


def test_trial_metrics_fill_missing_ones_from_the_matrix():
    matrix = MATRICES[("sequential_lora", 0)]
    trial = TrialData("r", "k", "m", "s", 0, "FINISHED", metrics={"mfn": 1.0}, tasks=TASKS, matrix=matrix)
    metrics = trial_metrics(trial)
    assert metrics["mfn"] == 1.0  # the logged value wins
    assert metrics["bwt"] == pytest.approx(-55.0) and "fwt" not in metrics  # no baseline, no fwt


def test_variant_drops_stream_and_seed_from_the_key():
    def trial(key: str, stream: str = "generated", seed: int | None = 0) -> TrialData:
        return TrialData("r", key, "ewc", stream, seed, "FINISHED")

    assert trial("ewc-generated-s0-lr0.003").variant == "ewc-lr0.003"
    assert trial("ewc-generated-s0").variant == "ewc"
    assert trial("ewc-s0-generated").variant == "ewc"
    assert trial("ewc-generated-s10", seed=10).variant == "ewc"
    assert trial("ewc-mllm-cl-s1-lam100", stream="mllm-cl", seed=1).variant == "ewc-lam100"
    assert trial("ewc-lam=100-generated-s1", seed=1).variant == "ewc-lam=100"  # the sweep's key format
    assert trial("custom", seed=None).variant == "custom"
    tagged = TrialData(
        "r", "ewc-lam=100-generated-s1", "ewc", "generated", 1, "FINISHED", tag_label="ewc lam=100"
    )
    assert tagged.variant == "ewc lam=100" and tagged.label("method") == "ewc"
    with pytest.raises(ValueError, match="by: expected 'variant' or 'method'"):
        trial("ewc").label("seed")  # type: ignore[arg-type]


def test_beta_groups_by_variant_or_by_method(store):
    beta = load_sweep(store, "beta")
    assert beta.streams == ["generated", "other"]
    by_variant = leaderboard_frame(beta, stream="generated")
    assert list(by_variant["method"]) == ["replay lr=0.001", "replay-lr0.003"]
    assert list(by_variant["seeds"]) == [1, 1]
    by_method = leaderboard_frame(beta, by="method", stream="generated")
    assert list(by_method["method"]) == ["replay"] and by_method["seeds"][0] == 2
    assert by_method["mfn_mean"][0] == pytest.approx((235.0 / 3 + 50.0) / 2)
    assert len(leaderboard_frame(beta)) == 3  # both streams


def test_leaderboard_across_sweeps_compares_one_stream(store):
    table = leaderboard_across_sweeps(store, "generated")
    rows = list(zip(table["sweep"], table["method"], table["mfn_mean"].round(3), strict=True))
    assert rows == [
        ("beta", "replay lr=0.001", round(235.0 / 3, 3)),
        ("alpha", "replay", round(230.0 / 3, 3)),
        ("alpha", "sequential_lora", 55.0),
        ("beta", "replay-lr0.003", 50.0),
    ]
    assert set(table["stream"]) == {"generated"}
    only_alpha = leaderboard_across_sweeps(store, "generated", sweeps=["alpha"])
    assert set(only_alpha["sweep"]) == {"alpha"} and len(only_alpha) == 2
    other = leaderboard_across_sweeps(store, "other")
    assert list(other["sweep"]) == ["beta"]
    with pytest.raises(ValueError, match=r"stream 'nope'; streams found: \['generated', 'other'\]"):
        leaderboard_across_sweeps(store, "nope")


def test_errors_name_what_is_missing(store, tmp_path, alpha):
    with pytest.raises(
        ValueError, match=r"no sweep named 'gamma' in experiment 'mcl-sweeps'; sweeps: \['alpha', 'beta'\]"
    ):
        load_sweep(store, "gamma")
    with pytest.raises(ValueError, match=r"no experiment named 'nope' .*experiments: \[.*'mcl-sweeps'"):
        list_sweeps(store, experiment="nope")
    missing = f"sqlite:///{tmp_path}/absent.db"
    with pytest.raises(FileNotFoundError, match="no MLflow store at"):
        load_sweep(missing)
    assert not (tmp_path / "absent.db").exists()  # not silently created
    with pytest.raises(ValueError, match=r"stream 'other' is not in sweep 'alpha'"):
        leaderboard_frame(alpha, stream="other")
    with pytest.raises(ValueError, match="metric: expected one of"):
        plot_leaderboard(alpha, metric="accuracy")
    empty = SweepData("r", "empty", "mcl-sweeps", store, "FINISHED", skipped=alpha.skipped)
    with pytest.raises(ValueError, match="sweep 'empty' has no finished trials to plot; skipped: .*RUNNING"):
        plot_matrices(empty)


def test_plot_matrices_one_seed_averaged_heatmap_per_method(alpha, tmp_path):
    fig = plot_matrices(alpha)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == ["replay (n=2)", "sequential_lora (n=2)"]
    seq = heatmaps[1].images[0].get_array()
    expected = [[75.0, 15.0, 15.0], [35.0, 85.0, 15.0], [30.0, 45.0, 90.0]]
    assert seq.tolist() == expected
    assert len(heatmaps[1].texts) == 9 and heatmaps[1].texts[1].get_text() == "15.0"
    assert save_figure(fig, tmp_path / "m.png").stat().st_size > 5000


def test_plot_task_curves_one_line_per_task(alpha):
    fig = plot_task_curves(alpha)
    assert len(fig.axes) == 2
    seq = fig.axes[1]
    curves = [line for line in seq.lines if line.get_linestyle() != "None"]
    assert [line.get_label() for line in curves] == TASKS
    # accuracy on "count" after each step, seed mean: (80+70)/2, (30+40)/2, (20+40)/2
    assert list(curves[0].get_ydata()) == [75.0, 35.0, 30.0]
    assert len(seq.collections) == 3  # a std band per task (two seeds)


def test_plot_leaderboard_bars_with_std_errorbars(alpha):
    fig = plot_leaderboard(alpha, metric="mfn")
    (ax,) = fig.axes
    assert [round(p.get_height(), 3) for p in ax.patches] == [round(230.0 / 3, 3), 55.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["replay", "sequential_lora"]
    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = errorbars.lines[2][0].get_segments()
    assert [round(s[1][1] - s[0][1], 3) for s in segments] == [
        round(2 * 10 / 3 / SQRT2, 3),
        round(2 * 10 / SQRT2, 3),
    ]


def test_plot_stability_plasticity_one_point_per_method(alpha, store):
    fig = plot_stability_plasticity(alpha)
    (ax,) = fig.axes
    points = {c.get_label(): c.lines[0].get_xydata()[0].tolist() for c in ax.containers}
    assert points["replay"] == pytest.approx([85.0, -12.5])
    assert points["sequential_lora"] == pytest.approx([250.0 / 3, -42.5])
    beta = plot_stability_plasticity(load_sweep(store, "beta"))
    assert sorted(c.get_label() for c in beta.axes[0].containers) == [
        "replay lr=0.001 · generated",
        "replay · other",
        "replay-lr0.003 · generated",
    ]


def test_figures_render_with_more_groups_than_columns(store, tmp_path):
    beta = load_sweep(store, "beta")
    for plot in (plot_matrices, plot_task_curves, plot_leaderboard, plot_stability_plasticity):
        path = save_figure(plot(beta, by="variant"), Path(tmp_path) / f"{plot.__name__}.png")
        assert path.stat().st_size > 5000


def test_leaderboard_png_writes_a_png(tmp_path):
    records = [
        {"method": m, "stream": s, "seed": seed, "mfn": 10.0 * seed, "maa": 20.0, "bwt": -1.0}
        for m in ("a", "b")
        for s in ("g", "h")
        for seed in (0, 1)
    ]
    entries = leaderboard(records, metrics=("mfn", "maa", "bwt"))
    path = leaderboard_png(entries, tmp_path / "leaderboard.png")
    assert path == tmp_path / "leaderboard.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ordered(store: str) -> SweepData:
    """A sweep of sequential_lora in 2 task orders x 2 seeds (order 1's matrices in its own task order) plus
    replay in the published order only; in its own experiment of the store (the others do not see it)."""
    build_sweep(store, "orders", order_trials() + default_trials(("replay",)), experiment="mcl-orders")
    return load_sweep(store, "orders", experiment="mcl-orders")


def test_leaderboard_gives_the_std_over_orders_of_the_seed_means(ordered):
    """MFN of sequential_lora: order 0 seeds 50 and 60 (mean 55), order 1 seeds 110/3 and 140/3 (mean 125/3);
    over all four runs the mean is 145/3; the order sensitivity is |55 - 125/3| / sqrt(2)."""
    frame = leaderboard_frame(ordered).set_index("method")
    seq, replay = frame.loc["sequential_lora"], frame.loc["replay"]
    assert seq["seeds"] == 2 and seq["orders"] == 2 and replay["orders"] == 1
    assert seq["mfn_mean"] == pytest.approx(145.0 / 3)
    assert seq["mfn_order_std"] == pytest.approx((55.0 - 125.0 / 3) / SQRT2)
    assert math.isnan(replay["mfn_order_std"])  # one order: no order sensitivity
    assert {t.order for t in ordered.trials if t.method == "sequential_lora"} == {0, 1}


def test_order_frame_has_one_row_per_order_and_matrices_align_by_task_name(ordered, tmp_path):
    frame = order_frame(ordered, metric="mfn").set_index(["method", "order"])
    assert frame.loc[("sequential_lora", 1), "tasks"] == " > ".join(ORDER_1)
    assert frame.loc[("sequential_lora", 0), "mfn_mean"] == pytest.approx(55.0)
    assert frame.loc[("sequential_lora", 1), "mfn_mean"] == pytest.approx(125.0 / 3)
    assert frame.loc[("sequential_lora", 1), "mfn_std"] == pytest.approx(10.0 / SQRT2)
    # Columns are aligned by task name: the last row's "count" column averages 20, 40 (order 0: column 0)
    # and 30, 20 (order 1: column 1).
    seq = [t for t in ordered.trials if t.method == "sequential_lora"]
    tasks, mean, _ = mean_matrix(seq)
    assert tasks == TASKS and mean[2][TASKS.index("count")] == pytest.approx((20 + 40 + 30 + 20) / 4)
    fig = plot_order_sensitivity(ordered, metric="mfn")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("sequential_lora (order std 9.4)") for label in labels), labels
    assert save_figure(fig, tmp_path / "orders.png").stat().st_size > 10_000
