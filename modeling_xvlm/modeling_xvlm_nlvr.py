"""X-VLM for NLVR2: is a sentence true of a pair of images? (official `models/model_nlvr.py`, `NLVR.py`), and the
official text-assignment (TA) domain pre-training that precedes it (`models/model_nlvr_pretrain.py`).

Both images go through Swin in one pass. The text stack has the usual text layers followed by twice the fusion
layers (`nlvr2_text_config`): fusion layer `fusion_layer + j` cross-attends to image `j % 2`, and each
consecutive pair of fusion layers shares its cross-attention key and value projections (`tie_cross_attention_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .modeling_xvlm import (
    XVLMHeadMixin,
    XVLMModel,
    XVLMPreTrainedModel,
    build_mlp,
    head_kwargs,
    nested_to_tuple,
    wants_loss,
)

#: The softmax temperature of the TA negative sampling (a constant in the official `model_nlvr_pretrain.py`).
TA_SAMPLING_TEMPERATURE = 0.07


def nlvr2_text_config(text_config: XVLMTextConfig) -> XVLMTextConfig:
    """The NLVR2 text stack of a pre-training text config: the same text layers, each fusion layer doubled (one
    per image) with tied key/value pairs. A config that is already the NLVR2 one is returned as it is."""
    if text_config.tie_cross_attention_pairs:
        return text_config
    return text_config.with_changes(
        num_hidden_layers=text_config.fusion_layer + 2 * text_config.num_fusion_layers, tie_cross_attention_pairs=True
    )


def nlvr2_config(config: XVLMConfig) -> XVLMConfig:
    """`config` with the NLVR2 text stack (`nlvr2_text_config`)."""
    if config.text_config.tie_cross_attention_pairs:
        return config
    fields = config.to_dict()
    fields["text_config"] = nlvr2_text_config(config.text_config).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    return XVLMConfig(**fields)


def duplicate_fusion_layers(
    state_dict: dict[str, torch.Tensor], prefix: str, text_config: XVLMTextConfig
) -> dict[str, torch.Tensor]:
    """The official pre-training -> NLVR2 initialisation (`models/model_nlvr.py`, `load_pretrained`): text layers
    keep their index; fusion layer `N` of the pre-trained stack `text_config` goes to both layers
    `f + 2 (N - f)` and `f + 2 (N - f) + 1` of the NLVR2 stack (`f = fusion_layer`). Keys outside
    `{prefix}encoder.layer.` are kept as they are."""
    layer_prefix = f"{prefix}encoder.layer."
    fusion = text_config.fusion_layer
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(layer_prefix):
            out[key] = value
            continue
        index, rest = key[len(layer_prefix) :].split(".", 1)
        layer = int(index)
        targets = [layer] if layer < fusion else [fusion + 2 * (layer - fusion), fusion + 2 * (layer - fusion) + 1]
        for target in targets:
            out[f"{layer_prefix}{target}.{rest}"] = value
    return out


def _check_nlvr2_config(config: XVLMConfig) -> None:
    if not config.text_config.tie_cross_attention_pairs:
        raise ValueError(
            "The NLVR2 heads need the NLVR2 text stack (doubled fusion layers with tied key/value pairs): build the "
            "config with modeling_xvlm.modeling_xvlm_nlvr.nlvr2_config(config)."
        )


@dataclass
class XVLMForImagesAndTextClassificationOutput(ModelOutput):
    """Output of `XVLMForImagesAndTextClassification.forward`.

    Args:
        loss: cross-entropy of `logits` against `labels`, when computed.
        logits: `(B, num_labels)`; for NLVR2 class 1 = "the sentence is true of the pair".
        text_model_output: the text stack's output over all layers (`last_hidden_state` `(B, L, hidden)`).
        vision_model_output: the image encoder's output for the `2B` images (left images first).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPastAndCrossAttentions | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return nested_to_tuple(self, ("text_model_output", "vision_model_output"))


