"""The experiment schema: model, stream, method, train, eval, scaling, tracking.

Configs come from YAML plus ``key=value`` overrides (``train.lr=1e-3``). Unknown keys, wrong types and
impossible values raise :class:`ConfigError` naming the field and what is allowed, before any work starts.
Method hyper-parameters (``method.params``) are validated by the method's own config dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mcl.errors import ConfigError


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 / JSON floats without a dot (``1e-3``), which YAML 1.1 reads as
    strings: ``train.lr=1e-3`` must be a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


@dataclass
class LoraConfig:
    """LoRA adapter shape. ``target_modules`` is a regex over module names; empty means the model family's
    default, the language model's attention and MLP projections (see ``mcl.models.MODEL_FAMILIES``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = ""
    train_projector: bool = True

    def __post_init__(self) -> None:
        _check(self.r >= 1, "model.lora.r", "must be >= 1", self.r)
        _check(self.alpha >= 1, "model.lora.alpha", "must be >= 1", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)", self.dropout)


@dataclass
class ModelConfig:
    """Which model to load: a built-in name (``tiny-llava``, ``tiny-qwen2.5-vl``, ``tiny-internvl``), a local
    folder or a hub id.

    ``attn_implementation`` is the attention kernel transformers runs (``flash_attention_2`` needs the
    ``flash-attn`` package and a GPU). A method that needs the language model's attention weights (QUAD)
    switches its language model to ``eager`` through the model-family table whatever this says.
    """

    name: str = "tiny-llava"
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ProbeConfig:
    """An evaluation-only task (a general-capability probe, see :mod:`mcl.streams.probes`): the test split of
    task ``task`` of the registered stream ``stream`` (read from ``root`` with ``options``, which may name an
    export), or the MLLM-CL test file ``file`` (images relative to ``image_root``, default its folder).
    ``max_samples``: its first that many samples (0 = ``eval.max_samples_per_task``)."""

    name: str = ""
    stream: str = ""
    task: str = ""
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    file: str = ""
    image_root: str = ""
    answer_type: str = "exact"
    max_samples: int = 0


def _check_probes(probes: list[ProbeConfig]) -> None:
    seen: set[str] = set()
    for i, probe in enumerate(probes):
        where = f"stream.probes[{i}]"
        _check(isinstance(probe, ProbeConfig), where, "must be a mapping of ProbeConfig fields", probe)
        _check(
            re.fullmatch(r"[A-Za-z0-9_.-]+", probe.name) is not None,
            f"{where}.name",
            "must be a non-empty name of letters, digits, '_', '.' or '-'",
            probe.name,
        )
        _check(probe.name not in seen, f"{where}.name", "must be unique among stream.probes", probe.name)
        seen.add(probe.name)
        _check(
            bool(probe.stream) != bool(probe.file),
            f"{where}.stream",
            "give exactly one of 'stream' (with 'task') or 'file'",
            probe.stream,
        )
        _check(not probe.stream or bool(probe.task), f"{where}.task", "names the stream's task", probe.task)
        _check(probe.max_samples >= 0, f"{where}.max_samples", "must be >= 0", probe.max_samples)


@dataclass
class StreamConfig:
    """Which stream to run, where its data lives and its stream-specific options.

    ``check_images``: every image must exist and decode before anything trains. ``skip_bad_samples``: leave
    out the samples a data check finds bad (see ``mcl.streams.check``) instead of stopping; the run records
    how many in MLflow (``data_skipped_*``). ``task_order``: the order to train the stream's tasks in, every
    task named once (empty = the stream's published order; checked against the stream in ``prepare_run``).
    ``manifest``: a data manifest (``jobs/prepare_data.py --manifest``) the data under ``root`` must match,
    file by file, before anything trains ("" = no check).
    """

    name: str = "generated"
    root: str = ".mcl_cache/data/generated"
    options: dict[str, Any] = field(default_factory=dict)
    check_images: bool = True
    skip_bad_samples: bool = False
    probes: list[ProbeConfig] = field(default_factory=list)
    task_order: list[str] = field(default_factory=list)
    manifest: str = ""

    def __post_init__(self) -> None:
        _check_probes(self.probes)
        order = self.task_order
        _check(
            isinstance(order, list) and all(isinstance(t, str) and t for t in order),
            "stream.task_order",
            "must be a list of task names (empty = the stream's order)",
            order,
        )
        repeated = sorted({t for t in order if order.count(t) > 1})
        _check(
            not repeated, "stream.task_order", f"names tasks more than once ({', '.join(repeated)})", order
        )


