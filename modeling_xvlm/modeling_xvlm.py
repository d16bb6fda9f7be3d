"""PyTorch X-VLM: a Swin image encoder, a BERT-style text encoder and a cross-modal fusion encoder.

Numerically this is the official `XVLMBase` (zengyan-97/X-VLM, `models/xvlm.py`):

- image: Swin -> final LayerNorm -> `[mean of patch tokens; patch tokens]`, `(batch, 1 + P, vision_width)`;
- region ("visual concept"): the same patch tokens, with token 0 the mean over the patches inside the box; the box
  mask is the key mask of the fusion cross-attention;
- text: embeddings + layers `[0, fusion_layer)`; fusion: layers `[fusion_layer, num_hidden_layers)` with
  bidirectional self-attention plus cross-attention to the image tokens;
- ITC features: L2-normalised projections of token 0 of each side; similarity logits are divided by `temp`.

Attention goes through transformers' attention interface, so `attn_implementation="eager"` and `"sdpa"` both work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SwinModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .initialization import build_from_vision_text_pretrained
from .losses import image_text_contrastive_loss

# ----------------------------------------------------------------------------------------------------------------
# Output classes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class XVLMOutput(ModelOutput):
    """Output of `XVLMModel.forward`.

    Args:
        loss: ITC loss, `()`, when `return_loss=True`.
        logits_per_image: `(n_images, n_texts)` similarities divided by the temperature.
        logits_per_text: `(n_texts, n_images)`, the transpose.
        text_embeds: L2-normalised text features `(n_texts, projection_dim)`.
        image_embeds: L2-normalised image features `(n_images, projection_dim)`.
        text_model_output: text encoder output, `last_hidden_state` `(n_texts, L, hidden)`.
        vision_model_output: image encoder output, `last_hidden_state` `(n_images, 1 + P, vision_width)`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def expand_key_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a `(batch, n_keys)` 0/1 key mask into an additive `(batch, 1, 1, n_keys)` mask (0 or dtype-min).

    Returns `None` when nothing is masked, so SDPA can use its fastest kernel. The official code adds -10000
    (self-attention) or -1e9 (cross-attention); after the softmax both are exactly 0 in fp32, as is dtype-min.
    """
    if mask is None:
        return None
    if mask.dim() == 4:
        return mask.to(dtype)
    if bool(mask.all()):
        return None
    keep = mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


# ----------------------------------------------------------------------------------------------------------------
# Text / fusion encoder
# ----------------------------------------------------------------------------------------------------------------


class XVLMTextEmbeddings(nn.Module):
    """Word + absolute position + token type (always 0) embeddings, then LayerNorm and dropout (as BERT)."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; inputs `(batch, heads, length, head_dim)`, output `(batch, length, heads, head_dim)`."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class XVLMSelfAttention(nn.Module):
    """Multi-head attention with BERT parameter names (`query`, `key`, `value`).

    For cross-attention the keys and values are computed from the image tokens, whose width is
    `config.encoder_width` (1024 for Swin-B), which is why transformers' `BertCrossAttention` cannot be used.
    Attention is bidirectional (`is_causal = False`) in both cases.
    """

    def __init__(self, config: XVLMTextConfig, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.is_cross_attention = is_cross_attention
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        encoder_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        kv_states = encoder_hidden_states if self.is_cross_attention else hidden_states
        head_shape = (self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).view(batch, length, *head_shape).transpose(1, 2)
        kv_shape = (kv_states.shape[0], kv_states.shape[1], *head_shape)
        key = self.key(kv_states).view(kv_shape).transpose(1, 2)
        value = self.value(kv_states).view(kv_shape).transpose(1, 2)
        if encoder_index is not None:
            # Keys/values of each distinct image are computed once and shared by all texts paired with it.
            key, value = key[encoder_index], value[encoder_index]

        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout.p if self.training else 0.0,
            **kwargs,
        )
        return attn_output.reshape(batch, length, -1).contiguous(), attn_weights


