"""X-VLM training objectives.

Every loss takes plain tensors so that it can be tested on hand-made inputs and shared by the heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def image_text_contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric ITC loss (official `get_contrastive_loss`) on one process's features.

    Args:
        image_feat: `(B, E)` L2-normalised image (or region) features.
        text_feat: `(B, E)` L2-normalised text features; row i is paired with image row i.
        temp: the temperature; logits are `image_feat @ text_feat.T / temp`.
        image_ids: optional `(B,)` ids; pairs that share an id are all positives (soft targets, official `idx`).

    Returns:
        `()` mean of the image-to-text and text-to-image cross-entropies.
    """
    logits = image_feat @ text_feat.t() / temp
    if image_ids is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    positives = (image_ids.view(-1, 1) == image_ids.view(1, -1)).to(logits.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2
