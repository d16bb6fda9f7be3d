"""Inferring the X-VLM architecture from an official state dict (shapes only, so meta tensors work).

What the weights determine:

- Swin: patch size and embed width (`patch_embed.proj.weight` `[C, 3, p, p]`), depths (block counts per stage),
  heads per stage and the window (relative-position tables `[(2w-1)^2, heads]`), MLP ratio (`mlp.fc1`), qkv bias,
  and the image size when a shifted-window mask buffer (`attn_mask` `[nW, w^2, w^2]`) or a stage whose window was
  shrunk to its resolution is present.
- Text: vocabulary, width, positions and token types (embedding tables), layer count, fusion split (the first
  layer with `crossattention`), intermediate size, cross-attention key/value width, and the NLVR2 stack (tied
  key/value pairs of fusion layers) of checkpoints with an NLVR2 (`cls_head`) or TA (`ta_head`) head.
- The projection size (`vision_proj` / `text_proj`).
- VQA: the answer decoder's layer count (`text_decoder.bert.encoder.layer.*`, every layer with cross-attention
  reading the text width), as `top.num_decoder_layers`.
- Captioning (`text_decoder.*` without `text_encoder.*`): the caption decoder *is* the text stack
  (`text_decoder.bert.*`, cross-attention from `fusion_layer` on, reading the vision width), so the text fields
  are read from it exactly as from a pre-training checkpoint's `text_encoder.bert.*`.

What they cannot determine, and falls back to X-VLM-base unless an official config says otherwise: the number of
text attention heads (head size 64, as BERT-base: 12 heads at 768), activation (`gelu`), LayerNorm epsilons
(1e-12 text, 1e-5 vision), dropouts, `drop_path_rate` 0.1, the temperature init 0.07, and the image size when no
buffer reveals it (then the final feature map is assumed to be one window, the official convention: 224 for w7).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling_xvlm.configuration_xvlm import XVLM_BASE_VISION
from .relative_position import window_from_table

__all__ = ["ArchitectureInference", "infer_architecture", "is_captioning", "text_prefix"]

VISION = "vision_encoder."
DECODER = "text_decoder.bert."
_BLOCK = re.compile(r"^vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
_STAGE = re.compile(r"^vision_encoder\.layers\.(\d+)\.")

BASE_TEXT_HEAD_DIM = 64
#: X-VLM-base's Swin fields that the weights do not determine (the architecture ones are inferred).
DEFAULT_VISION: dict[str, Any] = {
    name: value
    for name, value in XVLM_BASE_VISION.items()
    if name not in ("image_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size")
}
DEFAULT_TEXT: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


@dataclass
class ArchitectureInference:
    """The architecture read from a state dict. `provenance[field]` says where each value came from."""

    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    top: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    image_size_known: bool = False
    stage_windows: list[int] = field(default_factory=list)  # table window of every stage (block 0)
    source_image: int | None = None  # image size / window of the checkpoint (set by build_config; `vision`
    source_window: int | None = None  # then holds the converted model's values)

    def set(self, part: str, name: str, value: Any, how: str) -> None:
        getattr(self, part)[name] = value
        self.provenance[f"{part}.{name}"] = how

    def describe(self) -> str:
        lines = []
        for part in ("vision", "text", "top"):
            for name, value in getattr(self, part).items():
                lines.append(f"  {part}.{name} = {value!r}  [{self.provenance.get(f'{part}.{name}', '?')}]")
        return "\n".join(lines)


def is_captioning(state_dict: Mapping[str, Any]) -> bool:
    """Official captioning models (`model_captioning.py`, `model_captioning_pretrain.py`) set the text encoder to
    None: a `text_decoder` and no `text_encoder` key at all."""
    keys = list(state_dict)
    return any(k.startswith("text_decoder.") for k in keys) and not any(k.startswith("text_encoder.") for k in keys)


def text_prefix(state_dict: Mapping[str, Any]) -> str:
    """The text stack's key prefix: `text_encoder.bert.` for pre-training checkpoints (BertForMaskedLM),
    `text_decoder.bert.` for captioning checkpoints (the stack is the caption decoder), else `text_encoder.`."""
    if any(k.startswith("text_encoder.bert.") for k in state_dict):
        return "text_encoder.bert."
    if is_captioning(state_dict):
        return DECODER
    return "text_encoder."


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise KeyError(f"The checkpoint has no {key!r}, which the architecture inference needs.")
    return tuple(state_dict[key].shape)


def _infer_vision(sd: Mapping[str, torch.Tensor], result: ArchitectureInference) -> None:
    embed_dim, channels, patch, patch_w = _shape(sd, VISION + "patch_embed.proj.weight")
    if patch != patch_w:
        raise ValueError(f"Non-square Swin patches ({patch}x{patch_w}) are not supported.")
    result.set("vision", "patch_size", int(patch), "inferred from patch_embed.proj.weight")
    result.set("vision", "num_channels", int(channels), "inferred from patch_embed.proj.weight")
    result.set("vision", "embed_dim", int(embed_dim), "inferred from patch_embed.proj.weight")

    blocks: dict[int, set[int]] = {}
    for key in sd:
        match = _BLOCK.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not blocks:
        raise ValueError("The checkpoint has no vision_encoder.layers.*.blocks.* keys (not a Swin X-VLM checkpoint).")
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise ValueError(f"Swin stage indices are not contiguous: {stages}.")
    depths = []
    for stage in stages:
        indices = sorted(blocks[stage])
        if indices != list(range(len(indices))):
            raise ValueError(f"Swin stage {stage} has non-contiguous block indices {indices}.")
        depths.append(len(indices))
    result.set("vision", "depths", depths, "inferred (blocks per stage)")

    heads, windows = [], []
    for stage in stages:
        rows, n_heads = _shape(sd, f"{VISION}layers.{stage}.blocks.0.attn.relative_position_bias_table")
        heads.append(int(n_heads))
        windows.append(window_from_table(rows))
        for block in range(depths[stage]):
            other = _shape(sd, f"{VISION}layers.{stage}.blocks.{block}.attn.relative_position_bias_table")
            if other != (rows, n_heads):
                raise ValueError(
                    f"Swin stage {stage}: block {block} has a relative position table of shape {other}, block 0 has "
                    f"{(rows, n_heads)}."
                )
    result.set("vision", "num_heads", heads, "inferred from relative_position_bias_table widths")
    window = windows[0]
    result.stage_windows = windows
    result.set("vision", "window_size", window, "inferred from relative_position_bias_table rows ((2w-1)^2)")

    fc1_out, fc1_in = _shape(sd, f"{VISION}layers.0.blocks.0.mlp.fc1.weight")
    ratio = fc1_out / fc1_in
    result.set("vision", "mlp_ratio", float(ratio), "inferred from mlp.fc1.weight")
    has_bias = f"{VISION}layers.0.blocks.0.attn.qkv.bias" in sd
    result.set("vision", "qkv_bias", has_bias, "inferred (attn.qkv.bias present)")
    width = embed_dim * 2 ** (len(stages) - 1)
    norm = _shape(sd, VISION + "norm.weight")
    if norm != (width,):
        raise ValueError(f"vision_encoder.norm.weight has shape {norm}, expected ({width},) for {len(stages)} stages.")

    # Image size: a shifted-window mask [nW, w^2, w^2] of stage i gives res_i = w * sqrt(nW); a stage whose table
    # window is smaller than the window was shrunk to its resolution.
    image_size = None
    how = ""
    for key, tensor in sd.items():
        match = _BLOCK.match(key)
        if match and key.endswith(".attn_mask"):
            stage = int(match.group(1))
            n_windows, area = int(tensor.shape[0]), int(tensor.shape[1])
            per_side = math.isqrt(n_windows)
            stage_window = math.isqrt(area)
            candidate = stage_window * per_side * 2**stage * patch
            how = f"inferred from {key[len(VISION):]} {tuple(tensor.shape)}"
            if image_size is not None and image_size != candidate:
                raise ValueError(f"attn_mask buffers disagree on the image size ({image_size} vs {candidate}).")
            image_size = candidate
    if image_size is None:
        for stage, stage_window in enumerate(windows):
            if stage_window < window:
                image_size = stage_window * 2**stage * patch
                how = f"inferred from the shrunk window {stage_window} of stage {stage}"
                break
    if image_size is not None:
        result.image_size_known = True
        result.set("vision", "image_size", int(image_size), how)
    else:
        stride = patch * 2 ** (len(stages) - 1)
        result.set(
            "vision",
            "image_size",
            int(window * stride),
            "default: not in the weights; assumed final feature map = one window (official: 224 for w7)",
        )
    for name, value in DEFAULT_VISION.items():
        if name not in result.vision:
            result.set("vision", name, value, "default (X-VLM-base)")


def _infer_text(sd: Mapping[str, torch.Tensor], result: ArchitectureInference) -> None:
    prefix = text_prefix(sd)
    vocab, hidden = _shape(sd, prefix + "embeddings.word_embeddings.weight")
    result.set("text", "vocab_size", int(vocab), "inferred from word_embeddings")
    result.set("text", "hidden_size", int(hidden), "inferred from word_embeddings")
    result.set(
        "text",
        "max_position_embeddings",
        int(_shape(sd, prefix + "embeddings.position_embeddings.weight")[0]),
        "inferred from position_embeddings",
    )
    result.set(
        "text",
        "type_vocab_size",
        int(_shape(sd, prefix + "embeddings.token_type_embeddings.weight")[0]),
        "inferred from token_type_embeddings",
    )
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers: set[int] = set()
    cross: set[int] = set()
    for key in sd:
        match = layer_re.match(key)
        if match:
            index = int(match.group(1))
            layers.add(index)
            if key[match.end() :].startswith("crossattention."):
                cross.add(index)
    if not layers:
        raise ValueError(f"The checkpoint has no {prefix}encoder.layer.* keys.")
    count = max(layers) + 1
    if sorted(layers) != list(range(count)):
        raise ValueError(f"Text encoder layer indices are not contiguous: {sorted(layers)}.")
    if not cross:
        raise ValueError("No text layer has crossattention: this is not an X-VLM fusion encoder.")
    fusion = min(cross)
    if sorted(cross) != list(range(fusion, count)):
        raise ValueError(
            f"Cross-attention appears in layers {sorted(cross)}; X-VLM has it in every layer from fusion_layer on."
        )
    result.set("text", "num_hidden_layers", count, "inferred (encoder.layer.* count)")
    result.set("text", "fusion_layer", fusion, "inferred (first layer with crossattention)")
    if any(key.startswith(("cls_head.", "ta_head.")) for key in sd):
        if (count - fusion) % 2:
            raise ValueError(
                f"An NLVR2 checkpoint (cls_head / ta_head) has pairs of fusion layers; this one has {count - fusion}."
            )
        result.set(
            "text",
            "tie_cross_attention_pairs",
            True,
            "inferred (NLVR2 checkpoint: cls_head / ta_head; fusion layer pairs share key/value)",
        )
    result.set(
        "text",
        "intermediate_size",
        int(_shape(sd, f"{prefix}encoder.layer.0.intermediate.dense.weight")[0]),
        "inferred from intermediate.dense",
    )
    encoder_width = _shape(sd, f"{prefix}encoder.layer.{fusion}.crossattention.self.key.weight")[1]
    result.set("text", "encoder_width", int(encoder_width), "inferred from crossattention.self.key")
    head_dim = BASE_TEXT_HEAD_DIM
    while hidden % head_dim:
        head_dim //= 2
    result.set(
        "text",
        "num_attention_heads",
        int(hidden // head_dim),
        f"default: not in the weights; head size {head_dim} (X-VLM-base: 64, i.e. 12 heads at 768) - pass --config "
        "if the checkpoint used another head count",
    )
    for name, value in DEFAULT_TEXT.items():
        result.set("text", name, value, "default (X-VLM-base)")



def _infer_decoder(sd: Mapping[str, torch.Tensor], result: ArchitectureInference) -> None:
    """The VQA answer decoder (official `model_vqa.py`): a copy of the text config with `fusion_layer = 0` (every
    layer cross-attends) and cross-attention key/value reading the text width; sets `top.num_decoder_layers`. A
    captioning checkpoint's `text_decoder` is its text stack (read by `_infer_text`), not a VQA decoder."""
    if is_captioning(sd):
        return
    layer_re = re.compile(re.escape(DECODER) + r"encoder\.layer\.(\d+)\.")
    layers: set[int] = set()
    cross: set[int] = set()
    for key in sd:
        match = layer_re.match(key)
        if match:
            layers.add(int(match.group(1)))
            if key[match.end() :].startswith("crossattention."):
                cross.add(int(match.group(1)))
    if not layers:
        if any(key.startswith("text_decoder.") for key in sd):
            raise ValueError(f"The checkpoint has text_decoder.* keys but no {DECODER}encoder.layer.* keys.")
        return
    count = max(layers) + 1
    if sorted(layers) != list(range(count)) or cross != layers:
        raise ValueError(
            f"The VQA decoder has layers {sorted(layers)} with cross-attention in {sorted(cross)}; the official "
            "decoder has contiguous layers, all with cross-attention."
        )
    width = _shape(sd, f"{DECODER}encoder.layer.0.crossattention.self.key.weight")[1]
    if width != result.text["hidden_size"]:
        raise ValueError(
            f"The VQA decoder's cross-attention key/value read {width} features; the official decoder reads the "
            f"{result.text['hidden_size']}-wide question states."
        )
    result.set("top", "num_decoder_layers", count, "inferred (text_decoder.bert.encoder.layer.* count)")


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> ArchitectureInference:
    """Infer vision, text and top-level config fields from an official X-VLM state dict (keys with the official
    `vision_encoder.` / `text_encoder.[bert.]` prefixes, or `text_decoder.bert.` for captioning; only shapes are
    read)."""
    result = ArchitectureInference()
    _infer_vision(state_dict, result)
    _infer_text(state_dict, result)
    vision_width = result.vision["embed_dim"] * 2 ** (len(result.vision["depths"]) - 1)
    if result.text["encoder_width"] != vision_width:
        raise ValueError(
            f"Cross-attention key/value width {result.text['encoder_width']} differs from the Swin width "
            f"{vision_width}."
        )
    if "vision_proj.weight" in state_dict:
        result.set("top", "projection_dim", int(state_dict["vision_proj.weight"].shape[0]), "inferred from vision_proj")
    elif "text_proj.weight" in state_dict:
        result.set("top", "projection_dim", int(state_dict["text_proj.weight"].shape[0]), "inferred from text_proj")
    else:
        result.set("top", "projection_dim", 256, "default (X-VLM-base; this checkpoint has no projections)")
    result.set("top", "temperature_init", 0.07, "default (X-VLM-base; the learned temp is a weight)")
    _infer_decoder(state_dict, result)
    return result
