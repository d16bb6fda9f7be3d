"""The one table of X-VLM tasks: task name -> head class, Auto classes, Hub pipeline tag and model-card text.

Used by the converter (`xvlm-convert --task`), the Hub helpers (Auto registration, remote code, model cards) and
training (`xvlm-train <task>`). A new head is one new row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .modeling_xvlm import XVLMModel, XVLMPreTrainedModel
from .modeling_xvlm_grounding import XVLMForGrounding
from .modeling_xvlm_pretraining import XVLMForPretraining
from .modeling_xvlm_retrieval import XVLMForRetrieval


@dataclass(frozen=True)
class XVLMTask:
    """One task of the package.

    Args:
        name: the task name used by `xvlm-convert --task`, `xvlm-train` and the model card.
        model_class: the head class.
        auto_class: the transformers Auto class that loads the head locally (`None`: no fitting task Auto class).
        remote_auto_class: the `auto_map` key under which the head loads as remote code (`trust_remote_code=True`).
        pipeline_tag: the Hub task id of the model card.
        summary: one sentence for the model card: what the checkpoint does.
    """

    name: str
    model_class: type[XVLMPreTrainedModel]
    auto_class: str | None
    remote_auto_class: str
    pipeline_tag: str
    summary: str


TASKS: dict[str, XVLMTask] = {
    task.name: task
    for task in (
        XVLMTask(
            "pretrain",
            XVLMForPretraining,
            "AutoModelForPreTraining",
            "AutoModelForPreTraining",
            "feature-extraction",
            "X-VLM pre-training model: image-text contrastive, matching and masked-LM heads at every grain, plus "
            "box prediction for regions.",
        ),
        XVLMTask(
            "retrieval",
            XVLMForRetrieval,
            "AutoModelForZeroShotImageClassification",
            "AutoModelForZeroShotImageClassification",
            "zero-shot-image-classification",
            "X-VLM for image-text retrieval: ITC candidates re-ranked by the image-text matching head.",
        ),
        XVLMTask(
            "grounding",
            XVLMForGrounding,
            None,
            "AutoModel",
            "zero-shot-object-detection",
            "X-VLM for referring-expression grounding: one box per text from the fused [CLS].",
        ),
    )
}

#: The base model's row in the class tables (not a task: it has no head).
BASE_MODEL = XVLMTask(
    "base",
    XVLMModel,
    "AutoModel",
    "AutoModel",
    "zero-shot-image-classification",
    "X-VLM base model: image, region and text encoders with the cross-modal fusion encoder.",
)


def task_of(model_or_class: object) -> XVLMTask:
    """The task row of a model, a model class or a class name (`BASE_MODEL` for `XVLMModel`)."""
    name = model_or_class if isinstance(model_or_class, str) else getattr(model_or_class, "__name__", None)
    if name is None:
        name = type(model_or_class).__name__
    for task in (*TASKS.values(), BASE_MODEL):
        if task.model_class.__name__ == name:
            return task
    raise KeyError(f"{name} is not an X-VLM model class; known: {[t.model_class.__name__ for t in TASKS.values()]}.")


__all__ = ["BASE_MODEL", "TASKS", "XVLMTask", "task_of"]
