"""QUAD (methods/quad.py): what the method claims, checked on the driver's rows, on the loss terms of a real
model and on a real (tiny) two-task run without Ray.

* it stores no images: the driver state holds question texts only, and every replayed question is asked
  about an image of the current task;
* the question store holds ``questions_per_task`` questions per finished task, and every global batch of a
  later task holds ``round(replay_ratio * batch)`` unsupervised question rows;
* the question-replay (QR) and attention-distillation (ACD) terms are zero when task 2 starts (student ==
  teacher) and positive once the student has moved; the teacher stays the previous task's adapter;
* the loss is ``(1 - l) * task + l * (QR + ACD)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mcl.config import load_config
from mcl.errors import ConfigError
from mcl.methods_api import (
    DRIVER_STATE_FILE,
    Phase,
    TaskContext,
    TrainingRequest,
    build_method,
    load_driver_state,
)
from methods.quad import TEACHER

TRAIN_PER_TASK = 24
QUIET = lambda _m: None  # noqa: E731


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mcl.streams import build_stream

    root = tmp_path_factory.mktemp("quad_data") / "generated"
    build_stream("generated", root, {"train_per_task": TRAIN_PER_TASK, "test_per_task": 4})
    return root


@pytest.fixture(scope="module")
def tasks(small_root: Path):
    from mcl.streams import build_stream

    return build_stream("generated", small_root, {"train_per_task": TRAIN_PER_TASK, "test_per_task": 4}).tasks


@pytest.fixture(scope="module")
def two_task_run(small_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """QUAD trained through aerial -> underwater (one epoch each), in-process."""
    from mcl.run import prepare_run, run_stream_locally

    out = tmp_path_factory.mktemp("quad_run")
    prep = prepare_run(_config(small_root, out), log=QUIET)
    return prep, run_stream_locally(prep, out / "run", log=QUIET)


def _config(root: Path, out: Path, *overrides: str):
    return load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={root}",
            f"stream.options.train_per_task={TRAIN_PER_TASK}",
            "stream.options.test_per_task=4",
            "stream.options.tasks=[aerial,underwater]",
            "method.name=quad",
            "method.params.questions_per_task=5",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.max_new_tokens=2",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"tracking.output_dir={out}",
            *overrides,
        ],
    )


def _data(method, task_index, tasks, state, *, epochs=1, batch=8):
    return method.training_data(
        TrainingRequest(Phase(), task_index, tasks, state, epochs=epochs, global_batch=batch, seed=task_index)
    )


def _assert_no_images(state: dict, tasks) -> None:
    """No image path (nor any other field of a sample but its question) anywhere in a driver state."""
    text = json.dumps(state)
    for task in tasks:
        for sample in task.train:
            assert sample.image not in text and Path(sample.image).name not in text
            assert sample.id not in text
    assert ".png" not in text and "image" not in text and "pixel" not in text
    assert all(set(q) == {"task", "question"} for q in state["questions"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"replay_ratio": 1.0}, r"replay_ratio must be in \[0, 1\)"),
        ({"distill_weight": 1.5}, r"distill_weight must be in \[0, 1\]"),
        ({"distill_weight": "high"}, r"method\.params\.distill_weight: must be a number, got .high."),
        ({"questions_per_task": -2}, "questions_per_task must be >= 0"),
        ({"questions_per_task": 1.5}, r"method\.params\.questions_per_task: must be an integer, got 1\.5"),
    ],
)
def test_params_are_validated_naming_the_field(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("quad", params)
    assert build_method("quad").params.distill_weight == 0.5  # the paper's lambda


def test_question_store_counts_and_stores_no_images(tasks):
    method = build_method("quad", {"questions_per_task": 5})
    first = _data(method, 0, tasks, None).driver_state
    assert len(first["questions"]) == 5 and {q["task"] for q in first["questions"]} == {"aerial"}
    aerial_questions = {s.question for s in tasks[0].train}
    assert all(q["question"] in aerial_questions for q in first["questions"])
    assert _data(method, 0, tasks, None).driver_state == first  # deterministic
    second = _data(method, 1, tasks, first).driver_state
    counts = {t.name: sum(q["task"] == t.name for q in second["questions"]) for t in tasks[:2]}
    assert counts == {"aerial": 5, "underwater": 5}
    assert second["questions"][:5] == first["questions"]
    _assert_no_images(first, tasks)
    _assert_no_images(second, tasks)


@pytest.mark.parametrize(("batch", "expected"), [(8, 2), (16, 4)])
def test_every_batch_asks_stored_questions_about_current_images(tasks, batch, expected):
    method = build_method("quad", {"questions_per_task": 5})
    state = _data(method, 0, tasks, None, batch=batch).driver_state
    stored = {q["question"] for q in state["questions"]}
    rows = _data(method, 1, tasks, state, epochs=2, batch=batch).rows
    assert len(rows) == 2 * math.ceil(TRAIN_PER_TASK / (batch - expected)) * batch
    current = {s.id: s for s in tasks[1].train}
    current_images = {s.image for s in tasks[1].train}
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        replayed = [r for r in chunk if not r["supervised"]]
        assert len(replayed) == expected
        for row in replayed:
            assert row["image"] in current_images  # a current-task image, never a stored one
            assert row["question"] in stored
        for row in chunk:
            if row["supervised"]:
                sample = current[row["id"]]
                assert (row["image"], row["question"], row["answer"]) == (
                    sample.image,
                    sample.question,
                    sample.answer,
                )
    for epoch in range(2):  # one pass over the current task per epoch
        assert {r["id"] for r in rows if r["epoch"] == epoch and r["supervised"]} == set(current)


def _batch(prep, rows):
    from mcl.data import Preprocessor, collate, rows_to_batch

    pre = Preprocessor(prep.model_path, train=True)
    return collate(pre(rows_to_batch(rows)), pad_id=0, left_pad=False)


def test_qr_and_acd_are_zero_when_task_two_starts_and_positive_later(two_task_run, tasks):
    from mcl.adapters import ADAPTER_DIR, load_lora, using_adapter
    from mcl.models import load_model_and_processor

    prep, run = two_task_run
    state = run.state_dirs[0]
    rows = _data(prep.method, 1, tasks, load_driver_state(state)).rows[:8]
    assert sum(not r["supervised"] for r in rows) == 2
    batch = _batch(prep, rows)
    unsupervised = (batch["labels"] == -100).all(dim=1)
    assert unsupervised.sum() == 2  # the engine leaves the question rows without targets

    method = build_method("quad", {"questions_per_task": 5})
    base, processor = load_model_and_processor(prep.model_path)
    ctx = TaskContext(1, ("aerial", "underwater"), prep.config.model.lora, state, processor=processor)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    model.train()
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(grads_before[n] for n in grads_before if f".{TEACHER}." in n)

    terms = method.distillation_terms(
        model, batch, model(**{k: v for k, v in batch.items() if k != "labels"})
    )
    assert terms["qr"].item() < 1e-6 and terms["acd"].item() < 1e-6  # student == teacher at the start
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert model.training

    # The teacher is the previous task's adapter: its outputs equal a plain load of that adapter.
    reference_base, _ = load_model_and_processor(prep.model_path)
    reference = load_lora(reference_base, state / ADAPTER_DIR, trainable=False).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = reference(**inputs).logits
        with using_adapter(model, TEACHER):
            teacher_logits = model(**inputs).logits
    assert torch.allclose(teacher_logits, expected, atol=1e-5)

    # Move the student: both terms become positive, the teacher does not move.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        outputs = model(**inputs)
        loss = method.distillation_terms(model, batch, outputs)["task"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    terms = method.distillation_terms(model, batch, model(**inputs))
    assert terms["qr"].item() > 1e-4 and terms["acd"].item() > 1e-6, terms
    assert terms["qr"].requires_grad and terms["acd"].requires_grad  # they train the student
    with torch.no_grad(), using_adapter(model, TEACHER):
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)


def test_two_task_run_loss_state_and_memory(two_task_run, tasks):
    prep, run = two_task_run
    first, second = run.results
    assert all("extra_loss" in e for e in second.train_log)
    assert all(e["extra_loss"] == 0.0 for e in first.train_log)  # task 1: plain fine-tuning
    # extra = l * (QR + ACD) - l * task, so extra + l * task = l * (QR + ACD): 0 at the first step of task 2
    # (student == teacher), then positive.
    distill = [e["extra_loss"] + 0.5 * e["loss"] for e in second.train_log]
    assert abs(distill[0]) < 1e-6, distill
    assert all(d > 1e-7 for d in distill[1:]), distill

    for state_dir, tasks_done in zip(run.state_dirs, (1, 2), strict=True):
        saved = json.loads((state_dir / DRIVER_STATE_FILE).read_text())
        assert len(saved["questions"]) == 5 * tasks_done
        _assert_no_images(saved, tasks)
        files = sorted(p.name for p in (state_dir / "adapter").rglob("*"))
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"], files
    assert first.memory["stored_questions"] == 0.0 and first.memory["teacher_params"] == 0.0
    assert second.memory["stored_questions"] == 5.0
    assert second.memory["stored_question_bytes"] == sum(
        len(q["question"].encode()) for q in load_driver_state(run.state_dirs[0])["questions"]
    )
    assert second.memory["teacher_params"] == second.memory["trainable_params"] > 0
