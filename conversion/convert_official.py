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
5. The folder gets `config.json` + `model.safetensors` + the flat code files (`save_pretrained`), the processor
   files when a tokenizer folder is given, and a model card (`modeling_xvlm.create_model_card`); it is then re-read
   with `from_pretrained` and compared tensor by tensor.

The tasks (`pretrain`, `retrieval`, `grounding`, `vqa`, `captioning`, `nlvr2`, `nlvr2-pretrain`) and their head
classes come from the package's task table, `modeling_xvlm.tasks.TASKS`; this module only adds which official heads
each task's checkpoint carries (`TASK_HEADS`) and which heads a conversion from another official model builds anew
(`NEW_HEADS`).

NLVR2 (`nlvr2`: official `model_nlvr.py`; `nlvr2-pretrain`: the text-assignment pre-training, `model_nlvr_pretrain.py`)
checkpoints have a text stack of `f` text layers and `2 (L - f)` fusion layers whose pairs `(f + 2k, f + 2k + 1)`
share one cross-attention key/value (official `share_cross_attention`): both names are in the state dict, the
converter checks that they are equal and stores the tensor once under layer `f + 2k` (the converted model ties the
pair, `text_config.tie_cross_attention_pairs`). From a *pre-training* checkpoint, both tasks do what the official
NLVR2 loader does (`load_nlvr_pretrain=False`): pre-trained fusion layer `N` goes to layers `f + 2 (N - f)` and
`f + 2 (N - f) + 1`, and the new head (`cls_head`, resp. `ta_head`) keeps its fresh initialisation
(`ConversionResult.new`). A `nlvr2-pretrain` checkpoint converts for `nlvr2` as with `load_nlvr_pretrain=True`.

