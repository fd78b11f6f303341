"""The tiny local LLaVA: an ordinary Hugging Face checkpoint, loaded like any real model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mcl.tiny_models as tiny_models
from mcl.data import Preprocessor, collate, rows_to_batch, sample_row
from mcl.errors import UnknownNameError
from mcl.models import load_model_and_processor, resolve_model_path
from mcl.streams import build_stream
from mcl.streams.generated import GENERATED_VOCABULARY
from mcl.tiny_models import BUILTIN_MODELS


@pytest.fixture(scope="module")
def loaded(tiny_model_path: str):
    return load_model_and_processor(tiny_model_path)


def test_tiny_llava_is_an_ordinary_hf_folder(tiny_model_path: str) -> None:
    folder = Path(tiny_model_path)
    assert folder.is_absolute() and folder.is_dir()
    names = {p.name for p in folder.iterdir()}
    assert "config.json" in names
    assert "model.safetensors" in names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert names & {"processor_config.json", "preprocessor_config.json"}
    assert names & {"chat_template.jinja", "chat_template.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert not list(folder.parent.glob("*.tmp*")), "no temporary build folder is left behind"


def test_loads_through_the_generic_path(loaded) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, processor = loaded
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert model.dtype == torch.float32
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    # Every word of the generated stream is in the vocabulary (no <unk> in prompts or answers).
    unk = tokenizer.unk_token_id
    for word in [*GENERATED_VOCABULARY, *BUILTIN_MODELS["tiny-llava"].vocabulary()]:
        assert tokenizer.convert_tokens_to_ids(word) != unk, word


def test_load_in_bfloat16(tiny_model_path: str) -> None:
    model, _ = load_model_and_processor(tiny_model_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_chat_template_renders_image_prompt(loaded) -> None:
    _, processor = loaded
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the room ?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>" in prompt
    assert "what is in the room ?" in prompt
    assert prompt.rstrip().endswith("ASSISTANT:")
    without = processor.apply_chat_template(messages, add_generation_prompt=False)
    assert "ASSISTANT" not in without


def test_greedy_generate_on_generated_image(loaded, tiny_model_path: str, generated_root: Path) -> None:
    model, processor = loaded
    stream = build_stream("generated", generated_root, {})
    rows = [sample_row(s) for s in stream.tasks[1].test[:2]]
    batch = collate(
        Preprocessor(tiny_model_path, train=False)(rows_to_batch(rows)),
        processor.tokenizer.pad_token_id,
        left_pad=True,
    )
    model.eval()
    with torch.no_grad():
        first = model.generate(**batch, max_new_tokens=3, do_sample=False)
        second = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(first, second), "greedy decoding is deterministic"
    new = first[:, batch["input_ids"].shape[1] :]
    assert 1 <= new.shape[1] <= 3
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_unknown_name_lists_builtins_and_forms() -> None:
    with pytest.raises(UnknownNameError) as info:
        resolve_model_path("no-such-model")
    message = str(info.value)
    assert "'no-such-model'" in message
    for name in BUILTIN_MODELS:
        assert name in message
    assert "local checkpoint folder" in message
    assert "hub id 'org/name'" in message


@pytest.mark.parametrize("name", ["./missing/folder", "/abs/missing", "a/b/c", ""])
def test_unusable_names(name: str) -> None:
    with pytest.raises(UnknownNameError, match="unknown model"):
        resolve_model_path(name)


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UnknownNameError, match=r"has no config\.json"):
        resolve_model_path(str(tmp_path))


def test_local_folder_is_returned_absolute(tiny_model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(tiny_model_path)
    monkeypatch.chdir(folder.parent)
    assert resolve_model_path(folder.name) == str(folder.resolve())


@pytest.mark.parametrize("hub_id", ["llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2-VL-2B-Instruct", "org/name"])
def test_hub_ids_are_returned_unchanged(hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_model_path(hub_id) == hub_id


def test_same_vocabulary_same_cache_folder_no_rebuild(
    tiny_model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Path(tiny_model_path).parent
    weights = Path(tiny_model_path) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def _no_rebuild(*args, **kwargs):
        raise AssertionError("the tiny model was rebuilt although its vocabulary did not change")

    monkeypatch.setattr(tiny_models, "build_random_model", _no_rebuild)
    assert resolve_model_path("tiny-llava", cache_dir=cache) == tiny_model_path
    assert weights.stat().st_mtime_ns == stamp
    # Without cache_dir the session's $MCL_CACHE_DIR/models is used: the same folder.
    assert resolve_model_path("tiny-llava") == tiny_model_path


def test_other_vocabulary_other_cache_folder(
    tiny_model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []

    def _fake_build(model_type, out_dir, vocabulary, shape, **kwargs):
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        built.append(out)
        return out

    monkeypatch.setattr(tiny_models, "build_random_model", _fake_build)
    other_words = replace(BUILTIN_MODELS["tiny-llava"], template_words=("only", "these", "words"))
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-llava", other_words)
    path = resolve_model_path("tiny-llava", cache_dir=tmp_path)
    assert Path(path).name != Path(tiny_model_path).name
    assert Path(path).name.startswith("tiny-llava-")
    assert (Path(path) / "config.json").is_file()
    assert len(built) == 1
    assert resolve_model_path("tiny-llava", cache_dir=tmp_path) == path
    assert len(built) == 1, "built once, then reused"
