"""transformers pipelines for X-VLM: zero-shot image classification, image-text retrieval, visual grounding,
visual question answering and captioning.

- ``"zero-shot-image-classification"``: :class:`XVLMZeroShotImageClassificationPipeline`, with `XVLMModel` or
  `XVLMForRetrieval` (which can re-rank the labels with its ITM head);
- ``"zero-shot-object-detection"``: :class:`XVLMZeroShotObjectDetectionPipeline`, with `XVLMForGrounding` (one box
  per candidate label);
- ``"feature-extraction"``: :class:`XVLMFeatureExtractionPipeline`, text or image states of any X-VLM checkpoint;
- ``"image-text-retrieval"``: :class:`XVLMImageTextRetrievalPipeline`, with `XVLMModel` or `XVLMForRetrieval`;
- ``"visual-grounding"``: :class:`XVLMVisualGroundingPipeline`, with `XVLMForGrounding` (the box head), or
  `XVLMForRetrieval` with `method="gradcam"` and candidate boxes (official weakly supervised grounding);
- ``"xvlm-vqa"``: :class:`XVLMVisualQuestionAnsweringPipeline`, with `XVLMForQuestionAnswering` (the official
  ranking of a candidate answer list).

Importing `modeling_xvlm` registers the three new tasks with `transformers.pipelines.PIPELINE_REGISTRY`.
Free-form VQA answers and captions need no X-VLM pipeline: transformers' own ``"image-text-to-text"`` pipeline
runs `XVLMForQuestionAnswering.generate` or `XVLMForConditionalGeneration.generate` (`AutoModelForImageTextToText`
maps `XVLMConfig` to both heads and loads the one of `config.architectures`); the text is the question, or the
caption prompt ``"a picture of "``, which `XVLMProcessor.post_process_image_text_to_text` cuts from the caption.
:class:`XVLMImageTextToTextPipeline` (opt-in, ``pipeline_class=``) adds the default prompt when no text is given.

The zero-shot class subclasses transformers' `ZeroShotImageClassificationPipeline` and hands every non-X-VLM model
(CLIP, SigLIP, ...) to it unchanged; for X-VLM it tokenises like the official code (`[CLS] tokens`, no [SEP],
`pre_caption` cleaning, through `XVLMProcessor`) and can re-rank the best labels with the ITM head.

Registration adds the new tasks; of transformers' own tasks it changes only those the model cards name
(`CARD_TASKS`: `"zero-shot-image-classification"`, `"zero-shot-object-detection"` ->
:class:`XVLMZeroShotObjectDetectionPipeline`, `"feature-extraction"` -> :class:`XVLMFeatureExtractionPipeline`), whose classes cannot run X-VLM: their registered
class becomes a dispatcher that builds the X-VLM class for X-VLM models and transformers' own class, unchanged,
for every other model, so `pipeline(card_tag, model=folder)` works for every X-VLM checkpoint. `pipeline_class=`
still picks a class explicitly. A zero-shot classification pipeline saved with `save_pretrained` records its
class (`custom_pipelines`), so `pipeline(task, model=folder, trust_remote_code=True)` loads it again.

All four batch with the standard `batch_size=` argument. Encoding, ITM scores and ranking are those of
`modeling_xvlm.retrieval` (`encode_images`, `encode_texts`, `itm_scores`, `retrieve`); the VQA ranking is the
model's `rank_answers`. This module imports only
torch, numpy, PIL, transformers and its sibling `retrieval.py`, so `pipe.save_pretrained(folder)` /
`pipe.push_to_hub(repo)` can ship it as remote code (`custom_pipelines`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoModelForZeroShotObjectDetection,
    Pipeline,
)
from transformers.image_transforms import to_pil_image
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.feature_extraction import FeatureExtractionPipeline
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline
from transformers.pipelines.zero_shot_object_detection import ZeroShotObjectDetectionPipeline

from .retrieval import EncodedImages, EncodedTexts, encode_images, encode_texts, itm_scores, retrieve

__all__ = [
    "CARD_TASKS",
    "XVLMFeatureExtractionPipeline",
    "XVLMImageTextRetrievalPipeline",
    "XVLMImageTextToTextPipeline",
    "XVLMVisualGroundingPipeline",
    "XVLMVisualQuestionAnsweringPipeline",
    "XVLMZeroShotImageClassificationPipeline",
    "XVLMZeroShotObjectDetectionPipeline",
    "register_pipelines",
]

# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the pipelines
# ----------------------------------------------------------------------------------------------------------------


_MAX_TEXT_TOKENS = 40  # XVLMProcessor's default max_length ([CLS] included), the official retrieval value


def _is_xvlm(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "xvlm"


def _unwrap(value: Any) -> Any:
    """Per-item payloads travel as one-element lists; batching nests them one level deeper. Return the items."""
    items: list[Any] = []
    for element in value:
        if isinstance(element, list):
            items.extend(_unwrap(element))
        else:
            items.append(element)
    return items


def _single(value: Any) -> Any:
    """An output field of one item: unbatched outputs keep the one-element list, batched ones are unbatched."""
    return value[0] if isinstance(value, list) else value


def _is_xvlm_processor(processor: Any) -> bool:
    return processor is not None and type(processor).__name__ == "XVLMProcessor"


class _XVLMInputsMixin:
    """Text and image encoding through the X-VLM processor (with a tokenizer-only fallback)."""

    def get_iterator(self, *args: Any, **kwargs: Any):
        # Batches are padded on the right, as X-VLM's texts ([CLS] at position 0, absolute positions; official).
        # A tokenizer shared with transformers' image-text-to-text pipeline may have been switched to left padding
        # (it does so for decoder models since transformers 5.25); the batch collator reads the side here.
        side = getattr(self.tokenizer, "padding_side", None)
        if side is None:
            return super().get_iterator(*args, **kwargs)
        self.tokenizer.padding_side = "right"
        try:
            return super().get_iterator(*args, **kwargs)
        finally:
            self.tokenizer.padding_side = side

    def _setup_processor(self) -> None:
        if _is_xvlm_processor(self.processor):
            self.tokenizer = self.tokenizer or self.processor.tokenizer
            self.image_processor = self.image_processor or self.processor.image_processor
            return
        if self.tokenizer is not None and self.image_processor is not None:
            try:  # available when the modeling_xvlm package is installed
                from modeling_xvlm.processing import XVLMProcessor

                self.processor = XVLMProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer)
            except ImportError:
                self.processor = None
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer or an XVLMProcessor (processor=...).")
        if self.image_processor is None:
            raise ValueError(f"{type(self).__name__} needs an image processor or an XVLMProcessor (processor=...).")

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        """Save model, tokenizer, image processor, the `XVLMProcessor` and (as remote code) the pipeline class."""
        super().save_pretrained(save_directory, **kwargs)
        if _is_xvlm_processor(self.processor):
            self.processor.save_pretrained(save_directory, **kwargs)

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` `(N, L)`: X-VLM's `[CLS] tokens` (no [SEP]), padded."""
        if _is_xvlm_processor(self.processor):
            encoded = self.processor(text=list(texts), return_tensors="pt")
            return encoded["input_ids"], encoded["attention_mask"]
        tokenizer = self.tokenizer
        body = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        rows = [[tokenizer.cls_token_id, *ids[: _MAX_TEXT_TOKENS - 1]] for ids in body]
        length = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id or 0
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.long)
        return input_ids, attention_mask

    def _encode_images(self, images: list[Any], timeout: float | None = None) -> tuple[torch.Tensor, list[Any]]:
        """`pixel_values` `(N, 3, H, W)` in the model dtype, and the images as PIL (paths and URLs are loaded,
        arrays and tensors converted)."""
        loaded = [_to_pil(image, timeout) for image in images]
        pixel_values = self.image_processor(images=loaded, return_tensors="pt")["pixel_values"]
        return pixel_values.to(self.model.dtype), loaded