VQA (`vqa`: official `model_vqa.py`) checkpoints add an answer decoder (`text_decoder.bert.*`: every layer
cross-attends to the question states, key/value width = the text width; `text_decoder.cls.*`: its LM head, the
decoder weight tied to the decoder's word embeddings, checked and stored once) to the fine-tuned encoder. From a
*pre-training* checkpoint, `vqa` does what the official VQA loader does, through the model's own
`modeling_xvlm_vqa.decoder_init_state`: decoder layer `i` <- fusion layer `f + i`, embeddings and MLM head copied,
the decoder's cross-attention key/value new when the text width differs from the vision width (`ConversionResult.new`).

Captioning (`captioning`: official `model_captioning.py`, and the captioning domain pre-training
`model_captioning_pretrain.py`, same keys) checkpoints have no text encoder: `vision_encoder.*`, the caption decoder
`text_decoder.bert.*` (the whole text stack run causally; cross-attention from `fusion_layer` on, reading the
image) and its LM head `text_decoder.cls.*` (decoder weight tied to the decoder's word embeddings, checked and
stored once). The converted `XVLMForConditionalGeneration` has no `xvlm.` prefix either: `vision_model.*`,
`text_decoder.text_model.*`, `text_decoder.lm_head.*`. From a *pre-training* checkpoint, `captioning` does what the
official captioning loader does (`text_encoder.*` -> `text_decoder.*`: the text stack becomes the decoder, the MLM
head its LM head; nothing new), through the model's own `modeling_xvlm_captioning.captioning_init_state`; both
sources are first mapped to the pre-training names and then renamed by it (`_caption_decoder`).

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
| `cls_head.{0,1,3}.*` (NLVR2), `ta_head.*`, `vision_proj.*` (TA pre-training) | same names on the head model |
| `text_decoder.bert.{embeddings,encoder.layer.i}.*` (VQA) | `text_decoder.text_model.{embeddings,encoder.layer.i}.*` |
| `text_decoder.cls.predictions.transform.*` / `.bias` (VQA) | `text_decoder.lm_head.transform.*` / `.decoder.bias` |
| `vision_encoder.*` (captioning) | `vision_model.*` (same rules as above, no `xvlm.`) |
| `text_decoder.bert.*` (captioning) / `text_encoder.bert.*` (pre-training -> captioning) | `text_decoder.text_model.*` |
| `text_decoder.cls.predictions.*` / `text_encoder.cls.predictions.*` (idem) | `text_decoder.lm_head.*` (as the MLM head) |

Dropped on purpose: `relative_position_index` and `attn_mask` buffers (recomputed from the window),
`embeddings.position_ids` (a non-persistent buffer here), `cls.predictions.decoder.weight` (tied to the word
embeddings of its BERT; checked equal) and `cls.predictions.decoder.bias` (alias of `cls.predictions.bias`; checked
equal), of the MLM head and of the VQA / caption decoder's LM head alike, and
the second name of each tied NLVR2 cross-attention key/value (checked equal), and the heads the requested task does
not have (e.g. the MLM and box heads of a pre-training checkpoint converted for retrieval: the official fine-tuning
loader ignores them the same way).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils.sha import sha_fileobj
from transformers import BertTokenizer

from modeling_xvlm import XVLMProcessor, create_model_card
from modeling_xvlm.configuration_xvlm import XVLMConfig
from modeling_xvlm.modeling_xvlm_captioning import CAPTION_PROMPT, captioning_init_state
from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config
from modeling_xvlm.modeling_xvlm_vqa import decoder_init_state
from modeling_xvlm.tasks import TASKS as MODEL_TASKS

from .infer import DECODER as CAPTION_TEXT_PREFIX
from .official_checkpoints import OfficialCheckpoint, official_checkpoint
from .infer import ArchitectureInference, infer_architecture, is_captioning, text_prefix
from .official_config import OfficialConfig, parse_official_config, read_official_config
from .relative_position import interpolate_relative_position_bias_table, window_from_table
from .safe_load import load_official_checkpoint, split_checkpoint

__all__ = [
    "ConversionError",
    "ConversionResult",
    "HEAD_CLASS_NAMES",
    "NEW_HEADS",
    "NLVR2_TASKS",
    "SOURCE_HEADS",
    "TASKS",
    "build_config",
    "convert_checkpoint",
    "convert_state_dict",
    "DEFAULT_TOKENIZER",
    "detect_task",
    "detect_task_with_evidence",
    "head_class",
    "hub_offline",
    "check_hub_reachable",
    "conversion_command",
    "load_tokenizer",
    "push_folder",
    "load_into_model",
    "write_model_card",
]

#: Task names accepted by `xvlm-convert --task` (the rows of `modeling_xvlm.tasks.TASKS`).
TASKS = tuple(MODEL_TASKS)
#: Task -> head class name, read from the task table.
HEAD_CLASS_NAMES = {name: row.model_class.__name__ for name, row in MODEL_TASKS.items()}
# Official heads each task's model has (the official model classes: model_pretrain / model_retrieval / model_bbox /
# model_vqa / model_captioning / model_nlvr / model_nlvr_pretrain). `proj` = vision_proj + text_proj + temp of the
# ITC space; `vision_proj` = the TA model's image projection alone; `decoder` = the VQA answer decoder, resp. the
# caption decoder (text_decoder.*).
TASK_HEADS = {
    "pretrain": {"proj", "itm", "bbox", "mlm"},
    "retrieval": {"proj", "itm"},
    "grounding": {"bbox"},
    "vqa": {"decoder"},
    "captioning": {"decoder"},
    "nlvr2": {"cls"},
    "nlvr2-pretrain": {"vision_proj", "ta"},
}
assert set(TASK_HEADS) == set(TASKS), "every task of modeling_xvlm.tasks needs its official heads here"
#: Tasks whose text stack is the NLVR2 one (doubled fusion layers, tied key/value pairs).
NLVR2_TASKS = ("nlvr2", "nlvr2-pretrain")
#: (target task, official source model) -> heads the official loader builds anew (freshly initialised, or from other
#: parts of the source: `SOURCE_HEADS`); any other pair of different models is refused when a head is missing. From
#: `pretrain` the NLVR2 fusion layers are duplicated.
NEW_HEADS = {
    ("nlvr2", "pretrain"): {"cls"},
    ("nlvr2", "nlvr2-pretrain"): {"cls"},
    ("nlvr2-pretrain", "pretrain"): {"ta"},
    ("vqa", "pretrain"): {"decoder"},
    ("captioning", "pretrain"): {"decoder"},
}
#: (target task, official source model) -> official heads of the source a new head is built from: the official VQA
#: loader builds the answer decoder from the fusion layers and the MLM head (only its cross-attention key/value stay
#: new, see `_decoder_from_pretraining`); the official captioning loader makes the whole text stack the caption
#: decoder and the MLM head its LM head (nothing new, see `_caption_decoder`).
SOURCE_HEADS = {("vqa", "pretrain"): {"mlm"}, ("captioning", "pretrain"): {"mlm"}}

BASE = "xvlm."
VISION_TARGET = BASE + "vision_model."
TEXT_TARGET = BASE + "text_model."
MLM_TARGET = "mlm_head."
VISION_SOURCE = "vision_encoder."
MLM_SOURCE = "text_encoder.cls."
PRETRAIN_TEXT_PREFIX = "text_encoder.bert."
DECODER_SOURCE = "text_decoder.bert."
DECODER_HEAD_SOURCE = "text_decoder.cls."
DECODER_TARGET = "text_decoder.text_model."
DECODER_HEAD_TARGET = "text_decoder.lm_head."
#: The captioning model's image encoder (`XVLMForConditionalGeneration.vision_model`: no `xvlm.`).
CAPTION_VISION_TARGET = "vision_model."


class ConversionError(ValueError):
    """A checkpoint that cannot be converted 1:1 (unknown, missing or mis-shaped keys, unsupported architecture)."""


@dataclass
class ConversionResult:
    """Everything a conversion produced and decided."""

    state_dict: dict[str, torch.Tensor]
    config: XVLMConfig | None
    task: str
    mapping: dict[str, list[str]] = field(default_factory=dict)  # official key -> converted key(s)
    dropped: dict[str, str] = field(default_factory=dict)  # official key -> reason
    new: dict[str, str] = field(default_factory=dict)  # model parameter prefix left freshly initialised -> reason
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
        for prefix, reason in self.new.items():
            lines.append(f"new: {prefix}* - {reason}")
        if self.interpolated:
            (src, dst) = next(iter(self.interpolated.values()))
            lines.append(f"relative position tables resized window {src} -> {dst}: {len(self.interpolated)} tables")
        lines.extend(self.notes)
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Task detection and key mapping
# ----------------------------------------------------------------------------------------------------------------


def _has(state_dict: Mapping[str, Any], *prefixes: str) -> bool:
    return any(key.startswith(prefixes) for key in state_dict)


#: The official model classes in the order `detect_task` tries them: (task, test on the state dict, the evidence
#: printed by `xvlm-convert`). The first test that holds names the task.
_DETECTION_RULES: tuple[tuple[str, Callable[[Mapping[str, Any]], bool], str], ...] = (
    ("captioning", is_captioning, "text_decoder.* without text_encoder.* (models/model_captioning.py)"),
    ("nlvr2", lambda sd: _has(sd, "cls_head."), "cls_head.* (models/model_nlvr.py)"),
    ("nlvr2-pretrain", lambda sd: _has(sd, "ta_head."), "ta_head.* (models/model_nlvr_pretrain.py)"),
    ("vqa", lambda sd: _has(sd, "text_decoder."), "text_decoder.* next to text_encoder.* (models/model_vqa.py)"),
    (
        "pretrain",
        lambda sd: _has(sd, "text_encoder.bert.", "text_encoder.cls."),
        "text_encoder.bert.* and the MLM head text_encoder.cls.* (models/model_pretrain.py)",
    ),
    (
        "grounding",
        lambda sd: _has(sd, "bbox_head.") and not _has(sd, "itm_head."),
        "bbox_head.* without itm_head.* (models/model_bbox.py)",
    ),
    ("retrieval", lambda sd: _has(sd, "itm_head."), "itm_head.* (models/model_retrieval.py; also the weakly supervised RefCOCO+ model)"),
)


def detect_task_with_evidence(state_dict: Mapping[str, Any]) -> tuple[str, str]:
    """`(task, evidence)`: the official model class of a state dict (see `detect_task`) and the keys that tell it."""
    for task, test, evidence in _DETECTION_RULES:
        if test(state_dict):
            return task, evidence
    raise ConversionError(
        "Cannot tell which official model this checkpoint comes from (no itm_head, bbox_head, cls_head, ta_head, "
        "text_decoder or MLM head): pass --task explicitly."
    )


def detect_task(state_dict: Mapping[str, Any]) -> str:
    """Guess the official model class of a state dict: captioning (`text_decoder.*` without `text_encoder.*`;
    fine-tuned or domain pre-training alike), NLVR2 (`cls_head`), TA pre-training for NLVR2 (`ta_head`), VQA
    (`text_decoder.*` next to `text_encoder.*`), pre-training (has `text_encoder.bert.` / the MLM head), grounding
    (box head without ITM head) or retrieval (ITM head; the weakly supervised RefCOCO+ model is a retrieval
    model too, official `Grounding.py`)."""
    return detect_task_with_evidence(state_dict)[0]


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
_HEAD = re.compile(r"^(itm_head|bbox_head|cls_head)\.(0|1|3)\.(weight|bias)$|^(ta_head)\.(weight|bias)$")
_PROJ = re.compile(r"^(vision_proj|text_proj)\.(weight|bias)$")
_LAYER_INDEX = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")
_TIED_CROSS = re.compile(r"^crossattention\.self\.(key|value)\.(weight|bias)$")
_HEAD_NAMES = {"itm_head": "itm", "bbox_head": "bbox", "cls_head": "cls", "ta_head": "ta"}

REASON_BUFFER = "Swin buffer (relative_position_index / attn_mask), recomputed from the window size"
REASON_POSITION_IDS = "position_ids buffer (arange), non-persistent in the converted model"
REASON_TIED_DECODER = "MLM decoder weight: tied alias of the word embeddings (checked equal)"
REASON_TIED_BIAS = "MLM decoder bias: alias of cls.predictions.bias (checked equal)"
REASON_TIED_LM_DECODER = "decoder LM-head weight: tied alias of the decoder's word embeddings (checked equal)"
REASON_TIED_LM_BIAS = "decoder LM-head bias: alias of cls.predictions.bias (checked equal)"
REASON_TIED_CROSS = (
    "NLVR2 cross-attention key/value of layer f+2k+1: the same Parameter as layer f+2k (official "
    "share_cross_attention; checked equal, stored once)"
)


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


_MLM_TRANSFORM = re.compile(r"^predictions\.transform\.(dense|LayerNorm)\.(weight|bias)$")
_MLM_ALIASES = ("predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias")
# Official keys each head of a task model needs (`TASK_HEADS`).
_REQUIRED_KEYS = {
    "proj": ["vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"],
    "itm": [f"itm_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")],
    "bbox": [f"bbox_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")],
    "mlm": [MLM_SOURCE + "predictions.bias"]
    + [f"{MLM_SOURCE}predictions.transform.{m}.{p}" for m in ("dense", "LayerNorm") for p in ("weight", "bias")],
    "cls": [f"cls_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")],
    "ta": ["ta_head.weight", "ta_head.bias"],
    "vision_proj": ["vision_proj.weight", "vision_proj.bias"],
    "decoder": [
        DECODER_SOURCE + f"embeddings.{name}"
        for name in ("word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")
    ]
    + [DECODER_HEAD_SOURCE + "predictions.bias"]
    + [f"{DECODER_HEAD_SOURCE}predictions.transform.{m}.{p}" for m in ("dense", "LayerNorm") for p in ("weight", "bias")],
}
# Model parameter names of the heads a conversion may initialise anew (`NEW_HEADS`).
_NEW_HEAD_PREFIX = {"cls": "cls_head.", "ta": "ta_head."}


def _fusion_layer(official: Mapping[str, Any], prefix: str) -> int | None:
    """The first text layer with cross-attention (`None` if there is none)."""
    layers = [
        int(m.group(1))
        for k in official
        if k.startswith(prefix) and (m := _LAYER_INDEX.match(k[len(prefix) :])) and m.group(2).startswith("crossattention.")
    ]
    return min(layers) if layers else None


def _source_problem(task: str, source: str) -> str:
    """Why the `task` model cannot start from an official `source` model ("" if it can)."""
    try:
        _check_source(task, source)
    except ConversionError as error:
        return str(error)
    return ""


