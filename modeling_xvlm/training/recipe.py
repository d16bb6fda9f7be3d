"""The official X-VLM optimisation recipe (official `configs/*.yaml`, `optim.py`, `scheduler.py`): AdamW parameter groups and the LambdaLR schedule.

* :func:`parameter_groups` / :func:`create_optimizer`: AdamW ``betas=(0.9, 0.98)``, ``eps=1e-8``, weight decay 0.01,
  four groups (decay / no-decay x base lr / ``lr * lr_mult``). A parameter is "no-decay" when its name contains any
  of :data:`NO_DECAY_SUBSTRINGS` (a *substring* test, so every bias, ``relative_position_bias_table`` and every
  ``norm*``/``LayerNorm`` weight is exempt, while ``temp`` and the LayerNorm inside ``build_mlp`` heads
  (``itm_head.1.weight``) are decayed, exactly as officially).
* :func:`linear_warmup_decay` / :func:`create_scheduler`: linear warm-up from 0 then linear decay to 0, stepped per
  optimizer step (official ``scheduler.py``).
* :data:`TASK_RECIPES`: the official per-task values (learning rate, lr multiplier, warm-up, epochs, batch size,
  gradient clipping).

Where each value comes from:

* ``pretrain``: ``configs/Pretrain_XVLM_base_4m.yaml`` (+ ``Pretrain.py``).
* ``retrieval``: ``configs/Retrieval_coco.yaml`` / ``configs/Retrieval_flickr.yaml``.
* ``grounding``: ``configs/Grounding_bbox.yaml``.
* ``nlvr2``: ``configs/NLVR.yaml``: ``optimizer: {opt: adamW, lr: 3e-5, weight_decay: 0.01, lr_mult: 2}``,
  ``schedular: {sched: linear, epochs: 10, num_warmup_steps: 0.1}``, ``batch_size: 10`` (per GPU); the lr
  multiplier applies to the new ``cls_head`` (``models/model_nlvr.py``: ``init_params = cls_head.*``); no gradient
  clipping (``NLVR.py``).
* ``nlvr2-pretrain`` (text assignment, ``NLVR_pretrain.py``): its config (``configs/NLVR_pretrain_O1.yaml``, the
  default in ``run.py``) is *not* in the official release. ``NLVR_pretrain.py`` fixes the structure (image-text
  batches of ``config['images']['batch_size']``, the linear schedule, clipping ``accelerator.CLIP_GRAD_NORM``,
  ``init_params = ta_head.*`` in ``models/model_nlvr_pretrain.py``); the values are those of the released sibling
  domain pre-training config ``configs/Grounding_bbox_pretrain_O1.yaml``: lr 3e-5, weight decay 0.01, lr_mult 2,
  2 epochs, warm-up 0.1, clipping 1.0, batch 24 per GPU (its batch size). Override them when you know better.
* ``vqa``: ``configs/VQA.yaml``: ``optimizer: {opt: adamW, lr: 5e-5, weight_decay: 0.01, lr_mult: 2}``,
  ``schedular: {sched: linear, epochs: 10, num_warmup_steps: 0.1}``, ``batch_size_train: 24`` (per GPU),
  ``k_test: 128``; the lr multiplier applies to the answer decoder's cross-attention key/value
  (``models/model_vqa.py``: ``init_params``, only when their input width, the text width, differs from the vision
  width, i.e. when they are newly initialised); no gradient clipping (``VQA.py``).
* ``captioning``: ``configs/Captioning.yaml``: ``optimizer: {opt: adamW, lr: 1e-5, weight_decay: 0.01, lr_mult: 2}``,
  ``schedular: {sched: linear, epochs: 5, num_warmup_steps: 0.1}``, ``batch_size_train: 32`` (per GPU),
  ``label_smoothing: 0.1``, ``max_tokens: 40``; the multiplier has no effect (``models/model_captioning.py`` builds
  ``XVLMBase`` without any new layer, so ``init_params`` stays empty); no gradient clipping (``Captioning.py``).
* ``captioning-pretrain``: ``configs/Captioning_pretrain_O1.yaml`` (``Captioning_pretrain.py``): lr 3e-5, weight
  decay 0.01, lr_mult 2 (no effect, as above), 2 epochs, warm-up 0.1, image-text batches of 128 per GPU, apex O1 with
  ``CLIP_GRAD_NORM`` 1.0; no prompt and no label smoothing (``models/model_captioning_pretrain.py``).
* ``captioning-scst``: ``configs/Captioning_scst.yaml`` (``Captioning_scst.py``): lr 1e-5, weight decay 0.01, lr_mult
  2 (no effect), linear schedule with warm-up 0.1 over ``num_training_steps: 44275`` ("8855 * 5 epochs": 5 epochs
  of one record per training caption at 8 x 8 GPUs), ``batch_size_train: 8``, ``sc_train_sample_n: 5``,
  ``eval_steps: 500``; no clipping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "NO_DECAY_SUBSTRINGS",
    "NEW_PARAMETER_PATTERNS",
    "HEAD_PARAMETER_PATTERNS",
    "TaskRecipe",
    "TASK_RECIPES",
    "get_recipe",
    "is_no_decay",
    "new_parameter_names",
    "parameter_groups",
    "create_optimizer",
    "resolve_warmup_steps",
    "linear_warmup_decay",
    "create_scheduler",
    "steps_per_epoch",
]

#: Official ``optim.create_optimizer`` ``no_decay`` list, matched as substrings of the parameter name.
NO_DECAY_SUBSTRINGS: tuple[str, ...] = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
)

#: Parameters that are newly initialised when X-VLM pre-training starts from Swin + BERT (official
#: ``model.init_params``: the cross-attention blocks, the ITC projections, the temperature and the heads). They get
#: ``lr * lr_mult``. Used for pre-training when the model does not carry ``newly_initialized_keys``.
NEW_PARAMETER_PATTERNS: tuple[str, ...] = (
    r"\.crossattention\.",
    r"(^|\.)vision_proj\.",
    r"(^|\.)text_proj\.",
    r"(^|\.)temp$",
    r"(^|\.)itm_head\.",
    r"(^|\.)bbox_head\.",
)


@dataclass(frozen=True)
class TaskRecipe:
    """Official hyper-parameters of one task (official `configs/*.yaml`).

    ``warmup`` is a number of steps (int) or a fraction of the total steps (float < 1). ``max_grad_norm`` ``None``
    means no clipping (official fine-tuning). ``new_params_get_lr_mult``: whether ``lr_mult`` applies at all (the
    official retrieval and box-grounding models reset ``init_params`` to ``[]``, so it has no effect there).
    """

    lr: float
    lr_mult: float = 2.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    epochs: int = 10
    warmup: float | int = 0.1
    batch_size: int = 20
    max_grad_norm: float | None = None
    new_params_get_lr_mult: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> TaskRecipe:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TASK_RECIPES: dict[str, TaskRecipe] = {
    # Pretrain_XVLM_base_4m.yaml: images 128/GPU x 8, regions 128 texts from <= 48 images, iter_perc 0.5,
    # apex O1 + clipping 1.0, warm-up 2500 steps, 41 epochs.
    "pretrain": TaskRecipe(
        lr=1e-4,
        lr_mult=2.0,
        epochs=41,
        warmup=2500,
        batch_size=128,
        max_grad_norm=1.0,
        new_params_get_lr_mult=True,
        extra={"iter_perc": 0.5, "region_batch_texts": 128, "region_max_images": 48, "max_regions": 5},
    ),
    # Retrieval_coco.yaml / Retrieval_flickr.yaml: fp32 DDP, no clipping.
    "retrieval": TaskRecipe(lr=3e-5, epochs=10, warmup=0.1, batch_size=20, extra={"k_test": 256}),
    # Grounding_bbox.yaml.
    "grounding": TaskRecipe(lr=3e-5, epochs=10, warmup=0.1, batch_size=20),
    # NLVR.yaml: adamW lr 3e-5, wd 0.01, lr_mult 2 (cls_head, model_nlvr.py init_params), linear, 10 epochs,
    # warm-up 0.1, batch 10 per GPU; fp32, no clipping (NLVR.py).
    "nlvr2": TaskRecipe(lr=3e-5, lr_mult=2.0, epochs=10, warmup=0.1, batch_size=10, new_params_get_lr_mult=True),
    # NLVR_pretrain.py (its NLVR_pretrain_O1.yaml is not released): values of Grounding_bbox_pretrain_O1.yaml, the
    # released sibling domain pre-training config: lr 3e-5, wd 0.01, lr_mult 2 (ta_head), 2 epochs, warm-up 0.1,
    # CLIP_GRAD_NORM 1.0, batch 24 per GPU.
    "nlvr2-pretrain": TaskRecipe(lr=3e-5, lr_mult=2.0, epochs=2, warmup=0.1, batch_size=24, max_grad_norm=1.0,
                                 new_params_get_lr_mult=True),
    # VQA.yaml: adamW lr 5e-5, wd 0.01, lr_mult 2 (decoder cross-attention key/value, model_vqa.py init_params),
    # linear, 10 epochs, warm-up 0.1, batch 24 per GPU, k_test 128; fp32, no clipping (VQA.py).
    "vqa": TaskRecipe(lr=5e-5, lr_mult=2.0, epochs=10, warmup=0.1, batch_size=24, new_params_get_lr_mult=True,
                      extra={"k_test": 128}),
    # Captioning.yaml: adamW lr 1e-5, wd 0.01 (lr_mult 2: no new layer), linear, 5 epochs, warm-up 0.1, batch 32 per
    # GPU, label smoothing 0.1; fp32, no clipping (Captioning.py).
    "captioning": TaskRecipe(lr=1e-5, lr_mult=2.0, epochs=5, warmup=0.1, batch_size=32,
                             extra={"label_smoothing": 0.1}),
    # Captioning_pretrain_O1.yaml: lr 3e-5, 2 epochs, warm-up 0.1, batch 128, CLIP_GRAD_NORM 1.0; no smoothing.
    "captioning-pretrain": TaskRecipe(lr=3e-5, lr_mult=2.0, epochs=2, warmup=0.1, batch_size=128, max_grad_norm=1.0,
                                      extra={"label_smoothing": 0.0}),
    # Captioning_scst.yaml: lr 1e-5, warm-up 0.1 of 44,275 steps (5 epochs of caption records), batch 8, 5 samples.
    "captioning-scst": TaskRecipe(lr=1e-5, lr_mult=2.0, epochs=5, warmup=0.1, batch_size=8,
                                  extra={"num_samples": 5, "eval_steps": 500}),
}

#: The new layers of each fine-tuning task with an ``init_params`` list (official ``models/model_nlvr.py``,
#: ``model_nlvr_pretrain.py``, ``model_vqa.py``): these parameters get ``lr * lr_mult``.
HEAD_PARAMETER_PATTERNS: dict[str, tuple[str, ...]] = {
    "nlvr2": (r"^cls_head\.",),
    "nlvr2-pretrain": (r"^ta_head\.",),
    "vqa": (r"^text_decoder\..*\.crossattention\.self\.(key|value)\.",),
}


def get_recipe(task: str, **overrides: Any) -> TaskRecipe:
    """The official recipe of ``task`` (``pretrain``, ``retrieval``, ``grounding``, ``nlvr2``, ``nlvr2-pretrain``,
    ``vqa``, ``captioning``, ``captioning-pretrain``, ``captioning-scst``) with ``overrides`` applied
    (``None`` values are ignored, so CLI defaults of ``None`` keep the official value)."""
    if task not in TASK_RECIPES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_RECIPES)}")
    return TASK_RECIPES[task].replace(**overrides)


def is_no_decay(name: str) -> bool:
    """Official substring rule: no weight decay when any of :data:`NO_DECAY_SUBSTRINGS` occurs in ``name``."""
    return any(s in name for s in NO_DECAY_SUBSTRINGS)


def new_parameter_names(model: nn.Module, task: str = "pretrain") -> set[str]:
    """Names of the parameters that get ``lr * lr_mult``.

    Fine-tuning (``retrieval``, ``grounding``): none, as officially. NLVR2 (``nlvr2``, ``nlvr2-pretrain``): the new
    head only (:data:`HEAD_PARAMETER_PATTERNS`, official ``init_params``). VQA: the answer decoder's
    cross-attention key/value, when the text width differs from the vision width (official ``model_vqa.py``: only
    then are they new; otherwise none). Pre-training:
    ``model.newly_initialized_keys`` when the model was built from Swin + BERT checkpoints, otherwise the official
    new-layer set (:data:`NEW_PARAMETER_PATTERNS`).
    """
    names = {n for n, _ in model.named_parameters()}
    if task == "vqa" and model.config.text_config.hidden_size == model.config.vision_width:
        return set()
    if task in HEAD_PARAMETER_PATTERNS:
        patterns = [re.compile(p) for p in HEAD_PARAMETER_PATTERNS[task]]
        return {n for n in names if any(p.search(n) for p in patterns)}
    if task != "pretrain":
        return set()
    given = getattr(model, "newly_initialized_keys", None)
    if given is not None:
        return names & set(given)
    patterns = [re.compile(p) for p in NEW_PARAMETER_PATTERNS]
    return {n for n in names if any(p.search(n) for p in patterns)}


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    lr_mult: float = 1.0,
    new_params: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The four official AdamW groups: (decay, lr), (no-decay, lr), (decay, lr*lr_mult), (no-decay, lr*lr_mult).

    Empty groups are dropped; each group carries ``"name"`` for logging. Frozen parameters are skipped.
    """
    new_params = set(new_params)
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (True, False): [],
        (False, False): [],
        (True, True): [],
        (False, True): [],
    }
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        decay = not is_no_decay(name)
        buckets[(decay, name in new_params)].append(param)
    groups = []
    for (decay, new), params in buckets.items():
        if not params:
            continue
        groups.append(
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * (lr_mult if new else 1.0),
                "name": f"{'decay' if decay else 'no_decay'}{'_new' if new else ''}",
            }
        )
    return groups


