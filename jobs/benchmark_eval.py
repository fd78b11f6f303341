"""Evaluation throughput: in-worker evaluation under ZeRO-3 against the Ray Data actor pool, in one run of this job.

Usage:
    python jobs/benchmark_eval.py                                     # default stream, 2 workers, 2 actors
    python jobs/benchmark_eval.py --out eval.json eval.max_samples_per_task=40 eval.num_actors=1

The same config is run twice through Ray (``mcl.run.run_experiment``), on one local Ray instance:

  workers   ``eval.backend=workers``: every task's test samples answered inside the Train worker group,
            DeepSpeed ZeRO-3 with every parameter partitioned (each generated token is a collective forward).
  ray_data  ``eval.backend=ray_data``: the same samples answered by ``eval.num_actors`` Ray Data actors that
            load each phase's saved state (the workers do not evaluate).

Samples/s of a backend = evaluated samples / evaluation seconds, summed over the tasks' evaluating phases
(the workers' timed evaluation; the pool's actor start-up, model loading and answers; neither counts the
untrained model's baseline row). Both runs must give the same accuracy matrix (``matrix_equal``); each run's
wall time is printed too (the pool overlaps the next phase's training where the cluster has room).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "default.yaml"
# Both runs: 2 Train workers under ZeRO-3, every parameter partitioned.
SETTINGS = (
    "scaling.num_workers=2",
    "scaling.deepspeed=true",
    "scaling.zero_stage=3",
    "scaling.zero3_param_persistence_threshold=0",
)


def _ensure_paths() -> None:
    for path in (REPO / "platform", REPO):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _rate(results: Sequence[Any]) -> dict[str, float]:
    samples = sum(r.timing["eval_samples"] for r in results)
    seconds = sum(r.timing["eval_s"] for r in results)
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0}


def run_backends(
    overrides: Sequence[str], *, config: str | Path, root: Path, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``config`` (+ ``overrides``) with each evaluation backend under ``root``: their figures and their
    run summaries (``mcl.run.RunSummary``), by backend. Uses the Ray instance this process is connected to,
    if any (else each run starts a local one)."""
    from mcl.config import load_config
    from mcl.run import run_experiment

    figures: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    for backend in ("workers", "ray_data"):
        cfg = load_config(
            str(config),
            [
                *SETTINGS,
                *overrides,
                f"eval.backend={backend}",
                f"tracking.uri=sqlite:///{root}/mlflow.db",
                f"tracking.output_dir={root}/runs",
                f"tracking.run_name=bench-eval-{backend}",
            ],
        )
        t0 = time.perf_counter()
        summary = run_experiment(cfg, log=lambda _m: None)
        figures[backend] = {**_rate(summary.task_results), "run_wall_s": time.perf_counter() - t0}
        summaries[backend] = summary
        log(
            f"{backend:>8}: {figures[backend]['samples']:.0f} samples in {figures[backend]['seconds']:.1f}s "
            f"= {figures[backend]['samples_per_s']:.2f} samples/s (run {figures[backend]['run_wall_s']:.1f}s)"
        )
    workers, pool = figures["workers"], figures["ray_data"]
    figures["ratio_pool_vs_workers"] = pool["samples_per_s"] / workers["samples_per_s"]
    figures["matrix_equal"] = summaries["workers"].matrix == summaries["ray_data"].matrix
    figures["matrix"] = summaries["workers"].matrix
    figures["settings"] = {"overrides": [*SETTINGS, *overrides], "num_actors": cfg.eval.num_actors}
    log(
        f"ray_data / workers samples/s: {figures['ratio_pool_vs_workers']:.2f}; matrix equal: {figures['matrix_equal']}"
    )
    return figures, summaries


def eval_benchmark(
    overrides: Sequence[str] = (),
    *,
    config: str | Path = DEFAULT_CONFIG,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``config`` (+ ``overrides``) with each evaluation backend and return their figures."""
    _ensure_paths()
    import ray

    with tempfile.TemporaryDirectory(prefix="mcl-bench-eval-") as tmp:
        figures, _ = run_backends(overrides, config=config, root=Path(out_dir or tmp), log=log)
        ray.shutdown()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    figures = eval_benchmark(args.overrides, config=args.config)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0 if figures["matrix_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
