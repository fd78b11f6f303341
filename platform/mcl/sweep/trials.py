"""The trials of a sweep: their fixed, ordered expansion, what each needs to run, and its leaderboard record."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from mcl.config import ExperimentConfig, config_from_dict, set_dotted
from mcl.errors import ConfigError, MclError, UnknownNameError
from mcl.sweep.config import MethodEntry, StreamEntry, SweepConfig


@dataclass
class TrialSpec:
    """One trial: a fully resolved experiment config plus what identifies it in the sweep."""

    key: str
    label: str  # method plus its searched values: the leaderboard row (seeds are averaged)
    method: str
    stream: str
    seed: int
    values: dict[str, Any]
    config: dict[str, Any]
    order: int = 0  # index into the sweep's task orders (0: the first, the published order for orders: K)
    task_order: list[str] = field(default_factory=list)  # [] = the stream's published order


def expand_trials(sweep: SweepConfig) -> list[TrialSpec]:
    """Every trial of the sweep, in a fixed order (stream, method, grid point, sample, task order, seed).
    Random spaces are drawn with an RNG seeded by the sweep's name, task orders with one seeded by
    ``order_seed`` and the stream, so a re-run sees the same trials. Trial keys gain ``-o<k>`` only when the
    sweep has more than one order. Each trial's experiment config is validated here, so a bad value fails
    before anything runs."""
    from mcl.config import load_config

    base = load_config(sweep.base).to_dict()
    for dotted, value in sweep.overrides.items():
        set_dotted(base, dotted.split("."), value)
    rng = random.Random(f"mcl-sweep-{sweep.name}")
    trials: list[TrialSpec] = []
    keys: set[str] = set()
    for stream, stream_tag in zip(sweep.streams, _stream_tags(sweep.streams), strict=True):
        orders = stream_orders(sweep, base, stream)
        for method in sweep.methods:
            for values in _search_points(sweep, method, rng):
                label = method.name + "".join(f" {k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in values.items())
                slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", label.replace(" ", "-"))
                for k, order in enumerate(orders):
                    tag = f"-o{k}" if len(orders) > 1 else ""
                    for seed in sweep.seeds:
                        key = f"{slug}-{stream_tag}{tag}-s{seed}"
                        if key in keys:
                            key = f"{key}-{len(trials)}"
                        keys.add(key)
                        tree = _trial_tree(base, method, stream, seed, values)
                        if order:
                            tree["stream"]["task_order"] = list(order)
                        tree["tracking"]["run_name"] = key
                        tree["tracking"]["experiment"] = sweep.tracking.experiment
                        cfg = _validated(tree, key)
                        spec = TrialSpec(key, label, method.name, stream.name, seed, values, cfg.to_dict())
                        spec.order, spec.task_order = k, list(order)
                        trials.append(spec)
    return trials


def stream_orders(sweep: SweepConfig, base: dict[str, Any], stream: StreamEntry) -> list[list[str]]:
    """The task orders of ``stream``'s trials; ``[[]]`` (the base config's order) for ``orders: 1``.

    ``orders: K`` > 1 reads the stream's tasks (its published order first, then K-1 distinct seeded
    permutations); an explicit list is checked against the stream's tasks.
    """
    if sweep.orders == 1:
        return [[]]
    names = _stream_tasks(base, stream)
    if isinstance(sweep.orders, list):
        for i, order in enumerate(sweep.orders):
            if sorted(order) != sorted(names):
                raise ConfigError(
                    f"orders[{i}]: must name every task of stream {stream.name!r} once ({', '.join(names)}); "
                    f"unknown: {sorted(set(order) - set(names))}, missing: {sorted(set(names) - set(order))}"
                )
        return [list(o) for o in sweep.orders]
    if sweep.orders > math.factorial(len(names)):
        raise ConfigError(
            f"orders: {sweep.orders} orders asked, stream {stream.name!r} has only "
            f"{math.factorial(len(names))} orders of its {len(names)} tasks"
        )
    rng = random.Random(f"mcl-orders-{sweep.order_seed}-{stream.name}")
    out = [list(names)]
    while len(out) < sweep.orders:
        order = rng.sample(names, len(names))
        if order not in out:
            out.append(order)
    return out


def _stream_tasks(base: dict[str, Any], stream: StreamEntry) -> list[str]:
    """The published task names of the sweep's ``stream`` (read, and for generated streams generated)."""
    from mcl.streams import build_stream

    root = stream.root or base["stream"]["root"]
    options = stream.options or base["stream"]["options"]
    try:
        return build_stream(stream.name, root, options).task_names
    except MclError as exc:
        raise ConfigError(f"orders: cannot read the tasks of stream {stream.name!r}: {exc}") from None


