"""X-VLM pre-training (official `models/model_pretrain.py`): ITC + ITM (hard negatives) + MLM, plus box L1 and
GIoU for region ("visual concept") entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_xvlm import XVLMConfig
from .losses import (
    IGNORE_INDEX,
    bbox_losses,
    distributed_world,
    image_text_contrastive_loss,
    mask_excluded_boxes,
    masked_lm_loss,
)
from .modeling_xvlm import (
    XVLMHeadMixin,
    XVLMModel,
    XVLMPreTrainedModel,
    build_mlp,
    head_kwargs,
    image_text_matching,
    nested_to_tuple,
    wants_loss,
)
from .modeling_xvlm_grounding import check_box_targets
from .modeling_xvlm_text import XVLMLMHead

@dataclass
class XVLMForPretrainingOutput(ModelOutput):
    """Output of `XVLMForPretraining.forward`.

    Args:
        loss: weighted sum of the computed losses (weights `config.*_loss_weight`).
        loss_itc, loss_itm, loss_mlm, loss_bbox_l1, loss_bbox_giou: the parts (`None` when not computed; the box
            losses are 0 for a batch without region entries).
        logits_per_image: `(N, N)` ITC logits between the visual inputs (image or region) and the texts.
        logits_per_text: `(N, N)`, the transpose.
        itm_logits: `(3N, 2)` ITM logits `[positives; (neg image, text); (image, neg text)]` when the loss is
            computed, else `(N, 2)` for the aligned pairs.
        itm_labels: `(3N,)` ITM labels (`-100` for rows without an admissible negative).
        mlm_logits: with `mlm_labels`, `(num_masked, vocab)` at the labelled positions (in `mlm_labels != -100`
            order, like the official `masked_pos` path); without, `(N, L, vocab)` for `mlm_input_ids`.
        pred_boxes: `(N, 4)` predicted `(cx, cy, w, h)` of every entry (when box `labels` or `region_masks` are
            given).
        image_embeds: `(N, projection_dim)` ITC features of the visual inputs.
        text_embeds: `(N, projection_dim)` ITC features of the texts.
        text_model_output: text encoder output.
        vision_model_output: image encoder output for the `n_images` unique images.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_mlm: torch.FloatTensor | None = None
    loss_bbox_l1: torch.FloatTensor | None = None
    loss_bbox_giou: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return nested_to_tuple(self, ("text_model_output", "vision_model_output"))



