"""Samples kept on disk (mcl.streams.store), the streaming JSON readers, and row orders kept as indices."""

from __future__ import annotations

import gc
import json
import os
import pickle
import random
from pathlib import Path

import pytest

import mcl.streams.formats as formats
from mcl.data import RowOrder, SampleRows, mixed_training_order, sample_row, shard, training_order
from mcl.errors import DataError, SampleError
from mcl.streams.samples import Sample
from mcl.streams.store import ChainedSamples, SampleList, SampleWriter, take


def _sample(i: int, task: str = "t") -> Sample:
    return Sample(f"s{i}", f"/img/{i % 3}.png", f"question {i} é ✓", f"answer {i}", "exact", task, {"k": [i]})


def _stored(samples: list[Sample], label: str = "file.json") -> SampleList:
    writer = SampleWriter(label)
    for sample in samples:
        writer.append(sample)
    return writer.finish()


def test_sample_list_reads_back_what_was_written() -> None:
    samples = [_sample(i) for i in range(10_000)]  # more than one packing of the offsets
    stored = _stored(samples)
    assert len(stored) == 10_000
    assert stored[0] == samples[0] and stored[-1] == samples[-1] and stored[4097] == samples[4097]
    assert list(stored) == samples and stored == samples
    assert list(stored[10:20]) == samples[10:20] and list(stored[::-3]) == samples[::-3]
    assert list(stored.select([5, 2, 5])) == [samples[5], samples[2], samples[5]]
    assert list(take(stored, [1, 0])) == [samples[1], samples[0]] == take(samples, [1, 0])
    # Two iterators over one file, interleaved, each read their own positions.
    pairs = list(zip(stored[:50], stored[50:100], strict=True))
    assert pairs == list(zip(samples[:50], samples[50:100], strict=True))
    assert stored[:2] + stored[2:4] == samples[:4]
    with pytest.raises(IndexError):
        stored[10_000]


def test_sample_list_reads_from_several_threads_at_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    samples = [_sample(i) for i in range(2_000)]
    stored = _stored(samples)
    with ThreadPoolExecutor(4) as pool:
        scans = list(pool.map(lambda k: list(stored[k::4]), range(4)))
        picks = list(pool.map(lambda i: stored[i], range(0, 2_000, 7)))
    assert scans == [samples[k::4] for k in range(4)] and picks == samples[::7]


def test_sample_list_pickles_as_a_list_and_its_file_goes_with_the_last_view() -> None:
    stored = _stored([_sample(i) for i in range(5)])
    assert pickle.loads(pickle.dumps(stored)) == [_sample(i) for i in range(5)]
    assert type(pickle.loads(pickle.dumps(stored))) is list
    view = stored[1:3]
    path = stored._spill.path
    del stored
    gc.collect()
    assert path.exists() and list(view) == [_sample(1), _sample(2)]  # the view keeps the file
    del view
    gc.collect()
    assert not path.parent.exists()


def test_spill_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from mcl.streams import store

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / f"{store._owner_prefix(int(dead.stdout))}abc"
    orphan.mkdir()
    (orphan / "samples.jsonl").write_text("x")
    live = (
        tmp_path / f"{store._owner_prefix(os.getppid())}def"
    )  # a live process (pytest's parent) keeps its folder
    live.mkdir()
    elsewhere = tmp_path / f"mcl-samples-otherhost-{int(dead.stdout)}-ghi"  # another machine's: left alone
    elsewhere.mkdir()
    stored = SampleWriter("f", spill_dir=tmp_path)
    stored.append(_sample(0))
    samples = stored.finish()
    assert not orphan.exists() and live.exists() and elsewhere.exists()
    assert samples._spill.path.parent.parent == tmp_path
    assert samples._spill.path.parent.name.startswith(store._owner_prefix(os.getpid()))
    store._remove_orphans.cache_clear()


def test_repeated_ids_are_found_after_reading_and_the_first_is_kept() -> None:
    samples = [_sample(0), _sample(1), _sample(0), _sample(2), _sample(1), _sample(0)]
    writer = SampleWriter("data/test.json", " in task 't' (test)")
    for sample in samples:
        writer.append(sample)
    problems: list[SampleError] = []
    kept = writer.finish(problems.append)
    assert [s.id for s in kept] == ["s0", "s1", "s2"]
    assert [(p.kind, p.sample_id) for p in problems] == [
        ("duplicate_id", "s0"),
        ("duplicate_id", "s1"),
        ("duplicate_id", "s0"),
    ]
    assert str(problems[0]) == "data/test.json: duplicate id 's0' in task 't' (test)"
    writer = SampleWriter("x.json")
    for sample in samples:
        writer.append(sample)
    with pytest.raises(SampleError, match="x.json: duplicate id 's0'"):
        writer.finish()


def test_chained_samples_index_across_parts() -> None:
    a, b = [_sample(i) for i in range(3)], _stored([_sample(i, "u") for i in range(3, 7)])
    chained = ChainedSamples([a, [], b])
    assert len(chained) == 7 and list(chained) == [*a, *b]
    assert chained[3] == b[0] and chained[-1] == b[-1] and chained[2:5] == [a[2], b[0], b[1]]
    with pytest.raises(IndexError):
        chained[7]


