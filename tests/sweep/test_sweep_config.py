"""Sweep YAML validation, trial expansion and concurrency: pure functions, no Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mcl.errors import ConfigError
from mcl.sweep import (
    expand_trials,
    load_sweep_config,
    max_concurrent,
    sweep_config_from_dict,
    trial_resources,
)

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "jobs" / "configs" / "default.yaml")


def _sweep(**changes):
    data = {"name": "t", "base": BASE, "methods": ["sequential_lora"], "streams": ["generated"], **changes}
    return sweep_config_from_dict(data)


def test_every_shipped_sweep_yaml_validates_and_expands():
    shipped = sorted(REPO.glob("jobs/configs/sweep*.yaml")) + sorted(REPO.glob("clusters/sweep*.yaml"))
    assert any(p.name == "sweep_default.yaml" for p in shipped)
    for path in shipped:
        trials = expand_trials(load_sweep_config(path))
        assert trials, path


def test_default_sweep_is_several_methods_times_two_seeds():
    trials = expand_trials(load_sweep_config(REPO / "jobs" / "configs" / "sweep_default.yaml"))
    assert len({t.method for t in trials}) >= 3
    assert {t.seed for t in trials} == {0, 1}
    assert len({t.key for t in trials}) == len(trials)
    for t in trials:
        assert t.config["method"]["name"] == t.method
        assert t.config["train"]["seed"] == t.seed
        assert t.config["tracking"]["run_name"] == t.key


def test_grid_axes_multiply_and_values_reach_the_trial_config():
    sweep = _sweep(
        methods=["sequential_lora", {"name": "ewc", "search": {"ewc_lambda": {"grid": [100.0, 1000.0]}}}],
        seeds=[0, 1],
        search={"train.lr": {"grid": [0.001, 0.003]}},
    )
    trials = expand_trials(sweep)
    # sequential: 2 lr x 2 seeds; ewc: 2 lr x 2 lambda x 2 seeds
    assert len(trials) == 4 + 8
    ewc = [t for t in trials if t.method == "ewc"]
    assert {(t.config["train"]["lr"], t.config["method"]["params"]["ewc_lambda"]) for t in ewc} == {
        (0.001, 100.0),
        (0.001, 1000.0),
        (0.003, 100.0),
        (0.003, 1000.0),
    }
    assert all("lr=" in t.label for t in trials)
    # The seed is not part of the label: the leaderboard averages seeds of one configuration.
    assert len({t.label for t in ewc}) == 4


def test_random_spaces_are_drawn_reproducibly_within_their_bounds():
    spaces = {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "train.weight_decay": {"uniform": [0.0, 0.1]},
        "train.batch_size": {"choice": [8, 16]},
    }
    sweep = _sweep(search=spaces, num_samples=5)
    first, second = expand_trials(sweep), expand_trials(sweep)
    assert len(first) == 5
    assert [t.config for t in first] == [t.config for t in second]  # a re-run sees the same trials
    for t in first:
        assert 1e-4 <= t.config["train"]["lr"] <= 1e-2
        assert 0.0 <= t.config["train"]["weight_decay"] <= 0.1
        assert t.config["train"]["batch_size"] in (8, 16)
    assert len({t.config["train"]["lr"] for t in first}) == 5


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"methods": []}, "methods"),
        ({"methods": [{"nam": "x"}]}, "methods[0].nam"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"search": {"train.lr": {"between": [1, 2]}}}, "search.train.lr"),
        ({"search": {"train.lr": {"loguniform": [0.0, 1.0]}}}, "search.train.lr.loguniform"),
        ({"search": {"train.lr": {"uniform": [2.0, 1.0]}}}, "search.train.lr.uniform"),
        ({"max_concurrent_trials": -1}, "max_concurrent_trials"),
        ({"early_stopping": {"metric": "loss"}}, "early_stopping.metric"),
        ({"tracking": {"url": "x"}}, "tracking.url"),
        ({"colour": 1}, "sweep.colour"),
        ({"name": "a b"}, "name"),
        ({"storage": "s3://bucket/sweeps"}, "storage"),
        ({"orders": 0}, "orders"),
        ({"orders": [["a", "b"], []]}, "orders[1]"),
        ({"orders": [["a", "a"]]}, "orders[0]"),
        ({"orders": [["a", "b"], ["a", "b"]]}, "orders"),
        ({"order_seed": "x"}, "order_seed"),
    ],
)
def test_bad_sweep_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match="^" + re.escape(field)):
        _sweep(**changes)


def test_a_trial_with_a_bad_value_fails_before_anything_runs():
    sweep = _sweep(search={"train.lr": {"grid": [0.001, -1.0]}})
    with pytest.raises(ConfigError, match=r"trial .*lr=-1.*train\.lr: must be > 0"):
        expand_trials(sweep)
    with pytest.raises(ConfigError, match="unknown method"):
        expand_trials(_sweep(methods=["no_such_method"]))
    with pytest.raises(ConfigError, match="unknown stream 'nowhere'"):
        expand_trials(_sweep(streams=["nowhere"]))
    with pytest.raises(ConfigError, match="ewc_lambda"):
        expand_trials(_sweep(methods=[{"name": "ewc", "params": {"ewc_lambda": -1.0}}]))


def test_yaml_overrides_and_relative_base(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"name": "s", "base": "base.yaml", "methods": ["joint"], "streams": ["generated"]})
    )
    sweep = load_sweep_config(path, ["seeds=[3,4]", "tracking.uri=http://127.0.0.1:5000"])
    assert sweep.base == str(tmp_path / "base.yaml")
    assert sweep.seeds == [3, 4] and sweep.tracking.uri == "http://127.0.0.1:5000"
    trials = expand_trials(sweep)
    assert [t.config["train"]["epochs"] for t in trials] == [2, 2]
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep_config(tmp_path / "missing.yaml")


def test_concurrency_counts_the_train_workers_each_trial_starts():
    trials = expand_trials(_sweep(overrides={"scaling.num_workers": 2, "train.batch_size": 16}))
    assert trial_resources(trials[0]) == {"CPU": 3, "GPU": 0}
    assert max_concurrent(trials, {"CPU": 8}) == 2  # Tune alone would start 8
    assert max_concurrent(trials, {"CPU": 2}) == 1  # never 0: one trial waits for resources
    gpu = expand_trials(
        _sweep(overrides={"scaling.num_workers": 8, "scaling.use_gpu": True, "train.batch_size": 16})
    )
    assert max_concurrent(gpu, {"CPU": 200, "GPU": 16}) == 2


def test_orders_are_seeded_permutations_the_first_the_published_one(generated_root):
    from mcl.streams import build_stream

    published = build_stream("generated", generated_root, {}).task_names
    over = {"stream.root": str(generated_root)}
    sweep = _sweep(overrides=over, orders=3, seeds=[0, 1], order_seed=7)
    trials = expand_trials(sweep)
    assert [t.key for t in trials][:3] == [
        "sequential_lora-generated-o0-s0",
        "sequential_lora-generated-o0-s1",
        "sequential_lora-generated-o1-s0",
    ]
    orders = [t.config["stream"]["task_order"] for t in trials[::2]]
    assert orders[0] == published and all(sorted(o) == sorted(published) for o in orders)
    assert len({tuple(o) for o in orders}) == 3  # distinct
    assert [t.task_order for t in trials[::2]] == orders and [t.order for t in trials[::2]] == [0, 1, 2]
    assert [t.config["stream"]["task_order"] for t in expand_trials(sweep)[::2]] == orders  # reproducible
    other = expand_trials(_sweep(overrides=over, orders=3, order_seed=8))
    assert [t.config["stream"]["task_order"] for t in other] != orders
    # One order: keys and configs as before orders existed (a sweep saved then still resumes).
    (single,) = expand_trials(_sweep(overrides=over))
    assert single.key == "sequential_lora-generated-s0" and single.config["stream"]["task_order"] == []


def test_explicit_orders_must_name_every_task(generated_root):
    over = {"stream.root": str(generated_root), "stream.options": {"tasks": ["aerial", "underwater"]}}
    trials = expand_trials(
        _sweep(overrides=over, orders=[["underwater", "aerial"], ["aerial", "underwater"]])
    )
    assert [t.config["stream"]["task_order"] for t in trials] == [
        ["underwater", "aerial"],
        ["aerial", "underwater"],
    ]
    with pytest.raises(
        ConfigError, match=r"^orders\[0\]: .*unknown: \['street'\], missing: \['underwater'\]"
    ):
        expand_trials(_sweep(overrides=over, orders=[["aerial", "street"]]))
    with pytest.raises(ConfigError, match="^orders: 3 orders asked, .* only 2 orders"):
        expand_trials(_sweep(overrides=over, orders=3))


def test_a_sweep_saved_before_orders_existed_resumes():
    from mcl.sweep.config import check_resumable

    sweep = _sweep()
    saved = {k: v for k, v in sweep.flat().items() if k not in ("orders", "order_seed")}
    check_resumable(sweep, saved)
    with pytest.raises(ConfigError, match="orders: 1 -> 2"):
        check_resumable(_sweep(orders=2), saved)
