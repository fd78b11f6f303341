"""Evaluation batches: rows ordered by prompt length (and answer type), answers put back in the original order,
and generation stopped per answer type (``eval.sort_by_length``, ``eval.max_new_tokens_by_type``,
``eval.stop_strings_by_type``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mcl.config import load_config
from mcl.data import POSITION, AnswerOrder, evaluation_order, in_original_order, shard
from mcl.errors import ConfigError
from mcl.evaluation.generation import cut_at_stop
from mcl.lengths import padding_fraction


def test_evaluation_order_sorts_longest_first_within_answer_types() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, 101)
    groups = [str(t) for t in rng.choice(["exact", "choice", "contains"], 101)]
    order = evaluation_order(lengths, groups)
    assert sorted(order.tolist()) == list(range(101))
    ordered_groups = [groups[i] for i in order]
    runs = [g for k, g in enumerate(ordered_groups) if k == 0 or g != ordered_groups[k - 1]]
    assert runs == list(dict.fromkeys(groups))  # one run per type, in order of first appearance
    for g in runs:
        mine = [int(lengths[i]) for i in order if groups[i] == g]
        assert mine == sorted(mine, reverse=True)
    assert evaluation_order(None, ["b", "a", "b", "a"]).tolist() == [0, 2, 1, 3]  # stable without lengths
    assert evaluation_order(np.asarray([3, 5, 5, 1])).tolist() == [1, 2, 0, 3]


def test_sorted_shards_are_even_less_padded_and_gathered_back_in_the_original_order() -> None:
    """Under Ray each rank evaluates positions ``rank::world`` of the order; rank 0 gathers rank-major."""
    rng = np.random.default_rng(1)
    n, batch = 203, 8
    lengths = rng.choice([30, 60, 200], n, p=[0.55, 0.3, 0.15]) + rng.integers(0, 20, n)
    rows = [{"id": f"s{i}", "answer_type": "exact"} for i in range(n)]
    plain, ordered = AnswerOrder(rows, np.arange(n)), AnswerOrder(rows, evaluation_order(lengths))
    assert sorted(r[POSITION] for r in ordered) == list(range(n))
    for world in (1, 2, 3):
        shards = [list(shard(ordered, rank, world)) for rank in range(world)]
        assert [len(s) for s in shards] == [len(shard(plain, rank, world)) for rank in range(world)]
        records = [{**r, "prediction": r["id"]} for part in shards for r in part]  # rank-major, as gathered
        restored = in_original_order(records)
        assert [r["id"] for r in restored] == [r["id"] for r in rows]
        assert all(POSITION not in r for r in restored)
        before = sum(
            padding_fraction([int(lengths[r[POSITION]]) for r in shard(plain, k, world)], batch)
            for k in range(world)
        )
        after = sum(padding_fraction([int(lengths[r[POSITION]]) for r in s], batch) for s in shards)
        assert after < 0.25 * before


def test_cut_at_stop_cuts_where_the_first_stop_string_ends() -> None:
    assert cut_at_stop("red car. blue", (".",)) == "red car"
    assert cut_at_stop("red car", (".", "\n")) == "red car"
    assert cut_at_stop("abc", ("abc", "b")) == "a"  # "b" ends first: the text up to it decides
    assert cut_at_stop("xab", ("ab", "b")) == "x"  # same end: the longest stop string
    assert cut_at_stop("yes\nno", ("\n",)) == "yes"


def test_per_type_settings_are_validated_naming_the_field() -> None:
    from mcl.config import config_from_dict
    from mcl.run.prepare import check_eval_answer_types

    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens_by_type\.exact: must be an integer >= 1"):
        config_from_dict({"eval": {"max_new_tokens_by_type": {"exact": 0}}})
    with pytest.raises(ConfigError, match=r"eval\.stop_strings_by_type\.exact: must be a list of non-empty"):
        config_from_dict({"eval": {"stop_strings_by_type": {"exact": [""]}}})
    with pytest.raises(ConfigError, match=r"eval\.sort_by_length: must be true or false"):
        config_from_dict({"eval": {"sort_by_length": "yes"}})
    cfg = config_from_dict({"eval": {"stop_strings_by_type": {"exactt": ["."]}}})
    with pytest.raises(
        ConfigError, match=r"eval\.stop_strings_by_type\.exactt: unknown answer type 'exactt'"
    ):
        check_eval_answer_types(cfg)
    check_eval_answer_types(config_from_dict({"eval": {"max_new_tokens_by_type": {"choice": 2}}}))


@pytest.fixture(scope="module")
def tiny_eval(tiny_model_path: str, generated_root: Path):
    """The tiny LLaVA (untrained LoRA: the base model answers), its evaluator pieces, and 24 test rows of the
    generated stream whose prompts differ in length."""
    import torch

    from mcl.data import sample_row
    from mcl.methods_api import TaskContext, build_method
    from mcl.models import load_model_and_processor
    from mcl.streams import build_stream

    cfg = load_config("jobs/configs/default.yaml", [])
    stream = build_stream("generated", generated_root, {})
    rows = [sample_row(s) for t in stream.tasks for s in t.test[:6]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny forwards: more threads only contend on a shared host
    base, processor = load_model_and_processor(tiny_model_path)
    method = build_method("sequential_lora", {})
    ctx = TaskContext(
        task_index=0, task_names=tuple(stream.task_names), lora=cfg.model.lora, processor=processor
    )
    yield method.setup_model(base, ctx).eval(), method, processor, ctx, rows, tiny_model_path
    torch.set_num_threads(threads)


def _predict(tiny_eval, rows, limits, batch_size: int = 5):
    import torch

    from mcl.data import Preprocessor, local_batches
    from mcl.evaluation.generation import GenerationEvaluator

    model, method, processor, ctx, _, path = tiny_eval
    evaluator = GenerationEvaluator(model, method, processor, limits, torch.device("cpu"), torch.float32)
    return evaluator.predict(local_batches(rows, Preprocessor(path, train=False), batch_size), ctx)


def test_sorted_batches_answer_as_before_in_the_original_order(tiny_eval, tiny_model_path: str) -> None:
    from mcl.lengths import prompt_lengths

    rows = tiny_eval[4]
    lengths = prompt_lengths(rows, tiny_model_path)
    assert len(set(lengths.tolist())) > 1
    before = _predict(tiny_eval, AnswerOrder(rows, np.arange(len(rows))), 6)
    after = _predict(tiny_eval, AnswerOrder(rows, evaluation_order(lengths)), 6)
    assert [r["id"] for r in after] == [r["id"] for r in rows]
    assert [r["prediction"] for r in after] == [r["prediction"] for r in before]


def test_generation_stops_at_each_types_stop_string_and_token_limit(tiny_eval) -> None:
    """Stop strings taken from the untrained model's own answers: each row stops at its type's first stop
    string (or token limit) and its prediction is the full answer cut there."""
    from mcl.evaluation.generation import AnswerLimits

    rows = [{**r, "answer_type": "exact" if k % 2 else "contains"} for k, r in enumerate(tiny_eval[4])]
    full = _predict(tiny_eval, rows, 8)
    words = [w for r in full if r["answer_type"] == "exact" for w in r["prediction"].split()[1:]]
    stop = max(set(words), key=words.count)  # the word the model most often says after its first
    limits = AnswerLimits(8, {"contains": 3}, {"exact": [stop]})
    cut = _predict(
        tiny_eval, AnswerOrder(rows, evaluation_order(None, [r["answer_type"] for r in rows])), limits
    )
    assert [r["id"] for r in cut] == [r["id"] for r in rows]
    stopped = 0
    for a, b in zip(full, cut, strict=True):
        if a["answer_type"] == "exact":
            assert b["prediction"] == cut_at_stop(a["prediction"], (stop,)).strip()
            stopped += b["prediction"] != a["prediction"]
        else:
            assert b["prediction"] == " ".join(
                a["prediction"].split()[:3]
            )  # word-level tokenizer: a word a token
    assert stopped > 0
