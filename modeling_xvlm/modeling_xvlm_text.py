"""The BERT-style text stack of X-VLM: text encoder, fusion encoder and text decoders, one layer class for all.

Numerically the official `models/xbert.py` (a fork of transformers-4.x BERT). One `XVLMLayer` covers every mode by
configuration (`XVLMTextConfig`):

- self-attention bidirectional (text and fusion encoders) or causal (`is_decoder=True`: captioning, VQA answers);
- cross-attention in layers `[fusion_layer, num_hidden_layers)` with key/value width `encoder_width`: the vision
  width for fusion, the text width for a decoder that reads question states (official VQA decoder);
- a KV cache through transformers' `Cache` classes (`DynamicCache` / `EncoderDecoderCache`) for generation;
- a different encoder sequence per cross-attention layer (`encoder_hidden_states` given as a sequence, read
  cyclically; NLVR2 alternates two images) and key/value parameters tied across consecutive pairs of cross-attention layers
  (`tie_cross_attention_pairs`; declared ties, saved once and re-tied on load).

`XVLMTextModel` runs the stack (official modes `'text'`, `'fusion'`, `'multi_modal'`); `XVLMTextLMHeadModel` adds
an LM head tied to the stack's own word embeddings and `generate()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithCrossAttentions,
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
)
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import XVLM_ATTENTION_FUNCTIONS, eager_attention_forward, expand_key_mask
from .configuration_xvlm import XVLMTextConfig
from .losses import IGNORE_INDEX
from .token_packing import PackedLayout

EncoderStates = torch.Tensor | Sequence[torch.Tensor]


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise a `TypeError` / `ValueError` unless `input_ids` are integer token ids in `[0, vocab_size)` (what the
    word embedding can look up; instead of the embedding's bare `IndexError`)."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be integer token ids, got dtype {input_ids.dtype}.")
    if input_ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{name} must be token ids in [0, {vocab_size}) (the text vocabulary), got values in [{low}, {high}]: "
            "tokenize with the model's tokenizer (XVLMProcessor), or resize the embeddings after adding tokens."
        )


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
        past_length: int = 0,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, past_length : past_length + seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class XVLMSelfAttention(nn.Module):
    """Multi-head attention with BERT parameter names (`query`, `key`, `value`).

    Self-attention is causal when `config.is_decoder`. Cross-attention computes keys and values from the encoder
    sequence, whose width is `config.encoder_width` (1024 for Swin-B; the text width for the VQA answer decoder),
    which is why transformers' `BertCrossAttention` cannot be used.
    """

    def __init__(self, config: XVLMTextConfig, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_cross_attention = is_cross_attention
        self.is_causal = bool(config.is_decoder) and not is_cross_attention
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def split_heads(
        self, states: torch.Tensor, projection: nn.Linear, layout: PackedLayout | None = None
    ) -> torch.Tensor:
        """`(batch, length, width)` (or packed `(tokens, width)` with its `layout`) -> projected
        `(batch, heads, length, head_dim)`."""
        projected = projection(states)
        if layout is not None:
            projected = layout.unpack(projected)
        batch, length = projected.shape[:2]
        return projected.view(batch, length, self.num_attention_heads, -1).transpose(1, 2)

    def keys_values(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        cache: Cache | None,
        layout: PackedLayout | None = None,
        encoder_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(batch, heads, kv_len, head_dim)`, read from / written to the cache when one is given.

        Cross-attention with `encoder_index` `(batch,)`: the keys/values of each distinct encoder sequence
        `(n, S, encoder_width)` are projected once, then row b gets those of sequence `encoder_index[b]`; the cache
        keeps them per row, so later steps read them without indexing again.
        """
        if not self.is_cross_attention:
            key = self.split_heads(hidden_states, self.key, layout)
            value = self.split_heads(hidden_states, self.value, layout)
            if cache is not None:
                self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
                key, value = self_cache.update(key, value, self.layer_idx)
            return key, value
        if isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        if encoder_hidden_states is None:
            raise ValueError(f"Cross-attention layer {self.layer_idx} needs encoder_hidden_states.")
        key = self.split_heads(encoder_hidden_states, self.key)
        value = self.split_heads(encoder_hidden_states, self.value)
        if encoder_index is not None:
            key, value = key[encoder_index], value[encoder_index]
        if isinstance(cache, EncoderDecoderCache):
            key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
            cache.is_updated[self.layer_idx] = True
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_index: torch.Tensor | None = None,
        cache: Cache | None = None,
        query_length: int | None = None,
        layout: PackedLayout | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # query_length: only the first `query_length` positions are queried (keys/values still span every position).
        # layout: hidden_states are the packed real tokens `(tokens, hidden)`; so is the output.
        query_states = hidden_states if query_length is None else hidden_states[:, :query_length]
        query = self.split_heads(query_states, self.query, layout)
        batch, length = query.shape[0], query.shape[2]
        key, value = self.keys_values(hidden_states, encoder_hidden_states, cache, layout, encoder_index)
        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation
        attention_interface: Callable = XVLM_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout.p if self.training else 0.0,
        )
        attn_output = attn_output.reshape(batch, length, -1)
        return (attn_output.contiguous() if layout is None else layout.pack(attn_output)), attn_weights


