"""XVLMProcessor: images + texts (+ boxes) -> X-VLM model inputs; predicted boxes -> pixel boxes."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .gradcam import post_process_gradcam
from .image_processing_xvlm import XVLMImageProcessor, XVLMImageProcessorPil, load_image_rgb, load_images_rgb
from .text import pre_caption, pre_question

__all__ = ["CAPTION_PROMPT", "XVLMProcessor", "encode_texts", "is_box", "is_image_pairs"]

TEXT_PREPROCESSING = ("caption", "question", None)
#: The official captioning prompt (`prompt` of `configs/Captioning.yaml`); the same string as
#: `modeling_xvlm_captioning.CAPTION_PROMPT` (this package does not import the models, to ship flat).
CAPTION_PROMPT = "a picture of "
_IGNORE_INDEX = -100  # the loss's ignored label (`modeling_xvlm.losses.IGNORE_INDEX`)


def is_box(x: Any) -> bool:
    """True for ``None`` or one box: 4 numbers (sequence, array or tensor of shape (4,))."""
    if x is None:
        return True
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return tuple(x.shape) == (4,)
    if isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 4:
        return all(isinstance(v, numbers.Number) for v in x)
    return False


def is_image_pairs(images: Any) -> bool:
    """True when ``images`` is a list of image groups (``[(left, right), ...]``, the NLVR2 input) rather than a flat
    list of images: a non-empty list / tuple one of whose items is itself a list or tuple."""
    return (
        isinstance(images, (list, tuple))
        and len(images) > 0
        and any(isinstance(item, (list, tuple)) for item in images)
    )


def _check_pairs(images: Sequence[Any], text: Any, boxes: Any, image_index: Any) -> None:
    """Validate the NLVR2 input: every item a pair of exactly two images, one sentence per pair."""
    for i, pair in enumerate(images):
        if not isinstance(pair, (list, tuple)):
            raise ValueError(
                f"images[{i}] is a single image but other items are pairs: give every item as a (left, right) "
                "pair of images"
            )
        if len(pair) != 2:
            raise ValueError(f"images[{i}] has {len(pair)} images: each pair must have exactly two (left, right)")
        for j, image in enumerate(pair):
            if isinstance(image, (list, tuple)):
                raise ValueError(f"images[{i}][{j}] must be one image, got a {type(image).__name__}")
    if boxes is not None or image_index is not None:
        raise ValueError("boxes and image_index are not supported with image pairs")
    if text is None:
        return
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError("with image pairs, text must be a list of sentences (one str per pair)")
    if len(texts) != len(images):
        raise ValueError(f"got {len(texts)} sentences for {len(images)} image pairs: give one sentence per pair")


def _group(structure: Any, is_leaf, n_images: int, what: str) -> tuple[list[Any], list[int] | None, bool]:
    """Flatten ``structure`` into leaves and the image each belongs to.

    Returns ``(leaves, image_index or None, nested)``; ``image_index`` is None when there are no images.
    """
    if isinstance(structure, (torch.Tensor, np.ndarray)) and getattr(structure, "ndim", 0) == 2:
        structure = list(structure)
    if is_leaf(structure):
        if n_images > 1:
            raise ValueError(f"got a single {what[:-1] if what.endswith('s') else what} for {n_images} images")
        return [structure], ([0] if n_images else None), False
    if not isinstance(structure, (list, tuple)):
        raise ValueError(f"{what} must be a {what[:-1]}, a list or a list of lists, got {type(structure).__name__}")
    if all(is_leaf(x) for x in structure):
        items = list(structure)
        if n_images == 0:
            return items, None, False
        if len(items) == n_images:
            return items, list(range(n_images)), False
        if n_images == 1:
            return items, [0] * len(items), False
        raise ValueError(
            f"got {len(items)} {what} for {n_images} images: give one per image, or a list of {n_images} lists "
            f"({what} per image)"
        )
    if n_images and len(structure) != n_images:
        raise ValueError(f"{what} has {len(structure)} groups but there are {n_images} images")
    leaves: list[Any] = []
    index: list[int] = []
    for i, group in enumerate(structure):
        if isinstance(group, (torch.Tensor, np.ndarray)) and group.ndim == 2:
            group = list(group)
        if is_leaf(group):
            group = [group]
        if not isinstance(group, (list, tuple)) or not all(is_leaf(x) for x in group):
            raise ValueError(f"{what}[{i}] must be a list of {what}, got {group!r}")
        leaves.extend(group)
        index.extend([i] * len(group))
    return leaves, (index if n_images else None), True


def encode_texts(
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = 40,
    truncation: bool = True,
    padding: str | bool = "longest",
    add_sep: bool = False,
    text_preprocessing: str | None = "caption",
    max_words: int | None = 30,
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenise texts the X-VLM way: ``[CLS] tokens`` (``+ [SEP]`` with ``add_sep``), padded with the pad id.

    Truncation keeps ``max_length - 1`` text tokens (``- 2`` with ``add_sep``), like the official custom tokenizer
    and pre-training code. ``padding``: ``"longest"``/``True``, ``"max_length"`` or ``False``/``"do_not_pad"``.

    Returns ``(input_ids, attention_mask)`` as lists of lists.
    """
    if text_preprocessing not in TEXT_PREPROCESSING:
        raise ValueError(f"text_preprocessing must be one of {TEXT_PREPROCESSING}, got {text_preprocessing!r}")
    cleaned = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text[{i}] must be a str, got {type(t).__name__}: {t!r}")
        try:
            if text_preprocessing == "caption":
                t = pre_caption(t, max_words)
            elif text_preprocessing == "question":
                t = pre_question(t, max_words)
        except ValueError as err:
            raise ValueError(f"text[{i}]: {err}") from None
        cleaned.append(t)
    n_special = 2 if add_sep else 1
    if truncation and max_length is not None and max_length <= n_special:
        raise ValueError(f"max_length must be > {n_special}, got {max_length}")
    body = tokenizer(cleaned, add_special_tokens=False)["input_ids"] if cleaned else []
    ids = []
    for toks in body:
        if truncation and max_length is not None:
            toks = toks[: max_length - n_special]
        row = [tokenizer.cls_token_id, *toks]
        if add_sep:
            row.append(tokenizer.sep_token_id)
        ids.append(row)
    if padding in (True, "longest"):
        target = max((len(r) for r in ids), default=0)
    elif padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        target = max(max_length, max((len(r) for r in ids), default=0))
    elif padding in (False, None, "do_not_pad"):
        target = None
    else:
        raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    masks = [[1] * len(r) for r in ids]
    if target is not None:
        ids = [r + [pad_id] * (target - len(r)) for r in ids]
        masks = [m + [0] * (target - len(m)) for m in masks]
    return ids, masks


