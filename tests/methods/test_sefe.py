"""SEFE's mechanisms: Answer Style Diversification rewrites the configured share of a task's samples, a quarter
into each other style, the same for the same seed; the rules give consistent answers (the multiple-choice
letter points at the gold answer, yes/no says whether the candidate is it); RegLoRA's key positions are the
largest entries of each update, accumulate over tasks, and its penalty is zero at the previous weights and grows
with the new update at those positions; earlier adapters stay bit-identical."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcl.config import load_config
from mcl.errors import ConfigError
from mcl.methods_api import build_method
from mcl.run import prepare_run, run_stream_locally
from mcl.streams import build_stream
from mcl.streams.samples import Sample
from methods.sefe import (
    KEYS_FILE,
    STYLES,
    answer_style,
    diversify,
    key_penalty,
    key_positions,
    load_rewriter,
    rewrite_by_rules,
)

SMALL_STREAM = {"train_per_task": 32, "test_per_task": 8}


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sefe_stream") / "generated"
    return root, build_stream("generated", root, SMALL_STREAM)


def test_params_are_validated_naming_the_field():
    for field, value in (("lambda_reg", -1.0), ("key_percent", 0.0), ("asd_share", 1.5), ("asd_rewriter", "x")):
        with pytest.raises(ConfigError, match=field):
            build_method("sefe", {field: value})
    params = build_method("sefe").params
    assert (params.lambda_reg, params.key_percent, params.asd_share) == (2.5e3, 2.0, 0.2)


def test_asd_rewrites_the_share_a_quarter_per_other_style_and_is_deterministic(stream):
    _, s = stream
    task = s.tasks[0]
    samples, counts = diversify(task, 0.25, seed=3, rewriter=rewrite_by_rules)
    assert len(samples) == len(task.train) == 32
    changed = [i for i in range(32) if samples[i] != task.train[i]]
    assert len(changed) == 8  # a quarter of 32
    assert counts == {"yes_no": 2, "multiple_choice": 2, "short_answer": 0, "brief_explanation": 2,
                      "detailed_explanation": 2, "kept_native": 0}  # short answer is the samples' own style
    styles = sorted(answer_style(samples[i]) for i in changed)
    assert styles.count("yes_no") == 2 and styles.count("multiple_choice") == 2
    again, _ = diversify(task, 0.25, seed=3, rewriter=rewrite_by_rules)
    assert [again[i] for i in range(32)] == [samples[i] for i in range(32)]
    other, _ = diversify(task, 0.25, seed=4, rewriter=rewrite_by_rules)
    assert {i for i in range(32) if other[i] != task.train[i]} != set(changed)
    none, counts0 = diversify(task, 0.0, seed=3, rewriter=rewrite_by_rules)
    assert [none[i] for i in range(32)] == list(task.train) and sum(counts0.values()) == 0


def test_rule_answers_are_consistent():
    sample = Sample("s1", "/img.png", "what is under the water ?", "coral", task="underwater")
    choices = ["coral", "fish", "shell", "rock"]
    for seed in range(20):
        mcq = rewrite_by_rules(sample, "multiple_choice", choices, random.Random(seed))
        options = dict(line.split(". ", 1) for line in mcq.question.splitlines()[1:-1])
        assert sorted(options.values()) == sorted(choices) and options[mcq.answer] == "coral"
        assert answer_style(mcq) == "multiple_choice"
        yn = rewrite_by_rules(sample, "yes_no", choices, random.Random(seed))
        candidate = yn.question.split("Is the answer ")[1].split("?")[0]
        assert yn.answer == ("yes" if candidate == "coral" else "no")
    # From a multiple-choice sample: the chosen option is the short answer.
    short = rewrite_by_rules(mcq, "short_answer", choices, random.Random(0))
    assert short.answer == "coral" and "A." not in short.question
    assert rewrite_by_rules(yn, "short_answer", choices, random.Random(0)) is None  # yes/no: nothing to ask
    assert load_rewriter("methods.sefe:rewrite_by_rules") is rewrite_by_rules
    with pytest.raises(ValueError, match="asd_rewriter"):
        load_rewriter("methods.sefe:no_such_function")
    assert set(STYLES) >= {answer_style(mcq), answer_style(yn), answer_style(short)}


def test_key_positions_are_the_largest_entries():
    update = torch.zeros(4, 5)
    update[1, 2], update[3, 0], update[0, 4] = -9.0, 8.0, 1.0
    assert key_positions(update, 10.0).tolist() == [[1, 2], [3, 0]]  # 10% of 20 entries
    assert key_positions(update, 0.1).tolist() == [[1, 2]]  # at least one


def test_penalty_is_zero_at_the_previous_weights_and_grows_away_from_them():
    torch.manual_seed(0)
    a, b = torch.randn(3, 6), torch.randn(5, 3)
    keys = torch.tensor([[0, 1], [4, 5], [2, 2], [0, 1]])  # a repeated position counts twice, as released
    assert key_penalty(a, torch.zeros(5, 3), keys) == 0.0  # the new update B A is zero at the start
    direct = (b @ a)[keys[:, 0], keys[:, 1]].abs().mean()
    assert torch.allclose(key_penalty(a, b, keys), direct)
    values = [float(key_penalty(a, c * b, keys)) for c in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] == 0.0
    assert values[3] == pytest.approx(2 * values[2]) and values[2] == pytest.approx(2 * values[1])
    b.requires_grad_(True)
    key_penalty(a, b, keys).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_two_tasks_accumulate_keys_keep_the_first_adapter_and_pay_the_penalty(stream, tmp_path):
    root, _ = stream
    options = [f"stream.options.{k}={v}" for k, v in SMALL_STREAM.items()]
    cfg = load_config(
        "jobs/configs/default.yaml",
        [f"stream.root={root}", *options, "scaling.num_workers=1", "scaling.deepspeed=false",
         f"tracking.output_dir={tmp_path}", "method.name=sefe", "train.epochs=2", "eval.max_new_tokens=2"],
    )
    result = run_stream_locally(prepare_run(cfg, log=lambda _m: None), tmp_path, tasks=2, log=lambda _m: None)
    first, second = (load_file(str(Path(d) / KEYS_FILE)) for d in result.state_dirs)
    assert first and sorted(first) == sorted(second)
    for name, keys in first.items():
        assert torch.equal(second[name][keys.shape[0] :], keys)  # the new task's positions, then the earlier ones
        assert second[name].shape[0] == 2 * keys.shape[0]
    adapters = [load_file(str(Path(d) / "adapters" / "task0" / "adapter_model.safetensors")) for d in result.state_dirs]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    # No penalty on the first task; on the second, zero at its first step (B = 0), then positive.
    one, two = ([e["extra_loss"] for e in r.train_log] for r in result.results)
    assert set(one) == {0.0}
    assert two[0] == 0.0 and max(two) > 0.0
