"""Batches of box and region data: pre-training and grounding (official `dataset/pretrain_dataset.py`,
`dataset/grounding_dataset.py`).

* :class:`XVLMRegionSampler` — the official region-data transform of ``RegionTextJsonDataset`` (anchor-box-aware
  random crop, horizontal flip, square resize, region sampling with ``max_regions`` / ``min_perc_in_image``).
* :class:`XVLMPretrainCollator` — rows -> a pre-training batch (unique images, ``image_index``, region masks, MLM
  inputs and labels, box ``labels``, ``is_image``).
* :class:`XVLMGroundingCollator` — rows ``{"image", "text", "bbox"}`` -> ``XVLMForGrounding`` inputs.
* :func:`require_columns` — the row check every collator starts with (a missing column is named, with the
  ``transformers.Trainer`` setting that drops columns).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import PIL.Image
import torch

from transformers.feature_extraction_utils import BatchFeature

from ..box_ops import box_convert
from ..processing import encode_texts, load_image_rgb
from ..processing.boxes import normalize_boxes, region_masks_from_boxes, scale_boxes_to_input
from .masking import XVLMTextMasker

__all__ = [
    "XVLMRegionSampler",
    "XVLMPretrainCollator",
    "XVLMGroundingCollator",
    "mentions_left_right",
    "require_columns",
]

#: Why a column a collator needs can be missing although the dataset has it.
TRAINER_COLUMNS_HINT = (
    "transformers.Trainer removes the dataset columns that are not arguments of the model's forward unless "
    "TrainingArguments(remove_unused_columns=False) is set; modeling_xvlm.training.XVLMTrainer keeps the columns "
    "its collator reads"
)


def require_columns(rows: Sequence[Any], columns: Sequence[str | tuple[str, ...]], what: str) -> None:
    """Check that every row is a mapping with each of ``columns`` (a tuple: any one of its names).

    Raises:
        TypeError: a row is not a mapping.
        ValueError: the first row that lacks a column, naming the missing columns, the row's keys and
            :data:`TRAINER_COLUMNS_HINT`.
    """
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{what} rows must be dicts of columns, row {k} is a {type(row).__name__}")
        alternatives = [(column,) if isinstance(column, str) else tuple(column) for column in columns]
        missing = [" or ".join(names) for names in alternatives if not any(n in row for n in names)]
        if missing:
            raise ValueError(
                f"{what} row {k} has no {', '.join(missing)} column (it has {sorted(row)}): {TRAINER_COLUMNS_HINT}"
            )

_WORD_START_LEFT_RIGHT = re.compile(r"\b(left|right)", re.IGNORECASE)


def mentions_left_right(texts: Sequence[str], test: str = "word") -> bool:
    """Whether any text speaks about left/right (then a horizontal flip would make it wrong).

    ``test="substring"``: the official test (``'left' in t or 'right' in t``; "bright" and "leftover" count).
    ``test="word"`` (default): a word *starting* with left/right ("left", "rightmost", "left-hand", "Left"), so
    "bright", "upright", "alright" and "fright" no longer block the flip.
    """
    if test == "substring":
        return any("left" in t or "right" in t for t in texts)
    if test == "word":
        return any(_WORD_START_LEFT_RIGHT.search(t) is not None for t in texts)
    raise ValueError(f"left/right test must be 'word' or 'substring', got {test!r}")


def _pick(rng: random.Random, value: str | Sequence[str] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    value = list(value)
    return rng.choice(value) if value else None


class XVLMRegionSampler:
    """Official region-data transform (``RegionTextJsonDataset.__getitem__``), as a callable.

    ``sampler(image, captions, objects) -> (image_res, entries)`` where ``image_res`` is the cropped / flipped PIL
    image resized to ``image_size x image_size`` (bicubic, aspect ratio not kept) and ``entries`` is a list of
    ``(text, box_xywh, is_image)`` with ``box_xywh`` in pixels of ``image_res`` (``[0, 0, S, S]`` for the
    whole-image caption, ``is_image=1``).

    ``objects``: dicts ``{"bbox": [x, y, w, h] (pixels), "caption": str | list[str], "attributes": list[str]
    (optional)}``.

    Steps: (1) pick a random anchor object and crop to ``x0 ~ U[0, floor(x)]``, ``y0 ~ U[0, floor(y)]``,
    ``x1 ~ U[min(ceil(x + w), W), W]``, ``y1 ~ U[min(ceil(y + h), H), H]`` (the anchor stays inside); (2) flip with
    probability ``hflip_prob`` unless ``careful_hflip`` and a caption mentions left/right (``left_right_test``);
    (3) resize; (4) the whole-image caption (random pick of a list) takes one of ``max_regions`` slots; (5) objects in
    random order: keep those whose intersection with the crop is non-empty and covers more than
    ``min_perc_in_image`` of the object; the box is the clipped part, shifted, flipped and scaled; the text is
    ``"attribute caption"`` with a random attribute when there are attributes.

    Differences from the official code (documented): boxes partly outside the original image are clipped rather
    than asserted; objects without a caption are skipped; the anchor is drawn among objects with positive area
    only; no RandAugment here (apply photometric augmentation yourself if wanted).

    Args:
        image_size: side S of the square output (the model input size).
        max_regions: texts per image (official 5).
        min_perc_in_image: official 0.5.
        hflip_prob: official 0.5.
        careful_hflip: skip the flip when a caption mentions left/right (official default False; here True).
        left_right_test: ``"word"`` (default) or ``"substring"`` (official), see :func:`mentions_left_right`.
        crop: apply the anchor crop (official True).
        seed: seed of a private ``random.Random``.
    """

    def __init__(
        self,
        image_size: int = 384,
        max_regions: int = 5,
        min_perc_in_image: float = 0.5,
        hflip_prob: float = 0.5,
        careful_hflip: bool = True,
        left_right_test: str = "word",
        crop: bool = True,
        seed: int | None = None,
    ) -> None:
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        if left_right_test not in ("word", "substring"):
            raise ValueError(f"left_right_test must be 'word' or 'substring', got {left_right_test!r}")
        self.image_size = int(image_size)
        self.max_regions = max_regions
        self.min_perc_in_image = min_perc_in_image
        self.hflip_prob = hflip_prob
        self.careful_hflip = careful_hflip
        self.left_right_test = left_right_test
        self.crop = crop
        self.rng = random.Random(seed)

    @staticmethod
    def _texts_of(captions: Any, objects: Sequence[dict]) -> list[str]:
        texts: list[str] = []
        for value in [captions] + [o.get("caption") for o in objects]:
            if isinstance(value, str):
                texts.append(value)
            elif value is not None:
                texts.extend(str(v) for v in value)
        return texts

    def __call__(
        self, image: Any, captions: str | Sequence[str] | None, objects: Sequence[dict] | None
    ) -> tuple[PIL.Image.Image, list[tuple[str, list[float], int]]]:
        rng = self.rng
        image = load_image_rgb(image, "image")
        objects = list(objects or [])
        W, H = image.size
        # (1) anchor crop
        x0, y0, x1, y1 = 0, 0, W, H
        valid = []
        for k, obj in enumerate(objects):
            if "bbox" not in obj:
                raise ValueError(f"objects[{k}] has no 'bbox'")
            x, y, w, h = (float(v) for v in obj["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
                raise ValueError(f"objects[{k}]['bbox'] is invalid: {obj['bbox']!r}")
            if min(x + w, W) > max(x, 0) and min(y + h, H) > max(y, 0):
                valid.append((x, y, w, h))
        if self.crop and valid:
            x, y, w, h = rng.choice(valid)
            # official: int() of the box, then ranges with inclusive bounds; clipped into the image here
            x, y, w, h = int(x), int(y), int(w), int(h)
            x, y = min(max(x, 0), W - 1), min(max(y, 0), H - 1)
            x0 = rng.randint(0, x)
            y0 = rng.randint(0, y)
            x1 = rng.randint(min(math.ceil(x + w), W), W)
            y1 = rng.randint(min(math.ceil(y + h), H), H)
            x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
            image = image.crop((x0, y0, x1, y1))
        wc, hc = x1 - x0, y1 - y0
        # (2) flip
        flip = False
        if rng.random() < self.hflip_prob:
            flip = not (self.careful_hflip and mentions_left_right(self._texts_of(captions, objects),
                                                                   self.left_right_test))
        if flip:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        # (3) resize
        s = self.image_size
        image = image.resize((s, s), PIL.Image.Resampling.BICUBIC)
        entries: list[tuple[str, list[float], int]] = []
        # (4) whole-image caption
        cap = _pick(rng, captions)
        if cap is not None:
            entries.append((cap, [0.0, 0.0, float(s), float(s)], 1))
        # (5) regions
        order = list(range(len(objects)))
        rng.shuffle(order)
        for k in order:
            if len(entries) >= self.max_regions:
                break
            obj = objects[k]
            text = _pick(rng, obj.get("caption"))
            if text is None:
                continue
            x, y, w, h = (float(v) for v in obj["bbox"])
            ix0, iy0 = max(x, x0), max(y, y0)
            ix1, iy1 = min(x + w, x1), min(y + h, y1)
            if ix1 <= ix0 or iy1 <= iy0 or w * h <= 0:
                continue
            if (ix1 - ix0) * (iy1 - iy0) / (w * h) <= self.min_perc_in_image:
                continue
            bx, by, bw, bh = ix0 - x0, iy0 - y0, ix1 - ix0, iy1 - iy0
            if flip:
                bx = (wc - bx) - bw
            bx, bw = bx * s / wc, bw * s / wc
            by, bh = by * s / hc, bh * s / hc
            attributes = obj.get("attributes")
            if attributes:
                text = f"{rng.choice(list(attributes))} {text}"
            entries.append((text, [bx, by, bw, bh], 0))
        return image, entries


class XVLMPretrainCollator:
    """Build X-VLM pre-training batches from dataset rows.

    Rows: image-text rows ``{"image", "caption": str | list[str]}`` (one whole-image entry, a random caption of a
    list) and region rows ``{"image", "caption": str | list | None, "objects": [...]}`` (sent through
    ``region_sampler``). Rows whose entries are all dropped contribute no image.

    Output ``BatchFeature`` (``torch``): ``pixel_values`` (N_images, 3, H, W); ``input_ids``, ``attention_mask``,
    ``mlm_input_ids``, ``mlm_labels`` (N_texts, L); ``image_index``, ``is_image`` (N_texts,); ``region_masks``
    (N_texts, 1 + P); ``labels`` (N_texts, 4) target boxes, normalised cxcywh.

    Args:
        processor: an :class:`XVLMProcessor` (image processor + tokenizer + text settings).
        masker: an :class:`XVLMTextMasker` (default: the official parameters, seeded with ``seed``).
        region_sampler: an :class:`XVLMRegionSampler` (default: official parameters at the processor's size).
        max_texts: if set, sample this many texts without replacement when there are more; with
            ``pad_with_duplicates`` also pad to it with random duplicates (the official behaviour, batch_size 128;
            duplicates act as ITC false negatives, so the default is off).
        seed: seeds the default masker / sampler and the text sampling.
    """

    #: The row columns this collator reads (``XVLMTrainer`` keeps them in the dataset).
    input_columns: tuple[str, ...] = ("image", "caption", "objects")

    def __init__(
        self,
        processor,
        masker: XVLMTextMasker | None = None,
        region_sampler: XVLMRegionSampler | None = None,
        max_texts: int | None = None,
        pad_with_duplicates: bool = False,
        seed: int | None = None,
    ) -> None:
        self.processor = processor
        self.masker = masker if masker is not None else XVLMTextMasker(processor.tokenizer, seed=seed)
        ip = processor.image_processor
        h, w = ip.input_size
        if region_sampler is None:
            if h != w:
                raise ValueError(f"the default region sampler needs a square input size, got {(h, w)}")
            region_sampler = XVLMRegionSampler(image_size=h, seed=None if seed is None else seed + 1)
        self.region_sampler = region_sampler
        self.max_texts = max_texts
        self.pad_with_duplicates = pad_with_duplicates
        self.rng = random.Random(None if seed is None else seed + 2)

    def _entries(self, row: dict) -> tuple[Any, list[tuple[str, list[float] | None, int]], tuple[int, int] | None]:
        if "image" not in row:
            raise ValueError("each row needs an 'image'")
        if row.get("objects") is not None:
            image, entries = self.region_sampler(row["image"], row.get("caption"), row["objects"])
            s = self.region_sampler.image_size
            return image, entries, (s, s)
        cap = _pick(self.rng, row.get("caption"))
        return row["image"], ([] if cap is None else [(cap, None, 1)]), None

    def __call__(self, rows: Sequence[dict]):
        require_columns(rows, ["image"], "pre-training")
        images, entries, image_of, space = [], [], [], []
        for row in rows:
            image, ents, box_space = self._entries(row)
            if not ents:
                continue
            img_id = len(images)
            images.append(image)
            for e in ents:
                entries.append(e)
                image_of.append(img_id)
                space.append(box_space)
        if not entries:
            raise ValueError("no texts in this batch (every row was empty after sampling)")
        keep = list(range(len(entries)))
        if self.max_texts is not None:
            if len(keep) > self.max_texts:
                keep = self.rng.sample(keep, self.max_texts)
            elif self.pad_with_duplicates and len(keep) < self.max_texts:
                keep = keep + [self.rng.choice(keep) for _ in range(self.max_texts - len(keep))]
        proc = self.processor
        ip = proc.image_processor
        input_size = ip.input_size
        pixel_values = ip(images, return_tensors="pt")["pixel_values"]
        texts = [entries[k][0] for k in keep]
        ids, att = encode_texts(
            proc.tokenizer, texts, max_length=proc.max_length, truncation=True, padding=proc.padding,
            add_sep=proc.add_sep, text_preprocessing=proc.text_preprocessing, max_words=proc.max_words,
        )
        input_ids = torch.tensor(ids, dtype=torch.long)
        attention_mask = torch.tensor(att, dtype=torch.long)
        n = len(keep)
        targets = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * n, dtype=torch.float64)
        masks = torch.ones(n, 1 + ip.num_patches, dtype=torch.long)
        for r, k in enumerate(keep):
            _, box, _ = entries[k]
            if box is None:
                continue
            xyxy = box_convert(torch.tensor([box], dtype=torch.float64), "xywh", "xyxy")
            scaled = scale_boxes_to_input(xyxy, space[k], input_size)
            targets[r] = normalize_boxes(scaled, input_size)[0]
            masks[r] = region_masks_from_boxes(box_convert(scaled, "xyxy", "xywh"), input_size, ip.patch_size)[0]
        mlm_input_ids, mlm_labels = self.masker(input_ids, attention_mask)
        return BatchFeature({
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_index": torch.tensor([image_of[k] for k in keep], dtype=torch.long),
            "region_masks": masks,
            "labels": targets.float(),
            "mlm_input_ids": mlm_input_ids,
            "mlm_labels": mlm_labels,
            "is_image": torch.tensor([entries[k][2] for k in keep], dtype=torch.long),
        })


class XVLMGroundingCollator:
    """Rows ``{"image", "text" (or "caption"), "bbox"}`` -> ``XVLMForGrounding`` inputs.

    Returns ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels`` (normalised cxcywh target boxes,
    ``(B, 4)``); with ``return_target_sizes`` also ``target_sizes`` ``(B, 2)`` (height, width) for
    ``post_process_grounding`` (pop it before calling the model). No augmentation: the evaluation batches of
    :class:`~modeling_xvlm.training.XVLMGroundingTrainCollator` (its ``for_evaluation()``).
    """

    input_columns: tuple[str, ...] = ("image", "text", "caption", "bbox")

    def __init__(self, processor, box_format: str = "xywh", return_target_sizes: bool = False) -> None:
        self.processor = processor
        self.box_format = box_format
        self.return_target_sizes = return_target_sizes

    def __call__(self, rows: Sequence[dict]):
        require_columns(rows, ["image", ("text", "caption")], "grounding")
        images = [r["image"] for r in rows]
        texts = [r["text"] if "text" in r else r["caption"] for r in rows]
        boxes = [r.get("bbox") for r in rows]
        out = self.processor(images=images, text=texts, boxes=boxes, box_format=self.box_format)
        batch = {
            "pixel_values": out["pixel_values"],
            "input_ids": out["input_ids"],
            "attention_mask": out["attention_mask"],
            "labels": out["labels"],
        }
        if self.return_target_sizes:
            rgb_sizes = [(im.height, im.width) for im in map(load_image_rgb, images)]
            batch["target_sizes"] = torch.tensor(rgb_sizes, dtype=torch.long)
        return BatchFeature(batch)