def _old_training_order(samples, *, epochs, global_batch, seed):  # the list-of-dicts version it replaces
    rows = [sample_row(s) for s in samples]
    order = []
    for epoch in range(epochs):
        perm = list(range(len(rows)))
        random.Random(seed * 1000003 + epoch).shuffle(perm)
        perm += [perm[i % len(perm)] for i in range((-len(perm)) % global_batch)]
        order += [dict(rows[i], epoch=epoch) for i in perm]
    return order


@pytest.mark.parametrize(("n", "epochs", "batch"), [(1, 1, 1), (37, 3, 8), (64, 2, 16)])
def test_training_order_as_indices_equals_the_list_of_rows_it_replaces(
    n: int, epochs: int, batch: int
) -> None:
    samples = _stored([_sample(i) for i in range(n)])
    order = training_order(samples, epochs=epochs, global_batch=batch, seed=11)
    assert isinstance(order, RowOrder)
    expected = _old_training_order(list(samples), epochs=epochs, global_batch=batch, seed=11)
    assert list(order) == expected and order == expected
    assert [order[i] for i in range(len(order))] == expected
    assert list(shard(order, 1, 2)) == expected[1::2]
    assert pickle.loads(pickle.dumps(order[2:5])) == expected[2:5]
    assert list(SampleRows(samples)) == [sample_row(s) for s in samples]


def _old_mixed_training_order(current, *, epochs, global_batch, extra_per_batch, draw, rng_seed):
    take = global_batch - extra_per_batch
    order = []
    for epoch in range(epochs):
        rng = random.Random(f"{rng_seed}-epoch-{epoch}")
        perm = list(range(len(current)))
        rng.shuffle(perm)
        perm += [perm[i % len(perm)] for i in range((-len(perm)) % take)]
        for start in range(0, len(perm), take):
            batch = [dict(current[i], epoch=epoch) for i in perm[start : start + take]]
            batch += [dict(row, epoch=epoch) for row in draw(rng, epoch, start)] if extra_per_batch else []
            rng.shuffle(batch)
            order += batch
    return order


def test_mixed_order_as_indices_equals_the_list_of_rows_and_stores_each_drawn_row_once() -> None:
    samples = _stored([_sample(i) for i in range(45)])
    pool = [{**sample_row(_sample(100 + i, "old")), "supervised": True} for i in range(6)]

    def draw(rng: random.Random, epoch: int, start: int) -> list[dict]:
        return rng.sample(pool, 3)

    kwargs = {"epochs": 3, "global_batch": 8, "extra_per_batch": 3, "draw": draw, "rng_seed": "s"}
    order = mixed_training_order(SampleRows(samples), **kwargs)
    expected = _old_mixed_training_order([sample_row(s) for s in samples], **kwargs)
    assert isinstance(order, RowOrder) and list(order) == expected and len(order) % 8 == 0
    assert len(order.extra) == 6  # every pool row drawn many times, stored once
    assert list(shard(order, 0, 2)) == expected[::2]


# --- streaming JSON readers ---------------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """Read 7 characters at a time, so every value and separator crosses chunk boundaries."""
    monkeypatch.setattr(formats, "_CHUNK", 7)


DOCUMENTS = [
    '[{"a": 1}, {"b": [1, 2, {"c": "x, ] y"}]}, 12345678, "é✓\\"", true, null, -1.5e3]',
    '\ufeff[\n  {"id": "a"},\n\n  {"id": "b"}\n]\n',
    "[]",
    "  [ ]  \n",
    '[{"x": "' + "long " * 100 + '"}]',
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_json_list_reader_decodes_what_json_loads_decodes(tmp_path: Path, small_chunks, text: str) -> None:
    path = tmp_path / "doc.json"
    path.write_text(text, encoding="utf-8")
    rows = list(formats._iter_json_list(path))
    expected = json.loads(text.lstrip("\ufeff"))
    assert [row for _, row in rows] == expected
    assert [label for label, _ in rows] == [f"row {i}" for i in range(len(expected))]


MALFORMED = [
    "",
    "[",
    '[{"a": 1}',
    '[{"a": 1},',
    '[{"a": 1},]',
    '[{"a": 1} {"b": 2}]',
    '[\n {"a": 1},\n {"a": tru}\n]',
    '[\n {"a": 1}\n]\n x',
    '[{"a": "unterminated}]',
    '{"a": [1,\n 2',
]


@pytest.mark.parametrize("text", MALFORMED)
def test_json_list_reader_reports_malformed_files_at_json_loads_position(
    tmp_path: Path, small_chunks, text: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(DataError) as info:
        list(formats._iter_json_list(path))
    message = str(info.value)
    assert message.startswith(f"{path}: malformed JSON at line {expected.value.lineno}, ")
    assert f"column {expected.value.colno}: " in message


def test_json_list_reader_says_what_a_non_list_is(tmp_path: Path, small_chunks) -> None:
    path = tmp_path / "obj.json"
    path.write_text('{"rows": [1, 2, 3]}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list of rows, got dict"):
        list(formats._iter_json_list(path))


def test_json_lines_reader_streams_rows_with_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"b": "\u2028"}\r\n{"c": 3}', encoding="utf-8")
    assert list(formats.iter_json_lines(path)) == [
        ("row 0 (line 1)", {"a": 1}),
        ("row 1 (line 3)", {"b": "\u2028"}),
        ("row 2 (line 4)", {"c": 3}),
    ]
    assert list(formats._iter_json_rows(path)) == list(formats.iter_json_lines(path))
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON Lines at line 2, column 7"):
        list(formats.iter_json_lines(path))
