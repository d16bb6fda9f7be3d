"""Configuration classes for X-VLM.

`XVLMConfig` is a composite config: a transformers `SwinConfig` for the image encoder and an `XVLMTextConfig`
for the BERT-style text + fusion encoder. The defaults are X-VLM-base at 384 px (Swin-B window 12 + BERT-base
split into 6 text and 6 fusion layers), the configuration of the official fine-tuned checkpoints.

This module only imports transformers, so that it can be shipped as remote code next to a checkpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedConfig, SwinConfig
from transformers.configuration_utils import SubConfigSpec

# Swin-B as used by X-VLM-base (official `configs/config_swinB_*.json`). The window is the final feature map
# (image_size / 32): 7 at 224, 12 at 384, 15 at 480.
XVLM_BASE_VISION: dict[str, Any] = {
    "image_size": 384,
    "patch_size": 4,
    "num_channels": 3,
    "embed_dim": 128,
    "depths": [2, 2, 18, 2],
    "num_heads": [4, 8, 16, 32],
    "window_size": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.1,
    "hidden_act": "gelu",
    "use_absolute_embeddings": False,
    "layer_norm_eps": 1e-5,
}

# A configuration small enough for unit tests and the CPU demo job (~0.3M parameters in the vision part).
XVLM_TINY_VISION: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [1, 1],
    "num_heads": [2, 2],
    "window_size": 4,
    "drop_path_rate": 0.0,
}
XVLM_TINY_TEXT: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "fusion_layer": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

#: The `XVLMTextConfig` fields that are BERT's own (what a BERT config or the official text-config JSON can set);
#: `fusion_layer` is X-VLM's.
BERT_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "initializer_range",
    "pad_token_id",
)


#: `to_dict` entries that are not constructor fields.
_DERIVED_FIELDS = ("model_type", "transformers_version", "architectures")


class XVLMTextConfig(PreTrainedConfig):
    r"""Configuration of the X-VLM text encoder and cross-modal fusion encoder (one BERT-style stack).

    Layers `[0, fusion_layer)` are self-attention text layers; layers `[fusion_layer, num_hidden_layers)` add a
    cross-attention block over the image tokens whose key/value input width is `encoder_width`. The parameter names
    follow BERT, so a `bert-base-uncased` checkpoint initialises every self-attention and feed-forward weight.

    Args:
        vocab_size: WordPiece vocabulary size (30522 for `bert-base-uncased`).
        hidden_size: width of the text and fusion layers.
        num_hidden_layers: total number of layers, text + fusion (12 for X-VLM-base).
        fusion_layer: index of the first fusion layer (6 for X-VLM-base, i.e. 6 text + 6 fusion layers).
        num_attention_heads: heads in every self- and cross-attention block.
        intermediate_size: feed-forward width.
        hidden_act: feed-forward activation (`"gelu"` is the exact erf GELU, as BERT).
        hidden_dropout_prob: dropout after embeddings, attention outputs and feed-forward outputs.
        attention_probs_dropout_prob: dropout on attention probabilities.
        max_position_embeddings: number of absolute position embeddings.
        type_vocab_size: token type vocabulary (X-VLM always uses type 0).
        initializer_range: std of the normal initialiser for new weights.
        layer_norm_eps: LayerNorm epsilon (1e-12 as BERT).
        pad_token_id: id of `[PAD]`.
        encoder_width: key/value input width of the cross-attention: the image tokens for fusion (set from the
            vision config by `XVLMConfig`), or the text width for a decoder reading question states (VQA).
        is_decoder: causal self-attention in every layer (captioning and VQA answer decoders), with a KV cache.
        use_cache: keep a KV cache when decoding (decoders only).
        tie_cross_attention_pairs: cross-attention layers `fusion_layer + 2j` and `fusion_layer + 2j + 1` share one
            key and one value projection (official NLVR2: the two images alternate across the fusion layers).
        tie_word_embeddings: tie an LM head's decoder weight to the word embeddings (always, in X-VLM).
        padding_free: run the projections, feed-forward and LayerNorm of the text and fusion encoders on the real
            tokens only when a batch is right-padded (attention still spans the padded layout with its mask). Real
            tokens' outputs equal the padded computation (fp32, to 1e-5); padded positions of `last_hidden_state`
            are 0. Off (`False`): every position is computed, as the official code. Decoders always compute
            every position.
        bos_token_id: the first token of the answer and caption decoders' `generate()`: the tokenizer's `[CLS]`
            (101 for `bert-base-uncased`; `xvlm-convert` and `xvlm-train` set it from the tokenizer).
        eos_token_id: the token that ends a generated answer or caption: the tokenizer's `[SEP]` (102).
    """

    model_type = "xvlm_text_model"
    base_config_key = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    fusion_layer: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    encoder_width: int = 1024
    is_decoder: bool = False
    use_cache: bool = True
    tie_cross_attention_pairs: bool = False
    tie_word_embeddings: bool = True
    padding_free: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"text_config.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if not 0 <= self.fusion_layer < self.num_hidden_layers:
            raise ValueError(
                f"text_config.fusion_layer ({self.fusion_layer}) must be in [0, num_hidden_layers="
                f"{self.num_hidden_layers}): the fusion encoder needs at least one layer, so the number of fusion "
                f"layers ({self.num_hidden_layers - self.fusion_layer}) cannot exceed the layer count."
            )
        if self.tie_cross_attention_pairs and (self.num_hidden_layers - self.fusion_layer) % 2:
            raise ValueError(
                "text_config.tie_cross_attention_pairs needs an even number of cross-attention layers, got "
                f"{self.num_hidden_layers - self.fusion_layer}."
            )

    @property
    def num_text_layers(self) -> int:
        """Number of text-only layers (run by `get_text_features`)."""
        return self.fusion_layer

    @property
    def num_fusion_layers(self) -> int:
        """Number of fusion layers (run by `fuse`)."""
        return self.num_hidden_layers - self.fusion_layer

    @property
    def pad_id(self) -> int:
        """`pad_token_id`, 0 when unset (the padding id of labels and generated sequences)."""
        return 0 if self.pad_token_id is None else int(self.pad_token_id)

    def with_changes(self, **changes: Any) -> XVLMTextConfig:
        """A new config with these fields changed and the others as here (the NLVR2 stack, the VQA and caption
        decoders are derived this way)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _DERIVED_FIELDS}
        return XVLMTextConfig(**{**fields, **changes})


