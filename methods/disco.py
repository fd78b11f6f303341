"""DISCO: one LoRA subspace per task, and per sample the subspaces weighted by how its instruction matches
each task's (subspace-selective activation), in every layer.

Paper: Guo et al., "Federated Continual Instruction Tuning" (ICCV 2025), method DISCO (Dynamic knowledge
organIzation and Subspace-selective activation for COntinual learning). Code: ``Ghy0501/FCIT``; MCITlib
(``Ghy0501/MCITlib``, ``DISCO/``) runs it centrally, one task after another, with no client or server code,
and that is the form implemented here. File references are to MCITlib's copy.

What the method does:

- **Dynamic knowledge organisation: task-specific subspaces.** Every targeted linear layer holds one LoRA
  slice per task (``CoINMOELinearA/B`` in ``DISCO/CoIN/peft/tuners/clitmoelora.py``); task ``t`` trains
  slice ``t`` alone in every layer (``proj_layer.lora_id = cur_task``, ``DISCO/llava/model/llava_arch.py``
  lines 199-210). The subspaces are isolated by construction: disjoint slices, each trained only during its
  own task, no orthogonality loss. The federated grouping of clients' updates by task reduces to this when
  one process trains every task.
- **Task features.** While task ``t`` trains, the mean text feature of its instructions (and the mean image
  feature, computed but not used) is kept (``llava_arch.py`` lines 185-197).
- **Subspace-selective activation.** At inference every layer applies ``y = W x + s * sum_i w_i B_i A_i x``
  with ``w = softmax(cos(f_txt, g_txt_i) / 0.05)`` over the tasks (``llava_arch.py`` lines 175-182 and
  211-226, the block-diagonal ``lora_AB`` of ``clitmoelora.py`` lines 401-420). The image term is commented
  out there (``# 0.5*cos_sim_text + 0.5*cos_sim_img``): text only, ``image_weight`` 0.

The slices, the features and their deviations are HiDe-LLaVA's (:mod:`methods.hide_llava`, whose code
MCITlib's DISCO shares but for these two rules): features from the model's own input embeddings and vision
tower instead of a separate CLIP, exact means over all ranks (MCITlib's update adds the batch size to the
feature instead of the counter, so it keeps a bf16 running sum; only its direction is used, the same as the
mean's), the softmax over the tasks seen so far, weights per sample in a batch.

Hyper-parameters (``method.params``): ``task_rank`` (0 = ``model.lora.r // tasks``), ``temperature``
(0.05), ``image_weight`` (0.0: text only, as released).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mcl.methods_api import register_method
from methods.hide_llava import HiDeLLaVA, HiDeParams


@dataclass
class DISCOParams(HiDeParams):
    """DISCO hyper-parameters (see the module docstring for the released code's values)."""

    temperature: float = field(
        default=0.05, metadata={"help": "Softmax temperature of the per-sample subspace weights (> 0)."}
    )
    image_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the image cosine in the task similarity, in [0, 1] (released: 0)."},
    )


@register_method
class DISCO(HiDeLLaVA):
    name = "disco"
    Params = DISCOParams
    mixed_layers: ClassVar[str] = "all"