@dataclass
class MethodConfig:
    """The continual-learning method and its hyper-parameters (validated by the method's own dataclass)."""

    name: str = "sequential_lora"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Per-task optimisation.

    Batches: ``batch_size`` is the global batch of one optimiser step. Each worker runs it as micro-batches of
    ``micro_batch_size`` rows and accumulates their gradients (0 = one micro-batch of ``batch_size /
    scaling.num_workers`` rows, no accumulation); the result equals one step on the whole batch.
    ``group_by_length`` orders each epoch in mega-batches sorted by token length (image tokens included), as
    LLaVA's ``group_by_modality_length`` does, so micro-batches pad less.

    Learning rates: ``lr`` for the trainable parameters; ``projector_lr`` > 0 gives the multimodal projector
    its own (LLaVA's ``mm_projector_lr``). ``lr_schedule`` after the warm-up (``warmup_steps``, or
    ``warmup_ratio`` of the phase's steps): ``constant``, ``linear`` or ``cosine`` decay to 0.

    ``gradient_checkpointing`` recomputes the language model's activations in the backward pass (non-reentrant):
    activation memory falls to about one layer's, for about a third more compute.

    ``checkpoint_every_steps`` > 0 makes the Ray Train workers save a step checkpoint every that many optimiser
    steps (trainable state, optimizer and scheduler state, RNG states), keeping the last ``keep_checkpoints``;
    a restarted worker group, or a resumed run, continues the phase from the last one instead of from the
    phase's start. ``checkpoint_storage`` is where they go: empty = the run folder, else a folder or URI Ray
    Train's storage layer reads (``/shared/ckpt``, ``file:///...``, ``s3://bucket/path``, ``gs://...``).
    """

    epochs: int = 3
    batch_size: int = 16
    micro_batch_size: int = 0
    lr: float = 2e-3
    projector_lr: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    seed: int = 0
    log_every: int = 5
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    checkpoint_storage: str = ""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _check(
            self.micro_batch_size >= 0,
            "train.micro_batch_size",
            "must be >= 0 (0 = batch_size / scaling.num_workers)",
            self.micro_batch_size,
        )
        _check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _check(self.projector_lr >= 0, "train.projector_lr", "must be >= 0 (0 = train.lr)", self.projector_lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _check(
            not (self.warmup_steps and self.warmup_ratio),
            "train.warmup_ratio",
            f"give warmup_steps ({self.warmup_steps}) or warmup_ratio, not both",
            self.warmup_ratio,
        )
        _check(
            self.max_grad_norm >= 0,
            "train.max_grad_norm",
            "must be >= 0 (0 disables clipping)",
            self.max_grad_norm,
        )
        _check(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)
        _check(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            "must be >= 0 (0 = no step checkpoints)",
            self.checkpoint_every_steps,
        )
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1", self.keep_checkpoints)

    def warmup_for(self, steps: int) -> int:
        """Warm-up steps of a phase of ``steps`` optimiser steps (``warmup_ratio`` rounds up, as transformers'
        ``get_warmup_steps`` does)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * steps)


EVAL_BACKENDS = ("workers", "ray_data")


