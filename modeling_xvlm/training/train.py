"""``xvlm-train``: X-VLM pre-training and fine-tuning with accelerate (one CPU, one or several GPUs, several nodes).

Tasks:

* ``pretrain`` - image-text batches (ITC + ITM + MLM) and, with probability ``iter_perc`` per iteration, an extra
  optimizer step on a region batch (ITC + ITM + MLM on region inputs + box L1 + GIoU), official ``Pretrain.py``.
* ``retrieval`` - ITC (multi-positive) + ITM fine-tuning of ``XVLMForRetrieval``.
* ``grounding`` - box L1 + GIoU fine-tuning of ``XVLMForGrounding``.
* ``nlvr2`` - cross-entropy fine-tuning of ``XVLMForImagesAndTextClassification`` on NLVR2 rows (official
  ``NLVR.py``); evaluation: accuracy on the validation split.
* ``nlvr2-pretrain`` - the official text-assignment domain pre-training (``XVLMForTextAssignment``,
  ``NLVR_pretrain.py``) on the image-text rows of the ``pretrain`` config.
* ``vqa`` - answer-decoder fine-tuning of ``XVLMForQuestionAnswering`` on the ``vqa`` config (official ``VQA.py``:
  weighted answer NLL); evaluation: the official answer ranking, VQA accuracy and exact match.
* ``captioning`` - caption fine-tuning of ``XVLMForConditionalGeneration`` on ``retrieval`` rows (official
  ``Captioning.py``: ``[CLS] a picture of caption [SEP]``, prompt excluded from the loss, label smoothing 0.1; one
  record per (image, caption)); evaluation: the official beam search, BLEU-4 / METEOR / ROUGE-L / CIDEr.
* ``captioning-pretrain`` - the official captioning domain pre-training (``Captioning_pretrain.py``) on the
  image-text rows of the ``pretrain`` config: ``[CLS] caption [SEP]``, no prompt, no label smoothing.
* ``captioning-scst`` - self-critical sequence training of a captioner (official ``Captioning_scst.py``, see
  :mod:`.scst`): CIDEr-D reward of 5 samples per image against the greedy caption's.

For the NLVR2 tasks, ``--model tiny|base`` builds the NLVR2 text stack (``nlvr2_config``); a ``--model`` folder with
the pre-training text stack (a pre-training / retrieval checkpoint) is loaded with ``from_pretraining`` (the
official fusion-layer duplication), one with the NLVR2 stack (e.g. a text-assignment run) with ``from_pretrained``.
For ``vqa``, ``--model tiny|base`` builds ``XVLMForQuestionAnswering`` (answer ``[CLS]``/``[SEP]`` ids from the
tokenizer), a VQA folder loads with ``from_pretrained`` and any other X-VLM folder goes through
``XVLMForQuestionAnswering.from_pretraining`` (the official pre-training -> VQA initialisation). The captioning
tasks do the same with ``XVLMForConditionalGeneration`` (``captioning-scst`` starts from a captioning model).

Models come from a preset (``--model tiny|base``, from scratch), a ``save_pretrained`` folder / Hub id
(``--model path``), or Swin + BERT checkpoints (``--vision-model`` + ``--text-model``). Data come from a dataset
folder or Hub id in the X-VLM schema (``--dataset``; default: the synthetic dataset).

The official recipe (``modeling_xvlm.training.recipe``) is the default; every value can be overridden. Launch with
``accelerate launch [--num_processes N] -m modeling_xvlm.training.train ...`` (or ``accelerate launch
$(which xvlm-train) ...``) for DDP / FSDP / DeepSpeed and mixed precision; see docs/training.md. The ``xvlm-train``
command (``modeling_xvlm.training.cli``) also runs the CPU demo job (``xvlm-train demo``, the default).

`train` is a few named steps: accelerator, model and processor, the task's data (`build_task_data`), optimiser and
schedule, resume, then `_TrainingLoop` (optimizer steps, logging, evaluation, checkpoints). `TrainingCallback`s
observe the loop (`on_step_end`, `on_checkpoint_stage`) without being part of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..cli_errors import cli_errors, ensure_writable_dir, require_model_source
from ..configuration_xvlm import XVLMConfig
from ..data import load_xvlm_dataset, retrieval_pairs, synthetic_tokenizer
from ..initialization import build_from_vision_text_pretrained
from ..processing import XVLMImageProcessorPil, XVLMProcessor
from ..tasks import TASKS as TASK_TABLE
from .checkpointing import (
    CheckpointError,
    load_checkpoint,
    newest_valid_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from ..caption_metrics import CiderD, load_official_document_frequencies
from ..modeling_xvlm_captioning import CAPTION_PROMPT, XVLMForConditionalGeneration
from ..modeling_xvlm_nlvr import nlvr2_config
from ..modeling_xvlm_vqa import DEFAULT_K_TEST, XVLMForQuestionAnswering
from .collators import (
    BoxSafeRegionSampler,
    XVLMCaptioningCollator,
    XVLMCaptioningSCSTCollator,
    XVLMGroundingTrainCollator,
    XVLMImageTextTransform,
    XVLMNLVR2Collator,
    XVLMRetrievalCollator,
    XVLMTextAssignmentCollator,
    XVLMVQACollator,
    captioning_train_transform,
    nlvr2_train_transform,
    vqa_train_transform,
)
from .data import (
    CaptionRecords,
    PretrainImageTextCollator,
    StepBatchSampler,
    caption_lists,
    derive_seed,
    make_loader,
    pretrain_image_text_row,
    pretrain_region_row,
)
from .evaluate import (
    evaluate_captioning,
    evaluate_grounding,
    evaluate_nlvr2,
    evaluate_retrieval,
    evaluate_vqa,
    load_answer_list,
)
from .masking import XVLMTextMasker
from .recipe import TaskRecipe, create_optimizer, create_scheduler, get_recipe, new_parameter_names
from .region_collators import XVLMPretrainCollator, XVLMRegionSampler
from .scst import XVLMSelfCriticalCaptioning, scst_document_frequencies
from .streaming import STATE_KEY as STREAM_STATE_KEY
from .streaming import StreamingBatches, StreamPosition, open_pretrain_stream

__all__ = [
    "TASKS",
    "TrainConfig",
    "TrainingCallback",
    "build_model",
    "build_parser",
    "build_processor",
    "build_task_data",
    "main",
    "set_decoder_special_tokens",
    "train",
]

#: The tasks `xvlm-train` trains (rows of `modeling_xvlm.tasks.TASKS`).
#: What each task trains (and the official script it follows), for `xvlm-train --help`.
TASK_HELP = {
    "pretrain": "X-VLM pre-training: ITC, ITM and MLM on images and regions, box prediction (Pretrain.py)",
    "retrieval": "image-text retrieval fine-tuning: ITC + ITM with hard negatives (Retrieval.py)",
    "grounding": "box grounding fine-tuning: L1 + GIoU from the fused [CLS] (Grounding_bbox.py)",
    "nlvr2": "NLVR2 fine-tuning: one sentence, two images, true or false (NLVR.py)",
    "nlvr2-pretrain": "NLVR2 text-assignment domain pre-training on image-text rows (NLVR_pretrain.py)",
    "vqa": "VQA fine-tuning of the answer decoder, VQA v2 + Visual Genome answers (VQA.py)",
    "captioning": "COCO captioning fine-tuning of the caption decoder (Captioning.py)",
    "captioning-pretrain": "captioning domain pre-training, prompt-free (Captioning_pretrain.py)",
    "captioning-scst": "self-critical (CIDEr-D) captioning training (Captioning_scst.py)",
}
TASKS = tuple(TASK_HELP)
#: The tasks whose model has the NLVR2 text stack (doubled fusion layers).
NLVR2_TASKS = ("nlvr2", "nlvr2-pretrain")
#: The tasks that train `XVLMForConditionalGeneration` (the `captioning` row of `modeling_xvlm.tasks.TASKS`).
CAPTIONING_TASKS = ("captioning", "captioning-pretrain", "captioning-scst")
#: Tasks that start from an X-VLM checkpoint (or a preset), never from Swin + BERT.
XVLM_CHECKPOINT_TASKS = (*NLVR2_TASKS, "vqa", *CAPTIONING_TASKS)
#: Candidates re-ranked in the in-training evaluation when `--k-test` is not given (vqa: official `k_test`).
DEFAULT_EVAL_K_TEST = {"retrieval": 16, "vqa": DEFAULT_K_TEST}
#: The prompt of each captioning task when `--prompt` is not given (official `configs/Captioning*.yaml`).
DEFAULT_PROMPTS = {"captioning": CAPTION_PROMPT, "captioning-pretrain": "", "captioning-scst": CAPTION_PROMPT}
LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_bbox_l1", "loss_bbox_giou", "reward_sample",
             "reward_greedy")


@dataclass
class TrainConfig:
    """Everything ``xvlm-train`` accepts (``None`` = the official value of the task's recipe)."""

    task: str = "pretrain"
    # model
    model: str = "tiny"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    vision_model: str | None = None
    text_model: str | None = None
    tokenizer: str | None = None
    image_size: int | None = None
    # data
    dataset: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    max_train_examples: int | None = None
    num_workers: int = 0
    streaming: bool = False  # pretrain: read --dataset as an IterableDataset (modeling_xvlm.training.streaming)
    shuffle_buffer: int = 1000  # --streaming: examples in the shuffle buffer (0: no shuffling)
    # recipe
    lr: float | None = None
    lr_mult: float | None = None
    weight_decay: float | None = None
    warmup: float | None = None
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    max_grad_norm: float | None = None
    grad_accum: int = 1
    # pre-training
    regions: bool = True
    iter_perc: float | None = None
    region_batch_texts: int | None = None
    region_max_images: int | None = None
    max_regions: int = 5
    # captioning
    prompt: str | None = None  # None: DEFAULT_PROMPTS of the task (SCST: the captioner's)
    label_smoothing: float | None = None  # None: the recipe's (captioning 0.1, captioning-pretrain 0)
    scst_samples: int | None = None  # None: the recipe's (5)
    cider_document_frequencies: str | None = None  # official coco-train-words.p; None: from the training captions
    # augmentation
    randaugment: bool = True
    careful_hflip: bool = True
    crop_scale_min: float | None = None
    grounding_crop: bool = True
    # system
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    seed: int = 42
    cpu: bool = False
    # evaluation / logging / checkpoints
    output_dir: str = "xvlm-output"
    eval_every: int | None = None
    eval_at_end: bool = True
    eval_max_examples: int | None = None
    k_test: int | None = None  # None: DEFAULT_EVAL_K_TEST of the evaluation
    eval_batch_size: int = 64
    save_every: int | None = None
    save_total_limit: int | None = 2
    resume: str | None = None
    allow_config_change: bool = False  # resume even if the run's configuration differs from the checkpoint's
    log_every: int = 10
    log_with: list[str] = field(default_factory=list)
    project_name: str = "xvlm"
    progress: bool = True
    save_final: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def _load_tokenizer(cfg: TrainConfig):
    if cfg.tokenizer == "synthetic" or (cfg.tokenizer is None and cfg.text_model is None and cfg.dataset is None):
        return synthetic_tokenizer()
    name = cfg.tokenizer or cfg.text_model
    if name is None:
        raise SystemExit(
            "a tokenizer is needed: pass --tokenizer (e.g. bert-base-uncased) or --text-model, or use a --model "
            "folder that holds a processor"
        )
    return AutoTokenizer.from_pretrained(name)


def build_processor(cfg: TrainConfig, image_size: int, patch_size: int) -> XVLMProcessor:
    """The processor saved with ``--model`` when there is one, else one from the tokenizer and the model size."""
    if cfg.model not in ("tiny", "base") and cfg.tokenizer is None:
        try:
            processor = XVLMProcessor.from_pretrained(cfg.model)
            if processor.image_processor.input_size == (image_size, image_size):
                return processor
        except (OSError, ValueError, TypeError):
            pass
    image_processor = XVLMImageProcessorPil(size={"height": image_size, "width": image_size}, patch_size=patch_size)
    return XVLMProcessor(image_processor=image_processor, tokenizer=_load_tokenizer(cfg))


def build_model(cfg: TrainConfig, tokenizer_size: int | None = None, tokenizer: Any = None):
    """The task's model from a preset (new weights), a ``save_pretrained`` folder / Hub id, or Swin + BERT.

    ``tokenizer`` (presets): for ``vqa`` and the captioning tasks its ``[CLS]`` / ``[SEP]`` ids become the
    decoder's ``bos_token_id`` / ``eos_token_id``."""
    cls = TASK_TABLE["captioning" if cfg.task in CAPTIONING_TASKS else cfg.task].model_class
    nlvr2 = cfg.task in NLVR2_TASKS
    if (cfg.vision_model or cfg.text_model) and cfg.task in XVLM_CHECKPOINT_TASKS:
        raise SystemExit(f"{cfg.task} starts from an X-VLM checkpoint (official NLVR.py / NLVR_pretrain.py / VQA.py / "
                         "Captioning*.py): "
                         "pass --model <pre-training folder or Hub id>, not --vision-model / --text-model")
    if cfg.vision_model or cfg.text_model:
        if not (cfg.vision_model and cfg.text_model):
            raise SystemExit("--vision-model and --text-model go together (Swin + BERT initialisation)")
        extra = {"image_size": cfg.image_size} if cfg.image_size else {}
        return build_from_vision_text_pretrained(cls, cfg.vision_model, cfg.text_model, **extra)
    if cfg.model in ("tiny", "base"):
        overrides = json.loads(json.dumps(cfg.config_overrides or {}))
        if tokenizer_size is not None:
            overrides.setdefault("text_config", {}).setdefault("vocab_size", tokenizer_size)
        if (cfg.task == "vqa" or cfg.task in CAPTIONING_TASKS) and tokenizer is not None:
            text = overrides.setdefault("text_config", {})
            text.setdefault("bos_token_id", tokenizer.cls_token_id)
            text.setdefault("eos_token_id", tokenizer.sep_token_id)
        config = XVLMConfig.from_preset(cfg.model, image_size=cfg.image_size, **overrides)
        return cls(nlvr2_config(config) if nlvr2 else config)
    if cfg.task == "vqa":
        return _vqa_model_from_checkpoint(cfg.model)
    if cfg.task in CAPTIONING_TASKS:
        return _captioning_model_from_checkpoint(cfg.model, cfg.task)
    if nlvr2 and not XVLMConfig.from_pretrained(cfg.model).text_config.tie_cross_attention_pairs:
        return cls.from_pretraining(cfg.model)  # a pre-training text stack: the official fusion-layer duplication
    return cls.from_pretrained(cfg.model)


def _vqa_model_from_checkpoint(path: str):
    """A VQA folder with ``from_pretrained``; any other X-VLM folder (pre-training, retrieval, base model) with
    ``XVLMForQuestionAnswering.from_pretraining`` (official ``model_vqa.py`` initialisation)."""
    config = XVLMConfig.from_pretrained(path)
    if "XVLMForQuestionAnswering" in (config.architectures or []):
        return XVLMForQuestionAnswering.from_pretrained(path)
    if config.text_config.tie_cross_attention_pairs:
        raise SystemExit(f"{path} holds an NLVR2 model (doubled fusion layers): VQA starts from a pre-training, "
                         "retrieval or base X-VLM checkpoint")
    return XVLMForQuestionAnswering.from_pretraining(path)


def _captioning_model_from_checkpoint(path: str, task: str):
    """A captioning folder with ``from_pretrained``; any other X-VLM folder (pre-training, retrieval, base model) with
    ``XVLMForConditionalGeneration.from_pretraining`` (official ``model_captioning.load_pretrained``:
    ``text_encoder.*`` -> ``text_decoder.*``). SCST starts from a captioning model (official ``Captioning_scst.py``
    loads a fine-tuned captioner)."""
    config = XVLMConfig.from_pretrained(path)
    if "XVLMForConditionalGeneration" in (config.architectures or []):
        return XVLMForConditionalGeneration.from_pretrained(path)
    if task == "captioning-scst":
        raise SystemExit(f"{path} holds no captioning model: captioning-scst starts from a captioner (the output of "
                         "xvlm-train captioning)")
    if config.text_config.tie_cross_attention_pairs:
        raise SystemExit(f"{path} holds an NLVR2 model (doubled fusion layers): captioning starts from a "
                         "pre-training, retrieval or base X-VLM checkpoint")
    return XVLMForConditionalGeneration.from_pretraining(path)


def set_decoder_special_tokens(model: Any, tokenizer: Any) -> None:
    """Give a decoder model (VQA's answer decoder, the captioner) without them the tokenizer's ``[CLS]`` / ``[SEP]``
    ids as ``bos_token_id`` / ``eos_token_id`` (what ``generate`` starts and stops with)."""
    for config in (model.config.text_config, model.text_decoder.config):
        if config.bos_token_id is None:
            config.bos_token_id = tokenizer.cls_token_id
        if config.eos_token_id is None:
            config.eos_token_id = tokenizer.sep_token_id


def _load_split(cfg: TrainConfig, config_name: str, split: str, data: dict | None):
    if data is not None and (config_name, split) in data:
        return data[(config_name, split)]
    return load_xvlm_dataset(cfg.dataset, config_name, split)


def _subset(dataset: Any, n: int | None) -> Any:
    if n is None or n >= len(dataset):
        return dataset
    return dataset[:n] if isinstance(dataset, list) else dataset.select(range(n))


def retrieval_train_rows(dataset: Any) -> Any:
    """Retrieval rows (image + captions) -> image-caption pairs with a contiguous ``image_index``."""
    if isinstance(dataset, list):
        return [
            {"image": row["image"], "caption": caption, "image_index": i}
            for i, row in enumerate(dataset)
            for caption in row["captions"]
        ]
    return retrieval_pairs(dataset)


class TrainingCallback:
    """Observer of the training loop; every method is a no-op by default.

    `on_step_end(step)` runs after optimizer step `step` (counted from 1) and its checkpoint, if any;
    `on_checkpoint_stage(step, stage)` runs while the checkpoint of `step` is being written (stage `"mid_save"`:
    the model and optimizer files are written, the checkpoint is not complete yet)."""

    def on_step_end(self, step: int) -> None:
        pass

    def on_checkpoint_stage(self, step: int, stage: str) -> None:
        pass


def _batch_size_of(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]).shape[0])


