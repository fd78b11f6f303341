"""The interface every continual-learning method implements, and the registry of methods by name.

The engine runs a fixed loop per task (set up the model, train on the task's batches, evaluate every task,
save state) and calls a method's hooks at named points. A method overrides only the hooks it needs and gets
what a hook needs as arguments (:class:`TaskContext`, :class:`TrainingRequest`), never by reaching into the
trainer. Methods import only the engine's public API (this module, :mod:`mcl.adapters`, :mod:`mcl.data`,
:mod:`mcl.worker.losses`; ``tests/test_layout.py`` checks it); the engine never imports a specific method.

A task is trained in one or more *phases* (:meth:`Method.phases`; e.g. MR-LoRA trains its expert, then its
router). Each phase is one training pass (in the run's ``TorchTrainer`` worker group) that starts from the
state the previous phase or task saved. Driver-side hooks (:meth:`Method.phases`, :meth:`Method.training_tasks`,
:meth:`Method.training_data`) choose the data; worker-side hooks run on every Ray Train worker (rank 0 alone
saves).

A method's ``Params`` is a dataclass whose fields carry a default and help text
(``field(default=..., metadata={"help": "..."})``, as peft's configs do); :func:`build_method` checks every
field's type against its annotation (:func:`check_param_types`), so ``__post_init__`` keeps only the value
rules (ranges, choices).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mcl.adapters import full_numel
from mcl.config import LoraConfig
from mcl.errors import ConfigError, UnknownNameError
from mcl.run.rundir import DRIVER_STATE_FILE, read_driver_state
from mcl.streams.registry import TaskData
from mcl.worker.losses import StepShare

if TYPE_CHECKING:
    import torch

STAGES = ("baseline", "trained")


@dataclass(frozen=True)
class TaskContext:
    """What a method's hooks may know about the task being trained.

    Attributes:
        task_index: Position of the current task in the stream (0-based).
        task_names: All task names of the stream, in order.
        lora: The experiment's LoRA shape.
        previous_state_dir: Folder where the method saved its state after the previous task (None first).
        rank: This worker's rank; world_size: number of workers.
        seed: The experiment seed.
        processor: The model's processor (tokenizer + image processor), for methods that build prompts
            (e.g. a router) or tokenise stored questions.
        phase: The name of the phase being trained (:attr:`Phase.name`).
        stage: ``"baseline"`` while the engine evaluates the untrained model (before the first task's
            training, the baseline row for forward transfer); ``"trained"`` otherwise (training, and the
            evaluation after it).
        step: During a training step, the step's totals for writing loss terms as means over the whole
            global batch however it is split into micro-batches and workers
            (:class:`mcl.worker.losses.StepShare`); None outside training steps.
    """

    task_index: int
    task_names: tuple[str, ...]
    lora: LoraConfig
    previous_state_dir: Path | None = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    processor: Any = field(default=None, compare=False, repr=False)
    phase: str = "train"
    stage: Literal["baseline", "trained"] = "trained"
    step: StepShare | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"TaskContext.stage must be one of {', '.join(STAGES)}, got {self.stage!r}")

    @property
    def task_name(self) -> str:
        return self.task_names[self.task_index]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


@dataclass(frozen=True)
class Phase:
    """One training job within a task.

    Attributes:
        name: Names the phase in logs, metrics (``<name>_loss`` unless ``train``) and checkpoint folders.
        evaluate: Evaluate all tasks at the end of this phase; exactly one phase of a task does.
        optimize: Take optimiser steps. A phase with ``optimize=False`` only runs forward and backward and
            hands the gradients to :meth:`Method.on_gradients` (e.g. EWC's Fisher), the weights stay as
            they are.
        epochs: Epochs of this phase (default: ``train.epochs``).
        lr: Learning rate of this phase (default: ``train.lr``).
    """

    name: str = "train"
    evaluate: bool = True
    optimize: bool = True
    epochs: int | None = None
    lr: float | None = None


@dataclass(frozen=True)
class TrainingRequest:
    """What the driver asks :meth:`Method.training_data` for: the rows of one phase of one task.

    Attributes:
        phase: The phase to train (:meth:`Method.phases`).
        task_index: Position of the task in the stream (0-based).
        tasks: Every task of the stream (its training and test samples), in order.
        driver_state: What the previous phase's :class:`TrainingData` left (None at the start of the stream).
        epochs: Epochs of this phase (the phase's own, else ``train.epochs``).
        global_batch: Rows per optimiser step over all workers (``train.batch_size``); the rows returned must
            be a positive multiple of it.
        seed: The seed of this task's data order (already differs per task: ``train.seed + task_index``).
    """

    phase: Phase
    task_index: int
    tasks: Sequence[TaskData]
    driver_state: dict[str, Any] | None
    epochs: int
    global_batch: int
    seed: int

    @property
    def task(self) -> TaskData:
        """The task being trained."""
        return self.tasks[self.task_index]


@dataclass
class TrainingData:
    """What one phase trains on, chosen in the driver.

    Attributes:
        rows: The global order of training rows over all epochs (see :func:`mcl.data.training_order`); the
            engine shards it over the workers and cuts it into global batches.
        driver_state: JSON-serialisable state the driver side of the method keeps across tasks (e.g. a
            replay buffer of sample rows). Rank 0 saves it with the phase's state (``driver_state.json``)
            and the next phase's :meth:`Method.training_data` gets it back; None keeps the previous one.
    """

    rows: list[dict[str, Any]]
    driver_state: dict[str, Any] | None = None


def load_driver_state(state_dir: str | Path | None) -> dict[str, Any] | None:
    """The driver state saved in a phase's state folder, if any."""
    return read_driver_state(state_dir)


@dataclass
class NoParams:
    """A method without hyper-parameters."""


class Method:
    """Base class: every hook has a do-nothing default except :meth:`setup_model`.

    Subclasses set ``name`` and optionally ``Params`` (a dataclass: typed fields with help text, value rules
    in ``__post_init__``), and register themselves with :func:`register_method`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any) -> None:
        self.params = params

    # -- driver side ---------------------------------------------------------------------------------
    def phases(self, task_index: int) -> list[Phase]:
        """The training phases of task ``task_index``, in order (default: one phase that evaluates)."""
        return [Phase()]

    def training_tasks(self, task_index: int) -> list[int]:
        """Indices of the tasks whose training data the default :meth:`training_data` uses."""
        return [task_index]

    def training_data(self, request: TrainingRequest) -> TrainingData:
        """The rows phase ``request.phase`` of task ``request.task_index`` trains on. Default: every training
        sample of :meth:`training_tasks`, shuffled per epoch."""
        from mcl.data import training_order
        from mcl.streams.store import ChainedSamples

        samples = ChainedSamples([request.tasks[i].train for i in self.training_tasks(request.task_index)])
        return TrainingData(
            training_order(
                samples, epochs=request.epochs, global_batch=request.global_batch, seed=request.seed
            )
        )

    # -- worker side -----------------------------------------------------------------------------------
    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        """Wrap the freshly loaded base model for this task (add adapters, load previous state)."""
        raise NotImplementedError

    def load_for_evaluation(
        self, model: torch.nn.Module, state_dir: Path, ctx: TaskContext
    ) -> torch.nn.Module:
        """The freshly loaded base model with the state this method saved in ``state_dir`` (after the phase
        ``ctx.phase`` of task ``ctx.task_index``), ready to answer through :meth:`generate`: what an evaluation
        actor (``eval.backend: ray_data``) serves. Default: the path a phase takes when it continues from a
        saved state, :meth:`setup_model` with ``previous_state_dir=state_dir``. Override where that path adds
        something new for training (a fresh adapter, a router) instead of loading what was saved."""
        return self.setup_model(model, dataclasses.replace(ctx, previous_state_dir=Path(state_dir)))

    def before_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """Called once after :meth:`setup_model` and before the optimiser (and DeepSpeed engine) is built,
        so parameters it freezes or unfreezes are what the optimiser sees."""

    def learning_rates(self, ctx: TaskContext) -> dict[str, float]:
        """Parameter groups with their own learning rate: ``{regex over parameter names: lr}``, the first
        match winning (before ``train.projector_lr``'s projector group); the rest train at the phase's
        learning rate. Default: none."""
        return {}

    def step_counts(self, batch: dict[str, torch.Tensor], ctx: TaskContext) -> dict[str, float]:
        """Named counts of one collated micro-batch (from its inputs and labels only) that :meth:`extra_loss`
        averages over; the engine sums them over the whole optimiser step into ``ctx.step.totals`` before
        the step's first forward (beside its own ``rows`` and ``supervised``). Default: none."""
        return {}

    def extra_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        """An extra loss term added to the task loss of one micro-batch (e.g. a regulariser), or None.

        The engine averages each micro-batch's loss over the step's micro-batches and workers, so a term
        that does not depend on the batch (a penalty on the weights) is returned as it is, and a mean over
        this micro-batch's rows becomes the mean over the step's when every micro-batch has as many of
        them. For an exact mean over the step whatever the split (rows of a kind, tokens), return
        ``ctx.step.mean(sum over this micro-batch, name)`` with ``name`` a count of :meth:`step_counts`.
        """
        return None

    def on_gradients(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        full_grad: Callable[[torch.nn.Parameter], torch.Tensor | None],
        ctx: TaskContext,
    ) -> None:
        """Called after each optimiser step's last backward pass (``batch``: its last micro-batch) and
        before the update, on every rank, when :meth:`wants_gradients` says so. ``full_grad(p)`` is the
        whole gradient of parameter ``p`` averaged over the global batch (``ctx.step.totals["rows"]``
        rows), also under ZeRO-2/3 where ``p.grad`` is None and gradients are partitioned. Under ZeRO it is a collective: call it for the same parameters in the same order on
        every rank."""

    def wants_gradients(self, ctx: TaskContext) -> bool:
        """Whether :meth:`on_gradients` should run in this phase."""
        return False

    def step_state(self, ctx: TaskContext) -> dict[str, Any] | None:
        """What the method accumulates across the steps of a phase outside its parameters and the optimizer
        (e.g. sums of squared gradients), saved with every step checkpoint (``train.checkpoint_every_steps``)
        and given back to :meth:`load_step_state` when the phase resumes from one. Tensors and plain Python
        values; this rank's own. Tensors come back on the CPU: move them to the device where they are used.
        Default: nothing."""
        return None

    def load_step_state(self, state: dict[str, Any], ctx: TaskContext) -> None:
        """Put back what :meth:`step_state` returned when the checkpoint was saved."""

    def after_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """Called once after the last training step of each phase, before evaluation and saving."""

    def generate(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        generate_kwargs: dict[str, Any],
        ctx: TaskContext,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, list[Any]]]:
        """Greedy answers for an evaluation batch: the generated token ids after the prompt.

        A method may also return per-sample extras (``{"expert": [...]}``, one value per sample), which
        are stored with each prediction and handed to :meth:`eval_metrics`.

        Under ZeRO-3 every forward pass is collective: every rank must make the same number of
        ``generate``/forward calls per batch (route a mixed batch in one call, e.g. with peft's
        ``adapter_names``, rather than one call per expert)."""
        out = model.generate(**batch, **generate_kwargs)
        return out[:, batch["input_ids"].shape[1] :]

    def eval_metrics(self, records: list[dict[str, Any]], ctx: TaskContext) -> dict[str, float]:
        """Method-specific metrics from the scored predictions of all ranks (rank 0 only), e.g. router
        accuracy. Logged with the task's metrics."""
        return {}

    def state_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Parameters :meth:`save_state` reads; the engine gathers them first under ZeRO-3. Default: the
        trainable ones plus every adapter parameter (frozen experts and saved modules included)."""
        return [
            p
            for name, p in model.named_parameters()
            if p.requires_grad or "lora_" in name or "modules_to_save" in name
        ]

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        """Write what the next task (and a later reload) needs into ``out_dir``. Called on rank 0 only,
        with :meth:`state_parameters` gathered (safe under ZeRO-3); it must not run forward passes or
        collectives (the other ranks are not calling it)."""

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        """Extra memory the method holds (e.g. ``{"trainable_params": n}``), logged per task."""
        trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
        return {"trainable_params": float(trainable)}

    @classmethod
    def has_extra_loss(cls) -> bool:
        return cls.extra_loss is not Method.extra_loss


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator registering a method under ``cls.name``; names must be unique."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {_METHODS[cls.name].__qualname__}")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__qualname__}.Params must be a dataclass")
    _METHODS[cls.name] = cls
    return cls


METHOD_MODULES_ENV = "MCL_METHOD_MODULES"


def _discover_methods() -> None:
    """Import every module of the ``methods`` package (each registers itself), and the modules named in
    ``$MCL_METHOD_MODULES`` (comma-separated: methods kept outside ``methods/``; ship them to Ray workers
    with the runtime env's ``py_modules`` and set the variable in its ``env_vars``)."""
    for name in filter(None, os.environ.get(METHOD_MODULES_ENV, "").split(",")):
        importlib.import_module(name.strip())
    try:
        package = importlib.import_module("methods")
    except ImportError:
        return
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"methods.{info.name}")


def available_methods() -> list[str]:
    _discover_methods()
    return sorted(_METHODS)


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method, validating ``params`` against its ``Params`` dataclass."""
    _discover_methods()
    if name not in _METHODS:
        raise UnknownNameError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_METHODS))}")
    cls = _METHODS[name]
    allowed = {f.name for f in dataclasses.fields(cls.Params)}
    for key in params or {}:
        if key not in allowed:
            raise ConfigError(
                f"method.params.{key}: unknown parameter of method {name!r}; "
                f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
            )
    check_param_types(cls.Params, params or {})
    try:
        parsed = cls.Params(**(params or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method.params: {exc}") from None
    return cls(parsed)


def check_param_types(params_class: type, values: dict[str, Any]) -> None:
    """Check every value of ``values`` against the annotation of its field in the ``params_class`` dataclass.

    Annotations may combine ``bool``, ``int``, ``float``, ``str``, ``None``, ``list[...]``, ``tuple[...]``,
    ``dict[str, ...]`` and ``Literal[...]`` with ``|``; an int is accepted for a float, a bool never for a
    number. Raises ConfigError naming ``method.params.<field>``, the expected type and the value given.
    """
    hints = typing.get_type_hints(params_class)
    for f in dataclasses.fields(params_class):
        if f.name in values and f.name in hints and not _matches(values[f.name], hints[f.name]):
            raise ConfigError(
                f"method.params.{f.name}: must be {_type_name(hints[f.name])}, got {values[f.name]!r}"
            )


def _matches(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    raise TypeError(f"method params: unsupported annotation {annotation!r}")


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is None or annotation is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if annotation is float:
        return "a number"
    if annotation is int:
        return "an integer"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if origin in (list, Sequence, tuple):
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def param_help(params_class: type) -> dict[str, str]:
    """The help text of every field of a ``Params`` dataclass (``metadata["help"]``; empty where none)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(params_class)}


def params_dict(method: Method) -> dict[str, Any]:
    return dataclasses.asdict(method.params)


__all__ = [
    "DRIVER_STATE_FILE",
    "STAGES",
    "ConfigError",
    "LoraConfig",
    "Method",
    "NoParams",
    "Phase",
    "TaskContext",
    "TaskData",
    "TrainingData",
    "TrainingRequest",
    "available_methods",
    "build_method",
    "check_param_types",
    "load_driver_state",
    "param_help",
    "params_dict",
    "register_method",
]
