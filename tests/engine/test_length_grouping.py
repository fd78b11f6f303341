"""Length-grouped batches (``train.group_by_length``): the pure regrouping of a global order and the token
lengths it sorts by, checked against the real Preprocessor of each tiny model family."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mcl.data import (
    Preprocessor,
    RowOrder,
    group_by_length,
    mixed_training_order,
    rows_to_batch,
    sample_row,
    shard,
    training_order,
)
from mcl.lengths import LengthCounter, order_lengths
from mcl.streams.samples import Sample

G = 16  # global batch


def _samples(n: int) -> list[Sample]:
    return [Sample(f"s{i}", f"/img/{i}.png", f"q{i}", f"a{i}", task="t") for i in range(n)]


def _plain(n: int = 500, epochs: int = 3, seed: int = 0) -> tuple[RowOrder, np.ndarray]:
    """A method's plain order and the length of each position (row lengths from a wide distribution)."""
    order = training_order(_samples(n), epochs=epochs, global_batch=G, seed=seed)
    row_lengths = np.random.default_rng(1).lognormal(4.0, 0.8, n).astype(np.int32) + 20
    return order, row_lengths[order.index]


def _ids(order: RowOrder) -> list[tuple[str, int]]:
    return [(row["id"], row["epoch"]) for row in order]


def _batch_sets(order: RowOrder, size: int = G) -> list[Counter]:
    ids = _ids(order)
    return [Counter(ids[i : i + size]) for i in range(0, len(ids), size)]


def _padding_fraction(lengths: np.ndarray, workers: int, micro: int) -> float:
    """Padded tokens / all tokens over the micro-batches the engine cuts (each rank's shard of a global batch
    in consecutive runs of ``micro``, padded to the longest)."""
    padded = total = 0
    for start in range(0, len(lengths), G):
        batch = lengths[start : start + G]
        for rank in range(workers):
            mine = np.asarray(shard(list(batch), rank, workers))
            for m in range(0, len(mine), micro):
                chunk = mine[m : m + micro]
                padded += int(chunk.max()) * len(chunk) - int(chunk.sum())
                total += int(chunk.max()) * len(chunk)
    return padded / total


def _regrouped(order: RowOrder, lengths: np.ndarray, **kw) -> tuple[RowOrder, np.ndarray]:
    """The grouped order and the lengths of its positions (looked up by (id, epoch))."""
    grouped = group_by_length(order, lengths, global_batch=G, **kw)
    by_key = dict(zip(_ids(order), lengths.tolist(), strict=True))
    return grouped, np.asarray([by_key[k] for k in _ids(grouped)])


def test_deterministic_a_permutation_of_each_epoch_and_epochs_differ() -> None:
    order, lengths = _plain()
    a = group_by_length(order, lengths, global_batch=G, seed=7)
    b = group_by_length(order, lengths, global_batch=G, seed=7)
    assert np.array_equal(a.index, b.index) and np.array_equal(a.epoch, b.epoch)
    assert not np.array_equal(a.index, group_by_length(order, lengths, global_batch=G, seed=8).index)
    assert isinstance(a, RowOrder) and a.rows is order.rows
    for epoch in range(3):
        before, after = order.index[order.epoch == epoch], a.index[a.epoch == epoch]
        assert sorted(before.tolist()) == sorted(after.tolist())  # the epoch's rows, as often as before
        assert np.array_equal(np.flatnonzero(a.epoch == epoch), np.flatnonzero(order.epoch == epoch))
    per_epoch = [a.index[a.epoch == e][: 4 * G].tolist() for e in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]


def test_batches_hold_rows_of_similar_length_and_the_longest_batch_comes_first() -> None:
    order, lengths = _plain()
    grouped, glen = _regrouped(order, lengths, seed=3)
    spread = lambda x: np.mean([np.ptp(x[i : i + G]) for i in range(0, len(x), G)])  # noqa: E731
    assert spread(glen) < 0.25 * spread(lengths)
    epoch_len = len(glen) // 3
    for e in range(3):
        part = glen[e * epoch_len : (e + 1) * epoch_len]
        assert part[:G].max() == part.max()
    # Not a curriculum: the batch means are not sorted after the first batch.
    means = glen[G:epoch_len].reshape(-1, G).mean(axis=1)
    assert not (np.all(np.diff(means) >= 0) or np.all(np.diff(means) <= 0))


