"""Training collators for the fine-tuning tasks and the pre-training image-text stream.

``region_collators`` builds pre-training batches (:class:`XVLMPretrainCollator`) and un-augmented grounding batches
(:class:`XVLMGroundingCollator`); this module adds what the fine-tuning tasks need on top:

* :class:`XVLMRetrievalCollator` - image-caption pairs -> ``XVLMForRetrieval`` inputs (``image_ids`` for the
  official ITC multi-positives / ITM negative masking), with the official ``train_transform``
  (RandomResizedCrop(0.5, 1) -> horizontal flip (guarded) -> optional RandAugment).
* :class:`XVLMGroundingTrainCollator` - referring expressions -> ``XVLMForGrounding`` inputs with the official
  ``grounding_bbox`` training transform (box-aware random crop keeping the box, flip unless the text says
  left/right, square resize, optional box-safe RandAugment).
* :class:`XVLMNLVR2Collator` - NLVR2 rows (``left_image``, ``right_image``, ``sentence``, ``label``) ->
  ``XVLMForImagesAndTextClassification`` inputs (``pixel_values`` ``(B, 2, 3, H, W)``), each image with the official
  NLVR2 ``train_transform`` (the retrieval one, :func:`nlvr2_train_transform`), never flipped when the sentence
  mentions left/right.
* :class:`XVLMTextAssignmentCollator` - image-text rows -> ``XVLMForTextAssignment`` inputs (official
  ``NLVR_pretrain.py``: the ``pretrain_transform`` images and the captions; the model draws the image pairs).
* :class:`XVLMImageTextTransform` - the official ``pretrain_transform`` for pre-training image-text rows.
* :class:`BoxSafeRegionSampler` - the processing region sampler followed by box-safe RandAugment (official
  ``box_transform``), for pre-training region batches.

Every collator draws its randomness from ``self.rng`` (a ``random.Random``); :func:`reseed` re-seeds a collator
and every RNG it holds, which the training loop does before each batch so that a batch is a function of its seed.
All collators work with ``transformers.Trainer`` (set ``remove_unused_columns=False``: they need the raw columns).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature

from ..processing import encode_texts, load_image_rgb
from .augment import RandomAugment, hflip, random_resized_crop
from .region_collators import XVLMRegionSampler, mentions_left_right

__all__ = [
    "XVLMImageTextTransform",
    "XVLMRetrievalCollator",
    "XVLMGroundingTrainCollator",
    "XVLMNLVR2Collator",
    "XVLMTextAssignmentCollator",
    "BoxSafeRegionSampler",
    "nlvr2_label",
    "nlvr2_train_transform",
    "reseed",
    "pixel_values_from_pil",
]


def reseed(obj: Any, seed: int) -> None:
    """Seed ``obj.rng`` and the RNGs of its known parts (``masker``, ``region_sampler``, ``sampler``,
    ``transform``) from ``seed``, each with a distinct derived seed."""
    seen: set[int] = set()

    def visit(o: Any, s: int) -> None:
        if o is None or id(o) in seen:
            return
        seen.add(id(o))
        rng = getattr(o, "rng", None)
        if isinstance(rng, random.Random):
            rng.seed(s)
        for k, attr in enumerate(("masker", "region_sampler", "sampler", "transform", "inner")):
            visit(getattr(o, attr, None), s * 31 + k + 1)

    visit(obj, int(seed))


def pixel_values_from_pil(images: Sequence[Any], image_processor) -> torch.Tensor:
    """``(N, 3, S, S)`` float32 pixel values of (already augmented) images, with the processor's resize, rescale
    and CLIP normalisation."""
    return image_processor([load_image_rgb(image) for image in images], return_tensors="pt")["pixel_values"]


class XVLMImageTextTransform:
    """Official ``pretrain_transform`` / ``train_transform`` for whole-image captions.

    ``RandomResizedCrop(size, scale)`` (bicubic) -> horizontal flip with probability ``hflip_prob`` unless
    ``careful_hflip`` and a text mentions left/right -> optional RandAugment (all operations).

    Official values: pre-training ``scale=(0.2, 1.0)``, retrieval ``scale=(0.5, 1.0)``; the official flip does not
    look at the text (``careful_hflip=False`` reproduces it); ``randaugment=True``.
    """

    def __init__(
        self,
        image_size: int,
        scale: Sequence[float] = (0.5, 1.0),
        hflip_prob: float = 0.5,
        careful_hflip: bool = True,
        left_right_test: str = "word",
        randaugment: bool = True,
        seed: int | None = None,
    ) -> None:
        self.image_size = int(image_size)
        self.scale = tuple(scale)
        self.hflip_prob = hflip_prob
        self.careful_hflip = careful_hflip
        self.left_right_test = left_right_test
        self.randaugment = RandomAugment() if randaugment else None
        self.rng = random.Random(seed)

    def __call__(self, image: Any, texts: Sequence[str] = (), allow_flip: bool = True) -> PIL.Image.Image:
        """Augment one image; ``allow_flip=False`` never flips (the flip draw is still made, so the random stream
        does not depend on it)."""
        rng = self.rng
        image = load_image_rgb(image)
        if self.scale[0] >= 1.0:
            image = image.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)
        else:
            image = random_resized_crop(image, self.image_size, rng, scale=self.scale)
        if rng.random() < self.hflip_prob and allow_flip:
            if not (self.careful_hflip and mentions_left_right(list(texts), self.left_right_test)):
                image = hflip(image)
        if self.randaugment is not None:
            image = self.randaugment(image, rng)
        return image


class BoxSafeRegionSampler:
    """:class:`~modeling_xvlm.training.region_collators.XVLMRegionSampler` followed by box-safe RandAugment (official
    ``box_transform``). Same call signature and attributes (``image_size``, ``rng``)."""

    def __init__(self, sampler: XVLMRegionSampler, randaugment: bool = True) -> None:
        self.sampler = sampler
        self.image_size = sampler.image_size
        self.randaugment = RandomAugment(box_safe=True) if randaugment else None
        self.rng = random.Random()

    def __call__(self, image: Any, captions: Any, objects: Sequence[dict]):
        image, entries = self.sampler(image, captions, objects)
        if self.randaugment is not None:
            image = self.randaugment(image, self.rng)
        return image, entries


class XVLMRetrievalCollator:
    """Image-caption pairs -> ``pixel_values``, ``input_ids``, ``attention_mask``, ``image_ids`` (the retrieval
    targets) and ``return_loss=True``.

    Rows: ``{"image", "caption", "image_index"}`` (as :func:`modeling_xvlm.data.retrieval_pairs` returns; without
    ``image_index`` every row is its own image). ``image_ids`` is the contiguous per-image index, used by the
    official ITC with multiple positives and by ITM negative sampling to avoid false negatives.

    Args:
        processor: an ``XVLMProcessor``.
        transform: an :class:`XVLMImageTextTransform` for training (``None``: the evaluation transform, a square
            bicubic resize by the processor).
    """

    def __init__(self, processor, transform: XVLMImageTextTransform | None = None) -> None:
        self.processor = processor
        self.transform = transform
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        texts = [r["caption"] for r in rows]
        if self.transform is not None:
            images = [self.transform(r["image"], [r["caption"]]) for r in rows]
            pixel_values = pixel_values_from_pil(images, self.processor.image_processor)
        else:
            pixel_values = pixel_values_from_pil([r["image"] for r in rows], self.processor.image_processor)
        ids, att = _encode(self.processor, texts)
        image_ids = [int(r["image_index"]) if "image_index" in r else k for k, r in enumerate(rows)]
        return BatchFeature(
            {
                "pixel_values": pixel_values,
                "input_ids": ids,
                "attention_mask": att,
                "image_ids": torch.tensor(image_ids, dtype=torch.long),
                # Trainer computes an evaluation loss only for batches that carry labels or `return_loss=True`
                # (the retrieval targets, `image_ids`, have no "label" in their name).
                "return_loss": True,
            }
        )


class XVLMGroundingTrainCollator:
    """Referring expressions ``{"image", "text", "bbox" (xywh pixels)}`` -> ``pixel_values``, ``input_ids``,
    ``attention_mask``, ``labels`` (normalised ``cxcywh`` of the box in the model input).

    Official ``grounding_dataset_bbox`` training transform: random crop that keeps the whole box
    (``x0 ~ U[0, x]``, ``x1 ~ U[x + w, W]``, same for y), horizontal flip with probability 0.5 unless the text
    mentions left/right (official ``careful_hflip``; substring test with ``left_right_test="substring"``), square
    bicubic resize, box-safe RandAugment. The box is translated, flipped and rescaled with the image.

    Args:
        processor: an ``XVLMProcessor`` (its image processor's size is the model input).
        crop, hflip_prob, careful_hflip, left_right_test: see :class:`~modeling_xvlm.training.region_collators.XVLMRegionSampler`.
        randaugment: apply box-safe RandAugment (official True).
    """

    def __init__(
        self,
        processor,
        crop: bool = True,
        hflip_prob: float = 0.5,
        careful_hflip: bool = True,
        left_right_test: str = "word",
        randaugment: bool = True,
    ) -> None:
        self.processor = processor
        h, w = processor.image_processor.input_size
        if h != w:
            raise ValueError(f"grounding training needs a square model input, got {(h, w)}")
        self.sampler = XVLMRegionSampler(
            image_size=h,
            max_regions=1,
            min_perc_in_image=0.0,
            hflip_prob=hflip_prob,
            careful_hflip=careful_hflip,
            left_right_test=left_right_test,
            crop=crop,
        )
        self.randaugment = RandomAugment(box_safe=True) if randaugment else None
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        images, texts, boxes = [], [], []
        size = self.sampler.image_size
        for r in rows:
            text = r["text"] if "text" in r else r["caption"]
            image, entries = self.sampler(r["image"], None, [{"bbox": list(r["bbox"]), "caption": text}])
            if not entries:  # the sampler drops boxes with no area left inside the image
                raise ValueError(f"grounding row with an empty box: {r.get('bbox')!r}")
            if self.randaugment is not None:
                image = self.randaugment(image, self.rng)
            x, y, w, h = entries[0][1]
            images.append(image)
            texts.append(text)
            boxes.append([(x + w / 2) / size, (y + h / 2) / size, w / size, h / size])
        ids, att = _encode(self.processor, texts)
        return BatchFeature(
            {
                "pixel_values": pixel_values_from_pil(images, self.processor.image_processor),
                "input_ids": ids,
                "attention_mask": att,
                "labels": torch.tensor(boxes, dtype=torch.float32),
            }
        )


def nlvr2_train_transform(
    image_size: int, randaugment: bool = True, crop_scale_min: float = 0.5, left_right_test: str = "word"
) -> XVLMImageTextTransform:
    """The official NLVR2 training transform (``dataset/__init__.py``: ``nlvr`` uses ``train_transform``, the
    retrieval one): RandomResizedCrop(image_size, scale=(0.5, 1)) (bicubic) -> horizontal flip (p = 0.5) ->
    RandAugment(2, 7). Here the flip is skipped when the sentence mentions left/right (see
    :class:`XVLMNLVR2Collator`); the evaluation transform is the processor's square bicubic resize."""
    return XVLMImageTextTransform(
        image_size, scale=(crop_scale_min, 1.0), careful_hflip=True, left_right_test=left_right_test,
        randaugment=randaugment,
    )


def nlvr2_label(value: Any) -> int:
    """An NLVR2 label as a class index: ``1`` / ``True`` / ``"True"`` -> 1, ``0`` / ``False`` / ``"False"`` -> 0."""
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1"):
            return 1
        if value.strip().lower() in ("false", "0"):
            return 0
        raise ValueError(f"unsupported NLVR2 label {value!r}")
    if isinstance(value, torch.Tensor):
        value = value.item()
    label = int(value)
    if label not in (0, 1):
        raise ValueError(f"unsupported NLVR2 label {value!r} (expected 0 or 1)")
    return label


class XVLMNLVR2Collator:
    """NLVR2 rows ``{"left_image", "right_image", "sentence", "label"}`` -> ``pixel_values`` ``(B, 2, 3, H, W)``
    (left, right), ``input_ids``, ``attention_mask`` (``[CLS] words``, ``pre_caption``-cleaned, no [SEP]) and
    ``labels`` ``(B,)`` (1 = the sentence is true of the pair; rows without ``label`` give no ``labels``).

    Each image is augmented on its own by ``transform`` (official ``nlvr_dataset`` applies ``train_transform`` to
    image0 and image1 separately). A sentence that mentions left/right (``mentions_left_right``, ``left_right_test``)
    never has its images flipped, whatever the transform's ``careful_hflip``: "the dog on the left" would be false of
    a mirrored image. (The official transform flips regardless.)

    Args:
        processor: an ``XVLMProcessor``.
        transform: an :class:`XVLMImageTextTransform` for training (:func:`nlvr2_train_transform`); ``None``: the
            evaluation transform, the processor's square bicubic resize (official ``test_transform``).
        left_right_test: ``"word"`` (default) or ``"substring"`` (the official test).
    """

    def __init__(self, processor, transform: XVLMImageTextTransform | None = None,
                 left_right_test: str = "word") -> None:
        self.processor = processor
        self.transform = transform
        self.left_right_test = left_right_test
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        images, sentences, labels = [], [], []
        for k, r in enumerate(rows):
            missing = [key for key in ("left_image", "right_image", "sentence") if key not in r]
            if missing:
                raise ValueError(f"NLVR2 row {k} has no {', '.join(missing)} (keys: {sorted(r)})")
            sentence = r["sentence"]
            pair = [r["left_image"], r["right_image"]]
            if self.transform is not None:
                allow_flip = not mentions_left_right([sentence], self.left_right_test)
                pair = [self.transform(image, [sentence], allow_flip=allow_flip) for image in pair]
            images.extend(pair)
            sentences.append(sentence)
            if "label" in r and r["label"] is not None:
                labels.append(nlvr2_label(r["label"]))
        if labels and len(labels) != len(rows):
            raise ValueError("some NLVR2 rows have a label and others not")
        pixel_values = pixel_values_from_pil(images, self.processor.image_processor)
        ids, att = _encode(self.processor, sentences)
        out = {
            "pixel_values": pixel_values.view(len(rows), 2, *pixel_values.shape[1:]),
            "input_ids": ids,
            "attention_mask": att,
        }
        if labels:
            out["labels"] = torch.tensor(labels, dtype=torch.long)
        return BatchFeature(out)


class XVLMTextAssignmentCollator:
    """Image-text rows -> ``XVLMForTextAssignment`` inputs: ``pixel_values`` ``(B, 3, H, W)``, ``input_ids``,
    ``attention_mask`` and ``return_loss=True`` (the model draws the image pairs and their labels itself, so a
    batch has no ``labels``; ``return_loss`` makes ``Trainer`` report an evaluation loss).

    Rows: ``{"image", "caption"}`` (a str, or a list from which one caption is drawn per batch) or the
    ``pretrain`` schema ``{"image", "captions"}``. Official ``NLVR_pretrain.py``: image-text data with the
    ``pretrain_transform`` (``XVLMImageTextTransform(scale=(0.2, 1))``); ``transform=None`` resizes only.
    """

    def __init__(self, processor, transform: XVLMImageTextTransform | None = None) -> None:
        self.processor = processor
        self.transform = transform
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        images, texts = [], []
        for k, r in enumerate(rows):
            captions = r["caption"] if "caption" in r else r.get("captions")
            if not captions:
                raise ValueError(f"text-assignment row {k} has no caption")
            caption = captions if isinstance(captions, str) else self.rng.choice(list(captions))
            image = r["image"]
            if self.transform is not None:
                image = self.transform(image, [caption])
            images.append(image)
            texts.append(caption)
        ids, att = _encode(self.processor, texts)
        return BatchFeature(
            {
                "pixel_values": pixel_values_from_pil(images, self.processor.image_processor),
                "input_ids": ids,
                "attention_mask": att,
                "return_loss": True,
            }
        )


def _encode(processor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, att = encode_texts(
        processor.tokenizer,
        list(texts),
        max_length=processor.max_length,
        truncation=True,
        padding=processor.padding,
        add_sep=processor.add_sep,
        text_preprocessing=processor.text_preprocessing,
        max_words=processor.max_words,
    )
    return torch.tensor(ids, dtype=torch.long), torch.tensor(att, dtype=torch.long)
