"""HiDe-LLaVA's and DISCO's mechanisms: one LoRA slice per task, trained alone and then left bit-identical;
HiDe's lower layers fuse the seen slices as ``(sum B_i)(sum A_i)`` and its top layer (DISCO: every layer)
mixes them per sample with softmax weights from the task anchors; the instruction's tokens are found in the
prompt; the anchors are the mean features of the task's training samples; on the generated stream the
anchors pick each test sample's own task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcl.config import load_config
from mcl.data import Preprocessor, build_prompt, cached_processor, collate, rows_to_batch, sample_row
from mcl.errors import ConfigError
from mcl.methods_api import TaskContext, build_method
from mcl.models import load_model_and_processor
from mcl.run import prepare_run, run_stream_locally
from mcl.streams import build_stream
from mcl.worker.engine import model_inputs
from methods.hide_llava import (
    STATE_WEIGHTS,
    TaskSliceLinear,
    image_features,
    prompt_layout,
    question_mask,
    slice_layers,
    text_features,
    top_layer_names,
)

DEFAULT = "jobs/configs/default.yaml"
SMALL_STREAM = {"train_per_task": 32, "test_per_task": 8}
NAMES = ("aerial", "underwater", "street", "indoor")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slices_stream") / "generated"
    build_stream("generated", root, SMALL_STREAM)
    return root


def _config(root: Path, out: Path, method: str, *overrides: str):
    options = [f"stream.options.{k}={v}" for k, v in SMALL_STREAM.items()]
    return load_config(
        DEFAULT,
        [
            f"stream.root={root}",
            *options,
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"tracking.output_dir={out}",
            f"method.name={method}",
            "train.epochs=3",
            "eval.max_new_tokens=2",
            *overrides,
        ],
    )


def _batch(model_path: str, root: Path, task: int, train: bool, count: int = 3) -> dict[str, torch.Tensor]:
    processor = cached_processor(model_path)
    stream = build_stream("generated", root, SMALL_STREAM)
    samples = stream.tasks[task].train if train else stream.tasks[task].test
    batch = Preprocessor(model_path, train=train)(rows_to_batch([sample_row(s) for s in samples[:count]]))
    return collate(batch, processor.tokenizer.pad_token_id, left_pad=not train)


@pytest.fixture(scope="module", params=["hide_llava", "disco"])
def three_tasks(request, small_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(request.param)
    prep = prepare_run(_config(small_root, out, request.param), log=lambda _m: None)
    return request.param, run_stream_locally(prep, out, tasks=3, log=lambda _m: None)


def _wrapped(name: str, model_path: str, lora, task: int = 0, state: Path | None = None):
    base, processor = load_model_and_processor(model_path)
    method = build_method(name)
    ctx = TaskContext(task, NAMES, lora, previous_state_dir=state, processor=processor)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    return method, model, ctx


def test_params_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="temperature"):
        build_method("hide_llava", {"temperature": 0.0})
    with pytest.raises(ConfigError, match="image_weight"):
        build_method("disco", {"image_weight": 1.5})
    with pytest.raises(ConfigError, match="task_rank"):
        build_method("hide_llava", {"task_rank": -1})
    hide, disco = build_method("hide_llava").params, build_method("disco").params
    assert (hide.temperature, hide.image_weight) == (0.1, 0.5)  # llava_arch.py: (img + txt) / 2, / 0.1
    assert (disco.temperature, disco.image_weight) == (0.05, 0.0)  # text only, / 0.05


def _layer(seen: int = 3) -> TaskSliceLinear:
    torch.manual_seed(0)
    layer = TaskSliceLinear(torch.nn.Linear(6, 5), num_slots=4, slot_rank=2, scaling=2.0)
    with torch.no_grad():
        for i in range(4):
            layer.slot_b(i).normal_()
    layer.seen = seen
    return layer


def test_training_uses_the_current_slice_alone_and_only_it_gets_gradients():
    layer = _layer()
    layer.train()
    layer.current = 1
    x = torch.randn(2, 3, 6)
    y = layer(x)
    expected = layer.base_layer(x) + 2.0 * (x @ layer.slot_a(1).T @ layer.slot_b(1).T)
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    for i in range(4):
        got = layer.slot_a(i).grad is not None and bool(layer.slot_a(i).grad.abs().sum() > 0)
        assert got == (i == 1), f"slice {i}"


def test_fused_layers_equal_the_sum_of_a_times_the_sum_of_b():
    """HiDe's lower layers (clitmoelora.py HiDeMOELinearA/B.forward): dW = s (sum_i B_i)(sum_i A_i) over the
    seen slices, cross terms included; unseen slices take no part."""
    layer = _layer(seen=3)
    layer.eval()
    layer.mixing = "fused"
    x = torch.randn(2, 3, 6)
    a = layer.slot_a(0) + layer.slot_a(1) + layer.slot_a(2)
    b = layer.slot_b(0) + layer.slot_b(1) + layer.slot_b(2)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base_layer(x) + 2.0 * (x @ a.T @ b.T), atol=1e-5)
        per_task = sum(x @ layer.slot_a(i).T @ layer.slot_b(i).T for i in range(3))
        assert not torch.allclose(layer(x), layer.base_layer(x) + 2.0 * per_task, atol=1e-3)


def test_mixed_layers_weight_each_samples_slices():
    class Fixed:
        def weights(self, rows):
            return torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])

    layer = _layer(seen=3)
    layer.eval()
    layer.mixing, layer.selector = "mixed", Fixed()
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        y = layer(x)
        for n, w in enumerate(Fixed().weights(2)):
            update = sum(w[i] * (x[n] @ layer.slot_a(i).T @ layer.slot_b(i).T) for i in range(3))
            assert torch.allclose(y[n], layer.base_layer(x[n]) + 2.0 * update, atol=1e-5)


def test_the_instruction_tokens_are_found_left_and_right_padded(tiny_model_path, small_root):
    model, processor = load_model_and_processor(tiny_model_path)
    layout = prompt_layout(processor, model.config.image_token_id)
    tokenizer = processor.tokenizer
    for train in (True, False):
        batch = _batch(tiny_model_path, small_root, 1, train)
        mask = question_mask(batch["input_ids"], layout)
        stream = build_stream("generated", small_root, SMALL_STREAM)
        samples = (stream.tasks[1].train if train else stream.tasks[1].test)[:3]
        for row, sample in zip(range(3), samples, strict=True):
            ids = batch["input_ids"][row][mask[row]].tolist()
            assert ids == tokenizer(sample.question, add_special_tokens=False)["input_ids"]
    # The tiny model's template: "USER: <image>\n{question} ASSISTANT:".
    assert build_prompt(processor, "q") == "USER: <image>\nq ASSISTANT:"
    assert tokenizer.convert_ids_to_tokens(list(layout.suffix)) == ["ASSISTANT", ":"]
    assert layout.after_image == 0


def test_anchors_are_the_mean_features_of_the_tasks_training_samples(tiny_model_path, small_root, tmp_path):
    lora = _config(small_root, tmp_path, "hide_llava").model.lora
    method, model, ctx = _wrapped("hide_llava", tiny_model_path, lora, task=0)
    model.train()
    batches = [_batch(tiny_model_path, small_root, 0, True, count=n) for n in (3, 5)]
    with torch.no_grad():
        for batch in batches:
            model(**model_inputs(batch))
    method.after_task(model, ctx)
    selector = method.selector
    text_anchor, image_anchor = selector.anchors()
    embed = model.get_input_embeddings()
    texts = torch.cat([text_features(embed(b["input_ids"]), b["input_ids"], selector.layout) for b in batches])
    tower = model.model.vision_tower
    images = torch.cat([image_features(tower(b["pixel_values"])) for b in batches])
    assert selector.text_count[0] == selector.image_count[0] == 8
    assert torch.allclose(text_anchor[0], texts.mean(0), atol=1e-6)
    assert torch.allclose(image_anchor[0], images.mean(0), atol=1e-6)
    model.eval()  # evaluation adds nothing
    with torch.no_grad():
        model(**model_inputs(batches[0]))
    assert selector.text_count[0] == 8


def test_earlier_slices_stay_bit_identical_and_the_anchors_pick_the_task(three_tasks):
    """Three tasks of the generated stream: the slices of tasks 1 and 2 in every layer (HiDe's top-layer
    experts among them) are saved unchanged after the later tasks, and the anchors send every test sample of
    every seen task to its own task."""
    name, summary = three_tasks
    states = [load_file(str(Path(d) / STATE_WEIGHTS)) for d in summary.state_dirs]
    for t in range(3):
        keys = [k for k in states[t] if k.endswith((f".lora_A_{t}", f".lora_B_{t}"))]
        assert keys
        for later in states[t + 1 :]:
            for key in keys:
                assert torch.equal(states[t][key], later[key]), f"{name}: {key} changed after its task"
        if t < 2:  # a later slice is not trained yet: its B is still zero
            assert all(not states[t][k.replace("lora_A_", "lora_B_")].any() for k in states[t] if "_A_2" in k)
    metrics = summary.results[2].method_metrics
    assert metrics["selection_acc"] == 100.0, metrics
    assert {f"selection_acc_{n}" for n in NAMES[:3]} <= set(metrics)


def test_hide_mixes_the_top_layer_only_and_disco_every_layer(tiny_model_path, small_root, tmp_path):
    lora = _config(small_root, tmp_path, "hide_llava").model.lora
    for name in ("hide_llava", "disco"):
        _, model, _ = _wrapped(name, tiny_model_path, lora, task=1)
        layers = slice_layers(model)
        mixed = {n for n, m in layers.items() if m.mixing == "mixed"}
        if name == "disco":
            assert mixed == set(layers)
        else:
            assert mixed == set(top_layer_names(list(layers))) and mixed
            top = max(int(n.split(".layers.")[1].split(".")[0]) for n in layers)
            assert all(f".layers.{top}." in n for n in mixed)
            assert model.config.text_config.num_hidden_layers == top + 1
