"""Sweep continual-learning methods x streams x seeds x hyper-parameters with Ray Tune, tracked in MLflow.

Usage:
    python jobs/sweep.py                                        # the default sweep (tiny model, generated stream)
    python jobs/sweep.py --config my_sweep.yaml seeds=[0,1,2]   # a sweep YAML plus key=value overrides
    python jobs/sweep.py --check --config my_sweep.yaml         # validate and list the trials, run nothing
    python jobs/sweep.py --leaderboard --stream generated       # compare every sweep of a stream in MLflow
    ray job submit --working-dir . -- python jobs/sweep.py --config clusters/sweep_llava7b.yaml \\
        tracking.uri=http://<head>:5000

Re-running the same command resumes the sweep: finished trials are not run again, an interrupted trial
continues from its last finished task, and MLflow keeps one run per trial and per task. Prints live progress
(trials, each running trial's task, ETA), then the leaderboard (MFN, MAA, BWT, FWT, mean ± std over seeds),
which is also saved as leaderboard.md/.csv/.png in the sweep folder and on the sweep's MLflow run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SWEEP = Path(__file__).resolve().parent / "configs" / "sweep_default.yaml"
# Run the engine next to this file (e.g. the working dir shipped by `ray job submit`), not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_SWEEP), help="sweep YAML (default: %(default)s)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides of the sweep YAML, e.g. tracking.uri=http://h:5000"
    )
    parser.add_argument("--check", action="store_true", help="validate the sweep and list its trials only")
    parser.add_argument(
        "--leaderboard",
        action="store_true",
        help="print the leaderboard across all sweeps of --stream recorded in MLflow, then exit",
    )
    parser.add_argument("--stream", default="generated", help="stream for --leaderboard")
    args = parser.parse_args(argv)

    import mcl
    from mcl.errors import MclError
    from mcl.sweep import expand_trials, load_sweep_config, run_sweep

    print(f"mcl engine: {Path(mcl.__file__).parent}", flush=True)
    try:
        sweep = load_sweep_config(args.config, args.overrides)
        if args.leaderboard:
            return _print_cross_sweep(sweep, args.stream)
        trials = expand_trials(sweep)
    except MclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"sweep {sweep.name!r}: {len(trials)} trials")
        for t in trials:
            print(f"  {t.key}" + (f"  (tasks {', '.join(t.task_order)})" if t.task_order else ""))
        return 0
    summary = run_sweep(sweep)
    print("\nleaderboard (percent points, mean ± std over seeds and task orders):")
    print(summary.leaderboard_md)
    print(f"\nsweep finished in {summary.wall_s:.0f}s; outputs in {summary.sweep_dir}")
    from mlflow import MlflowClient

    from mcl.tracking import experiment_ui_url

    exp_id = MlflowClient(summary.tracking_uri).get_run(summary.run_id).info.experiment_id
    print(
        f"browse it: {experiment_ui_url(summary.tracking_uri, exp_id)}  (MLflow sweep run {summary.run_id})"
    )
    if summary.failed:
        print(
            f"{len(summary.failed)} trials did not finish: {', '.join(summary.failed)}; re-run to resume them"
        )
        return 1
    return 0


def _print_cross_sweep(sweep, stream: str) -> int:
    from mcl.analysis import leaderboard_across_sweeps
    from mcl.tracking import resolve_tracking_uri

    frame = leaderboard_across_sweeps(
        resolve_tracking_uri(sweep.tracking.uri), stream, experiment=sweep.tracking.experiment
    )
    print(frame.to_string(index=False) if len(frame) else f"no finished sweeps of stream {stream!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
