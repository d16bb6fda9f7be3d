"""PyTorch X-VLM: the image encoder and the base model (image, region and text encoders, fusion, ITC space).

Numerically this is the official `XVLMBase` (zengyan-97/X-VLM, `models/xvlm.py`):

- image: Swin -> final LayerNorm -> `[mean of patch tokens; patch tokens]`, `(batch, 1 + P, vision_width)`;
- region ("visual concept"): the same patch tokens, with token 0 the mean over the patches inside the box; the box
  mask is the key mask of the fusion cross-attention;
- text: embeddings + layers `[0, fusion_layer)`; fusion: layers `[fusion_layer, num_hidden_layers)` with
  bidirectional self-attention plus cross-attention to the image tokens (the text stack lives in
  `modeling_xvlm_text.py`);
- ITC features: L2-normalised projections of token 0 of each side; similarity logits are divided by `temp`.

The task heads are in `modeling_xvlm_<task>.py` beside this file and build on the public methods of `XVLMModel`
and the shared pieces at the end of this file. Attention goes through transformers' attention interface, so
`attn_implementation="eager"` and `"sdpa"` both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SwinModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions, BaseModelOutputWithPooling
from transformers.models.swin.modeling_swin import SwinAttention
from transformers.utils import ModelOutput, can_return_tuple

from .attention import XVLM_ATTENTION_FUNCTIONS, eager_attention_forward
from .configuration_xvlm import XVLMConfig
from .initialization import build_from_vision_text_pretrained
from .losses import image_text_contrastive_loss, image_text_matching_loss, sample_hard_negatives
from .modeling_xvlm_text import EncoderStates, XVLMTextModel, XVLMTextPreTrainedModel
from .quantization import is_int8_quantized
from .retrieval import RetrievalOutput, retrieve


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

# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------------------------


class XVLMPreTrainedModel(XVLMTextPreTrainedModel):
    """Base class of `XVLMModel` and the heads: the text stack's (attention backends, initialisation of the text
    embeddings) plus Swin and the ITC temperature."""

    config_class = XVLMConfig
    base_model_prefix = "xvlm"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["XVLMLayer", "SwinStage"]
    _can_record_outputs = None  # recorded by the sub-models (text stack, Swin)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XVLMModel) and module.temp is not None:
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

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`; a head registered for remote code also writes
        `auto_map["AutoModel"]` = `XVLMModel`, so that `AutoModel` loads the base model of every checkpoint with
        `trust_remote_code=True` as it does with the package installed (`XVLMModel`'s module ships with every
        head). An int8-quantized model (`modeling_xvlm.quantization.quantize_int8`) is refused: save the fp32 one."""
        if is_int8_quantized(self):
            raise ValueError(
                "an int8 dynamically quantized model cannot be saved (its linear weights are packed int8 tensors): "
                "save the fp32 model and apply quantize_int8 after from_pretrained."
            )
        if self._auto_class is not None and self._auto_class != "AutoModel":
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{__name__.rsplit('.', 1)[-1]}.XVLMModel"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)



#: Heads whose official model is trained without the contrastive loss: their checkpoints have no `vision_proj`,
#: `text_proj` or `temp` (official `model_bbox.py`, `model_vqa.py`, `model_nlvr.py`, `model_nlvr_pretrain.py`,
#: `model_captioning.py`; the text-assignment head keeps its `vision_proj` beside the base model).
HEADS_WITHOUT_ITC = frozenset({
    "XVLMForGrounding", "XVLMForQuestionAnswering", "XVLMForImagesAndTextClassification", "XVLMForTextAssignment",
    "XVLMForConditionalGeneration",
})


def _saved_without_itc(config: XVLMConfig) -> str | None:
    """The head that saved `config` (its `architectures`) when that head has no ITC projections, else `None`."""
    return next((name for name in config.architectures or () if name in HEADS_WITHOUT_ITC), None)


