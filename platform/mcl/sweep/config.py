"""The sweep YAML: its dataclasses, validation (errors name the field) and the resumability check."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcl.config import apply_overrides, changed_fields, flatten_dotted, read_yaml_file
from mcl.errors import ConfigError

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
EARLY_STOPPING_METRICS = ("maa", "acc_seen", "acc_current")
# Fields added after sweeps were first saved, with the values that meant the same before (an old sweep
# folder saved without them resumes under a config that leaves them at these values).
_ADDED_FIELDS: dict[str, Any] = {"orders": 1, "order_seed": 0}
# Sweep fields that may change between an interrupted sweep and its resumption (where and how it runs).
_RESUMABLE_CHANGES = ("tracking.uri", "ray_address", "max_concurrent_trials")


@dataclass
class MethodEntry:
    """A method of the sweep, its fixed ``params`` and a search space over its params."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    search: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StreamEntry:
    """A stream of the sweep; empty ``root``/``options`` keep the base config's."""

    name: str
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EarlyStopping:
    """ASHA over tasks: trials of one stream are compared on ``metric`` after ``grace_tasks`` tasks."""

    metric: str = "maa"
    grace_tasks: int = 1
    reduction_factor: int = 2


@dataclass
class SweepTracking:
    uri: str = ""
    experiment: str = "mcl-sweeps"


@dataclass
class SweepConfig:
    """A sweep; see :mod:`mcl.sweep` and ``jobs/configs/sweep_default.yaml``."""

    name: str
    base: str
    methods: list[MethodEntry]
    streams: list[StreamEntry]
    seeds: list[int] = field(default_factory=lambda: [0])
    # Task orders: K seeded permutations of each stream's tasks (the first is the published order), or an
    # explicit list of orders (lists of task names), each trained with every seed.
    orders: int | list[list[str]] = 1
    order_seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    search: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent_trials: int = 0
    early_stopping: EarlyStopping | None = None
    storage: str = "mcl_sweeps"
    register_models: bool = True
    tracking: SweepTracking = field(default_factory=SweepTracking)
    ray_address: str = ""

    def flat(self) -> dict[str, Any]:
        return flatten_dotted(asdict(self))

    def folder(self) -> Path:
        """The sweep's folder, ``<storage>/<name>`` (absolute): its state, trial folders and leaderboard."""
        return (Path(self.storage) / self.name).resolve()


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML, apply ``key=value`` overrides (``tracking.uri=http://...``) and validate. A
    relative ``base`` is resolved against the YAML's folder."""
    p = Path(path)
    data = read_yaml_file(p, "sweep")
    data = apply_overrides(_mapping(data, "sweep"), overrides or [])
    if isinstance(data.get("base"), str) and data["base"] and not Path(data["base"]).is_absolute():
        data["base"] = str((p.parent / data["base"]).resolve())
    return sweep_config_from_dict(data)


def sweep_config_from_dict(data: Any) -> SweepConfig:
    """Validate a sweep mapping; errors name the field."""
    data = _mapping(data, "sweep")
    _only(data, tuple(SweepConfig.__dataclass_fields__), "sweep")
    for key in ("name", "base", "methods", "streams"):
        _need(key in data, key, "is required", None)
    name, base = data["name"], data["base"]
    _need(
        isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""),
        "name",
        "must be a non-empty name of letters, digits, '_', '.', '-'",
        name,
    )
    _need(isinstance(base, str) and base, "base", "must be a path to an experiment YAML", base)
    methods = _methods(data)
    streams = _streams(data)
    seeds = _seeds(data.get("seeds", [0]))
    orders = _orders(data.get("orders", 1))
    order_seed = data.get("order_seed", 0)
    _need(
        isinstance(order_seed, int) and not isinstance(order_seed, bool),
        "order_seed",
        "must be an integer",
        order_seed,
    )
    overrides = _mapping(data.get("overrides") or {}, "overrides")
    search = _spaces(_mapping(data.get("search") or {}, "search"), "search")
    num_samples = _int_at_least(data.get("num_samples", 1), 1, "num_samples", "must be an integer >= 1")
    max_concurrent_trials = _int_at_least(
        data.get("max_concurrent_trials", 0), 0, "max_concurrent_trials", "must be an integer >= 0 (0 = auto)"
    )
    early_stopping = _early_stopping(data.get("early_stopping"))
    storage = _storage(data.get("storage", "mcl_sweeps"))
    register = data.get("register_models", True)
    _need(isinstance(register, bool), "register_models", "must be true or false", register)
    tracking = _tracking(_mapping(data.get("tracking") or {}, "tracking"))
    address = data.get("ray_address", "")
    _need(isinstance(address, str), "ray_address", "must be a string", address)
    return SweepConfig(
        name=name,
        base=base,
        methods=methods,
        streams=streams,
        seeds=list(seeds),
        orders=orders,
        order_seed=order_seed,
        overrides=dict(overrides),
        search=search,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials,
        early_stopping=early_stopping,
        storage=storage,
        register_models=register,
        tracking=tracking,
        ray_address=address,
    )


def check_resumable(sweep: SweepConfig, saved: dict[str, Any]) -> None:
    """Raise ConfigError unless ``sweep`` is the sweep whose flat config ``saved`` is, up to where it runs."""
    changed = changed_fields({**_ADDED_FIELDS, **saved}, sweep.flat(), _RESUMABLE_CHANGES)
    if changed:
        diff = "; ".join(changed[:8])
        raise ConfigError(
            f"name: {sweep.folder()} holds sweep {sweep.name!r} with a different config ({diff}); "
            "re-run it with the same config or give the sweep another name"
        )