@pytest.mark.parametrize("micro", [0, 1, 2])
def test_the_rows_of_each_global_batch_do_not_depend_on_workers_or_micro_batches(micro: int) -> None:
    order, lengths = _plain()
    reference = _batch_sets(group_by_length(order, lengths, global_batch=G, seed=5))
    for workers in (1, 2, 4):
        if micro and (G // workers) % micro:
            continue
        grouped = group_by_length(
            order, lengths, global_batch=G, num_workers=workers, micro_batch=micro, seed=5
        )
        assert _batch_sets(grouped) == reference


@pytest.mark.parametrize(("workers", "micro"), [(1, 4), (2, 2), (4, 1), (2, 8), (4, 2)])
def test_padding_of_the_micro_batches_falls(workers: int, micro: int) -> None:
    order, lengths = _plain()
    _, glen = _regrouped(order, lengths, num_workers=workers, micro_batch=micro, seed=0)
    before, after = _padding_fraction(lengths, workers, micro), _padding_fraction(glen, workers, micro)
    if micro == 1:
        assert before == after == 0.0
    else:
        assert after < 0.2 * before, (before, after)
    # Ranks wait for each other every step: the slowest rank's padded tokens per step fall too.
    assert _step_cost(glen, workers, micro) < _step_cost(lengths, workers, micro)


def _step_cost(lengths: np.ndarray, workers: int, micro: int) -> int:
    """Sum over steps of the largest padded token count of any rank (the rank everyone waits for)."""
    cost = 0
    for start in range(0, len(lengths), G):
        batch = lengths[start : start + G]
        ranks = [np.asarray(shard(list(batch), r, workers)) for r in range(workers)]
        cost += max(
            sum(int(x[m : m + micro].max()) * len(x[m : m + micro]) for m in range(0, len(x), micro))
            for x in ranks
        )
    return cost


def test_mixed_orders_keep_each_batch_and_only_arrange_within_it() -> None:
    samples = _samples(120)
    replay = [{**sample_row(s), "id": f"r{i}", "task": "old"} for i, s in enumerate(_samples(10))]
    order = mixed_training_order(
        [sample_row(s) for s in samples],
        epochs=2,
        global_batch=G,
        extra_per_batch=4,
        draw=lambda rng, _e, _s: rng.sample(replay, 4),
        rng_seed="mix",
    )
    assert len(order.extra)
    lengths = np.asarray([len(r["id"]) * 7 + (i % 5) for i, r in enumerate(order)])
    grouped, glen = _regrouped(order, lengths, num_workers=2, micro_batch=2, seed=1)
    assert _batch_sets(grouped) == _batch_sets(order)
    assert _padding_fraction(glen, 2, 2) < _padding_fraction(lengths, 2, 2)
    # A plain list of rows (a method that builds its own) is arranged within batches the same way.
    listed = group_by_length(list(order), lengths, global_batch=G, num_workers=2, micro_batch=2, seed=1)
    assert [r["id"] for r in listed] == [r["id"] for r in grouped]


def test_bad_sizes_raise_naming_the_numbers() -> None:
    order, lengths = _plain(64, 1)
    with pytest.raises(ValueError, match="lengths for an order"):
        group_by_length(order, lengths[:-1], global_batch=G)
    with pytest.raises(ValueError, match="micro-batches of 3"):
        group_by_length(order, lengths, global_batch=G, num_workers=2, micro_batch=3)


# -- lengths against the real Preprocessor ---------------------------------------------------------------


def _image_rows(folder: Path) -> list[dict]:
    """Rows over images of several sizes and aspect ratios, short and long texts, one unsupervised row."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sizes = [(64, 64), (200, 90), (90, 200), (333, 517), (40, 600)]
    rows = []
    for i, size in enumerate(sizes * 2):
        path = folder / f"img{i}.png"
        Image.new("RGB", size, (i * 20, 30, 60)).save(path)
        words = ["what", "is", "seen", "from", "above", "?", "road", "unknownword"]
        question = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        rows.append(
            {**sample_row(Sample(f"r{i}", str(path), question, answer, task="t")), "supervised": i != 3}
        )
    return rows


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl", "tiny-internvl"])
def test_lengths_equal_the_preprocessors_input_ids_image_tokens_included(
    name: str, tiny_model_path: str, mcl_cache_dir: Path, tmp_path: Path
) -> None:
    from mcl.data import cached_processor
    from mcl.models import resolve_model_path

    path = tiny_model_path if name == "tiny-llava" else resolve_model_path(name, mcl_cache_dir / "models")
    rows = _image_rows(tmp_path / "images")
    expected = [len(ids) for ids in Preprocessor(path, train=True)(rows_to_batch(rows))["input_ids"]]
    counter = LengthCounter(cached_processor(path))
    assert counter.lengths(rows).tolist() == expected
    if name == "tiny-qwen2.5-vl":  # the count depends on the image size there; the others read no image
        assert counter.fixed_image_tokens is None and len(set(expected)) > 1
    else:
        assert counter.fixed_image_tokens is not None
        assert (
            counter.row_image_tokens({"id": "x", "image": "/no/such/file.png"}) == counter.fixed_image_tokens
        )
    order = RowOrder(rows[:6], np.asarray([5, 0, -1, 2, -2, 5]), np.zeros(6, dtype=np.int32), rows[6:8])
    assert order_lengths(order, counter).tolist() == [expected[i] for i in (5, 0, 6, 2, 7, 5)]


# -- the driver ---------------------------------------------------------------------------------------------


def test_the_driver_groups_every_methods_order_and_keeps_replay_batches(
    tmp_path: Path, tiny_model_path: str
) -> None:
    """``phase_training_data`` regroups what a method returns: a plain order (task 0) is regrouped within each
    epoch; replay's mixed order (task 1) keeps every batch's rows."""
    import dataclasses

    from mcl.config import load_config
    from mcl.methods_api import Phase
    from mcl.run import phase_training_data, prepare_run
    from mcl.streams import build_stream

    root = tmp_path / "generated"
    options = {"train_per_task": 40, "test_per_task": 2, "tasks": "[aerial,underwater]"}
    build_stream("generated", root, {"train_per_task": 40, "test_per_task": 2})
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "jobs" / "configs" / "default.yaml",
        [
            f"stream.root={root}",
            *(f"stream.options.{k}={v}" for k, v in options.items()),
            f"tracking.output_dir={tmp_path / 'out'}",
            "method.name=replay",
            "method.params.buffer_per_task=6",
            "train.epochs=2",
            "train.batch_size=8",
            "scaling.num_workers=2",
            "train.micro_batch_size=2",
            "train.group_by_length=true",
        ],
    )
    grouped_prep = prepare_run(cfg, log=lambda _m: None)
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, group_by_length=False))
    plain_prep = dataclasses.replace(grouped_prep, config=off)

    first = phase_training_data(grouped_prep, 0, Phase(), None)
    reference = phase_training_data(plain_prep, 0, Phase(), None)
    assert isinstance(first.rows, RowOrder) and first.driver_state == reference.driver_state
    assert not np.array_equal(first.rows.index, reference.rows.index)
    for epoch in range(2):
        assert Counter(first.rows.index[first.rows.epoch == epoch].tolist()) == Counter(
            reference.rows.index[reference.rows.epoch == epoch].tolist()
        )
    mixed = phase_training_data(grouped_prep, 1, Phase(), first.driver_state).rows
    mixed_reference = phase_training_data(plain_prep, 1, Phase(), first.driver_state).rows
    assert len(mixed.extra) and _batch_sets(mixed, 8) == _batch_sets(mixed_reference, 8)
