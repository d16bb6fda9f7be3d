"""Training and evaluation of X-VLM: the official recipe, accelerate training loop, checkpoints, evaluation.

* :mod:`.recipe` - AdamW groups (official no-decay substrings, lr multiplier), LambdaLR warm-up/decay, task recipes.
* :mod:`.augment` / :mod:`.collators` / :mod:`.region_collators` / :mod:`.masking` / :mod:`.data` - official
  augmentations, task collators, pre-training and grounding batches, MLM masking, step-indexed data.
* :mod:`.checkpointing` - atomic, exactly resumable checkpoints.
* :mod:`.scst` - self-critical sequence training of the captioner (official ``Captioning_scst.py``).
* :mod:`.trainer` - :class:`XVLMTrainer`, ``transformers.Trainer`` that keeps the collators' columns and evaluates
  without augmentation.
* :mod:`.train` - ``xvlm-train`` (accelerate); :mod:`.evaluate` - ``xvlm-eval``; :mod:`.main_job` - the CPU demo.
"""

from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
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
    vqa_answer_weights,
    vqa_train_transform,
)
from .data import CaptionRecords
from .masking import XVLMTextMasker, mask_token_ids
from .region_collators import (
    XVLMGroundingCollator,
    XVLMPretrainCollator,
    XVLMRegionSampler,
    mentions_left_right,
    require_columns,
)
from .evaluate import (
    evaluate_captioning,
    evaluate_grounding,
    evaluate_nlvr2,
    evaluate_retrieval,
    evaluate_vqa,
    grounding_accuracy,
    vqa_metrics,
    vqa_soft_accuracy,
)
from .recipe import (
    NO_DECAY_SUBSTRINGS,
    TASK_RECIPES,
    TaskRecipe,
    create_optimizer,
    create_scheduler,
    get_recipe,
    linear_warmup_decay,
    parameter_groups,
)
from .scst import XVLMSelfCriticalCaptioning, sample_captions, scst_document_frequencies, scst_loss
from .train import TrainConfig, train
from .trainer import XVLMTrainer, evaluation_collator

__all__ = [
    "BoxSafeRegionSampler",
    "CaptionRecords",
    "NO_DECAY_SUBSTRINGS",
    "TASK_RECIPES",
    "TaskRecipe",
    "TrainConfig",
    "XVLMCaptioningCollator",
    "XVLMCaptioningSCSTCollator",
    "XVLMGroundingCollator",
    "XVLMGroundingTrainCollator",
    "XVLMImageTextTransform",
    "XVLMNLVR2Collator",
    "XVLMPretrainCollator",
    "XVLMRegionSampler",
    "XVLMRetrievalCollator",
    "XVLMSelfCriticalCaptioning",
    "XVLMTextAssignmentCollator",
    "XVLMTextMasker",
    "XVLMTrainer",
    "XVLMVQACollator",
    "captioning_train_transform",
    "create_optimizer",
    "create_scheduler",
    "evaluate_captioning",
    "evaluate_grounding",
    "evaluate_nlvr2",
    "evaluate_retrieval",
    "evaluate_vqa",
    "evaluation_collator",
    "get_recipe",
    "grounding_accuracy",
    "latest_checkpoint",
    "linear_warmup_decay",
    "mask_token_ids",
    "mentions_left_right",
    "nlvr2_train_transform",
    "load_checkpoint",
    "parameter_groups",
    "require_columns",
    "sample_captions",
    "save_checkpoint",
    "scst_document_frequencies",
    "scst_loss",
    "train",
    "vqa_answer_weights",
    "vqa_metrics",
    "vqa_soft_accuracy",
    "vqa_train_transform",
]
