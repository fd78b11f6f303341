"""From samples to model batches: ordering, sharding, image decode + processor, collation.

The driver holds only annotation rows (ids, paths, text). Images are decoded and run through the model's
processor by :class:`Preprocessor`, which Ray Data runs over each worker's shard (``map_batches``) so no
worker ever holds a whole task; without Ray, :func:`local_batches` applies the same function in-process.

Sharding is by position (row ``j`` of a global order goes to rank ``j % world_size``), so a global batch
holds the same samples whatever the number of workers: a 1-worker and a 2-worker run see the same data.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from mcl.errors import DataError
from mcl.streams.samples import Sample
from mcl.streams.store import LazySequence

IGNORE_INDEX = -100
# ``supervised``: False for rows a method adds without a target (e.g. QUAD's question-only replay): the
# answer is not appended and no token is supervised; the method's extra loss gives such rows their target.
ROW_KEYS = ("id", "image", "question", "answer", "answer_type", "task", "supervised")
TEXT_KEYS = ("input_ids", "labels")
TOKEN_ALIGNED = "tokens__"  # prefix of per-token processor outputs (e.g. token_type_ids), padded like ids
# An evaluation row's place in the rows it was taken from (see :class:`AnswerOrder`): travels with the row
# through preprocessing into its prediction record, so records can be put back in that order.
POSITION = "position"


def sample_row(sample: Sample) -> dict[str, Any]:
    """The annotation row of a sample (what travels to Ray Data; no pixels)."""
    return {**{k: getattr(sample, k) for k in ROW_KEYS if k != "supervised"}, "supervised": True}


class SampleRows(LazySequence):
    """The annotation rows (:func:`sample_row`) of ``samples``, each built when it is read."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return SampleRows(self.samples[item])
        return sample_row(self.samples[item])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(sample_row, self.samples)


