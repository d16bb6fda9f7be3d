"""Converting official X-VLM checkpoints (zengyan-97/X-VLM `.th` / `.pth`) into Hugging Face folders.

Pipeline (`convert_checkpoint`):

1. `load_official_checkpoint` reads the file with `torch.load(weights_only=True)` (refuses anything else).
2. `build_config` infers the architecture from the weights (`infer.py`), applies an official task YAML when given
   (`official_config.py`) and the requested image size / window, and returns an `XVLMConfig`.
3. `convert_state_dict` maps every official key to the in-memory names of the target head class, splits Swin's fused
   `qkv`, resizes relative-position tables when the window changes (`relative_position.py`) and lists every key it
   drops with the reason. Any key it cannot place raises `ConversionError` naming the keys.
4. `load_into_model` checks the result against the model's own state dict (missing, unexpected and mis-shaped keys
   are errors) and loads it. This also works on the meta device, for shape-only checks of base-size checkpoints.
5. The folder gets `config.json` + `model.safetensors` (`save_pretrained`), the processor files when a tokenizer
   folder is given, and a model card; it is then re-read with `from_pretrained` and compared tensor by tensor.

Key mapping (official key after the prefix -> in-memory name; `P` = `text_encoder.bert.` for pre-training and
`text_encoder.` for fine-tuned checkpoints):

| official | converted |
|---|---|
| `vision_encoder.patch_embed.proj.*` | `xvlm.vision_model.embeddings.patch_embeddings.projection.*` |
| `vision_encoder.patch_embed.norm.*` | `xvlm.vision_model.embeddings.norm.*` |
| `vision_encoder.layers.i.blocks.j.norm1.*` / `norm2.*` | `...encoder.layers.i.blocks.j.layernorm_before.*` / `layernorm_after.*` |
| `...attn.qkv.{weight,bias}` (rows q, k, v) | `...attention.{q,k,v}_proj.{weight,bias}` |
| `...attn.proj.*` | `...attention.o_proj.*` |
| `...attn.relative_position_bias_table` | `...attention.relative_position_bias.relative_position_bias_table` (resized if the window changes) |
| `...mlp.fc1.*`, `...mlp.fc2.*` | same names |
| `vision_encoder.layers.i.downsample.{reduction,norm}.*` | `...encoder.layers.i.downsample.{reduction,norm}.*` |
| `vision_encoder.norm.*` | `xvlm.vision_model.layernorm.*` |
| `P.embeddings.*`, `P.encoder.layer.*` | `xvlm.text_model.embeddings.*`, `xvlm.text_model.encoder.layer.*` |
| `vision_proj.*`, `text_proj.*`, `temp` | `xvlm.vision_proj.*`, `xvlm.text_proj.*`, `xvlm.temp` |
| `itm_head.{0,1,3}.*`, `bbox_head.{0,1,3}.*` | same names on the head model |
| `text_encoder.cls.predictions.transform.*` | `mlm_head.transform.*` |
| `text_encoder.cls.predictions.bias` | `mlm_head.decoder.bias` |

Dropped on purpose: `relative_position_index` and `attn_mask` buffers (recomputed from the window),
`embeddings.position_ids` (a non-persistent buffer here), `cls.predictions.decoder.weight` (tied to the word
embeddings; checked equal) and `cls.predictions.decoder.bias` (alias of `cls.predictions.bias`; checked equal), and
the heads the requested task does not have (e.g. the MLM and box heads of a pre-training checkpoint converted for
retrieval: the official fine-tuning loader ignores them the same way).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import modeling_xvlm

from .infer import ArchitectureInference, infer_architecture, text_prefix
from .official_config import OfficialConfig, parse_official_config, read_official_config
from .relative_position import interpolate_relative_position_bias_table, window_from_table
from .safe_load import load_official_checkpoint, split_checkpoint

__all__ = [
    "ConversionError",
    "ConversionResult",
    "HEAD_CLASS_NAMES",
    "TASKS",
    "build_config",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_task",
    "head_class",
    "load_into_model",
    "write_model_card",
]

TASKS = ("pretrain", "retrieval", "grounding")
HEAD_CLASS_NAMES = {
    "pretrain": "XVLMForPretraining",
    "retrieval": "XVLMForRetrieval",
    "grounding": "XVLMForGrounding",
}
# Official heads each task's model has (the official model classes: model_pretrain / model_retrieval / model_bbox).
TASK_HEADS = {
    "pretrain": {"proj", "itm", "bbox", "mlm"},
    "retrieval": {"proj", "itm"},
    "grounding": {"bbox"},
}
PIPELINE_TAGS = {
    "pretrain": "zero-shot-image-classification",
    "retrieval": "zero-shot-image-classification",
    "grounding": "zero-shot-object-detection",
}

BASE = "xvlm."
VISION_TARGET = BASE + "vision_model."
TEXT_TARGET = BASE + "text_model."
MLM_TARGET = "mlm_head."


class ConversionError(ValueError):
    """A checkpoint that cannot be converted 1:1 (unknown, missing or mis-shaped keys, unsupported architecture)."""


@dataclass
class ConversionResult:
    """Everything a conversion produced and decided."""

    state_dict: dict[str, torch.Tensor]
    config: Any  # XVLMConfig
    task: str
    mapping: dict[str, list[str]] = field(default_factory=dict)  # official key -> converted key(s)
    dropped: dict[str, str] = field(default_factory=dict)  # official key -> reason
    interpolated: dict[str, tuple[int, int]] = field(default_factory=dict)  # official key -> (window from, to)
    inference: ArchitectureInference | None = None
    source: str | None = None
    source_sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"task: {self.task} -> {HEAD_CLASS_NAMES[self.task]}",
            f"official keys: {len(self.mapping) + len(self.dropped)} (mapped {len(self.mapping)}, "
            f"dropped {len(self.dropped)}); converted tensors: {len(self.state_dict)}",
        ]
        reasons: dict[str, list[str]] = {}
        for key, reason in self.dropped.items():
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            lines.append(f"dropped {len(keys)} x {reason}: e.g. {keys[0]}")
        if self.interpolated:
            (src, dst) = next(iter(self.interpolated.values()))
            lines.append(f"relative position tables resized window {src} -> {dst}: {len(self.interpolated)} tables")
        lines.extend(self.notes)
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Task detection and key mapping
# ----------------------------------------------------------------------------------------------------------------


def detect_task(state_dict: Mapping[str, Any]) -> str:
    """Guess the official model class of a state dict: pre-training (has `text_encoder.bert.` / the MLM head),
    grounding (box head without ITM head) or retrieval (ITM head)."""
    keys = list(state_dict)
    if any(k.startswith(("text_encoder.bert.", "text_encoder.cls.")) for k in keys):
        return "pretrain"
    has_itm = any(k.startswith("itm_head.") for k in keys)
    has_bbox = any(k.startswith("bbox_head.") for k in keys)
    if has_bbox and not has_itm:
        return "grounding"
    if has_itm:
        return "retrieval"
    raise ConversionError(
        "Cannot tell which official model this checkpoint comes from (no itm_head, bbox_head or MLM head): pass "
        "--task explicitly."
    )


_VISION_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embeddings.projection.\1"),
    (re.compile(r"^patch_embed\.norm\.(weight|bias)$"), r"embeddings.norm.\1"),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.blocks.\2.layernorm_before.\3"),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.blocks.\2.layernorm_after.\3"),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.blocks.\2.attention.o_proj.\3"),
    (
        re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$"),
        r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table",
    ),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.blocks.\2.mlp.\3.\4"),
    (re.compile(r"^layers\.(\d+)\.downsample\.reduction\.weight$"), r"encoder.layers.\1.downsample.reduction.weight"),
    (re.compile(r"^layers\.(\d+)\.downsample\.norm\.(weight|bias)$"), r"encoder.layers.\1.downsample.norm.\2"),
    (re.compile(r"^norm\.(weight|bias)$"), r"layernorm.\1"),
]
_QKV = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_VISION_BUFFERS = re.compile(r"^layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)$")
_TEXT_LAYER = re.compile(
    r"^encoder\.layer\.\d+\.(attention|crossattention)\.(self\.(query|key|value)|output\.(dense|LayerNorm))\.(weight|bias)$"
    r"|^encoder\.layer\.\d+\.(intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias)$"
)
_TEXT_EMBEDDINGS = re.compile(
    r"^embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\.(weight|bias)$"
)
_HEAD = re.compile(r"^(itm_head|bbox_head)\.(0|1|3)\.(weight|bias)$")
_PROJ = re.compile(r"^(vision_proj|text_proj)\.(weight|bias)$")

REASON_BUFFER = "Swin buffer (relative_position_index / attn_mask), recomputed from the window size"
REASON_POSITION_IDS = "position_ids buffer (arange), non-persistent in the converted model"
REASON_TIED_DECODER = "MLM decoder weight: tied alias of the word embeddings (checked equal)"
REASON_TIED_BIAS = "MLM decoder bias: alias of cls.predictions.bias (checked equal)"


def _reason_unused(head: str, task: str) -> str:
    return f"{head} not part of the {task} model (the official fine-tuning loader ignores it as well)"


def _split_qkv(tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = tensor.shape[0]
    if rows % 3:
        raise ConversionError(f"{key} has {rows} rows, not a multiple of 3 (fused q, k, v).")
    width = rows // 3
    if tensor.dim() == 2 and tensor.shape[1] != width:
        raise ConversionError(f"{key} has shape {tuple(tensor.shape)}; a fused qkv weight is [3C, C].")
    parts = (tensor[:width], tensor[width : 2 * width], tensor[2 * width :])
    if tensor.device.type == "meta":
        return parts
    return tuple(part.clone() for part in parts)  # independent storage (safetensors refuses shared slices)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "meta" or b.device.type == "meta":
        return tuple(a.shape) == tuple(b.shape)
    return tuple(a.shape) == tuple(b.shape) and bool(torch.equal(a, b))


def convert_state_dict(
    official: Mapping[str, torch.Tensor],
    task: str,
    target_window: int | None = None,
) -> ConversionResult:
    """Map an official state dict to the in-memory names of the `task` head model.

    Args:
        official: the official state dict (`checkpoint['model']`).
        task: `"pretrain"`, `"retrieval"` or `"grounding"`.
        target_window: Swin window of the converted model; tables of another size are resized with the official
            algorithm. `None` keeps every table as it is.

    Returns:
        a `ConversionResult` whose `config` is still `None` (see `build_config`).

    Raises:
        ConversionError: keys that are neither mapped nor deliberately dropped (all named), a missing official head
            the task needs, or tied MLM tensors that are not equal.
    """
    if task not in TASKS:
        raise ConversionError(f"Unknown task {task!r}; choose one of {TASKS}.")
    heads = TASK_HEADS[task]
    tprefix = text_prefix(official)
    is_pretrain_source = tprefix == "text_encoder.bert."
    result = ConversionResult(state_dict={}, config=None, task=task)
    unknown: list[str] = []

    def put(source: str, target: str, tensor: torch.Tensor) -> None:
        if target in result.state_dict:
            raise ConversionError(f"Two official keys map to {target!r} (the second is {source!r}).")
        result.state_dict[target] = tensor
        result.mapping.setdefault(source, []).append(target)

    word_key = tprefix + "embeddings.word_embeddings.weight"
    for key, tensor in official.items():
        if key.startswith("vision_encoder."):
            rest = key[len("vision_encoder.") :]
            if _VISION_BUFFERS.match(rest):
                result.dropped[key] = REASON_BUFFER
                continue
            match = _QKV.match(rest)
            if match:
                stage, block, kind = match.groups()
                base = f"{VISION_TARGET}encoder.layers.{stage}.blocks.{block}.attention."
                for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(tensor, key)):
                    put(key, f"{base}{name}.{kind}", part)
                continue
            for pattern, replacement in _VISION_RULES:
                if pattern.match(rest):
                    target = VISION_TARGET + pattern.sub(replacement, rest)
                    if rest.endswith("relative_position_bias_table") and target_window is not None:
                        source_window = window_from_table(tensor.shape[0])
                        if source_window != target_window:
                            tensor = interpolate_relative_position_bias_table(tensor, target_window)
                            result.interpolated[key] = (source_window, target_window)
                    put(key, target, tensor)
                    break
            else:
                unknown.append(key)
        elif key.startswith(tprefix) and not key.startswith("text_encoder.cls."):
            rest = key[len(tprefix) :]
            if rest == "embeddings.position_ids":
                result.dropped[key] = REASON_POSITION_IDS
            elif _TEXT_EMBEDDINGS.match(rest) or _TEXT_LAYER.match(rest):
                put(key, TEXT_TARGET + rest, tensor)
            else:
                unknown.append(key)
        elif key.startswith("text_encoder.cls.") and is_pretrain_source:
            rest = key[len("text_encoder.cls.") :]
            known = rest in ("predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias") or (
                re.match(r"^predictions\.transform\.(dense|LayerNorm)\.(weight|bias)$", rest) is not None
            )
            if not known:
                unknown.append(key)
            elif "mlm" not in heads:
                result.dropped[key] = _reason_unused("MLM head (text_encoder.cls)", task)
            elif rest == "predictions.decoder.weight":
                if word_key not in official or not _equal(tensor, official[word_key]):
                    raise ConversionError(
                        f"{key} is not equal to {word_key}: the official MLM decoder is tied to the word embeddings, "
                        "so this checkpoint is not an official X-VLM pre-training checkpoint."
                    )
                result.dropped[key] = REASON_TIED_DECODER
            elif rest == "predictions.decoder.bias":
                bias_key = "text_encoder.cls.predictions.bias"
                if bias_key not in official or not _equal(tensor, official[bias_key]):
                    raise ConversionError(f"{key} is not equal to {bias_key} (they are the same tensor officially).")
                result.dropped[key] = REASON_TIED_BIAS
            elif rest == "predictions.bias":
                put(key, MLM_TARGET + "decoder.bias", tensor)
            else:
                put(key, MLM_TARGET + rest[len("predictions.") :], tensor)
        elif _PROJ.match(key) or key == "temp":
            if "proj" in heads:
                put(key, BASE + key, tensor)
            else:
                result.dropped[key] = _reason_unused("ITC projection / temperature", task)
        elif _HEAD.match(key):
            head = "itm" if key.startswith("itm_head.") else "bbox"
            if head in heads:
                put(key, key, tensor)
            else:
                result.dropped[key] = _reason_unused(f"{head}_head", task)
        else:
            unknown.append(key)

    if unknown:
        raise ConversionError(
            f"{len(unknown)} official key(s) are neither mapped nor known to be safe to drop: {sorted(unknown)}. "
            "Supported checkpoints: official X-VLM (Swin) pre-training, retrieval and box-grounding models."
        )
    needed = {
        "proj": ["vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"],
        "itm": [f"itm_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")],
        "bbox": [f"bbox_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")],
        "mlm": ["text_encoder.cls.predictions.bias"]
        + [f"text_encoder.cls.predictions.transform.{m}.{p}" for m in ("dense", "LayerNorm") for p in ("weight", "bias")],
    }
    missing = [k for head in sorted(heads) for k in needed[head] if k not in official]
    if missing:
        raise ConversionError(
            f"The {task} model needs official keys this checkpoint does not have: {missing}. Convert it with the "
            f"task it was trained for (detected: {_safe_detect(official)})."
        )
    return result


def _safe_detect(state_dict: Mapping[str, Any]) -> str:
    try:
        return detect_task(state_dict)
    except ConversionError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

INFERABLE_VISION = ("patch_size", "num_channels", "embed_dim", "depths", "num_heads", "mlp_ratio", "qkv_bias")
INFERABLE_TEXT = (
    "vocab_size",
    "hidden_size",
    "max_position_embeddings",
    "type_vocab_size",
    "num_hidden_layers",
    "fusion_layer",
    "intermediate_size",
)


def _official_from_checkpoint(embedded: Mapping[str, Any] | None, checkpoint_path: str | None) -> OfficialConfig | None:
    """Use the task config a checkpoint carries (`checkpoint['config']`), resolving its JSON paths relative to the
    checkpoint's folder or the working directory; JSON files that cannot be found are skipped."""
    if not embedded:
        return None
    anchor = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "config.yaml") if checkpoint_path else None
    partial = {k: v for k, v in embedded.items() if k not in ("vision_config", "text_config")}
    try:
        config = parse_official_config(partial, anchor)
    except NotImplementedError as error:
        raise ConversionError(str(error)) from None
    except (ValueError, TypeError):
        return None
    for part in ("vision_config", "text_config"):
        if embedded.get(part):
            try:
                extra = parse_official_config({part: embedded[part]}, anchor)
            except (FileNotFoundError, ValueError, TypeError):
                continue
            config.vision.update(extra.vision)
            config.text.update(extra.text)
            config.sources.update(extra.sources)
    return config