def _check_source(task: str, source: str) -> None:
    """Refuse official models the task cannot start from (the NLVR2 stack differs from all others; the VQA and
    captioning models start from their own checkpoints or the pre-training one)."""
    if source == "captioning" and task != "captioning":
        raise ConversionError(
            "This is an official captioning checkpoint (text_decoder.* without text_encoder.*, "
            f"models/model_captioning.py); it converts with --task captioning, not --task {task}."
        )
    if task in NLVR2_TASKS and source not in (*NLVR2_TASKS, "pretrain"):
        raise ConversionError(
            f"The {task} model starts from an official NLVR2, TA pre-training or pre-training checkpoint "
            f"(text_encoder.bert.*), not from a {source} checkpoint: the official NLVR2 loader duplicates the "
            "pre-trained fusion layers of text_encoder.bert.* only."
        )
    if source in NLVR2_TASKS and task not in NLVR2_TASKS:
        raise ConversionError(
            f"This is an official {source} checkpoint (doubled fusion layers with tied key/value pairs); it converts "
            f"with --task {' or --task '.join(NLVR2_TASKS)}, not --task {task}."
        )
    if task == "vqa" and source not in ("vqa", "pretrain"):
        raise ConversionError(
            f"The vqa model starts from an official VQA or pre-training checkpoint, not from a {source} checkpoint: "
            "the official VQA loader builds the answer decoder from text_encoder.bert.* and text_encoder.cls.* only."
        )
    if source == "vqa" and task != "vqa":
        raise ConversionError(
            f"This is an official VQA checkpoint (text_decoder.*); it converts with --task vqa, not --task {task}."
        )
    if task == "captioning" and source not in ("captioning", "pretrain"):
        raise ConversionError(
            "The captioning model starts from an official captioning (or captioning domain pre-training) or "
            f"pre-training checkpoint, not from a {source} checkpoint: the official captioning loader renames "
            "text_encoder.* to text_decoder.*, which only text_encoder.bert.* and text_encoder.cls.* of a pre-training "
            "checkpoint fill."
        )


class _KeyMapper:
    """One `convert_state_dict` run: the official dict, the task, and the `ConversionResult` being filled."""

    def __init__(self, official: Mapping[str, torch.Tensor], task: str, target_window: int | None) -> None:
        self.official = official
        self.task = task
        self.source = _safe_detect(official)
        self.heads = TASK_HEADS[task]
        self.target_window = target_window
        self.text_prefix = text_prefix(official)
        self.result = ConversionResult(state_dict={}, config=None, task=task)
        # NLVR2 stacks: the source's own (tied pairs to de-alias) or a pre-training stack to duplicate.
        self.fusion = _fusion_layer(official, self.text_prefix)
        self.tied_source = self.source in NLVR2_TASKS
        self.duplicate = task in NLVR2_TASKS and not self.tied_source
        # VQA from pre-training: the answer decoder is built from the text stack and the MLM head.
        self.decoder_from_pretraining = task == "vqa" and self.source == "pretrain"
        # Captioning: Swin without `xvlm.`; a captioning checkpoint's stack and LM head are read like a pre-training
        # checkpoint's (under text_decoder.), then renamed by `_caption_decoder`.
        self.vision_target = CAPTION_VISION_TARGET if task == "captioning" else VISION_TARGET
        self.mlm_source = DECODER_HEAD_SOURCE if self.text_prefix == CAPTION_TEXT_PREFIX else MLM_SOURCE
        self.differing_aliases: list[str] = []

    def put(self, source: str, target: str, tensor: torch.Tensor) -> None:
        if target in self.result.state_dict:
            raise ConversionError(f"Two official keys map to {target!r} (the second is {source!r}).")
        self.result.state_dict[target] = tensor
        self.result.mapping.setdefault(source, []).append(target)

    def drop(self, source: str, reason: str) -> None:
        self.result.dropped[source] = reason

    def map(self, key: str, tensor: torch.Tensor) -> bool:
        """Map or drop one official key; `False`: the key is unknown."""
        if key.startswith(VISION_SOURCE):
            return _map_vision_key(self, key, tensor)
        if key.startswith(self.text_prefix) and not key.startswith(MLM_SOURCE):
            return _map_text_key(self, key, tensor)
        if key.startswith(self.mlm_source) and self.text_prefix in (PRETRAIN_TEXT_PREFIX, CAPTION_TEXT_PREFIX):
            return _map_mlm_key(self, key, tensor)
        if key.startswith((DECODER_SOURCE, DECODER_HEAD_SOURCE)) and "decoder" in self.heads:
            return _map_decoder_key(self, key, tensor)
        if _PROJ.match(key) or key == "temp":
            return _map_projection_key(self, key, tensor)
        if _HEAD.match(key) and (key.startswith(("itm_head.", "bbox_head.")) or self.task in NLVR2_TASKS):
            return _map_head_key(self, key, tensor)
        return False


def _map_vision_key(mapper: _KeyMapper, key: str, tensor: torch.Tensor) -> bool:
    """Swin: drop recomputed buffers, split the fused qkv, rename the rest (resizing position tables)."""
    rest = key[len(VISION_SOURCE) :]
    if _VISION_BUFFERS.match(rest):
        mapper.drop(key, REASON_BUFFER)
        return True
    match = _QKV.match(rest)
    if match:
        stage, block, kind = match.groups()
        base = f"{mapper.vision_target}encoder.layers.{stage}.blocks.{block}.attention."
        for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(tensor, key)):
            mapper.put(key, f"{base}{name}.{kind}", part)
        return True
    for pattern, replacement in _VISION_RULES:
        if pattern.match(rest):
            if rest.endswith("relative_position_bias_table"):
                tensor = _resize_position_table(mapper, key, tensor)
            mapper.put(key, mapper.vision_target + pattern.sub(replacement, rest), tensor)
            return True
    return False


def _resize_position_table(mapper: _KeyMapper, key: str, table: torch.Tensor) -> torch.Tensor:
    if mapper.target_window is None:
        return table
    source_window = window_from_table(table.shape[0])
    if source_window == mapper.target_window:
        return table
    table = interpolate_relative_position_bias_table(table, mapper.target_window)
    mapper.result.interpolated[key] = (source_window, mapper.target_window)
    return table


def _map_text_key(mapper: _KeyMapper, key: str, tensor: torch.Tensor) -> bool:
    """BERT embeddings and layers (text and fusion) keep their names under `xvlm.text_model.`; NLVR2 stacks are
    de-aliased (`_tied_alias`) or built from a pre-training stack (`_nlvr2_layers`)."""
    rest = key[len(mapper.text_prefix) :]
    if rest == "embeddings.position_ids":
        mapper.drop(key, REASON_POSITION_IDS)
        return True
    if _TEXT_EMBEDDINGS.match(rest):
        mapper.put(key, TEXT_TARGET + rest, tensor)
        return True
    if not _TEXT_LAYER.match(rest):
        return False
    layer, tail = _LAYER_INDEX.match(rest).groups()
    layer = int(layer)
    if mapper.tied_source and _tied_alias(mapper, key, layer, tail, tensor):
        return True
    for index, target in enumerate(_nlvr2_layers(mapper, layer, tail) if mapper.duplicate else [layer]):
        copy_ = tensor if index == 0 or tensor.device.type == "meta" else tensor.clone()  # own storage per layer
        mapper.put(key, f"{TEXT_TARGET}encoder.layer.{target}.{tail}", copy_)
    return True


def _tied_alias(mapper: _KeyMapper, key: str, layer: int, tail: str, tensor: torch.Tensor) -> bool:
    """An NLVR2 checkpoint's layer `f + 2k + 1` cross-attention key/value: the same tensor as layer `f + 2k`'s
    (checked; a difference is collected and reported by `convert_state_dict`); dropped, stored once."""
    if mapper.fusion is None or layer < mapper.fusion or (layer - mapper.fusion) % 2 == 0 or not _TIED_CROSS.match(tail):
        return False
    partner = f"{mapper.text_prefix}encoder.layer.{layer - 1}.{tail}"
    if partner not in mapper.official or not _equal(tensor, mapper.official[partner]):
        mapper.differing_aliases.append(f"{key} != {partner}")
    mapper.drop(key, REASON_TIED_CROSS)
    return True


def _nlvr2_layers(mapper: _KeyMapper, layer: int, tail: str) -> list[int]:
    """Official NLVR2 loader (`load_nlvr_pretrain=False`): text layer `N < f` keeps its index, fusion layer `N` goes
    to `f + 2 (N - f)` and `f + 2 (N - f) + 1`; the tied key/value pair is one tensor, stored once (under the first)."""
    fusion = mapper.fusion
    if layer < fusion:
        return [layer]
    first = fusion + 2 * (layer - fusion)
    return [first] if _TIED_CROSS.match(tail) else [first, first + 1]