class RowOrder(LazySequence):
    """Training rows in a global order, kept as integer arrays: the position of each row in ``rows`` (a row
    ``-1 - k`` is ``extra[k]``, e.g. a replayed row) and its epoch. A row dict (the base row plus ``epoch``)
    is built only when it is read, so an order costs 12 bytes a row, however large the task. Slices are views;
    pickles as a plain list of rows.
    """

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        index: np.ndarray,
        epoch: np.ndarray,
        extra: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.rows = rows
        self.index = index
        self.epoch = epoch
        self.extra = extra

    def __len__(self) -> int:
        return len(self.index)

    def _row(self, i: int, epoch: int) -> dict[str, Any]:
        return {**(self.rows[i] if i >= 0 else self.extra[-1 - i]), "epoch": epoch}

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return RowOrder(self.rows, self.index[item], self.epoch[item], self.extra)
        return self._row(int(self.index[item]), int(self.epoch[item]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, epoch in zip(self.index.tolist(), self.epoch.tolist(), strict=True):
            yield self._row(i, epoch)

    def __repr__(self) -> str:
        return f"RowOrder({len(self)} rows over {len(self.rows)} + {len(self.extra)} extra rows)"


def training_order(samples: Sequence[Sample], *, epochs: int, global_batch: int, seed: int) -> RowOrder:
    """All training rows of all epochs in order: a seeded permutation per epoch, each epoch padded by
    wrapping around to a whole number of global batches (every step has a full batch on every rank).

    The order is kept as indices into ``samples`` (12 bytes a row, whatever the samples hold), so a large task
    does not cost a dict per sample per epoch."""
    if not samples:
        raise DataError("no training samples")
    n = len(samples)
    index = np.empty(epochs * (n + (-n) % global_batch), dtype=np.int64)
    epoch_of = np.empty(len(index), dtype=np.int32)
    at = 0
    for epoch in range(epochs):
        perm = list(range(n))
        random.Random(seed * 1000003 + epoch).shuffle(perm)
        perm += [perm[i % n] for i in range((-n) % global_batch)]
        index[at : at + len(perm)] = perm
        epoch_of[at : at + len(perm)] = epoch
        at += len(perm)
    return RowOrder(SampleRows(samples), index, epoch_of)


def reservoir_sample(items: Sequence[Any], k: int, rng: random.Random) -> list[Any]:
    """``k`` items drawn uniformly without replacement by reservoir sampling (Vitter's Algorithm R): one pass
    in order, each item replacing a random slot with probability ``k / (i + 1)``. All items if fewer."""
    reservoir = list(items[:k])
    for i in range(k, len(items)):
        j = rng.randrange(i + 1)
        if j < k:
            reservoir[j] = items[i]
    return reservoir


def extra_rows_per_batch(ratio: float, global_batch: int, available: int) -> int:
    """Rows of a global batch given to a method's extra rows (replayed samples, stored questions):
    ``round(ratio * batch)``, at most ``batch - 1`` (every batch keeps a current-task row), 0 when nothing is
    available."""
    if available == 0:
        return 0
    return min(round(ratio * global_batch), global_batch - 1)


def mixed_training_order(
    current: Sequence[dict[str, Any]],
    *,
    epochs: int,
    global_batch: int,
    extra_per_batch: int,
    draw: Callable[[random.Random, int, int], list[dict[str, Any]]],
    rng_seed: str,
) -> RowOrder:
    """The global row order of a task whose batches each hold ``extra_per_batch`` extra rows.

    Each epoch permutes ``current`` (padded by wrapping around to whole batches of ``global_batch -
    extra_per_batch`` rows); for every batch, ``draw(rng, epoch, start)`` gives the extra rows (``start``:
    the batch's first position in the epoch's permutation), and the batch is shuffled. Every row gets its
    ``epoch``. Deterministic for a given ``rng_seed``. Current rows are kept as indices (pass a lazy
    :class:`SampleRows` for a large task); a drawn row is stored once however often it is drawn (the same
    object: e.g. a replay buffer's row).
    """
    take = global_batch - extra_per_batch
    if take < 1:
        raise ValueError(f"{extra_per_batch} extra rows leave no current rows in a batch of {global_batch}")
    extra: list[dict[str, Any]] = []
    stored: dict[int, int] = {}  # id(row) -> its position in extra

    def position(row: dict[str, Any]) -> int:
        if id(row) not in stored:
            stored[id(row)] = len(extra)
            extra.append(row)
        return -1 - stored[id(row)]

    indices: list[np.ndarray] = []  # one array per epoch: a list of ints would cost ~36 B a row
    for epoch in range(epochs):
        rng = random.Random(f"{rng_seed}-epoch-{epoch}")
        perm = list(range(len(current)))
        rng.shuffle(perm)
        perm += [perm[i % len(perm)] for i in range((-len(perm)) % take)]
        order: list[int] = []
        for start in range(0, len(perm), take):
            batch = perm[start : start + take]
            batch += [position(row) for row in draw(rng, epoch, start)] if extra_per_batch else []
            rng.shuffle(batch)
            order += batch
        indices.append(np.asarray(order, dtype=np.int64))
    epoch_of = np.concatenate([np.full(len(ix), e, dtype=np.int32) for e, ix in enumerate(indices)])
    return RowOrder(current, np.concatenate(indices), epoch_of, extra)


# Global batches per mega-batch of a length-grouped epoch (the default of HF transformers' LengthGroupedSampler).
LENGTH_GROUP_MEGA_BATCHES = 50


def group_by_length(
    order: Sequence[dict[str, Any]],
    lengths: np.ndarray,
    *,
    global_batch: int,
    num_workers: int = 1,
    micro_batch: int = 0,
    seed: int | str = 0,
    mega_batches: int = LENGTH_GROUP_MEGA_BATCHES,
) -> RowOrder:
    """``order`` regrouped so that rows of similar token length share global batches and micro-batches.

    ``lengths[j]`` is the token length of position ``j`` (image tokens included, see :mod:`mcl.lengths`).

    * A plain order (a :class:`RowOrder` without extra rows): within each epoch, every ``mega_batches``
      consecutive global batches of the method's (already shuffled) order form a mega-batch whose rows are
      sorted by length and cut into global batches; the epoch's global batches are then shuffled (seeded by
      ``seed`` and the epoch: no length curriculum), and the one holding the epoch's longest row goes first,
      so that a sequence too long for memory fails in the first step rather than hours in.
    * An order with extra rows (replay, QUAD: each global batch holds a fixed number of them) or a plain list:
      each global batch keeps its rows; only their places within the batch change.

    Then, inside every global batch, rows are sorted by length and dealt in runs of ``micro_batch`` to the
    (rank, micro-batch) slots of position sharding (row ``j`` of a batch goes to rank ``j % num_workers``,
    which runs its rows as consecutive micro-batches): micro-step ``k`` of every rank gets neighbouring runs,
    the rank order reversed every other micro-step and batch so that no rank keeps getting the longest. The
    *set* of rows of each global batch never depends on ``num_workers`` or ``micro_batch``; every position of
    ``order`` appears exactly once.

    Follows HF transformers' ``get_length_grouped_indices`` (``trainer_pt_utils.py``: mega-batches of 50
    batches sorted by length, the longest first) and LLaVA's ``get_modality_length_grouped_indices``
    (``haotian-liu/LLaVA``, ``llava/train/llava_trainer.py``). Differences: LLaVA's mega-batch is one global
    batch (``world_size * accumulation * per-device batch``), so its batches stay random and only
    ``split_to_even_chunks`` balances the per-rank token totals; ours spans 50 global batches, so batches
    themselves are of similar length. LLaVA groups text-only and image rows apart (its lengths are signed by
    modality); every mcl training row has an image (:class:`mcl.streams.samples.Sample`), so there is one
    modality. HF shuffles the sorted batches within their mega-batches only; we shuffle over the epoch.

    Raises:
        ValueError: ``lengths`` does not match ``order``, or the batch sizes do not divide as the engine needs.
    """
    order = as_row_order(order)
    lengths = np.asarray(lengths)
    micro = micro_batch or global_batch // max(num_workers, 1)
    if len(lengths) != len(order):
        raise ValueError(f"{len(lengths)} lengths for an order of {len(order)} rows")
    if len(order) % global_batch or global_batch % (num_workers * micro) or mega_batches < 1:
        raise ValueError(
            f"an order of {len(order)} rows cannot be grouped in global batches of {global_batch} over "
            f"{num_workers} workers x micro-batches of {micro} (mega-batches of {mega_batches})"
        )
    batches = _global_batches(order, lengths, global_batch, mega_batches, seed)
    arranged = _arrange_within_batches(batches, lengths, num_workers, micro)
    perm = arranged.reshape(-1)
    return RowOrder(order.rows, order.index[perm], order.epoch[perm], order.extra)


def as_row_order(rows: Sequence[dict[str, Any]]) -> RowOrder:
    """``rows`` as a :class:`RowOrder`: itself, or a plain list's rows all held as extra rows (so that
    :func:`group_by_length` keeps its batches' rows), each row's ``epoch`` kept (0 where it has none)."""
    if isinstance(rows, RowOrder):
        return rows
    epoch = np.asarray([row.get("epoch", 0) for row in rows], dtype=np.int32)
    return RowOrder([], -1 - np.arange(len(rows), dtype=np.int64), epoch, list(rows))


def _global_batches(
    order: RowOrder, lengths: np.ndarray, global_batch: int, mega_batches: int, seed: int | str
) -> np.ndarray:
    """Positions of ``order`` as a (steps, global_batch) array: regrouped by length within each epoch for a
    plain order; as they are for an order with extra rows (or epochs not cut at batch boundaries)."""
    spans = _epoch_spans(order.epoch)
    if len(order.extra) or any((stop - start) % global_batch for start, stop in spans):
        return np.arange(len(order)).reshape(-1, global_batch)
    return np.concatenate(
        [
            start + _length_sorted_batches(lengths[start:stop], global_batch, mega_batches, f"{seed}-{e}")
            for e, (start, stop) in enumerate(spans)
        ]
    )


def _arrange_within_batches(
    batches: np.ndarray, lengths: np.ndarray, num_workers: int, micro: int
) -> np.ndarray:
    """``batches`` with each row's positions sorted by length and dealt to the (rank, micro-batch) slots."""
    ranked = np.take_along_axis(batches, np.argsort(-lengths[batches], axis=1, kind="stable"), 1)
    arranged = np.empty_like(batches)
    for parity in (0, 1):
        arranged[parity::2, _micro_batch_slots(batches.shape[1], num_workers, micro, parity)] = ranked[
            parity::2
        ]
    return arranged


def _epoch_spans(epoch: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal epoch values."""
    cuts = [0, *(np.flatnonzero(np.diff(epoch)) + 1).tolist(), len(epoch)]
    return list(pairwise(cuts)) if len(epoch) else []


def _length_sorted_batches(
    lengths: np.ndarray, global_batch: int, mega_batches: int, seed: str
) -> np.ndarray:
    """Offsets into one epoch's positions as a (batches, global_batch) array: mega-batches sorted by length
    and cut into batches, the batches shuffled, the one holding the longest row first."""
    size = mega_batches * global_batch
    batches = np.concatenate(
        [
            (s + np.argsort(-lengths[s : s + size], kind="stable")).reshape(-1, global_batch)
            for s in range(0, len(lengths), size)
        ]
    )
    shuffled = list(range(len(batches)))
    random.Random(f"mcl-length-groups-{seed}").shuffle(shuffled)
    batches = batches[shuffled]
    longest = int(np.argmax(lengths[batches].max(axis=1)))
    batches[[0, longest]] = batches[[longest, 0]]
    return batches


def _micro_batch_slots(global_batch: int, num_workers: int, micro_batch: int, parity: int) -> np.ndarray:
    """Where, in a global batch, the ``s``-th longest row goes: run ``g = s // micro_batch`` of rows fills
    micro-step ``g // num_workers`` of one rank, the rank order reversed on every other micro-step and, with
    ``parity`` 1, on the other ones (odd batches), so that no rank keeps getting the longest run."""
    s = np.arange(global_batch)
    run, within = divmod(s, micro_batch)
    step, slot = divmod(run, num_workers)
    rank = np.where((step + parity) % 2 == 0, slot, num_workers - 1 - slot)
    return (step * micro_batch + within) * num_workers + rank


def evaluation_order(lengths: np.ndarray | None, groups: Sequence[str] | None = None) -> np.ndarray:
    """The order to evaluate rows in, as positions: a permutation of ``range(n)``.

    Rows of one group (an answer type) come together, groups in the order they first appear; within a group,
    the longest first when ``lengths`` (token lengths, image tokens included) are given, the original order
    otherwise (the sort is stable). Consecutive rows then have similar lengths, so batches cut from the order
    (or from each rank's shard of it, positions ``rank::world_size``: still sorted, still even) pad little.
    """
    n = len(lengths) if lengths is not None else len(groups) if groups is not None else 0
    keys: list[np.ndarray] = []
    if lengths is not None:
        keys.append(-np.asarray(lengths, dtype=np.int64))
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} rows")
        first: dict[str, int] = {}
        keys.append(np.asarray([first.setdefault(g, len(first)) for g in groups], dtype=np.int64))
    if not keys:
        return np.arange(n)
    return np.lexsort(keys) if len(keys) > 1 else np.argsort(keys[0], kind="stable")


class AnswerOrder(LazySequence):
    """Evaluation rows in the order to answer them: ``rows[order[k]]`` at place ``k``, each with its
    :data:`POSITION` in ``rows`` (built when read; slices are views, so :func:`shard` keeps it lazy)."""

    def __init__(self, rows: Sequence[dict[str, Any]], order: np.ndarray) -> None:
        self.rows = rows
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return AnswerOrder(self.rows, self.order[item])
        position = int(self.order[item])
        return {**self.rows[position], POSITION: position}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for position in self.order.tolist():
            yield {**self.rows[position], POSITION: position}


def in_original_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prediction records (gathered from every rank) back in the order of the rows they answer, each without
    its :data:`POSITION`; records without one (rows not from an :class:`AnswerOrder`) are returned as they are."""
    if not records or POSITION not in records[0]:
        return records
    ordered = sorted(records, key=lambda r: r[POSITION])
    return [{k: v for k, v in r.items() if k != POSITION} for r in ordered]


def shard(rows: Sequence[dict[str, Any]], rank: int, world_size: int) -> Sequence[dict[str, Any]]:
    """Rows of one rank: positions ``rank, rank + world_size, ...`` (a view of a :class:`RowOrder`)."""
    return rows[rank::world_size]


def build_prompt(processor: Any, question: str) -> str:
    """The model's own chat template around one image and a question (generation prompt appended)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def answer_text(prompt: str, answer: str) -> str:
    """The text tokenised after ``prompt`` for a supervised answer (EOS follows): a space joins them unless the
    prompt already ends in whitespace."""
    return ("" if prompt.endswith((" ", "\n")) else " ") + answer


def cached_processor(model_path: str, trust_remote_code: bool = False) -> Any:
    """The model's processor, loaded once per process (a few of them are kept)."""
    return _cached_processor(model_path, trust_remote_code)


@functools.lru_cache(maxsize=4)
def _cached_processor(model_path: str, trust_remote_code: bool) -> Any:
    from transformers.utils import logging as hf_logging

    from mcl.models import load_processor

    hf_logging.set_verbosity_error()
    return load_processor(model_path, trust_remote_code=trust_remote_code)


def _open_image(path: str, sample_id: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"sample {sample_id!r}: image {path!r} cannot be read ({exc})") from None


class Preprocessor:
    """Decode images and tokenize prompts (+ answers for training). A pure function of its input batch.

    Args:
        model_path: Folder or hub id of the model whose processor to use.
        train: Build ``labels`` (answer tokens + EOS supervised, prompt masked) when True; prompts only
            otherwise.
        trust_remote_code: Passed to :func:`mcl.models.load_processor`.
    """

    def __init__(self, model_path: str, train: bool, trust_remote_code: bool = False) -> None:
        self.model_path = model_path
        self.train = train
        self.trust_remote_code = trust_remote_code

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        processor = _cached_processor(self.model_path, self.trust_remote_code)
        tokenizer = processor.tokenizer
        input_ids: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        model_inputs: dict[str, list[np.ndarray]] = {}
        for i in range(len(batch["id"])):
            prompt = build_prompt(processor, str(batch["question"][i]))
            image = _open_image(str(batch["image"][i]), str(batch["id"][i]))
            enc = processor(text=[prompt], images=[image], return_tensors="np")
            prompt_ids = enc["input_ids"][0].astype(np.int64)
            answer_ids = np.zeros(0, dtype=np.int64)
            if self.train and bool(batch["supervised"][i]):
                ids = tokenizer(answer_text(prompt, str(batch["answer"][i])), add_special_tokens=False)[
                    "input_ids"
                ]
                answer_ids = np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int64)
            if self.train:
                labels.append(np.concatenate([np.full_like(prompt_ids, IGNORE_INDEX), answer_ids]))
            input_ids.append(np.concatenate([prompt_ids, answer_ids]))
            # Every other processor output is a model input (pixel_values, image_grid_thw, image_sizes, ...).
            for key, value in enc.items():
                if key in ("input_ids", "attention_mask"):
                    continue
                value = np.asarray(value)
                if value.ndim == 2 and value.shape == enc["input_ids"].shape:  # per token: padded like ids
                    tail = np.zeros(len(answer_ids), dtype=value.dtype)
                    model_inputs.setdefault(TOKEN_ALIGNED + key, []).append(np.concatenate([value[0], tail]))
                else:  # per image: concatenated over samples along dim 0
                    model_inputs.setdefault(key, []).append(value)
        out = {key: np.asarray(batch[key]) for key in ROW_KEYS}
        if POSITION in batch:
            out[POSITION] = np.asarray(batch[POSITION])
        out["input_ids"] = _object_array(input_ids)
        if self.train:
            out["labels"] = _object_array(labels)
        for key, values in model_inputs.items():
            same_shape = len({v.shape for v in values}) == 1
            out[key] = np.stack(values) if same_shape else _object_array(values)
        return out


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def rows_to_batch(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    rows = list(rows)
    keys = (*ROW_KEYS, POSITION) if rows and POSITION in rows[0] else ROW_KEYS
    return {key: np.asarray([r[key] for r in rows]) for key in keys}


def local_batches(
    rows: Sequence[dict[str, Any]], preprocess: Preprocessor, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Preprocessed batches without Ray, streaming: one batch is decoded at a time."""
    for start in range(0, len(rows), batch_size):
        yield preprocess(rows_to_batch(rows[start : start + batch_size]))


DATA_TASK_CPUS = 0.25


def arrow_blocks(rows: Sequence[dict[str, Any]]) -> Iterator[Any]:
    """``rows`` as Arrow tables of ~128 rows (at most 64 blocks), built one at a time.

    Blocks of ~128 rows: small enough to stream (a worker never holds the task), large enough that Ray Data's
    per-task overhead stays small next to decoding. The consumer re-batches to its batch size.
    """
    import pyarrow as pa

    n = len(rows)
    size = math.ceil(n / max(1, min(math.ceil(n / 128), 64)))
    for start in range(0, n, size):
        yield pa.Table.from_pylist(list(rows[start : start + size]))


def ray_dataset(
    rows: Sequence[dict[str, Any]], preprocess: Preprocessor, batch_size: int, max_tasks: int | None = None
) -> Any:
    """A Ray Dataset that decodes and preprocesses ``rows`` lazily, in order, in Ray Data tasks (at most
    ``max_tasks`` at once; by default as many as the free CPUs hold).

    The rows go to the object store a block at a time (an Arrow table per block), so the driver never
    holds them all as Python objects: a :class:`RowOrder` is materialised one block at a time.
    """
    import ray
    import ray.data

    refs = [ray.put(block) for block in arrow_blocks(rows)]
    ds = ray.data.from_arrow_refs(refs)
    # A quarter CPU per preprocessing task: light work, and it must fit beside Train workers that hold
    # whole CPUs on nodes where fractional reservations (e.g. a sweep's trial actors) leave < 1 CPU free.
    # A cap above the block count would draw a warning from Ray Data (one task per block at most).
    cap = min(max_tasks, len(refs)) if max_tasks else None
    return ds.map_batches(
        preprocess,
        batch_size=max(batch_size, 64),
        batch_format="numpy",
        num_cpus=DATA_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=cap) if cap else None,
    )


def collate(batch: dict[str, np.ndarray], pad_id: int, *, left_pad: bool) -> dict[str, Any]:
    """Pad a preprocessed numpy batch into torch tensors (left padding for generation).

    Text ids are padded; per-token processor outputs are padded the same way; every other processor output
    (``pixel_values``, ``image_grid_thw``, ...) is concatenated over the samples along dim 0, which is how
    each model family's processor batches them.
    """
    import torch

    seqs = list(batch["input_ids"])
    longest = max(len(s) for s in seqs)
    n = len(seqs)
    ids = np.full((n, longest), pad_id, dtype=np.int64)
    mask = np.zeros((n, longest), dtype=np.int64)
    labels = np.full((n, longest), IGNORE_INDEX, dtype=np.int64) if "labels" in batch else None
    for i, s in enumerate(seqs):
        sl = slice(longest - len(s), longest) if left_pad else slice(0, len(s))
        ids[i, sl] = s
        mask[i, sl] = 1
        if labels is not None:
            labels[i, sl] = batch["labels"][i]
    out: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if labels is not None:
        out["labels"] = torch.from_numpy(labels)
    for key in batch:
        if key in ROW_KEYS or key in TEXT_KEYS or key == POSITION:
            continue
        if key.startswith(TOKEN_ALIGNED):
            padded = np.zeros((n, longest), dtype=np.asarray(batch[key][0]).dtype)
            for i, s in enumerate(batch[key]):
                padded[i, slice(longest - len(s), longest) if left_pad else slice(0, len(s))] = s
            out[key[len(TOKEN_ALIGNED) :]] = torch.from_numpy(padded)
        else:
            out[key] = torch.from_numpy(np.ascontiguousarray(np.concatenate(list(batch[key]), axis=0)))
    return out
