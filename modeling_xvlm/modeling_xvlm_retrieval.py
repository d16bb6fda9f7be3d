"""X-VLM for image-text retrieval (official `XVLMForRetrieval`, `Retrieval.py`): ITC + ITM with hard negatives,
and the official ranking protocol (`modeling_xvlm.retrieval`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions, BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_xvlm import XVLMConfig
from .losses import image_text_contrastive_loss
from .modeling_xvlm import (
    XVLMHeadMixin,
    XVLMModel,
    XVLMPreTrainedModel,
    build_mlp,
    head_kwargs,
    image_text_matching,
    nested_to_tuple,
    slice_output,
    wants_loss,
)
from . import retrieval
from .retrieval import RetrievalOutput, retrieve, score_matrices


@dataclass
class XVLMForRetrievalOutput(ModelOutput):
    """Output of `XVLMForRetrieval.forward`.

    Args:
        loss: `itc_loss_weight * loss_itc + itm_loss_weight * loss_itm`, when the loss is computed.
        loss_itc: image-text contrastive loss (soft targets over pairs sharing an `image_id`).
        loss_itm: image-text matching loss with hard negatives.
        logits_per_image: `(n_images, n_texts)` ITC similarities divided by the temperature.
        logits_per_text: `(n_texts, n_images)`, the transpose.
        itm_logits: `(B, 2)` ITM logits of the aligned pairs (image i, text i); class 1 = match. `None` when the
            numbers of images and texts differ.
        itm_labels: `(3B,)` labels of the ITM pass `[positives; (neg image, text); (image, neg text)]`
            (`-100` for rows without an admissible negative), when the loss is computed.
        image_embeds: `(n_images, projection_dim)` L2-normalised ITC image features.
        text_embeds: `(n_texts, projection_dim)` L2-normalised ITC text features.
        text_model_output: text encoder output.
        vision_model_output: image encoder output (`last_hidden_state` `(n_images, 1 + P, vision_width)`).
        fusion_model_output: fusion encoder output of the aligned pairs.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    fusion_model_output: BaseModelOutputWithCrossAttentions | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return nested_to_tuple(self, ("text_model_output", "vision_model_output", "fusion_model_output"))