def _core_model(model: Any) -> Any:
    """The saved / evaluated model: the captioner inside an SCST wrapper, else the model itself."""
    return model.captioner if isinstance(model, XVLMSelfCriticalCaptioning) else model


def _scst_model(cfg: TrainConfig, model: Any, processor: XVLMProcessor, rows: CaptionRecords, recipe: TaskRecipe,
                say: Callable[[str], None]) -> XVLMSelfCriticalCaptioning:
    """The captioner wrapped for SCST, its CIDEr-D reward weighted by the training captions' document frequencies
    (or the official ``coco-train-words.p`` given by ``--cider-document-frequencies``)."""
    if cfg.cider_document_frequencies:
        frequencies = load_official_document_frequencies(cfg.cider_document_frequencies)
    else:
        frequencies = scst_document_frequencies(caption_lists(rows.dataset))
    say(f"SCST reward: CIDEr-D with the document frequencies of {frequencies.num_documents} images")
    samples = cfg.scst_samples or recipe.extra["num_samples"]
    return XVLMSelfCriticalCaptioning(model, processor, CiderD(frequencies), prompt=processor.prompt,
                                      num_samples=samples, max_length=model.generation_config.max_length)


# ----------------------------------------------------------------------------------------------------------------
# The task's data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Training rows and how they become batches: image(-text) batches every step and, for pre-training, a region
    batch with probability `iter_perc` per step."""

    rows: Any
    image_collator: Callable
    image_adapter: Callable | None = None
    region_collator: Callable | None = None
    region_adapter: Callable | None = None
    iter_perc: float = 0.0
    region_images: int = 0


def _pretrain_data(cfg: TrainConfig, processor: XVLMProcessor, size: int, extra: dict, data: dict | None) -> TaskData:
    # streaming: the rows are opened per process by the training loop (`_TrainingLoop.iterators`)
    rows = None if cfg.streaming else _subset(_load_split(cfg, "pretrain", cfg.train_split, data),
                                              cfg.max_train_examples)
    crop_min = 0.2 if cfg.crop_scale_min is None else cfg.crop_scale_min
    image_collator = PretrainImageTextCollator(
        XVLMPretrainCollator(processor, masker=XVLMTextMasker(processor.tokenizer)),
        XVLMImageTextTransform(size, scale=(crop_min, 1.0), careful_hflip=cfg.careful_hflip,
                               randaugment=cfg.randaugment),
    )
    region_collator = XVLMPretrainCollator(
        processor,
        masker=XVLMTextMasker(processor.tokenizer),
        region_sampler=BoxSafeRegionSampler(
            XVLMRegionSampler(image_size=size, max_regions=cfg.max_regions, careful_hflip=cfg.careful_hflip),
            randaugment=cfg.randaugment,
        ),
        max_texts=cfg.region_batch_texts or extra["region_batch_texts"],
    )
    iter_perc = extra["iter_perc"] if cfg.iter_perc is None else cfg.iter_perc
    return TaskData(
        rows, image_collator, pretrain_image_text_row, region_collator, pretrain_region_row,
        iter_perc=iter_perc if cfg.regions else 0.0,
        region_images=cfg.region_max_images or extra["region_max_images"],
    )


def task_prompt(cfg: TrainConfig, processor: XVLMProcessor) -> str:
    """The caption prompt of a captioning task: ``--prompt``; else for SCST the captioner's (its processor's
    ``prompt``), for the others the task's (official ``'a picture of '``; none for the domain pre-training)."""
    if cfg.prompt is not None:
        return cfg.prompt
    if cfg.task == "captioning-scst":
        return processor.prompt
    return DEFAULT_PROMPTS[cfg.task]


