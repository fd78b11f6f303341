"""The paper-scale recipes (``jobs/configs/recipes/``) and their cluster sweep, validated without weights.

Every recipe passes ``jobs/run_stream.py --check`` with only ``stream.root`` (a tiny fixture of the recipe's
stream in its published layout) and ``model.name`` (a config-only checkpoint of the recipe's real
architecture: config + processor, no weights) changed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from mcl.config import load_config
from mcl.tiny_models import CONFIG_ONLY_MODELS, build_config_only_checkpoint

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "jobs" / "configs" / "recipes").glob("*.yaml"))
MODES = ["--check", "--plan"]
# Published parameter counts: LLaVA-1.5-7B 7.06 B, Qwen2.5-VL-7B-Instruct 8.29 B.
PARAMETERS = {"llava-hf/llava-1.5-7b-hf": 7_063_427_072, "Qwen/Qwen2.5-VL-7B-Instruct": 8_292_166_656}


def _run_stream():
    spec = importlib.util.spec_from_file_location("mcl_recipes_run_stream", REPO / "jobs" / "run_stream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def config_only(tmp_path_factory) -> dict[str, Path]:
    """A config-only checkpoint of every architecture a recipe names (a few seconds, no weights)."""
    root = tmp_path_factory.mktemp("config_only")
    return {
        name: build_config_only_checkpoint(name, root / name.replace("/", "--"))
        for name in CONFIG_ONLY_MODELS
    }


def _meta_model(path: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))


def test_the_recipes_are_there():
    names = {p.name for p in RECIPES}
    assert names >= {
        "mr_lora_mllmcl_domain_llava7b.yaml",
        "mr_lora_mllmcl_ability_llava7b.yaml",
        "unifier_msvqa20_llava7b.yaml",
        "sequential_lora_mllmcl_domain_llava7b.yaml",
        "mr_lora_mllmcl_domain_qwen25vl7b.yaml",
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_passes_with_only_root_and_model_changed(recipe, mode, config_only, tmp_path, capsys):
    from mcl.streams.fixtures import write_fixture

    cfg = load_config(recipe)
    assert cfg.model.name in CONFIG_ONLY_MODELS, (
        f"{recipe.name}: no config-only checkpoint of {cfg.model.name}"
    )
    # The fixture's size only: every worker needs a test sample of every step (MSVQA 20-step: 5 per scenario).
    per_task = cfg.scaling.num_workers * cfg.stream.options.get("chunks_per_scenario", 1)
    write_fixture(cfg.stream.name, tmp_path / "data", train_per_task=per_task, test_per_task=per_task)
    argv = [
        "--config",
        str(recipe),
        mode,
        f"stream.root={tmp_path / 'data'}",
        f"model.name={config_only[cfg.model.name]}",
    ]
    assert _run_stream().main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if mode == "--check":
        assert "check passed" in out
    else:  # the plan of the real architecture, its sequence length measured on the stream's rows
        assert f"over {cfg.scaling.num_workers} worker(s)" in out and "assumed" not in out, out


def test_the_paper_recipe_is_spelled_out():
    """The MR-LoRA domain recipe holds the published numbers (bjzhb666/MLLM-CL Train_dom_single scripts)."""
    cfg = load_config(REPO / "jobs" / "configs" / "recipes" / "mr_lora_mllmcl_domain_llava7b.yaml")
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.dtype) == (128, 256, "bfloat16")
    assert (cfg.train.lr, cfg.train.projector_lr, cfg.train.lr_schedule, cfg.train.warmup_ratio) == (
        2e-5,
        2e-5,
        "cosine",
        0.03,
    )
    assert (cfg.train.batch_size, cfg.micro_batch, cfg.scaling.num_workers, cfg.accumulation_steps) == (
        64,
        4,
        8,
        2,
    )
    assert cfg.train.gradient_checkpointing and cfg.train.group_by_length and cfg.train.epochs == 1
    assert (cfg.scaling.deepspeed, cfg.scaling.zero_stage) == (True, 2)
    assert cfg.method.params == {
        "router_samples_per_task": 20,
        "router_epochs": 40,
        "router_lr": 5e-6,
        "router_init": "merged",
    }


@pytest.mark.parametrize("name", sorted(CONFIG_ONLY_MODELS))
def test_config_only_checkpoint_is_the_real_architecture_without_weights(name, config_only):
    from PIL import Image

    from mcl.models import load_processor, resolve_model_path

    path = Path(resolve_model_path(str(config_only[name])))
    assert not [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    model = _meta_model(path)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    processor = load_processor(str(path))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=[Image.new("RGB", (336, 336))], text=[prompt], return_tensors="pt")
    config = model.config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    # 336 px: CLIP-L/14 gives 24 x 24 = 576 tokens; Qwen's 14 px patches merged 2 x 2 give 144.
    expected = 576 if config.model_type == "llava" else 144
    assert int((batch["input_ids"] == image_id).sum()) == expected
    assert processor.tokenizer.pad_token_id == config.text_config.pad_token_id


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_lora_targets_exist_in_the_real_model(recipe, config_only):
    """The LoRA target regex matches the real model's modules (else only the Train workers would notice)."""
    from mcl.adapters import lora_target_modules, projector_modules

    cfg = load_config(recipe)
    model = _meta_model(config_only[cfg.model.name])
    pattern = re.compile(lora_target_modules(model, cfg.model.lora))
    targets = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    assert any("language_model" in n for n in targets)
    vision = [n for n in targets if "vision_tower" in n]
    if "ability" in recipe.name:  # --use_vision_lora: every linear of the CLIP encoder layers (24 x 6)
        assert len(vision) == 24 * 6
    else:
        assert not vision
    assert projector_modules(model)


def test_cluster_sweep_runs_the_domain_table_on_the_recipe():
    from mcl.sweep.config import load_sweep_config
    from mcl.sweep.trials import expand_trials

    sweep = load_sweep_config(REPO / "clusters" / "sweep_mllmcl_domain_llava7b.yaml")
    assert Path(sweep.base) == REPO / "jobs" / "configs" / "recipes" / "mr_lora_mllmcl_domain_llava7b.yaml"
    trials = expand_trials(sweep)
    assert {t.method for t in trials} >= {"sequential_lora", "mr_lora"}
    assert len(trials) == len({t.method for t in trials}) * len(sweep.seeds)
    for t in trials:
        assert t.config["stream"]["name"] == "mllm-cl-domain"
        assert t.config["model"]["name"] == "llava-hf/llava-1.5-7b-hf"
        assert (t.config["train"]["lr"], t.config["train"]["micro_batch_size"]) == (2e-5, 4)
    router = next(t for t in trials if t.method == "mr_lora")
    assert router.config["method"]["params"]["router_init"] == "merged"
