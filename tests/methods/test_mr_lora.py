"""Mechanism tests of MR-LoRA (methods/mr_lora.py), in-process without Ray.

One small run through the whole 4-task generated stream (48 training / 10 test samples per task, 3 epochs,
router on 10 samples per task) is shared by the tests that need trained experts: earlier experts stay
bit-identical, the router sends every task's test samples to that task's expert through the real evaluate
path, nothing is forgotten, and the one-pass mixed-adapter generation equals answering each sample alone
with its expert. The other tests need no training: parameter validation, the router's training rows, the
router prompt built from an evaluation batch against the preprocessed router rows, the fallback rule.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mcl.config import LoraConfig, load_config
from mcl.data import IGNORE_INDEX, Preprocessor, collate, rows_to_batch, sample_row
from mcl.errors import ConfigError
from mcl.evaluation.metrics import bwt, mfn
from mcl.methods_api import Phase, TaskContext, TrainingRequest, build_method
from mcl.run import prepare_run, run_stream_locally
from mcl.streams import build_stream

DEFAULT = "jobs/configs/default.yaml"
SMALL = {"train_per_task": 48, "test_per_task": 10}
quiet = lambda _m: None  # noqa: E731


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mr_lora_data") / "generated"
    build_stream("generated", root, SMALL)
    return root


def _config(root: Path, out: Path, *overrides: str):
    return load_config(
        DEFAULT,
        [
            f"stream.root={root}",
            f"stream.options.train_per_task={SMALL['train_per_task']}",
            f"stream.options.test_per_task={SMALL['test_per_task']}",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"tracking.output_dir={out}",
            "method.name=mr_lora",
            "train.epochs=3",
            "method.params.router_samples_per_task=10",
            "method.params.router_epochs=5",
            "eval.max_new_tokens=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(small_root, tiny_model_path, tmp_path_factory):
    """MR-LoRA trained through all 4 tasks of the small stream (one shared run)."""
    out = tmp_path_factory.mktemp("mr_lora_run")
    prep = prepare_run(_config(small_root, out), log=quiet)
    return prep, run_stream_locally(prep, out, log=quiet)


def _processor(model_path: str):
    from mcl.data import _cached_processor

    return _cached_processor(model_path, False)


# -- no training needed ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"router_samples_per_task": 0}, "router_samples_per_task"),
        ({"router_epochs": 0}, "router_epochs"),
        ({"router_epochs": 2.5}, "router_epochs"),
        ({"router_lr": -1.0}, "router_lr"),
        ({"router_init": "average"}, "router_init"),
    ],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        build_method("mr_lora", params)


def test_phases_train_the_expert_then_the_router_which_evaluates():
    method = build_method("mr_lora", {"router_epochs": 7, "router_lr": 0.01})
    train, router = method.phases(2)
    assert (train.name, train.evaluate) == ("train", False)
    assert (router.name, router.evaluate, router.epochs, router.lr) == ("router", True, 7, 0.01)


def test_router_rows_are_fixed_samples_of_every_seen_task(small_root):
    from methods.mr_lora import routing_instruction

    stream = build_stream("generated", small_root, SMALL)
    method = build_method("mr_lora", {"router_samples_per_task": 5})
    router = method.phases(0)[1]
    state = None
    chosen = {}
    for t in range(3):
        train = method.training_data(
            TrainingRequest(Phase("train"), t, stream.tasks, state, epochs=1, global_batch=16, seed=100 + t)
        )
        assert {r["task"] for r in train.rows} == {stream.task_names[t]} and train.driver_state is None
        data = method.training_data(
            TrainingRequest(router, t, stream.tasks, state, epochs=2, global_batch=16, seed=100 + t)
        )
        again = method.training_data(
            TrainingRequest(router, t, stream.tasks, state, epochs=2, global_batch=16, seed=100 + t)
        )
        assert data.rows == again.rows  # deterministic
        state = data.driver_state
        epoch0 = [r for r in data.rows if r["epoch"] == 0]
        assert len(epoch0) == 16 * -(-5 * (t + 1) // 16)  # 5 per seen task, padded to whole batches
        distinct = {(r["task"], r["id"]) for r in epoch0}
        assert len(distinct) == 5 * (t + 1)
        for r in data.rows:
            i = stream.task_names.index(r["task"])
            assert r["answer"] == "ABCD"[i] and r["supervised"]
            assert r["question"].endswith(" " + routing_instruction(t + 1))
            original = next(s for s in stream.tasks[i].train if s.id == r["id"])
            assert r["image"] == original.image  # the image is kept
            assert r["question"] == f"{original.question} {routing_instruction(t + 1)}"
        for name, ids in state["router_samples"].items():
            chosen.setdefault(name, ids)
            assert ids == chosen[name], "a task's router samples changed after it was first chosen"
    assert list(state["router_samples"]) == stream.task_names[:3]


def test_router_prompt_from_an_eval_batch_matches_the_router_training_rows(small_root, tiny_model_path):
    """The router forward reads exactly the prompt the router was trained on, and the position where the
    router's training label (the letter) is predicted."""
    from methods.mr_lora import router_inputs, router_tokens

    stream = build_stream("generated", small_root, SMALL)
    method = build_method("mr_lora", {"router_samples_per_task": 2})
    data = method.training_data(
        TrainingRequest(method.phases(3)[1], 3, stream.tasks, None, epochs=1, global_batch=8, seed=0)
    )
    rows = data.rows
    originals = {(s.task, s.id): s for t in stream.tasks for s in t.train}
    plain = [sample_row(originals[(r["task"], r["id"])]) for r in rows]
    processor = _processor(tiny_model_path)
    tokens = router_tokens(processor, 4)
    eval_batch = collate(
        Preprocessor(tiny_model_path, train=False)(rows_to_batch(plain)),
        processor.tokenizer.pad_token_id,
        left_pad=True,
    )
    inputs = router_inputs(eval_batch, tokens)
    train_batch = Preprocessor(tiny_model_path, train=True)(rows_to_batch(rows))
    for i, row in enumerate(rows):
        mask = inputs["attention_mask"][i].bool()
        ids = inputs["input_ids"][i][mask].tolist()
        labels = train_batch["labels"][i]
        answer_start = int((labels != IGNORE_INDEX).argmax())
        assert ids == train_batch["input_ids"][i][:answer_start].tolist()
        letter = "ABCD".index(row["answer"])
        assert train_batch["input_ids"][i][answer_start] == tokens.letter_ids[letter]
        positions = inputs["position_ids"][i][mask].tolist()
        assert positions == list(range(len(ids)))