class XVLMModel(XVLMPreTrainedModel):
    """X-VLM base model: image, region and text encoders, the fusion encoder and the ITC projections.

    Args:
        config: the model configuration.
        add_projections: create `vision_proj`, `text_proj` and `temp` (the ITC space). `None` (the default): unless
            `config.architectures` names a head in `HEADS_WITHOUT_ITC`, so that `XVLMModel.from_pretrained` /
            `AutoModel` on such a checkpoint has no untrained projections (`get_image_features` then raises a
            `ValueError` naming the head, instead of returning features of random weights). The heads pass it.
    """

    def __init__(self, config: XVLMConfig, add_projections: bool | None = None):
        if add_projections is None:
            add_projections = _saved_without_itc(config) is None
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
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` checked (type, shape, floating dtype, finite) and cast to the vision encoder's dtype.

        A floating dtype other than the encoder's (float64 into a float32 model) is cast, as
        `BatchFeature.to(dtype)` does; integer or boolean pixels are raw images and raise a `TypeError` naming the
        processor."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values have dtype {pixel_values.dtype}: the model takes normalised floating-point pixels. "
                "Prepare images with XVLMProcessor / XVLMImageProcessor (it resizes, rescales and normalises them)."
            )
        if pixel_values.dim() >= 1 and pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (0 images): pass at least one image.")
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
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contain NaN or infinite values.")
        dtype = next(self.vision_model.parameters()).dtype
        return pixel_values if pixel_values.dtype == dtype else pixel_values.to(dtype)

    def _require_projections(self) -> None:
        if self.vision_proj is not None:
            return
        head = _saved_without_itc(self.config)
        if head is not None:
            raise ValueError(
                f"This XVLMModel has no ITC projections (vision_proj, text_proj): its checkpoint was saved by {head}, "
                "whose official model is trained without the contrastive loss. ITC features and rankings come from "
                "a pre-training or retrieval checkpoint; encode_image / encode_text give the unprojected sequences."
            )
        raise ValueError("This XVLMModel was built with add_projections=False and has no ITC projections.")

    # -- encoders ---------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.FloatTensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """The visual sequence `[mean patch; patches]`, `(batch, 1 + P, vision_width)`, without projection.

        `output_attentions` / `output_hidden_states` in `kwargs` return Swin's attentions / hidden states."""
        pixel_values = self._check_pixel_values(pixel_values)
        vision = self.vision_model(pixel_values=pixel_values, return_dict=True, **_output_flags(kwargs))
        patches = vision.last_hidden_state  # after Swin's final LayerNorm, as the official CLS-like token needs
        sequence = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence, hidden_states=vision.hidden_states, attentions=vision.attentions
        )

    def region_sequence(
        self, image_embeds: torch.Tensor, region_masks: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """Region sequences from already encoded images.

        Args:
            image_embeds: `(n_images, 1 + P, width)` from `encode_image`.
            region_masks: `(R, 1 + P)`, 1 for [CLS] and the patches inside each box.
            image_index: `(R,)`, the row of `image_embeds` each region belongs to.

        Returns:
            `(R, 1 + P, width)`: token 0 is the mean of the in-box patches, tokens 1.. are the image's patches.
        """
        self._check_regions(image_embeds.shape[0], region_masks, image_index)
        patches = image_embeds[image_index, 1:]
        weights = region_masks[:, 1:].to(patches.dtype).unsqueeze(-1)
        region_cls = (weights * patches).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
        return torch.cat([region_cls, patches], dim=1)

    def _check_regions(self, n_images: int, region_masks: torch.Tensor, image_index: torch.Tensor) -> None:
        expected = 1 + self.config.num_patches
        if region_masks.dim() != 2 or region_masks.shape[1] != expected:
            size, stride = self.config.image_size, self.config.patch_stride
            raise ValueError(
                f"region_masks must have shape (num_regions, {expected}) = (R, 1 + num_patches), got "
                f"{tuple(region_masks.shape)}: this model reads {size}px images on a {size // stride}x"
                f"{size // stride} patch grid. Build the masks with a processor that fits the model, "
                f"XVLMProcessor.from_model_config(model.config, tokenizer=...), i.e. an image processor with "
                f"size={{'height': {size}, 'width': {size}}} and patch_size={stride}."
            )
        if image_index.dim() != 1 or image_index.shape[0] != region_masks.shape[0]:
            raise ValueError(
                f"image_index must have shape ({region_masks.shape[0]},) (one image row per region), got "
                f"{tuple(image_index.shape)}."
            )
        if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= n_images):
            raise ValueError(f"image_index values must be in [0, {n_images}), got {image_index.tolist()}.")
        if not bool(((region_masks == 0) | (region_masks == 1)).all()):
            raise ValueError(
                "region_masks must be binary (1 for [CLS] and the patches inside each box, 0 elsewhere), got values "
                f"{torch.unique(region_masks).tolist()[:8]}: build them with XVLMProcessor (boxes=...)."
            )
        empty = (region_masks[:, 1:] == 0).all(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"region_masks rows {empty.nonzero().flatten().tolist()} select no patch: every region needs at "
                "least one patch inside its box."
            )

    def project_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC feature `(batch, projection_dim)` of image or region sequences `(batch, 1 + P, width)`."""
        self._require_projections()
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def project_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC feature `(batch, projection_dim)` of text-encoder states `(batch, L, hidden)`."""
        self._require_projections()
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Image sequence `(batch, 1 + P, vision_width)` and its L2-normalised ITC feature `(batch, projection_dim)`
        as `pooler_output`."""
        self._require_projections()
        output = self.encode_image(pixel_values, **kwargs)
        output.pooler_output = self.project_image(output.last_hidden_state)
        return output

    @can_return_tuple
    def get_region_features(
        self, pixel_values: torch.FloatTensor, region_masks: torch.Tensor, image_index: torch.LongTensor,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Region sequences `(R, 1 + P, vision_width)` and ITC features `(R, projection_dim)`.

        Each image of `pixel_values` `(n_images, 3, H, W)` is encoded once and serves all its regions.
        """
        self._require_projections()
        output = self.encode_image(pixel_values, **kwargs)
        sequence = self.region_sequence(output.last_hidden_state, region_masks, image_index)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence,
            pooler_output=self.project_image(sequence),
            hidden_states=output.hidden_states,
            attentions=output.attentions,
        )

    def encode_text(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """Text-encoder states `(batch, L, hidden)` (layers `[0, fusion_layer)`), without projection."""
        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=text.last_hidden_state, hidden_states=text.hidden_states, attentions=text.attentions
        )

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """Text-encoder states `(batch, L, hidden)` and the L2-normalised ITC feature `(batch, projection_dim)` as
        `pooler_output`."""
        self._require_projections()
        output = self.encode_text(input_ids, attention_mask, **kwargs)
        output.pooler_output = self.project_text(output.last_hidden_state)
        return output

    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: EncoderStates,
        image_attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        cls_only: bool = False,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | BaseModelOutputWithCrossAttentions:
        """Fusion encoder: text states `(B, L, hidden)` cross-attend to image/region sequences `(B, 1 + P, width)`.

        `image_attention_mask` `(B, 1 + P)` is the key mask (a region's box mask; default all ones). With
        `image_index` `(B,)`, `image_embeds` are `n` distinct images and text b uses `image_embeds[image_index[b]]`
        (image keys/values computed once per image). `image_embeds` may also be one sequence per fusion layer
        (`XVLMTextModel.fuse`). Returns the fused states `(B, L, hidden)`; with `return_dict=True` the full
        `BaseModelOutputWithCrossAttentions` (hidden states and attentions when `output_hidden_states` /
        `output_attentions` are passed). With `cls_only=True` the last fusion layer computes only the [CLS] row,
        all an ITM or box head reads (its keys/values still span every token), and the states are `(B, 1, hidden)`.
        """
        output = self.text_model.fuse(
            text_embeds,
            attention_mask,
            image_embeds,
            image_attention_mask,
            image_index=image_index,
            cls_only=cls_only,
            return_dict=True,
            **kwargs,
        )
        return output if return_dict else output.last_hidden_state

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> XVLMOutput:
        """Encode `n_images` images and `n_texts` texts and score every pair with the ITC similarity.

        With `return_loss=True` the images and texts must be aligned pairs (`n_images == n_texts`) and the
        symmetric ITC loss is returned.
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        image = self.get_image_features(pixel_values, return_dict=True, **kwargs)
        text = self.get_text_features(input_ids, attention_mask, return_dict=True, **kwargs)
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
        return XVLMOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=image,
        )

    @torch.no_grad()
    def rank(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        k: int = 16,
        batch_size: int = 64,
        precision: str = "fp32",
    ) -> RetrievalOutput:
        """Rank a gallery by ITC alone: the top `k` texts of every image and images of every text, best first.

        This is the candidate stage of `XVLMForRetrieval.rank` without its ITM re-ranking
        (`modeling_xvlm.retrieval.retrieve(..., rerank=False)`): every image and text is encoded once, in batches of
        `batch_size`, in `precision` ("fp32", or "bf16" autocast on the model's device); the similarities are
        computed in fp32.

        Returns:
            `RetrievalOutput` with `i2t_indices` / `i2t_scores` `(n_images, min(k, n_texts))`, `t2i_indices` /
            `t2i_scores` `(n_texts, min(k, n_images))` and `similarity` `(n_images, n_texts)`. The scores are ITC
            cosine similarities (no temperature; `forward`'s `logits_per_image` divides them by `temp`, the same
            order); `num_pairs_scored` is 0.
        """
        self._require_projections()
        return retrieve(
            self, pixel_values, input_ids, attention_mask, k=k, batch_size=batch_size, precision="fp32",
            encode_precision=precision, rerank=False,
        )

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


# ================================================================================================================
# Pieces shared by the task heads (`modeling_xvlm_<task>.py`)
# ================================================================================================================
#
# Each head holds the base model as `self.xvlm` (`base_model_prefix = "xvlm"`), so an `XVLMModel` checkpoint loads
# into it, and uses only the public methods of `XVLMModel`.

#: Keyword arguments every `forward` accepts besides its own: the output flags, and what `Trainer` passes.
MODEL_KWARGS = ("output_attentions", "output_hidden_states", "num_items_in_batch")


def head_kwargs(model: nn.Module, kwargs: dict[str, Any], pixel_values: Any, input_ids: Any) -> dict[str, Any]:
    """The check every `forward` starts with: images and texts are both given, and no argument is unknown
    (`TypeError` naming it). Returns the output flags among `kwargs`, to pass down."""
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword argument(s): {', '.join(unknown)}.")
    if pixel_values is None or input_ids is None:
        raise ValueError(f"{type(model).__name__}.forward needs pixel_values and input_ids.")
    for name, value in (("pixel_values", pixel_values), ("input_ids", input_ids)):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 0:
            raise ValueError(f"{type(model).__name__}.forward got an empty batch ({name} has 0 rows).")
    return _output_flags(kwargs)


def _output_flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in ("output_attentions", "output_hidden_states") if kwargs.get(k) is not None}


def wants_loss(return_loss: bool | None, *targets: Any) -> bool:
    """The loss rule of every head: with `return_loss=None` a loss is computed iff a target is given;
    `return_loss=True` / `False` force it on / off. The same in train and eval mode."""
    if return_loss is None:
        return any(target is not None for target in targets)
    return bool(return_loss)


def build_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Official `build_mlp`: Linear(D, 2D) -> LayerNorm(2D, eps 1e-5) -> GELU (erf) -> Linear(2D, out)."""
    return nn.Sequential(
        nn.Linear(in_dim, 2 * in_dim), nn.LayerNorm(2 * in_dim, eps=1e-5), nn.GELU(), nn.Linear(2 * in_dim, out_dim)
    )


def nested_to_tuple(output: ModelOutput, nested: tuple[str, ...]) -> tuple[Any, ...]:
    """`output.to_tuple()` with the nested `ModelOutput` fields `nested` turned into tuples too."""
    return tuple(
        output[k].to_tuple() if k in nested and isinstance(output[k], ModelOutput) else output[k]
        for k in output.keys()
    )


def slice_output(output: BaseModelOutputWithCrossAttentions, rows: int) -> BaseModelOutputWithCrossAttentions:
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


class XVLMFeaturesMixin:
    """`get_image_features` / `get_text_features` on a head, as `CLIPModel` has them: those of its base model
    `self.xvlm`, with the same arguments and results (`BaseModelOutputWithPooling`, the L2-normalised ITC feature as
    `pooler_output`; a tuple with `return_dict=False`), i.e. the features of an `XVLMModel` with the head's weights.

    A head whose official model is trained without the contrastive loss has no ITC projections (`vision_proj`,
    `text_proj`); the methods then raise a `ValueError` with the head's `_no_itc_features` (why, and what to use
    instead) rather than return features of untrained weights.
    """

    #: Why this head has no ITC features, for the error of `get_*_features` (`None`: it has them).
    _no_itc_features: str | None = None

    def _itc_model(self, method: str, projection: str) -> XVLMModel:
        """The base model if it has the `projection` (`vision_proj` / `text_proj`) that `method` needs; else the
        `ValueError` naming the head."""
        xvlm = getattr(self, "xvlm", None)
        if getattr(xvlm, projection, None) is None:
            reason = self._no_itc_features or f"its base model has no `{projection}`."
            raise ValueError(
                f"{type(self).__name__}.{method} needs the ITC projection `{projection}`, which this head does not "
                f"have: {reason}"
            )
        return xvlm

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """`XVLMModel.get_image_features` of the base model: the image sequence `(batch, 1 + P, vision_width)` and
        its ITC feature `(batch, projection_dim)` as `pooler_output`."""
        return self._itc_model("get_image_features", "vision_proj").get_image_features(pixel_values, **kwargs)

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """`XVLMModel.get_text_features` of the base model: text-encoder states `(batch, L, hidden)` and the ITC
        feature `(batch, projection_dim)` as `pooler_output`."""
        return self._itc_model("get_text_features", "text_proj").get_text_features(input_ids, attention_mask, **kwargs)


class XVLMHeadMixin(XVLMFeaturesMixin):
    """Shared by the heads: embedding accessors delegating to `self.xvlm`, the base model's feature getters
    (`XVLMFeaturesMixin`) and `from_vision_text_pretrained`."""

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


def image_text_matching(
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
    **kwargs: Any,
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
        image_index=image_index[entry_for_image],
        return_dict=True,
        **kwargs,
    )
    logits = itm_head(fused.last_hidden_state[:, 0])
    loss, labels = image_text_matching_loss(logits, text_valid, image_valid)
    return loss, logits, labels, fused


__all__ = [
    "XVLMModel",
    "XVLMOutput",
    "XVLMPreTrainedModel",
    "shrink_swin_windows",
]
