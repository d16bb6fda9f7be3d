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
from transformers import AttentionInterface, PreTrainedModel, SwinModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions, BaseModelOutputWithPooling
from transformers.models.swin.modeling_swin import SwinAttention
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


def sdpa_where_it_pays_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attn_implementation="sdpa"` of X-VLM's attention layers: torch's `scaled_dot_product_attention`, except for
    the backward-carrying calls on the CPU where it does not pay, which run the same math in `eager_attention_forward`.

    With autograd on the CPU, SDPA has a fused kernel only for calls without dropout and without a mask that
    needs a gradient; otherwise it falls back to its math kernel (the eager matmuls, plus an fp32 upcast of bf16
    inputs and a masked-row pass), and its fused backward is slow in bf16. Measured on X-VLM-base shapes
    (`python -m benchmarks.run --only attention_kernels`, docs/benchmarks.md "Attention kernels"), such calls
    are mostly 1.02-1.13x (fp32) and 1.2-2.3x (bf16) slower with SDPA, and with them the bf16 training step was
    8% slower than eager; fp32 calls without dropout or mask gradient are faster with SDPA. So on the CPU a call
    that needs gradients takes the eager kernel when it has dropout, a mask that needs a gradient (Swin's
    relative-position bias) or non-fp32 inputs. Inference and other devices always take SDPA.
    """
    if (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
        and (
            dropout > 0
            or query.dtype != torch.float32
            or (attention_mask is not None and attention_mask.requires_grad)
        )
    ):
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


#: The attention functions of all X-VLM attention layers (text, fusion and Swin through `XVLMSwinAttention`):
#: transformers' registry with "sdpa" overridden locally by
#: `sdpa_where_it_pays_forward` (AttentionInterface's documented way for a model to override one function).
XVLM_ATTENTION_FUNCTIONS = AttentionInterface()
XVLM_ATTENTION_FUNCTIONS["sdpa"] = sdpa_where_it_pays_forward


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
        query_length: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # query_length: only the first `query_length` positions are queried (keys/values still span every position)
        query_states = hidden_states if query_length is None else hidden_states[:, :query_length]
        batch, length = query_states.shape[:2]
        kv_states = encoder_hidden_states if self.is_cross_attention else hidden_states
        head_shape = (self.num_attention_heads, self.attention_head_size)
        query = self.query(query_states).view(batch, length, *head_shape).transpose(1, 2)
        kv_shape = (kv_states.shape[0], kv_states.shape[1], *head_shape)
        key = self.key(kv_states).view(kv_shape).transpose(1, 2)
        value = self.value(kv_states).view(kv_shape).transpose(1, 2)
        if encoder_index is not None:
            # Keys/values of each distinct image are computed once and shared by all texts paired with it.
            key, value = key[encoder_index], value[encoder_index]

        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = XVLM_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
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
        query_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, weights = self.self(
            hidden_states, attention_mask, encoder_hidden_states, output_attentions, encoder_index, query_length
        )
        residual = hidden_states if query_length is None else hidden_states[:, :query_length]
        return self.output(context, residual), weights


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
        query_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # query_length: compute only the first `query_length` output positions (the [CLS] row for ITM / boxes)
        hidden_states, self_weights = self.attention(
            hidden_states, attention_mask, None, output_attentions, query_length=query_length
        )
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
        cls_only: bool = False,
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
                query_length=1 if cls_only and index == layers[-1] else None,
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

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this by searching the module source for `ALL_ATTENTION_FUNCTIONS.get_interface(`; the
        # text/fusion layers dispatch through `XVLM_ATTENTION_FUNCTIONS` (an `AttentionInterface` with a local "sdpa")
        # and Swin through transformers' registry, so switching at run time is supported.
        return True

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
        cls_only: bool = False,
    ) -> BaseModelOutputWithCrossAttentions:
        """Run the fusion layers on text states `(batch, L, hidden)` cross-attending to image tokens
        `(batch, 1 + P, encoder_width)` (key mask `image_attention_mask` `(batch, 1 + P)`, default all ones).

        With `image_index` `(batch,)`, `image_embeds` holds `n` distinct image sequences `(n, 1 + P, width)` and
        text row b attends to `image_embeds[image_index[b]]`; each image's keys/values are computed once per layer.
        With `cls_only`, the last layer computes the [CLS] row only: `last_hidden_state` is `(batch, 1, hidden)`.
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
            cls_only,
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


class XVLMSwinAttention(SwinAttention):
    """transformers' `SwinAttention` (same parameters, inputs and outputs) whose attention call goes through
    `XVLM_ATTENTION_FUNCTIONS`, so that the vision tower's "sdpa" also uses the kernel that pays on the CPU
    (`sdpa_where_it_pays_forward`: in CPU training the relative-position bias needs a gradient, and SDPA's math
    fallback made a bf16 training step 8% slower than eager). Installed by `use_xvlm_swin_attention`."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # hidden_states: (batch * windows, tokens, channels); attention_mask: shift mask (windows, tokens, tokens)
        rows, tokens = hidden_states.shape[:2]
        shape = (rows, tokens, self.num_attention_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        mask = self.relative_position_bias()  # (1, heads, tokens, tokens)
        if attention_mask is not None:
            windows = attention_mask.shape[0]  # window w of image b is row b * windows + w
            mask = mask + attention_mask.unsqueeze(1).repeat(rows // windows, 1, 1, 1)
        interface = XVLM_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = interface(
            self,
            query,
            key,
            value,
            mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        return self.o_proj(output.reshape(rows, tokens, -1).contiguous()), weights


def use_xvlm_swin_attention(swin: SwinModel) -> None:
    """Make every `SwinAttention` of `swin` an `XVLMSwinAttention` in place (a subclass with the same state: no
    parameter, buffer or checkpoint key changes)."""
    for module in swin.modules():
        if type(module) is SwinAttention:
            module.__class__ = XVLMSwinAttention


def shrink_swin_windows(swin: SwinModel, vision_config: Any) -> None:
    """Give every Swin stage whose feature map is smaller than the window a window of the feature-map size.

    The official Swin (and Microsoft's) builds such a stage with `window = resolution`, no shift and a relative
    position table of `(2 * resolution - 1) ** 2` rows. transformers' `SwinModel` shrinks the window only at run
    time and keeps a table of the configured window, which then cannot be indexed. X-VLM-base never has such a
    stage (its last stage equals the window), but small configurations do.
    """
    window = int(vision_config.window_size)
    for stage in swin.encoder.layers:
        for block in stage.blocks:
            resolution = min(block.input_resolution)
            if resolution >= window:
                continue
            attention = block.attention
            bias_class = type(attention.relative_position_bias)
            attention.relative_position_bias = bias_class(attention.num_attention_heads, (resolution, resolution))
            block.window_size = resolution
            block.shift_size = 0


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
        shrink_swin_windows(self.vision_model, config.vision_config)
        use_xvlm_swin_attention(self.vision_model)
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
        cls_only: bool = False,
    ) -> torch.Tensor | BaseModelOutputWithCrossAttentions:
        """Fusion encoder: text states `(B, L, hidden)` cross-attend to image/region sequences `(B, 1 + P, width)`.

        `image_attention_mask` `(B, 1 + P)` is the key mask (a region's box mask; default all ones). With
        `image_index` `(B,)`, `image_embeds` are `n` distinct images and text b uses `image_embeds[image_index[b]]`
        (image keys/values computed once per image). Returns the fused states `(B, L, hidden)`; with
        `return_dict=True` the full `BaseModelOutputWithCrossAttentions` (hidden states, attentions on request).
        With `cls_only=True` the last fusion layer computes only the [CLS] row, all an ITM or box head reads (its
        keys/values still span every token), and the states are `(B, 1, hidden)`: the same [CLS] with less work.
        """
        output = self.text_model.fuse(
            text_embeds,
            attention_mask,
            image_embeds,
            image_attention_mask,
            output_attentions,
            output_hidden_states,
            image_index=image_index,
            cls_only=cls_only,
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
    "shrink_swin_windows",
    "XVLMModel",
    "XVLMOutput",
    "XVLMPreTrainedModel",
    "XVLMTextModel",
]


# ================================================================================================================
# Task heads
# ================================================================================================================
#
# Each head holds the base model as `self.xvlm` (`base_model_prefix = "xvlm"`), so an `XVLMModel` checkpoint loads
# into it. Official key correspondence (converted by the conversion scripts): `itm_head.{0,1,3}`,
# `bbox_head.{0,1,3}` (`build_mlp`), `mlm_head.transform.*` / `mlm_head.decoder.bias` (BERT `cls.predictions`).


from .losses import (  # noqa: E402  (heads section imports)
    IGNORE_INDEX,
    bbox_losses,
    distributed_world,
    image_text_matching_loss,
    masked_lm_loss,
    sample_hard_negatives,
)


def _build_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Official `build_mlp`: Linear(D, 2D) -> LayerNorm(2D, eps 1e-5) -> GELU (erf) -> Linear(2D, out)."""
    return nn.Sequential(
        nn.Linear(in_dim, 2 * in_dim), nn.LayerNorm(2 * in_dim, eps=1e-5), nn.GELU(), nn.Linear(2 * in_dim, out_dim)
    )


def _nested_to_tuple(output: ModelOutput, nested: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(
        output[k].to_tuple() if k in nested and isinstance(output[k], ModelOutput) else output[k]
        for k in output.keys()
    )


def _slice_output(output: BaseModelOutputWithCrossAttentions, rows: int) -> BaseModelOutputWithCrossAttentions:
    """Keep the first `rows` rows of every tensor of a fusion output (the positive pairs of an ITM pass)."""

    def cut(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value[:rows]

    return BaseModelOutputWithCrossAttentions(
        last_hidden_state=output.last_hidden_state[:rows],
        hidden_states=cut(output.hidden_states),
        attentions=cut(output.attentions),
        cross_attentions=cut(output.cross_attentions),
    )


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
        return _nested_to_tuple(self, ("text_model_output", "vision_model_output", "fusion_model_output"))


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
        return _nested_to_tuple(self, ("text_model_output", "vision_model_output", "fusion_model_output"))


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
        pred_boxes: `(N, 4)` predicted `(cx, cy, w, h)` of every entry (when `target_boxes` or `region_masks` are
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
        return _nested_to_tuple(self, ("text_model_output", "vision_model_output"))


class _XVLMHeadMixin:
    """Shared by the heads: embedding accessors delegating to `self.xvlm` and `from_vision_text_pretrained`."""

    xvlm: XVLMModel

    def get_input_embeddings(self) -> nn.Embedding:
        return self.xvlm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.xvlm.set_input_embeddings(value)

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_name_or_path: str,
        text_name_or_path: str,
        config: XVLMConfig | None = None,
        **config_kwargs: Any,
    ):
        """Build the head from a Swin and a BERT checkpoint (see `XVLMModel.from_vision_text_pretrained`); the
        pre-training head also takes BERT's MLM head (`cls.predictions`)."""
        return build_from_vision_text_pretrained(cls, vision_name_or_path, text_name_or_path, config, **config_kwargs)

    def _check_text(self, input_ids: torch.Tensor | None, name: str = "input_ids") -> None:
        if input_ids is None:
            raise ValueError(f"{type(self).__name__}.forward needs {name}.")


def _image_text_matching(
    xvlm: XVLMModel,
    itm_head: nn.Module,
    image_seqs: torch.Tensor,
    image_index: torch.Tensor,
    image_masks: torch.Tensor | None,
    text_states: torch.Tensor,
    text_mask: torch.Tensor | None,
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    positive_mask: torch.Tensor | None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BaseModelOutputWithCrossAttentions]:
    """ITM with hard negatives (official `get_matching_loss`) in ONE fusion pass over `3B` texts.

    Entry b pairs text b with visual sequence `image_seqs[image_index[b]]` and key mask `image_masks[b]`. Negatives
    are drawn from the local ITC similarities; a negative visual input brings its own mask. Distinct visual
    sequences are fused from `image_seqs` through `image_index` (keys/values computed once per sequence).

    Returns `(loss, logits (3B, 2), labels (3B,), fusion output of all 3B rows)`.
    """
    batch = text_states.shape[0]
    with torch.no_grad():
        sim_i2t = image_feat @ text_feat.t() / temp
    neg_image, neg_text, text_valid, image_valid = sample_hard_negatives(sim_i2t, positive_mask)
    rows = torch.arange(batch, device=text_states.device)
    entry_for_image = torch.cat([rows, neg_image, rows])
    entry_for_text = torch.cat([rows, rows, neg_text])
    if text_mask is None:
        text_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
    fused = xvlm.fuse(
        text_states[entry_for_text],
        text_mask[entry_for_text],
        image_seqs,
        None if image_masks is None else image_masks[entry_for_image],
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=True,
        image_index=image_index[entry_for_image],
    )
    logits = itm_head(fused.last_hidden_state[:, 0])
    loss, labels = image_text_matching_loss(logits, text_valid, image_valid)
    return loss, logits, labels, fused


class XVLMForRetrieval(_XVLMHeadMixin, XVLMPreTrainedModel):
    """X-VLM for image-text retrieval (official `XVLMForRetrieval`, `Retrieval.py`): ITC through the base model's
    projections and temperature, and an ITM head on the fused [CLS] (class 1 = match).

    Training: `forward(..., return_loss=True)` returns ITC (soft targets over pairs sharing an `image_id`) + ITM
    (hard negatives). Inference: `rank` (ITC top-k re-ranked with ITM), `itm_scores`, `retrieval_score_matrices`
    and `modeling_xvlm.retrieval.retrieval_metrics`.
    """

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.xvlm = XVLMModel(config)
        self.itm_head = _build_mlp(config.text_config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForRetrievalOutput | tuple:
        """Score images against texts; with `return_loss` compute the ITC + ITM training loss.

        Args:
            pixel_values: `(n_images, 3, H, W)`.
            input_ids: `(n_texts, L)`; attention_mask: `(n_texts, L)`.
            image_ids: `(B,)` image ids of aligned training pairs; texts of the same image are ITC positives (soft
                targets) and never ITM negatives. Default: every pair is its own image.
            return_loss: compute the loss (needs aligned pairs, `n_images == n_texts`). `None` (default) means
                `self.training`, so `Trainer` gets a loss in training while eval-mode inference stays
                deterministic (hard negatives are sampled); pass `return_loss=True` in the batch (the collator does)
                for an evaluation loss.

        Returns:
            `XVLMForRetrievalOutput`; `itm_logits` are those of the aligned pairs (when `n_images == n_texts`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None or input_ids is None:
            raise ValueError("XVLMForRetrieval.forward needs pixel_values and input_ids.")
        if return_loss is None:
            return_loss = self.training
        xvlm = self.xvlm
        image = xvlm.get_image_features(pixel_values, output_attentions, output_hidden_states)
        text = xvlm.get_text_features(input_ids, attention_mask, output_attentions, output_hidden_states)
        image_feat, text_feat = image.pooler_output, text.pooler_output
        logits_per_image = image_feat @ text_feat.t() / xvlm.temp
        n_images, n_texts = image_feat.shape[0], text_feat.shape[0]
        aligned = n_images == n_texts
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        loss = loss_itc = loss_itm = itm_labels = itm_logits = fusion = None
        if return_loss:
            if not aligned:
                raise ValueError(
                    f"The retrieval loss needs aligned image-text pairs, got {n_images} images and {n_texts} texts."
                )
            positive_mask = None
            if image_ids is not None:
                image_ids = torch.as_tensor(image_ids, device=image_feat.device).view(-1)
                if image_ids.shape[0] != n_images:
                    raise ValueError(f"image_ids must have shape ({n_images},), got {tuple(image_ids.shape)}.")
                positive_mask = image_ids[:, None] == image_ids[None, :]
            loss_itc = image_text_contrastive_loss(
                image_feat,
                text_feat,
                xvlm.temp,
                image_ids,
                official_gradient_scaling=self.config.official_itc_gradient_scaling,
            )
            rows = torch.arange(n_images, device=image_feat.device)
            loss_itm, all_logits, itm_labels, fused = _image_text_matching(
                xvlm,
                self.itm_head,
                image.last_hidden_state,
                rows,
                None,
                text.last_hidden_state,
                attention_mask,
                image_feat,
                text_feat,
                xvlm.temp,
                positive_mask,
                output_attentions,
                output_hidden_states,
            )
            itm_logits = all_logits[:n_images]
            fusion = _slice_output(fused, n_images)
            loss = self.config.itc_loss_weight * loss_itc + self.config.itm_loss_weight * loss_itm
        elif aligned:
            fusion = xvlm.fuse(
                text.last_hidden_state,
                attention_mask,
                image.last_hidden_state,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            itm_logits = self.itm_head(fusion.last_hidden_state[:, 0])

        output = XVLMForRetrievalOutput(
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
        return output if return_dict else output.to_tuple()

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
            `(B,)` logits (no softmax; official `itm_head(cls)[:, 1]`).
        """
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("Pass exactly one of pixel_values or image_embeds.")
        if (input_ids is None) == (text_embeds is None):
            raise ValueError("Pass exactly one of input_ids or text_embeds.")
        if image_embeds is None:
            image_embeds = self.xvlm.encode_image(pixel_values).last_hidden_state
        if text_embeds is None:
            text_embeds = self.xvlm.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        fused = self.xvlm.fuse(
            text_embeds, attention_mask, image_embeds, image_attention_mask, image_index=image_index, cls_only=True
        )
        return self.itm_head(fused[:, 0])[:, 1]

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
    ):
        """Rank a gallery of images for every text and texts for every image (official `Retrieval.py` protocol).

        Every image and text is encoded once (in batches of `batch_size`); the ITC cosine similarity (no
        temperature) of all pairs picks the top `k` candidates in each direction; the union of those pairs is scored
        once each with the ITM head, in fusion batches of `batch_size` pairs. Candidates are returned sorted by
        their ITM logit.

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
        from .retrieval import encode_images, encode_texts, rank_gallery, refine_top1

        encode_precision = precision if encode_precision is None else encode_precision
        for name, value in (("precision", precision), ("encode_precision", encode_precision)):
            if value not in ("fp32", "bf16"):
                raise ValueError(f"{name} must be 'fp32' or 'bf16', got {value!r}.")
        if top1_margin is not None and precision == "fp32":
            raise ValueError("top1_margin only applies to precision='bf16' (fp32 rankings need no refinement).")
        device_type = self.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=encode_precision == "bf16"):
            images = encode_images(self, pixel_values, batch_size)
            texts = encode_texts(self, input_ids, attention_mask, batch_size)
        if precision == "fp32" and encode_precision == "bf16":
            images, texts = images.float(), texts.float()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = rank_gallery(self, images, texts, k=k, batch_size=batch_size)
        margin = 0.1 if top1_margin is None else top1_margin
        if precision == "bf16" and margin > 0:
            if encode_precision == "fp32":  # the fp32 encodings are at hand: no re-encoding
                output = refine_top1(self, output, images, texts, margin=margin, batch_size=batch_size)
            else:
                output = refine_top1(self, output, pixel_values, input_ids, attention_mask, margin, batch_size)
        return output

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
        from .retrieval import score_matrices

        return score_matrices(
            self.rank(pixel_values, input_ids, attention_mask, k=k, batch_size=batch_size, precision=precision,
                      encode_precision=encode_precision, top1_margin=top1_margin)
        )


def _check_grounding_boxes(labels: torch.Tensor, batch: int, name: str = "labels") -> torch.Tensor:
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


class XVLMForGrounding(_XVLMHeadMixin, XVLMPreTrainedModel):
    """X-VLM for referring-expression grounding with boxes (official `XVLMForGrounding`, `Grounding_bbox.py`).

    `bbox_head` on the fused [CLS] (full image, all-ones image mask) + sigmoid gives `(cx, cy, w, h)` in [0, 1]
    relative to the square model input. The base model has no ITC projections or temperature (official box
    checkpoints have none), so every parameter is trained by the box loss.
    """

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.xvlm = XVLMModel(config, add_projections=False)
        self.bbox_head = _build_mlp(config.text_config.hidden_size, 4)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.FloatTensor | None = None,
        image_index: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForGroundingOutput | tuple:
        """Predict one box per text.

        Args:
            pixel_values: `(n_images, 3, H, W)`.
            input_ids, attention_mask: `(B, L)`.
            labels: optional `(B, 4)` target boxes, normalised `(cx, cy, w, h)` in [0, 1].
            image_index: optional `(B,)`, the image of each text (several expressions of one image share its
                encoding); default: text b uses image b.

        Returns:
            `XVLMForGroundingOutput` with `pred_boxes` `(B, 4)` and, with `labels`, `loss = l1 + giou` (weights
            `config.bbox_l1_loss_weight`, `config.bbox_giou_loss_weight`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None or input_ids is None:
            raise ValueError("XVLMForGrounding.forward needs pixel_values and input_ids.")
        xvlm = self.xvlm
        image = xvlm.encode_image(pixel_values, output_attentions, output_hidden_states)
        text = xvlm.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        batch = input_ids.shape[0]
        if image_index is None and image.last_hidden_state.shape[0] != batch:
            raise ValueError(
                f"Got {image.last_hidden_state.shape[0]} images for {batch} texts: pass image_index to pair texts "
                "with images."
            )
        if labels is not None:
            labels = _check_grounding_boxes(labels, batch).to(image.last_hidden_state.device)
        fusion = xvlm.fuse(
            text.last_hidden_state,
            attention_mask,
            image.last_hidden_state,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            image_index=image_index,
        )
        pred_boxes = self.bbox_head(fusion.last_hidden_state[:, 0]).sigmoid()
        loss = loss_l1 = loss_giou = None
        if labels is not None:
            loss_l1, loss_giou = bbox_losses(
                pred_boxes, labels, official_batch_zeroing=self.config.official_giou_batch_zeroing
            )
            loss = self.config.bbox_l1_loss_weight * loss_l1 + self.config.bbox_giou_loss_weight * loss_giou
        output = XVLMForGroundingOutput(
            loss=loss,
            loss_bbox_l1=loss_l1,
            loss_bbox_giou=loss_giou,
            pred_boxes=pred_boxes,
            text_model_output=text,
            vision_model_output=image,
            fusion_model_output=fusion,
        )
        return output if return_dict else output.to_tuple()


class XVLMMLMHeadTransform(nn.Module):
    """BERT `cls.predictions.transform`: dense -> activation -> LayerNorm."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class XVLMMLMHead(nn.Module):
    """BERT MLM head: transform + `decoder` (weight tied to the word embeddings, own bias)."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.transform = XVLMMLMHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


def _visual_groups(image_index: torch.Tensor, region_masks: torch.Tensor | None) -> torch.Tensor:
    """Id per entry such that two entries share an id iff they have the same visual input (same image and same
    region mask): those pairs are positives for ITC and never ITM negatives."""
    if region_masks is None:
        return image_index
    keys = torch.cat([image_index[:, None].long(), (region_masks != 0).long()], dim=1)
    return torch.unique(keys, dim=0, return_inverse=True)[1]


class XVLMForPretraining(_XVLMHeadMixin, XVLMPreTrainedModel):
    """X-VLM pre-training (official `models/model_pretrain.py`): ITC + ITM (hard negatives) + MLM, plus box L1 and
    GIoU for region ("visual concept") entries.

    One forward takes a batch of image-text and region-text entries: unique images `pixel_values`, `image_index`
    per text, `region_masks` per text (all-ones rows for whole-image captions), the texts, the masked texts
    `mlm_input_ids` with `mlm_labels` (-100 where unmasked), `target_boxes` and `is_image`.
    """

    _tied_weights_keys = {"mlm_head.decoder.weight": "xvlm.text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.xvlm = XVLMModel(config)
        hidden = config.text_config.hidden_size
        self.itm_head = _build_mlp(hidden, 2)
        self.bbox_head = _build_mlp(hidden, 4)
        self.mlm_head = XVLMMLMHead(config.text_config)
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

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        region_masks: torch.Tensor | None = None,
        mlm_input_ids: torch.LongTensor | None = None,
        mlm_labels: torch.LongTensor | None = None,
        target_boxes: torch.FloatTensor | None = None,
        is_image: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForPretrainingOutput | tuple:
        """One pre-training step on N entries (texts).

        Args:
            pixel_values: `(n_images, 3, H, W)` unique images.
            input_ids, attention_mask: `(N, L)` unmasked texts (ITC, ITM, boxes).
            image_index: `(N,)` image of each entry; default `arange(N)` (needs `n_images == N`).
            region_masks: `(N, 1 + P)` region masks (1 for [CLS] and in-box patches; all ones for whole-image
                captions). `None`: a plain image-text batch.
            mlm_input_ids: `(N, L)` masked texts (same attention mask); mlm_labels: `(N, L)`, original ids at
                masked positions and -100 elsewhere.
            target_boxes: `(N, 4)` normalised `(cx, cy, w, h)`; whole-image entries use (0.5, 0.5, 1, 1).
            is_image: `(N,)` 1 for whole-image captions (excluded from the box losses), 0 for regions.
            return_loss: compute ITC + ITM (and MLM / box losses when their labels are given). `None` (default):
                when training or when `mlm_labels` / `target_boxes` are given.

        The ITC/ITM/MLM visual input of an entry is its region sequence (`XVLMModel.region_sequence`, key mask
        `region_masks`), or its image; the box head reads the FULL image with an all-ones mask (official). In
        training the temperature is clamped in place to `config.temperature_clamp` (official [0.001, 0.5]).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None or input_ids is None:
            raise ValueError("XVLMForPretraining.forward needs pixel_values and input_ids.")
        if return_loss is None:
            return_loss = self.training or mlm_labels is not None or target_boxes is not None
        xvlm, config = self.xvlm, self.config
        if self.training:
            with torch.no_grad():
                xvlm.temp.clamp_(*config.temperature_clamp)

        n_texts = input_ids.shape[0]
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_index is None:
            if pixel_values.shape[0] != n_texts:
                raise ValueError(
                    f"Got {pixel_values.shape[0]} images for {n_texts} texts: pass image_index (the image of each "
                    "text)."
                )
            image_index = torch.arange(n_texts, device=device)
        image_index = torch.as_tensor(image_index, device=device).long()

        image = xvlm.encode_image(pixel_values, output_attentions, output_hidden_states)
        full_images = image.last_hidden_state
        if region_masks is not None:
            xvlm._check_regions(full_images.shape[0], region_masks, image_index)
            visual_seqs = xvlm.region_sequence(full_images, region_masks, image_index)  # (N, 1 + P, W)
            visual_index = torch.arange(n_texts, device=device)
        else:
            if image_index.dim() != 1 or image_index.shape[0] != n_texts:
                raise ValueError(f"image_index must have shape ({n_texts},), got {tuple(image_index.shape)}.")
            if int(image_index.min()) < 0 or int(image_index.max()) >= full_images.shape[0]:
                raise ValueError(f"image_index values must be in [0, {full_images.shape[0]}).")
            visual_seqs, visual_index = full_images, image_index
        text = xvlm.get_text_features(input_ids, attention_mask, output_attentions, output_hidden_states)
        text_feat = text.pooler_output
        image_feat = xvlm._project(xvlm.vision_proj, visual_seqs)[visual_index]
        logits_per_image = image_feat @ text_feat.t() / xvlm.temp

        loss_itc = loss_itm = loss_mlm = loss_l1 = loss_giou = itm_labels = None
        if return_loss:
            if config.official_duplicate_negatives:
                groups = torch.arange(n_texts, device=device)  # official: every entry is its own positive only
            else:
                groups = _visual_groups(image_index, region_masks)
            rank, _ = distributed_world()
            # Ids unique across processes (images of different processes are different inputs).
            loss_itc = image_text_contrastive_loss(
                image_feat,
                text_feat,
                xvlm.temp,
                groups + (rank << 32),
                official_gradient_scaling=config.official_itc_gradient_scaling,
            )
            loss_itm, itm_logits, itm_labels, _ = _image_text_matching(
                xvlm,
                self.itm_head,
                visual_seqs,
                visual_index,
                region_masks,
                text.last_hidden_state,
                attention_mask,
                image_feat,
                text_feat,
                xvlm.temp,
                groups[:, None] == groups[None, :],
            )
        else:
            fused = xvlm.fuse(
                text.last_hidden_state, attention_mask, visual_seqs, region_masks, image_index=visual_index
            )
            itm_logits = self.itm_head(fused[:, 0])

        mlm_logits = None
        if mlm_labels is not None and mlm_input_ids is None:
            raise ValueError("mlm_labels need mlm_input_ids (the masked texts).")
        if mlm_input_ids is not None:
            if tuple(mlm_input_ids.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"mlm_input_ids {tuple(mlm_input_ids.shape)} must have the shape of input_ids "
                    f"{tuple(input_ids.shape)} (they share attention_mask)."
                )
            mlm_states = xvlm.text_model(
                input_ids=mlm_input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=visual_seqs[visual_index],
                encoder_attention_mask=region_masks,
                return_dict=True,
            ).last_hidden_state
            if mlm_labels is not None:
                if tuple(mlm_labels.shape) != tuple(mlm_input_ids.shape):
                    raise ValueError(
                        f"mlm_labels {tuple(mlm_labels.shape)} must have the shape of mlm_input_ids "
                        f"{tuple(mlm_input_ids.shape)} (-100 at unmasked positions)."
                    )
                masked = mlm_labels != IGNORE_INDEX
                mlm_logits = self.mlm_head(mlm_states[masked])
                loss_mlm = masked_lm_loss(mlm_logits, mlm_labels[masked])
            else:
                mlm_logits = self.mlm_head(mlm_states)

        pred_boxes = None
        if target_boxes is not None or region_masks is not None:
            fused_full = xvlm.fuse(text.last_hidden_state, attention_mask, full_images, image_index=image_index)
            pred_boxes = self.bbox_head(fused_full[:, 0]).sigmoid()
            if target_boxes is not None:
                target_boxes = torch.as_tensor(target_boxes, device=device)
                if tuple(target_boxes.shape) != (n_texts, 4):
                    raise ValueError(f"target_boxes must have shape ({n_texts}, 4), got {tuple(target_boxes.shape)}.")
                if is_image is not None:
                    is_image = torch.as_tensor(is_image, device=device).view(-1)
                    if is_image.shape[0] != n_texts:
                        raise ValueError(f"is_image must have shape ({n_texts},), got {tuple(is_image.shape)}.")
                loss_l1, loss_giou = bbox_losses(
                    pred_boxes, target_boxes, is_image, official_batch_zeroing=config.official_giou_batch_zeroing
                )

        loss = None
        if return_loss:
            parts = [
                (config.itc_loss_weight, loss_itc),
                (config.itm_loss_weight, loss_itm),
                (config.mlm_loss_weight, loss_mlm),
                (config.bbox_l1_loss_weight, loss_l1),
                (config.bbox_giou_loss_weight, loss_giou),
            ]
            loss = sum(weight * value for weight, value in parts if value is not None)

        output = XVLMForPretrainingOutput(
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
            text_embeds=text_feat,
            text_model_output=text,
            vision_model_output=image,
        )
        return output if return_dict else output.to_tuple()


__all__ += [
    "XVLMForGrounding",
    "XVLMForGroundingOutput",
    "XVLMForPretraining",
    "XVLMForPretrainingOutput",
    "XVLMForRetrieval",
    "XVLMForRetrievalOutput",
]
