"""Hugging Face Hub integration: the one registration function, remote code, and model cards.

`import modeling_xvlm` calls :func:`register_xvlm` once. It reads the task table (`modeling_xvlm.tasks`) and

- registers the configs with `AutoConfig` and each model class with the Auto class of its row (`AutoModel` ->
  `XVLMModel`, `AutoModelForZeroShotImageClassification` -> `XVLMForRetrieval`, `AutoModelForPreTraining` ->
  `XVLMForPretraining` or `XVLMForTextAssignment`, `AutoModelForZeroShotObjectDetection` -> `XVLMForGrounding`,
  `AutoModelForSequenceClassification` -> `XVLMForImagesAndTextClassification`,
  `AutoModelForVisualQuestionAnswering` -> `XVLMForQuestionAnswering`; :func:`local_auto_classes`) through
  transformers' public `register` API, keeping any mapping another module already made for `XVLMConfig` (nothing
  of transformers is replaced). `AutoModel` is the base model for every checkpoint, locally and as remote code. `AutoModelForImageTextToText` (what transformers'
  `"image-text-to-text"` pipeline loads) maps `XVLMConfig` to both generative heads, `generative_heads()`:
  transformers' auto classes take a tuple of classes for one config class and load the one named in
  `config.architectures` (`XVLMForConditionalGeneration` for a captioning folder, `XVLMForQuestionAnswering` for a
  VQA one), the first (captioning) when neither is named;
- calls `register_for_auto_class` on the config, every model class (under its row's `remote_auto_class`), both
  image processors and the processor, so that `save_pretrained` / `push_to_hub` write an `auto_map` and copy the
  code files flat next to the weights. A saved folder then loads with `trust_remote_code=True` where only
  transformers is installed (see docs/hub.md);
- registers the X-VLM pipelines (`pipelines.register_pipelines`: `"image-text-retrieval"`, `"visual-grounding"`,
  `"xvlm-vqa"`).

:func:`create_model_card` builds a `huggingface_hub.ModelCard` (YAML metadata + README text) for a checkpoint; the
converter (`xvlm-convert`) writes its cards with it too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .modeling_xvlm import XVLMPreTrainedModel
from .modeling_xvlm_text import XVLMTextModel
from .pipelines import register_pipelines
from .processing import XVLMImageProcessor, XVLMImageProcessorPil, XVLMProcessor
from .tasks import BASE_MODEL, TASKS, XVLMTask, all_rows, task_of

logger = logging.get_logger(__name__)

#: The Auto class of transformers' `"image-text-to-text"` pipeline: mapped (locally) to `GENERATIVE_HEADS`.
GENERATIVE_AUTO_CLASS = "AutoModelForImageTextToText"
#: The task rows whose heads `GENERATIVE_AUTO_CLASS` loads, chosen by `config.architectures`; the first is the
#: default (architectures naming neither head, e.g. a pre-training folder). transformers' lookup iterates
#: `config.architectures`, so a config without any (a fresh `XVLMConfig()`) needs them set for `from_config`.
GENERATIVE_HEADS = ("captioning", "vqa")

XVLM_CITATION = """@inproceedings{zeng2022multi,
  title     = {Multi-Grained Vision Language Pre-Training: Aligning Texts with Visual Concepts},
  author    = {Zeng, Yan and Zhang, Xinsong and Li, Hang},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning (ICML)},
  year      = {2022},
  note      = {arXiv:2111.08276}
}"""


def _register_config(config_class: type) -> None:
    """`AutoConfig.register` unless the model type is already taken (by this class or another one: kept)."""
    if config_class.model_type in CONFIG_MAPPING:
        if CONFIG_MAPPING[config_class.model_type] is not config_class:
            logger.warning("AutoConfig already maps %r to another class; kept.", config_class.model_type)
        return
    AutoConfig.register(config_class.model_type, config_class)


def _register_local(auto_name: str, config_class: type, model_class: type) -> None:
    """Map `config_class` to `model_class` in `auto_name` unless a mapping for `config_class` already exists there."""
    auto_class = getattr(transformers, auto_name)
    try:
        auto_class._model_mapping[config_class]
    except KeyError:
        auto_class.register(config_class, model_class)


def _register_processors_local() -> None:
    """`AutoImageProcessor` (both backends) and `AutoProcessor` for `XVLMConfig`, unless already mapped.

    transformers picks the torchvision backend when torchvision is installed; `XVLMProcessor.from_pretrained`
    defaults to the PIL backend (the official preprocessing to the pixel), and `AutoImageProcessor` takes
    `backend="pil"` for the same."""
    try:
        AutoImageProcessor.register(
            XVLMConfig, image_processor_classes={"pil": XVLMImageProcessorPil, "torchvision": XVLMImageProcessor}
        )
    except ValueError:  # already registered (by this function or by someone else): keep it
        pass
    try:
        AutoProcessor.register(XVLMConfig, XVLMProcessor)
    except ValueError:
        pass


def register_xvlm() -> dict[str, str]:
    """Register X-VLM with transformers: Auto classes (local), remote code (`register_for_auto_class`), pipelines.

    Safe to call several times. Only transformers' public registration APIs are used, and nothing that is
    already registered (a config model type, an Auto mapping for an X-VLM config) is replaced. Classes whose module cannot be copied flat (see
    :func:`ships_flat`) are not registered for remote code (a warning says so).

    Returns:
        `{class name: Auto class name}` of everything registered for remote code.
    """
    _register_config(XVLMConfig)
    _register_config(XVLMTextConfig)
    _register_local("AutoModel", XVLMTextConfig, XVLMTextModel)
    # One config class, several heads for some Auto classes: transformers' `_get_model_class` picks from the tuple
    # by `config.architectures` (the first when none matches), and the pipelines' model check knows every name.
    for auto_name, heads in local_auto_classes().items():
        _register_local(auto_name, XVLMConfig, heads[0] if len(heads) == 1 else heads)
    _register_processors_local()

    registered: dict[str, str] = {}
    remote = [(XVLMConfig, "AutoConfig")]
    remote += [(row.model_class, row.remote_auto_class) for row in all_rows()]
    remote += [
        (XVLMImageProcessorPil, "AutoImageProcessor"),
        (XVLMImageProcessor, "AutoImageProcessor"),
        (XVLMProcessor, "AutoProcessor"),
    ]
    for cls, auto_name in remote:
        # Registering a class whose module cannot be shipped would make its save_pretrained fail.
        if _check_flat(cls):
            cls.register_for_auto_class(auto_name)
            registered[cls.__name__] = auto_name

    register_pipelines(grounding_model_class=TASKS["grounding"].model_class)
    return registered


def local_auto_classes() -> dict[str, tuple[type[XVLMPreTrainedModel], ...]]:
    """`{Auto class name: head classes}` registered locally for `XVLMConfig` (task-table order, so the first row's
    head is the default when `config.architectures` names none); `GENERATIVE_AUTO_CLASS` is `generative_heads()`.

    Several heads share an Auto class (`AutoModelForPreTraining`: `XVLMForPretraining` and the NLVR2 text
    assignment head): transformers loads the one named in `config.architectures`, as the remote-code `auto_map` of
    that checkpoint does."""
    groups: dict[str, tuple[type[XVLMPreTrainedModel], ...]] = {}
    for row in all_rows():
        if row.auto_class is not None and row.auto_class != GENERATIVE_AUTO_CLASS:
            groups[row.auto_class] = groups.get(row.auto_class, ()) + (row.model_class,)
    groups[GENERATIVE_AUTO_CLASS] = generative_heads()
    return groups


def generative_heads() -> tuple[type[XVLMPreTrainedModel], ...]:
    """The head classes `AutoModelForImageTextToText` loads for `XVLMConfig` (`GENERATIVE_HEADS`), default first."""
    return tuple(TASKS[name].model_class for name in GENERATIVE_HEADS)


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
    "vqa_accuracy": "VQA accuracy",
    "exact_match": "Exact match",
}
# The caption metrics of `caption_metrics` / `xvlm-eval captioning` (pycocoevalcap, as the official evaluation).
_CAPTION_METRICS = frozenset({"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"})
# Bookkeeping numbers of `xvlm-eval` results: not metrics of the model (kept out of the card).
_NOT_METRICS = frozenset({"seconds", "num_examples", "num_annotated", "k_test"})
_TASK_TYPES = {
    "retrieval": ("image-text-retrieval", "Image-text retrieval"),
    "grounding": ("visual-grounding", "Visual grounding"),
    "vqa": ("visual-question-answering", "Visual question answering"),
    "captioning": ("image-to-text", "Image captioning"),
    "zero-shot-image-classification": ("zero-shot-image-classification", "Zero-shot image classification"),
}


def _flatten_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or key in _NOT_METRICS:
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

    Non-numeric values and `xvlm-eval`'s bookkeeping numbers (`seconds`, `num_examples`, `num_annotated`,
    `k_test`) are not metrics and are dropped.

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
    if any(k.split("/")[-1] == "vqa_accuracy" for k in metrics):
        return "vqa"
    if any(k.split("/")[-1] in _CAPTION_METRICS for k in metrics):
        return "captioning"
    return None


def _row_and_config(model_or_config: Any) -> tuple[XVLMTask, Any]:
    """The task-table row (`BASE_MODEL` for unknown architectures) and the config of a model or a config."""
    if model_or_config is None:
        return BASE_MODEL, None
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(model_or_config, "config"):
        name = type(model_or_config).__name__
    else:
        name = (getattr(config, "architectures", None) or [BASE_MODEL.model_class.__name__])[0]
    try:
        return task_of(name), config
    except KeyError:
        return BASE_MODEL, config


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


_USAGE_DEFAULT = """```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=image, text=["a photo of a dog"])
features = model.get_image_features(inputs["pixel_values"]).pooler_output
```"""
_LIMITATIONS = (
    "English captions only; inputs are squashed to a square image (no aspect-preserving crop); the model inherits "
    "the biases of its web and COCO/Visual-Genome training data."
)


def _eval_results(records: list[dict], dataset_list: list[str]) -> list[EvalResult]:
    results = []
    for record in records:
        task = record["task"] or _infer_task(record["metrics"]) or "retrieval"
        task_type, task_name = _TASK_TYPES.get(task, (task, task.replace("-", " ").capitalize()))
        dataset = record["dataset"] or (dataset_list[0] if dataset_list else "custom")
        for metric, value in record["metrics"].items():
            results.append(
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
    return results


def _training_section(base_model: str | list[str] | None, dataset_list: list[str]) -> list[str]:
    if not (base_model or dataset_list):
        return []
    lines = ["## Training", ""]
    if base_model:
        names = [base_model] if isinstance(base_model, str) else list(base_model)
        lines.append(f"- base model: {', '.join(f'`{name}`' for name in names)}")
    if dataset_list:
        lines.append(f"- datasets: {', '.join(dataset_list)}")
    return lines + [""]


def _evaluation_section(results: list[EvalResult]) -> list[str]:
    if not results:
        return []
    lines = ["## Evaluation", "", "| task | dataset | split | metric | value |", "|---|---|---|---|---|"]
    for result in results:
        lines.append(
            f"| {result.task_name} | {result.dataset_name} | {result.dataset_split or ''} | "
            f"{result.metric_name} | {result.metric_value:.2f} |"
        )
    return lines + [""]


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
    sections: Sequence[tuple[str, str]] = (),
    metadata: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Build the model card (README.md with YAML metadata) of an X-VLM checkpoint.

    Args:
        repo_id: the Hub repository, e.g. `"org/xvlm-base-coco-retrieval"` (used in the title and the snippets).
        model: the model or its config (the task-table row - `pipeline_tag`, intended use, usage snippet - and the
            size summary come from it).
        base_model: the checkpoint this one was fine-tuned from (Hub id).
        datasets: training datasets (Hub ids or names).
        eval_results: an `xvlm-eval` JSON file / dict / list (see :func:`load_eval_results`); becomes the
            `model-index` metadata and a results table.
        license: SPDX-like license id of the weights.
        language: language(s) of the text encoder.
        tags: extra tags (`x-vlm`, `vision-language`, `custom_code` and the pipeline tag are always added).
        description, intended_use, limitations: override the generated text of those sections.
        sections: extra `(title, markdown)` sections, written after "Limitations" (the converter's provenance).
        metadata: extra YAML metadata fields (e.g. `original_checkpoint`).

    Returns:
        A `huggingface_hub.ModelCard`: `card.save("folder/README.md")` or `card.push_to_hub(repo_id)`.
    """
    row, config = _row_and_config(model)
    architecture = row.model_class.__name__
    records = load_eval_results(eval_results) if eval_results is not None else []
    dataset_list = [datasets] if isinstance(datasets, str) else list(datasets or [])
    model_name = repo_id.split("/")[-1]
    hub_eval_results = _eval_results(records, dataset_list)
    metric_keys = sorted({r.metric_type for r in hub_eval_results})
    all_tags = ["x-vlm", "vision-language", "custom_code", *tags, *([row.pipeline_tag] if row.pipeline_tag else [])]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=row.pipeline_tag,
        license=license,
        language=language,
        tags=list(dict.fromkeys(all_tags)),
        datasets=dataset_list or None,
        base_model=base_model,
        metrics=metric_keys or None,
        eval_results=hub_eval_results or None,
        **dict(metadata or {}),
    )

    lines = [f"# {model_name}", ""]
    lines.append(
        description
        or (
            f"An X-VLM `{architecture}` checkpoint. {row.summary} X-VLM (Zeng, Zhang and Li, ICML 2022) aligns "
            "texts with visual concepts at several granularities - the whole image, regions and objects - with a "
            "Swin Transformer image encoder, a BERT text encoder and a cross-modal fusion encoder."
        )
    )
    lines.append("")
    summary = _describe_config(config)
    if summary:
        lines += ["## Model", "", summary]
    lines += ["## Intended use", "", intended_use or row.intended_use, ""]
    lines += ["## Limitations", "", limitations or _LIMITATIONS, ""]
    for title, text in sections:
        lines += [f"## {title}", "", text, ""]
    lines += [
        "## How to use",
        "",
        "The repository ships its modelling code (`trust_remote_code=True`); with `pip install modeling-xvlm` and "
        "`import modeling_xvlm` no remote code is executed.",
        "",
        (row.usage or _USAGE_DEFAULT).replace("{repo_id}", repo_id),
        "",
    ]
    lines += _training_section(base_model, dataset_list)
    lines += _evaluation_section(hub_eval_results)
    lines += ["## Citation", "", "```bibtex", XVLM_CITATION, "```", ""]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


__all__ = [
    "GENERATIVE_AUTO_CLASS",
    "GENERATIVE_HEADS",
    "XVLM_CITATION",
    "create_model_card",
    "generative_heads",
    "load_eval_results",
    "local_auto_classes",
    "register_xvlm",
    "ships_flat",
]