def _to_pil(image: Any, timeout: float | None = None) -> Image.Image:
    if isinstance(image, (str, Image.Image)):
        return load_image(image, timeout=timeout)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return to_pil_image(image).convert("RGB")
    raise ValueError(f"Unsupported image type {type(image).__name__}: use a PIL image, a path, a URL or an array.")


def _pad_cat(tensors: list[torch.Tensor], value: int = 0) -> torch.Tensor:
    """Concatenate `(n_i, L_i)` tensors along rows, right-padding to the longest `L`."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value) for t in tensors])


def _base(model: Any) -> Any:
    base = model.base_model
    if getattr(base, "vision_proj", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no image-text contrastive projections: use XVLMModel or XVLMForRetrieval."
        )
    return base


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot image classification
# ----------------------------------------------------------------------------------------------------------------


class XVLMZeroShotImageClassificationPipeline(_XVLMInputsMixin, ZeroShotImageClassificationPipeline):
    """`pipeline("zero-shot-image-classification", model=..., pipeline_class=XVLMZeroShotImageClassificationPipeline)`
    for X-VLM (any other model falls through to transformers).

    `classifier(image, candidate_labels=[...])` scores `hypothesis_template.format(label)` for every label by the
    ITC similarity (softmax of `logits_per_image`, as CLIP). With `rerank=True` (needs `XVLMForRetrieval`) the
    `rerank_top_k` best labels (default: all) are re-scored by the ITM head and ranked by the raw ITM "match" logit,
    as the official retrieval evaluation does; their `score` is then the softmax of those logits and the
    remaining labels follow with `score` 0.

    Returns, per image, a list of `{"score", "label"}` sorted by score (with `rerank`, also `"itc_score"` and
    `"itm_score"`).
    """

    # Optional components (None = load when possible): an X-VLM checkpoint brings an XVLMProcessor, CLIP & co. a
    # tokenizer and an image processor; a model object needs `processor=` or `tokenizer=` + `image_processor=`.
    _load_processor = None
    _load_image_processor = None
    _load_tokenizer = None

    def __init__(self, **kwargs: Any):
        if _is_xvlm(kwargs.get("model")):
            Pipeline.__init__(self, **kwargs)
            self._setup_processor()
        else:
            super().__init__(**kwargs)

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        if _is_xvlm(self.model):
            return super().save_pretrained(save_directory, **kwargs)
        # Other models: save exactly what transformers' own pipeline saves (no custom-pipeline entry or code).
        cls = XVLMZeroShotImageClassificationPipeline
        registered = cls.__dict__.get("_registered_impl")
        if registered is not None:
            del cls._registered_impl
        try:
            Pipeline.save_pretrained(self, save_directory, **kwargs)
        finally:
            if registered is not None:
                cls._registered_impl = registered

    def _sanitize_parameters(self, tokenizer_kwargs=None, **kwargs):
        if not _is_xvlm(self.model):
            if tokenizer_kwargs is not None:
                kwargs["tokenizer_kwargs"] = tokenizer_kwargs
            return super()._sanitize_parameters(**kwargs)
        preprocess_keys = ("candidate_labels", "hypothesis_template", "timeout")
        preprocess_params = {k: kwargs[k] for k in preprocess_keys if k in kwargs}
        forward_params = {k: kwargs[k] for k in ("rerank", "rerank_top_k") if k in kwargs}
        return preprocess_params, forward_params, {}

    def preprocess(self, image, candidate_labels=None, hypothesis_template="This is a photo of {}.", timeout=None,
                   tokenizer_kwargs=None):
        if not _is_xvlm(self.model):
            return super().preprocess(image, candidate_labels, hypothesis_template, timeout, tokenizer_kwargs)
        if not candidate_labels:
            raise ValueError("candidate_labels must be a non-empty list of labels.")
        candidate_labels = list(candidate_labels)
        pixel_values, _ = self._encode_images([image], timeout)
        input_ids, attention_mask = self._encode_texts([hypothesis_template.format(x) for x in candidate_labels])
        meta = {"labels": candidate_labels, "input_ids": input_ids, "attention_mask": attention_mask}
        return {"pixel_values": pixel_values, "meta": [meta]}

    def _forward(self, model_inputs, rerank: bool = False, rerank_top_k: int | None = None):
        if not _is_xvlm(self.model):
            return super()._forward(model_inputs)
        metas = _unwrap(model_inputs["meta"])
        base = _base(self.model)
        if rerank and getattr(self.model, "itm_head", None) is None:
            raise ValueError(f"rerank=True needs an ITM head (XVLMForRetrieval), got {type(self.model).__name__}.")
        image = encode_images(self.model, model_inputs["pixel_values"])
        # Every label text of the batch goes through the text encoder once.
        input_ids = _pad_cat([m["input_ids"] for m in metas], value=self.tokenizer.pad_token_id or 0)
        attention_mask = _pad_cat([m["attention_mask"] for m in metas], value=0)
        text = encode_texts(self.model, input_ids, attention_mask)
        items, start = [], 0
        for b, meta in enumerate(metas):
            rows = slice(start, start + len(meta["labels"]))
            start = rows.stop
            logits = image.features[b] @ text.features[rows].t() / base.temp
            item = {"labels": meta["labels"], "logits": logits, "itm_index": None, "itm_logits": None}
            if rerank:
                k = len(meta["labels"]) if rerank_top_k is None else max(1, min(int(rerank_top_k), logits.numel()))
                top = logits.topk(k).indices
                item["itm_index"] = top
                item["itm_logits"] = itm_scores(
                    self.model,
                    image.sequences[b : b + 1],
                    text.states[rows][top],
                    text.attention_mask[rows][top],
                    image_index=torch.zeros(k, dtype=torch.long, device=logits.device),
                )
            items.append(item)
        return {"items": items}

    def postprocess(self, model_outputs):
        if not _is_xvlm(self.model):
            return super().postprocess(model_outputs)
        item = _single(model_outputs["items"])
        labels = item["labels"]
        probs = item["logits"].float().softmax(dim=-1).tolist()
        if item["itm_index"] is None:
            ranked = sorted(zip(probs, labels), key=lambda x: -x[0])
            return [{"score": score, "label": label} for score, label in ranked]
        itm_logits = item["itm_logits"].float()
        itm_probs = itm_logits.softmax(dim=-1).tolist()
        reranked = {
            int(i): (p, float(logit))
            for i, p, logit in zip(item["itm_index"].tolist(), itm_probs, itm_logits.tolist())
        }
        results = [
            {"score": reranked[i][0], "label": labels[i], "itc_score": probs[i], "itm_score": reranked[i][1]}
            for i in sorted(reranked, key=lambda i: -reranked[i][1])
        ]
        rest = sorted((i for i in range(len(labels)) if i not in reranked), key=lambda i: -probs[i])
        results += [{"score": 0.0, "label": labels[i], "itc_score": probs[i], "itm_score": None} for i in rest]
        return results


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot object detection (the grounding card's task) and feature extraction (the pre-training card's)
# ----------------------------------------------------------------------------------------------------------------


class XVLMZeroShotObjectDetectionPipeline(_XVLMInputsMixin, ZeroShotObjectDetectionPipeline):
    """`pipeline("zero-shot-object-detection", model=grounding_folder)` with `XVLMForGrounding`: one box per
    candidate label (each label is a referring expression, encoded and cleaned as the official grounding code).

    `detector(image, candidate_labels=["the man on the left", "a dog"])` -> `[{"score", "label", "box": {"xmin",
    "ymin", "xmax", "ymax"}}]`, transformers' format (int pixels of the original image), one entry per label in
    label order: X-VLM's bbox head gives no confidence, so every `score` is 1.0 (`threshold` >= 1 drops them all,
    `top_k` keeps the first labels). The boxes are those of `post_process_grounded_object_detection`, computed in
    one forward pass over all the labels of an image. Lists of images and `[{"image", "candidate_labels"}]` work
    as in transformers' pipeline.
    """

    _load_processor = None
    _load_image_processor = None
    _load_tokenizer = None

    def __init__(self, **kwargs: Any):
        Pipeline.__init__(self, **kwargs)  # transformers' model-type check does not know X-VLM
        if type(self.model).__name__ != "XVLMForGrounding":
            raise ValueError(
                f"{type(self).__name__} needs XVLMForGrounding (it predicts one box per text), got "
                f"{type(self.model).__name__}."
            )
        self._setup_processor()

    def preprocess(self, inputs, timeout=None):
        labels = inputs["candidate_labels"]
        labels = labels.split(",") if isinstance(labels, str) else labels  # transformers' convention
        if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"candidate_labels must be a non-empty list of strings, got {labels!r}.")
        pixel_values, (image,) = self._encode_images([inputs["image"]], timeout)
        input_ids, attention_mask = self._encode_texts(list(labels))
        n = len(labels)
        meta = {"labels": list(labels), "size": (image.height, image.width)}
        yield {
            "is_last": True,
            "pixel_values": pixel_values.expand(n, *pixel_values.shape[1:]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "meta": [meta],
        }

    def _forward(self, model_inputs):
        meta = _unwrap(model_inputs.pop("meta"))
        is_last = model_inputs.pop("is_last")
        outputs = self.model(**model_inputs)
        return {"pred_boxes": outputs.pred_boxes, "meta": meta, "is_last": is_last}

    def postprocess(self, model_outputs, threshold: float = 0.1, top_k: int | None = None):
        results = []
        for output in model_outputs:
            meta = _single(output["meta"])
            detections = self.image_processor.post_process_grounded_object_detection(
                output["pred_boxes"], threshold=threshold, target_sizes=[meta["size"]] * len(meta["labels"]),
                text_labels=meta["labels"],
            )
            for detection in detections:
                for score, label, box in zip(detection["scores"], detection["text_labels"], detection["boxes"]):
                    results.append({"score": score.item(), "label": label, "box": self._get_bounding_box(box)})
        results.sort(key=lambda r: r["score"], reverse=True)  # stable: label order among equal scores
        return results[:top_k] if top_k else results


class XVLMFeatureExtractionPipeline(_XVLMInputsMixin, FeatureExtractionPipeline):
    """`pipeline("feature-extraction", model=folder)` for any X-VLM checkpoint (`AutoModel` loads its
    `XVLMModel`): a text gives the text-encoder states `(1, L, hidden)` (`XVLMModel.encode_text`, the official
    `[CLS] tokens` encoding), an image (PIL, array or tensor) the image sequence `(1, 1 + P, vision_width)`
    (`encode_image`). As transformers' pipeline: nested lists, or tensors with `return_tensors=True`."""

    _load_processor = None
    _load_image_processor = None
    _load_tokenizer = None

    def __init__(self, **kwargs: Any):
        Pipeline.__init__(self, **kwargs)
        if not _is_xvlm(self.model):
            raise ValueError(f"{type(self).__name__} is for X-VLM models, got {type(self.model).__name__}.")
        self._setup_processor()

    def _sanitize_parameters(self, return_tensors=None, timeout=None, **kwargs):
        preprocess_params = {"timeout": timeout} if timeout is not None else {}
        postprocess_params = {"return_tensors": return_tensors} if return_tensors is not None else {}
        return preprocess_params, {}, postprocess_params

    def preprocess(self, inputs, timeout=None):
        if isinstance(inputs, str):
            input_ids, attention_mask = self._encode_texts([inputs])
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if isinstance(inputs, (Image.Image, np.ndarray, torch.Tensor)):
            return {"pixel_values": self._encode_images([inputs], timeout)[0]}
        raise ValueError(f"feature-extraction inputs are texts or images, got {type(inputs).__name__}.")

    def _forward(self, model_inputs):
        base = self.model.base_model
        if "pixel_values" in model_inputs:
            return {"features": base.encode_image(model_inputs["pixel_values"]).last_hidden_state}
        text = base.encode_text(model_inputs["input_ids"], model_inputs["attention_mask"])
        return {"features": text.last_hidden_state}

    def postprocess(self, model_outputs, return_tensors: bool = False):
        features = model_outputs["features"]
        return features if return_tensors else features.tolist()


