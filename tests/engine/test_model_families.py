"""Every model family through the one loading path: tiny random LLaVA-1.5, Qwen2.5-VL and InternVL.

Each tiny model is made of its family's real transformers classes, loads back with
``AutoModelForImageTextToText`` / ``AutoProcessor`` (:func:`mcl.models.load_model_and_processor`), prompts
through its own chat template, gets LoRA on its language model only, and runs two tasks of a small
generated stream end to end (train, save, reload, evaluate): in process, and (slow) Qwen2.5-VL and InternVL
on 2 Ray Train workers under DeepSpeed ZeRO-2.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from mcl.adapters import lora_target_modules, new_lora, projector_module_names
from mcl.config import LoraConfig, load_config
from mcl.data import (
    IGNORE_INDEX,
    Preprocessor,
    build_prompt,
    collate,
    local_batches,
    rows_to_batch,
    sample_row,
)
from mcl.errors import ConfigError
from mcl.models import LANGUAGE_MODEL_LINEARS, load_model_and_processor, resolve_model_path
from mcl.streams import build_stream
from mcl.streams.generated import GENERATED_VOCABULARY
from mcl.tiny_models import BUILTIN_MODELS

DEFAULT = "jobs/configs/default.yaml"
TASKS = ["aerial", "underwater"]
STREAM_OPTIONS = {"tasks": TASKS, "train_per_task": 16, "test_per_task": 4}


@dataclass(frozen=True)
class Family:
    """What each tiny model must be: its real classes, its template's shape, where LoRA may and may not go."""

    model_type: str
    model_class: str
    processor_class: str
    image_then_text: str  # what the chat template renders for the image, up to the question
    generation_prompt: str  # how the chat template ends the prompt
    vision: str  # module path of the vision tower: no LoRA there
    projector: str  # module path of the multimodal projector: trained as a saved module


FAMILIES = {
    "tiny-llava": Family(
        model_type="llava",
        model_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor",
        image_then_text="USER: <image>\n",
        generation_prompt="ASSISTANT:",
        vision="model.vision_tower",
        projector="model.multi_modal_projector",
    ),
    "tiny-qwen2.5-vl": Family(
        model_type="qwen2_5_vl",
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        image_then_text="<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>",
        generation_prompt="<|im_end|>\n<|im_start|>assistant\n",
        vision="model.visual.blocks",
        projector="model.visual.merger",
    ),
    "tiny-internvl": Family(
        model_type="internvl",
        model_class="InternVLForConditionalGeneration",
        processor_class="InternVLProcessor",
        image_then_text="<|im_start|>user\n<IMG_CONTEXT>\n",
        generation_prompt="<|im_end|>\n<|im_start|>assistant\n",
        vision="model.vision_tower",
        projector="model.multi_modal_projector",
    ),
}


def test_every_builtin_model_is_covered() -> None:
    assert set(FAMILIES) == set(BUILTIN_MODELS)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(family_name: str) -> str:
    """The built-in checkpoint folder, built once into the session's ``$MCL_CACHE_DIR`` (as ``prepare_run``
    resolves it)."""
    return resolve_model_path(family_name)


@pytest.fixture(scope="module")
def small_stream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("families") / "generated"
    build_stream("generated", root, STREAM_OPTIONS)
    return root


@pytest.fixture(scope="module")
def loaded(model_path: str):
    """The family's model and processor, for the tests that do not change the model."""
    return load_model_and_processor(model_path)


@pytest.fixture(scope="module")
def question_rows(small_stream_root: Path) -> list[dict]:
    """Two training rows per task (the questions differ in length)."""
    stream = build_stream("generated", small_stream_root, STREAM_OPTIONS)
    return [sample_row(s) for task in stream.tasks for s in task.train[:2]]


def test_builds_and_reloads_with_the_auto_classes(family_name: str, model_path: str, loaded) -> None:
    import transformers
    from transformers import AutoModelForImageTextToText

    family = FAMILIES[family_name]
    config = json.loads((Path(model_path) / "config.json").read_text())
    assert config["model_type"] == family.model_type
    assert config["architectures"] == [family.model_class]
    # A standard folder, whatever class wrote it (the image-only subclass keeps the name).
    saved_processor = json.loads((Path(model_path) / "processor_config.json").read_text())
    assert saved_processor["processor_class"] == family.processor_class
    model, processor = loaded
    assert isinstance(model, getattr(transformers, family.model_class))
    assert isinstance(processor, getattr(transformers, family.processor_class))
    assert isinstance(AutoModelForImageTextToText.from_pretrained(model_path), type(model))
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    unk = tokenizer.unk_token_id
    for word in GENERATED_VOCABULARY:
        assert tokenizer.convert_tokens_to_ids(word) != unk, word