def _captioning_data(cfg: TrainConfig, processor: XVLMProcessor, size: int, data: dict | None) -> TaskData:
    """`captioning` / `captioning-scst`: the `retrieval` rows as one record per (image, caption) (official
    `coco_karpathy_train(_scst)`), official `train_transform`; `captioning-pretrain`: the `pretrain` image-text rows,
    one caption drawn per image and batch, official `pretrain_transform` (scale 0.2-1)."""
    if cfg.task == "captioning-pretrain":
        rows = _subset(_load_split(cfg, "pretrain", cfg.train_split, data), cfg.max_train_examples)
        crop_min = 0.2 if cfg.crop_scale_min is None else cfg.crop_scale_min
        transform = captioning_train_transform(size, cfg.randaugment, crop_min, cfg.careful_hflip)
        return TaskData(rows, XVLMCaptioningCollator(processor, transform, prompt=processor.prompt),
                        pretrain_image_text_row)
    rows = CaptionRecords(_subset(_load_split(cfg, "retrieval", cfg.train_split, data), cfg.max_train_examples))
    crop_min = 0.5 if cfg.crop_scale_min is None else cfg.crop_scale_min
    transform = captioning_train_transform(size, cfg.randaugment, crop_min, cfg.careful_hflip)
    if cfg.task == "captioning-scst":
        return TaskData(rows, XVLMCaptioningSCSTCollator(processor, transform))
    return TaskData(rows, XVLMCaptioningCollator(processor, transform, prompt=processor.prompt))


