"""Reading official X-VLM task configurations (a task YAML plus the JSON files it names).

An official task YAML (e.g. `configs/Retrieval_coco.yaml`) sets `use_swin`, `image_res`, `embed_dim`, `temp` (VQA:
`num_dec_layers`; captioning, `configs/Captioning.yaml`: `label_smoothing`, the decoding `num_beams`, `max_length`,
`min_length` and the `prompt`) and
the paths `vision_config` (e.g. `configs/config_swinB_384.json`: `image_res`, `window_size`, `embed_dim`, `depths`,
`num_heads`, `vision_width`) and `text_config` (`configs/config_bert.json`: a BERT config plus `fusion_layer`).
The JSON paths are resolved, in order, relative to the YAML file's folder, the working directory, and the YAML
folder's parents (the official YAMLs live in `configs/` and name `configs/...json` relative to the repository
root).

The YAML is read with PyYAML, which is already a dependency of transformers and huggingface_hub (so nothing is
added to the install requirements).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # a dependency of transformers

from modeling_xvlm.configuration_xvlm import BERT_TEXT_FIELDS

__all__ = ["OfficialConfig", "read_official_config", "resolve_config_path"]


@dataclass
class OfficialConfig:
    """The architecture-relevant parts of an official configuration."""

    vision: dict[str, Any] = field(default_factory=dict)  # SwinConfig fields
    text: dict[str, Any] = field(default_factory=dict)  # XVLMTextConfig fields
    # XVLMConfig fields (projection_dim, temperature_init, num_decoder_layers, label_smoothing)
    top: dict[str, Any] = field(default_factory=dict)
    # Caption decoding (GenerationConfig fields num_beams, max_length, min_length) and the caption prompt.
    generation: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    sources: dict[str, str] = field(default_factory=dict)  # file each part came from


def resolve_config_path(name: str, yaml_path: str | os.PathLike | None) -> Path:
    """Find a JSON file named in an official YAML (see the module docstring for the search order)."""
    candidates: list[Path] = []
    raw = Path(name)
    if raw.is_absolute():
        candidates.append(raw)
    else:
        if yaml_path is not None:
            candidates.append(Path(yaml_path).resolve().parent / raw)
        candidates.append(Path.cwd() / raw)
        if yaml_path is not None:
            candidates.extend(parent / raw for parent in Path(yaml_path).resolve().parent.parents)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates[:4])
    raise FileNotFoundError(f"Config file {name!r} named in {yaml_path} was not found (tried {tried}).")


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an official X-VLM task YAML (expected a mapping at the top level).")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


VISION_KEYS = ("embed_dim", "depths", "num_heads", "window_size")
TEXT_KEYS = (*BERT_TEXT_FIELDS, "fusion_layer")
#: The caption decoding settings of `configs/Captioning.yaml` (Captioning.py passes them to `generate`).
CAPTION_DECODING = ("num_beams", "max_length", "min_length")


def parse_official_config(task_config: dict[str, Any], yaml_path: str | os.PathLike | None = None) -> OfficialConfig:
    """Turn an official task config dict (a loaded YAML, or the `config` stored in a checkpoint) into field dicts.

    Raises:
        NotImplementedError: for the CLIP-ViT / DeiT backbones or the RoBERTa text encoder (not supported).
        FileNotFoundError: when a named JSON file cannot be found.
    """
    result = OfficialConfig()
    if task_config.get("use_clip_vit") or not task_config.get("use_swin", True):
        raise NotImplementedError(
            "Only the Swin backbone of X-VLM is supported (the config sets use_clip_vit or use_swin: False)."
        )
    if task_config.get("use_roberta"):
        raise NotImplementedError("The RoBERTa text encoder of X-VLM is not supported (use_roberta: True).")

    if task_config.get("vision_config"):
        vision_path = resolve_config_path(str(task_config["vision_config"]), yaml_path)
        vision_json = _read_json(vision_path)
        result.sources["vision"] = str(vision_path)
        for key in VISION_KEYS:
            if key in vision_json:
                result.vision[key] = vision_json[key]
        if "image_res" in vision_json:
            result.vision["image_size"] = int(vision_json["image_res"])
    if "image_res" in task_config:
        image_res = int(task_config["image_res"])
        if "image_size" in result.vision and result.vision["image_size"] != image_res:
            raise ValueError(
                f"The task config says image_res {image_res} but its vision config says "
                f"{result.vision['image_size']} (the official code asserts they are equal)."
            )
        result.vision["image_size"] = image_res

    if task_config.get("text_config"):
        text_path = resolve_config_path(str(task_config["text_config"]), yaml_path)
        text_json = _read_json(text_path)
        result.sources["text"] = str(text_path)
        for key in TEXT_KEYS:
            if key in text_json:
                result.text[key] = text_json[key]

    if "embed_dim" in task_config:
        result.top["projection_dim"] = int(task_config["embed_dim"])
    if "temp" in task_config:
        result.top["temperature_init"] = float(task_config["temp"])
    if "num_dec_layers" in task_config:  # configs/VQA.yaml: the answer decoder's layers
        result.top["num_decoder_layers"] = int(task_config["num_dec_layers"])
    if "label_smoothing" in task_config:  # configs/Captioning.yaml (model_captioning.py reads it)
        result.top["label_smoothing"] = float(task_config["label_smoothing"])
    for name in CAPTION_DECODING:
        if name in task_config:
            result.generation[name] = int(task_config[name])
    if "prompt" in task_config:
        result.prompt = str(task_config["prompt"])
    return result


def read_official_config(yaml_path: str | os.PathLike) -> OfficialConfig:
    """Read an official task YAML and the vision/text JSON files it names."""
    config = parse_official_config(_read_yaml(yaml_path), yaml_path)
    config.sources["task"] = str(yaml_path)
    return config
