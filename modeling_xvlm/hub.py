"""Hugging Face Hub integration: Auto-class registration for remote code, and model cards.

Importing `modeling_xvlm` calls :func:`register_auto_classes`, which

- makes sure the X-VLM models are reachable through their transformers Auto classes in this interpreter
  (`AutoModel` -> `XVLMModel`, `AutoModelForZeroShotImageClassification` -> `XVLMForRetrieval`,
  `AutoModelForPreTraining` -> `XVLMForPretraining`; `XVLMForGrounding` has no task Auto class), and
- calls `register_for_auto_class` on the config, the four model classes, both image processors and the processor,
  so that `save_pretrained` / `push_to_hub` write an `auto_map` and copy the code files next to the weights. A saved
  folder then loads with `trust_remote_code=True` where only transformers is installed (see docs/hub.md).

:func:`create_model_card` builds a `huggingface_hub.ModelCard` (YAML metadata + README text) for a checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
)
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .modeling_xvlm import XVLMModel
from .modeling_xvlm_grounding import XVLMForGrounding
from .modeling_xvlm_pretraining import XVLMForPretraining
from .modeling_xvlm_retrieval import XVLMForRetrieval
from .configuration_xvlm import XVLMConfig

logger = logging.get_logger(__name__)

MODEL_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (XVLMModel, XVLMForRetrieval, XVLMForGrounding, XVLMForPretraining)
}

# Model class name -> the transformers Auto class whose `from_pretrained` loads it, locally and as remote code.
MODEL_AUTO_CLASSES: dict[str, str] = {
    "XVLMModel": "AutoModel",
    "XVLMForRetrieval": "AutoModelForZeroShotImageClassification",
    "XVLMForPretraining": "AutoModelForPreTraining",
}
# Heads without a fitting transformers task Auto class (grounding predicts one box per text, not per-query
# detections): with remote code they load through `AutoModel`, the Hub convention for custom architectures.
# Locally (package installed) load them with their own class, e.g. `XVLMForGrounding.from_pretrained(...)`.
REMOTE_ONLY_AUTO_CLASSES: dict[str, str] = {"XVLMForGrounding": "AutoModel"}
_AUTO_MODEL_CLASSES = {
    "AutoModel": AutoModel,
    "AutoModelForZeroShotImageClassification": AutoModelForZeroShotImageClassification,
    "AutoModelForPreTraining": AutoModelForPreTraining,
}

# Architecture -> Hub `pipeline_tag` (a Hub task id; grounding is closest to text-conditioned detection).
PIPELINE_TAGS: dict[str, str] = {
    "XVLMModel": "zero-shot-image-classification",
    "XVLMForRetrieval": "zero-shot-image-classification",
    "XVLMForGrounding": "zero-shot-object-detection",
    "XVLMForPretraining": "feature-extraction",
}

XVLM_CITATION = """@inproceedings{zeng2022multi,
  title     = {Multi-Grained Vision Language Pre-Training: Aligning Texts with Visual Concepts},
  author    = {Zeng, Yan and Zhang, Xinsong and Li, Hang},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning (ICML)},
  year      = {2022},
  note      = {arXiv:2111.08276}
}"""


def _mapped_class(auto_class: Any) -> type | None:
    try:
        return auto_class._model_mapping[XVLMConfig]
    except KeyError:
        return None


def register_auto_classes() -> dict[str, str]:
    """Register X-VLM with the Auto classes (local) and for remote code (`register_for_auto_class`).

    Safe to call several times. A local Auto mapping that another module already set for `XVLMConfig` is kept;
    a model class is registered for remote code under the Auto class that loads it locally.

    Returns:
        `{class name: Auto class name}` of everything registered for remote code.
    """
    registered: dict[str, str] = {}
    AutoConfig.register("xvlm", XVLMConfig, exist_ok=True)
    if not _check_flat(XVLMConfig):
        return registered
    XVLMConfig.register_for_auto_class("AutoConfig")
    registered["XVLMConfig"] = "AutoConfig"
    models_flat = _check_flat(XVLMModel)
    for class_name, auto_name in MODEL_AUTO_CLASSES.items():
        model_class = MODEL_CLASSES.get(class_name)
        if model_class is None:  # a head that this version of the package does not define
            continue
        auto_class = _AUTO_MODEL_CLASSES[auto_name]
        current = _mapped_class(auto_class)
        if current is None:
            auto_class.register(XVLMConfig, model_class, exist_ok=True)
        elif current is not model_class:
            # Someone mapped this Auto class to another X-VLM class: use the first Auto class that maps to ours.
            auto_name = next(
                (name for name, auto in _AUTO_MODEL_CLASSES.items() if _mapped_class(auto) is model_class), None
            )
            if auto_name is None:
                continue
        if models_flat:
            model_class.register_for_auto_class(auto_name)
            registered[class_name] = auto_name
    for class_name, auto_name in REMOTE_ONLY_AUTO_CLASSES.items():
        model_class = MODEL_CLASSES.get(class_name)
        if model_class is not None and models_flat:
            model_class.register_for_auto_class(auto_name)
            registered[class_name] = auto_name
    registered.update(_register_processors())
    return registered


def ships_flat(cls: type) -> bool:
    """Whether the module defining `cls` can be copied flat next to a checkpoint as remote code.

    transformers copies the module file and, recursively, every file it imports with `from .name import ...`
    from the same folder; `from ..package import ...` or `from .sub.module import ...` cannot be shipped.
    """
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if path is None:
        return False
    try:
        needed = get_relative_import_files(path)
    except OSError:
        return False
    return all(os.path.isfile(f) for f in needed)


def _check_flat(cls: type) -> bool:
    if ships_flat(cls):
        return True
    logger.warning(
        "%s is not registered for remote code: its module imports a file that cannot be copied flat next to a "
        "checkpoint (use `from .sibling import ...` only). save_pretrained will not write its code files.",
        cls.__name__,
    )
    return False


def _register_processors() -> dict[str, str]:
    try:
        from .processing import XVLMImageProcessor, XVLMImageProcessorPil, XVLMProcessor
    except ImportError:  # the processing sub-package is optional for the model code
        return {}
    registered = {}
    for cls, auto_name in (
        (XVLMImageProcessorPil, "AutoImageProcessor"),
        (XVLMImageProcessor, "AutoImageProcessor"),
        (XVLMProcessor, "AutoProcessor"),
    ):
        # Registering a class whose module cannot be shipped would make its save_pretrained fail.
        if _check_flat(cls):
            cls.register_for_auto_class(auto_name)
            registered[cls.__name__] = auto_name
    return registered


# ----------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------

# Metric keys written by the official evaluation (`itm_eval`, `grounding_eval_bbox`) and by `xvlm-eval`.
_METRIC_NAMES = {
    "txt_r1": "Text retrieval R@1",
    "txt_r5": "Text retrieval R@5",
    "txt_r10": "Text retrieval R@10",
    "txt_r_mean": "Text retrieval mean recall",
    "img_r1": "Image retrieval R@1",
    "img_r5": "Image retrieval R@5",
    "img_r10": "Image retrieval R@10",
    "img_r_mean": "Image retrieval mean recall",
    "r_mean": "Mean recall",
    "val_d": "Accuracy@0.5 (val)",
    "testA_d": "Accuracy@0.5 (testA)",
    "testB_d": "Accuracy@0.5 (testB)",
}
_TASK_TYPES = {
    "retrieval": ("image-text-retrieval", "Image-text retrieval"),
    "grounding": ("visual-grounding", "Visual grounding"),
    "zero-shot-image-classification": ("zero-shot-image-classification", "Zero-shot image classification"),
}


def _flatten_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat[name] = float(value)
        elif isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, f"{name}/"))
    return flat


def load_eval_results(results: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """Normalise evaluation results (an `xvlm-eval` JSON file, or its parsed content) to a list of records.

    Accepted shapes:

    - a flat dict of metrics, e.g. the official `itm_eval` output `{"txt_r1": 81.2, ..., "r_mean": 86.1}`;
    - a record `{"task": "retrieval", "dataset": "coco", "split": "test", "metrics": {...}}` (`dataset_name`,
      `dataset_type`, `dataset_split` are accepted spellings, and nested metric dicts are flattened with `/`);
    - a list of records, or `{"results": [records]}`.

    Returns:
        `[{"task", "dataset", "split", "metrics": {name: float}}]` (`task`/`dataset`/`split` may be `None`).
    """
    if isinstance(results, (str, os.PathLike)):
        with open(results, encoding="utf-8") as handle:
            results = json.load(handle)
    if isinstance(results, Mapping) and "results" in results and not isinstance(results["results"], (int, float)):
        results = results["results"]
    records = [results] if isinstance(results, Mapping) else list(results)
    normalised = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"eval result {i} must be a dict, got {type(record).__name__}.")
        if "metrics" in record:
            metrics = _flatten_metrics(record["metrics"])
        else:
            metrics = _flatten_metrics({k: v for k, v in record.items() if k not in ("task", "dataset", "split")})
        if not metrics:
            raise ValueError(f"eval result {i} has no numeric metric: {dict(record)!r}.")
        normalised.append(
            {
                "task": record.get("task"),
                "dataset": record.get("dataset", record.get("dataset_name", record.get("dataset_type"))),
                "split": record.get("split", record.get("dataset_split")),
                "metrics": metrics,
            }
        )
    return normalised


def _infer_task(metrics: Mapping[str, float]) -> str | None:
    if any(k.split("/")[-1] in ("txt_r1", "img_r1", "r_mean") for k in metrics):
        return "retrieval"
    if any(k.split("/")[-1] in ("val_d", "testA_d", "testB_d") for k in metrics):
        return "grounding"
    return None


def _architecture(model_or_config: Any) -> tuple[str, Any]:
    if model_or_config is None:
        return "XVLMModel", None
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(model_or_config, "config"):
        name = type(model_or_config).__name__
    else:
        name = (getattr(config, "architectures", None) or ["XVLMModel"])[0]
    return name, config


def _describe_config(config: Any) -> str:
    if config is None:
        return ""
    vision, text = config.vision_config, config.text_config
    return (
        f"- image encoder: Swin Transformer, {config.image_size} px input, embed dim {vision.embed_dim}, depths "
        f"{list(vision.depths)}, window {vision.window_size}; {config.num_patches} patch tokens of width "
        f"{config.vision_width} plus a [CLS]-like mean token\n"
        f"- text encoder: {text.fusion_layer} BERT layers (hidden {text.hidden_size}, vocabulary {text.vocab_size})\n"
        f"- fusion encoder: {text.num_hidden_layers - text.fusion_layer} BERT layers with cross-attention to the "
        f"image tokens\n"
        f"- contrastive (ITC) space: {config.projection_dim}-d\n"
    )


_USAGE = {
    "XVLMForRetrieval": """```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="{repo_id}", trust_remote_code=True)
classifier("cat.jpg", candidate_labels=["a cat", "a dog"])

# or, with the package installed (`import modeling_xvlm`), the retrieval pipeline over a small gallery:
retriever = pipeline("image-text-retrieval", model="{repo_id}")
retriever("a dog on a sofa", gallery=["1.jpg", "2.jpg", "3.jpg"], top_k=2)
```""",
    "XVLMForGrounding": """```python
import modeling_xvlm  # registers the "visual-grounding" pipeline
from transformers import pipeline

grounder = pipeline("visual-grounding", model="{repo_id}")
result = grounder("street.jpg", "the man on the left")
result["box"], result["preview"].save("preview.png")
```""",
}
_USAGE_DEFAULT = """```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=image, text=["a photo of a dog"])
features = model.get_image_features(inputs["pixel_values"]).pooler_output
```"""

_INTENDED_USE = {
    "XVLMForRetrieval": "Image-to-text and text-to-image retrieval (ITC candidates re-ranked by the ITM head) and "
    "zero-shot image classification over free-text labels.",
    "XVLMForGrounding": "Referring-expression grounding: one box per (image, expression) pair.",
    "XVLMForPretraining": "Continued pre-training and fine-tuning of X-VLM (ITC, ITM, MLM and box losses).",
    "XVLMModel": "Image, region and text features in a shared space (feature extraction, zero-shot classification).",
}


def create_model_card(
    repo_id: str,
    model: Any = None,
    *,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    eval_results: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    license: str = "bsd-3-clause",
    language: str | list[str] | None = "en",
    tags: Sequence[str] = (),
    description: str | None = None,
    intended_use: str | None = None,
    limitations: str | None = None,
) -> ModelCard:
    """Build the model card (README.md with YAML metadata) of an X-VLM checkpoint.

    Args:
        repo_id: the Hub repository, e.g. `"org/xvlm-base-coco-retrieval"` (used in the title and the snippets).
        model: the model or its config (the architecture, `pipeline_tag` and the size summary come from it).
        base_model: the checkpoint this one was fine-tuned from (Hub id).
        datasets: training datasets (Hub ids or names).
        eval_results: an `xvlm-eval` JSON file / dict / list (see :func:`load_eval_results`); becomes the
            `model-index` metadata and a results table.
        license: SPDX-like license id of the weights.
        language: language(s) of the text encoder.
        tags: extra tags (`x-vlm`, `vision-language` and the task tags are always added).
        description, intended_use, limitations: override the generated text of those sections.

    Returns:
        A `huggingface_hub.ModelCard`: `card.save("folder/README.md")` or `card.push_to_hub(repo_id)`.
    """
    architecture, config = _architecture(model)
    pipeline_tag = PIPELINE_TAGS.get(architecture, "feature-extraction")
    records = load_eval_results(eval_results) if eval_results is not None else []
    dataset_list = [datasets] if isinstance(datasets, str) else list(datasets or [])
    model_name = repo_id.split("/")[-1]

    hub_eval_results = []
    for record in records:
        task = record["task"] or _infer_task(record["metrics"]) or "retrieval"
        task_type, task_name = _TASK_TYPES.get(task, (task, task.replace("-", " ").capitalize()))
        dataset = record["dataset"] or (dataset_list[0] if dataset_list else "custom")
        for metric, value in record["metrics"].items():
            hub_eval_results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=record["split"],
                    metric_type=metric,
                    metric_name=_METRIC_NAMES.get(metric.split("/")[-1], metric),
                    metric_value=value,
                )
            )
    metric_keys = sorted({r.metric_type for r in hub_eval_results})
    all_tags = ["x-vlm", "vision-language", "custom_code", *tags]
    if pipeline_tag not in all_tags:
        all_tags.append(pipeline_tag)
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        language=language,
        tags=list(dict.fromkeys(all_tags)),
        datasets=dataset_list or None,
        base_model=base_model,
        metrics=metric_keys or None,
        eval_results=hub_eval_results or None,
    )

    lines = [f"# {model_name}", ""]
    lines.append(
        description
        or (
            f"An X-VLM `{architecture}` checkpoint. X-VLM (Zeng, Zhang and Li, ICML 2022) aligns texts with visual "
            "concepts at several granularities - the whole image, regions and objects - with a Swin Transformer "
            "image encoder, a BERT text encoder and a cross-modal fusion encoder."
        )
    )
    lines.append("")
    summary = _describe_config(config)
    if summary:
        lines += ["## Model", "", summary]
    lines += ["## Intended use", "", intended_use or _INTENDED_USE.get(architecture, _INTENDED_USE["XVLMModel"]), ""]
    lines += [
        "## Limitations",
        "",
        limitations
        or "English captions only; inputs are squashed to a square image (no aspect-preserving crop); the model "
        "inherits the biases of its web and COCO/Visual-Genome training data.",
        "",
    ]
    lines += [
        "## How to use",
        "",
        "The repository ships its modelling code (`trust_remote_code=True`); with `pip install modeling-xvlm` and "
        "`import modeling_xvlm` no remote code is executed.",
        "",
        _USAGE.get(architecture, _USAGE_DEFAULT).replace("{repo_id}", repo_id),
        "",
    ]
    if base_model or dataset_list:
        lines += ["## Training", ""]
        if base_model:
            names = [base_model] if isinstance(base_model, str) else list(base_model)
            lines.append(f"- base model: {', '.join(f'`{name}`' for name in names)}")
        if dataset_list:
            lines.append(f"- datasets: {', '.join(dataset_list)}")
        lines.append("")
    if records:
        lines += ["## Evaluation", "", "| task | dataset | split | metric | value |", "|---|---|---|---|---|"]
        for result in hub_eval_results:
            lines.append(
                f"| {result.task_name} | {result.dataset_name} | {result.dataset_split or ''} | "
                f"{result.metric_name} | {result.metric_value:.2f} |"
            )
        lines.append("")
    lines += ["## Citation", "", "```bibtex", XVLM_CITATION, "```", ""]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


__all__ = [
    "MODEL_AUTO_CLASSES",
    "PIPELINE_TAGS",
    "XVLM_CITATION",
    "create_model_card",
    "load_eval_results",
    "register_auto_classes",
    "ships_flat",
]


def _register_all() -> None:
    register_auto_classes()
    from .pipelines import register_pipelines

    register_pipelines(grounding_model_class=XVLMForGrounding)


_register_all()