def _map_mlm_key(mapper: _KeyMapper, key: str, tensor: torch.Tensor) -> bool:
    """The MLM head of a pre-training checkpoint (the VQA decoder's LM head when `vqa` starts from pre-training) or
    the LM head of a captioning checkpoint (`text_decoder.cls.*`); its tied decoder tensors are checked and
    dropped. For `captioning` it goes to `mlm_head.*`, which `_caption_decoder` renames."""
    source = mapper.mlm_source
    rest = key[len(source) :]
    if rest not in _MLM_ALIASES and not _MLM_TRANSFORM.match(rest):
        return False
    reasons = _LM_REASONS if source == DECODER_HEAD_SOURCE else _MLM_REASONS
    if "mlm" in mapper.heads or mapper.task == "captioning":
        _map_lm_head(mapper, key, rest, tensor, source, mapper.text_prefix, MLM_TARGET, reasons)
    elif mapper.decoder_from_pretraining:  # official VQA loader: text_encoder.cls.* -> text_decoder.cls.*
        _map_lm_head(mapper, key, rest, tensor, source, mapper.text_prefix, DECODER_HEAD_TARGET, reasons)
    else:
        mapper.drop(key, _reason_unused("MLM head (text_encoder.cls)", mapper.task))
    return True


_MLM_REASONS = (REASON_TIED_DECODER, REASON_TIED_BIAS)
_LM_REASONS = (REASON_TIED_LM_DECODER, REASON_TIED_LM_BIAS)


def _map_lm_head(
    mapper: _KeyMapper,
    key: str,
    rest: str,
    tensor: torch.Tensor,
    head_source: str,
    bert_source: str,
    target: str,
    reasons: tuple[str, str],
) -> None:
    """A BERT `cls.predictions` head (`rest` = the key after `head_source`) into `target` (`transform.*`,
    `decoder.bias`): the decoder weight must be the word embeddings of `bert_source`, the decoder bias
    `cls.predictions.bias` (official tied tensors), both dropped after the check."""
    if rest == "predictions.decoder.weight":
        word_key = bert_source + "embeddings.word_embeddings.weight"
        if word_key not in mapper.official or not _equal(tensor, mapper.official[word_key]):
            raise ConversionError(
                f"{key} is not equal to {word_key}: the official LM-head decoder is tied to the word embeddings, "
                "so this checkpoint is not an official X-VLM checkpoint."
            )
        mapper.drop(key, reasons[0])
    elif rest == "predictions.decoder.bias":
        bias_key = head_source + "predictions.bias"
        if bias_key not in mapper.official or not _equal(tensor, mapper.official[bias_key]):
            raise ConversionError(f"{key} is not equal to {bias_key} (they are the same tensor officially).")
        mapper.drop(key, reasons[1])
    elif rest == "predictions.bias":
        mapper.put(key, target + "decoder.bias", tensor)
    else:
        mapper.put(key, target + rest[len("predictions.") :], tensor)


def _map_decoder_key(mapper: _KeyMapper, key: str, tensor: torch.Tensor) -> bool:
    """The VQA answer decoder (`text_decoder.bert.*` embeddings and layers, keeping their names under
    `text_decoder.text_model.`) and its LM head (`text_decoder.cls.*`, tied tensors checked and dropped)."""
    if key.startswith(DECODER_HEAD_SOURCE):
        rest = key[len(DECODER_HEAD_SOURCE) :]
        if rest not in _MLM_ALIASES and not _MLM_TRANSFORM.match(rest):
            return False
        _map_lm_head(mapper, key, rest, tensor, DECODER_HEAD_SOURCE, DECODER_SOURCE, DECODER_HEAD_TARGET, _LM_REASONS)
        return True
    rest = key[len(DECODER_SOURCE) :]
    if rest == "embeddings.position_ids":
        mapper.drop(key, REASON_POSITION_IDS)
        return True
    if not (_TEXT_EMBEDDINGS.match(rest) or _TEXT_LAYER.match(rest)):
        return False
    mapper.put(key, DECODER_TARGET + rest, tensor)
    return True


def _map_projection_key(mapper: _KeyMapper, key: str, tensor: torch.Tensor) -> bool:
    if "proj" in mapper.heads:
        mapper.put(key, BASE + key, tensor)
    elif "vision_proj" in mapper.heads and key.startswith("vision_proj."):
        mapper.put(key, key, tensor)  # the TA head's own image projection (no text_proj / temp there)
    else:
        mapper.drop(key, _reason_unused("ITC projection / temperature", mapper.task))
    return True


def _map_head_key(mapper: _KeyMapper, key: str, tensor: torch.Tensor) -> bool:
    name = key.split(".", 1)[0]
    if _HEAD_NAMES[name] in mapper.heads:
        mapper.put(key, key, tensor)
    else:
        mapper.drop(key, _reason_unused(name, mapper.task))
    return True


def _check_all_known(unknown: list[str], hint: str = "") -> None:
    if unknown:
        raise ConversionError(
            f"{len(unknown)} official key(s) are neither mapped nor known to be safe to drop: {sorted(unknown)}. "
            "Supported checkpoints: official X-VLM (Swin) pre-training, retrieval, box-grounding, VQA, captioning, "
            "NLVR2 and NLVR2 text-assignment models." + (f" {hint}" if hint else "")
        )


def _check_task_heads_present(official: Mapping[str, torch.Tensor], task: str) -> set[str]:
    """Raise for missing official head keys, except the heads `NEW_HEADS` initialises anew (returned); the source
    heads those are built from (`SOURCE_HEADS`) are required instead."""
    source = _safe_detect(official)
    new = set(NEW_HEADS.get((task, source), ()))
    needed = (TASK_HEADS[task] - new) | SOURCE_HEADS.get((task, source), set())
    missing = [k for head in sorted(needed) for k in _REQUIRED_KEYS[head] if k not in official]
    if missing:
        raise ConversionError(
            f"The {task} model needs official keys this checkpoint does not have: {missing}. Convert it with the "
            f"task it was trained for (detected: {source})."
        )
    return new


def _check_aliases(mapper: _KeyMapper) -> None:
    if mapper.differing_aliases:
        raise ConversionError(
            f"{len(mapper.differing_aliases)} NLVR2 cross-attention key/value tensor(s) differ from their tied partner "
            "(officially one Parameter per pair of fusion layers, share_cross_attention), so the pair cannot be "
            f"stored once: {mapper.differing_aliases}."
        )


def convert_state_dict(
    official: Mapping[str, torch.Tensor],
    task: str,
    target_window: int | None = None,
    config: XVLMConfig | None = None,
) -> ConversionResult:
    """Map an official state dict to the in-memory names of the `task` head model.

    Args:
        official: the official state dict (`checkpoint['model']`).
        task: `"pretrain"`, `"retrieval"`, `"grounding"`, `"vqa"`, `"captioning"`, `"nlvr2"` or `"nlvr2-pretrain"`.
        target_window: Swin window of the converted model; tables of another size are resized with the official
            algorithm. `None` keeps every table as it is.
        config: the converted model's config; only read to build a VQA decoder from a pre-training checkpoint
            (default: `build_config(official, task=task)`).

    Returns:
        a `ConversionResult` whose `config` is still `None` (see `build_config`).

    Raises:
        ConversionError: keys that are neither mapped nor deliberately dropped (all named), a missing official head
            the task needs, tied MLM / LM-head tensors that are not equal, or an official model the task cannot start
            from.
    """
    if task not in TASKS:
        raise ConversionError(f"Unknown task {task!r}; choose one of {TASKS}.")
    mapper = _KeyMapper(official, task, target_window)
    if (mapper.duplicate or mapper.tied_source) and mapper.fusion is None:
        raise ConversionError("No text layer has crossattention: this is not an X-VLM fusion encoder.")
    unknown = [key for key, tensor in official.items() if not mapper.map(key, tensor)]
    _check_all_known(unknown, _source_problem(task, mapper.source))
    _check_source(task, mapper.source)
    _check_aliases(mapper)
    for head in sorted(_check_task_heads_present(official, task)):
        if head == "decoder" and task == "captioning":
            continue  # the text stack and the MLM head, renamed by `_caption_decoder` below
        if head == "decoder":
            _decoder_from_pretraining(mapper, config or build_config(official, task=task)[0])
            continue
        mapper.result.new[_NEW_HEAD_PREFIX[head]] = (
            f"{_NEW_HEAD_PREFIX[head].rstrip('.')} not in the {mapper.source} checkpoint: newly initialised (as the "
            f"official {task} loader does)"
        )
    if mapper.duplicate:
        mapper.result.notes.append(
            f"NLVR2 text stack: pre-trained fusion layer N -> layers {mapper.fusion} + 2(N - {mapper.fusion}) and +1 "
            "(official NLVR2 loader); each pair shares its cross-attention key/value"
        )
    if task == "captioning":
        _caption_decoder(mapper)
    return mapper.result