class XVLMSelfOutput(nn.Module):
    """Post-LN residual block after attention: dense -> dropout -> LayerNorm(x + input)."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class XVLMAttentionBlock(nn.Module):
    """`self` attention + `output` residual block (BERT's `attention.self.*` / `attention.output.*` names)."""

    def __init__(self, config: XVLMTextConfig, is_cross_attention: bool = False):
        super().__init__()
        self.self = XVLMSelfAttention(config, is_cross_attention=is_cross_attention)
        self.output = XVLMSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        encoder_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, weights = self.self(
            hidden_states, attention_mask, encoder_hidden_states, output_attentions, encoder_index
        )
        return self.output(context, hidden_states), weights


class XVLMIntermediate(nn.Module):
    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class XVLMOutputBlock(nn.Module):
    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class XVLMLayer(GradientCheckpointingLayer):
    """One BERT layer; fusion layers (`layer_idx >= fusion_layer`) add cross-attention to the image tokens."""

    def __init__(self, config: XVLMTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.has_cross_attention = layer_idx >= config.fusion_layer
        self.attention = XVLMAttentionBlock(config)
        if self.has_cross_attention:
            self.crossattention = XVLMAttentionBlock(config, is_cross_attention=True)
        self.intermediate = XVLMIntermediate(config)
        self.output = XVLMOutputBlock(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_index: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hidden_states, self_weights = self.attention(hidden_states, attention_mask, None, output_attentions)
        cross_weights = None
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(f"Fusion layer {self.layer_idx} needs image embeddings (encoder_hidden_states).")
            hidden_states, cross_weights = self.crossattention(
                hidden_states, encoder_attention_mask, encoder_hidden_states, output_attentions, encoder_index
            )
        hidden_states = self.output(self.intermediate(hidden_states), hidden_states)
        return hidden_states, self_weights, cross_weights


class XVLMEncoder(nn.Module):
    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([XVLMLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        layers: range,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        encoder_index: torch.Tensor | None = None,
    ) -> BaseModelOutputWithCrossAttentions:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_self = () if output_attentions else None
        all_cross = () if output_attentions and encoder_hidden_states is not None else None
        for index in layers:
            # Tensors that need gradients go positionally (GradientCheckpointingLayer with use_reentrant=True).
            hidden_states, self_weights, cross_weights = self.layer[index](
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                encoder_index,
                output_attentions=output_attentions,
            )
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
            if output_attentions:
                all_self = all_self + (self_weights,)
                if all_cross is not None and cross_weights is not None:
                    all_cross = all_cross + (cross_weights,)
        return BaseModelOutputWithCrossAttentions(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden,
            attentions=all_self,
            cross_attentions=all_cross,
        )


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------------------------


class XVLMPreTrainedModel(PreTrainedModel):
    config_class = XVLMConfig
    base_model_prefix = "xvlm"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["XVLMLayer", "SwinStage"]
    _keys_to_ignore_on_load_unexpected = [r"position_ids$"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XVLMTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, XVLMModel) and module.temp is not None:
            init.constant_(module.temp, self.config.temperature_init)

    def enable_input_require_grads(self) -> None:
        """Make the text embedding output require grads (for adapters / gradient checkpointing).

        transformers' default hooks every sub-model's input embeddings; Swin's patch embeddings return a tuple,
        which that hook cannot handle, so only the word embeddings (and the patch projection output) are hooked.
        """

        def make_output_require_grad(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                tensor.requires_grad_(True)

        handles = [self.get_input_embeddings().register_forward_hook(make_output_require_grad)]
        for module in self.modules():
            if isinstance(module, SwinModel):
                handles.append(
                    module.embeddings.patch_embeddings.projection.register_forward_hook(make_output_require_grad)
                )
        self._require_grads_hooks = handles
        self._require_grads_hook = handles[0]

    def disable_input_require_grads(self) -> None:
        for handle in getattr(self, "_require_grads_hooks", []):
            handle.remove()
        self._require_grads_hooks = []


class XVLMTextModel(XVLMPreTrainedModel):
    """The BERT-style stack: `forward` runs the text layers, `fuse` the fusion layers (official modes
    `'text'` and `'fusion'`); `forward(..., encoder_hidden_states=...)` runs all layers (`'multi_modal'`)."""

    config_class = XVLMTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)
    base_model_prefix = "text_model"

    def __init__(self, config: XVLMTextConfig):
        super().__init__(config)
        self.embeddings = XVLMTextEmbeddings(config)
        self.encoder = XVLMEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def _output_flags(self, output_attentions: bool | None, output_hidden_states: bool | None) -> tuple[bool, bool]:
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        return output_attentions, output_hidden_states

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithCrossAttentions | tuple:
        """Embed `input_ids` `(batch, L)` and run the text layers, or all layers when `encoder_hidden_states`
        `(batch, 1 + P, encoder_width)` are given. Returns `last_hidden_state` `(batch, L, hidden)`."""
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if len(shape) != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(shape)}.")
        if shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {shape[1]} exceeds max_position_embeddings={self.config.max_position_embeddings}."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape {tuple(shape)}."
            )
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        if encoder_hidden_states is None:
            layers = range(self.config.fusion_layer)
        else:
            layers = range(self.config.num_hidden_layers)
            encoder_attention_mask = _check_image_mask(encoder_attention_mask, tuple(encoder_hidden_states.shape[:2]))
        output = self.encoder(
            hidden,
            expand_key_mask(attention_mask, hidden.dtype),
            encoder_hidden_states,
            expand_key_mask(encoder_attention_mask, hidden.dtype),
            layers,
            output_attentions,
            output_hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        image_index: torch.Tensor | None = None,
    ) -> BaseModelOutputWithCrossAttentions:
        """Run the fusion layers on text states `(batch, L, hidden)` cross-attending to image tokens
        `(batch, 1 + P, encoder_width)` (key mask `image_attention_mask` `(batch, 1 + P)`, default all ones).

        With `image_index` `(batch,)`, `image_embeds` holds `n` distinct image sequences `(n, 1 + P, width)` and
        text row b attends to `image_embeds[image_index[b]]`; each image's keys/values are computed once per layer.
        """
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        if text_embeds.dim() != 3 or image_embeds.dim() != 3:
            raise ValueError(
                f"fuse expects text_embeds (batch, L, hidden) and image_embeds (batch, 1 + P, width); got "
                f"{tuple(text_embeds.shape)} and {tuple(image_embeds.shape)}."
            )
        if image_index is not None:
            if image_index.dim() != 1 or image_index.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    f"image_index must have shape ({text_embeds.shape[0]},), one image row per text, got "
                    f"{tuple(image_index.shape)}."
                )
            if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= len(image_embeds)):
                raise ValueError(f"image_index values must be in [0, {len(image_embeds)}).")
        elif text_embeds.shape[0] != image_embeds.shape[0]:
            raise ValueError(
                f"fuse got {text_embeds.shape[0]} texts but {image_embeds.shape[0]} images: pair each text with "
                "one image sequence (index the image embeddings first, e.g. image_embeds[image_index])."
            )
        if text_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"text_embeds width {text_embeds.shape[-1]} != hidden_size {self.config.hidden_size}.")
        if image_embeds.shape[-1] != self.config.encoder_width:
            raise ValueError(
                f"image_embeds width {image_embeds.shape[-1]} != encoder_width {self.config.encoder_width}."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(text_embeds.shape[:2]):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match text_embeds "
                f"{tuple(text_embeds.shape[:2])}."
            )
        mask_shape = (text_embeds.shape[0], image_embeds.shape[1])
        image_attention_mask = _check_image_mask(image_attention_mask, mask_shape)
        return self.encoder(
            text_embeds,
            expand_key_mask(attention_mask, text_embeds.dtype),
            image_embeds,
            expand_key_mask(image_attention_mask, text_embeds.dtype),
            range(self.config.fusion_layer, self.config.num_hidden_layers),
            output_attentions,
            output_hidden_states,
            image_index,
        )