def _vision_total_stride(vision_config: SwinConfig) -> int:
    patch = vision_config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(patch) * 2 ** (len(vision_config.depths) - 1)


class XVLMConfig(PreTrainedConfig):
    r"""Configuration of an X-VLM model.

    Args:
        vision_config: a `SwinConfig` (or its dict). Defaults to Swin-B at 384 px, window 12. Other backbones
            (CLIP-ViT, DeiT) are not supported and raise a `ValueError`.
        text_config: an `XVLMTextConfig` (or its dict). Defaults to BERT-base split 6 text + 6 fusion layers.
        projection_dim: size of the shared image-text space of the contrastive (ITC) features.
        temperature_init: initial value of the learnable ITC temperature `temp` (logits are `sim / temp`).
        temperature_clamp: `(min, max)` the pre-training forward clamps `temp` to (official: 0.001, 0.5).
        image_size: square model input size. Kept equal to `vision_config.image_size`; when given and different,
            the vision config is resized and, unless `vision_config` sets it, the Swin window becomes the final
            feature-map size (`image_size / 32` for Swin-B: 7 at 224, 12 at 384, 15 at 480).
        itc_loss_weight, itm_loss_weight, mlm_loss_weight, bbox_l1_loss_weight, bbox_giou_loss_weight: loss weights
            of the heads (all 1 as the official recipe).
        official_giou_batch_zeroing: `False` (default) handles a degenerate predicted box per box; `True` reproduces
            the official code, which zeroes the GIoU loss of the whole batch when any box is degenerate.
        official_itc_gradient_scaling: `False` (default) gathers ITC features across processes with the full
            gradient; `True` reproduces the official `AllGather`, whose ITC gradient is 1/world_size too small.
        official_duplicate_negatives: `False` (default) treats pre-training entries with the same visual input (same
            image and same region mask, e.g. two captions of one image or padding duplicates) as positives of each
            other for ITC and never as ITM negatives; `True` reproduces the official code, which treats them as
            negatives (official quirk: duplicates act as false negatives).
        num_decoder_layers: layers of the VQA answer decoder (`XVLMForQuestionAnswering`); `None` (default): the
            number of fusion layers, as the official loader requires (`num_dec_layers` of `configs/VQA.yaml`).
        official_answer_scoring: `True` (default) ranks VQA answers with the official score, which counts the
            log-probability of the answer's first token twice (`model_vqa.rank_answer`); `False` uses the answer's
            log-likelihood (each token once).
        label_smoothing: label smoothing of the caption loss (`XVLMForConditionalGeneration`; official: target
            `1 - s`, every other token `s / vocab`); `None` (default): 0.1, the official fine-tuning value
            (`configs/Captioning.yaml`); the captioning domain pre-training uses 0.
        gradcam_layer: index in the whole text stack of the fusion layer whose cross-attention
            `XVLMForRetrieval.compute_gradcam` reads (official `block_num` of `Grounding.py`); `None` (default): the
            fourth fusion layer, `fusion_layer + 3` (9 for X-VLM-base, the official run script's value), or the last
            layer of a smaller stack.
    """

    model_type = "xvlm"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(SwinConfig, init_kwargs=XVLM_BASE_VISION),
        "text_config": XVLMTextConfig,
    }

    vision_config: dict | SwinConfig | None = None
    text_config: dict | XVLMTextConfig | None = None
    projection_dim: int = 256
    temperature_init: float = 0.07
    temperature_clamp: list[float] | tuple[float, float] = (0.001, 0.5)
    image_size: int | None = None
    itc_loss_weight: float = 1.0
    itm_loss_weight: float = 1.0
    mlm_loss_weight: float = 1.0
    bbox_l1_loss_weight: float = 1.0
    bbox_giou_loss_weight: float = 1.0
    official_giou_batch_zeroing: bool = False
    official_itc_gradient_scaling: bool = False
    official_duplicate_negatives: bool = False
    num_decoder_layers: int | None = None
    official_answer_scoring: bool = True
    label_smoothing: float | None = None
    gradcam_layer: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        window_given = False
        if isinstance(self.vision_config, dict):
            model_type = self.vision_config.get("model_type", "swin")
            if model_type != "swin":
                raise ValueError(
                    f"Unknown vision backbone {model_type!r}: X-VLM here supports the Swin Transformer only "
                    "(vision_config.model_type must be 'swin')."
                )
            window_given = "window_size" in self.vision_config
            # A partial dict overrides the X-VLM-base values, not SwinConfig's Swin-T defaults.
            self.vision_config = {**XVLM_BASE_VISION, **self.vision_config}
        elif self.vision_config is not None and not isinstance(self.vision_config, SwinConfig):
            raise ValueError(
                f"Unknown vision backbone {type(self.vision_config).__name__}: vision_config must be a SwinConfig."
            )
        else:
            window_given = self.vision_config is not None
        super().__post_init__(**kwargs)

        vision = self.vision_config
        if self.image_size is not None and self.image_size != vision.image_size:
            vision.image_size = int(self.image_size)
            if not window_given:
                vision.window_size = int(self.image_size) // _vision_total_stride(vision)
        image_size = vision.image_size
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        self.image_size = int(image_size)
        stride = _vision_total_stride(vision)
        if self.image_size % stride != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the total stride {stride} of the vision encoder "
                f"(patch_size {vision.patch_size} x 2^{len(vision.depths) - 1} patch merges)."
            )
        if len(vision.depths) != len(vision.num_heads):
            raise ValueError(
                f"vision_config.depths {list(vision.depths)} and num_heads {list(vision.num_heads)} differ in length."
            )
        # The fusion layers cross-attend to image tokens of the vision width.
        self.text_config.encoder_width = int(vision.hidden_size)
        self.temperature_clamp = tuple(float(v) for v in self.temperature_clamp)
        if self.temperature_init <= 0:
            raise ValueError(f"temperature_init must be positive, got {self.temperature_init}.")
        if self.num_decoder_layers is not None and self.num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be at least 1, got {self.num_decoder_layers}.")
        text = self.text_config
        if self.gradcam_layer is not None and not text.fusion_layer <= self.gradcam_layer < text.num_hidden_layers:
            raise ValueError(
                f"gradcam_layer ({self.gradcam_layer}) must be a fusion layer, in [{text.fusion_layer}, "
                f"{text.num_hidden_layers})."
            )

    @property
    def default_gradcam_layer(self) -> int:
        """The Grad-CAM layer: `gradcam_layer`, or `fusion_layer + 3` (9 for base) capped at the last layer."""
        if self.gradcam_layer is not None:
            return self.gradcam_layer
        text = self.text_config
        return min(text.fusion_layer + 3, text.num_hidden_layers - 1)

    @property
    def vision_width(self) -> int:
        """Width of the image tokens (1024 for Swin-B)."""
        return int(self.vision_config.hidden_size)

    @property
    def patch_stride(self) -> int:
        """Pixels per patch-grid cell of the final feature map (32 for Swin-B); the region-mask `patch_size`."""
        return _vision_total_stride(self.vision_config)

    @property
    def num_patches(self) -> int:
        """Number P of patch tokens (`(image_size / patch_stride) ** 2`); image sequences have `1 + P` tokens."""
        return (self.image_size // self.patch_stride) ** 2

    @classmethod
    def from_preset(cls, name: str, image_size: int | None = None, **kwargs: Any) -> XVLMConfig:
        """Build a named configuration.

        Args:
            name: `"base"` (Swin-B + BERT-base 6+6, the official X-VLM-base) or `"tiny"` (a few hundred thousand
                parameters, for tests and the CPU demo).
            image_size: input size; for `"base"` 224, 384 (default) or 480, with the official window (size / 32).
            kwargs: any other `XVLMConfig` field, e.g. `text_config={"vocab_size": 1000}` (merged into the preset).
        """
        if name == "base":
            vision = dict(XVLM_BASE_VISION)
            text: dict[str, Any] = {"bos_token_id": 101, "eos_token_id": 102}  # bert-base-uncased [CLS] / [SEP]
            projection_dim = 256
        elif name == "tiny":
            vision = {**XVLM_BASE_VISION, **XVLM_TINY_VISION}
            text = dict(XVLM_TINY_TEXT)
            projection_dim = 16
        else:
            raise ValueError(f"Unknown X-VLM preset {name!r}; choose 'base' or 'tiny'.")
        if image_size is not None:
            vision["image_size"] = int(image_size)
            if name == "base":
                vision["window_size"] = int(image_size) // 32
        vision.update(kwargs.pop("vision_config", None) or {})
        text.update(kwargs.pop("text_config", None) or {})
        kwargs.setdefault("projection_dim", projection_dim)
        return cls(vision_config=vision, text_config=text, **kwargs)


__all__ = ["XVLMConfig", "XVLMTextConfig"]
