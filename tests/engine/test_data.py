"""Ordering, sharding, preprocessing and collation of training / evaluation batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mcl.data import (
    IGNORE_INDEX,
    Preprocessor,
    build_prompt,
    collate,
    local_batches,
    rows_to_batch,
    sample_row,
    shard,
    training_order,
)
from mcl.errors import DataError
from mcl.streams import Sample, build_stream


def _samples(n: int) -> list[Sample]:
    return [
        Sample(id=f"s{i:03d}", image=f"/img/{i}.png", question="q ?", answer="a", task="t") for i in range(n)
    ]


def _ids(rows) -> list[str]:
    return [r["id"] for r in rows]


@pytest.fixture(scope="module")
def stream(generated_root: Path):
    return build_stream("generated", generated_root, {})


@pytest.fixture(scope="module")
def processor(tiny_model_path: str):
    from mcl.data import _cached_processor

    return _cached_processor(tiny_model_path, False)


# -- training_order ------------------------------------------------------------------------------------


def test_training_order_is_deterministic_per_seed() -> None:
    samples = _samples(23)
    a = training_order(samples, epochs=3, global_batch=4, seed=7)
    b = training_order(samples, epochs=3, global_batch=4, seed=7)
    c = training_order(samples, epochs=3, global_batch=4, seed=8)
    assert a == b
    assert _ids(a) != _ids(c)


@pytest.mark.parametrize(("n", "global_batch"), [(23, 4), (24, 4), (3, 8), (10, 1), (16, 16)])
def test_training_order_is_a_padded_permutation_per_epoch(n: int, global_batch: int) -> None:
    samples = _samples(n)
    epochs = 3
    rows = training_order(samples, epochs=epochs, global_batch=global_batch, seed=0)
    per_epoch = -(-n // global_batch) * global_batch  # n rounded up to whole global batches
    assert len(rows) == epochs * per_epoch
    assert len(rows) % global_batch == 0
    all_ids = [s.id for s in samples]
    orders = []
    for epoch in range(epochs):
        chunk = rows[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert all(r["epoch"] == epoch for r in chunk)
        ids = _ids(chunk)
        assert sorted(ids[:n]) == all_ids, "the first n rows of an epoch are a permutation of the task"
        # Padding wraps around to the start of the same epoch's permutation.
        assert ids[n:] == [ids[i % n] for i in range(per_epoch - n)]
        orders.append(ids[:n])
    if n > 3:
        assert len({tuple(o) for o in orders}) > 1, "each epoch is shuffled differently"


def test_training_order_rows_carry_the_sample_fields() -> None:
    sample = _samples(1)[0]
    (row,) = training_order([sample], epochs=1, global_batch=1, seed=0)
    assert row == {**sample_row(sample), "epoch": 0}
    assert set(sample_row(sample)) == {
        "id",
        "image",
        "question",
        "answer",
        "answer_type",
        "task",
        "supervised",
    }


def test_training_order_without_samples() -> None:
    with pytest.raises(DataError, match="no training samples"):
        training_order([], epochs=1, global_batch=2, seed=0)


# -- sharding ------------------------------------------------------------------------------------------


def test_shard_by_position() -> None:
    rows = [{"id": str(i)} for i in range(7)]
    assert _ids(shard(rows, 0, 2)) == ["0", "2", "4", "6"]
    assert _ids(shard(rows, 1, 2)) == ["1", "3", "5"]
    assert shard(rows, 0, 1) == rows


@pytest.mark.parametrize("per_worker", [1, 2, 3])
def test_union_of_rank_batches_is_the_one_worker_global_batch(per_worker: int) -> None:
    """What makes a 1-worker and a 2-worker run identical: step k sees the same samples either way."""
    samples = _samples(13)
    for world in (1, 2):
        global_batch = per_worker * world
        rows = training_order(samples, epochs=2, global_batch=global_batch, seed=5)
        steps = len(rows) // global_batch
        shards = [shard(rows, rank, world) for rank in range(world)]
        assert all(len(s) == steps * per_worker for s in shards), "every rank has the same number of steps"
        for k in range(steps):
            union = Counter()
            for rank_rows in shards:
                union.update((r["id"], r["epoch"]) for r in rank_rows[k * per_worker : (k + 1) * per_worker])
            one_worker = rows[k * global_batch : (k + 1) * global_batch]  # 1 worker, batch = global batch
            assert union == Counter((r["id"], r["epoch"]) for r in one_worker)


def test_one_and_two_workers_see_the_same_global_batches() -> None:
    samples = _samples(11)
    rows = training_order(samples, epochs=2, global_batch=4, seed=1)
    one = [rows[k : k + 4] for k in range(0, len(rows), 4)]
    r0, r1 = shard(rows, 0, 2), shard(rows, 1, 2)
    two = [r0[k : k + 2] + r1[k : k + 2] for k in range(0, len(r0), 2)]
    assert [sorted(_ids(b)) for b in one] == [sorted(_ids(b)) for b in two]


# -- Preprocessor ----------------------------------------------------------------------------------------


def test_train_labels_mask_the_prompt_and_supervise_the_answer(
    stream, tiny_model_path: str, processor
) -> None:
    samples = stream.tasks[2].train[:4]
    rows = rows_to_batch([sample_row(s) for s in samples])
    train = Preprocessor(tiny_model_path, train=True)(rows)
    evaluation = Preprocessor(tiny_model_path, train=False)(rows)
    tokenizer = processor.tokenizer
    assert set(train) >= {"input_ids", "labels", "pixel_values", "id", "answer"}
    # Per-image processor outputs keep their own leading dim (one image per sample); collate concatenates.
    assert train["pixel_values"].shape == (4, 1, 3, 32, 32) and train["pixel_values"].dtype == np.float32
    for i, sample in enumerate(samples):
        ids, labels, prompt = train["input_ids"][i], train["labels"][i], evaluation["input_ids"][i]
        assert ids.dtype == np.int64 and labels.dtype == np.int64
        assert len(ids) == len(labels) > len(prompt)
        np.testing.assert_array_equal(ids[: len(prompt)], prompt)  # same prompt as at evaluation
        assert (labels[: len(prompt)] == IGNORE_INDEX).all(), "the prompt is masked"
        answer = labels[len(prompt) :]
        assert (answer != IGNORE_INDEX).all()
        np.testing.assert_array_equal(answer, ids[len(prompt) :])
        assert answer[-1] == tokenizer.eos_token_id, "EOS is supervised"
        assert tokenizer.decode(answer[:-1], skip_special_tokens=True).strip() == sample.answer
        assert tokenizer.unk_token_id not in ids.tolist()
        assert str(train["id"][i]) == sample.id


def test_eval_ids_are_prompt_only_ending_with_the_generation_prompt(
    stream, tiny_model_path: str, processor
) -> None:
    samples = stream.tasks[0].test[:3]
    batch = Preprocessor(tiny_model_path, train=False)(rows_to_batch([sample_row(s) for s in samples]))
    assert "labels" not in batch
    tokenizer = processor.tokenizer
    suffix = tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    expected_image_tokens = (32 // 8) ** 2  # image_size / patch_size, squared
    for i, sample in enumerate(samples):
        ids = batch["input_ids"][i].tolist()
        assert ids[-len(suffix) :] == suffix
        assert ids.count(image_token) == expected_image_tokens
        assert tokenizer.eos_token_id not in ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert sample.question in text and sample.answer not in text.split()
        assert build_prompt(processor, sample.question).endswith("ASSISTANT:")


def test_local_batches_stream_in_order(stream, tiny_model_path: str) -> None:
    rows = [sample_row(s) for s in stream.tasks[3].test[:5]]
    batches = list(local_batches(rows, Preprocessor(tiny_model_path, train=False), batch_size=2))
    assert [len(b["id"]) for b in batches] == [2, 2, 1]
    assert [str(i) for b in batches for i in b["id"]] == _ids(rows)


def test_missing_image_names_the_sample(stream, tiny_model_path: str, tmp_path: Path) -> None:
    row = dict(sample_row(stream.tasks[0].test[0]), id="the-missing-one", image=str(tmp_path / "gone.png"))
    with pytest.raises(DataError, match=r"sample 'the-missing-one': image .*gone\.png.* cannot be read"):
        Preprocessor(tiny_model_path, train=True)(rows_to_batch([row]))


def test_garbage_image_names_the_sample(stream, tiny_model_path: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    good = sample_row(stream.tasks[0].test[0])
    bad = dict(good, id="the-garbage-one", image=str(garbage))
    with pytest.raises(DataError, match=r"sample 'the-garbage-one': image .*garbage\.png.* cannot be read"):
        Preprocessor(tiny_model_path, train=False)(rows_to_batch([good, bad]))


# -- collate -----------------------------------------------------------------------------------------------


def _ragged(values: list[list[int]]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = np.asarray(v, dtype=np.int64)
    return out


def test_collate_left_pads_for_eval() -> None:
    batch = {"input_ids": _ragged([[5, 6, 7], [8, 9]]), "pixel_values": np.zeros((2, 1, 3, 4, 4), np.float32)}
    out = collate(batch, pad_id=0, left_pad=True)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert "labels" not in out
    assert out["input_ids"].dtype == torch.int64 and out["pixel_values"].shape == (2, 3, 4, 4)


def test_collate_right_pads_for_train_with_masked_label_padding() -> None:
    batch = {
        "input_ids": _ragged([[5, 6, 7, 3], [8, 9]]),
        "labels": _ragged([[IGNORE_INDEX, IGNORE_INDEX, 7, 3], [IGNORE_INDEX, 9]]),
        "pixel_values": np.ones((2, 1, 3, 4, 4), np.float32),
    }
    out = collate(batch, pad_id=0, left_pad=False)
    assert out["input_ids"].tolist() == [[5, 6, 7, 3], [8, 9, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7, 3], [-100, 9, -100, -100]]
    assert out["pixel_values"].dtype == torch.float32


def test_collate_real_batches(stream, tiny_model_path: str, processor) -> None:
    # The aerial task mixes 6- and 7-word questions, so the prompts differ in length.
    samples = stream.tasks[0].train[:8]
    rows = rows_to_batch([sample_row(s) for s in samples])
    pad = processor.tokenizer.pad_token_id
    train = Preprocessor(tiny_model_path, train=True)(rows)
    lengths = [len(x) for x in train["input_ids"]]
    assert len(set(lengths)) > 1
    out = collate(train, pad, left_pad=False)
    assert out["input_ids"].shape == (8, max(lengths))
    assert out["attention_mask"].sum(dim=1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert (out["input_ids"][i, n:] == pad).all() and (out["labels"][i, n:] == IGNORE_INDEX).all()
    evaluation = Preprocessor(tiny_model_path, train=False)(rows)
    lengths = [len(x) for x in evaluation["input_ids"]]
    out = collate(evaluation, pad, left_pad=True)
    assert out["attention_mask"].sum(dim=1).tolist() == lengths
    longest = max(lengths)
    for i, n in enumerate(lengths):
        assert (out["attention_mask"][i, longest - n :] == 1).all()
        assert (out["input_ids"][i, : longest - n] == pad).all()
    assert out["pixel_values"].shape == (8, 3, 32, 32)


def test_collate_batches_any_processor_outputs_like_the_processor_would():
    """Qwen2-VL-style inputs: flattened patches of different counts per image, a grid per image, and a
    per-token field; patches and grids are concatenated, per-token fields padded like the ids."""
    patches = np.empty(2, dtype=object)
    patches[0], patches[1] = np.ones((4, 6), np.float32), np.zeros((2, 6), np.float32)
    tokens = np.empty(2, dtype=object)
    tokens[0], tokens[1] = np.array([1, 1, 0]), np.array([1, 0])
    batch = {
        "input_ids": _ragged([[5, 6, 7], [8, 9]]),
        "pixel_values": patches,
        "image_grid_thw": np.array([[[1, 2, 2]], [[1, 1, 2]]]),
        "tokens__mm_token_type_ids": tokens,
    }
    out = collate(batch, pad_id=0, left_pad=True)
    assert out["pixel_values"].shape == (6, 6)
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 1, 2]]
    assert out["mm_token_type_ids"].tolist() == [[1, 1, 0], [0, 1, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
