"""Loading image-text-to-text models and building the tiny local LLaVA used by the demo and the tests.

Every model, real or tiny, goes through :func:`load_model_and_processor`: a local folder or a hub id is
loaded with ``AutoModelForImageTextToText`` / ``AutoProcessor``. Built-in names (``tiny-llava``) are first
materialised as an ordinary Hugging Face checkpoint folder and then loaded through that same path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcl.errors import UnknownNameError

if TYPE_CHECKING:
    import torch

# LLaVA-1.5 style conversation, the same shape as llava-hf's template.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
TINY_TEMPLATE_WORDS = ("USER", "ASSISTANT", ":", "?", ".", ",")
# Single capital letters: multiple-choice answers and the letters a router answers with (MR-LoRA).
TINY_LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
BUILTIN_MODELS = ("tiny-llava",)
TINY_BUILD_VERSION = 3  # bump when build_tiny_llava changes, so cached builds are not reused
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def tiny_llava_vocabulary() -> list[str]:
    """Words the tiny model's tokenizer knows: the generated stream's words plus the template's."""
    from mcl.streams.generated import GENERATED_VOCABULARY

    words = list(TINY_TEMPLATE_WORDS) + [w for w in TINY_LETTERS if w not in TINY_TEMPLATE_WORDS]
    return words + [w for w in GENERATED_VOCABULARY if w not in words]


@dataclass(frozen=True)
class LlavaShape:
    """Architecture of a random-weight LLaVA (Llama text model + CLIP vision tower)."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    vision_feature_layer: int
    min_vocab_size: int = 0  # pad the embedding to a real model's size (the tokenizer may know fewer words)
    max_positions: int = 256
    # A final RMSNorm caps |logits| at |lm_head row| * sqrt(hidden); at the usual 0.02 init the tiny
    # model's logits stay near 1 and LoRA (which cannot touch lm_head) could not make confident answers.
    initializer_range: float = 0.02


def tiny_llava_shape(
    hidden_size: int = 64, num_layers: int = 2, image_size: int = 32, patch_size: int = 8
) -> LlavaShape:
    """The tiny model of the demo and the tests (trains on a laptop CPU in seconds)."""
    return LlavaShape(
        text_hidden=hidden_size,
        text_intermediate=hidden_size * 2,
        text_layers=num_layers,
        text_heads=4,
        vision_hidden=32,
        vision_intermediate=64,
        vision_layers=2,
        vision_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_feature_layer=-1,
        initializer_range=0.1,
    )


# LLaVA-1.5-7B: Vicuna-7B (Llama-2 shape) + CLIP ViT-L/14 at 336 px, 576 image tokens; for GPU benchmarks.
LLAVA_15_7B = LlavaShape(
    text_hidden=4096,
    text_intermediate=11008,
    text_layers=32,
    text_heads=32,
    vision_hidden=1024,
    vision_intermediate=4096,
    vision_layers=24,
    vision_heads=16,
    image_size=336,
    patch_size=14,
    vision_feature_layer=-2,
    min_vocab_size=32064,
    max_positions=4096,
)


def build_tiny_llava(
    out_dir: str | Path,
    vocabulary: Sequence[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """Write the tiny random-weight LLaVA checkpoint (model, tokenizer, processor) to ``out_dir``."""
    return build_random_llava(
        out_dir, vocabulary, tiny_llava_shape(hidden_size, num_layers, image_size, patch_size), seed=seed
    )


def build_random_llava(
    out_dir: str | Path,
    vocabulary: Sequence[str],
    shape: LlavaShape,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write a random-weight LLaVA checkpoint of ``shape`` (model, tokenizer, processor) to ``out_dir``.

    Real transformers classes throughout: ``LlavaForConditionalGeneration`` over a Llama text model and a
    CLIP vision tower, a word-level tokenizer wrapped in ``PreTrainedTokenizerFast``, ``CLIPImageProcessor``
    and ``LlavaProcessor``. The folder loads back with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    Large shapes are best built with ``device="cuda"`` and ``dtype="bfloat16"`` (random init on the GPU).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in [*TINY_SPECIAL_TOKENS, *vocabulary]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    num_image_tokens = (shape.image_size // shape.patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_intermediate,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            projection_dim=shape.vision_hidden,
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=max(len(vocab), shape.min_vocab_size),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            num_key_value_heads=shape.text_heads,
            max_position_embeddings=shape.max_positions,
            initializer_range=shape.initializer_range,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
        ).to_dict(),
        image_token_index=vocab["<image>"],
        image_seq_length=num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=shape.vision_feature_layer,
    )
    config.pad_token_id = vocab["<pad>"]
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.bos_token_id = vocab["<s>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _builtin_cache_dir() -> Path:
    root = os.environ.get("MCL_CACHE_DIR") or Path.home() / ".cache" / "mcl"
    return Path(root) / "models"


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Turn a config's ``model.name`` into something ``from_pretrained`` accepts.

    Built-in names are built once into the cache (keyed by a hash of their vocabulary); an existing local
    folder is returned as an absolute path; an ``org/name`` hub id is returned unchanged. Anything else is
    an error listing the valid forms.
    """
    if name_or_path in BUILTIN_MODELS:
        vocabulary = tiny_llava_vocabulary()
        key = hashlib.sha256(json.dumps([TINY_BUILD_VERSION, vocabulary]).encode()).hexdigest()[:12]
        folder = Path(cache_dir) if cache_dir else _builtin_cache_dir()
        target = folder / f"{name_or_path}-{key}"
        if not (target / "config.json").exists():
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            build_tiny_llava(tmp, vocabulary)
            try:
                tmp.rename(target)
            except OSError:  # another process built it first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    path = Path(name_or_path).expanduser()
    if name_or_path.strip() and path.is_dir():  # Path("") is ".": an empty name is not the working dir
        if not (path / "config.json").exists():
            raise UnknownNameError(f"model folder {str(path)!r} has no config.json")
        return str(path.resolve())
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/")):
        return name_or_path
    raise UnknownNameError(
        f"unknown model {name_or_path!r}: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local checkpoint folder, or a Hugging Face hub id 'org/name'"
    )


def load_model_and_processor(
    path: str, *, trust_remote_code: bool = False, dtype: str = "float32"
) -> tuple[torch.nn.Module, Any]:
    """Load an image-text-to-text model and its processor from a local folder or hub id."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype)
    )
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, processor