@dataclass
class EvalConfig:
    """Greedy evaluation after every task on the test sets of the tasks ``tasks`` names: ``all`` (seen and
    unseen), or ``seen_and_next`` (what the CL metrics read, see :mod:`mcl.evaluation.policy`).

    ``backend``: ``workers`` evaluates inside the Ray Train worker group; ``ray_data`` on a Ray Data actor pool
    of ``num_actors`` actors with ``resources_per_actor`` each (Ray resource names: ``CPU``, ``GPU``, custom),
    each loading the phase's saved state, while the next phase trains (:mod:`mcl.evaluation.actor_pool`).

    ``sort_by_length``: evaluate rows in batches of similar prompt length (image tokens included), longest
    first; predictions are returned in the test sets' order. ``max_new_tokens_by_type`` (answer type -> tokens)
    and ``stop_strings_by_type`` (answer type -> strings) stop generation per scorer: a batch groups rows of one
    answer type where it can, each row stops at its type's limit or at the first of its type's stop strings,
    and its prediction is cut there. Types not named use ``max_new_tokens`` and no stop strings.
    """

    batch_size: int = 32
    max_new_tokens: int = 8
    max_samples_per_task: int = 0
    tasks: Literal["all", "seen_and_next"] = "all"
    backend: Literal["workers", "ray_data"] = "workers"
    num_actors: int = 1
    resources_per_actor: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    sort_by_length: bool = False
    max_new_tokens_by_type: dict[str, int] = field(default_factory=dict)
    stop_strings_by_type: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.backend in EVAL_BACKENDS, "eval.backend", "must be one of workers, ray_data", self.backend
        )
        _check(self.num_actors >= 1, "eval.num_actors", "must be >= 1", self.num_actors)
        _check(
            isinstance(self.resources_per_actor, dict)
            and all(
                isinstance(k, str) and _is_number(v) and v >= 0 for k, v in self.resources_per_actor.items()
            ),
            "eval.resources_per_actor",
            "must map resource names to amounts >= 0 (e.g. {CPU: 1})",
            self.resources_per_actor,
        )
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", self.max_new_tokens)
        for kind, tokens in self.max_new_tokens_by_type.items():
            _check(
                _is_integer(tokens) and tokens >= 1,
                f"eval.max_new_tokens_by_type.{kind}",
                "must be an integer >= 1",
                tokens,
            )
        for kind, stops in self.stop_strings_by_type.items():
            _check(
                isinstance(stops, list) and all(isinstance(s, str) and s for s in stops),
                f"eval.stop_strings_by_type.{kind}",
                "must be a list of non-empty strings",
                stops,
            )
        _check(
            self.max_samples_per_task >= 0,
            "eval.max_samples_per_task",
            "must be >= 0 (0 = all)",
            self.max_samples_per_task,
        )


@dataclass
class ScalingConfig:
    """How each task's training job is spread: Ray Train workers and DeepSpeed ZeRO.

    ``offload`` moves ZeRO state to CPU memory: ``optimizer`` the optimizer states (ZeRO-1/2/3, DeepSpeed's
    CPU Adam steps them), ``optimizer_and_params`` also the parameters (ZeRO-3 only).

    ``device_memory_gb``: the memory (GiB) of one worker's device that the memory plan (``mcl.run.memory_plan``)
    compares its estimate with; 0 = detect it (the GPU the driver sees; host RAM per worker for CPU runs).
    """

    num_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    deepspeed: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    zero3_param_persistence_threshold: int = 100000
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    ray_address: str = ""
    ray_num_cpus: int = 0
    max_failures: int = 0
    device_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", "must be >= 1", self.num_workers)
        _check(self.cpus_per_worker >= 1, "scaling.cpus_per_worker", "must be >= 1", self.cpus_per_worker)
        _check(
            self.ray_num_cpus >= 0,
            "scaling.ray_num_cpus",
            "must be >= 0 (0 = enough for the workers)",
            self.ray_num_cpus,
        )
        _check(self.max_failures >= -1, "scaling.max_failures", "must be >= -1", self.max_failures)
        _check(
            self.device_memory_gb >= 0,
            "scaling.device_memory_gb",
            "must be >= 0 (0 = detect)",
            self.device_memory_gb,
        )
        _check(
            self.offload == "none" or (self.deepspeed and self.zero_stage >= 1),
            "scaling.offload",
            "needs DeepSpeed ZeRO (scaling.deepspeed true, scaling.zero_stage >= 1)",
            self.offload,
        )
        _check(
            self.offload != "optimizer_and_params" or self.zero_stage == 3,
            "scaling.offload",
            f"optimizer_and_params needs scaling.zero_stage 3 (is {self.zero_stage}); use 'optimizer'",
            self.offload,
        )