def build_config(
    state_dict: Mapping[str, torch.Tensor],
    official: OfficialConfig | None = None,
    image_size: int | None = None,
    window_size: int | None = None,
    embedded: OfficialConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, ArchitectureInference]:
    """Build the `XVLMConfig` of the converted model.

    Precedence: explicit `image_size` / `window_size` > the official config (`--config`) > the weights > the
    config stored in the checkpoint > X-VLM-base defaults. Values the weights determine must agree with the
    official config (else `ConversionError`). The target window, unless given, is the config's; otherwise, when the
    image size changes and the source followed the official convention (final feature map = one window, 7 at 224),
    the new final feature-map size (12 at 384, 15 at 480); otherwise the source window.
    """
    from ..configuration_xvlm import XVLMConfig

    inference = infer_architecture(state_dict)
    vision, text, top = dict(inference.vision), dict(inference.text), dict(inference.top)
    source_window = vision["window_size"]
    source_image = vision["image_size"]
    patch = vision["patch_size"]
    stride = patch * 2 ** (len(vision["depths"]) - 1)

    if embedded is not None:
        for part, values in (("vision", embedded.vision), ("text", embedded.text), ("top", embedded.top)):
            target = {"vision": vision, "text": text, "top": top}[part]
            for name, value in values.items():
                how = inference.provenance.get(f"{part}.{name}", "")
                if name == "window_size" or how.startswith("inferred"):
                    continue
                target[name] = value
                inference.provenance[f"{part}.{name}"] = "from the config stored in the checkpoint"
        if "image_size" in embedded.vision and not inference.image_size_known:
            source_image = vision["image_size"]

    config_window = None
    if official is not None:
        for part, values, inferable in (
            ("vision", official.vision, INFERABLE_VISION),
            ("text", official.text, INFERABLE_TEXT),
        ):
            target = vision if part == "vision" else text
            for name, value in values.items():
                if name in inferable and target.get(name) != value:
                    raise ConversionError(
                        f"The official config sets {part}.{name} = {value!r} but the checkpoint weights have "
                        f"{target.get(name)!r}: the config does not describe this checkpoint."
                    )
                if name == "window_size":
                    config_window = int(value)
                    continue
                if name == "image_size":
                    continue
                target[name] = value
                inference.provenance[f"{part}.{name}"] = "from --config"
        for name, value in official.top.items():
            if name == "projection_dim" and inference.provenance["top.projection_dim"].startswith("inferred"):
                if value != top[name]:
                    raise ConversionError(
                        f"The official config sets embed_dim = {value} but the projections have {top[name]} outputs."
                    )
                continue
            top[name] = value
            inference.provenance[f"top.{name}"] = "from --config"

    target_image = image_size
    if target_image is None and official is not None and "image_size" in official.vision:
        target_image = int(official.vision["image_size"])
    if target_image is None:
        target_image = source_image
    target_image = int(target_image)

    if window_size is not None:
        target_window = int(window_size)
    elif config_window is not None:
        target_window = config_window
    elif target_image != source_image and source_window * stride == source_image:
        target_window = target_image // stride
    else:
        target_window = source_window

    # A stage whose resolution is below the window uses window = resolution (official Swin; the model does the
    # same, see `shrink_swin_windows`); other stages need resolution % window == 0 (official assert).
    for stage in range(len(vision["depths"])):
        resolution = target_image // patch // 2**stage
        if resolution >= target_window and resolution % target_window:
            raise ConversionError(
                f"Swin stage {stage} resolution {resolution} is not a multiple of the window {target_window} "
                f"(image size {target_image}); the official Swin requires it."
            )
    resizing = target_image != source_image or target_window != source_window
    for stage, table_window in enumerate(inference.stage_windows):
        if resizing and table_window != source_window:
            raise ConversionError(
                f"Swin stage {stage} of the checkpoint uses a shrunk window {table_window} (its resolution is below "
                f"the window {source_window}); the official loader cannot resize such a table to a new window "
                "either. Convert it at its own image size and window."
            )

    vision["image_size"] = target_image
    vision["window_size"] = target_window
    inference.provenance["vision.window_size"] += f"; target window {target_window}"
    if target_image != source_image:
        inference.provenance["vision.image_size"] += f"; converted for {target_image}"
    config = XVLMConfig(
        vision_config=dict(vision, model_type="swin"),
        text_config={k: v for k, v in text.items() if k != "encoder_width"},  # XVLMConfig sets it
        projection_dim=int(top["projection_dim"]),
        temperature_init=float(top["temperature_init"]),
    )
    inference.vision, inference.text, inference.top = vision, text, top
    if log is not None:
        log("Architecture (value [where it came from]):\n" + inference.describe())
    inference.source_image, inference.source_window = source_image, source_window
    return config, inference


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def head_class(task: str) -> type:
    """The model class of a task (`XVLMForPretraining`, `XVLMForRetrieval` or `XVLMForGrounding`)."""
    name = HEAD_CLASS_NAMES[task]
    cls = getattr(modeling_xvlm, name, None)
    if cls is None:
        raise ConversionError(f"modeling_xvlm has no {name}: the {task} head model is not available.")
    return cls


