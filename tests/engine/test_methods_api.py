"""The method registry and interface."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from mcl.errors import ConfigError, UnknownNameError
from mcl.methods_api import (
    Method,
    available_methods,
    build_method,
    check_param_types,
    param_help,
    register_method,
)


def test_builtin_methods_are_registered():
    assert {"sequential_lora", "joint"} <= set(available_methods())


def test_training_tasks_hook():
    assert build_method("sequential_lora").training_tasks(2) == [2]
    assert build_method("joint").training_tasks(2) == [0, 1, 2]


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="valid methods: .*joint.*sequential_lora"):
        build_method("nope")


def test_unknown_param_names_the_field():
    with pytest.raises(ConfigError, match=r"method.params.rank: unknown parameter of method 'joint'"):
        build_method("joint", {"rank": 3})


def test_params_are_validated_by_the_methods_dataclass():
    @dataclass
    class Params:
        strength: float = 1.0

        def __post_init__(self):
            if self.strength < 0:
                raise ValueError(f"strength must be >= 0, got {self.strength}")

    @register_method
    class _Strong(Method):
        name = "test-methods-api-strong"

    _Strong.Params = Params
    assert build_method("test-methods-api-strong", {"strength": 2.0}).params.strength == 2.0
    with pytest.raises(ConfigError, match="strength must be >= 0"):
        build_method("test-methods-api-strong", {"strength": -1.0})


def test_duplicate_names_are_refused():
    class Other(Method):
        name = "sequential_lora"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)


def test_params_types_are_checked_from_the_annotations_naming_the_field():
    @dataclass
    class Params:
        count: int = field(default=1, metadata={"help": "How many."})
        weight: float = field(default=0.5, metadata={"help": "How much."})
        rate: float | None = field(default=None, metadata={"help": "Optional rate."})
        names: list[str] | None = field(default=None, metadata={"help": "Some names."})
        flag: bool = field(default=True, metadata={"help": "On or off."})

    @register_method
    class _Typed(Method):
        name = "test-methods-api-typed"

    _Typed.Params = Params
    ok = build_method(
        "test-methods-api-typed", {"count": 2, "weight": 1, "rate": 0.1, "names": ["a"], "flag": False}
    )
    assert (ok.params.count, ok.params.weight, ok.params.names) == (2, 1, ["a"])
    for key, bad, expected in [
        ("count", 1.5, "an integer"),
        ("count", True, "an integer"),
        ("weight", "heavy", "a number"),
        ("weight", False, "a number"),
        ("rate", "x", "a number or null"),
        ("names", "a", "a list of strings or null"),
        ("names", ["a", 1], "a list of strings or null"),
        ("flag", 1, "true or false"),
    ]:
        with pytest.raises(ConfigError, match=rf"^method\.params\.{key}: must be {expected}, got "):
            build_method("test-methods-api-typed", {key: bad})
    assert param_help(Params)["rate"] == "Optional rate."


def test_every_method_param_has_help_text_and_a_checkable_type():
    for name in available_methods():
        method = build_method(name)
        if not type(method).__module__.startswith("methods."):
            continue  # a helper some test registered
        params = method.params
        for f in dataclasses.fields(params):
            assert f.metadata.get("help"), f"{name}: method.params.{f.name} has no help text"
        check_param_types(type(params), dataclasses.asdict(params))  # the defaults pass their own check


def test_training_request_is_one_frozen_argument():
    from mcl.methods_api import Phase, TrainingRequest

    tasks = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    request = TrainingRequest(Phase(), 1, tasks, None, epochs=1, global_batch=8, seed=3)
    assert request.task.name == "b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.seed = 4


def test_task_context_stage_defaults_to_trained_and_is_checked():
    from mcl.config import LoraConfig
    from mcl.methods_api import TaskContext

    ctx = TaskContext(0, ("a",), LoraConfig())
    assert ctx.stage == "trained"
    assert dataclasses.replace(ctx, stage="baseline").stage == "baseline"
    with pytest.raises(ValueError, match="stage must be one of baseline, trained"):
        TaskContext(0, ("a",), LoraConfig(), stage="before")
