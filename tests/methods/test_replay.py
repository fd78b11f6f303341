"""Experience replay (methods/replay.py): what the method claims, checked on the driver's rows and on a real
(tiny) two-task run without Ray.

* the buffer holds ``buffer_per_task`` reservoir-sampled training samples of every finished task (a subset of
  that task's samples, deterministic per seed, different across seeds);
* every global batch of a later task holds ``round(replay_ratio * batch)`` buffer rows, and every epoch is
  one pass over the current task's data;
* the buffer travels through the checkpoint (``driver_state.json``): the next task replays the saved buffer,
  not a recomputed one.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from mcl.config import load_config
from mcl.errors import ConfigError
from mcl.methods_api import DRIVER_STATE_FILE, Phase, TrainingRequest, build_method, load_driver_state
from methods.replay import BUFFER_ROW_KEYS, reservoir_sample

TRAIN_PER_TASK = 24


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mcl.streams import build_stream

    root = tmp_path_factory.mktemp("replay_data") / "generated"
    build_stream("generated", root, {"train_per_task": TRAIN_PER_TASK, "test_per_task": 4})
    return root


@pytest.fixture(scope="module")
def tasks(small_root: Path):
    from mcl.streams import build_stream

    return build_stream("generated", small_root, {"train_per_task": TRAIN_PER_TASK, "test_per_task": 4}).tasks


def _config(root: Path, out: Path, *overrides: str):
    return load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={root}",
            f"stream.options.train_per_task={TRAIN_PER_TASK}",
            "stream.options.test_per_task=4",
            "stream.options.tasks=[aerial,underwater]",
            "method.name=replay",
            "method.params.buffer_per_task=5",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.max_new_tokens=2",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"tracking.output_dir={out}",
            *overrides,
        ],
    )


def _data(method, task_index, tasks, state, *, seed=0, epochs=1, batch=8):
    return method.training_data(
        TrainingRequest(
            Phase(), task_index, tasks, state, epochs=epochs, global_batch=batch, seed=seed + task_index
        )
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"replay_ratio": 1.0}, r"replay_ratio must be in \[0, 1\)"),
        ({"replay_ratio": -0.1}, r"replay_ratio must be in \[0, 1\)"),
        ({"replay_ratio": "half"}, r"method\.params\.replay_ratio: must be a number, got .half."),
        ({"buffer_per_task": -1}, "buffer_per_task must be >= 0"),
        ({"buffer_per_task": 2.5}, r"method\.params\.buffer_per_task: must be an integer, got 2\.5"),
    ],
)
def test_params_are_validated_naming_the_field(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("replay", params)
    assert build_method("replay").params.buffer_per_task == 20
    assert build_method("replay").params.replay_ratio == 0.25


def test_reservoir_sample_is_a_uniform_deterministic_subset():
    items = list(range(50))
    picks = [reservoir_sample(items, 10, random.Random(seed)) for seed in range(2000)]
    assert all(len(p) == 10 and len(set(p)) == 10 and set(p) <= set(items) for p in picks)
    assert reservoir_sample(items, 10, random.Random(3)) == picks[3]  # same seed, same sample
    assert len({tuple(sorted(p)) for p in picks[:20]}) == 20  # different seeds, different samples
    counts = [sum(i in p for p in picks) / len(picks) for i in items]
    assert all(abs(c - 10 / 50) < 0.05 for c in counts), counts  # every item equally likely (Algorithm R)
    assert reservoir_sample(items[:3], 10, random.Random(0)) == [0, 1, 2]
    assert reservoir_sample(items, 0, random.Random(0)) == []


def test_buffer_holds_the_configured_count_per_finished_task(tasks):
    method = build_method("replay", {"buffer_per_task": 5})
    first = _data(method, 0, tasks, None)
    buffer = first.driver_state["buffer"]
    train = {s.id: s for s in tasks[0].train}
    assert len(buffer) == 5 and len({r["id"] for r in buffer}) == 5
    for row in buffer:  # a subset of the task's own training samples, stored whole (image by path)
        assert set(row) == set(BUFFER_ROW_KEYS)
        assert row == {k: getattr(train[row["id"]], k) for k in BUFFER_ROW_KEYS}
    assert _data(method, 0, tasks, None).driver_state == first.driver_state  # deterministic per seed
    assert _data(method, 0, tasks, None, seed=1).driver_state != first.driver_state  # seed-dependent
    json.dumps(first.driver_state)  # JSON, as the engine saves it

    second = _data(method, 1, tasks, first.driver_state).driver_state["buffer"]
    assert second[:5] == buffer  # the finished task's samples stay as they were
    assert len(second) == 10 and {r["task"] for r in second[5:]} == {tasks[1].name}
    assert (
        build_method("replay", {"buffer_per_task": 0})
        .training_data(TrainingRequest(Phase(), 0, tasks, None, epochs=1, global_batch=8, seed=0))
        .driver_state["buffer"]
        == []
    )


@pytest.mark.parametrize(("batch", "ratio", "expected"), [(8, 0.25, 2), (16, 0.25, 4), (8, 0.5, 4)])
def test_every_batch_holds_the_configured_replay_rows(tasks, batch, ratio, expected):
    method = build_method("replay", {"buffer_per_task": 5, "replay_ratio": ratio})
    state = _data(method, 0, tasks, None, batch=batch).driver_state
    buffer_ids = {r["id"] for r in state["buffer"]}
    epochs = 2
    rows = _data(method, 1, tasks, state, epochs=epochs, batch=batch).rows
    steps_per_epoch = math.ceil(TRAIN_PER_TASK / (batch - expected))  # the current task's data sets the pace
    assert len(rows) == epochs * steps_per_epoch * batch
    current_ids = {s.id for s in tasks[1].train}
    replayed = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        old = [r for r in chunk if r["task"] == tasks[0].name]
        assert len(old) == expected, chunk
        assert {r["id"] for r in old} <= buffer_ids and len({r["id"] for r in old}) == len(old)
        assert all(r["id"] in current_ids for r in chunk if r not in old)
        assert all(r["supervised"] is True for r in chunk)
        assert len({r["epoch"] for r in chunk}) == 1
        replayed += [r["id"] for r in old]
    for epoch in range(epochs):  # one pass over the current task per epoch
        seen = {r["id"] for r in rows if r["epoch"] == epoch and r["task"] == tasks[1].name}
        assert seen == current_ids
    assert set(replayed) == buffer_ids  # the whole buffer gets replayed, not one fixed pair
    assert _data(method, 1, tasks, state, epochs=epochs, batch=batch).rows == rows  # deterministic

    plain = build_method("replay", {"buffer_per_task": 5, "replay_ratio": 0.0})
    rows = _data(plain, 1, tasks, state, batch=batch).rows
    assert all(r["task"] == tasks[1].name for r in rows)


def test_the_buffer_survives_the_checkpoint_round_trip(small_root, tmp_path):
    from mcl.run import phase_training_data, prepare_run, run_stream_locally

    quiet = lambda _m: None  # noqa: E731
    prep = prepare_run(_config(small_root, tmp_path), log=quiet)
    first = run_stream_locally(prep, tmp_path / "run", tasks=1, log=quiet)
    saved_path = first.state_dirs[0] / DRIVER_STATE_FILE
    saved = json.loads(saved_path.read_text())
    expected = phase_training_data(prep, 0, Phase(), None).driver_state
    assert saved == expected and len(saved["buffer"]) == 5
    assert first.results[0].memory["buffer_rows"] == 0.0  # nothing replayed in the first task

    # Keep two rows in the checkpoint: the next task must replay exactly those (read back, not recomputed).
    kept = saved["buffer"][:2]
    saved_path.write_text(json.dumps({**saved, "buffer": kept}))
    rows = phase_training_data(prep, 1, Phase(), load_driver_state(first.state_dirs[0])).rows
    replayed = [r for r in rows if r["task"] == "aerial"]
    assert replayed and {r["id"] for r in replayed} == {r["id"] for r in kept}

    second = run_stream_locally(
        prep, tmp_path / "run", tasks=2, log=quiet, start_state=first.state_dirs[0], start_task=1
    )
    memory = second.results[0].memory
    assert memory["buffer_rows"] == 2.0 and memory["buffer_json_bytes"] > 0
    assert memory["buffer_image_bytes"] == sum(Path(r["image"]).stat().st_size for r in kept)
    after = load_driver_state(second.state_dirs[0])
    assert after["buffer"][:2] == kept and len(after["buffer"]) == 7
    assert {r["task"] for r in after["buffer"][2:]} == {"underwater"}
    assert all(0.0 <= v <= 100.0 for v in second.matrix[0])