def build_task_data(
    cfg: TrainConfig, processor: XVLMProcessor, size: int, recipe: TaskRecipe, data: dict | None = None
) -> TaskData:
    """The training rows and collators of `cfg.task` (official training transforms)."""
    if cfg.task == "pretrain":
        return _pretrain_data(cfg, processor, size, recipe.extra, data)
    if cfg.task == "retrieval":
        rows = retrieval_train_rows(
            _subset(_load_split(cfg, "retrieval", cfg.train_split, data), cfg.max_train_examples)
        )
        crop_min = 0.5 if cfg.crop_scale_min is None else cfg.crop_scale_min
        transform = XVLMImageTextTransform(size, scale=(crop_min, 1.0), careful_hflip=cfg.careful_hflip,
                                           randaugment=cfg.randaugment)
        return TaskData(rows, XVLMRetrievalCollator(processor, transform))
    if cfg.task == "nlvr2":
        rows = _subset(_load_split(cfg, "nlvr2", cfg.train_split, data), cfg.max_train_examples)
        crop_min = 0.5 if cfg.crop_scale_min is None else cfg.crop_scale_min
        transform = nlvr2_train_transform(size, randaugment=cfg.randaugment, crop_scale_min=crop_min)
        return TaskData(rows, XVLMNLVR2Collator(processor, transform))
    if cfg.task == "vqa":
        rows = _subset(_load_split(cfg, "vqa", cfg.train_split, data), cfg.max_train_examples)
        crop_min = 0.5 if cfg.crop_scale_min is None else cfg.crop_scale_min  # official train_transform_wohflip
        transform = vqa_train_transform(size, randaugment=cfg.randaugment, crop_scale_min=crop_min)
        return TaskData(rows, XVLMVQACollator(processor, transform, careful_hflip=cfg.careful_hflip))
    if cfg.task in CAPTIONING_TASKS:
        return _captioning_data(cfg, processor, size, data)
    if cfg.task == "nlvr2-pretrain":
        rows = _subset(_load_split(cfg, "pretrain", cfg.train_split, data), cfg.max_train_examples)
        crop_min = 0.2 if cfg.crop_scale_min is None else cfg.crop_scale_min  # official pretrain_transform
        transform = XVLMImageTextTransform(size, scale=(crop_min, 1.0), careful_hflip=cfg.careful_hflip,
                                           randaugment=cfg.randaugment)
        return TaskData(rows, XVLMTextAssignmentCollator(processor, transform), pretrain_image_text_row)
    rows = _subset(_load_split(cfg, "grounding", cfg.train_split, data), cfg.max_train_examples)
    return TaskData(rows, XVLMGroundingTrainCollator(
        processor, crop=cfg.grounding_crop, careful_hflip=cfg.careful_hflip, randaugment=cfg.randaugment
    ))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def check_streaming_options(cfg: TrainConfig) -> None:
    """Refuse (``ValueError``) options that need a dataset length or workers with ``--streaming``."""
    if not cfg.streaming:
        return
    problems = []
    if cfg.task != "pretrain":
        problems.append(f"it is for the pretrain task, not {cfg.task}")
    if cfg.dataset is None:
        problems.append("it needs --dataset (a folder of Parquet shards or a Hub id)")
    if cfg.max_steps is None:
        problems.append("a stream has no length, so --epochs cannot give the number of steps: pass --max-steps")
    if cfg.max_train_examples is not None:
        problems.append("--max-train-examples needs a dataset length; leave it out")
    if cfg.num_workers:
        problems.append("the stream is read in the main process so that its saved position is the consumed one: "
                        "pass --num-workers 0")
    if cfg.shuffle_buffer < 0:
        problems.append(f"--shuffle-buffer must be >= 0 (got {cfg.shuffle_buffer})")
    if problems:
        raise ValueError("--streaming: " + "; ".join(problems))


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    # Without GPUs, a multi-process launch (torchrun / `accelerate launch --multi_gpu --num_processes N`) is DDP over
    # gloo, which accelerate only selects with cpu=True.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu or (multi_process and not torch.cuda.is_available()),
        log_with=cfg.log_with or None,
        project_dir=cfg.output_dir,
        # pre-training: region/image-only heads; text assignment: vision_proj only samples the pairs (no gradient)
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=cfg.task in ("pretrain", "nlvr2-pretrain"))],
    )