def _expected_keys(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(persistent state-dict entries of `model` without tied aliases -> shape, the tied aliases)."""
    state = model.state_dict()
    unique_params = {name for name, _ in model.named_parameters()}
    all_params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    aliases = all_params - unique_params
    expected = {k: tuple(v.shape) for k, v in state.items() if k not in aliases}
    return expected, aliases


def load_into_model(result: ConversionResult, model: torch.nn.Module) -> None:
    """Check `result.state_dict` against `model` exactly and load it (`assign=True` on the meta device).

    Raises:
        ConversionError: converted keys the model does not have (named with their official source keys), model
            weights no official key provides, or shape mismatches.
    """
    expected, aliases = _expected_keys(model)
    converted = result.state_dict
    source_of = {t: s for s, targets in result.mapping.items() for t in targets}
    unexpected = sorted(set(converted) - set(expected))
    missing = sorted(set(expected) - set(converted))
    mismatched = sorted(
        f"{k} (official {source_of.get(k)}): {tuple(converted[k].shape)} vs model {expected[k]}"
        for k in set(converted) & set(expected)
        if tuple(converted[k].shape) != expected[k]
    )
    problems = []
    if unexpected:
        problems.append(
            f"converted keys the {type(model).__name__} does not have: "
            + ", ".join(f"{k} (from {source_of.get(k)})" for k in unexpected)
        )
    if missing:
        problems.append(f"model weights no official key provides: {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise ConversionError("Strict key accounting failed:\n  " + "\n  ".join(problems))
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if on_meta:
        return  # shapes and names are all a meta model can check
    with torch.no_grad():
        outcome = model.load_state_dict(converted, strict=False)
    left = set(outcome.missing_keys) - aliases
    if left or outcome.unexpected_keys:
        raise ConversionError(f"load_state_dict disagreed: missing {sorted(left)}, unexpected {outcome.unexpected_keys}")


# ----------------------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_model_card(output_dir: str | os.PathLike, result: ConversionResult, base_model: str | None = None) -> Any:
    """Write `README.md` with YAML front matter (library, pipeline tag, base model, source file) and notes."""
    from huggingface_hub import ModelCard, ModelCardData

    config = result.config
    vision = config.vision_config
    text = config.text_config
    source_name = os.path.basename(result.source) if result.source else "an official X-VLM state dict"
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[result.task],
        license="bsd-3-clause",
        tags=["xvlm", "x-vlm", "vision-language", result.task, "converted"],
        base_model=base_model,
        original_checkpoint=source_name,
        original_checkpoint_sha256=result.source_sha256,
        original_repository="https://github.com/zengyan-97/X-VLM",
    )
    dropped: dict[str, int] = {}
    for reason in result.dropped.values():
        dropped[reason] = dropped.get(reason, 0) + 1
    interpolation = (
        "The Swin relative position bias tables were resized from window "
        f"{next(iter(result.interpolated.values()))[0]} to {vision.window_size} with the official algorithm "
        "(geometric source grid, bicubic not-a-knot spline), as the official fine-tuning loader does."
        if result.interpolated
        else "No relative position table was resized (same window as the checkpoint)."
    )
    content = f"""---
{data.to_yaml()}
---

# X-VLM ({result.task}) converted from `{source_name}`

[X-VLM](https://arxiv.org/abs/2111.08276) (multi-grained vision-language pre-training) converted 1:1 from the
official checkpoint `{source_name}` (sha256 `{result.source_sha256 or "n/a"}`) of
[zengyan-97/X-VLM](https://github.com/zengyan-97/X-VLM) with `xvlm-convert --task {result.task}`.

- Model class: `{HEAD_CLASS_NAMES[result.task]}` (package `modeling_xvlm`).
- Vision: Swin, image size {config.image_size}, embed {vision.embed_dim}, depths {list(vision.depths)}, heads {list(vision.num_heads)}, window {vision.window_size}.
- Text: {text.num_hidden_layers} layers ({text.fusion_layer} text + {text.num_hidden_layers - text.fusion_layer} fusion), width {text.hidden_size}, {text.num_attention_heads} heads; projection {config.projection_dim}.
- {interpolation}
- Official keys: {len(result.mapping)} mapped, {len(result.dropped)} dropped on purpose:
{chr(10).join(f"  - {n} x {reason}" for reason, n in dropped.items()) or "  - none"}

Inputs follow the official preprocessing: square bicubic resize to {config.image_size}, CLIP mean/std, texts
`[CLS] tokens` without `[SEP]` (use `XVLMProcessor`).

With the same weights and inputs the converted model reproduces the official model in fp32 to within 1e-5
(see `docs/conversion.md` of the package for the parity contract and how it is tested).
"""
    card = ModelCard(content)
    card.save(os.path.join(output_dir, "README.md"))
    return card


def _save_processor(output_dir: str, tokenizer_dir: str, config: Any) -> Any:
    from transformers import BertTokenizer

    from ..processing import XVLMImageProcessorPil, XVLMProcessor

    vocab = Path(tokenizer_dir)
    if not vocab.is_dir() or not ((vocab / "vocab.txt").is_file() or (vocab / "tokenizer.json").is_file()):
        raise ConversionError(f"--tokenizer {tokenizer_dir!r} must be a folder with a BERT vocab.txt (or tokenizer.json).")
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
    image_processor = XVLMImageProcessorPil(
        size={"height": config.image_size, "width": config.image_size}, patch_size=config.patch_stride
    )
    processor = XVLMProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(output_dir)
    return processor


def _verify_saved(output_dir: str, model: torch.nn.Module, task: str) -> None:
    cls = head_class(task)
    reloaded = cls.from_pretrained(output_dir)
    ours = model.state_dict()
    theirs = reloaded.state_dict()
    if set(ours) != set(theirs):
        raise ConversionError(
            f"Reloading {output_dir} changed the key set: {sorted(set(ours) ^ set(theirs))[:20]}"
        )
    for key, value in ours.items():
        other = theirs[key]
        if value.shape != other.shape or not torch.equal(value, other):
            diff = (value.float() - other.float()).abs().max().item() if value.shape == other.shape else float("inf")
            raise ConversionError(f"Reloaded tensor {key} differs from the converted one (max abs diff {diff}).")


def convert_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    task: str | None = None,
    image_size: int | None = None,
    window_size: int | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
    base_model: str | None = None,
    verify: bool = True,
    log: Callable[[str], None] | None = print,
) -> tuple[torch.nn.Module, ConversionResult]:
    """Convert an official X-VLM checkpoint into a Hugging Face model (and folder).

    Args:
        checkpoint: path of an official `.th` / `.pth` (or `.safetensors`) file, or an already loaded checkpoint
            dict (`{'model': state_dict, ...}` or a state dict).
        output_dir: folder to write (`config.json`, `model.safetensors`, `README.md`, processor files); `None`
            only builds and returns the model.
        task: `"pretrain"`, `"retrieval"` or `"grounding"`; `None` detects it from the keys.
        image_size: input size of the converted model (e.g. 384 for a 224 pre-training checkpoint fine-tuned at
            384); default: the checkpoint's.
        window_size: Swin window of the converted model (default: see `build_config`).
        config: an official task YAML (its `vision_config` / `text_config` JSONs are read too).
        tokenizer: a folder with a BERT `vocab.txt`; writes an `XVLMProcessor`.
        push_to_hub: a Hub repo id; the model, processor and card are pushed with `push_to_hub`.
        base_model: Hub id written as `base_model` in the model card.
        verify: re-read the written folder with `from_pretrained` and compare every tensor.
        log: where progress messages go (`None`: silent).

    Returns:
        `(model, result)`.
    """
    say = log or (lambda message: None)
    source = None
    sha = None
    if isinstance(checkpoint, Mapping):
        loaded = checkpoint
    else:
        source = os.fspath(checkpoint)
        loaded = load_official_checkpoint(source)
        sha = _sha256(source)
    state_dict, embedded_raw = split_checkpoint(loaded)
    if task is None:
        task = detect_task(state_dict)
        say(f"Detected task: {task}")
    official = None
    if config is not None:
        try:
            official = read_official_config(config)
        except NotImplementedError as error:
            raise ConversionError(str(error)) from None
    embedded = _official_from_checkpoint(embedded_raw, source) if official is None else None
    model_config, inference = build_config(
        state_dict, official, image_size=image_size, window_size=window_size, embedded=embedded, log=say
    )
    target_window = model_config.vision_config.window_size
    if target_window == inference.source_window and model_config.image_size == inference.source_image:
        target_window = None  # same geometry: every table (shrunk stages included) keeps its size
    result = convert_state_dict(state_dict, task, target_window=target_window)
    result.config = model_config
    result.inference = inference
    result.source = source
    result.source_sha256 = sha
    if task != _safe_detect(state_dict):
        result.notes.append(f"converted a {_safe_detect(state_dict)} checkpoint for the {task} task")

    cls = head_class(task)
    model = cls(model_config)
    load_into_model(result, model)
    model.eval()
    say(result.summary())

    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        processor = _save_processor(output_dir, os.fspath(tokenizer), model_config) if tokenizer else None
        card = write_model_card(output_dir, result, base_model=base_model)
        if verify:
            _verify_saved(output_dir, model, task)
            say(f"Verified: {output_dir} reloads with from_pretrained and every tensor is identical.")
        say(f"Wrote {output_dir}")
        if push_to_hub:
            model.push_to_hub(push_to_hub)
            if processor is not None:
                processor.push_to_hub(push_to_hub)
            card.push_to_hub(push_to_hub)
            say(f"Pushed to https://huggingface.co/{push_to_hub}")
    elif push_to_hub:
        raise ConversionError("push_to_hub needs an output_dir to write the folder first.")
    return model, result
