"""LoRA adapters in the standard PEFT format, shared by the methods that use them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mcl.config import LoraConfig

ADAPTER_DIR = "adapter"


def projector_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the multimodal projector modules (trained alongside LoRA when asked)."""
    names = []
    for name, _ in model.named_children():
        if "projector" in name:
            names.append(name)
    inner = getattr(model, "model", None)
    if inner is not None:
        names += [n for n, _ in inner.named_children() if "projector" in n]
    return sorted(set(names))


def new_lora(model: torch.nn.Module, lora: LoraConfig, adapter_name: str = "default") -> torch.nn.Module:
    """Wrap ``model`` in a fresh, trainable PEFT LoRA adapter (B initialised to zero: output unchanged)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=projector_module_names(model) if lora.train_projector else None,
        bias="none",
    )
    return get_peft_model(model, peft_config, adapter_name=adapter_name)


def load_lora(model: torch.nn.Module, path: str | Path, trainable: bool = True) -> torch.nn.Module:
    """Load a saved PEFT adapter folder onto ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def save_lora(model: torch.nn.Module, path: str | Path) -> Path:
    """Save the PEFT adapter(s) of ``model`` as safetensors. Parameters must already be gathered (ZeRO-3)."""
    out = Path(path)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