def _model_and_processor(cfg: TrainConfig) -> tuple[Any, XVLMProcessor]:
    tokenizer = None
    if cfg.model in ("tiny", "base") and not cfg.vision_model:
        tokenizer = _load_tokenizer(cfg)
    model = build_model(cfg, None if tokenizer is None else len(tokenizer), tokenizer)
    processor = build_processor(cfg, model.config.image_size, model.config.patch_stride)
    if cfg.task == "vqa" or cfg.task in CAPTIONING_TASKS:
        set_decoder_special_tokens(model, processor.tokenizer)
    if cfg.task in CAPTIONING_TASKS:
        # saved with the processor: xvlm-eval and the pipelines caption with the training prompt
        processor.prompt = task_prompt(cfg, processor)
        # saved with the model (SCST has no caption loss: the model's is kept)
        smoothing = cfg.label_smoothing
        if smoothing is None:
            smoothing = get_recipe(cfg.task).extra.get("label_smoothing")
        if smoothing is not None:
            model.config.label_smoothing = float(smoothing)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model.train(), processor


@dataclass
class _ResumePoint:
    step: int = 0
    region_micro: int = 0
    history: list = field(default_factory=list)
    rng_state: Any = None
    stream_positions: dict = field(default_factory=dict)  # --streaming: {"image": [epoch, consumed], ...}


#: `TrainConfig` fields a resumed run may change (where files go, what is logged / evaluated / saved, how data are
#: loaded); every other field defines the run and must equal the checkpoint's (`resume_config_differences`).
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "resume", "allow_config_change", "num_workers", "eval_every", "eval_at_end", "eval_max_examples",
    "eval_split", "k_test", "eval_batch_size", "save_every", "save_total_limit", "log_every", "log_with",
    "project_name", "progress", "save_final", "cpu",
})


def resume_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name: checkpoint value -> this run's value"`` for each field outside `RESUME_MAY_CHANGE` that differs
    between the configuration saved in a checkpoint and the resuming run's (``to_dict()`` of each)."""
    missing = object()
    names = sorted((set(saved) | set(current)) - RESUME_MAY_CHANGE)
    return [f"{name}: {saved.get(name, missing)!r} -> {current.get(name, missing)!r}".replace(repr(missing), "unset")
            for name in names if saved.get(name, missing) != current.get(name, missing)]


def _resume(cfg: TrainConfig, ckpt_root: Path, model, optimizer, scheduler, accelerator, say) -> _ResumePoint:
    """Load the checkpoint ``--resume`` names (``latest``: the newest that verifies, falling back past corrupt
    ones); refuse (``CheckpointError``) when the run's configuration differs from the checkpoint's, unless
    ``allow_config_change``."""
    if not cfg.resume:
        return _ResumePoint()
    if cfg.resume in ("latest", "auto"):
        path = newest_valid_checkpoint(ckpt_root, say)  # verified
        if path is None:
            say(f"no checkpoint in {ckpt_root}: starting from scratch")
            return _ResumePoint()
    else:
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"--resume {path}: not a checkpoint folder (no trainer_state.json)")
        verify_checkpoint(path)
    saved_config = _saved_config(path)
    differences = resume_config_differences(saved_config, json.loads(json.dumps(cfg.to_dict(), default=str)))
    if differences and not cfg.allow_config_change:
        raise CheckpointError(
            f"{path} was written by a run with a different configuration, so resuming would not continue that run: "
            + "; ".join(differences) + ". Pass the same options, or --allow-config-change to resume anyway."
        )
    if differences:
        say("resuming with a changed configuration (--allow-config-change): " + "; ".join(differences))
    state = load_checkpoint(path, model, optimizer, scheduler, accelerator, restore_rng=False, verify=False)
    say(f"resumed from {path} at step {int(state['step'])}")
    return _ResumePoint(
        int(state["step"]), int(state.get("region_micro_steps", 0)), list(state.get("eval_history", [])),
        state["_rng"], dict(state.get(STREAM_STATE_KEY, {})),
    )


