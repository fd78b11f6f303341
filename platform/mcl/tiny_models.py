"""Random-weight checkpoints built locally: the built-in models of the tests and the demo, and big shapes.

A model name in :data:`BUILTIN_MODELS` (``tiny-llava``, ``tiny-qwen2.5-vl``, ``tiny-internvl``) is built
once into the cache by :func:`builtin_model_path` as an ordinary Hugging Face checkpoint folder: its family's
real transformers classes with random weights, a word-level tokenizer and the family's chat template.
:func:`mcl.models.resolve_model_path` calls it, and the folder then loads like any real model. Each family
has one builder over a :class:`ModelShape` (:func:`build_random_model`); it also writes a random
LLaVA-1.5-7B (:data:`LLAVA_15_7B`) for the GPU benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mcl.errors import UnknownNameError
from mcl.models import image_only_processor_class

UNK_TOKEN = "<unk>"  # every tiny tokenizer has one (WordLevel needs it)
# Single capital letters: multiple-choice answers and the letters a router answers with (MR-LoRA).
TINY_LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
TINY_PUNCTUATION = (":", "?", ".", ",")
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
TINY_SPECIAL_TOKENS = ("<pad>", UNK_TOKEN, "<s>", "</s>", "<image>")
TINY_TEMPLATE_WORDS = ("USER", "ASSISTANT", *TINY_PUNCTUATION)
# Qwen2.5-VL-Instruct's template (default system prompt, vision markers around the image pad).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_5_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    UNK_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_5_VL_TEMPLATE_WORDS = ("system", "user", "assistant", "You", "are", "a", "helpful", *TINY_PUNCTUATION)
# InternVL's (-hf checkpoints) template: ChatML turns, <IMG_CONTEXT> expanded by the processor to
# <img> + image_seq_length context tokens + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    UNK_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
INTERNVL_TEMPLATE_WORDS = ("user", "assistant", *TINY_PUNCTUATION)
TINY_BUILD_VERSION = 3  # bump when a tiny builder or shape changes, so cached builds are not reused


def tiny_vocabulary(template_words: Sequence[str]) -> list[str]:
    """Words a tiny model's tokenizer knows: its chat template's, letters, and the generated stream's."""
    from mcl.streams.generated import GENERATED_VOCABULARY

    words = list(template_words) + [w for w in TINY_LETTERS if w not in template_words]
    return words + [w for w in GENERATED_VOCABULARY if w not in words]


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a random-weight vision-language model: a decoder-only text model and a ViT.

    Every family reads the same fields: LLaVA (Llama + CLIP), Qwen2.5-VL (Qwen2.5 + its windowed ViT, the
    last vision block with full attention) and InternVL (Qwen2 + InternViT). ``image_size`` is the side of
    the square image (of the one tile, for InternVL) the vision tower sees.
    """

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
    vision_feature_layer: int = -1  # LLaVA and InternVL: the vision layer whose features are projected
    min_vocab_size: int = 0  # pad the embedding to a real model's size (the tokenizer may know fewer words)
    max_positions: int = 256
    # A final RMSNorm caps |logits| at |lm_head row| * sqrt(hidden); at the usual 0.02 init the tiny
    # model's logits stay near 1 and LoRA (which cannot touch lm_head) could not make confident answers.
    initializer_range: float = 0.02


# The tiny models of the demo and the tests (they train on a laptop CPU in seconds): 16 image tokens each.
TINY_LLAVA = ModelShape(
    text_hidden=64,
    text_intermediate=128,
    text_layers=2,
    text_heads=4,
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=2,
    vision_heads=2,
    image_size=32,
    patch_size=8,
    initializer_range=0.1,
)
# Patches of 4 merged 2x2 (Qwen2.5-VL's patch merger, InternVL's pixel shuffle).
TINY_QWEN2_5_VL = replace(TINY_LLAVA, patch_size=4, max_positions=512)
TINY_INTERNVL = TINY_QWEN2_5_VL
# LLaVA-1.5-7B: Vicuna-7B (Llama-2 shape) + CLIP ViT-L/14 at 336 px, 576 image tokens; for GPU benchmarks.
LLAVA_15_7B = ModelShape(
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


# What a family's builder makes, unsaved: the model class, its config and the processor (tokenizer inside).
RandomModelParts = tuple[type, Any, Any]


def word_level_tokenizer(
    vocabulary: Sequence[str],
    special_tokens: Sequence[str],
    *,
    pad: str,
    eos: str,
    bos: str | None = None,
    named_tokens: dict[str, str] | None = None,
    fixed_ids: dict[str, int] | None = None,
    size: int = 0,
) -> Any:
    """A whitespace-split word-level ``PreTrainedTokenizerFast``: ``special_tokens`` get the first ids (they
    must hold ``pad``, ``eos``, ``bos`` and ``<unk>``), then ``vocabulary``; padding on the left.

    ``fixed_ids`` pins tokens to the ids a real tokenizer gives them (the others take the lowest free ids, in
    order) and ``size`` fills unused ids up to that many entries with ``<unused_N>`` placeholders.

    ``named_tokens`` become tokenizer attributes the processors read (``{"image_token": "<image>"}`` gives
    ``tokenizer.image_token`` and ``tokenizer.image_token_id``); every special token that is not pad, unk,
    bos or eos is registered as an additional special token (kept whole, dropped when decoding).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _token_ids([*special_tokens, *vocabulary], fixed_ids or {}, size)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        unk_token=UNK_TOKEN,
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=named_tokens or {},
        padding_side="left",
    )
    markers = [t for t in special_tokens if t not in (pad, UNK_TOKEN, bos, eos)]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