class _ImagePairMixin:
    """Shared by the NLVR2 heads: the pair of images through Swin in one pass and the text stack over both."""

    xvlm: XVLMModel

    def _check_pair(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                f"pixel_values must have shape (batch, 2, 3, H, W): the left and right image of each sentence, got "
                f"{tuple(pixel_values.shape)}."
            )

    def encode_pairs(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Image sequences of `(B, 2, 3, H, W)` pairs: `(2B, 1 + P, width)`, the B left images then the B right
        ones (official `cat([image0, image1])`)."""
        self._check_pair(pixel_values)
        return self.xvlm.encode_image(pixel_values.transpose(0, 1).flatten(0, 1), **kwargs)

    def read_pair(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        left: torch.Tensor,
        right: torch.Tensor,
        **kwargs: Any,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """The whole text stack on the sentence, fusion layers alternating between `left` and `right`."""
        return self.xvlm.text_model(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=[left, right], **kwargs
        )


class _FromPretrainingMixin:
    """`from_pretraining`: an NLVR2 head initialised from any X-VLM checkpoint with the pre-training text stack."""

    @classmethod
    def from_pretraining(cls, pretrained_model_name_or_path: Any, **kwargs: Any):
        """Build the head from a pre-training (or retrieval, or base) X-VLM checkpoint as the official NLVR2
        loader does (`duplicate_fusion_layers`); weights the checkpoint lacks (the new head) stay freshly
        initialised and are listed in `model.newly_initialized_keys`.

        Args:
            pretrained_model_name_or_path: a saved X-VLM folder / Hub id, or an X-VLM model instance.
            kwargs: passed to `XVLMModel.from_pretrained`.
        """
        source = pretrained_model_name_or_path
        if not isinstance(source, XVLMPreTrainedModel):
            source = XVLMModel.from_pretrained(source, **kwargs)
        base = source if isinstance(source, XVLMModel) else source.xvlm
        if base.config.text_config.tie_cross_attention_pairs:
            raise ValueError("This checkpoint already has the NLVR2 text stack: load it with from_pretrained.")
        model = cls(nlvr2_config(base.config))
        state = duplicate_fusion_layers(base.state_dict(), "text_model.", base.config.text_config)
        target = model.xvlm.state_dict()
        state = {k: v for k, v in state.items() if k in target}
        missing, unexpected = model.xvlm.load_state_dict(state, strict=False)
        own = [f"xvlm.{k}" for k in missing]
        heads = [n for n, _ in model.named_parameters() if not n.startswith("xvlm.")]
        if isinstance(model, XVLMForTextAssignment) and base.vision_proj is not None:
            model.vision_proj.load_state_dict(base.vision_proj.state_dict())
            heads = [n for n in heads if not n.startswith("vision_proj.")]
        model.newly_initialized_keys = sorted(own + heads)
        return model


class XVLMForImagesAndTextClassification(
    _FromPretrainingMixin, _ImagePairMixin, XVLMHeadMixin, XVLMPreTrainedModel
):
    """X-VLM for NLVR2 (official `models/model_nlvr.py`): a 2-way `cls_head` (official `build_mlp`) on the final
    [CLS] of the text stack that reads the sentence against both images; cross-entropy with `labels`.

    `pixel_values` are `(batch, 2, 3, H, W)` as for transformers' `ViltForImagesAndTextClassification`.
    """

    _no_itc_features = (
        "the official NLVR2 model (`models/model_nlvr.py`) is trained without the contrastive loss and has no "
        "`vision_proj` / `text_proj`. `model.xvlm.encode_image(pixel_values)` (one image per row) / "
        "`model.xvlm.encode_text(input_ids, attention_mask)` give the unprojected sequences; ITC features come from a "
        "pre-training or retrieval checkpoint."
    )

    def __init__(self, config: XVLMConfig):
        _check_nlvr2_config(config)
        super().__init__(config)
        self.xvlm = XVLMModel(config, add_projections=False)
        self.cls_head = build_mlp(config.text_config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForImagesAndTextClassificationOutput:
        """Classify (image pair, sentence) examples.

        Args:
            pixel_values: `(B, 2, 3, H, W)`, the left and right image of each sentence.
            input_ids, attention_mask: `(B, L)` sentences (`[CLS] words`, no `[SEP]`, as the official NLVR2).
            labels: `(B,)` class indices (NLVR2: 1 = true, 0 = false).
            return_loss: `None` (default): a loss iff `labels` are given; `True` / `False` force it.

        Returns:
            `XVLMForImagesAndTextClassificationOutput` with `logits` `(B, num_labels)`.
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        compute_loss = wants_loss(return_loss, labels)
        if compute_loss and labels is None:
            raise ValueError("XVLMForImagesAndTextClassification needs labels to compute a loss.")
        image = self.encode_pairs(pixel_values, **kwargs)
        left, right = image.last_hidden_state.chunk(2)
        if left.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Got {left.shape[0]} image pairs for {input_ids.shape[0]} sentences.")
        text = self.read_pair(input_ids, attention_mask, left, right, return_dict=True, **kwargs)
        logits = self.cls_head(text.last_hidden_state[:, 0])
        loss = None
        if compute_loss:
            labels = torch.as_tensor(labels, device=logits.device).view(-1).long()
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}.")
            loss = F.cross_entropy(logits, labels)
        return XVLMForImagesAndTextClassificationOutput(
            loss=loss, logits=logits, text_model_output=text, vision_model_output=image
        )


