"""ModalPrompt's mechanisms: prompts are inserted after the beginning of each prompt (left or right padded) and
their logits dropped again for the loss; prompt ids read the prompt rows and train only the current task's;
earlier tasks' prompts and transforms stay frozen; the dual-modality scores pick each test sample's own task on
the generated stream; the prompts inserted at inference are bounded by transfer_num, whatever the tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcl.config import load_config
from mcl.data import IGNORE_INDEX, Preprocessor, cached_processor, collate, rows_to_batch, sample_row
from mcl.errors import ConfigError
from mcl.methods_api import TaskContext, build_method
from mcl.models import load_model_and_processor
from mcl.run import prepare_run, run_stream_locally
from mcl.streams import build_stream
from methods.modalprompt import STATE_WEIGHTS, PromptEmbedding, drop_inserted, insert_prompts

SMALL_STREAM = {"train_per_task": 32, "test_per_task": 8}
NAMES = ("aerial", "underwater", "street", "indoor")


def test_params_are_validated_naming_the_field():
    for field, value in (("prompt_length", 0), ("transfer_num", 0), ("image_weight", 2.0)):
        with pytest.raises(ConfigError, match=field):
            build_method("modalprompt", {field: value})
    params = build_method("modalprompt").params
    assert (params.prompt_length, params.transfer_num, params.image_weight) == (10, 3, 0.5)


@pytest.mark.parametrize("bos", [None, 1])
def test_prompts_go_after_the_beginning_and_their_logits_are_dropped(bos):
    ids = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 5]])  # left padded (pad 0), BOS 1 when it is one
    mask = (ids != 0).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = 5
    prompt = torch.tensor([[90, 91], [92, 93]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.ones(2, 3)}
    out, start = insert_prompts(batch, prompt, bos)
    offset = 1 if bos is not None else 0
    assert start.tolist() == [2 + offset, 0 + offset]
    assert out["input_ids"][0].tolist() == ([0, 0, 1, 90, 91, 5, 6] if bos else [0, 0, 90, 91, 1, 5, 6])
    assert out["input_ids"][1].tolist() == ([1, 92, 93, 7, 8, 9, 5] if bos else [92, 93, 1, 7, 8, 9, 5])
    assert out["attention_mask"].sum().item() == mask.sum().item() + 4
    assert (out["labels"] == 5).sum().item() == 2 and torch.equal(out["pixel_values"], batch["pixel_values"])
    values = torch.randn(2, 5, 3)
    padded = torch.stack([torch.cat([values[i, : start[i]], torch.zeros(2, 3), values[i, start[i] :]]) for i in range(2)])
    assert torch.equal(drop_inserted(padded, start, 2), values)


def test_prompt_ids_read_the_prompt_rows_and_only_they_get_gradients():
    base = torch.nn.Embedding(10, 4)
    emb = PromptEmbedding(base, num_slots=3, length=2, out_dim=6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(3):
            emb.prompt(t).normal_()
    ids = torch.tensor([[3, 10, 11, 14, 4]])  # vocabulary 10: ids 10-11 are task 0's prompt, 14 task 2's first
    out = emb(ids)
    assert torch.equal(out[0, 0], base.weight[3]) and torch.equal(out[0, 4], base.weight[4])
    assert torch.equal(out[0, 1], emb.prompt(0)[0]) and torch.equal(out[0, 3], emb.prompt(2)[0])
    base.weight.requires_grad_(False)
    out.sum().backward()
    assert emb.prompt(0).grad.abs().sum() > 0 and emb.prompt(1).grad.abs().sum() == 0
    assert emb.prototypes(2).shape == (2, 6) and emb.prompt_ids(1).tolist() == [12, 13]


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory: pytest.TempPathFactory):
    """Three tasks with transfer_num 2: the third trains its prompt after the best earlier one. The default
    budget (5 epochs): the prototypes are learnt by the cosine terms, and 2 epochs leave them short of the
    task features (75% selection)."""
    root = tmp_path_factory.mktemp("modalprompt_stream") / "generated"
    build_stream("generated", root, SMALL_STREAM)
    out = tmp_path_factory.mktemp("modalprompt_run")
    options = [f"stream.options.{k}={v}" for k, v in SMALL_STREAM.items()]
    cfg = load_config(
        "jobs/configs/default.yaml",
        [f"stream.root={root}", *options, "scaling.num_workers=1", "scaling.deepspeed=false",
         f"tracking.output_dir={out}", "method.name=modalprompt", "method.params.transfer_num=2",
         "method.params.prompt_length=4", "eval.max_new_tokens=2"],
    )
    prep = prepare_run(cfg, log=lambda _m: None)
    return cfg, prep, run_stream_locally(prep, out, tasks=3, log=lambda _m: None)


def test_earlier_prompts_stay_frozen_and_the_scores_pick_the_task(three_tasks):
    _, _, result = three_tasks
    states = [load_file(str(Path(d) / STATE_WEIGHTS)) for d in result.state_dirs]
    for t in range(3):
        own = [k for k in states[t] if k == f"prompt_{t}" or k.startswith(f"transforms.{t}.")]
        assert own
        for later in states[t + 1 :]:
            assert all(torch.equal(states[t][k], later[k]) for k in own), f"task {t}'s prompt changed later"
        if t > 0:  # the task's own prompt was trained
            assert not torch.equal(states[t - 1][f"prompt_{t}"], states[t][f"prompt_{t}"])
    metrics = result.results[2].method_metrics
    assert metrics["selection_acc"] == 100.0, metrics


def test_inference_inserts_at_most_transfer_num_prompts_whatever_the_tasks(three_tasks):
    cfg, prep, result = three_tasks
    processor = cached_processor(prep.model_path)
    rows = [sample_row(s) for s in prep.stream.tasks[0].test[:3]]
    batch = collate(Preprocessor(prep.model_path, train=False)(rows_to_batch(rows)), 0, left_pad=True)
    lengths = []
    for task in (1, 2):  # 2 and 3 tasks seen, transfer_num 2: the same prompt tokens
        method = build_method("modalprompt", cfg.method.params)
        ctx = TaskContext(task, NAMES[:3], cfg.model.lora, processor=processor)
        model, _ = load_model_and_processor(prep.model_path)
        model = method.load_for_evaluation(model, Path(result.state_dirs[task]), ctx).eval()
        seen = {}

        def fake_generate(seen=seen, **kwargs):
            seen["length"] = kwargs["input_ids"].shape[1]
            return kwargs["input_ids"]

        model.generate = fake_generate
        tokens, extras = method.generate(model, batch, {}, ctx)
        lengths.append(seen["length"] - batch["input_ids"].shape[1])
        assert tokens.shape[1] == 0 and extras["selected_task"] == [0, 0, 0]
    assert lengths == [2 * 4, 2 * 4]
