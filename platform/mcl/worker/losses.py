"""Losses the engine trains with, public for methods that add their own terms."""

from __future__ import annotations

from typing import Any

from mcl.data import IGNORE_INDEX


def per_sample_loss(logits: Any, labels: Any) -> Any:
    """Mean token cross-entropy of each sample's supervised tokens, averaged over the samples that have any.

    Averaging per sample (not per token) keeps the loss of a global batch independent of how its samples
    are split over workers. Rows without supervised tokens (a method's unsupervised rows, see
    ``mcl.data.ROW_KEYS``) do not count; a batch of only such rows has loss 0.
    """
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    per_sample = (tok * mask).sum(1) / mask.sum(1).clamp(min=1)
    has_target = (mask.sum(1) > 0).float()
    return (per_sample * has_target).sum() / has_target.sum().clamp(min=1)


__all__ = ["per_sample_loss"]
