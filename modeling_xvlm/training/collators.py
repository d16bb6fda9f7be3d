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
* :class:`XVLMVQACollator` - VQA rows (``image``, ``question``, ``answers``, ``source``) ->
  ``XVLMForQuestionAnswering`` inputs: the questions, every question's unique answers with their official weights
  (:func:`vqa_answer_weights`) as ``labels``; official careful flip, then :func:`vqa_train_transform`.
* :class:`XVLMCaptioningCollator` - image-caption rows -> ``XVLMForConditionalGeneration`` inputs: ``[CLS] prompt
  caption [SEP]`` (official ``prompt + pre_caption(caption, 40)``), ``labels`` with the prompt and padding -100
  (:func:`captioning_train_transform`, the retrieval ``train_transform``, for training).
* :class:`XVLMCaptioningSCSTCollator` - image rows -> self-critical batches: the images and up to five reference
  captions per image (official ``coco_karpathy_train_scst``) plus the batch's sampling seed.
* :class:`XVLMTextAssignmentCollator` - image-text rows -> ``XVLMForTextAssignment`` inputs (official
  ``NLVR_pretrain.py``: the ``pretrain_transform`` images and the captions; the model draws the image pairs).
* :class:`XVLMImageTextTransform` - the official ``pretrain_transform`` for pre-training image-text rows.
* :class:`BoxSafeRegionSampler` - the processing region sampler followed by box-safe RandAugment (official
  ``box_transform``), for pre-training region batches.

Every collator draws its randomness from ``self.rng`` (a ``random.Random``); :func:`reseed` re-seeds a collator
and every RNG it holds, which the training loop does before each batch so that a batch is a function of its seed.

Every collator names the row columns it reads (``input_columns``) and checks them first
(:func:`~modeling_xvlm.training.region_collators.require_columns`), so rows stripped by ``transformers.Trainer``'s
default ``remove_unused_columns=True`` fail at the first batch with the setting to change;
:class:`~modeling_xvlm.training.XVLMTrainer` keeps those columns. The augmenting collators have ``for_evaluation()``:
the same collator without its random training transform, which ``XVLMTrainer`` uses for evaluation.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature

from ..modeling_xvlm_captioning import CAPTION_PROMPT
from ..processing import encode_texts, load_image_rgb, pre_caption
from .augment import RandomAugment, hflip, random_resized_crop
from .region_collators import XVLMGroundingCollator, XVLMRegionSampler, mentions_left_right, require_columns