# ------------------------------------------------------------------------------------------ fields


def _methods(data: dict[str, Any]) -> list[MethodEntry]:
    return [
        MethodEntry(
            item["name"],
            dict(_mapping(item.get("params") or {}, f"{where}.params")),
            _spaces(item.get("search") or {}, f"{where}.search"),
        )
        for where, item in _entries(data, "methods", ("name", "params", "search"), "a method name")
    ]


def _streams(data: dict[str, Any]) -> list[StreamEntry]:
    streams = []
    for where, item in _entries(data, "streams", ("name", "root", "options"), "a stream name"):
        _need(isinstance(item.get("root", ""), str), f"{where}.root", "must be a path", item.get("root"))
        options = _mapping(item.get("options") or {}, f"{where}.options")
        streams.append(StreamEntry(item["name"], item.get("root", ""), dict(options)))
    return streams


def _seeds(seeds: Any) -> list[int]:
    distinct_ints = (
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        and len(set(seeds)) == len(seeds)
    )
    _need(distinct_ints, "seeds", "must be a list of distinct integers", seeds)
    return seeds


def _orders(orders: Any) -> int | list[list[str]]:
    """``orders``: an integer K >= 1, or a non-empty list of distinct orders (lists of distinct task names;
    whether each names every task of its stream is checked when the trials are expanded)."""
    if isinstance(orders, int) and not isinstance(orders, bool):
        return _int_at_least(orders, 1, "orders", "must be an integer >= 1 or a list of task orders")
    rule = "must be an integer >= 1 or a non-empty list of task orders (lists of task names)"
    _need(isinstance(orders, list) and orders, "orders", rule, orders)
    for i, order in enumerate(orders):
        names_ok = isinstance(order, list) and order and all(isinstance(t, str) and t for t in order)
        _need(names_ok, f"orders[{i}]", "must be a non-empty list of task names", order)
        _need(len(set(order)) == len(order), f"orders[{i}]", "names a task more than once", order)
    _need(len({tuple(o) for o in orders}) == len(orders), "orders", "must not repeat an order", orders)
    return [list(o) for o in orders]


def _early_stopping(early: Any) -> EarlyStopping | None:
    if early is None:
        return None
    early = _mapping(early, "early_stopping")
    _only(early, ("metric", "grace_tasks", "reduction_factor"), "early_stopping")
    cfg = EarlyStopping(**early)
    _need(
        cfg.metric in EARLY_STOPPING_METRICS,
        "early_stopping.metric",
        "must be one of " + ", ".join(EARLY_STOPPING_METRICS),
        cfg.metric,
    )
    _int_at_least(cfg.grace_tasks, 1, "early_stopping.grace_tasks", "must be an integer >= 1")
    _int_at_least(cfg.reduction_factor, 2, "early_stopping.reduction_factor", "must be an integer >= 2")
    return cfg


def _storage(storage: Any) -> str:
    _need(isinstance(storage, str) and storage, "storage", "must be a folder", storage)
    _need(
        not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage),
        "storage",
        "must be a folder every node sees at the same path (a shared filesystem: NFS, EFS, Filestore); "
        "object-store URIs (s3://, gs://) are not supported for it yet",
        storage,
    )
    return storage


def _tracking(tracking: dict[str, Any]) -> SweepTracking:
    _only(tracking, ("uri", "experiment"), "tracking")
    cfg = SweepTracking(**tracking)
    _need(
        isinstance(cfg.experiment, str) and cfg.experiment,
        "tracking.experiment",
        "must be a non-empty name",
        cfg.experiment,
    )
    return cfg


# ------------------------------------------------------------------------------------------ checks


def _need(ok: Any, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: {rule}, got {value!r}")


def _int_at_least(value: Any, minimum: int, name: str, rule: str) -> int:
    _need(isinstance(value, int) and value >= minimum, name, rule, value)
    return value


def _mapping(data: Any, name: str) -> dict[str, Any]:
    _need(isinstance(data, dict), name, "must be a mapping", data)
    return data


def _only(data: dict[str, Any], allowed: tuple[str, ...], name: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key; allowed keys here: {', '.join(allowed)}")


def _entries(
    data: dict[str, Any], key: str, allowed: tuple[str, ...], what: str
) -> list[tuple[str, dict[str, Any]]]:
    """The items of list field ``key`` as ``(where, mapping)``; a bare string is ``{"name": it}``."""
    _need(isinstance(data[key], list) and data[key], key, "must be a non-empty list", data[key])
    out = []
    for i, item in enumerate(data[key]):
        where = f"{key}[{i}]"
        item = _mapping({"name": item} if isinstance(item, str) else item, where)
        _only(item, allowed, where)
        _need(isinstance(item.get("name"), str), f"{where}.name", f"must be {what}", item.get("name"))
        out.append((where, item))
    return out


def _spaces(spaces: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    return {key: _check_space(f"{where}.{key}", spec) for key, spec in spaces.items()}


def _check_space(name: str, spec: Any) -> dict[str, Any]:
    _need(
        isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS,
        name,
        "must be one of {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}",
        spec,
    )
    kind, values = next(iter(spec.items()))
    _need(isinstance(values, list) and values, f"{name}.{kind}", "must be a non-empty list", values)
    if kind in ("uniform", "loguniform"):
        ok = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        _need(
            ok and values[0] < values[1], f"{name}.{kind}", "must be [low, high] numbers, low < high", values
        )
        _need(kind == "uniform" or values[0] > 0, f"{name}.{kind}", "needs low > 0", values)
    return {kind: list(values)}