class XVLMForPretraining(XVLMHeadMixin, XVLMPreTrainedModel):
    """X-VLM pre-training (official `models/model_pretrain.py`): ITC + ITM (hard negatives) + MLM, plus box L1 and
    GIoU for region ("visual concept") entries.

    One forward takes a batch of image-text and region-text entries: unique images `pixel_values`, `image_index`
    per text, `region_masks` per text (all-ones rows for whole-image captions), the texts, the masked texts
    `mlm_input_ids` with `mlm_labels` (-100 where unmasked), box `labels` and `is_image`.
    """

    _tied_weights_keys = {"mlm_head.decoder.weight": "xvlm.text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.xvlm = XVLMModel(config, add_projections=True)
        hidden = config.text_config.hidden_size
        self.itm_head = build_mlp(hidden, 2)
        self.bbox_head = build_mlp(hidden, 4)
        self.mlm_head = XVLMLMHead(config.text_config)
        self.post_init()

    # -- tied MLM decoder -----------------------------------------------------------------------------------------
    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # X-VLM always ties the MLM decoder to the word embeddings (official BertForMaskedLM); XVLMConfig has no
        # `tie_word_embeddings` field, which transformers would otherwise read as "do not tie".
        if not all_submodels and getattr(self.config, "tie_word_embeddings", True):
            return dict(self._tied_weights_keys)
        return super().get_expanded_tied_weights_keys(all_submodels=all_submodels)

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.mlm_head.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        region_masks: torch.Tensor | None = None,
        mlm_input_ids: torch.LongTensor | None = None,
        mlm_labels: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        is_image: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForPretrainingOutput:
        """One pre-training step on N entries (texts).

        Args:
            pixel_values: `(n_images, 3, H, W)` unique images.
            input_ids, attention_mask: `(N, L)` unmasked texts (ITC, ITM, boxes).
            image_index: `(N,)` image of each entry; default `arange(N)` (needs `n_images == N`).
            region_masks: `(N, 1 + P)` region masks (1 for [CLS] and in-box patches; all ones for whole-image
                captions). `None`: a plain image-text batch.
            mlm_input_ids: `(N, L)` masked texts (same attention mask); mlm_labels: `(N, L)`, original ids at
                masked positions and -100 elsewhere.
            labels: `(N, 4)` target boxes, normalised `(cx, cy, w, h)` (the processor's `labels` for `boxes=`);
                whole-image entries use (0.5, 0.5, 1, 1).
            is_image: `(N,)` 1 for whole-image captions (excluded from the box losses), 0 for regions.
            return_loss: `None` (default): ITC + ITM (and MLM / box losses for the targets given) iff `mlm_labels`
                or `labels` are given; `True` / `False` force it. The same in train and eval mode.

        The ITC/ITM/MLM visual input of an entry is its region sequence (`XVLMModel.region_sequence`, key mask
        `region_masks`), or its image; the box head reads the FULL image with an all-ones mask (official). In
        training the temperature is clamped in place to `config.temperature_clamp` (official [0.001, 0.5]).
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        compute_loss = wants_loss(return_loss, mlm_labels, labels)
        xvlm = self.xvlm
        if self.training:
            with torch.no_grad():
                xvlm.temp.clamp_(*self.config.temperature_clamp)
        n_texts, device = input_ids.shape[0], input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_index = self._image_index(image_index, pixel_values.shape[0], n_texts, device)
        image = xvlm.encode_image(pixel_values, **kwargs)
        visual_seqs, visual_index = self._visual_inputs(image.last_hidden_state, image_index, region_masks)
        text = xvlm.get_text_features(input_ids, attention_mask, return_dict=True, **kwargs)
        image_feat = xvlm.project_image(visual_seqs)[visual_index]
        logits_per_image = image_feat @ text.pooler_output.t() / xvlm.temp

        loss_itc = loss_itm = itm_labels = None
        if compute_loss:
            groups = self._visual_groups(image_index, region_masks)
            loss_itc, loss_itm, itm_logits, itm_labels = self._contrastive_and_matching(
                visual_seqs, visual_index, region_masks, text, attention_mask, image_feat, groups
            )
        else:
            fused = xvlm.fuse(
                text.last_hidden_state, attention_mask, visual_seqs, region_masks, image_index=visual_index
            )
            itm_logits = self.itm_head(fused[:, 0])
        mlm_logits, loss_mlm = self._masked_lm(
            mlm_input_ids, mlm_labels, input_ids, attention_mask, visual_seqs[visual_index], region_masks
        )
        pred_boxes, loss_l1, loss_giou = self._boxes(
            text.last_hidden_state, attention_mask, image.last_hidden_state, image_index, region_masks, labels,
            is_image,
        )
        loss = None
        if compute_loss:
            loss = self._weighted_loss(loss_itc, loss_itm, loss_mlm, loss_l1, loss_giou)
        return XVLMForPretrainingOutput(
            loss=loss,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            loss_mlm=loss_mlm,
            loss_bbox_l1=loss_l1,
            loss_bbox_giou=loss_giou,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            itm_logits=itm_logits,
            itm_labels=itm_labels,
            mlm_logits=mlm_logits,
            pred_boxes=pred_boxes,
            image_embeds=image_feat,
            text_embeds=text.pooler_output,
            text_model_output=text,
            vision_model_output=image,
        )

    # -- the steps of forward ---------------------------------------------------------------------------------
    @staticmethod
    def _image_index(
        image_index: torch.Tensor | None, n_images: int, n_texts: int, device: torch.device
    ) -> torch.Tensor:
        if image_index is None:
            if n_images != n_texts:
                raise ValueError(
                    f"Got {n_images} images for {n_texts} texts: pass image_index (the image of each text)."
                )
            return torch.arange(n_texts, device=device)
        image_index = torch.as_tensor(image_index, device=device).long()
        if image_index.dim() != 1 or image_index.shape[0] != n_texts:
            raise ValueError(f"image_index must have shape ({n_texts},), got {tuple(image_index.shape)}.")
        if int(image_index.min()) < 0 or int(image_index.max()) >= n_images:
            raise ValueError(f"image_index values must be in [0, {n_images}).")
        return image_index

    def _visual_inputs(
        self, full_images: torch.Tensor, image_index: torch.Tensor, region_masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual sequences and the row of each entry: one region sequence per entry, or the shared images."""
        if region_masks is None:
            return full_images, image_index
        regions = self.xvlm.region_sequence(full_images, region_masks, image_index)  # (N, 1 + P, W)
        return regions, torch.arange(regions.shape[0], device=regions.device)

    def _visual_groups(self, image_index: torch.Tensor, region_masks: torch.Tensor | None) -> torch.Tensor:
        """Id per entry such that two entries share an id iff they have the same visual input (same image and same
        region mask): those pairs are positives for ITC and never ITM negatives. With
        `official_duplicate_negatives`, every entry is its own group (official)."""
        if self.config.official_duplicate_negatives:
            return torch.arange(image_index.shape[0], device=image_index.device)
        if region_masks is None:
            return image_index
        keys = torch.cat([image_index[:, None].long(), (region_masks != 0).long()], dim=1)
        return torch.unique(keys, dim=0, return_inverse=True)[1]

    def _contrastive_and_matching(
        self,
        visual_seqs: torch.Tensor,
        visual_index: torch.Tensor,
        region_masks: torch.Tensor | None,
        text: BaseModelOutputWithPooling,
        attention_mask: torch.Tensor,
        image_feat: torch.Tensor,
        groups: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC loss (distributed, ids unique across processes) and ITM with hard negatives."""
        xvlm = self.xvlm
        rank, _ = distributed_world()
        loss_itc = image_text_contrastive_loss(
            image_feat,
            text.pooler_output,
            xvlm.temp,
            groups + (rank << 32),
            official_gradient_scaling=self.config.official_itc_gradient_scaling,
        )
        loss_itm, itm_logits, itm_labels, _ = image_text_matching(
            xvlm,
            self.itm_head,
            visual_seqs,
            visual_index,
            region_masks,
            text.last_hidden_state,
            attention_mask,
            image_feat,
            text.pooler_output,
            xvlm.temp,
            groups[:, None] == groups[None, :],
        )
        return loss_itc, loss_itm, itm_logits, itm_labels

    def _masked_lm(
        self,
        mlm_input_ids: torch.Tensor | None,
        mlm_labels: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_seqs: torch.Tensor,
        region_masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """MLM logits (at the labelled positions when `mlm_labels` are given) and the MLM loss."""
        if mlm_labels is not None and mlm_input_ids is None:
            raise ValueError("mlm_labels need mlm_input_ids (the masked texts).")
        if mlm_input_ids is None:
            return None, None
        if tuple(mlm_input_ids.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"mlm_input_ids {tuple(mlm_input_ids.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)} (they share attention_mask)."
            )
        mlm_states = self.xvlm.text_model(
            input_ids=mlm_input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=visual_seqs,
            encoder_attention_mask=region_masks,
            return_dict=True,
        ).last_hidden_state
        if mlm_labels is None:
            return self.mlm_head(mlm_states), None
        if tuple(mlm_labels.shape) != tuple(mlm_input_ids.shape):
            raise ValueError(
                f"mlm_labels {tuple(mlm_labels.shape)} must have the shape of mlm_input_ids "
                f"{tuple(mlm_input_ids.shape)} (-100 at unmasked positions)."
            )
        masked = mlm_labels != IGNORE_INDEX
        mlm_logits = self.mlm_head(mlm_states[masked])
        return mlm_logits, masked_lm_loss(mlm_logits, mlm_labels[masked])

    def _boxes(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        full_images: torch.Tensor,
        image_index: torch.Tensor,
        region_masks: torch.Tensor | None,
        labels: torch.Tensor | None,
        is_image: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Predicted boxes from the fused [CLS] over the full image, and the box losses against `labels`."""
        if labels is None and region_masks is None:
            return None, None, None
        n_texts = text_states.shape[0]
        fused_full = self.xvlm.fuse(text_states, attention_mask, full_images, image_index=image_index)
        pred_boxes = self.bbox_head(fused_full[:, 0]).sigmoid()
        if labels is None:
            return pred_boxes, None, None
        labels = torch.as_tensor(labels, device=pred_boxes.device)
        if is_image is not None:
            is_image = torch.as_tensor(is_image, device=pred_boxes.device).view(-1)
            if is_image.shape[0] != n_texts:
                raise ValueError(f"is_image must have shape ({n_texts},), got {tuple(is_image.shape)}.")
            if tuple(labels.shape) == (n_texts, 4):  # whole-image rows replaced first: they are not checked
                labels = mask_excluded_boxes(labels.float(), is_image)[0]
        labels = check_box_targets(labels, n_texts)
        loss_l1, loss_giou = bbox_losses(
            pred_boxes, labels, is_image, official_batch_zeroing=self.config.official_giou_batch_zeroing
        )
        return pred_boxes, loss_l1, loss_giou

    def _weighted_loss(self, *parts: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        weights = (
            config.itc_loss_weight,
            config.itm_loss_weight,
            config.mlm_loss_weight,
            config.bbox_l1_loss_weight,
            config.bbox_giou_loss_weight,
        )
        return sum(weight * value for weight, value in zip(weights, parts) if value is not None)


__all__ = ["XVLMForPretraining", "XVLMForPretrainingOutput"]