def _check_image_mask(mask: torch.Tensor | None, expected: tuple[int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    expected = tuple(expected)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"image_attention_mask has shape {tuple(mask.shape)} but the image sequence needs {expected} "
            "(one 0/1 entry per image token: [CLS] + patches)."
        )
    if not bool((mask != 0).any(dim=1).all()):
        raise ValueError("image_attention_mask has a row with no visible image token.")
    return mask


# ----------------------------------------------------------------------------------------------------------------
# The base model
# ----------------------------------------------------------------------------------------------------------------


class XVLMModel(XVLMPreTrainedModel):
    """X-VLM base model: image, region and text encoders, the fusion encoder and the ITC projections.

    Args:
        config: the model configuration.
        add_projections: create `vision_proj`, `text_proj` and `temp` (the ITC space). The grounding head builds
            its base model without them, as the official box model has none.
    """

    def __init__(self, config: XVLMConfig, add_projections: bool = True):
        super().__init__(config)
        self.vision_model = SwinModel(config.vision_config, add_pooling_layer=False)
        self.text_model = XVLMTextModel(config.text_config)
        if add_projections:
            self.vision_proj = nn.Linear(config.vision_width, config.projection_dim)
            self.text_proj = nn.Linear(config.text_config.hidden_size, config.projection_dim)
            self.temp = nn.Parameter(torch.tensor(float(config.temperature_init)))
        else:
            self.vision_proj = self.text_proj = None
            self.temp = None
        self.post_init()

    # -- embeddings -------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.embeddings.word_embeddings = value

    # -- validation ---------------------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        size = self.config.image_size
        channels = self.config.vision_config.num_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, {size}, {size}), got {tuple(pixel_values.shape)}."
            )
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but this model was built for "
                f"{size}x{size} images: resize them with XVLMImageProcessor (size={size})."
            )

    def _require_projections(self) -> None:
        if self.vision_proj is None:
            raise ValueError("This XVLMModel was built with add_projections=False and has no ITC projections.")

    # -- encoders ---------------------------------------------------------------------------------------------
    def encode_image(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """The visual sequence `[mean patch; patches]`, `(batch, 1 + P, vision_width)`, without projection."""
        self._check_pixel_values(pixel_values)
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        vision = self.vision_model(
            pixel_values=pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        patches = vision.last_hidden_state  # after Swin's final LayerNorm, as the official CLS-like token needs
        sequence = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence, hidden_states=vision.hidden_states, attentions=vision.attentions
        )

    @staticmethod
    def region_sequence(
        image_embeds: torch.Tensor, region_masks: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """Region sequences from already encoded images.

        Args:
            image_embeds: `(n_images, 1 + P, width)` from `encode_image`.
            region_masks: `(R, 1 + P)`, 1 for [CLS] and the patches inside each box.
            image_index: `(R,)`, the row of `image_embeds` each region belongs to.

        Returns:
            `(R, 1 + P, width)`: token 0 is the mean of the in-box patches, tokens 1.. are the image's patches.
        """
        patches = image_embeds[image_index, 1:]
        weights = region_masks[:, 1:].to(patches.dtype).unsqueeze(-1)
        region_cls = (weights * patches).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
        return torch.cat([region_cls, patches], dim=1)

    def _check_regions(self, n_images: int, region_masks: torch.Tensor, image_index: torch.Tensor) -> None:
        expected = 1 + self.config.num_patches
        if region_masks.dim() != 2 or region_masks.shape[1] != expected:
            raise ValueError(
                f"region_masks must have shape (num_regions, {expected}) = (R, 1 + num_patches), got "
                f"{tuple(region_masks.shape)}."
            )
        if image_index.dim() != 1 or image_index.shape[0] != region_masks.shape[0]:
            raise ValueError(
                f"image_index must have shape ({region_masks.shape[0]},) (one image row per region), got "
                f"{tuple(image_index.shape)}."
            )
        if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= n_images):
            raise ValueError(f"image_index values must be in [0, {n_images}), got {image_index.tolist()}.")
        empty = (region_masks[:, 1:] == 0).all(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"region_masks rows {empty.nonzero().flatten().tolist()} select no patch: every region needs at "
                "least one patch inside its box."
            )

    def _project(self, projection: nn.Linear, sequence: torch.Tensor) -> torch.Tensor:
        return F.normalize(projection(sequence[:, 0]), dim=-1)

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Image sequence `(batch, 1 + P, vision_width)` and its L2-normalised ITC feature `(batch, projection_dim)`."""
        self._require_projections()
        output = self.encode_image(pixel_values, output_attentions, output_hidden_states)
        output.pooler_output = self._project(self.vision_proj, output.last_hidden_state)
        return output

    def get_region_features(
        self,
        pixel_values: torch.FloatTensor,
        region_masks: torch.Tensor,
        image_index: torch.LongTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Region sequences `(R, 1 + P, vision_width)` and ITC features `(R, projection_dim)`.

        Each image of `pixel_values` `(n_images, 3, H, W)` is encoded once and serves all its regions.
        """
        self._require_projections()
        self._check_regions(pixel_values.shape[0], region_masks, image_index)
        output = self.encode_image(pixel_values, output_attentions, output_hidden_states)
        sequence = self.region_sequence(output.last_hidden_state, region_masks, image_index)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence,
            pooler_output=self._project(self.vision_proj, sequence),
            hidden_states=output.hidden_states,
            attentions=output.attentions,
        )

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Text-encoder states `(batch, L, hidden)` and the L2-normalised ITC feature `(batch, projection_dim)`."""
        self._require_projections()
        text = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=text.last_hidden_state,
            pooler_output=self._project(self.text_proj, text.last_hidden_state),
            hidden_states=text.hidden_states,
            attentions=text.attentions,
        )

    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor | BaseModelOutputWithCrossAttentions:
        """Fusion encoder: text states `(B, L, hidden)` cross-attend to image/region sequences `(B, 1 + P, width)`.

        `image_attention_mask` `(B, 1 + P)` is the key mask (a region's box mask; default all ones). With
        `image_index` `(B,)`, `image_embeds` are `n` distinct images and text b uses `image_embeds[image_index[b]]`
        (image keys/values computed once per image). Returns the fused states `(B, L, hidden)`; with
        `return_dict=True` the full `BaseModelOutputWithCrossAttentions` (hidden states, attentions on request).
        """
        output = self.text_model.fuse(
            text_embeds,
            attention_mask,
            image_embeds,
            image_attention_mask,
            output_attentions,
            output_hidden_states,
            image_index=image_index,
        )
        return output if return_dict else output.last_hidden_state

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> XVLMOutput | tuple:
        """Encode `n_images` images and `n_texts` texts and score every pair with the ITC similarity.

        With `return_loss=True` the images and texts must be aligned pairs (`n_images == n_texts`) and the
        symmetric ITC loss is returned.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None or input_ids is None:
            raise ValueError("XVLMModel.forward needs both pixel_values and input_ids.")
        image = self.get_image_features(pixel_values, output_attentions, output_hidden_states)
        text = self.get_text_features(input_ids, attention_mask, output_attentions, output_hidden_states)
        image_embeds, text_embeds = image.pooler_output, text.pooler_output
        logits_per_image = image_embeds @ text_embeds.t() / self.temp
        loss = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    f"return_loss needs aligned image-text pairs, got {image_embeds.shape[0]} images and "
                    f"{text_embeds.shape[0]} texts."
                )
            loss = image_text_contrastive_loss(image_embeds, text_embeds, self.temp)
        output = XVLMOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=image,
        )
        return output if return_dict else output.to_tuple()

    # -- construction from Swin + BERT ---------------------------------------------------------------------------
    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_name_or_path: str,
        text_name_or_path: str,
        config: XVLMConfig | None = None,
        **config_kwargs: Any,
    ) -> XVLMModel:
        """Build X-VLM from a Swin checkpoint and a BERT checkpoint (the official pre-training initialisation).

        The Swin weights fill `vision_model`; BERT's embeddings and layers `0..num_hidden_layers-1` fill the text
        and fusion self-attention/feed-forward weights. Cross-attention blocks, projections and the temperature are
        newly initialised; their names are stored in `model.newly_initialized_keys` (and logged).

        Args:
            vision_name_or_path: a `SwinModel`-compatible checkpoint (folder or Hub id).
            text_name_or_path: a BERT checkpoint (folder or Hub id), e.g. `bert-base-uncased`.
            config: the X-VLM config; by default built from the two checkpoints' configs (fusion at half depth).
            config_kwargs: extra `XVLMConfig` fields when `config` is not given.
        """
        return build_from_vision_text_pretrained(cls, vision_name_or_path, text_name_or_path, config, **config_kwargs)


__all__ = [
    "XVLMModel",
    "XVLMOutput",
    "XVLMPreTrainedModel",
    "XVLMTextModel",
]
