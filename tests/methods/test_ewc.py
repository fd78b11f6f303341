"""EWC's mechanism: the penalty is zero at the anchor and quadratic away from it (also under ZeRO-3, where
the LoRA parameters are partitioned); the Fisher is non-zero and the same with plain torch, ZeRO-2 and
ZeRO-3; the fisher phase leaves the weights bit-identical; Fisher and anchor survive the checkpoint and
accumulate over tasks."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcl.config import ExperimentConfig, load_config
from mcl.data import Preprocessor, collate, rows_to_batch, sample_row
from mcl.errors import ConfigError
from mcl.methods_api import Phase, TaskContext, build_method
from mcl.models import load_model_and_processor
from mcl.run import PreparedRun, phase_config, phase_training_data, prepare_run, run_stream_locally
from mcl.streams import build_stream
from mcl.worker.engine import deepspeed_config, model_inputs
from mcl.worker.job import TaskResult
from mcl.worker.local import run_task_locally
from methods.ewc import ANCHOR_FILE, FISHER_FILE, ewc_penalty

DEFAULT = "jobs/configs/default.yaml"
SMALL_STREAM = {"train_per_task": 32, "test_per_task": 4}
FISHER = Phase("fisher", evaluate=False, optimize=False, epochs=1)
QUIET = lambda _m: None  # noqa: E731


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ewc_stream") / "generated"
    build_stream("generated", root, SMALL_STREAM)
    return root


def _config(root: Path, out: Path, *overrides: str) -> ExperimentConfig:
    return load_config(
        DEFAULT,
        [
            f"stream.root={root}",
            *(f"stream.options.{k}={v}" for k, v in SMALL_STREAM.items()),
            "stream.options.tasks=[aerial,underwater]",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"tracking.output_dir={out}",
            "method.name=ewc",
            "train.epochs=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def plain(small_root: Path, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    """Two tasks (train + fisher phase each) with plain torch."""
    out = tmp_path_factory.mktemp("ewc_plain")
    prep = prepare_run(_config(small_root, out), log=QUIET)
    return prep, run_stream_locally(prep, out, log=QUIET)


def _scaling(cfg: ExperimentConfig, stage: int | None) -> ExperimentConfig:
    if stage is None:
        return cfg
    scaling = dataclasses.replace(
        cfg.scaling, deepspeed=True, zero_stage=stage, zero3_param_persistence_threshold=0
    )
    return dataclasses.replace(cfg, scaling=scaling)


def _run_phase(
    prep: PreparedRun, t: int, phase: Phase, previous: Path, out: Path, stage: int | None, **params: float
) -> TaskResult:
    """One phase of task ``t`` from ``previous`` (plain torch, or DeepSpeed ZeRO ``stage`` with every LoRA
    parameter partitioned under ZeRO-3), with the method's params overridden by ``params``."""
    from mcl.worker.job import TaskJob

    cfg = _scaling(phase_config(prep.config, phase), stage)
    if params:
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, params=params))
    rows = phase_training_data(prep, t, phase, None).rows
    names = prep.stream.task_names
    eval_rows = [sample_row(s) for task in prep.stream.tasks for s in task.test] if phase.evaluate else []
    job = TaskJob(
        cfg.to_dict(),
        prep.model_path,
        t,
        names,
        str(previous),
        steps=len(rows) // cfg.train.batch_size,
        phase=phase.name,
        evaluate=phase.evaluate,
        optimize=phase.optimize,
    )
    return run_task_locally(job, rows, eval_rows, out, log=QUIET)


def _adapter_key(name: str) -> str:
    """The key peft saves a trainable parameter under (no adapter name, no modules_to_save wrapper)."""
    return name.replace(".default", "").replace("modules_to_save.", "")


def test_params_are_validated_naming_the_field():
    assert build_method("ewc").params.gamma == 1.0
    for field, bad in (
        ("ewc_lambda", -1.0),
        ("gamma", 1.5),
        ("fisher_samples", 0),
        ("ewc_lambda", float("nan")),
    ):
        with pytest.raises(ConfigError, match=field):
            build_method("ewc", {field: bad})