class _TaskDispatcher:
    """The registered class of a transformers task that X-VLM model cards name: `pipeline(task, model=...)` builds
    `ours` for an X-VLM model and transformers' own class (`theirs`) for every other model, unchanged (the object
    is of that class). The component flags `pipeline()` reads are the union of both classes' (`None`: load when
    possible)."""

    ours: type = Pipeline
    theirs: type = Pipeline
    _load_processor = _load_image_processor = _load_video_processor = _load_feature_extractor = _load_tokenizer = None

    def __new__(cls, *args: Any, **kwargs: Any):
        target = cls.ours if _is_xvlm(kwargs.get("model")) else cls.theirs
        return target(*args, **kwargs)  # not an instance of `cls`: Python calls no second __init__


_LOAD_FLAGS = (
    "_load_processor", "_load_image_processor", "_load_video_processor", "_load_feature_extractor", "_load_tokenizer"
)


def _union_flag(a: bool | None, b: bool | None) -> bool | None:
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


def _dispatcher(theirs: type, ours: type) -> type:
    flags = {
        name: _union_flag(getattr(theirs, name), getattr(ours, name))
        for name in _LOAD_FLAGS
    }
    return type(f"XVLMOr{theirs.__name__}", (_TaskDispatcher,), {"ours": ours, "theirs": theirs, **flags})