def test_fallback_goes_to_the_highest_scoring_valid_letter(tiny_model_path):
    """An invalid free answer (a word, or the letter of an expert not trained yet) goes to the seen expert
    with the highest letter logit; through the real generate hook: one router forward, one generate."""
    from methods.mr_lora import ROUTER, choose_experts, router_tokens

    processor = _processor(tiny_model_path)
    tokens = router_tokens(processor, 3)
    a, b, c = tokens.letter_ids
    word = processor.tokenizer.convert_tokens_to_ids("roof")
    d = processor.tokenizer.convert_tokens_to_ids("D")
    vocab = len(processor.tokenizer)
    logits = torch.zeros(4, vocab)
    logits[0, b] = 5.0  # valid free answer B
    logits[1, word], logits[1, c], logits[1, a] = 9.0, 3.0, 2.0  # a word wins: fall back to C
    logits[2, d], logits[2, a], logits[2, b] = 9.0, 1.0, 4.0  # "D" (no such expert yet): fall back to B
    logits[3, word], logits[3, a], logits[3, c] = 9.0, 2.0, 2.0  # tie between A and C: the earlier, A
    assert choose_experts(logits, tokens.letter_ids) == ([1, 2, 1, 0], [False, True, True, True])

    class StubModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, list[str]]] = []

        def forward(self, input_ids, attention_mask, position_ids, adapter_names, **kwargs):
            self.calls.append(("forward", adapter_names))
            full = torch.zeros(input_ids.shape[0], input_ids.shape[1], vocab)
            full[:, -1] = logits
            return SimpleNamespace(logits=full)

        def generate(self, input_ids, adapter_names, **kwargs):
            self.calls.append(("generate", adapter_names))
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), word)], dim=1)

    method = build_method("mr_lora", {})
    names = ("aerial", "underwater", "street", "indoor")
    ctx = TaskContext(2, names, LoraConfig(), rank=0, processor=processor, phase="router")
    stub = StubModel()
    method.after_task(stub, ctx)
    batch = {
        "input_ids": torch.ones(4, 6, dtype=torch.long),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
    }
    new_tokens, extras = method.generate(stub, batch, {"max_new_tokens": 1}, ctx)
    assert extras == {"expert": [1, 2, 1, 0], "router_fallback": [False, True, True, True]}
    assert stub.calls == [
        ("forward", [ROUTER] * 4),
        ("generate", ["expert_1", "expert_2", "expert_1", "expert_0"]),
    ]
    assert new_tokens.tolist() == [[word]] * 4
    records = [
        {"task": names[i], "expert": e, "router_fallback": f}
        for i, e, f in zip((1, 1, 0, 0), extras["expert"], extras["router_fallback"], strict=True)
    ]
    metrics = method.eval_metrics(records, ctx)
    assert metrics == {
        "router_acc_aerial": 50.0,
        "router_acc_underwater": 50.0,
        "router_acc": 50.0,
        "router_fallback_rate": 0.75,
    }