class XVLMResidualOutput(nn.Module):
    """Post-LN residual block: dense -> dropout -> LayerNorm(x + input) (BERT's `*.output` after attention, with
    `in_features = hidden_size`, and after the feed-forward, with `in_features = intermediate_size`)."""

    def __init__(self, config: XVLMTextConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class XVLMAttentionBlock(nn.Module):
    """`self` attention + `output` residual block (BERT's `attention.self.*` / `attention.output.*` names)."""

    def __init__(self, config: XVLMTextConfig, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.self = XVLMSelfAttention(config, layer_idx, is_cross_attention=is_cross_attention)
        self.output = XVLMResidualOutput(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_index: torch.Tensor | None = None,
        cache: Cache | None = None,
        query_length: int | None = None,
        layout: PackedLayout | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, weights = self.self(
            hidden_states, attention_mask, encoder_hidden_states, encoder_index, cache, query_length, layout=layout,
            **kwargs,
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


class XVLMLayer(GradientCheckpointingLayer):
    """One BERT layer; layers from `fusion_layer` on add cross-attention to an encoder sequence."""

    def __init__(self, config: XVLMTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.has_cross_attention = layer_idx >= config.fusion_layer
        self.attention = XVLMAttentionBlock(config, layer_idx)
        if self.has_cross_attention:
            self.crossattention = XVLMAttentionBlock(config, layer_idx, is_cross_attention=True)
        self.intermediate = XVLMIntermediate(config)
        self.output = XVLMResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_index: torch.Tensor | None = None,
        cache: Cache | None = None,
        query_length: int | None = None,
        layout: PackedLayout | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Tensors that need gradients come positionally (GradientCheckpointingLayer with use_reentrant=True).
        # query_length: compute only the first `query_length` output positions (the [CLS] row for ITM / boxes).
        # layout: hidden_states are the packed real tokens `(tokens, hidden)` (token_packing.py).
        hidden_states, _ = self.attention(
            hidden_states, attention_mask, None, None, cache, query_length, layout=layout, **kwargs
        )
        if self.has_cross_attention:
            if encoder_hidden_states is None and not _cross_cached(cache, self.layer_idx):
                raise ValueError(f"Layer {self.layer_idx} cross-attends: it needs encoder_hidden_states.")
            hidden_states, _ = self.crossattention(
                hidden_states, encoder_attention_mask, encoder_hidden_states, encoder_index, cache, layout=layout,
                **kwargs,
            )
        return self.output(self.intermediate(hidden_states), hidden_states)


def _cross_cached(cache: Cache | None, layer_idx: int) -> bool:
    return isinstance(cache, EncoderDecoderCache) and bool(cache.is_updated.get(layer_idx))


class XVLMEncoder(nn.Module):
    """The layer stack. With `tie_cross_attention_pairs`, cross-attention layers `fusion_layer + 2j` and
    `fusion_layer + 2j + 1` share one key and one value projection (official NLVR2)."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([XVLMLayer(config, i) for i in range(config.num_hidden_layers)])
        for source, target in cross_attention_pairs(config):
            source_attention = self.layer[source].crossattention.self
            target_attention = self.layer[target].crossattention.self
            target_attention.key, target_attention.value = source_attention.key, source_attention.value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: EncoderStates | None,
        encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None,
        layers: range,
        encoder_index: torch.Tensor | None = None,
        cache: Cache | None = None,
        cls_only: bool = False,
        layout: PackedLayout | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Run `layers` on `hidden_states` `(batch, L, hidden)`; returns the last layer's states `(batch, L, hidden)`.

        With a `layout`, the layers run on the packed real tokens and the padded positions of the result are 0.
        """
        if layout is not None:
            hidden_states = layout.pack(hidden_states)
        for index in layers:
            cls_query = cls_only and index == layers[-1]
            if cls_query and layout is not None:  # the [CLS]-only layer reads row starts from the padded layout
                hidden_states, layout = layout.unpack(hidden_states), None
            encoder_states, encoder_mask = self.encoder_inputs(index, encoder_hidden_states, encoder_attention_mask)
            hidden_states = self.layer[index](
                hidden_states,
                attention_mask,
                encoder_states,
                encoder_mask,
                encoder_index,
                cache=cache,
                query_length=1 if cls_query else None,
                layout=layout,
                **kwargs,
            )
        return hidden_states if layout is None else layout.unpack(hidden_states)

    def encoder_inputs(
        self,
        index: int,
        encoder_hidden_states: EncoderStates | None,
        encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The encoder sequence and key mask of layer `index`: with sequences of them, entry
        `(index - fusion_layer) % len(sequence)` (official `xbert.py`: NLVR2 passes `[image_0, image_1]`)."""
        if index < self.config.fusion_layer:
            return None, None
        slot = index - self.config.fusion_layer
        states = encoder_hidden_states
        if isinstance(states, (list, tuple)):
            states = states[slot % len(states)]
        mask = encoder_attention_mask
        if isinstance(mask, (list, tuple)):
            mask = mask[slot % len(mask)]
        return states, mask


def cross_attention_pairs(config: XVLMTextConfig) -> list[tuple[int, int]]:
    """`(source, target)` layer indices whose cross-attention key/value are tied (empty unless configured)."""
    if not getattr(config, "tie_cross_attention_pairs", False):
        return []
    return [(i, i + 1) for i in range(config.fusion_layer, config.num_hidden_layers - 1, 2)]


def _check_encoder_mask(mask: torch.Tensor | None, expected: tuple[int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(
            f"image_attention_mask has shape {tuple(mask.shape)} but the image sequence needs {tuple(expected)} "
            "(one 0/1 entry per image token: [CLS] + patches)."
        )
    if not bool((mask != 0).any(dim=1).all()):
        raise ValueError("image_attention_mask has a row with no visible image token.")
    return mask


def _causal_key_mask(
    attention_mask: torch.Tensor | None, batch: int, query_length: int, past_length: int, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive `(batch, 1, query_length, past_length + query_length)` mask: causal, plus key padding."""
    key_length = past_length + query_length
    if attention_mask is not None and attention_mask.shape[-1] != key_length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the decoder attends to {key_length} "
            f"({past_length} cached + {query_length} new)."
        )
    if query_length == 1 and (attention_mask is None or bool(attention_mask.all())):
        return None
    positions = torch.arange(key_length, device=device)
    visible = positions[None, :] <= positions[past_length:, None]  # (q, k)
    visible = visible[None, None].expand(batch, 1, query_length, key_length)
    if attention_mask is not None:
        visible = visible & attention_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


class XVLMTextPreTrainedModel(PreTrainedModel):
    config_class = XVLMTextConfig
    base_model_prefix = "text_model"
    main_input_name = "input_ids"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the attention backends X-VLM's layers implement: eager and sdpa
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _no_split_modules = ["XVLMLayer"]
    _keys_to_ignore_on_load_unexpected = [r"position_ids$"]
    _can_record_outputs = {
        "hidden_states": XVLMLayer,
        "attentions": OutputRecorder(XVLMSelfAttention, index=1, layer_name=".attention."),
        "cross_attentions": OutputRecorder(XVLMSelfAttention, index=1, layer_name=".crossattention."),
    }

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this by searching the module source for `ALL_ATTENTION_FUNCTIONS.get_interface(`;
        # the layers dispatch through `XVLM_ATTENTION_FUNCTIONS` (an `AttentionInterface` with a local "sdpa").
        return True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XVLMTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


class XVLMTextModel(XVLMTextPreTrainedModel):
    """The BERT-style stack: `forward` runs the text layers, or every layer with `encoder_hidden_states` (official
    `'text'` / `'multi_modal'`); `fuse` runs the fusion layers on text states (official `'fusion'`)."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__(config)
        self.embeddings = XVLMTextEmbeddings(config)
        self.encoder = XVLMEncoder(config)
        self._tied_weights_keys = {
            f"encoder.layer.{target}.crossattention.self.{name}": f"encoder.layer.{source}.crossattention.self.{name}"
            for source, target in cross_attention_pairs(config)
            for name in ("key.weight", "key.bias", "value.weight", "value.bias")
        }
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # The tied cross-attention pairs are part of the architecture (official NLVR2), whatever
        # `tie_word_embeddings` says; transformers' save/load reads them from `_tied_weights_keys`.
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return dict(self._tied_weights_keys)

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        encoder_hidden_states: EncoderStates | None = None,
        encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        encoder_index: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """Embed `input_ids` `(batch, L)` and run the text layers, or all layers when `encoder_hidden_states`
        `(batch, S, encoder_width)` (or one such tensor per cross-attention layer) are given.

        With `encoder_index` `(batch,)`, `encoder_hidden_states` holds `n` distinct sequences `(n, S, width)` and
        row b reads `encoder_hidden_states[encoder_index[b]]` (beams of one image): each sequence's keys/values are
        projected once; `encoder_attention_mask` is then per row, `(batch, S)`.

        Decoders (`config.is_decoder`) attend causally and keep a KV cache with `use_cache`; `attention_mask` then
        covers the cached and the new positions. Returns `last_hidden_state` `(batch, L, hidden)` and `cache`.
        """
        shape = self._check_text_inputs(input_ids, inputs_embeds, attention_mask)
        if encoder_index is not None and encoder_hidden_states is not None:
            per_layer = isinstance(encoder_hidden_states, (list, tuple))
            for states in encoder_hidden_states if per_layer else [encoder_hidden_states]:
                self._check_pairing(shape[0], states, encoder_index)
        cache = self._prepare_cache(cache, use_cache, encoder_hidden_states)
        past_length = cache.get_seq_length() if cache is not None else 0
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, past_length=past_length)
        self_mask = self.self_attention_mask(attention_mask, shape, past_length, hidden.dtype, hidden.device)
        if encoder_hidden_states is None and not _cross_cached(cache, self.config.fusion_layer):
            layers = range(self.config.fusion_layer)
        else:
            layers = range(self.config.num_hidden_layers)
            if encoder_hidden_states is None:  # cross-attention keys/values from the cache: its key mask as given
                encoder_attention_mask = expand_key_mask(encoder_attention_mask, hidden.dtype)
            else:
                rows = None if encoder_index is None else shape[0]
                encoder_attention_mask = self._encoder_masks(
                    encoder_hidden_states, encoder_attention_mask, hidden.dtype, rows=rows
                )
        hidden = self.encoder(
            hidden, self_mask, encoder_hidden_states, encoder_attention_mask, layers, encoder_index=encoder_index,
            cache=cache, layout=self.token_layout(attention_mask, kwargs), **kwargs,
        )
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden, cache=cache)

    @capture_outputs
    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: EncoderStates,
        image_attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        image_index: torch.Tensor | None = None,
        cls_only: bool = False,
        **kwargs: Any,
    ) -> BaseModelOutputWithCrossAttentions:
        """Run the fusion layers on text states `(batch, L, hidden)` cross-attending to image tokens
        `(batch, 1 + P, encoder_width)` (key mask `image_attention_mask` `(batch, 1 + P)`, default all ones).

        `image_embeds` may also be a sequence of tensors: fusion layer `fusion_layer + j` reads entry
        `j % len(image_embeds)` (NLVR2: `[image_0, image_1]` alternate), with `image_attention_mask` a matching
        sequence. With `image_index` `(batch,)`, `image_embeds` holds `n`
        distinct image sequences `(n, 1 + P, width)` and text row b attends to `image_embeds[image_index[b]]`; each
        image's keys/values are computed once per layer. With `cls_only`, the last layer computes the [CLS] row
        only: `last_hidden_state` is `(batch, 1, hidden)`.
        """
        sequences = list(image_embeds) if isinstance(image_embeds, (list, tuple)) else [image_embeds]
        self._check_fusion_inputs(text_embeds, attention_mask, sequences, image_index)
        masks = self._encoder_masks(
            image_embeds, image_attention_mask, text_embeds.dtype, rows=text_embeds.shape[0]
        )
        hidden = self.encoder(
            text_embeds,
            expand_key_mask(attention_mask, text_embeds.dtype),
            image_embeds,
            masks,
            range(self.config.fusion_layer, self.config.num_hidden_layers),
            encoder_index=image_index,
            cls_only=cls_only,
            layout=self.token_layout(attention_mask, kwargs),
            **kwargs,
        )
        return BaseModelOutputWithCrossAttentions(last_hidden_state=hidden)

    def token_layout(self, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> PackedLayout | None:
        """The packed layout of the real tokens where the padding-free path applies (`config.padding_free`, an
        encoder, no per-layer outputs recorded: Grad-CAM reads the padded rows' attention, as the official code;
        not under `torch.compile`, whose graphs want static shapes); `None` runs the padded computation."""
        config = self.config
        if not config.padding_free or config.is_decoder or torch.compiler.is_compiling():
            return None
        if any(kwargs.get(f"output_{k}", getattr(config, f"output_{k}", False)) for k in ("attentions", "hidden_states")):
            return None
        return PackedLayout.from_mask(attention_mask)

    # -- masks and checks ---------------------------------------------------------------------------------------
    def self_attention_mask(
        self, attention_mask: torch.Tensor | None, shape: tuple[int, int], past_length: int, dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor | None:
        """The additive self-attention mask: key padding, plus causality for decoders."""
        if self.config.is_decoder:
            return _causal_key_mask(attention_mask, shape[0], shape[1], past_length, dtype, device)
        return expand_key_mask(attention_mask, dtype)

    def _prepare_cache(
        self, cache: Cache | None, use_cache: bool | None, encoder_hidden_states: EncoderStates | None
    ) -> Cache | None:
        if not self.config.is_decoder:
            if cache is not None:
                raise ValueError("A KV cache needs a decoder (text_config.is_decoder=True).")
            return None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and not (self.is_activation_checkpointing and self.training):
            self_cache = DynamicCache(config=self.config)
            cache = self_cache
            if encoder_hidden_states is not None:
                cache = EncoderDecoderCache(self_cache, DynamicCache(config=self.config))
        return cache

    def _check_text_inputs(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        shape = tuple(input_ids.shape if input_ids is not None else inputs_embeds.shape[:2])
        if len(shape) != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {shape}.")
        if shape[0] == 0:
            raise ValueError("input_ids is an empty batch (0 texts): pass at least one text.")
        if input_ids is not None:
            check_token_ids(input_ids, self.config.vocab_size)
        if shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {shape[1]} exceeds max_position_embeddings={self.config.max_position_embeddings}."
            )
        if attention_mask is not None and not self.config.is_decoder and tuple(attention_mask.shape) != shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape {shape}."
            )
        return shape

    def _check_fusion_inputs(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sequences: list[torch.Tensor],
        image_index: torch.Tensor | None,
    ) -> None:
        if not sequences:
            raise ValueError("fuse needs at least one image sequence.")
        if text_embeds.dim() != 3 or any(s.dim() != 3 for s in sequences):
            raise ValueError(
                f"fuse expects text_embeds (batch, L, hidden) and image_embeds (batch, 1 + P, width); got "
                f"{tuple(text_embeds.shape)} and {[tuple(s.shape) for s in sequences]}."
            )
        for images in sequences:
            self._check_pairing(text_embeds.shape[0], images, image_index)
        if text_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"text_embeds width {text_embeds.shape[-1]} != hidden_size {self.config.hidden_size}.")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(text_embeds.shape[:2]):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match text_embeds "
                f"{tuple(text_embeds.shape[:2])}."
            )

    def _check_pairing(self, rows: int, images: torch.Tensor, image_index: torch.Tensor | None) -> None:
        if images.shape[-1] != self.config.encoder_width:
            raise ValueError(f"image_embeds width {images.shape[-1]} != encoder_width {self.config.encoder_width}.")
        if image_index is None:
            if images.shape[0] != rows:
                raise ValueError(
                    f"fuse got {rows} texts but {images.shape[0]} images: pair each text with one image sequence "
                    "(index the image embeddings first, e.g. image_embeds[image_index])."
                )
            return
        if image_index.dim() != 1 or image_index.shape[0] != rows:
            raise ValueError(
                f"image_index must have shape ({rows},), one image row per text, got {tuple(image_index.shape)}."
            )
        if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= len(images)):
            raise ValueError(f"image_index values must be in [0, {len(images)}).")

    def _encoder_masks(
        self,
        encoder_hidden_states: EncoderStates | None,
        encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None,
        dtype: torch.dtype,
        rows: int | None = None,
    ) -> torch.Tensor | list[torch.Tensor | None] | None:
        """Checked additive key masks for the cross-attention (one per layer when given as a sequence)."""
        if encoder_hidden_states is None:
            return None
        per_layer = isinstance(encoder_attention_mask, (list, tuple))
        states = encoder_hidden_states
        if isinstance(states, (list, tuple)) or per_layer:
            n = len(states) if isinstance(states, (list, tuple)) else len(encoder_attention_mask)
            seqs = states if isinstance(states, (list, tuple)) else [states] * n
            masks = encoder_attention_mask if per_layer else [encoder_attention_mask] * n
            return [self._encoder_mask(s, m, dtype, rows) for s, m in zip(seqs, masks)]
        return self._encoder_mask(states, encoder_attention_mask, dtype, rows)

    @staticmethod
    def _encoder_mask(
        states: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype, rows: int | None
    ) -> torch.Tensor | None:
        expected = (states.shape[0] if rows is None else rows, states.shape[1])
        return expand_key_mask(_check_encoder_mask(mask, expected), dtype)


class XVLMLMHeadTransform(nn.Module):
    """BERT `cls.predictions.transform`: dense -> activation -> LayerNorm."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class XVLMLMHead(nn.Module):
    """BERT LM head (`cls.predictions`): transform + `decoder` (weight tied to the word embeddings, own bias)."""

    def __init__(self, config: XVLMTextConfig):
        super().__init__()
        self.transform = XVLMLMHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class XVLMTextLMHeadModel(XVLMTextPreTrainedModel, GenerationMixin):
    """A text stack with its own embeddings and an LM head tied to them (official `BertLMHeadModel`): the
    decoder of the captioning and VQA heads. With `config.is_decoder` it decodes causally with a KV cache and
    supports `generate(input_ids, encoder_hidden_states=..., encoder_attention_mask=...)`."""

    _tied_weights_keys = {"lm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: XVLMTextConfig):
        super().__init__(config)
        self.text_model = XVLMTextModel(config)
        self.lm_head = XVLMLMHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        encoder_hidden_states: EncoderStates | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_index: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions:
        """Logits `(batch, L, vocab)`; with `labels` `(batch, L)` (-100 = ignored) the next-token loss of
        `logits[:, :-1]` against `labels[:, 1:]` (official decoders). `reduction="none"` gives the per-sequence sum
        `(batch,)` (official VQA answer loss). `encoder_index`: see `XVLMTextModel.forward`."""
        if labels is not None:
            use_cache = False
        outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            encoder_index=encoder_index,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, reduction=reduction, label_smoothing=label_smoothing)
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
        )


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of `logits[:, :-1]` `(B, L-1, V)` against `labels[:, 1:]` (-100 ignored).

    `reduction="mean"` averages over the labelled tokens; `"none"` returns the sum per sequence `(B,)`.
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(targets.shape)
    if reduction == "none":
        return per_token.sum(dim=1)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    return per_token.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


__all__ = [
    "XVLMLMHead",
    "XVLMLayer",
    "XVLMTextLMHeadModel",
    "XVLMTextModel",
    "XVLMTextPreTrainedModel",
    "next_token_loss",
]