class XVLMProcessor(ProcessorMixin):
    """X-VLM processor: an :class:`XVLMImageProcessorPil` (or :class:`XVLMImageProcessor`) and a BERT WordPiece tokenizer.

    Args:
        image_processor: X-VLM image processor (default: ``XVLMImageProcessorPil()``).
        tokenizer: a ``BertTokenizer`` / ``BertTokenizerFast``.
        max_length: maximum token count including [CLS] (default 40, the official retrieval value).
        add_sep: append [SEP] (default ``False``: the official encoder inputs are ``[CLS] tokens``).
        text_preprocessing: ``"caption"`` (official ``pre_caption``, default), ``"question"`` (``pre_question``)
            or ``None`` (raw text).
        max_words: word limit of the text cleaning (default 30).
        padding: default padding, ``"longest"`` (official fine-tuning) or ``"max_length"``.
        prompt: the captioning prompt (default :data:`CAPTION_PROMPT`, official ``"a picture of "``): the default
            of :meth:`encode_captions`, :meth:`caption_prompt` and :meth:`post_process_captions`, and what
            :meth:`post_process_image_text_to_text` cuts from the decoded texts that start with it (``""``: none).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        max_length: int = 40,
        add_sep: bool = False,
        text_preprocessing: str | None = "caption",
        max_words: int | None = 30,
        padding: str = "longest",
        prompt: str = CAPTION_PROMPT,
        **kwargs,
    ) -> None:
        if image_processor is None:
            image_processor = XVLMImageProcessorPil()
        if tokenizer is None:
            raise ValueError("XVLMProcessor needs a tokenizer (a BertTokenizer).")
        if text_preprocessing not in TEXT_PREPROCESSING:
            raise ValueError(f"text_preprocessing must be one of {TEXT_PREPROCESSING}, got {text_preprocessing!r}")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str (\"\" for none), got {type(prompt).__name__}: {prompt!r}")
        super().__init__(image_processor, tokenizer, **kwargs)
        self.max_length = max_length
        self.add_sep = add_sep
        self.text_preprocessing = text_preprocessing
        self.max_words = max_words
        self.padding = padding
        self.prompt = prompt

    @classmethod
    def from_model_config(
        cls, config: Any, tokenizer: Any, backend: str = "pil", **kwargs: Any
    ) -> XVLMProcessor:
        """A processor that fits a model: the image processor resizes to `config.image_size` and builds region
        masks on the model's patch grid (`config.patch_stride`, the Swin output stride), so its `pixel_values`
        and `region_masks` have the shapes the model checks.

        Args:
            config: an `XVLMConfig` (e.g. `model.config`).
            tokenizer: a BERT tokenizer (`BertTokenizer.from_pretrained("bert-base-uncased")` or a local folder).
            backend: `"pil"` (`XVLMImageProcessorPil`, default) or `"torchvision"` (`XVLMImageProcessor`).
            kwargs: the other `XVLMProcessor` settings (`max_length`, `text_preprocessing`, ...).
        """
        for name in ("image_size", "patch_stride"):
            if not isinstance(getattr(config, name, None), int):
                raise TypeError(f"config must be an XVLMConfig (with an int {name}), got {type(config).__name__}.")
        if backend not in ("pil", "torchvision"):
            raise ValueError(f"backend must be 'pil' or 'torchvision', got {backend!r}.")
        image_class = XVLMImageProcessor if backend == "torchvision" else XVLMImageProcessorPil
        size = config.image_size
        image_processor = image_class(size={"height": size, "width": size}, patch_size=config.patch_stride)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the sub-processors directly (works with or without the Auto registration).

        ``backend="pil"`` (default) or ``"torchvision"`` picks the image processor class.
        """
        kwargs = dict(kwargs)
        backend = kwargs.pop("backend", None) or "pil"
        kwargs.pop("use_fast", None)
        subfolder = kwargs.pop("subfolder", "")
        ip_cls = XVLMImageProcessor if backend == "torchvision" else XVLMImageProcessorPil
        image_processor = ip_cls.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    # ------------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        boxes: Any = None,
        box_format: str = "xywh",
        image_index: Sequence[int] | None = None,
        return_tensors: str | None = "pt",
        padding: str | bool | None = None,
        max_length: int | None = None,
        truncation: bool = True,
        add_sep: bool | None = None,
        text_preprocessing: str | None | bool = False,
        max_words: int | None | bool = False,
        **images_kwargs: Any,
    ) -> BatchFeature:
        """Build model inputs.

        Args:
            images: one image, a list of ``N_images`` images, or a 4-D batch (PIL / numpy / torch / paths); or, for
                NLVR2, a list of ``(left, right)`` pairs, one per sentence of ``text``: ``pixel_values`` is then
                ``(N_pairs, 2, 3, H, W)`` (as ViLT's NLVR2 input).
            text: one text; a list with one text per image; a list of texts for a single image; or a list of
                ``N_images`` lists (several texts per image).
            boxes: pixel boxes of the *original* images, mirroring ``text`` (one per text; ``None`` = whole image),
                or per image when ``text`` is None. 4 numbers each in ``box_format``.
            box_format: ``"xywh"`` (official / COCO, default), ``"xyxy"`` or ``"cxcywh"``.
            image_index: explicit image row for each text (overrides the structure of ``text``).
            return_tensors: ``"pt"`` (default), ``"np"`` or ``None``.
            padding, max_length, truncation, add_sep, text_preprocessing, max_words: override the processor's
                text settings for this call.
            images_kwargs: passed to the image processor.

        Returns:
            ``BatchFeature`` with ``pixel_values`` ``(N_images, 3, H, W)``; ``input_ids`` / ``attention_mask``
            ``(N_texts, L)``; ``image_index`` ``(N_texts,)`` when texts are not one per image or boxes are given;
            with boxes, ``region_masks`` ``(N_texts, 1 + P)`` and ``labels`` ``(N_texts, 4)``: the target boxes,
            normalised ``(cx, cy, w, h)`` (the box targets of ``XVLMForGrounding`` and ``XVLMForPretraining``).
        """
        if images is None and text is None:
            raise ValueError("give at least one of images and text")
        if boxes is not None and images is None:
            raise ValueError("boxes need the images they refer to")
        if is_image_pairs(images):
            return self._call_pairs(images, text, boxes, image_index, return_tensors, padding, max_length,
                                    truncation, add_sep, text_preprocessing, max_words, images_kwargs)
        data: dict[str, Any] = {}
        sizes: list[tuple[int, int]] = []
        n_images = 0
        if images is not None:
            rgb = load_images_rgb(images)
            sizes = [(im.height, im.width) for im in rgb]
            n_images = len(rgb)
            pixel = self.image_processor(rgb, return_tensors="pt", **images_kwargs)["pixel_values"]
            data["pixel_values"] = pixel

        texts: list[str] | None = None
        index: list[int] | None = None
        nested = False
        if text is not None and image_index is not None:
            texts = [text] if isinstance(text, str) else list(text)
        elif text is not None:
            texts, index, nested = _group(text, lambda x: isinstance(x, str), n_images, "texts")

        box_list: list[Any] | None = None
        if boxes is not None:
            box_list, box_index, box_nested = _group(boxes, is_box, n_images, "boxes")
            if texts is None:
                index, nested = box_index, True
            elif image_index is not None:
                if len(box_list) != len(texts):
                    raise ValueError(f"got {len(box_list)} boxes for {len(texts)} texts")
            elif len(box_list) != len(texts) or box_index != index:
                self._raise_box_mismatch(box_list, box_index, texts, index)

        if image_index is not None:
            if texts is None:
                raise ValueError("image_index needs text")
            image_index = [int(i) for i in image_index]
            if len(image_index) != len(texts):
                raise ValueError(f"image_index has {len(image_index)} entries for {len(texts)} texts")
            bad = [i for i in image_index if not 0 <= i < n_images]
            if bad:
                raise ValueError(f"image_index values {bad} are out of range for {n_images} images")
            index, nested = image_index, True

        if texts is not None:
            ids, att = encode_texts(
                self.tokenizer,
                texts,
                max_length=self.max_length if max_length is None else max_length,
                truncation=truncation,
                padding=self.padding if padding is None else padding,
                add_sep=self.add_sep if add_sep is None else add_sep,
                text_preprocessing=self.text_preprocessing if text_preprocessing is False else text_preprocessing,
                max_words=self.max_words if max_words is False else max_words,
            )
            data["input_ids"] = ids
            data["attention_mask"] = att

        if box_list is not None:
            names = self._box_names(boxes, box_list, index)
            targets, masks = self.image_processor.prepare_boxes(
                box_list, [sizes[i] for i in index], box_format=box_format, names=names
            )
            data["region_masks"] = masks
            data["labels"] = targets
        if index is not None and (nested or box_list is not None or len(index) != n_images or
                                  index != list(range(n_images))):
            data["image_index"] = index

        return self._to_batch(data, return_tensors)

    def _call_pairs(self, images, text, boxes, image_index, return_tensors, padding, max_length, truncation, add_sep,
                    text_preprocessing, max_words, images_kwargs) -> BatchFeature:
        """``images=[(left, right), ...]``, ``text=[sentence, ...]`` -> ``pixel_values`` ``(B, 2, 3, H, W)``."""
        _check_pairs(images, text, boxes, image_index)
        flat = [image for pair in images for image in pair]  # left0, right0, left1, right1, ...
        rgb = [load_image_rgb(image, f"images[{k // 2}][{k % 2}]") for k, image in enumerate(flat)]
        pixel = self.image_processor(rgb, return_tensors="pt", **images_kwargs)["pixel_values"]
        data: dict[str, Any] = {"pixel_values": pixel.view(len(images), 2, *pixel.shape[1:])}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            ids, att = encode_texts(
                self.tokenizer,
                texts,
                max_length=self.max_length if max_length is None else max_length,
                truncation=truncation,
                padding=self.padding if padding is None else padding,
                add_sep=self.add_sep if add_sep is None else add_sep,
                text_preprocessing=self.text_preprocessing if text_preprocessing is False else text_preprocessing,
                max_words=self.max_words if max_words is False else max_words,
            )
            data["input_ids"] = ids
            data["attention_mask"] = att
        return self._to_batch(data, return_tensors)

    @staticmethod
    def _raise_box_mismatch(box_list, box_index, texts, index) -> None:
        if index is None or box_index is None:
            raise ValueError(f"got {len(box_list)} boxes for {len(texts)} texts")
        n = max(max(index, default=-1), max(box_index, default=-1)) + 1
        for i in range(n):
            nt, nb = index.count(i), box_index.count(i)
            if nt != nb:
                raise ValueError(f"boxes[{i}]: image {i} has {nt} texts but {nb} boxes")
        raise ValueError(f"got {len(box_list)} boxes for {len(texts)} texts")

    @staticmethod
    def _box_names(boxes, box_list, index) -> list[str]:
        """``boxes[i]`` for flat inputs, ``boxes[img][j]`` for per-image lists."""
        flat = is_box(boxes) or (
            isinstance(boxes, (list, tuple)) and all(is_box(b) for b in boxes)
        ) or (isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim == 2)
        if flat or index is None:
            return [f"boxes[{i}]" for i in range(len(box_list))]
        names, seen = [], {}
        for img in index:
            j = seen.get(img, 0)
            seen[img] = j + 1
            names.append(f"boxes[{img}][{j}]")
        return names

    @staticmethod
    def _to_batch(
        data: dict[str, Any], return_tensors: str | None, labels_dtype: torch.dtype = torch.float32
    ) -> BatchFeature:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("input_ids", "attention_mask", "image_index", "region_masks"):
                value = torch.as_tensor(value, dtype=torch.long) if _rectangular(value) else value
            elif key == "labels":  # box targets (float) or token labels (long; ragged without padding)
                value = torch.as_tensor(value, dtype=labels_dtype) if _rectangular(value) else value
            if return_tensors in ("np", "numpy") and isinstance(value, torch.Tensor):
                value = value.numpy()
            elif return_tensors is None and isinstance(value, torch.Tensor):
                value = value.tolist()
            out[key] = value
        if return_tensors not in ("pt", "np", "numpy", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(out)

    def post_process_grounding(
        self, outputs: Any, target_sizes: Any = None, box_format: str = "xyxy"
    ) -> list[dict[str, torch.Tensor]]:
        """See :meth:`XVLMImageProcessorPil.post_process_grounding`."""
        return self.image_processor.post_process_grounding(outputs, target_sizes=target_sizes, box_format=box_format)

    def post_process_grounded_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: Any = None,
        text_labels: Sequence[str | Sequence[str]] | None = None,
    ) -> list[dict[str, Any]]:
        """OWL-ViT / Grounding DINO format: per (image, text) row ``{"scores", "labels", "boxes" (pixel xyxy),
        "text_labels"}``. See :meth:`XVLMImageProcessorPil.post_process_grounded_object_detection`."""
        return self.image_processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=target_sizes, text_labels=text_labels
        )

    def post_process_gradcam(
        self, maps: Any, candidate_boxes: Any, target_sizes: Any
    ) -> list[dict[str, Any]]:
        """Weakly supervised grounding (official ``grounding_eval``): per pair, every candidate's score (the
        bicubically up-sampled Grad-CAM map summed inside the box / sqrt(box area)), the chosen ``index`` and its
        ``box`` in pixel x0, y0, x1, y1. ``maps`` ``(B, grid_h, grid_w)`` from ``XVLMForRetrieval.compute_gradcam``;
        ``candidate_boxes`` per pair in pixel ``[x, y, w, h]`` (official ``dets.json``); ``target_sizes`` per pair
        ``(height, width)`` of the original image. See :func:`gradcam.post_process_gradcam`."""
        return post_process_gradcam(maps, candidate_boxes, target_sizes)

    def encode_answers(self, answers: Sequence[str], return_tensors: str | None = "pt") -> BatchFeature:
        """Tokenise VQA answers as the official code: ``[CLS] answer [SEP]``, padded to the longest, no cleaning
        and no truncation (official ``VQA.py``: ``tokenizer(answer + '[SEP]', padding='longest')``).

        Encode a candidate list once and pass it to every ``XVLMForQuestionAnswering.rank_answers`` call.

        Returns:
            ``BatchFeature`` with ``input_ids`` and ``attention_mask`` ``(N_answers, La)``.
        """
        if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
            raise ValueError("answers must be a non-empty list of answer strings")
        for i, answer in enumerate(answers):
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError(f"answers[{i}] must be a non-empty str, got {answer!r}")
        ids, att = encode_texts(
            self.tokenizer, list(answers), max_length=None, truncation=False, add_sep=True, text_preprocessing=None
        )
        return self._to_batch({"input_ids": ids, "attention_mask": att}, return_tensors)

    def post_process_answers(
        self, ranking: Any, answer_list: Sequence[str], top_k: int = 1
    ) -> list[list[dict[str, Any]]]:
        """Map a ranking (``XVLMAnswerRankingOutput``, or ``(candidate_indices, probabilities)``) back to the
        candidate strings: per question, the ``top_k`` best ``{"answer", "score"}``, best first."""
        if isinstance(ranking, (tuple, list)):
            indices, probabilities = ranking[0], ranking[1]
        else:
            indices, probabilities = ranking["candidate_indices"], ranking["probabilities"]
        indices, probabilities = torch.as_tensor(indices), torch.as_tensor(probabilities)
        if indices.dim() != 2 or indices.shape != probabilities.shape:
            raise ValueError(
                f"expected candidate_indices and probabilities of one shape (B, k), got {tuple(indices.shape)} and "
                f"{tuple(probabilities.shape)}"
            )
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if indices.numel() and int(indices.max()) >= len(answer_list):
            raise ValueError(f"candidate index {int(indices.max())} is outside the {len(answer_list)} answers")
        return [
            [{"answer": answer_list[int(i)], "score": float(p)} for i, p in zip(row[:top_k], probs[:top_k])]
            for row, probs in zip(indices, probabilities)
        ]

    # -- captioning (official `models/model_captioning.py`, `dataset/coco_karpathy_dataset.py`) ------------------

    def _caption_prompt_text(self, prompt: str | None) -> str:
        prompt = self.prompt if prompt is None else prompt
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str (\"\" for none), got {type(prompt).__name__}: {prompt!r}")
        return prompt

    def caption_prompt_length(self, prompt: str | None = None) -> int:
        """The official ``prompt_length``: ``len(tokenizer(prompt).input_ids) - 1``, i.e. ``[CLS]`` and the
        prompt's tokens without ``[SEP]`` (4 for ``"a picture of "``, 1 for ``""``): the leading labels that
        :meth:`encode_captions` sets to -100."""
        prompt = self._caption_prompt_text(prompt)
        return 1 + len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def encode_captions(
        self,
        captions: Sequence[str],
        prompt: str | None = None,
        max_length: int | None = None,
        max_words: int | None | bool = False,
        padding: str | bool | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Captioning training inputs as the official code builds them: ``prompt + pre_caption(caption,
        max_words)`` (official ``coco_karpathy_train``, the prompt itself is not cleaned), tokenised as
        ``[CLS] prompt caption [SEP]`` with truncation to ``max_length`` tokens keeping ``[SEP]`` and padding to
        the longest (official ``tokenizer(caption, padding='longest', truncation=True, max_length=max_tokens)``).

        Args:
            captions: the captions (raw text; cleaned here).
            prompt: default ``self.prompt`` (official ``"a picture of "``; ``""``: ``[CLS] caption [SEP]``, as the
                captioning domain pre-training).
            max_length: token limit with ``[CLS]`` and ``[SEP]``; default ``self.max_length`` (official
                ``max_tokens`` 40).
            max_words: ``pre_caption`` word limit; default (``False``) ``max_length``, as the official
                ``coco_karpathy_train(max_words=config['max_tokens'])``; ``None``: no limit.
            padding: default ``self.padding`` (``"longest"``).

        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask`` and ``labels`` ``(N, L)``: ``labels`` are
            ``input_ids`` with the padding and the first :meth:`caption_prompt_length` tokens set to -100
            (official ``decoder_targets``; equal to ``modeling_xvlm_captioning.caption_labels``).
        """
        if isinstance(captions, str) or not isinstance(captions, Sequence) or not captions:
            raise ValueError("captions must be a non-empty list of caption strings")
        prompt = self._caption_prompt_text(prompt)
        max_length = self.max_length if max_length is None else max_length
        max_words = max_length if max_words is False else max_words
        prompt_length = self.caption_prompt_length(prompt)
        if max_length is not None and max_length < prompt_length + 2:
            raise ValueError(
                f"max_length={max_length} leaves no token for the caption: the prompt {prompt!r} takes "
                f"{prompt_length} tokens with [CLS], and [SEP] one more"
            )
        texts = []
        for i, caption in enumerate(captions):
            try:
                texts.append(prompt + pre_caption(caption, max_words))
            except ValueError as err:
                raise ValueError(f"captions[{i}]: {err}") from None
        ids, att = encode_texts(
            self.tokenizer,
            texts,
            max_length=max_length,
            truncation=max_length is not None,
            padding=self.padding if padding is None else padding,
            add_sep=True,
            text_preprocessing=None,
        )
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        labels = [
            [_IGNORE_INDEX if k < prompt_length or m == 0 or t == pad_id else t for k, (t, m) in enumerate(zip(r, a))]
            for r, a in zip(ids, att)
        ]
        data = {"input_ids": ids, "attention_mask": att, "labels": labels}
        return self._to_batch(data, return_tensors, labels_dtype=torch.long)

    def caption_prompt(self, batch_size: int = 1, prompt: str | None = None) -> torch.LongTensor:
        """The generation prompt ``(batch_size, P)``: ``[CLS] prompt`` without ``[SEP]`` (official
        ``tokenizer(prompt).input_ids[:, :-1]``; ``[CLS] a picture of`` by default, ``P`` =
        :meth:`caption_prompt_length`). Pass it as ``input_ids`` to ``XVLMForConditionalGeneration.generate``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        prompt = self._caption_prompt_text(prompt)
        body = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        row = [self.tokenizer.cls_token_id, *body]
        return torch.tensor([row] * batch_size, dtype=torch.long)

    def post_process_captions(self, generated_ids: Any, prompt: str | None = None) -> list[str]:
        """Captions of generated ids ``(N, L)`` (prompt included, as ``generate`` returns them; or an output with
        ``sequences``): the official decoding ``decode(ids, skip_special_tokens=True)[len(prompt):]``, stripped.

        When the decoded text does not start with the prompt (a prompt word outside the vocabulary decodes to
        nothing, upper case decodes lower-cased) the prompt's :meth:`caption_prompt_length` tokens are cut instead.
        """
        prompt = self._caption_prompt_text(prompt)
        rows = _id_rows(generated_ids, "generated_ids")
        prompt_length = self.caption_prompt_length(prompt)
        captions = []
        for row in rows:
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            if text.startswith(prompt.rstrip()):
                caption = text[len(prompt) :]  # official: cut the prompt's characters
            else:
                caption = self.tokenizer.decode(row[prompt_length:], skip_special_tokens=True)
            captions.append(caption.strip())
        return captions

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs: Any
    ) -> list[str] | str:
        """Decode generated ids for transformers' ``"image-text-to-text"`` pipeline (``batch_decode``), with the
        captioning prompt cut as :meth:`post_process_captions` does: a decoded text that starts with
        ``self.prompt`` loses its characters, so the pipeline returns the caption alone with
        ``return_full_text=False`` and ``prompt + caption`` by default. Texts that do not start with the prompt
        (VQA answers, other prompts) are returned as decoded; ``prompt=""`` cuts nothing.

        ``(N, L)`` ids give a list of N strings, ``(L,)`` ids one string (as ``ProcessorMixin``).
        """
        single = isinstance(generated_outputs, (torch.Tensor, np.ndarray)) and generated_outputs.ndim == 1
        rows = _id_rows(generated_outputs, "generated_outputs")
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
        prefix = self.prompt.rstrip()
        if prefix:
            texts = [t[len(self.prompt) :].strip() if t.startswith(prefix) else t for t in texts]
        return texts[0] if single else texts

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


def _id_rows(ids: Any, name: str) -> list[list[int]]:
    """Token ids ``(N, L)`` / ``(L,)`` (tensor, array, lists, or an output with ``sequences``) as lists of ints."""
    ids = getattr(ids, "sequences", ids)
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim not in (1, 2):
            raise ValueError(f"{name} must be token ids (N, L) or (L,), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be token ids (N, L), got {type(ids).__name__}")
    if ids and all(isinstance(t, numbers.Integral) for t in ids):
        return [list(ids)]
    if not all(isinstance(r, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in r) for r in ids):
        raise ValueError(f"{name} must be token ids (N, L): lists of ints")
    return [list(r) for r in ids]


def _rectangular(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, list) and value and isinstance(value[0], list):
        return len({len(r) for r in value}) == 1
    return True
