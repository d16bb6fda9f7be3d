"""X-VLM for referring-expression grounding with boxes (official `XVLMForGrounding`, `Grounding_bbox.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions, BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_xvlm import XVLMConfig
from .losses import bbox_losses
from .modeling_xvlm import (
    XVLMHeadMixin,
    XVLMModel,
    XVLMPreTrainedModel,
    build_mlp,
    head_kwargs,
    nested_to_tuple,
    wants_loss,
)

@dataclass
class XVLMForGroundingOutput(ModelOutput):
    """Output of `XVLMForGrounding.forward`.

    Args:
        loss: `bbox_l1_loss_weight * loss_bbox_l1 + bbox_giou_loss_weight * loss_bbox_giou`, when `labels` are given.
        loss_bbox_l1: L1 distance summed over the 4 coordinates, averaged over boxes.
        loss_bbox_giou: mean `1 - GIoU`.
        pred_boxes: `(B, 4)` boxes `(cx, cy, w, h)` in [0, 1], relative to the square model input.
        text_model_output: text encoder output.
        vision_model_output: image encoder output.
        fusion_model_output: fusion encoder output (`last_hidden_state` `(B, L, hidden)`).
    """

    loss: torch.FloatTensor | None = None
    loss_bbox_l1: torch.FloatTensor | None = None
    loss_bbox_giou: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithCrossAttentions | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    fusion_model_output: BaseModelOutputWithCrossAttentions | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return nested_to_tuple(self, ("text_model_output", "vision_model_output", "fusion_model_output"))



def check_box_targets(labels: torch.Tensor, batch: int, name: str = "labels") -> torch.Tensor:
    """Checked float `(batch, 4)` normalised `(cx, cy, w, h)` box targets (shape, finiteness, range)."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if tuple(labels.shape) != (batch, 4):
        raise ValueError(
            f"{name} must have shape ({batch}, 4): one normalised (cx, cy, w, h) box per text, got "
            f"{tuple(labels.shape)}."
        )
    if not labels.is_floating_point():
        labels = labels.float()
    if not bool(torch.isfinite(labels).all()):
        raise ValueError(f"{name} contain NaN or infinite values.")
    if bool((labels < 0).any()) or bool((labels > 1).any()):
        raise ValueError(
            f"{name} must be (cx, cy, w, h) normalised to [0, 1] by the model input size, got values in "
            f"[{float(labels.min()):.4g}, {float(labels.max()):.4g}]. Convert pixel boxes with the processor."
        )
    return labels


class XVLMForGrounding(XVLMHeadMixin, XVLMPreTrainedModel):
    """X-VLM for referring-expression grounding with boxes (official `XVLMForGrounding`, `Grounding_bbox.py`).

    `bbox_head` on the fused [CLS] (full image, all-ones image mask) + sigmoid gives `(cx, cy, w, h)` in [0, 1]
    relative to the square model input. The base model has no ITC projections or temperature (official box
    checkpoints have none), so every parameter is trained by the box loss.
    """

    _no_itc_features = (
        "the official box-grounding model (`models/model_bbox.py`) is trained without the contrastive loss and has "
        "no `vision_proj` / `text_proj`. `model.xvlm.encode_image(pixel_values)` / `model.xvlm.encode_text("
        "input_ids, attention_mask)` give the unprojected sequences; ITC features come from a pre-training or "
        "retrieval checkpoint (weakly supervised grounding uses XVLMForRetrieval, which has them)."
    )

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.xvlm = XVLMModel(config, add_projections=False)
        self.bbox_head = build_mlp(config.text_config.hidden_size, 4)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.FloatTensor | None = None,
        image_index: torch.LongTensor | None = None,
        region_masks: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForGroundingOutput:
        """Predict one box per text.

        Args:
            pixel_values: `(n_images, 3, H, W)`.
            input_ids, attention_mask: `(B, L)`.
            labels: optional `(B, 4)` target boxes, normalised `(cx, cy, w, h)` in [0, 1] (the processor's
                `labels` for `boxes=`).
            image_index: optional `(B,)`, the image of each text (several expressions of one image share its
                encoding); default: text b uses image b.
            region_masks: accepted so that a processor batch with boxes can be passed whole, and never read: the
                box head sees the full image (official), and the target's own box mask would give the answer away.
            return_loss: `None` (default): a loss iff `labels` are given; `True` / `False` force it.

        Returns:
            `XVLMForGroundingOutput` with `pred_boxes` `(B, 4)` and, with the loss, `loss = l1 + giou` (weights
            `config.bbox_l1_loss_weight`, `config.bbox_giou_loss_weight`).
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        compute_loss = wants_loss(return_loss, labels)
        if compute_loss and labels is None:
            raise ValueError("XVLMForGrounding needs labels (target boxes) to compute a loss.")
        xvlm = self.xvlm
        image = xvlm.encode_image(pixel_values, **kwargs)
        text = xvlm.encode_text(input_ids, attention_mask, **kwargs)
        batch = input_ids.shape[0]
        if image_index is None and image.last_hidden_state.shape[0] != batch:
            raise ValueError(
                f"Got {image.last_hidden_state.shape[0]} images for {batch} texts: pass image_index to pair texts "
                "with images."
            )
        if labels is not None:
            labels = check_box_targets(labels, batch).to(image.last_hidden_state.device)
        fusion = xvlm.fuse(
            text.last_hidden_state,
            attention_mask,
            image.last_hidden_state,
            image_index=None if image_index is None else torch.as_tensor(image_index, device=input_ids.device),
            return_dict=True,
            **kwargs,
        )
        pred_boxes = self.bbox_head(fusion.last_hidden_state[:, 0]).sigmoid()
        loss = loss_l1 = loss_giou = None
        if compute_loss:
            loss_l1, loss_giou = bbox_losses(
                pred_boxes, labels, official_batch_zeroing=self.config.official_giou_batch_zeroing
            )
            loss = self.config.bbox_l1_loss_weight * loss_l1 + self.config.bbox_giou_loss_weight * loss_giou
        return XVLMForGroundingOutput(
            loss=loss,
            loss_bbox_l1=loss_l1,
            loss_bbox_giou=loss_giou,
            pred_boxes=pred_boxes,
            text_model_output=text,
            vision_model_output=image,
            fusion_model_output=fusion,
        )


__all__ = ["XVLMForGrounding", "XVLMForGroundingOutput", "check_box_targets"]