def _caption_decoder(mapper: _KeyMapper) -> None:
    """The captioning names, by the model's own `captioning_init_state` (the official captioning loader:
    `text_encoder.*` -> `text_decoder.*`): the text stack mapped under `xvlm.text_model.*` becomes
    `text_decoder.text_model.*`, the MLM / LM head `mlm_head.*` becomes `text_decoder.lm_head.*`; the Swin keys
    (`vision_model.*`) stay. Every converted tensor must be carried over."""
    result = mapper.result
    renamed: dict[str, str] = {}
    for name, tensor in result.state_dict.items():
        out = captioning_init_state({name: tensor})
        if len(out) != 1:
            raise ConversionError(
                f"{name} (from {[s for s, t in result.mapping.items() if name in t]}) has no place in the captioning "
                "model (the official captioning loader keeps the vision encoder and text_encoder.* only)."
            )
        renamed[name] = next(iter(out))
    result.state_dict = {renamed[name]: tensor for name, tensor in result.state_dict.items()}
    result.mapping = {source: [renamed[t] for t in targets] for source, targets in result.mapping.items()}
    if mapper.source == "pretrain":
        result.notes.append(
            "Caption decoder from pre-training: text_encoder.* -> text_decoder.* (official captioning loader, "
            "modeling_xvlm_captioning.captioning_init_state): the whole text stack runs causally, the MLM head is "
            "the LM head"
        )


def _decoder_from_pretraining(mapper: _KeyMapper, config: XVLMConfig) -> None:
    """The official pre-training -> VQA decoder (`model_vqa.py` `load_pretrained`), as the model's
    `decoder_init_state` does it: run on the converted text stack, its outputs (decoder layer `i` <- fusion layer
    `f + i`, embeddings) and the MLM head (mapped by `_map_mlm_key`) fill `text_decoder`; the cross-attention
    key/value `decoder_init_state` leaves out stay new and are listed in `result.new`."""
    layers = config.num_decoder_layers or config.text_config.num_fusion_layers
    if layers != config.text_config.num_fusion_layers:
        raise ConversionError(
            f"The official VQA loader copies one fusion layer per decoder layer: num_decoder_layers ({layers}) must "
            f"equal the {config.text_config.num_fusion_layers} fusion layers of the pre-training checkpoint."
        )
    state = mapper.result.state_dict
    text_state = {k[len(TEXT_TARGET) :]: v for k, v in state.items() if k.startswith(TEXT_TARGET)}
    source_of = {target: source for source, targets in mapper.result.mapping.items() for target in targets}
    # decoder_init_state renames, never copies: each output tensor is one of its inputs, which names the official key.
    text_key_of = {id(v): k for k, v in text_state.items()}
    for key, tensor in decoder_init_state(text_state, config).items():
        source = source_of[TEXT_TARGET + text_key_of[id(tensor)]]
        mapper.put(source, "text_decoder." + key, tensor if tensor.device.type == "meta" else tensor.clone())
    for layer in range(layers):
        for name in ("key", "value"):
            prefix = f"{DECODER_TARGET}encoder.layer.{layer}.crossattention.self.{name}."
            if prefix + "weight" not in state:
                mapper.result.new[prefix] = (
                    f"decoder cross-attention {name}: reads the {config.text_config.hidden_size}-wide question states, "
                    f"not the {config.vision_width}-wide image; newly initialised (official VQA loader)"
                )
    mapper.result.notes.append(
        f"VQA decoder from pre-training: decoder layer i <- fusion layer {config.text_config.fusion_layer} + i, "
        "embeddings and MLM head copied (official VQA loader, modeling_xvlm_vqa.decoder_init_state)"
    )


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


def _apply_embedded_config(
    embedded: OfficialConfig, inference: ArchitectureInference, parts: dict[str, dict[str, Any]], source_image: int
) -> int:
    """Fill what the weights leave open from the config stored in the checkpoint; returns the source image size."""
    for part, values in (("vision", embedded.vision), ("text", embedded.text), ("top", embedded.top)):
        for name, value in values.items():
            how = inference.provenance.get(f"{part}.{name}", "")
            if name == "window_size" or how.startswith("inferred"):
                continue
            parts[part][name] = value
            inference.provenance[f"{part}.{name}"] = "from the config stored in the checkpoint"
    if "image_size" in embedded.vision and not inference.image_size_known:
        source_image = parts["vision"]["image_size"]
    return source_image


def _apply_official_config(
    official: OfficialConfig, inference: ArchitectureInference, parts: dict[str, dict[str, Any]]
) -> int | None:
    """Apply `--config` (it must agree with the weights); returns the window it sets, if any."""
    config_window = None
    for part, values, inferable in (
        ("vision", official.vision, INFERABLE_VISION),
        ("text", official.text, INFERABLE_TEXT),
    ):
        target = parts[part]
        for name, value in values.items():
            if part == "text" and name == "num_hidden_layers" and target.get("tie_cross_attention_pairs"):
                # The official NLVR2 model doubles the fusion layers of the config_bert.json it reads.
                fusion = int(values.get("fusion_layer", target["fusion_layer"]))
                value = fusion + 2 * (int(value) - fusion)
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
    top = parts["top"]
    for name, value in official.top.items():
        if name == "projection_dim" and inference.provenance["top.projection_dim"].startswith("inferred"):
            if value != top[name]:
                raise ConversionError(
                    f"The official config sets embed_dim = {value} but the projections have {top[name]} outputs."
                )
            continue
        if name == "num_decoder_layers" and name in top:  # inferred from the decoder's keys
            if value != top[name]:
                raise ConversionError(
                    f"The official config sets num_dec_layers = {value} but the checkpoint's VQA decoder has "
                    f"{top[name]} layers."
                )
            continue
        top[name] = value
        inference.provenance[f"top.{name}"] = "from --config"
    return config_window


def _target_geometry(
    official: OfficialConfig | None,
    image_size: int | None,
    window_size: int | None,
    config_window: int | None,
    source_image: int,
    source_window: int,
    stride: int,
) -> tuple[int, int]:
    """(image size, Swin window) of the converted model; see `build_config` for the precedence."""
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
    return target_image, target_window


def _check_target_geometry(
    inference: ArchitectureInference,
    depths: int,
    patch: int,
    target_image: int,
    target_window: int,
    source_image: int,
    source_window: int,
) -> None:
    # A stage whose resolution is below the window uses window = resolution (official Swin; the model does the
    # same, see `shrink_swin_windows`); other stages need resolution % window == 0 (official assert).
    for stage in range(depths):
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


def build_config(
    state_dict: Mapping[str, torch.Tensor],
    official: OfficialConfig | None = None,
    image_size: int | None = None,
    window_size: int | None = None,
    embedded: OfficialConfig | None = None,
    log: Callable[[str], None] | None = None,
    task: str | None = None,
) -> tuple[XVLMConfig, ArchitectureInference]:
    """Build the `XVLMConfig` of the converted model.

    `task` (`nlvr2` / `nlvr2-pretrain`) gives a pre-training stack the NLVR2 text stack (`nlvr2_config`: fusion
    layers doubled, key/value pairs tied); an NLVR2 checkpoint's own stack is inferred as such from its keys. For
    `captioning`, `label_smoothing` comes from the official config (see `_caption_label_smoothing`).

    Precedence: explicit `image_size` / `window_size` > the official config (`--config`) > the weights > the
    config stored in the checkpoint > X-VLM-base defaults. Values the weights determine must agree with the
    official config (else `ConversionError`). The target window, unless given, is the config's; otherwise, when the
    image size changes and the source followed the official convention (final feature map = one window, 7 at 224),
    the new final feature-map size (12 at 384, 15 at 480); otherwise the source window.
    """
    inference = infer_architecture(state_dict)
    parts = {"vision": dict(inference.vision), "text": dict(inference.text), "top": dict(inference.top)}
    vision, text, top = parts["vision"], parts["text"], parts["top"]
    source_window = vision["window_size"]
    source_image = vision["image_size"]
    patch = vision["patch_size"]
    stride = patch * 2 ** (len(vision["depths"]) - 1)

    if embedded is not None:
        source_image = _apply_embedded_config(embedded, inference, parts, source_image)
    config_window = _apply_official_config(official, inference, parts) if official is not None else None
    target_image, target_window = _target_geometry(
        official, image_size, window_size, config_window, source_image, source_window, stride
    )
    _check_target_geometry(
        inference, len(vision["depths"]), patch, target_image, target_window, source_image, source_window
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
        num_decoder_layers=_vqa_decoder_layers(inference, top, text) if task == "vqa" else None,
        label_smoothing=_caption_label_smoothing(state_dict, official or embedded, inference, top)
        if task == "captioning"
        else None,
    )
    if task in NLVR2_TASKS:
        config = _nlvr2_target_config(config, inference, task)
    inference.vision, inference.text, inference.top = vision, text, top
    if log is not None:
        log("Architecture (value [where it came from]):\n" + inference.describe())
    inference.source_image, inference.source_window = source_image, source_window
    return config, inference