__all__ = [
    "XVLMImageTextTransform",
    "XVLMRetrievalCollator",
    "XVLMGroundingTrainCollator",
    "XVLMNLVR2Collator",
    "XVLMTextAssignmentCollator",
    "XVLMVQACollator",
    "XVLMCaptioningCollator",
    "XVLMCaptioningSCSTCollator",
    "BoxSafeRegionSampler",
    "captioning_train_transform",
    "encode_questions",
    "nlvr2_label",
    "nlvr2_train_transform",
    "reseed",
    "vqa_answer_weights",
    "vqa_train_transform",
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


class _AugmentingCollator:
    """A collator whose random training augmentation is ``self.transform`` (``None``: the evaluation resize)."""

    transform: XVLMImageTextTransform | None

    def for_evaluation(self):
        """A copy of this collator without its training transform (the processor's square bicubic resize): the
        deterministic evaluation batches."""
        evaluation = copy.copy(self)
        evaluation.transform = None
        return evaluation


class XVLMRetrievalCollator(_AugmentingCollator):
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

    input_columns: tuple[str, ...] = ("image", "caption", "image_index")

    def __init__(self, processor, transform: XVLMImageTextTransform | None = None) -> None:
        self.processor = processor
        self.transform = transform
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        require_columns(rows, ["image", "caption"], "retrieval")
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

    ``for_evaluation()`` gives the evaluation collator: :class:`XVLMGroundingCollator`, the processor's output
    without any crop, flip or RandAugment.
    """

    input_columns: tuple[str, ...] = ("image", "text", "caption", "bbox")

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

    def for_evaluation(self) -> XVLMGroundingCollator:
        """The un-augmented batches of the same rows (``labels`` in the same normalised ``cxcywh``)."""
        return XVLMGroundingCollator(self.processor, box_format="xywh")

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        require_columns(rows, ["image", ("text", "caption"), "bbox"], "grounding")
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


class XVLMNLVR2Collator(_AugmentingCollator):
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

    input_columns: tuple[str, ...] = ("left_image", "right_image", "sentence", "label")

    def __init__(self, processor, transform: XVLMImageTextTransform | None = None,
                 left_right_test: str = "word") -> None:
        self.processor = processor
        self.transform = transform
        self.left_right_test = left_right_test
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        require_columns(rows, ["left_image", "right_image", "sentence"], "NLVR2")
        images, sentences, labels = [], [], []
        for r in rows:
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


def vqa_train_transform(
    image_size: int, randaugment: bool = True, crop_scale_min: float = 0.5
) -> XVLMImageTextTransform:
    """The official VQA training transform ``train_transform_wohflip`` (``dataset/__init__.py``):
    RandomResizedCrop(image_size, scale=(0.5, 1)) (bicubic) -> RandAugment(2, 7), no flip (the VQA dataset flips
    the image itself beforehand, see :class:`XVLMVQACollator`)."""
    return XVLMImageTextTransform(
        image_size, scale=(crop_scale_min, 1.0), hflip_prob=0.0, careful_hflip=False, randaugment=randaugment
    )


def vqa_answer_weights(answers: Sequence[str], source: str = "") -> tuple[list[str], list[float]]:
    """The training answers of one question and their loss weights (official ``vqa_dataset.py``, train split).

    ``source == "vg"`` (a Visual Genome question, one answer): ``([answer], [0.5])``. Otherwise the unique annotator
    answers in first-seen order, each weighted by ``count / len(answers)`` (so the weights sum to 1).

    Raises:
        ValueError: no answers, or a VG question with more than one answer.
    """
    answers = [answers] if isinstance(answers, str) else list(answers or [])
    if not answers:
        raise ValueError("a VQA training question needs at least one answer, got none")
    if not all(isinstance(a, str) for a in answers):
        raise ValueError(f"VQA answers must be strings, got {answers!r}")
    if source == "vg":
        if len(answers) != 1:
            raise ValueError(f"a Visual Genome ('vg') question has one answer, got {len(answers)}: {answers!r}")
        return [answers[0]], [0.5]
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return list(counts), [n / len(answers) for n in counts.values()]


class XVLMVQACollator(_AugmentingCollator):
    """VQA rows ``{"image", "question", "answers", "source"}`` -> ``XVLMForQuestionAnswering.forward`` inputs:

    * ``pixel_values`` ``(B, 3, H, W)``;
    * ``input_ids``, ``attention_mask`` ``(B, Lq)``: ``[CLS] words``, official ``pre_question`` (``max_words``)
      and truncation to ``max_length`` tokens (official ``max_tokens`` 40; ``None``: no truncation, as the
      official test split);
    * ``labels``, ``decoder_attention_mask`` ``(N, La)``: the ``N`` answers ``[CLS] answer [SEP]``
      (``XVLMProcessor.encode_answers``), padding -100 in ``labels``; question ``i``'s answers are consecutive;
    * ``answer_weights`` ``(N,)`` (:func:`vqa_answer_weights`) and ``answers_per_question`` ``(B,)``.

    Training (``transform`` given): official careful flip (``vqa_dataset.py``): with probability 0.5 the image is
    flipped *before* the transform, unless "left" or "right" occurs in the question or an answer (a substring test,
    as officially, but case-insensitive; ``careful_hflip=False`` flips regardless); then ``transform``
    (:func:`vqa_train_transform`, which never flips). Every row needs answers. Evaluation (``transform=None``): the
    processor's square bicubic resize; rows without answers (test questions) give a batch without answers, for
    ranking.

    Args:
        processor: an ``XVLMProcessor``.
        transform: the training transform (:func:`vqa_train_transform`), or ``None`` for evaluation.
        max_words: question word limit of ``pre_question`` (official 30 for training, 50 at test).
        max_length: question token limit (official ``max_tokens`` 40), ``None`` for none.
        hflip_prob: probability of the careful flip (official 0.5).
        careful_hflip: skip the flip when a text says left/right (official: always).
    """

    input_columns: tuple[str, ...] = ("image", "question", "answers", "source", "question_id")

    def __init__(
        self,
        processor,
        transform: XVLMImageTextTransform | None = None,
        max_words: int = 30,
        max_length: int | None = 40,
        hflip_prob: float = 0.5,
        careful_hflip: bool = True,
    ) -> None:
        self.processor = processor
        self.transform = transform
        self.max_words = max_words
        self.max_length = max_length
        self.hflip_prob = hflip_prob
        self.careful_hflip = careful_hflip
        self.rng = random.Random()

    def _image(self, row: dict) -> Any:
        if self.transform is None:
            return row["image"]
        image = load_image_rgb(row["image"])
        texts = [row["question"], *(row.get("answers") or [])]
        # official order: the coin is drawn for every image, then the texts are looked at
        coin = self.rng.random() < self.hflip_prob
        if coin and not (self.careful_hflip and mentions_left_right([t.lower() for t in texts], "substring")):
            image = hflip(image)
        return self.transform(image, allow_flip=False)

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        require_columns(rows, ["image", "question"], "VQA")
        with_answers = [bool(r.get("answers")) for r in rows]
        if self.transform is not None and not all(with_answers):
            k = with_answers.index(False)
            raise ValueError(f"VQA training row {k} (question_id {rows[k].get('question_id')!r}) has no answers")
        if any(with_answers) and not all(with_answers):
            raise ValueError("some VQA rows have answers and others not")
        images = [self._image(r) for r in rows]
        ids, att = encode_questions(self.processor, [r["question"] for r in rows], self.max_words, self.max_length)
        out: dict[str, Any] = {
            "pixel_values": pixel_values_from_pil(images, self.processor.image_processor),
            "input_ids": ids,
            "attention_mask": att,
        }
        if rows and all(with_answers):
            out.update(self._answers(rows))
        return BatchFeature(out)

    def _answers(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        answers, weights, counts = [], [], []
        for k, r in enumerate(rows):
            try:
                unique, w = vqa_answer_weights(r["answers"], r.get("source") or "")
            except ValueError as error:
                raise ValueError(f"VQA row {k} (question_id {r.get('question_id')!r}): {error}") from None
            answers.extend(unique)
            weights.extend(w)
            counts.append(len(unique))
        encoded = self.processor.encode_answers(answers)
        mask = encoded["attention_mask"].long()
        return {
            "labels": encoded["input_ids"].long().masked_fill(mask == 0, -100),
            "decoder_attention_mask": mask,
            "answer_weights": torch.tensor(weights, dtype=torch.float32),
            "answers_per_question": torch.tensor(counts, dtype=torch.long),
        }


def encode_questions(
    processor, questions: Sequence[str], max_words: int = 30, max_length: int | None = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``(B, Lq)`` of VQA questions: official ``pre_question(q, max_words)``, then
    ``[CLS] words`` (no [SEP]) padded to the longest, truncated to ``max_length`` tokens (``None``: not truncated)."""
    ids, att = encode_texts(
        processor.tokenizer,
        list(questions),
        max_length=max_length,
        truncation=max_length is not None,
        padding="longest",
        add_sep=False,
        text_preprocessing="question",
        max_words=max_words,
    )
    return torch.tensor(ids, dtype=torch.long), torch.tensor(att, dtype=torch.long)


class XVLMTextAssignmentCollator(_AugmentingCollator):
    """Image-text rows -> ``XVLMForTextAssignment`` inputs: ``pixel_values`` ``(B, 3, H, W)``, ``input_ids``,
    ``attention_mask`` and ``return_loss=True`` (the model draws the image pairs and their labels itself, so a
    batch has no ``labels``; ``return_loss`` makes ``Trainer`` report an evaluation loss).

    Rows: ``{"image", "caption"}`` (a str, or a list from which one caption is drawn per batch) or the
    ``pretrain`` schema ``{"image", "captions"}``. Official ``NLVR_pretrain.py``: image-text data with the
    ``pretrain_transform`` (``XVLMImageTextTransform(scale=(0.2, 1))``); ``transform=None`` resizes only.
    """

    input_columns: tuple[str, ...] = ("image", "caption", "captions")

    def __init__(self, processor, transform: XVLMImageTextTransform | None = None) -> None:
        self.processor = processor
        self.transform = transform
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        require_columns(rows, ["image", ("caption", "captions")], "text-assignment")
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


# ----------------------------------------------------------------------------------------------------------------
# Captioning
# ----------------------------------------------------------------------------------------------------------------

#: Official caption word limit: `coco_karpathy_train(max_words=config['max_tokens'])`, 40 (`dataset/__init__.py`).
CAPTION_MAX_WORDS = 40
#: Official caption token limit: `max_tokens` 40 of `configs/Captioning.yaml` (prompt, [CLS] and [SEP] included).
CAPTION_MAX_TOKENS = 40
#: References per image of an SCST batch (official `coco_karpathy_train_scst`: `random.sample(captions_gt, 5)`).
SCST_NUM_REFERENCES = 5


def captioning_train_transform(
    image_size: int, randaugment: bool = True, crop_scale_min: float = 0.5, careful_hflip: bool = True
) -> XVLMImageTextTransform:
    """The official captioning (and SCST) training transform, ``train_transform`` (``dataset/__init__.py``:
    ``caption_coco`` / ``caption_coco_scst``), the retrieval one: RandomResizedCrop(image_size, scale=(0.5, 1))
    (bicubic) -> horizontal flip (p = 0.5; skipped when the caption says left/right unless
    ``careful_hflip=False``, the official behaviour) -> RandAugment(2, 7)."""
    return XVLMImageTextTransform(
        image_size, scale=(crop_scale_min, 1.0), careful_hflip=careful_hflip, randaugment=randaugment
    )


def _row_captions(row: dict, k: int, what: str) -> list[str]:
    captions = row["caption"] if row.get("caption") is not None else row.get("captions")
    if isinstance(captions, str):
        captions = [captions]
    if "image" not in row or not captions:
        missing = "image" if "image" not in row else "caption"
        raise ValueError(f"{what} row {k} has no {missing} (keys: {sorted(row)})")
    return list(captions)


class XVLMCaptioningCollator(_AugmentingCollator):
    """Image-caption rows -> ``XVLMForConditionalGeneration.forward`` inputs:

    * ``pixel_values`` ``(B, 3, H, W)``;
    * ``input_ids``, ``attention_mask`` ``(B, L)``: ``[CLS] prompt caption [SEP]``
      (``XVLMProcessor.encode_captions``: official ``prompt + pre_caption(caption, 40)``, at most 40 tokens);
    * ``labels`` ``(B, L)``: ``input_ids`` with the prompt (``[CLS] a picture of``, official ``prompt_length``)
      and the padding set to -100.

    Rows: ``{"image", "caption": str}`` (one record per image and caption, as the official training file), or
    ``{"image", "captions": [str]}`` / ``{"image", "caption": [str]}`` (one row per image: one caption is drawn
    per row and batch with ``self.rng``, which the training loop seeds per batch). ``transform``: the training
    augmentation (:func:`captioning_train_transform`); ``None`` resizes only (official ``test_transform``).

    Args:
        processor: an ``XVLMProcessor``.
        transform: the training transform, or ``None``.
        prompt: the text every caption starts with (official ``'a picture of '``; ``""`` for the captioning domain
            pre-training: ``[CLS] caption [SEP]``).
        max_words: ``pre_caption`` word limit (official 40, ``max_tokens``); max_length: token limit (official 40;
            ``None``: the processor's ``max_length``).
    """

    input_columns: tuple[str, ...] = ("image", "caption", "captions")

    def __init__(
        self,
        processor,
        transform: XVLMImageTextTransform | None = None,
        prompt: str = CAPTION_PROMPT,
        max_words: int | None = CAPTION_MAX_WORDS,
        max_length: int | None = CAPTION_MAX_TOKENS,
    ) -> None:
        self.processor = processor
        self.transform = transform
        self.prompt = prompt
        self.max_words = max_words
        self.max_length = max_length
        prompt_length = processor.caption_prompt_length(prompt)
        if max_length is not None and prompt_length + 2 > max_length:
            raise ValueError(f"the prompt {prompt!r} takes {prompt_length} of the {max_length} tokens: no room for a "
                             "caption and [SEP]")
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        require_columns(rows, ["image", ("caption", "captions")], "captioning")
        images, captions = [], []
        for k, r in enumerate(rows):
            choices = _row_captions(r, k, "captioning")
            caption = choices[0] if len(choices) == 1 else self.rng.choice(choices)
            image = r["image"]
            if self.transform is not None:
                image = self.transform(image, [caption])
            images.append(image)
            captions.append(caption)
        text = self.processor.encode_captions(captions, prompt=self.prompt, max_length=self.max_length,
                                              max_words=self.max_words)
        return BatchFeature(
            {
                "pixel_values": pixel_values_from_pil(images, self.processor.image_processor),
                "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"],
                "labels": text["labels"],
            }
        )