def _saved_config(path: Path) -> dict[str, Any]:
    """The `TrainConfig` dict a checkpoint's trainer state records (``{}`` when it records none)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} has no readable trainer_state.json ({error})") from None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else {}


class _TrainingLoop:
    """The optimizer steps of one run, with logging, evaluation and checkpoints."""

    def __init__(self, cfg, accelerator, model, processor, optimizer, scheduler, recipe, task_data, total_steps,
                 data, say, callbacks):
        self.cfg, self.accelerator, self.model, self.processor = cfg, accelerator, model, processor
        self.optimizer, self.scheduler, self.recipe, self.task_data = optimizer, scheduler, recipe, task_data
        self.total_steps, self.data, self.say, self.callbacks = total_steps, data, say, list(callbacks)
        self.accum = max(1, cfg.grad_accum)
        self.max_grad_norm = recipe.max_grad_norm if cfg.max_grad_norm is None else (cfg.max_grad_norm or None)
        self.world = accelerator.num_processes
        self.ckpt_root = Path(cfg.output_dir) / "checkpoints"
        self.eval_sets: dict[str, Any] = {}
        self.region_micro, self.history, self.last_losses = 0, [], {}
        self.streams: dict[str, StreamingBatches] = {}
        self._reset_window()

    # -- data ------------------------------------------------------------------------------------------------------
    def iterators(self, start: _ResumePoint) -> tuple[Iterator, Iterator | None]:
        cfg, data, rank = self.cfg, self.task_data, self.accelerator.process_index
        if cfg.streaming:
            return self._streaming_iterators(start)
        sampler = StepBatchSampler(
            len(data.rows), self.recipe.batch_size, cfg.seed, "image", rank, self.world,
            start_step=start.step * self.accum,
        )
        image_iter = iter(make_loader(data.rows, data.image_collator, sampler, data.image_adapter, cfg.num_workers))
        if data.region_collator is None or data.iter_perc <= 0:
            return image_iter, None
        region_sampler = StepBatchSampler(
            len(data.rows), data.region_images, cfg.seed, "region", rank, self.world, start_step=start.region_micro
        )
        loader = make_loader(data.rows, data.region_collator, region_sampler, data.region_adapter, cfg.num_workers)
        return image_iter, iter(loader)

    def _streaming_iterators(self, start: _ResumePoint) -> tuple[StreamingBatches, StreamingBatches | None]:
        cfg, data, rank = self.cfg, self.task_data, self.accelerator.process_index

        def batches(stream: str, collator: Callable, adapter: Callable, size: int, step: int) -> StreamingBatches:
            rows = open_pretrain_stream(cfg.dataset, cfg.train_split, rank, self.world, cfg.seed, cfg.shuffle_buffer,
                                        stream)
            return StreamingBatches(rows, collator, size, cfg.seed, stream, rank, adapter, start_step=step,
                                    position=StreamPosition(*start.stream_positions.get(stream, (0, 0))))

        self.streams = {"image": batches("image", data.image_collator, data.image_adapter, self.recipe.batch_size,
                                         start.step * self.accum)}
        if data.region_collator is not None and data.iter_perc > 0:
            self.streams["region"] = batches("region", data.region_collator, data.region_adapter,
                                             data.region_images, start.region_micro)
        return self.streams["image"], self.streams.get("region")

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def optimizer_step(self, batches: Sequence[dict[str, Any]]) -> dict[str, float]:
        accelerator, model = self.accelerator, self.model
        sums: dict[str, float] = {}
        for k, batch in enumerate(batches):
            batch = {key: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
            last = k == len(batches) - 1
            context = accelerator.no_sync(model) if not last and self.world > 1 else contextlib.nullcontext()
            with context:
                with accelerator.autocast():
                    out = model(**batch)
                    loss = out.loss / len(batches)
                accelerator.backward(loss)
            for key in LOSS_KEYS:
                value = getattr(out, key, None)
                if value is not None:
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) / len(batches)
        if self.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    # -- logging ---------------------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self.running: dict[str, float] = {}
        self.running_n, self.examples, self.window_start = 0, 0, time.perf_counter()

    def _accumulate(self, parts: dict[str, float], prefix: str = "") -> None:
        for key, value in parts.items():
            self.running[prefix + key] = self.running.get(prefix + key, 0.0) + value

    def log_window(self, done: int, bar) -> None:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        means = {k: v / self.running_n for k, v in self.running.items()}
        device = self.accelerator.device
        reduced = self.accelerator.reduce(torch.tensor(list(means.values()), device=device), "mean")
        means = dict(zip(means, reduced.tolist()))
        means["lr"] = self.scheduler.get_last_lr()[0]
        means["examples_per_s"] = self.examples / elapsed
        self.last_losses = means
        self.accelerator.log({f"train/{k}": v for k, v in means.items()}, step=done)
        bar.set_postfix({k.replace("loss_", "").replace("region/", "r_"): f"{v:.3g}" for k, v in means.items()
                         if k != "lr"}, refresh=False)
        if not self.cfg.progress:
            self.say(f"{self.cfg.task} step {done}/{self.total_steps}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in means.items()))
        self._reset_window()

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, Any]:
        cfg, accelerator = self.cfg, self.accelerator
        results: dict[str, Any] = {}
        if accelerator.is_main_process:
            unwrapped = _core_model(accelerator.unwrap_model(self.model))
            kinds = {"pretrain": ["retrieval"] + (["grounding"] if cfg.regions else []),
                     "retrieval": ["retrieval"], "grounding": ["grounding"], "nlvr2": ["nlvr2"],
                     "nlvr2-pretrain": [], "vqa": ["vqa"], "captioning": ["captioning"],
                     "captioning-pretrain": [], "captioning-scst": ["captioning"]}[cfg.task]
            for kind in kinds:
                rows = self._eval_rows(kind)
                if rows is None:
                    continue
                k_test = cfg.k_test or DEFAULT_EVAL_K_TEST.get(kind, 16)
                if kind == "retrieval":
                    m = evaluate_retrieval(unwrapped, self.processor, rows, k_test, cfg.eval_batch_size,
                                           cfg.eval_max_examples)
                    results.update({f"eval/{k}": m[k] for k in ("txt_r1", "img_r1", "r_mean")})
                elif kind == "nlvr2":
                    m = evaluate_nlvr2(unwrapped, self.processor, rows, cfg.eval_batch_size, cfg.eval_max_examples)
                    results["eval/accuracy"] = m["accuracy"]
                elif kind == "vqa":
                    results.update(self._evaluate_vqa(unwrapped, rows, k_test))
                elif kind == "captioning":
                    results.update(self._evaluate_captioning(unwrapped, rows))
                else:
                    m = evaluate_grounding(unwrapped, self.processor, rows, cfg.eval_batch_size,
                                           cfg.eval_max_examples)
                    results["eval/acc@0.5"] = m["acc@0.5"]
            if results:
                self.say(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
            accelerator.log(results, step=step)
        accelerator.wait_for_everyone()
        return results

    def _evaluate_vqa(self, model: Any, rows: Any, k_test: int) -> dict[str, float]:
        answers = self._answer_list()
        if answers is None:
            return {}
        m = evaluate_vqa(model, self.processor, rows, answers, self.cfg.eval_batch_size, k_test,
                         self.cfg.eval_max_examples)
        if m["vqa_accuracy"] is None:
            self.say(f"the vqa {self.cfg.eval_split!r} split has no answers: no accuracy (use xvlm-eval vqa for "
                     "the result file)")
            return {}
        return {"eval/vqa_accuracy": m["vqa_accuracy"], "eval/exact_match": m["exact_match"]}

    def _evaluate_captioning(self, model: Any, rows: Any) -> dict[str, float]:
        m = evaluate_captioning(model, self.processor, rows, self.cfg.eval_batch_size, self.cfg.eval_max_examples)
        if "CIDEr" not in m:
            self.say(f"the {self.cfg.eval_split!r} split has no reference captions: no caption metrics (use "
                     "xvlm-eval captioning for the result file)")
            return {}
        if m["metrics_note"] and not self.eval_sets.get("caption_note_said"):
            self.say(m["metrics_note"])
            self.eval_sets["caption_note_said"] = True
        return {f"eval/{k}": m[k] for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in m}

    def _answer_list(self) -> list[str] | None:
        """The candidate answers: `data[("vqa", "answer_list")]`, else the dataset's answer list."""
        if "vqa_answer_list" not in self.eval_sets:
            try:
                if self.data is not None and ("vqa", "answer_list") in self.data:
                    answers = list(self.data[("vqa", "answer_list")])
                else:
                    answers = load_answer_list(self.cfg.dataset)
            except (ValueError, FileNotFoundError, ImportError) as error:
                self.say(f"no VQA answer list to evaluate with ({error}); skipped")
                answers = None
            self.eval_sets["vqa_answer_list"] = answers
        return self.eval_sets["vqa_answer_list"]

    def _eval_rows(self, kind: str) -> Any:
        if kind not in self.eval_sets:
            config_name = "retrieval" if kind == "captioning" else kind  # captioning data are retrieval rows
            try:
                self.eval_sets[kind] = _load_split(self.cfg, config_name, self.cfg.eval_split, self.data)
            except (ValueError, FileNotFoundError) as error:
                self.say(f"no {kind!r} {self.cfg.eval_split!r} split to evaluate on ({error}); skipped")
                self.eval_sets[kind] = None
        return self.eval_sets[kind]

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def save(self, done: int) -> None:
        def stage(where: str) -> None:
            for callback in self.callbacks:
                callback.on_checkpoint_stage(done, where)

        save_checkpoint(
            self.ckpt_root, done, self.model, self.optimizer, self.scheduler,
            {"task": self.cfg.task, "region_micro_steps": self.region_micro, "total_steps": self.total_steps,
             "eval_history": self.history, "config": self.cfg.to_dict(),
             # every process consumes the same number of examples per stream, so rank 0's positions are all's
             STREAM_STATE_KEY: {name: list(b.position) for name, b in self.streams.items()}},
            self.accelerator, self.cfg.save_total_limit, stage_hook=stage if self.callbacks else None,
        )

    # -- the loop --------------------------------------------------------------------------------------------------
    def run(self, start: _ResumePoint) -> None:
        cfg, accum = self.cfg, self.accum
        self.region_micro, self.history = start.region_micro, list(start.history)
        image_iter, region_iter = self.iterators(start)
        if cfg.log_with:
            self.accelerator.init_trackers(cfg.project_name, config={k: str(v) for k, v in cfg.to_dict().items()})
        bar = tqdm(total=self.total_steps, initial=start.step,
                   disable=not (self.accelerator.is_main_process and cfg.progress), desc=cfg.task,
                   dynamic_ncols=True, mininterval=1.0)
        if start.rng_state is not None:
            restore_rng_state(start.rng_state)  # last, so that nothing above consumes random numbers after it
        self._reset_window()
        for step in range(start.step, self.total_steps):
            if region_iter is not None and derive_seed(cfg.seed, "coin", step) / 2**63 < self.task_data.iter_perc:
                # the same coin on every process
                self._accumulate(self.optimizer_step([next(region_iter) for _ in range(accum)]), "region/")
                self.region_micro += accum
            batches = [next(image_iter) for _ in range(accum)]
            self.examples += sum(_batch_size_of(b) for b in batches) * self.world
            self._accumulate(self.optimizer_step(batches))
            self.scheduler.step()
            self.running_n += 1
            self._end_of_step(step + 1, bar)
        bar.close()

    def _end_of_step(self, done: int, bar) -> None:
        cfg = self.cfg
        if done % max(1, cfg.log_every) == 0 or done == self.total_steps:
            self.log_window(done, bar)
        bar.update(1)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != self.total_steps:
            self.history.append({"step": done, **self.evaluate(done)})
        if cfg.save_every and (done % cfg.save_every == 0 or done == self.total_steps):
            self.save(done)
        for callback in self.callbacks:
            callback.on_step_end(done)