@dataclass
class XVLMForTextAssignmentOutput(ModelOutput):
    """Output of `XVLMForTextAssignment.forward`.

    Args:
        loss: cross-entropy of `logits` against `labels`, when computed.
        logits: `(B, 3)` TA logits of the sampled pairs: 0 = the text's image is the left one, 1 = the right one,
            2 = neither.
        labels: `(B,)` the TA labels of the sampled pairs.
        pair_index: `(B, 2)` the rows of the batch's images placed left and right for each text.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    labels: torch.LongTensor | None = None
    pair_index: torch.LongTensor | None = None


class XVLMForTextAssignment(_FromPretrainingMixin, _ImagePairMixin, XVLMHeadMixin, XVLMPreTrainedModel):
    """The official NLVR2 text-assignment domain pre-training (`models/model_nlvr_pretrain.py`).

    For each (image, text) pair of the batch, a pair of images is drawn from the batch with the ITC image-image
    similarities (`vision_proj` features, softmax at temperature 0.07, the image itself excluded): with probability
    2/3 the text's own image and one hard negative, placed left or right at random (labels 0 / 1), otherwise two
    negatives (label 2). `ta_head` (`Linear(hidden, 3)`) on the final [CLS] predicts the label. The sampling runs
    in the official order of random draws, one example at a time, so a seeded run draws the official pairs.
    """

    _no_itc_features = (
        "the official NLVR2 domain pre-training (`models/model_nlvr_pretrain.py`) keeps `vision_proj` (for the pair "
        "sampling: `get_image_features` works) but has no `text_proj` or `temp`. `model.xvlm.encode_text(input_ids, "
        "attention_mask)` gives the unprojected text-encoder states."
    )

    def __init__(self, config: XVLMConfig):
        _check_nlvr2_config(config)
        super().__init__(config)
        self.xvlm = XVLMModel(config, add_projections=False)
        self.vision_proj = nn.Linear(config.vision_width, config.projection_dim)
        self.ta_head = nn.Linear(config.text_config.hidden_size, 3)
        self.post_init()

    def _project_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised `vision_proj` feature `(B, projection_dim)` of image sequences `(B, 1 + P, width)`."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """`XVLMModel.get_image_features` with this head's `vision_proj` (its base model has none): the image
        sequence `(batch, 1 + P, vision_width)` and its ITC feature `(batch, projection_dim)`, the features
        `sample_pairs` compares, as `pooler_output`."""
        output = self.xvlm.encode_image(pixel_values, **kwargs)
        output.pooler_output = self._project_image(output.last_hidden_state)
        return output

    @torch.no_grad()
    def sample_pairs(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(pair_index (B, 2), labels (B,))` drawn from the image sequences `(B, 1 + P, width)` (official order)."""
        features = self._project_image(image_embeds)
        weights = F.softmax(features @ features.t() / TA_SAMPLING_TEMPERATURE, dim=1)
        weights.fill_diagonal_(0)
        pairs, labels = [], []
        for b in range(image_embeds.shape[0]):
            if torch.rand(1) > 1 / 3:
                negative = torch.multinomial(weights[b], 1).item()
                if torch.rand(1) > 0.5:
                    pairs.append((b, negative))
                    labels.append(0)
                else:
                    pairs.append((negative, b))
                    labels.append(1)
            else:
                first, second = torch.multinomial(weights[b], 2).tolist()
                pairs.append((first, second))
                labels.append(2)
        device = image_embeds.device
        return torch.tensor(pairs, device=device), torch.tensor(labels, device=device)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pair_index: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForTextAssignmentOutput:
        """Text assignment on B (image, text) pairs.

        Args:
            pixel_values: `(B, 3, H, W)`, the image of each text.
            input_ids, attention_mask: `(B, L)`.
            pair_index, labels: `(B, 2)` and `(B,)`, fixed image pairs and their labels; by default drawn by
                `sample_pairs` (the official training step).
            return_loss: `None` (default): a loss iff the pairs are sampled here or `labels` are given.
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        if pair_index is None and labels is not None:
            raise ValueError("labels of fixed pairs need their pair_index.")
        image_embeds = self.xvlm.encode_image(pixel_values, **kwargs).last_hidden_state
        if pair_index is None:
            pair_index, labels = self.sample_pairs(image_embeds)
        compute_loss = wants_loss(return_loss, labels)
        pair_index = torch.as_tensor(pair_index, device=image_embeds.device).long()
        if tuple(pair_index.shape) != (input_ids.shape[0], 2):
            raise ValueError(f"pair_index must have shape ({input_ids.shape[0]}, 2), got {tuple(pair_index.shape)}.")
        text = self.read_pair(
            input_ids, attention_mask, image_embeds[pair_index[:, 0]], image_embeds[pair_index[:, 1]],
            return_dict=True, **kwargs,
        )
        logits = self.ta_head(text.last_hidden_state[:, 0])
        loss = None
        if compute_loss:
            if labels is None:
                raise ValueError("XVLMForTextAssignment needs labels for fixed pairs to compute a loss.")
            labels = torch.as_tensor(labels, device=logits.device).view(-1).long()
            loss = F.cross_entropy(logits, labels)
        return XVLMForTextAssignmentOutput(loss=loss, logits=logits, labels=labels, pair_index=pair_index)


__all__ = [
    "XVLMForImagesAndTextClassification",
    "XVLMForImagesAndTextClassificationOutput",
    "XVLMForTextAssignment",
    "XVLMForTextAssignmentOutput",
    "duplicate_fusion_layers",
    "nlvr2_config",
    "nlvr2_text_config",
]
