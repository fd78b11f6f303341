"""The method registry and interface."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mcl.errors import ConfigError, UnknownNameError
from mcl.methods_api import Method, available_methods, build_method, register_method


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