def _finish(cfg: TrainConfig, loop: _TrainingLoop, started: float) -> dict[str, Any]:
    """Final evaluation, final save and the run summary (`train_results.json`)."""
    accelerator, output_dir = loop.accelerator, Path(cfg.output_dir)
    train_seconds = time.perf_counter() - started
    final_eval = loop.evaluate(loop.total_steps) if cfg.eval_at_end else {}
    if cfg.save_final:
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(loop.model)
        state_dict = accelerator.get_state_dict(loop.model)
        if isinstance(unwrapped, XVLMSelfCriticalCaptioning):  # save the captioner itself
            unwrapped = unwrapped.captioner
            state_dict = {k.removeprefix("captioner."): v for k, v in state_dict.items()}
        if accelerator.is_main_process:
            unwrapped.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
            loop.processor.save_pretrained(output_dir)
    summary = {
        "task": cfg.task,
        "output_dir": str(output_dir),
        "steps": loop.total_steps,
        "region_steps": loop.region_micro // loop.accum,
        "world_size": loop.world,
        "train_seconds": train_seconds,
        "last_losses": loop.last_losses,
        "eval": final_eval,
        "eval_history": loop.history,
        "recipe": loop.recipe.to_dict(),
    }
    if accelerator.is_main_process:
        with open(output_dir / "train_results.json", "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, default=str)
    accelerator.end_training()
    return summary


def train(
    cfg: TrainConfig,
    data: dict | None = None,
    log: Callable[[str], None] | None = None,
    callbacks: Sequence[TrainingCallback] = (),
) -> dict[str, Any]:
    """Run one training task; returns a summary (steps, losses, evaluation metrics, timings, output folder).

    Args:
        cfg: the run configuration.
        data: optional pre-loaded datasets ``{(config_name, split): rows}`` used instead of loading them.
        log: where to print messages (default ``print`` on the main process).
        callbacks: `TrainingCallback`s observing the loop.
    """
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; expected one of {TASKS}")
    check_streaming_options(cfg)
    started = time.perf_counter()
    accelerator = _make_accelerator(cfg)
    say = (log or (lambda msg: print(msg, flush=True))) if accelerator.is_main_process else (lambda msg: None)
    if accelerator.is_main_process:  # fail now, not at the first checkpoint or the final save
        ensure_writable_dir(cfg.output_dir)
        if cfg.save_every:
            ensure_writable_dir(Path(cfg.output_dir) / "checkpoints", "checkpoint folder")
    set_seed(cfg.seed)  # identical initialisation on every process
    model, processor = _model_and_processor(cfg)
    recipe = get_recipe(cfg.task, lr=cfg.lr, lr_mult=cfg.lr_mult, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                        epochs=cfg.epochs, batch_size=cfg.batch_size)
    task_data = build_task_data(cfg, processor, model.config.image_size, recipe, data)
    if cfg.task == "captioning-scst":
        model = _scst_model(cfg, model, processor, task_data.rows, recipe, say)
    micro_per_epoch = 1 if cfg.streaming else len(task_data.rows) // (recipe.batch_size * accelerator.num_processes)
    if micro_per_epoch < 1:
        raise SystemExit(f"{len(task_data.rows)} training examples are fewer than one global batch "
                         f"({recipe.batch_size} x {accelerator.num_processes})")
    total_steps = cfg.max_steps or max(1, recipe.epochs * micro_per_epoch // max(1, cfg.grad_accum))
    new_params = new_parameter_names(model, cfg.task) if recipe.new_params_get_lr_mult else set()
    optimizer = create_optimizer(
        model, recipe.lr, recipe.weight_decay, recipe.lr_mult, new_params, recipe.betas, recipe.eps
    )
    scheduler = create_scheduler(optimizer, total_steps, recipe.warmup)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = _resume(cfg, Path(cfg.output_dir) / "checkpoints", model, optimizer, scheduler, accelerator, say)
    loop = _TrainingLoop(cfg, accelerator, model, processor, optimizer, scheduler, recipe, task_data, total_steps,
                         data, say, callbacks)
    loop.run(start)
    return _finish(cfg, loop, started)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _bool_flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                        default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvlm-train",
        description="Train X-VLM (pre-training; retrieval, grounding, NLVR2, VQA or captioning fine-tuning; NLVR2 "
        "text-assignment and captioning domain pre-training; captioning SCST) with accelerate. Without "
        "arguments: the CPU demo job (pre-train a tiny X-VLM on the synthetic dataset, fine-tune and evaluate it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("task", choices=TASKS, metavar="TASK",
                        help="; ".join(f"{task}: {what}" for task, what in TASK_HELP.items()))
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="preset (tiny, base: new weights), or a save_pretrained folder / Hub "
                   "id (NLVR2, vqa and captioning tasks: a pre-training checkpoint is converted with "
                   "from_pretraining)")
    g.add_argument("--config-overrides", default=None, help="JSON merged into the preset, e.g. "
                   "'{\"text_config\": {\"num_hidden_layers\": 4, \"fusion_layer\": 2}}'")
    g.add_argument("--vision-model", default=None, help="Swin checkpoint (with --text-model: official initialisation)")
    g.add_argument("--text-model", default=None, help="BERT checkpoint (e.g. bert-base-uncased)")
    g.add_argument("--tokenizer", default=None, help="tokenizer path / Hub id, or 'synthetic'")
    g.add_argument("--image-size", type=int, default=None)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="X-VLM dataset folder or Hub id (default: synthetic)")
    g.add_argument("--train-split", default="train", help="dataset split to train on")
    g.add_argument("--eval-split", default="validation", help="dataset split of the evaluations during training")
    g.add_argument("--max-train-examples", type=int, default=None, help="train on the first N rows only")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    _bool_flag(g, "streaming", False, "pretrain: read --dataset (folder of Parquet shards or Hub id) as a streamed "
               "IterableDataset split across processes; needs --max-steps (docs/training.md, Large runs)")
    g.add_argument("--shuffle-buffer", type=int, default=1000, help="--streaming: shuffle buffer size in examples "
                   "(0: stream order)")
    g = parser.add_argument_group("recipe (default: official values of the task)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-mult", type=float, default=None, help="lr multiplier of newly initialised layers")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--warmup", type=float, default=None, help="steps (>= 1) or fraction of the total (< 1)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=None, help="per process")
    g.add_argument("--max-grad-norm", type=float, default=None, help="0 disables clipping")
    g.add_argument("--grad-accum", type=int, default=1)
    g = parser.add_argument_group("pre-training")
    _bool_flag(g, "regions", True, "region batches with box losses (--no-regions: image-text objectives only)")
    g.add_argument("--iter-perc", type=float, default=None, help="probability of a region step per iteration")
    g.add_argument("--region-batch-texts", type=int, default=None)
    g.add_argument("--region-max-images", type=int, default=None)
    g.add_argument("--max-regions", type=int, default=5)
    g = parser.add_argument_group("captioning")
    g.add_argument("--prompt", default=None, help="caption prompt, saved with the processor (default: 'a picture "
                   "of ', official; none for captioning-pretrain; captioning-scst: the captioner's)")
    g.add_argument("--label-smoothing", type=float, default=None,
                   help="caption loss label smoothing (default: 0.1 for captioning, 0 for captioning-pretrain)")
    g.add_argument("--scst-samples", type=int, default=None, help="captioning-scst: samples per image (official 5)")
    g.add_argument("--cider-document-frequencies", default=None, help="captioning-scst: the official cached CIDEr-D "
                   "document frequencies (coco-train-words.p; default: counted from the training captions)")
    g = parser.add_argument_group("augmentation")
    _bool_flag(g, "randaugment", True, "official RandAugment(2, 7) (box-safe operations for boxes)")
    _bool_flag(g, "careful-hflip", True, "do not flip images whose texts mention left/right")
    g.add_argument("--crop-scale-min", type=float, default=None, help="RandomResizedCrop scale (pretrain, "
                   "nlvr2-pretrain and captioning-pretrain 0.2, retrieval, nlvr2, vqa, captioning and captioning-scst "
                   "0.5; 1 = plain resize)")
    _bool_flag(g, "grounding-crop", True, "box-aware random crop for grounding")
    g = parser.add_argument_group("system")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: the accelerate config")
    _bool_flag(g, "gradient-checkpointing", False, "activation checkpointing of the text/fusion layers")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--cpu", action="store_true", help="force the CPU")
    g = parser.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--output-dir", default=None, help="default: xvlm-output/<task>")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate on --eval-split every N steps")
    _bool_flag(g, "eval-at-end", True, "evaluate after training")
    g.add_argument("--eval-max-examples", type=int, default=None)
    g.add_argument("--k-test", type=int, default=None, help="candidates re-ranked in evaluation (default: 16 for "
                   "retrieval, 128 for vqa, the official k_test)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="batch size of the evaluations")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    g.add_argument("--save-total-limit", type=int, default=2)
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from <output-dir>/checkpoints/latest, or from the given checkpoint folder")
    g.add_argument("--allow-config-change", action="store_true",
                   help="resume even though seed, batch size, learning rate, schedule, data or model options "
                   "differ from the checkpoint's run (the differences are printed)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--log-with", nargs="*", default=[], help="accelerate trackers (tensorboard, wandb, ...)")
    g.add_argument("--project-name", default="xvlm")
    _bool_flag(g, "progress", True, "progress bar")
    _bool_flag(g, "save-final", True, "save the final model and processor (save_pretrained) in --output-dir")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["config_overrides"] = json.loads(values["config_overrides"]) if values.get("config_overrides") else {}
    values["output_dir"] = values["output_dir"] or os.path.join("xvlm-output", values["task"])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


@cli_errors("xvlm-train")
def main(argv: Sequence[str] | None = None) -> int:
    """Train one task (`xvlm-train <task> ...`; `modeling_xvlm.training.cli` adds the demo job). Bad input
    (corrupt or mismatched checkpoints, unreadable data, an output folder that cannot be written) is one line on
    stderr and exit status 2 (`modeling_xvlm.cli_errors`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    require_model_source(args.model)
    summary = train(config_from_args(args))
    if summary["eval"]:
        print(json.dumps(summary["eval"], indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
