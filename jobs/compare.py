"""Compare continual-learning methods on one stream: same model, budget and seeds for every method.

Usage:
    python jobs/compare.py                                   # every registered method, seeds 0 1 2
    python jobs/compare.py --methods sequential_lora,mr_lora --seeds 0,1,2 scaling.num_workers=1
    python jobs/compare.py --out comparison/ --config my.yaml train.epochs=3
    python jobs/compare.py --local                           # in-process: no Ray, no MLflow (quick look)

Each (method, seed) is one stream run (``jobs/run_stream.py`` with ``method.name`` and ``train.seed`` set),
tracked in MLflow under the experiment ``tracking.experiment``; runs are named ``<prefix>-<method>-s<seed>``
and resumed when the command is re-run (finished runs are read back, not trained again). At the end it
prints and writes a leaderboard (mean ± std over seeds of MFT, MFN, MAA, BWT, FWT and forgetting) as
``leaderboard.md`` and ``leaderboard.csv``, plus every run's accuracy matrix in ``runs.json``.

``--local`` runs each stream in this process through the same per-task function and method hooks
(``mcl.run.run_stream_locally``: one worker, plain PyTorch, no Ray, no MLflow); it skips the minutes of
per-task Ray start-up, which is what makes a many-seed comparison practical on a laptop CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="base experiment YAML (default: %(default)s)"
    )
    parser.add_argument(
        "--methods", default="", help="comma-separated method names (default: all registered)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument(
        "--out", default="comparison", help="folder for the leaderboard (default: %(default)s)"
    )
    parser.add_argument("--prefix", default="compare", help="run-name prefix; re-use it to resume")
    parser.add_argument(
        "--local", action="store_true", help="run in-process (1 worker, no DeepSpeed, no Ray, no MLflow)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = parser.parse_args(argv)

    from mcl.config import apply_overrides, config_from_dict, load_config
    from mcl.errors import MclError
    from mcl.evaluation.leaderboard import leaderboard, to_csv_rows, to_markdown, zero_shot_records
    from mcl.methods_api import available_methods
    from mcl.run import format_matrix, format_metrics, prepare_run, run_experiment

    try:
        overrides = list(args.overrides)
        if args.local:
            overrides += ["scaling.num_workers=1", "scaling.deepspeed=false"]
        base = load_config(args.config, overrides)
        methods = [m for m in args.methods.split(",") if m] or available_methods()
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise MclError(f"--seeds: {args.seeds!r} is not a comma-separated list of integers") from None
        unknown = sorted(set(methods) - set(available_methods()))
        if unknown:
            raise MclError(f"unknown methods {unknown}; valid: {', '.join(available_methods())}")
        if not seeds:
            raise MclError("--seeds: give at least one seed")
        plans = []
        for method in methods:
            for seed in seeds:
                cfg = config_from_dict(
                    apply_overrides(
                        base.to_dict(),
                        [
                            f"method.name={method}",
                            f"train.seed={seed}",
                            f"tracking.run_name={args.prefix}-{method}-s{seed}",
                        ],
                    )
                )
                plans.append((method, seed, cfg))
        prepare_run(plans[0][2])  # names, model and data checked before anything runs
    except MclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    records = []
    t0 = time.perf_counter()
    for i, (method, seed, cfg) in enumerate(plans):
        elapsed = time.perf_counter() - t0
        eta = f", ETA {elapsed / i * (len(plans) - i) / 60:.0f} min" if i else ""
        print(f"\n##### run {i + 1}/{len(plans)}: {method}, seed {seed}{eta}", flush=True)
        if args.local:
            names, matrix, metrics, run_id, baseline = _run_local(
                cfg, Path(args.out) / "local" / cfg.tracking.run_name
            )
        else:
            summary = run_experiment(cfg, resume=True)
            names, matrix, metrics, run_id, baseline = (
                summary.task_names,
                summary.matrix,
                summary.metrics,
                summary.run_id,
                summary.baseline,
            )
        print(format_matrix(names, matrix))
        print(format_metrics(metrics))
        records.append(
            {
                "method": method,
                "stream": cfg.stream.name,
                "seed": seed,
                "run_id": run_id,
                "tasks": names,
                "matrix": matrix,
                "baseline": baseline,
                **metrics,
            }
        )

    entries = leaderboard([*records, *zero_shot_records(records)])  # with the untrained model's row
    table = to_markdown(entries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(table + "\n")
    with (out / "leaderboard.csv").open("w", newline="") as f:
        rows = to_csv_rows(entries)
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "runs.json").write_text(json.dumps(records, indent=1))
    print(f"\n{len(plans)} runs in {(time.perf_counter() - t0) / 60:.1f} min; leaderboard (percent points):")
    print(table)
    print(f"written to {out}/leaderboard.md, leaderboard.csv and runs.json")
    return 0


def _run_local(
    cfg, out: Path
) -> tuple[list[str], list[list[float]], dict[str, float], str, list[float] | None]:
    """One stream run in this process; a finished one (``result.json`` in ``out``) is read back."""
    from mcl.evaluation.metrics import cl_metrics
    from mcl.run import prepare_run, run_stream_locally

    done = out / "result.json"
    if done.exists():
        data = json.loads(done.read_text())
        return data["tasks"], data["matrix"], data["metrics"], "", data.get("baseline")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    prep = prepare_run(cfg, log=lambda _m: None)
    result = run_stream_locally(prep, out, log=lambda _m: None)
    metrics = cl_metrics(result.matrix, result.baseline)
    names = prep.stream.task_names
    record = {"tasks": names, "matrix": result.matrix, "baseline": result.baseline, "metrics": metrics}
    done.write_text(json.dumps(record))
    return names, result.matrix, metrics, "", result.baseline


if __name__ == "__main__":
    sys.exit(main())
