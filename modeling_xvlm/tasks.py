"""The one table of X-VLM tasks: task name -> head class, Auto classes, Hub pipeline tag and model-card text.

Used by the converter (`xvlm-convert --task`, `modeling_xvlm.conversion`), the Hub helpers (`hub.register_xvlm`:
Auto classes and remote code; `hub.create_model_card`) and training (`xvlm-train <task>`). A new head is one new
row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .modeling_xvlm import XVLMModel, XVLMPreTrainedModel
from .modeling_xvlm_grounding import XVLMForGrounding
from .modeling_xvlm_nlvr import XVLMForImagesAndTextClassification, XVLMForTextAssignment
from .modeling_xvlm_pretraining import XVLMForPretraining
from .modeling_xvlm_retrieval import XVLMForRetrieval
from .modeling_xvlm_captioning import XVLMForConditionalGeneration
from .modeling_xvlm_vqa import XVLMForQuestionAnswering


@dataclass(frozen=True)
class XVLMTask:
    """One task of the package.

    Args:
        name: the task name used by `xvlm-convert --task`, `xvlm-train` and the model card.
        model_class: the head class.
        auto_class: the transformers Auto class that loads the head locally (`None`: no fitting task Auto class).
            Several rows may share one: the Auto class then loads the head named in `config.architectures`.
        remote_auto_class: the `auto_map` key under which the head loads as remote code (`trust_remote_code=True`),
            the same as `auto_class` for every head: `AutoModel` is the base model's (`XVLMModel`) in every
            checkpoint, with or without the package (`XVLMPreTrainedModel.save_pretrained` writes that entry).
        pipeline_tag: the Hub task id of the model card (`None`: no Hub task fits; the card then has none).
        summary: one sentence for the model card: what the checkpoint does.
        intended_use: the model card's "Intended use" section.
        usage: the model card's "How to use" snippet (`{repo_id}` is replaced); `None`: the generic
            `AutoModel` + `AutoProcessor` snippet.
    """

    name: str
    model_class: type[XVLMPreTrainedModel]
    auto_class: str | None
    remote_auto_class: str
    pipeline_tag: str | None
    summary: str
    intended_use: str = ""
    usage: str | None = None


_RETRIEVAL_USAGE = """```python
from transformers import pipeline

from modeling_xvlm.pipelines import XVLMZeroShotImageClassificationPipeline  # pip install modeling-xvlm

classifier = pipeline("zero-shot-image-classification", model="{repo_id}",
                      pipeline_class=XVLMZeroShotImageClassificationPipeline)
classifier("cat.jpg", candidate_labels=["a cat", "a dog"])

# or, with the package installed (`import modeling_xvlm`), the retrieval pipeline over a small gallery:
retriever = pipeline("image-text-retrieval", model="{repo_id}")
retriever("a dog on a sofa", gallery=["1.jpg", "2.jpg", "3.jpg"], top_k=2)
```"""

_PRETRAINING_USAGE = """```python
from transformers import AutoModelForPreTraining, AutoProcessor

model = AutoModelForPreTraining.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=image, text=["a photo of a dog"])
features = model.xvlm.get_image_features(inputs["pixel_values"]).pooler_output
```"""

_NLVR2_USAGE = """```python
import torch
from transformers import AutoModelForSequenceClassification, AutoProcessor

model = AutoModelForSequenceClassification.from_pretrained("{repo_id}", trust_remote_code=True)  # the NLVR2 head
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=[left_image, right_image], text=["The left image has more dogs than the right one."])
pixel_values = inputs["pixel_values"].unsqueeze(0)  # (1, 2, 3, H, W): the pair of one sentence
logits = model(pixel_values=pixel_values, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
is_true = logits.argmax(-1).item() == 1
```"""

_VQA_USAGE = """```python
import modeling_xvlm  # registers the "xvlm-vqa" pipeline
from transformers import pipeline

vqa = pipeline("xvlm-vqa", model="{repo_id}")  # the official ranking over a candidate list
vqa("kitchen.jpg", "what color is the kettle?", candidate_answers=["red", "blue", "white"], top_k=2)

generator = pipeline("image-text-to-text", model="{repo_id}")  # free-form answers by generation
generator("kitchen.jpg", text="what color is the kettle?", return_full_text=False)  # the answer alone
```"""

_CAPTIONING_USAGE = """```python
import modeling_xvlm  # registers the X-VLM heads (or pass trust_remote_code=True without the package)
from transformers import pipeline

captioner = pipeline("image-text-to-text", model="{repo_id}")  # loads XVLMForConditionalGeneration
captioner("kitchen.jpg", text="a picture of ", return_full_text=False)  # the official prompt; the caption alone

# the model API: the official beam search (3 beams, at most 20 tokens with the prompt), official decoding
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
pixel_values = processor(images=[image])["pixel_values"]
generated = model.generate(pixel_values, input_ids=processor.caption_prompt(len(pixel_values)))
captions = processor.post_process_captions(generated)  # the prompt cut, as the official evaluation
```"""

_GROUNDING_USAGE = """```python
import modeling_xvlm  # registers the "visual-grounding" pipeline
from transformers import pipeline

grounder = pipeline("visual-grounding", model="{repo_id}")
result = grounder("street.jpg", "the man on the left")
result["box"], result["preview"].save("preview.png")
```"""


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
            intended_use="Continued pre-training and fine-tuning of X-VLM (ITC, ITM, MLM and box losses).",
            usage=_PRETRAINING_USAGE,
        ),
        XVLMTask(
            "retrieval",
            XVLMForRetrieval,
            "AutoModelForZeroShotImageClassification",
            "AutoModelForZeroShotImageClassification",
            "zero-shot-image-classification",
            "X-VLM for image-text retrieval: ITC candidates re-ranked by the image-text matching head.",
            intended_use="Image-to-text and text-to-image retrieval (ITC candidates re-ranked by the ITM head) and "
            "zero-shot image classification over free-text labels.",
            usage=_RETRIEVAL_USAGE,
        ),
        XVLMTask(
            "grounding",
            XVLMForGrounding,
            "AutoModelForZeroShotObjectDetection",  # one box per text: per candidate label in that pipeline
            "AutoModelForZeroShotObjectDetection",
            "zero-shot-object-detection",
            "X-VLM for referring-expression grounding: one box per text from the fused [CLS].",
            intended_use="Referring-expression grounding: one box per (image, expression) pair.",
            usage=_GROUNDING_USAGE,
        ),
        XVLMTask(
            "vqa",
            XVLMForQuestionAnswering,
            "AutoModelForVisualQuestionAnswering",
            "AutoModelForVisualQuestionAnswering",
            "image-text-to-text",  # transformers 5 removed its "visual-question-answering" pipeline for this one
            "X-VLM for visual question answering: an answer decoder reads the question's fused states; answers are "
            "ranked over a candidate list (official protocol) or generated.",
            intended_use="Visual question answering (VQA v2): the official ranking of a candidate answer list "
            "(`rank_answers`, the `xvlm-vqa` pipeline) or free-form answers (`generate`, `image-text-to-text`).",
            usage=_VQA_USAGE,
        ),
        XVLMTask(
            "captioning",
            XVLMForConditionalGeneration,
            "AutoModelForImageTextToText",
            "AutoModelForImageTextToText",
            "image-text-to-text",  # transformers 5 redirects "image-to-text" here (with a mis-formatted warning)
            "X-VLM for image captioning: the text stack as a causal decoder cross-attending to the image patches, "
            "with the official beam search.",
            intended_use="Image captioning (COCO Karpathy): captions after the official prompt `a picture of `, "
            "decoded with the official beam search (3 beams, 20 tokens with the prompt).",
            usage=_CAPTIONING_USAGE,
        ),
        XVLMTask(
            "nlvr2",
            XVLMForImagesAndTextClassification,
            "AutoModelForSequenceClassification",  # a sentence classified (true / false) against its image pair
            "AutoModelForSequenceClassification",
            None,  # no Hub task classifies a sentence against a pair of images
            "X-VLM for NLVR2: is a sentence true of a pair of images? A 2-way head on the fused [CLS] of a text stack "
            "whose fusion layers alternate between the two images.",
            intended_use="Natural-language visual reasoning over image pairs (NLVR2): binary true/false "
            "classification of (left image, right image, sentence) examples.",
            usage=_NLVR2_USAGE,
        ),
        XVLMTask(
            "nlvr2-pretrain",
            XVLMForTextAssignment,
            "AutoModelForPreTraining",  # shared with XVLMForPretraining, picked by `config.architectures`
            "AutoModelForPreTraining",
            None,  # a pre-training objective, not a Hub task
            "X-VLM text-assignment (TA) domain pre-training for NLVR2: for a sentence and a pair of images, is its "
            "image the left one, the right one, or neither?",
            intended_use="The official NLVR2 domain pre-training step (text assignment) before NLVR2 fine-tuning; "
            "convert it with `xvlm-convert --task nlvr2` to start the fine-tuning.",
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
    intended_use="Image, region and text features in a shared space (feature extraction, zero-shot classification).",
)


def all_rows() -> tuple[XVLMTask, ...]:
    """Every model class row: `BASE_MODEL` first, then the task heads."""
    return (BASE_MODEL, *TASKS.values())


def task_of(model_or_class: object) -> XVLMTask:
    """The task row of a model, a model class or a class name (`BASE_MODEL` for `XVLMModel`)."""
    name = model_or_class if isinstance(model_or_class, str) else getattr(model_or_class, "__name__", None)
    if name is None:
        name = type(model_or_class).__name__
    for task in all_rows():
        if task.model_class.__name__ == name:
            return task
    raise KeyError(f"{name} is not an X-VLM model class; known: {[t.model_class.__name__ for t in TASKS.values()]}.")


__all__ = ["BASE_MODEL", "TASKS", "XVLMTask", "all_rows", "task_of"]
