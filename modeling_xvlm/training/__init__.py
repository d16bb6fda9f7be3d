"""Training and evaluation of X-VLM: the official recipe, accelerate training loop, checkpoints, evaluation.

* :mod:`.recipe` - AdamW groups (official no-decay substrings, lr multiplier), LambdaLR warm-up/decay, task recipes.
* :mod:`.augment` / :mod:`.collators` / :mod:`.region_collators` / :mod:`.masking` / :mod:`.data` - official
  augmentations, task collators, pre-training and grounding batches, MLM masking, step-indexed data.
* :mod:`.checkpointing` - atomic, exactly resumable checkpoints.
* :mod:`.train` - ``xvlm-train`` (accelerate); :mod:`.evaluate` - ``xvlm-eval``; :mod:`.main_job` - the CPU demo.
"""

from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .collators import (
    BoxSafeRegionSampler,
    XVLMGroundingTrainCollator,
    XVLMImageTextTransform,
    XVLMNLVR2Collator,
    XVLMRetrievalCollator,
    XVLMTextAssignmentCollator,
    XVLMVQACollator,
    nlvr2_train_transform,
    vqa_answer_weights,
    vqa_train_transform,
)
from .masking import XVLMTextMasker, mask_token_ids
from .region_collators import XVLMGroundingCollator, XVLMPretrainCollator, XVLMRegionSampler, mentions_left_right
from .evaluate import (
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
from .train import TrainConfig, train

__all__ = [
    "BoxSafeRegionSampler",
    "NO_DECAY_SUBSTRINGS",
    "TASK_RECIPES",
    "TaskRecipe",
    "TrainConfig",
    "XVLMGroundingCollator",
    "XVLMGroundingTrainCollator",
    "XVLMImageTextTransform",
    "XVLMNLVR2Collator",
    "XVLMPretrainCollator",
    "XVLMRegionSampler",
    "XVLMRetrievalCollator",
    "XVLMTextAssignmentCollator",
    "XVLMTextMasker",
    "XVLMVQACollator",
    "create_optimizer",
    "create_scheduler",
    "evaluate_grounding",
    "evaluate_nlvr2",
    "evaluate_retrieval",
    "evaluate_vqa",
    "get_recipe",
    "grounding_accuracy",
    "latest_checkpoint",
    "linear_warmup_decay",
    "mask_token_ids",
    "mentions_left_right",
    "nlvr2_train_transform",
    "load_checkpoint",
    "parameter_groups",
    "save_checkpoint",
    "train",
    "vqa_answer_weights",
    "vqa_metrics",
    "vqa_soft_accuracy",
    "vqa_train_transform",
]