# ----------------------------------------------------------------------------------------------------------------
# Image-text retrieval over a small gallery
# ----------------------------------------------------------------------------------------------------------------


class _Gallery:
    """The gallery of one pipeline call, encoded once (`modeling_xvlm.retrieval`) and shared by every batch of
    queries."""

    def __init__(self, kind: str, items: list[Any], batch_size: int):
        self.kind, self.items, self.batch_size = kind, list(items), batch_size
        self.encoded: EncodedImages | EncodedTexts | None = None

    def encode(self, pipe: XVLMImageTextRetrievalPipeline) -> EncodedImages | EncodedTexts:
        if self.encoded is None:
            _base(pipe.model)  # raises for a model without the ITC projections
            if self.kind == "images":
                def load(indices: torch.Tensor) -> torch.Tensor:
                    return pipe._encode_images([self.items[i] for i in indices.tolist()])[0]

                self.encoded = encode_images(pipe.model, load, self.batch_size, num_images=len(self.items))
            else:
                input_ids, attention_mask = pipe._encode_texts(self.items)
                self.encoded = encode_texts(pipe.model, input_ids, attention_mask, self.batch_size)
        return self.encoded


class _XVLMPipeline(_XVLMInputsMixin, Pipeline):
    """The package's own pipelines: the model's `XVLMProcessor` (or tokenizer + image processor) does the inputs."""

    _load_processor = None
    _load_image_processor = None
    _load_feature_extractor = False
    _load_tokenizer = None

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._setup_processor()


