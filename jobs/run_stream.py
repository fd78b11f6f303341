"""Run one continual-learning experiment: a method trained through a stream, task after task.

Usage:
    python jobs/run_stream.py                                  # embedded defaults (tiny model, generated stream)
    python jobs/run_stream.py --config my.yaml train.lr=1e-3   # a YAML config plus key=value overrides
    python jobs/run_stream.py --check stream.root=/data/x     # validate config, data and images only
    python jobs/run_stream.py --plan model.name=/ckpt/llava-7b  # print the per-worker memory plan only
    python jobs/run_stream.py --resume tracking.run_name=my-run  # continue an interrupted run
    python jobs/run_stream.py --from-run 3f2c...  tracking.uri=sqlite:///mlflow.db  # re-run a tracked run's config
    ray job submit --working-dir . -- python jobs/run_stream.py method.name=joint

Prints the memory plan per worker (a ``warning:`` line when it will not fit), progress per task, then the
accuracy matrix, the CL metrics and the command that opens MLflow.

--from-run RUN_ID re-runs a tracked run's exact config (its MLflow ``config.yaml``; overrides may only say where
it runs and is recorded) and prints both accuracy matrices and the verdict: exit status 0 when the matrix
matches digit for digit, 1 when it does not, 2 when the run or its config cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
# Run the engine next to this file (e.g. the working dir shipped by `ray job submit`), not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 scaling.zero_stage=3"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only validate the config, names, annotations and images (no Ray, no MLflow run), then exit",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="only print the per-worker memory plan (needs the model's config.json; no Ray, no MLflow run)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run named by tracking.run_name where it stopped (finished tasks are not retrained)",
    )
    parser.add_argument(
        "--from-run",
        metavar="RUN_ID",
        help="re-run this MLflow run's exact config and report whether its accuracy matrix matches",
    )
    args = parser.parse_args(argv)

    import mcl
    from mcl.config import load_config
    from mcl.errors import MclError

    print(f"mcl engine: {Path(mcl.__file__).parent}")
    if args.from_run:
        return from_run(args.from_run, args.overrides)

    try:
        cfg = load_config(args.config, args.overrides)
        if args.plan:
            from mcl.run.memory_plan import plan_config

            return 0 if plan_config(cfg) is not None else 2
        from mcl.run import format_matrix, format_metrics, prepare_run, run_experiment

        prepared = prepare_run(cfg)
    except MclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.resume and not cfg.tracking.run_name:
        print("error: --resume needs tracking.run_name=<the run to continue>", file=sys.stderr)
        return 2
    if args.check:
        print(f"check passed: method {cfg.method.name!r}, model {prepared.model_path}; nothing was trained")
        return 0
    summary = run_experiment(cfg, prepared=prepared, resume=args.resume)
    print("\naccuracy matrix (%), row t = after training task t:")
    print(format_matrix(summary.task_names, summary.matrix))
    if summary.baseline is not None:
        print(
            "untrained baseline: "
            + ", ".join(f"{n} {b:.1f}" for n, b in zip(summary.task_names, summary.baseline, strict=True))
        )
    print("\nCL metrics (percent points): " + format_metrics(summary.metrics))
    print(f"run finished in {summary.wall_s:.0f}s; outputs in {summary.output_dir}")
    from mcl.tracking import experiment_ui_url

    print(
        f"browse it: {experiment_ui_url(summary.tracking_uri, summary.experiment_id)}  (MLflow run {summary.run_id})"
    )
    return 0


def from_run(run_id: str, overrides: list[str]) -> int:
    """``--from-run``: 0 when the re-run's matrix matches the tracked run's, 1 when not, 2 on bad input."""
    from mcl.errors import MclError
    from mcl.run.reproduce import format_reproduction, reproduce_run
    from mcl.tracking import experiment_ui_url

    try:
        rep = reproduce_run(run_id, overrides)
    except MclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + format_reproduction(rep))
    print(f"browse them: {experiment_ui_url(rep.summary.tracking_uri, rep.summary.experiment_id)}")
    return 0 if rep.matches else 1


if __name__ == "__main__":
    sys.exit(main())