def _vqa_decoder_layers(inference: ArchitectureInference, top: dict[str, Any], text: dict[str, Any]) -> int:
    """The answer decoder's layer count: the VQA checkpoint's (or `num_dec_layers` of the official config); from a
    pre-training checkpoint the number of fusion layers, which the official VQA loader requires (it asserts
    `num_dec_layers` equals it)."""
    fusion_layers = int(text["num_hidden_layers"]) - int(text["fusion_layer"])
    if inference.provenance.get("top.num_decoder_layers", "").startswith("inferred"):
        return int(top["num_decoder_layers"])
    layers = int(top.get("num_decoder_layers", fusion_layers))
    if layers != fusion_layers:
        raise ConversionError(
            f"num_dec_layers = {layers}, but the official VQA model initialises one decoder layer per fusion layer "
            f"(asserted in models/model_vqa.py): this checkpoint has {fusion_layers} fusion layers."
        )
    if "top.num_decoder_layers" not in inference.provenance:
        inference.set("top", "num_decoder_layers", layers, "default: the number of fusion layers (official VQA loader)")
    top["num_decoder_layers"] = layers
    return layers


def _caption_label_smoothing(
    state_dict: Mapping[str, torch.Tensor],
    official: OfficialConfig | None,
    inference: ArchitectureInference,
    top: dict[str, Any],
) -> float | None:
    """The caption loss's label smoothing: the official config's `label_smoothing` (`configs/Captioning.yaml`:
    0.1); 0.0 for a captioning checkpoint whose config has none (the domain pre-training,
    `model_captioning_pretrain.py`, has no smoothing, while `model_captioning.py` requires the key); otherwise
    `None` (the model's default, 0.1). `num_dec_layers` of `configs/Captioning.yaml` is not read by
    `model_captioning.py` and is ignored."""
    top.pop("num_decoder_layers", None)
    inference.provenance.pop("top.num_decoder_layers", None)
    if "label_smoothing" in top:
        return float(top["label_smoothing"])
    if official is not None and is_captioning(state_dict):
        inference.set(
            "top", "label_smoothing", 0.0, "captioning domain pre-training (its official config has no label_smoothing)"
        )
        return 0.0
    return None


def _nlvr2_target_config(config: XVLMConfig, inference: ArchitectureInference, task: str) -> XVLMConfig:
    """The NLVR2 text stack for an NLVR2 task (a pre-training stack is doubled as the official loader does)."""
    if not config.text_config.tie_cross_attention_pairs:
        layers = config.text_config.num_hidden_layers
        config = nlvr2_config(config)
        inference.text["num_hidden_layers"] = config.text_config.num_hidden_layers
        inference.text["tie_cross_attention_pairs"] = True
        inference.provenance["text.num_hidden_layers"] += (
            f"; {layers} pre-trained layers -> {config.text_config.num_hidden_layers} (fusion layers doubled, NLVR2)"
        )
        inference.provenance["text.tie_cross_attention_pairs"] = "NLVR2 stack (official share_cross_attention)"
    if task == "nlvr2":
        config.id2label, config.label2id = {0: "False", 1: "True"}, {"False": 0, "True": 1}  # official NLVR2 labels
    return config


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def head_class(task: str) -> type:
    """The model class of a task (`XVLMForPretraining`, `XVLMForRetrieval`, `XVLMForGrounding`,
    `XVLMForQuestionAnswering`, `XVLMForConditionalGeneration`, `XVLMForImagesAndTextClassification` or
    `XVLMForTextAssignment`), read from
    `modeling_xvlm.tasks.TASKS`."""
    if task not in MODEL_TASKS:
        raise ConversionError(f"Unknown task {task!r}; choose one of {TASKS}.")
    return MODEL_TASKS[task].model_class


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

    Weights under a prefix of `result.new` (a head the official loader initialises anew) keep the model's
    initialisation.

    Raises:
        ConversionError: converted keys the model does not have (named with their official source keys), model
            weights no official key provides, or shape mismatches.
    """
    expected, aliases = _expected_keys(model)
    converted = result.state_dict
    source_of = {t: s for s, targets in result.mapping.items() for t in targets}
    unexpected = sorted(set(converted) - set(expected))
    new_prefixes = tuple(result.new)
    fresh = {k for k in set(expected) - set(converted) if new_prefixes and k.startswith(new_prefixes)}
    missing = sorted(set(expected) - set(converted) - fresh)
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
    left = set(outcome.missing_keys) - aliases - fresh
    if left or outcome.unexpected_keys:
        raise ConversionError(f"load_state_dict disagreed: missing {sorted(left)}, unexpected {outcome.unexpected_keys}")


# ----------------------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return sha_fileobj(handle).hex()


def _conversion_notes(result: ConversionResult) -> str:
    """The model card's "Conversion" section: what was converted, resized and dropped."""
    config = result.config
    vision, text = config.vision_config, config.text_config
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
    decoder = (
        f"\n- Answer decoder: {config.num_decoder_layers or text.num_fusion_layers} layers, each cross-attending to the "
        f"question states (width {text.hidden_size}); LM head tied to its word embeddings."
        if result.task == "vqa"
        else ""
    )
    projection = "" if result.task == "captioning" else f"; projection {config.projection_dim}"
    if result.task == "captioning":
        decoder = (
            f"\n- No text encoder: the {text.num_hidden_layers} text layers are the caption decoder, run causally, "
            f"layers {text.fusion_layer}.. cross-attending to the image; LM head tied to its word embeddings."
        )
    return f"""- Model class: `{HEAD_CLASS_NAMES[result.task]}` (package `modeling_xvlm`).
- Vision: Swin, image size {config.image_size}, embed {vision.embed_dim}, depths {list(vision.depths)}, heads {list(vision.num_heads)}, window {vision.window_size}.
- Text: {text.num_hidden_layers} layers ({text.fusion_layer} text + {text.num_hidden_layers - text.fusion_layer} fusion), width {text.hidden_size}, {text.num_attention_heads} heads{projection}.{decoder}
- {interpolation}
- Official keys: {len(result.mapping)} mapped, {len(result.dropped)} dropped on purpose:
{chr(10).join(f"  - {n} x {reason}" for reason, n in dropped.items()) or "  - none"}
{chr(10).join(f"- Newly initialised: `{prefix}*` ({reason})." for prefix, reason in result.new.items())}

Inputs follow the official preprocessing: square bicubic resize to {config.image_size}, CLIP mean/std, {_text_inputs(result.task)}.

With the same weights and inputs the converted model reproduces the official model in fp32 to within 1e-5
(see `docs/conversion.md` of the package for the parity contract and how it is tested)."""


def _text_inputs(task: str) -> str:
    if task == "captioning":
        return (
            f"captions `[CLS] {CAPTION_PROMPT}caption [SEP]` for training (the prompt's 4 tokens excluded from the "
            f"loss), generation from the prompt `[CLS] {CAPTION_PROMPT.strip()}` without `[SEP]` (official "
            "`model_captioning.py`)"
        )
    return "texts\n`[CLS] tokens` without `[SEP]` (use `XVLMProcessor`)"


def _official_result_section(task: str, official: OfficialCheckpoint | None) -> str:
    """The model card's "Official result" section: the official README's result of the checkpoint (`official`),
    or, when it is not named, those of every released checkpoint of the task."""
    from .official_checkpoints import OFFICIAL_CHECKPOINTS

    source = "the official README (results image `x-vlm-results.png`, the paper's Tables 2 and 3)"
    if official is not None:
        result = official.result or "the official README reports none for this checkpoint"
        return (
            f"Converted from the official checkpoint **{official.readme_name}** (`xvlm-convert --official "
            f"{official.name}`, trained at {official.image_size} px with `{official.config}`). Result reported by "
            f"{source}: {result}.\n\nThese are the official model's numbers; this conversion reproduces its outputs "
            "(see Conversion), it was not re-evaluated on the benchmark here."
        )
    rows = [row for row in OFFICIAL_CHECKPOINTS.values() if row.task == task and row.result]
    listed = "\n".join(f"- {row.readme_name} (`--official {row.name}`): {row.result}" for row in rows)
    return (
        "Which released checkpoint this is was not recorded (convert with `xvlm-convert --official NAME` to record "
        f"it). The results {source} reports for the released `{task}` checkpoints:\n\n{listed or '- none'}"
    )