class XVLMImageTextRetrievalPipeline(_XVLMPipeline):
    """`pipeline("image-text-retrieval")`: rank a small gallery for each query (official `Retrieval.py` protocol).

    - text -> image: `retriever("a dog on a sofa", images=[img0, img1, ...])`;
    - image -> text: `retriever(image, texts=["a dog", "two cats", ...])`.

    Queries may be a list (batched with `batch_size=`); the gallery is encoded once per call. Candidates are the
    `k_test` (default 16) most similar gallery items by ITC cosine similarity (no temperature); with an ITM head
    (`XVLMForRetrieval`, and `rerank=True`, the default) they are re-ranked by the raw ITM "match" logit.

    Returns, per query, the `top_k` (default 5) best gallery items as `{"score", "itc_score", "index", "image" |
    "text"}` sorted by `score` (the ITM logit, or the ITC similarity without re-ranking).
    """


    def __call__(self, inputs: Any = None, images: list[Any] | None = None, texts: list[str] | None = None,
                 **kwargs: Any):
        """Rank `images` for text queries or `texts` for image queries (give exactly one gallery)."""
        if (images is None) == (texts is None):
            raise ValueError("Give exactly one gallery: images=[...] (text queries) or texts=[...] (image queries).")
        if images is not None and len(images) == 0 or texts is not None and len(texts) == 0:
            raise ValueError("The gallery is empty.")
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings.")
        kind = "images" if images is not None else "texts"
        gallery = _Gallery(kind, images if images is not None else texts, kwargs.pop("gallery_batch_size", 32))
        return super().__call__(inputs, gallery=gallery, **kwargs)

    def _sanitize_parameters(self, gallery=None, top_k=None, k_test=None, rerank=None, timeout=None, **kwargs):
        preprocess_params = {"gallery": gallery} if gallery is not None else {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        forward_params = {"gallery": gallery} if gallery is not None else {}
        if k_test is not None:
            forward_params["k_test"] = k_test
        if rerank is not None:
            forward_params["rerank"] = rerank
        postprocess_params = {"gallery": gallery} if gallery is not None else {}
        if top_k is not None:
            postprocess_params["top_k"] = top_k
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs, gallery: _Gallery = None, timeout=None):
        if gallery is None:
            raise ValueError("Give a gallery: images=[...] or texts=[...].")
        if gallery.kind == "images":  # the query is a text
            if not isinstance(inputs, str):
                raise ValueError(f"With an image gallery the queries must be texts, got {type(inputs).__name__}.")
            input_ids, attention_mask = self._encode_texts([inputs])
            return {"meta": [{"input_ids": input_ids, "attention_mask": attention_mask}]}
        pixel_values, _ = self._encode_images([inputs], timeout)
        return {"pixel_values": pixel_values, "meta": [{}]}

    def _forward(self, model_inputs, gallery: _Gallery = None, k_test: int = 16, rerank: bool = True):
        encoded = gallery.encode(self)
        metas = _unwrap(model_inputs["meta"])
        use_itm = rerank and getattr(self.model, "itm_head", None) is not None
        options = {"k": max(1, int(k_test)), "rerank": use_itm}
        if gallery.kind == "images":  # text queries: images for each text
            input_ids = _pad_cat([m["input_ids"] for m in metas], value=self.tokenizer.pad_token_id or 0)
            attention_mask = _pad_cat([m["attention_mask"] for m in metas], value=0)
            ranking = retrieve(self.model, encoded, input_ids, attention_mask, directions="t2i", **options)
            index, scores, similarity = ranking.t2i_indices, ranking.t2i_scores, ranking.similarity.t()
        else:  # image queries: texts for each image
            ranking = retrieve(self.model, model_inputs["pixel_values"], encoded, directions="i2t", **options)
            index, scores, similarity = ranking.i2t_indices, ranking.i2t_scores, ranking.similarity
        itc_scores = similarity.gather(1, index)  # cosine, no temperature (official)
        return {"items": [{"index": index[q], "score": scores[q], "itc_score": itc_scores[q]}
                          for q in range(index.shape[0])]}

    def postprocess(self, model_outputs, gallery: _Gallery = None, top_k: int = 5):
        item = _single(model_outputs["items"])
        key = "image" if gallery.kind == "images" else "text"
        rows = [
            {"score": float(s), "itc_score": float(c), "index": int(i), key: gallery.items[int(i)]}
            for i, s, c in zip(item["index"].tolist(), item["score"].float().tolist(), item["itc_score"].tolist())
        ]
        rows.sort(key=lambda r: -r["score"])
        return rows[: max(1, int(top_k))]


# ----------------------------------------------------------------------------------------------------------------
# Visual grounding
# ----------------------------------------------------------------------------------------------------------------