def _token_ids(tokens: Sequence[str], fixed: dict[str, int], size: int) -> dict[str, int]:
    """Token -> id: ``fixed`` ones pinned, the rest on the lowest free ids, gaps below ``size`` filled."""
    vocab = dict(fixed)
    taken = set(fixed.values())
    if len(taken) != len(fixed):
        raise ValueError(f"fixed token ids collide: {fixed}")
    next_id = 0
    for token in tokens:
        if token in vocab:
            continue
        while next_id in taken:
            next_id += 1
        vocab[token] = next_id
        taken.add(next_id)
    for free in sorted(set(range(size)) - taken):
        vocab[f"<unused_{free}>"] = free
    return vocab


def _text_config(tokenizer: Any, shape: ModelShape, **extra: Any) -> dict[str, Any]:
    """The text model's config fields of ``shape`` (multi-head attention: as many KV heads as heads)."""
    return {
        "vocab_size": max(len(tokenizer), shape.min_vocab_size),
        "hidden_size": shape.text_hidden,
        "intermediate_size": shape.text_intermediate,
        "num_hidden_layers": shape.text_layers,
        "num_attention_heads": shape.text_heads,
        "num_key_value_heads": shape.text_heads,
        "max_position_embeddings": shape.max_positions,
        "initializer_range": shape.initializer_range,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


def _llava_parts(vocabulary: Sequence[str], shape: ModelShape) -> RandomModelParts:
    """LLaVA: ``LlavaForConditionalGeneration`` over a Llama text model and a CLIP vision tower,
    ``CLIPImageProcessor`` and ``LlavaProcessor`` with a LLaVA-1.5 style chat template."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_level_tokenizer(
        vocabulary,
        TINY_SPECIAL_TOKENS,
        pad="<pad>",
        eos="</s>",
        bos="<s>",
        named_tokens={"image_token": "<image>"},
    )
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
        text_config=LlamaConfig(**_text_config(tokenizer, shape)).to_dict(),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(shape.image_size // shape.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=shape.vision_feature_layer,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return LlavaForConditionalGeneration, config, processor


def _qwen2_5_vl_parts(vocabulary: Sequence[str], shape: ModelShape) -> RandomModelParts:
    """Qwen2.5-VL: ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL's own vision transformer (window attention over
    the whole image, 2x2 patch merger) and multimodal rotary positions, ``Qwen2VLImageProcessor`` (PIL
    backend; every image resized to ``image_size``² pixels: ``(image_size / patch_size / 2)²`` image
    tokens) and ``Qwen2_5_VLProcessor`` with Qwen2.5-VL-Instruct's chat template.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    named = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }
    tokenizer = word_level_tokenizer(
        vocabulary, QWEN2_5_VL_SPECIAL_TOKENS, pad="<|endoftext|>", eos="<|im_end|>", named_tokens=named
    )
    pixels = shape.image_size * shape.image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=shape.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    processor = image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE
    )
    half_head = shape.text_hidden // shape.text_heads // 2  # rotary sections (time, height, width)
    section = half_head * 3 // 8
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [half_head - 2 * section, section, section],
    }
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, shape, rope_parameters=rope),
        vision_config={
            "depth": shape.vision_layers,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_intermediate,
            "num_heads": shape.vision_heads,
            "patch_size": shape.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": shape.image_size,
            "fullatt_block_indexes": [shape.vision_layers - 1],
            "out_hidden_size": shape.text_hidden,
        },
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
    )
    return Qwen2_5_VLForConditionalGeneration, config, processor