def test_prompt_comes_from_the_chat_template(family_name: str, loaded) -> None:
    family = FAMILIES[family_name]
    _, processor = loaded
    question = "what is in the room ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = build_prompt(processor, question)
    assert prompt == processor.apply_chat_template(messages, add_generation_prompt=True)
    assert family.image_then_text + question in prompt
    assert prompt.endswith(family.generation_prompt)
    tokenizer = processor.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids, tokenizer.convert_ids_to_tokens(ids)


def test_training_rows_supervise_only_the_answer_and_eos(
    model_path: str, loaded, question_rows: list[dict]
) -> None:
    rows = question_rows
    tokenizer = loaded[1].tokenizer
    train = Preprocessor(model_path, train=True)(rows_to_batch(rows))
    prompts = Preprocessor(model_path, train=False)(rows_to_batch(rows))
    for i, row in enumerate(rows):
        ids, labels = train["input_ids"][i], train["labels"][i]
        n_prompt = len(prompts["input_ids"][i])
        assert list(ids[:n_prompt]) == list(prompts["input_ids"][i]), "the prompt is the evaluation prompt"
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        assert list(labels[n_prompt:]) == [*answer, tokenizer.eos_token_id]


def test_left_padded_batches_generate_as_single_samples(
    model_path: str, loaded, question_rows: list[dict]
) -> None:
    """Every processor output reaches the model (Qwen2.5-VL: image_grid_thw, mm_token_type_ids) and left
    padding does not change what a sample generates."""
    rows = question_rows
    model, processor = loaded
    model.eval()
    pad, eos = processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id
    preprocess = Preprocessor(model_path, train=False)

    def generate(some_rows: list[dict]) -> list[str]:
        batch = collate(preprocess(rows_to_batch(some_rows)), pad, left_pad=True)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=3, do_sample=False, pad_token_id=pad, eos_token_id=eos
            )
        return processor.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )

    batch = collate(preprocess(rows_to_batch(rows)), pad, left_pad=True)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the questions differ in length: some rows are padded"
    assert generate(rows) == [generate([row])[0] for row in rows]


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# (model.lora, the projections wrapped in every decoder layer, whether the projector trains as a saved module)
LORA_PLACEMENTS = {
    "family-default": (LoraConfig(), ATTENTION + MLP, True),
    "configured": (
        LoraConfig(target_modules=r".*language_model.*\.q_proj", train_projector=False),
        ("q_proj",),
        False,
    ),
}


@pytest.mark.parametrize("placement", list(LORA_PLACEMENTS))
def test_lora_goes_where_configured_and_never_into_the_vision_tower(
    family_name: str, model_path: str, placement: str
) -> None:
    """By default LoRA wraps every attention and MLP projection of the language model (and the projector
    trains as a saved module); ``model.lora.target_modules`` overrides the family default."""
    family = FAMILIES[family_name]
    lora, projections, trains_projector = LORA_PLACEMENTS[placement]
    model, _ = load_model_and_processor(model_path)  # fresh: new_lora wraps the model in place
    assert lora_target_modules(model, lora) == (lora.target_modules or LANGUAGE_MODEL_LINEARS)
    assert projector_module_names(model) == [family.projector.rsplit(".", 1)[-1]]
    peft_model = new_lora(model, lora)
    wrapped = [
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    ]
    layers = model.config.get_text_config().num_hidden_layers
    assert all(n.startswith("model.language_model.layers.") for n in wrapped), wrapped
    assert Counter(n.rsplit(".", 1)[-1] for n in wrapped) == dict.fromkeys(projections, layers), wrapped
    trainable = [
        n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad
    ]
    assert not [n for n in trainable if n.startswith(family.vision)], "nothing in the vision tower trains"
    saved_copies = {n.split(".modules_to_save")[0] for n in trainable if ".modules_to_save." in n}
    assert saved_copies == ({family.projector} if trains_projector else set()), saved_copies


def test_unknown_family_asks_for_target_modules() -> None:
    class Mystery(nn.Module):
        config = type("Config", (), {"model_type": "mystery_vlm"})()

    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: .*'mystery_vlm'.*set model\.lora"):
        lora_target_modules(Mystery(), LoraConfig())
    assert lora_target_modules(Mystery(), LoraConfig(target_modules="x")) == "x"