@dataclass
class TrackingConfig:
    """MLflow tracking. ``uri`` empty means ``$MLFLOW_TRACKING_URI``, else a sqlite file in the working dir."""

    experiment: str = "mcl"
    uri: str = ""
    run_name: str = ""
    output_dir: str = "mcl_runs"
    heatmap: bool = True


@dataclass
class ExperimentConfig:
    """One continual-learning run: a method trained through a stream, task after task."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        per_worker, rest = divmod(self.train.batch_size, self.scaling.num_workers)
        _check(
            rest == 0 and per_worker >= 1,
            "train.batch_size",
            f"must be a positive multiple of scaling.num_workers ({self.scaling.num_workers})",
            self.train.batch_size,
        )
        micro = self.train.micro_batch_size
        _check(
            micro == 0 or per_worker % micro == 0,
            "train.micro_batch_size",
            f"must divide the rows per worker, train.batch_size / scaling.num_workers = {per_worker}",
            micro,
        )

    @property
    def micro_batch(self) -> int:
        """Rows of one micro-batch on one worker."""
        return self.train.micro_batch_size or self.train.batch_size // self.scaling.num_workers

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step on each worker."""
        return self.train.batch_size // (self.scaling.num_workers * self.micro_batch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.key`` view, for MLflow params."""
        return flatten_dotted(self.to_dict())


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: {rule}, got {value!r}")


def flatten_dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one flat mapping with dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_dotted(value, f"{name}."))
        else:
            out[name] = value
    return out


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


# Plain types: (what the error says a value must be, the check, the conversion).
_SCALARS: dict[Any, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    float: ("a number", _is_number, float),
    int: ("an integer", _is_integer, int),
    bool: ("true or false", lambda v: isinstance(v, bool), bool),
    str: ("a string", lambda v: isinstance(v, str), str),
    dict: ("a mapping", lambda v: isinstance(v, dict), dict),
    list: ("a list", lambda v: isinstance(v, list), list),
}


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a type hint, allowing int -> float; raise ConfigError naming ``name``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping of {_field_names(hint)}, got {value!r}")
        return _build(hint, value, name)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(f"{name}: must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        return _coerce_union(value, hint, name)
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{name}: must be null, got {value!r}")
        return None
    plain = origin if origin in (dict, list) else hint
    item = typing.get_args(hint)[0] if origin is list and typing.get_args(hint) else None
    if plain is list and dataclasses.is_dataclass(item) and isinstance(value, list):
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if plain in _SCALARS:
        what, ok, convert = _SCALARS[plain]
        if not ok(value):
            raise ConfigError(f"{name}: must be {what}, got {value!r}")
        return convert(value)
    return value


def _coerce_union(value: Any, hint: Any, name: str) -> Any:
    for option in typing.get_args(hint):
        try:
            return _coerce(value, option, name)
        except ConfigError:
            continue
    raise ConfigError(f"{name}: has the wrong type, got {value!r}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{name}: unknown key; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a nested dict into an :class:`ExperimentConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"config: must be a mapping of sections {_field_names(ExperimentConfig)}, got {data!r}"
        )
    return _build(ExperimentConfig, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key=value`` overrides applied (creating nested mappings)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(out, path, value)
    return out


def set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[a][b]...[z] = value`` for ``path`` ``[a, b, ..., z]``, creating nested mappings."""
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def read_yaml_file(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file (``{}`` when empty); ConfigError naming the file when missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {str(p)!r} does not exist")
    try:
        return _load_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} file {str(p)!r} is not valid YAML: {exc}") from None


def changed_fields(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two flat configs, as ``key: old -> new`` (sorted)."""
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in ignore)
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = read_yaml_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML; it loads back to an equal config."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return p
