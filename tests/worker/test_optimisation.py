"""The optimisation settings of paper-scale recipes: learning-rate schedules, per-group learning rates,
micro-batch settings, step shares, activation checkpointing and the kernel checks before a run."""

from __future__ import annotations

import math

import pytest
import torch

from mcl.adapters import new_lora
from mcl.config import load_config
from mcl.errors import ConfigError
from mcl.methods_api import Phase
from mcl.models import load_model_and_processor
from mcl.run.plan import phase_config
from mcl.run.prepare import check_kernels
from mcl.worker.engine import build_optimizer, enable_gradient_checkpointing, lr_factor, parameter_groups
from mcl.worker.losses import StepShare, per_sample_loss

DEFAULT = "jobs/configs/default.yaml"


def test_schedules_warm_up_then_hold_or_decay():
    def f(step: int, schedule: str) -> float:
        return lr_factor(step, warmup=2, total=10, schedule=schedule)

    assert [f(s, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [f(s, "linear") for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert (
        f(2, "cosine") == 1.0
        and f(6, "cosine") == pytest.approx(0.5)
        and f(10, "cosine") == pytest.approx(0.0)
    )
    assert f(4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert lr_factor(0, warmup=0, total=1, schedule="cosine") == 1.0


def test_warmup_ratio_rounds_up_and_excludes_warmup_steps():
    cfg = load_config(DEFAULT, ["train.warmup_ratio=0.03"])
    assert cfg.train.warmup_for(100) == 3 and cfg.train.warmup_for(10) == 1
    with pytest.raises(ConfigError, match="train.warmup_ratio"):
        load_config(DEFAULT, ["train.warmup_ratio=0.03", "train.warmup_steps=5"])


def test_micro_batches_and_accumulation_from_the_config():
    cfg = load_config(DEFAULT, ["train.batch_size=64", "scaling.num_workers=8", "train.micro_batch_size=4"])
    assert (cfg.micro_batch, cfg.accumulation_steps) == (4, 2)
    cfg = load_config(DEFAULT, ["train.batch_size=16"])
    assert (cfg.micro_batch, cfg.accumulation_steps) == (8, 1)  # default: no accumulation
    with pytest.raises(ConfigError, match="train.micro_batch_size: must divide the rows per worker"):
        load_config(DEFAULT, ["train.batch_size=16", "train.micro_batch_size=3"])


def test_offload_needs_zero_and_params_offload_needs_stage_3():
    with pytest.raises(ConfigError, match="scaling.offload: needs DeepSpeed ZeRO"):
        load_config(DEFAULT, ["scaling.offload=optimizer", "scaling.deepspeed=false"])
    with pytest.raises(ConfigError, match="optimizer_and_params needs scaling.zero_stage 3"):
        load_config(DEFAULT, ["scaling.offload=optimizer_and_params"])
    load_config(DEFAULT, ["scaling.offload=optimizer_and_params", "scaling.zero_stage=3"])


def test_flash_attention_is_refused_without_gpus():
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 needs GPUs"):
        check_kernels(load_config(DEFAULT, ["model.attn_implementation=flash_attention_2"]))


def test_step_share_parts_add_up_to_the_mean_over_the_step():
    """Four micro-batches (2 per rank x 2 ranks) with 3, 0, 1 and 2 supervised rows: averaging their
    losses over the parts, as the engine does, gives the mean over the 6 supervised rows of the step."""
    torch.manual_seed(0)
    counts = [3, 0, 1, 2]
    batches = []
    for n in counts:
        labels = torch.full((3, 5), -100)
        labels[:n, 2:] = torch.randint(0, 7, (n, 3))
        batches.append((torch.randn(3, 5, 7), labels))
    share = StepShare({"supervised": float(sum(counts))}, parts=len(counts))
    engine_mean = sum(per_sample_loss(lg, lb, share) for lg, lb in batches) / share.parts
    logits = torch.cat([lg for lg, _ in batches])
    labels = torch.cat([lb for _, lb in batches])
    torch.testing.assert_close(engine_mean, per_sample_loss(logits, labels))


def test_parameter_groups_take_the_first_matching_rule():
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 2), "body": torch.nn.Linear(2, 2)})
    groups = parameter_groups(model, 1e-3, [(r"^proj\.", 2e-5)])
    assert [(g["lr"], len(g["params"])) for g in groups] == [(2e-5, 2), (1e-3, 2)]
    model["body"].requires_grad_(False)
    assert [g["lr"] for g in parameter_groups(model, 1e-3)] == [1e-3]


def test_projector_lr_reaches_the_projector_only(tiny_model_path):
    from mcl.adapters import projector_module_names

    cfg = load_config(DEFAULT, ["scaling.deepspeed=false", "train.projector_lr=2e-5", "train.lr=1e-3"])
    base, _ = load_model_and_processor(tiny_model_path)
    model = new_lora(base, cfg.model.lora)
    rule = rf"(^|\.)({'|'.join(projector_module_names(model))})\."
    optimizer, _ = build_optimizer(model, cfg, total_steps=10, lr_rules=[(rule, cfg.train.projector_lr)])
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}
    assert set(by_lr) == {2e-5, 1e-3}
    assert by_lr[2e-5] and all("multi_modal_projector" in n for n in by_lr[2e-5])
    assert all("lora_" in n for n in by_lr[1e-3])


def test_a_phase_with_its_own_lr_trains_everything_at_it():
    cfg = load_config(DEFAULT, ["train.projector_lr=2e-5"])
    assert phase_config(cfg, Phase(lr=5e-6)).train.projector_lr == 0.0
    assert phase_config(cfg, Phase()).train.projector_lr == 2e-5


def test_activation_checkpointing_is_on_in_training_and_off_for_generation(tiny_model_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    calls = []
    original = modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)  # what enabling binds the layers to
    base, _ = load_model_and_processor(tiny_model_path)
    enable_gradient_checkpointing(base)
    ids = torch.tensor([[1, 2, 3, 4]])
    base.train()
    base.model.language_model(input_ids=ids, use_cache=False)
    trained = len(calls)
    base.eval()
    base.model.language_model(input_ids=ids)
    assert trained == base.config.text_config.num_hidden_layers and set(calls) == {False}
    assert len(calls) == trained  # no recomputation in eval mode


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_attention_implementation_reaches_the_model(tiny_model_path, implementation):
    model, _ = load_model_and_processor(tiny_model_path, attn_implementation=implementation)
    assert model.config.text_config._attn_implementation == implementation
    assert model.config.vision_config._attn_implementation == implementation