def create_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    lr_mult: float = 1.0,
    new_params: Iterable[str] = (),
    betas: Sequence[float] = (0.9, 0.98),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with the official groups. ``torch.optim.AdamW`` equals the ``transformers`` AdamW with
    ``correct_bias=True`` used officially (decoupled weight decay ``lr * wd``, bias-corrected moments)."""
    groups = parameter_groups(model, lr, weight_decay, lr_mult, new_params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def resolve_warmup_steps(warmup: float | int, total_steps: int) -> int:
    """An int is a number of steps; a float in ``[0, 1)`` a fraction of ``total_steps`` (official ``scheduler.py``)."""
    if isinstance(warmup, float) and warmup < 1:
        return int(warmup * total_steps)
    return int(warmup)


def linear_warmup_decay(num_warmup_steps: int, num_training_steps: int):
    """The official LambdaLR factor: ``step / warmup`` during warm-up, then ``max(0, (total - step) / (total -
    warmup))``."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return float(step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))

    return factor


def create_scheduler(
    optimizer: torch.optim.Optimizer, num_training_steps: int, warmup: float | int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`linear_warmup_decay`, stepped once per optimizer step (pre-training: once per
    image-batch step; the extra region-batch step does not advance it, official `Pretrain.py`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(resolve_warmup_steps(warmup, num_training_steps), num_training_steps)
    )


def steps_per_epoch(num_examples: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Official ``total = epochs * ceil(train_size / (batch_per_gpu * world_size))`` per-epoch part."""
    per_step = batch_size * world_size
    return max(1, num_examples // per_step if drop_last else math.ceil(num_examples / per_step))