def test_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    named = list(layer.named_parameters())
    fisher = {n: torch.rand_like(p) for n, p in named}
    anchor = {n: p.detach().clone() for n, p in named}
    assert ewc_penalty(named, fisher, anchor, 5.0).item() == 0.0
    step = {n: torch.randn_like(p) for n, p in named}
    values = []
    for scale in (1.0, 2.0, 3.0):
        with torch.no_grad():
            for n, p in named:
                p.copy_(anchor[n] + scale * step[n])
        values.append(ewc_penalty(named, fisher, anchor, 5.0))
    expected = 2.5 * sum((fisher[n] * step[n] ** 2).sum() for n in fisher)
    assert values[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert [v.item() / values[0].item() for v in values] == pytest.approx([1.0, 4.0, 9.0], rel=1e-5)
    values[2].backward()  # gradient lambda * F * (theta - theta*)
    for n, p in named:
        torch.testing.assert_close(p.grad, 5.0 * fisher[n] * 3.0 * step[n])


def test_fisher_is_nonzero_and_the_same_under_zero2_and_zero3_and_leaves_weights_untouched(plain, tmp_path):
    prep, run = plain
    trained = run.phase_dirs["0:train"] / "state"
    adapter = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    fishers = {}
    for stage in (None, 2, 3):
        if stage is None:
            out = run.phase_dirs["0:fisher"]
        else:
            result = _run_phase(prep, 0, FISHER, trained, tmp_path / f"zero{stage}", stage)
            assert result.memory["ewc_fisher_numel"] == result.memory["trainable_params"]
            out = tmp_path / f"zero{stage}"
        state = out / "state"
        fishers[stage] = load_file(str(state / FISHER_FILE))
        after = load_file(str(state / "adapter" / "adapter_model.safetensors"))
        assert sorted(after) == sorted(adapter)
        assert all(torch.equal(after[k], adapter[k]) for k in adapter), f"stage {stage} moved the weights"
        anchor = load_file(str(state / ANCHOR_FILE))
        assert sorted(anchor) == sorted(fishers[stage])
        assert all(torch.equal(v, adapter[_adapter_key(k)]) for k, v in anchor.items())
    reference = fishers[None]
    assert len(reference) == 32  # LoRA A/B of 7 modules x 2 layers + the projector's 4 tensors
    assert all((f >= 0).all() for f in reference.values())
    assert sum(f.sum() for f in reference.values()) > 0
    assert all(f.any() for f in reference.values())
    for stage in (2, 3):
        assert sorted(fishers[stage]) == sorted(reference)
        for name, f in reference.items():
            torch.testing.assert_close(
                fishers[stage][name], f, rtol=1e-4, atol=1e-10, msg=f"stage {stage} {name}"
            )


def test_penalty_is_zero_at_the_start_of_task_two_and_grows(plain):
    _, run = plain
    first, second = run.results
    assert all(e["extra_loss"] == 0.0 for e in first.train_log)  # no Fisher yet
    extra = [e["extra_loss"] for e in second.train_log]
    assert extra[0] == 0.0  # task 2 starts at the anchor
    assert all(v > 0.0 for v in extra[1:]), extra
    assert first.memory["ewc_fisher_numel"] == 0.0
    assert second.memory["ewc_fisher_numel"] == second.memory["trainable_params"]


def test_state_round_trip_and_accumulation_over_tasks(plain, tmp_path):
    prep, run = plain
    f0 = load_file(str(run.phase_dirs["0:fisher"] / "state" / FISHER_FILE))
    a0 = load_file(str(run.phase_dirs["0:fisher"] / "state" / ANCHOR_FILE))
    # Task 2's train phase carries task 1's Fisher and anchor unchanged to its fisher phase.
    carried = run.phase_dirs["1:train"] / "state"
    assert all(torch.equal(v, load_file(str(carried / FISHER_FILE))[k]) for k, v in f0.items())
    assert all(torch.equal(v, load_file(str(carried / ANCHOR_FILE))[k]) for k, v in a0.items())
    # A fresh method reloads exactly what was saved.
    method = build_method("ewc")
    base, _ = load_model_and_processor(prep.model_path)
    ctx = TaskContext(1, tuple(prep.stream.task_names), prep.config.model.lora, carried, phase="fisher")
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    assert sorted(method.fisher) == sorted(f0) and all(torch.equal(method.fisher[k], f0[k]) for k in f0)
    assert all(torch.equal(method.anchor[k], a0[k]) for k in a0)
    memory = method.memory_report(model)
    assert memory["ewc_fisher_numel"] == memory["trainable_params"] == sum(v.numel() for v in f0.values())
    assert memory["ewc_fisher_bytes"] == memory["ewc_anchor_bytes"] == 4 * memory["ewc_fisher_numel"]
    # Accumulation: F after task 2 = gamma * F(task 1) + F(task 2); gamma = 0 isolates F(task 2).
    _run_phase(prep, 1, FISHER, carried, tmp_path / "gamma0", None, gamma=0.0)
    f1 = load_file(str(tmp_path / "gamma0" / "state" / FISHER_FILE))
    summed = load_file(str(run.phase_dirs["1:fisher"] / "state" / FISHER_FILE))
    for name in f0:
        torch.testing.assert_close(summed[name], f0[name] + f1[name])
    assert any(not torch.equal(f1[n], f0[n]) for n in f0)


def _ensure_process_group() -> None:
    import torch.distributed as td

    if td.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def test_penalty_value_and_gradient_under_zero3_match_plain_torch(plain, small_root):
    """ZeRO-3 with persistence threshold 0: every LoRA tensor is partitioned (numel 0 outside forward).
    The penalty (plus a zero-weighted task loss, as in training) must give the same value and the same
    whole gradient as without DeepSpeed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _ensure_process_group()
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    prep, run = plain
    previous = run.phase_dirs["0:fisher"] / "state"
    stream = build_stream("generated", small_root, SMALL_STREAM)
    rows = [sample_row(s) for s in stream.tasks[1].train[:2]]
    np_batch = Preprocessor(prep.model_path, train=True)(rows_to_batch(rows))
    fisher = load_file(str(previous / FISHER_FILE))
    strength = 1e3

    def build() -> torch.nn.Module:
        method = build_method("ewc")
        base, processor = load_model_and_processor(prep.model_path)
        ctx = TaskContext(1, tuple(prep.stream.task_names), prep.config.model.lora, previous)
        return method.setup_model(base, ctx), processor

    def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    model, processor = build()
    batch = model_inputs(collate(np_batch, processor.tokenizer.pad_token_id, left_pad=False))
    gen = torch.Generator().manual_seed(0)
    anchor = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in trainable(model)}
    reference = ewc_penalty(trainable(model), fisher, anchor, strength)
    (0.0 * model(**batch).logits.sum() + reference).backward()
    expected = {n: p.grad.clone() for n, p in trainable(model)}
    for n, p in trainable(model):  # the penalty's own gradient: lambda * F * (theta - theta*)
        torch.testing.assert_close(expected[n], strength * fisher[n] * (p.detach() - anchor[n]))
    assert all(g.abs().sum() > 0 for g in expected.values())

    zero_model, _ = build()
    cfg = _scaling(prep.config, 3)
    params = [p for _, p in trainable(zero_model)]
    engine, *_ = deepspeed.initialize(
        model=zero_model,
        optimizer=torch.optim.AdamW(params, lr=0.0),
        config=deepspeed_config(cfg, micro_batch=len(rows)),
    )
    named = trainable(engine.module)
    assert all(p.numel() == 0 for _, p in named), "LoRA parameters are not partitioned"
    outputs = engine(**batch)
    value = ewc_penalty(named, fisher, anchor, strength)
    engine.backward(0.0 * outputs.logits.sum() + value)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    assert value.item() > 0
    for n, p in named:
        torch.testing.assert_close(safe_get_full_grad(p).view(expected[n].shape), expected[n], msg=n)