class XVLMCaptioningSCSTCollator(_AugmentingCollator):
    """Image rows ``{"image", "captions"}`` -> self-critical batches (official ``coco_karpathy_train_scst``):

    * ``pixel_values`` ``(B, 3, H, W)`` (``transform``: the official ``train_transform``,
      :func:`captioning_train_transform`; ``None`` resizes only);
    * ``references``: per image, ``num_references`` of its captions drawn without replacement (all of them when it
      has fewer; official ``random.sample(captions_gt, 5)``), ``pre_caption``-cleaned (40 words), no prompt;
    * ``sample_seed`` (a 0-d long tensor): the seed of the batch's caption sampling, drawn from ``self.rng``
      (seeded per batch by the training loop, so a step's samples are a function of the step).

    A row's ``caption`` (the record's own caption, when the rows are one per image and caption) is ignored: the
    official SCST record only selects the image.
    """

    input_columns: tuple[str, ...] = ("image", "captions")

    def __init__(
        self,
        processor,
        transform: XVLMImageTextTransform | None = None,
        max_words: int | None = CAPTION_MAX_WORDS,
        num_references: int = SCST_NUM_REFERENCES,
    ) -> None:
        if num_references < 1:
            raise ValueError(f"num_references must be at least 1, got {num_references}")
        self.processor = processor
        self.transform = transform
        self.max_words = max_words
        self.num_references = num_references
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> BatchFeature:
        require_columns(rows, ["image", "captions"], "SCST")
        images, references = [], []
        for k, r in enumerate(rows):
            row = {key: v for key, v in r.items() if key != "caption"}
            captions = _row_captions(row, k, "SCST")
            try:
                cleaned = [pre_caption(c, self.max_words) for c in captions]
            except ValueError as error:
                raise ValueError(f"SCST row {k}: {error}") from None
            refs = self.rng.sample(cleaned, min(self.num_references, len(cleaned)))
            image = r["image"] if self.transform is None else self.transform(r["image"], refs)
            images.append(image)
            references.append(refs)
        return BatchFeature(
            {
                "pixel_values": pixel_values_from_pil(images, self.processor.image_processor),
                "references": references,
                "sample_seed": torch.tensor(self.rng.getrandbits(62), dtype=torch.long),
            }
        )