def conversion_command(
    result: ConversionResult, tokenizer: str | None = None, official: OfficialCheckpoint | None = None,
    config: str | os.PathLike | None = None,
) -> str:
    """The `xvlm-convert` command line that reproduces this conversion (written into the model card)."""
    source_name = os.path.basename(result.source) if result.source else "CHECKPOINT"
    parts = ["xvlm-convert", "--checkpoint", source_name, "--task", result.task]
    if result.config is not None:
        parts += ["--image-size", str(result.config.image_size)]
    if config is not None:
        parts += ["--config", os.path.basename(os.fspath(config))]
    parts += ["--tokenizer", tokenizer] if tokenizer else ["--no-tokenizer"]
    if official is not None:
        parts += ["--official", official.name]
    return " ".join(parts + ["--output", "OUTPUT"])


def write_model_card(
    output_dir: str | os.PathLike,
    result: ConversionResult,
    base_model: str | None = None,
    repo_id: str | None = None,
    official: OfficialCheckpoint | str | None = None,
    command: str | None = None,
) -> Any:
    """Write `README.md` with `modeling_xvlm.create_model_card`: the task row's metadata (library, pipeline tag)
    plus the base model, the source file and its sha256, an "Official result" section (the official README's
    numbers of `official`, a row of `official_checkpoints.OFFICIAL_CHECKPOINTS`, or of every released checkpoint of
    the task) and a "Conversion" section (what was converted and `command`, the command that did it).

    `repo_id` (default: the folder name) is used in the title and the usage snippets.
    """
    output_dir = os.fspath(output_dir)
    if isinstance(official, str):
        official = _official_row(official, result.task)
    source_name = os.path.basename(result.source) if result.source else "an official X-VLM state dict"
    config = copy.deepcopy(result.config)
    config.architectures = [HEAD_CLASS_NAMES[result.task]]  # selects the task row of the card
    command = command or conversion_command(result, official=official)
    metadata = {
        "original_checkpoint": source_name,
        "original_checkpoint_sha256": result.source_sha256,
        "original_repository": "https://github.com/zengyan-97/X-VLM",
    }
    if official is not None:
        metadata["original_checkpoint_name"] = official.readme_name
    card = create_model_card(
        repo_id or os.path.basename(os.path.normpath(os.path.abspath(output_dir))),
        config,
        base_model=base_model,
        tags=["xvlm", result.task, "converted"],
        description=(
            f"X-VLM ({result.task}) converted 1:1 from the official checkpoint `{source_name}` (sha256 "
            f"`{result.source_sha256 or 'n/a'}`) of [zengyan-97/X-VLM](https://github.com/zengyan-97/X-VLM) with "
            f"`xvlm-convert --task {result.task}`. {MODEL_TASKS[result.task].summary}"
        ),
        sections=[
            ("Official result", _official_result_section(result.task, official)),
            ("Conversion", f"Converted with\n\n```bash\n{command}\n```\n\n{_conversion_notes(result)}"),
        ],
        metadata=metadata,
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card


def _official_row(name: str, task: str | None) -> OfficialCheckpoint:
    """The `OFFICIAL_CHECKPOINTS` row `name`, checked against the task being converted."""
    try:
        row = official_checkpoint(name)
    except KeyError as error:
        raise ConversionError(str(error.args[0])) from None
    if task is not None and row.task != task:
        raise ConversionError(
            f"--official {name} is the official {row.readme_name} checkpoint, which converts with --task {row.task}, "
            f"not --task {task}."
        )
    return row


# ----------------------------------------------------------------------------------------------------------------
# The Hub
# ----------------------------------------------------------------------------------------------------------------


def check_hub_reachable(repo_id: str) -> None:
    """Fail at once (before any conversion work) when `--push-to-hub` cannot work: the Hub is offline."""
    if hub_offline():
        raise ConversionError(
            f"--push-to-hub {repo_id}: the Hub is offline (HF_HUB_OFFLINE=1), so nothing can be uploaded. Unset "
            "HF_HUB_OFFLINE (and log in with `hf auth login`), or convert without --push-to-hub and upload the "
            "folder later with `hf upload REPO FOLDER`."
        )


def push_folder(output_dir: str | os.PathLike, repo_id: str, api: HfApi | None = None, private: bool | None = None) -> str:
    """Upload a written folder (model, processor, tokenizer, model card) to the Hub repo `repo_id` with
    huggingface_hub's own API: `HfApi.create_repo(exist_ok=True)` then `HfApi.upload_folder`.

    Returns the repo URL. `api` defaults to `HfApi()` (the token of `hf auth login` / `HF_TOKEN`).
    """
    check_hub_reachable(repo_id)
    api = api or HfApi()
    url = api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=os.fspath(output_dir),
        commit_message="Convert an official X-VLM checkpoint (xvlm-convert)",
    )
    return str(url)


#: VQA questions as the official evaluation reads them (`dataset/vqa_dataset.py` test split: `pre_question` with
#: 50 words; `VQA.py` tokenises them without truncation).
VQA_MAX_WORDS = 50


#: `xvlm-convert --tokenizer` default: the tokenizer the official configs name (`text_encoder: data/bert-base-uncased`).
DEFAULT_TOKENIZER = "bert-base-uncased"


