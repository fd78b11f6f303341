"""The experiment schema: YAML + key=value overrides, validated with errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mcl.config import (
    ExperimentConfig,
    LoraConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
)
from mcl.errors import ConfigError

SECTIONS = ["model", "stream", "method", "train", "eval", "scaling", "tracking"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.model.name == "tiny-llava"
    assert cfg.stream.name == "generated"
    assert cfg.method.name == "sequential_lora"
    assert cfg.train.batch_size % cfg.scaling.num_workers == 0
    assert isinstance(cfg.model.lora, LoraConfig)


def test_yaml_plus_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "exp.yaml",
        "train:\n  lr: 0.01\n  epochs: 2\nstream:\n  options: {seed: 1, train_per_task: 8}\n"
        "model:\n  lora: {r: 16, alpha: 32}\n",
    )
    cfg = load_config(path, ["train.lr=1e-3", "stream.options.seed=3", "model.lora.r=4"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2  # from the file, untouched by the overrides
    assert cfg.stream.options == {"seed": 3, "train_per_task": 8}  # nested override merges
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha == 32


def test_overrides_without_file_create_nested_mappings() -> None:
    cfg = load_config(None, ["stream.options.seed=3", "method.params={}", "tracking.run_name=abc"])
    assert cfg.stream.options == {"seed": 3}
    assert cfg.tracking.run_name == "abc"


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "0.001", "1.0e-3"])
def test_float_in_scientific_notation(text: str, tmp_path: Path) -> None:
    assert load_config(None, [f"train.lr={text}"]).train.lr == pytest.approx(1e-3)
    assert load_config(_write(tmp_path / "c.yaml", f"train: {{lr: {text}}}\n")).train.lr == pytest.approx(
        1e-3
    )


def test_string_values_stay_strings() -> None:
    cfg = load_config(None, ["tracking.run_name=1e3x", "stream.root=/data/some path"])
    assert cfg.tracking.run_name == "1e3x"
    assert cfg.stream.root == "/data/some path"


def test_unknown_top_level_key_lists_sections() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trian.lr=1"])
    message = str(info.value)
    assert message.startswith("trian: unknown key")
    for section in SECTIONS:
        assert section in message


def test_unknown_nested_key_names_dotted_field_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.lora.rank=4"])
    message = str(info.value)
    assert message.startswith("model.lora.rank: unknown key")
    for key in ("r", "alpha", "dropout", "target_modules", "train_projector"):
        assert key in message


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: unknown key.*\blr\b"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", r"^train\.epochs: must be an integer, got 'three'"),
        ("train.epochs=true", r"^train\.epochs: must be an integer, got True"),
        ("train.epochs=1.5", r"^train\.epochs: must be an integer, got 1\.5"),
        ("train.lr=fast", r"^train\.lr: must be a number, got 'fast'"),
        ("train.lr=false", r"^train\.lr: must be a number, got False"),
        ("scaling.use_gpu=1", r"^scaling\.use_gpu: must be true or false, got 1"),
        ("model.name=3", r"^model\.name: must be a string, got 3"),
        ("stream.options=[1, 2]", r"^stream\.options: must be a mapping"),
        ("train=5", r"^train: must be a mapping of \['epochs'"),
        ("model.dtype=float64", r"^model\.dtype: must be one of \['float32', 'bfloat16', 'float16'\]"),
        ("scaling.zero_stage=true", r"^scaling\.zero_stage: must be one of \[0, 1, 2, 3\], got True"),
    ],
)
def test_wrong_types(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_int_accepted_for_float() -> None:
    cfg = load_config(None, ["train.lr=1", "model.lora.dropout=0"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.model.lora.dropout) is float


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=0"], r"^train\.lr: must be > 0, got 0\.0"),
        (["train.lr=-1e-3"], r"^train\.lr: must be > 0"),
        (["train.epochs=0"], r"^train\.epochs: must be >= 1"),
        (
            ["train.batch_size=5", "scaling.num_workers=2"],
            r"^train\.batch_size: must be a positive multiple of scaling\.num_workers \(2\), got 5",
        ),
        (["train.batch_size=2", "scaling.num_workers=4"], r"^train\.batch_size: must be a positive multiple"),
        (["scaling.zero_stage=4"], r"^scaling\.zero_stage: must be one of \[0, 1, 2, 3\], got 4"),
        (["model.lora.dropout=1.0"], r"^model\.lora\.dropout: must be in \[0, 1\), got 1\.0"),
        (["model.lora.r=0"], r"^model\.lora\.r: must be >= 1"),
        (["eval.max_new_tokens=0"], r"^eval\.max_new_tokens: must be >= 1"),
        (["scaling.num_workers=0"], r"^scaling\.num_workers: must be >= 1"),
        (["eval.backend=tune"], r"^eval\.backend: must be one of"),
        (["eval.num_actors=0"], r"^eval\.num_actors: must be >= 1, got 0"),
        (["eval.resources_per_actor={CPU: -1}"], r"^eval\.resources_per_actor: must map resource names"),
        (["eval.resources_per_actor={CPU: many}"], r"^eval\.resources_per_actor: must"),
    ],
)
def test_impossible_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_batch_size_multiple_of_workers_is_fine() -> None:
    cfg = load_config(None, ["train.batch_size=6", "scaling.num_workers=3"])
    assert cfg.train.batch_size == 6


@pytest.mark.parametrize("text", ["train.lr", "train.lr 1e-3", ""])
def test_override_without_equals(text: str) -> None:
    with pytest.raises(ConfigError, match=r"expected key=value, e\.g\. train\.lr=1e-3"):
        load_config(None, [text])


@pytest.mark.parametrize("text", ["train..lr=1", ".lr=1", "train.=1"])
def test_override_with_empty_key_segment(text: str) -> None:
    with pytest.raises(ConfigError, match="empty key segment"):
        parse_override(text)


def test_override_with_invalid_yaml_value() -> None:
    with pytest.raises(ConfigError, match=r"value is not valid YAML"):
        load_config(None, ["stream.options={seed: [1"])


def test_override_through_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^train\.lr: is a value, cannot set train\.lr\.x"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=1"])


def test_override_value_may_contain_equals() -> None:
    assert parse_override("tracking.run_name=a=b") == (["tracking", "run_name"], "a=b")


def test_apply_overrides_does_not_mutate_input() -> None:
    data = {"train": {"lr": 1.0}}
    assert apply_overrides(data, ["train.lr=2"]) == {"train": {"lr": 2}}
    assert data == {"train": {"lr": 1.0}}


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", "train:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {str(path)!r} is not valid YAML")):
        load_config(path)


def test_yaml_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: must be a mapping of sections"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path / "empty.yaml", "")) == ExperimentConfig()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"config file {str(path)!r} does not exist")):
        load_config(path)


def test_config_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^config: must be a mapping"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "train.lr=1e-5",
            "stream.options={seed: 3, tasks: [aerial, street]}",
            "method.params={}",
            "model.lora.r=4",
            "model.dtype=bfloat16",
            "scaling.num_workers=2",
            "scaling.zero_stage=3",
            "tracking.run_name=x",
        ],
    )
    path = save_config(cfg, tmp_path / "nested" / "config.yaml")
    assert path.is_file()
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_save_config_round_trips_defaults(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_flat_gives_dotted_keys() -> None:
    cfg = load_config(None, ["stream.options.seed=3", "train.lr=0.5"])
    flat = cfg.flat()
    assert flat["train.lr"] == 0.5
    assert flat["model.lora.r"] == 8
    assert flat["stream.options.seed"] == 3
    assert flat["method.params"] == {}  # empty mappings stay as one entry
    assert all(key.split(".")[0] in SECTIONS for key in flat)
    assert not any(isinstance(value, dict) and value for value in flat.values())
    assert "model.lora" not in flat and "train" not in flat


def test_eval_backend_defaults_to_the_workers_and_the_local_executor_refuses_the_pool(
    tiny_model_path, generated_root, tmp_path
) -> None:
    from mcl.run.executors.local import LocalExecutor
    from mcl.run.prepare import prepare_run
    from mcl.run.rundir import RunDir

    cfg = load_config(None, [])
    assert (cfg.eval.backend, cfg.eval.num_actors, cfg.eval.resources_per_actor) == (
        "workers",
        1,
        {"CPU": 1.0},
    )
    pool = load_config(
        "jobs/configs/default.yaml",
        [f"stream.root={generated_root}", "eval.backend=ray_data", "eval.resources_per_actor={CPU: 2}"],
    )
    assert pool.eval.resources_per_actor == {"CPU": 2.0}
    with pytest.raises(ConfigError, match=r"^eval\.backend: the local executor .* got 'ray_data'"):
        LocalExecutor(prepare_run(pool, log=lambda _m: None), RunDir(tmp_path))