def _family_config(family_name: str, root: Path, *overrides: str):
    """In process by default (one worker, plain PyTorch); ``overrides`` come last and win."""
    return load_config(
        DEFAULT,
        [
            f"model.name={family_name}",
            f"stream.root={root}",
            f"stream.options={json.dumps(STREAM_OPTIONS)}",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            "train.epochs=4",  # 8 steps a task at a high rate: enough for answer words, not empty strings
            "train.lr=0.01",
            "train.batch_size=8",
            "eval.batch_size=8",
            "eval.max_new_tokens=3",
            *overrides,
        ],
    )


def test_two_tasks_train_save_reload_evaluate(
    family_name: str, small_stream_root: Path, tmp_path: Path
) -> None:
    """The whole local path for two tasks; the saved adapter, reloaded with peft onto a freshly loaded base
    model, gives the run's own predictions."""
    from peft import PeftModel

    from mcl.run import prepare_run, run_stream_locally

    cfg = _family_config(family_name, small_stream_root)
    prep = prepare_run(cfg, log=lambda _m: None)
    assert prep.model_path == resolve_model_path(family_name)
    result = run_stream_locally(prep, tmp_path / "run", log=lambda _m: None)
    assert len(result.matrix) == 2 and all(len(row) == 2 for row in result.matrix)
    assert result.baseline is not None
    for task_result in result.results:
        losses = [entry["loss"] for entry in task_result.train_log]
        assert len(losses) == 4 * 2  # 4 epochs of 16 samples in batches of 8
        assert losses[-1] < losses[0], losses
        assert len(task_result.predictions) == 2 * 4
    predicted = [r["prediction"] for r in result.results[-1].predictions]
    assert sum(p in GENERATED_VOCABULARY for p in predicted) >= len(predicted) // 2, predicted

    adapter = result.state_dirs[-1] / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert re.fullmatch(saved["target_modules"], "model.language_model.layers.0.self_attn.q_proj")
    base, processor = load_model_and_processor(prep.model_path)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training moved the adapter off zero"

    tokenizer = processor.tokenizer
    rows = [sample_row(s) for task in prep.stream.tasks for s in task.test]  # eval.max_samples_per_task=0
    predictions = {}
    for np_batch in local_batches(rows, Preprocessor(prep.model_path, train=False), cfg.eval.batch_size):
        batch = collate(np_batch, tokenizer.pad_token_id, left_pad=True)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg.eval.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        predictions.update({str(i): t.strip() for i, t in zip(np_batch["id"], texts, strict=True)})
    assert predictions == {r["id"]: r["prediction"] for r in result.results[-1].predictions}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-internvl"])
def test_two_tasks_on_ray_train_under_deepspeed_zero2(
    name: str, ray_session, small_stream_root: Path, tmp_path: Path
) -> None:
    """The real path beyond LLaVA (which tests/engine/test_ray_runs.py covers): Ray Data -> 2 Ray Train
    workers -> DeepSpeed ZeRO-2 -> MLflow, two tasks; each task trains, is evaluated on both tasks and saves
    its adapter (language-model LoRA + the projector)."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from mcl.run import run_experiment

    cfg = _family_config(
        name,
        small_stream_root,
        "scaling.num_workers=2",
        "scaling.deepspeed=true",
        "scaling.zero_stage=2",
        "scaling.ray_num_cpus=4",
        "train.epochs=1",  # 16 samples / global batch 8: 2 steps a task
        "eval.max_new_tokens=2",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.output_dir={tmp_path}/runs",
        f"tracking.run_name=ray-{name}",
    )
    summary = run_experiment(cfg, log=lambda _m: None)

    assert summary.task_names == TASKS
    assert len(summary.matrix) == 2 and all(len(row) == 2 for row in summary.matrix), summary.matrix
    assert all(0 <= a <= 100 for row in summary.matrix for a in row), summary.matrix
    assert {"mft", "mfn", "maa", "bwt"} <= set(summary.metrics)
    for task_result in summary.task_results:
        losses = [entry["loss"] for entry in task_result.train_log]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
        assert len(task_result.predictions) == 2 * 4, "both tasks' test sets are evaluated"
    projector = FAMILIES[name].projector
    for state_dir in summary.state_dirs:
        adapter = Path(state_dir) / "adapter"
        saved = json.loads((adapter / "adapter_config.json").read_text())
        assert re.fullmatch(saved["target_modules"], "model.language_model.layers.0.self_attn.q_proj")
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        lora_b = [t for k, t in tensors.items() if "lora_B" in k]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "training moved the adapter off zero"
        assert [k for k in tensors if f"{projector}." in k], "the projector is saved with the adapter"
    client = MlflowClient(summary.tracking_uri)
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    matrix_file = Path(client.download_artifacts(summary.run_id, "accuracy_matrix.json"))
    assert json.loads(matrix_file.read_text())["matrix"] == summary.matrix