class XVLMForRetrieval(XVLMHeadMixin, XVLMPreTrainedModel):
    """X-VLM for image-text retrieval (official `XVLMForRetrieval`, `Retrieval.py`): ITC through the base model's
    projections and temperature, and an ITM head on the fused [CLS] (class 1 = match).

    Training: `forward(..., return_loss=True)` returns ITC (soft targets over pairs sharing an `image_id`) + ITM
    (hard negatives). Inference: `rank` (ITC top-k re-ranked with ITM), `itm_scores`, `retrieval_score_matrices`
    and `modeling_xvlm.retrieval.retrieval_metrics`.
    """

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.xvlm = XVLMModel(config, add_projections=True)
        self.itm_head = build_mlp(config.text_config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForRetrievalOutput:
        """Score images against texts; compute the ITC + ITM training loss by the heads' loss rule.

        Args:
            pixel_values: `(n_images, 3, H, W)`.
            input_ids: `(n_texts, L)`; attention_mask: `(n_texts, L)`.
            image_ids: `(B,)` image ids of aligned training pairs (the retrieval targets); texts of the same image
                are ITC positives (soft targets) and never ITM negatives.
            return_loss: `None` (default): a loss iff `image_ids` are given; `True`: a loss with every pair its
                own image; `False`: no loss. The same in train and eval mode (docs/heads.md).

        Returns:
            `XVLMForRetrievalOutput`; `itm_logits` are those of the aligned pairs (when `n_images == n_texts`).
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        xvlm = self.xvlm
        image = xvlm.get_image_features(pixel_values, return_dict=True, **kwargs)
        text = xvlm.get_text_features(input_ids, attention_mask, return_dict=True, **kwargs)
        image_feat, text_feat = image.pooler_output, text.pooler_output
        logits_per_image = image_feat @ text_feat.t() / xvlm.temp
        n_images, n_texts = image_feat.shape[0], text_feat.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        loss = loss_itc = loss_itm = itm_labels = itm_logits = fusion = None
        if wants_loss(return_loss, image_ids):
            if n_images != n_texts:
                raise ValueError(
                    f"The retrieval loss needs aligned image-text pairs, got {n_images} images and {n_texts} texts."
                )
            loss_itc, loss_itm, all_logits, itm_labels, fused = self._training_losses(
                image, text, attention_mask, image_ids, **kwargs
            )
            itm_logits = all_logits[:n_images]
            fusion = slice_output(fused, n_images)
            loss = self.config.itc_loss_weight * loss_itc + self.config.itm_loss_weight * loss_itm
        elif n_images == n_texts:
            fusion = xvlm.fuse(
                text.last_hidden_state, attention_mask, image.last_hidden_state, return_dict=True, **kwargs
            )
            itm_logits = self.itm_head(fusion.last_hidden_state[:, 0])

        return XVLMForRetrievalOutput(
            loss=loss,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            itm_logits=itm_logits,
            itm_labels=itm_labels,
            image_embeds=image_feat,
            text_embeds=text_feat,
            text_model_output=text,
            vision_model_output=image,
            fusion_model_output=fusion,
        )

    def _training_losses(
        self,
        image: BaseModelOutputWithPooling,
        text: BaseModelOutputWithPooling,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, BaseModelOutputWithCrossAttentions]:
        """ITC (soft targets over pairs sharing an image id) and ITM with hard negatives of aligned pairs."""
        image_feat, text_feat = image.pooler_output, text.pooler_output
        n_images = image_feat.shape[0]
        positive_mask = None
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids, device=image_feat.device).view(-1)
            if image_ids.shape[0] != n_images:
                raise ValueError(f"image_ids must have shape ({n_images},), got {tuple(image_ids.shape)}.")
            positive_mask = image_ids[:, None] == image_ids[None, :]
        temp = self.xvlm.temp
        loss_itc = image_text_contrastive_loss(
            image_feat, text_feat, temp, image_ids, official_gradient_scaling=self.config.official_itc_gradient_scaling
        )
        rows = torch.arange(n_images, device=image_feat.device)
        loss_itm, logits, labels, fused = image_text_matching(
            self.xvlm,
            self.itm_head,
            image.last_hidden_state,
            rows,
            None,
            text.last_hidden_state,
            attention_mask,
            image_feat,
            text_feat,
            temp,
            positive_mask,
            **kwargs,
        )
        return loss_itc, loss_itm, logits, labels, fused

    # -- inference ------------------------------------------------------------------------------------------------
    def itm_scores(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw ITM logit of class "match" (official retrieval score) for (image, text) pairs.

        Give the images either as `pixel_values` `(n, 3, H, W)` or as encoded sequences `image_embeds`
        `(n, 1 + P, vision_width)` (`encode_image(...).last_hidden_state`), and the texts as `input_ids` `(B, L)` or
        text-encoder states `text_embeds` `(B, L, hidden)` (`get_text_features(...).last_hidden_state`), with their
        `attention_mask` `(B, L)`. Text b is paired with image b, or with image `image_index[b]` when given (each
        image is then fused once for all its texts).

        Returns:
            `(B,)` logits (no softmax; official `itm_head(cls)[:, 1]`), by `modeling_xvlm.retrieval.itm_scores`.
        """
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("Pass exactly one of pixel_values or image_embeds.")
        if (input_ids is None) == (text_embeds is None):
            raise ValueError("Pass exactly one of input_ids or text_embeds.")
        if image_embeds is None:
            image_embeds = self.xvlm.encode_image(pixel_values).last_hidden_state
        if text_embeds is None:
            text_embeds = self.xvlm.encode_text(input_ids, attention_mask).last_hidden_state
        return retrieval.itm_scores(self, image_embeds, text_embeds, attention_mask, image_index, image_attention_mask)

    def compute_gradcam(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        layer: int | None = None,
        real_tokens_only: bool = False,
    ) -> torch.Tensor:
        """Grad-CAM map of each (image b, text b) pair on the patch grid (official weakly supervised grounding,
        `Grounding.py::val` with `gradcam_mode='itm'`).

        The cross-attention probabilities `A` `(B, heads, L, 1 + P)` of fusion layer `layer` times the gradient
        of the summed ITM "match" logits with respect to them, clamped at 0; the image [CLS] column is dropped and
        padded text positions are zeroed; the product is averaged over heads, then over the `L` text positions.
        Call `model.eval()` first as the official evaluation does (dropout would make the map random). Parameter
        gradients are not touched (`.grad` stays as it was), and it works under `torch.no_grad()`.

        Args:
            pixel_values: `(B, 3, H, W)`; input_ids, attention_mask: `(B, L)` (official: padded to the longest).
            layer: index of the fusion layer in the whole text stack (official `block_num`); default
                `config.default_gradcam_layer` (9 for X-VLM-base).
            real_tokens_only: `False` (official): the mean over text positions divides by the padded length `L`,
                so a pair's map is scaled by its real length / `L` and depends on the longest text of its batch;
                `True` divides by the pair's own number of real tokens (a batch-independent map).

        Returns:
            `(B, grid_h, grid_w)` float32 maps (`grid = image_size / patch_stride`: 12 x 12 at 384 px), for
            `XVLMProcessor.post_process_gradcam`.
        """
        text_config = self.config.text_config
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"layer must be an int (the fusion layer's index in the text stack), got {layer!r}.")
        layer = self.config.default_gradcam_layer if layer is None else layer
        if not text_config.fusion_layer <= layer < text_config.num_hidden_layers:
            raise ValueError(
                f"layer must be a fusion layer, in [{text_config.fusion_layer}, {text_config.num_hidden_layers}), "
                f"got {layer}."
            )
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"compute_gradcam pairs image b with text b: got {pixel_values.shape[0]} images and "
                f"{input_ids.shape[0]} texts."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            image = self.xvlm.encode_image(pixel_values).last_hidden_state
            text = self.xvlm.encode_text(input_ids, attention_mask).last_hidden_state
        with torch.enable_grad():
            # A leaf image sequence puts the attention probabilities in the graph even with frozen parameters;
            # only the fusion layers (the ones downstream of the probabilities) need a graph.
            image = image.detach().requires_grad_(True)
            # output_attentions makes the text layers use eager attention, whose probabilities are recorded
            # (with their graph) as `cross_attentions`, one per fusion layer.
            fusion = self.xvlm.fuse(
                text.detach(), attention_mask, image, return_dict=True, output_attentions=True
            )
            probs = fusion.cross_attentions[layer - text_config.fusion_layer]
            match = self.itm_head(fusion.last_hidden_state[:, 0])[:, 1].sum()
            (grads,) = torch.autograd.grad(match, probs)
        side = self.config.image_size // self.config.patch_stride
        batch, heads, length, _ = probs.shape
        mask = attention_mask.to(probs.dtype).view(batch, 1, length, 1, 1)
        cams = probs.detach()[..., 1:].reshape(batch, heads, length, side, side) * mask
        grads = grads[..., 1:].clamp(min=0).reshape(batch, heads, length, side, side) * mask
        per_token = (cams * grads).mean(1)
        if real_tokens_only:
            return (per_token.sum(1) / attention_mask.sum(1).clamp(min=1).to(per_token.dtype)[:, None, None]).float()
        return per_token.mean(1).float()

    @torch.no_grad()
    def rank(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        k: int = 16,
        batch_size: int = 64,
        precision: str = "fp32",
        encode_precision: str | None = None,
        top1_margin: float | None = None,
    ) -> RetrievalOutput:
        """Rank a gallery of images for every text and texts for every image (official `Retrieval.py` protocol).

        Every image and text is encoded once (in batches of `batch_size`); the ITC cosine similarity (no
        temperature) of all pairs picks the top `k` candidates in each direction; the union of those pairs is scored
        once each with the ITM head, in fusion batches of `batch_size` pairs. Candidates are returned sorted by
        their ITM logit. This is `modeling_xvlm.retrieval.retrieve` (also behind `xvlm-eval` and the pipeline).

        Precision (docs/benchmarks.md): `precision` is that of the ITM re-ranking, `encode_precision` (default:
        `precision`) that of the image and text encoders; "fp32" or "bf16" (autocast on the model's device). With
        a bf16 re-ranking, near ties are re-scored in fp32 (`modeling_xvlm.retrieval.refine_top1`: candidates
        within `top1_margin` ITM logits of a query's best, default 0.1, growing when the measured bf16 error needs
        it; 0 turns it off), so each query keeps the fp32 top-1 among its candidates. With fp32 encoders
        (`precision="bf16", encode_precision="fp32"`) the candidates are fp32's too, so the top-1 is exactly the
        fp32 ranking's; with bf16 encoders (about 3x faster encoding on CPUs with bf16 instructions) the ITC
        candidates come from bf16 features and can differ at the k-th position, which can change a top-1.

        Returns:
            `modeling_xvlm.retrieval.RetrievalOutput` with `i2t_indices`/`i2t_scores` `(n_images, k)`,
            `t2i_indices`/`t2i_scores` `(n_texts, k)` and `similarity` `(n_images, n_texts)`.
        """
        return retrieve(
            self, pixel_values, input_ids, attention_mask, k=k, batch_size=batch_size, precision=precision,
            encode_precision=encode_precision, top1_margin=top1_margin,
        )

    @torch.no_grad()
    def retrieval_score_matrices(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        k: int = 16,
        batch_size: int = 64,
        precision: str = "fp32",
        encode_precision: str | None = None,
        top1_margin: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official evaluation matrices `(scores_i2t (n_images, n_texts), scores_t2i (n_texts, n_images))`: -100
        everywhere except the top-`k` ITC candidates, which hold their raw ITM logit (for `retrieval_metrics`).
        `precision`, `encode_precision` and `top1_margin` as in `rank`."""
        return score_matrices(
            self.rank(pixel_values, input_ids, attention_mask, k=k, batch_size=batch_size, precision=precision,
                      encode_precision=encode_precision, top1_margin=top1_margin)
        )



__all__ = ["XVLMForRetrieval", "XVLMForRetrievalOutput"]