def hub_offline() -> bool:
    """Whether the Hub is switched off (`HF_HUB_OFFLINE=1`), read at call time (huggingface_hub reads it at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(hub_constants.HF_HUB_OFFLINE) or flag.upper() in ("1", "ON", "YES", "TRUE")


def _is_tokenizer_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file())


def load_tokenizer(
    name_or_path: str | os.PathLike, from_hub: Callable[..., Any] | None = None
) -> Any:
    """The BERT tokenizer of the converted model: a local folder (with `vocab.txt` or `tokenizer.json`) if
    `name_or_path` is one, else the Hub repo of that name (`bert-base-uncased` by default on the command line; with
    `HF_HUB_OFFLINE=1` only a copy in the Hugging Face cache).

    `from_hub(name, local_files_only=...)` loads a Hub tokenizer (default `BertTokenizer.from_pretrained`; injectable
    for tests). Raises `ConversionError` (one line) saying what was tried: the local folder, and the Hub (offline
    and not cached, or the download failed).
    """
    name = os.fspath(name_or_path)
    path = Path(name)
    if _is_tokenizer_folder(path):
        return BertTokenizer.from_pretrained(name)
    if path.exists() or name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)):
        raise ConversionError(f"--tokenizer {name!r} must be a folder with a BERT vocab.txt (or tokenizer.json).")
    offline = hub_offline()
    try:
        tokenizer = (from_hub or BertTokenizer.from_pretrained)(name, local_files_only=offline)
        if tokenizer.vocab_size <= len(tokenizer.all_special_ids):
            # transformers 5 builds a tokenizer of the special tokens alone when it finds no vocabulary file
            raise OSError("no vocabulary file found")
        return tokenizer
    except (OSError, ValueError) as error:  # transformers raises OSError for unreachable / unknown / uncached repos
        if offline:
            hub = "the Hub is offline (HF_HUB_OFFLINE=1) and the Hugging Face cache has no copy"
        else:
            reason = str(error).splitlines()[0] if str(error) else ""
            hub = f"loading it from the Hub failed ({type(error).__name__}: {reason})"
        raise ConversionError(
            f"--tokenizer {name!r}: tried the local folder {path.absolute()} (no such folder with a vocab.txt) and "
            f"the Hub repo {name} ({hub}). Download it once where the Hub is reachable (`hf download {name} "
            f"vocab.txt tokenizer_config.json --local-dir {path.name}`) and pass the folder as --tokenizer, or "
            "convert without a processor (--no-tokenizer)."
        ) from None


def _build_processor(tokenizer: Any, config: XVLMConfig, task: str) -> XVLMProcessor:
    """The `XVLMProcessor` of the converted model: PIL image processor at its size and the BERT tokenizer; for
    `vqa` the official test-time question cleaning (`pre_question`, 50 words, no truncation below the position
    limit); every other task (captioning included) the standard text settings."""
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} tokens but the checkpoint's word embeddings only "
            f"{config.text_config.vocab_size}: pass the tokenizer the checkpoint was trained with (--tokenizer)."
        )
    text: dict[str, Any] = {}
    if task == "vqa":
        text = {
            "text_preprocessing": "question",
            "max_words": VQA_MAX_WORDS,
            "max_length": config.text_config.max_position_embeddings,
        }
    return XVLMProcessor.from_model_config(config, tokenizer=tokenizer, **text)


def _set_special_tokens(config: XVLMConfig, tokenizer: Any) -> None:
    """`text_config.bos_token_id` / `eos_token_id` = the tokenizer's [CLS] / [SEP] (what answer generation starts
    from and stops at)."""
    for name, token_id in (("bos_token_id", tokenizer.cls_token_id), ("eos_token_id", tokenizer.sep_token_id)):
        if token_id is None:
            raise ConversionError(f"The tokenizer has no {'[CLS]' if name == 'bos_token_id' else '[SEP]'} token.")
        setattr(config.text_config, name, int(token_id))


def _set_caption_decoding(model: torch.nn.Module, official: OfficialConfig | None, result: ConversionResult) -> None:
    """The official decoding settings (`num_beams`, `max_length`, `min_length` of the official config, else the
    head's defaults 3 / 20 / 5 of `configs/Captioning.yaml`) into `model.generation_config`; a prompt other than
    the official one is noted (generation continues whatever prompt it is given)."""
    for name, value in (official.generation if official is not None else {}).items():
        setattr(model.generation_config, name, value)
    config = model.generation_config
    result.notes.append(
        f"caption decoding (generation_config): num_beams {config.num_beams}, max_length {config.max_length}, "
        f"min_length {config.min_length} (counting the prompt)"
    )
    if official is not None and official.prompt is not None and official.prompt != CAPTION_PROMPT:
        result.notes.append(
            f"the official config's prompt is {official.prompt!r}, not {CAPTION_PROMPT!r}: pass it to generate()"
        )


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


def _read_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
) -> tuple[Mapping[str, torch.Tensor], Any, str | None, str | None]:
    """(state dict, the config stored in the checkpoint, source path, its sha256) of a path or a loaded dict."""
    if isinstance(checkpoint, Mapping):
        state_dict, embedded_raw = split_checkpoint(checkpoint)
        return state_dict, embedded_raw, None, None
    source = os.fspath(checkpoint)
    loaded = load_official_checkpoint(source)
    sha = _sha256(source)
    state_dict, embedded_raw = split_checkpoint(loaded, source)
    return state_dict, embedded_raw, source, sha


def _read_task_config(config: str | os.PathLike | None) -> OfficialConfig | None:
    if config is None:
        return None
    try:
        return read_official_config(config)
    except NotImplementedError as error:
        raise ConversionError(str(error)) from None


def _convert_weights(
    state_dict: Mapping[str, torch.Tensor], task: str, model_config: XVLMConfig, inference: ArchitectureInference
) -> ConversionResult:
    """`convert_state_dict` for the geometry of `model_config`; the result carries the config and inference."""
    target_window = model_config.vision_config.window_size
    if target_window == inference.source_window and model_config.image_size == inference.source_image:
        target_window = None  # same geometry: every table (shrunk stages included) keeps its size
    result = convert_state_dict(state_dict, task, target_window=target_window, config=model_config)
    result.config = model_config
    result.inference = inference
    return result


def _build_model(result: ConversionResult) -> torch.nn.Module:
    model = head_class(result.task)(result.config)
    load_into_model(result, model)
    return model.eval()


def _write_folder(
    output_dir: str,
    model: torch.nn.Module,
    result: ConversionResult,
    processor: XVLMProcessor | None,
    card: dict[str, Any],
    verify: bool,
    say: Callable[[str], None],
) -> None:
    """Save model (+ code files), processor (+ tokenizer) and model card (`card`: `write_model_card` keywords);
    verify the reload."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    write_model_card(output_dir, result, **card)
    if verify:
        _verify_saved(output_dir, model, result.task)
        say(f"Verified: {output_dir} reloads with from_pretrained and every tensor is identical.")
    say(f"Wrote {output_dir}")


def convert_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    task: str | None = None,
    image_size: int | None = None,
    window_size: int | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: Any = None,
    push_to_hub: str | None = None,
    base_model: str | None = None,
    verify: bool = True,
    log: Callable[[str], None] | None = print,
    official: str | None = None,
    hub_api: HfApi | None = None,
    command: str | None = None,
) -> tuple[torch.nn.Module, ConversionResult]:
    """Convert an official X-VLM checkpoint into a Hugging Face model (and folder).

    Args:
        checkpoint: path of an official `.th` / `.pth` (or `.safetensors`) file, or an already loaded checkpoint
            dict (`{'model': state_dict, ...}` or a state dict).
        output_dir: folder to write (`config.json`, `model.safetensors`, `README.md`, processor and tokenizer
            files); `None` only builds and returns the model.
        task: `"pretrain"`, `"retrieval"`, `"grounding"`, `"vqa"`, `"captioning"`, `"nlvr2"` or `"nlvr2-pretrain"`;
            `None` detects it from the keys (`detect_task_with_evidence`; logged with the evidence).
        image_size: input size of the converted model (e.g. 384 for a 224 pre-training checkpoint fine-tuned at
            384); default: the checkpoint's.
        window_size: Swin window of the converted model (default: see `build_config`).
        config: an official task YAML (its `vision_config` / `text_config` JSONs are read too).
        tokenizer: a BERT tokenizer, a folder with its `vocab.txt`, or a Hub id (`load_tokenizer`); writes an
            `XVLMProcessor` (for `vqa` with the official question cleaning) and sets `text_config.bos_token_id` /
            `eos_token_id` to its [CLS] / [SEP] ids (what VQA and caption generation start from and stop at).
            `None`: no processor.
        push_to_hub: a Hub repo id: the written folder is uploaded with `HfApi.create_repo` + `upload_folder`
            (`push_folder`); offline (`HF_HUB_OFFLINE=1`) this fails before any conversion work.
        base_model: Hub id written as `base_model` in the model card.
        verify: re-read the written folder with `from_pretrained` and compare every tensor.
        log: where progress messages go (`None`: silent).
        official: the released checkpoint this is (a key of `official_checkpoints.OFFICIAL_CHECKPOINTS`): its
            official result goes into the model card, and its task is the default `task`.
        hub_api: the `HfApi` of the upload (default `HfApi()`).
        command: the command line recorded in the model card (default: an equivalent `xvlm-convert` line).

    Returns:
        `(model, result)`.
    """
    say = log or (lambda message: None)
    if push_to_hub:
        if output_dir is None:
            raise ConversionError("push_to_hub needs an output_dir to write the folder first.")
        check_hub_reachable(push_to_hub)
    row = _official_row(official, task) if official is not None else None
    state_dict, embedded_raw, source, sha = _read_checkpoint(checkpoint)
    tokenizer_name = os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
    if tokenizer_name is not None:
        tokenizer = load_tokenizer(tokenizer_name)
    if task is None:
        task, evidence = detect_task_with_evidence(state_dict)
        say(f"Detected task: {task} -> {HEAD_CLASS_NAMES[task]} (the checkpoint has {evidence})")
        if row is not None and row.task != task:
            raise ConversionError(
                f"--official {row.name} converts with --task {row.task}, but the keys say {task}: check the file."
            )
    if task not in TASKS:
        raise ConversionError(f"Unknown task {task!r}; choose one of {TASKS}.")
    official_config = _read_task_config(config)
    embedded = _official_from_checkpoint(embedded_raw, source) if official_config is None else None
    model_config, inference = build_config(
        state_dict, official_config, image_size=image_size, window_size=window_size, embedded=embedded, log=say,
        task=task,
    )
    processor = _build_processor(tokenizer, model_config, task) if tokenizer is not None else None
    if processor is not None:
        _set_special_tokens(model_config, processor.tokenizer)
    elif task in ("vqa", "captioning"):
        say("No tokenizer: text_config.bos_token_id / eos_token_id stay unset (generate() needs [CLS] / [SEP]).")
    result = _convert_weights(state_dict, task, model_config, inference)
    result.source, result.source_sha256 = source, sha
    if task != _safe_detect(state_dict):
        result.notes.append(f"converted a {_safe_detect(state_dict)} checkpoint for the {task} task")
    model = _build_model(result)
    if task == "captioning":
        _set_caption_decoding(model, official_config or embedded, result)
    say(result.summary())

    if output_dir is not None:
        card = {
            "base_model": base_model,
            "repo_id": push_to_hub,
            "official": row,
            "command": command or conversion_command(result, tokenizer_name, row, config),
        }
        _write_folder(os.fspath(output_dir), model, result, processor, card, verify, say)
        if push_to_hub:
            url = push_folder(output_dir, push_to_hub, api=hub_api)
            say(f"Pushed {output_dir} to {url}")
    return model, result
