"""LwF's mechanism: no distillation on the first task; at the start of task 2 the student equals the teacher
and the term is exactly 0, it is positive once the student moves; the teacher stays bit-identical while the
student trains; the student's trainable parameters are exactly sequential LoRA's; the teacher forward draws
no random numbers and leaves the model as it found it; ZeRO-3 (partitioned LoRA) gives the plain losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcl.config import ExperimentConfig, load_config
from mcl.data import Preprocessor, collate, rows_to_batch, sample_row
from mcl.errors import ConfigError
from mcl.methods_api import TaskContext, build_method
from mcl.models import load_model_and_processor
from mcl.run import prepare_run, run_stream_locally
from mcl.streams import build_stream
from mcl.worker.engine import build_optimizer
from mcl.worker.job import TaskJob
from mcl.worker.local import run_task_locally
from mcl.worker.losses import per_sample_loss
from methods.lwf import TEACHER, distillation_kl, teacher_logits

DEFAULT = "jobs/configs/default.yaml"
SMALL_STREAM = {"train_per_task": 32, "test_per_task": 4}
QUIET = lambda _m: None  # noqa: E731


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lwf_stream") / "generated"
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
            "method.name=lwf",
            "train.epochs=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def plain(small_root: Path, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("lwf_plain")
    prep = prepare_run(_config(small_root, out), log=QUIET)
    return prep, run_stream_locally(prep, out, log=QUIET)


def _batch(prep, processor, task: int, n: int = 4) -> dict[str, torch.Tensor]:
    rows = [sample_row(s) for s in prep.stream.tasks[task].train[:n]]
    np_batch = Preprocessor(prep.model_path, train=True)(rows_to_batch(rows))
    return collate(np_batch, processor.tokenizer.pad_token_id, left_pad=False)


def _setup(method_name: str, prep, previous: Path, **lora_changes):
    method = build_method(method_name)
    base, processor = load_model_and_processor(prep.model_path)
    lora = dataclasses.replace(prep.config.model.lora, **lora_changes)
    ctx = TaskContext(1, tuple(prep.stream.task_names), lora, previous, seed=prep.config.train.seed)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    return method, model, processor, ctx


def test_params_are_validated_naming_the_field():
    params = build_method("lwf").params
    assert (params.distill_lambda, params.temperature) == (1.0, 2.0)  # the paper's
    for field, bad in (("distill_lambda", -0.5), ("temperature", 0.0), ("temperature", float("inf"))):
        with pytest.raises(ConfigError, match=field):
            build_method("lwf", {field: bad})


def test_distillation_is_zero_at_the_start_of_task_two_and_positive_after(plain):
    _, run = plain
    first, second = run.results
    assert all(e["extra_loss"] == 0.0 for e in first.train_log)  # first task: no teacher
    extra = [e["extra_loss"] for e in second.train_log]
    assert extra[0] == 0.0  # student == teacher, bit for bit
    assert all(v > 0.0 for v in extra[1:]), extra
    assert first.memory["lwf_teacher_params"] == 0.0
    assert second.memory["lwf_teacher_params"] == second.memory["trainable_params"]
    # The state is the student alone: the next task's starting point and teacher.
    state = run.state_dirs[1] / "adapter"
    assert (state / "adapter_model.safetensors").exists() and not (state / TEACHER).exists()


def test_student_trains_like_sequential_lora_while_the_teacher_stays_bit_identical(plain):
    prep, run = plain
    previous = run.state_dirs[0]
    method, model, processor, ctx = _setup("lwf", prep, previous)
    _, sequential, _, _ = _setup("sequential_lora", prep, previous)

    def trainable(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    student, reference = trainable(model), trainable(sequential)
    assert sorted(student) == sorted(reference) and student
    assert all(torch.equal(student[n], reference[n]) for n in student)
    teacher = {n: p.detach().clone() for n, p in model.named_parameters() if f".{TEACHER}." in n}
    assert len(teacher) == len(student) and not any(
        p.requires_grad for n, p in model.named_parameters() if n in teacher
    )

    model.train()
    optimizer, _ = build_optimizer(model, prep.config)
    batch = _batch(prep, processor, 1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    extras = []
    for _ in range(3):
        outputs = model(**inputs)
        extra = method.extra_loss(model, batch, outputs, ctx)
        extras.append(extra.item())
        (per_sample_loss(outputs.logits, batch["labels"]) + extra).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert extras[0] == 0.0 and extras[1] > 0.0 and extras[2] > 0.0, extras
    assert all(torch.equal(p, teacher[n]) for n, p in model.named_parameters() if n in teacher)
    assert any(not torch.equal(p, student[n]) for n, p in model.named_parameters() if n in student)
    # The teacher is the previous task's adapter as saved.
    saved = load_file(str(previous / "adapter" / "adapter_model.safetensors"))
    for name, value in teacher.items():
        key = name.replace(f".{TEACHER}", "").replace("modules_to_save.", "")
        assert torch.equal(value, saved[key]), name


def test_teacher_forward_draws_no_random_numbers_and_restores_the_model(plain):
    prep, run = plain
    method, model, processor, ctx = _setup("lwf", prep, run.state_dirs[0], dropout=0.3)
    with torch.no_grad():  # make the student differ from the teacher
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    model.train()
    batch = _batch(prep, processor, 1)
    active = [(m, getattr(m, "_active_adapter", None)) for m in model.modules()]
    rng = torch.get_rng_state()
    first = teacher_logits(model, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(teacher_logits(model, batch), first)
    assert all(m.training for m in model.modules())
    assert all(getattr(m, "_active_adapter", None) == a for m, a in active)
    student = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert distillation_kl(student, first, batch["labels"], 2.0).item() > 0.0
    # The plain base model with the teacher's adapter gives the same logits (no student leak).
    _, reference, _, _ = _setup("sequential_lora", prep, run.state_dirs[0])
    reference.eval()
    with torch.no_grad():
        expected = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(first, expected, rtol=0, atol=0)


def test_distillation_kl_ignores_unsupervised_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    assert distillation_kl(student, teacher, labels, 2.0).item() == 0.0
    labels[0, 3] = 1  # one supervised token: the logits at position 2 predict it
    kl = distillation_kl(student, teacher, labels, 2.0)
    p = torch.log_softmax(teacher[0, 2] / 2.0, -1)
    q = torch.log_softmax(student[0, 2] / 2.0, -1)
    assert kl.item() == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-6)
    student[1] += 100.0  # an unsupervised sample changes nothing
    assert distillation_kl(student, teacher, labels, 2.0).item() == pytest.approx(kl.item(), rel=1e-6)


def test_zero3_with_partitioned_lora_gives_the_plain_losses(plain, tmp_path):
    prep, run = plain
    cfg = prep.config
    scaling = dataclasses.replace(
        cfg.scaling, deepspeed=True, zero_stage=3, zero3_param_persistence_threshold=0
    )
    cfg = dataclasses.replace(cfg, scaling=scaling)
    rows = _rows(prep, 1)
    job = TaskJob(
        cfg.to_dict(),
        prep.model_path,
        1,
        prep.stream.task_names,
        str(run.state_dirs[0]),
        steps=len(rows) // cfg.train.batch_size,
    )
    eval_rows = [sample_row(s) for t in prep.stream.tasks for s in t.test]
    result = run_task_locally(job, rows, eval_rows, tmp_path, log=QUIET)
    plain_log = run.results[1].train_log
    assert [e["loss"] for e in result.train_log] == pytest.approx([e["loss"] for e in plain_log], rel=1e-4)
    assert [e["extra_loss"] for e in result.train_log] == pytest.approx(
        [e["extra_loss"] for e in plain_log], rel=1e-4, abs=1e-7
    )
    assert result.train_log[0]["extra_loss"] == 0.0
    assert result.memory["lwf_teacher_params"] == run.results[1].memory["lwf_teacher_params"]


def _rows(prep, task: int) -> list[dict]:
    from mcl.run import phase_training_data

    return phase_training_data(prep, task, prep.method.phases(task)[0], None).rows