def _internvl_parts(vocabulary: Sequence[str], shape: ModelShape) -> RandomModelParts:
    """InternVL: the transformers-native ``InternVLForConditionalGeneration`` (InternViT vision tower, pixel-shuffle
    downsampling by 2, MLP projector, Qwen2 text model), ``GotOcr2ImageProcessor`` (PIL backend; one
    ``image_size`` tile per image: ``(image_size / patch_size / 2)²`` image tokens) and ``InternVLProcessor``
    with InternVL's chat template.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    named = {
        "context_image_token": "<IMG_CONTEXT>",
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "video_token": "<video>",
    }
    tokenizer = word_level_tokenizer(
        vocabulary, INTERNVL_SPECIAL_TOKENS, pad="<|endoftext|>", eos="<|im_end|>", named_tokens=named
    )
    image_size, patch_size = shape.image_size, shape.patch_size
    image_seq_length = (image_size // patch_size // 2) ** 2
    # Dynamic tiling (crop_to_patches) stays on, as in InternVL, capped at one tile: one tile per image.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1, max_patches=1
    )
    processor = image_only_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    config = InternVLConfig(
        text_config=_text_config(tokenizer, shape, model_type="qwen2"),
        vision_config={
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_intermediate,
            "num_hidden_layers": shape.vision_layers,
            "num_attention_heads": shape.vision_heads,
            "image_size": [image_size, image_size],
            "patch_size": [patch_size, patch_size],
        },
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        vision_feature_layer=shape.vision_feature_layer,
    )
    return InternVLForConditionalGeneration, config, processor


# By config.model_type (the keys of mcl.models.MODEL_FAMILIES).
_FAMILY_PARTS: dict[str, Callable[[Sequence[str], ModelShape], RandomModelParts]] = {
    "llava": _llava_parts,
    "qwen2_5_vl": _qwen2_5_vl_parts,
    "internvl": _internvl_parts,
}


def build_random_model(
    model_type: str,
    out_dir: str | Path,
    vocabulary: Sequence[str],
    shape: ModelShape,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write a random-weight checkpoint of family ``model_type`` and ``shape`` to ``out_dir``.

    The family's real transformers classes (model, processor with its chat template) and a word-level
    tokenizer over ``vocabulary``; the folder loads back with ``AutoModelForImageTextToText`` /
    ``AutoProcessor``. Weights are initialised from ``seed`` on ``device`` in ``dtype``: large shapes are
    best built with ``device="cuda"`` and ``dtype="bfloat16"``. Generation uses the tokenizer's pad, eos and
    bos ids.
    """
    import torch

    if model_type not in _FAMILY_PARTS:
        raise UnknownNameError(
            f"no random-model builder for model type {model_type!r} ({', '.join(_FAMILY_PARTS)})"
        )
    model_class, config, processor = _FAMILY_PARTS[model_type](vocabulary, shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model name: its family (``config.model_type``), its shape and its chat template's words."""

    model_type: str
    shape: ModelShape
    template_words: tuple[str, ...]

    def vocabulary(self) -> list[str]:
        """The tokenizer's words (see :func:`tiny_vocabulary`)."""
        return tiny_vocabulary(self.template_words)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-llava": BuiltinModel("llava", TINY_LLAVA, TINY_TEMPLATE_WORDS),
    "tiny-qwen2.5-vl": BuiltinModel("qwen2_5_vl", TINY_QWEN2_5_VL, QWEN2_5_VL_TEMPLATE_WORDS),
    "tiny-internvl": BuiltinModel("internvl", TINY_INTERNVL, INTERNVL_TEMPLATE_WORDS),
}


def _builtin_cache_dir() -> Path:
    root = os.environ.get("MCL_CACHE_DIR") or Path.home() / ".cache" / "mcl"
    return Path(root) / "models"