def trial_resources(trial: TrialSpec) -> dict[str, float]:
    """What one running trial needs: its Ray Train workers plus 1 CPU for the Ray Data tasks that feed them.
    (The trial's own actor only waits on its Train jobs and reserves a sliver of a CPU: with every CPU held by workers
    and trial actors, Ray Data could never run and the trials would hang.)"""
    scaling = trial.config["scaling"]
    return {
        "CPU": scaling["num_workers"] * scaling["cpus_per_worker"] + 1,
        "GPU": scaling["num_workers"] if scaling["use_gpu"] else 0,
    }


def max_concurrent(trials: list[TrialSpec], cluster: dict[str, float]) -> int:
    """How many trials fit the cluster at once (Tune alone would not count the Train workers)."""
    need_cpu = max(trial_resources(t)["CPU"] for t in trials)
    need_gpu = max(trial_resources(t)["GPU"] for t in trials)
    fit = int(cluster.get("CPU", 0) // need_cpu)
    if need_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // need_gpu))
    return max(1, fit)


def trial_record(trial: TrialSpec, done: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard record of a finished trial (``done``: what its trainable recorded when it finished)."""
    return {
        "method": trial.label,
        "stream": trial.stream,
        "seed": trial.seed,
        "order": trial.order,
        "trial": trial.key,
        "run_id": done["run_id"],
        "baseline": done.get("baseline"),  # the untrained model's row: the zero_shot entry
        **done["metrics"],
    }


def _stream_tags(streams: list[StreamEntry]) -> list[str]:
    """The stream part of trial keys: its name, plus its position where two entries share a name."""
    if len(streams) == len({s.name for s in streams}):
        return [s.name for s in streams]
    return [f"{s.name}{i}" for i, s in enumerate(streams)]


def _search_points(sweep: SweepConfig, method: MethodEntry, rng: random.Random) -> list[dict[str, Any]]:
    """The searched values of ``method``'s trials: every grid point, times ``num_samples`` draws of the random
    spaces (in this order, so the RNG is drawn the same way on every expansion)."""
    spaces = {**sweep.search, **{f"method.params.{k}": v for k, v in method.search.items()}}
    grid_keys = [k for k, v in spaces.items() if "grid" in v]
    random_keys = [k for k in spaces if k not in grid_keys]
    grid_points: list[dict[str, Any]] = [{}]
    for k in grid_keys:
        grid_points = [{**p, k: v} for p in grid_points for v in spaces[k]["grid"]]
    return [
        {**point, **{k: _draw(spaces[k], rng) for k in random_keys}}
        for point in grid_points
        for _ in range(sweep.num_samples if random_keys else 1)
    ]


def _draw(spec: dict[str, Any], rng: random.Random) -> Any:
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(values)
    if kind == "uniform":
        return rng.uniform(values[0], values[1])
    return math.exp(rng.uniform(math.log(values[0]), math.log(values[1])))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _trial_tree(
    base: dict[str, Any], method: MethodEntry, stream: StreamEntry, seed: int, values: dict[str, Any]
) -> dict[str, Any]:
    """A copy of the base experiment config with the trial's method, stream, seed and searched values."""
    tree = json.loads(json.dumps(base))
    tree["method"] = {"name": method.name, "params": dict(method.params)}
    tree["stream"]["name"] = stream.name
    if stream.root:
        tree["stream"]["root"] = stream.root
    if stream.options:
        tree["stream"]["options"] = dict(stream.options)
    tree["train"]["seed"] = seed
    for dotted, value in values.items():
        set_dotted(tree, dotted.split("."), value)
    return tree


def _validated(tree: dict[str, Any], key: str) -> ExperimentConfig:
    """The trial's experiment config, its method's name and params and its stream's name checked."""
    from mcl.methods_api import build_method
    from mcl.streams import available_streams

    try:
        cfg = config_from_dict(tree)
        build_method(cfg.method.name, cfg.method.params)  # names and params
        if cfg.stream.name not in available_streams():
            raise UnknownNameError(
                f"stream.name: unknown stream {cfg.stream.name!r}; valid streams: "
                + ", ".join(available_streams())
            )
    except MclError as exc:
        raise ConfigError(f"trial {key}: {exc}") from None
    return cfg
