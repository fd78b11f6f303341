"""Sweeps: methods x streams x seeds x hyper-parameters, one Ray Tune trial per combination.

A sweep YAML (:func:`load_sweep_config`) names a base experiment config, the methods and streams to cross,
the seeds and the search spaces. :func:`expand_trials` turns it into a fixed, ordered list of trials
(random spaces are drawn with a seeded RNG, so a re-run sees the same trials). :func:`run_sweep` runs the
trials that are not finished yet as a Ray Tune experiment: every trial is a function trainable that runs
its stream with :func:`mcl.run.run_experiment` (one Ray Train job per trial, its tasks and phases in
turn) and reports after every task. Concurrency is bounded from the cluster's resources, since Tune does not
count the Train workers a trial starts. FIFO by default; an early-stopping scheduler only when asked, and then
one Tune experiment per stream so trials of different streams are never compared.

MLflow: a sweep run, a nested run per trial, a nested run per task. Re-running the same sweep resumes it:
finished trials are not launched again, an interrupted trial continues from its last finished task, and
the sweep continues in its original MLflow run. A trial's results are read from its run folder through
:class:`mcl.run.rundir.RunDir` only.

Modules:
    config      the sweep YAML: dataclasses, validation, the resumability check
    trials      trial expansion (grid points, drawn samples, seeds), resources per trial, leaderboard records
    trainable   the Tune function trainable (:func:`~mcl.sweep.trainable.run_trial`) and its reports to Tune
    progress    live progress on the console (a Tune callback)
    driver      :func:`run_sweep`: the sweep's MLflow run, the Tune experiments, the leaderboard
"""

from mcl.sweep.config import (
    EarlyStopping,
    MethodEntry,
    StreamEntry,
    SweepConfig,
    SweepTracking,
    load_sweep_config,
    sweep_config_from_dict,
)
from mcl.sweep.driver import SweepSummary, run_sweep
from mcl.sweep.trainable import EARLY_STOPPED_TAG
from mcl.sweep.trials import TrialSpec, expand_trials, max_concurrent, trial_record, trial_resources

__all__ = [
    "EARLY_STOPPED_TAG",
    "EarlyStopping",
    "MethodEntry",
    "StreamEntry",
    "SweepConfig",
    "SweepSummary",
    "SweepTracking",
    "TrialSpec",
    "expand_trials",
    "load_sweep_config",
    "max_concurrent",
    "run_sweep",
    "sweep_config_from_dict",
    "trial_record",
    "trial_resources",
]