def draw_box(image: Image.Image, box: list[float], label: str | None = None, color: str = "red",
             width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with the `(x0, y0, x1, y1)` pixel box drawn (and `label` above it)."""
    preview = image.convert("RGB").copy()
    draw = ImageDraw.Draw(preview)
    width = width or max(2, round(min(preview.size) / 100))
    draw.rectangle([float(v) for v in box], outline=color, width=width)
    if label:
        x0, y0 = float(box[0]), float(box[1])
        draw.text((x0 + width, max(0.0, y0 - 12) if y0 >= 12 else y0 + width), label, fill=color)
    return preview


def heatmap_colors(values: np.ndarray) -> np.ndarray:
    """`(H, W)` values in [0, 1] -> `(H, W, 3)` uint8 colours of a blue-cyan-yellow-red ("jet"-like) scale."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def draw_heatmap(image: Image.Image, cam: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """A copy of `image` (RGB) blended with a `(grid_h, grid_w)` map, up-sampled bicubically to the image size as the
    official box ranking does; the map is clamped at 0 and scaled by its maximum (an all-zero map draws blue)."""
    width, height = image.size
    up = torch.nn.functional.interpolate(cam.detach().float().cpu()[None, None], size=(height, width),
                                         mode="bicubic")[0, 0].clamp(min=0)
    peak = float(up.max())
    colors = heatmap_colors((up / peak).numpy() if peak > 0 else up.numpy())
    return Image.blend(image.convert("RGB"), Image.fromarray(colors, mode="RGB"), alpha)


def image_text_inputs(image: Any, text: str | list[str] | None, key: str) -> Any:
    """A pipeline call's `(image, text)` as pipeline inputs: `{"image", key}` dicts, one per pair (one text per
    image of a list, or several texts for one image); `text=None` passes `image` on as the dict(s) themselves."""
    if text is None:
        return image
    if isinstance(image, list):
        texts = [text] * len(image) if isinstance(text, str) else list(text)
        if len(texts) != len(image):
            raise ValueError(f"Got {len(image)} images but {len(texts)} {key}s.")
        return [{"image": i, key: t} for i, t in zip(image, texts)]
    if isinstance(text, str):
        return {"image": image, key: text}
    return [{"image": image, key: t} for t in text]


class XVLMVisualGroundingPipeline(_XVLMPipeline):
    """`pipeline("visual-grounding")`: one box per (image, referring expression).

    - `grounder(image, "the dog on the left")` -> one result;
    - `grounder(image, ["the dog", "the cat"])` -> one result per expression (same image);
    - `grounder([img0, img1], ["text 0", "text 1"], batch_size=2)` or
      `grounder([{"image": img0, "text": "..."}, ...])` -> one result per pair.

    `method="box"` (the default for `XVLMForGrounding`): the box head's prediction (official `Grounding_bbox.py`).
    `method="gradcam"` (the default for `XVLMForRetrieval`, the official weakly supervised RefCOCO+ checkpoint;
    load it with `XVLMForRetrieval.from_pretrained` and pass `model=`): the candidate box that the expression's
    Grad-CAM map covers best (official `Grounding.py`: `model.compute_gradcam`, layer `gradcam_layer`, default the
    config's, then `XVLMProcessor.post_process_gradcam`); the candidates are pixel `[x, y, w, h]` boxes (official
    `dets.json`), given as `candidate_boxes=` for every pair of the call or as a pair's `"candidate_boxes"` key.
    A batch pads its texts to the longest, which scales each official map (docs/parity.md); `batch_size=1` (the
    default) does not pad.

    Each result is `{"box": {"xmin", "ymin", "xmax", "ymax"}` (int pixels of the original image, as transformers'
    detection pipelines), `"box_xyxy"` (float pixels), `"text"` and `"preview"` (a PIL copy of the image with the
    box drawn, over the heat map for Grad-CAM; `preview=False` skips it)}`, plus `"box_cxcywh_normalized"` (the
    model output) for boxes, or `"scores"` (every candidate's), `"index"` (the chosen candidate) and `"gradcam"`
    (the `(grid_h, grid_w)` map) for Grad-CAM.
    """


    def __call__(self, image: Any, text: str | list[str] | None = None, **kwargs: Any):
        return super().__call__(image_text_inputs(image, text, "text"), **kwargs)

    def _sanitize_parameters(self, preview=None, timeout=None, method=None, candidate_boxes=None,
                             gradcam_layer=None, **kwargs):
        method = method or ("gradcam" if hasattr(self.model, "compute_gradcam") else "box")
        if method not in ("box", "gradcam"):
            raise ValueError(f"method must be 'box' or 'gradcam', got {method!r}.")
        if method == "gradcam" and not hasattr(self.model, "compute_gradcam"):
            raise ValueError(
                f"method='gradcam' needs a retrieval model (XVLMForRetrieval), got {type(self.model).__name__}."
            )
        # A checkpoint loaded by path (`pipeline(task, model="folder")` loads XVLMForGrounding) that was saved as a
        # retrieval model: its box head would be random.
        loaded = bool(getattr(self.model.config, "_name_or_path", ""))
        architectures = getattr(self.model.config, "architectures", None) or []
        if method == "box" and loaded and architectures == ["XVLMForRetrieval"]:
            raise ValueError(
                f"this checkpoint is a retrieval model (config.architectures {architectures}), loaded as "
                f"{type(self.model).__name__} without a trained box head: load it with "
                "XVLMForRetrieval.from_pretrained, pass model=..., and ground with method='gradcam' and candidate_boxes."
            )
        if method == "box" and not hasattr(self.model, "bbox_head"):
            raise ValueError(
                f"method='box' needs a grounding model (XVLMForGrounding), got {type(self.model).__name__}; "
                "a retrieval model grounds with method='gradcam' and candidate_boxes."
            )
        preprocess_params = {"method": method, "candidate_boxes": candidate_boxes}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        postprocess_params = {"method": method}
        if preview is not None:
            postprocess_params["preview"] = preview
        return preprocess_params, {"method": method, "gradcam_layer": gradcam_layer}, postprocess_params

    def preprocess(self, inputs, timeout=None, method: str = "box", candidate_boxes=None):
        if not isinstance(inputs, dict) or "image" not in inputs or "text" not in inputs:
            raise ValueError("visual-grounding inputs are (image, text) or dicts {'image': ..., 'text': ...}.")
        if not isinstance(inputs["text"], str):
            raise ValueError(f"text must be a string, got {type(inputs['text']).__name__}.")
        pixel_values, (image,) = self._encode_images([inputs["image"]], timeout)
        input_ids, attention_mask = self._encode_texts([inputs["text"]])
        meta = {"image": image, "text": inputs["text"]}
        if method == "gradcam":
            boxes = inputs.get("candidate_boxes", candidate_boxes)
            if boxes is None:
                raise ValueError("method='gradcam' ranks candidate boxes: pass candidate_boxes=[[x, y, w, h], ...] "
                                 "(pixels of the original image) or a 'candidate_boxes' key per input.")
            meta["candidate_boxes"] = boxes
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, "meta": [meta]}

    def _forward(self, model_inputs, method: str = "box", gradcam_layer: int | None = None):
        metas = _unwrap(model_inputs.pop("meta"))
        if method == "gradcam":
            maps = self.model.compute_gradcam(**model_inputs, layer=gradcam_layer)
            return {"gradcam": maps, "meta": metas}
        outputs = self.model(**model_inputs)
        return {"pred_boxes": outputs.pred_boxes, "meta": metas}

    def postprocess(self, model_outputs, preview: bool = True, method: str = "box"):
        meta = _single(model_outputs["meta"])
        if method == "gradcam":
            cam = model_outputs["gradcam"]
            return self._postprocess_gradcam(cam.reshape(-1, *cam.shape[-2:])[0], meta, preview)
        cx, cy, w, h = model_outputs["pred_boxes"].reshape(-1, 4)[0].float().tolist()
        width, height = meta["image"].size
        # Official Grounding_bbox.py: (cx, w) scale with the image width, (cy, h) with its height.
        xyxy = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        result = {
            "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (int(round(v)) for v in xyxy))),
            "box_xyxy": xyxy,
            "box_cxcywh_normalized": [cx, cy, w, h],
            "text": meta["text"],
        }
        if preview:
            result["preview"] = draw_box(meta["image"], xyxy, meta["text"])
        return result

    def _postprocess_gradcam(self, cam: torch.Tensor, meta: dict[str, Any], preview: bool) -> dict[str, Any]:
        if not _is_xvlm_processor(self.processor):
            raise ValueError("method='gradcam' needs the XVLMProcessor (processor=...) for post_process_gradcam.")
        width, height = meta["image"].size
        chosen = self.processor.post_process_gradcam(cam[None].float().cpu(), [meta["candidate_boxes"]],
                                                     [(height, width)])[0]
        xyxy = chosen["box"].tolist()
        result = {
            "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (int(round(v)) for v in xyxy))),
            "box_xyxy": xyxy,
            "scores": chosen["scores"].tolist(),
            "index": chosen["index"],
            "gradcam": cam.float().cpu(),
            "text": meta["text"],
        }
        if preview:
            result["preview"] = draw_box(draw_heatmap(meta["image"], cam), xyxy, meta["text"])
        return result


# ----------------------------------------------------------------------------------------------------------------
# Visual question answering over a candidate list
# ----------------------------------------------------------------------------------------------------------------

_VQA_K_TEST = 128  # official `k_test` (configs/VQA.yaml); modeling_xvlm_vqa.DEFAULT_K_TEST, not imported to ship light


class _Candidates:
    """The candidate answers of one pipeline call, tokenised once (`XVLMProcessor.encode_answers`) and shared by
    every batch of questions."""

    def __init__(self, answers: Any):
        if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or not answers:
            raise ValueError("candidate_answers must be a non-empty list of answer strings.")
        bad = [a for a in answers if not isinstance(a, str) or not a.strip()]
        if bad:
            raise ValueError(f"candidate_answers must be non-empty strings, got {bad[0]!r}.")
        self.answers = list(answers)
        self.encoded: tuple[torch.Tensor, torch.Tensor] | None = None

    def encode(self, pipe: XVLMVisualQuestionAnsweringPipeline) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` `(C, La)`: `[CLS] answer [SEP]`, on the model's device."""
        if self.encoded is None:
            encoded = pipe.processor.encode_answers(self.answers)
            self.encoded = (encoded["input_ids"], encoded["attention_mask"])
        return self.encoded[0].to(pipe.device), self.encoded[1].to(pipe.device)


