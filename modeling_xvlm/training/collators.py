"""Training collators for the fine-tuning tasks and the pre-training image-text stream.

``region_collators`` builds pre-training batches (:class:`XVLMPretrainCollator`) and un-augmented grounding batches
(:class:`XVLMGroundingCollator`); this module adds what the fine-tuning tasks need on top:

* :class:`XVLMRetrievalCollator` - image-caption pairs -> ``XVLMForRetrieval`` inputs (``image_ids`` for the
  official ITC multi-positives / ITM negative masking), with the official ``train_transform``
  (RandomResizedCrop(0.5, 1) -> horizontal flip (guarded) -> optional RandAugment).
* :class:`XVLMGroundingTrainCollator` - referring expressions -> ``XVLMForGrounding`` inputs with the official
  ``grounding_bbox`` training transform (box-aware random crop keeping the box, flip unless the text says
  left/right, square resize, optional box-safe RandAugment).
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
    "BoxSafeRegionSampler",
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

    def __call__(self, image: Any, texts: Sequence[str] = ()) -> PIL.Image.Image:
        rng = self.rng
        image = load_image_rgb(image)
        if self.scale[0] >= 1.0:
            image = image.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)
        else:
            image = random_resized_crop(image, self.image_size, rng, scale=self.scale)
        if rng.random() < self.hflip_prob:
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
