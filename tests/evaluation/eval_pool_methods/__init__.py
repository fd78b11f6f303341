"""A method for the actor-pool tests, outside ``methods/``: sequential LoRA whose ``generate`` raises, as a
method with a bug in its inference path would (loaded through ``$MCL_METHOD_MODULES``)."""

from __future__ import annotations

from typing import Any

from mcl.methods_api import register_method
from methods.sequential_lora import SequentialLoRA


@register_method
class FailingGenerate(SequentialLoRA):
    name = "failing_generate"

    def generate(self, model: Any, batch: Any, generate_kwargs: Any, ctx: Any) -> Any:
        raise RuntimeError("failing_generate: this method cannot answer")