def builtin_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint folder of built-in model ``name``, built on first use (random init from seed 0).

    Folders live in ``cache_dir`` (default ``$MCL_CACHE_DIR/models``, else ``~/.cache/mcl/models``) under
    ``<name>-<hash of TINY_BUILD_VERSION and the vocabulary>``; concurrent first builds are safe (each
    process builds into its own temporary folder, the first rename wins).
    """
    model = BUILTIN_MODELS[name]
    vocabulary = model.vocabulary()
    key = hashlib.sha256(json.dumps([TINY_BUILD_VERSION, vocabulary]).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir else _builtin_cache_dir()
    target = folder / f"{name}-{key}"
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        build_random_model(model.model_type, tmp, vocabulary, model.shape)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- config-only checkpoints of real architectures ---------------------------------------------------------
# The published llava-hf/llava-1.5-7b-hf and Qwen/Qwen2.5-VL-7B-Instruct configs (architecture fields) and
# their processors' settings; a word-level tokenizer stands in for the real one (nothing is downloaded),
# with the real ids of every special token the processors and configs use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_15_IDS = {UNK_TOKEN: 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
QWEN2_5_VL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


# Architecture fields of the published config.json files.
LLAVA_15_7B_TEXT = {
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 32001,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LLAVA_15_7B_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}
QWEN2_5_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}
QWEN2_5_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "hidden_act": "silu",
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "out_hidden_size": 3584,
}


def _llava_15_7b_parts() -> RandomModelParts:
    """llava-hf/llava-1.5-7b-hf: Vicuna-7B (Llama-2 7B shape, vocab 32064) + CLIP ViT-L/14-336 (feature
    layer -2, 576 image tokens), ``CLIPImageProcessor`` at 336 px with CLIP's mean/std."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_level_tokenizer(
        tiny_vocabulary(TINY_TEMPLATE_WORDS),
        TINY_SPECIAL_TOKENS,
        pad="<pad>",
        eos="</s>",
        bos="<s>",
        named_tokens={"image_token": "<image>"},
        fixed_ids=LLAVA_15_IDS,
        size=32000,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        resample=3,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**LLAVA_15_7B_VISION).to_dict(),
        text_config=LlamaConfig(**LLAVA_15_7B_TEXT).to_dict(),
        image_token_index=LLAVA_15_IDS["<image>"],
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    config.pad_token_id = LLAVA_15_IDS["<pad>"]
    return LlavaForConditionalGeneration, config, processor


def _qwen2_5_vl_7b_parts() -> RandomModelParts:
    """Qwen/Qwen2.5-VL-7B-Instruct: Qwen2.5-7B (28 layers, 28 heads, 4 KV heads, vocab 152064, M-RoPE
    sections 16/24/24) + its 32-block windowed ViT (hidden 1280, full attention in blocks 7/15/23/31),
    ``Qwen2VLImageProcessor`` with min/max pixels 3136 / 12845056, patch 14, merge 2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    named = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }
    tokenizer = word_level_tokenizer(
        tiny_vocabulary(QWEN2_5_VL_TEMPLATE_WORDS),
        QWEN2_5_VL_SPECIAL_TOKENS,
        pad="<|endoftext|>",
        eos="<|im_end|>",
        named_tokens=named,
        fixed_ids=QWEN2_5_VL_IDS,
        size=151643,
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 3136, "longest_edge": 12845056},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor = image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(QWEN2_5_VL_7B_TEXT),
        vision_config=dict(QWEN2_5_VL_7B_VISION),
        image_token_id=QWEN2_5_VL_IDS["<|image_pad|>"],
        video_token_id=QWEN2_5_VL_IDS["<|video_pad|>"],
        vision_start_token_id=QWEN2_5_VL_IDS["<|vision_start|>"],
        vision_end_token_id=QWEN2_5_VL_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration, config, processor


CONFIG_ONLY_MODELS: dict[str, Callable[[], RandomModelParts]] = {
    "llava-hf/llava-1.5-7b-hf": _llava_15_7b_parts,
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen2_5_vl_7b_parts,
}


def build_config_only_checkpoint(name: str, dest: str | Path) -> Path:
    """Config + processor, no weights: for ``--check`` / ``--plan`` of real-architecture recipes.

    Writes into ``dest`` the published ``config.json`` of hub model ``name`` (one of
    :data:`CONFIG_ONLY_MODELS`) and a working processor (the real image-processor settings and chat
    template; a local word-level tokenizer that gives every special token its real id). The folder is a
    valid ``model.name`` for :func:`mcl.models.resolve_model_path` and :func:`mcl.models.load_processor`;
    the model builds from it on the meta device (e.g. to count parameters), but there are no weights to load.
    """
    if name not in CONFIG_ONLY_MODELS:
        raise UnknownNameError(f"no config-only checkpoint for {name!r} ({', '.join(CONFIG_ONLY_MODELS)})")
    model_class, config, processor = CONFIG_ONLY_MODELS[name]()
    config.architectures = [model_class.__name__]
    config.dtype = "bfloat16"
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