class XVLMVisualQuestionAnsweringPipeline(_XVLMPipeline):
    """`pipeline("xvlm-vqa")`: VQA with `XVLMForQuestionAnswering` by the official ranking of a candidate answer
    list (`model.rank_answers`, official `VQA.py` evaluation).

    - `vqa(image, "what color is the car?", candidate_answers=[...])` -> the `top_k` (default 1) best answers;
    - `vqa(image, ["question 0", "question 1"], candidate_answers=[...])` -> one list per question (same image);
    - `vqa([img0, img1], ["question 0", "question 1"], ...)` or `vqa([{"image": img0, "question": "..."}, ...])`
      -> one list per pair (batched with `batch_size=`).

    Questions are cleaned with the official `pre_question` (the processor's `max_words`), the candidates are
    tokenised once per call (`XVLMProcessor.encode_answers`); the first-token probabilities pick the `k_test`
    (default 128, at most the number of candidates) candidates that are re-scored by their full answer likelihood
    (`official_answer_scoring`: see `rank_answers`; default: the model config's). There is no default answer
    list: `candidate_answers` is required (for VQA v2, the official `answer_list.json`).

    Each answer is `{"answer": str, "score": float}` (the softmax over the `k_test` re-scored candidates), best
    first.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if not _is_xvlm_processor(self.processor):
            raise ValueError("xvlm-vqa needs an XVLMProcessor (processor=...): it cleans the questions and encodes "
                             "the candidate answers.")
        if not callable(getattr(self.model, "rank_answers", None)):
            raise ValueError(f"xvlm-vqa needs XVLMForQuestionAnswering, got {type(self.model).__name__}.")

    def __call__(self, image: Any, question: str | list[str] | None = None, **kwargs: Any):
        if kwargs.get("candidate_answers") is None and "candidates" not in self._forward_params:
            raise ValueError("xvlm-vqa ranks a list of candidate answers: pass candidate_answers=[...] (for VQA v2, "
                             "the official answer_list.json).")
        return super().__call__(image_text_inputs(image, question, "question"), **kwargs)

    def _sanitize_parameters(self, candidate_answers=None, top_k=None, k_test=None, official_answer_scoring=None,
                             timeout=None, **kwargs):
        preprocess_params = {"timeout": timeout} if timeout is not None else {}
        forward_params, postprocess_params = {}, {}
        if candidate_answers is not None:
            candidates = _Candidates(candidate_answers)
            forward_params["candidates"] = postprocess_params["candidates"] = candidates
        if k_test is not None:
            forward_params["k_test"] = k_test
        if official_answer_scoring is not None:
            forward_params["official_answer_scoring"] = official_answer_scoring
        if top_k is not None:
            postprocess_params["top_k"] = top_k
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs, timeout=None):
        if not isinstance(inputs, dict) or "image" not in inputs or "question" not in inputs:
            raise ValueError("xvlm-vqa inputs are (image, question) or dicts {'image': ..., 'question': ...}.")
        if not isinstance(inputs["question"], str):
            raise ValueError(f"question must be a string, got {type(inputs['question']).__name__}.")
        pixel_values, _ = self._encode_images([inputs["image"]], timeout)
        # The official VQA cleaning, whatever the processor's default (a caption processor would use pre_caption).
        text = self.processor(text=[inputs["question"]], text_preprocessing="question", return_tensors="pt")
        return {"pixel_values": pixel_values, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    def _forward(self, model_inputs, candidates: _Candidates | None = None, k_test: int = _VQA_K_TEST,
                 official_answer_scoring: bool | None = None):
        answer_ids, answer_mask = candidates.encode(self)
        ranking = self.model.rank_answers(
            model_inputs["pixel_values"],
            model_inputs["input_ids"],
            model_inputs["attention_mask"],
            answer_ids,
            answer_mask,
            k=k_test,
            official_answer_scoring=official_answer_scoring,
        )
        return {"candidate_indices": ranking.candidate_indices, "probabilities": ranking.probabilities}

    def postprocess(self, model_outputs, candidates: _Candidates | None = None, top_k: int = 1):
        ranking = (model_outputs["candidate_indices"], model_outputs["probabilities"])
        return self.processor.post_process_answers(ranking, candidates.answers, top_k=top_k)[0]


# ----------------------------------------------------------------------------------------------------------------
# Captioning: transformers' image-text-to-text pipeline with the default prompt
# ----------------------------------------------------------------------------------------------------------------

_CAPTION_PROMPT = "a picture of "  # modeling_xvlm_captioning.CAPTION_PROMPT, not imported to ship light


def _plain_images(images: Any) -> bool:
    """One image (PIL, path / URL, array, tensor) or a non-empty list of them: not a chat, not `{"image", "text"}`
    dicts."""
    kinds = (str, Image.Image, np.ndarray, torch.Tensor)
    if isinstance(images, kinds):
        return True
    return isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(i, kinds) for i in images)


class XVLMImageTextToTextPipeline(ImageTextToTextPipeline):
    """transformers' ``"image-text-to-text"`` pipeline, plus a default text for X-VLM captioners:
    `pipeline("image-text-to-text", model=captioning_folder, pipeline_class=XVLMImageTextToTextPipeline)`, then
    `captioner(image)` (or a list of images) captions from the processor's `prompt` (official
    ``"a picture of "``), as `captioner(image, text="a picture of ")` on transformers' own pipeline, which requires a
    text. Everything else is transformers' pipeline: `return_full_text=False` gives the caption alone, the default
    `prompt + caption`; `generate_kwargs` / `max_new_tokens` reach `XVLMForConditionalGeneration.generate`
    (official beam search by default). A VQA head still needs its question (`text=`).
    """

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any):
        if text is None and _plain_images(images):
            text = self._default_text(images)
        return super().__call__(images, text=text, **kwargs)

    def _default_text(self, images: Any) -> str | list[str]:
        if callable(getattr(self.model, "rank_answers", None)):
            raise ValueError(
                f"{type(self.model).__name__} answers questions: pass the question as text=..., e.g. "
                "pipe(image, text='what color is the car?')."
            )
        prompt = getattr(self.processor, "prompt", None)
        prompt = _CAPTION_PROMPT if prompt is None else prompt
        if not prompt.strip():
            raise ValueError("The processor's caption prompt is empty: pass the text to continue (text=...).")
        return [prompt] * len(images) if isinstance(images, (list, tuple)) else prompt


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------


def register_pipelines(grounding_model_class: type | None = None) -> None:
    """Register the new tasks with transformers (idempotent): `"image-text-retrieval"`, `"visual-grounding"` and
    `"xvlm-vqa"` (loaded with `AutoModelForVisualQuestionAnswering`).

    `grounding_model_class` (`XVLMForGrounding`) is the class `pipeline("visual-grounding", model="path")` loads
    locally; a pipeline saved with `save_pretrained` records `AutoModelForZeroShotObjectDetection` instead, which
    loads the head through the checkpoint's remote code (`auto_map`; `AutoModel` is the base model there).

    transformers' tasks that the model cards name and whose class cannot run X-VLM (`CARD_TASKS`:
    `"zero-shot-image-classification"`, `"zero-shot-object-detection"`, `"feature-extraction"`) get a dispatcher:
    X-VLM models get the X-VLM class, every other model transformers' own class, unchanged. No logger is silenced;
    `"image-text-to-text"` stays transformers' pipeline (:class:`XVLMImageTextToTextPipeline` is chosen with
    `pipeline_class=`).
    """
    tasks = PIPELINE_REGISTRY.supported_tasks
    if tasks.get("image-text-retrieval", {}).get("impl") is not XVLMImageTextRetrievalPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            "image-text-retrieval",
            pipeline_class=XVLMImageTextRetrievalPipeline,
            pt_model=AutoModelForZeroShotImageClassification,
            type="multimodal",
        )
    if tasks.get("visual-grounding", {}).get("impl") is not XVLMVisualGroundingPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            "visual-grounding",
            pipeline_class=XVLMVisualGroundingPipeline,
            pt_model=grounding_model_class or AutoModelForZeroShotObjectDetection,
            type="multimodal",
        )
        # What `pipe.save_pretrained` writes into `config.custom_pipelines`: class names that transformers exports.
        XVLMVisualGroundingPipeline._registered_impl = {
            "visual-grounding": {
                "impl": XVLMVisualGroundingPipeline, "pt": (AutoModelForZeroShotObjectDetection,), "type": "multimodal"
            }
        }
    if tasks.get("xvlm-vqa", {}).get("impl") is not XVLMVisualQuestionAnsweringPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            "xvlm-vqa",
            pipeline_class=XVLMVisualQuestionAnsweringPipeline,
            pt_model=AutoModelForVisualQuestionAnswering,
            type="multimodal",
        )
    for task, (theirs, ours) in CARD_TASKS.items():
        entry = tasks.get(task)
        if entry is None or entry["impl"] not in (theirs, f"{theirs.__module__}.{theirs.__qualname__}"):
            continue  # not transformers' own class any more (already dispatched, or someone else's): kept
        # The entry itself is updated (its model classes and default kept) rather than re-registered, which would
        # log an "Overwriting" warning at every `import modeling_xvlm`.
        tasks[task] = {**entry, "impl": _dispatcher(theirs, ours)}


#: transformers' tasks that X-VLM model cards name (`pipeline_tag`) whose own class cannot run X-VLM:
#: `{task: (transformers' class, the X-VLM class)}`. `register_pipelines` makes `pipeline(task, model=...)` build
#: the X-VLM class for X-VLM models and transformers' class, unchanged, for every other model (`_TaskDispatcher`).
CARD_TASKS = {
    "zero-shot-image-classification": (ZeroShotImageClassificationPipeline, XVLMZeroShotImageClassificationPipeline),
    "zero-shot-object-detection": (ZeroShotObjectDetectionPipeline, XVLMZeroShotObjectDetectionPipeline),
    "feature-extraction": (FeatureExtractionPipeline, XVLMFeatureExtractionPipeline),
}

# What `save_pretrained` records, so that the saved folder loads it (the registered class is the dispatcher).
XVLMZeroShotImageClassificationPipeline._registered_impl = {
    "zero-shot-image-classification": {
        "impl": XVLMZeroShotImageClassificationPipeline,
        "pt": (AutoModelForZeroShotImageClassification,),
        "type": "multimodal",
    }
}