# -- one shared 4-task run -------------------------------------------------------------------------------


@pytest.mark.slow
def test_earlier_experts_are_bit_identical_after_later_tasks(trained):
    from safetensors.torch import load_file

    _, result = trained
    dirs = result.phase_dirs
    first = load_file(str(dirs["0:train"] / "state" / "expert_0" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in first.items()), "expert 0 did not train"
    assert any("modules_to_save" in k or "multi_modal_projector" in k for k in first)  # its own projector
    for key in ("0:router", "1:train", "1:router", "2:router", "3:router"):
        later = load_file(str(dirs[key] / "state" / "expert_0" / "adapter_model.safetensors"))
        assert sorted(later) == sorted(first)
        assert all(torch.equal(later[k], first[k]) for k in first), f"expert_0 changed by {key}"
    expert1 = load_file(str(dirs["1:train"] / "state" / "expert_1" / "adapter_model.safetensors"))
    final1 = load_file(str(dirs["3:router"] / "state" / "expert_1" / "adapter_model.safetensors"))
    assert all(torch.equal(final1[k], expert1[k]) for k in expert1)
    assert not all(torch.equal(expert1[k], first[k]) for k in first)  # an independent expert
    final = sorted(p.name for p in (dirs["3:router"] / "state").iterdir() if p.is_dir())
    assert final == ["expert_0", "expert_1", "expert_2", "expert_3", "router"]
    assert not (dirs["3:train"] / "state" / "router").exists()


@pytest.mark.slow
def test_a_new_expert_trains_alone_with_earlier_experts_frozen_and_inactive(trained):
    """setup_model of a later task: only the new expert is active and trainable; the loaded experts equal
    their saved tensors."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from mcl.models import load_model_and_processor

    prep, result = trained
    base, processor = load_model_and_processor(prep.model_path)
    state = result.phase_dirs["1:router"] / "state"
    ctx = TaskContext(2, tuple(prep.stream.task_names), prep.config.model.lora, state, processor=processor)
    model = build_method("mr_lora", {}).setup_model(base, ctx)
    assert model.active_adapters == ["expert_2"]
    assert sorted(model.peft_config) == ["expert_0", "expert_1", "expert_2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".expert_2." in n for n in trainable)
    assert any("modules_to_save.expert_2" in n for n in trainable)  # its own projector copy
    saved = load_file(str(state / "expert_1" / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model, adapter_name="expert_1")
    assert sorted(loaded) == sorted(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_router_routes_every_task_to_its_expert_and_nothing_is_forgotten(trained):
    prep, result = trained
    names = prep.stream.task_names
    final = result.results[-1]
    routed = [r for r in final.predictions]
    assert len(routed) == len(names) * SMALL["test_per_task"]
    own = sum(r["expert"] == names.index(r["task"]) for r in routed)
    assert own / len(routed) >= 0.95, [(r["task"], r["expert"]) for r in routed]
    assert final.method_metrics["router_acc"] >= 95.0
    assert set(final.method_metrics) >= {f"router_acc_{n}" for n in names} | {"router_fallback_rate"}
    # After task t the router only knows experts 0..t.
    for t, res in enumerate(result.results):
        assert {r["expert"] for r in res.predictions} <= set(range(t + 1))
    matrix = result.matrix
    # The baseline row (evaluated before task 0's router phase trains) is the untouched base model's, not
    # expert 0 routed: expert 0 is already trained at that point.
    assert result.baseline is not None and result.baseline[0] <= 25.0 < matrix[0][0], result.baseline
    assert all(matrix[t][t] >= 50.0 for t in range(len(names))), matrix
    assert abs(bwt(matrix)) <= 2.0, matrix
    assert mfn(matrix) >= 50.0, matrix  # sequential LoRA: 25 (only the last task survives)
    memory = final.memory
    assert memory["experts"] == 4.0 and memory["router_params"] == memory["params_per_expert"] > 0
    assert memory["adapter_params_total"] == 5 * memory["params_per_expert"]


@pytest.mark.slow
def test_routed_generation_equals_each_sample_alone_with_its_expert(trained):
    """One mixed-adapter generate over a batch of all tasks gives, sample by sample, what generating the
    sample alone with its expert active gives; and it reproduces the evaluate path's records."""
    from mcl.models import load_model_and_processor
    from methods.mr_lora import expert_name, load_routed_model, route, routed_generate, router_tokens

    prep, result = trained
    state = result.state_dirs[-1]
    base, processor = load_model_and_processor(prep.model_path)
    model = load_routed_model(base, state)
    tok = processor.tokenizer
    rows = [sample_row(t.test[i]) for i in range(3) for t in prep.stream.tasks]  # tasks interleaved
    pre = Preprocessor(prep.model_path, train=False)
    batch = collate(pre(rows_to_batch(rows)), tok.pad_token_id, left_pad=True)
    gen = {
        "max_new_tokens": 2,
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    experts, _ = route(model, batch, router_tokens(processor, 4))
    assert len(set(experts)) == 4  # a truly mixed batch
    mixed = tok.batch_decode(routed_generate(model, batch, gen, experts), skip_special_tokens=True)
    recorded = {r["id"]: r for r in result.results[-1].predictions}
    for i, row in enumerate(rows):
        single = collate(pre(rows_to_batch([row])), tok.pad_token_id, left_pad=True)
        model.set_adapter(expert_name(experts[i]))
        with torch.no_grad():
            out = model.generate(**single, **gen)[:, single["input_ids"].shape[1] :]
        alone = tok.batch_decode(out, skip_special_tokens=True)[0]
        assert mixed[i].strip() == alone.strip(), (row["id"], experts[i])
        assert recorded[row["id"]]["expert"] == experts[i]
        assert recorded[row["id"]]["prediction"] == mixed[i].strip()


@pytest.mark.slow
def test_the_active_router_gives_the_logits_of_the_per_sample_router(trained):
    """The router as the active adapter (as :func:`load_routed_model` leaves it) gives bit for bit the logits
    of the ``adapter_names`` path (every sample sent to the router), which a model with another active
    adapter takes."""
    from mcl.models import load_model_and_processor
    from methods.mr_lora import ROUTER, load_routed_model, router_inputs, router_logits, router_tokens

    prep, result = trained
    base, processor = load_model_and_processor(prep.model_path)
    model = load_routed_model(base, result.state_dirs[-1])
    assert model.active_adapter == ROUTER
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    rows = [sample_row(t.test[i]) for i in range(3) for t in prep.stream.tasks]
    pre = Preprocessor(prep.model_path, train=False)
    batch = collate(pre(rows_to_batch(rows)), processor.tokenizer.pad_token_id, left_pad=True)
    tokens = router_tokens(processor, 4)
    active = router_logits(model, batch, tokens)
    model.set_adapter("expert_0", inference_mode=True)
    dispatched = router_logits(model, batch, tokens)
    assert torch.equal(active, dispatched)
    with torch.no_grad():  # the expert's own forward differs: the dispatched path did run the router
        expert = model(**router_inputs(batch, tokens)).logits[:, -1, :]
    assert not torch.equal(expert, dispatched)


@pytest.mark.slow
def test_zero3_single_process_saves_complete_experts_and_routes(small_root, tiny_model_path, tmp_path):
    """Under ZeRO-3 with every parameter partitioned (threshold 0): frozen experts are gathered and saved
    complete and unchanged, and the routed evaluation (one router forward + one generate) runs."""
    from safetensors.torch import load_file

    cfg = _config(
        small_root,
        tmp_path,
        "stream.options.tasks=[aerial,underwater]",
        "scaling.deepspeed=true",
        "scaling.zero_stage=3",
        "scaling.zero3_param_persistence_threshold=0",
        "train.epochs=1",
        "method.params.router_epochs=1",
        "method.params.router_samples_per_task=4",
    )
    prep = prepare_run(cfg, log=quiet)
    result = run_stream_locally(prep, tmp_path, log=quiet)
    first = load_file(str(result.phase_dirs["0:train"] / "state" / "expert_0" / "adapter_model.safetensors"))
    final = load_file(str(result.phase_dirs["1:router"] / "state" / "expert_0" / "adapter_model.safetensors"))
    assert first and all(v.numel() > 0 for v in first.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in first.items())
    assert all(torch.equal(final[k], first[k]) for k in first)
    records = result.results[-1].predictions
    assert len(records) == 2 * SMALL["test_per_task"]
    assert all(r["expert"] in (0, 1) for r in records)


# -- router_init: the router's starting point --------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_experts(tiny_model_path, tmp_path_factory):
    """Three experts of distinct random (non-zero) weights, saved by MR-LoRA's own train phases."""
    from mcl.models import load_model_and_processor

    out = tmp_path_factory.mktemp("mr_lora_experts")
    names, lora, previous = ("a", "b", "c"), LoraConfig(r=4, alpha=8), None
    method = build_method("mr_lora", {})
    for t in range(3):
        base, processor = load_model_and_processor(tiny_model_path)
        ctx = TaskContext(t, names, lora, previous, processor=processor)
        model = method.setup_model(base, ctx)
        generator = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(torch.randn(p.shape, generator=generator))
        previous = out / f"task{t}"
        method.save_state(model, previous, ctx)
    return names, lora, previous


def _router(saved_experts, tiny_model_path, router_init):
    from mcl.models import load_model_and_processor

    names, lora, state = saved_experts
    base, processor = load_model_and_processor(tiny_model_path)
    ctx = TaskContext(2, names, lora, state, processor=processor, phase="router")
    return build_method("mr_lora", {"router_init": router_init}).setup_model(base, ctx), state


def test_merged_router_starts_as_the_mean_of_the_saved_experts(saved_experts, tiny_model_path):
    """Every router tensor (LoRA A, B and the projector copy) = the element-wise mean of the three experts'
    saved tensors (MLLM-CL's merged0.2: weight 1/5 each for its 5 experts; here 1/3 each)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model, state = _router(saved_experts, tiny_model_path, "merged")
    experts = [load_file(str(state / f"expert_{i}" / "adapter_model.safetensors")) for i in range(3)]
    router = get_peft_model_state_dict(model, adapter_name="router")
    assert sorted(router) == sorted(experts[0])
    assert any("lora_B" in k for k in router) and any("multi_modal_projector" in k for k in router)
    for key, value in router.items():
        expected = (experts[0][key] + experts[1][key] + experts[2][key]) / 3
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        assert not torch.equal(value, experts[0][key])  # a merge, not a copy of one expert
    for i in range(3):  # the experts themselves are loaded unchanged, frozen
        loaded = get_peft_model_state_dict(model, adapter_name=f"expert_{i}")
        assert all(torch.equal(loaded[k], experts[i][k]) for k in experts[i])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".router." in n for n in trainable)
    assert model.active_adapters == ["router"]


def test_fresh_router_is_a_new_lora(saved_experts, tiny_model_path):
    """The default start is unchanged: peft's new LoRA (B = 0), not the experts' mean."""
    from peft import get_peft_model_state_dict

    model, _ = _router(saved_experts, tiny_model_path, "fresh")
    router = get_peft_model_state_dict(model, adapter_name="router")
    lora_b = [v for k, v in router.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)
    assert build_method("mr_lora", {}).params.router_init == "fresh"


def test_average_adapters_refuses_mismatched_shapes(saved_experts, tiny_model_path):
    from methods.mr_lora import average_adapters

    model, _ = _router(saved_experts, tiny_model_path, "fresh")
    with pytest.raises(ValueError, match="no source adapters"):
        average_adapters(model, "router", [])
    with pytest.raises(ValueError, match="'nope' has no tensor"):
        average_adapters(model, "router", ["expert_0", "nope"])
    with pytest.raises(ValueError, match="no adapter 'ghost'"):
        average_adapters(model, "ghost", ["expert_0"])


# -- 2 ranks under ZeRO-3: every rank runs every adapter in the same order -------------------------------------


def _router_model(model_path: str, state: str, names: list[str]):
    """The merged router beside the three saved experts (as :func:`_router` builds it), and the processor."""
    from mcl.models import load_model_and_processor

    base, processor = load_model_and_processor(model_path)
    ctx = TaskContext(
        2, tuple(names), LoraConfig(r=4, alpha=8), Path(state), processor=processor, phase="router"
    )
    return build_method("mr_lora", {"router_init": "merged"}).setup_model(base, ctx), processor


def _routed_answers(model, processor, model_path: str, rows: list, experts: list[int], **gen) -> tuple:
    """(the router's choices, the decoded answers of ``experts``) for one batch of ``rows``."""
    from methods.mr_lora import route, routed_generate, router_tokens

    tok = processor.tokenizer
    batch = collate(
        Preprocessor(model_path, train=False)(rows_to_batch(rows)), tok.pad_token_id, left_pad=True
    )
    gen = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": tok.pad_token_id, **gen}
    chosen, _ = route(model, batch, router_tokens(processor, 3))
    out = routed_generate(model, batch, gen, experts)
    return chosen, [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def _zero3_rank(rank: int, port: int, args_file: str) -> None:
    import datetime
    import json
    import os

    import torch.distributed as td

    from mcl.adapters import adapters_in_lockstep
    from mcl.worker.engine import StepEngine

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    td.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=90),
    )
    args = json.loads(Path(args_file).read_text())
    model, processor = _router_model(args["model_path"], args["state"], args["names"])
    cfg = load_config(
        DEFAULT,
        [
            "scaling.num_workers=2",
            "scaling.deepspeed=true",
            "scaling.zero_stage=3",
            "scaling.zero3_param_persistence_threshold=0",
        ],
    )
    engine = StepEngine(model, cfg, 2, torch.device("cpu"), optimize=False)
    module = engine.module.eval()
    assert all(p.numel() == 0 for n, p in module.named_parameters() if "lora_" in n)  # partitioned
    with adapters_in_lockstep(module):
        chosen, answers = _routed_answers(
            module, processor, args["model_path"], args["rows"][rank], args["experts"][rank], synced_gpus=True
        )
    Path(args_file).with_name(f"rank{rank}.json").write_text(
        json.dumps({"route": chosen, "answers": answers})
    )
    engine.close()
    td.destroy_process_group()


@pytest.mark.slow
def test_two_zero3_ranks_routing_to_different_experts_answer_as_one_process(
    saved_experts, tiny_model_path, small_root, tmp_path
):
    """2 ranks under ZeRO-3 (every parameter partitioned) whose batches use different experts ({0, 1} and
    {1, 2}) answer, sample by sample, as one process without DeepSpeed (peft's own mixed-adapter forward), and
    route alike: :func:`~mcl.adapters.adapters_in_lockstep` runs every adapter on every rank in one order, so
    the ranks' parameter gathers match (peft alone runs the adapters of each rank's batch, in set order)."""
    import json
    import socket

    import torch.multiprocessing as mp

    names, _lora, state = saved_experts
    tasks = build_stream("generated", small_root, SMALL).tasks
    picks = (((0, 0), (1, 0), (2, 0)), ((2, 1), (3, 1), (1, 1)))  # (task, sample) per rank
    rows = [[sample_row(tasks[t].test[i]) for t, i in pick] for pick in picks]
    experts = [[0, 1, 0], [2, 2, 1]]
    model, processor = _router_model(tiny_model_path, str(state), list(names))
    model.eval()
    expected = [_routed_answers(model, processor, tiny_model_path, rows[r], experts[r]) for r in range(2)]
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps(
            {
                "model_path": tiny_model_path,
                "state": str(state),
                "names": list(names),
                "rows": rows,
                "experts": experts,
            }
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_zero3_rank, args=(port, str(args)), nprocs=2, start_method="spawn")
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (got["route"], got["answers"]) == (list(expected[r][0]), expected[r][1]), r
