"""mcl.logs: each filter silences one known line where it is raised, and nothing else."""

from __future__ import annotations

import importlib
import logging
import warnings

import pytest

from mcl import logs


@pytest.fixture
def fresh_warnings():
    """Every warning recorded, as in a fresh process (no filters from earlier tests)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        yield caught


def _peft_wrap(tiny_model_path: str) -> None:
    from peft import LoraConfig, get_peft_model

    from mcl.models import load_model_and_processor

    model, _ = load_model_and_processor(tiny_model_path, dtype="float32")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))


def _torch_all_gather(store) -> None:
    import torch
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        out = torch.zeros(2)
        td.all_gather_into_tensor(out, torch.ones(2))  # what DeepSpeed's ZeRO calls
    finally:
        td.destroy_process_group()


def _messages(caught) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_peft_wrapping_raises_the_deprecation_warning_and_the_filter_silences_it(
    tiny_model_path: str, fresh_warnings
) -> None:
    _peft_wrap(tiny_model_path)
    assert any("is_gradient_checkpointing" in m for m in _messages(fresh_warnings)), (
        "peft no longer reads the deprecated attribute: drop its filter from mcl.logs.KNOWN_WARNINGS"
    )
    fresh_warnings.clear()
    logs.quiet_known_warnings()
    _peft_wrap(tiny_model_path)
    assert not any("is_gradient_checkpointing" in m for m in _messages(fresh_warnings))


def test_torch_all_gather_raises_the_deprecation_warning_and_the_filter_silences_it(
    tmp_path, fresh_warnings
) -> None:
    _torch_all_gather(tmp_path / "store")
    assert any("all_gather_into_tensor" in m for m in _messages(fresh_warnings)), (
        "torch no longer warns: drop its filter from mcl.logs.KNOWN_WARNINGS"
    )
    fresh_warnings.clear()
    logs.quiet_known_warnings()
    _torch_all_gather(tmp_path / "store-again")
    assert not any("all_gather_into_tensor" in m for m in _messages(fresh_warnings))


def test_other_warnings_still_show(fresh_warnings) -> None:
    logs.quiet_known_warnings()
    warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    warnings.warn("`is_gradient_checkpointing` is deprecated", DeprecationWarning, stacklevel=1)
    assert len(fresh_warnings) == 2


def test_the_training_entry_points_install_the_filters() -> None:
    """Where the warnings are raised: the per-task function (Ray workers and local runs) and the Ray
    Train worker loop."""
    import inspect

    from mcl.worker import ray_loop, recipe

    assert "quiet_known_warnings()" in inspect.getsource(recipe.train_and_evaluate_task)
    assert "quiet_ray_worker_logs()" in inspect.getsource(ray_loop.train_phases)


@pytest.mark.parametrize(
    ("module", "attribute", "name"),
    [
        ("ray.data._internal.progress", "logger", logs.RAY_DATA_PROGRESS_LOGGER),
        ("ray._private.runtime_env.packaging", "default_logger", logs.RAY_PACKAGING_LOGGER),
        ("ray._private.authentication.authentication_token_setup", "logger", logs.RAY_AUTH_LOGGER),
    ],
)
def test_the_quieted_loggers_are_the_ones_ray_logs_those_lines_with(
    module: str, attribute: str, name: str
) -> None:
    assert getattr(importlib.import_module(module), attribute).name == name


def test_worker_logs_hide_ray_data_progress_notice_but_not_warnings() -> None:
    logs.quiet_ray_worker_logs()
    progress = logging.getLogger(logs.RAY_DATA_PROGRESS_LOGGER)
    assert not progress.isEnabledFor(logging.WARNING) and progress.isEnabledFor(logging.ERROR)
    for name in logs.RAY_WORKER_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)


def test_driver_logs_drop_the_token_auth_notice_only() -> None:
    from ray._private.authentication import authentication_token_setup as auth

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    auth.logger.addHandler(handler)
    try:
        logs.quiet_ray_driver_logs()
        logs.quiet_ray_driver_logs()  # idempotent: one filter
        auth._warn_token_auth_enabled()  # what ray.init logs on every new local instance
        auth._warn_token_auth_disabled()  # a real warning: still shown
    finally:
        auth.logger.removeHandler(handler)
    assert len(records) == 1 and records[0].startswith("Token authentication is disabled")
    assert sum(isinstance(f, logs._DropMessage) for f in auth.logger.filters) == 1
    assert not logging.getLogger(logs.RAY_PACKAGING_LOGGER).isEnabledFor(logging.INFO)
